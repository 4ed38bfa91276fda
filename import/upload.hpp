// Images written into the mount ("uploads"), without any FUSE: the file system calls these.
//
// An upload is an image in state importing whose bytes come from writers through the mount. Its
// bytes go to STATE_DIR/staging/ID.part. While writes arrive in order (each at the end of what
// came before; a gap counts as zeros), they go through a HashWriter: the write is copied into a
// buffer of a small pool and returns, a thread hashes the buffer while it is hot and another
// writes it with O_DIRECT, so the data is not copied into the page cache and read back to be
// hashed. Anything else (a seek back, parallel writers, a truncate below what was written) first
// settles the pipeline, then writes through the page cache, and publish_upload hashes the finished
// file again. A write error of the pipeline is reported by the next write, read or close.
// Aligned 4 KiB blocks of zeros written past the end of the file are not stored (they become
// holes), so sparse images stay sparse.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>

#include "core/statedir.hpp"
#include "import/digest.hpp"
#include "import/hash_writer.hpp"
#include "import/importer.hpp"
#include "meta/catalog.hpp"

namespace imagefs {

class Upload {
  public:
    // Takes ownership of `fd`, the staging file open read-write.
    Upload(int64_t id, int64_t token, int fd);
    ~Upload();
    Upload(const Upload&) = delete;
    Upload& operator=(const Upload&) = delete;

    int64_t id() const { return id_; }
    int64_t token() const { return token_; }
    int fd() const { return fd_; }
    int64_t size() const { return size_.load(); }
    // True at most once per `interval` (across threads): time to record the progress in the
    // catalog, as imports do, so that `imagefs status` and `list` follow uploads too.
    bool progress_due(std::chrono::milliseconds interval);

    // Throws Error (no_space, io); a failed write also fails the upload.
    void write(const char* data, size_t len, int64_t off);
    void truncate(int64_t size);
    // Waits until every byte written so far is in the file (before it is read, seeked, synced or
    // published); throws the error of a write that failed meanwhile.
    void settle();

    // Writers are counted per process: a process that is writing an upload may also read it (and
    // the kernel opens files read-only on a writer's behalf, e.g. for FS_IOC_FSGETXATTR).
    void add_writer(pid_t process);
    bool remove_writer(pid_t process);  // true when that was the last writer
    bool is_writer(pid_t process) const;
    bool has_writers() const;
    void fail(const std::string& why);  // the first reason is kept
    std::optional<std::string> failure() const;

    // SHA-256 of the bytes in the file now: the streaming digest when every byte arrived in order,
    // else a fresh pass over the file (which `stop` can end: see hash_file). Call once, after the
    // last writer left.
    std::string sha256(const std::function<void()>& stop = {});

    // Whether every byte so far arrived in order, so that sha256() will not read the file again.
    bool streamed() const;

  private:
    void settle_locked();          // with stream_mu_
    void append_zeros(int64_t n);  // with stream_mu_, while streaming_
    [[noreturn]] void write_failed(int err, int64_t off);

    const int64_t id_;
    const int64_t token_;
    const int fd_;
    int direct_;  // the staging file opened with O_DIRECT, or -1; the pipeline's writing thread's

    std::atomic<int> in_flight_{0};
    std::atomic<int64_t> size_{0};
    std::atomic<int64_t> progress_at_ms_{0};  // steady clock, last progress_due() == true

    // Lock order: stream_mu_ before mu_. stream_mu_ serialises the use of the pipeline (append,
    // drain) and is held while waiting for the pipeline's threads, which never take it; mu_ is a
    // leaf, never held across a syscall.
    mutable std::mutex stream_mu_;
    bool streaming_ = true;  // every byte so far went through stream_, in order
    bool pending_ = false;   // stream_ may hold bytes not yet in the file
    mutable std::mutex mu_;
    std::multiset<pid_t> writers_;
    std::optional<std::string> failure_;
    std::unique_ptr<HashWriter> stream_;  // last: its threads stop before the members they use go
};

// Hashes a whole file with `algo`, reading it with pread. `stop`, if given, is called between
// reads and may throw to end the pass (a large sparse file takes minutes).
std::string hash_file(int fd, int64_t size, DigestAlgo algo,
                      const std::function<void()>& stop = {});

// Verifies and publishes an upload whose last writer has closed it (or fails it, if a writer was
// killed or a write failed). Tells `listener` about every transition.
// `stop` as for hash_file: the publisher is stopping.
void publish_upload(Upload& up, const StateDir& dir, Catalog& cat, ImportListener& listener,
                    const std::function<void()>& stop = {});

// A thread that runs publish_upload for uploads whose last writer closed them, after a short grace
// period: tools such as qemu-img create a file, close it and open it again for writing at once.
// When the period ends, `claim` decides (atomically with respect to new writers) whether the
// upload is still without writers and may be published.
class UploadPublisher {
  public:
    using Claim = std::function<bool(Upload&)>;
    UploadPublisher(const StateDir& dir, ImportListener& listener, Claim claim,
                    std::chrono::milliseconds grace);
    ~UploadPublisher();
    void start();
    void stop();  // publishes what is queued, then joins
    void submit(std::shared_ptr<Upload> up);

  private:
    void loop();
    const StateDir& dir_;
    ImportListener& listener_;
    Claim claim_;
    std::chrono::milliseconds grace_;
    // Lock order: mu_ is a leaf.
    std::mutex mu_;
    std::condition_variable cv_;
    std::deque<std::pair<std::chrono::steady_clock::time_point, std::shared_ptr<Upload>>> queue_;
    bool stopping_ = false;
    std::atomic<bool> cancel_{false};  // set by stop(): a long verification ends early
    std::thread thread_;
};

}  // namespace imagefs
