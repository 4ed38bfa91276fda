// imagefs's FUSE file system (low-level API).
//
// Specification
// - The root directory lists every image in the catalog as a regular file, mode 0444, named as in
//   the catalog. Inode numbers are catalog row ids + 1 (the root is 1); ids are never reused, so an
//   inode number always means the same bytes. Lookup counts are honoured: an image removed while
//   the kernel still knows its inode stays answerable for getattr until the last forget.
// - stat/ls never wait. st_size is the final size of an active image, else the expected size when
//   known, else 0. xattrs user.imagefs.{state,progress,expected_size,size,error,sha256,format,
//   virtual_size,source} describe the image.
// - open() of an active image succeeds at once. Otherwise: failed -> EIO; O_NONBLOCK or
//   -o open=eagain -> EAGAIN; else the request waits (see fs/waiters.hpp) until the image is
//   active (success), failed (EIO), removed (ENOENT), open_timeout or the kernel's FUSE request
//   timeout is near (ETIMEDOUT), the caller is being stopped by a signal (EINTR), or the daemon
//   stops (EIO).
// - Writes: the mount is read-only (the kernel answers EROFS).
// - Caching: active images never change, so they get day-long entry/attr timeouts and keep_cache;
//   other images get attr timeout 0 and a 1 s entry timeout. Every state change invalidates the
//   inode in the kernel before waiting opens are answered, so the final size shows at once.
// - Reads are answered with fuse_reply_data from the image's file descriptor (splice where the
//   kernel allows).
// - Errors: every handler runs inside reply_guarded(), which is the one place that turns
//   imagefs::Error and system errors into errnos.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <unordered_map>

#include "core/options.hpp"
#include "core/statedir.hpp"
#include "fs/fuse.hpp"
#include "fs/waiters.hpp"
#include "import/importer.hpp"
#include "meta/registry.hpp"

namespace imagefs {

class ImageFs : public ImportListener {
public:
    ImageFs(const StateDir& dir, const DaemonOptions& opts);

    static const fuse_lowlevel_ops& ops();

    // Between fuse_session_new and fuse_session_destroy. Notifications go to the kernel only while
    // a session is attached.
    void attach(fuse_session* se);
    void detach();
    void start_waiters() { waits_.start(); }
    void stop_waiters() { waits_.stop(); }

    // ImportListener
    void catalog_synced(const std::vector<ImageRow>& rows) override;
    void image_changed(const ImageRow& row) override;
    void image_progress(int64_t id, int64_t bytes) override;

    // FUSE handlers (public for the C trampolines in the .cpp).
    void lookup(fuse_req_t req, fuse_ino_t parent, const char* name);
    void forget(fuse_ino_t ino, uint64_t n);
    void getattr(fuse_req_t req, fuse_ino_t ino);
    void open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi);
    void read(fuse_req_t req, size_t size, off_t off, fuse_file_info* fi);
    void release(fuse_req_t req, fuse_file_info* fi);
    void opendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi);
    void readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off);
    void statfs(fuse_req_t req);
    void getxattr(fuse_req_t req, fuse_ino_t ino, const char* name, size_t size);
    void listxattr(fuse_req_t req, fuse_ino_t ino, size_t size);
    void init(fuse_conn_info* conn);

private:
    std::optional<ImageRow> image_for(fuse_ino_t ino) const;  // live row, or a removed one still known
    struct stat stat_of(const ImageRow& row) const;
    void apply(const std::vector<RegistryEvent>& events);
    void answer_open(fuse_req_t req, int64_t id, WaitOutcome outcome);
    WaitList::Clock::time_point wait_deadline() const;

    const StateDir& dir_;
    const DaemonOptions& opts_;
    Registry registry_;
    WaitList waits_;
    int kernel_timeout_s_ = 0;  // the kernel's FUSE request timeout, 0 if none

    // Lock order: inodes_mu_ is a leaf; held only to update the maps, never across a reply.
    mutable std::mutex inodes_mu_;
    std::unordered_map<fuse_ino_t, uint64_t> nlookup_;
    std::unordered_map<fuse_ino_t, ImageRow> removed_;  // removed images the kernel still knows

    std::atomic<fuse_session*> se_{nullptr};
};

}  // namespace imagefs
