// Imports over real, misbehaving HTTP(S) servers (tests/httpd.py on loopback) through the real
// daemon and mount: resume, retries, timeouts, servers as they are, space, checksums, limits.
// Every test checks the final state, the catalog fields and the sha256 of what a reader of the
// mount gets.
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <fstream>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "support.hpp"

using namespace itest;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

constexpr int64_t MiB = 1 << 20;
// Short waits between attempts, so that retries take a fraction of a second, not minutes. (The
// stall timeout stays long: tests that hold a response at a gate must not see it as a stall.)
const std::string kFast = "retry_delay=0.1,retry_max_delay=0.5";
const std::string kStall1 = kFast + ",stall_timeout=1";

std::string random_bytes(size_t n, uint64_t seed) {
    std::mt19937_64 gen(seed);
    std::string s(n, '\0');
    for (size_t i = 0; i < n; i += 8) {
        uint64_t v = gen();
        for (size_t j = 0; j < 8 && i + j < n; ++j) s[i + j] = static_cast<char>(v >> (8 * j));
    }
    return s;
}

bool eventually(const std::function<bool()>& pred, std::chrono::milliseconds timeout) {
    auto end = Clock::now() + timeout;
    while (Clock::now() < end) {
        if (pred()) return true;
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return pred();
}

int open_errno(const std::string& path, int flags) {
    int fd = ::open(path.c_str(), flags);
    if (fd >= 0) {
        ::close(fd);
        return 0;
    }
    return errno;
}

bool contains(const std::string& hay, const std::string& needle) {
    return hay.find(needle) != std::string::npos;
}

// A state dir, a mount (with short timeouts) and an HTTP server over `www`.
struct World {
    TempDir t;
    std::string state = t / "state";
    std::string mnt = t / "mnt";
    std::string www = t / "www";
    std::unique_ptr<HttpServer> http;
    std::unique_ptr<Mount> mount;

    bool tmpfs = false;

    // With `tmpfs_size` (such as "8m") the state dir is a tmpfs of that size.
    explicit World(const std::string& opts = kFast, const std::string& tmpfs_size = "") {
        ::mkdir(www.c_str(), 0755);
        if (!tmpfs_size.empty()) {
            ::mkdir(state.c_str(), 0755);
            REQUIRE(::mount("tmpfs", state.c_str(), "tmpfs", 0, ("size=" + tmpfs_size).c_str()) ==
                    0);
            tmpfs = true;
        }
        http = std::make_unique<HttpServer>(www);
        mount = std::make_unique<Mount>(state, mnt, opts);
    }
    ~World() {
        mount.reset();  // the daemon first, then its file system
        http.reset();
        if (tmpfs) ::umount2(state.c_str(), MNT_DETACH);
    }

    // Writes www/NAME (random bytes, or `data`); returns its sha256.
    std::string serve(const std::string& name, int64_t size, uint64_t seed = 1) {
        write_file(www + "/" + name, random_bytes(static_cast<size_t>(size), seed));
        return sha256_of(www + "/" + name);
    }
    // Replaces www/NAME atomically (a new inode and mtime, so the default ETag changes).
    std::string replace(const std::string& name, int64_t size, uint64_t seed) {
        write_file(www + "/.new", random_bytes(static_cast<size_t>(size), seed));
        REQUIRE(::rename((www + "/.new").c_str(), (www + "/" + name).c_str()) == 0);
        return sha256_of(www + "/" + name);
    }

    Result import(const std::string& name, const std::string& source,
                  std::vector<std::string> extra = {}) const {
        std::vector<std::string> args = {"import", name, source};
        args.insert(args.end(), extra.begin(), extra.end());
        return cli(state, args);
    }
    void import_ok(const std::string& name, const std::string& source,
                   std::vector<std::string> extra = {}) const {
        auto r = import(name, source, std::move(extra));
        INFO(r.err);
        REQUIRE(r.status == 0);
    }

    json status(const std::string& name) const {
        auto r = cli(state, {"status", name, "--json"});
        if (r.status != 0) return json();
        return json::parse(r.out);
    }
    std::string path(const std::string& name) const { return mnt + "/" + name; }

    // GET (or HEAD) requests the server received for /NAME.
    int requests(const std::string& name, const std::string& method = "GET") const {
        auto r = run({"curl", "-s", http->url("_count/" + name + "?method=" + method)});
        REQUIRE(r.status == 0);
        return std::stoi(r.out);
    }
    // The server's log lines about requests for /NAME.
    std::vector<std::string> log_lines(const std::string& name) const {
        std::ifstream f(www + "/.httpd.log");
        std::vector<std::string> out;
        std::string line;
        while (std::getline(f, line))
            if (contains(line, " /" + name + "?") || contains(line, " /" + name + " "))
                out.push_back(line);
        return out;
    }
    // The one log line of a request with that Range header (e.g. "bytes=1048576-"), or "".
    std::string line_with_range(const std::string& name, const std::string& range) const {
        for (const auto& l : log_lines(name))
            if (contains(l, "range='" + range + "'")) return l;
        return "";
    }
    std::vector<std::string> staging() const {
        auto r = run({"ls", "-A", state + "/staging"});
        std::vector<std::string> out;
        std::istringstream ss(r.out);
        for (std::string l; std::getline(ss, l);) out.push_back(l);
        return out;
    }
};

}  // namespace

