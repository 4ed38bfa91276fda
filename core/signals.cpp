#include "core/signals.hpp"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <charconv>
#include <string>

namespace imagefs {
namespace {

uint64_t field(std::string_view text, std::string_view key) {
    size_t pos = 0;
    while ((pos = text.find(key, pos)) != std::string_view::npos) {
        if (pos == 0 || text[pos - 1] == '\n') {
            size_t start = pos + key.size();
            while (start < text.size() && (text[start] == ' ' || text[start] == '\t')) ++start;
            uint64_t v = 0;
            std::from_chars(text.data() + start, text.data() + text.size(), v, 16);
            return v;
        }
        pos += key.size();
    }
    return 0;
}

constexpr uint64_t bit(int sig) { return uint64_t{1} << (sig - 1); }

}  // namespace

PendingSignals parse_pending_signals(std::string_view text) {
    return {field(text, "SigPnd:"), field(text, "ShdPnd:")};
}

bool should_abort_wait(const PendingSignals& p) {
    const uint64_t stop = bit(SIGKILL) | bit(SIGINT) | bit(SIGTERM) | bit(SIGHUP) | bit(SIGQUIT);
    return ((p.thread | p.process) & stop) != 0;
}

bool caller_wants_out(pid_t tid) {
    std::string path = "/proc/" + std::to_string(tid) + "/status";
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return true;
    char buf[4096];
    ssize_t n = ::read(fd, buf, sizeof buf);
    ::close(fd);
    if (n <= 0) return true;
    std::string_view text(buf, static_cast<size_t>(n));
    // A zombie or exiting task cannot take a reply anyway.
    if (text.find("State:\tZ") != std::string_view::npos ||
        text.find("State:\tX") != std::string_view::npos)
        return true;
    return should_abort_wait(parse_pending_signals(text));
}

}  // namespace imagefs
