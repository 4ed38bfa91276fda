// Images written into the mount with the real cp, rsync, dd and qemu-img.
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <memory>
#include <nlohmann/json.hpp>
#include <thread>

#include "support.hpp"

using namespace itest;

namespace {

struct WEnv {
    TempDir t;
    std::string state = t / "state";
    std::string mnt = t / "mnt";
    std::unique_ptr<Mount> mount = std::make_unique<Mount>(state, mnt);
    std::string path(const std::string& n) const { return mnt + "/" + n; }
};

std::string xattr(const std::string& path, const std::string& name) {
    char buf[256] = {};
    ssize_t n = ::getxattr(path.c_str(), name.c_str(), buf, sizeof buf);
    return n >= 0 ? std::string(buf, size_t(n)) : "";
}

int open_errno(const std::string& path, int flags) {
    int fd = ::open(path.c_str(), flags, 0644);
    if (fd >= 0) {
        ::close(fd);
        return 0;
    }
    return errno;
}

std::string listing(const std::string& dir) {
    return run({"ls", "-A", dir}).out;
}

std::string read_fd(int fd) {
    std::string out;
    char buf[1 << 16];
    ssize_t n;
    int64_t off = 0;
    while ((n = ::pread(fd, buf, sizeof buf, off)) > 0) {
        out.append(buf, size_t(n));
        off += n;
    }
    return out;
}

}  // namespace

TEST_CASE("cp into the mount creates an image that becomes active on close", "[write]") {
    WEnv env;
    auto r = run({"cp", di_kernel(), env.path("linux")});
    INFO(r.err);
    REQUIRE(r.status == 0);
    REQUIRE(wait_state(env.state, "linux", "active"));
    CHECK(sha256_of(env.path("linux")) == sha256_of(di_kernel()));
    auto st = cli(env.state, {"status", "linux", "--json"});
    CHECK(st.out.find("\"source_kind\": \"upload\"") != std::string::npos);
    CHECK(st.out.find("\"sha256\": \"" + sha256_of(di_kernel()) + "\"") != std::string::npos);
    CHECK(xattr(env.path("linux"), "user.imagefs.state") == "active");
    CHECK(listing(env.state + "/staging").empty());
}

TEST_CASE("while a file is written, other opens wait for it like for an import", "[write]") {
    WEnv env;
    int fd = ::open(env.path("disk.raw").c_str(), O_WRONLY | O_CREAT | O_EXCL, 0644);
    REQUIRE(fd >= 0);
    std::string block(1 << 20, 'x');
    REQUIRE(::write(fd, block.data(), block.size()) == ssize_t(block.size()));
    CHECK(xattr(env.path("disk.raw"), "user.imagefs.state") == "importing");
    OpenerChild nonblocking(env.path("disk.raw"), O_RDONLY | O_NONBLOCK);
    CHECK(nonblocking.wait(5s) == std::optional<int>(100 + EAGAIN));
    // The writer itself may read what it wrote (qemu-img does).
    CHECK(open_errno(env.path("disk.raw"), O_RDONLY) == 0);
    struct stat st {};
    REQUIRE(::stat(env.path("disk.raw").c_str(), &st) == 0);
    CHECK(st.st_size == (1 << 20));  // what was written so far
    // The catalog follows the upload too (imagefs status and list), as for an import.
    auto status = nlohmann::json::parse(cli(env.state, {"status", "disk.raw", "--json"}).out);
    CHECK(status["bytes_imported"].get<int64_t>() > 0);
    CHECK(status["bytes_imported"].get<int64_t>() <= (1 << 20));
    CHECK(cli(env.state, {"status", "disk.raw"}).out.find("retries") == std::string::npos);

    OpenerChild reader(env.path("disk.raw"), O_RDONLY);
    REQUIRE(reader.blocked_in_open());
    REQUIRE(::write(fd, block.data(), block.size()) == ssize_t(block.size()));
    REQUIRE(::close(fd) == 0);
    auto s = reader.wait(30s);
    REQUIRE(s.has_value());
    CHECK(*s == 0);
    CHECK(reader.size_seen() == 2 << 20);
}

