// imagefsd: the daemon.
//
// Start-up, so that mount(8), a shell and systemd learn the truth:
// 1. Everything that can fail (arguments, the state dir lock, catalog recovery, a dead mount left
//    by a daemon that died, the mount itself) happens in the calling process, so errors reach the
//    caller's terminal with exit status 1.
// 2. Without -f the process forks. The parent waits until the child reports that the mount
//    answers (then exits 0) or until the child dies (then exits with the child's status), so
//    `mount` returns only once the mount serves.
// 3. Threads start only after the fork. Once the session loop runs, a probe thread stats the
//    mountpoint through the kernel; only when that is answered is READY=1 sent to $NOTIFY_SOCKET
//    and the parent released.
// Signals: SIGTERM and SIGINT end the session loop (libfuse's handlers, main thread only) and the
// daemon stops its imports, answers waiting opens and unmounts. SIGHUP reopens -o log_file. Every
// thread but the main one blocks all three.
#include <fcntl.h>
#include <linux/magic.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/dist_sink.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/sinks/syslog_sink.h>
#include <spdlog/spdlog.h>

#include "core/error.hpp"
#include "core/options.hpp"
#include "core/statedir.hpp"
#include "fs/imagefs_fs.hpp"
#include "import/importer.hpp"
#include "meta/catalog.hpp"

namespace imagefs {
namespace {

std::string errno_text(int err) {
    return std::strerror(err);
}

// The default logger writes through a dist_sink so that its one real sink can be swapped while
// other threads log: SIGHUP reopens the log file, daemonizing moves from stderr to syslog.
class Logging {
  public:
    explicit Logging(const DaemonOptions& o)
        : file_(o.log_file), sinks_(std::make_shared<spdlog::sinks::dist_sink_mt>()) {
        if (on_stderr_) {
            // Without -f, stderr is the caller's (mount(8), a boot log): say only what went
            // wrong there; the rest goes to syslog once detached.
            auto err = std::make_shared<spdlog::sinks::stderr_sink_mt>();
            if (!o.foreground) err->set_level(spdlog::level::warn);
            sinks_->set_sinks({err});
        } else
            sinks_->set_sinks({std::make_shared<spdlog::sinks::basic_file_sink_mt>(file_)});
        auto logger = std::make_shared<spdlog::logger>("imagefsd", sinks_);
        logger->set_level(spdlog::level::from_str(o.log_level));
        logger->flush_on(spdlog::level::info);
        spdlog::set_default_logger(logger);
    }

    // stderr is about to become /dev/null: without -o log_file, log to syslog from now on.
    void daemonized() {
        if (!on_stderr_) return;
        sinks_->set_sinks({std::make_shared<spdlog::sinks::syslog_sink_mt>("imagefsd", LOG_PID,
                                                                           LOG_DAEMON, true)});
        on_stderr_ = false;
    }

    // Whether the log still goes to the caller's stderr (so a fatal error printed there as
    // "imagefsd: ..." need not be logged as well).
    bool on_stderr() const { return on_stderr_; }

    // After logrotate renamed the file: write to a fresh file under the configured name.
    void reopen() {
        if (file_.empty()) return;
        try {
            sinks_->set_sinks({std::make_shared<spdlog::sinks::basic_file_sink_mt>(file_)});
            spdlog::info("reopened the log file {} (SIGHUP)", file_);
        } catch (const spdlog::spdlog_ex& e) {
            spdlog::error("cannot reopen the log file {}: {}; still writing to the old file", file_,
                          e.what());
        }
    }

