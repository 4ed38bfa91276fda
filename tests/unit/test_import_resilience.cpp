// Retries, resume and their catalog columns: backoff math, which errors are retried, the v1 -> v3
// catalog migration on a catalog written by imagefs 0.1 (schema 1), the retry/checkpoint
// transitions, HTTP validator and range handling, the sources.allow list, and the daemon options.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sqlite3.h>

#include <map>
#include <set>

#include "core/error.hpp"
#include "core/options.hpp"
#include "core/statedir.hpp"
#include "import/allowlist.hpp"
#include "import/importer.hpp"
#include "import/retry.hpp"
#include "import/source.hpp"
#include "meta/catalog.hpp"
#include "support.hpp"

using Catch::Matchers::Contains;
using imagefs::AllowList;
using imagefs::Catalog;
using imagefs::ContentRange;
using imagefs::Errc;
using imagefs::Error;
using imagefs::HttpResponse;
using imagefs::ImageRow;
using imagefs::NewImage;
using imagefs::ResumeDecision;
using imagefs::RetryPolicy;
using imagefs::SourceKind;
using imagefs::State;
using imagefs::Validator;
using unit::error_from;
using unit::TempDir;

namespace {

NewImage http_image(const std::string& name) {
    NewImage n;
    n.name = name;
    n.source = "http://images.example.org/" + name;
    n.kind = SourceKind::http;
    return n;
}

}  // namespace

// ---- backoff -------------------------------------------------------------------------------

TEST_CASE("retry: backoff doubles from the base, is capped, and jitters within [d/2, d]",
          "[retry]") {
    RetryPolicy p{1000, 30000};
    // unit 1.0 gives the full delay, 0.0 half of it.
    const int64_t full[] = {1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000};
    for (int64_t n = 1; n <= 8; ++n) {
        INFO("retry " << n);
        CHECK(imagefs::backoff_delay_ms(p, n, 1.0) == full[n - 1]);
        CHECK(imagefs::backoff_delay_ms(p, n, 0.0) == full[n - 1] / 2);
        CHECK(imagefs::backoff_delay_ms(p, n, 0.5) == full[n - 1] * 3 / 4);
    }
    // Out-of-range randoms are clamped; absurd retry numbers neither overflow nor loop.
    CHECK(imagefs::backoff_delay_ms(p, 3, -4.0) == 2000);
    CHECK(imagefs::backoff_delay_ms(p, 3, 9.0) == 4000);
    CHECK(imagefs::backoff_delay_ms(p, int64_t{1} << 62, 1.0) == 30000);
    CHECK(imagefs::backoff_delay_ms(p, 0, 1.0) == 1000);
    // A base above the cap is the cap; a zero base never waits.
    CHECK(imagefs::backoff_delay_ms(RetryPolicy{60000, 5000}, 1, 1.0) == 5000);
    CHECK(imagefs::backoff_delay_ms(RetryPolicy{0, 5000}, 7, 1.0) == 0);
    // The defaults: 5 s doubling to at most 5 min.
    RetryPolicy d;
    CHECK(imagefs::backoff_delay_ms(d, 1, 1.0) == 5000);
    CHECK(imagefs::backoff_delay_ms(d, 7, 1.0) == 300000);
    CHECK(imagefs::kDefaultRetries == 10);
}

TEST_CASE("retry: the random delays stay in range and are spread out", "[retry]") {
    RetryPolicy p{1000, 30000};
    std::set<int64_t> seen;
    for (int i = 0; i < 200; ++i) {
        int64_t v = imagefs::backoff_delay_ms(p, 3);
        CHECK(v >= 2000);
        CHECK(v <= 4000);
        seen.insert(v);
    }
    CHECK(seen.size() > 50);  // jitter, not a constant
}

TEST_CASE("retry: only network failures are retried", "[retry]") {
    CHECK(imagefs::is_retryable(Error(Errc::network, "HTTP 503")));
    for (Errc c : {Errc::not_found, Errc::permission, Errc::invalid_argument, Errc::no_space,
                   Errc::failed, Errc::io, Errc::cancelled, Errc::corrupt}) {
        INFO(imagefs::to_string(c));
        CHECK_FALSE(imagefs::is_retryable(Error(c, "x")));
    }
}

