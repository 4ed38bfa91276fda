#pragma once
// HashWriter: hashes and writes a stream of bytes appended at the end of a file, on two threads of
// its own (imports and uploads written in order).

#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "core/thread.hpp"
#include "import/digest.hpp"

namespace imagefs {

// Writes [p, p + n) at `off` of a staging file: through `direct` (the file opened with O_DIRECT,
// or -1) when address, length and offset are 4 KiB aligned, else through `fd`. A file system that
// refuses the O_DIRECT write (EINVAL) gets buffered writes from then on (`direct` becomes -1, and
// the caller closes what it opened). Other errors go to `fail(errno, off)`, which throws.
// Whether the `n` bytes at `p` are all zero (a block that need not be stored).
inline bool all_zero_block(const char* p, size_t n) {
    return n > 0 && p[0] == 0 && std::memcmp(p, p + 1, n - 1) == 0;
}

void write_staging(int fd, int& direct, const char* p, size_t n, int64_t off,
                   const std::function<void(int, int64_t)>& fail);

// Hashes and writes what an import receives, in a pipeline of three threads: the fetch's thread
// copies the stream into a small pool of page-aligned buffers; a hashing thread hashes each full
// buffer in file order while it is still in the CPU's cache; a writing thread writes it with one
// pwrite per run of non-zero 4 KiB blocks (blocks of zeros at 4 KiB file offsets stay holes, so
// sparse images stay sparse) and returns the buffer to the pool. Receiving, hashing and writing
// thus overlap on two cores, and the writer may block on the disk (O_DIRECT) without holding
// up the hash.
class HashWriter {
  public:
    // `write_at` gets runs whose offset, length and address are 4 KiB aligned whenever the
    // buffer they come from starts at an aligned offset (all but the first after a resume, and
    // the last).
    using WriteAt = std::function<void(const char*, size_t, int64_t)>;
    using SyncFrom = std::function<void(int64_t, int64_t)>;

    HashWriter(bool sha512, WriteAt write_at, SyncFrom sync_from)
        : sha512_wanted_(sha512), write_at_(std::move(write_at)), sync_from_(std::move(sync_from)) {
        reset_digests();
        for (int i = 0; i < kBuffers; ++i) {
            char* p = static_cast<char*>(std::aligned_alloc(kBlock, kBufSize));
            if (!p) throw std::bad_alloc();
            pool_.emplace_back(p);
        }
        hasher_ = spawn_quiet([this] { run_hash(); });
        writer_ = spawn_quiet([this] { run_write(); });
    }
    ~HashWriter() {
        {
            std::lock_guard lk(mu_);
            stop_ = true;
        }
        cv_.notify_all();
        hasher_.join();
        writer_.join();
    }
    HashWriter(const HashWriter&) = delete;
    HashWriter& operator=(const HashWriter&) = delete;

    // The fetch's thread: appends bytes at the end of the file.
    void append(const char* data, size_t len) {
        while (len > 0) {
            if (!cur_) {
                cur_ = take_free();
                // After a resume at an unaligned offset the first buffer only fills up to the
                // next 4 KiB boundary, so that every later one starts aligned.
                auto mis = static_cast<size_t>(end_ % int64_t(kBlock));
                cur_cap_ = mis ? kBlock - mis : kBufSize;
            }
            size_t n = std::min(len, cur_cap_ - cur_len_);
            std::memcpy(cur_.get() + cur_len_, data, n);
            cur_len_ += n;
            data += n;
            len -= n;
            if (cur_len_ == cur_cap_) submit();
        }
    }

    // Waits until everything appended is hashed and written; rethrows a write error.
    void drain() {
        if (cur_len_ > 0) submit();
        std::unique_lock lk(mu_);
        cv_.wait(lk, [&] { return in_flight_ == 0 || error_; });
        if (error_) std::rethrow_exception(error_);
    }

    // Starts over at file offset `offset` with fresh digests.
    void reset(int64_t offset) {
        drain();
        reset_digests();
        reset_offset(offset);
    }
    // Appends from file offset `offset` on, keeping the digests (after hash_existing()).
    void reset_offset(int64_t offset) {
        drain();
        end_ = written_back_ = offset;
    }
    // Hashes bytes that are already in the file (the prefix kept from an earlier attempt), while
    // nothing else is in flight.
    void hash_existing(const char* data, size_t len) {
        sha256_->update(data, len);
        if (sha512_) sha512_->update(data, len);
    }
    int64_t end() const { return end_ + static_cast<int64_t>(cur_len_); }
    std::string sha256() { return sha256_->hex(); }
    std::optional<std::string> sha512() {
        return sha512_ ? std::optional<std::string>(sha512_->hex()) : std::nullopt;
    }

