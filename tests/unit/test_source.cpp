// import/source: source classification and local-file fetching.
#include <vector>

#include "import/source.hpp"
#include "support.hpp"

using Catch::Matchers::Contains;
using imagefs::Errc;
using imagefs::parse_source;
using imagefs::SourceKind;
using unit::error_from;

namespace {

class CollectSink : public imagefs::ByteSink {
  public:
    void begin(std::optional<int64_t> size) override {
        ++begins;
        announced = size;
    }
    void write(const char* data, size_t len) override {
        if (begins == 0) throw std::logic_error("write before begin");
        data_.append(data, len);
        ++writes;
    }
    bool cancelled() const override { return cancel; }

    int begins = 0;
    int writes = 0;
    bool cancel = false;
    std::optional<int64_t> announced;
    std::string data_;
};

}  // namespace

TEST_CASE("source: http and https URLs are accepted as they are", "[source]") {
    auto a = parse_source("http://example.com/images/disk.img");
    CHECK(a.kind == SourceKind::http);
    CHECK(a.location == "http://example.com/images/disk.img");
    auto b = parse_source("https://example.com:8443/a.iso?x=1&y=2");
    CHECK(b.kind == SourceKind::http);
    CHECK(b.location == "https://example.com:8443/a.iso?x=1&y=2");
    auto c = parse_source("HTTPS://Example.COM/Disk.IMG");
    CHECK(c.kind == SourceKind::http);
    CHECK(c.location == "HTTPS://Example.COM/Disk.IMG");
}

TEST_CASE("source: absolute paths and file URLs are local files", "[source]") {
    auto a = parse_source("/var/lib/images/disk.img");
    CHECK(a.kind == SourceKind::file);
    CHECK(a.location == "/var/lib/images/disk.img");
    auto b = parse_source("file:///srv/disk.qcow2");
    CHECK(b.kind == SourceKind::file);
    CHECK(b.location == "/srv/disk.qcow2");
    auto c = parse_source("FILE:///srv/x.iso");
    CHECK(c.kind == SourceKind::file);
    CHECK(c.location == "/srv/x.iso");
}

TEST_CASE("source: unsupported schemes relative paths and empty sources are refused", "[source]") {
    struct Case {
        std::string input;
        std::string message_part;
    };
    const std::vector<Case> cases = {
        {"", "empty"},
        {"ftp://example.com/disk.img", "use an http:// or https:// URL or a local file path"},
        {"sftp://host/x", "unsupported source 'sftp://host/x'"},
        {"s3://bucket/key", "unsupported source"},
        {"disk.img", "must be an absolute path"},
        {"images/disk.img", "must be an absolute path"},
        {"./disk.img", "must be an absolute path"},
        {"../disk.img", "must be an absolute path"},
        {"~/disk.img", "must be an absolute path"},
        {"file://relative/path.img", "must be an absolute path"},
        {"http://example.com/a b.img", "whitespace"},
    };
    for (const auto& c : cases) {
        INFO("source '" << c.input << "'");
        auto e = error_from([&] { parse_source(c.input); });
        REQUIRE(e);
        CHECK(e->code() == Errc::invalid_argument);
        CHECK_THAT(std::string(e->what()), Contains(c.message_part));
    }
}

// NOTE (import/source.cpp, parse_source): for "file://" the path left after stripping the scheme
// is empty and `s.front()` is called on an empty std::string (undefined behaviour; it aborts
// under _GLIBCXX_ASSERTIONS). Without assertions it happens to read the terminating NUL.
TEST_CASE("source: a bare file scheme is refused", "[source]") {
    auto e = error_from([&] { parse_source("file://"); });
    REQUIRE(e);
    CHECK(e->code() == Errc::invalid_argument);
}

TEST_CASE("source: fetch streams a local file and announces its size", "[source]") {
    unit::TempDir t;
    const std::string data = unit::random_bytes(2 * 1024 * 1024 + 333, 11);
    unit::write_file(t.path() / "src.img", data);
    CollectSink sink;
    imagefs::fetch(parse_source(t.str("src.img")), sink, {});
    CHECK(sink.begins == 1);
    CHECK(sink.announced == std::optional<int64_t>(static_cast<int64_t>(data.size())));
    CHECK(unit::diff_bytes(sink.data_, data) == "");
    CHECK(sink.writes >= 3);  // read in 1 MiB pieces

    CollectSink empty;
    unit::write_file(t.path() / "empty.img", "");
    imagefs::fetch(parse_source("file://" + t.str("empty.img")), empty, {});
    CHECK(empty.begins == 1);
    CHECK(empty.announced == std::optional<int64_t>(0));
    CHECK(empty.data_.empty());
}

TEST_CASE("source: fetch of a missing file a directory or a cancelled import fails", "[source]") {
    unit::TempDir t;
    CollectSink sink;
    auto e = error_from([&] { imagefs::fetch(parse_source(t.str("missing.img")), sink, {}); });
    REQUIRE(e);
    CHECK(e->code() == Errc::not_found);
    CHECK_THAT(std::string(e->what()), Contains(t.str("missing.img")));
    CHECK(sink.begins == 0);

    auto d = error_from([&] { imagefs::fetch(parse_source(t.str()), sink, {}); });
    REQUIRE(d);
    CHECK(d->code() == Errc::invalid_argument);
    CHECK_THAT(std::string(d->what()), Contains("not a regular file"));

    unit::write_file(t.path() / "src.img", "hello");
    CollectSink cancelled;
    cancelled.cancel = true;
    auto c = error_from([&] { imagefs::fetch(parse_source(t.str("src.img")), cancelled, {}); });
    REQUIRE(c);
    CHECK(c->code() == Errc::cancelled);
    CHECK(cancelled.data_.empty());
}
