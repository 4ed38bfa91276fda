// Helpers shared by the unit tests: temp dirs, whole-file I/O, error capture and readable
// Catch2 printing of imagefs types.
#pragma once

#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <boost/filesystem.hpp>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <optional>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#define CATCH_CONFIG_ENABLE_OPTIONAL_STRINGMAKER
#include <catch2/catch.hpp>

#include "core/error.hpp"
#include "meta/catalog.hpp"

namespace unit {

namespace fs = boost::filesystem;

// A fresh directory under /tmp (mkdtemp), removed with everything in it on destruction.
class TempDir {
  public:
    TempDir() {
        char tmpl[] = "/tmp/imagefs-unit-XXXXXX";
        if (!::mkdtemp(tmpl))
            throw std::runtime_error(std::string("mkdtemp: ") + std::strerror(errno));
        path_ = tmpl;
    }
    ~TempDir() {
        boost::system::error_code ec;
        fs::remove_all(path_, ec);
    }
    TempDir(const TempDir&) = delete;
    TempDir& operator=(const TempDir&) = delete;

    const fs::path& path() const { return path_; }
    std::string str(const std::string& child = "") const {
        return child.empty() ? path_.string() : (path_ / child).string();
    }

  private:
    fs::path path_;
};

inline std::string read_file(const fs::path& p) {
    std::ifstream in(p.string(), std::ios::binary);
    if (!in) throw std::runtime_error("cannot read " + p.string());
    std::ostringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

inline void write_file(const fs::path& p, const std::string& data) {
    std::ofstream out(p.string(), std::ios::binary | std::ios::trunc);
    if (!out) throw std::runtime_error("cannot write " + p.string());
    out.write(data.data(), static_cast<std::streamsize>(data.size()));
    if (!out) throw std::runtime_error("short write to " + p.string());
}

// "" when equal, else where the two byte strings first differ (keeps failure output short).
inline std::string diff_bytes(const std::string& a, const std::string& b) {
    size_t n = std::min(a.size(), b.size());
    for (size_t i = 0; i < n; ++i)
        if (a[i] != b[i]) {
            std::ostringstream ss;
            ss << "first difference at offset " << i << ": 0x" << std::hex
               << (static_cast<unsigned>(a[i]) & 0xff) << " vs 0x"
               << (static_cast<unsigned>(b[i]) & 0xff) << std::dec << " (sizes " << a.size()
               << " and " << b.size() << ")";
            return ss.str();
        }
    if (a.size() != b.size())
        return "sizes differ: " + std::to_string(a.size()) + " and " + std::to_string(b.size());
    return "";
}

// Deterministic pseudo-random bytes.
inline std::string random_bytes(size_t n, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::string s(n, '\0');
    for (size_t i = 0; i < n; i += 8) {
        uint64_t v = rng();
        for (size_t j = 0; j < 8 && i + j < n; ++j)
            s[i + j] = static_cast<char>((v >> (8 * j)) & 0xff);
    }
    return s;
}

// Names of the entries of a directory, sorted.
inline std::vector<std::string> dir_entries(const fs::path& d) {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(d)) out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
}

// Runs f and returns the imagefs::Error it threw, or nullopt if it returned normally. Any other
// exception escapes and fails the test.
template <class F>
std::optional<imagefs::Error> error_from(F&& f) {
    try {
        f();
    } catch (const imagefs::Error& e) {
        return e;
    }
    return std::nullopt;
}

template <class T>
std::string opt_str(const std::optional<T>& v) {
    if (!v) return "null";
    std::ostringstream ss;
    ss << *v;
    return ss.str();
}

// Every field of a row, for exact whole-row comparisons with readable diffs.
inline std::string dump(const imagefs::ImageRow& r) {
    std::ostringstream ss;
    ss << "{id=" << r.id << " name=" << r.name << " source=" << r.source
       << " kind=" << imagefs::to_string(r.kind) << " state=" << imagefs::to_string(r.state)
       << " expected_size=" << opt_str(r.expected_size) << " bytes=" << r.bytes_imported
       << " final_size=" << opt_str(r.final_size) << " sha256=" << opt_str(r.sha256)
       << " sha512=" << opt_str(r.sha512) << " exp256=" << opt_str(r.expected_sha256)
       << " exp512=" << opt_str(r.expected_sha512) << " format=" << opt_str(r.format)
       << " vsize=" << opt_str(r.virtual_size) << " attempts=" << r.attempts
       << " last_error=" << opt_str(r.last_error) << " created=" << r.created_at
       << " updated=" << r.updated_at << " activated=" << opt_str(r.activated_at)
       << " token=" << r.import_token << "}";
    return ss.str();
}

}  // namespace unit

namespace Catch {
template <>
struct StringMaker<imagefs::Errc> {
    static std::string convert(imagefs::Errc c) { return std::string(imagefs::to_string(c)); }
};
template <>
struct StringMaker<imagefs::State> {
    static std::string convert(imagefs::State s) { return std::string(imagefs::to_string(s)); }
};
template <>
struct StringMaker<imagefs::SourceKind> {
    static std::string convert(imagefs::SourceKind k) { return std::string(imagefs::to_string(k)); }
};
}  // namespace Catch
