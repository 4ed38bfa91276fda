// Small owning types over the SQLite C API. Nothing else in imagefs calls sqlite3_* directly.
//
// Thread safety: a Connection and its Statements belong to one thread at a time (SQLite is built
// serialized on Debian, but our statements carry cursor state). Give every thread its own
// Connection; they coordinate through SQLite's file locks (WAL mode, busy timeout, and a retry loop
// in Transaction for the cases the busy handler cannot cover).
#pragma once

#include <sqlite3.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace imagefs::sql {

class Connection {
  public:
    // Opens (creating if `create`) the database with foreign keys and a busy timeout; reads it once
    // so that a file that is not a database fails here without being written.
    // Throws imagefs::Error (corrupt / permission / io) with a message naming `path`.
    Connection(const std::string& path, bool create);
    ~Connection();
    Connection(const Connection&) = delete;
    Connection& operator=(const Connection&) = delete;

    void exec(const char* sql);  // for statements without parameters or results
    void enable_wal();
    int64_t changes() const { return sqlite3_changes64(db_); }
    int64_t last_insert_rowid() const { return sqlite3_last_insert_rowid(db_); }
    sqlite3* handle() const { return db_; }
    const std::string& path() const { return path_; }

  private:
    sqlite3* db_ = nullptr;
    std::string path_;
};

class Statement {
  public:
    Statement(Connection& c, std::string_view sql);
    ~Statement();
    Statement(const Statement&) = delete;
    Statement& operator=(const Statement&) = delete;

    // Binding is 1-based, as in SQLite. Chainable.
    Statement& bind(int i, int64_t v);
    Statement& bind(int i, std::string_view v);
    Statement& bind(int i, const char* v) { return bind(i, std::string_view(v)); }
    Statement& bind(int i, std::nullptr_t);
    Statement& bind_blob(int i, std::string_view v);
    template <class T>
    Statement& bind(int i, const std::optional<T>& v) {
        return v ? bind(i, *v) : bind(i, nullptr);
    }

    // Returns true while a row is available. Throws on error (SQLITE_BUSY as Errc::busy).
    bool step();
    // Runs a statement that returns no rows.
    void run() {
        while (step()) {
        }
    }
    void reset();

    bool is_null(int col) const { return sqlite3_column_type(st_, col) == SQLITE_NULL; }
    int64_t i64(int col) const { return sqlite3_column_int64(st_, col); }
    std::optional<int64_t> opt_i64(int col) const {
        return is_null(col) ? std::nullopt : std::optional<int64_t>(i64(col));
    }
    std::string text(int col) const;  // also reads BLOBs
    std::optional<std::string> opt_text(int col) const {
        return is_null(col) ? std::nullopt : std::optional<std::string>(text(col));
    }

  private:
    Connection& conn_;
    sqlite3_stmt* st_ = nullptr;
};

// BEGIN IMMEDIATE on construction, ROLLBACK in the destructor unless commit() ran.
// BEGIN IMMEDIATE takes the write lock up front, so two writers never deadlock on a lock upgrade;
// the busy timeout covers waiting for it.
class Transaction {
  public:
    explicit Transaction(Connection& c);
    ~Transaction();
    Transaction(const Transaction&) = delete;
    Transaction& operator=(const Transaction&) = delete;
    void commit();

  private:
    Connection& conn_;
    bool done_ = false;
};

// BEGIN (deferred) for a consistent read of several statements; ends it in the destructor.
class ReadTransaction {
  public:
    explicit ReadTransaction(Connection& c) : conn_(c) { conn_.exec("BEGIN"); }
    ~ReadTransaction() { sqlite3_exec(conn_.handle(), "COMMIT", nullptr, nullptr, nullptr); }
    ReadTransaction(const ReadTransaction&) = delete;
    ReadTransaction& operator=(const ReadTransaction&) = delete;

  private:
    Connection& conn_;
};

// Runs fn (which opens its own Transaction) and retries it when SQLite reports SQLITE_BUSY past the
// busy timeout, with backoff, for up to ~60 s in total. A user never sees "database is locked";
// after the limit the error names the catalog and says another process holds it.
template <class Fn>
auto with_retry(Connection& c, Fn&& fn) -> decltype(fn());

bool is_busy_error(const std::exception& e);
void backoff_sleep(int attempt);
[[noreturn]] void throw_busy_for_too_long(const Connection& c);

template <class Fn>
auto with_retry(Connection& c, Fn&& fn) -> decltype(fn()) {
    for (int attempt = 0;; ++attempt) {
        try {
            return fn();
        } catch (const std::exception& e) {
            if (!is_busy_error(e)) throw;
            if (attempt >= 60) throw_busy_for_too_long(c);
            backoff_sleep(attempt);
        }
    }
}

}  // namespace imagefs::sql
