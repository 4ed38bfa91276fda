// import/upload: the bytes of a file written into the mount, stored and hashed without FUSE.
#include "import/upload.hpp"

#include <random>

#include "import/digest.hpp"
#include "support.hpp"

using imagefs::DigestAlgo;
using imagefs::hash_file;
using imagefs::Upload;
using unit::TempDir;

namespace {

std::string random_bytes(size_t n, unsigned seed) {
    std::mt19937_64 rng(seed);
    std::string s(n, '\0');
    for (auto& c : s) c = static_cast<char>(rng());
    return s;
}

std::string sha256_of(const std::string& data) {
    imagefs::Digest d(DigestAlgo::sha256);
    d.update(data.data(), data.size());
    return d.hex();
}

struct Staged {
    TempDir t;
    std::string path = t.str("1.part");
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    Upload up{1, 1, fd};  // owns fd
    std::string contents() const { return unit::read_file(path); }
    struct stat st() const {
        struct stat s {};
        REQUIRE(::stat(path.c_str(), &s) == 0);
        return s;
    }
};

// Writes `data` at `off` in pieces of `piece` bytes, as the kernel hands a writer's data over.
void write_in_pieces(Upload& up, const std::string& data, int64_t off, size_t piece) {
    for (size_t i = 0; i < data.size(); i += piece) {
        size_t n = std::min(piece, data.size() - i);
        up.write(data.data() + i, n, off + int64_t(i));
    }
}

}  // namespace

TEST_CASE("upload: bytes written in order are hashed on the side, without reading them again",
          "[upload]") {
    Staged s;
    REQUIRE(s.fd >= 0);
    const std::string data = random_bytes((96 << 20) + 12345, 1);  // past one writeback step
    write_in_pieces(s.up, data, 0, 1 << 20);
    CHECK(s.up.size() == int64_t(data.size()));
    CHECK(s.up.streamed());
    CHECK(s.up.sha256() == sha256_of(data));
    CHECK(s.contents() == data);
}

TEST_CASE("upload: writes out of order are stored and the file is hashed again", "[upload]") {
    Staged s;
    const std::string data = random_bytes(3 << 20, 2);
    const size_t half = data.size() / 2;
    s.up.write(data.data() + half, data.size() - half, int64_t(half));
    s.up.write(data.data(), half, 0);
    CHECK_FALSE(s.up.streamed());
    CHECK(s.up.sha256() == sha256_of(data));
    CHECK(s.contents() == data);
}

TEST_CASE("upload: an overwrite of bytes already written is hashed as finally stored", "[upload]") {
    Staged s;
    std::string data = random_bytes(2 << 20, 3);
    write_in_pieces(s.up, data, 0, 128 << 10);
    const std::string patch = random_bytes(4096, 4);
    s.up.write(patch.data(), patch.size(), 8192);
    data.replace(8192, patch.size(), patch);
    CHECK_FALSE(s.up.streamed());
    CHECK(s.up.sha256() == sha256_of(data));
}

TEST_CASE("upload: truncate to zero starts the digest again (cp over an upload)", "[upload]") {
    Staged s;
    const std::string first = random_bytes(5 << 20, 5), second = random_bytes(3 << 20, 6);
    write_in_pieces(s.up, first, 0, 1 << 20);
    s.up.truncate(0);
    write_in_pieces(s.up, second, 0, 1 << 20);
    CHECK(s.up.streamed());
    CHECK(s.up.sha256() == sha256_of(second));
    CHECK(s.contents() == second);
}

TEST_CASE("upload: a file grown by truncate after in-order writes keeps the streaming digest",
          "[upload]") {
    // cp --sparse=always of a file that ends in a hole writes the data, then ftruncate()s.
    Staged s;
    const std::string head = random_bytes(1 << 20, 7);
    write_in_pieces(s.up, head, 0, 1 << 20);
    s.up.truncate(int64_t(head.size()) + (8 << 20));
    std::string want = head + std::string(8 << 20, '\0');
    CHECK(s.up.streamed());
    CHECK(s.up.sha256() == sha256_of(want));
    CHECK(s.st().st_blocks * 512 < (4 << 20));  // the tail is a hole
}

