// Bad input through the real CLI and daemon: one clear line, non-zero exit, nothing else changed.
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <memory>

#include "support.hpp"

using namespace itest;

namespace {

size_t lines(const std::string& s) {
    size_t n = 0;
    for (char c : s) n += c == '\n';
    return n;
}

// A mounted state dir that already holds one active image ("keep"), to show it is never harmed.
struct Catalogued {
    TempDir t;
    std::string state = t / "state";
    std::string www = t / "www";
    std::unique_ptr<HttpServer> http;
    std::unique_ptr<Mount> mount;
    std::string keep_sha;

    Catalogued() {
        ::mkdir(www.c_str(), 0755);
        REQUIRE(run({"cp", di_kernel(), www + "/linux"}).status == 0);
        keep_sha = sha256_of(di_kernel());
        http = std::make_unique<HttpServer>(www);
        mount = std::make_unique<Mount>(state, t / "mnt");
        REQUIRE(cli(state, {"import", "keep", di_kernel(), "--wait"}).status == 0);
    }
    void check_keep_intact(size_t images = 1) {
        CHECK(state_of(state, "keep") == "active");
        CHECK(sha256_of(t / "mnt/keep") == keep_sha);
        auto l = cli(state, {"list"});
        CHECK(l.status == 0);
        CHECK(lines(l.out) == 1 + images);  // header + images
    }
};

}  // namespace

TEST_CASE("bad image names are refused with one line naming the problem", "[cli]") {
    Catalogued c;
    struct Case {
        std::string name, expect;
    };
    for (const auto& k :
         {Case{"", "the name is empty"}, Case{"a/b", "cannot contain '/'"}, Case{".", "reserved"},
          Case{"..", "reserved"}, Case{std::string(256, 'x'), "longer than the 255-byte limit"},
          Case{"keep", "already exists"}}) {
        auto r = cli(c.state, {"import", k.name, di_kernel()});
        INFO("name: " << k.name);
        CHECK(r.status == 1);
        CHECK(lines(r.err) == 1);
        CHECK(r.err.find(k.expect) != std::string::npos);
    }
    CHECK(cli(c.state, {"import", std::string(255, 'y'), di_kernel(), "--wait"}).status == 0);
    CHECK(cli(c.state, {"rm", std::string(255, 'y')}).status == 0);
    c.check_keep_intact();
}

TEST_CASE("usage errors exit 2 naming the problem and the help to read", "[cli]") {
    TempDir t;
    struct Case {
        std::vector<std::string> args;
        std::string expect, help;
    };
    for (const auto& k : {Case{{"import", "x"}, "SOURCE is required", "imagefs import --help"},
                          Case{{"list", "--bogus"}, "--bogus", "imagefs list --help"},
                          Case{{"bogus"}, "unknown command 'bogus'", "imagefs --help"},
                          Case{{}, "subcommand is required", "imagefs --help"},
                          Case{{"status"}, "NAME is required", "imagefs status --help"},
                          Case{{"import", "x", "y", "--size", "-5"}, "--size", "imagefs import"}}) {
        auto r = cli(t / "state", k.args);
        INFO(r.err);
        CHECK(r.status == 2);
        CHECK(lines(r.err) == 2);
        CHECK(r.err.rfind("imagefs: ", 0) == 0);
        CHECK(r.err.find(k.expect) != std::string::npos);
        CHECK(r.err.find("see '" + k.help) != std::string::npos);
    }
    // Nothing was created for a command that was never run.
    struct stat st {};
    CHECK(::stat((t / "state").c_str(), &st) != 0);
    // --help is not an error.
    auto h = cli(t / "state", {"import", "--help"});
    CHECK(h.status == 0);
    CHECK(h.out.find("--sha256") != std::string::npos);
}

