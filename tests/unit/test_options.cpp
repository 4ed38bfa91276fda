// core/options: imagefsd command line and -o option lists.
#include "core/options.hpp"
#include "support.hpp"

using Catch::Matchers::Contains;
using imagefs::DaemonOptions;
using imagefs::Errc;
using imagefs::ListMode;
using imagefs::OpenMode;
using imagefs::parse_daemon_args;
using unit::error_from;

using Args = std::vector<std::string>;

TEST_CASE("options: defaults with only the positional arguments", "[options]") {
    DaemonOptions o = parse_daemon_args({"/var/lib/imagefs", "/mnt/images"});
    CHECK(o.state_dir == "/var/lib/imagefs");
    CHECK(o.mountpoint == "/mnt/images");
    CHECK_FALSE(o.foreground);
    CHECK_FALSE(o.debug);
    CHECK_FALSE(o.help);
    CHECK_FALSE(o.version);
    CHECK(o.open_mode == OpenMode::wait);
    CHECK(o.list_mode == ListMode::all);
    CHECK(o.open_timeout_s == 0);
    CHECK(o.log_level == "info");
    CHECK(o.log_file.empty());
    CHECK(o.max_imports == 4);
    CHECK(o.connect_timeout_s == 30);
    CHECK(o.stall_timeout_s == 120);
    CHECK_FALSE(o.allow_other);
    CHECK(o.fuse_options.empty());
}

TEST_CASE("options: -f -d and option lists", "[options]") {
    DaemonOptions o = parse_daemon_args({"-f", "-o", "open=eagain,open_timeout=5", "/s", "/m"});
    CHECK(o.foreground);
    CHECK_FALSE(o.debug);
    CHECK(o.open_mode == OpenMode::eagain);
    CHECK(o.open_timeout_s == 5);
    CHECK(o.state_dir == "/s");
    CHECK(o.mountpoint == "/m");
    CHECK(o.fuse_options.empty());

    DaemonOptions d = parse_daemon_args({"/s", "-d", "/m"});
    CHECK(d.debug);
    CHECK(d.foreground);

    // Attached form, several -o, later values win.
    DaemonOptions m = parse_daemon_args(
        {"-oopen=eagain", "-o", "log_level=debug,max_imports=8", "-o", "open=wait,open_timeout=0",
         "-o", "connect_timeout=3,stall_timeout=600,log_file=/var/log/imagefsd.log,ro", "/s",
         "/m"});
    CHECK(m.open_mode == OpenMode::wait);
    CHECK(m.open_timeout_s == 0);
    CHECK(m.log_level == "debug");
    CHECK(m.max_imports == 8);
    CHECK(m.connect_timeout_s == 3);
    CHECK(m.stall_timeout_s == 600);
    CHECK(m.log_file == "/var/log/imagefsd.log");
    CHECK(m.fuse_options.empty());  // ro is implied and not passed on

    // Empty items in a list are ignored.
    DaemonOptions e = parse_daemon_args({"-o", ",open=eagain,,", "/s", "/m"});
    CHECK(e.open_mode == OpenMode::eagain);
    CHECK(e.fuse_options.empty());
}

TEST_CASE("options: list=active and list=all choose what readdir shows", "[options]") {
    CHECK(parse_daemon_args({"-o", "list=active", "/s", "/m"}).list_mode == ListMode::active);
    CHECK(parse_daemon_args({"-o", "list=all", "/s", "/m"}).list_mode == ListMode::all);
    // Later values win, and the option combines with others without reaching libfuse.
    DaemonOptions o =
        parse_daemon_args({"-o", "list=active,allow_other", "-o", "open=eagain", "/s", "/m"});
    CHECK(o.list_mode == ListMode::active);
    CHECK(o.open_mode == OpenMode::eagain);
    CHECK(o.fuse_options == std::vector<std::string>{"allow_other"});
    CHECK(parse_daemon_args({"-olist=active", "-o", "list=all", "/s", "/m"}).list_mode ==
          ListMode::all);
    CHECK_THAT(imagefs::daemon_usage(), Contains("list=all|active"));
}