// ---- the catalog: v1 -> v2 and the new transitions ------------------------------------------

// tests/unit/data/catalog-v1.sql is `sqlite3 catalog.db .dump` of a catalog written by imagefs
// 0.1 (schema 1): images added with its CLI, then driven to every state as its daemon would.
TEST_CASE("catalog: a schema 1 catalog from imagefs 0.1 migrates to the current schema",
          "[catalog][migration]") {
    TempDir t;
    const std::string db = t.str("catalog.db");
    {
        const std::string dump = unit::read_file(IMAGEFS_UNIT_DATA "/catalog-v1.sql");
        sqlite3* raw = nullptr;
        REQUIRE(sqlite3_open_v2(db.c_str(), &raw, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE,
                                nullptr) == SQLITE_OK);
        char* err = nullptr;
        int rc = sqlite3_exec(raw, dump.c_str(), nullptr, nullptr, &err);
        INFO((err ? err : ""));
        REQUIRE(rc == SQLITE_OK);
        sqlite3_close_v2(raw);
    }
    Catalog c(db);
    CHECK(c.schema_version() == Catalog::kSchemaVersion);
    CHECK(Catalog::kSchemaVersion == 3);
    auto rows = c.list();
    REQUIRE(rows.size() == 5);
    std::map<std::string, ImageRow> by;
    for (const auto& r : rows) by[r.name] = r;
    // The old columns are as the old version wrote them.
    CHECK(by.at("active.qcow2").state == State::active);
    CHECK(by.at("active.qcow2").final_size.has_value());
    CHECK(by.at("active.qcow2").sha256.has_value());
    CHECK(by.at("failed.img").state == State::failed);
    CHECK(by.at("failed.img").last_error.has_value());
    CHECK(by.at("importing.img").state == State::importing);
    CHECK(by.at("queued.iso").state == State::queued);
    CHECK(by.at("queued.iso").expected_sha256.has_value());
    // The new ones have their defaults.
    for (const auto& r : rows) {
        INFO(r.name);
        CHECK_FALSE(r.max_retries);
        CHECK(r.retry_limit() == imagefs::kDefaultRetries);
        CHECK_FALSE(r.next_attempt_at);
        CHECK(r.resume_offset == 0);
        CHECK_FALSE(r.etag);
        CHECK_FALSE(r.last_modified);
        CHECK_FALSE(r.tls_ca);
        CHECK_FALSE(r.tls_insecure);
        CHECK(r.mode == 0444);  // schema 2's columns too
        CHECK(r.xattrs.empty());
    }
    // A migrated row goes through the new transitions.
    auto ids = c.recover();
    CHECK(ids.size() == 2);  // importing + verifying
    const ImageRow& q = by.at("importing.img");
    auto started = c.start_import(q.id);
    REQUIRE(started);
    REQUIRE(c.set_validator(q.id, started->import_token, std::string("\"abc\""), std::nullopt));
    REQUIRE(c.checkpoint(q.id, started->import_token, 4096));
    REQUIRE(c.schedule_retry(q.id, started->import_token, "reset", imagefs::now_ms() + 1000, true));
    auto after = c.get(q.id);
    CHECK(after->state == State::queued);
    CHECK(after->resume_offset == 4096);
    CHECK(after->etag == std::optional<std::string>("\"abc\""));
    // Opening again changes nothing.
    Catalog again(db);
    CHECK(again.schema_version() == Catalog::kSchemaVersion);
    CHECK(unit::dump(*again.get(q.id)) == unit::dump(*after));
}

