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

constexpr uint64_t bit(int sig) {
    return uint64_t{1} << (sig - 1);
}

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

ExitState parse_exit_state(std::string_view text) {
    // Fields after the command name (which may hold spaces and parentheses) start after the last
    // ')'. Field 3 is the state, field 9 the flags, field 52 the exit code.
    auto close = text.rfind(')');
    if (close == std::string_view::npos) return {true, SIGKILL};
    std::string_view rest = text.substr(close + 1);
    int field = 2;
    uint64_t flags = 0;
    int64_t exit_code = 0;
    size_t pos = 0;
    while (pos < rest.size()) {
        while (pos < rest.size() && rest[pos] == ' ') ++pos;
        size_t end = rest.find(' ', pos);
        if (end == std::string_view::npos) end = rest.size();
        ++field;
        std::string_view tok = rest.substr(pos, end - pos);
        if (field == 9) std::from_chars(tok.data(), tok.data() + tok.size(), flags);
        if (field == 52) std::from_chars(tok.data(), tok.data() + tok.size(), exit_code);
        pos = end;
    }
    constexpr uint64_t kPfExiting = 0x4;
    ExitState st;
    st.exiting = (flags & kPfExiting) != 0;
    st.exit_code = static_cast<int>(exit_code);
    return st;
}

pid_t thread_group_of(pid_t tid) {
    std::string path = "/proc/" + std::to_string(tid) + "/status";
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return tid;
    char buf[1024];
    ssize_t n = ::read(fd, buf, sizeof buf);
    ::close(fd);
    if (n <= 0) return tid;
    std::string_view text(buf, static_cast<size_t>(n));
    auto pos = text.find("\nTgid:");
    if (pos == std::string_view::npos) return tid;
    pos += 6;
    while (pos < text.size() && (text[pos] == ' ' || text[pos] == '\t')) ++pos;
    pid_t tgid = 0;
    std::from_chars(text.data() + pos, text.data() + text.size(), tgid);
    return tgid > 0 ? tgid : tid;
}

ExitState process_exit_state(pid_t tid) {
    std::string path = "/proc/" + std::to_string(tid) + "/stat";
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return {true, SIGKILL};
    char buf[2048];
    ssize_t n = ::read(fd, buf, sizeof buf - 1);
    ::close(fd);
    if (n <= 0) return {true, SIGKILL};
    return parse_exit_state(std::string_view(buf, static_cast<size_t>(n)));
}

}  // namespace imagefs