// ---- resume --------------------------------------------------------------------------------

TEST_CASE("a dropped connection resumes with Range + If-Range and is byte-identical", "[resume]") {
    World w;
    std::string sum = w.serve("disk.img", 3 * MiB);
    w.import_ok("disk", w.http->url("disk.img?reset_after=1048576&once=cut"));
    REQUIRE(wait_state(w.state, "disk", "active", 20s));
    CHECK(sha256_of(w.path("disk")) == sum);
    auto s = w.status("disk");
    CHECK(s["attempts"] == 2);
    CHECK(s["final_size"] == 3 * MiB);
    CHECK(s["sha256"] == sum);
    CHECK(s["last_error"].is_null());
    CHECK(s["resume_offset"] == 0);
    CHECK(w.requests("disk.img") == 2);
    // The second request asked for the rest only, guarded by the first response's ETag.
    std::string resumed = w.line_with_range("disk.img", "bytes=1048576-");
    INFO(resumed);
    CHECK(contains(resumed, "if-range='\""));
    CHECK(contains(resumed, "-> 206 sent=2097152 (complete)"));
    CHECK(w.staging().empty());
}

TEST_CASE("a stall is a retryable failure: detected, retried and resumed, never a hang",
          "[resume][timeout]") {
    World w(kStall1);
    std::string sum = w.serve("disk.img", 3 * MiB);
    auto t0 = Clock::now();
    w.import_ok("disk", w.http->url("disk.img?stall_after=2097152&once=stalled"));
    REQUIRE(wait_state(w.state, "disk", "active", 20s));
    CHECK(Clock::now() - t0 < 8s);  // stall_timeout=1 (the server would hold it for 600 s)
    CHECK(sha256_of(w.path("disk")) == sum);
    CHECK(w.status("disk")["attempts"] == 2);
    CHECK(contains(w.line_with_range("disk.img", "bytes=2097152-"), "-> 206"));
    CHECK(contains(w.mount->log(), "stalled: no data for 1 s"));
}

TEST_CASE("a source that changed between attempts restarts from zero", "[resume]") {
    World w;
    w.serve("disk.img", 3 * MiB, 1);
    // The first response sends 1 MiB, waits at the gate, and is reset at 2 MiB.
    w.import_ok("disk", w.http->url("disk.img?gate=go&gate_after=1048576&reset_after=2097152"
                                    "&once=cut"));
    REQUIRE(eventually([&] { return w.status("disk")["resume_offset"] == MiB; }, 10s));
    std::string old_etag = w.status("disk")["etag"];
    std::string new_sum = w.replace("disk.img", 3 * MiB, 2);  // a new version, a new ETag
    touch(w.www + "/go");
    REQUIRE(wait_state(w.state, "disk", "active", 20s));
    CHECK(sha256_of(w.path("disk")) == new_sum);
    auto s = w.status("disk");
    CHECK(s["attempts"] == 2);
    CHECK(s["sha256"] == new_sum);
    CHECK(s["etag"] != old_etag);
    // The resume was asked for with the old validator and answered with the whole new file.
    std::string second = w.line_with_range("disk.img", "bytes=2097152-");
    INFO(second);
    CHECK(contains(second, "if-range='" + old_etag + "'"));
    CHECK(contains(second, "-> 200 sent=3145728 (complete)"));
}

TEST_CASE("a server that ignores ranges gets a restart from zero", "[resume]") {
    World w;
    std::string sum = w.serve("disk.img", 3 * MiB);
    w.import_ok("disk", w.http->url("disk.img?norange=1&reset_after=1048576&once=cut"));
    REQUIRE(wait_state(w.state, "disk", "active", 20s));
    CHECK(sha256_of(w.path("disk")) == sum);
    auto s = w.status("disk");
    CHECK(s["attempts"] == 2);
    CHECK(s["final_size"] == 3 * MiB);
    CHECK(contains(w.line_with_range("disk.img", "bytes=1048576-"), "-> 200 sent=3145728"));
}

