#include "import/upload.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include <spdlog/spdlog.h>

#include "core/error.hpp"
#include "core/thread.hpp"

namespace imagefs {
namespace {

constexpr size_t kBlock = 4096;
// The largest gap (lseek past the end, a truncate that grows the file) that is hashed as zeros on
// the spot to keep the stream going. A larger one (a sparse disk created at its full size) would
// hold the call up while gigabytes of zeros are hashed: the file is hashed again at the end.
constexpr int64_t kMaxZeroFill = 64 << 20;

void notify(Catalog& cat, ImportListener& listener, int64_t id) {
    if (auto r = cat.get(id)) listener.image_changed(*r);
}

}  // namespace

Upload::Upload(int64_t id, int64_t token, int fd) : id_(id), token_(token), fd_(fd) {
    // The same file again, for the pipeline's aligned writes (-1 where O_DIRECT is not supported).
    const std::string self = "/proc/self/fd/" + std::to_string(fd);
    direct_ = ::open(self.c_str(), O_WRONLY | O_DIRECT | O_CLOEXEC);
    stream_ = std::make_unique<HashWriter>(
        false,
        [this](const char* p, size_t n, int64_t off) {
            write_staging(fd_, direct_, p, n, off,
                          [this](int err, int64_t at) { write_failed(err, at); });
        },
        [this](int64_t off, int64_t n) {
            ::sync_file_range(fd_, off, n, SYNC_FILE_RANGE_WRITE);  // a hint; errors show at fsync
        });
}

Upload::~Upload() {
    try {
        settle();  // an upload dropped while it is written still gets what was written
    } catch (const std::exception&) {
    }
    stream_.reset();  // joins the pipeline's threads before the files go
    if (direct_ >= 0) ::close(direct_);
    ::close(fd_);
}

void Upload::write_failed(int err, int64_t off) {
    if (err == ENOSPC || err == EDQUOT)
        throw Error(Errc::no_space, "no space left in the state directory");
    throw_errno("cannot write upload data at byte " + std::to_string(off), err);
}

void Upload::settle() {
    std::lock_guard sl(stream_mu_);
    settle_locked();
}

void Upload::settle_locked() {
    if (!pending_) return;
    pending_ = false;
    try {
        stream_->drain();
    } catch (const Error& e) {
        fail(std::string("a write failed: ") + e.what());
        throw;
    }
    // Blocks of zeros at the end were not written: the file ends where the writers said.
    struct stat st {};
    const int64_t size = size_.load();
    if (::fstat(fd_, &st) == 0 && st.st_size < size && ::ftruncate(fd_, size) != 0)
        throw_errno("cannot extend upload data", errno);
}

void Upload::append_zeros(int64_t n) {
    static const std::vector<char> zeros(1 << 20, 0);
    while (n > 0) {
        size_t k = static_cast<size_t>(std::min<int64_t>(n, int64_t(zeros.size())));
        stream_->append(zeros.data(), k);
        n -= static_cast<int64_t>(k);
    }
    pending_ = true;
}

void Upload::write(const char* data, size_t len, int64_t off) {
    // The kernel serialises writes to one file (inode lock), so writes normally arrive one at a
    // time. If they ever overlap, store every byte and give up on the streaming digest.
    const bool alone = in_flight_.fetch_add(1) == 0;
    struct Leave {
        std::atomic<int>& n;
        ~Leave() { n.fetch_sub(1); }
    } leave{in_flight_};
    const int64_t end = off + static_cast<int64_t>(len);

    std::lock_guard sl(stream_mu_);
    try {
        if (alone && streaming_ && off >= stream_->end() && off - stream_->end() <= kMaxZeroFill) {
            // In order, or after a gap (cp skipping a hole with lseek): the gap hashes as zeros
            // and stays a hole.
            if (off > stream_->end()) append_zeros(off - stream_->end());
            stream_->append(data, len);
            pending_ = true;
        } else {
            settle_locked();
            streaming_ = false;
            const int64_t file_end = size_.load();
            int no_direct = -1;  // out of order: through the page cache
            auto pwrite_all = [&](const char* p, size_t n, int64_t at) {
                write_staging(fd_, no_direct, p, n, at,
                              [this](int err, int64_t where) { write_failed(err, where); });
            };
            size_t run = 0, i = 0;  // [run, i) is pending data
            bool tail_skipped = false;
            while (i < len) {
                size_t n = std::min(
                    kBlock - static_cast<size_t>((off + int64_t(i)) % int64_t(kBlock)), len - i);
                bool hole = alone && n == kBlock && off + int64_t(i) >= file_end &&
                            all_zero_block(data + i, n);
                if (hole) {
                    if (i > run) pwrite_all(data + run, i - run, off + int64_t(run));
                    run = i + n;
                }
                tail_skipped = hole;
                i += n;
            }
            if (len > run) pwrite_all(data + run, len - run, off + int64_t(run));
            if (tail_skipped && end > file_end && ::ftruncate(fd_, end) != 0)
                throw_errno("cannot extend upload data", errno);
        }
    } catch (const Error& e) {
        fail(std::string("a write failed: ") + e.what());
        throw;
    }
    int64_t cur = size_.load();
    while (end > cur && !size_.compare_exchange_weak(cur, end)) {
    }
}

void Upload::truncate(int64_t size) {
    std::lock_guard sl(stream_mu_);
    if (size == 0) {  // a fresh start: cp over an upload, O_TRUNC
        try {
            settle_locked();
        } catch (const Error&) {
            // What failed is being thrown away; the upload stays failed all the same.
        }
        stream_->reset(0);
        if (::ftruncate(fd_, 0) != 0) throw_errno("cannot truncate upload data", errno);
        size_ = 0;
        streaming_ = true;
        return;
    }
    if (streaming_ && in_flight_.load() == 0 && size >= stream_->end() &&
        size - stream_->end() <= kMaxZeroFill) {
        // Grown with zeros (cp of a sparse file ends with a hole this way): still in order.
        append_zeros(size - stream_->end());
        int64_t cur = size_.load();
        while (size > cur && !size_.compare_exchange_weak(cur, size)) {
        }
        return;
    }
    settle_locked();
    streaming_ = false;
    if (::ftruncate(fd_, size) != 0) throw_errno("cannot truncate upload data", errno);
    size_ = size;
}

bool Upload::progress_due(std::chrono::milliseconds interval) {
    using namespace std::chrono;
    const int64_t now = duration_cast<milliseconds>(steady_clock::now().time_since_epoch()).count();
    int64_t last = progress_at_ms_.load();
    return now - last >= interval.count() && progress_at_ms_.compare_exchange_strong(last, now);
}

void Upload::add_writer(pid_t process) {
    std::lock_guard lk(mu_);
    writers_.insert(process);
}

bool Upload::remove_writer(pid_t process) {
    std::lock_guard lk(mu_);
    auto it = writers_.find(process);
    if (it != writers_.end()) writers_.erase(it);
    return writers_.empty();
}

bool Upload::has_writers() const {
    std::lock_guard lk(mu_);
    return !writers_.empty();
}

bool Upload::is_writer(pid_t process) const {
    std::lock_guard lk(mu_);
    return writers_.count(process) != 0;
}

void Upload::fail(const std::string& why) {
    std::lock_guard lk(mu_);
    if (!failure_) failure_ = why;
}

std::optional<std::string> Upload::failure() const {
    std::lock_guard lk(mu_);
    return failure_;
}

bool Upload::streamed() const {
    std::lock_guard sl(stream_mu_);
    return streaming_;
}

std::string Upload::sha256(const std::function<void()>& stop) {
    std::lock_guard sl(stream_mu_);
    settle_locked();
    if (streaming_) return stream_->sha256();
    spdlog::debug("upload #{} was not written in order: hashing it again", id_);
    return hash_file(fd_, size_.load(), DigestAlgo::sha256, [&] {
        if (auto why = failure()) throw Error(Errc::cancelled, *why);  // removed meanwhile
        if (stop) stop();
    });
}

std::string hash_file(int fd, int64_t size, DigestAlgo algo, const std::function<void()>& stop) {
    Digest d(algo);
    std::vector<char> buf(1 << 20);
    int64_t off = 0;
    while (off < size) {
        if (stop) stop();
        ssize_t n =
            ::pread(fd, buf.data(), std::min<int64_t>(int64_t(buf.size()), size - off), off);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) throw_errno("cannot read upload data", errno);
        if (n == 0) throw Error(Errc::io, "upload data is shorter than its size");
        d.update(buf.data(), static_cast<size_t>(n));
        off += n;
    }
    return d.hex();
}

