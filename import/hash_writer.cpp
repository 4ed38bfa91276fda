#include "import/hash_writer.hpp"

#include <unistd.h>

#include <cerrno>

namespace imagefs {

void write_staging(int fd, int& direct, const char* p, size_t n, int64_t off,
                   const std::function<void(int, int64_t)>& fail) {
    constexpr uintptr_t kAlign = 4096;
    const bool aligned = direct >= 0 && reinterpret_cast<uintptr_t>(p) % kAlign == 0 &&
                         n % kAlign == 0 && static_cast<uint64_t>(off) % kAlign == 0;
    int use = aligned ? direct : fd;
    while (n > 0) {
        ssize_t w = ::pwrite(use, p, n, off);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno == EINVAL && use != fd) {
            ::close(direct);
            direct = -1;
            use = fd;
            continue;
        }
        if (w < 0) fail(errno, off);
        p += w;
        n -= static_cast<size_t>(w);
        off += w;
        use = fd;  // after a short write the rest may not be aligned
    }
}

}  // namespace imagefs
