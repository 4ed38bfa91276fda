#include "core/names.hpp"

#include <string>

#include "core/error.hpp"

namespace imagefs {

void validate_image_name(std::string_view name) {
    auto bad = [&](const std::string& why) {
        throw Error(Errc::invalid_argument,
                    "invalid image name '" + std::string(name) + "': " + why);
    };
    if (name.empty()) throw Error(Errc::invalid_argument, "invalid image name: the name is empty");
    if (name == "." || name == "..") bad("'.' and '..' are reserved");
    if (name.find('/') != std::string_view::npos) bad("names cannot contain '/'");
    if (name.find('\0') != std::string_view::npos) bad("names cannot contain NUL bytes");
    if (name.size() > 255)
        throw Error(Errc::invalid_argument, "invalid image name: " + std::to_string(name.size()) +
                                                " bytes is longer than the 255-byte limit");
}

}  // namespace imagefs