TEST_CASE("Last-Modified guards a resume without ETag and no validator means no resume",
          "[resume]") {
    World w;
    std::string sum = w.serve("disk.img", 3 * MiB);
    w.import_ok("lm", w.http->url("disk.img?etag=none&reset_after=1048576&once=cut1"));
    w.import_ok("none", w.http->url("disk.img?etag=none&nolastmod=1&reset_after=1048576"
                                    "&once=cut2"));
    REQUIRE(wait_state(w.state, "lm", "active", 20s));
    REQUIRE(wait_state(w.state, "none", "active", 20s));
    CHECK(sha256_of(w.path("lm")) == sum);
    CHECK(sha256_of(w.path("none")) == sum);
    CHECK(w.status("lm")["attempts"] == 2);
    CHECK(w.status("none")["attempts"] == 2);
    CHECK(w.status("lm")["last_modified"].is_string());
    CHECK(w.status("none")["last_modified"].is_null());
    std::string lm_line = w.line_with_range("disk.img", "bytes=1048576-");
    INFO(lm_line);
    CHECK(contains(lm_line, "GMT'"));  // If-Range carries the date
    CHECK(contains(lm_line, "-> 206"));
    // Without a validator both requests asked for the whole file.
    int whole = 0;
    for (const auto& l : w.log_lines("disk.img"))
        if (contains(l, "nolastmod=1") && contains(l, "range=- ")) ++whole;
    CHECK(whole == 2);
}

TEST_CASE("mixed bytes from a server that kept its ETag never become active",
          "[resume][checksum]") {
    World w;
    std::string sum_a = w.serve("disk.img", 3 * MiB, 1);
    w.import_ok("disk",
                w.http->url("disk.img?etag=v1&gate=go&gate_after=1048576&reset_after=2097152"
                            "&once=cut"),
                {"--sha256", sum_a});
    REQUIRE(eventually([&] { return w.status("disk")["resume_offset"] == MiB; }, 10s));
    std::string sum_b = w.replace("disk.img", 3 * MiB, 2);  // same ETag "v1": the server lies
    touch(w.www + "/go");
    REQUIRE(wait_state(w.state, "disk", "failed", 20s));
    auto s = w.status("disk");
    // Attempt 2 resumed (2 MiB of A + 1 MiB of B): mismatch, so attempt 3 started from zero,
    // got all of B: mismatch again, and that is final.
    CHECK(s["attempts"] == 3);
    std::string err = s["last_error"];
    CHECK(contains(err, "sha256 mismatch: expected " + sum_a + ", got " + sum_b));
    CHECK(contains(w.line_with_range("disk.img", "bytes=2097152-"), "-> 206"));
    CHECK(w.requests("disk.img") == 3);
    CHECK(open_errno(w.path("disk"), O_RDONLY) == EIO);
    CHECK(w.staging().empty());
    CHECK(run({"ls", "-A", w.state + "/images"}).out.empty());
}

TEST_CASE("after kill -9 and a restart the import resumes from its checkpoint",
          "[resume][restart]") {
    World w;
    std::string sum = w.serve("disk.img", 3 * MiB);
    w.import_ok("disk", w.http->url("disk.img?gate=go&gate_after=1048576"));
    // Held at the gate: after a second without bytes the daemon checkpoints what it has.
    REQUIRE(eventually([&] { return w.status("disk")["resume_offset"] == MiB; }, 10s));
    w.mount->kill9();
    struct stat st {};
    auto id = w.staging();
    REQUIRE(id.size() == 1);
    REQUIRE(::stat((w.state + "/staging/" + id[0]).c_str(), &st) == 0);
    CHECK(st.st_size >= MiB);
    touch(w.www + "/go");
    // (The old Mount goes first: its destructor lazily unmounts whatever is mounted there.)
    w.mount.reset();
    w.mount = std::make_unique<Mount>(w.state, w.mnt, kFast);
    REQUIRE(wait_state(w.state, "disk", "active", 20s));
    CHECK(sha256_of(w.path("disk")) == sum);
    auto s = w.status("disk");
    CHECK(s["attempts"] == 2);
    CHECK(s["sha256"] == sum);
    std::string resumed = w.line_with_range("disk.img", "bytes=1048576-");
    INFO(resumed);
    CHECK(contains(resumed, "if-range="));
    CHECK(contains(resumed, "-> 206 sent=2097152 (complete)"));
    CHECK(contains(w.mount->log(), "kept 1048576 bytes from an earlier attempt"));
    CHECK(w.staging().empty());
}

