// import/importer: one import attempt (run_import) and state-dir recovery, with local sources.
#include <algorithm>
#include <atomic>
#include <functional>
#include <mutex>

#include "core/statedir.hpp"
#include "import/digest.hpp"
#include "import/importer.hpp"
#include "support.hpp"

using Catch::Matchers::Contains;
using imagefs::CancelReason;
using imagefs::Catalog;
using imagefs::Digest;
using imagefs::DigestAlgo;
using imagefs::ImageRow;
using imagefs::ImportOptions;
using imagefs::NewImage;
using imagefs::SourceKind;
using imagefs::State;
using imagefs::StateDir;

namespace {

constexpr int64_t MiB = 1 << 20;

class RecordingListener : public imagefs::ImportListener {
  public:
    void catalog_synced(const std::vector<ImageRow>&, int64_t) override {
        std::lock_guard lk(mu);
        ++synced;
    }
    void image_changed(const ImageRow& row) override {
        {
            std::lock_guard lk(mu);
            changed.push_back(row);
        }
        if (on_changed) on_changed(row);
    }
    void image_progress(int64_t id, int64_t bytes) override {
        std::lock_guard lk(mu);
        progress.emplace_back(id, bytes);
    }

    std::vector<State> states() {
        std::lock_guard lk(mu);
        std::vector<State> out;
        for (const auto& r : changed) out.push_back(r.state);
        return out;
    }

    std::mutex mu;
    int synced = 0;
    std::vector<ImageRow> changed;
    std::vector<std::pair<int64_t, int64_t>> progress;
    std::function<void(const ImageRow&)> on_changed;
};

struct Fixture {
    unit::TempDir tmp;
    StateDir dir{tmp.path() / "state", true};
    Catalog cat{dir.catalog_path().string()};
    RecordingListener listener;
    std::atomic<CancelReason> cancel{CancelReason::none};
    ImportOptions opts;

    unit::fs::path source_path(const std::string& name = "source.img") const {
        return tmp.path() / name;
    }

    // Adds an image for `source`, starts it and runs one attempt. Returns the row afterwards
    // (nullopt if it no longer exists).
    std::optional<ImageRow> import(NewImage img) {
        ImageRow added = cat.add(img);
        auto started = cat.start_import(added.id);
        REQUIRE(started);
        last_id = added.id;
        imagefs::run_import(*started, dir, cat, opts, cancel, listener);
        return cat.get(added.id);
    }

    NewImage image(const std::string& name, const unit::fs::path& src) const {
        NewImage n;
        n.name = name;
        n.source = src.string();
        n.kind = SourceKind::file;
        return n;
    }

    int64_t last_id = 0;
};

std::string sha256_of(const std::string& data) {
    Digest d(DigestAlgo::sha256);
    d.update(data.data(), data.size());
    return d.hex();
}

std::string sha512_of(const std::string& data) {
    Digest d(DigestAlgo::sha512);
    d.update(data.data(), data.size());
    return d.hex();
}

}  // namespace

