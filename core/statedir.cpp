#include "core/statedir.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>

#include "core/error.hpp"

namespace imagefs {

StateDir::StateDir(const fs::path& root, bool create) : root_(fs::absolute(root)) {
    auto make = [](const fs::path& d) {
        boost::system::error_code ec;
        fs::create_directories(d, ec);
        if (ec)
            throw Error(ec.value() == EACCES || ec.value() == EROFS ? Errc::permission : Errc::io,
                        "cannot create state directory " + d.string() + ": " + ec.message());
    };
    if (create) make(root_);
    boost::system::error_code ec;
    if (!fs::is_directory(root_, ec))
        throw Error(Errc::not_found, "state directory " + root_.string() +
                                         " does not exist (create it, or pass --state DIR)");
    if (::access(root_.c_str(), W_OK | X_OK) != 0)
        throw Error(Errc::permission, "state directory " + root_.string() +
                                          " is not writable: " + std::strerror(errno) +
                                          " (run as root or fix its permissions)");
    if (create) {
        make(images_dir());
        make(staging_dir());
    }
}

fs::path StateDir::image_path(int64_t id) const {
    return images_dir() / (std::to_string(id) + ".img");
}

fs::path StateDir::staging_path(int64_t id) const {
    return staging_dir() / (std::to_string(id) + ".part");
}

namespace {
std::string read_pid(int fd) {
    char buf[32] = {};
    ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
    std::string s = n > 0 ? std::string(buf, static_cast<size_t>(n)) : "";
    while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
    return s.empty() ? "unknown" : s;
}
}  // namespace

DaemonLock::DaemonLock(const StateDir& dir, std::chrono::milliseconds wait_for_stopping) {
    fd_ = ::open(dir.lock_path().c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd_ < 0) throw_errno("cannot open " + dir.lock_path().string(), errno);
    auto give_up = std::chrono::steady_clock::now() + wait_for_stopping;
    while (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
        int err = errno;
        std::string holder = read_pid(fd_);
        bool stopping = holder.size() > 9 && holder.substr(holder.size() - 9) == " stopping";
        if (err == EWOULDBLOCK && stopping && std::chrono::steady_clock::now() < give_up) {
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
            continue;
        }
        ::close(fd_);
        fd_ = -1;
        if (err == EWOULDBLOCK)
            throw Error(Errc::busy, "state directory " + dir.root().string() +
                                        " is already served by imagefsd (pid " + holder +
                                        "); unmount it first, or use another state directory");
        throw_errno("cannot lock " + dir.lock_path().string(), err);
    }
    write_pid();
}

DaemonLock::~DaemonLock() {
    if (fd_ >= 0) ::close(fd_);
}

void DaemonLock::write_pid() {
    if (!write_state(std::to_string(::getpid()) + "\n"))
        throw_errno("cannot write pid to lock file", errno);
}

void DaemonLock::mark_stopping() {
    write_state(std::to_string(::getpid()) + " stopping\n");
}

// Overwrites, then trims: a reader never sees an empty file.
bool DaemonLock::write_state(const std::string& s) {
    return ::pwrite(fd_, s.data(), s.size(), 0) == static_cast<ssize_t>(s.size()) &&
           ::ftruncate(fd_, static_cast<off_t>(s.size())) == 0;
}

bool daemon_running(const StateDir& dir) {
    int fd = ::open(dir.lock_path().c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return false;
    bool held = ::flock(fd, LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK;
    ::close(fd);
    return held;
}

bool poke_daemon(const StateDir& dir) {
    if (!daemon_running(dir)) return false;
    int fd = ::open(dir.wakeup_path().c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return false;
    ssize_t n = ::write(fd, "1", 1);
    ::close(fd);  // IN_CLOSE_WRITE wakes the daemon
    return n == 1;
}

}  // namespace imagefs
