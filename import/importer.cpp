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
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <set>
#include <thread>
#include <vector>

#include <spdlog/spdlog.h>

#include "core/error.hpp"
#include "core/thread.hpp"
#include "import/allowlist.hpp"
#include "import/digest.hpp"
#include "import/format.hpp"
#include "import/hash_writer.hpp"

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

// A checksum mismatch over bytes that came from more than one response: the next attempt (if any
// is left) starts from zero instead of resuming.
class ResumedMismatch : public Error {
  public:
    explicit ResumedMismatch(const std::string& what) : Error(Errc::failed, what) {}
};

// Writes the stream into the staging file through a HashWriter, reports progress to the listener
// on every chunk and to the catalog at a bounded rate, and (for resumable HTTP imports)
// checkpoints the bytes written.
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
          direct_(::open(dir.staging_path(row.id).c_str(), O_WRONLY | O_DIRECT | O_CLOEXEC)),
          direct_guard_(direct_),
          writer_(
              row.expected_sha512.has_value(),
              [this](const char* p, size_t n, int64_t off) { pwrite_all(p, n, off); },
              [this](int64_t off, int64_t n) {
                  ::sync_file_range(fd_, off, n, SYNC_FILE_RANGE_WRITE);  // a hint: errors
              }) {}                                                       // show at fsync

    // Before the fetch: keep the first `offset` bytes of the staging file (they came with
    // `validator`) and hash them again, or start empty. Returns the number of bytes kept.
    int64_t prepare(int64_t offset, const Validator& validator) {
        struct stat st {};
        if (::fstat(fd_, &st) != 0) throw_errno("cannot stat " + staging_name(), errno);
        // The file is at least as long as its last checkpoint unless someone shortened it.
        if (offset <= 0 || st.st_size < offset) offset = 0;
        truncate_to(offset);
        writer_.reset(0);
        if (offset > 0) rehash(offset);
        writer_.reset_offset(offset);
        bytes_ = durable_ = offset;
        validator_ = validator;
        resumable_ = row_.kind == SourceKind::http && if_range_value(validator_).has_value();
        total_ = row_.expected_size;
        return offset;
    }

    // Local files.
    void begin(std::optional<int64_t> size) override {
        announced_ = size;
        if (size) {
            check_space(*size);
            note_size(*size);
        }
    }

    ResumeDecision begin_http(const HttpResponse& r) override {
        ResumeDecision d = decide_resume(bytes_, total_, r);
        if (d == ResumeDecision::refetch) return d;
        if (d == ResumeDecision::restart) {
            if (bytes_ > 0) {
                spdlog::info(
                    "image '{}': the server sent the whole resource (HTTP {}): "
                    "dropping {} bytes and starting from zero",
                    row_.name, r.status, bytes_);
                writer_.reset(0);
                truncate_to(0);
                bytes_ = durable_ = 0;
            }
            validator_ = r.validator;
            resumable_ = if_range_value(validator_).has_value();
            cat_.set_validator(row_.id, row_.import_token, validator_.etag,
                               validator_.last_modified);
        } else {
            spdlog::info("image '{}': resuming at byte {} (HTTP 206)", row_.name, bytes_);
            resumed_ = true;
        }
        announced_ = r.total_size;
        if (r.total_size) {
            check_space(*r.total_size - bytes_);
            note_size(*r.total_size);
        }
        return d;
    }

    void write(const char* data, size_t len) override {
        writer_.append(data, len);
        bytes_ += static_cast<int64_t>(len);
        listener_.image_progress(row_.id, bytes_);
        auto now = Clock::now();
        last_data_ = now;
        if (now - last_flush_ >= std::chrono::milliseconds(opts_.progress_interval_ms)) {
            last_flush_ = now;
            cat_.update_progress(row_.id, row_.import_token, bytes_);
        }
        if (resumable_ &&
            now - last_checkpoint_ >= std::chrono::milliseconds(opts_.checkpoint_interval_ms))
            checkpoint();
    }

    void tick() override {
        if (resumable_ && bytes_ > durable_ &&
            Clock::now() - last_data_ >= std::chrono::milliseconds(opts_.checkpoint_idle_ms))
            checkpoint();
    }

    bool cancelled() const override { return cancel_.load() != CancelReason::none; }

    // Everything received is hashed and in the file (not necessarily on disk).
    void flush() { writer_.drain(); }

    // Makes the bytes written so far durable and records them as the resume point.
    void checkpoint() {
        last_checkpoint_ = Clock::now();
        flush();
        if (!resumable_ || bytes_ == durable_) return;
        struct stat st {};
        // Trailing zero blocks are holes: the size must still cover them.
        if (::fstat(fd_, &st) == 0 && st.st_size < bytes_) truncate_to(bytes_);
        if (::fdatasync(fd_) != 0) throw_errno("cannot fsync " + staging_name(), errno);
        cat_.checkpoint(row_.id, row_.import_token, bytes_);
        cat_.update_progress(row_.id, row_.import_token, bytes_);
        durable_ = bytes_;
        spdlog::debug("image '{}': checkpoint at {} bytes", row_.name, bytes_);
    }

    bool resumable() const { return resumable_; }
    bool resumed() const { return resumed_; }
    int64_t bytes() const { return bytes_; }
    std::optional<int64_t> announced() const { return announced_; }
    // After flush().
    std::string sha256() { return writer_.sha256(); }
    std::optional<std::string> sha512() { return writer_.sha512(); }

    void check_space(int64_t need) {
        struct statvfs sv {};
        if (need <= 0 || ::statvfs(dir_.staging_dir().c_str(), &sv) != 0) return;
        auto avail = static_cast<unsigned long long>(sv.f_bavail) * sv.f_frsize;
        if (static_cast<unsigned long long>(need) > avail)
            throw Error(Errc::no_space, "image needs " + std::to_string(need) + " more bytes but " +
                                            dir_.root().string() + " has only " +
                                            std::to_string(avail) +
                                            " free; free space and run 'imagefs retry'");
    }

  private:
    std::string staging_name() const { return dir_.staging_path(row_.id).string(); }

    void truncate_to(int64_t size) {
        if (::ftruncate(fd_, size) != 0) throw_errno("cannot size " + staging_name(), errno);
    }

    // Hashes the first `n` bytes of the staging file: the digests cover every byte of the image,
    // the kept ones included.
    void rehash(int64_t n) {
        std::vector<char> buf(1 << 20);
        int64_t off = 0;
        while (off < n) {
            if (cancelled()) throw Error(Errc::cancelled, "import cancelled");
            size_t want = static_cast<size_t>(std::min<int64_t>(n - off, int64_t(buf.size())));
            ssize_t got = ::pread(fd_, buf.data(), want, off);
            if (got < 0 && errno == EINTR) continue;
            if (got < 0) throw_errno("cannot read " + staging_name(), errno);
            if (got == 0) throw Error(Errc::io, staging_name() + " is shorter than its checkpoint");
            writer_.hash_existing(buf.data(), static_cast<size_t>(got));
            off += got;
        }
        spdlog::info("image '{}': kept {} bytes from an earlier attempt", row_.name, n);
    }

    void note_size(int64_t size) {
        total_ = size;
        if (size != row_.expected_size &&
            cat_.set_expected_size(row_.id, row_.import_token, size)) {
            if (auto r = cat_.get(row_.id)) listener_.image_changed(*r);
        }
    }

    // Called on the writer's thread. Aligned runs (all but the tail of the stream and the first
    // run after an unaligned resume) bypass the page cache: copying them into it cost more CPU
    // than hashing them, and the final fsync then has nothing left to write back. File systems
    // without O_DIRECT (tmpfs) get buffered writes throughout.
    void pwrite_all(const char* p, size_t n, int64_t off) {
        write_staging(fd_, direct_, p, n, off, [this](int err, int64_t at) {
            if (err == ENOSPC || err == EDQUOT)
                throw Error(Errc::no_space, "no space left in " + dir_.root().string() + " after " +
                                                std::to_string(at) +
                                                " bytes; free space and run 'imagefs retry'");
            throw_errno("cannot write " + staging_name(), err);
        });
    }

    int fd_;
    const ImageRow& row_;
    const StateDir& dir_;
    Catalog& cat_;
    const ImportOptions& opts_;
    const std::atomic<CancelReason>& cancel_;
    ImportListener& listener_;
    int64_t bytes_ = 0;    // received (hashed and written, or on the way)
    int64_t durable_ = 0;  // bytes recorded as the resume point
    std::optional<int64_t> announced_;
    std::optional<int64_t> total_;
    Validator validator_;
    bool resumable_ = false;
    bool resumed_ = false;
    Clock::time_point last_flush_ = Clock::now();
    Clock::time_point last_checkpoint_ = Clock::now();
    Clock::time_point last_data_ = Clock::now();
    int direct_;  // the staging file opened with O_DIRECT, or -1 (the writer's thread's)
    struct CloseDirect {
        int& fd;
        ~CloseDirect() {
            if (fd >= 0) ::close(fd);
        }
    } direct_guard_;
    HashWriter writer_;  // last: its thread stops before the members it uses go
};

