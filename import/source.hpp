// Where image bytes come from: local files and http(s) URLs.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "meta/catalog.hpp"

namespace imagefs {

class AllowList;

// Classifies and normalises a source given by a user. Local paths must be absolute (the CLI makes
// them so); file:// URLs become paths. Anything else (ftp://, data:, relative paths) is refused
// with Error(invalid_argument) naming what is accepted.
struct SourceSpec {
    SourceKind kind;
    std::string location;  // URL or absolute path
};
SourceSpec parse_source(std::string_view source);

// What identifies one version of an HTTP resource.
struct Validator {
    std::optional<std::string> etag;  // as sent, quotes included
    std::optional<std::string> last_modified;
};

// The If-Range value that guards resuming bytes that came with validator `v`: a strong ETag, else
// Last-Modified. nullopt when there is nothing safe to guard with (no validator, or only a weak
// ETag): such bytes are never resumed.
std::optional<std::string> if_range_value(const Validator& v);

// "bytes FIRST-LAST/TOTAL" (TOTAL may be "*"). nullopt for anything else.
struct ContentRange {
    int64_t first = 0;
    int64_t last = 0;
    std::optional<int64_t> total;
};
std::optional<ContentRange> parse_content_range(std::string_view value);

// The final response of a fetch (after redirects), as the sink sees it before the first byte.
struct HttpResponse {
    long status = 200;
    int64_t offset = 0;                 // where its body starts in the resource (206: the range)
    std::optional<int64_t> total_size;  // size of the whole resource, when the server says
    Validator validator;
};

// Reads a 200 or 206 response to a request for the bytes from `requested_offset` on (0: the whole
// resource). nullopt when a 206 does not carry a usable Content-Range for that request.
std::optional<HttpResponse> interpret_response(long status, std::optional<int64_t> content_length,
                                               const std::optional<std::string>& content_range,
                                               const Validator& validator,
                                               int64_t requested_offset);

// What a sink holding `have` bytes (of a resource whose size it knew as `known_total`, if at all)
// does with response `r`:
//   append   - the body continues exactly where the bytes end (a resume the server honoured)
//   restart  - the body is the whole resource from byte 0: drop what we have and take it
//   refetch  - unusable (a range elsewhere, or a size that changed under the same validator):
//              ask again for the whole resource
enum class ResumeDecision { append, restart, refetch };
ResumeDecision decide_resume(int64_t have, std::optional<int64_t> known_total,
                             const HttpResponse& r);

struct FetchOptions {
    long connect_timeout_s = 30;  // TCP + TLS handshake
    long stall_timeout_s = 120;   // no body bytes for this long: fail (retryable)
    long max_redirects = 10;

    // Per import.
    int64_t resume_offset = 0;  // ask for the bytes from here on (guarded by resume_validator)
    Validator resume_validator;
    std::optional<std::string> tls_ca;  // PEM to trust instead of the system CA store
    bool tls_insecure = false;          // no certificate verification at all
    const AllowList* allow = nullptr;   // nullptr: every host
    // The daemon's own mount (st_dev), or 0: a local source on it is refused, since reading an
    // image of the mount that is not active yet would wait on the daemon itself.
    dev_t own_device = 0;
};

// Receives the bytes of one fetch, in order.
class ByteSink {
  public:
    virtual ~ByteSink() = default;
    // Called once before the first byte (and for empty bodies) with the size the source announced.
    virtual void begin(std::optional<int64_t> size) = 0;
    // HTTP: called instead of begin() for the final response, before any of its bytes. The
    // default accepts responses that start at byte 0 only.
    virtual ResumeDecision begin_http(const HttpResponse& r) {
        if (r.offset != 0) return ResumeDecision::refetch;
        begin(r.total_size);
        return ResumeDecision::restart;
    }
    virtual void write(const char* data, size_t len) = 0;  // may throw; aborts the fetch
    virtual bool cancelled() const = 0;
    // Called now and then while a fetch runs, also while no bytes arrive.
    virtual void tick() {}
};

// Streams the source into `sink`. Throws Error: not_found (missing file, HTTP 404/410),
// permission (HTTP 401/403, certificate refused, host not allowed), invalid_argument (other HTTP
// 4xx, too many redirects, unsupported redirect), network (transport failures, stalls, short
// bodies, HTTP 408/429/5xx: retryable), cancelled, or whatever the sink threw. Nothing but the
// body of a 200 or 206 response ever reaches the sink.
void fetch(const SourceSpec& src, ByteSink& sink, const FetchOptions& opts);

}  // namespace imagefs
