// The image catalog: one SQLite database per state dir, described in docs/catalog.md.
//
// Every state transition is one short transaction that checks the state it comes from (and, for
// the importer's transitions, the import token it was handed), so a transition that lost a race
// with `imagefs rm` or `imagefs retry` changes nothing and says so by returning false.
//
// Thread safety: a Catalog owns one Connection; use one Catalog per thread. Several processes (the
// daemon, any number of CLIs) share the file safely.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "meta/sqlite.hpp"

namespace imagefs {

enum class State { queued, importing, verifying, active, failed };
std::string_view to_string(State s);
std::optional<State> parse_state(std::string_view s);

enum class SourceKind { http, file, upload };
std::string_view to_string(SourceKind k);

struct ImageRow {
    int64_t id = 0;
    std::string name;
    std::string source;
    SourceKind kind = SourceKind::file;
    State state = State::queued;
    std::optional<int64_t> expected_size;  // from the source or the user, when known
    int64_t bytes_imported = 0;
    std::optional<int64_t> final_size;  // set when the bytes are complete
    std::optional<std::string> sha256;  // computed
    std::optional<std::string> sha512;  // computed when a sha512 was expected
    std::optional<std::string> expected_sha256;
    std::optional<std::string> expected_sha512;
    std::optional<std::string> format;  // raw, qcow2, iso, ...
    std::optional<int64_t> virtual_size;
    int64_t attempts = 0;
    std::optional<std::string> last_error;
    int64_t created_at = 0;  // unix milliseconds
    int64_t updated_at = 0;  // unix ms, and strictly increasing per row: a version number
    std::optional<int64_t> activated_at;
    int64_t import_token = 0;  // bumped by every start_import; the importer's transitions check it
    // File metadata shown in the mount (set by cp -p / rsync -a through setattr).
    int64_t mode = 0444;
    int64_t uid = 0;
    int64_t gid = 0;
    std::optional<int64_t> mtime_ns;            // unset: the activation (or creation) time
    std::map<std::string, std::string> xattrs;  // user.* xattrs stored for the file (rsync -X)
    // Retries and resume (schema 3).
    std::optional<int64_t> max_retries;      // NULL: kDefaultRetries
    std::optional<int64_t> next_attempt_at;  // unix ms; a queued row is not started before it
    int64_t resume_offset = 0;               // bytes of staging/ID.part known durable and valid
    std::optional<std::string> etag;         // validator of the response those bytes came from
    std::optional<std::string> last_modified;
    std::optional<std::string> tls_ca;  // PEM trusted instead of the system store (--ca-file)
    bool tls_insecure = false;          // --insecure: no certificate verification

    int64_t retry_limit() const;  // max_retries, or the default
};

// Retries after the first attempt when `imagefs import` is not given --retries.
constexpr int64_t kDefaultRetries = 10;

struct NewUpload {
    std::string name;
    int64_t mode = 0444;
    int64_t uid = 0;
    int64_t gid = 0;
};

struct MetaUpdate {
    std::optional<int64_t> mode, uid, gid, mtime_ns;
};

struct RenameResult {
    ImageRow moved;                    // with its new name
    std::optional<ImageRow> replaced;  // the image that had the new name, now removed
};

struct NewImage {
    std::string name;
    std::string source;
    SourceKind kind = SourceKind::file;
    std::optional<int64_t> expected_size;
    std::optional<std::string> expected_sha256;
    std::optional<std::string> expected_sha512;
    std::optional<int64_t> max_retries;
    std::optional<std::string> tls_ca;
    bool tls_insecure = false;
};

struct ActiveInfo {
    int64_t final_size = 0;
    std::string sha256;
    std::optional<std::string> sha512;
    std::string format;
    int64_t virtual_size = 0;
};

class Catalog {
  public:
    static constexpr int64_t kSchemaVersion = 3;

    // Opens the catalog at `db_path`, creating it if `create`, and upgrades its schema. Refuses a
    // schema newer than this build (Errc::corrupt with the versions named).
    Catalog(const std::string& db_path, bool create = true);

    ImageRow add(const NewImage& img);  // Errc::exists, Errc::invalid_argument
    std::optional<ImageRow> get(int64_t id);
    std::optional<ImageRow> find(std::string_view name);
    // All rows, ordered by name. With `max_id`, also the highest id ever handed out when the rows
    // were read: a row with a higher id was added after this listing.
    std::vector<ImageRow> list(int64_t* max_id = nullptr);
    std::optional<ImageRow> remove(std::string_view name);
    std::optional<ImageRow> remove_id(int64_t id);

    // Data written into the mount: a row that is importing from the start (kind upload, attempt 1,
    // a fresh import token). Errc::exists / invalid_argument as for add().
    ImageRow add_upload(const NewUpload& up);
    // Renames `from` to `to`. An image already called `to` is removed in the same transaction
    // unless `replace` is false (then Errc::exists). Errc::not_found if `from` does not exist.
    RenameResult rename(std::string_view from, std::string_view to, bool replace);
    std::optional<ImageRow> set_meta(int64_t id, const MetaUpdate& m);
    bool set_expected_sha256(int64_t id, int64_t token, const std::string& hex);
    bool set_xattr(int64_t id, std::string_view name, std::string_view value);
    bool remove_xattr(int64_t id, std::string_view name);

    // queued -> importing. Bumps attempts and the import token, sets progress to the resume
    // offset and clears next_attempt_at (last_error stays until the image is active or retried).
    // Returns the row (carrying the new token) or nullopt if the image is not queued any more.
    std::optional<ImageRow> start_import(int64_t id);
    bool set_expected_size(int64_t id, int64_t token, std::optional<int64_t> size);
    bool update_progress(int64_t id, int64_t token, int64_t bytes);
    // A response whose body starts at offset 0: its validator, and nothing durable yet.
    bool set_validator(int64_t id, int64_t token, const std::optional<std::string>& etag,
                       const std::optional<std::string>& last_modified);
    // The first `offset` bytes of staging/ID.part are fsynced: a later attempt may resume there.
    bool checkpoint(int64_t id, int64_t token, int64_t offset);
    bool begin_verify(int64_t id, int64_t token, int64_t final_size);  // importing -> verifying
    bool activate(int64_t id, int64_t token, const ActiveInfo& info);  // verifying -> active
    // importing|verifying -> failed. Unless `keep_resume`, forgets the resume point and validator
    // (the caller removes the staging file).
    bool fail(int64_t id, int64_t token, const std::string& error, bool keep_resume = false);
    // importing|verifying -> queued with next_attempt_at = `next_attempt_at` (unix ms), for a
    // retryable failure. Unless `keep_resume`, the next attempt starts from zero.
    bool schedule_retry(int64_t id, int64_t token, const std::string& error,
                        int64_t next_attempt_at, bool keep_resume);

    // failed -> queued, for `imagefs retry`: attempts start from 0 again, due at once; a kept
    // resume point stays. Errc::not_found / Errc::invalid_argument otherwise.
    ImageRow retry(std::string_view name);
    // At daemon start: importing|verifying -> queued, except uploads, whose writer is gone: they
    // become failed. Returns the affected rows' ids.
    std::vector<int64_t> recover();

    int64_t schema_version();
    sql::Connection& connection() { return db_; }

  private:
    void migrate();
    void load_xattrs(ImageRow& row);
    void load_xattrs(std::vector<ImageRow>& rows);

    sql::Connection db_;
};

int64_t now_ms();

}  // namespace imagefs
