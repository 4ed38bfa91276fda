#include "meta/catalog.hpp"

#include <chrono>

#include "core/error.hpp"
#include "core/names.hpp"

namespace imagefs {
namespace {

// Migration N upgrades schema N to N+1. Append, never edit: a catalog written by any release
// must open with every later one.
constexpr const char* kMigrations[] = {
    // 0 -> 1: the first schema.
    R"sql(
    CREATE TABLE images (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: inode = id + 1
        name           TEXT NOT NULL UNIQUE,
        source         TEXT NOT NULL,
        source_kind    TEXT NOT NULL CHECK (source_kind IN ('http', 'file', 'upload')),
        state          TEXT NOT NULL
                       CHECK (state IN ('queued', 'importing', 'verifying', 'active', 'failed')),
        expected_size  INTEGER CHECK (expected_size IS NULL OR expected_size >= 0),
        bytes_imported INTEGER NOT NULL DEFAULT 0,
        final_size     INTEGER,
        sha256         TEXT,
        sha512         TEXT,
        expected_sha256 TEXT,
        expected_sha512 TEXT,
        format         TEXT,
        virtual_size   INTEGER,
        attempts       INTEGER NOT NULL DEFAULT 0,
        last_error     TEXT,
        created_at     INTEGER NOT NULL,
        updated_at     INTEGER NOT NULL,
        activated_at   INTEGER,
        import_token   INTEGER NOT NULL DEFAULT 0,
        CHECK (state != 'active' OR (final_size IS NOT NULL AND sha256 IS NOT NULL))
    );
    )sql",
};
constexpr int64_t kMigrationCount = sizeof kMigrations / sizeof kMigrations[0];
static_assert(kMigrationCount == Catalog::kSchemaVersion);

constexpr const char* kColumns =
    "id, name, source, source_kind, state, expected_size, bytes_imported, final_size, sha256, "
    "sha512, expected_sha256, expected_sha512, format, virtual_size, attempts, last_error, "
    "created_at, updated_at, activated_at, import_token";

SourceKind parse_kind(std::string_view s) {
    if (s == "http") return SourceKind::http;
    if (s == "upload") return SourceKind::upload;
    return SourceKind::file;
}

ImageRow read_row(const sql::Statement& st) {
    ImageRow r;
    r.id = st.i64(0);
    r.name = st.text(1);
    r.source = st.text(2);
    r.kind = parse_kind(st.text(3));
    r.state = parse_state(st.text(4)).value_or(State::failed);
    r.expected_size = st.opt_i64(5);
    r.bytes_imported = st.i64(6);
    r.final_size = st.opt_i64(7);
    r.sha256 = st.opt_text(8);
    r.sha512 = st.opt_text(9);
    r.expected_sha256 = st.opt_text(10);
    r.expected_sha512 = st.opt_text(11);
    r.format = st.opt_text(12);
    r.virtual_size = st.opt_i64(13);
    r.attempts = st.i64(14);
    r.last_error = st.opt_text(15);
    r.created_at = st.i64(16);
    r.updated_at = st.i64(17);
    r.activated_at = st.opt_i64(18);
    r.import_token = st.i64(19);
    return r;
}

}  // namespace

int64_t now_ms() {
    using namespace std::chrono;
    return duration_cast<milliseconds>(system_clock::now().time_since_epoch()).count();
}

std::string_view to_string(State s) {
    switch (s) {
        case State::queued: return "queued";
        case State::importing: return "importing";
        case State::verifying: return "verifying";
        case State::active: return "active";
        case State::failed: return "failed";
    }
    return "failed";
}

std::optional<State> parse_state(std::string_view s) {
    for (State st : {State::queued, State::importing, State::verifying, State::active,
                     State::failed})
        if (to_string(st) == s) return st;
    return std::nullopt;
}

std::string_view to_string(SourceKind k) {
    switch (k) {
        case SourceKind::http: return "http";
        case SourceKind::file: return "file";
        case SourceKind::upload: return "upload";
    }
    return "file";
}

Catalog::Catalog(const std::string& db_path, bool create) : db_(db_path, create) { migrate(); }

