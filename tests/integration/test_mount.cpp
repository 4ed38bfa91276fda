// Mounting the way admins do: the installed helpers run by the real mount(8), fstab, the systemd
// notification protocol and units, recovery after kill -9, and the daemon's signals.
//
// mount(8) runs helpers from /sbin only. Rather than writing into the machine's /sbin, each test
// that needs the helpers installs the build into a temporary prefix (cmake --install --prefix),
// moves the test process into a mount namespace of its own and lays PREFIX/sbin over /sbin with
// overlayfs (HelpersOnSbin). mount(8), the helpers, mount.fuse3 and imagefsd, all started by the
// test, see the helpers in /sbin; nothing outside the test does, and the overlay goes away with the
// test process. The test process is also made a child subreaper, so that the daemons that
// mount(8) starts and that detach from it become its children: their exit status is checked.
#include <fcntl.h>
#include <linux/magic.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <climits>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <set>
#include <sstream>
#include <thread>

#include "support.hpp"

using namespace itest;
using Clock = std::chrono::steady_clock;

namespace {

bool contains(const std::string& hay, const std::string& needle) {
    return hay.find(needle) != std::string::npos;
}

bool exists(const std::string& path) {
    struct stat st {};
    return ::lstat(path.c_str(), &st) == 0;
}

// `cmake --install` of this build into PREFIX (with DESTDIR when given).
// Installs take turns (a lock file in the build directory), because every install rewrites the
// build's install_manifest.txt; `manifest` receives this install's manifest when given.
Result install_build(const std::string& prefix, const std::string& destdir = "",
                     std::string* manifest = nullptr) {
    std::vector<std::string> argv;
    if (!destdir.empty()) argv = {"env", "DESTDIR=" + destdir};
    for (const char* a : {CMAKE_COMMAND, "--install", IMAGEFS_BUILD_DIR, "--prefix"})
        argv.push_back(a);
    argv.push_back(prefix);
    const std::string lock_path = std::string(IMAGEFS_BUILD_DIR) + "/.install-test.lock";
    int lock = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    REQUIRE(lock >= 0);
    REQUIRE(::flock(lock, LOCK_EX) == 0);
    Result r = run(argv);
    if (manifest) *manifest = read_file(std::string(IMAGEFS_BUILD_DIR) + "/install_manifest.txt");
    ::close(lock);
    return r;
}

// The build installed into a temporary prefix, and that prefix's sbin laid over /sbin in a mount
// namespace private to the test process (see the comment at the top).
class HelpersOnSbin {
  public:
    HelpersOnSbin() {
        auto r = install_build(prefix_);
        INFO(r.out << r.err);
        REQUIRE(r.status == 0);
        REQUIRE(::prctl(PR_SET_CHILD_SUBREAPER, 1) == 0);
        REQUIRE(::unshare(CLONE_NEWNS) == 0);
        REQUIRE(::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) == 0);
        char real[PATH_MAX];
        REQUIRE(::realpath("/sbin", real) != nullptr);  // /usr/sbin on Debian 12
        sbin_ = real;
        std::string opts = "lowerdir=" + prefix_ + "/sbin:" + sbin_;
        INFO(opts);
        REQUIRE(::mount("overlay", sbin_.c_str(), "overlay", MS_RDONLY, opts.c_str()) == 0);
        REQUIRE(exists("/sbin/mount.fuse.imagefs"));
        REQUIRE(exists("/sbin/mount.imagefs"));
    }
    ~HelpersOnSbin() { ::umount2(sbin_.c_str(), MNT_DETACH); }
    HelpersOnSbin(const HelpersOnSbin&) = delete;
    HelpersOnSbin& operator=(const HelpersOnSbin&) = delete;

    const std::string& prefix() const { return prefix_; }

  private:
    TempDir t_;
    std::string prefix_ = t_ / "prefix";
    std::string sbin_;
};