void notify(Catalog& cat, ImportListener& listener, int64_t id) {
    if (auto r = cat.get(id)) listener.image_changed(*r);
}

// The staging file and its sink, owned by run_import so that a failed attempt can still
// checkpoint what it wrote.
struct Attempt {
    std::unique_ptr<Fd> fd;
    std::unique_ptr<StagingSink> sink;
    void close() {
        sink.reset();
        fd.reset();
    }
};

// Everything of one attempt that can fail. Returns normally only once the row is active (or was
// removed under us, in which case the published file is removed again).
void import_attempt(const ImageRow& row, const StateDir& dir, Catalog& cat,
                    const ImportOptions& opts, const std::atomic<CancelReason>& cancel,
                    ImportListener& listener, Attempt& a) {
    const fs::path staging = dir.staging_path(row.id);
    const fs::path target = dir.image_path(row.id);
    const bool http = row.kind == SourceKind::http;
    a.fd = std::make_unique<Fd>(::open(staging.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
    if (a.fd->get() < 0) throw_errno("cannot create " + staging.string(), errno);
    const int fd = a.fd->get();
    a.sink = std::make_unique<StagingSink>(fd, row, dir, cat, opts, cancel, listener);
    StagingSink& sink = *a.sink;

    FetchOptions fo = opts.fetch;
    Validator validator{row.etag, row.last_modified};
    int64_t offset = http ? row.resume_offset : 0;
    // All bytes were there (a crash while verifying): ask for the last one again, so that the
    // validator still decides whether they are current.
    if (offset > 0 && row.expected_size && offset >= *row.expected_size)
        offset = *row.expected_size - 1;
    fo.resume_offset = sink.prepare(offset, validator);
    fo.resume_validator = validator;
    fo.tls_ca = row.tls_ca;
    fo.tls_insecure = row.tls_insecure;
    AllowList allow = http ? AllowList::load(dir.allow_path().string()) : AllowList();
    fo.allow = &allow;
    if (row.expected_size) sink.check_space(*row.expected_size - fo.resume_offset);

    fetch(parse_source(row.source), sink, fo);

    sink.flush();
    const int64_t size = sink.bytes();
    if (sink.announced() && *sink.announced() != size)
        throw Error(Errc::network, "source ended after " + std::to_string(size) + " of " +
                                       std::to_string(*sink.announced()) + " bytes");
    if (::ftruncate(fd, size) != 0) throw_errno("cannot size " + staging.string(), errno);
    if (::fsync(fd) != 0) throw_errno("cannot fsync " + staging.string(), errno);
    sink.checkpoint();  // a crash while verifying does not lose the bytes

    if (!cat.begin_verify(row.id, row.import_token, size))
        throw Error(Errc::cancelled, "image removed during import");
    notify(cat, listener, row.id);
    try {
        verify_and_publish(row, dir, cat, fd, size, sink.sha256(), sink.sha512(), cancel, listener);
    } catch (const Error& e) {
        // A checksum mismatch over bytes that came from more than one response may be a server
        // that changed the resource but not its validator: one more try, from zero.
        if (e.code() == Errc::failed && sink.resumed())
            throw ResumedMismatch(std::string(e.what()) +
                                  " (over bytes of a resumed download: the next attempt starts "
                                  "from zero)");
        throw;
    }
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

namespace {

// Keeps what a failed or stopped HTTP attempt wrote as its resume point. False if there is
// nothing that could be resumed.
bool keep_for_resume(Attempt& a, const ImageRow& row) {
    if (row.kind != SourceKind::http || !a.sink || !a.sink->resumable()) return false;
    try {
        a.sink->checkpoint();
        return true;
    } catch (const std::exception& e) {
        spdlog::warn("image '{}': cannot keep the bytes for resuming: {}", row.name, e.what());
        return false;
    }
}

void handle_failure(const ImageRow& row, const StateDir& dir, Catalog& cat,
                    const ImportOptions& opts, ImportListener& listener, Attempt& a,
                    const Error& e) {
    const bool fresh = dynamic_cast<const ResumedMismatch*>(&e) != nullptr;
    const bool retryable = fresh || is_retryable(e);
    const bool keep = retryable && !fresh && keep_for_resume(a, row);
    a.close();  // an open descriptor would keep the space of an unlinked file
    if (!keep) ::unlink(dir.staging_path(row.id).c_str());
    const int64_t retries_used = row.attempts - 1;
    bool changed;
    if (retryable && retries_used < row.retry_limit()) {
        int64_t delay = backoff_delay_ms(opts.retry, retries_used + 1);
        spdlog::warn("import of '{}' failed (attempt {} of {}): {}; retrying in {:.1f} s{}",
                     row.name, row.attempts, row.retry_limit() + 1, e.what(), double(delay) / 1000,
                     keep ? " from the bytes kept" : "");
        changed = cat.schedule_retry(row.id, row.import_token, e.what(), now_ms() + delay, keep);
    } else {
        std::string msg = e.what();
        if (retryable)
            msg += "; gave up after " + std::to_string(row.attempts) +
                   (row.attempts == 1 ? " attempt" : " attempts");
        spdlog::error("import of '{}' failed: {}", row.name, msg);
        changed = cat.fail(row.id, row.import_token, msg, keep);
    }
    if (changed) notify(cat, listener, row.id);
}

}  // namespace

void run_import(const ImageRow& row, const StateDir& dir, Catalog& cat, const ImportOptions& opts,
                const std::atomic<CancelReason>& cancel, ImportListener& listener) {
    spdlog::info("importing '{}' from {} (attempt {})", row.name, row.source, row.attempts);
    Attempt a;
    try {
        import_attempt(row, dir, cat, opts, cancel, listener, a);
        return;
    } catch (const Error& e) {
        const CancelReason why = cancel.load();
        if (e.code() == Errc::cancelled || why != CancelReason::none) {
            // Shutdown leaves the row importing: the next start imports it again, resuming from
            // the bytes kept here when it can.
            bool keep = why == CancelReason::shutdown && keep_for_resume(a, row);
            a.close();
            if (!keep) ::unlink(dir.staging_path(row.id).c_str());
            spdlog::info("import of '{}' stopped: {}", row.name, e.what());
            // Stopped for any other reason than a shutdown while the row is still ours: never
            // leave it importing with nobody at work on it.
            if (why != CancelReason::shutdown &&
                cat.schedule_retry(row.id, row.import_token, e.what(), now_ms(), false))
                notify(cat, listener, row.id);
            return;
        }
        handle_failure(row, dir, cat, opts, listener, a, e);
    } catch (const std::exception& e) {
        handle_failure(row, dir, cat, opts, listener, a, Error(Errc::io, e.what()));
    }
}

int recover_state_dir(const StateDir& dir, Catalog& cat) {
    auto requeued = cat.recover();
    for (auto id : requeued) spdlog::warn("image #{} was being imported: importing it again", id);
    std::set<std::string> keep;
    for (const auto& r : cat.list()) {
        if (r.state == State::active) keep.insert(dir.image_path(r.id).filename().string());
        if (r.state != State::active && r.kind == SourceKind::http && r.resume_offset > 0 &&
            if_range_value(Validator{r.etag, r.last_modified}))
            keep.insert(dir.staging_path(r.id).filename().string());
    }
    int removed = 0;
    for (const auto& d : {dir.staging_dir(), dir.images_dir()}) {
        for (const auto& e : fs::directory_iterator(d)) {
            if (keep.count(e.path().filename().string())) continue;
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
    threads_.push_back(spawn_quiet([this] { control_loop(); }));
    threads_.push_back(spawn_quiet([this] { watch_loop(); }));
    for (int i = 0; i < std::max(1, opts_.max_concurrent); ++i)
        threads_.push_back(spawn_quiet([this] { worker_loop(); }));
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
    const int64_t now = now_ms();
    {
        std::lock_guard lk(mu_);
        // Only a row that is gone stops its import. (A running import's row can look queued
        // in this snapshot: read just before the worker's start_import, or just after its
        // attempt scheduled a retry. Stopping it then would leave it importing for good.)
        for (auto& [id, flag] : running_)
            if (!by_id.count(id)) flag->store(CancelReason::removed);
        next_due_ms_ = 0;
        for (const auto& r : rows) {
            if (r.state != State::queued || running_.count(r.id) ||
                std::find(queue_.begin(), queue_.end(), r.id) != queue_.end())
                continue;
            if (r.next_attempt_at && *r.next_attempt_at > now) {  // a retry, not due yet
                if (next_due_ms_ == 0 || *r.next_attempt_at < next_due_ms_)
                    next_due_ms_ = *r.next_attempt_at;
                continue;
            }
            queue_.push_back(r.id);
        }
    }
    work_cv_.notify_all();
    // Files of rows that no longer exist: removed by 'imagefs rm'. Open readers keep their fds.
    // Ids above the snapshot's max_id belong to rows created since (a file being written into the
    // mount right now): ids are never reused, so those are not leftovers.
    for (const auto& d : {dir_.images_dir(), dir_.staging_dir()}) {
        boost::system::error_code ec;
        for (fs::directory_iterator it(d, ec), end; !ec && it != end; it.increment(ec)) {
            int64_t id = std::atoll(it->path().stem().c_str());
            if (id > 0 && id <= max_id && !by_id.count(id)) {
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
        const int64_t now = now_ms();
        {
            std::unique_lock lk(mu_);
            // The periodic resync is a safety net only; wakeups come from inotify, and from the
            // clock when a retry falls due.
            auto timeout = std::chrono::milliseconds(30000);
            if (next_due_ms_ > 0)
                timeout = std::min(timeout, std::chrono::milliseconds(
                                                std::max<int64_t>(0, next_due_ms_ - now + 5)));
            control_cv_.wait_for(lk, timeout, [&] { return stopping_ || wake_pending_; });
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
