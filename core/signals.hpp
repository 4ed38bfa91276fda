// What a waiting open() should do about the signals pending for its caller.
//
// The kernel sends one FUSE_INTERRUPT per request, on the first signal of any kind. Failing the
// open then breaks programs that merely got a SIGCHLD or SIGALRM (SA_RESTART does not cover an
// EINTR that the filesystem returns); ignoring it makes the caller unkillable (a request the
// daemon has read cannot be abandoned). So the daemon reads the caller's pending signals from
// /proc and ends the wait only for a signal that is meant to stop the caller.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string_view>

namespace imagefs {

struct PendingSignals {
    uint64_t thread = 0;   // SigPnd
    uint64_t process = 0;  // ShdPnd
};

// Parses the SigPnd and ShdPnd lines of a /proc/PID/status text.
PendingSignals parse_pending_signals(std::string_view status_text);

// True when the pending set holds SIGKILL (how the kernel shows a fatal signal) or SIGINT, SIGTERM,
// SIGHUP or SIGQUIT (with or without a handler).
bool should_abort_wait(const PendingSignals& p);

// Reads /proc/TID/status. A caller that no longer exists counts as aborting.
bool caller_wants_out(pid_t tid);

// How a process that is closing a file is doing: a writer killed before it finished closes its
// files while exiting, and that must not publish what it wrote.
struct ExitState {
    bool exiting = false;  // PF_EXITING: the close happens inside exit()
    int exit_code = 0;     // wait status as waitpid(2) reports it (valid while exiting)
};
ExitState parse_exit_state(std::string_view stat_text);

// The process (thread group) a thread belongs to, from /proc/TID/status; `tid` if unknown.
pid_t thread_group_of(pid_t tid);
ExitState process_exit_state(pid_t tid);  // reads /proc/TID/stat; a vanished task counts as killed

}  // namespace imagefs
