// Which hosts HTTP(S) imports may contact: STATE_DIR/sources.allow.
//
// Without that file every host is allowed (the default). With it, a request goes ahead only if
// its host (of the URL given, and again of every redirect) matches a name entry, or if the
// address it is about to connect to lies in an address entry. One entry per line; '#' starts a
// comment:
//   images.example.org     that host name (case-insensitive)
//   *.example.org          any host name ending in .example.org
//   192.0.2.10, ::1        that address
//   10.0.0.0/8, fd00::/8   a network (CIDR)
// Local file sources are not affected.
#pragma once

#include <sys/socket.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace imagefs {

class AllowList {
  public:
    // Everything allowed.
    AllowList() = default;
    // Parses the file's text; Error(invalid_argument) naming `origin` and the line for a bad entry.
    static AllowList parse(std::string_view text, const std::string& origin);
    // Reads `path`; a missing file means everything is allowed.
    static AllowList load(const std::string& path);

    bool restricted() const { return restricted_; }
    const std::string& origin() const { return origin_; }

    // The host of a URL (a name, or an address literal without brackets).
    bool host_allowed(std::string_view host) const;
    bool address_allowed(const sockaddr* sa) const;
    bool address_allowed(std::string_view literal) const;  // false if not an address

  private:
    struct Net {
        int family = 0;                  // AF_INET or AF_INET6
        std::array<uint8_t, 16> addr{};  // network byte order; 4 bytes used for AF_INET
        int prefix = 0;
    };
    bool in_nets(int family, const uint8_t* addr) const;

    bool restricted_ = false;
    std::string origin_;
    std::vector<std::string> names_;  // lower case; "*.x" kept as ".x"
    std::vector<Net> nets_;
};

// The host part of an http(s) URL, lower-cased, IPv6 brackets removed; empty if there is none.
std::string url_host(std::string_view url);

}  // namespace imagefs
