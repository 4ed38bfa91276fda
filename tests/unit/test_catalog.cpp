// meta/catalog: schema, CRUD, name rules, state transitions and concurrency.
#include <sqlite3.h>

#include <algorithm>
#include <atomic>
#include <latch>
#include <set>
#include <thread>

#include "core/error.hpp"
#include "meta/catalog.hpp"
#include "support.hpp"

using Catch::Matchers::Contains;
using imagefs::ActiveInfo;
using imagefs::Catalog;
using imagefs::Errc;
using imagefs::ImageRow;
using imagefs::NewImage;
using imagefs::SourceKind;
using imagefs::State;
using unit::dump;
using unit::error_from;
using unit::TempDir;

namespace {

constexpr int64_t GiB = int64_t{1} << 30;

NewImage image(const std::string& name, const std::string& source = "/srv/images/disk.img") {
    NewImage n;
    n.name = name;
    n.source = source;
    n.kind = SourceKind::file;
    return n;
}

std::string pragma_text(Catalog& c, const char* pragma) {
    imagefs::sql::Statement st(c.connection(), pragma);
    REQUIRE(st.step());
    return st.text(0);
}

const std::string kSha256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

// Drives a fresh image to `target` through the real transitions. Returns the final row.
ImageRow drive_to(Catalog& c, const std::string& name, State target) {
    ImageRow r = c.add(image(name));
    if (target == State::queued) return r;
    auto started = c.start_import(r.id);
    REQUIRE(started);
    if (target == State::importing) return *started;
    if (target == State::failed) {
        REQUIRE(c.fail(r.id, started->import_token, "boom"));
        return *c.get(r.id);
    }
    REQUIRE(c.update_progress(r.id, started->import_token, 100));
    REQUIRE(c.begin_verify(r.id, started->import_token, 4096));
    if (target == State::verifying) return *c.get(r.id);
    ActiveInfo info{4096, kSha256, std::nullopt, "raw", 4096};
    REQUIRE(c.activate(r.id, started->import_token, info));
    return *c.get(r.id);
}

}  // namespace

