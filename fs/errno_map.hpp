// The one place where failures become errnos for the kernel.
#pragma once

#include <spdlog/spdlog.h>

#include <cerrno>
#include <system_error>

#include "core/error.hpp"
#include "fs/fuse.hpp"

namespace imagefs {

int to_errno(Errc code);

// Runs a handler body that replies itself; turns what it throws into one fuse_reply_err.
// `where` names the handler in the log, so an EIO in the field names its code path.
template <class Fn>
void reply_guarded(fuse_req_t req, const char* where, Fn&& fn) {
    int err;
    try {
        fn();
        return;
    } catch (const Error& e) {
        err = to_errno(e.code());
        if (e.code() == Errc::failed)
            spdlog::debug("{}: {}", where, e.what());  // an image that failed to import
        else if (err == EIO)
            spdlog::error("{}: {}", where, e.what());
    } catch (const std::system_error& e) {
        err = e.code().value() ? e.code().value() : EIO;
        if (err == EIO) spdlog::error("{}: {}", where, e.what());
    } catch (const std::exception& e) {
        err = EIO;
        spdlog::error("{}: {}", where, e.what());
    }
    fuse_reply_err(req, err);
}

}  // namespace imagefs
