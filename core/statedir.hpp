// Layout of a state directory:
//   STATE_DIR/catalog.db        the SQLite catalog (WAL: also -wal and -shm)
//   STATE_DIR/imagefsd.lock     flock()ed by the one daemon serving this dir; holds its pid, and
//                               "PID stopping" once that daemon is shutting down
//   STATE_DIR/wakeup            written by the CLI after a catalog change; the daemon watches it
//   STATE_DIR/sources.allow     optional: the hosts and networks HTTP(S) imports may use
//                               (import/allowlist.hpp); without it every host is allowed
//   STATE_DIR/images/ID.img     published, verified image data (ID = catalog row id)
//   STATE_DIR/staging/ID.part   data of an import in progress (kept across restarts and retries
//                               for HTTP imports that can resume); never served
#pragma once

#include <boost/filesystem.hpp>
#include <chrono>
#include <cstdint>
#include <string>

namespace imagefs {

namespace fs = boost::filesystem;

class StateDir {
  public:
    // Creates the directory tree if `create`; checks that it is a writable directory.
    // Throws Error with a message naming the directory and what to do.
    StateDir(const fs::path& root, bool create);

    const fs::path& root() const { return root_; }
    fs::path catalog_path() const { return root_ / "catalog.db"; }
    fs::path lock_path() const { return root_ / "imagefsd.lock"; }
    fs::path wakeup_path() const { return root_ / "wakeup"; }
    fs::path allow_path() const { return root_ / "sources.allow"; }
    fs::path images_dir() const { return root_ / "images"; }
    fs::path staging_dir() const { return root_ / "staging"; }
    fs::path image_path(int64_t id) const;
    fs::path staging_path(int64_t id) const;

  private:
    fs::path root_;
};

// A daemon that finds the lock held by one that is stopping (after `umount`, which returns before
// the old daemon has exited) waits up to `wait_for_stopping` for it, so `umount; mount` works.
// The daemon's exclusive claim on a state dir (flock on imagefsd.lock, released at exit even on
// SIGKILL). Throws Error(busy) naming the pid of the daemon that holds it.
class DaemonLock {
  public:
    explicit DaemonLock(const StateDir& dir,
                        std::chrono::milliseconds wait_for_stopping = std::chrono::seconds(10));
    ~DaemonLock();
    DaemonLock(const DaemonLock&) = delete;
    DaemonLock& operator=(const DaemonLock&) = delete;
    // Rewrites the pid (after fork()).
    void write_pid();
    // Marks the lock as held by a daemon that is shutting down (best effort, never throws).
    void mark_stopping();

  private:
    bool write_state(const std::string& s);
    int fd_ = -1;
};

// True when a daemon holds the lock on `dir`.
bool daemon_running(const StateDir& dir);

// Tells a running daemon that the catalog changed (writes the wakeup file, which the daemon watches
// with inotify). Returns false when no daemon is running.
bool poke_daemon(const StateDir& dir);

}  // namespace imagefs
