// Threads of the daemon's own never take its signals: the FUSE main loop (and the signal policy of
// fs/main.cpp) handles those. Start every helper thread through spawn_quiet.
#pragma once

#include <signal.h>

#include <thread>
#include <utility>

namespace imagefs {

// Starts `f` on a new thread with every signal blocked; the caller's mask is left as it was.
template <class F>
std::thread spawn_quiet(F&& f) {
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    std::thread t(std::forward<F>(f));
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    return t;
}

}  // namespace imagefs