TEST_CASE("catalog: fresh create has the current schema version and WAL journal mode",
          "[catalog]") {
    TempDir t;
    const std::string db = t.str("catalog.db");
    Catalog c(db);
    CHECK(c.schema_version() == Catalog::kSchemaVersion);
    CHECK(pragma_text(c, "PRAGMA journal_mode") == "wal");
    CHECK(c.list().empty());
    // Messages show such bytes escaped, and UTF-8 names are fine.
    auto e = error_from([&] { c.add(image("\xff\xfe")); });
    REQUIRE(e);
    CHECK_THAT(std::string(e->what()), Contains("'\\xff\\xfe'") && Contains("valid UTF-8"));
    c.add(image("debian-12-\xc3\xa9t\xc3\xa9-\xf0\x9f\x90\xa7.qcow2"));
    CHECK(c.list().size() == 1);
    CHECK(unit::fs::is_regular_file(db));

    // Another, independent SQLite connection sees the same version and the images table.
    sqlite3* raw = nullptr;
    REQUIRE(sqlite3_open_v2(db.c_str(), &raw, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK);
    sqlite3_stmt* st = nullptr;
    REQUIRE(sqlite3_prepare_v2(raw, "PRAGMA user_version", -1, &st, nullptr) == SQLITE_OK);
    REQUIRE(sqlite3_step(st) == SQLITE_ROW);
    CHECK(sqlite3_column_int64(st, 0) == Catalog::kSchemaVersion);
    sqlite3_finalize(st);
    REQUIRE(sqlite3_prepare_v2(raw, "SELECT count(*) FROM sqlite_master WHERE name = 'images'", -1,
                               &st, nullptr) == SQLITE_OK);
    REQUIRE(sqlite3_step(st) == SQLITE_ROW);
    CHECK(sqlite3_column_int64(st, 0) == 1);
    sqlite3_finalize(st);
    sqlite3_close_v2(raw);
}

TEST_CASE("catalog: opening an existing catalog again keeps its rows", "[catalog]") {
    TempDir t;
    const std::string db = t.str("catalog.db");
    int64_t id = 0;
    {
        Catalog c(db);
        id = c.add(image("kept")).id;
    }
    Catalog a(db);                    // reopen, create allowed
    Catalog b(db, /*create=*/false);  // and a second one at the same time, create not allowed
    CHECK(a.schema_version() == Catalog::kSchemaVersion);
    CHECK(b.schema_version() == Catalog::kSchemaVersion);
    REQUIRE(a.find("kept"));
    CHECK(a.find("kept")->id == id);
    REQUIRE(b.get(id));
    CHECK(b.get(id)->name == "kept");

    // A write through one is visible through the other.
    auto added = a.add(image("second"));
    REQUIRE(b.find("second"));
    CHECK(b.find("second")->id == added.id);
    CHECK(b.list().size() == 2);
}

TEST_CASE("catalog: a newer schema version is refused and the file is left untouched",
          "[catalog]") {
    TempDir t;
    const std::string db = t.str("catalog.db");
    const int64_t newer = Catalog::kSchemaVersion + 1;
    {
        // A catalog written by a (hypothetical) newer imagefs: WAL mode, a row, user_version + 1.
        Catalog c(db);
        c.add(image("from-the-future"));
        c.connection().exec(("PRAGMA user_version = " + std::to_string(newer)).c_str());
    }
    const std::string before = unit::read_file(db);
    const auto entries_before = unit::dir_entries(t.path());

    auto e = error_from([&] { Catalog c(db); });
    REQUIRE(e);
    CHECK(e->code() == Errc::corrupt);
    const std::string msg = e->what();
    CHECK_THAT(msg, Contains("schema version " + std::to_string(newer)));
    CHECK_THAT(msg, Contains("(" + std::to_string(Catalog::kSchemaVersion) + ")"));
    CHECK_THAT(msg, Contains(db));

    // Also with create=false (what the daemon's workers use).
    auto e2 = error_from([&] { Catalog c(db, false); });
    REQUIRE(e2);
    CHECK(e2->code() == Errc::corrupt);

    CHECK(unit::diff_bytes(unit::read_file(db), before) == "");
    CHECK(unit::dir_entries(t.path()) == entries_before);
}

// BUG (meta/sqlite.cpp, Connection::Connection, "PRAGMA journal_mode=WAL" runs before
// Catalog::migrate() checks user_version): a newer-schema catalog that is in rollback-journal mode
// is converted to WAL (header bytes 18-19 rewritten from 1,1 to 2,2) before it is refused, so the
// refused file is not left byte-identical. Fix idea: read PRAGMA user_version (a read-only
// access, which also detects SQLITE_NOTADB) before switching the journal mode.
TEST_CASE("catalog: a newer schema in rollback-journal mode is refused and left untouched",
          "[catalog][bug]") {
    TempDir t;
    const std::string db = t.str("catalog.db");
    const int64_t newer = Catalog::kSchemaVersion + 1;
    {
        sqlite3* raw = nullptr;
        REQUIRE(sqlite3_open_v2(db.c_str(), &raw, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE,
                                nullptr) == SQLITE_OK);
        const std::string sql =
            "CREATE TABLE images (id INTEGER PRIMARY KEY, name TEXT);"
            "INSERT INTO images (name) VALUES ('x');"
            "PRAGMA user_version = " +
            std::to_string(newer) + ";";
        REQUIRE(sqlite3_exec(raw, sql.c_str(), nullptr, nullptr, nullptr) == SQLITE_OK);
        REQUIRE(sqlite3_close_v2(raw) == SQLITE_OK);
    }
    const std::string before = unit::read_file(db);
    REQUIRE(before.size() >= 100);
    REQUIRE(before[18] == 1);  // rollback journal ("legacy") file format

    auto e = error_from([&] { Catalog c(db); });
    REQUIRE(e);
    CHECK(e->code() == Errc::corrupt);
    CHECK_THAT(std::string(e->what()), Contains("schema version " + std::to_string(newer)));
    CHECK(unit::diff_bytes(unit::read_file(db), before) == "");
}

TEST_CASE("catalog: a file that is not a database is refused and left untouched", "[catalog]") {
    TempDir t;
    const std::string db = t.str("catalog.db");
    const std::string junk = unit::random_bytes(64 * 1024, 0x5eed);
    unit::write_file(db, junk);

    for (bool create : {true, false}) {
        auto e = error_from([&] { Catalog c(db, create); });
        REQUIRE(e);
        CHECK(e->code() == Errc::corrupt);
        CHECK_THAT(std::string(e->what()), Contains(db));
    }
    CHECK(unit::diff_bytes(unit::read_file(db), junk) == "");
    CHECK(unit::dir_entries(t.path()) == std::vector<std::string>{"catalog.db"});
}

TEST_CASE("catalog: 64-bit sizes round-trip", "[catalog]") {
    TempDir t;
    Catalog c(t.str("catalog.db"));
    NewImage n = image("big");
    n.expected_size = 5 * GiB;
    ImageRow r = c.add(n);
    REQUIRE(r.expected_size);
    CHECK(*r.expected_size == 5368709120LL);
    CHECK(*c.get(r.id)->expected_size == 5368709120LL);

    auto s = c.start_import(r.id);
    REQUIRE(s);
    const int64_t past_4g = (int64_t{1} << 32) + 12345;
    REQUIRE(c.update_progress(r.id, s->import_token, past_4g));
    CHECK(c.get(r.id)->bytes_imported == past_4g);

    REQUIRE(c.set_expected_size(r.id, s->import_token, int64_t{1} << 41));
    CHECK(c.get(r.id)->expected_size == std::optional<int64_t>(int64_t{1} << 41));

    const int64_t final_size = (int64_t{1} << 40) + 3;
    REQUIRE(c.begin_verify(r.id, s->import_token, final_size));
    auto v = c.get(r.id);
    CHECK(v->final_size == std::optional<int64_t>(final_size));
    CHECK(v->bytes_imported == final_size);

    const int64_t vsize = (int64_t{1} << 50) + 7;
    REQUIRE(c.activate(r.id, s->import_token,
                       ActiveInfo{final_size, kSha256, std::nullopt, "qcow2", vsize}));
    auto a = c.get(r.id);
    CHECK(a->final_size == std::optional<int64_t>(final_size));
    CHECK(a->virtual_size == std::optional<int64_t>(vsize));
    CHECK(a->format == std::optional<std::string>("qcow2"));

    // And through a fresh connection.
    Catalog other(t.str("catalog.db"), false);
    auto o = other.find("big");
    REQUIRE(o);
    CHECK(o->final_size == std::optional<int64_t>(final_size));
    CHECK(o->virtual_size == std::optional<int64_t>(vsize));
    CHECK(o->expected_size == std::optional<int64_t>(int64_t{1} << 41));
}

TEST_CASE("catalog: add find get list and remove", "[catalog]") {
    TempDir t;
    Catalog c(t.str("catalog.db"));

    NewImage z;
    z.name = "zeta";
    z.source = "https://example.com/zeta.iso";
    z.kind = SourceKind::http;
    z.expected_size = 1234;
    z.expected_sha256 = kSha256;
    z.expected_sha512 = std::string(128, 'f');
    const int64_t t0 = imagefs::now_ms();
    ImageRow zr = c.add(z);
    const int64_t t1 = imagefs::now_ms();

    CHECK(zr.id > 0);
    CHECK(zr.name == "zeta");
    CHECK(zr.source == "https://example.com/zeta.iso");
    CHECK(zr.kind == SourceKind::http);
    CHECK(zr.state == State::queued);
    CHECK(zr.expected_size == std::optional<int64_t>(1234));
    CHECK(zr.bytes_imported == 0);
    CHECK_FALSE(zr.final_size);
    CHECK_FALSE(zr.sha256);
    CHECK_FALSE(zr.sha512);
    CHECK(zr.expected_sha256 == std::optional<std::string>(kSha256));
    CHECK(zr.expected_sha512 == std::optional<std::string>(std::string(128, 'f')));
    CHECK_FALSE(zr.format);
    CHECK_FALSE(zr.virtual_size);
    CHECK(zr.attempts == 0);
    CHECK_FALSE(zr.last_error);
    CHECK(zr.created_at >= t0);
    CHECK(zr.created_at <= t1);
    CHECK(zr.updated_at == zr.created_at);
    CHECK_FALSE(zr.activated_at);
    CHECK(zr.import_token == 0);

    ImageRow ar = c.add(image("alpha", "/data/alpha.img"));
    CHECK(ar.kind == SourceKind::file);
    CHECK(ar.id > zr.id);
    CHECK_FALSE(ar.expected_size);
    CHECK_FALSE(ar.expected_sha256);

    REQUIRE(c.find("zeta"));
    CHECK(dump(*c.find("zeta")) == dump(zr));
    REQUIRE(c.get(ar.id));
    CHECK(dump(*c.get(ar.id)) == dump(ar));
    CHECK_FALSE(c.find("missing"));
    CHECK_FALSE(c.find("ZETA"));  // names are case-sensitive
    CHECK_FALSE(c.get(ar.id + 1000));

    auto all = c.list();  // ordered by name
    REQUIRE(all.size() == 2);
    CHECK(all[0].name == "alpha");
    CHECK(all[1].name == "zeta");

    auto removed = c.remove("zeta");
    REQUIRE(removed);
    CHECK(dump(*removed) == dump(zr));
    CHECK_FALSE(c.find("zeta"));
    CHECK_FALSE(c.get(zr.id));
    CHECK_FALSE(c.remove("zeta"));
    CHECK_FALSE(c.remove("never-existed"));
    REQUIRE(c.list().size() == 1);
    CHECK(c.list()[0].name == "alpha");

    // Ids are never reused (inode numbers derive from them).
    ImageRow again = c.add(image("zeta"));
    CHECK(again.id > ar.id);
    CHECK(again.id != zr.id);
}

TEST_CASE("catalog: a duplicate name is refused with exists", "[catalog]") {
    TempDir t;
    Catalog c(t.str("catalog.db"));
    ImageRow first = c.add(image("dup", "/a.img"));
    auto e = error_from([&] { c.add(image("dup", "/other.img")); });
    REQUIRE(e);
    CHECK(e->code() == Errc::exists);
    CHECK_THAT(std::string(e->what()), Contains("'dup'"));
    REQUIRE(c.list().size() == 1);
    CHECK(dump(c.list()[0]) == dump(first));

    // A second connection gets the same answer.
    Catalog other(t.str("catalog.db"), false);
    auto e2 = error_from([&] { other.add(image("dup")); });
    REQUIRE(e2);
    CHECK(e2->code() == Errc::exists);
}

TEST_CASE("catalog: invalid image names are refused", "[catalog]") {
    TempDir t;
    Catalog c(t.str("catalog.db"));
    const std::vector<std::string> bad = {"",
                                          ".",
                                          "..",
                                          "a/b",
                                          "/",
                                          "/abs",
                                          "trailing/",
                                          std::string(256, 'n'),
                                          std::string("a\0b", 3),
                                          std::string(1, '\0'),
                                          "a\nb",
                                          "tab\there",
                                          "del\x7f",
                                          "\xff\xfe",
                                          "\xc3",           // truncated sequence
                                          "\xc0\xaf",       // overlong '/'
                                          "\xed\xa0\x80"};  // a surrogate
    for (const auto& name : bad) {
        INFO("name of " << name.size() << " bytes: '" << name << "'");
        auto e = error_from([&] { c.add(image(name)); });
        REQUIRE(e);
        CHECK(e->code() == Errc::invalid_argument);
        CHECK_THAT(std::string(e->what()), Contains("invalid image name"));
    }
    CHECK(c.list().empty());

    auto e = error_from([&] { c.add(image(std::string(256, 'n'))); });
    REQUIRE(e);
    CHECK_THAT(std::string(e->what()), Contains("256 bytes"));

    const std::string longest(255, 'L');
    ImageRow r = c.add(image(longest));
    CHECK(r.name == longest);
    REQUIRE(c.find(longest));
    CHECK(c.find(longest)->name.size() == 255);

    // Spaces, dots and UTF-8 are fine.
    CHECK(c.add(image("my image .iso")).name == "my image .iso");
    CHECK(c.add(image("...")).name == "...");
    CHECK(c.add(image("d\xc3\xa9j\xc3\xa0")).name == "d\xc3\xa9j\xc3\xa0");
    CHECK(c.list().size() == 4);
}

TEST_CASE("catalog: full transition path queued to importing to verifying to active", "[catalog]") {
    TempDir t;
    Catalog c(t.str("catalog.db"));
    ImageRow q = c.add(image("disk"));
    REQUIRE(q.state == State::queued);

    auto imp = c.start_import(q.id);
    REQUIRE(imp);
    CHECK(imp->state == State::importing);
    CHECK(imp->attempts == 1);
    CHECK(imp->import_token == q.import_token + 1);
    CHECK(imp->bytes_imported == 0);
    CHECK(imp->updated_at >= q.updated_at);
    CHECK(dump(*c.get(q.id)) == dump(*imp));
    const int64_t tok = imp->import_token;

    REQUIRE(c.set_expected_size(q.id, tok, 8192));
    CHECK(c.get(q.id)->expected_size == std::optional<int64_t>(8192));
    REQUIRE(c.update_progress(q.id, tok, 4096));
    CHECK(c.get(q.id)->bytes_imported == 4096);
    CHECK(c.get(q.id)->state == State::importing);

    REQUIRE(c.begin_verify(q.id, tok, 8192));
    auto ver = c.get(q.id);
    CHECK(ver->state == State::verifying);
    CHECK(ver->final_size == std::optional<int64_t>(8192));
    CHECK(ver->bytes_imported == 8192);
    CHECK_FALSE(ver->activated_at);

    const int64_t before = imagefs::now_ms();
    const std::string sha512(128, 'e');
    REQUIRE(c.activate(q.id, tok, ActiveInfo{8192, kSha256, sha512, "iso", 8192}));
    auto act = c.get(q.id);
    CHECK(act->state == State::active);
    CHECK(act->final_size == std::optional<int64_t>(8192));
    CHECK(act->sha256 == std::optional<std::string>(kSha256));
    CHECK(act->sha512 == std::optional<std::string>(sha512));
    CHECK(act->format == std::optional<std::string>("iso"));
    CHECK(act->virtual_size == std::optional<int64_t>(8192));
    REQUIRE(act->activated_at);
    CHECK(*act->activated_at >= before);
    CHECK(*act->activated_at <= imagefs::now_ms());
    CHECK(act->updated_at >= *act->activated_at);  // updated_at also counts versions
    CHECK(act->attempts == 1);
    CHECK(act->import_token == tok);
    CHECK_FALSE(act->last_error);
    CHECK(act->created_at == q.created_at);
}

TEST_CASE("catalog: transitions with a stale token or from the wrong state change nothing",
          "[catalog]") {
    TempDir t;
    Catalog c(t.str("catalog.db"));
    ImageRow q = c.add(image("disk"));
    const ActiveInfo info{10, kSha256, std::nullopt, "raw", 10};

    SECTION("queued") {
        const std::string snap = dump(*c.get(q.id));
        CHECK_FALSE(c.set_expected_size(q.id, q.import_token, 5));
        CHECK_FALSE(c.update_progress(q.id, q.import_token, 5));
        CHECK_FALSE(c.begin_verify(q.id, q.import_token, 10));
        CHECK_FALSE(c.activate(q.id, q.import_token, info));
        CHECK_FALSE(c.fail(q.id, q.import_token, "nope"));
        CHECK(dump(*c.get(q.id)) == snap);
    }
    SECTION("importing") {
        auto imp = c.start_import(q.id);
        REQUIRE(imp);
        const int64_t tok = imp->import_token;
        const std::string snap = dump(*c.get(q.id));
        for (int64_t stale : {tok - 1, tok + 1}) {
            CHECK_FALSE(c.set_expected_size(q.id, stale, 5));
            CHECK_FALSE(c.update_progress(q.id, stale, 5));
            CHECK_FALSE(c.begin_verify(q.id, stale, 10));
            CHECK_FALSE(c.fail(q.id, stale, "stale"));
        }
        CHECK_FALSE(c.activate(q.id, tok, info));  // right token, wrong state
        CHECK_FALSE(c.start_import(q.id));         // not queued
        CHECK(dump(*c.get(q.id)) == snap);
    }
    SECTION("verifying") {
        auto imp = c.start_import(q.id);
        REQUIRE(imp);
        const int64_t tok = imp->import_token;
        REQUIRE(c.begin_verify(q.id, tok, 10));
        const std::string snap = dump(*c.get(q.id));
        CHECK_FALSE(c.update_progress(q.id, tok, 5));    // importing only
        CHECK_FALSE(c.set_expected_size(q.id, tok, 5));  // importing only
        CHECK_FALSE(c.begin_verify(q.id, tok, 11));      // already verifying
        CHECK_FALSE(c.activate(q.id, tok + 1, info));    // stale token
        CHECK_FALSE(c.activate(q.id, tok - 1, info));
        CHECK_FALSE(c.fail(q.id, tok + 1, "stale"));
        CHECK_FALSE(c.start_import(q.id));
        CHECK(dump(*c.get(q.id)) == snap);
    }
    SECTION("active") {
        ImageRow a = drive_to(c, "act", State::active);
        const std::string snap = dump(a);
        const int64_t tok = a.import_token;
        CHECK_FALSE(c.fail(a.id, tok, "too late"));
        CHECK_FALSE(c.update_progress(a.id, tok, 1));
        CHECK_FALSE(c.begin_verify(a.id, tok, 1));
        CHECK_FALSE(c.activate(a.id, tok, info));
        CHECK_FALSE(c.start_import(a.id));
        CHECK(dump(*c.get(a.id)) == snap);
    }
    SECTION("an old attempt after retry") {
        auto imp = c.start_import(q.id);
        REQUIRE(imp);
        const int64_t old_tok = imp->import_token;
        REQUIRE(c.fail(q.id, old_tok, "first attempt failed"));
        c.retry("disk");
        auto second = c.start_import(q.id);
        REQUIRE(second);
        CHECK(second->import_token == old_tok + 1);
        const std::string snap = dump(*c.get(q.id));
        CHECK_FALSE(c.update_progress(q.id, old_tok, 99));
        CHECK_FALSE(c.begin_verify(q.id, old_tok, 99));
        CHECK_FALSE(c.fail(q.id, old_tok, "late failure of the first attempt"));
        CHECK(dump(*c.get(q.id)) == snap);
    }
    SECTION("unknown id") {
        CHECK_FALSE(c.start_import(q.id + 100));
        CHECK_FALSE(c.update_progress(q.id + 100, 1, 5));
        CHECK_FALSE(c.begin_verify(q.id + 100, 1, 5));
        CHECK_FALSE(c.activate(q.id + 100, 1, info));
        CHECK_FALSE(c.fail(q.id + 100, 1, "x"));
        CHECK(c.list().size() == 1);
    }
}

TEST_CASE("catalog: fail stores last_error and the next attempt clears it", "[catalog]") {
    TempDir t;
    Catalog c(t.str("catalog.db"));

    ImageRow a = drive_to(c, "from-importing", State::importing);
    REQUIRE(c.fail(a.id, a.import_token, "HTTP 404 from http://x/y"));
    auto fa = c.get(a.id);
    CHECK(fa->state == State::failed);
    CHECK(fa->last_error == std::optional<std::string>("HTTP 404 from http://x/y"));
    CHECK_FALSE(c.fail(a.id, a.import_token, "again"));  // already failed
    CHECK(c.get(a.id)->last_error == std::optional<std::string>("HTTP 404 from http://x/y"));

    ImageRow v = drive_to(c, "from-verifying", State::verifying);
    REQUIRE(c.fail(v.id, v.import_token, "sha256 mismatch"));
    CHECK(c.get(v.id)->state == State::failed);
    CHECK(c.get(v.id)->last_error == std::optional<std::string>("sha256 mismatch"));

    // retry + start_import: the error of the previous attempt is gone.
    c.retry("from-importing");
    auto again = c.start_import(a.id);
    REQUIRE(again);
    CHECK_FALSE(again->last_error);
    CHECK(again->state == State::importing);
}

TEST_CASE("catalog: retry works only from failed and resets attempts", "[catalog]") {
    TempDir t;
    Catalog c(t.str("catalog.db"));

    auto e = error_from([&] { c.retry("ghost"); });
    REQUIRE(e);
    CHECK(e->code() == Errc::not_found);
    CHECK_THAT(std::string(e->what()), Contains("'ghost'"));

    for (State s : {State::queued, State::importing, State::verifying, State::active}) {
        const std::string name = "img-" + std::string(imagefs::to_string(s));
        ImageRow r = drive_to(c, name, s);
        const std::string snap = dump(*c.get(r.id));
        auto err = error_from([&] { c.retry(name); });
        INFO("state " << imagefs::to_string(s));
        REQUIRE(err);
        CHECK(err->code() == Errc::invalid_argument);
        CHECK_THAT(std::string(err->what()), Contains(std::string(imagefs::to_string(s))));
        CHECK_THAT(std::string(err->what()), Contains("only failed images can be retried"));
        CHECK(dump(*c.get(r.id)) == snap);
    }

    // Two failed attempts, then retry.
    ImageRow f = c.add(image("flaky"));
    auto a1 = c.start_import(f.id);
    REQUIRE(c.update_progress(f.id, a1->import_token, 777));
    REQUIRE(c.fail(f.id, a1->import_token, "first"));
    ImageRow r1 = c.retry("flaky");
    CHECK(r1.state == State::queued);
    CHECK(r1.attempts == 0);
    auto a2 = c.start_import(f.id);
    CHECK(a2->attempts == 1);
    REQUIRE(c.update_progress(f.id, a2->import_token, 555));
    REQUIRE(c.fail(f.id, a2->import_token, "second"));
    CHECK(c.get(f.id)->attempts == 1);

    ImageRow r2 = c.retry("flaky");
    CHECK(r2.state == State::queued);
    CHECK(r2.attempts == 0);
    CHECK_FALSE(r2.last_error);
    CHECK(r2.bytes_imported == 0);
    CHECK(r2.import_token == a2->import_token);  // the token only moves on start_import
    CHECK(dump(*c.get(f.id)) == dump(r2));

    // Retrying a queued image again is refused.
    auto e2 = error_from([&] { c.retry("flaky"); });
    REQUIRE(e2);
    CHECK(e2->code() == Errc::invalid_argument);
}

TEST_CASE("catalog: recover requeues importing and verifying and leaves the rest alone",
          "[catalog]") {
    TempDir t;
    Catalog c(t.str("catalog.db"));
    ImageRow q = drive_to(c, "q", State::queued);
    ImageRow i = drive_to(c, "i", State::importing);
    REQUIRE(c.update_progress(i.id, i.import_token, 5000));
    ImageRow v = drive_to(c, "v", State::verifying);
    ImageRow a = drive_to(c, "a", State::active);
    ImageRow f = drive_to(c, "f", State::failed);
    const std::string q_snap = dump(*c.get(q.id));
    const std::string a_snap = dump(*c.get(a.id));
    const std::string f_snap = dump(*c.get(f.id));

    auto ids = c.recover();
    std::sort(ids.begin(), ids.end());
    CHECK(ids == std::vector<int64_t>{i.id, v.id});

    for (const auto& id : {i.id, v.id}) {
        auto r = c.get(id);
        CHECK(r->state == State::queued);
        CHECK(r->bytes_imported == 0);
        CHECK_FALSE(r->final_size);
        CHECK(r->attempts == 1);
    }
    CHECK(dump(*c.get(q.id)) == q_snap);
    CHECK(dump(*c.get(a.id)) == a_snap);
    CHECK(dump(*c.get(f.id)) == f_snap);

    // Interrupted attempts cannot write any more; the next start_import gets a new token.
    CHECK_FALSE(c.update_progress(i.id, i.import_token, 6000));
    CHECK_FALSE(c.begin_verify(v.id, v.import_token, 4096));
    auto again = c.start_import(i.id);
    REQUIRE(again);
    CHECK(again->import_token == i.import_token + 1);
    CHECK(again->attempts == 2);

    CHECK(c.recover() == std::vector<int64_t>{i.id});
    CHECK(c.recover().empty());
}

TEST_CASE("catalog: two connections in two threads write concurrently without busy errors",
          "[catalog]") {
    TempDir t;
    const std::string db = t.str("catalog.db");
    { Catalog init(db); }

    constexpr int kPerThread = 200;
    std::latch go(2);
    std::vector<std::string> errors[2];
    auto worker = [&](int n) {
        try {
            Catalog c(db, false);
            go.arrive_and_wait();
            for (int k = 0; k < kPerThread; ++k) {
                ImageRow r = c.add(image("t" + std::to_string(n) + "-" + std::to_string(k)));
                if (k % 10 == 0) {
                    auto s = c.start_import(r.id);
                    if (!s || !c.update_progress(r.id, s->import_token, k))
                        errors[n].push_back("transition failed for " + r.name);
                }
            }
        } catch (const imagefs::Error& e) {
            errors[n].push_back(std::string(imagefs::to_string(e.code())) + ": " + e.what());
        } catch (const std::exception& e) {
            errors[n].push_back(e.what());
        }
    };
    std::thread t0(worker, 0), t1(worker, 1);
    t0.join();
    t1.join();
    CHECK(errors[0] == std::vector<std::string>{});
    CHECK(errors[1] == std::vector<std::string>{});

    Catalog c(db);
    auto rows = c.list();
    CHECK(rows.size() == 2 * kPerThread);
    std::set<std::string> names;
    std::set<int64_t> ids;
    for (const auto& r : rows) {
        names.insert(r.name);
        ids.insert(r.id);
    }
    CHECK(names.size() == 2 * kPerThread);
    CHECK(ids.size() == 2 * kPerThread);
    CHECK(names.count("t0-0") == 1);
    CHECK(names.count("t1-199") == 1);
    CHECK(c.find("t1-190")->state == State::importing);
    CHECK(c.find("t1-190")->bytes_imported == 190);
}

TEST_CASE("catalog: two threads creating the same new catalog at once both succeed", "[catalog]") {
    TempDir t;
    const std::string db = t.str("catalog.db");
    std::latch go(2);
    std::vector<std::string> errors[2];
    auto worker = [&](int n) {
        try {
            go.arrive_and_wait();
            Catalog c(db);
            if (c.schema_version() != Catalog::kSchemaVersion) errors[n].push_back("bad version");
            c.add(image("first-" + std::to_string(n)));
        } catch (const std::exception& e) {
            errors[n].push_back(e.what());
        }
    };
    std::thread t0(worker, 0), t1(worker, 1);
    t0.join();
    t1.join();
    CHECK(errors[0] == std::vector<std::string>{});
    CHECK(errors[1] == std::vector<std::string>{});
    Catalog c(db);
    CHECK(c.list().size() == 2);
}

TEST_CASE("catalog: state and source kind names round-trip", "[catalog]") {
    for (State s :
         {State::queued, State::importing, State::verifying, State::active, State::failed})
        CHECK(imagefs::parse_state(imagefs::to_string(s)) == std::optional<State>(s));
    CHECK(imagefs::to_string(State::verifying) == "verifying");
    CHECK_FALSE(imagefs::parse_state("Active"));
    CHECK_FALSE(imagefs::parse_state(""));
    CHECK(imagefs::to_string(SourceKind::http) == "http");
    CHECK(imagefs::to_string(SourceKind::file) == "file");
    CHECK(imagefs::to_string(SourceKind::upload) == "upload");
}
