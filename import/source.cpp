#include "import/source.hpp"

#include <curl/curl.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <exception>
#include <memory>
#include <vector>

#include <arpa/inet.h>
#include <netinet/in.h>

#include "core/error.hpp"
#include "import/allowlist.hpp"

namespace imagefs {
namespace {

bool starts_with_ci(std::string_view s, std::string_view prefix) {
    if (s.size() < prefix.size()) return false;
    for (size_t i = 0; i < prefix.size(); ++i)
        if (std::tolower(static_cast<unsigned char>(s[i])) != prefix[i]) return false;
    return true;
}

std::string_view trim(std::string_view s) {
    while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
    while (!s.empty() &&
           (s.back() == ' ' || s.back() == '\t' || s.back() == '\r' || s.back() == '\n'))
        s.remove_suffix(1);
    return s;
}

std::optional<int64_t> parse_i64(std::string_view s) {
    int64_t v = 0;
    auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec != std::errc() || p != s.data() + s.size() || v < 0) return std::nullopt;
    return v;
}

void fetch_file(const std::string& path, ByteSink& sink, dev_t own_device) {
    struct stat where {};
    if (own_device != 0 && ::stat(path.c_str(), &where) == 0 && where.st_dev == own_device)
        throw Error(Errc::invalid_argument,
                    "source " + path +
                        " is a file in this daemon's own mount; copy it within the mount "
                        "instead (cp MNT/a MNT/b), or import it from outside the mount");
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int err = errno;
        if (err == ENOENT) throw Error(Errc::not_found, "source file " + path + " does not exist");
        throw_errno("cannot open source file " + path, err);
    }
    std::unique_ptr<int, void (*)(int*)> guard(&fd, [](int* f) { ::close(*f); });
    struct stat st {};
    if (::fstat(fd, &st) != 0) throw_errno("cannot stat source file " + path, errno);
    if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode))
        throw Error(Errc::invalid_argument, "source " + path + " is not a regular file");
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    sink.begin(S_ISREG(st.st_mode) ? std::optional<int64_t>(st.st_size) : std::nullopt);
    std::vector<char> buf(1 << 20);
    for (;;) {
        if (sink.cancelled()) throw Error(Errc::cancelled, "import cancelled");
        ssize_t n = ::read(fd, buf.data(), buf.size());
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) throw_errno("cannot read source file " + path, errno);
        if (n == 0) break;
        sink.write(buf.data(), static_cast<size_t>(n));
    }
}

// Headers of the response being received (reset at every status line, so after redirects and
// interim responses only the final response's headers are left).
struct Headers {
    std::optional<std::string> etag, last_modified, content_range;
    void clear() { *this = Headers(); }
};

// State shared with libcurl's callbacks for one request. A callback must not throw through C
// code: it records the exception and returns a value that makes curl abort.
struct CurlCtx {
    ByteSink* sink = nullptr;
    CURL* curl = nullptr;
    int64_t requested_offset = 0;
    Headers headers;
    bool begun = false;    // the sink accepted this response
    bool discard = false;  // a response whose body is not image data (redirect, error)
    bool refetch = false;  // the response cannot be used: ask again for the whole resource
    std::exception_ptr error;

    // Stall detection: no response bytes (headers or body) for stall_timeout once connected.
    // (libcurl's LOW_SPEED_* average over several seconds; this is exact to about a second.)
    std::chrono::steady_clock::time_point last_activity;
    curl_off_t last_dlnow = -1;
    long stall_timeout_s = 0;
    bool stalled = false;

    const AllowList* allow = nullptr;
    bool check_addresses = false;  // the host name is not allowed by name: check each address
    std::string denied;            // an address the allow-list refused
};

size_t on_header(char* data, size_t size, size_t nmemb, void* user) {
    auto* c = static_cast<CurlCtx*>(user);
    size_t len = size * nmemb;
    c->last_activity = std::chrono::steady_clock::now();
    std::string_view line(data, len);
    if (starts_with_ci(line, "http/")) {
        c->headers.clear();
        return len;
    }
    auto colon = line.find(':');
    if (colon == std::string_view::npos) return len;
    std::string_view name = line.substr(0, colon);
    std::string value(trim(line.substr(colon + 1)));
    auto is = [&](std::string_view n) {
        return name.size() == n.size() && starts_with_ci(name, n);
    };
    if (is("etag"))
        c->headers.etag = value;
    else if (is("last-modified"))
        c->headers.last_modified = value;
    else if (is("content-range"))
        c->headers.content_range = value;
    return len;
}

