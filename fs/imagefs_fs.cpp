#include "fs/imagefs_fs.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <cstring>
#include <fstream>

#include <spdlog/spdlog.h>

#include "core/names.hpp"
#include "core/signals.hpp"
#include "core/thread.hpp"
#include "fs/compat.hpp"
#include "fs/errno_map.hpp"
#include "import/digest.hpp"

namespace imagefs {
namespace {

constexpr double kActiveTimeout = 86400.0;  // active images never change
constexpr double kChangingEntryTimeout = 1.0;
constexpr double kChangingAttrTimeout = 0.0;
constexpr const char* kXattrPrefix = "user.imagefs.";
constexpr const char* kUserPrefix = "user.";

int64_t image_id(fuse_ino_t ino) {
    return static_cast<int64_t>(ino) - 1;
}
fuse_ino_t inode_of(int64_t id) {
    return static_cast<fuse_ino_t>(id + 1);
}

ImageFs* self(fuse_req_t req) {
    return static_cast<ImageFs*>(fuse_req_userdata(req));
}

[[noreturn]] void fail_errno(int err) {
    throw std::system_error(err, std::generic_category());
}

constexpr const char* kImagefsPrefix = "user.imagefs.";

// The kernel's FUSE request timeout (Linux 6.14+): the smallest of the configured limits.
int read_kernel_timeout() {
    int best = 0;
    for (const char* p :
         {"/proc/sys/fs/fuse/default_request_timeout", "/proc/sys/fs/fuse/max_request_timeout"}) {
        std::ifstream f(p);
        int v = 0;
        if (f >> v && v > 0 && (best == 0 || v < best)) best = v;
    }
    return best;
}

std::optional<std::string> xattr_value(const ImageRow& r, std::string_view key) {
    auto num = [](std::optional<int64_t> v) {
        return v ? std::optional<std::string>(std::to_string(*v)) : std::nullopt;
    };
    if (key == "state") return std::string(to_string(r.state));
    if (key == "progress") return std::to_string(r.bytes_imported);
    if (key == "expected_size") return num(r.expected_size);
    if (key == "size") return num(r.final_size);
    if (key == "error") return r.last_error;
    if (key == "sha256") return r.state == State::active ? r.sha256 : std::nullopt;
    if (key == "format") return r.format;
    if (key == "virtual_size") return num(r.virtual_size);
    if (key == "source") return r.source;
    if (key == "attempts") return std::to_string(r.attempts);
    return std::nullopt;
}

constexpr const char* kXattrKeys[] = {"state",  "progress", "expected_size", "size",   "error",
                                      "sha256", "format",   "virtual_size",  "source", "attempts"};

void reply_buffer(fuse_req_t req, const std::string& value, size_t size) {
    if (size == 0)
        fuse_reply_xattr(req, value.size());
    else if (size < value.size())
        fuse_reply_err(req, ERANGE);
    else
        fuse_reply_buf(req, value.data(), value.size());
}

// True when a setattr would give the file of `row` another owner or group.
bool changes_owner(const ImageRow& row, const struct stat* attr, int to_set) {
    return ((to_set & FUSE_SET_ATTR_UID) && static_cast<int64_t>(attr->st_uid) != row.uid) ||
           ((to_set & FUSE_SET_ATTR_GID) && static_cast<int64_t>(attr->st_gid) != row.gid);
}

}  // namespace

ImageFs::ImageFs(const StateDir& dir, const DaemonOptions& opts)
    : dir_(dir),
      opts_(opts),
      waits_([this](fuse_req_t req, int64_t id, WaitOutcome o) { answer_open(req, id, o); }),
      kernel_timeout_s_(read_kernel_timeout()),
      publisher_(
          dir, *this, [this](Upload& up) { return claim_upload(up); },
          std::chrono::milliseconds(opts.publish_delay_ms)) {
    root_.st_ino = FUSE_ROOT_ID;
    root_.st_mode = S_IFDIR | 0755;
    root_.st_nlink = 2;
    clock_gettime(CLOCK_REALTIME, &root_.st_mtim);
    root_.st_ctim = root_.st_atim = root_.st_mtim;
    if (kernel_timeout_s_)
        spdlog::info("kernel FUSE request timeout is {} s: waiting opens end before it",
                     kernel_timeout_s_);
}

ImageFs::~ImageFs() {
    stop();
    // Handles the kernel never released (the mount went away with files open).
    std::lock_guard lk(handles_mu_);
    for (Handle* h : handles_) {
        h->close_fd();
        delete h;
    }
    handles_.clear();
}

void ImageFs::Handle::close_fd() {
    if (map) ::munmap(const_cast<char*>(map), map_len);
    map = nullptr;
    if (!upload && fd >= 0) ::close(fd);
    fd = -1;
}

ImageFs::Handle* ImageFs::track(Handle* h) {
    std::lock_guard lk(handles_mu_);
    handles_.insert(h);
    return h;
}

void ImageFs::untrack(Handle* h) {
    std::lock_guard lk(handles_mu_);
    handles_.erase(h);
}

void ImageFs::attach(fuse_session* se) {
    se_.store(se);
}
void ImageFs::detach() {
    se_.store(nullptr);
}

void ImageFs::start() {
    waits_.start();
    publisher_.start();
    event_thread_ = spawn_quiet([this] { event_loop(); });
}

void ImageFs::stop() {
    publisher_.stop();  // finishes uploads whose writers closed
    {
        std::lock_guard lk(events_mu_);
        stopping_ = true;
    }
    events_cv_.notify_all();
    if (event_thread_.joinable()) event_thread_.join();
    waits_.stop();
}

Catalog& ImageFs::catalog() {
    thread_local std::unique_ptr<Catalog> cat;
    thread_local std::string path;
    if (!cat || path != dir_.catalog_path().string()) {
        path = dir_.catalog_path().string();
        cat = std::make_unique<Catalog>(path, false);
    }
    return *cat;
}

// ---- catalog events -------------------------------------------------------------------------

void ImageFs::catalog_synced(const std::vector<ImageRow>& rows, int64_t max_id) {
    apply(registry_.sync(rows, max_id));
}

void ImageFs::image_changed(const ImageRow& row) {
    apply(registry_.update(row));
}

void ImageFs::image_progress(int64_t id, int64_t bytes) {
    registry_.set_progress(id, bytes);
}

void ImageFs::apply(const std::vector<RegistryEvent>& events) {
    std::vector<Notice> notices;
    for (const auto& ev : events) {
        const ImageRow& r = ev.row;
        fuse_ino_t ino = inode_of(r.id);
        if (ev.kind == RegistryEvent::removed) {
            {
                std::lock_guard lk(inodes_mu_);
                if (nlookup_.count(ino)) removed_[ino] = r;
            }
            spdlog::info("image '{}' removed", r.name);
            if (auto up = upload_of(r.id)) up->fail("the image was removed while it was written");
            notices.push_back({Notice::inval_entry, FUSE_ROOT_ID, r.name, r.id});
            notices.push_back({Notice::resolve, ino, "", r.id, WaitOutcome::removed});
            continue;
        }
        // Attributes first, so a woken opener's fstat already sees the final size.
        if (ev.kind == RegistryEvent::changed)
            notices.push_back({Notice::inval_inode, ino, "", r.id, WaitOutcome::ready});
        if (r.state == State::active)
            notices.push_back({Notice::resolve, ino, "", r.id, WaitOutcome::ready});
        else if (r.state == State::failed)
            notices.push_back({Notice::resolve, ino, "", r.id, WaitOutcome::failed});
    }
    post(std::move(notices));
}

void ImageFs::post(std::vector<Notice> notices) {
    if (notices.empty()) return;
    {
        std::lock_guard lk(events_mu_);
        for (auto& n : notices) notices_.push_back(std::move(n));
    }
    events_cv_.notify_one();
}

// Kernel notifications must not come from a thread that is answering a request the kernel holds
// a lock for (an unlink or rename holds the directory lock): they run here, in order.
void ImageFs::event_loop() {
    for (;;) {
        Notice n;
        {
            std::unique_lock lk(events_mu_);
            events_cv_.wait(lk, [&] { return stopping_ || !notices_.empty(); });
            if (notices_.empty()) return;
            n = std::move(notices_.front());
            notices_.pop_front();
        }
        fuse_session* se = se_.load();
        switch (n.kind) {
            case Notice::inval_inode:
                if (se) fuse_lowlevel_notify_inval_inode(se, n.ino, 0, 0);
                break;
            case Notice::inval_entry:
                if (se) fuse_lowlevel_notify_inval_entry(se, n.ino, n.name.c_str(), n.name.size());
                break;
            case Notice::resolve:
                waits_.resolve_image(n.id, n.outcome);
                break;
            case Notice::tune_readahead:
                raise_readahead();
                break;
        }
    }
}

void ImageFs::raise_readahead() {
    constexpr int kReadaheadKib = 4096;
    if (device_.empty()) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));  // let the INIT reply land first
    std::string path = "/sys/class/bdi/" + device_ + "/read_ahead_kb";
    int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
    std::string v = std::to_string(kReadaheadKib) + "\n";
    if (fd < 0 || ::write(fd, v.data(), v.size()) != ssize_t(v.size()))
        spdlog::debug("cannot raise readahead in {}: {}", path, std::strerror(errno));
    else
        spdlog::debug("readahead of the mount set to {} KiB", kReadaheadKib);
    if (fd >= 0) ::close(fd);
}