TEST_CASE("catalog: retries, checkpoints and failures keep or forget the resume point",
          "[catalog][retry]") {
    TempDir t;
    Catalog c(t.str("catalog.db"));
    NewImage n = http_image("disk");
    n.max_retries = 3;
    n.tls_ca = "-----BEGIN CERTIFICATE-----\n...";
    n.tls_insecure = false;
    ImageRow r = c.add(n);
    CHECK(r.max_retries == std::optional<int64_t>(3));
    CHECK(r.retry_limit() == 3);
    CHECK(r.tls_ca == n.tls_ca);

    auto a1 = c.start_import(r.id);
    REQUIRE(a1);
    CHECK(a1->attempts == 1);
    REQUIRE(c.set_validator(r.id, a1->import_token, std::string("\"v1\""), std::string("date")));
    REQUIRE(c.update_progress(r.id, a1->import_token, 5000));
    REQUIRE(c.checkpoint(r.id, a1->import_token, 4096));
    CHECK_FALSE(c.checkpoint(r.id, a1->import_token + 1, 8192));  // another attempt's token

    // A retryable failure that keeps its bytes: queued, due later, progress = the resume point.
    const int64_t due = imagefs::now_ms() + 60000;
    REQUIRE(c.schedule_retry(r.id, a1->import_token, "connection reset", due, true));
    auto q = c.get(r.id);
    CHECK(q->state == State::queued);
    CHECK(q->next_attempt_at == std::optional<int64_t>(due));
    CHECK(q->last_error == std::optional<std::string>("connection reset"));
    CHECK(q->bytes_imported == 4096);
    CHECK(q->resume_offset == 4096);
    CHECK(q->etag == std::optional<std::string>("\"v1\""));
    CHECK_FALSE(c.schedule_retry(r.id, a1->import_token, "again", due, true));  // not importing

    // The next attempt starts where the bytes end and keeps the last error until it succeeds.
    auto a2 = c.start_import(r.id);
    REQUIRE(a2);
    CHECK(a2->attempts == 2);
    CHECK(a2->bytes_imported == 4096);
    CHECK_FALSE(a2->next_attempt_at);
    CHECK(a2->last_error == std::optional<std::string>("connection reset"));

    // A retry that must start from zero forgets the bytes and the validator.
    REQUIRE(c.schedule_retry(r.id, a2->import_token, "mismatch", imagefs::now_ms(), false));
    auto z = c.get(r.id);
    CHECK(z->resume_offset == 0);
    CHECK(z->bytes_imported == 0);
    CHECK_FALSE(z->etag);
    CHECK_FALSE(z->last_modified);

    // Failing for good while keeping the bytes (retries used up): imagefs retry resumes.
    auto a3 = c.start_import(r.id);
    REQUIRE(c.set_validator(r.id, a3->import_token, std::string("\"v2\""), std::nullopt));
    REQUIRE(c.checkpoint(r.id, a3->import_token, 1 << 20));
    REQUIRE(c.fail(r.id, a3->import_token, "gave up", true));
    auto f = c.get(r.id);
    CHECK(f->state == State::failed);
    CHECK(f->resume_offset == 1 << 20);
    CHECK(f->bytes_imported == 1 << 20);
    ImageRow rq = c.retry("disk");
    CHECK(rq.state == State::queued);
    CHECK(rq.attempts == 0);
    CHECK_FALSE(rq.last_error);
    CHECK_FALSE(rq.next_attempt_at);
    CHECK(rq.resume_offset == 1 << 20);
    CHECK(rq.bytes_imported == 1 << 20);

    // Failing for good without keeping: nothing to resume.
    auto a4 = c.start_import(r.id);
    REQUIRE(c.fail(r.id, a4->import_token, "HTTP 404"));
    auto g = c.get(r.id);
    CHECK(g->resume_offset == 0);
    CHECK_FALSE(g->etag);

    // Activation clears the resume point; recover keeps it.
    c.retry("disk");
    auto a5 = c.start_import(r.id);
    REQUIRE(c.checkpoint(r.id, a5->import_token, 777));
    CHECK(c.recover() == std::vector<int64_t>{r.id});
    CHECK(c.get(r.id)->bytes_imported == 777);
    CHECK(c.get(r.id)->resume_offset == 777);
    auto a6 = c.start_import(r.id);
    REQUIRE(c.begin_verify(r.id, a6->import_token, 1000));
    REQUIRE(c.activate(r.id, a6->import_token,
                       imagefs::ActiveInfo{1000, std::string(64, 'a'), std::nullopt, "raw", 1000}));
    CHECK(c.get(r.id)->resume_offset == 0);
}

// ---- HTTP validators and ranges -------------------------------------------------------------

