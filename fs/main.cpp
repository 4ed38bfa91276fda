// imagefsd: the daemon. Sets up everything that can fail before it forks, so that errors reach the
// caller's terminal (and mount(8)) with a non-zero exit; starts threads only after the fork.
#include <sys/mount.h>
#include <sys/stat.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>
#include <climits>
#include <fstream>
#include <sstream>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <iostream>

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/sinks/syslog_sink.h>
#include <spdlog/spdlog.h>

#include "core/error.hpp"
#include "core/options.hpp"
#include "core/statedir.hpp"
#include "fs/imagefs_fs.hpp"
#include "import/importer.hpp"
#include "meta/catalog.hpp"

namespace imagefs {
namespace {

void setup_logging(const DaemonOptions& o, bool daemonized) {
    spdlog::drop("imagefsd");
    std::shared_ptr<spdlog::logger> logger;
    if (!o.log_file.empty())
        logger = spdlog::basic_logger_mt("imagefsd", o.log_file);
    else if (daemonized)
        logger = spdlog::syslog_logger_mt("imagefsd", "imagefsd", LOG_PID, LOG_DAEMON);
    else
        logger = spdlog::stderr_logger_mt("imagefsd");
    logger->set_level(spdlog::level::from_str(o.log_level));
    logger->flush_on(spdlog::level::info);
    spdlog::set_default_logger(logger);
}

std::string escape_option(const std::string& v) {
    std::string out;
    for (char c : v) {
        if (c == ',' || c == '\\') out.push_back('\\');
        out.push_back(c);
    }
    return out;
}

// A mountpoint left behind by a daemon that died answers ENOTCONN: detach it so we can mount again.
// The backing-device id ("MAJOR:MINOR") of the mount at `mnt`, from /proc/self/mountinfo (a stat()
// of the mountpoint would wait for our own INIT).
std::string mount_device(const std::string& mnt) {
    std::ifstream f("/proc/self/mountinfo");
    std::string line, found;
    char real[PATH_MAX];
    std::string want = ::realpath(mnt.c_str(), real) ? real : mnt;
    while (std::getline(f, line)) {
        std::istringstream ss(line);
        std::string id, parent, dev, root, point;
        ss >> id >> parent >> dev >> root >> point;
        if (point == want) found = dev;  // the last one is the newest
    }
    return found;
}

void clear_dead_mount(const std::string& mnt) {
    struct stat st {};
    if (::stat(mnt.c_str(), &st) == 0) return;
    if (errno != ENOTCONN) return;
    spdlog::warn("{} is a dead imagefs mount (transport endpoint not connected); detaching it",
                 mnt);
    if (::umount2(mnt.c_str(), MNT_DETACH) != 0)
        throw Error(Errc::busy, "cannot detach the dead mount at " + mnt + ": " +
                                    std::strerror(errno) + " (run 'fusermount3 -u " + mnt + "')");
}

int run(const DaemonOptions& o) {
    setup_logging(o, false);
    StateDir dir(o.state_dir, true);
    DaemonLock lock(dir);

    ImageFs fsimpl(dir, o);
    {
        // Catalog work before the fork: SQLite connections must not cross a fork().
        Catalog cat(dir.catalog_path().string());
        recover_state_dir(dir, cat);
        int64_t max_id = 0;
        auto rows = cat.list(&max_id);
        fsimpl.catalog_synced(rows, max_id);
    }

    clear_dead_mount(o.mountpoint);
    struct stat st {};
    if (::stat(o.mountpoint.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
        throw Error(Errc::not_found, "mountpoint " + o.mountpoint + " is not a directory");

    std::vector<std::string> argv_s = {
        "imagefsd", "-o",
        std::string(o.read_only ? "ro," : "") +
            "subtype=imagefs,fsname=" + escape_option(dir.root().string())};
    if (o.debug) argv_s.push_back("-d");
    for (const auto& f : o.fuse_options) {
        argv_s.push_back("-o");
        argv_s.push_back(f);
    }
    std::vector<char*> argv;
    for (auto& s : argv_s) argv.push_back(s.data());
    fuse_args args = FUSE_ARGS_INIT(static_cast<int>(argv.size()), argv.data());

    fuse_session* se = fuse_session_new(&args, &ImageFs::ops(), sizeof(fuse_lowlevel_ops), &fsimpl);
    fuse_opt_free_args(&args);  // libfuse may have reallocated them
    if (!se) throw Error(Errc::invalid_argument, "cannot create the FUSE session (see above)");
    std::unique_ptr<fuse_session, void (*)(fuse_session*)> se_guard(se, fuse_session_destroy);
    if (fuse_set_signal_handlers(se) != 0) throw Error(Errc::io, "cannot install signal handlers");
    if (fuse_session_mount(se, o.mountpoint.c_str()) != 0)
        throw Error(Errc::io, "cannot mount on " + o.mountpoint + " (see the message above)");
    fsimpl.set_device(mount_device(o.mountpoint));
    if (fuse_daemonize(o.foreground ? 1 : 0) != 0) throw Error(Errc::io, "cannot daemonize");
    if (!o.foreground) {
        setup_logging(o, true);
        lock.write_pid();
    }

    fsimpl.attach(se);
    fsimpl.start();
    ImportOptions iopts;
    iopts.max_concurrent = o.max_imports;
    iopts.fetch.connect_timeout_s = o.connect_timeout_s;
    iopts.fetch.stall_timeout_s = o.stall_timeout_s;
    iopts.retry.base_delay_ms = o.retry_delay_ms;
    iopts.retry.max_delay_ms = std::max(o.retry_delay_ms, o.retry_max_delay_ms);
    ImportManager manager(dir, iopts, fsimpl);
    fsimpl.on_catalog_change([&manager] { manager.wake(); });
    manager.start();

    spdlog::info("serving {} on {}", dir.root().string(), o.mountpoint);
    sd_notify(0, "READY=1");
    fuse_loop_config* cfg = fuse_loop_cfg_create();
    fuse_loop_cfg_set_max_threads(cfg, 16);
    int rc = fuse_session_loop_mt(se, cfg);
    fuse_loop_cfg_destroy(cfg);
    sd_notify(0, "STOPPING=1");
    spdlog::info("unmounting {}", o.mountpoint);

    manager.stop();
    fsimpl.stop();
    fsimpl.detach();
    fuse_session_unmount(se);
    fuse_remove_signal_handlers(se);
    return rc == 0 ? 0 : 1;
}

}  // namespace
}  // namespace imagefs

int main(int argc, char** argv) {
    using namespace imagefs;
    DaemonOptions o;
    try {
        o = parse_daemon_args(std::vector<std::string>(argv + 1, argv + argc));
    } catch (const Error& e) {
        std::cerr << "imagefsd: " << e.what() << "\n";
        return 2;
    }
    if (o.help) {
        std::cout << daemon_usage();
        return 0;
    }
    if (o.version) {
        std::cout << "imagefsd 0.1.0 (libfuse " << fuse_pkgversion() << ")\n";
        return 0;
    }
    try {
        return run(o);
    } catch (const std::exception& e) {
        spdlog::critical("{}", e.what());
        std::cerr << "imagefsd: " << e.what() << "\n";
        return 1;
    }
}