void ImageFs::changed_catalog(const ImageRow& row) {
    apply(registry_.update(row));
}

void ImageFs::drop_files(const ImageRow& row) {
    ::unlink(dir_.image_path(row.id).c_str());
    ::unlink(dir_.staging_path(row.id).c_str());
    if (catalog_changed_) catalog_changed_();  // cancels an HTTP import of it
}

std::shared_ptr<Upload> ImageFs::attach_writer(int64_t id, pid_t process) {
    // Under uploads_mu_, so that claim_upload() never publishes an upload a writer just joined.
    std::lock_guard lk(uploads_mu_);
    auto it = uploads_.find(id);
    if (it == uploads_.end()) return nullptr;
    it->second->add_writer(process);
    return it->second;
}

bool ImageFs::claim_upload(Upload& up) {
    std::lock_guard lk(uploads_mu_);
    auto it = uploads_.find(up.id());
    if (it == uploads_.end() || it->second.get() != &up) return true;  // removed: let it clean up
    if (up.has_writers()) return false;
    uploads_.erase(it);  // from now on, opens for writing get EPERM
    return true;
}

std::shared_ptr<Upload> ImageFs::upload_of(int64_t id) const {
    std::lock_guard lk(uploads_mu_);
    auto it = uploads_.find(id);
    return it == uploads_.end() ? nullptr : it->second;
}

