// Where image bytes come from: local files and http(s) URLs.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "meta/catalog.hpp"

namespace imagefs {

// Classifies and normalises a source given by a user. Local paths must be absolute (the CLI makes
// them so); file:// URLs become paths. Anything else (ftp://, data:, relative paths) is refused
// with Error(invalid_argument) naming what is accepted.
struct SourceSpec {
    SourceKind kind;
    std::string location;  // URL or absolute path
};
SourceSpec parse_source(std::string_view source);

struct FetchOptions {
    long connect_timeout_s = 30;  // TCP + TLS handshake
    long stall_timeout_s = 120;   // no body bytes for this long: fail
    long max_redirects = 10;
};

// Receives the bytes of one fetch, in order.
class ByteSink {
  public:
    virtual ~ByteSink() = default;
    // Called once before the first byte (and for empty bodies) with the size the source announced.
    virtual void begin(std::optional<int64_t> size) = 0;
    virtual void write(const char* data, size_t len) = 0;  // may throw; aborts the fetch
    virtual bool cancelled() const = 0;
};

// Streams the whole source into `sink`. Throws Error: not_found (missing file, HTTP 404),
// network (transport failures, other HTTP errors), cancelled, or whatever the sink threw.
void fetch(const SourceSpec& src, ByteSink& sink, const FetchOptions& opts);

}  // namespace imagefs