size_t on_body(char* data, size_t size, size_t nmemb, void* user) {
    auto* c = static_cast<CurlCtx*>(user);
    size_t len = size * nmemb;
    try {
        if (!c->begun && !c->discard) {
            // The headers of this response are complete here.
            long code = 0;
            curl_easy_getinfo(c->curl, CURLINFO_RESPONSE_CODE, &code);
            if (code != 200 && code != 206) {
                c->discard = true;  // never image data
            } else {
                curl_off_t cl = -1;
                curl_easy_getinfo(c->curl, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &cl);
                Validator v{c->headers.etag, c->headers.last_modified};
                auto resp =
                    interpret_response(code, cl >= 0 ? std::optional<int64_t>(cl) : std::nullopt,
                                       c->headers.content_range, v, c->requested_offset);
                if (!resp || c->sink->begin_http(*resp) == ResumeDecision::refetch) {
                    c->refetch = true;
                    return 0;  // CURLE_WRITE_ERROR
                }
                c->begun = true;
            }
        }
        if (c->discard) return len;
        c->sink->write(data, len);
        return len;
    } catch (...) {
        c->error = std::current_exception();
        return 0;  // CURLE_WRITE_ERROR
    }
}

int on_progress(void* user, curl_off_t, curl_off_t dlnow, curl_off_t, curl_off_t) {
    auto* c = static_cast<CurlCtx*>(user);
    auto now = std::chrono::steady_clock::now();
    curl_off_t connected_us = 0;
    curl_easy_getinfo(c->curl, CURLINFO_CONNECT_TIME_T, &connected_us);
    if (dlnow != c->last_dlnow || connected_us == 0) {  // connecting is the connect timeout's job
        c->last_dlnow = dlnow;
        c->last_activity = now;
    } else if (now - c->last_activity >= std::chrono::seconds(c->stall_timeout_s)) {
        c->stalled = true;
        return 1;
    }
    try {
        c->sink->tick();
    } catch (...) {
        c->error = std::current_exception();
        return 1;
    }
    return c->sink->cancelled() ? 1 : 0;
}

std::string address_text(const sockaddr* sa) {
    char buf[INET6_ADDRSTRLEN] = "?";
    if (sa->sa_family == AF_INET)
        ::inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(sa)->sin_addr, buf, sizeof buf);
    else if (sa->sa_family == AF_INET6)
        ::inet_ntop(AF_INET6, &reinterpret_cast<const sockaddr_in6*>(sa)->sin6_addr, buf,
                    sizeof buf);
    return buf;
}

curl_socket_t on_open_socket(void* user, curlsocktype, curl_sockaddr* addr) {
    auto* c = static_cast<CurlCtx*>(user);
    if (c->check_addresses && !c->allow->address_allowed(&addr->addr)) {
        c->denied = address_text(&addr->addr);
        return CURL_SOCKET_BAD;  // never connect
    }
    return ::socket(addr->family, addr->socktype | SOCK_CLOEXEC, addr->protocol);
}

struct CurlGlobal {
    CurlGlobal() { curl_global_init(CURL_GLOBAL_DEFAULT); }
    ~CurlGlobal() { curl_global_cleanup(); }
};

struct SlistDeleter {
    void operator()(curl_slist* l) const { curl_slist_free_all(l); }
};

Error http_status_error(long code, const std::string& url) {
    std::string what = "HTTP " + std::to_string(code) + " from " + url;
    if (code == 404 || code == 410) return Error(Errc::not_found, what);
    if (code == 401 || code == 403 || code == 407) return Error(Errc::permission, what);
    if (code == 408 || code == 429 || code >= 500) return Error(Errc::network, what);
    return Error(Errc::invalid_argument, what);
}

// One request (no redirects followed). Returns the response code; throws for transport errors.
long perform_once(CURL* h, CurlCtx& ctx, const std::string& url, const FetchOptions& opts,
                  const char* errbuf) {
    ctx.headers.clear();
    ctx.begun = ctx.discard = ctx.refetch = false;
    ctx.denied.clear();
    ctx.stalled = false;
    ctx.last_dlnow = -1;
    ctx.last_activity = std::chrono::steady_clock::now();
    curl_easy_setopt(h, CURLOPT_URL, url.c_str());
    CURLcode rc = curl_easy_perform(h);
    long code = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &code);
    if (ctx.error) std::rethrow_exception(ctx.error);
    if (ctx.refetch) return code;
    if (ctx.stalled)
        throw Error(Errc::network, "download of " + url + " stalled: no data for " +
                                       std::to_string(opts.stall_timeout_s) + " s");
    if (rc == CURLE_ABORTED_BY_CALLBACK) throw Error(Errc::cancelled, "import cancelled");
    if (!ctx.denied.empty())
        throw Error(Errc::permission, "address " + ctx.denied + " of " + url +
                                          " is not allowed by " + ctx.allow->origin() +
                                          "; add the host or its network there");
    if (rc == CURLE_HTTP_RETURNED_ERROR) {
        if (code == 416 && ctx.requested_offset > 0) {
            ctx.refetch = true;  // our resume point is past the end: the resource changed
            return code;
        }
        throw http_status_error(code, url);
    }
    if (rc == CURLE_OK) return code;
    std::string detail = errbuf[0] ? errbuf : curl_easy_strerror(rc);
    switch (rc) {
        case CURLE_PEER_FAILED_VERIFICATION:
        case CURLE_SSL_CACERT_BADFILE:
        case CURLE_SSL_CERTPROBLEM:
            throw Error(Errc::permission,
                        "TLS certificate of " + url + " refused: " + detail +
                            " (give its CA with --ca-file, or --insecure to skip the check)");
        case CURLE_UNSUPPORTED_PROTOCOL:
        case CURLE_URL_MALFORMAT:
            throw Error(Errc::invalid_argument, "cannot fetch " + url + ": " + detail);
        case CURLE_OPERATION_TIMEDOUT:
            detail = "could not connect within " + std::to_string(opts.connect_timeout_s) + " s (" +
                     detail + ")";
            break;
        default:
            break;
    }
    throw Error(Errc::network, "download of " + url + " failed: " + detail);
}

