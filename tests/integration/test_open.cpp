// Gated open(): what user space sees through the real mount.
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <fstream>
#include <memory>
#include <thread>

#include "support.hpp"

using namespace itest;
using Clock = std::chrono::steady_clock;

namespace {

// A state dir, a mount and an HTTP server whose root holds a copy of the Debian installer kernel.
struct Env {
    TempDir t;
    std::string state = t / "state";
    std::string mnt = t / "mnt";
    std::string www = t / "www";
    std::unique_ptr<HttpServer> http;
    std::unique_ptr<Mount> mount;
    std::string kernel_sha;
    int64_t kernel_size = 0;

    explicit Env(const std::string& opts = "") {
        ::mkdir(www.c_str(), 0755);
        REQUIRE(run({"cp", di_kernel(), www + "/linux"}).status == 0);
        kernel_sha = sha256_of(www + "/linux");
        struct stat st {};
        ::stat((www + "/linux").c_str(), &st);
        kernel_size = st.st_size;
        http = std::make_unique<HttpServer>(www);
        mount = std::make_unique<Mount>(state, mnt, opts);
    }
    std::string gated_url() const { return http->url("linux?gate=go"); }
    void release() const { touch(www + "/go"); }
    std::string path(const std::string& name) const { return mnt + "/" + name; }
    void import(const std::string& name, const std::string& source,
                std::vector<std::string> extra = {}) const {
        std::vector<std::string> args = {"import", name, source};
        args.insert(args.end(), extra.begin(), extra.end());
        auto r = cli(state, args);
        INFO(r.err);
        REQUIRE(r.status == 0);
    }
    // Imports `name` from the gated URL and waits until the import is under way.
    void import_gated(const std::string& name, std::vector<std::string> extra = {}) const {
        import(name, gated_url(), std::move(extra));
        REQUIRE(wait_state(state, name, "importing"));
        // ... and the response headers (Content-Length) have arrived.
        for (int i = 0; i < 200; ++i) {
            if (::getxattr(path(name).c_str(), "user.imagefs.expected_size", nullptr, 0) > 0)
                return;
            std::this_thread::sleep_for(50ms);
        }
        FAIL("the import of " << name << " never learned its size");
    }
};

int open_errno(const std::string& path, int flags) {
    int fd = ::open(path.c_str(), flags);
    if (fd >= 0) {
        ::close(fd);
        return 0;
    }
    return errno;
}

double seconds_since(Clock::time_point t0) {
    return std::chrono::duration<double>(Clock::now() - t0).count();
}

}  // namespace

TEST_CASE("an active image reads back exactly the imported bytes", "[open]") {
    Env env;
    env.import("linux", di_kernel());
    REQUIRE(wait_state(env.state, "linux", "active"));
    CHECK(sha256_of(env.path("linux")) == env.kernel_sha);
    struct stat st {};
    REQUIRE(::stat(env.path("linux").c_str(), &st) == 0);
    CHECK(st.st_size == env.kernel_size);
    CHECK((st.st_mode & 0777) == 0444);
    char buf[64] = {};
    ssize_t n = ::getxattr(env.path("linux").c_str(), "user.imagefs.state", buf, sizeof buf);
    CHECK(std::string(buf, n > 0 ? size_t(n) : 0) == "active");
    n = ::getxattr(env.path("linux").c_str(), "user.imagefs.sha256", buf, sizeof buf);
    CHECK(std::string(buf, n > 0 ? size_t(n) : 0) == env.kernel_sha);
}

TEST_CASE("O_NONBLOCK open of an image being imported fails with EAGAIN at once", "[open]") {
    Env env;
    env.import_gated("linux");
    auto t0 = Clock::now();
    CHECK(open_errno(env.path("linux"), O_RDONLY | O_NONBLOCK) == EAGAIN);
    CHECK(seconds_since(t0) < 1.0);
    char buf[32] = {};
    ssize_t n = ::getxattr(env.path("linux").c_str(), "user.imagefs.state", buf, sizeof buf);
    CHECK(std::string(buf, n > 0 ? size_t(n) : 0) == "importing");
    env.release();
    REQUIRE(wait_state(env.state, "linux", "active"));
    CHECK(open_errno(env.path("linux"), O_RDONLY | O_NONBLOCK) == 0);
}