TEST_CASE("a writer killed halfway leaves a failed image that is never served", "[write]") {
    WEnv env;
    // dd writes slowly from a pipe; SIGKILL it mid-way.
    pid_t pid = ::fork();
    if (pid == 0) {
        ::setpgid(0, 0);  // its own process group, so that the whole pipeline can be killed
        ::execlp("sh", "sh", "-c",
                 ("(head -c 3000000 /dev/urandom; sleep 30) | dd of='" + env.path("half.img") +
                  "' bs=64k iflag=fullblock status=none")
                     .c_str(),
                 nullptr);
        ::_exit(127);
    }
    REQUIRE(wait_state(env.state, "half.img", "importing"));
    for (int i = 0; i < 100; ++i) {
        struct stat st {};
        if (::stat(env.path("half.img").c_str(), &st) == 0 && st.st_size >= 2000000) break;
        std::this_thread::sleep_for(50ms);
    }
    run({"pkill", "-KILL", "-f", "dd of=" + env.path("half.img")});
    ::kill(-pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
    REQUIRE(wait_state(env.state, "half.img", "failed"));
    auto st = cli(env.state, {"status", "half.img"});
    CHECK(st.out.find("killed by signal 9") != std::string::npos);
    CHECK(open_errno(env.path("half.img"), O_RDONLY) == EIO);
    CHECK(listing(env.state + "/images").empty());
    CHECK(listing(env.state + "/staging").empty());
    // rm cleans it up.
    CHECK(::unlink(env.path("half.img").c_str()) == 0);
    CHECK(state_of(env.state, "half.img").empty());
}

TEST_CASE("active images are immutable and cp --remove-destination replaces them", "[write]") {
    WEnv env;
    REQUIRE(run({"cp", di_kernel(), env.path("img")}).status == 0);
    REQUIRE(wait_state(env.state, "img", "active"));
    // EROFS, not EPERM: libvirt opens every image O_RDWR to lock it and accepts only EROFS.
    CHECK(open_errno(env.path("img"), O_WRONLY) == EROFS);
    CHECK(open_errno(env.path("img"), O_RDWR) == EROFS);
    CHECK(::truncate(env.path("img").c_str(), 0) == -1);
    CHECK(errno == EPERM);
    auto r = run({"cp", di_initrd(), env.path("img")});
    CHECK(r.status != 0);
    CHECK(r.err.find("Read-only file system") != std::string::npos);
    CHECK(sha256_of(env.path("img")) == sha256_of(di_kernel()));
    r = run({"cp", "--remove-destination", di_initrd(), env.path("img")});
    CHECK(r.status == 0);
    REQUIRE(wait_state(env.state, "img", "active"));
    CHECK(sha256_of(env.path("img")) == sha256_of(di_initrd()));
}

TEST_CASE("rsync -a in twice: temporary names vanish and the second run transfers nothing",
          "[write][rsync]") {
    WEnv env;
    TempDir src;
    REQUIRE(run({"cp", di_kernel(), src / "linux"}).status == 0);
    write_file(src / "empty.img", "");
    ::chmod((src / "linux").c_str(), 0640);
    auto r = run({"rsync", "-a", "--stats", src.path() + "/", env.mnt + "/"});
    INFO(r.out << r.err);
    REQUIRE(r.status == 0);
    REQUIRE(wait_state(env.state, "linux", "active"));
    REQUIRE(wait_state(env.state, "empty.img", "active"));
    CHECK(listing(env.mnt) == "empty.img\nlinux\n");  // no .linux.XXXXXX left
    auto l = cli(env.state, {"list"});
    CHECK(l.out.find(".linux.") == std::string::npos);
    CHECK(sha256_of(env.path("linux")) == sha256_of(di_kernel()));
    struct stat a {
    }, b{};
    REQUIRE(::stat((src / "linux").c_str(), &a) == 0);
    REQUIRE(::stat(env.path("linux").c_str(), &b) == 0);
    CHECK((b.st_mode & 07777) == 0640);
    CHECK(b.st_mtim.tv_sec == a.st_mtim.tv_sec);
    REQUIRE(::stat(env.path("empty.img").c_str(), &b) == 0);
    CHECK(b.st_size == 0);

    r = run({"rsync", "-a", "--stats", src.path() + "/", env.mnt + "/"});
    REQUIRE(r.status == 0);
    CHECK(r.out.find("Number of regular files transferred: 0") != std::string::npos);

    // Over an existing name: a changed source replaces the image.
    REQUIRE(run({"cp", di_initrd(), src / "linux"}).status == 0);
    r = run({"rsync", "-a", src.path() + "/", env.mnt + "/"});
    REQUIRE(r.status == 0);
    REQUIRE(wait_state(env.state, "linux", "active"));
    CHECK(sha256_of(env.path("linux")) == sha256_of(di_initrd()));
    CHECK(listing(env.mnt) == "empty.img\nlinux\n");
}

TEST_CASE("rsync -aX carries user xattrs", "[write][rsync]") {
    WEnv env;
    TempDir src;
    REQUIRE(run({"cp", di_kernel(), src / "linux"}).status == 0);
    REQUIRE(::setxattr((src / "linux").c_str(), "user.origin", "debian", 6, 0) == 0);
    auto r = run({"rsync", "-aX", src.path() + "/", env.mnt + "/"});
    INFO(r.err);
    CHECK(r.status == 0);
    REQUIRE(wait_state(env.state, "linux", "active"));
    CHECK(xattr(env.path("linux"), "user.origin") == "debian");
    CHECK(xattr(env.path("linux"), "user.imagefs.state") == "active");
    r = run({"rsync", "-aX", src.path() + "/", env.mnt + "/"});
    CHECK(r.status == 0);
    CHECK(r.err.empty());
    CHECK(xattr(env.path("linux"), "user.origin") == "debian");
}

TEST_CASE("rename replaces atomically and readers of the old image keep their bytes", "[write]") {
    WEnv env;
    REQUIRE(run({"cp", di_kernel(), env.path("a")}).status == 0);
    REQUIRE(run({"cp", di_initrd(), env.path("b")}).status == 0);
    REQUIRE(wait_state(env.state, "a", "active"));
    REQUIRE(wait_state(env.state, "b", "active"));
    int fd = ::open(env.path("b").c_str(), O_RDONLY);
    REQUIRE(fd >= 0);
    REQUIRE(::rename(env.path("a").c_str(), env.path("b").c_str()) == 0);
    CHECK(listing(env.mnt) == "b\n");
    CHECK(sha256_of(env.path("b")) == sha256_of(di_kernel()));
    CHECK(read_fd(fd) == read_file(di_initrd()));
    CHECK(state_of(env.state, "a").empty());
    CHECK(state_of(env.state, "b") == "active");
    // The replaced image's space is freed at the last close.
    CHECK(listing(env.state + "/images").find('\n') == listing(env.state + "/images").rfind('\n'));
    ::close(fd);
    auto mv = run({"mv", env.path("b"), env.path("c")});
    CHECK(mv.status == 0);
    CHECK(listing(env.mnt) == "c\n");
    CHECK(sha256_of(env.path("c")) == sha256_of(di_kernel()));
}

TEST_CASE("an image removed while it is read keeps serving its reader", "[write]") {
    WEnv env;
    REQUIRE(run({"cp", di_initrd(), env.path("img")}).status == 0);
    REQUIRE(wait_state(env.state, "img", "active"));
    int fd = ::open(env.path("img").c_str(), O_RDONLY);
    REQUIRE(fd >= 0);
    char first[4096];
    REQUIRE(::read(fd, first, sizeof first) == ssize_t(sizeof first));
    REQUIRE(run({"rm", env.path("img")}).status == 0);
    CHECK(listing(env.mnt).empty());
    CHECK(state_of(env.state, "img").empty());
    struct stat st {};
    CHECK(::fstat(fd, &st) == 0);
    CHECK(read_fd(fd) == read_file(di_initrd()));
    ::close(fd);
    CHECK(listing(env.state + "/images").empty());
}

TEST_CASE("removing an image that is being imported cancels it and waiters get ENOENT", "[write]") {
    TempDir t;
    std::string www = t / "www";
    ::mkdir(www.c_str(), 0755);
    REQUIRE(run({"cp", di_kernel(), www + "/linux"}).status == 0);
    HttpServer http(www);
    std::string state = t / "state", mnt = t / "mnt";
    Mount m(state, mnt);
    REQUIRE(cli(state, {"import", "linux", http.url("linux?gate=go")}).status == 0);
    REQUIRE(wait_state(state, "linux", "importing"));
    OpenerChild waiter(mnt + "/linux", O_RDONLY);
    REQUIRE(waiter.blocked_in_open());
    REQUIRE(::unlink((mnt + "/linux").c_str()) == 0);
    auto s = waiter.wait(10s);
    REQUIRE(s.has_value());
    CHECK(*s == 100 + ENOENT);
    touch(www + "/go");
    std::this_thread::sleep_for(1s);
    CHECK(state_of(state, "linux").empty());
    CHECK(run({"ls", "-A", state + "/images"}).out.empty());
    CHECK(run({"ls", "-A", state + "/staging"}).out.empty());
}

TEST_CASE("a sparse 5 GiB image with markers past 2^31 and 2^32 keeps its holes and du is right",
          "[write][large]") {
    WEnv env;
    TempDir src;
    std::string img = src / "big.raw";
    REQUIRE(run({"truncate", "-s", "5G", img}).status == 0);
    auto mark = [&](int64_t off, const std::string& text) {
        int fd = ::open(img.c_str(), O_WRONLY);
        REQUIRE(::pwrite(fd, text.data(), text.size(), off) == ssize_t(text.size()));
        ::close(fd);
    };
    const int64_t g2 = int64_t(1) << 31, g4 = int64_t(1) << 32;
    mark(0, "start");
    mark(g2 - 2, "AT2G");
    mark(g4 - 2, "AT4G");
    mark(5 * (int64_t(1) << 30) - 3, "end");
    std::string sum = sha256_of(img);

    REQUIRE(run({"cp", "--sparse=always", img, env.path("big.raw")}).status == 0);
    REQUIRE(wait_state(env.state, "big.raw", "active", 120s));
    struct stat st {};
    REQUIRE(::stat(env.path("big.raw").c_str(), &st) == 0);
    CHECK(st.st_size == 5 * (int64_t(1) << 30));
    CHECK(st.st_blocks * 512 < 1 << 20);  // stored sparse
    auto du = run({"du", "-k", env.path("big.raw")});
    CHECK(std::stoll(du.out) < 1024);
    int fd = ::open(env.path("big.raw").c_str(), O_RDONLY);
    REQUIRE(fd >= 0);
    char buf[4] = {};
    CHECK(::pread(fd, buf, 4, g2 - 2) == 4);
    CHECK(std::string(buf, 4) == "AT2G");
    CHECK(::pread(fd, buf, 4, g4 - 2) == 4);
    CHECK(std::string(buf, 4) == "AT4G");
    // SEEK_DATA / SEEK_HOLE work on the mount.
    CHECK(::lseek(fd, 4096, SEEK_DATA) >= g2 - 4096);
    CHECK(::lseek(fd, 0, SEEK_HOLE) < 1 << 20);
    ::close(fd);
    // cp --sparse=always out of the mount keeps it sparse, and the bytes are right.
    std::string out = src / "out.raw";
    REQUIRE(run({"cp", "--sparse=always", env.path("big.raw"), out}).status == 0);
    REQUIRE(::stat(out.c_str(), &st) == 0);
    CHECK(st.st_blocks * 512 < 1 << 20);
    CHECK(st.st_size == 5 * (int64_t(1) << 30));
    // The bytes: the daemon's own digest of what it serves equals the source's, and the copy's
    // markers are where they belong (hashing 5 GiB once more would only cost time).
    CHECK(xattr(env.path("big.raw"), "user.imagefs.sha256") == sum);
    int out_fd = ::open(out.c_str(), O_RDONLY);
    REQUIRE(out_fd >= 0);
    CHECK(::pread(out_fd, buf, 4, g4 - 2) == 4);
    CHECK(std::string(buf, 4) == "AT4G");
    ::close(out_fd);
    CHECK(cli(env.state, {"status", "big.raw", "--json"}).out.find("\"final_size\": 5368709120") !=
          std::string::npos);
}

TEST_CASE("qemu-img convert writes a qcow2 into the mount", "[write]") {
    WEnv env;
    auto r =
        run({"qemu-img", "convert", "-f", "raw", "-O", "qcow2", di_initrd(), env.path("d.qcow2")});
    INFO(r.err);
    REQUIRE(r.status == 0);
    REQUIRE(wait_state(env.state, "d.qcow2", "active"));
    CHECK(xattr(env.path("d.qcow2"), "user.imagefs.format") == "qcow2");
    CHECK(run({"qemu-img", "compare", di_initrd(), env.path("d.qcow2")}).status == 0);
}

TEST_CASE("user.imagefs.sha256 set on a file being written is verified on close", "[write]") {
    WEnv env;
    std::string good = sha256_of(di_kernel());
    for (const auto& [name, sum, expect] :
         {std::tuple{"ok", good, "active"}, std::tuple{"bad", std::string(64, '0'), "failed"}}) {
        int fd = ::open(env.path(name).c_str(), O_WRONLY | O_CREAT | O_EXCL, 0644);
        REQUIRE(fd >= 0);
        REQUIRE(::fsetxattr(fd, "user.imagefs.sha256", sum.data(), sum.size(), 0) == 0);
        std::string data = read_file(di_kernel());
        REQUIRE(::write(fd, data.data(), data.size()) == ssize_t(data.size()));
        ::close(fd);
        CHECK(wait_state(env.state, name, expect));
    }
    CHECK(cli(env.state, {"status", "bad"}).out.find("sha256 mismatch") != std::string::npos);
}

TEST_CASE("df on the mount reports the state directory's file system", "[write]") {
    WEnv env;
    struct statvfs a {
    }, b{};
    REQUIRE(::statvfs(env.state.c_str(), &a) == 0);
    REQUIRE(::statvfs(env.mnt.c_str(), &b) == 0);
    CHECK(a.f_blocks * a.f_frsize == b.f_blocks * b.f_frsize);
    CHECK(run({"df", env.mnt}).status == 0);
}

TEST_CASE("an upload interrupted by a daemon crash is failed at the next start",
          "[write][restart]") {
    WEnv env;
    int fd = ::open(env.path("partial").c_str(), O_WRONLY | O_CREAT, 0644);
    REQUIRE(fd >= 0);
    REQUIRE(::write(fd, "hello", 5) == 5);
    env.mount->kill9();
    ::close(fd);
    env.mount = std::make_unique<Mount>(env.state, env.mnt);
    CHECK(state_of(env.state, "partial") == "failed");
    CHECK(open_errno(env.path("partial"), O_RDONLY) == EIO);
    CHECK(listing(env.state + "/staging").empty());
}

TEST_CASE("files copied in while the CLI changes the catalog all become active", "[write][race]") {
    // The daemon removes files of rows that are gone whenever the catalog changes; a file that is
    // being written was created after that snapshot and must not count as gone.
    WEnv env;
    const std::string src = env.t / "small.img";
    REQUIRE(run({"sh", "-c", "head -c 200000 /dev/urandom > '" + src + "'"}).status == 0);
    const std::string sum = sha256_of(src);
    const std::string stop = env.t / "stop-churn";
    pid_t churn = ::fork();
    REQUIRE(churn >= 0);
    if (churn == 0) {
        for (int i = 0; i < 400 && ::access(stop.c_str(), F_OK) != 0; ++i) {
            std::string n = "poke" + std::to_string(i);
            cli(env.state, {"import", n, src});
            cli(env.state, {"rm", n});
        }
        ::_exit(0);
    }
    const int kFiles = 120;
    for (int i = 0; i < kFiles; ++i) {
        auto r = run({"cp", src, env.path("race" + std::to_string(i))});
        REQUIRE(r.status == 0);
    }
    write_file(stop, "");  // the churn stops between two commands (a kill would leak temp files)
    ::waitpid(churn, nullptr, 0);
    for (int i = 0; i < kFiles; ++i) {
        const std::string n = "race" + std::to_string(i);
        INFO(n << ": " << cli(env.state, {"status", n}).out);
        REQUIRE(wait_state(env.state, n, "active", 30s));
    }
    CHECK(sha256_of(env.path("race0")) == sum);
    CHECK(sha256_of(env.path("race" + std::to_string(kFiles - 1))) == sum);
}

TEST_CASE("a child that inherits the writer's descriptor and fails does not fail the upload",
          "[write]") {
    WEnv env;
    // The shell opens the file; cat and a failing command inherit it and close it as they exit.
    auto r = run({"sh", "-c",
                  "{ cat '" + di_kernel() + "'; sh -c 'exit 3'; ls /nonexistent; } > '" +
                      env.path("inherited") + "'; true"});
    CHECK(r.status == 0);
    REQUIRE(wait_state(env.state, "inherited", "active"));
    CHECK(sha256_of(env.path("inherited")) == sha256_of(di_kernel()));
}

TEST_CASE("verifying a huge sparse upload yields to rm and to a clean stop", "[write][sparse]") {
    WEnv env;
    // One byte, then a 1 TiB hole: written out of order, so the file is hashed again at the end,
    // which takes minutes.
    auto sparse = [&](const std::string& name) {
        const std::string py = "import os\nfd = os.open('" + env.path(name) +
                               "', os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')\n"
                               "os.ftruncate(fd, 1 << 40)\nos.close(fd)\n";
        REQUIRE(run({"python3", "-c", py}).status == 0);
        REQUIRE(wait_state(env.state, name, "verifying", 10s));
    };
    sparse("huge1");
    const auto t0 = std::chrono::steady_clock::now();
    REQUIRE(cli(env.state, {"rm", "huge1"}).status == 0);
    // The publisher is free again: the next copy is published within seconds, not minutes.
    REQUIRE(run({"cp", di_kernel(), env.path("after")}).status == 0);
    REQUIRE(wait_state(env.state, "after", "active", 20s));
    CHECK(std::chrono::steady_clock::now() - t0 < 20s);
    CHECK(run({"ls", "-A", env.state + "/staging"}).out.empty());

    sparse("huge2");
    // A clean stop (umount) ends the verification: the daemon exits within Mount's 15 s.
    env.mount->unmount();
    env.mount.reset();
    env.mount = std::make_unique<Mount>(env.state, env.mnt);
    CHECK(state_of(env.state, "huge2") == "failed");
    CHECK(cli(env.state, {"status", "huge2"}).out.find("copy it again") != std::string::npos);
    CHECK(state_of(env.state, "after") == "active");
}