TEST_CASE("a clean unmount mid-import keeps the bytes and the next start resumes",
          "[resume][restart]") {
    World w;
    std::string sum = w.serve("disk.img", 3 * MiB);
    w.import_ok("disk", w.http->url("disk.img?gate=go&gate_after=1048576"));
    REQUIRE(eventually([&] { return w.status("disk")["bytes_imported"] == MiB; }, 10s));
    w.mount->unmount();  // SIGTERM-like stop: the attempt is cancelled, not failed
    auto s = w.status("disk");
    CHECK(s["state"] == "importing");
    CHECK(s["resume_offset"] == MiB);
    REQUIRE(w.staging().size() == 1);
    touch(w.www + "/go");
    w.mount.reset();
    w.mount = std::make_unique<Mount>(w.state, w.mnt, kFast);
    REQUIRE(wait_state(w.state, "disk", "active", 20s));
    CHECK(sha256_of(w.path("disk")) == sum);
    CHECK(w.status("disk")["attempts"] == 2);
    CHECK(contains(w.line_with_range("disk.img", "bytes=1048576-"), "-> 206 sent=2097152"));
    CHECK(w.staging().empty());
}

// ---- retries -------------------------------------------------------------------------------

TEST_CASE("retries back off, give up at the limit with EIO, and imagefs retry starts again",
          "[retry]") {
    World w("stall_timeout=1,retry_delay=2,retry_max_delay=2");
    std::string sum = w.serve("disk.img", MiB);
    // Headers, then nothing until www/go exists: every attempt stalls.
    w.import_ok("disk", w.http->url("disk.img?gate=go&gate_after=0"), {"--retries", "2"});
    REQUIRE(wait_state(w.state, "disk", "importing"));
    OpenerChild opener(w.path("disk"), O_RDONLY);
    REQUIRE(opener.blocked_in_open());

    // Between attempts: queued, with the last error and when the next attempt is due.
    json waiting;
    REQUIRE(eventually(
        [&] {
            waiting = w.status("disk");
            return waiting["state"] == "queued" && waiting["next_attempt_at_ms"].is_number();
        },
        10s));
    CHECK(waiting["attempts"] == 1);
    CHECK(waiting["max_retries"] == 2);
    CHECK(contains(waiting["last_error"], "stalled: no data for 1 s"));
    int64_t due = waiting["next_attempt_at_ms"];
    int64_t updated = waiting["updated_at_ms"];
    CHECK(due - updated >= 950);  // retry_delay=2 s, jittered to 50-100%
    CHECK(due - updated <= 2000);
    auto human = cli(w.state, {"status", "disk"});
    CHECK(contains(human.out, "next attempt:"));
    CHECK(contains(human.out, "last error:"));
    CHECK(contains(human.out, "attempts:        1 (at most 3: 2 retries)"));
    CHECK_FALSE(opener.wait(0ms).has_value());  // still waiting: not failed yet

    REQUIRE(wait_state(w.state, "disk", "failed", 20s));
    auto status = opener.wait(10s);
    REQUIRE(status.has_value());
    CHECK(*status == 100 + EIO);
    auto s = w.status("disk");
    CHECK(s["attempts"] == 3);
    CHECK(s["next_attempt_at_ms"].is_null());
    CHECK(contains(s["last_error"], "gave up after 3 attempts"));
    CHECK(w.requests("disk.img") == 3);
    CHECK(open_errno(w.path("disk"), O_RDONLY) == EIO);

    touch(w.www + "/go");
    auto r = cli(w.state, {"retry", "disk", "--wait"});
    INFO(r.err);
    CHECK(r.status == 0);
    CHECK(sha256_of(w.path("disk")) == sum);
    CHECK(w.status("disk")["attempts"] == 1);
}

TEST_CASE("errors that retrying cannot fix fail at once", "[retry]") {
    World w;
    w.serve("disk.img", MiB);
    w.import_ok("missing", w.http->url("nothing-here.img"));
    w.import_ok("forbidden", w.http->url("disk.img?status=403"));
    REQUIRE(wait_state(w.state, "missing", "failed", 10s));
    REQUIRE(wait_state(w.state, "forbidden", "failed", 10s));
    CHECK(w.status("missing")["attempts"] == 1);
    CHECK(contains(w.status("missing")["last_error"], "HTTP 404"));
    CHECK(w.status("forbidden")["attempts"] == 1);
    CHECK(contains(w.status("forbidden")["last_error"], "HTTP 403"));
    // A 503 is retried (and then served normally).
    std::string sum = w.serve("ok.img", MiB, 3);
    w.import_ok("busy", w.http->url("ok.img?status=503&once=busy"));
    REQUIRE(wait_state(w.state, "busy", "active", 10s));
    CHECK(w.status("busy")["attempts"] == 2);
    CHECK(sha256_of(w.path("busy")) == sum);
}