TEST_CASE("validator: If-Range uses a strong ETag, else Last-Modified, else nothing",
          "[validator]") {
    using imagefs::if_range_value;
    CHECK(if_range_value({std::string("\"abc\""), std::string("Tue, 01 Dec 2026 10:00:00 GMT")}) ==
          std::optional<std::string>("\"abc\""));
    CHECK(
        if_range_value({std::string("W/\"abc\""), std::string("Tue, 01 Dec 2026 10:00:00 GMT")}) ==
        std::optional<std::string>("Tue, 01 Dec 2026 10:00:00 GMT"));
    CHECK(if_range_value({std::nullopt, std::string("Tue, 01 Dec 2026 10:00:00 GMT")}) ==
          std::optional<std::string>("Tue, 01 Dec 2026 10:00:00 GMT"));
    CHECK_FALSE(if_range_value({std::string("W/\"abc\""), std::nullopt}));
    CHECK_FALSE(if_range_value({std::nullopt, std::nullopt}));
    CHECK_FALSE(if_range_value({std::string(""), std::string("")}));
}

TEST_CASE("validator: Content-Range parsing", "[validator]") {
    using imagefs::parse_content_range;
    auto cr = parse_content_range("bytes 100-199/1000");
    REQUIRE(cr);
    CHECK(cr->first == 100);
    CHECK(cr->last == 199);
    CHECK(cr->total == std::optional<int64_t>(1000));
    auto star = parse_content_range("Bytes 0-9/*");
    REQUIRE(star);
    CHECK_FALSE(star->total);
    auto big = parse_content_range("bytes 4294967296-8589934591/8589934592");
    REQUIRE(big);
    CHECK(big->first == int64_t{1} << 32);
    for (const char* bad : {"", "bytes", "bytes */1000", "bytes 5-4/10", "bytes 0-9/9", "bytes 0-9",
                            "items 0-9/10", "bytes a-9/10", "bytes -1-9/10", "bytes 0-9/10x"}) {
        INFO(bad);
        CHECK_FALSE(parse_content_range(bad));
    }
}

TEST_CASE("validator: which responses continue an import", "[validator]") {
    using imagefs::interpret_response;
    Validator v{std::string("\"e\""), std::nullopt};
    auto whole = interpret_response(200, 1000, std::nullopt, v, 400);
    REQUIRE(whole);
    CHECK(whole->offset == 0);  // a 200 is always the whole resource
    CHECK(whole->total_size == std::optional<int64_t>(1000));
    CHECK(whole->validator.etag == v.etag);
    auto chunked = interpret_response(200, std::nullopt, std::nullopt, v, 0);
    REQUIRE(chunked);
    CHECK_FALSE(chunked->total_size);

    auto rest = interpret_response(206, 600, std::string("bytes 400-999/1000"), v, 400);
    REQUIRE(rest);
    CHECK(rest->offset == 400);
    CHECK(rest->total_size == std::optional<int64_t>(1000));
    CHECK(interpret_response(206, std::nullopt, std::string("bytes 400-999/1000"), v, 400));

    // Not usable: elsewhere, not to the end, unknown total, inconsistent length, no header.
    CHECK_FALSE(interpret_response(206, 500, std::string("bytes 500-999/1000"), v, 400));
    CHECK_FALSE(interpret_response(206, 100, std::string("bytes 400-499/1000"), v, 400));
    CHECK_FALSE(interpret_response(206, 600, std::string("bytes 400-999/*"), v, 400));
    CHECK_FALSE(interpret_response(206, 10, std::string("bytes 400-999/1000"), v, 400));
    CHECK_FALSE(interpret_response(206, 600, std::nullopt, v, 400));
    CHECK_FALSE(interpret_response(204, 0, std::nullopt, v, 0));
}

TEST_CASE("validator: resume decisions", "[validator]") {
    using imagefs::decide_resume;
    HttpResponse whole{200, 0, 1000, {}};
    HttpResponse rest{206, 400, 1000, {}};
    CHECK(decide_resume(0, std::nullopt, whole) == ResumeDecision::restart);
    CHECK(decide_resume(400, 1000, whole) == ResumeDecision::restart);  // changed, or no ranges
    CHECK(decide_resume(400, 1000, rest) == ResumeDecision::append);
    CHECK(decide_resume(400, std::nullopt, rest) == ResumeDecision::append);
    CHECK(decide_resume(300, 1000, rest) == ResumeDecision::refetch);  // not where we are
    CHECK(decide_resume(400, 2000, rest) == ResumeDecision::refetch);  // size changed
    HttpResponse unknown{206, 400, std::nullopt, {}};
    CHECK(decide_resume(400, 1000, unknown) == ResumeDecision::append);
}

