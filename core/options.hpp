// Command line of imagefsd: `imagefsd [-f] [-d] [-o OPTS] STATE_DIR MOUNTPOINT`.
// Parsed here, without libfuse, so that it is unit-tested and shared with the mount helper.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace imagefs {

enum class OpenMode { wait, eagain };

// What readdir of the mount shows: every image in the catalog (default), or only active ones
// (-o list=active, for libvirt `dir` pools: see docs/libvirt.md). Lookups by name, stat and open
// behave the same in both modes.
enum class ListMode { all, active };

struct DaemonOptions {
    bool foreground = false;
    bool debug = false;  // libfuse request tracing; implies foreground
    bool help = false;
    bool version = false;
    std::string state_dir;
    std::string mountpoint;
    OpenMode open_mode = OpenMode::wait;
    ListMode list_mode = ListMode::all;
    int open_timeout_s = 0;  // 0: wait until the import ends
    std::string log_level = "info";
    std::string log_file;  // empty: stderr in the foreground, syslog otherwise
    int max_imports = 4;
    long connect_timeout_s = 30;
    long stall_timeout_s = 120;
    int64_t retry_delay_ms = 5000;        // first retry after 2.5-5 s, doubling
    int64_t retry_max_delay_ms = 300000;  // never waiting more than 5 min
    bool allow_other = false;
    bool read_only = false;
    int publish_delay_ms = 500;  // grace after a writer's last close before verifying  // -o ro: no
                                 // uploads, renames or removals through the mount
    std::vector<std::string> fuse_options;  // passed to libfuse as -o
};

// Throws Error(invalid_argument) with a message naming the bad option.
DaemonOptions parse_daemon_args(const std::vector<std::string>& args);

// True for options that belong to mount(8), fstab or systemd and mean nothing to the daemon
// (defaults, auto, noauto, nofail, _netdev, user, users, nouser, x-systemd.*, comment=..., ...).
bool is_mount_only_option(const std::string& opt);

// Splits "a,b=c,d" at commas.
std::vector<std::string> split_options(const std::string& s);

std::string daemon_usage();

}  // namespace imagefs
