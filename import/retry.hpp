// When a failed import attempt is tried again, and how long to wait first.
#pragma once

#include <cstdint>
#include <string>

#include "core/error.hpp"

namespace imagefs {

// Exponential backoff with jitter. Before retry n (n = 1 for the first retry) the scheduler waits
// a random time in [d/2, d] where d = min(max_delay_ms, base_delay_ms * 2^(n-1)): the wait grows
// with every failure, never exceeds max_delay_ms, and imports that failed together (a server that
// went down) do not come back in lockstep.
struct RetryPolicy {
    int64_t base_delay_ms = 5000;   // -o retry_delay (seconds)
    int64_t max_delay_ms = 300000;  // -o retry_max_delay (seconds)
};

// `unit` is a random number in [0, 1); values outside are clamped.
int64_t backoff_delay_ms(const RetryPolicy& p, int64_t retry, double unit);
// The same with a random `unit` from a per-thread generator.
int64_t backoff_delay_ms(const RetryPolicy& p, int64_t retry);

// Whether an attempt that failed with `e` may succeed if simply tried again: transport failures,
// stalls, short bodies, HTTP 408/429/5xx (all Errc::network). Anything that needs a person (HTTP
// 404, a wrong checksum, no space, a refused certificate, a host not allowed) is not retryable.
bool is_retryable(const Error& e);

}  // namespace imagefs