// The mount of `mnt` as the kernel lists it, or "" when not mounted: "FSTYPE SOURCE SUPEROPTS".
// Paths in mountinfo escape spaces as \040.
std::string escape_mountinfo(const std::string& p) {
    std::string out;
    for (char c : p) out += c == ' ' ? std::string("\\040") : std::string(1, c);
    return out;
}

std::vector<std::string> mounts_on(const std::string& mnt) {
    std::ifstream f("/proc/self/mountinfo");
    std::vector<std::string> found;
    std::string line;
    while (std::getline(f, line)) {
        std::istringstream ss(line);
        std::string id, parent, dev, root, point;
        ss >> id >> parent >> dev >> root >> point;
        if (point != escape_mountinfo(mnt)) continue;
        auto dash = line.find(" - ");
        found.push_back(dash == std::string::npos ? line : line.substr(dash + 3));
    }
    return found;
}

// The pid recorded in STATE/imagefsd.lock, or -1.
pid_t daemon_pid(const std::string& state) {
    std::string s = read_file(state + "/imagefsd.lock");
    return s.empty() ? -1 : static_cast<pid_t>(std::atol(s.c_str()));
}

// True while a daemon holds the lock of `state`.
bool lock_held(const std::string& state) {
    int fd = ::open((state + "/imagefsd.lock").c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return false;
    bool held = ::flock(fd, LOCK_SH | LOCK_NB) != 0;
    ::close(fd);
    return held;
}

// Waits for a daemon that is our child (directly, or through the subreaper) to exit; returns its
// exit status (128 + signal when killed), or nullopt on timeout.
std::optional<int> wait_exit(pid_t pid, std::chrono::milliseconds timeout = 15s) {
    auto end = Clock::now() + timeout;
    while (Clock::now() < end) {
        int st = 0;
        pid_t r = ::waitpid(pid, &st, WNOHANG);
        if (r == pid) return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        if (r < 0) return -1;
        std::this_thread::sleep_for(20ms);
    }
    return std::nullopt;
}

// Served by imagefs right now: the root of the mount answers stat and statfs through FUSE.
bool answers(const std::string& mnt) {
    struct statfs sf {};
    struct stat st {};
    return ::statfs(mnt.c_str(), &sf) == 0 && sf.f_type == FUSE_SUPER_MAGIC &&
           ::stat(mnt.c_str(), &st) == 0 && st.st_ino == 1;
}

bool wait_for(const std::function<bool()>& cond, std::chrono::milliseconds timeout = 10s) {
    auto end = Clock::now() + timeout;
    while (Clock::now() < end) {
        if (cond()) return true;
        std::this_thread::sleep_for(20ms);
    }
    return cond();
}

// A state dir and a mountpoint whose paths contain spaces, under a fresh temporary directory.
struct Paths {
    TempDir t;
    std::string state = t / "state dir";
    std::string mnt = t / "mount point";
    std::string log = t / "imagefsd.log";
    Paths() { REQUIRE(::mkdir(mnt.c_str(), 0755) == 0); }
};

// Unmounts (if still mounted) and reaps the daemon at the end of a test, whatever happened.
struct MountGuard {
    std::string state, mnt;
    ~MountGuard() {
        pid_t pid = daemon_pid(state);
        if (!mounts_on(mnt).empty()) run({"umount", "-l", mnt}, 20s);
        if (pid > 0 && lock_held(state) && !wait_exit(pid, 10s)) {
            ::kill(pid, SIGKILL);
            wait_exit(pid, 5s);
        }
        while (!mounts_on(mnt).empty() && run({"umount", "-l", mnt}, 20s).status == 0) {
        }
    }
};

// After a clean stop: the daemon exited 0, released its lock and left nothing mounted.
void require_clean_exit(pid_t pid, const Paths& p) {
    auto st = wait_exit(pid);
    INFO(read_file(p.log));
    REQUIRE(st.has_value());
    CHECK(*st == 0);
    CHECK_FALSE(lock_held(p.state));
    CHECK(mounts_on(p.mnt).empty());
}

// A unix datagram socket that plays systemd's NOTIFY_SOCKET.
class NotifySocket {
  public:
    explicit NotifySocket(std::string path) : path_(std::move(path)) {
        fd_ = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        REQUIRE(fd_ >= 0);
        sockaddr_un a{};
        a.sun_family = AF_UNIX;
        REQUIRE(path_.size() < sizeof a.sun_path);
        std::copy(path_.begin(), path_.end(), a.sun_path);
        REQUIRE(::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    }
    ~NotifySocket() { ::close(fd_); }
    // The next datagram, or nullopt after `timeout`.
    std::optional<std::string> receive(std::chrono::milliseconds timeout) {
        pollfd p{fd_, POLLIN, 0};
        if (::poll(&p, 1, static_cast<int>(timeout.count())) != 1) return std::nullopt;
        char buf[4096];
        ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
        if (n < 0) return std::nullopt;
        return std::string(buf, static_cast<size_t>(n));
    }
    const std::string& path() const { return path_; }

  private:
    std::string path_;
    int fd_ = -1;
};

// imagefsd -f as a child, with NOTIFY_SOCKET set and stderr to a file.
pid_t start_foreground(const std::vector<std::string>& args, const std::string& notify,
                       const std::string& err_file) {
    pid_t pid = ::fork();
    if (pid == 0) {
        int devnull = ::open("/dev/null", O_RDWR);
        ::dup2(devnull, 0);
        ::dup2(devnull, 1);
        int fd = ::open(err_file.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
        ::dup2(fd, 2);
        ::setenv("NOTIFY_SOCKET", notify.c_str(), 1);
        std::vector<std::string> a = {IMAGEFSD};
        a.insert(a.end(), args.begin(), args.end());
        std::vector<char*> av;
        for (auto& s : a) av.push_back(s.data());
        av.push_back(nullptr);
        ::execv(av[0], av.data());
        ::_exit(127);
    }
    return pid;
}

}  // namespace

TEST_CASE("mount: cmake --install puts binaries, helpers, units and man pages under DESTDIR",
          "[mount][install]") {
    TempDir t;
    const std::string dest = t / "dest";
    const bool system_helper_before = exists("/sbin/mount.imagefs");
    std::string manifest;
    auto r = install_build("/usr/local", dest, &manifest);
    INFO(r.out << r.err);
    REQUIRE(r.status == 0);
    // Every installed file is in the manifest (what people uninstall from), and only those.
    std::istringstream listed(manifest);
    std::set<std::string> in_manifest;
    for (std::string line; std::getline(listed, line);)
        if (!line.empty()) in_manifest.insert(line);
    CHECK(in_manifest.size() == 11);
    for (const char* f :
         {"/usr/local/sbin/imagefsd", "/usr/local/bin/imagefs", "/sbin/mount.imagefs",
          "/sbin/mount.fuse.imagefs", "/usr/local/lib/systemd/system/imagefs@.service",
          "/usr/local/share/man/man8/imagefsd.8", "/usr/local/share/man/man1/imagefs.1",
          "/usr/local/share/man/man8/mount.imagefs.8",
          "/usr/local/share/man/man8/mount.fuse.imagefs.8",
          "/usr/local/share/doc/imagefs/examples/mnt-images.mount",
          "/usr/local/share/doc/imagefs/examples/fstab.example"}) {
        INFO(f);
        CHECK(exists(dest + f));
        CHECK(in_manifest.count(f) == 1);  // listed without DESTDIR
    }
    for (const char* f : {"/usr/local/sbin/imagefsd", "/sbin/mount.imagefs",
                          "/sbin/mount.fuse.imagefs", "/usr/local/bin/imagefs"}) {
        INFO(f);
        CHECK(::access((dest + f).c_str(), X_OK) == 0);
    }
    // Helpers and units name the daemon where it runs, not where DESTDIR staged it.
    CHECK(contains(read_file(dest + "/sbin/mount.fuse.imagefs"),
                   "imagefsd='/usr/local/sbin/imagefsd'"));
    CHECK(contains(read_file(dest + "/usr/local/lib/systemd/system/imagefs@.service"),
                   "\nExecStart=/usr/local/sbin/imagefsd -f "));
    CHECK(read_file(dest + "/usr/local/share/man/man8/mount.fuse.imagefs.8") ==
          ".so man8/mount.imagefs.8\n");
    CHECK(contains(read_file(dest + "/usr/local/share/man/man8/imagefsd.8"), ".TH IMAGEFSD 8"));
    // Nothing was written outside DESTDIR.
    CHECK(exists("/sbin/mount.imagefs") == system_helper_before);

    // Any other prefix keeps the helpers inside it, naming that prefix's daemon.
    const std::string prefix = t / "opt";
    r = install_build(prefix);
    REQUIRE(r.status == 0);
    CHECK(contains(read_file(prefix + "/sbin/mount.imagefs"),
                   "imagefsd='" + prefix + "/sbin/imagefsd'"));
    CHECK(::access((prefix + "/sbin/imagefsd").c_str(), X_OK) == 0);
    CHECK(exists(prefix + "/lib/systemd/system/imagefs@.service"));
}

TEST_CASE("mount: -t fuse.imagefs, -t imagefs and -t fuse imagefsd# mount paths with spaces",
          "[mount]") {
    HelpersOnSbin helpers;
    Paths p;
    MountGuard guard{p.state, p.mnt};
    std::string type, source;
    SECTION("mount -t fuse.imagefs (/sbin/mount.fuse.imagefs)") {
        type = "fuse.imagefs";
        source = p.state;
    }
    SECTION("mount -t imagefs (/sbin/mount.imagefs)") {
        type = "imagefs";
        source = p.state;
    }
    SECTION("mount -t fuse imagefsd#STATE (the system's mount.fuse3 runs imagefsd)") {
        type = "fuse";
        source = "imagefsd#" + p.state;
    }
    const std::string opts = "allow_other,log_file=" + p.log +
                             ",nofail,_netdev,x-systemd.automount,comment=imagefs,open=eagain";
    pid_t previous = -1;
    for (int round = 0; round < 2; ++round) {
        auto r = run({"mount", "-t", type, source, p.mnt, "-o", opts});
        INFO(r.out << r.err << read_file(p.log));
        REQUIRE(r.status == 0);
        // mount returned only once the daemon had announced that the mount answers.
        CHECK(contains(read_file(p.log), "serving " + p.state + " on " + p.mnt));
        CHECK(answers(p.mnt));
        auto m = mounts_on(p.mnt);
        REQUIRE(m.size() == 1);
        CHECK(m[0].rfind("fuse.imagefs " + escape_mountinfo(p.state) + " ", 0) == 0);
        CHECK(contains(m[0], "allow_other"));
        if (previous > 0) CHECK(wait_exit(previous) == 0);
        pid_t pid = daemon_pid(p.state);
        REQUIRE(pid > 0);
        r = run({"umount", p.mnt});
        CHECK(r.status == 0);
        if (round == 0) {
            // The next mount runs at once: umount returns before the daemon has stopped, and the
            // new daemon waits for it rather than failing with "already served".
            previous = pid;
            continue;
        }
        require_clean_exit(pid, p);
    }
}

TEST_CASE("mount -T FSTAB with defaults,noauto,nofail,_netdev,x-systemd.automount,allow_other",
          "[mount][fstab]") {
    HelpersOnSbin helpers;
    Paths p;
    MountGuard guard{p.state, p.mnt};
    const std::string fstab = p.t / "fstab";
    write_file(fstab, "# imagefs test\n" + escape_mountinfo(p.state) + " " +
                          escape_mountinfo(p.mnt) +
                          " fuse.imagefs "
                          "defaults,noauto,nofail,_netdev,x-systemd.automount,allow_other,"
                          "log_file=" +
                          p.log + " 0 0\n");
    // noauto: mount -a leaves it alone.
    auto r = run({"mount", "-T", fstab, "-a"});
    CHECK(r.status == 0);
    CHECK(mounts_on(p.mnt).empty());

    r = run({"mount", "-T", fstab, p.mnt});
    INFO(r.out << r.err << read_file(p.log));
    REQUIRE(r.status == 0);
    CHECK(answers(p.mnt));
    auto m = mounts_on(p.mnt);
    REQUIRE(m.size() == 1);
    CHECK(m[0].rfind("fuse.imagefs " + escape_mountinfo(p.state) + " ", 0) == 0);
    CHECK(contains(m[0], "allow_other"));
    CHECK_FALSE(contains(read_file(p.log), "unknown option"));
    pid_t pid = daemon_pid(p.state);
    CHECK(run({"umount", p.mnt}).status == 0);
    require_clean_exit(pid, p);
}

TEST_CASE("mount: a daemon that cannot serve fails mount with its message and leaves nothing",
          "[mount]") {
    HelpersOnSbin helpers;
    Paths p;
    MountGuard guard{p.state, p.mnt};
    auto mount = [&](const std::string& opts) {
        return run({"mount", "-t", "fuse.imagefs", p.state, p.mnt, "-o", opts}, 60s);
    };
    SECTION("a bad option value: status 2") {
        auto r = mount("open=bogus");
        CHECK(r.status == 2);
        CHECK(contains(r.err,
                       "imagefsd: invalid value for -o open: 'bogus' (expected wait or "
                       "eagain)"));
    }
    SECTION("an option neither imagefsd nor libfuse knows: status 2, naming it") {
        auto r = mount("no_such_option");
        CHECK(r.status == 2);
        CHECK(contains(r.err, "imagefsd: libfuse does not accept the option(s) no_such_option"));
        CHECK(contains(r.err, "imagefsd --help"));
    }
    SECTION("a mountpoint that does not exist: status 1, nothing created") {
        const std::string missing = p.t / "no such dir";
        auto r = run({"mount", "-t", "fuse.imagefs", p.state, missing}, 60s);
        CHECK(r.status != 0);
        CHECK(contains(r.err, "mountpoint " + missing + " does not exist (create it: mkdir -p"));
        CHECK_FALSE(exists(p.state));
        // The daemon itself says the same, once (not also as a log line).
        r = run({IMAGEFSD, p.state, missing}, 60s);
        CHECK(r.status == 1);
        CHECK(r.err == "imagefsd: mountpoint " + missing + " does not exist (create it: mkdir -p " +
                           missing + ")\n");
        CHECK_FALSE(exists(p.state));
    }
    SECTION("a mount whose FUSE INIT fails never counts as mounted: status 1") {
        // libfuse 3.14 refuses INIT when -o max_read is set and init() does not repeat it.
        auto r = mount("max_read=65536");
        CHECK(r.status == 1);
        CHECK(contains(r.err, "maximum read size"));
        CHECK(contains(r.err, "imagefsd: the mount on " + p.mnt + " did not come up"));
    }
    SECTION("the state dir is already served: status 1, naming the daemon") {
        std::string other = p.t / "other mount";
        REQUIRE(::mkdir(other.c_str(), 0755) == 0);
        MountGuard other_guard{p.state, other};
        REQUIRE(run({"mount", "-t", "fuse.imagefs", p.state, other}).status == 0);
        pid_t pid = daemon_pid(p.state);
        auto r = mount("allow_other");
        CHECK(r.status == 1);
        CHECK(contains(r.err, "is already served by imagefsd (pid " + std::to_string(pid) + ")"));
        CHECK(answers(other));
        REQUIRE(run({"umount", other}).status == 0);
        REQUIRE(wait_exit(pid) == 0);
    }
    SECTION("mount -f (fake) runs nothing") {
        auto r = run({"mount", "-f", "-t", "fuse.imagefs", p.state, p.mnt});
        CHECK(r.status == 0);
        CHECK_FALSE(exists(p.state));
    }
    CHECK(mounts_on(p.mnt).empty());
    CHECK_FALSE(lock_held(p.state));
}

TEST_CASE("mount after kill -9 of the daemon clears the dead mount and the import goes on",
          "[mount][recovery]") {
    HelpersOnSbin helpers;
    Paths p;
    MountGuard guard{p.state, p.mnt};
    std::string www = p.t / "www";
    REQUIRE(::mkdir(www.c_str(), 0755) == 0);
    REQUIRE(run({"cp", di_kernel(), www + "/linux"}).status == 0);
    const std::string sha = sha256_of(www + "/linux");
    HttpServer http(www);

    auto r = run({"mount", "-t", "fuse.imagefs", p.state, p.mnt, "-o", "log_file=" + p.log});
    REQUIRE(r.status == 0);
    REQUIRE(cli(p.state, {"import", "linux", http.url("linux?gate=go")}).status == 0);
    REQUIRE(wait_state(p.state, "linux", "importing"));
    REQUIRE(answers(p.mnt));  // the root's attributes are now in the kernel's cache for 1 s

    pid_t pid = daemon_pid(p.state);
    REQUIRE(::kill(pid, SIGKILL) == 0);
    REQUIRE(wait_exit(pid) == 128 + SIGKILL);
    struct statfs sf {};
    CHECK(::statfs(p.mnt.c_str(), &sf) == -1);
    CHECK(errno == ENOTCONN);

    // At once (within the attribute cache's second) and through the helper, like an admin would.
    r = run({"mount", "-t", "fuse.imagefs", p.state, p.mnt, "-o", "log_file=" + p.log});
    INFO(r.err << read_file(p.log));
    REQUIRE(r.status == 0);
    CHECK(answers(p.mnt));
    CHECK(mounts_on(p.mnt).size() == 1);  // the dead mount is gone, not hidden underneath
    CHECK(contains(read_file(p.log), "is a dead FUSE mount"));

    touch(www + "/go");
    REQUIRE(wait_state(p.state, "linux", "active"));
    CHECK(sha256_of(p.mnt + "/linux") == sha);
    CHECK(contains(cli(p.state, {"status", "linux", "--json"}).out, "\"attempts\": 2"));
    pid = daemon_pid(p.state);
    CHECK(run({"umount", p.mnt}).status == 0);
    require_clean_exit(pid, p);
}

TEST_CASE("mount: READY=1 reaches NOTIFY_SOCKET only once the mount answers", "[mount][systemd]") {
    Paths p;
    MountGuard guard{p.state, p.mnt};
    NotifySocket notify(p.t / "notify");
    const std::string err = p.t / "stderr";

    SECTION("a mount that serves: READY=1 once, then STOPPING=1 on SIGTERM") {
        // -d: libfuse prints each request it receives before it handles it.
        pid_t pid = start_foreground({"-d", p.state, p.mnt}, notify.path(), err);
        auto msg = notify.receive(15s);
        REQUIRE(msg.has_value());
        std::string trace = read_file(err);  // at the moment READY=1 arrived
        INFO(*msg << "\n" << trace);
        CHECK(contains(*msg, "READY=1"));
        CHECK(contains(trace, "opcode: INIT"));
        CHECK(contains(trace, "opcode: STATFS"));  // the daemon's own probe was answered
        CHECK(answers(p.mnt));
        CHECK_FALSE(notify.receive(300ms).has_value());  // only once

        REQUIRE(::kill(pid, SIGTERM) == 0);
        msg = notify.receive(10s);
        REQUIRE(msg.has_value());
        CHECK(contains(*msg, "STOPPING=1"));
        REQUIRE(wait_exit(pid) == 0);
        CHECK(mounts_on(p.mnt).empty());
    }
    SECTION("a mount whose FUSE INIT fails: no READY=1, exit status 1") {
        pid_t pid = start_foreground({"-o", "max_read=65536", p.state, p.mnt}, notify.path(), err);
        auto st = wait_exit(pid);
        INFO(read_file(err));
        REQUIRE(st.has_value());
        CHECK(*st == 1);
        std::string all;
        while (auto m = notify.receive(0ms)) all += *m + "\n";
        CHECK_FALSE(contains(all, "READY=1"));
        CHECK(contains(read_file(err), "did not come up"));
        CHECK(mounts_on(p.mnt).empty());
    }
}

TEST_CASE("mount: SIGTERM, SIGINT and umount stop the daemon cleanly mid-import",
          "[mount][signals]") {
    HelpersOnSbin helpers;
    Paths p;
    MountGuard guard{p.state, p.mnt};
    std::string www = p.t / "www";
    REQUIRE(::mkdir(www.c_str(), 0755) == 0);
    REQUIRE(run({"cp", di_kernel(), www + "/linux"}).status == 0);
    const std::string sha = sha256_of(www + "/linux");
    HttpServer http(www);

    // Through a shell that ignores SIGINT, as a script's background job does: the daemon must
    // still stop on SIGINT.
    auto mount = [&] {
        auto r = run({"sh", "-c", "trap '' INT; exec mount \"$@\"", "sh", "-t", "fuse.imagefs",
                      p.state, p.mnt, "-o", "log_file=" + p.log});
        INFO(r.err);
        REQUIRE(r.status == 0);
    };
    mount();
    REQUIRE(cli(p.state, {"import", "linux", http.url("linux?gate=go")}).status == 0);
    REQUIRE(wait_state(p.state, "linux", "importing"));
    pid_t pid = daemon_pid(p.state);

    SECTION("SIGTERM: a waiting open fails with EIO") {
        OpenerChild opener(p.mnt + "/linux", O_RDONLY);
        REQUIRE(opener.blocked_in_open());
        REQUIRE(::kill(pid, SIGTERM) == 0);
        auto s = opener.wait(10s);
        REQUIRE(s.has_value());
        // EIO from the daemon; ECONNABORTED from the kernel if the daemon had not yet read the
        // request off /dev/fuse when it stopped (a busy machine).
        CHECK((*s == 100 + EIO || *s == 100 + ECONNABORTED));
        require_clean_exit(pid, p);
    }
    SECTION("SIGINT: a waiting open fails with EIO") {
        OpenerChild opener(p.mnt + "/linux", O_RDONLY);
        REQUIRE(opener.blocked_in_open());
        REQUIRE(::kill(pid, SIGINT) == 0);
        auto s = opener.wait(10s);
        REQUIRE(s.has_value());
        CHECK((*s == 100 + EIO || *s == 100 + ECONNABORTED));
        require_clean_exit(pid, p);
    }
    SECTION("umount, and mount again at once") {
        REQUIRE(run({"umount", p.mnt}).status == 0);
        // The old daemon is still stopping its import (curl notices within a second): the new
        // one waits for it instead of failing with "already served".
        mount();
        auto st = wait_exit(pid);
        REQUIRE(st.has_value());
        CHECK(*st == 0);
    }
    CHECK(contains(read_file(p.log), "stopped"));
    // The interrupted import is still the catalog's, and continues at the next mount. (After
    // "mount again" the new daemon requeues it first: it is 'queued' until a worker takes it.)
    CHECK(wait_state(p.state, "linux", "importing", 10s));
    if (mounts_on(p.mnt).empty()) mount();
    touch(www + "/go");
    REQUIRE(wait_state(p.state, "linux", "active"));
    CHECK(sha256_of(p.mnt + "/linux") == sha);
    pid = daemon_pid(p.state);
    CHECK(run({"umount", p.mnt}).status == 0);
    require_clean_exit(pid, p);
}

TEST_CASE("mount: SIGHUP reopens the log file and the daemon goes on serving", "[mount][signals]") {
    HelpersOnSbin helpers;
    Paths p;
    MountGuard guard{p.state, p.mnt};
    auto r = run({"mount", "-t", "fuse.imagefs", p.state, p.mnt, "-o", "log_file=" + p.log});
    REQUIRE(r.status == 0);
    pid_t pid = daemon_pid(p.state);
    const std::string rotated = p.log + ".1";
    REQUIRE(::rename(p.log.c_str(), rotated.c_str()) == 0);

    REQUIRE(::kill(pid, SIGHUP) == 0);
    REQUIRE(wait_for([&] { return contains(read_file(p.log), "reopened the log file"); }));
    CHECK(answers(p.mnt));
    CHECK(lock_held(p.state));
    // What the daemon logs from now on goes to the new file only.
    REQUIRE(cli(p.state, {"import", "linux", di_kernel()}).status == 0);
    REQUIRE(wait_state(p.state, "linux", "active"));
    CHECK(wait_for([&] { return contains(read_file(p.log), "image 'linux' is active"); }));
    CHECK_FALSE(contains(read_file(rotated), "linux"));
    CHECK(contains(read_file(rotated), "serving"));
    CHECK(sha256_of(p.mnt + "/linux") == sha256_of(di_kernel()));

    CHECK(run({"umount", p.mnt}).status == 0);
    require_clean_exit(pid, p);
}

TEST_CASE("mount: the systemd units and the fstab example pass systemd-analyze verify",
          "[mount][systemd]") {
    TempDir t;
    const std::string prefix = t / "prefix";
    REQUIRE(install_build(prefix).status == 0);
    const std::string units = t / "units";
    REQUIRE(::mkdir(units.c_str(), 0755) == 0);
    const std::string examples = prefix + "/share/doc/imagefs/examples";
    REQUIRE(run({"cp", prefix + "/lib/systemd/system/imagefs@.service",
                 examples + "/mnt-images.mount", units})
                .status == 0);
    std::string service = read_file(units + "/imagefs@.service");
    CHECK(contains(service, "\nType=notify\n"));
    CHECK(contains(service, "\nExecStart=" + prefix + "/sbin/imagefsd -f "));

    auto verify = [](const std::vector<std::string>& files) {
        std::vector<std::string> argv = {"systemd-analyze", "verify", "--man=no"};
        argv.insert(argv.end(), files.begin(), files.end());
        return run(argv);
    };
    // The template, as the instance for /mnt/images, and the example mount unit.
    auto r = verify({units + "/imagefs@mnt-images.service", units + "/mnt-images.mount"});
    INFO(r.out << r.err);
    CHECK(r.status == 0);
    CHECK(r.out + r.err == "");

    // The fstab line, through systemd's own fstab generator: a mount and an automount unit,
    // started with remote-fs.target (_netdev).
    const std::string gen = t / "gen";
    REQUIRE(::mkdir(gen.c_str(), 0755) == 0);
    r = run({"env", "SYSTEMD_FSTAB=" + examples + "/fstab.example", "SYSTEMD_PROC_CMDLINE=",
             "/lib/systemd/system-generators/systemd-fstab-generator", gen, gen, gen});
    INFO(r.err);
    REQUIRE(r.status == 0);
    CHECK(exists(gen + "/remote-fs.target.wants/mnt-images.automount"));
    CHECK(contains(read_file(gen + "/mnt-images.mount"), "\nType=fuse.imagefs\n"));
    r = verify({gen + "/mnt-images.mount", gen + "/mnt-images.automount"});
    INFO(r.out << r.err);
    CHECK(r.status == 0);
    CHECK(r.out + r.err == "");

    // The check is not blind: a misspelt setting is reported.
    write_file(units + "/typo@.service", [&] {
        std::string s = service;
        s.replace(s.find("KillMode="), 9, "KilMode=");
        return s;
    }());
    r = verify({units + "/typo@mnt-images.service"});
    CHECK(contains(r.out + r.err, "KilMode"));
}
