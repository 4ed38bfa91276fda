// Error type shared by every layer below fs/. The FUSE glue turns an Errc into an errno in
// exactly one place (fs/errno_map.cpp); the CLI prints what().
#pragma once

#include <stdexcept>
#include <string>
#include <string_view>

namespace imagefs {

enum class Errc {
    invalid_argument,  // bad name, bad checksum syntax, unsupported source
    not_found,         // no such image / source file
    exists,            // name already taken
    not_ready,         // image not active (yet)
    failed,            // image import failed
    timed_out,         // a bounded wait ran out
    busy,              // another daemon owns the state dir, catalog busy too long
    no_space,          // the state dir's filesystem is full / too small
    permission,        // state dir not writable, image immutable
    corrupt,           // catalog unreadable, newer schema
    io,                // any other I/O failure
    network,           // HTTP transport failure
    cancelled,         // import stopped (shutdown or removal)
};

std::string_view to_string(Errc c);

class Error : public std::runtime_error {
  public:
    Error(Errc code, const std::string& what) : std::runtime_error(what), code_(code) {}
    Errc code() const noexcept { return code_; }

  private:
    Errc code_;
};

// Throws Error(Errc::io or a better match for `err`) with "<what>: <strerror(err)>".
[[noreturn]] void throw_errno(const std::string& what, int err);

}  // namespace imagefs