void publish_upload(Upload& up, const StateDir& dir, Catalog& cat, ImportListener& listener,
                    const std::function<void()>& stop) {
    const std::string staging = dir.staging_path(up.id()).string();
    auto row = cat.get(up.id());
    if (!row || row->import_token != up.token() || row->state != State::importing) {
        ::unlink(staging.c_str());  // removed while it was written
        return;
    }
    try {
        up.settle();  // every byte in the file; a write that failed meanwhile fails the upload
        if (auto why = up.failure()) throw Error(Errc::failed, "upload incomplete: " + *why);
        struct stat st {};
        if (::fstat(up.fd(), &st) != 0) throw_errno("cannot stat upload data", errno);
        const int64_t size = st.st_size;
        if (!cat.begin_verify(up.id(), up.token(), size)) {
            ::unlink(staging.c_str());
            return;
        }
        notify(cat, listener, up.id());
        row = cat.get(up.id());
        if (!row) throw Error(Errc::cancelled, "image removed during verification");
        std::string sha256 = up.sha256(stop);
        std::optional<std::string> sha512;
        if (row->expected_sha512) sha512 = hash_file(up.fd(), size, DigestAlgo::sha512, stop);
        std::atomic<CancelReason> none{CancelReason::none};
        verify_and_publish(*row, dir, cat, up.fd(), size, sha256, sha512, none, listener);
    } catch (const std::exception& e) {
        // Free the space now (the upload keeps the file open until it goes): after ENOSPC the
        // catalog needs room to record the failure.
        if (::ftruncate(up.fd(), 0) != 0) spdlog::warn("cannot free {}: {}", staging, errno);
        ::unlink(staging.c_str());
        auto* err = dynamic_cast<const Error*>(&e);
        if (err && err->code() == Errc::cancelled) return;
        spdlog::error("upload of '{}' failed: {}", row->name, e.what());
        if (cat.fail(up.id(), up.token(), e.what())) notify(cat, listener, up.id());
    }
}