TEST_CASE("importer: a local file becomes active with verified bytes and holes for zero blocks",
          "[importer]") {
    Fixture f;
    const int64_t size = 8 * MiB;
    const int64_t zero_begin = 3 * MiB, zero_end = 5 * MiB;
    std::string data = unit::random_bytes(static_cast<size_t>(size), 42);
    std::fill(data.begin() + zero_begin, data.begin() + zero_end, '\0');
    // A run of zeros that does not cover a whole 4 KiB block must still be written.
    std::fill(data.begin() + 6 * MiB + 100, data.begin() + 6 * MiB + 3000, '\0');
    unit::write_file(f.source_path(), data);
    const std::string sha = sha256_of(data);

    const int64_t before = imagefs::now_ms();
    auto row = f.import(f.image("disk", f.source_path()));
    REQUIRE(row);
    CHECK(row->state == State::active);
    CHECK(row->final_size == std::optional<int64_t>(size));
    CHECK(row->bytes_imported == size);
    CHECK(row->expected_size == std::optional<int64_t>(size));  // announced by the source
    CHECK(row->sha256 == std::optional<std::string>(sha));
    CHECK_FALSE(row->sha512);  // only computed when one is expected
    CHECK(row->format == std::optional<std::string>("raw"));
    CHECK(row->virtual_size == std::optional<int64_t>(size));
    CHECK(row->attempts == 1);
    CHECK_FALSE(row->last_error);
    REQUIRE(row->activated_at);
    CHECK(*row->activated_at >= before);

    const auto img = f.dir.image_path(row->id);
    CHECK(img == f.dir.images_dir() / (std::to_string(row->id) + ".img"));
    REQUIRE(unit::fs::exists(img));
    CHECK(unit::diff_bytes(unit::read_file(img), data) == "");
    CHECK_FALSE(unit::fs::exists(f.dir.staging_path(row->id)));
    CHECK(unit::dir_entries(f.dir.staging_dir()).empty());
    CHECK(unit::dir_entries(f.dir.images_dir()) ==
          std::vector<std::string>{img.filename().string()});

    // The 2 MiB zero run is a hole.
    struct stat st {};
    REQUIRE(::stat(img.c_str(), &st) == 0);
    CHECK(st.st_size == size);
    CHECK(static_cast<int64_t>(st.st_blocks) * 512 < size);
    CHECK(static_cast<int64_t>(st.st_blocks) * 512 <= size - (zero_end - zero_begin) + 256 * 1024);
    int fd = ::open(img.c_str(), O_RDONLY | O_CLOEXEC);
    REQUIRE(fd >= 0);
    CHECK(::lseek(fd, 0, SEEK_HOLE) == zero_begin);
    CHECK(::lseek(fd, zero_begin, SEEK_DATA) == zero_end);
    ::close(fd);

    // The listener saw the transitions in order, and monotonic progress up to the full size.
    CHECK(f.listener.states() ==
          std::vector<State>{State::importing, State::verifying, State::active});
    CHECK(f.listener.changed.front().expected_size == std::optional<int64_t>(size));
    CHECK(f.listener.changed.back().sha256 == std::optional<std::string>(sha));
    REQUIRE_FALSE(f.listener.progress.empty());
    CHECK(f.listener.progress.back() == std::make_pair(row->id, size));
    for (size_t i = 1; i < f.listener.progress.size(); ++i) {
        CHECK(f.listener.progress[i].first == row->id);
        CHECK(f.listener.progress[i].second > f.listener.progress[i - 1].second);
    }
    CHECK(f.listener.synced == 0);
    // The source is untouched.
    CHECK(unit::diff_bytes(unit::read_file(f.source_path()), data) == "");
}

TEST_CASE("importer: matching expected sha256 and sha512 are accepted", "[importer]") {
    Fixture f;
    // Not a multiple of 4096 and ending in zeros: the tail must come back exactly.
    std::string data = unit::random_bytes(100000, 9);
    std::fill(data.end() - 20000, data.end(), '\0');
    unit::write_file(f.source_path(), data);
    NewImage n = f.image("checked", f.source_path());
    n.expected_sha256 = sha256_of(data);
    n.expected_sha512 = sha512_of(data);
    auto row = f.import(n);
    REQUIRE(row);
    CHECK(row->state == State::active);
    CHECK(row->sha256 == std::optional<std::string>(sha256_of(data)));
    CHECK(row->sha512 == std::optional<std::string>(sha512_of(data)));
    CHECK(unit::diff_bytes(unit::read_file(f.dir.image_path(row->id)), data) == "");
    CHECK(unit::fs::file_size(f.dir.image_path(row->id)) == 100000);
}

TEST_CASE("importer: a sha256 mismatch fails the image and publishes nothing", "[importer]") {
    Fixture f;
    const std::string data = unit::random_bytes(3 * MiB + 5, 77);
    unit::write_file(f.source_path(), data);
    NewImage n = f.image("bad-sum", f.source_path());
    const std::string wrong = sha256_of("something else");
    n.expected_sha256 = wrong;
    auto row = f.import(n);
    REQUIRE(row);
    CHECK(row->state == State::failed);
    REQUIRE(row->last_error);
    CHECK_THAT(*row->last_error, Contains("sha256 mismatch"));
    CHECK_THAT(*row->last_error, Contains(wrong));
    CHECK_THAT(*row->last_error, Contains(sha256_of(data)));
    CHECK_FALSE(row->sha256);
    CHECK_FALSE(row->activated_at);
    CHECK_FALSE(unit::fs::exists(f.dir.image_path(row->id)));
    CHECK_FALSE(unit::fs::exists(f.dir.staging_path(row->id)));
    CHECK(unit::dir_entries(f.dir.images_dir()).empty());
    CHECK(unit::dir_entries(f.dir.staging_dir()).empty());
    CHECK(f.listener.states() ==
          std::vector<State>{State::importing, State::verifying, State::failed});
    CHECK(f.listener.changed.back().last_error == row->last_error);
}

