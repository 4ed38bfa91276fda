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
    // 1 -> 2: file metadata and user xattrs, for images written into the mount.
    R"sql(
    ALTER TABLE images ADD COLUMN mode INTEGER NOT NULL DEFAULT 292;  -- 0444
    ALTER TABLE images ADD COLUMN uid INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE images ADD COLUMN gid INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE images ADD COLUMN mtime_ns INTEGER;
    CREATE TABLE xattrs (
        image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
        name     TEXT NOT NULL,
        value    BLOB NOT NULL,
        PRIMARY KEY (image_id, name)
    );
    )sql",
    // 2 -> 3: retries with backoff, resume of HTTP imports, TLS settings per import.
    R"sql(
    ALTER TABLE images ADD COLUMN max_retries INTEGER CHECK (max_retries IS NULL OR max_retries >= 0);
    ALTER TABLE images ADD COLUMN next_attempt_at INTEGER;
    ALTER TABLE images ADD COLUMN resume_offset INTEGER NOT NULL DEFAULT 0
                       CHECK (resume_offset >= 0);
    ALTER TABLE images ADD COLUMN etag TEXT;
    ALTER TABLE images ADD COLUMN last_modified TEXT;
    ALTER TABLE images ADD COLUMN tls_ca TEXT;
    ALTER TABLE images ADD COLUMN tls_insecure INTEGER NOT NULL DEFAULT 0;
    )sql",
};
constexpr int64_t kMigrationCount = sizeof kMigrations / sizeof kMigrations[0];
static_assert(kMigrationCount == Catalog::kSchemaVersion);

constexpr const char* kColumns =
    "id, name, source, source_kind, state, expected_size, bytes_imported, final_size, sha256, "
    "sha512, expected_sha256, expected_sha512, format, virtual_size, attempts, last_error, "
    "created_at, updated_at, activated_at, import_token, mode, uid, gid, mtime_ns, "
    "max_retries, next_attempt_at, resume_offset, etag, last_modified, tls_ca, tls_insecure";

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
    r.mode = st.i64(20);
    r.uid = st.i64(21);
    r.gid = st.i64(22);
    r.mtime_ns = st.opt_i64(23);
    r.max_retries = st.opt_i64(24);
    r.next_attempt_at = st.opt_i64(25);
    r.resume_offset = st.i64(26);
    r.etag = st.opt_text(27);
    r.last_modified = st.opt_text(28);
    r.tls_ca = st.opt_text(29);
    r.tls_insecure = st.i64(30) != 0;
    return r;
}

}  // namespace

int64_t ImageRow::retry_limit() const {
    return max_retries.value_or(kDefaultRetries);
}

int64_t now_ms() {
    using namespace std::chrono;
    return duration_cast<milliseconds>(system_clock::now().time_since_epoch()).count();
}

std::string_view to_string(State s) {
    switch (s) {
        case State::queued:
            return "queued";
        case State::importing:
            return "importing";
        case State::verifying:
            return "verifying";
        case State::active:
            return "active";
        case State::failed:
            return "failed";
    }
    return "failed";
}

std::optional<State> parse_state(std::string_view s) {
    for (State st :
         {State::queued, State::importing, State::verifying, State::active, State::failed})
        if (to_string(st) == s) return st;
    return std::nullopt;
}

std::string_view to_string(SourceKind k) {
    switch (k) {
        case SourceKind::http:
            return "http";
        case SourceKind::file:
            return "file";
        case SourceKind::upload:
            return "upload";
    }
    return "file";
}

Catalog::Catalog(const std::string& db_path, bool create) : db_(db_path, create) {
    migrate();
}

int64_t Catalog::schema_version() {
    sql::Statement st(db_, "PRAGMA user_version");
    st.step();
    return st.i64(0);
}

void Catalog::migrate() {
    int64_t found = schema_version();
    if (found > kSchemaVersion)
        throw Error(Errc::corrupt, "catalog " + db_.path() + " has schema version " +
                                       std::to_string(found) + ", newer than this imagefs (" +
                                       std::to_string(kSchemaVersion) +
                                       "); install a newer imagefs to use it");
    db_.enable_wal();
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
                          "expected_sha256, expected_sha512, created_at, updated_at, "
                          "max_retries, tls_ca, tls_insecure) "
                          "VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)");
        st.bind(1, img.name)
            .bind(2, img.source)
            .bind(3, to_string(img.kind))
            .bind(4, img.expected_size)
            .bind(5, img.expected_sha256)
            .bind(6, img.expected_sha512)
            .bind(7, now)
            .bind(8, now)
            .bind(9, img.max_retries)
            .bind(10, img.tls_ca)
            .bind(11, int64_t(img.tls_insecure ? 1 : 0))
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
    auto row = read_row(st);
    load_xattrs(row);
    return row;
}