TEST_CASE("sources that cannot be imported fail with the reason", "[cli]") {
    Catalogued c;
    struct Case {
        std::string source, expect;
    };
    for (const auto& k : {Case{c.http->url("linux?status=404"), "HTTP 404"},
                          Case{c.http->url("linux?status=500"), "HTTP 500"},
                          Case{c.http->url("missing-file"), "HTTP 404"},
                          Case{"http://127.0.0.1:1/nothing-listens-here", "127.0.0.1"}}) {
        INFO("source: " << k.source);
        // --retries 0: HTTP 500 and a refused connection would otherwise be retried.
        auto r = cli(c.state, {"import", "bad", k.source, "--wait", "--retries", "0"});
        CHECK(r.status == 1);
        CHECK(r.err.find("imagefs: import of 'bad' failed: ") != std::string::npos);
        CHECK(r.err.find(k.expect) != std::string::npos);
        CHECK(state_of(c.state, "bad") == "failed");
        CHECK(cli(c.state, {"rm", "bad"}).status == 0);
    }
    auto r = cli(c.state, {"import", "bad", "/no/such/file.img"});
    CHECK(r.status == 1);
    CHECK(lines(r.err) == 1);
    CHECK(r.err.find("/no/such/file.img does not exist") != std::string::npos);
    r = cli(c.state, {"import", "bad", "ftp://example.org/x.img"});
    CHECK(r.status == 1);
    CHECK(r.err.find("unsupported source") != std::string::npos);
    r = cli(c.state, {"import", "bad", di_kernel(), "--sha256", "xyz"});
    CHECK(r.status == 1);
    CHECK(r.err.find("invalid sha256 checksum") != std::string::npos);
    CHECK(state_of(c.state, "bad").empty());
    c.check_keep_intact();
}

TEST_CASE("retry imports a failed image again", "[cli]") {
    Catalogued c;
    // Fails once with HTTP 500 (not retried automatically: --retries 0), then the server serves
    // it normally.
    auto r = cli(c.state, {"import", "flaky", c.http->url("linux?status=500&once=flaked"), "--wait",
                           "--retries", "0"});
    CHECK(r.status == 1);
    CHECK(state_of(c.state, "flaky") == "failed");
    r = cli(c.state, {"retry", "keep"});
    CHECK(r.status == 1);
    CHECK(r.err.find("only failed images can be retried") != std::string::npos);
    r = cli(c.state, {"retry", "flaky", "--wait"});
    INFO(r.err);
    CHECK(r.status == 0);
    CHECK(sha256_of(c.t / "mnt/flaky") == c.keep_sha);
    c.check_keep_intact(2);
}

TEST_CASE("an unwritable state directory is reported", "[cli]") {
    TempDir t;
    std::string ro = t / "ro";
    ::mkdir(ro.c_str(), 0755);
    REQUIRE(::mount("tmpfs", ro.c_str(), "tmpfs", MS_RDONLY, nullptr) == 0);
    auto r = cli(ro, {"import", "x", di_kernel()});
    CHECK(r.status == 1);
    CHECK(lines(r.err) == 1);
    CHECK(r.err.find(ro) != std::string::npos);
    CHECK(r.err.find("not writable") != std::string::npos);
    const std::string mnt = t / "mnt";
    ::mkdir(mnt.c_str(), 0755);
    r = run({IMAGEFSD, "-f", ro, mnt});
    CHECK(r.status == 1);
    CHECK(r.err.find("not writable") != std::string::npos);
    ::umount(ro.c_str());
}

TEST_CASE("a corrupt catalog is refused and left untouched", "[cli]") {
    TempDir t;
    std::string state = t / "state";
    REQUIRE(cli(state, {"import", "x", di_kernel()}).status == 0);
    std::string junk(8192, '\0');
    for (size_t i = 0; i < junk.size(); ++i) junk[i] = char(i * 7 + 3);
    ::unlink((state + "/catalog.db-wal").c_str());
    ::unlink((state + "/catalog.db-shm").c_str());
    write_file(state + "/catalog.db", junk);
    std::string before = sha256_of(state + "/catalog.db");

    auto r = cli(state, {"list"});
    CHECK(r.status == 1);
    CHECK(lines(r.err) == 1);
    CHECK(r.err.find("damaged") != std::string::npos);
    CHECK(r.err.find(state + "/catalog.db") != std::string::npos);
    std::string mnt = t / "mnt";
    ::mkdir(mnt.c_str(), 0755);
    r = run({IMAGEFSD, "-f", state, mnt}, 20s);
    CHECK(r.status == 1);
    CHECK(r.err.find("damaged") != std::string::npos);
    CHECK_FALSE(is_mounted(mnt));
    CHECK(sha256_of(state + "/catalog.db") == before);
}

