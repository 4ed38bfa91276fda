#include "import/retry.hpp"

#include <algorithm>
#include <random>

namespace imagefs {

int64_t backoff_delay_ms(const RetryPolicy& p, int64_t retry, double unit) {
    const int64_t cap = std::max<int64_t>(0, p.max_delay_ms);
    int64_t d = std::clamp<int64_t>(p.base_delay_ms, 0, cap);
    // Doubling stops at the cap, so this never overflows whatever `retry` is.
    for (int64_t i = 1; i < retry && d > 0 && d < cap; ++i) d = std::min(cap, d * 2);
    unit = std::clamp(unit, 0.0, 1.0);
    const int64_t half = d / 2;
    return half + static_cast<int64_t>(static_cast<double>(d - half) * unit);
}

int64_t backoff_delay_ms(const RetryPolicy& p, int64_t retry) {
    thread_local std::mt19937_64 gen{std::random_device{}()};
    return backoff_delay_ms(p, retry, std::uniform_real_distribution<double>(0.0, 1.0)(gen));
}

bool is_retryable(const Error& e) {
    return e.code() == Errc::network;
}

}  // namespace imagefs
