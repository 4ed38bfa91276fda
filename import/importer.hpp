// The import pipeline and the scheduler that runs it.
//
// One attempt (run_import): fetch the source into STATE_DIR/staging/ID.part while hashing it,
// fsync it, verify size and checksum, detect the format, rename it to STATE_DIR/images/ID.img,
// fsync the directory, and only then mark the row active. Nothing unverified is ever at
// images/ID.img while the row is active.
//
// Failures (docs/import.md): a retryable one (Errc::network: transport errors, stalls, short
// bodies, HTTP 408/429/5xx) puts the row back to queued with next_attempt_at set by the backoff
// policy, until the image's retry limit is used up; then, and for any other failure, the row is
// failed. An HTTP import keeps its staging file across retryable failures, shutdowns and crashes
// when the server gave a validator (strong ETag or Last-Modified): the bytes up to the last
// checkpoint (fdatasync + resume_offset in the catalog) are kept and re-hashed, and the rest is
// asked for with Range + If-Range, so a changed resource comes back whole (200) and replaces them.
// Every other failure removes the staging file.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "core/statedir.hpp"
#include "import/retry.hpp"
#include "import/source.hpp"
#include "meta/catalog.hpp"

namespace imagefs {

struct ImportOptions {
    FetchOptions fetch;
    RetryPolicy retry;
    int max_concurrent = 4;
    int progress_interval_ms = 500;      // catalog progress writes, at most this often
    int checkpoint_interval_ms = 10000;  // resume checkpoints while bytes flow, at most this often
    int checkpoint_idle_ms = 1000;       // ... and once no bytes came for this long
};

// Told about every catalog change the daemon makes or observes. Called from the manager's threads
// with no manager lock held.
class ImportListener {
  public:
    virtual ~ImportListener() = default;
    // The whole catalog, and the highest id handed out when it was read (see Catalog::list).
    virtual void catalog_synced(const std::vector<ImageRow>& rows, int64_t max_id) = 0;
    virtual void image_changed(const ImageRow& row) = 0;         // one row, after a transition
    virtual void image_progress(int64_t id, int64_t bytes) = 0;  // live byte count
};

enum class CancelReason : int { none = 0, shutdown = 1, removed = 2 };

// One import attempt of `row` (which start_import just moved to importing).
void run_import(const ImageRow& row, const StateDir& dir, Catalog& cat, const ImportOptions& opts,
                const std::atomic<CancelReason>& cancel, ImportListener& listener);

// The common end of every import and upload, for a row in `verifying` whose complete bytes are in
// its staging file (open at `fd`) and were hashed: compare the expected checksums, detect the
// format, fsync, rename into images/, fsync the directories, mark the row active. Throws
// Error(failed) on a checksum mismatch and Error(cancelled) if the row went away; the caller fails
// the row.
void verify_and_publish(const ImageRow& row, const StateDir& dir, Catalog& cat, int fd,
                        int64_t size, const std::string& sha256,
                        const std::optional<std::string>& sha512,
                        const std::atomic<CancelReason>& cancel, ImportListener& listener);

// At daemon start: requeue interrupted imports, remove image files that no active row owns and
// staging files that no resumable HTTP import owns. Returns the number of files removed.
int recover_state_dir(const StateDir& dir, Catalog& cat);

class ImportManager {
  public:
    ImportManager(const StateDir& dir, ImportOptions opts, ImportListener& listener);
    ~ImportManager();

    // Spawns the control thread, the workers and the wakeup watcher. Call recover_state_dir first.
    void start();
    void stop();  // cancels running imports (their rows stay importing) and joins every thread
    void wake();  // re-read the catalog soon

  private:
    void control_loop();
    void worker_loop();
    void watch_loop();
    void sync(Catalog& cat);

    const StateDir& dir_;
    ImportOptions opts_;
    ImportListener& listener_;

    // Lock order: mu_ is a leaf. It is never held across a SQLite call, a syscall or a listener
    // call.
    std::mutex mu_;
    std::condition_variable control_cv_;
    std::condition_variable work_cv_;
    bool stopping_ = false;
    bool wake_pending_ = true;
    std::deque<int64_t> queue_;
    int64_t next_due_ms_ = 0;  // earliest next_attempt_at of a queued row not yet due (0: none)
    std::map<int64_t, std::shared_ptr<std::atomic<CancelReason>>> running_;

    int stop_fd_ = -1;  // eventfd that ends watch_loop
    std::vector<std::thread> threads_;
};

}  // namespace imagefs