TEST_CASE("a blocking open waits for the import and then sees the final size", "[open]") {
    Env env;
    env.import_gated("linux");
    // While importing, stat answers at once with the expected size from Content-Length.
    struct stat st {};
    REQUIRE(::stat(env.path("linux").c_str(), &st) == 0);
    CHECK(st.st_size == env.kernel_size);

    OpenerChild child(env.path("linux"), O_RDONLY);
    REQUIRE(child.blocked_in_open());
    std::this_thread::sleep_for(300ms);
    CHECK_FALSE(child.wait(0ms).has_value());  // still waiting
    env.release();
    auto status = child.wait(30s);
    REQUIRE(status.has_value());
    CHECK(*status == 0);
    CHECK(child.size_seen() == env.kernel_size);
    CHECK(sha256_of(env.path("linux")) == env.kernel_sha);
}

TEST_CASE("a waiting open ends with EIO when the checksum does not match", "[open]") {
    Env env;
    const std::string wrong(64, 'a');
    env.import_gated("linux", {"--sha256", wrong});
    OpenerChild child(env.path("linux"), O_RDONLY);
    REQUIRE(child.blocked_in_open());
    env.release();
    auto status = child.wait(30s);
    REQUIRE(status.has_value());
    CHECK(*status == 100 + EIO);
    CHECK(state_of(env.state, "linux") == "failed");
    auto r = cli(env.state, {"status", "linux"});
    CHECK(r.out.find("sha256 mismatch") != std::string::npos);
    CHECK(r.out.find(wrong) != std::string::npos);
    CHECK(r.out.find(env.kernel_sha) != std::string::npos);
    // A failed image is not served: EIO at once, blocking or not.
    CHECK(open_errno(env.path("linux"), O_RDONLY) == EIO);
    CHECK(open_errno(env.path("linux"), O_RDONLY | O_NONBLOCK) == EIO);
    CHECK(run({"ls", "-A", env.state + "/images"}).out.empty());
}

TEST_CASE("removing an image ends its waiting opens with ENOENT", "[open]") {
    Env env;
    env.import_gated("linux");
    OpenerChild child(env.path("linux"), O_RDONLY);
    REQUIRE(child.blocked_in_open());
    REQUIRE(cli(env.state, {"rm", "linux"}).status == 0);
    auto status = child.wait(10s);
    REQUIRE(status.has_value());
    CHECK(*status == 100 + ENOENT);
    struct stat st {};
    CHECK(::stat(env.path("linux").c_str(), &st) == -1);
    CHECK(errno == ENOENT);
}

TEST_CASE("open=eagain makes blocking opens fail with EAGAIN", "[open]") {
    Env env("open=eagain");
    env.import_gated("linux");
    auto t0 = Clock::now();
    CHECK(open_errno(env.path("linux"), O_RDONLY) == EAGAIN);
    CHECK(seconds_since(t0) < 1.0);
    env.release();
    REQUIRE(wait_state(env.state, "linux", "active"));
    CHECK(open_errno(env.path("linux"), O_RDONLY) == 0);
}

TEST_CASE("open_timeout ends a wait with ETIMEDOUT", "[open]") {
    Env env("open_timeout=2");
    env.import_gated("linux");
    auto t0 = Clock::now();
    CHECK(open_errno(env.path("linux"), O_RDONLY) == ETIMEDOUT);
    double took = seconds_since(t0);
    CHECK(took >= 1.9);
    CHECK(took < 6.0);
}

