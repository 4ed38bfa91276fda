#include "core/error.hpp"

#include <cerrno>
#include <cstring>

namespace imagefs {

std::string_view to_string(Errc c) {
    switch (c) {
        case Errc::invalid_argument:
            return "invalid argument";
        case Errc::not_found:
            return "not found";
        case Errc::exists:
            return "exists";
        case Errc::not_ready:
            return "not ready";
        case Errc::failed:
            return "failed";
        case Errc::timed_out:
            return "timed out";
        case Errc::busy:
            return "busy";
        case Errc::no_space:
            return "no space";
        case Errc::permission:
            return "permission denied";
        case Errc::corrupt:
            return "corrupt";
        case Errc::io:
            return "I/O error";
        case Errc::network:
            return "network error";
        case Errc::cancelled:
            return "cancelled";
    }
    return "unknown";
}

void throw_errno(const std::string& what, int err) {
    Errc code = Errc::io;
    switch (err) {
        case ENOENT:
            code = Errc::not_found;
            break;
        case EEXIST:
            code = Errc::exists;
            break;
        case EACCES:
        case EPERM:
        case EROFS:
            code = Errc::permission;
            break;
        case ENOSPC:
        case EDQUOT:
            code = Errc::no_space;
            break;
        case EWOULDBLOCK:
            code = Errc::busy;
            break;
        default:
            break;
    }
    throw Error(code, what + ": " + std::strerror(err));
}

}  // namespace imagefs
