// core/signals: deciding whether a waiting open() should give up, from /proc status.
#include <pthread.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#include <chrono>
#include <thread>

#include "core/signals.hpp"
#include "support.hpp"

using imagefs::caller_wants_out;
using imagefs::parse_pending_signals;
using imagefs::PendingSignals;
using imagefs::should_abort_wait;

namespace {

uint64_t bit(int sig) {
    return uint64_t{1} << (sig - 1);
}

// A /proc/PID/status as Linux 6.1 writes it, with the two pending masks given.
std::string status_text(const std::string& sigpnd, const std::string& shdpnd,
                        const std::string& state = "S (sleeping)") {
    return "Name:\tqemu-system-x86\n"
           "Umask:\t0022\n"
           "State:\t" +
           state +
           "\n"
           "Tgid:\t4242\n"
           "Ngid:\t0\n"
           "Pid:\t4243\n"
           "PPid:\t1\n"
           "TracerPid:\t0\n"
           "Uid:\t0\t0\t0\t0\n"
           "Gid:\t0\t0\t0\t0\n"
           "FDSize:\t64\n"
           "Groups:\t \n"
           "VmPeak:\t  123456 kB\n"
           "VmRSS:\t   65432 kB\n"
           "Threads:\t3\n"
           "SigQ:\t1/63412\n"
           "SigPnd:\t" +
           sigpnd +
           "\n"
           "ShdPnd:\t" +
           shdpnd +
           "\n"
           "SigBlk:\tfffffffe7ffbfeff\n"
           "SigIgn:\t0000000000001000\n"
           "SigCgt:\t0000000180004a02\n"
           "CapInh:\t0000000000000000\n"
           "CapPrm:\t000001ffffffffff\n"
           "Seccomp:\t0\n"
           "Cpus_allowed:\tff\n"
           "Cpus_allowed_list:\t0-7\n"
           "voluntary_ctxt_switches:\t150\n"
           "nonvoluntary_ctxt_switches:\t545\n";
}

std::string state_of(pid_t pid) {
    try {
        std::string s = unit::read_file("/proc/" + std::to_string(pid) + "/status");
        auto p = s.find("State:\t");
        return p == std::string::npos ? "" : s.substr(p + 7, 1);
    } catch (const std::exception&) {
        return "";
    }
}

}  // namespace

TEST_CASE("signals: parse_pending_signals reads SigPnd and ShdPnd", "[signals]") {
    PendingSignals p = parse_pending_signals(status_text("0000000000000100", "0000000000004002"));
    CHECK(p.thread == 0x100);
    CHECK(p.process == 0x4002);

    PendingSignals none =
        parse_pending_signals(status_text("0000000000000000", "0000000000000000"));
    CHECK(none.thread == 0);
    CHECK(none.process == 0);

    // Full 64-bit masks (real-time signals set).
    PendingSignals high =
        parse_pending_signals(status_text("8000000000000001", "ffffffffffffffff"));
    CHECK(high.thread == 0x8000000000000001ULL);
    CHECK(high.process == 0xffffffffffffffffULL);

    // SigBlk/SigIgn/SigCgt are not mistaken for the pending masks.
    CHECK(parse_pending_signals("SigBlk:\tffffffffffffffff\nSigIgn:\t1\n").thread == 0);
    // Missing lines read as empty sets; a key in the middle of a line is not a field.
    PendingSignals partial =
        parse_pending_signals("Name:\tx\nXSigPnd:\tff\nShdPnd:\t  0000000000000004\n");
    CHECK(partial.thread == 0);
    CHECK(partial.process == 4);
    CHECK(parse_pending_signals("").thread == 0);
}

TEST_CASE("signals: fatal signals end the wait in either pending set", "[signals]") {
    for (int sig : {SIGKILL, SIGINT, SIGTERM, SIGHUP, SIGQUIT}) {
        INFO("signal " << sig);
        CHECK(should_abort_wait({bit(sig), 0}));
        CHECK(should_abort_wait({0, bit(sig)}));
        CHECK(should_abort_wait({bit(sig) | bit(SIGCHLD), bit(SIGALRM)}));
        char hex[17];
        std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(bit(sig)));
        CHECK(should_abort_wait(parse_pending_signals(status_text(hex, "0000000000000000"))));
        CHECK(should_abort_wait(parse_pending_signals(status_text("0000000000000000", hex))));
    }
}

TEST_CASE("signals: harmless signals do not end the wait", "[signals]") {
    for (int sig : {SIGCHLD, SIGALRM, SIGWINCH, SIGURG, SIGUSR1, SIGUSR2, SIGPIPE, SIGCONT, SIGIO,
                    SIGPROF, SIGRTMIN, SIGRTMAX}) {
        INFO("signal " << sig);
        CHECK_FALSE(should_abort_wait({bit(sig), 0}));
        CHECK_FALSE(should_abort_wait({0, bit(sig)}));
    }
    const uint64_t all_harmless = bit(SIGCHLD) | bit(SIGALRM) | bit(SIGWINCH) | bit(SIGURG);
    CHECK_FALSE(should_abort_wait({all_harmless, all_harmless}));
    CHECK_FALSE(should_abort_wait({0, 0}));
    char hex[17];
    std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(all_harmless));
    CHECK_FALSE(should_abort_wait(parse_pending_signals(status_text(hex, hex))));
}

TEST_CASE("signals: caller_wants_out for this process and for a missing pid", "[signals]") {
    CHECK_FALSE(caller_wants_out(::getpid()));
    CHECK_FALSE(caller_wants_out(static_cast<pid_t>(::syscall(SYS_gettid))));

    // pid_max itself is never a valid pid.
    long pid_max = std::stol(unit::read_file("/proc/sys/kernel/pid_max"));
    CHECK(caller_wants_out(static_cast<pid_t>(pid_max)));
    CHECK(caller_wants_out(-1));
}

TEST_CASE("signals: caller_wants_out for a zombie and for a reaped child", "[signals]") {
    pid_t child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) ::_exit(0);
    // Wait until it is a zombie (not reaped yet).
    for (int i = 0; i < 500 && state_of(child) != "Z"; ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    REQUIRE(state_of(child) == "Z");
    CHECK(caller_wants_out(child));
    int status = 0;
    REQUIRE(::waitpid(child, &status, 0) == child);
    CHECK(caller_wants_out(child));
}

TEST_CASE("signals: caller_wants_out sees a thread's own pending signals", "[signals]") {
    // A thread that blocks SIGTERM/SIGCHLD and has one sent to it keeps it in its SigPnd.
    auto run = [](int sig) {
        bool wants_out = false;
        bool consumed = false;
        std::thread th([&] {
            sigset_t set;
            sigemptyset(&set);
            sigaddset(&set, sig);
            pthread_sigmask(SIG_BLOCK, &set, nullptr);
            pid_t tid = static_cast<pid_t>(::syscall(SYS_gettid));
            pthread_kill(pthread_self(), sig);
            wants_out = caller_wants_out(tid);
            timespec zero{0, 0};
            consumed = sigtimedwait(&set, nullptr, &zero) == sig;
        });
        th.join();
        REQUIRE(consumed);
        return wants_out;
    };
    CHECK(run(SIGTERM));
    CHECK(run(SIGINT));
    CHECK_FALSE(run(SIGCHLD));
    CHECK_FALSE(run(SIGWINCH));
    CHECK_FALSE(caller_wants_out(::getpid()));
}