TEST_CASE("200 waiting opens hold no worker thread", "[open]") {
    Env env;
    env.import("other", di_kernel());
    REQUIRE(wait_state(env.state, "other", "active"));
    env.import_gated("linux");
    std::vector<std::unique_ptr<OpenerChild>> waiters;
    for (int i = 0; i < 200; ++i)
        waiters.push_back(std::make_unique<OpenerChild>(env.path("linux"), O_RDONLY));
    for (auto& w : waiters) REQUIRE(w->blocked_in_open());

    auto t0 = Clock::now();
    auto ls = run({"ls", "-l", env.mnt}, 10s);
    CHECK(ls.status == 0);
    CHECK(ls.out.find("linux") != std::string::npos);
    struct stat st {};
    CHECK(::stat(env.path("linux").c_str(), &st) == 0);
    CHECK(sha256_of(env.path("other")) == env.kernel_sha);
    CHECK(seconds_since(t0) < 5.0);

    env.release();
    for (auto& w : waiters) {
        auto s = w->wait(30s);
        REQUIRE(s.has_value());
        CHECK(*s == 0);
    }
}

namespace {
volatile sig_atomic_t g_got = 0;
void note_signal(int sig) {
    g_got = sig;
}
void install(int sig, bool restart) {
    struct sigaction sa {};
    sa.sa_handler = note_signal;
    sa.sa_flags = restart ? SA_RESTART : 0;
    sigaction(sig, &sa, nullptr);
}
}  // namespace

TEST_CASE("signals that stop a process end its wait promptly", "[open][signals]") {
    Env env;
    env.import_gated("linux");

    SECTION("SIGINT with the default action") {
        OpenerChild child(env.path("linux"), O_RDONLY);
        REQUIRE(child.blocked_in_open());
        child.signal(SIGINT);
        auto s = child.wait(3s);
        REQUIRE(s.has_value());
        CHECK(*s == 128 + SIGINT);
    }
    SECTION("SIGKILL") {
        OpenerChild child(env.path("linux"), O_RDONLY);
        REQUIRE(child.blocked_in_open());
        child.signal(SIGKILL);
        auto s = child.wait(3s);
        REQUIRE(s.has_value());
        CHECK(*s == 128 + SIGKILL);
    }
    SECTION("SIGTERM caught by the program's own SA_RESTART handler: open fails with EINTR") {
        OpenerChild child(env.path("linux"), O_RDONLY, [] { install(SIGTERM, true); });
        REQUIRE(child.blocked_in_open());
        child.signal(SIGTERM);
        auto s = child.wait(3s);
        REQUIRE(s.has_value());
        CHECK(*s == 100 + EINTR);
    }
    SECTION("SIGINT caught by a handler after unrelated signals used up the interrupt") {
        OpenerChild child(env.path("linux"), O_RDONLY, [] {
            install(SIGALRM, true);
            install(SIGINT, true);
        });
        REQUIRE(child.blocked_in_open());
        child.signal(SIGALRM);
        std::this_thread::sleep_for(500ms);
        REQUIRE_FALSE(child.wait(0ms).has_value());
        auto t0 = Clock::now();
        child.signal(SIGINT);
        auto s = child.wait(3s);
        REQUIRE(s.has_value());
        CHECK(*s == 100 + EINTR);
        CHECK(seconds_since(t0) < 2.0);
    }
}

TEST_CASE("unrelated signals do not make a waiting open fail", "[open][signals]") {
    Env env;
    env.import_gated("linux");
    OpenerChild child(env.path("linux"), O_RDONLY, [] {
        install(SIGALRM, true);
        install(SIGCHLD, true);
        install(SIGWINCH, true);
        install(SIGURG, true);
    });
    REQUIRE(child.blocked_in_open());
    for (int sig : {SIGCHLD, SIGALRM, SIGWINCH, SIGURG}) {
        child.signal(sig);
        std::this_thread::sleep_for(200ms);
    }
    CHECK_FALSE(child.wait(500ms).has_value());
    env.release();
    auto s = child.wait(30s);
    REQUIRE(s.has_value());
    CHECK(*s == 0);
    CHECK(child.size_seen() == env.kernel_size);
}