// ---- helpers --------------------------------------------------------------------------------

std::optional<ImageRow> ImageFs::image_for(fuse_ino_t ino) const {
    if (auto r = registry_.by_id(image_id(ino))) return r;
    std::lock_guard lk(inodes_mu_);
    auto it = removed_.find(ino);
    if (it == removed_.end()) return std::nullopt;
    return it->second;
}

struct stat ImageFs::root_attr() const {
    std::lock_guard lk(root_mu_);
    return root_;
}

// The root's mode, owner and times live in memory only: rsync -a sets them on the destination
// directory, and refusing would fail its run.
void ImageFs::set_root_attr(fuse_req_t req, const struct stat* attr, int to_set) {
    struct stat st {};
    {
        std::lock_guard lk(root_mu_);
        if (to_set & FUSE_SET_ATTR_MODE) root_.st_mode = S_IFDIR | (attr->st_mode & 07777);
        if (to_set & FUSE_SET_ATTR_UID) root_.st_uid = attr->st_uid;
        if (to_set & FUSE_SET_ATTR_GID) root_.st_gid = attr->st_gid;
        if (to_set & FUSE_SET_ATTR_MTIME) root_.st_mtim = attr->st_mtim;
        if (to_set & FUSE_SET_ATTR_ATIME) root_.st_atim = attr->st_atim;
        st = root_;
    }
    fuse_reply_attr(req, &st, 1.0);
}

ImageRow ImageFs::require_image(fuse_ino_t ino) const {
    auto row = ino == FUSE_ROOT_ID ? std::nullopt : image_for(ino);
    if (!row) fail_errno(ENOENT);
    return *row;
}

struct stat ImageFs::stat_of(const ImageRow& r) const {
    struct stat st {};
    st.st_ino = inode_of(r.id);
    st.st_mode = S_IFREG | static_cast<mode_t>(r.mode & 07777);
    st.st_nlink = 1;
    st.st_uid = static_cast<uid_t>(r.uid);
    st.st_gid = static_cast<gid_t>(r.gid);
    st.st_blksize = 1 << 20;
    struct stat data {};
    if (r.state == State::active) {
        st.st_size = r.final_size.value_or(0);
        st.st_blocks = ::stat(dir_.image_path(r.id).c_str(), &data) == 0 ? data.st_blocks
                                                                         : (st.st_size + 511) / 512;
    } else if (r.kind == SourceKind::upload && r.state == State::importing &&
               ::stat(dir_.staging_path(r.id).c_str(), &data) == 0) {
        // What the writers wrote so far (the file may lag behind while the pipeline writes).
        auto up = upload_of(r.id);
        st.st_size = up ? std::max<int64_t>(up->size(), data.st_size) : data.st_size;
        st.st_blocks = data.st_blocks;
    } else if (r.final_size) {  // verifying: the bytes are complete
        st.st_size = *r.final_size;
        st.st_blocks = 0;
    } else {
        st.st_size = r.expected_size.value_or(0);
        st.st_blocks = 0;
    }
    int64_t t_ms = r.activated_at.value_or(r.created_at);
    int64_t t_ns = r.mtime_ns.value_or(t_ms * 1000000);
    st.st_mtim.tv_sec = t_ns / 1000000000;
    st.st_mtim.tv_nsec = t_ns % 1000000000;
    st.st_ctim.tv_sec = r.updated_at / 1000;
    st.st_ctim.tv_nsec = (r.updated_at % 1000) * 1000000;
    st.st_atim = st.st_mtim;
    return st;
}

WaitList::Clock::time_point ImageFs::wait_deadline() const {
    using namespace std::chrono;
    auto now = WaitList::Clock::now();
    auto deadline = WaitList::Clock::time_point::max();
    if (opts_.open_timeout_s > 0) deadline = now + seconds(opts_.open_timeout_s);
    if (kernel_timeout_s_ > 0) {
        // End well before the kernel would abort the whole connection.
        int margin = std::min(std::max(3, kernel_timeout_s_ / 4), 30);
        deadline = std::min(deadline, now + seconds(std::max(1, kernel_timeout_s_ - margin)));
    }
    return deadline;
}