TEST_CASE("importer: a sha512 mismatch fails the image", "[importer]") {
    Fixture f;
    const std::string data = "tiny image";
    unit::write_file(f.source_path(), data);
    NewImage n = f.image("bad-512", f.source_path());
    n.expected_sha256 = sha256_of(data);     // right
    n.expected_sha512 = sha512_of("other");  // wrong
    auto row = f.import(n);
    REQUIRE(row);
    CHECK(row->state == State::failed);
    REQUIRE(row->last_error);
    CHECK_THAT(*row->last_error, Contains("sha512 mismatch"));
    CHECK_THAT(*row->last_error, Contains(sha512_of("other")));
    CHECK_THAT(*row->last_error, Contains(sha512_of(data)));
    CHECK(unit::dir_entries(f.dir.images_dir()).empty());
    CHECK(unit::dir_entries(f.dir.staging_dir()).empty());
}

TEST_CASE("importer: a missing source fails with a message naming the path", "[importer]") {
    Fixture f;
    const auto missing = f.source_path("does-not-exist.img");
    auto row = f.import(f.image("ghost", missing));
    REQUIRE(row);
    CHECK(row->state == State::failed);
    REQUIRE(row->last_error);
    CHECK_THAT(*row->last_error, Contains(missing.string()));
    CHECK_THAT(*row->last_error, Contains("does not exist"));
    CHECK(row->attempts == 1);
    CHECK(unit::dir_entries(f.dir.images_dir()).empty());
    CHECK(unit::dir_entries(f.dir.staging_dir()).empty());
    CHECK(f.listener.states() == std::vector<State>{State::failed});
}

TEST_CASE("importer: an empty source and a qcow2 source are imported with their formats",
          "[importer]") {
    Fixture f;
    unit::write_file(f.source_path("empty.img"), "");
    auto empty = f.import(f.image("empty", f.source_path("empty.img")));
    REQUIRE(empty);
    CHECK(empty->state == State::active);
    CHECK(empty->final_size == std::optional<int64_t>(0));
    CHECK(empty->sha256 == std::optional<std::string>(
                               "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"));
    CHECK(empty->format == std::optional<std::string>("raw"));
    CHECK(empty->virtual_size == std::optional<int64_t>(0));
    CHECK(unit::fs::file_size(f.dir.image_path(empty->id)) == 0);

    std::string q(196608, '\0');
    q.replace(0, 8, "QFI\xfb\0\0\0\x03", 8);
    const uint64_t vsize = uint64_t{20} << 30;
    for (int i = 0; i < 8; ++i) q[24 + i] = static_cast<char>((vsize >> (8 * (7 - i))) & 0xff);
    unit::write_file(f.source_path("disk.qcow2"), q);
    auto qc = f.import(f.image("disk.qcow2", f.source_path("disk.qcow2")));
    REQUIRE(qc);
    CHECK(qc->state == State::active);
    CHECK(qc->format == std::optional<std::string>("qcow2"));
    CHECK(qc->virtual_size == std::optional<int64_t>(static_cast<int64_t>(vsize)));
    CHECK(qc->final_size == std::optional<int64_t>(196608));
    CHECK(unit::diff_bytes(unit::read_file(f.dir.image_path(qc->id)), q) == "");
}

TEST_CASE("importer: a cancelled import leaves the row importing and removes its staging file",
          "[importer]") {
    Fixture f;
    unit::write_file(f.source_path(), unit::random_bytes(MiB, 5));
    f.cancel = CancelReason::shutdown;
    auto row = f.import(f.image("stopped", f.source_path()));
    REQUIRE(row);
    CHECK(row->state == State::importing);  // the next daemon start imports it again
    CHECK_FALSE(row->last_error);
    CHECK(unit::dir_entries(f.dir.images_dir()).empty());
    CHECK(unit::dir_entries(f.dir.staging_dir()).empty());
    for (auto s : f.listener.states()) CHECK(s != State::failed);
}

