// imagefs: the command line client. It writes the catalog directly (SQLite arbitrates between it
// and the daemon) and pokes the daemon, which picks the change up through inotify.
#include <arpa/inet.h>
#include <netdb.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <deque>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "core/error.hpp"
#include "core/statedir.hpp"
#include "import/allowlist.hpp"
#include "import/digest.hpp"
#include "import/source.hpp"
#include "meta/catalog.hpp"

namespace imagefs {
namespace {

using json = nlohmann::json;

json to_json(const ImageRow& r) {
    auto opt = [](const auto& v) -> json { return v ? json(*v) : json(nullptr); };
    return {{"name", r.name},
            {"source", r.source},
            {"source_kind", std::string(to_string(r.kind))},
            {"state", std::string(to_string(r.state))},
            {"expected_size", opt(r.expected_size)},
            {"bytes_imported", r.bytes_imported},
            {"final_size", opt(r.final_size)},
            {"sha256", opt(r.sha256)},
            {"sha512", opt(r.sha512)},
            {"expected_sha256", opt(r.expected_sha256)},
            {"expected_sha512", opt(r.expected_sha512)},
            {"format", opt(r.format)},
            {"virtual_size", opt(r.virtual_size)},
            {"attempts", r.attempts},
            {"max_retries", r.retry_limit()},
            {"last_error", opt(r.last_error)},
            {"next_attempt_at_ms", opt(r.next_attempt_at)},
            {"resume_offset", r.resume_offset},
            {"etag", opt(r.etag)},
            {"last_modified", opt(r.last_modified)},
            {"tls_ca", r.tls_ca.has_value()},
            {"tls_insecure", r.tls_insecure},
            {"created_at_ms", r.created_at},
            {"updated_at_ms", r.updated_at},
            {"activated_at_ms", opt(r.activated_at)}};
}

std::string human(double bytes) {
    const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    while (bytes >= 1024 && u < 4) {
        bytes /= 1024;
        ++u;
    }
    char buf[32];
    std::snprintf(buf, sizeof buf, u ? "%.1f %s" : "%.0f %s", bytes, units[u]);
    return buf;
}

std::string size_of(const ImageRow& r) {
    if (r.final_size) return std::to_string(*r.final_size);
    if (r.expected_size) return std::to_string(*r.expected_size);
    return "-";
}

// "in 4 s (at 12:00:04)" for a unix-ms time in the future, "due now" otherwise.
std::string when(int64_t at_ms) {
    int64_t left = at_ms - now_ms();
    if (left <= 0) return "due now";
    std::time_t t = static_cast<std::time_t>(at_ms / 1000);
    char hm[16];
    std::strftime(hm, sizeof hm, "%H:%M:%S", std::localtime(&t));
    char buf[64];
    std::snprintf(buf, sizeof buf, "in %.1f s (at %s)", double(left) / 1000, hm);
    return buf;
}

void print_status(const ImageRow& r) {
    auto line = [](const char* k, const std::string& v) {
        std::printf("%-16s %s\n", k, v.c_str());
    };
    auto num = [](std::optional<int64_t> v) { return v ? std::to_string(*v) : std::string("-"); };
    line("name:", r.name);
    line("state:", std::string(to_string(r.state)));
    line("source:", r.source);
    line("expected size:", num(r.expected_size));
    line("bytes imported:", std::to_string(r.bytes_imported));
    line("final size:", num(r.final_size));
    line("format:", r.format.value_or("-"));
    line("virtual size:", num(r.virtual_size));
    line("sha256:", r.sha256.value_or("-"));
    if (r.sha512) line("sha512:", *r.sha512);
    if (r.expected_sha256) line("expected sha256:", *r.expected_sha256);
    if (r.expected_sha512) line("expected sha512:", *r.expected_sha512);
    if (r.kind == SourceKind::upload)  // written into the mount: one attempt, no retries
        line("attempts:", std::to_string(r.attempts));
    else
        line("attempts:", std::to_string(r.attempts) + " (at most " +
                              std::to_string(r.retry_limit() + 1) + ": " +
                              std::to_string(r.retry_limit()) + " retries)");
    if (r.state == State::queued && r.next_attempt_at)
        line("next attempt:", when(*r.next_attempt_at));
    if (r.last_error) line("last error:", *r.last_error);
    if (r.resume_offset > 0 && r.state != State::active)
        line("resume from:", std::to_string(r.resume_offset) + " bytes kept in staging");
    if (r.etag || r.last_modified)
        line("validator:", r.etag ? "ETag " + *r.etag : "Last-Modified " + *r.last_modified);
    if (r.tls_insecure)
        line("tls:", "insecure (certificates are not verified)");
    else if (r.tls_ca)
        line("tls:", "CA from --ca-file");
}

// Follows one image until it is active (exit 0) or failed (exit 1). On a terminal a progress bar
// is redrawn in place; otherwise a plain line is printed on every state change and every 5 s.
int wait_for(Catalog& cat, const StateDir& dir, const std::string& name) {
    using Clock = std::chrono::steady_clock;
    const bool tty = ::isatty(STDERR_FILENO);
    std::optional<State> last_state;
    std::optional<int64_t> last_due;
    auto last_line = Clock::now() - std::chrono::hours(1);
    // The rate is measured over the last few seconds of samples (bytes seen at a time), from the
    // first sample taken here: bytes imported before the wait began (a resume) do not count.
    std::deque<std::pair<Clock::time_point, int64_t>> samples;
    double rate = 0;  // bytes/s; 0 while unknown
    bool warned_no_daemon = false;
    for (;;) {
        auto row = cat.find(name);
        if (!row) {
            if (tty) std::fputc('\n', stderr);
            std::fprintf(stderr, "imagefs: image '%s' was removed\n", name.c_str());
            return 1;
        }
        if (!warned_no_daemon && (row->state == State::queued) && !daemon_running(dir)) {
            std::fprintf(stderr,
                         "imagefs: no imagefsd is serving %s; '%s' is queued and will be "
                         "imported when the daemon starts\n",
                         dir.root().c_str(), name.c_str());
            warned_no_daemon = true;
        }
        auto now = Clock::now();
        if (row->state != State::importing ||
            (!samples.empty() && row->bytes_imported < samples.back().second))
            samples.clear();  // not importing, or started again from zero
        else
            samples.emplace_back(now, row->bytes_imported);
        while (samples.size() > 2 && now - samples[1].first >= std::chrono::seconds(5))
            samples.pop_front();
        rate = 0;
        if (samples.size() >= 2) {
            double dt = std::chrono::duration<double>(now - samples.front().first).count();
            if (dt >= 1.0) rate = double(row->bytes_imported - samples.front().second) / dt;
        }
        bool changed = row->state != last_state;
        last_state = row->state;
        std::string progress = human(double(row->bytes_imported));
        int pct = -1;
        if (row->expected_size && *row->expected_size > 0) {
            pct = int(100.0 * double(row->bytes_imported) / double(*row->expected_size));
            progress += " / " + human(double(*row->expected_size));
        }
        std::string eta;
        if (pct >= 0 && rate > 0 && row->state == State::importing) {
            int s = int(double(*row->expected_size - row->bytes_imported) / rate);
            char b[32];
            std::snprintf(b, sizeof b, " ETA %d:%02d", s / 60, s % 60);
            eta = b;
        }
        std::string rate_s =
            row->state == State::importing && rate > 0 ? "  " + human(rate) + "/s" : "";
        if (row->state == State::queued && row->next_attempt_at && row->last_error) {
            // Waiting to retry: say why and when.
            eta = "  retry " + std::to_string(row->attempts) + " of " +
                  std::to_string(row->retry_limit()) + " " + when(*row->next_attempt_at) +
                  " after: " + *row->last_error;
            changed = changed || row->next_attempt_at != last_due;
            last_due = row->next_attempt_at;
        }
        if (tty) {
            std::string bar;
            if (pct >= 0) {
                int filled = std::min(30, pct * 30 / 100);
                bar = "[" + std::string(size_t(filled), '#') +
                      std::string(size_t(30 - filled), ' ') + "] " +
                      std::to_string(std::min(pct, 100)) + "% ";
            }
            std::fprintf(stderr, "\r\033[K%s %-9s %s%s%s%s", name.c_str(),
                         std::string(to_string(row->state)).c_str(), bar.c_str(), progress.c_str(),
                         rate_s.c_str(), eta.c_str());
            std::fflush(stderr);
        } else if (changed || now - last_line >= std::chrono::seconds(5)) {
            std::fprintf(stderr, "%s: %s %s%s%s\n", name.c_str(),
                         std::string(to_string(row->state)).c_str(), progress.c_str(),
                         rate_s.c_str(), eta.c_str());
            last_line = now;
        }
        if (row->state == State::active || row->state == State::failed) {
            if (tty) std::fputc('\n', stderr);
            if (row->state == State::failed) {
                std::fprintf(stderr, "imagefs: import of '%s' failed: %s\n", name.c_str(),
                             row->last_error.value_or("unknown error").c_str());
                return 1;
            }
            return 0;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
}

std::string absolute_source(const std::string& src) {
    SourceSpec spec = parse_source(src.front() == '/' || src.find("://") != std::string::npos
                                       ? src
                                       : fs::absolute(src).string());
    if (spec.kind == SourceKind::file) {
        struct stat st {};
        if (::stat(spec.location.c_str(), &st) != 0)
            throw Error(Errc::not_found,
                        "source file " + spec.location + " does not exist or cannot be read");
        if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode))
            throw Error(Errc::invalid_argument,
                        "source " + spec.location + " is not a regular file");
        if (::access(spec.location.c_str(), R_OK) != 0)
            throw Error(Errc::permission, "source file " + spec.location + " is not readable");
    }
    return spec.location;
}

// Refuses an image that cannot fit in the state dir's file system.
void check_space(const StateDir& dir, int64_t size) {
    struct statvfs sv {};
    if (::statvfs(dir.staging_dir().c_str(), &sv) != 0) return;
    auto avail = static_cast<unsigned long long>(sv.f_bavail) * sv.f_frsize;
    if (static_cast<unsigned long long>(size) > avail)
        throw Error(Errc::no_space, "image needs " + std::to_string(size) + " bytes but " +
                                        dir.root().string() + " has only " + std::to_string(avail) +
                                        " free; free space first");
}

// Refuses a URL whose host the state dir's allow-list does not admit. A name that is not listed
// is admitted if every address it resolves to is in a listed network (the daemon checks again at
// every connection and every redirect).
void check_allowed(const StateDir& dir, const std::string& url) {
    AllowList allow = AllowList::load(dir.allow_path().string());
    std::string host = url_host(url);
    if (allow.host_allowed(host)) return;
    auto refuse = [&](const std::string& why) {
        return Error(Errc::permission, "host '" + host + "' " + why + " " +
                                           dir.allow_path().string() +
                                           "; add it (or its network) there to import from it");
    };
    uint8_t probe[16];
    if (::inet_pton(AF_INET, host.c_str(), probe) == 1 ||
        ::inet_pton(AF_INET6, host.c_str(), probe) == 1)
        throw refuse("is not allowed by");
    addrinfo hints{};
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* res = nullptr;
    if (::getaddrinfo(host.c_str(), nullptr, &hints, &res) != 0 || !res)
        throw refuse("cannot be resolved and is not named in");
    bool all = true;
    for (addrinfo* p = res; p; p = p->ai_next) all = all && allow.address_allowed(p->ai_addr);
    ::freeaddrinfo(res);
    if (!all) throw refuse("is not allowed by");
}

std::string read_ca_file(const std::string& path) {
    std::ifstream f(path);
    if (!f) throw Error(Errc::not_found, "cannot read --ca-file " + path);
    std::stringstream ss;
    ss << f.rdbuf();
    std::string pem = ss.str();
    if (pem.find("-----BEGIN CERTIFICATE-----") == std::string::npos)
        throw Error(
            Errc::invalid_argument,
            "--ca-file " + path + " holds no PEM certificate (-----BEGIN CERTIFICATE-----)");
    return pem;
}

void tell_daemon(const StateDir& dir, const std::string& what) {
    if (!poke_daemon(dir))
        std::fprintf(stderr,
                     "imagefs: note: no imagefsd is serving %s; %s when the daemon starts\n",
                     dir.root().c_str(), what.c_str());
}

}  // namespace
}  // namespace imagefs

