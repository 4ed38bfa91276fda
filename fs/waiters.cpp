#include "fs/waiters.hpp"

#include <vector>

#include "core/signals.hpp"
#include "core/thread.hpp"

namespace imagefs {

WaitList::WaitList(Resolver resolver) : resolver_(std::move(resolver)) {}

WaitList::~WaitList() {
    stop();
}

void WaitList::start() {
    watcher_ = spawn_quiet([this] { watch_loop(); });
}

void WaitList::stop() {
    std::vector<std::pair<fuse_req_t, int64_t>> left;
    {
        std::lock_guard lk(mu_);
        stopping_ = true;
        for (auto it = waiters_.begin(); it != waiters_.end();) {
            if (it->second.registering) {  // the handler answers it when it returns
                it->second.deferred = WaitOutcome::shutdown;
                ++it;
                continue;
            }
            left.emplace_back(it->second.req, it->second.image_id);
            it = waiters_.erase(it);
        }
    }
    cv_.notify_all();
    for (auto& [req, id] : left) resolver_(req, id, WaitOutcome::shutdown);
    if (watcher_.joinable()) watcher_.join();
}

uint64_t WaitList::add(fuse_req_t req, int64_t image_id, pid_t caller, Clock::time_point deadline) {
    std::lock_guard lk(mu_);
    uint64_t h = next_handle_++;
    waiters_.emplace(h, Waiter{req, image_id, caller, deadline, true, false, std::nullopt});
    return h;
}

void WaitList::registered(uint64_t handle) {
    std::optional<WaitOutcome> outcome;
    fuse_req_t req = nullptr;
    int64_t id = 0;
    {
        std::lock_guard lk(mu_);
        auto it = waiters_.find(handle);
        if (it == waiters_.end()) return;
        it->second.registering = false;
        if (stopping_ && !it->second.deferred) it->second.deferred = WaitOutcome::shutdown;
        if (it->second.deferred) {
            outcome = it->second.deferred;
            req = it->second.req;
            id = it->second.image_id;
            waiters_.erase(it);
        }
    }
    if (outcome)
        resolver_(req, id, *outcome);
    else
        cv_.notify_all();  // the watcher learns the new deadline, or an early interrupt
}

void WaitList::resolve(uint64_t handle, WaitOutcome outcome) {
    fuse_req_t req;
    int64_t id;
    {
        std::lock_guard lk(mu_);
        auto it = waiters_.find(handle);
        if (it == waiters_.end()) return;
        if (it->second.registering) {
            if (!it->second.deferred) it->second.deferred = outcome;
            return;
        }
        req = it->second.req;
        id = it->second.image_id;
        waiters_.erase(it);
    }
    resolver_(req, id, outcome);
}

void WaitList::resolve_image(int64_t image_id, WaitOutcome outcome) {
    std::vector<fuse_req_t> reqs;
    {
        std::lock_guard lk(mu_);
        for (auto it = waiters_.begin(); it != waiters_.end();) {
            Waiter& w = it->second;
            if (w.image_id != image_id) {
                ++it;
            } else if (w.registering) {
                if (!w.deferred) w.deferred = outcome;
                ++it;
            } else {
                reqs.push_back(w.req);
                it = waiters_.erase(it);
            }
        }
    }
    for (auto* r : reqs) resolver_(r, image_id, outcome);
}

void WaitList::interrupt(fuse_req_t req) {
    {
        std::lock_guard lk(mu_);
        for (auto& [h, w] : waiters_)
            if (w.req == req) w.interrupted = true;
    }
    cv_.notify_all();
}

size_t WaitList::size() const {
    std::lock_guard lk(mu_);
    return waiters_.size();
}

void WaitList::watch_loop() {
    using namespace std::chrono_literals;
    std::unique_lock lk(mu_);
    while (!stopping_) {
        auto now = Clock::now();
        std::vector<std::pair<uint64_t, pid_t>> to_check;
        std::vector<uint64_t> expired;
        auto next = Clock::time_point::max();
        for (auto& [h, w] : waiters_) {
            if (w.registering) continue;
            if (w.deadline <= now) {
                expired.push_back(h);
                continue;
            }
            next = std::min(next, w.deadline);
            if (w.interrupted) to_check.emplace_back(h, w.caller);
        }
        if (!to_check.empty()) next = std::min(next, now + 100ms);
        if (!expired.empty() || !to_check.empty()) {
            lk.unlock();
            for (auto h : expired) resolve(h, WaitOutcome::timed_out);
            for (auto [h, pid] : to_check)
                if (caller_wants_out(pid)) resolve(h, WaitOutcome::interrupted);
            lk.lock();
            if (!expired.empty()) continue;
        }
        if (stopping_) break;
        if (next == Clock::time_point::max())
            cv_.wait(lk);
        else
            cv_.wait_until(lk, next);
    }
}

}  // namespace imagefs
