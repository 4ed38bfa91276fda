#include "import/allowlist.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <cctype>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <fstream>
#include <sstream>

#include "core/error.hpp"

namespace imagefs {
namespace {

std::string lower(std::string_view s) {
    std::string out(s);
    for (auto& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return out;
}

std::string_view trim(std::string_view s) {
    while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
    while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
    return s;
}

// Parses an address literal into family + bytes.
bool parse_addr(std::string_view text, int& family, uint8_t* out) {
    std::string s(text);
    if (::inet_pton(AF_INET, s.c_str(), out) == 1) {
        family = AF_INET;
        return true;
    }
    if (::inet_pton(AF_INET6, s.c_str(), out) == 1) {
        family = AF_INET6;
        return true;
    }
    return false;
}

bool valid_name(std::string_view s) {
    if (s.empty() || s.size() > 253) return false;
    for (char c : s)
        if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '.' || c == '_'))
            return false;
    return s.front() != '.' && s.back() != '.';
}

}  // namespace

AllowList AllowList::parse(std::string_view text, const std::string& origin) {
    AllowList a;
    a.restricted_ = true;
    a.origin_ = origin;
    std::istringstream in{std::string(text)};
    std::string raw;
    int lineno = 0;
    while (std::getline(in, raw)) {
        ++lineno;
        std::string_view line = raw;
        if (auto hash = line.find('#'); hash != std::string_view::npos) line = line.substr(0, hash);
        line = trim(line);
        if (line.empty()) continue;
        auto bad = [&](const std::string& why) {
            return Error(Errc::invalid_argument, origin + " line " + std::to_string(lineno) +
                                                     ": '" + std::string(line) + "' " + why +
                                                     " (expected a host name, *.domain, an "
                                                     "address or a network such as 10.0.0.0/8)");
        };
        std::string_view addr_part = line;
        std::optional<int> prefix;
        if (auto slash = line.find('/'); slash != std::string_view::npos) {
            addr_part = line.substr(0, slash);
            auto p = line.substr(slash + 1);
            int v = -1;
            auto [end, ec] = std::from_chars(p.data(), p.data() + p.size(), v);
            if (ec != std::errc() || end != p.data() + p.size())
                throw bad("has a bad prefix length");
            prefix = v;
        }
        Net n;
        if (parse_addr(addr_part, n.family, n.addr.data())) {
            int max = n.family == AF_INET ? 32 : 128;
            n.prefix = prefix.value_or(max);
            if (n.prefix < 0 || n.prefix > max)
                throw bad("has a prefix length outside 0.." + std::to_string(max));
            a.nets_.push_back(n);
            continue;
        }
        if (prefix) throw bad("is not a network");
        std::string name = lower(line);
        if (name.rfind("*.", 0) == 0) {
            if (!valid_name(name.substr(2))) throw bad("is not a valid domain");
            a.names_.push_back(name.substr(1));  // ".example.org"
        } else {
            if (!valid_name(name)) throw bad("is not a valid host name");
            a.names_.push_back(name);
        }
    }
    return a;
}

AllowList AllowList::load(const std::string& path) {
    std::ifstream f(path);
    if (!f) {
        if (errno == ENOENT) return AllowList();
        throw_errno("cannot read " + path, errno);
    }
    std::stringstream ss;
    ss << f.rdbuf();
    return parse(ss.str(), path);
}

bool AllowList::in_nets(int family, const uint8_t* addr) const {
    for (const auto& n : nets_) {
        if (n.family != family) continue;
        int full = n.prefix / 8, rest = n.prefix % 8;
        if (std::memcmp(n.addr.data(), addr, static_cast<size_t>(full)) != 0) continue;
        if (rest) {
            auto mask = static_cast<uint8_t>(0xff << (8 - rest));
            if ((n.addr[static_cast<size_t>(full)] & mask) != (addr[full] & mask)) continue;
        }
        return true;
    }
    return false;
}

bool AllowList::address_allowed(const sockaddr* sa) const {
    if (!restricted_) return true;
    if (!sa) return false;
    if (sa->sa_family == AF_INET) {
        const auto* in = reinterpret_cast<const sockaddr_in*>(sa);
        return in_nets(AF_INET, reinterpret_cast<const uint8_t*>(&in->sin_addr));
    }
    if (sa->sa_family == AF_INET6) {
        const auto* in6 = reinterpret_cast<const sockaddr_in6*>(sa);
        const auto* b = reinterpret_cast<const uint8_t*>(&in6->sin6_addr);
        if (in_nets(AF_INET6, b)) return true;
        // An IPv4-mapped address (::ffff:a.b.c.d) matches IPv4 entries too.
        static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
        return std::memcmp(b, mapped, 12) == 0 && in_nets(AF_INET, b + 12);
    }
    return false;
}

bool AllowList::address_allowed(std::string_view literal) const {
    uint8_t buf[16];
    int family = 0;
    if (!parse_addr(literal, family, buf)) return false;
    return !restricted_ || in_nets(family, buf);
}

bool AllowList::host_allowed(std::string_view host) const {
    if (!restricted_) return true;
    std::string h = lower(host);
    while (!h.empty() && h.back() == '.') h.pop_back();  // "example.org." is example.org
    uint8_t buf[16];
    int family = 0;
    if (parse_addr(h, family, buf)) return in_nets(family, buf);
    for (const auto& n : names_) {
        if (n.front() == '.') {
            if (h.size() > n.size() && h.compare(h.size() - n.size(), n.size(), n) == 0)
                return true;
        } else if (h == n) {
            return true;
        }
    }
    return false;
}

std::string url_host(std::string_view url) {
    auto scheme = url.find("://");
    if (scheme == std::string_view::npos) return "";
    auto rest = url.substr(scheme + 3);
    rest = rest.substr(0, rest.find_first_of("/?#"));
    if (auto at = rest.rfind('@'); at != std::string_view::npos) rest = rest.substr(at + 1);
    if (!rest.empty() && rest.front() == '[') {
        auto close = rest.find(']');
        return close == std::string_view::npos ? "" : lower(rest.substr(1, close - 1));
    }
    return lower(rest.substr(0, rest.find(':')));
}

}  // namespace imagefs