TEST_CASE("a wait ends before the kernel's FUSE request timeout", "[open][timeout][serial]") {
    const std::string knob = "/proc/sys/fs/fuse/default_request_timeout";
    if (::access(knob.c_str(), W_OK) != 0) {
        WARN("this kernel has no FUSE request timeout; nothing to test");
        return;
    }
    std::string old = read_file(knob);
    struct Restore {
        std::string knob, value;
        ~Restore() { write_file(knob, value); }
    } restore{knob, old};
    write_file(knob, "15\n");  // applies to mounts made from now on
    Env env;
    env.import_gated("linux");
    auto t0 = Clock::now();
    CHECK(open_errno(env.path("linux"), O_RDONLY) == ETIMEDOUT);
    CHECK(seconds_since(t0) < 15.0);
    // The connection was not aborted: the mount still answers.
    struct stat st {};
    CHECK(::stat(env.path("linux").c_str(), &st) == 0);
    env.release();
    REQUIRE(wait_state(env.state, "linux", "active"));
    CHECK(sha256_of(env.path("linux")) == env.kernel_sha);
}

TEST_CASE("ro makes the mount read-only", "[open]") {
    Env env("ro");
    env.import("linux", di_kernel());
    REQUIRE(wait_state(env.state, "linux", "active"));
    CHECK(open_errno(env.path("linux"), O_WRONLY) == EROFS);
    CHECK(open_errno(env.path("new"), O_WRONLY | O_CREAT) == EROFS);
    CHECK(::unlink(env.path("linux").c_str()) == -1);
    CHECK(errno == EROFS);
    CHECK(sha256_of(env.path("linux")) == env.kernel_sha);
}

TEST_CASE("kill -9 of the daemon mid-import, then a restart, ends with the right bytes",
          "[restart]") {
    Env env;
    env.import_gated("linux");
    // Some bytes are in staging when the daemon dies.
    REQUIRE(wait_state(env.state, "linux", "importing"));
    env.mount->kill9();
    CHECK(state_of(env.state, "linux") == "importing");
    env.release();      // the next attempt is served in full
    env.mount.reset();  // first: its destructor lazily unmounts whatever is mounted there
    env.mount = std::make_unique<Mount>(env.state, env.mnt);
    REQUIRE(wait_state(env.state, "linux", "active"));
    CHECK(sha256_of(env.path("linux")) == env.kernel_sha);
    CHECK(run({"ls", "-A", env.state + "/staging"}).out.empty());
    auto r = cli(env.state, {"status", "linux", "--json"});
    CHECK(r.out.find("\"attempts\": 2") != std::string::npos);
}

TEST_CASE("a second daemon on the same state dir is refused", "[daemon]") {
    Env env;
    std::string other = env.t / "mnt2";
    ::mkdir(other.c_str(), 0755);
    auto r = run({IMAGEFSD, "-f", env.state, other}, 20s);
    CHECK(r.status == 1);
    CHECK(r.err.find("already served by imagefsd (pid " + std::to_string(env.mount->pid()) + ")") !=
          std::string::npos);
    CHECK_FALSE(is_mounted(other));
}

TEST_CASE("a mountpoint that would hide the state directory is refused", "[daemon]") {
    TempDir t;
    const std::string state = t / "state";
    REQUIRE(::mkdir(state.c_str(), 0755) == 0);
    for (const std::string& mnt : {state, t.path()}) {
        INFO(mnt);
        auto r = run({IMAGEFSD, "-f", state, mnt}, 20s);
        CHECK(r.status == 1);
        CHECK(r.err.find("mountpoint " + mnt + " would hide the state directory") !=
              std::string::npos);
        CHECK_FALSE(is_mounted(mnt));
    }
}

TEST_CASE("a source inside the daemon's own mount is refused instead of waiting on itself",
          "[daemon]") {
    Env env;
    env.import_gated("linux");
    REQUIRE(wait_state(env.state, "linux", "importing"));
    // Reading MNT/linux would wait for the daemon's own import, holding an import slot, and
    // would keep the daemon from stopping.
    REQUIRE(cli(env.state, {"import", "chain", env.path("linux"), "--retries", "0"}).status == 0);
    REQUIRE(wait_state(env.state, "chain", "failed", 10s));
    auto st = cli(env.state, {"status", "chain"});
    CHECK(st.out.find("is a file in this daemon's own mount") != std::string::npos);
    env.release();
    REQUIRE(wait_state(env.state, "linux", "active"));
    env.mount->unmount();  // stops cleanly (REQUIREd inside)
}
