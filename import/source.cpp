#include "import/source.hpp"

#include <curl/curl.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <exception>
#include <memory>
#include <vector>

#include "core/error.hpp"

namespace imagefs {
namespace {

bool starts_with_ci(std::string_view s, std::string_view prefix) {
    if (s.size() < prefix.size()) return false;
    for (size_t i = 0; i < prefix.size(); ++i)
        if (std::tolower(static_cast<unsigned char>(s[i])) != prefix[i]) return false;
    return true;
}

void fetch_file(const std::string& path, ByteSink& sink) {
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

// State shared with libcurl's callbacks. A callback must not throw through C code: it records the
// exception and returns a value that makes curl abort.
struct CurlCtx {
    ByteSink* sink;
    CURL* curl;
    bool begun = false;
    std::exception_ptr error;
};

size_t on_body(char* data, size_t size, size_t nmemb, void* user) {
    auto* c = static_cast<CurlCtx*>(user);
    size_t len = size * nmemb;
    try {
        if (!c->begun) {
            // Headers of the final response (after redirects) are complete here.
            curl_off_t cl = -1;
            curl_easy_getinfo(c->curl, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &cl);
            c->sink->begin(cl >= 0 ? std::optional<int64_t>(cl) : std::nullopt);
            c->begun = true;
        }
        c->sink->write(data, len);
        return len;
    } catch (...) {
        c->error = std::current_exception();
        return 0;  // CURLE_WRITE_ERROR
    }
}

int on_progress(void* user, curl_off_t, curl_off_t, curl_off_t, curl_off_t) {
    auto* c = static_cast<CurlCtx*>(user);
    return c->sink->cancelled() ? 1 : 0;
}

struct CurlGlobal {
    CurlGlobal() { curl_global_init(CURL_GLOBAL_DEFAULT); }
    ~CurlGlobal() { curl_global_cleanup(); }
};

void fetch_http(const std::string& url, ByteSink& sink, const FetchOptions& opts) {
    static CurlGlobal global;
    std::unique_ptr<CURL, void (*)(CURL*)> curl(curl_easy_init(), curl_easy_cleanup);
    if (!curl) throw Error(Errc::io, "cannot initialise libcurl");
    CurlCtx ctx{&sink, curl.get(), false, nullptr};
    char errbuf[CURL_ERROR_SIZE] = {};
    CURL* h = curl.get();
    curl_easy_setopt(h, CURLOPT_URL, url.c_str());
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(h, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(h, CURLOPT_MAXREDIRS, opts.max_redirects);
    curl_easy_setopt(h, CURLOPT_FAILONERROR, 1L);  // HTTP >= 400: fail, write no body
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT, opts.connect_timeout_s);
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_TIME, opts.stall_timeout_s);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf);
    curl_easy_setopt(h, CURLOPT_USERAGENT, "imagefs/0.1");
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &ctx);
    curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, on_progress);
    curl_easy_setopt(h, CURLOPT_XFERINFODATA, &ctx);
    curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(h, CURLOPT_BUFFERSIZE, 512L * 1024);

    CURLcode rc = curl_easy_perform(h);
    if (ctx.error) std::rethrow_exception(ctx.error);
    if (rc == CURLE_ABORTED_BY_CALLBACK) throw Error(Errc::cancelled, "import cancelled");
    if (rc == CURLE_HTTP_RETURNED_ERROR) {
        long code = 0;
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &code);
        throw Error(code == 404 || code == 410 ? Errc::not_found : Errc::network,
                    "HTTP " + std::to_string(code) + " from " + url);
    }
    if (rc != CURLE_OK) {
        std::string detail = errbuf[0] ? errbuf : curl_easy_strerror(rc);
        if (rc == CURLE_OPERATION_TIMEDOUT && ctx.begun)
            detail = "no data for " + std::to_string(opts.stall_timeout_s) + " s (" + detail + ")";
        throw Error(Errc::network, "download of " + url + " failed: " + detail);
    }
    if (!ctx.begun) sink.begin(0);  // empty body: on_body never ran
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

void fetch(const SourceSpec& src, ByteSink& sink, const FetchOptions& opts) {
    if (src.kind == SourceKind::http)
        fetch_http(src.location, sink, opts);
    else
        fetch_file(src.location, sink);
}

}  // namespace imagefs