UploadPublisher::UploadPublisher(const StateDir& dir, ImportListener& listener, Claim claim,
                                 std::chrono::milliseconds grace)
    : dir_(dir), listener_(listener), claim_(std::move(claim)), grace_(grace) {}

UploadPublisher::~UploadPublisher() {
    stop();
}

void UploadPublisher::start() {
    thread_ = spawn_quiet([this] { loop(); });
}

void UploadPublisher::stop() {
    cancel_ = true;
    {
        std::lock_guard lk(mu_);
        stopping_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
}

void UploadPublisher::submit(std::shared_ptr<Upload> up) {
    {
        std::lock_guard lk(mu_);
        queue_.emplace_back(std::chrono::steady_clock::now() + grace_, std::move(up));
    }
    cv_.notify_all();
}

void UploadPublisher::loop() {
    std::unique_ptr<Catalog> cat;
    for (;;) {
        std::shared_ptr<Upload> up;
        {
            std::unique_lock lk(mu_);
            cv_.wait(lk, [&] { return stopping_ || !queue_.empty(); });
            if (queue_.empty()) return;  // stopping, nothing left
            // Submitted in order with the same grace, so the front is due first. At shutdown the
            // grace is cut short.
            if (!stopping_ && cv_.wait_until(lk, queue_.front().first, [&] { return stopping_; }))
                continue;
            up = std::move(queue_.front().second);
            queue_.pop_front();
        }
        if (!claim_(*up)) continue;  // a writer came back; its last close submits it again
        try {
            if (!cat) cat = std::make_unique<Catalog>(dir_.catalog_path().string(), false);
            int calls = 0;  // one a MiB hashed
            publish_upload(*up, dir_, *cat, listener_, [&] {
                if (cancel_)
                    throw Error(Errc::failed,
                                "the daemon stopped while the file was being verified; copy it "
                                "again");
                if (++calls % 64 == 0 && !cat->get(up->id()))  // removed ('rm', 'imagefs rm')
                    throw Error(Errc::cancelled, "the image was removed during verification");
            });
        } catch (const std::exception& e) {
            spdlog::error("cannot publish upload #{}: {}", up->id(), e.what());
            cat.reset();
        }
    }
}

}  // namespace imagefs