// ---- recovery keeps what can be resumed ------------------------------------------------------

TEST_CASE("importer: recover_state_dir keeps staging files that can be resumed", "[importer]") {
    TempDir t;
    imagefs::StateDir dir(t.path() / "state", true);
    Catalog c(dir.catalog_path().string());
    auto add_started = [&](const std::string& name, SourceKind kind) {
        NewImage n = http_image(name);
        n.kind = kind;
        if (kind == SourceKind::file) n.source = "/srv/" + name;
        ImageRow r = c.add(n);
        return *c.start_import(r.id);
    };
    ImageRow etag = add_started("etag", SourceKind::http);
    c.set_validator(etag.id, etag.import_token, std::string("\"x\""), std::nullopt);
    c.checkpoint(etag.id, etag.import_token, 5);
    ImageRow lm = add_started("lm", SourceKind::http);
    c.set_validator(lm.id, lm.import_token, std::nullopt, std::string("date"));
    c.checkpoint(lm.id, lm.import_token, 5);
    c.fail(lm.id, lm.import_token, "gave up", true);
    ImageRow weak = add_started("weak", SourceKind::http);
    c.set_validator(weak.id, weak.import_token, std::string("W/\"x\""), std::nullopt);
    c.checkpoint(weak.id, weak.import_token, 5);
    ImageRow nothing = add_started("nothing", SourceKind::http);  // no checkpoint
    ImageRow file = add_started("file", SourceKind::file);
    for (const auto& r : {etag, lm, weak, nothing, file})
        unit::write_file(dir.staging_path(r.id), "12345");

    CHECK(imagefs::recover_state_dir(dir, c) == 3);
    std::vector<std::string> left = unit::dir_entries(dir.staging_dir());
    std::sort(left.begin(), left.end());
    std::vector<std::string> want = {std::to_string(etag.id) + ".part",
                                     std::to_string(lm.id) + ".part"};
    std::sort(want.begin(), want.end());
    CHECK(left == want);
    CHECK(c.get(etag.id)->state == State::queued);
    CHECK(c.get(etag.id)->bytes_imported == 5);
    CHECK(c.get(lm.id)->state == State::failed);
}

// ---- sources.allow ---------------------------------------------------------------------------

TEST_CASE("allow-list: no file allows everything", "[allowlist]") {
    TempDir t;
    AllowList a = AllowList::load(t.str("sources.allow"));
    CHECK_FALSE(a.restricted());
    CHECK(a.host_allowed("anything.example"));
    CHECK(a.host_allowed("192.0.2.1"));
    CHECK(a.address_allowed(std::string_view("2001:db8::1")));
}