  private:
    std::string file_;
    bool on_stderr_ = file_.empty();
    std::shared_ptr<spdlog::sinks::dist_sink_mt> sinks_;
};

// libfuse refused an option: exit status 2, as for the daemon's own option errors.
struct OptionError : Error {
    using Error::Error;
};

sigset_t stop_signals() {
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGTERM);
    sigaddset(&s, SIGINT);
    sigaddset(&s, SIGHUP);
    return s;
}

// SIGHUP: the handler only writes a byte to a pipe; a thread reopens the log (spdlog is not
// async-signal-safe). Installed before fuse_set_signal_handlers, which then leaves SIGHUP alone.
int g_hangup_fd = -1;

void on_sighup(int) {
    int saved = errno;
    char c = 1;
    [[maybe_unused]] ssize_t n = ::write(g_hangup_fd, &c, 1);
    errno = saved;
}

class HangupThread {
  public:
    explicit HangupThread(Logging& log) {
        int fds[2];
        if (::pipe2(fds, O_CLOEXEC) != 0) throw Error(Errc::io, "pipe: " + errno_text(errno));
        read_fd_ = fds[0];
        g_hangup_fd = fds[1];
        ::fcntl(g_hangup_fd, F_SETFL, O_NONBLOCK);  // the handler never blocks
        thread_ = std::thread([this, &log] {
            char buf[64];
            for (;;) {
                ssize_t n = ::read(read_fd_, buf, sizeof buf);
                if (n < 0 && errno == EINTR) continue;
                if (n <= 0) return;  // write end closed: shutting down
                log.reopen();
            }
        });
        struct sigaction sa {};
        sa.sa_handler = on_sighup;
        sa.sa_flags = SA_RESTART;
        sigemptyset(&sa.sa_mask);
        ::sigaction(SIGHUP, &sa, nullptr);
    }
    ~HangupThread() {
        ::signal(SIGHUP, SIG_IGN);  // no handler runs after this
        ::close(g_hangup_fd);
        g_hangup_fd = -1;
        thread_.join();
        ::close(read_fd_);
    }
    HangupThread(const HangupThread&) = delete;
    HangupThread& operator=(const HangupThread&) = delete;

  private:
    int read_fd_ = -1;
    std::thread thread_;
};

// Without -f: fork, and keep the parent until the child says the mount answers.
class Launcher {
  public:
    // Returns in the child only. The parent exits 0 once ready() ran in the child, or with the
    // child's exit status (at least 1) if the child dies first; the child has then already
    // printed its error on the shared stderr.
    void fork_and_wait() {
        int fds[2];
        if (::pipe2(fds, O_CLOEXEC) != 0) throw Error(Errc::io, "pipe: " + errno_text(errno));
        pid_t pid = ::fork();
        if (pid < 0) throw Error(Errc::io, "fork: " + errno_text(errno));
        if (pid > 0) {
            ::close(fds[1]);
            sigset_t none;
            sigemptyset(&none);
            ::pthread_sigmask(SIG_SETMASK, &none, nullptr);  // Ctrl-C ends the waiting parent
            char c = 0;
            ssize_t n;
            do n = ::read(fds[0], &c, 1);
            while (n < 0 && errno == EINTR);
            if (n == 1) ::_exit(0);
            int st = 0;
            while (::waitpid(pid, &st, 0) < 0 && errno == EINTR) {
            }
            ::_exit(WIFEXITED(st) && WEXITSTATUS(st) != 0 ? WEXITSTATUS(st) : 1);
        }
        ::close(fds[0]);
        fd_ = fds[1];
        ::setsid();
        if (::chdir("/") != 0) throw Error(Errc::io, "chdir /: " + errno_text(errno));
    }

    // Detaches from the caller's terminal and releases the parent. Returns false with -f.
    bool ready() {
        if (fd_ < 0) return false;
        int null = ::open("/dev/null", O_RDWR | O_CLOEXEC);
        if (null >= 0) {
            for (int fd = 0; fd <= 2; ++fd) ::dup2(null, fd);
            ::close(null);
        }
        char c = 1;
        [[maybe_unused]] ssize_t n = ::write(fd_, &c, 1);
        ::close(fd_);
        fd_ = -1;
        return true;
    }

