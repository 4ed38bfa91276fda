// import/digest: SHA-256/SHA-512 streaming digests and checksum syntax.
#include "import/digest.hpp"
#include "support.hpp"

using Catch::Matchers::Contains;
using imagefs::Digest;
using imagefs::DigestAlgo;
using imagefs::Errc;
using imagefs::normalize_hex_digest;
using unit::error_from;

namespace {

const std::string kSha256Empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
const std::string kSha256Abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
const std::string kSha512Empty =
    "cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce"
    "47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e";
const std::string kSha512Abc =
    "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
    "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f";

std::string digest_of(DigestAlgo algo, const std::string& data) {
    Digest d(algo);
    d.update(data.data(), data.size());
    return d.hex();
}

std::string upper(std::string s) {
    for (auto& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    return s;
}

}  // namespace

TEST_CASE("digest: known SHA-256 vectors", "[digest]") {
    CHECK(digest_of(DigestAlgo::sha256, "") == kSha256Empty);
    CHECK(digest_of(DigestAlgo::sha256, "abc") == kSha256Abc);
    // Two-block NIST vector.
    CHECK(
        digest_of(DigestAlgo::sha256, "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq") ==
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    // No update() at all is the empty message.
    Digest d(DigestAlgo::sha256);
    CHECK(d.hex() == kSha256Empty);
}

TEST_CASE("digest: known SHA-512 vectors", "[digest]") {
    CHECK(digest_of(DigestAlgo::sha512, "") == kSha512Empty);
    CHECK(digest_of(DigestAlgo::sha512, "abc") == kSha512Abc);
    CHECK(digest_of(DigestAlgo::sha512, "abc").size() == 128);
}

TEST_CASE("digest: streaming in pieces equals hashing at once", "[digest]") {
    const std::string data = unit::random_bytes(3 * 1024 * 1024 + 17, 7);
    Digest whole(DigestAlgo::sha256);
    whole.update(data.data(), data.size());
    Digest pieces(DigestAlgo::sha256);
    size_t off = 0, step = 1;
    while (off < data.size()) {
        size_t n = std::min(step, data.size() - off);
        pieces.update(data.data() + off, n);
        off += n;
        step = step * 3 + 1;
    }
    CHECK(pieces.hex() == whole.hex());

    Digest abc(DigestAlgo::sha512);
    abc.update("a", 1);
    abc.update("", 0);
    abc.update("bc", 2);
    CHECK(abc.hex() == kSha512Abc);
}

TEST_CASE("digest: normalize_hex_digest accepts upper case and returns lower case", "[digest]") {
    CHECK(normalize_hex_digest(DigestAlgo::sha256, kSha256Abc) == kSha256Abc);
    CHECK(normalize_hex_digest(DigestAlgo::sha256, upper(kSha256Abc)) == kSha256Abc);
    CHECK(normalize_hex_digest(DigestAlgo::sha512, upper(kSha512Abc)) == kSha512Abc);
    std::string mixed = kSha512Empty;
    for (size_t i = 0; i < mixed.size(); i += 2)
        mixed[i] = static_cast<char>(std::toupper(static_cast<unsigned char>(mixed[i])));
    CHECK(normalize_hex_digest(DigestAlgo::sha512, mixed) == kSha512Empty);
}

TEST_CASE("digest: normalize_hex_digest rejects wrong lengths and non-hex", "[digest]") {
    struct Case {
        DigestAlgo algo;
        std::string input;
        std::string message_part;
    };
    const std::vector<Case> cases = {
        {DigestAlgo::sha256, "", "expected 64 hex digits, got 0"},
        {DigestAlgo::sha256, kSha256Abc.substr(1), "expected 64 hex digits, got 63"},
        {DigestAlgo::sha256, kSha256Abc + "0", "expected 64 hex digits, got 65"},
        {DigestAlgo::sha256, kSha512Abc, "expected 64 hex digits, got 128"},
        {DigestAlgo::sha512, kSha256Abc, "expected 128 hex digits, got 64"},
        {DigestAlgo::sha256, "g" + kSha256Abc.substr(1), "not hexadecimal"},
        {DigestAlgo::sha256, kSha256Abc.substr(0, 63) + "z", "not hexadecimal"},
        {DigestAlgo::sha256, " " + kSha256Abc, "not hexadecimal"},
        {DigestAlgo::sha256, kSha256Abc + "\n", "not hexadecimal"},
        {DigestAlgo::sha256, "0x" + kSha256Abc.substr(2), "not hexadecimal"},
        {DigestAlgo::sha512, kSha512Abc.substr(0, 64) + "-" + kSha512Abc.substr(65),
         "not hexadecimal"},
    };
    for (const auto& c : cases) {
        INFO("input '" << c.input << "'");
        auto e = error_from([&] { normalize_hex_digest(c.algo, c.input); });
        REQUIRE(e);
        CHECK(e->code() == Errc::invalid_argument);
        CHECK_THAT(std::string(e->what()), Contains(c.message_part));
        CHECK_THAT(std::string(e->what()),
                   Contains(c.algo == DigestAlgo::sha256 ? "sha256" : "sha512"));
    }
}
