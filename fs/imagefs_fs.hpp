// imagefs's FUSE file system (low-level API).
//
// Specification
// - The root directory lists every image in the catalog as a regular file, named as in the
//   catalog (with -o list=active only the active ones; lookups by name find every image).
//   Inode numbers are catalog row ids + 1 (the root is 1); ids are never reused, so an inode
//   number always means the same bytes. Lookup counts are honoured: an image removed while
//   the kernel still knows its inode stays answerable for getattr until the last forget.
// - stat/ls never wait. st_size is the final size of an active image, the bytes written so far for
//   an upload, else the expected size when known, else 0. xattrs user.imagefs.* describe the image.
// - open() for reading of an active image succeeds at once. Otherwise: failed -> EIO; O_NONBLOCK
//   or -o open=eagain -> EAGAIN; else the request waits (see fs/waiters.hpp) until the image is
//   active (success), failed (EIO), removed (ENOENT), open_timeout or the kernel's FUSE request
//   timeout is near (ETIMEDOUT), the caller is being stopped by a signal (EINTR), or the daemon
//   stops (EIO).
// - Writing (see docs/writing.md): creating a file starts an upload, an image that is importing
//   from its writer. Its writers read and write it; everyone else waits as for any import. When the
//   last writer closes it, it is hashed, verified and published like an HTTP import. A writer that
//   was killed (or exited non-zero) before closing leaves the upload failed. Active images are
//   immutable: opening one for writing gets EROFS (the one answer libvirt's locking open accepts,
//   see fs/compat.hpp), truncating it EPERM. rename() replaces atomically;
//   unlink() removes at once (open readers keep reading; space is freed at their last close).
//   mode and times can be set (rsync -a), the owner only while the file is being written (an
//   image keeps its owner: fs/compat.hpp); user.* xattrs are stored; setting
//   user.imagefs.sha256 on an upload makes it verified against that digest. trusted.* xattrs get
//   ENOTSUP, also from getxattr.
// - Caching: active images never change, so they get day-long entry/attr timeouts and keep_cache;
//   other images get attr timeout 0 and a 1 s entry timeout. Every state change invalidates the
//   inode in the kernel before waiting opens are answered, so the final size shows at once.
// - Reads are answered with fuse_reply_data from the image's file descriptor (splice where the
//   kernel allows). SEEK_DATA/SEEK_HOLE are answered from the data file.
// - Errors: every handler runs inside reply_guarded(), the one place that turns imagefs::Error and
//   system errors into errnos.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include "core/options.hpp"
#include "core/statedir.hpp"
#include "fs/fuse.hpp"
#include "fs/waiters.hpp"
#include "import/importer.hpp"
#include "import/upload.hpp"
#include "meta/registry.hpp"

namespace imagefs {

class ImageFs : public ImportListener {
  public:
    ImageFs(const StateDir& dir, const DaemonOptions& opts);
    ~ImageFs() override;

    static const fuse_lowlevel_ops& ops();

    // Between fuse_session_new and fuse_session_destroy. Notifications go to the kernel only while
    // a session is attached.
    void attach(fuse_session* se);
    void detach();
    void start();  // the waiter watcher and the event thread
    void set_device(std::string dev) { device_ = std::move(dev); }  // "MAJOR:MINOR" of the mount
    const std::string& device() const { return device_; }
    void stop();
    // Called after the file system changed the catalog (unlink, rename), so that the import
    // manager cancels imports of images that are gone.
    void on_catalog_change(std::function<void()> fn) { catalog_changed_ = std::move(fn); }

    // ImportListener
    void catalog_synced(const std::vector<ImageRow>& rows, int64_t max_id) override;
    void image_changed(const ImageRow& row) override;
    void image_progress(int64_t id, int64_t bytes) override;

