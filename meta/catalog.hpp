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
};

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
    static constexpr int64_t kSchemaVersion = 2;

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

    // queued -> importing. Bumps attempts and the import token, resets progress. Returns the row
    // (carrying the new token) or nullopt if the image is not queued any more.
    std::optional<ImageRow> start_import(int64_t id);
    bool set_expected_size(int64_t id, int64_t token, std::optional<int64_t> size);
    bool update_progress(int64_t id, int64_t token, int64_t bytes);
    bool begin_verify(int64_t id, int64_t token, int64_t final_size);  // importing -> verifying
    bool activate(int64_t id, int64_t token, const ActiveInfo& info);  // verifying -> active
    bool fail(int64_t id, int64_t token,
              const std::string& error);  // importing|verifying -> failed

    // failed -> queued, for `imagefs retry`. Errc::not_found / Errc::invalid_argument otherwise.
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
