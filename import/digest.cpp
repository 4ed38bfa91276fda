#include "import/digest.hpp"

#include <openssl/evp.h>

#include <cctype>

#include "core/error.hpp"

namespace imagefs {

struct Digest::Ctx {
    EVP_MD_CTX* md = nullptr;
    ~Ctx() { EVP_MD_CTX_free(md); }
};

Digest::Digest(DigestAlgo algo) : ctx_(std::make_unique<Ctx>()) {
    ctx_->md = EVP_MD_CTX_new();
    const EVP_MD* md = algo == DigestAlgo::sha256 ? EVP_sha256() : EVP_sha512();
    if (!ctx_->md || EVP_DigestInit_ex(ctx_->md, md, nullptr) != 1)
        throw Error(Errc::io, "cannot initialise OpenSSL digest");
}

Digest::~Digest() = default;

void Digest::update(const void* data, size_t len) {
    if (EVP_DigestUpdate(ctx_->md, data, len) != 1) throw Error(Errc::io, "digest update failed");
}

std::string Digest::hex() {
    unsigned char out[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    if (EVP_DigestFinal_ex(ctx_->md, out, &n) != 1) throw Error(Errc::io, "digest final failed");
    static const char* digits = "0123456789abcdef";
    std::string s;
    s.reserve(n * 2);
    for (unsigned i = 0; i < n; ++i) {
        s.push_back(digits[out[i] >> 4]);
        s.push_back(digits[out[i] & 15]);
    }
    return s;
}

std::string normalize_hex_digest(DigestAlgo algo, std::string_view hex) {
    const size_t want = algo == DigestAlgo::sha256 ? 64 : 128;
    const char* name = algo == DigestAlgo::sha256 ? "sha256" : "sha512";
    std::string s;
    for (char c : hex) {
        if (!std::isxdigit(static_cast<unsigned char>(c)))
            throw Error(Errc::invalid_argument, std::string("invalid ") + name + " checksum '" +
                                                    std::string(hex) + "': not hexadecimal");
        s.push_back(static_cast<char>(std::tolower(static_cast<unsigned char>(c))));
    }
    if (s.size() != want)
        throw Error(Errc::invalid_argument, std::string("invalid ") + name +
                                                " checksum: expected " + std::to_string(want) +
                                                " hex digits, got " + std::to_string(s.size()));
    return s;
}

}  // namespace imagefs