int64_t Catalog::schema_version() {
    sql::Statement st(db_, "PRAGMA user_version");
    st.step();
    return st.i64(0);
}

void Catalog::migrate() {
    sql::with_retry(db_, [&] {
        sql::Transaction tx(db_);
        int64_t v = schema_version();
        if (v > kSchemaVersion)
            throw Error(Errc::corrupt, "catalog " + db_.path() + " has schema version " +
                                           std::to_string(v) + ", newer than this imagefs (" +
                                           std::to_string(kSchemaVersion) +
                                           "); install a newer imagefs to use it");
        if (v == kSchemaVersion) return;  // rolls back the empty transaction
        for (; v < kSchemaVersion; ++v) db_.exec(kMigrations[v]);
        db_.exec(("PRAGMA user_version = " + std::to_string(kSchemaVersion)).c_str());
        tx.commit();
    });
}

ImageRow Catalog::add(const NewImage& img) {
    validate_image_name(img.name);
    return sql::with_retry(db_, [&] {
        sql::Transaction tx(db_);
        if (find(img.name))
            throw Error(Errc::exists, "an image named '" + img.name +
                                          "' already exists (remove it first with "
                                          "'imagefs rm', or choose another name)");
        int64_t now = now_ms();
        sql::Statement st(db_,
                          "INSERT INTO images (name, source, source_kind, state, expected_size, "
                          "expected_sha256, expected_sha512, created_at, updated_at) "
                          "VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?)");
        st.bind(1, img.name)
            .bind(2, img.source)
            .bind(3, to_string(img.kind))
            .bind(4, img.expected_size)
            .bind(5, img.expected_sha256)
            .bind(6, img.expected_sha512)
            .bind(7, now)
            .bind(8, now)
            .run();
        auto row = get(db_.last_insert_rowid());
        tx.commit();
        return *row;
    });
}

std::optional<ImageRow> Catalog::get(int64_t id) {
    sql::Statement st(db_, std::string("SELECT ") + kColumns + " FROM images WHERE id = ?");
    st.bind(1, id);
    if (!st.step()) return std::nullopt;
    return read_row(st);
}

std::optional<ImageRow> Catalog::find(std::string_view name) {
    sql::Statement st(db_, std::string("SELECT ") + kColumns + " FROM images WHERE name = ?");
    st.bind(1, name);
    if (!st.step()) return std::nullopt;
    return read_row(st);
}

std::vector<ImageRow> Catalog::list() {
    return sql::with_retry(db_, [&] {
        std::vector<ImageRow> rows;
        sql::Statement st(db_, std::string("SELECT ") + kColumns + " FROM images ORDER BY name");
        while (st.step()) rows.push_back(read_row(st));
        return rows;
    });
}

std::optional<ImageRow> Catalog::remove(std::string_view name) {
    return sql::with_retry(db_, [&]() -> std::optional<ImageRow> {
        sql::Transaction tx(db_);
        auto row = find(name);
        if (!row) return std::nullopt;
        sql::Statement(db_, "DELETE FROM images WHERE id = ?").bind(1, row->id).run();
        tx.commit();
        return row;
    });
}

std::optional<ImageRow> Catalog::start_import(int64_t id) {
    return sql::with_retry(db_, [&]() -> std::optional<ImageRow> {
        sql::Transaction tx(db_);
        sql::Statement st(db_,
                          "UPDATE images SET state = 'importing', attempts = attempts + 1, "
                          "import_token = import_token + 1, bytes_imported = 0, "
                          "final_size = NULL, last_error = NULL, updated_at = ? "
                          "WHERE id = ? AND state = 'queued'");
        st.bind(1, now_ms()).bind(2, id).run();
        if (db_.changes() == 0) return std::nullopt;
        auto row = get(id);
        tx.commit();
        return row;
    });
}


