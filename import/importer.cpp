#include "import/importer.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <set>

#include <spdlog/spdlog.h>

#include "core/error.hpp"
#include "import/digest.hpp"
#include "import/format.hpp"

namespace imagefs {
namespace {

using Clock = std::chrono::steady_clock;

class Fd {
  public:
    explicit Fd(int fd) : fd_(fd) {}
    ~Fd() { reset(); }
    Fd(const Fd&) = delete;
    Fd& operator=(const Fd&) = delete;
    int get() const { return fd_; }
    void reset() {
        if (fd_ >= 0) ::close(fd_);
        fd_ = -1;
    }

  private:
    int fd_;
};

void fsync_dir(const fs::path& dir) {
    Fd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (fd.get() < 0 || ::fsync(fd.get()) != 0) throw_errno("cannot fsync " + dir.string(), errno);
}

bool all_zero(const char* p, size_t n) {
    return n > 0 && p[0] == 0 && std::memcmp(p, p + 1, n - 1) == 0;
}

// Writes the stream into the staging file: hashing every byte, leaving 4 KiB blocks of zeros as
// holes (so sparse images stay sparse), reporting progress to the listener on every chunk and to
// the catalog at a bounded rate.
class StagingSink : public ByteSink {
  public:
    StagingSink(int fd, const ImageRow& row, const StateDir& dir, Catalog& cat,
                const ImportOptions& opts, const std::atomic<CancelReason>& cancel,
                ImportListener& listener)
        : fd_(fd),
          row_(row),
          dir_(dir),
          cat_(cat),
          opts_(opts),
          cancel_(cancel),
          listener_(listener),
          sha256_(DigestAlgo::sha256) {
        if (row.expected_sha512) sha512_ = std::make_unique<Digest>(DigestAlgo::sha512);
    }

    void begin(std::optional<int64_t> size) override {
        announced_ = size;
        if (size) {
            check_space(*size);
            if (size != row_.expected_size &&
                cat_.set_expected_size(row_.id, row_.import_token, size)) {
                if (auto r = cat_.get(row_.id)) listener_.image_changed(*r);
            }
        }
    }

    void write(const char* data, size_t len) override {
        sha256_.update(data, len);
        if (sha512_) sha512_->update(data, len);
        constexpr size_t kBlock = 4096;
        size_t i = 0;
        while (i < len) {
            // Split at block boundaries of the file offset so holes are block-aligned.
            size_t to_boundary = kBlock - static_cast<size_t>((bytes_ + i) % kBlock);
            size_t n = std::min(to_boundary, len - i);
            if (!(n == kBlock && all_zero(data + i, n))) pwrite_all(data + i, n, bytes_ + i);
            i += n;
        }
        bytes_ += static_cast<int64_t>(len);
        listener_.image_progress(row_.id, bytes_);
        auto now = Clock::now();
        if (now - last_flush_ >= std::chrono::milliseconds(opts_.progress_interval_ms)) {
            last_flush_ = now;
            cat_.update_progress(row_.id, row_.import_token, bytes_);
        }
    }

    bool cancelled() const override { return cancel_.load() != CancelReason::none; }

    int64_t bytes() const { return bytes_; }
    std::optional<int64_t> announced() const { return announced_; }
    std::string sha256() { return sha256_.hex(); }
    std::optional<std::string> sha512() {
        return sha512_ ? std::optional<std::string>(sha512_->hex()) : std::nullopt;
    }

  private:
    void pwrite_all(const char* p, size_t n, int64_t off) {
        while (n > 0) {
            ssize_t w = ::pwrite(fd_, p, n, off);
            if (w < 0 && errno == EINTR) continue;
            if (w < 0) {
                int err = errno;
                if (err == ENOSPC || err == EDQUOT)
                    throw Error(Errc::no_space, "no space left in " + dir_.root().string() +
                                                    " after " + std::to_string(off) +
                                                    " bytes; free space and run 'imagefs retry'");
                throw_errno("cannot write " + dir_.staging_path(row_.id).string(), err);
            }
            p += w;
            n -= static_cast<size_t>(w);
            off += w;
        }
    }