void ImageFs::answer_open(fuse_req_t req, int64_t id, WaitOutcome outcome) {
    Errc err = Errc::io;
    switch (outcome) {
        case WaitOutcome::ready: {
            int fd = ::open(dir_.image_path(id).c_str(), O_RDONLY | O_CLOEXEC);
            if (fd >= 0) ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);  // larger disk readahead
            if (fd < 0) {
                // The row says active but the file is gone: removed in the meantime.
                int e = errno;
                spdlog::warn("open of image #{}: {}", id, std::strerror(e));
                fuse_reply_err(req, e == ENOENT ? ENOENT : EIO);
                return;
            }
            auto* h = new Handle{fd, id, nullptr, false, 0};
            struct stat st {};
            if (::fstat(fd, &st) == 0 && st.st_size > 0) {
                void* m = ::mmap(nullptr, size_t(st.st_size), PROT_READ, MAP_SHARED, fd, 0);
                if (m != MAP_FAILED) {
                    h->map = static_cast<const char*>(m);
                    h->map_len = size_t(st.st_size);
                }
            }
            fuse_file_info fi{};
            fi.fh = reinterpret_cast<uint64_t>(track(h));
            fi.keep_cache = 1;                     // the bytes of an active image never change
            if (fuse_reply_open(req, &fi) != 0) {  // the caller went away
                untrack(h);
                h->close_fd();
                delete h;
            }
            return;
        }
        case WaitOutcome::failed:
            err = Errc::failed;
            break;
        case WaitOutcome::removed:
            err = Errc::not_found;
            break;
        case WaitOutcome::timed_out:
            err = Errc::timed_out;
            break;
        case WaitOutcome::interrupted:
            err = Errc::cancelled;
            break;
        case WaitOutcome::shutdown:
            spdlog::warn("daemon stopping: failing a waiting open of image #{}", id);
            err = Errc::io;
            break;
    }
    fuse_reply_err(req, to_errno(err));
}

// ---- handlers -------------------------------------------------------------------------------

void ImageFs::init(fuse_conn_info* conn) {
    if (conn->capable & FUSE_CAP_SPLICE_WRITE) conn->want |= FUSE_CAP_SPLICE_WRITE;
    if (conn->capable & FUSE_CAP_SPLICE_MOVE) conn->want |= FUSE_CAP_SPLICE_MOVE;
    conn->want &= ~FUSE_CAP_AUTO_INVAL_DATA;  // we invalidate explicitly
    conn->max_readahead = conn->max_readahead ? conn->max_readahead : (1 << 20);
    // The kernel caps readahead at what it offered here (128 KiB by default), which makes cold
    // sequential reads latency-bound; raise the mount's own setting once INIT is answered.
    post({{Notice::tune_readahead, 0, "", 0, WaitOutcome::ready}});
}

fuse_entry_param ImageFs::entry_of(const ImageRow& row) {
    fuse_entry_param e{};
    e.ino = inode_of(row.id);
    e.attr = stat_of(row);
    bool active = row.state == State::active;
    e.attr_timeout = active ? kActiveTimeout : kChangingAttrTimeout;
    e.entry_timeout = active ? kActiveTimeout : kChangingEntryTimeout;
    std::lock_guard lk(inodes_mu_);
    ++nlookup_[e.ino];
    return e;
}

void ImageFs::lookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
    reply_guarded(req, "lookup", [&] {
        if (parent != FUSE_ROOT_ID) fail_errno(ENOENT);
        auto row = registry_.by_name(name);
        if (!row) fail_errno(ENOENT);
        fuse_entry_param e = entry_of(*row);
        if (fuse_reply_entry(req, &e) != 0) forget(e.ino, 1);
    });
}

void ImageFs::forget(fuse_ino_t ino, uint64_t n) {
    std::lock_guard lk(inodes_mu_);
    auto it = nlookup_.find(ino);
    if (it == nlookup_.end()) return;
    it->second = it->second > n ? it->second - n : 0;
    if (it->second == 0) {
        nlookup_.erase(it);
        removed_.erase(ino);
    }
}

void ImageFs::getattr(fuse_req_t req, fuse_ino_t ino) {
    reply_guarded(req, "getattr", [&] {
        if (ino == FUSE_ROOT_ID) {
            struct stat st = root_attr();
            fuse_reply_attr(req, &st, 1.0);
            return;
        }
        ImageRow row = require_image(ino);
        struct stat st = stat_of(row);
        fuse_reply_attr(req, &st,
                        row.state == State::active ? kActiveTimeout : kChangingAttrTimeout);
    });
}

void ImageFs::setattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set,
                      fuse_file_info* fi) {
    reply_guarded(req, "setattr", [&] {
        if (ino == FUSE_ROOT_ID) return set_root_attr(req, attr, to_set);
        ImageRow row = require_image(ino);
        // Only the writer's own files (uploads in progress) change owner: libvirt chowns every
        // image a domain uses to its qemu user and never gives read-only ones back.
        if (changes_owner(row, attr, to_set) && !upload_of(row.id))
            fail_errno(compat::kImageOwnershipErrno);
        if (to_set & FUSE_SET_ATTR_SIZE) {
            // Only an upload in progress can change size; active images are immutable.
            auto up = upload_of(row.id);
            if (!up) fail_errno(EPERM);
            up->truncate(attr->st_size);
            registry_.set_progress(row.id, attr->st_size);
        }
        MetaUpdate m;
        if (to_set & FUSE_SET_ATTR_MODE) m.mode = attr->st_mode & 07777;
        if (to_set & FUSE_SET_ATTR_UID) m.uid = attr->st_uid;
        if (to_set & FUSE_SET_ATTR_GID) m.gid = attr->st_gid;
        if (to_set & FUSE_SET_ATTR_MTIME_NOW) {
            timespec now{};
            clock_gettime(CLOCK_REALTIME, &now);
            m.mtime_ns = int64_t(now.tv_sec) * 1000000000 + now.tv_nsec;
        } else if (to_set & FUSE_SET_ATTR_MTIME) {
            m.mtime_ns = int64_t(attr->st_mtim.tv_sec) * 1000000000 + attr->st_mtim.tv_nsec;
        }
        if (m.mode || m.uid || m.gid || m.mtime_ns) {
            auto updated = catalog().set_meta(row.id, m);
            if (!updated) fail_errno(ENOENT);
            row = *updated;
            changed_catalog(row);
        }
        (void)fi;
        struct stat st = stat_of(row);
        fuse_reply_attr(req, &st,
                        row.state == State::active ? kActiveTimeout : kChangingAttrTimeout);
    });
}