TEST_CASE("allow-list: names, wildcards, addresses and networks", "[allowlist]") {
    AllowList a = AllowList::parse(
        "# mirrors\n"
        "Images.Example.org   # exact name\n"
        "*.cdn.example.net\n"
        "\n"
        "192.0.2.10\n"
        "10.0.0.0/8\n"
        "172.16.0.0/12\n"
        "2001:db8::/32\n"
        "::1\n",
        "/state/sources.allow");
    CHECK(a.restricted());
    CHECK(a.host_allowed("images.example.org"));
    CHECK(a.host_allowed("IMAGES.EXAMPLE.ORG."));
    CHECK_FALSE(a.host_allowed("example.org"));
    CHECK_FALSE(a.host_allowed("evil-images.example.org"));
    CHECK(a.host_allowed("a.cdn.example.net"));
    CHECK(a.host_allowed("x.y.cdn.example.net"));
    CHECK_FALSE(a.host_allowed("cdn.example.net"));
    CHECK_FALSE(a.host_allowed("xcdn.example.net"));
    CHECK(a.host_allowed("192.0.2.10"));
    CHECK_FALSE(a.host_allowed("192.0.2.11"));
    CHECK(a.host_allowed("10.255.1.2"));
    CHECK(a.host_allowed("172.31.255.255"));
    CHECK_FALSE(a.host_allowed("172.32.0.0"));
    CHECK(a.host_allowed("2001:db8:ffff::1"));
    CHECK_FALSE(a.host_allowed("2001:db9::1"));
    CHECK(a.host_allowed("::1"));
    CHECK_FALSE(a.host_allowed("127.0.0.1"));
    CHECK_FALSE(a.host_allowed(""));

    sockaddr_in v4{};
    v4.sin_family = AF_INET;
    ::inet_pton(AF_INET, "10.1.2.3", &v4.sin_addr);
    CHECK(a.address_allowed(reinterpret_cast<sockaddr*>(&v4)));
    ::inet_pton(AF_INET, "11.1.2.3", &v4.sin_addr);
    CHECK_FALSE(a.address_allowed(reinterpret_cast<sockaddr*>(&v4)));
    sockaddr_in6 v6{};
    v6.sin6_family = AF_INET6;
    ::inet_pton(AF_INET6, "::ffff:10.9.9.9", &v6.sin6_addr);  // IPv4-mapped
    CHECK(a.address_allowed(reinterpret_cast<sockaddr*>(&v6)));
    ::inet_pton(AF_INET6, "::ffff:11.9.9.9", &v6.sin6_addr);
    CHECK_FALSE(a.address_allowed(reinterpret_cast<sockaddr*>(&v6)));
    CHECK_FALSE(a.address_allowed(std::string_view("not-an-address")));

    // An empty file allows nothing.
    AllowList none = AllowList::parse("# nothing\n", "f");
    CHECK(none.restricted());
    CHECK_FALSE(none.host_allowed("localhost"));
}

TEST_CASE("allow-list: a bad entry is refused naming the file and line", "[allowlist]") {
    for (const char* bad :
         {"10.0.0.0/33", "::/129", "10.0.0.0/x", "host name", "a..b/8", "*.", "bad_/8", "-/-"}) {
        INFO(bad);
        auto e = error_from([&] { AllowList::parse(std::string("ok.example\n") + bad, "F"); });
        REQUIRE(e);
        CHECK(e->code() == Errc::invalid_argument);
        CHECK_THAT(std::string(e->what()), Contains("F line 2: '"));
    }
}

TEST_CASE("allow-list: url_host", "[allowlist]") {
    using imagefs::url_host;
    CHECK(url_host("http://Example.ORG/x") == "example.org");
    CHECK(url_host("https://example.org:8443/x?y") == "example.org");
    CHECK(url_host("http://user:pw@host.example/x") == "host.example");
    CHECK(url_host("http://[2001:db8::1]:80/x") == "2001:db8::1");
    CHECK(url_host("http://127.0.0.1") == "127.0.0.1");
    CHECK(url_host("/local/path").empty());
}

// ---- daemon options ------------------------------------------------------------------------

TEST_CASE("options: retry_delay and retry_max_delay take seconds with decimals", "[options]") {
    auto parse = [](const std::string& o) {
        return imagefs::parse_daemon_args({"-o", o, "/state", "/mnt"});
    };
    auto d = imagefs::parse_daemon_args({"/state", "/mnt"});
    CHECK(d.retry_delay_ms == 5000);
    CHECK(d.retry_max_delay_ms == 300000);
    CHECK(parse("retry_delay=0.1").retry_delay_ms == 100);
    CHECK(parse("retry_delay=2").retry_delay_ms == 2000);
    CHECK(parse("retry_delay=1.25").retry_delay_ms == 1250);
    CHECK(parse("retry_delay=0").retry_delay_ms == 0);
    CHECK(parse("retry_max_delay=600").retry_max_delay_ms == 600000);
    for (const char* bad : {"retry_delay=", "retry_delay=-1", "retry_delay=1.2345",
                            "retry_delay=abc", "retry_delay=1.", "retry_delay=.", "retry_delay=1e3",
                            "retry_delay=86401", "retry_max_delay=999999999999"}) {
        INFO(bad);
        auto e = error_from([&] { parse(bad); });
        REQUIRE(e);
        CHECK(e->code() == Errc::invalid_argument);
        CHECK_THAT(std::string(e->what()), Contains("invalid value for -o retry_"));
    }
}
