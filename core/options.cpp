#include "core/options.hpp"

#include <charconv>

#include "core/error.hpp"

namespace imagefs {
namespace {

long parse_number(const std::string& opt, const std::string& value, long min, long max) {
    long v = 0;
    auto [p, ec] = std::from_chars(value.data(), value.data() + value.size(), v);
    if (ec != std::errc() || p != value.data() + value.size() || v < min || v > max)
        throw Error(Errc::invalid_argument, "invalid value for -o " + opt + ": '" + value +
                                                "' (expected a number from " + std::to_string(min) +
                                                " to " + std::to_string(max) + ")");
    return v;
}

// SECS with up to three decimals ("2", "0.25"), as milliseconds.
int64_t parse_seconds_ms(const std::string& opt, const std::string& value, int64_t max_s) {
    auto bad = [&] {
        return Error(Errc::invalid_argument, "invalid value for -o " + opt + ": '" + value +
                                                 "' (expected seconds from 0 to " +
                                                 std::to_string(max_s) + ", such as 5 or 0.5)");
    };
    auto dot = value.find('.');
    std::string whole = value.substr(0, dot);
    std::string frac = dot == std::string::npos ? "" : value.substr(dot + 1);
    if ((whole.empty() && frac.empty()) || frac.size() > 3 ||
        whole.find_first_not_of("0123456789") != std::string::npos ||
        frac.find_first_not_of("0123456789") != std::string::npos ||
        (dot != std::string::npos && frac.empty()) || whole.size() > 9)
        throw bad();
    int64_t ms = (whole.empty() ? 0 : std::stoll(whole)) * 1000;
    if (!frac.empty()) ms += std::stoll(frac + std::string(3 - frac.size(), '0'));
    if (ms > max_s * 1000) throw bad();
    return ms;
}

void apply_option(DaemonOptions& o, const std::string& opt) {
    if (opt.empty() || is_mount_only_option(opt)) return;
    auto eq = opt.find('=');
    std::string key = opt.substr(0, eq);
    std::string value = eq == std::string::npos ? "" : opt.substr(eq + 1);
    if (key == "open") {
        if (value == "wait")
            o.open_mode = OpenMode::wait;
        else if (value == "eagain")
            o.open_mode = OpenMode::eagain;
        else
            throw Error(Errc::invalid_argument,
                        "invalid value for -o open: '" + value + "' (expected wait or eagain)");
    } else if (key == "list") {
        if (value == "all")
            o.list_mode = ListMode::all;
        else if (value == "active")
            o.list_mode = ListMode::active;
        else
            throw Error(Errc::invalid_argument,
                        "invalid value for -o list: '" + value + "' (expected all or active)");
    } else if (key == "open_timeout") {
        o.open_timeout_s = static_cast<int>(parse_number(key, value, 0, 86400 * 365));
    } else if (key == "log_level") {
        static const char* levels[] = {"trace", "debug",    "info", "warn",
                                       "error", "critical", "off"};
        bool ok = false;
        for (auto* l : levels) ok = ok || value == l;
        if (!ok)
            throw Error(Errc::invalid_argument,
                        "invalid value for -o log_level: '" + value +
                            "' (expected trace, debug, info, warn, error, critical or off)");
        o.log_level = value;
    } else if (key == "log_file") {
        if (value.empty() || value.front() != '/')
            throw Error(Errc::invalid_argument, "-o log_file needs an absolute path");
        o.log_file = value;
    } else if (key == "max_imports") {
        o.max_imports = static_cast<int>(parse_number(key, value, 1, 64));
    } else if (key == "connect_timeout") {
        o.connect_timeout_s = parse_number(key, value, 1, 3600);
    } else if (key == "stall_timeout") {
        o.stall_timeout_s = parse_number(key, value, 1, 86400);
    } else if (key == "retry_delay") {
        o.retry_delay_ms = parse_seconds_ms(key, value, 86400);
    } else if (key == "retry_max_delay") {
        o.retry_max_delay_ms = parse_seconds_ms(key, value, 7 * 86400);
    } else if (key == "publish_delay_ms") {
        o.publish_delay_ms = static_cast<int>(parse_number(key, value, 0, 60000));
    } else if (key == "rw") {
        o.read_only = false;
    } else if (key == "ro") {
        o.read_only = true;
    } else {
        if (key == "allow_other") o.allow_other = true;
        o.fuse_options.push_back(opt);  // allow_other, default_permissions, fsname=, ...
    }
}

}  // namespace

std::vector<std::string> split_options(const std::string& s) {
    std::vector<std::string> out;
    std::string cur;
    for (char c : s) {
        if (c == ',') {
            out.push_back(cur);
            cur.clear();
        } else {
            cur.push_back(c);
        }
    }
    out.push_back(cur);
    return out;
}

bool is_mount_only_option(const std::string& opt) {
    static const char* exact[] = {"defaults", "auto",       "noauto",      "nofail", "_netdev",
                                  "user",     "users",      "nouser",      "owner",  "group",
                                  "nosuid",   "suid",       "dev",         "nodev",  "exec",
                                  "noexec",   "async",      "sync",        "atime",  "noatime",
                                  "relatime", "norelatime", "strictatime", "loud",   "silent"};
    for (auto* e : exact)
        if (opt == e) return true;
    return opt.rfind("x-", 0) == 0 || opt.rfind("comment=", 0) == 0;
}

DaemonOptions parse_daemon_args(const std::vector<std::string>& args) {
    DaemonOptions o;
    std::vector<std::string> positional;
    for (size_t i = 0; i < args.size(); ++i) {
        const std::string& a = args[i];
        if (a == "-h" || a == "--help") {
            o.help = true;
        } else if (a == "-V" || a == "--version") {
            o.version = true;
        } else if (a == "-f") {
            o.foreground = true;
        } else if (a == "-d") {
            o.debug = o.foreground = true;
        } else if (a == "-o") {
            if (++i == args.size()) throw Error(Errc::invalid_argument, "-o needs a value");
            for (const auto& opt : split_options(args[i])) apply_option(o, opt);
        } else if (a.rfind("-o", 0) == 0) {
            for (const auto& opt : split_options(a.substr(2))) apply_option(o, opt);
        } else if (a == "--") {
            positional.insert(positional.end(), args.begin() + static_cast<long>(i) + 1,
                              args.end());
            break;
        } else if (!a.empty() && a[0] == '-') {
            throw Error(Errc::invalid_argument, "unknown option '" + a + "' (see imagefsd --help)");
        } else {
            positional.push_back(a);
        }
    }
    if (o.help || o.version) return o;
    if (positional.size() != 2)
        throw Error(Errc::invalid_argument,
                    "expected STATE_DIR and MOUNTPOINT (see imagefsd --help)");
    o.state_dir = positional[0];
    o.mountpoint = positional[1];
    return o;
}

std::string daemon_usage() {
    return R"(usage: imagefsd [-f] [-d] [-o OPTION[,OPTION...]] STATE_DIR MOUNTPOINT

Serve the images cataloged in STATE_DIR as files under MOUNTPOINT.
Opening an image that is not yet imported and verified waits until it is.
Without -f, imagefsd returns once the mount answers (exit 0) or fails (exit 1).

  -f                    stay in the foreground, log to stderr (for systemd Type=notify)
  -d                    foreground with libfuse request tracing
  -o OPTIONS            comma-separated mount options:
     open=wait|eagain     blocking opens of images that are not active wait (default)
                          or fail at once with EAGAIN
     list=all|active      directory listings show every image (default) or only active
                          ones (for libvirt dir pools); lookups by name find every image
     open_timeout=SECS    end a waiting open after SECS with ETIMEDOUT (0: no limit, default)
     log_level=LEVEL      trace, debug, info (default), warn, error, critical, off
     log_file=PATH        log to PATH (reopened on SIGHUP) instead of stderr/syslog
     max_imports=N        imports running at once (default 4)
     connect_timeout=SECS HTTP connect timeout (default 30)
     stall_timeout=SECS   fail an HTTP import attempt that receives nothing for SECS
                          (default 120); like other network failures it is retried
     retry_delay=SECS     wait before the first retry of a failed import (default 5; each
                          further retry waits twice as long, each wait randomised to 50-100%)
     retry_max_delay=SECS longest wait between two attempts (default 300)
     publish_delay_ms=MS  after the last writer closes a file written into the mount, wait
                          MS (default 500) for it to be opened again before verifying it
     ro                   refuse writes into the mount (EROFS); imports still run
     rw                   take writes into the mount (the default)
     allow_other          let users other than root use the mount
     (options of mount(8), fstab and systemd such as defaults, noauto, nofail, _netdev and
      x-systemd.* are accepted and ignored; others go to libfuse)
  -h, --help            show this help
  -V, --version         show the version

SIGTERM and SIGINT unmount and stop; SIGHUP reopens the log file. See imagefsd(8).
)";
}

}  // namespace imagefs
