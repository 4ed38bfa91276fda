#include "fs/errno_map.hpp"

namespace imagefs {

int to_errno(Errc code) {
    switch (code) {
        case Errc::invalid_argument:
            return EINVAL;
        case Errc::not_found:
            return ENOENT;
        case Errc::exists:
            return EEXIST;
        case Errc::not_ready:
            return EAGAIN;
        case Errc::failed:
            return EIO;
        case Errc::timed_out:
            return ETIMEDOUT;
        case Errc::busy:
            return EBUSY;
        case Errc::no_space:
            return ENOSPC;
        case Errc::permission:
            return EPERM;
        case Errc::corrupt:
            return EIO;
        case Errc::io:
            return EIO;
        case Errc::network:
            return EIO;
        case Errc::cancelled:
            return EINTR;
    }
    return EIO;
}

}  // namespace imagefs