namespace {

// Handles on an upload bypass the mount's page cache (FOPEN_DIRECT_IO): a writer's data then goes
// from its own buffer to the daemon in one copy, instead of first being copied into cache pages
// of the mount (which doubled the memory an upload used and took most of a cp's time). Nothing of
// an upload is ever cached, so readers of the published image start from a clean cache.
void upload_io(fuse_file_info& fi) {
    fi.keep_cache = 0;
    fi.direct_io = 1;
}

}  // namespace

void ImageFs::open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
    reply_guarded(req, "open", [&] {
        if (ino == FUSE_ROOT_ID) fail_errno(EISDIR);
        auto row = registry_.by_id(image_id(ino));
        if (!row) fail_errno(ENOENT);
        if ((fi->flags & O_ACCMODE) != O_RDONLY || (fi->flags & O_TRUNC)) {
            // Writers may only join an upload in progress; everything else is immutable.
            pid_t process = thread_group_of(fuse_req_ctx(req)->pid);
            auto up = attach_writer(row->id, process);
            if (!up) fail_errno(compat::kImageWriteErrno);
            if (fi->flags & O_TRUNC) up->truncate(0);
            fi->fh =
                reinterpret_cast<uint64_t>(track(new Handle{up->fd(), row->id, up, true, process}));
            upload_io(*fi);
            if (fuse_reply_open(req, fi) != 0) release(nullptr, fi);
            return;
        }
        if (auto up = upload_of(row->id);
            up && up->is_writer(thread_group_of(fuse_req_ctx(req)->pid))) {
            // The writer reads its own upload back (qemu-img does); nobody else sees it.
            fi->fh = reinterpret_cast<uint64_t>(track(new Handle{up->fd(), row->id, up, false, 0}));
            upload_io(*fi);
            if (fuse_reply_open(req, fi) != 0) release(nullptr, fi);
            return;
        }
        if (row->state == State::active) return answer_open(req, row->id, WaitOutcome::ready);
        if (row->state == State::failed)
            throw Error(Errc::failed,
                        "'" + row->name + "' failed: " + row->last_error.value_or(""));
        if ((fi->flags & O_NONBLOCK) || opts_.open_mode == OpenMode::eagain)
            throw Error(Errc::not_ready, "");

        // Keep the request and return: the thread that ends the wait answers it.
        const fuse_ctx* ctx = fuse_req_ctx(req);
        uint64_t h = waits_.add(req, row->id, ctx->pid, wait_deadline());
        fuse_req_interrupt_func(
            req, [](fuse_req_t r, void* data) { static_cast<WaitList*>(data)->interrupt(r); },
            &waits_);
        waits_.registered(h);
        // The state may have changed between the check above and add(): look again.
        auto now = registry_.by_id(row->id);
        if (!now)
            waits_.resolve(h, WaitOutcome::removed);
        else if (now->state == State::active)
            waits_.resolve(h, WaitOutcome::ready);
        else if (now->state == State::failed)
            waits_.resolve(h, WaitOutcome::failed);
        spdlog::debug("open of '{}' waits (pid {})", row->name, ctx->pid);
    });
}

void ImageFs::create(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode,
                     fuse_file_info* fi) {
    reply_guarded(req, "create", [&] {
        if (parent != FUSE_ROOT_ID) fail_errno(ENOENT);
        if (opts_.read_only) fail_errno(EROFS);
        try {
            validate_image_name(name);
        } catch (const Error&) {
            fail_errno(std::string_view(name).size() > 255 ? ENAMETOOLONG : EINVAL);
        }
        if (registry_.by_name(name)) fail_errno(EEXIST);
        const fuse_ctx* ctx = fuse_req_ctx(req);
        NewUpload nu{name, static_cast<int64_t>(mode & 07777), static_cast<int64_t>(ctx->uid),
                     static_cast<int64_t>(ctx->gid)};
        ImageRow row = catalog().add_upload(nu);
        int fd =
            ::open(dir_.staging_path(row.id).c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd < 0) {
            int err = errno;
            catalog().remove_id(row.id);
            fail_errno(err);
        }
        auto up = std::make_shared<Upload>(row.id, row.import_token, fd);
        pid_t process = thread_group_of(ctx->pid);
        up->add_writer(process);
        {
            std::lock_guard lk(uploads_mu_);
            uploads_[row.id] = up;
        }
        changed_catalog(row);
        spdlog::info("upload of '{}' started (pid {})", row.name, ctx->pid);
        fuse_entry_param e = entry_of(row);
        fi->fh = reinterpret_cast<uint64_t>(track(new Handle{fd, row.id, up, true, process}));
        upload_io(*fi);
        if (fuse_reply_create(req, &e, fi) != 0) {
            forget(e.ino, 1);
            release(nullptr, fi);
        }
    });
}

