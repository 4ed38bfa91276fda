// Streaming message digests over OpenSSL's EVP interface.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>

namespace imagefs {

enum class DigestAlgo { sha256, sha512 };

class Digest {
  public:
    explicit Digest(DigestAlgo algo);
    ~Digest();
    Digest(const Digest&) = delete;
    Digest& operator=(const Digest&) = delete;

    void update(const void* data, size_t len);
    std::string hex();  // finalises; call once

  private:
    struct Ctx;
    std::unique_ptr<Ctx> ctx_;
};

// Lower-case hex of the expected length for `algo`, or Error(invalid_argument) naming the problem.
std::string normalize_hex_digest(DigestAlgo algo, std::string_view hex);

}  // namespace imagefs
