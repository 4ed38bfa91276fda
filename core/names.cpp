#include "core/names.hpp"

#include <cstdint>
#include <string>

#include "core/error.hpp"

namespace imagefs {

namespace {

// The name with bytes outside printable ASCII written as \xHH, for messages.
std::string printable(std::string_view name) {
    std::string out;
    for (unsigned char c : name) {
        if (c >= 0x20 && c < 0x7f) {
            out += char(c);
        } else {
            static const char* hex = "0123456789abcdef";
            out += "\\x";
            out += hex[c >> 4];
            out += hex[c & 15];
        }
    }
    return out;
}

// Whether `s` is well-formed UTF-8 (no overlong forms, surrogates or code points past U+10FFFF).
bool valid_utf8(std::string_view s) {
    size_t i = 0;
    while (i < s.size()) {
        const auto c = static_cast<unsigned char>(s[i]);
        size_t n;
        uint32_t cp;
        if (c < 0x80) {
            ++i;
            continue;
        } else if ((c & 0xe0) == 0xc0) {
            n = 1;
            cp = c & 0x1f;
        } else if ((c & 0xf0) == 0xe0) {
            n = 2;
            cp = c & 0x0f;
        } else if ((c & 0xf8) == 0xf0) {
            n = 3;
            cp = c & 0x07;
        } else {
            return false;
        }
        if (i + n >= s.size()) return false;  // truncated sequence
        for (size_t k = 1; k <= n; ++k) {
            const auto cc = static_cast<unsigned char>(s[i + k]);
            if ((cc & 0xc0) != 0x80) return false;
            cp = (cp << 6) | (cc & 0x3f);
        }
        static const uint32_t kMin[] = {0, 0x80, 0x800, 0x10000};
        if (cp < kMin[n] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
        i += n + 1;
    }
    return true;
}

}  // namespace

void validate_image_name(std::string_view name) {
    auto bad = [&](const std::string& why) {
        throw Error(Errc::invalid_argument, "invalid image name '" + printable(name) + "': " + why);
    };
    if (name.empty()) throw Error(Errc::invalid_argument, "invalid image name: the name is empty");
    if (name == "." || name == "..") bad("'.' and '..' are reserved");
    if (name.find('/') != std::string_view::npos) bad("names cannot contain '/'");
    if (name.find('\0') != std::string_view::npos) bad("names cannot contain NUL bytes");
    for (unsigned char c : name)
        if (c < 0x20 || c == 0x7f)
            bad("names cannot contain control characters (newline, tab, ...)");
    if (!valid_utf8(name)) bad("names must be valid UTF-8");
    if (name.size() > 255)
        throw Error(Errc::invalid_argument, "invalid image name: " + std::to_string(name.size()) +
                                                " bytes is longer than the 255-byte limit");
}

}  // namespace imagefs