std::optional<ImageRow> Catalog::find(std::string_view name) {
    sql::Statement st(db_, std::string("SELECT ") + kColumns + " FROM images WHERE name = ?");
    st.bind(1, name);
    if (!st.step()) return std::nullopt;
    auto row = read_row(st);
    load_xattrs(row);
    return row;
}

std::vector<ImageRow> Catalog::list(int64_t* max_id) {
    return sql::with_retry(db_, [&] {
        // One read transaction, so that the rows and the highest id ever given agree.
        sql::ReadTransaction tx(db_);
        std::vector<ImageRow> rows;
        sql::Statement st(db_, std::string("SELECT ") + kColumns + " FROM images ORDER BY name");
        while (st.step()) rows.push_back(read_row(st));
        load_xattrs(rows);
        if (max_id) {
            sql::Statement seq(db_, "SELECT seq FROM sqlite_sequence WHERE name = 'images'");
            *max_id = seq.step() ? seq.i64(0) : 0;
        }
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

void Catalog::load_xattrs(ImageRow& row) {
    sql::Statement st(db_, "SELECT name, value FROM xattrs WHERE image_id = ?");
    st.bind(1, row.id);
    row.xattrs.clear();
    while (st.step()) row.xattrs[st.text(0)] = st.text(1);
}

void Catalog::load_xattrs(std::vector<ImageRow>& rows) {
    std::map<int64_t, ImageRow*> by_id;
    for (auto& r : rows) by_id[r.id] = &r;
    sql::Statement st(db_, "SELECT image_id, name, value FROM xattrs");
    while (st.step()) {
        auto it = by_id.find(st.i64(0));
        if (it != by_id.end()) it->second->xattrs[st.text(1)] = st.text(2);
    }
}

std::optional<ImageRow> Catalog::remove_id(int64_t id) {
    return sql::with_retry(db_, [&]() -> std::optional<ImageRow> {
        sql::Transaction tx(db_);
        auto row = get(id);
        if (!row) return std::nullopt;
        sql::Statement(db_, "DELETE FROM images WHERE id = ?").bind(1, id).run();
        tx.commit();
        return row;
    });
}

ImageRow Catalog::add_upload(const NewUpload& up) {
    validate_image_name(up.name);
    return sql::with_retry(db_, [&] {
        sql::Transaction tx(db_);
        if (find(up.name))
            throw Error(Errc::exists, "an image named '" + up.name + "' already exists");
        int64_t now = now_ms();
        sql::Statement st(db_,
                          "INSERT INTO images (name, source, source_kind, state, attempts, "
                          "import_token, created_at, updated_at, mode, uid, gid) "
                          "VALUES (?, 'upload', 'upload', 'importing', 1, 1, ?, ?, ?, ?, ?)");
        st.bind(1, up.name).bind(2, now).bind(3, now).bind(4, up.mode).bind(5, up.uid);
        st.bind(6, up.gid).run();
        auto row = get(db_.last_insert_rowid());
        tx.commit();
        return *row;
    });
}

RenameResult Catalog::rename(std::string_view from, std::string_view to, bool replace) {
    validate_image_name(to);
    return sql::with_retry(db_, [&] {
        sql::Transaction tx(db_);
        auto src = find(from);
        if (!src) throw Error(Errc::not_found, "no image named '" + std::string(from) + "'");
        RenameResult res{*src, std::nullopt};
        if (from == to) return res;
        if (auto dst = find(to)) {
            if (!replace)
                throw Error(Errc::exists,
                            "an image named '" + std::string(to) + "' already exists");
            sql::Statement(db_, "DELETE FROM images WHERE id = ?").bind(1, dst->id).run();
            res.replaced = dst;
        }
        sql::Statement st(
            db_, "UPDATE images SET name = ?, updated_at = MAX(?, updated_at + 1) WHERE id = ?");
        st.bind(1, to).bind(2, now_ms()).bind(3, src->id).run();
        res.moved = *get(src->id);
        tx.commit();
        return res;
    });
}

std::optional<ImageRow> Catalog::set_meta(int64_t id, const MetaUpdate& m) {
    return sql::with_retry(db_, [&]() -> std::optional<ImageRow> {
        sql::Transaction tx(db_);
        sql::Statement st(db_,
                          "UPDATE images SET mode = COALESCE(?, mode), uid = COALESCE(?, uid), "
                          "gid = COALESCE(?, gid), mtime_ns = COALESCE(?, mtime_ns), "
                          "updated_at = MAX(?, updated_at + 1) WHERE id = ?");
        st.bind(1, m.mode).bind(2, m.uid).bind(3, m.gid).bind(4, m.mtime_ns).bind(5, now_ms());
        st.bind(6, id).run();
        if (db_.changes() == 0) return std::nullopt;
        auto row = get(id);
        tx.commit();
        return row;
    });
}

bool Catalog::set_expected_sha256(int64_t id, int64_t token, const std::string& hex) {
    return sql::with_retry(db_, [&] {
        sql::Statement st(
            db_,
            "UPDATE images SET expected_sha256 = ?, updated_at = MAX(?, updated_at + 1) "
            "WHERE id = ? AND import_token = ? AND state = 'importing'");
        st.bind(1, hex).bind(2, now_ms()).bind(3, id).bind(4, token).run();
        return db_.changes() > 0;
    });
}

bool Catalog::set_xattr(int64_t id, std::string_view name, std::string_view value) {
    return sql::with_retry(db_, [&] {
        sql::Transaction tx(db_);
        if (!get(id)) return false;
        sql::Statement st(db_,
                          "INSERT OR REPLACE INTO xattrs (image_id, name, value) VALUES (?, ?, ?)");
        st.bind(1, id).bind(2, name).bind_blob(3, value).run();
        sql::Statement(db_, "UPDATE images SET updated_at = MAX(?, updated_at + 1) WHERE id = ?")
            .bind(1, now_ms())
            .bind(2, id)
            .run();
        tx.commit();
        return true;
    });
}

bool Catalog::remove_xattr(int64_t id, std::string_view name) {
    return sql::with_retry(db_, [&] {
        sql::Transaction tx(db_);
        sql::Statement st(db_, "DELETE FROM xattrs WHERE image_id = ? AND name = ?");
        st.bind(1, id).bind(2, name).run();
        bool removed = db_.changes() > 0;
        if (removed)
            sql::Statement(db_,
                           "UPDATE images SET updated_at = MAX(?, updated_at + 1) WHERE id = ?")
                .bind(1, now_ms())
                .bind(2, id)
                .run();
        tx.commit();
        return removed;
    });
}

std::optional<ImageRow> Catalog::start_import(int64_t id) {
    return sql::with_retry(db_, [&]() -> std::optional<ImageRow> {
        sql::Transaction tx(db_);
        sql::Statement st(
            db_,
            "UPDATE images SET state = 'importing', attempts = attempts + 1, "
            "import_token = import_token + 1, bytes_imported = resume_offset, "
            "final_size = NULL, next_attempt_at = NULL, updated_at = MAX(?, updated_at + 1) "
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
        sql::Statement st(
            db_,
            "UPDATE images SET expected_size = ?, updated_at = MAX(?, updated_at + 1) "
            "WHERE id = ? AND import_token = ? AND state = 'importing'");
        st.bind(1, size).bind(2, now_ms()).bind(3, id).bind(4, token).run();
        return db_.changes() > 0;
    });
}

bool Catalog::update_progress(int64_t id, int64_t token, int64_t bytes) {
    return sql::with_retry(db_, [&] {
        sql::Statement st(
            db_,
            "UPDATE images SET bytes_imported = ?, updated_at = MAX(?, updated_at + 1) "
            "WHERE id = ? AND import_token = ? AND state = 'importing'");
        st.bind(1, bytes).bind(2, now_ms()).bind(3, id).bind(4, token).run();
        return db_.changes() > 0;
    });
}

bool Catalog::set_validator(int64_t id, int64_t token, const std::optional<std::string>& etag,
                            const std::optional<std::string>& last_modified) {
    return sql::with_retry(db_, [&] {
        sql::Statement st(db_,
                          "UPDATE images SET etag = ?, last_modified = ?, resume_offset = 0, "
                          "updated_at = MAX(?, updated_at + 1) "
                          "WHERE id = ? AND import_token = ? AND state = 'importing'");
        st.bind(1, etag).bind(2, last_modified).bind(3, now_ms()).bind(4, id).bind(5, token).run();
        return db_.changes() > 0;
    });
}

bool Catalog::checkpoint(int64_t id, int64_t token, int64_t offset) {
    return sql::with_retry(db_, [&] {
        sql::Statement st(
            db_,
            "UPDATE images SET resume_offset = ?, updated_at = MAX(?, updated_at + 1) "
            "WHERE id = ? AND import_token = ? "
            "AND state IN ('importing', 'verifying')");
        st.bind(1, offset).bind(2, now_ms()).bind(3, id).bind(4, token).run();
        return db_.changes() > 0;
    });
}

bool Catalog::begin_verify(int64_t id, int64_t token, int64_t final_size) {
    return sql::with_retry(db_, [&] {
        sql::Statement st(db_,
                          "UPDATE images SET state = 'verifying', bytes_imported = ?, "
                          "final_size = ?, updated_at = MAX(?, updated_at + 1) "
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
                          "resume_offset = 0, next_attempt_at = NULL, "
                          "activated_at = ?, updated_at = MAX(?, updated_at + 1) "
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

bool Catalog::fail(int64_t id, int64_t token, const std::string& error, bool keep_resume) {
    return sql::with_retry(db_, [&] {
        sql::Statement st(db_, keep_resume
                                   ? "UPDATE images SET state = 'failed', last_error = ?, "
                                     "next_attempt_at = NULL, bytes_imported = resume_offset, "
                                     "updated_at = MAX(?, updated_at + 1) "
                                     "WHERE id = ? AND import_token = ? "
                                     "AND state IN ('importing', 'verifying')"
                                   : "UPDATE images SET state = 'failed', last_error = ?, "
                                     "next_attempt_at = NULL, resume_offset = 0, etag = NULL, "
                                     "last_modified = NULL, updated_at = MAX(?, updated_at + 1) "
                                     "WHERE id = ? AND import_token = ? "
                                     "AND state IN ('importing', 'verifying')");
        st.bind(1, error).bind(2, now_ms()).bind(3, id).bind(4, token).run();
        return db_.changes() > 0;
    });
}

bool Catalog::schedule_retry(int64_t id, int64_t token, const std::string& error,
                             int64_t next_attempt_at, bool keep_resume) {
    return sql::with_retry(db_, [&] {
        sql::Statement st(db_, keep_resume
                                   ? "UPDATE images SET state = 'queued', last_error = ?, "
                                     "next_attempt_at = ?, bytes_imported = resume_offset, "
                                     "final_size = NULL, updated_at = MAX(?, updated_at + 1) "
                                     "WHERE id = ? AND import_token = ? "
                                     "AND state IN ('importing', 'verifying')"
                                   : "UPDATE images SET state = 'queued', last_error = ?, "
                                     "next_attempt_at = ?, bytes_imported = 0, final_size = NULL, "
                                     "resume_offset = 0, etag = NULL, last_modified = NULL, "
                                     "updated_at = MAX(?, updated_at + 1) "
                                     "WHERE id = ? AND import_token = ? "
                                     "AND state IN ('importing', 'verifying')");
        st.bind(1, error).bind(2, next_attempt_at).bind(3, now_ms()).bind(4, id).bind(5, token);
        st.run();
        return db_.changes() > 0;
    });
}

ImageRow Catalog::retry(std::string_view name) {
    return sql::with_retry(db_, [&] {
        sql::Transaction tx(db_);
        auto row = find(name);
        if (!row) throw Error(Errc::not_found, "no image named '" + std::string(name) + "'");
        if (row->state != State::failed)
            throw Error(Errc::invalid_argument, "image '" + std::string(name) + "' is " +
                                                    std::string(to_string(row->state)) +
                                                    "; only failed images can be retried");
        sql::Statement st(db_,
                          "UPDATE images SET state = 'queued', attempts = 0, last_error = NULL, "
                          "next_attempt_at = NULL, bytes_imported = resume_offset, "
                          "final_size = NULL, updated_at = MAX(?, updated_at + 1) WHERE id = ?");
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
        sql::Statement up(
            db_,
            "UPDATE images SET state = 'failed', updated_at = MAX(?, updated_at + 1), last_error = "
            "'upload interrupted: the daemon stopped before the writer finished; "
            "write the file again' "
            "WHERE state IN ('importing', 'verifying') AND source_kind = 'upload'");
        up.bind(1, now_ms()).run();
        sql::Statement st(db_,
                          "UPDATE images SET state = 'queued', bytes_imported = resume_offset, "
                          "final_size = NULL, updated_at = MAX(?, updated_at + 1) "
                          "WHERE state IN ('importing', 'verifying')");
        st.bind(1, now_ms()).run();
        tx.commit();
        return ids;
    });
}

}  // namespace imagefs
