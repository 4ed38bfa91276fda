// Opens that wait for an image to become active, held as FUSE requests (never as sleeping threads).
//
// A waiter is answered exactly once, by whichever thread takes it out of the list: the import
// thread that finishes or fails the image, the watcher thread (deadline, or a caller that wants to
// stop), or the open handler itself when the state changed while it was registering. Registering
// is two steps because libfuse may call the interrupt callback from inside fuse_req_interrupt_func;
// until registered() runs, other threads only note the outcome and leave the reply to the handler.
//
// Interrupts (see core/signals.hpp): the kernel sends at most one per request. An interrupted
// waiter is checked at once and then every 100 ms; it ends with EINTR only when its caller has
// SIGKILL, SIGINT, SIGTERM, SIGHUP or SIGQUIT pending.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

#include "fs/fuse.hpp"

namespace imagefs {

enum class WaitOutcome { ready, failed, removed, timed_out, interrupted, shutdown };

class WaitList {
  public:
    using Clock = std::chrono::steady_clock;
    // Answers a request. Called with no WaitList lock held.
    using Resolver = std::function<void(fuse_req_t, int64_t image_id, WaitOutcome)>;

    explicit WaitList(Resolver resolver);
    ~WaitList();

    void start();
    void stop();  // answers every waiter with `shutdown` and joins the watcher

    // Open handler: add, then fuse_req_interrupt_func, then registered().
    uint64_t add(fuse_req_t req, int64_t image_id, pid_t caller, Clock::time_point deadline);
    void registered(uint64_t handle);
    // Answers one waiter if it is still waiting.
    void resolve(uint64_t handle, WaitOutcome outcome);
    // Answers every waiter of one image.
    void resolve_image(int64_t image_id, WaitOutcome outcome);
    // The interrupt callback.
    void interrupt(fuse_req_t req);

    size_t size() const;

  private:
    struct Waiter {
        fuse_req_t req;
        int64_t image_id;
        pid_t caller;
        Clock::time_point deadline;
        bool registering = true;
        bool interrupted = false;
        std::optional<WaitOutcome> deferred;
    };
    void watch_loop();

    Resolver resolver_;
    // Lock order: mu_ is a leaf. Never held across a reply, a syscall or the resolver.
    mutable std::mutex mu_;
    std::condition_variable cv_;
    std::map<uint64_t, Waiter> waiters_;
    uint64_t next_handle_ = 1;
    bool stopping_ = false;
    std::thread watcher_;
};

}  // namespace imagefs
