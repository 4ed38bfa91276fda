// import/format: image format detection from magic bytes.
#include <sys/wait.h>

#include <cstdlib>

#include "import/format.hpp"
#include "support.hpp"

using imagefs::detect_format;
using imagefs::FormatInfo;

namespace {

constexpr int64_t GiB = int64_t{1} << 30;

void put_be32(std::string& s, size_t off, uint32_t v) {
    for (int i = 0; i < 4; ++i) s[off + i] = static_cast<char>((v >> (8 * (3 - i))) & 0xff);
}
void put_be64(std::string& s, size_t off, uint64_t v) {
    for (int i = 0; i < 8; ++i) s[off + i] = static_cast<char>((v >> (8 * (7 - i))) & 0xff);
}
void put_le64(std::string& s, size_t off, uint64_t v) {
    for (int i = 0; i < 8; ++i) s[off + i] = static_cast<char>((v >> (8 * i)) & 0xff);
}

std::string qcow2_header(uint32_t version, uint64_t vsize, size_t file_size = 65536) {
    std::string s(file_size, '\0');
    s.replace(0, 4, "QFI\xfb", 4);
    put_be32(s, 4, version);
    put_be32(s, 20, 16);  // cluster_bits
    put_be64(s, 24, vsize);
    return s;
}

FormatInfo detect_file(const unit::fs::path& p) {
    int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
    REQUIRE(fd >= 0);
    struct stat st {};
    REQUIRE(::fstat(fd, &st) == 0);
    FormatInfo info = detect_format(fd, st.st_size);
    ::close(fd);
    return info;
}

FormatInfo detect_bytes(const unit::TempDir& t, const std::string& data) {
    auto p = t.path() / "image";
    unit::write_file(p, data);
    return detect_file(p);
}

std::optional<std::string> find_on_path(const std::string& prog) {
    const char* path = std::getenv("PATH");
    if (!path) return std::nullopt;
    std::string s = path;
    size_t start = 0;
    while (start <= s.size()) {
        size_t end = s.find(':', start);
        if (end == std::string::npos) end = s.size();
        std::string dir = s.substr(start, end - start);
        if (!dir.empty()) {
            std::string cand = dir + "/" + prog;
            if (::access(cand.c_str(), X_OK) == 0) return cand;
        }
        start = end + 1;
    }
    return std::nullopt;
}

}  // namespace

TEST_CASE("format: a crafted qcow2 header gives qcow2 and its virtual size", "[format]") {
    unit::TempDir t;
    const uint64_t vsize = 10 * GiB + 512;
    FormatInfo v3 = detect_bytes(t, qcow2_header(3, vsize));
    CHECK(v3.format == "qcow2");
    CHECK(v3.virtual_size == static_cast<int64_t>(vsize));

    FormatInfo v2 = detect_bytes(t, qcow2_header(2, 3 * GiB));
    CHECK(v2.format == "qcow2");
    CHECK(v2.virtual_size == 3 * GiB);

    // Exactly 512 bytes is enough for the header.
    FormatInfo small = detect_bytes(t, qcow2_header(3, 1 << 20, 512));
    CHECK(small.format == "qcow2");
    CHECK(small.virtual_size == 1 << 20);

    // A size above 2^32 is read as 64 bits.
    FormatInfo huge = detect_bytes(t, qcow2_header(3, (uint64_t{1} << 40) + 65536));
    CHECK(huge.virtual_size == (int64_t{1} << 40) + 65536);
}

TEST_CASE("format: qcow2 magic with an unknown version or absurd size is raw", "[format]") {
    unit::TempDir t;
    FormatInfo v4 = detect_bytes(t, qcow2_header(4, GiB));
    CHECK(v4.format == "raw");
    CHECK(v4.virtual_size == 65536);
    FormatInfo v1 = detect_bytes(t, qcow2_header(1, GiB));
    CHECK(v1.format == "raw");
    FormatInfo neg = detect_bytes(t, qcow2_header(3, uint64_t{1} << 63));
    CHECK(neg.format == "raw");
    CHECK(neg.virtual_size == 65536);
}

