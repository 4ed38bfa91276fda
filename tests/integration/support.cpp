#include "support.hpp"

#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

namespace itest {
namespace {

std::string slurp(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

// Waits for pid up to timeout; returns status or nullopt.
std::optional<int> wait_pid(pid_t pid, std::chrono::milliseconds timeout) {
    auto end = std::chrono::steady_clock::now() + timeout;
    for (;;) {
        int st = 0;
        pid_t r = ::waitpid(pid, &st, WNOHANG);
        if (r == pid) return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        if (r < 0) return -1;
        if (std::chrono::steady_clock::now() >= end) return std::nullopt;
        std::this_thread::sleep_for(20ms);
    }
}

}  // namespace

TempDir::TempDir() {
    char tmpl[] = "/tmp/imagefs-test.XXXXXX";
    REQUIRE(::mkdtemp(tmpl) != nullptr);
    path_ = tmpl;
}

TempDir::~TempDir() {
    // Never follow into a mount that is still there.
    if (!path_.empty()) run({"rm", "-rf", "--one-file-system", path_}, 60s);
}

Result run(const std::vector<std::string>& argv, std::chrono::seconds timeout) {
    char out_t[] = "/tmp/imagefs-out.XXXXXX";
    char err_t[] = "/tmp/imagefs-err.XXXXXX";
    int out_fd = ::mkstemp(out_t);
    int err_fd = ::mkstemp(err_t);
    pid_t pid = ::fork();
    if (pid == 0) {
        ::dup2(out_fd, 1);
        ::dup2(err_fd, 2);
        int devnull = ::open("/dev/null", O_RDONLY);
        ::dup2(devnull, 0);
        std::vector<char*> av;
        for (const auto& a : argv) av.push_back(const_cast<char*>(a.c_str()));
        av.push_back(nullptr);
        ::execvp(av[0], av.data());
        ::_exit(127);
    }
    ::close(out_fd);
    ::close(err_fd);
    Result r;
    auto st = wait_pid(pid, timeout);
    if (!st) {
        ::kill(pid, SIGKILL);
        st = wait_pid(pid, 5s);
        r.status = -1;
    } else {
        r.status = *st;
    }
    r.out = slurp(out_t);
    r.err = slurp(err_t);
    ::unlink(out_t);
    ::unlink(err_t);
    return r;
}

Result sh(const std::string& cmdline, std::chrono::seconds timeout) {
    return run({"/bin/sh", "-c", cmdline}, timeout);
}

void write_file(const std::string& path, const std::string& data) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f.write(data.data(), static_cast<std::streamsize>(data.size()));
    REQUIRE(f.good());
}

std::string read_file(const std::string& path) {
    return slurp(path);
}

std::string sha256_of(const std::string& path) {
    auto r = run({"sha256sum", path});
    REQUIRE(r.status == 0);
    return r.out.substr(0, 64);
}

void touch(const std::string& path) {
    write_file(path, "");
}

HttpServer::HttpServer(const std::string& root, const std::string& tls_cert,
                       const std::string& tls_key) {
    if (!tls_cert.empty()) scheme_ = "https";
    std::string port_file = root + "/.port";
    ::unlink(port_file.c_str());
    pid_ = ::fork();
    if (pid_ == 0) {
        int devnull = ::open("/dev/null", O_RDWR);
        ::dup2(devnull, 0);
        ::dup2(devnull, 1);
        std::string log = root + "/.httpd.log";
        int logfd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
        ::dup2(logfd, 2);
        if (tls_cert.empty())
            ::execlp("python3", "python3", IMAGEFS_HTTPD, "--root", root.c_str(), "--port-file",
                     port_file.c_str(), nullptr);
        else
            ::execlp("python3", "python3", IMAGEFS_HTTPD, "--root", root.c_str(), "--port-file",
                     port_file.c_str(), "--tls-cert", tls_cert.c_str(), "--tls-key",
                     tls_key.c_str(), nullptr);
        ::_exit(127);
    }
    auto end = std::chrono::steady_clock::now() + 15s;
    while (std::chrono::steady_clock::now() < end) {
        std::string p = slurp(port_file);
        if (!p.empty() && p.back() == '\n') {
            port_ = std::stoi(p);
            return;
        }
        std::this_thread::sleep_for(20ms);
    }
    FAIL("tests/httpd.py did not start");
}

HttpServer::~HttpServer() {
    if (pid_ > 0) {
        ::kill(pid_, SIGTERM);
        if (!wait_pid(pid_, 5s)) {
            ::kill(pid_, SIGKILL);
            wait_pid(pid_, 5s);
        }
    }
}

std::string HttpServer::url(const std::string& path_and_query) const {
    return scheme_ + "://127.0.0.1:" + std::to_string(port_) + "/" + path_and_query;
}

bool is_mounted(const std::string& mnt) {
    std::ifstream f("/proc/self/mountinfo");
    std::string line;
    while (std::getline(f, line)) {
        std::istringstream ss(line);
        std::string id, parent, dev, root, point;
        ss >> id >> parent >> dev >> root >> point;
        if (point == mnt) return true;
    }
    return false;
}

Mount::Mount(std::string state, std::string mnt, std::string opts)
    : state_(std::move(state)), mnt_(std::move(mnt)), log_(state_ + ".daemon.log") {
    ::mkdir(mnt_.c_str(), 0755);
    pid_ = ::fork();
    if (pid_ == 0) {
        int devnull = ::open("/dev/null", O_RDWR);
        ::dup2(devnull, 0);
        ::dup2(devnull, 1);
        int logfd = ::open(log_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
        ::dup2(logfd, 2);
        std::vector<std::string> args = {IMAGEFSD, "-f", "-o", "log_level=debug"};
        if (!opts.empty()) {
            args.push_back("-o");
            args.push_back(opts);
        }
        args.push_back(state_);
        args.push_back(mnt_);
        std::vector<char*> av;
        for (auto& a : args) av.push_back(a.data());
        av.push_back(nullptr);
        ::execv(av[0], av.data());
        ::_exit(127);
    }
    auto end = std::chrono::steady_clock::now() + 15s;
    while (std::chrono::steady_clock::now() < end) {
        if (is_mounted(mnt_)) {
            struct stat st {};
            if (::stat(mnt_.c_str(), &st) == 0) return;
        }
        if (auto st = wait_pid(pid_, 0ms)) {
            pid_ = -1;
            FAIL("imagefsd exited with " << *st << " before mounting:\n" << log());
        }
        std::this_thread::sleep_for(20ms);
    }
    FAIL("imagefsd did not mount " << mnt_ << " within 15 s:\n" << log());
}

std::string Mount::log() const {
    return slurp(log_);
}

void Mount::kill9() {
    REQUIRE(pid_ > 0);
    ::kill(pid_, SIGKILL);
    wait_pid(pid_, 10s);
    pid_ = -1;
}

void Mount::unmount() {
    if (pid_ <= 0) {
        if (is_mounted(mnt_)) run({"umount", "-l", mnt_});
        return;
    }
    Result r;
    for (int i = 0; i < 50; ++i) {
        r = run({"fusermount3", "-u", mnt_});
        if (r.status == 0) break;
        std::this_thread::sleep_for(100ms);
    }
    auto st = wait_pid(pid_, 15s);
    pid_ = -1;
    if (!st) {
        run({"umount", "-l", mnt_});
        FAIL("imagefsd did not exit within 15 s of unmounting\n" << log());
    }
    CHECK(r.status == 0);
    INFO("imagefsd's log (a sanitizer's report ends up here too):\n" << log());
    CHECK(*st == 0);
}

Mount::~Mount() {
    if (pid_ > 0) {
        // Destructors cannot REQUIRE safely during unwinding; do the best we can.
        if (std::uncaught_exceptions()) {
            ::kill(pid_, SIGKILL);
            wait_pid(pid_, 10s);
            run({"umount", "-l", mnt_});
            return;
        }
        unmount();
    } else if (is_mounted(mnt_)) {
        // After kill9() the mount may already belong to a new daemon: only a dead one is ours.
        struct stat st {};
        if (::stat(mnt_.c_str(), &st) != 0 && errno == ENOTCONN) run({"umount", "-l", mnt_});
    }
}

Result cli(const std::string& state, const std::vector<std::string>& args,
           std::chrono::seconds timeout) {
    std::vector<std::string> argv = {IMAGEFS_CLI, "--state", state};
    argv.insert(argv.end(), args.begin(), args.end());
    return run(argv, timeout);
}

std::string state_of(const std::string& state_dir, const std::string& name) {
    auto r = cli(state_dir, {"status", name, "--json"});
    if (r.status != 0) return "";
    auto pos = r.out.find("\"state\": \"");
    if (pos == std::string::npos) return "";
    pos += 10;
    return r.out.substr(pos, r.out.find('"', pos) - pos);
}

bool wait_state(const std::string& state_dir, const std::string& name, const std::string& state,
                std::chrono::milliseconds timeout) {
    auto end = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < end) {
        if (state_of(state_dir, name) == state) return true;
        std::this_thread::sleep_for(50ms);
    }
    return false;
}

OpenerChild::OpenerChild(const std::string& path, int flags, std::function<void()> setup) {
    int fds[2];
    REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);
    pid_ = ::fork();
    if (pid_ == 0) {
        ::close(fds[0]);
        // Drop every descriptor inherited from the test (it may be writing the very file).
        if (fds[1] > 3) ::close_range(3, unsigned(fds[1]) - 1, 0);
        ::close_range(unsigned(fds[1]) + 1, ~0U, 0);
        ::signal(SIGINT, SIG_DFL);
        ::signal(SIGQUIT, SIG_DFL);
        ::signal(SIGTERM, SIG_DFL);
        sigset_t none;
        sigemptyset(&none);
        ::sigprocmask(SIG_SETMASK, &none, nullptr);
        if (setup) setup();
        int fd = ::open(path.c_str(), flags);
        if (fd < 0) ::_exit(100 + errno);
        struct stat st {};
        ::fstat(fd, &st);
        int64_t size = st.st_size;
        [[maybe_unused]] auto n = ::write(fds[1], &size, sizeof size);
        ::_exit(0);
    }
    ::close(fds[1]);
    pipe_ = fds[0];
}

