#include "meta/sqlite.hpp"

#include <unistd.h>

#include <chrono>
#include <thread>

#include "core/error.hpp"

namespace imagefs::sql {
namespace {

constexpr int kBusyTimeoutMs = 5000;

// SQLITE_BUSY/LOCKED become Errc::busy so with_retry can recognise them; the message never leaks
// to a user because with_retry either succeeds or replaces it.
[[noreturn]] void fail(sqlite3* db, int rc, const std::string& what) {
    int prim = rc & 0xff;
    std::string msg = what + ": " + (db ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
    if (prim == SQLITE_BUSY || prim == SQLITE_LOCKED) throw Error(Errc::busy, msg);
    if (prim == SQLITE_CORRUPT || prim == SQLITE_NOTADB)
        throw Error(Errc::corrupt, msg + " (the catalog file is damaged; see docs/catalog.md)");
    if (prim == SQLITE_READONLY || prim == SQLITE_PERM || prim == SQLITE_CANTOPEN ||
        prim == SQLITE_AUTH)
        throw Error(Errc::permission, msg);
    if (prim == SQLITE_FULL) throw Error(Errc::no_space, msg);
    throw Error(Errc::io, msg);
}

}  // namespace

Connection::Connection(const std::string& path, bool create) : path_(path) {
    if (!create && ::access(path.c_str(), F_OK) != 0)
        throw Error(Errc::not_found, "catalog " + path + " does not exist");
    int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX | (create ? SQLITE_OPEN_CREATE : 0);
    int rc = sqlite3_open_v2(path.c_str(), &db_, flags, nullptr);
    if (rc != SQLITE_OK) {
        std::string msg =
            "cannot open catalog " + path + ": " + (db_ ? sqlite3_errmsg(db_) : sqlite3_errstr(rc));
        sqlite3_close_v2(db_);
        db_ = nullptr;
        int prim = rc & 0xff;
        throw Error(prim == SQLITE_CANTOPEN || prim == SQLITE_PERM || prim == SQLITE_READONLY
                        ? Errc::permission
                        : Errc::io,
                    msg);
    }
    sqlite3_extended_result_codes(db_, 1);
    sqlite3_busy_timeout(db_, kBusyTimeoutMs);
    try {
        // The first real access: a file that is not a database fails here with SQLITE_NOTADB,
        // before anything is written. WAL is switched on by enable_wal(), once the owner has
        // checked that it understands the file.
        exec("PRAGMA schema_version");
        exec("PRAGMA synchronous=FULL");
        exec("PRAGMA foreign_keys=ON");
    } catch (...) {
        sqlite3_close_v2(db_);
        db_ = nullptr;
        throw;
    }
}

void Connection::enable_wal() {
    // Needs the write lock once, hence the retry.
    with_retry(*this, [&] { exec("PRAGMA journal_mode=WAL"); });
}

Connection::~Connection() {
    if (db_) sqlite3_close_v2(db_);
}

void Connection::exec(const char* sql) {
    char* err = nullptr;
    int rc = sqlite3_exec(db_, sql, nullptr, nullptr, &err);
    if (rc != SQLITE_OK) {
        std::string msg = err ? err : sqlite3_errstr(rc);
        sqlite3_free(err);
        fail(nullptr, rc, "catalog " + path_ + ": " + msg);
    }
}

Statement::Statement(Connection& c, std::string_view sql) : conn_(c) {
    int rc =
        sqlite3_prepare_v2(c.handle(), sql.data(), static_cast<int>(sql.size()), &st_, nullptr);
    if (rc != SQLITE_OK) fail(c.handle(), rc, "catalog " + c.path() + ": prepare");
}

Statement::~Statement() {
    sqlite3_finalize(st_);
}

Statement& Statement::bind(int i, int64_t v) {
    sqlite3_bind_int64(st_, i, v);
    return *this;
}

Statement& Statement::bind(int i, std::string_view v) {
    sqlite3_bind_text(st_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
    return *this;
}

Statement& Statement::bind_blob(int i, std::string_view v) {
    sqlite3_bind_blob64(st_, i, v.data(), v.size(), SQLITE_TRANSIENT);
    return *this;
}

Statement& Statement::bind(int i, std::nullptr_t) {
    sqlite3_bind_null(st_, i);
    return *this;
}

bool Statement::step() {
    int rc = sqlite3_step(st_);
    if (rc == SQLITE_ROW) return true;
    if (rc == SQLITE_DONE) return false;
    sqlite3_reset(st_);
    fail(conn_.handle(), rc, "catalog " + conn_.path());
}

void Statement::reset() {
    sqlite3_reset(st_);
    sqlite3_clear_bindings(st_);
}

std::string Statement::text(int col) const {
    auto* p = sqlite3_column_type(st_, col) == SQLITE_BLOB
                  ? static_cast<const char*>(sqlite3_column_blob(st_, col))
                  : reinterpret_cast<const char*>(sqlite3_column_text(st_, col));
    return p ? std::string(p, static_cast<size_t>(sqlite3_column_bytes(st_, col))) : std::string();
}

Transaction::Transaction(Connection& c) : conn_(c) {
    conn_.exec("BEGIN IMMEDIATE");
}

Transaction::~Transaction() {
    if (!done_) sqlite3_exec(conn_.handle(), "ROLLBACK", nullptr, nullptr, nullptr);
}

void Transaction::commit() {
    conn_.exec("COMMIT");
    done_ = true;
}

bool is_busy_error(const std::exception& e) {
    auto* err = dynamic_cast<const Error*>(&e);
    return err && err->code() == Errc::busy;
}

void backoff_sleep(int attempt) {
    std::this_thread::sleep_for(std::chrono::milliseconds(std::min(50 * (attempt + 1), 1000)));
}

void throw_busy_for_too_long(const Connection& c) {
    throw Error(Errc::busy, "catalog " + c.path() +
                                " stayed locked by another process for over a minute; "
                                "check for a stuck imagefs or sqlite3 process");
}

}  // namespace imagefs::sql