TEST_CASE("format: an ISO 9660 volume descriptor gives iso", "[format]") {
    unit::TempDir t;
    std::string iso(40960, '\0');
    iso.replace(32768, 6,
                "\x01"
                "CD001",
                6);
    FormatInfo info = detect_bytes(t, iso);
    CHECK(info.format == "iso");
    CHECK(info.virtual_size == 40960);

    // Any descriptor type byte; the identifier is what counts.
    std::string iso2 = unit::random_bytes(32768 + 2048, 3);
    iso2.replace(32768, 6,
                 "\xff"
                 "CD001",
                 6);
    CHECK(detect_bytes(t, iso2).format == "iso");

    // The identifier cut off by the end of the file: raw.
    std::string cut = iso.substr(0, 32771);
    FormatInfo c = detect_bytes(t, cut);
    CHECK(c.format == "raw");
    CHECK(c.virtual_size == 32771);

    // At the wrong offset: raw.
    std::string wrong(40960, '\0');
    wrong.replace(32768 + 512, 6,
                  "\x01"
                  "CD001",
                  6);
    CHECK(detect_bytes(t, wrong).format == "raw");
}

TEST_CASE("format: a VMDK sparse header gives vmdk and its capacity", "[format]") {
    unit::TempDir t;
    std::string vmdk(4096, '\0');
    vmdk.replace(0, 4, "KDMV", 4);
    put_le64(vmdk, 12, 4194304);  // sectors
    FormatInfo info = detect_bytes(t, vmdk);
    CHECK(info.format == "vmdk");
    CHECK(info.virtual_size == 2 * GiB);
}

TEST_CASE("format: random and zero data are raw with the file size", "[format]") {
    unit::TempDir t;
    for (uint64_t seed : {1u, 2u, 3u}) {
        FormatInfo r = detect_bytes(t, unit::random_bytes(1 << 20, seed));
        CHECK(r.format == "raw");
        CHECK(r.virtual_size == 1 << 20);
    }
    FormatInfo z = detect_bytes(t, std::string(3 * 65536 + 7, '\0'));
    CHECK(z.format == "raw");
    CHECK(z.virtual_size == 3 * 65536 + 7);
    FormatInfo e = detect_bytes(t, "");
    CHECK(e.format == "raw");
    CHECK(e.virtual_size == 0);
}

TEST_CASE("format: a file shorter than 512 bytes is raw even with a qcow2 magic", "[format]") {
    unit::TempDir t;
    for (size_t n : {4u, 32u, 104u, 511u}) {
        INFO(n << " bytes");
        FormatInfo f = detect_bytes(t, qcow2_header(3, GiB).substr(0, n));
        CHECK(f.format == "raw");
        CHECK(f.virtual_size == static_cast<int64_t>(n));
    }
    FormatInfo one = detect_bytes(t, "Q");
    CHECK(one.format == "raw");
    CHECK(one.virtual_size == 1);
}

TEST_CASE("format: a real qcow2 made by qemu-img", "[format]") {
    auto qemu_img = find_on_path("qemu-img");
    if (!qemu_img) {
        WARN("qemu-img is not on PATH; only the crafted headers were checked");
        return;
    }
    unit::TempDir t;
    const std::string v3 = t.str("v3.qcow2");
    std::string cmd = *qemu_img + " create -q -f qcow2 '" + v3 + "' 3G";
    REQUIRE(std::system(cmd.c_str()) == 0);
    FormatInfo f = detect_file(v3);
    CHECK(f.format == "qcow2");
    CHECK(f.virtual_size == 3 * GiB);
    CHECK(static_cast<int64_t>(unit::fs::file_size(v3)) < GiB);  // the file itself is small

    const std::string v2 = t.str("v2.qcow2");
    cmd = *qemu_img + " create -q -f qcow2 -o compat=0.10 '" + v2 + "' 5368709632";
    REQUIRE(std::system(cmd.c_str()) == 0);
    FormatInfo g = detect_file(v2);
    CHECK(g.format == "qcow2");
    CHECK(g.virtual_size == 5368709632LL);

    const std::string raw = t.str("plain.raw");
    cmd = *qemu_img + " create -q -f raw '" + raw + "' 1M";
    REQUIRE(std::system(cmd.c_str()) == 0);
    FormatInfo r = detect_file(raw);
    CHECK(r.format == "raw");
    CHECK(r.virtual_size == 1 << 20);
}
