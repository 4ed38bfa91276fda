#pragma once

#include <string_view>

namespace imagefs {

// Throws Error(invalid_argument) naming the problem when `name` cannot be an image name:
// empty, ".", "..", containing '/' or NUL, or longer than 255 bytes (NAME_MAX).
void validate_image_name(std::string_view name);

}  // namespace imagefs
