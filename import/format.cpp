#include "import/format.hpp"

#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "core/error.hpp"

namespace imagefs {
namespace {

uint64_t be64(const unsigned char* p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v = (v << 8) | p[i];
    return v;
}

uint64_t le64(const unsigned char* p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
    return v;
}

bool read_at(int fd, int64_t off, unsigned char* buf, size_t len, int64_t size) {
    if (off + static_cast<int64_t>(len) > size) return false;
    size_t done = 0;
    while (done < len) {
        ssize_t n = ::pread(fd, buf + done, len - done, off + static_cast<int64_t>(done));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) throw_errno("cannot read image header", errno);
        if (n == 0) return false;
        done += static_cast<size_t>(n);
    }
    return true;
}

}  // namespace

FormatInfo detect_format(int fd, int64_t size) {
    unsigned char hdr[512];
    if (read_at(fd, 0, hdr, sizeof hdr, size)) {
        // qcow2: "QFI\xfb", version (2 or 3) at 4, virtual size big-endian at 24.
        if (std::memcmp(hdr, "QFI\xfb", 4) == 0) {
            uint32_t version = (uint32_t(hdr[4]) << 24) | (uint32_t(hdr[5]) << 16) |
                               (uint32_t(hdr[6]) << 8) | hdr[7];
            uint64_t vsize = be64(hdr + 24);
            if ((version == 2 || version == 3) && vsize <= uint64_t(INT64_MAX))
                return {"qcow2", static_cast<int64_t>(vsize)};
        }
        // VMDK sparse extent: "KDMV", capacity in 512-byte sectors little-endian at 12.
        if (std::memcmp(hdr, "KDMV", 4) == 0) {
            uint64_t sectors = le64(hdr + 12);
            if (sectors <= uint64_t(INT64_MAX) / 512)
                return {"vmdk", static_cast<int64_t>(sectors * 512)};
        }
    }
    // ISO 9660: "CD001" in the first volume descriptor at sector 16.
    unsigned char vd[6];
    if (read_at(fd, 16 * 2048, vd, sizeof vd, size) && std::memcmp(vd + 1, "CD001", 5) == 0)
        return {"iso", size};
    return {"raw", size};
}

}  // namespace imagefs