void fetch_http(const std::string& url, ByteSink& sink, const FetchOptions& opts) {
    static CurlGlobal global;
    std::unique_ptr<CURL, void (*)(CURL*)> curl(curl_easy_init(), curl_easy_cleanup);
    if (!curl) throw Error(Errc::io, "cannot initialise libcurl");
    CurlCtx ctx;
    ctx.sink = &sink;
    ctx.curl = curl.get();
    ctx.allow = opts.allow;
    ctx.stall_timeout_s = std::max(1L, opts.stall_timeout_s);
    char errbuf[CURL_ERROR_SIZE] = {};
    CURL* h = curl.get();
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 0L);  // followed here, each hop checked
    curl_easy_setopt(h, CURLOPT_FAILONERROR, 1L);     // HTTP >= 400: fail, write no body
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT, opts.connect_timeout_s);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf);
    curl_easy_setopt(h, CURLOPT_USERAGENT, "imagefs/0.1");
    curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(h, CURLOPT_HEADERDATA, &ctx);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &ctx);
    curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, on_progress);
    curl_easy_setopt(h, CURLOPT_XFERINFODATA, &ctx);
    curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(h, CURLOPT_BUFFERSIZE, 512L * 1024);
    if (opts.allow && opts.allow->restricted()) {
        curl_easy_setopt(h, CURLOPT_OPENSOCKETFUNCTION, on_open_socket);
        curl_easy_setopt(h, CURLOPT_OPENSOCKETDATA, &ctx);
    }
    if (opts.tls_insecure) {
        curl_easy_setopt(h, CURLOPT_SSL_VERIFYPEER, 0L);
        curl_easy_setopt(h, CURLOPT_SSL_VERIFYHOST, 0L);
    } else if (opts.tls_ca) {
        curl_blob blob{const_cast<char*>(opts.tls_ca->data()), opts.tls_ca->size(), CURL_BLOB_COPY};
        curl_easy_setopt(h, CURLOPT_CAINFO_BLOB, &blob);
    }

    int64_t offset = opts.resume_offset;
    auto if_range = if_range_value(opts.resume_validator);
    if (!if_range) offset = 0;
    std::unique_ptr<curl_slist, SlistDeleter> extra;
    for (int restarts = 0;; ++restarts) {
        std::string range;
        if (offset > 0) {
            range = std::to_string(offset) + "-";
            extra.reset(curl_slist_append(nullptr, ("If-Range: " + *if_range).c_str()));
        } else {
            extra.reset();
        }
        curl_easy_setopt(h, CURLOPT_RANGE, offset > 0 ? range.c_str() : nullptr);
        curl_easy_setopt(h, CURLOPT_HTTPHEADER, extra.get());
        ctx.requested_offset = offset;

        std::string cur = url;
        long code = 0;
        for (long hop = 0;; ++hop) {
            std::string host = url_host(cur);
            ctx.check_addresses = false;
            if (opts.allow && !opts.allow->host_allowed(host)) {
                uint8_t probe[16];
                bool literal = ::inet_pton(AF_INET, host.c_str(), probe) == 1 ||
                               ::inet_pton(AF_INET6, host.c_str(), probe) == 1;
                if (literal)
                    throw Error(Errc::permission, "host " + host + " of " + cur +
                                                      " is not allowed by " + opts.allow->origin() +
                                                      "; add it or its network there");
                ctx.check_addresses = true;  // allowed only if every address it uses is
            }
            code = perform_once(h, ctx, cur, opts, errbuf);
            if (ctx.refetch || code < 300 || code >= 400) break;
            char* location = nullptr;
            curl_easy_getinfo(h, CURLINFO_REDIRECT_URL, &location);
            if (!location) break;
            if (hop >= opts.max_redirects)
                throw Error(Errc::invalid_argument,
                            "more than " + std::to_string(opts.max_redirects) + " redirects from " +
                                url + " (last to " + location + ")");
            cur = location;
        }
        if (ctx.refetch) {
            if (offset == 0 || restarts > 0)
                throw Error(Errc::network, "unusable partial response (HTTP " +
                                               std::to_string(code) + ") from " + cur);
            offset = 0;  // ask for the whole resource
            continue;
        }
        if (code != 200 && code != 206)
            throw Error(Errc::invalid_argument,
                        "unexpected HTTP " + std::to_string(code) + " from " + cur);
        if (!ctx.begun) {
            // An empty body: on_body never ran.
            HttpResponse r;
            r.status = code;
            r.total_size = 0;
            r.validator = Validator{ctx.headers.etag, ctx.headers.last_modified};
            if (code != 200 || sink.begin_http(r) == ResumeDecision::refetch)
                throw Error(Errc::network,
                            "empty HTTP " + std::to_string(code) + " response from " + cur);
        }
        return;
    }
}

}  // namespace