void ImageFs::read(fuse_req_t req, size_t size, off_t off, fuse_file_info* fi) {
    auto* h = reinterpret_cast<Handle*>(fi->fh);
    if (h->map) {
        // Active images never change size: the mapping covers every byte there is.
        size_t n = off < 0 || size_t(off) >= h->map_len ? 0 : std::min(size, h->map_len - off);
        fuse_reply_buf(req, n ? h->map + off : nullptr, n);
        return;
    }
    reply_guarded(req, "read", [&] {
        if (h->upload) h->upload->settle();  // the writer reads what it wrote (qemu-img does)
        fuse_bufvec buf = FUSE_BUFVEC_INIT(size);
        buf.buf[0].flags = static_cast<fuse_buf_flags>(FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK);
        buf.buf[0].fd = h->fd;
        buf.buf[0].pos = off;
        fuse_reply_data(req, &buf, FUSE_BUF_SPLICE_MOVE);
    });
}

// How often a write records an upload's progress in the catalog (imports: progress_interval_ms).
constexpr std::chrono::milliseconds kUploadProgressInterval{500};

void ImageFs::write(fuse_req_t req, const char* data, size_t size, off_t off, fuse_file_info* fi) {
    reply_guarded(req, "write", [&] {
        auto* h = reinterpret_cast<Handle*>(fi->fh);
        if (!h->writes) fail_errno(EBADF);
        h->upload->write(data, size, off);
        registry_.set_progress(h->id, h->upload->size());
        if (h->upload->progress_due(kUploadProgressInterval))
            catalog().update_progress(h->id, h->upload->token(), h->upload->size());
        fuse_reply_write(req, size);
    });
}

void ImageFs::lseek(fuse_req_t req, off_t off, int whence, fuse_file_info* fi) {
    auto* h = reinterpret_cast<Handle*>(fi->fh);
    reply_guarded(req, "lseek", [&] {
        if (h->upload) h->upload->settle();
        off_t r = ::lseek(h->fd, off, whence);
        if (r < 0) return (void)fuse_reply_err(req, errno);
        fuse_reply_lseek(req, r);
    });
}

void ImageFs::flush(fuse_req_t req, fuse_file_info* fi) {
    auto* h = reinterpret_cast<Handle*>(fi->fh);
    if (h->writes) {
        // A writer that is being killed closes its files on the way out: what it wrote is not
        // what it meant to write.
        // Only the process that opened the file counts: a child that inherited the descriptor
        // (a shell's `{ cat img; false; } > MNT/x`) closes it too when it exits.
        pid_t pid = fuse_req_ctx(req)->pid;
        ExitState ex = process_exit_state(pid);
        if (ex.exiting && ex.exit_code != 0 && thread_group_of(pid) == h->process) {
            std::string why =
                (ex.exit_code & 0x7f)
                    ? "the writer (pid " + std::to_string(pid) + ") was killed by signal " +
                          std::to_string(ex.exit_code & 0x7f)
                    : "the writer (pid " + std::to_string(pid) + ") exited with status " +
                          std::to_string((ex.exit_code >> 8) & 0xff);
            spdlog::warn("upload #{}: {}", h->id, why);
            h->upload->fail(why + " before it finished");
            return (void)fuse_reply_err(req, 0);
        }
    }
    // A write that failed after it was answered (the pipeline writes behind) fails the close.
    reply_guarded(req, "flush", [&] {
        if (h->writes) h->upload->settle();
        fuse_reply_err(req, 0);
    });
}

void ImageFs::fsync(fuse_req_t req, fuse_file_info* fi) {
    auto* h = reinterpret_cast<Handle*>(fi->fh);
    reply_guarded(req, "fsync", [&] {
        if (h->writes) h->upload->settle();
        fuse_reply_err(req, h->writes && ::fsync(h->fd) != 0 ? errno : 0);
    });
}

void ImageFs::release(fuse_req_t req, fuse_file_info* fi) {
    std::unique_ptr<Handle> h(reinterpret_cast<Handle*>(fi->fh));
    untrack(h.get());
    h->close_fd();
    if (h->upload && h->writes && h->upload->remove_writer(h->process))
        publisher_.submit(h->upload);  // published after the grace period unless a writer returns
    if (req) fuse_reply_err(req, 0);
}

void ImageFs::unlink(fuse_req_t req, fuse_ino_t parent, const char* name) {
    reply_guarded(req, "unlink", [&] {
        if (parent != FUSE_ROOT_ID) fail_errno(ENOENT);
        auto row = catalog().remove(name);
        if (!row) fail_errno(ENOENT);
        apply(registry_.remove(row->id));
        drop_files(*row);
        fuse_reply_err(req, 0);
    });
}

void ImageFs::rename(fuse_req_t req, fuse_ino_t parent, const char* name, fuse_ino_t newparent,
                     const char* newname, unsigned int flags) {
    reply_guarded(req, "rename", [&] {
        if (parent != FUSE_ROOT_ID || newparent != FUSE_ROOT_ID) fail_errno(ENOENT);
        if (flags & RENAME_EXCHANGE) fail_errno(EINVAL);
        RenameResult res;
        try {
            res = catalog().rename(name, newname, !(flags & RENAME_NOREPLACE));
        } catch (const Error& e) {
            if (e.code() == Errc::invalid_argument)
                fail_errno(std::string_view(newname).size() > 255 ? ENAMETOOLONG : EINVAL);
            throw;
        }
        if (res.replaced) {
            apply(registry_.remove(res.replaced->id));
            drop_files(*res.replaced);
        }
        changed_catalog(res.moved);
        fuse_reply_err(req, 0);
    });
}