TEST_CASE("importer: an image removed before or during verification publishes nothing",
          "[importer]") {
    Fixture f;
    const std::string data = unit::random_bytes(2 * MiB, 6);
    unit::write_file(f.source_path(), data);

    SECTION("removed before the attempt runs") {
        ImageRow added = f.cat.add(f.image("gone", f.source_path()));
        auto started = f.cat.start_import(added.id);
        REQUIRE(started);
        REQUIRE(f.cat.remove("gone"));
        imagefs::run_import(*started, f.dir, f.cat, f.opts, f.cancel, f.listener);
        CHECK_FALSE(f.cat.get(added.id));
        CHECK(f.listener.states().empty());
    }
    SECTION("removed by another process while verifying") {
        Catalog other(f.dir.catalog_path().string(), false);
        bool removed = false;
        f.listener.on_changed = [&](const ImageRow& r) {
            if (r.state == State::verifying) removed = other.remove(r.name).has_value();
        };
        auto row = f.import(f.image("gone", f.source_path()));
        CHECK(removed);
        CHECK_FALSE(row);
        CHECK(f.listener.states() == std::vector<State>{State::importing, State::verifying});
    }
    CHECK(unit::dir_entries(f.dir.images_dir()).empty());
    CHECK(unit::dir_entries(f.dir.staging_dir()).empty());
}

TEST_CASE("importer: recover_state_dir removes leftovers and keeps active images", "[importer]") {
    Fixture f;
    const std::string data = unit::random_bytes(MiB + 1, 8);
    unit::write_file(f.source_path(), data);
    auto active = f.import(f.image("active", f.source_path()));
    REQUIRE(active);
    REQUIRE(active->state == State::active);

    // A failed image with a stray file, an interrupted import with its staging file, a verifying
    // one, and files of ids the catalog never had.
    ImageRow failed = f.cat.add(f.image("failed", f.source_path()));
    auto fs_ = f.cat.start_import(failed.id);
    REQUIRE(f.cat.fail(failed.id, fs_->import_token, "boom"));
    unit::write_file(f.dir.image_path(failed.id), "stale bytes");

    ImageRow importing = f.cat.add(f.image("importing", f.source_path()));
    auto is = f.cat.start_import(importing.id);
    REQUIRE(is);
    unit::write_file(f.dir.staging_path(importing.id), "partial");

    ImageRow verifying = f.cat.add(f.image("verifying", f.source_path()));
    auto vs = f.cat.start_import(verifying.id);
    REQUIRE(f.cat.begin_verify(verifying.id, vs->import_token, 7));
    unit::write_file(f.dir.staging_path(verifying.id), "verified?");

    unit::write_file(f.dir.image_path(999), "orphan");
    unit::write_file(f.dir.staging_path(998), "orphan part");

    const int removed = imagefs::recover_state_dir(f.dir, f.cat);
    CHECK(removed == 5);
    CHECK(unit::dir_entries(f.dir.images_dir()) ==
          std::vector<std::string>{std::to_string(active->id) + ".img"});
    CHECK(unit::dir_entries(f.dir.staging_dir()).empty());
    CHECK(unit::diff_bytes(unit::read_file(f.dir.image_path(active->id)), data) == "");

    CHECK(f.cat.get(active->id)->state == State::active);
    CHECK(f.cat.get(failed.id)->state == State::failed);
    CHECK(f.cat.get(importing.id)->state == State::queued);
    CHECK(f.cat.get(verifying.id)->state == State::queued);

    // Nothing left to do the second time.
    CHECK(imagefs::recover_state_dir(f.dir, f.cat) == 0);
    CHECK(unit::diff_bytes(unit::read_file(f.dir.image_path(active->id)), data) == "");
}

TEST_CASE("importer: a retried image imports again under a new token", "[importer]") {
    Fixture f;
    const auto src = f.source_path("late.img");
    auto first = f.import(f.image("late", src));
    REQUIRE(first);
    REQUIRE(first->state == State::failed);

    const std::string data = unit::random_bytes(300000, 10);
    unit::write_file(src, data);
    f.cat.retry("late");
    auto second = f.cat.start_import(first->id);
    REQUIRE(second);
    CHECK(second->import_token == first->import_token + 1);
    imagefs::run_import(*second, f.dir, f.cat, f.opts, f.cancel, f.listener);
    auto row = f.cat.get(first->id);
    CHECK(row->state == State::active);
    CHECK(row->attempts == 1);
    CHECK_FALSE(row->last_error);
    CHECK(row->sha256 == std::optional<std::string>(sha256_of(data)));
    CHECK(unit::diff_bytes(unit::read_file(f.dir.image_path(row->id)), data) == "");
}