  private:
    int fd_ = -1;
};

// The backing-device id ("MAJOR:MINOR") of the mount at `mnt`, from /proc/self/mountinfo (a stat()
// of the mountpoint would wait for our own INIT).
std::string mount_device(const std::string& mnt) {
    std::ifstream f("/proc/self/mountinfo");
    std::string line, found;
    while (std::getline(f, line)) {
        std::istringstream ss(line);
        std::string id, parent, dev, root, point;
        ss >> id >> parent >> dev >> root >> point;
        if (point == mnt) found = dev;  // the last one is the newest
    }
    return found;
}

// A mountpoint left behind by a daemon that died answers ENOTCONN: detach it (and any dead mounts
// stacked under it) so we can mount again. statfs, unlike stat, is never answered from the
// kernel's attribute cache, so it sees a connection that died a moment ago.
void clear_dead_mount(const std::string& mnt) {
    for (int i = 0; i < 16; ++i) {
        struct statfs sf {};
        if (::statfs(mnt.c_str(), &sf) == 0) return;
        if (errno != ENOTCONN && errno != ECONNABORTED) return;
        spdlog::warn("{} is a dead FUSE mount (transport endpoint not connected); detaching it",
                     mnt);
        if (::umount2(mnt.c_str(), MNT_DETACH) != 0)
            throw Error(Errc::busy, "cannot detach the dead mount at " + mnt + ": " +
                                        errno_text(errno) + " (run 'fusermount3 -uz " + mnt + "')");
    }
}

// Returns 0 once the kernel has the mount answered by this daemon (INIT, GETATTR and STATFS of
// the root went through the session loop), else the errno seen.
int probe_mount(const std::string& mnt) {
    struct stat st {};
    if (::stat(mnt.c_str(), &st) != 0) return errno;
    struct statfs sf {};
    if (::statfs(mnt.c_str(), &sf) != 0) return errno;
    return sf.f_type == FUSE_SUPER_MAGIC ? 0 : ENOTCONN;
}

std::string escape_option(const std::string& v) {
    std::string out;
    for (char c : v) {
        if (c == ',' || c == '\\') out.push_back('\\');
        out.push_back(c);
    }
    return out;
}

// The FUSE session and its mount; unmounts (if mounted) and destroys on every exit path.
class Session {
  public:
    Session(const DaemonOptions& o, const StateDir& dir, ImageFs& fsimpl) {
        std::vector<std::string> argv_s = {
            "imagefsd", "-o",
            std::string(o.read_only ? "ro," : "") +
                "subtype=imagefs,fsname=" + escape_option(dir.root().string())};
        if (o.debug) argv_s.push_back("-d");
        for (const auto& f : o.fuse_options) {
            argv_s.push_back("-o");
            argv_s.push_back(f);
        }
        std::vector<char*> argv;
        for (auto& s : argv_s) argv.push_back(s.data());
        fuse_args args = FUSE_ARGS_INIT(static_cast<int>(argv.size()), argv.data());
        se_ = fuse_session_new(&args, &ImageFs::ops(), sizeof(fuse_lowlevel_ops), &fsimpl);
        fuse_opt_free_args(&args);
        if (!se_) {
            std::string given;
            for (const auto& f : o.fuse_options) given += (given.empty() ? "" : ",") + f;
            throw OptionError(Errc::invalid_argument,
                              given.empty() ? "libfuse refused to start a session (see above)"
                                            : "libfuse does not accept the option(s) " + given +
                                                  " (the line above names the unknown ones; "
                                                  "imagefsd --help lists the options)");
        }
    }
    ~Session() {
        unmount();
        fuse_session_destroy(se_);
    }
    Session(const Session&) = delete;
    Session& operator=(const Session&) = delete;