OpenerChild::~OpenerChild() {
    if (pid_ > 0) {
        ::kill(pid_, SIGKILL);
        wait_pid(pid_, 10s);
    }
    if (pipe_ >= 0) ::close(pipe_);
}

void OpenerChild::signal(int sig) {
    ::kill(pid_, sig);
}

std::optional<int> OpenerChild::wait(std::chrono::milliseconds timeout) {
    auto st = wait_pid(pid_, timeout);
    if (st) {
        pid_ = -1;
        int64_t size = -1;
        if (::read(pipe_, &size, sizeof size) == sizeof size) size_seen_ = size;
    }
    return st;
}

bool OpenerChild::blocked_in_open(std::chrono::milliseconds timeout) {
    auto end = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < end) {
        std::string wchan = slurp("/proc/" + std::to_string(pid_) + "/wchan");
        if (wchan.find("request_wait_answer") != std::string::npos ||
            wchan.find("fuse") != std::string::npos)
            return true;
        std::this_thread::sleep_for(20ms);
    }
    return false;
}

std::string di_kernel() {
    return "/usr/lib/debian-installer/images/12/amd64/text/debian-installer/amd64/linux";
}

std::string di_initrd() {
    return "/usr/lib/debian-installer/images/12/amd64/text/debian-installer/amd64/initrd.gz";
}

}  // namespace itest