    // FUSE handlers (public for the C trampolines in the .cpp).
    void init(fuse_conn_info* conn);
    void lookup(fuse_req_t req, fuse_ino_t parent, const char* name);
    void forget(fuse_ino_t ino, uint64_t n);
    void getattr(fuse_req_t req, fuse_ino_t ino);
    void setattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set, fuse_file_info* fi);
    void open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi);
    void create(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode,
                fuse_file_info* fi);
    void read(fuse_req_t req, size_t size, off_t off, fuse_file_info* fi);
    void write(fuse_req_t req, const char* buf, size_t size, off_t off, fuse_file_info* fi);
    void lseek(fuse_req_t req, off_t off, int whence, fuse_file_info* fi);
    void flush(fuse_req_t req, fuse_file_info* fi);
    void fsync(fuse_req_t req, fuse_file_info* fi);
    void release(fuse_req_t req, fuse_file_info* fi);
    void unlink(fuse_req_t req, fuse_ino_t parent, const char* name);
    void rename(fuse_req_t req, fuse_ino_t parent, const char* name, fuse_ino_t newparent,
                const char* newname, unsigned int flags);
    void opendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi);
    void readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off);
    void statfs(fuse_req_t req);
    void getxattr(fuse_req_t req, fuse_ino_t ino, const char* name, size_t size);
    void listxattr(fuse_req_t req, fuse_ino_t ino, size_t size);
    void setxattr(fuse_req_t req, fuse_ino_t ino, const char* name, const char* value, size_t size,
                  int flags);
    void removexattr(fuse_req_t req, fuse_ino_t ino, const char* name);

  private:
    // An open file: the data file of an active image, or the staging file of an upload.
    struct Handle {
        int fd = -1;  // owned by the handle unless `upload` is set
        int64_t id = 0;
        std::shared_ptr<Upload> upload;  // set for handles on an upload in progress
        bool writes = false;             // counted as a writer of `upload`
        pid_t process = 0;               // the writer's process
        // An active image's bytes, mapped read-only: reads are answered from the mapping, so the
        // data is copied once (page cache to the kernel's request) and the backing file's own
        // readahead feeds it. libfuse 3.14 cannot splice from a file whose pages are not cached
        // yet (its non-blocking splice gets EAGAIN and it falls back to a fresh buffer per reply).
        const char* map = nullptr;
        size_t map_len = 0;
        void close_fd();  // closes what the handle owns
    };
    // Work for the event thread, in order: kernel cache invalidations, then waiter answers.
    struct Notice {
        enum Kind { inval_inode, inval_entry, resolve, tune_readahead } kind;
        fuse_ino_t ino = 0;
        std::string name;
        int64_t id = 0;
        WaitOutcome outcome = WaitOutcome::ready;
    };

    Handle* track(Handle* h);  // every open handle, so that none outlives the daemon
    void untrack(Handle* h);
    std::optional<ImageRow> image_for(
        fuse_ino_t ino) const;  // live row, or a removed one still known
    ImageRow require_image(fuse_ino_t ino) const;
    struct stat root_attr() const;
    void set_root_attr(fuse_req_t req, const struct stat* attr, int to_set);
    struct stat stat_of(const ImageRow& row) const;
    fuse_entry_param entry_of(const ImageRow& row);  // counts a lookup
    void apply(const std::vector<RegistryEvent>& events);
    void post(std::vector<Notice> notices);
    void event_loop();
    void answer_open(fuse_req_t req, int64_t id, WaitOutcome outcome);
    WaitList::Clock::time_point wait_deadline() const;
    Catalog& catalog();  // one connection per FUSE worker thread
    void changed_catalog(const ImageRow& row);
    void raise_readahead();
    void drop_files(const ImageRow& row);  // data and staging files of a removed image
    std::shared_ptr<Upload> upload_of(int64_t id) const;
    std::shared_ptr<Upload> attach_writer(int64_t id, pid_t process);
    bool claim_upload(Upload& up);
    void finish_upload(std::shared_ptr<Upload> up);

    const StateDir& dir_;
    const DaemonOptions& opts_;
    Registry registry_;
    WaitList waits_;
    int kernel_timeout_s_ = 0;  // the kernel's FUSE request timeout, 0 if none
    std::function<void()> catalog_changed_;

    // Lock order: uploads_mu_ before Upload::mu_; every other mutex below is a leaf. None is held
    // across a reply, a syscall or SQLite.
    mutable std::mutex inodes_mu_;  // nlookup_, removed_
    std::unordered_map<fuse_ino_t, uint64_t> nlookup_;
    std::unordered_map<fuse_ino_t, ImageRow> removed_;  // removed images the kernel still knows

    // uploads_; taken before an Upload's own mutex (attach_writer, claim_upload), never after.
    mutable std::mutex uploads_mu_;
    std::unordered_map<int64_t, std::shared_ptr<Upload>> uploads_;

    std::mutex events_mu_;  // notices_, stopping_
    std::condition_variable events_cv_;
    std::deque<Notice> notices_;
    bool stopping_ = false;
    std::thread event_thread_;
    UploadPublisher publisher_;

    std::mutex handles_mu_;  // handles_ (a leaf)
    std::unordered_set<Handle*> handles_;

    std::atomic<fuse_session*> se_{nullptr};
    std::string device_;
    mutable std::mutex root_mu_;  // root_ (a leaf)
    struct stat root_ {};
};

}  // namespace imagefs