void ImageFs::opendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
    if (ino != FUSE_ROOT_ID) return (void)fuse_reply_err(req, ENOTDIR);
    fi->cache_readdir = 0;
    fuse_reply_open(req, fi);
}

void ImageFs::readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off) {
    reply_guarded(req, "readdir", [&] {
        if (ino != FUSE_ROOT_ID) fail_errno(ENOTDIR);
        // Offsets are stable across changes: 1 ".", 2 "..", then id + 2 for each image in id order.
        std::string buf(size, '\0');
        size_t used = 0;
        auto add = [&](const char* name, fuse_ino_t i, mode_t mode, off_t next) {
            struct stat st {};
            st.st_ino = i;
            st.st_mode = mode;
            size_t need = fuse_add_direntry(req, nullptr, 0, name, nullptr, 0);
            if (used + need > size) return false;
            fuse_add_direntry(req, buf.data() + used, size - used, name, &st, next);
            used += need;
            return true;
        };
        bool room = true;
        if (off < 1) room = add(".", FUSE_ROOT_ID, S_IFDIR, 1);
        if (room && off < 2) room = add("..", FUSE_ROOT_ID, S_IFDIR, 2);
        if (room) {
            for (const auto& r : registry_.snapshot()) {
                off_t next = static_cast<off_t>(r.id) + 2;
                if (next <= off || !shown_in_listing(r, opts_.list_mode)) continue;
                if (!add(r.name.c_str(), inode_of(r.id), S_IFREG, next)) break;
            }
        }
        fuse_reply_buf(req, buf.data(), used);
    });
}

void ImageFs::statfs(fuse_req_t req) {
    struct statvfs sv {};
    if (::statvfs(dir_.root().c_str(), &sv) != 0) return (void)fuse_reply_err(req, errno);
    sv.f_namemax = 255;
    fuse_reply_statfs(req, &sv);
}

void ImageFs::getxattr(fuse_req_t req, fuse_ino_t ino, const char* name, size_t size) {
    reply_guarded(req, "getxattr", [&] {
        std::string_view n(name);
        if (compat::xattr_unsupported(n)) fail_errno(ENOTSUP);
        if (ino == FUSE_ROOT_ID) fail_errno(ENODATA);
        ImageRow row = require_image(ino);
        std::optional<std::string> value;
        if (n.rfind(kImagefsPrefix, 0) == 0) {
            value = xattr_value(row, n.substr(std::strlen(kImagefsPrefix)));
        } else {
            auto it = row.xattrs.find(std::string(n));
            if (it != row.xattrs.end()) value = it->second;
        }
        if (!value) fail_errno(ENODATA);
        reply_buffer(req, *value, size);
    });
}

void ImageFs::listxattr(fuse_req_t req, fuse_ino_t ino, size_t size) {
    reply_guarded(req, "listxattr", [&] {
        std::string names;
        if (auto row = ino == FUSE_ROOT_ID ? std::nullopt : image_for(ino)) {
            for (auto* k : kXattrKeys)
                if (xattr_value(*row, k)) names += std::string(kImagefsPrefix) + k + '\0';
            for (const auto& [k, v] : row->xattrs) names += k + '\0';
        }
        reply_buffer(req, names, size);
    });
}

void ImageFs::setxattr(fuse_req_t req, fuse_ino_t ino, const char* name, const char* value,
                       size_t size, int flags) {
    reply_guarded(req, "setxattr", [&] {
        std::string_view n(name);
        ImageRow row = require_image(ino);
        std::string_view v(value, size);
        if (n == "user.imagefs.sha256") {
            // On an upload in progress: verify against this digest when the last writer closes.
            std::string hex = normalize_hex_digest(DigestAlgo::sha256, v);
            auto up = upload_of(row.id);
            if (up && catalog().set_expected_sha256(row.id, up->token(), hex)) {
                if (auto r = catalog().get(row.id)) changed_catalog(*r);
            } else if (row.sha256 != hex) {
                fail_errno(EPERM);
            }
            return (void)fuse_reply_err(req, 0);
        }
        // The other user.imagefs.* attributes are computed: writes to them are ignored, so that
        // copying between imagefs mounts with rsync -X works.
        if (n.rfind(kImagefsPrefix, 0) == 0) return (void)fuse_reply_err(req, 0);
        if (n.rfind(kUserPrefix, 0) != 0) fail_errno(ENOTSUP);
        if (n.size() > 255 || size > 65536) fail_errno(ERANGE);
        bool exists = row.xattrs.count(std::string(n)) != 0;
        if ((flags & XATTR_CREATE) && exists) fail_errno(EEXIST);
        if ((flags & XATTR_REPLACE) && !exists) fail_errno(ENODATA);
        if (!catalog().set_xattr(row.id, n, v)) fail_errno(ENOENT);
        if (auto r = catalog().get(row.id)) changed_catalog(*r);
        fuse_reply_err(req, 0);
    });
}