    void mount(const std::string& mnt) {
        if (fuse_session_mount(se_, mnt.c_str()) != 0)
            throw Error(Errc::io, "cannot mount on " + mnt + " (see the message above)");
        mounted_ = true;
    }
    // Closes the connection (pending requests fail, a blocked probe returns) and detaches the
    // mount.
    void unmount() {
        if (mounted_) fuse_session_unmount(se_);
        mounted_ = false;
    }
    fuse_session* get() const { return se_; }

  private:
    fuse_session* se_ = nullptr;
    bool mounted_ = false;
};

std::string absolute_path(const std::string& p) {
    std::string a = fs::absolute(p).string();
    while (a.size() > 1 && a.back() == '/') a.pop_back();
    return a;
}

// Refuses a mountpoint that cannot be one before anything is created. A dead mount (ENOTCONN) is
// fine: it is cleared once the state directory is ours.
void check_mountpoint(const std::string& mnt) {
    struct stat st {};
    if (::stat(mnt.c_str(), &st) != 0) {
        int err = errno;
        if (err == ENOTCONN) return;
        if (err == ENOENT)
            throw Error(Errc::not_found,
                        "mountpoint " + mnt + " does not exist (create it: mkdir -p " + mnt + ")");
        throw_errno("cannot use mountpoint " + mnt, err);
    }
    if (!S_ISDIR(st.st_mode))
        throw Error(Errc::invalid_argument, "mountpoint " + mnt + " is not a directory");
}

// Refuses a mountpoint that is the state directory or one of its parents: the mount would hide
// the daemon's own files from it, and every access to them would wait on the daemon itself.
void check_not_hidden(const std::string& state_dir, const std::string& mnt) {
    boost::system::error_code ec;
    const std::string state = fs::weakly_canonical(state_dir, ec).string();
    const std::string m = fs::weakly_canonical(mnt, ec).string();
    if (ec) return;
    if (state == m || m == "/" || state.rfind(m + "/", 0) == 0)
        throw Error(Errc::invalid_argument,
                    "mountpoint " + mnt + " would hide the state directory " + state_dir +
                        " (it is that directory or a parent of it); mount somewhere else, e.g. "
                        "/mnt/images");
}

int serve(const DaemonOptions& o, Logging& log);

int run(DaemonOptions o) {
    o.state_dir = absolute_path(o.state_dir);  // the daemon runs in /
    o.mountpoint = absolute_path(o.mountpoint);
    Logging log(o);
    try {
        return serve(o, log);
    } catch (const std::exception& e) {
        if (!log.on_stderr()) spdlog::critical("{}", e.what());  // main() prints it on stderr
        throw;
    }
}

int serve(const DaemonOptions& o, Logging& log) {
    // Blocked until the session loop runs; every thread started meanwhile inherits the mask.
    sigset_t stop_set = stop_signals();
    ::pthread_sigmask(SIG_BLOCK, &stop_set, nullptr);

    check_mountpoint(o.mountpoint);
    check_not_hidden(o.state_dir, o.mountpoint);
    StateDir dir(o.state_dir, true);
    DaemonLock lock(dir);

    ImageFs fsimpl(dir, o);
    {
        // Catalog work before the fork: SQLite connections must not cross a fork().
        Catalog cat(dir.catalog_path().string());
        recover_state_dir(dir, cat);
        int64_t max_id = 0;
        auto rows = cat.list(&max_id);
        fsimpl.catalog_synced(rows, max_id);
    }

    clear_dead_mount(o.mountpoint);
    struct stat st {};
    if (::stat(o.mountpoint.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
        throw Error(Errc::not_found, "mountpoint " + o.mountpoint + " is not a directory");

    Session session(o, dir, fsimpl);
    fuse_session* se = session.get();
    session.mount(o.mountpoint);
    fsimpl.set_device(mount_device(o.mountpoint));

    Launcher launcher;
    if (!o.foreground) {
        launcher.fork_and_wait();
        lock.write_pid();
    }

    HangupThread hangup(log);
    // A daemon started from a non-interactive shell inherits SIGINT ignored; libfuse installs its
    // handlers only over the default action, and SIGINT must stop the daemon too.
    ::signal(SIGINT, SIG_DFL);
    ::signal(SIGTERM, SIG_DFL);
    if (fuse_set_signal_handlers(se) != 0) throw Error(Errc::io, "cannot install signal handlers");
    fsimpl.attach(se);
    fsimpl.start();
    ImportOptions iopts;
    iopts.max_concurrent = o.max_imports;
    iopts.fetch.connect_timeout_s = o.connect_timeout_s;
    iopts.fetch.stall_timeout_s = o.stall_timeout_s;
    if (unsigned maj = 0, min = 0; std::sscanf(fsimpl.device().c_str(), "%u:%u", &maj, &min) == 2)
        iopts.fetch.own_device = makedev(maj, min);
    iopts.retry.base_delay_ms = o.retry_delay_ms;
    iopts.retry.max_delay_ms = std::max(o.retry_delay_ms, o.retry_max_delay_ms);
    ImportManager manager(dir, iopts, fsimpl);
    fsimpl.on_catalog_change([&manager] { manager.wake(); });
    manager.start();

    std::atomic<int> probe_err{0};  // set by the probe, read after it is joined
    const pthread_t main_thread = ::pthread_self();
    std::thread probe([&] {
        int err = probe_mount(o.mountpoint);
        if (err == 0) {
            spdlog::info("serving {} on {}", dir.root().string(), o.mountpoint);
            sd_notifyf(0, "READY=1\nSTATUS=serving %s on %s", dir.root().c_str(),
                       o.mountpoint.c_str());
            if (launcher.ready()) log.daemonized();
        } else {
            fuse_session_exit(se);
            ::pthread_kill(main_thread, SIGTERM);  // wakes the session loop
        }
        probe_err = err;
    });

    fuse_loop_config* cfg = fuse_loop_cfg_create();
    fuse_loop_cfg_set_max_threads(cfg, 16);
    fuse_loop_cfg_set_idle_threads(cfg, 16);
    ::pthread_sigmask(SIG_UNBLOCK, &stop_set, nullptr);
    int rc = fuse_session_loop_mt(se, cfg);
    fuse_loop_cfg_destroy(cfg);
    sd_notify(0, "STOPPING=1");
    lock.mark_stopping();  // a daemon started now waits for this one to finish
    spdlog::info("stopping: unmounting {}", o.mountpoint);

    manager.stop();
    fsimpl.stop();
    fsimpl.detach();
    session.unmount();
    probe.join();
    fuse_remove_signal_handlers(se);
    if (probe_err != 0)
        throw Error(Errc::io, "the mount on " + o.mountpoint + " did not come up: " +
                                  errno_text(probe_err) + " (see the messages above)");
    // libfuse reports the signal that ended the loop as its result: that is a clean stop.
    bool clean = rc == 0 || rc == SIGTERM || rc == SIGINT;
    if (!clean) spdlog::error("the FUSE session ended with an error ({})", rc);
    spdlog::info("stopped");
    return clean ? 0 : 1;
}

}  // namespace
}  // namespace imagefs

int main(int argc, char** argv) {
    using namespace imagefs;
    DaemonOptions o;
    try {
        o = parse_daemon_args(std::vector<std::string>(argv + 1, argv + argc));
    } catch (const Error& e) {
        std::cerr << "imagefsd: " << e.what() << "\n";
        return 2;
    }
    if (o.help) {
        std::cout << daemon_usage();
        return 0;
    }
    if (o.version) {
        std::cout << "imagefsd 0.1.0 (libfuse " << fuse_pkgversion() << ")\n";
        return 0;
    }
    try {
        return run(o);
    } catch (const OptionError& e) {
        std::cerr << "imagefsd: " << e.what() << "\n";
        return 2;
    } catch (const std::exception& e) {
        std::cerr << "imagefsd: " << e.what() << "\n";
        return 1;
    }
}