    void check_space(int64_t size) {
        struct statvfs sv {};
        if (::statvfs(dir_.staging_dir().c_str(), &sv) != 0) return;
        auto avail = static_cast<unsigned long long>(sv.f_bavail) * sv.f_frsize;
        if (static_cast<unsigned long long>(size) > avail)
            throw Error(Errc::no_space, "image needs " + std::to_string(size) + " bytes but " +
                                            dir_.root().string() + " has only " +
                                            std::to_string(avail) +
                                            " free; free space and run 'imagefs retry'");
    }

    int fd_;
    const ImageRow& row_;
    const StateDir& dir_;
    Catalog& cat_;
    const ImportOptions& opts_;
    const std::atomic<CancelReason>& cancel_;
    ImportListener& listener_;
    Digest sha256_;
    std::unique_ptr<Digest> sha512_;
    int64_t bytes_ = 0;
    std::optional<int64_t> announced_;
    Clock::time_point last_flush_ = Clock::now();
};

void notify(Catalog& cat, ImportListener& listener, int64_t id) {
    if (auto r = cat.get(id)) listener.image_changed(*r);
}

// Everything of one attempt that can fail. Returns normally only once the row is active (or was
// removed under us, in which case the published file is removed again).
void import_attempt(const ImageRow& row, const StateDir& dir, Catalog& cat,
                    const ImportOptions& opts, const std::atomic<CancelReason>& cancel,
                    ImportListener& listener) {
    const fs::path staging = dir.staging_path(row.id);
    Fd fd(::open(staging.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (fd.get() < 0) throw_errno("cannot create " + staging.string(), errno);

    StagingSink sink(fd.get(), row, dir, cat, opts, cancel, listener);
    fetch(parse_source(row.source), sink, opts.fetch);

    const int64_t size = sink.bytes();
    if (sink.announced() && *sink.announced() != size)
        throw Error(Errc::network, "source ended after " + std::to_string(size) + " of " +
                                       std::to_string(*sink.announced()) + " bytes");
    if (::ftruncate(fd.get(), size) != 0) throw_errno("cannot size " + staging.string(), errno);

    if (!cat.begin_verify(row.id, row.import_token, size))
        throw Error(Errc::cancelled, "image removed during import");
    notify(cat, listener, row.id);
    verify_and_publish(row, dir, cat, fd.get(), size, sink.sha256(), sink.sha512(), cancel,
                       listener);
}

}  // namespace

void verify_and_publish(const ImageRow& row, const StateDir& dir, Catalog& cat, int fd,
                        int64_t size, const std::string& sha256,
                        const std::optional<std::string>& sha512,
                        const std::atomic<CancelReason>& cancel, ImportListener& listener) {
    const fs::path staging = dir.staging_path(row.id);
    const fs::path target = dir.image_path(row.id);
    ActiveInfo info;
    info.final_size = size;
    info.sha256 = sha256;
    info.sha512 = sha512;
    if (row.expected_sha256 && *row.expected_sha256 != info.sha256)
        throw Error(Errc::failed,
                    "sha256 mismatch: expected " + *row.expected_sha256 + ", got " + info.sha256);
    if (row.expected_sha512 && row.expected_sha512 != info.sha512)
        throw Error(Errc::failed, "sha512 mismatch: expected " + *row.expected_sha512 + ", got " +
                                      info.sha512.value_or(""));
    FormatInfo fmt = detect_format(fd, size);
    info.format = fmt.format;
    info.virtual_size = fmt.virtual_size;
    if (::fsync(fd) != 0) throw_errno("cannot fsync " + staging.string(), errno);

    if (cancel.load() != CancelReason::none) throw Error(Errc::cancelled, "import cancelled");
    if (::rename(staging.c_str(), target.c_str()) != 0)
        throw_errno("cannot publish " + target.string(), errno);
    fsync_dir(dir.images_dir());
    fsync_dir(dir.staging_dir());
    if (!cat.activate(row.id, row.import_token, info)) {
        // Removed or retried while we verified: the bytes belong to nobody.
        ::unlink(target.c_str());
        throw Error(Errc::cancelled, "image removed during import");
    }
    spdlog::info("image '{}' is active: {} bytes, {}, sha256 {}", row.name, size, info.format,
                 info.sha256);
    notify(cat, listener, row.id);
}

void run_import(const ImageRow& row, const StateDir& dir, Catalog& cat, const ImportOptions& opts,
                const std::atomic<CancelReason>& cancel, ImportListener& listener) {
    spdlog::info("importing '{}' from {} (attempt {})", row.name, row.source, row.attempts);
    try {
        import_attempt(row, dir, cat, opts, cancel, listener);
        return;
    } catch (const Error& e) {
        ::unlink(dir.staging_path(row.id).c_str());
        if (e.code() == Errc::cancelled || cancel.load() != CancelReason::none) {
            // Shutdown leaves the row importing: the next start imports it again.
            spdlog::info("import of '{}' stopped: {}", row.name, e.what());
            return;
        }
        spdlog::error("import of '{}' failed: {}", row.name, e.what());
        if (cat.fail(row.id, row.import_token, e.what())) notify(cat, listener, row.id);
    } catch (const std::exception& e) {
        ::unlink(dir.staging_path(row.id).c_str());
        spdlog::error("import of '{}' failed: {}", row.name, e.what());
        if (cat.fail(row.id, row.import_token, e.what())) notify(cat, listener, row.id);
    }
}

int recover_state_dir(const StateDir& dir, Catalog& cat) {
    auto requeued = cat.recover();
    for (auto id : requeued) spdlog::warn("image #{} was being imported: importing it again", id);
    std::set<std::string> keep;
    for (const auto& r : cat.list())
        if (r.state == State::active) keep.insert(dir.image_path(r.id).filename().string());
    int removed = 0;
    for (const auto& d : {dir.staging_dir(), dir.images_dir()}) {
        for (const auto& e : fs::directory_iterator(d)) {
            if (d == dir.images_dir() && keep.count(e.path().filename().string())) continue;
            boost::system::error_code ec;
            if (fs::remove(e.path(), ec)) {
                spdlog::info("removed leftover {}", e.path().string());
                ++removed;
            }
        }
    }
    return removed;
}

ImportManager::ImportManager(const StateDir& dir, ImportOptions opts, ImportListener& listener)
    : dir_(dir), opts_(opts), listener_(listener) {}

ImportManager::~ImportManager() {
    stop();
}

void ImportManager::start() {
    stop_fd_ = ::eventfd(0, EFD_CLOEXEC);
    if (stop_fd_ < 0) throw_errno("eventfd", errno);
    // Our threads never take the daemon's signals: the FUSE main loop handles those.
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    threads_.emplace_back([this] { control_loop(); });
    threads_.emplace_back([this] { watch_loop(); });
    for (int i = 0; i < std::max(1, opts_.max_concurrent); ++i)
        threads_.emplace_back([this] { worker_loop(); });
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
}

void ImportManager::stop() {
    {
        std::lock_guard lk(mu_);
        if (stopping_ && threads_.empty()) return;
        stopping_ = true;
        for (auto& [id, flag] : running_) flag->store(CancelReason::shutdown);
    }
    control_cv_.notify_all();
    work_cv_.notify_all();
    if (stop_fd_ >= 0) {
        uint64_t one = 1;
        [[maybe_unused]] auto n = ::write(stop_fd_, &one, sizeof one);
    }
    for (auto& t : threads_) t.join();
    threads_.clear();
    if (stop_fd_ >= 0) ::close(stop_fd_);
    stop_fd_ = -1;
}

void ImportManager::wake() {
    {
        std::lock_guard lk(mu_);
        wake_pending_ = true;
    }
    control_cv_.notify_one();
}

void ImportManager::sync(Catalog& cat) {
    int64_t max_id = 0;
    auto rows = cat.list(&max_id);
    listener_.catalog_synced(rows, max_id);
    std::map<int64_t, const ImageRow*> by_id;
    for (const auto& r : rows) by_id[r.id] = &r;
    std::vector<int64_t> gone;
    {
        std::lock_guard lk(mu_);
        for (auto& [id, flag] : running_) {
            auto it = by_id.find(id);
            if (it == by_id.end() || it->second->state == State::queued ||
                it->second->state == State::failed)
                flag->store(CancelReason::removed);  // removed or retried under us
        }
        for (const auto& r : rows)
            if (r.state == State::queued && !running_.count(r.id) &&
                std::find(queue_.begin(), queue_.end(), r.id) == queue_.end())
                queue_.push_back(r.id);
    }
    work_cv_.notify_all();
    // Files of rows that no longer exist: removed by 'imagefs rm'. Open readers keep their fds.
    for (const auto& d : {dir_.images_dir(), dir_.staging_dir()}) {
        boost::system::error_code ec;
        for (fs::directory_iterator it(d, ec), end; !ec && it != end; it.increment(ec)) {
            int64_t id = std::atoll(it->path().stem().c_str());
            if (id > 0 && !by_id.count(id)) {
                std::lock_guard lk(mu_);
                if (running_.count(id)) continue;
                gone.push_back(id);
            }
        }
    }
    for (auto id : gone) {
        ::unlink(dir_.image_path(id).c_str());
        ::unlink(dir_.staging_path(id).c_str());
    }
}

void ImportManager::control_loop() {
    std::unique_ptr<Catalog> cat;
    for (;;) {
        {
            std::unique_lock lk(mu_);
            // The periodic resync is a safety net only; wakeups come from inotify.
            control_cv_.wait_for(lk, std::chrono::seconds(30),
                                 [&] { return stopping_ || wake_pending_; });
            if (stopping_) return;
            wake_pending_ = false;
        }
        try {
            if (!cat) cat = std::make_unique<Catalog>(dir_.catalog_path().string(), false);
            sync(*cat);
        } catch (const std::exception& e) {
            spdlog::error("cannot read the catalog: {}", e.what());
            cat.reset();
        }
    }
}

void ImportManager::worker_loop() {
    std::unique_ptr<Catalog> cat;
    for (;;) {
        int64_t id;
        auto flag = std::make_shared<std::atomic<CancelReason>>(CancelReason::none);
        {
            std::unique_lock lk(mu_);
            work_cv_.wait(lk, [&] { return stopping_ || !queue_.empty(); });
            if (stopping_) return;
            id = queue_.front();
            queue_.pop_front();
            running_[id] = flag;
        }
        try {
            if (!cat) cat = std::make_unique<Catalog>(dir_.catalog_path().string(), false);
            if (auto row = cat->start_import(id)) {
                listener_.image_changed(*row);
                run_import(*row, dir_, *cat, opts_, *flag, listener_);
            }
        } catch (const std::exception& e) {
            spdlog::error("import worker: {}", e.what());
            cat.reset();
        }
        {
            std::lock_guard lk(mu_);
            running_.erase(id);
        }
        wake();  // a retry that raced with the end of this attempt is queued now
    }
}

void ImportManager::watch_loop() {
    Fd in(::inotify_init1(IN_CLOEXEC | IN_NONBLOCK));
    if (in.get() < 0 ||
        ::inotify_add_watch(in.get(), dir_.root().c_str(), IN_CLOSE_WRITE | IN_MOVED_TO) < 0) {
        spdlog::error("cannot watch {}: {}; CLI changes are seen within 30 s only",
                      dir_.root().string(), std::strerror(errno));
        return;
    }
    alignas(inotify_event) char buf[4096];
    for (;;) {
        pollfd pfd[2] = {{in.get(), POLLIN, 0}, {stop_fd_, POLLIN, 0}};
        if (::poll(pfd, 2, -1) < 0) {
            if (errno == EINTR) continue;
            return;
        }
        if (pfd[1].revents) return;
        bool poke = false;
        ssize_t n;
        while ((n = ::read(in.get(), buf, sizeof buf)) > 0) {
            for (char* p = buf; p < buf + n;) {
                auto* ev = reinterpret_cast<inotify_event*>(p);
                if (ev->len && std::strcmp(ev->name, "wakeup") == 0) poke = true;
                p += sizeof(inotify_event) + ev->len;
            }
        }
        if (poke) wake();
    }
}

}  // namespace imagefs