void ImageFs::removexattr(fuse_req_t req, fuse_ino_t ino, const char* name) {
    reply_guarded(req, "removexattr", [&] {
        std::string_view n(name);
        ImageRow row = require_image(ino);
        if (n.rfind(kImagefsPrefix, 0) == 0) return (void)fuse_reply_err(req, 0);  // computed
        if (n.rfind(kUserPrefix, 0) != 0) fail_errno(ENOTSUP);
        if (!catalog().remove_xattr(row.id, n)) fail_errno(ENODATA);
        if (auto r = catalog().get(row.id)) changed_catalog(*r);
        fuse_reply_err(req, 0);
    });
}

// ---- the C trampolines ------------------------------------------------------------------------

const fuse_lowlevel_ops& ImageFs::ops() {
    static const fuse_lowlevel_ops ops = [] {
        fuse_lowlevel_ops o{};
        o.init = [](void* data, fuse_conn_info* conn) { static_cast<ImageFs*>(data)->init(conn); };
        o.lookup = [](fuse_req_t r, fuse_ino_t p, const char* n) { self(r)->lookup(r, p, n); };
        o.forget = [](fuse_req_t r, fuse_ino_t i, uint64_t n) {
            self(r)->forget(i, n);
            fuse_reply_none(r);
        };
        o.forget_multi = [](fuse_req_t r, size_t count, fuse_forget_data* f) {
            for (size_t i = 0; i < count; ++i) self(r)->forget(f[i].ino, f[i].nlookup);
            fuse_reply_none(r);
        };
        o.getattr = [](fuse_req_t r, fuse_ino_t i, fuse_file_info*) { self(r)->getattr(r, i); };
        o.setattr = [](fuse_req_t r, fuse_ino_t i, struct stat* a, int s, fuse_file_info* fi) {
            self(r)->setattr(r, i, a, s, fi);
        };
        o.open = [](fuse_req_t r, fuse_ino_t i, fuse_file_info* fi) { self(r)->open(r, i, fi); };
        o.create = [](fuse_req_t r, fuse_ino_t p, const char* n, mode_t m, fuse_file_info* fi) {
            self(r)->create(r, p, n, m, fi);
        };
        o.read = [](fuse_req_t r, fuse_ino_t, size_t s, off_t off, fuse_file_info* fi) {
            self(r)->read(r, s, off, fi);
        };
        o.write = [](fuse_req_t r, fuse_ino_t, const char* b, size_t s, off_t off,
                     fuse_file_info* fi) { self(r)->write(r, b, s, off, fi); };
        o.lseek = [](fuse_req_t r, fuse_ino_t, off_t off, int whence, fuse_file_info* fi) {
            self(r)->lseek(r, off, whence, fi);
        };
        o.flush = [](fuse_req_t r, fuse_ino_t, fuse_file_info* fi) { self(r)->flush(r, fi); };
        o.fsync = [](fuse_req_t r, fuse_ino_t, int, fuse_file_info* fi) { self(r)->fsync(r, fi); };
        o.release = [](fuse_req_t r, fuse_ino_t, fuse_file_info* fi) { self(r)->release(r, fi); };
        o.unlink = [](fuse_req_t r, fuse_ino_t p, const char* n) { self(r)->unlink(r, p, n); };
        o.rename = [](fuse_req_t r, fuse_ino_t p, const char* n, fuse_ino_t np, const char* nn,
                      unsigned int f) { self(r)->rename(r, p, n, np, nn, f); };
        o.opendir = [](fuse_req_t r, fuse_ino_t i, fuse_file_info* fi) {
            self(r)->opendir(r, i, fi);
        };
        o.readdir = [](fuse_req_t r, fuse_ino_t i, size_t s, off_t off, fuse_file_info*) {
            self(r)->readdir(r, i, s, off);
        };
        o.statfs = [](fuse_req_t r, fuse_ino_t) { self(r)->statfs(r); };
        o.getxattr = [](fuse_req_t r, fuse_ino_t i, const char* n, size_t s) {
            self(r)->getxattr(r, i, n, s);
        };
        o.listxattr = [](fuse_req_t r, fuse_ino_t i, size_t s) { self(r)->listxattr(r, i, s); };
        o.setxattr = [](fuse_req_t r, fuse_ino_t i, const char* n, const char* v, size_t s, int f) {
            self(r)->setxattr(r, i, n, v, s, f);
        };
        o.removexattr = [](fuse_req_t r, fuse_ino_t i, const char* n) {
            self(r)->removexattr(r, i, n);
        };
        // A flat namespace of regular files.
        o.mkdir = [](fuse_req_t r, fuse_ino_t, const char*, mode_t) { fuse_reply_err(r, EPERM); };
        o.mknod = [](fuse_req_t r, fuse_ino_t, const char*, mode_t, dev_t) {
            fuse_reply_err(r, EPERM);
        };
        o.symlink = [](fuse_req_t r, const char*, fuse_ino_t, const char*) {
            fuse_reply_err(r, EPERM);
        };
        o.link = [](fuse_req_t r, fuse_ino_t, fuse_ino_t, const char*) {
            fuse_reply_err(r, EPERM);
        };
        o.rmdir = [](fuse_req_t r, fuse_ino_t, const char*) { fuse_reply_err(r, ENOTDIR); };
        return o;
    }();
    return ops;
}

}  // namespace imagefs
