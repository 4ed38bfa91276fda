// core/statedir: layout, the daemon lock, daemon_running and poke_daemon.
#include <signal.h>
#include <sys/wait.h>

#include <chrono>
#include <memory>
#include <thread>

#include "core/statedir.hpp"
#include "support.hpp"

using Catch::Matchers::Contains;
using imagefs::DaemonLock;
using imagefs::Errc;
using imagefs::StateDir;
using unit::error_from;

TEST_CASE("statedir: layout and creation", "[statedir]") {
    unit::TempDir t;
    const auto root = t.path() / "state";
    auto missing = error_from([&] { StateDir d(root, false); });
    REQUIRE(missing);
    CHECK(missing->code() == Errc::not_found);
    CHECK_THAT(std::string(missing->what()), Contains(root.string()));

    StateDir d(root, true);
    CHECK(d.root() == root);
    CHECK(unit::fs::is_directory(d.images_dir()));
    CHECK(unit::fs::is_directory(d.staging_dir()));
    CHECK(d.catalog_path() == root / "catalog.db");
    CHECK(d.lock_path() == root / "imagefsd.lock");
    CHECK(d.wakeup_path() == root / "wakeup");
    CHECK(d.image_path(42) == root / "images" / "42.img");
    CHECK(d.staging_path(42) == root / "staging" / "42.part");
    CHECK(d.image_path(int64_t{1} << 40) == root / "images" / "1099511627776.img");

    // Opening an existing one without create is fine.
    StateDir again(root, false);
    CHECK(again.root() == root);

    // A file where the directory should be.
    unit::write_file(t.path() / "file", "x");
    auto notdir = error_from([&] { StateDir f(t.path() / "file", false); });
    REQUIRE(notdir);
    CHECK(notdir->code() == Errc::not_found);
}

TEST_CASE("statedir: a second DaemonLock is refused with busy naming the holder's pid",
          "[statedir]") {
    unit::TempDir t;
    StateDir d(t.path(), true);
    CHECK_FALSE(imagefs::daemon_running(d));  // no lock file yet
    {
        DaemonLock first(d);
        CHECK(unit::read_file(d.lock_path()) == std::to_string(::getpid()) + "\n");
        CHECK(imagefs::daemon_running(d));

        auto e = error_from([&] { DaemonLock second(d); });
        REQUIRE(e);
        CHECK(e->code() == Errc::busy);
        CHECK_THAT(std::string(e->what()), Contains("(pid " + std::to_string(::getpid()) + ")"));
        CHECK_THAT(std::string(e->what()), Contains(d.root().string()));
        // The failed attempt did not disturb the holder.
        CHECK(imagefs::daemon_running(d));
        CHECK(unit::read_file(d.lock_path()) == std::to_string(::getpid()) + "\n");
    }
    CHECK_FALSE(imagefs::daemon_running(d));
    CHECK(unit::fs::exists(d.lock_path()));  // the file stays; only the flock matters

    // Free again.
    DaemonLock third(d);
    CHECK(imagefs::daemon_running(d));
}

TEST_CASE("statedir: the lock is held across fork and released when the holder exits",
          "[statedir]") {
    unit::TempDir t;
    StateDir d(t.path(), true);
    int pipefd[2];
    REQUIRE(::pipe(pipefd) == 0);
    pid_t child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) {
        ::close(pipefd[0]);
        try {
            DaemonLock lock(d);
            char c = 'L';
            if (::write(pipefd[1], &c, 1) != 1) ::_exit(2);
            ::pause();
        } catch (...) {
            ::_exit(3);
        }
        ::_exit(0);
    }
    ::close(pipefd[1]);
    // Never leave the child behind, even when a REQUIRE below ends the test early.
    struct Reaper {
        pid_t pid;
        ~Reaper() {
            if (pid > 0) {
                ::kill(pid, SIGKILL);
                ::waitpid(pid, nullptr, 0);
            }
        }
    } reaper{child};
    char c = 0;
    REQUIRE(::read(pipefd[0], &c, 1) == 1);
    ::close(pipefd[0]);
    CHECK(imagefs::daemon_running(d));
    auto e = error_from([&] { DaemonLock mine(d); });
    REQUIRE(e);
    CHECK(e->code() == Errc::busy);
    CHECK_THAT(std::string(e->what()), Contains("(pid " + std::to_string(child) + ")"));

    ::kill(child, SIGKILL);
    int status = 0;
    REQUIRE(::waitpid(child, &status, 0) == child);
    reaper.pid = 0;
    CHECK(WIFSIGNALED(status));
    CHECK_FALSE(imagefs::daemon_running(d));
    DaemonLock mine(d);
    CHECK(unit::read_file(d.lock_path()) == std::to_string(::getpid()) + "\n");
}

TEST_CASE("statedir: poke_daemon writes the wakeup file only when a daemon runs", "[statedir]") {
    unit::TempDir t;
    StateDir d(t.path(), true);
    CHECK_FALSE(imagefs::poke_daemon(d));
    CHECK_FALSE(unit::fs::exists(d.wakeup_path()));
    DaemonLock lock(d);
    CHECK(imagefs::poke_daemon(d));
    CHECK(unit::read_file(d.wakeup_path()) == "1");
}

TEST_CASE("statedir: a DaemonLock waits for a holder that is stopping, and only for one",
          "[statedir]") {
    using namespace std::chrono_literals;
    using Clock = std::chrono::steady_clock;
    unit::TempDir t;
    StateDir d(t.path(), true);
    auto first = std::make_unique<DaemonLock>(d);

    // A holder that is serving: refused at once, whatever the wait allowed.
    auto t0 = Clock::now();
    auto e = error_from([&] { DaemonLock second(d, 5s); });
    REQUIRE(e);
    CHECK(e->code() == Errc::busy);
    CHECK(Clock::now() - t0 < 1s);

    // A holder that is stopping (after umount): waited for.
    first->mark_stopping();
    CHECK(unit::read_file(d.lock_path()) == std::to_string(::getpid()) + " stopping\n");
    std::thread releaser([&] {
        std::this_thread::sleep_for(300ms);
        first.reset();
    });
    t0 = Clock::now();
    {
        DaemonLock second(d, 5s);
        CHECK(Clock::now() - t0 >= 250ms);
        CHECK(unit::read_file(d.lock_path()) == std::to_string(::getpid()) + "\n");
        releaser.join();

        // A holder that stays stopping longer than the wait allowed: refused after the wait.
        second.mark_stopping();
        t0 = Clock::now();
        e = error_from([&] { DaemonLock third(d, 200ms); });
        REQUIRE(e);
        CHECK(e->code() == Errc::busy);
        CHECK(Clock::now() - t0 >= 200ms);
        CHECK_THAT(std::string(e->what()), Contains("stopping"));
    }
}