int main(int argc, char** argv) {
    using namespace imagefs;
    CLI::App app{"imagefs: manage the images of an imagefs state directory"};
    app.require_subcommand(1);
    const char* env = std::getenv("IMAGEFS_STATE");
    std::string state = env && *env ? env : "/var/lib/imagefs";
    app.add_option("--state", state,
                   "state directory (default $IMAGEFS_STATE or /var/lib/imagefs)");
    app.set_version_flag("-V,--version", "imagefs 0.1.0");

    std::string name, source, sha256, sha512, ca_file;
    int64_t size = -1, retries = -1;
    bool wait = false, as_json = false, insecure = false;

    auto* imp = app.add_subcommand("import", "queue an import of SOURCE (URL or file) as NAME");
    imp->add_option("NAME", name, "image name (the file name in the mount)")->required();
    imp->add_option("SOURCE", source, "http:// or https:// URL, or a local file path")->required();
    auto* o256 = imp->add_option("--sha256", sha256, "expected SHA-256 (hex)");
    imp->add_option("--sha512", sha512, "expected SHA-512 (hex)")->excludes(o256);
    imp->add_option("--size", size, "expected size in bytes, when the source does not say")
        ->check(CLI::NonNegativeNumber);
    imp->add_option("--retries", retries,
                    "retries after a failed attempt (default " + std::to_string(kDefaultRetries) +
                        "; network failures only)")
        ->check(CLI::Range(int64_t(0), int64_t(1000)));
    auto* oca = imp->add_option("--ca-file", ca_file,
                                "PEM file of the CA(s) to trust for https instead of the system's");
    imp->add_flag("--insecure", insecure, "https without checking the certificate (unsafe)")
        ->excludes(oca);
    imp->add_flag("--wait", wait, "follow the import; exit 0 once active, 1 if it fails");

    auto* list = app.add_subcommand("list", "list images");
    list->add_flag("--json", as_json, "print JSON");

    auto* status = app.add_subcommand("status", "show one image");
    status->add_option("NAME", name, "image name")->required();
    status->add_flag("--json", as_json, "print JSON");
    status->add_flag("--wait", wait, "follow until active (exit 0) or failed (exit 1)");

    auto* rm = app.add_subcommand("rm", "remove an image (waiting opens get ENOENT)");
    rm->add_option("NAME", name, "image name")->required();

    auto* retry = app.add_subcommand("retry", "import a failed image again");
    retry->add_option("NAME", name, "image name")->required();
    retry->add_flag("--wait", wait, "follow the import");

    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        if (e.get_exit_code() == 0) return app.exit(e);  // --help, --version
        // Usage errors: one line naming the problem, a pointer to the help, exit status 2.
        std::string what = e.what();
        const auto& rest = app.remaining();
        if (app.get_subcommands().empty() && !rest.empty())
            what = "unknown command '" + rest.front() +
                   "' (commands: import, list, status, rm, retry)";
        std::string help = "imagefs --help";
        for (const auto* sub : app.get_subcommands())
            help = "imagefs " + sub->get_name() + " --help";
        std::fprintf(stderr, "imagefs: %s\nimagefs: see '%s'\n", what.c_str(), help.c_str());
        return 2;
    }

    try {
        bool create = imp->parsed();
        struct stat before {};
        const bool existed = ::stat(state.c_str(), &before) == 0;
        StateDir dir(state, create);
        Catalog cat(dir.catalog_path().string(), create);
        if (create && !existed)  // a typo in --state or IMAGEFS_STATE shows here
            std::fprintf(stderr, "imagefs: note: created the state directory %s\n",
                         dir.root().c_str());
        if (imp->parsed()) {
            NewImage img;
            img.name = name;
            img.source = absolute_source(source);
            img.kind = parse_source(img.source).kind;
            if (size >= 0) img.expected_size = size;
            if (retries >= 0) img.max_retries = retries;
            if ((!ca_file.empty() || insecure) && img.kind != SourceKind::http)
                throw Error(Errc::invalid_argument,
                            "--ca-file and --insecure apply to http(s) sources only");
            if (!ca_file.empty()) img.tls_ca = read_ca_file(ca_file);
            img.tls_insecure = insecure;
            if (img.kind == SourceKind::http) check_allowed(dir, img.source);
            if (size > 0) check_space(dir, size);
            if (!sha256.empty())
                img.expected_sha256 = normalize_hex_digest(DigestAlgo::sha256, sha256);
            if (!sha512.empty())
                img.expected_sha512 = normalize_hex_digest(DigestAlgo::sha512, sha512);
            cat.add(img);
            std::printf("queued '%s' from %s\n", name.c_str(), img.source.c_str());
            if (insecure)
                std::fprintf(stderr,
                             "imagefs: warning: '%s' is fetched without checking the server's "
                             "certificate (--insecure)\n",
                             name.c_str());
            tell_daemon(dir, "it is imported");
            return wait ? wait_for(cat, dir, name) : 0;
        }
        if (list->parsed()) {
            auto rows = cat.list();
            if (as_json) {
                json arr = json::array();
                for (const auto& r : rows) arr.push_back(to_json(r));
                std::cout << arr.dump(2, ' ', false, json::error_handler_t::replace) << "\n";
                return 0;
            }
            std::printf("%-32s %-10s %14s %-6s %s\n", "NAME", "STATE", "SIZE", "FORMAT", "SOURCE");
            for (const auto& r : rows)
                std::printf("%-32s %-10s %14s %-6s %s\n", r.name.c_str(),
                            std::string(to_string(r.state)).c_str(), size_of(r).c_str(),
                            r.format.value_or("-").c_str(), r.source.c_str());
            return 0;
        }
        if (status->parsed()) {
            auto row = cat.find(name);
            if (!row) throw Error(Errc::not_found, "no image named '" + name + "'");
            if (wait) return wait_for(cat, dir, name);
            if (as_json)
                std::cout << to_json(*row).dump(2, ' ', false, json::error_handler_t::replace)
                          << "\n";
            else
                print_status(*row);
            return 0;
        }
        if (rm->parsed()) {
            auto row = cat.remove(name);
            if (!row) throw Error(Errc::not_found, "no image named '" + name + "'");
            // Open readers keep their file descriptors; the daemon also removes these.
            ::unlink(dir.image_path(row->id).c_str());
            ::unlink(dir.staging_path(row->id).c_str());
            std::printf("removed '%s'\n", name.c_str());
            poke_daemon(dir);
            return 0;
        }
        if (retry->parsed()) {
            cat.retry(name);
            std::printf("queued '%s' again\n", name.c_str());
            tell_daemon(dir, "it is imported");
            return wait ? wait_for(cat, dir, name) : 0;
        }
    } catch (const Error& e) {
        std::fprintf(stderr, "imagefs: %s\n", e.what());
        return 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "imagefs: %s\n", e.what());
        return 1;
    }
    return 0;
}