bool Catalog::set_expected_size(int64_t id, int64_t token, std::optional<int64_t> size) {
    return sql::with_retry(db_, [&] {
        sql::Statement st(db_,
                          "UPDATE images SET expected_size = ?, updated_at = ? "
                          "WHERE id = ? AND import_token = ? AND state = 'importing'");
        st.bind(1, size).bind(2, now_ms()).bind(3, id).bind(4, token).run();
        return db_.changes() > 0;
    });
}

bool Catalog::update_progress(int64_t id, int64_t token, int64_t bytes) {
    return sql::with_retry(db_, [&] {
        sql::Statement st(db_,
                          "UPDATE images SET bytes_imported = ?, updated_at = ? "
                          "WHERE id = ? AND import_token = ? AND state = 'importing'");
        st.bind(1, bytes).bind(2, now_ms()).bind(3, id).bind(4, token).run();
        return db_.changes() > 0;
    });
}

bool Catalog::begin_verify(int64_t id, int64_t token, int64_t final_size) {
    return sql::with_retry(db_, [&] {
        sql::Statement st(db_,
                          "UPDATE images SET state = 'verifying', bytes_imported = ?, "
                          "final_size = ?, updated_at = ? "
                          "WHERE id = ? AND import_token = ? AND state = 'importing'");
        st.bind(1, final_size).bind(2, final_size).bind(3, now_ms()).bind(4, id).bind(5, token);
        st.run();
        return db_.changes() > 0;
    });
}

bool Catalog::activate(int64_t id, int64_t token, const ActiveInfo& info) {
    return sql::with_retry(db_, [&] {
        int64_t now = now_ms();
        sql::Statement st(db_,
                          "UPDATE images SET state = 'active', final_size = ?, sha256 = ?, "
                          "sha512 = ?, format = ?, virtual_size = ?, last_error = NULL, "
                          "activated_at = ?, updated_at = ? "
                          "WHERE id = ? AND import_token = ? AND state = 'verifying'");
        st.bind(1, info.final_size)
            .bind(2, info.sha256)
            .bind(3, info.sha512)
            .bind(4, info.format)
            .bind(5, info.virtual_size)
            .bind(6, now)
            .bind(7, now)
            .bind(8, id)
            .bind(9, token)
            .run();
        return db_.changes() > 0;
    });
}

bool Catalog::fail(int64_t id, int64_t token, const std::string& error) {
    return sql::with_retry(db_, [&] {
        sql::Statement st(db_,
                          "UPDATE images SET state = 'failed', last_error = ?, updated_at = ? "
                          "WHERE id = ? AND import_token = ? "
                          "AND state IN ('importing', 'verifying')");
        st.bind(1, error).bind(2, now_ms()).bind(3, id).bind(4, token).run();
        return db_.changes() > 0;
    });
}

ImageRow Catalog::retry(std::string_view name) {
    return sql::with_retry(db_, [&] {
        sql::Transaction tx(db_);
        auto row = find(name);
        if (!row) throw Error(Errc::not_found, "no image named '" + std::string(name) + "'");
        if (row->state != State::failed)
            throw Error(Errc::invalid_argument,
                        "image '" + std::string(name) + "' is " + std::string(to_string(row->state)) +
                            "; only failed images can be retried");
        sql::Statement st(db_,
                          "UPDATE images SET state = 'queued', attempts = 0, last_error = NULL, "
                          "bytes_imported = 0, updated_at = ? WHERE id = ?");
        st.bind(1, now_ms()).bind(2, row->id).run();
        auto updated = get(row->id);
        tx.commit();
        return *updated;
    });
}

std::vector<int64_t> Catalog::recover() {
    return sql::with_retry(db_, [&] {
        sql::Transaction tx(db_);
        std::vector<int64_t> ids;
        {
            sql::Statement st(db_,
                              "SELECT id FROM images WHERE state IN ('importing', 'verifying')");
            while (st.step()) ids.push_back(st.i64(0));
        }
        sql::Statement st(db_,
                          "UPDATE images SET state = 'queued', bytes_imported = 0, "
                          "final_size = NULL, updated_at = ? "
                          "WHERE state IN ('importing', 'verifying')");
        st.bind(1, now_ms()).run();
        tx.commit();
        return ids;
    });
}

}  // namespace imagefs