TEST_CASE("without a daemon the CLI says so, and the daemon imports when it starts", "[cli]") {
    TempDir t;
    std::string state = t / "state";
    auto r = cli(state, {"import", "linux", di_kernel()});
    CHECK(r.status == 0);
    CHECK(r.err.find("no imagefsd is serving") != std::string::npos);
    CHECK(r.err.find("note: created the state directory " + state) != std::string::npos);
    CHECK(state_of(state, "linux") == "queued");
    // Only the import that created it says so.
    auto again = cli(state, {"import", "linux2", di_kernel()});
    CHECK(again.status == 0);
    CHECK(again.err.find("created the state directory") == std::string::npos);
    Mount m(state, t / "mnt");
    REQUIRE(wait_state(state, "linux", "active", 15s));
    CHECK(sha256_of(t / "mnt/linux") == sha256_of(di_kernel()));
    REQUIRE(wait_state(state, "linux2", "active", 15s));
}

TEST_CASE("a running daemon starts a queued import within a second", "[cli]") {
    TempDir t;
    std::string state = t / "state";
    Mount m(state, t / "mnt");
    auto t0 = std::chrono::steady_clock::now();
    REQUIRE(cli(state, {"import", "linux", di_kernel()}).status == 0);
    REQUIRE(wait_state(state, "linux", "active", 10s));
    CHECK(std::chrono::steady_clock::now() - t0 < 3s);  // far below the 30 s safety resync
}

TEST_CASE("real input: a qcow2 built from the installer served slowly over HTTP", "[real]") {
    TempDir t;
    std::string www = t / "www";
    ::mkdir(www.c_str(), 0755);
    REQUIRE(sh("cat '" + di_kernel() + "' '" + di_initrd() + "' > '" + t.path() + "/disk.raw'")
                .status == 0);
    REQUIRE(run({"qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", t / "disk.raw",
                 www + "/disk.qcow2"})
                .status == 0);
    REQUIRE(run({"qemu-img", "resize", "-q", www + "/disk.qcow2", "3G"}).status == 0);
    std::string sum = sha256_of(www + "/disk.qcow2");
    HttpServer http(www);
    std::string state = t / "state";
    Mount m(state, t / "mnt");
    REQUIRE(
        cli(state, {"import", "disk.qcow2", http.url("disk.qcow2?rate=33554432"), "--sha256", sum})
            .status == 0);
    // A blocking cp started while the import runs returns with the complete image.
    REQUIRE(wait_state(state, "disk.qcow2", "importing"));
    auto cp = run({"cp", t / "mnt/disk.qcow2", t / "copy.qcow2"});
    CHECK(cp.status == 0);
    CHECK(sha256_of(t / "copy.qcow2") == sum);
    auto info = run({"qemu-img", "info", "--output=json", t / "mnt/disk.qcow2"});
    CHECK(info.status == 0);
    CHECK(info.out.find("\"virtual-size\": 3221225472") != std::string::npos);
    CHECK(info.out.find("\"format\": \"qcow2\"") != std::string::npos);
    auto st = cli(state, {"status", "disk.qcow2", "--json"});
    CHECK(st.out.find("\"virtual_size\": 3221225472") != std::string::npos);
    CHECK(st.out.find("\"format\": \"qcow2\"") != std::string::npos);
    CHECK(run({"qemu-img", "check", t / "mnt/disk.qcow2"}).status == 0);
}