// ---- timeouts ------------------------------------------------------------------------------

TEST_CASE("a server that never accepts the connection hits the connect timeout", "[timeout]") {
    World w("connect_timeout=1,retry_delay=0.1");
    // A listening socket whose accept queue is full: further SYNs are dropped.
    int lfd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(lfd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    REQUIRE(::listen(lfd, 0) == 0);
    socklen_t len = sizeof a;
    ::getsockname(lfd, reinterpret_cast<sockaddr*>(&a), &len);
    std::vector<int> fillers;
    for (int i = 0; i < 4; ++i) {
        int c = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        ::connect(c, reinterpret_cast<sockaddr*>(&a), sizeof a);
        fillers.push_back(c);
    }
    std::this_thread::sleep_for(200ms);
    std::string url = "http://127.0.0.1:" + std::to_string(ntohs(a.sin_port)) + "/disk.img";
    auto t0 = Clock::now();
    w.import_ok("disk", url, {"--retries", "1"});
    REQUIRE(wait_state(w.state, "disk", "failed", 15s));
    CHECK(Clock::now() - t0 < 6s);
    auto s = w.status("disk");
    CHECK(s["attempts"] == 2);
    CHECK(contains(s["last_error"], "could not connect within 1 s"));
    CHECK(open_errno(w.path("disk"), O_RDONLY) == EIO);
    for (int c : fillers) ::close(c);
    ::close(lfd);
}

// ---- servers as they are -------------------------------------------------------------------

TEST_CASE("chunked responses without Content-Length import and resume", "[servers]") {
    World w;
    std::string sum = w.serve("disk.img", 3 * MiB);
    w.import_ok("disk", w.http->url("disk.img?nolength=1&reset_after=1048576&once=cut"));
    REQUIRE(wait_state(w.state, "disk", "active", 20s));
    CHECK(sha256_of(w.path("disk")) == sum);
    auto s = w.status("disk");
    CHECK(s["attempts"] == 2);
    CHECK(s["final_size"] == 3 * MiB);
    CHECK(contains(w.line_with_range("disk.img", "bytes=1048576-"), "-> 206"));
}

TEST_CASE("servers that refuse HEAD are fine: imagefs never sends one", "[servers]") {
    World w;
    std::string sum = w.serve("disk.img", MiB);
    w.import_ok("disk", w.http->url("disk.img?nohead=1"));
    REQUIRE(wait_state(w.state, "disk", "active", 10s));
    CHECK(sha256_of(w.path("disk")) == sum);
    CHECK(w.requests("disk.img", "HEAD") == 0);
    CHECK(w.requests("disk.img") == 1);
    CHECK(w.status("disk")["attempts"] == 1);
}

TEST_CASE("redirects are followed, bounded, and the size comes from the final response",
          "[servers]") {
    World w;
    std::string sum = w.serve("disk.img", MiB + 123);
    w.import_ok("disk", w.http->url("disk.img?redirect=3&gate=go"));
    // While importing, the size shown is the final response's, not a redirect body's.
    REQUIRE(wait_state(w.state, "disk", "importing"));
    REQUIRE(eventually([&] { return w.status("disk")["expected_size"] == MiB + 123; }, 10s));
    struct stat st {};
    REQUIRE(::stat(w.path("disk").c_str(), &st) == 0);
    CHECK(st.st_size == MiB + 123);
    touch(w.www + "/go");
    REQUIRE(wait_state(w.state, "disk", "active", 10s));
    CHECK(sha256_of(w.path("disk")) == sum);
    CHECK(w.requests("disk.img") == 4);

    w.import_ok("loop", w.http->url("disk.img?redirect=11"));
    REQUIRE(wait_state(w.state, "loop", "failed", 10s));
    auto s = w.status("loop");
    CHECK(s["attempts"] == 1);  // not retryable
    CHECK(contains(s["last_error"], "more than 10 redirects"));
    CHECK(open_errno(w.path("loop"), O_RDONLY) == EIO);
}

TEST_CASE("a body shorter than its Content-Length is never active", "[servers]") {
    World w;
    std::string sum = w.serve("disk.img", 4 * MiB);
    // Always short: 1 MiB per response. Two attempts (the second resumes) and it gives up.
    w.import_ok("short", w.http->url("disk.img?short=1048576"), {"--retries", "1"});
    // Short once: the retry resumes and completes.
    w.import_ok("once", w.http->url("disk.img?short=1048576&once=short1"));
    REQUIRE(wait_state(w.state, "short", "failed", 15s));
    REQUIRE(wait_state(w.state, "once", "active", 15s));
    auto s = w.status("short");
    CHECK(s["attempts"] == 2);
    CHECK(contains(s["last_error"], "bytes remaining"));
    CHECK(contains(s["last_error"], "gave up after 2 attempts"));
    CHECK(s["final_size"].is_null());
    CHECK(s["sha256"].is_null());
    CHECK(open_errno(w.path("short"), O_RDONLY) == EIO);
    CHECK(sha256_of(w.path("once")) == sum);
    CHECK(w.status("once")["attempts"] == 2);
}

TEST_CASE("HTTPS: system CAs by default, --ca-file, and an explicit --insecure", "[servers][tls]") {
    World w(kFast);
    std::string sum = w.serve("disk.img", MiB);
    // A throwaway CA and a server certificate for 127.0.0.1, made for this test.
    std::string d = w.t.path();
    auto ok = sh("cd '" + d +
                 "' && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes "
                 "-keyout ca.key -out ca.pem -days 1 -subj /CN=imagefs-test-ca && "
                 "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes "
                 "-keyout srv.key -out srv.csr -subj /CN=127.0.0.1 && "
                 "printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\n' > ext && "
                 "openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial "
                 "-out srv.pem -days 1 -extfile ext && "
                 "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes "
                 "-keyout other.key -out other.pem -days 1 -subj /CN=other-ca");
    INFO(ok.err);
    REQUIRE(ok.status == 0);
    HttpServer https(w.www, d + "/srv.pem", d + "/srv.key");

    w.import_ok("untrusted", https.url("disk.img"));
    w.import_ok("wrong-ca", https.url("disk.img"), {"--ca-file", d + "/other.pem"});
    w.import_ok("ca", https.url("disk.img?redirect=1"), {"--ca-file", d + "/ca.pem"});
    auto r = w.import("insecure", https.url("disk.img"), {"--insecure"});
    CHECK(r.status == 0);
    CHECK(contains(r.err, "without checking the server's certificate"));
    for (const char* n : {"untrusted", "wrong-ca"}) {
        INFO(n);
        REQUIRE(wait_state(w.state, n, "failed", 10s));
        auto s = w.status(n);
        CHECK(s["attempts"] == 1);  // a refused certificate is not retried
        CHECK(
            contains(s["last_error"], "TLS certificate of " + https.url("disk.img") + " refused"));
        CHECK(contains(s["last_error"], "--ca-file"));
        CHECK(open_errno(w.path(n), O_RDONLY) == EIO);
    }
    for (const char* n : {"ca", "insecure"}) {
        INFO(n);
        bool active = wait_state(w.state, n, "active", 10s);
        INFO(w.status(n).dump() << "\n" << w.mount->log() << read_file(w.www + "/.httpd.log"));
        REQUIRE(active);
        CHECK(sha256_of(w.path(n)) == sum);
    }
    CHECK(w.status("ca")["tls_ca"] == true);
    CHECK(w.status("insecure")["tls_insecure"] == true);
    // The options make no sense for local files.
    auto bad = w.import("local", w.www + "/disk.img", {"--insecure"});
    CHECK(bad.status == 1);
    CHECK(contains(bad.err, "apply to http(s) sources only"));
}

// ---- space ---------------------------------------------------------------------------------

TEST_CASE("an image larger than the free space is refused before downloading", "[space]") {
    World w(kFast, "8m");
    w.serve("big.img", 16 * MiB);
    // Content-Length says 16 MiB: the attempt ends at the headers, nothing is written.
    w.import_ok("big", w.http->url("big.img"));
    REQUIRE(wait_state(w.state, "big", "failed", 10s));
    auto s = w.status("big");
    CHECK(s["attempts"] == 1);
    CHECK(contains(s["last_error"], "image needs 16777216 more bytes but " + w.state));
    CHECK(s["bytes_imported"] == 0);
    CHECK(w.staging().empty());
    CHECK(open_errno(w.path("big"), O_RDONLY) == EIO);
    // --size: the CLI refuses at once and queues nothing.
    auto r = w.import("sized", w.http->url("big.img?nolength=1"), {"--size", "16777216"});
    CHECK(r.status == 1);
    CHECK(contains(r.err, "image needs 16777216 bytes but " + w.state));
    CHECK(w.status("sized").is_null());
    CHECK(w.requests("big.img") == 1);
}

TEST_CASE("ENOSPC during an import fails it cleanly and harms nothing else", "[space]") {
    World w(kFast, "8m");
    std::string keep_sum = w.serve("keep.img", 256 * 1024, 5);
    w.import_ok("keep", w.http->url("keep.img"));
    REQUIRE(wait_state(w.state, "keep", "active", 10s));
    // No Content-Length, so no check before: the disk fills up half-way.
    w.serve("big.img", 16 * MiB);
    w.import_ok("big", w.http->url("big.img?nolength=1"));
    REQUIRE(wait_state(w.state, "big", "failed", 15s));
    auto s = w.status("big");
    CHECK(s["attempts"] == 1);  // needs a person: not retried
    CHECK(contains(s["last_error"], "no space left in " + w.state));
    CHECK(w.staging().empty());
    CHECK(open_errno(w.path("big"), O_RDONLY) == EIO);
    // The daemon is up, the other image intact, and new imports work.
    CHECK(::kill(w.mount->pid(), 0) == 0);
    CHECK(sha256_of(w.path("keep")) == keep_sum);
    std::string small_sum = w.serve("small.img", 512 * 1024, 6);
    w.import_ok("small", w.http->url("small.img"));
    REQUIRE(wait_state(w.state, "small", "active", 10s));
    CHECK(sha256_of(w.path("small")) == small_sum);
}

TEST_CASE("ENOSPC while cp writes into the mount fails cp and the image, and harms nothing else",
          "[space][write]") {
    World w(kFast, "8m");
    std::string keep_sum = w.serve("keep.img", 256 * 1024, 5);
    w.import_ok("keep", w.http->url("keep.img"));
    REQUIRE(wait_state(w.state, "keep", "active", 10s));
    std::string src = w.serve("big.img", 16 * MiB);
    // The writes are answered before the data reaches the disk; the error reaches cp at a later
    // write or at close, never silently.
    auto r = run({"cp", w.www + "/big.img", w.path("big")});
    CHECK(r.status != 0);
    CHECK(contains(r.err, "No space left on device"));
    REQUIRE(wait_state(w.state, "big", "failed", 15s));
    CHECK(contains(w.status("big")["last_error"], "no space left"));
    CHECK(w.staging().empty());
    CHECK(open_errno(w.path("big"), O_RDONLY) == EIO);
    CHECK(::kill(w.mount->pid(), 0) == 0);
    CHECK(sha256_of(w.path("keep")) == keep_sum);
    // Once the failed image is gone, a copy that fits works.
    REQUIRE(cli(w.state, {"rm", "big"}).status == 0);
    std::string small_sum = w.serve("small.img", 512 * 1024, 6);
    REQUIRE(run({"cp", w.www + "/small.img", w.path("small")}).status == 0);
    REQUIRE(wait_state(w.state, "small", "active", 10s));
    CHECK(sha256_of(w.path("small")) == small_sum);
}

// ---- checksums -----------------------------------------------------------------------------

TEST_CASE("sha512 is verified and a mismatch names both values and is never served", "[checksum]") {
    World w;
    w.serve("disk.img", MiB);
    auto r = run({"sha512sum", w.www + "/disk.img"});
    std::string sum512 = r.out.substr(0, 128);
    std::string sum256 = sha256_of(w.www + "/disk.img");
    const std::string wrong(128, 'b');
    w.import_ok("good", w.http->url("disk.img"), {"--sha512", sum512});
    w.import_ok("bad", w.http->url("disk.img?gate=go"), {"--sha512", wrong});
    REQUIRE(wait_state(w.state, "bad", "importing"));
    OpenerChild opener(w.path("bad"), O_RDONLY);
    REQUIRE(opener.blocked_in_open());
    touch(w.www + "/go");
    auto st = opener.wait(20s);
    REQUIRE(st.has_value());
    CHECK(*st == 100 + EIO);
    REQUIRE(wait_state(w.state, "good", "active", 10s));
    CHECK(sha256_of(w.path("good")) == sum256);
    CHECK(w.status("good")["sha512"] == sum512);
    auto s = w.status("bad");
    CHECK(s["state"] == "failed");
    CHECK(s["attempts"] == 1);
    CHECK(contains(s["last_error"], "sha512 mismatch: expected " + wrong + ", got " + sum512));
    CHECK(w.staging().empty());
}

// ---- limits and safety ---------------------------------------------------------------------

TEST_CASE("max_imports=1 runs one import at a time and the rest stay queued", "[limits]") {
    World w(kFast + ",max_imports=1");
    std::string sum = w.serve("disk.img", MiB);
    w.import_ok("a", w.http->url("disk.img?gate=go&_=a"));
    REQUIRE(wait_state(w.state, "a", "importing"));
    w.import_ok("b", w.http->url("disk.img?gate=go&_=b"));
    std::this_thread::sleep_for(1s);
    CHECK(w.status("a")["state"] == "importing");
    CHECK(w.status("b")["state"] == "queued");
    CHECK(w.status("b")["attempts"] == 0);
    touch(w.www + "/go");
    REQUIRE(wait_state(w.state, "a", "active", 10s));
    REQUIRE(wait_state(w.state, "b", "active", 10s));
    CHECK(sha256_of(w.path("a")) == sum);
    CHECK(sha256_of(w.path("b")) == sum);
}

TEST_CASE("STATE_DIR/sources.allow limits the hosts and networks imports may use", "[limits]") {
    World w;
    std::string sum = w.serve("disk.img", MiB);
    std::string port = std::to_string(w.http->port());
    std::string allow = w.state + "/sources.allow";
    // Redirect from "localhost" to 127.0.0.1: allowed by default (no file).
    std::string hop =
        "http://localhost:" + port + "/disk.img?redirect=1&redirect_host=127.0.0.1:" + port;
    w.import_ok("default", hop);
    REQUIRE(wait_state(w.state, "default", "active", 10s));
    CHECK(sha256_of(w.path("default")) == sum);

    // Only 10.0.0.0/8: the CLI refuses 127.0.0.1 and queues nothing (and nothing is sent).
    write_file(allow, "# test\n10.0.0.0/8\n");
    auto r = w.import("refused", w.http->url("disk.img"));
    CHECK(r.status == 1);
    CHECK(contains(r.err, "host '127.0.0.1' is not allowed by " + allow));
    CHECK(w.status("refused").is_null());

    // A network entry admits the address.
    write_file(allow, "127.0.0.0/8\n");
    w.import_ok("by-net", w.http->url("disk.img?_=net"));
    REQUIRE(wait_state(w.state, "by-net", "active", 10s));
    CHECK(sha256_of(w.path("by-net")) == sum);

    // A name entry admits that name only: the redirect to 127.0.0.1 is refused by the daemon
    // before it connects there.
    write_file(allow, "localhost\n");
    int before = w.requests("disk.img");
    w.import_ok("redirected", hop + "&_=x");
    REQUIRE(wait_state(w.state, "redirected", "failed", 10s));
    auto s = w.status("redirected");
    CHECK(s["attempts"] == 1);
    CHECK(contains(s["last_error"], "host 127.0.0.1 of http://127.0.0.1:" + port));
    CHECK(contains(s["last_error"], "is not allowed by " + allow));
    CHECK(w.requests("disk.img") == before + 1);  // the redirect only
    CHECK(open_errno(w.path("redirected"), O_RDONLY) == EIO);

    write_file(allow, "10.0.0.0/8\nbad/entry\n");
    r = w.import("broken", w.http->url("disk.img"));
    CHECK(r.status == 1);
    CHECK(contains(r.err, allow + " line 2: 'bad/entry'"));
}

// ---- progress ------------------------------------------------------------------------------

TEST_CASE("progress reaches the catalog while importing, at a bounded rate", "[progress]") {
    World w;
    std::string sum = w.serve("disk.img", 3 * MiB);
    w.import_ok("disk", w.http->url("disk.img?rate=1048576"));
    REQUIRE(wait_state(w.state, "disk", "importing"));
    std::set<int64_t> seen;
    auto t0 = Clock::now();
    for (;;) {
        auto s = w.status("disk");
        if (s["state"] != "importing") break;
        seen.insert(s["bytes_imported"].get<int64_t>());
        std::this_thread::sleep_for(20ms);
    }
    double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    REQUIRE(wait_state(w.state, "disk", "active", 10s));
    CHECK(sha256_of(w.path("disk")) == sum);
    INFO("distinct values " << seen.size() << " in " << secs << " s");
    CHECK(seen.size() >= 3);                       // it moves
    CHECK(double(seen.size()) <= secs / 0.5 + 2);  // at most every 0.5 s
}