SourceSpec parse_source(std::string_view source) {
    std::string s(source);
    if (s.empty()) throw Error(Errc::invalid_argument, "the source is empty");
    if (starts_with_ci(s, "http://") || starts_with_ci(s, "https://")) {
        if (s.find_first_of(" \t\r\n") != std::string::npos)
            throw Error(Errc::invalid_argument, "invalid URL '" + s + "': contains whitespace");
        return {SourceKind::http, s};
    }
    if (starts_with_ci(s, "file://")) s = s.substr(7);
    if (s.empty()) throw Error(Errc::invalid_argument, "the source 'file://' names no file");
    if (s.find("://") != std::string::npos)
        throw Error(Errc::invalid_argument,
                    "unsupported source '" + std::string(source) +
                        "': use an http:// or https:// URL or a local file path");
    if (s.front() != '/')
        throw Error(Errc::invalid_argument, "local source '" + s + "' must be an absolute path");
    return {SourceKind::file, s};
}

std::optional<std::string> if_range_value(const Validator& v) {
    if (v.etag && !v.etag->empty() && v.etag->front() == '"') return v.etag;  // strong ETag
    if (v.last_modified && !v.last_modified->empty()) return v.last_modified;
    return std::nullopt;
}

std::optional<ContentRange> parse_content_range(std::string_view value) {
    value = trim(value);
    if (!starts_with_ci(value, "bytes ")) return std::nullopt;
    value = trim(value.substr(6));
    auto dash = value.find('-');
    auto slash = value.find('/');
    if (dash == std::string_view::npos || slash == std::string_view::npos || slash < dash)
        return std::nullopt;
    auto first = parse_i64(value.substr(0, dash));
    auto last = parse_i64(value.substr(dash + 1, slash - dash - 1));
    if (!first || !last || *last < *first) return std::nullopt;
    ContentRange cr{*first, *last, std::nullopt};
    auto total = value.substr(slash + 1);
    if (total != "*") {
        cr.total = parse_i64(total);
        if (!cr.total || *cr.total <= *last) return std::nullopt;
    }
    return cr;
}

std::optional<HttpResponse> interpret_response(long status, std::optional<int64_t> content_length,
                                               const std::optional<std::string>& content_range,
                                               const Validator& validator,
                                               int64_t requested_offset) {
    HttpResponse r;
    r.status = status;
    r.validator = validator;
    if (status == 200) {
        r.offset = 0;
        r.total_size = content_length;
        return r;
    }
    if (status != 206 || !content_range) return std::nullopt;
    auto cr = parse_content_range(*content_range);
    if (!cr || cr->first != requested_offset) return std::nullopt;
    // Only a range that runs to the end of the resource continues an import.
    if (!cr->total || cr->last != *cr->total - 1) return std::nullopt;
    if (content_length && *content_length != cr->last - cr->first + 1) return std::nullopt;
    r.offset = cr->first;
    r.total_size = cr->total;
    return r;
}

ResumeDecision decide_resume(int64_t have, std::optional<int64_t> known_total,
                             const HttpResponse& r) {
    if (r.offset == 0) return ResumeDecision::restart;
    if (r.offset != have) return ResumeDecision::refetch;
    if (known_total && r.total_size && *known_total != *r.total_size)
        return ResumeDecision::refetch;
    return ResumeDecision::append;
}

void fetch(const SourceSpec& src, ByteSink& sink, const FetchOptions& opts) {
    if (src.kind == SourceKind::http)
        fetch_http(src.location, sink, opts);
    else
        fetch_file(src.location, sink, opts.own_device);
}

}  // namespace imagefs