  private:
    static constexpr size_t kBlock = 4096;
    static constexpr size_t kBufSize = 256 << 10;  // fits in L2: hashed while hot
    static constexpr int kBuffers = 16;
    static constexpr int64_t kWritebackStep = 64 << 20;
    struct Free {
        void operator()(char* p) const { std::free(p); }
    };
    using Buf = std::unique_ptr<char, Free>;
    struct Job {
        Buf buf;
        size_t len;
        int64_t offset;
    };

    void reset_digests() {
        sha256_ = std::make_unique<Digest>(DigestAlgo::sha256);
        if (sha512_wanted_) sha512_ = std::make_unique<Digest>(DigestAlgo::sha512);
    }

    Buf take_free() {
        std::unique_lock lk(mu_);
        cv_.wait(lk, [&] { return !pool_.empty() || error_; });
        if (error_) std::rethrow_exception(error_);
        Buf b = std::move(pool_.back());
        pool_.pop_back();
        return b;
    }

    void submit() {
        Job j{std::move(cur_), cur_len_, end_};
        end_ += static_cast<int64_t>(cur_len_);
        cur_len_ = 0;
        {
            std::lock_guard lk(mu_);
            ++in_flight_;
            to_hash_.push_back(std::move(j));
        }
        cv_.notify_all();
    }

    // Takes the next job of `q`, or nothing once stopping. Jobs are still taken after an error,
    // and passed on untouched, so that every buffer returns to the pool.
    std::optional<Job> next(std::deque<Job>& q) {
        std::unique_lock lk(mu_);
        cv_.wait(lk, [&] { return stop_ || !q.empty(); });
        if (stop_) return std::nullopt;
        Job j = std::move(q.front());
        q.pop_front();
        return j;
    }

    void failed() {
        std::lock_guard lk(mu_);
        if (!error_) error_ = std::current_exception();
    }

    bool has_failed() {
        std::lock_guard lk(mu_);
        return error_ != nullptr;
    }

    void run_hash() {
        while (auto j = next(to_hash_)) {
            if (!has_failed()) {
                try {
                    sha256_->update(j->buf.get(), j->len);
                    if (sha512_) sha512_->update(j->buf.get(), j->len);
                } catch (...) {
                    failed();
                }
            }
            {
                std::lock_guard lk(mu_);
                to_write_.push_back(std::move(*j));
            }
            cv_.notify_all();
        }
    }

    void run_write() {
        while (auto j = next(to_write_)) {
            if (!has_failed()) {
                try {
                    write_holey(j->buf.get(), j->len, j->offset);
                    // Start writing back what is complete, so the final fsync has little left.
                    int64_t done = j->offset + static_cast<int64_t>(j->len);
                    if (done - written_back_ >= kWritebackStep) {
                        sync_from_(written_back_, done - written_back_);
                        written_back_ = done;
                    }
                } catch (...) {
                    failed();
                }
            }
            {
                std::lock_guard lk(mu_);
                --in_flight_;
                pool_.push_back(std::move(j->buf));
            }
            cv_.notify_all();
        }
    }

    void write_holey(const char* p, size_t len, int64_t base) {
        size_t run_start = 0, i = 0;
        bool in_run = false;
        while (i < len) {
            size_t to_boundary = kBlock - static_cast<size_t>((base + int64_t(i)) % kBlock);
            size_t n = std::min(to_boundary, len - i);
            bool hole = n == kBlock && all_zero_block(p + i, n);
            if (hole && in_run) {
                write_at_(p + run_start, i - run_start, base + int64_t(run_start));
                in_run = false;
            } else if (!hole && !in_run) {
                run_start = i;
                in_run = true;
            }
            i += n;
        }
        if (in_run) write_at_(p + run_start, len - run_start, base + int64_t(run_start));
    }

    const bool sha512_wanted_;
    WriteAt write_at_;
    SyncFrom sync_from_;
    // Owned by the fetch's thread.
    Buf cur_;
    size_t cur_len_ = 0;
    size_t cur_cap_ = kBufSize;
    int64_t end_ = 0;  // file offset where cur_ starts
    // The digests belong to the hashing thread while jobs are in flight, to others after drain().
    std::unique_ptr<Digest> sha256_;
    std::unique_ptr<Digest> sha512_;
    int64_t written_back_ = 0;  // the writing thread's, as the digests are the hasher's
    // Lock order: mu_ is a leaf, never held while hashing, writing or calling out.
    std::mutex mu_;
    std::condition_variable cv_;
    std::deque<Job> to_hash_;
    std::deque<Job> to_write_;
    std::vector<Buf> pool_;
    int in_flight_ = 0;  // submitted and not yet back in the pool
    bool stop_ = false;
    std::exception_ptr error_;
    std::thread hasher_;
    std::thread writer_;
};

}  // namespace imagefs
