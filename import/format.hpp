// Image format detection from magic bytes.
#pragma once

#include <cstdint>
#include <string>

namespace imagefs {

struct FormatInfo {
    std::string format;    // "qcow2", "iso", "vmdk" or "raw"
    int64_t virtual_size;  // guest-visible size: from the header for qcow2/vmdk, else file size
};

// Reads the headers of the file open at `fd` (file size `size`). Never fails on odd content: what
// is not recognised is raw. Throws Error(io) only when reading fails.
FormatInfo detect_format(int fd, int64_t size);

}  // namespace imagefs