TEST_CASE("options: bad option values are refused naming the option", "[options]") {
    struct Case {
        Args args;
        std::string message_part;
    };
    const std::vector<Case> cases = {
        {{"-o", "open=sometimes", "/s", "/m"}, "-o open: 'sometimes'"},
        {{"-o", "open", "/s", "/m"}, "-o open"},
        {{"-o", "list=pending", "/s", "/m"}, "-o list: 'pending' (expected all or active)"},
        {{"-o", "list", "/s", "/m"}, "-o list: ''"},
        {{"-o", "list=Active", "/s", "/m"}, "-o list: 'Active'"},
        {{"-o", "open_timeout=abc", "/s", "/m"}, "-o open_timeout: 'abc'"},
        {{"-o", "open_timeout=-1", "/s", "/m"}, "-o open_timeout: '-1'"},
        {{"-o", "open_timeout=5s", "/s", "/m"}, "-o open_timeout: '5s'"},
        {{"-o", "open_timeout=", "/s", "/m"}, "-o open_timeout"},
        {{"-o", "open_timeout=99999999999999999999", "/s", "/m"}, "-o open_timeout"},
        {{"-o", "max_imports=0", "/s", "/m"}, "-o max_imports: '0'"},
        {{"-o", "max_imports=65", "/s", "/m"}, "-o max_imports: '65'"},
        {{"-o", "connect_timeout=0", "/s", "/m"}, "-o connect_timeout"},
        {{"-o", "stall_timeout=x", "/s", "/m"}, "-o stall_timeout"},
        {{"-o", "log_level=verbose", "/s", "/m"}, "-o log_level: 'verbose'"},
        {{"-o", "log_file=relative.log", "/s", "/m"}, "-o log_file"},
        {{"-o", "nofail,open=bad", "/s", "/m"}, "-o open: 'bad'"},
        {{"/s", "/m", "-o"}, "-o needs a value"},
        {{"-x", "/s", "/m"}, "unknown option '-x'"},
        {{"--foreground", "/s", "/m"}, "unknown option '--foreground'"},
    };
    for (const auto& c : cases) {
        std::string joined;
        for (const auto& a : c.args) joined += a + " ";
        INFO("args: " << joined);
        auto e = error_from([&] { parse_daemon_args(c.args); });
        REQUIRE(e);
        CHECK(e->code() == Errc::invalid_argument);
        CHECK_THAT(std::string(e->what()), Contains(c.message_part));
    }
    // The valid range is named too.
    auto e = error_from([&] { parse_daemon_args({"-o", "max_imports=100", "/s", "/m"}); });
    REQUIRE(e);
    CHECK_THAT(std::string(e->what()), Contains("from 1 to 64"));
}

TEST_CASE("options: ro and rw choose whether the mount takes writes", "[options]") {
    CHECK_FALSE(parse_daemon_args({"/s", "/m"}).read_only);
    CHECK(parse_daemon_args({"-o", "ro", "/s", "/m"}).read_only);
    CHECK_FALSE(parse_daemon_args({"-o", "ro,rw", "/s", "/m"}).read_only);
    CHECK(parse_daemon_args({"-o", "ro", "/s", "/m"}).fuse_options.empty());
}

TEST_CASE("options: mount-only options are dropped", "[options]") {
    DaemonOptions o = parse_daemon_args(
        {"-o", "defaults,noauto,nofail,_netdev,x-systemd.automount,comment=foo,user", "/s", "/m"});
    CHECK(o.fuse_options.empty());
    CHECK_FALSE(o.allow_other);
    CHECK(o.open_mode == OpenMode::wait);

    for (const char* opt :
         {"defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser",
          "x-systemd.automount", "x-systemd.idle-timeout=60", "x-mount.mkdir", "comment=foo",
          "comment=systemd.automount", "nosuid", "nodev", "noexec", "noatime"}) {
        INFO(opt);
        CHECK(imagefs::is_mount_only_option(opt));
    }
    for (const char* opt : {"allow_other", "default_permissions", "fsname=imagefs", "open=wait",
                            "user_id=0", "commentary", "x"}) {
        INFO(opt);
        CHECK_FALSE(imagefs::is_mount_only_option(opt));
    }
}

TEST_CASE("options: allow_other and other unknown options go to libfuse", "[options]") {
    DaemonOptions o = parse_daemon_args(
        {"-o", "allow_other,nofail,default_permissions,fsname=images,open=eagain", "/s", "/m"});
    CHECK(o.allow_other);
    CHECK(o.fuse_options == Args{"allow_other", "default_permissions", "fsname=images"});
    CHECK(o.open_mode == OpenMode::eagain);
}

TEST_CASE("options: missing or extra positional arguments are refused", "[options]") {
    for (const Args& args : {Args{}, Args{"/s"}, Args{"-f", "/s"}, Args{"-o", "allow_other", "/s"},
                             Args{"/s", "/m", "/extra"}}) {
        auto e = error_from([&] { parse_daemon_args(args); });
        REQUIRE(e);
        CHECK(e->code() == Errc::invalid_argument);
        CHECK_THAT(std::string(e->what()), Contains("expected STATE_DIR and MOUNTPOINT"));
    }
    // "--" ends the options.
    DaemonOptions o = parse_daemon_args({"-f", "--", "-state", "-mnt"});
    CHECK(o.state_dir == "-state");
    CHECK(o.mountpoint == "-mnt");
    CHECK(o.foreground);
}

TEST_CASE("options: help and version need no positional arguments", "[options]") {
    CHECK(parse_daemon_args({"-h"}).help);
    CHECK(parse_daemon_args({"--help"}).help);
    CHECK(parse_daemon_args({"-V"}).version);
    CHECK(parse_daemon_args({"--version"}).version);
    CHECK_THAT(imagefs::daemon_usage(), Contains("usage: imagefsd"));
    CHECK_THAT(imagefs::daemon_usage(), Contains("open=wait|eagain"));
}

TEST_CASE("options: split_options splits at commas and keeps empty items", "[options]") {
    CHECK(imagefs::split_options("a,b=c,d") == Args{"a", "b=c", "d"});
    CHECK(imagefs::split_options("") == Args{""});
    CHECK(imagefs::split_options("a,,b,") == Args{"a", "", "b", ""});
    CHECK(imagefs::split_options("comment=x=y") == Args{"comment=x=y"});
}