TEST_CASE("upload: truncate below what was written is hashed as stored", "[upload]") {
    Staged s;
    const std::string data = random_bytes(4 << 20, 8);
    write_in_pieces(s.up, data, 0, 1 << 20);
    s.up.truncate(1 << 20);
    CHECK_FALSE(s.up.streamed());
    CHECK(s.up.sha256() == sha256_of(data.substr(0, 1 << 20)));
}

TEST_CASE("upload: aligned blocks of zeros past the end are holes, and hash as zeros", "[upload]") {
    Staged s;
    const std::string data = random_bytes(4096, 9) + std::string(16 << 20, '\0') +
                             random_bytes(4096, 10) + std::string(8 << 20, '\0');
    write_in_pieces(s.up, data, 0, 1 << 20);
    CHECK(s.up.size() == int64_t(data.size()));
    CHECK(s.up.streamed());
    CHECK(s.up.sha256() == sha256_of(data));
    CHECK(s.contents() == data);
    CHECK(s.st().st_blocks * 512 <= 64 * 1024);
    CHECK(hash_file(s.fd, int64_t(data.size()), DigestAlgo::sha256) == sha256_of(data));
}

TEST_CASE("upload: an upload dropped while its hash runs behind stops cleanly", "[upload]") {
    // The destructor joins the hashing thread however far behind it is, and closes the file.
    TempDir t;
    for (int i = 0; i < 20; ++i) {
        const std::string path = t.str(std::to_string(i) + ".part");
        const std::string data = random_bytes(2 << 20, 11 + unsigned(i));
        int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        REQUIRE(fd >= 0);
        {
            Upload up(1, 1, fd);
            write_in_pieces(up, data, 0, 256 << 10);
        }
        CHECK(::fcntl(fd, F_GETFD) == -1);
        CHECK(unit::read_file(path) == data);
    }
}

TEST_CASE("upload: a gap in the stream is hashed as zeros, a huge one is left to the final pass",
          "[upload]") {
    SECTION("a small gap (cp skipping a hole with lseek) keeps the stream") {
        Staged s;
        const std::string a = random_bytes(1 << 20, 12), b = random_bytes(1 << 20, 13);
        s.up.write(a.data(), a.size(), 0);
        s.up.write(b.data(), b.size(), int64_t(a.size()) + (8 << 20));
        const std::string want = a + std::string(8 << 20, '\0') + b;
        CHECK(s.up.streamed());
        CHECK(s.up.sha256() == sha256_of(want));
        CHECK(s.contents() == want);
        CHECK(s.st().st_blocks * 512 < (4 << 20));  // the gap is a hole
    }
    SECTION("a gap of gigabytes (a sparse disk written at its end) is not hashed in the write") {
        Staged s;
        const std::string head = random_bytes(4096, 14), tail = random_bytes(4096, 15);
        s.up.write(head.data(), head.size(), 0);
        const int64_t far = int64_t(4) << 30;
        s.up.write(tail.data(), tail.size(), far);
        CHECK_FALSE(s.up.streamed());
        CHECK(s.up.size() == far + 4096);
        CHECK(s.st().st_blocks * 512 < (1 << 20));
        imagefs::Digest d(DigestAlgo::sha256);
        d.update(head.data(), head.size());
        const std::string zeros(1 << 20, '\0');
        for (int64_t left = far - 4096; left > 0;) {
            size_t n = size_t(std::min<int64_t>(left, int64_t(zeros.size())));
            d.update(zeros.data(), n);
            left -= int64_t(n);
        }
        d.update(tail.data(), tail.size());
        CHECK(s.up.sha256() == d.hex());
    }
}
