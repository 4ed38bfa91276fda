#include "fs/imagefs_fs.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cstring>
#include <fstream>

#include <spdlog/spdlog.h>

#include "fs/errno_map.hpp"

namespace imagefs {
namespace {

constexpr double kActiveTimeout = 86400.0;  // active images never change
constexpr double kChangingEntryTimeout = 1.0;
constexpr double kChangingAttrTimeout = 0.0;
constexpr const char* kXattrPrefix = "user.imagefs.";

int64_t image_id(fuse_ino_t ino) { return static_cast<int64_t>(ino) - 1; }
fuse_ino_t inode_of(int64_t id) { return static_cast<fuse_ino_t>(id + 1); }

ImageFs* self(fuse_req_t req) { return static_cast<ImageFs*>(fuse_req_userdata(req)); }

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

constexpr const char* kXattrKeys[] = {"state",  "progress",     "expected_size", "size",
                                      "error",  "sha256",       "format",        "virtual_size",
                                      "source", "attempts"};

void reply_buffer(fuse_req_t req, const std::string& value, size_t size) {
    if (size == 0)
        fuse_reply_xattr(req, value.size());
    else if (size < value.size())
        fuse_reply_err(req, ERANGE);
    else
        fuse_reply_buf(req, value.data(), value.size());
}

}  // namespace

ImageFs::ImageFs(const StateDir& dir, const DaemonOptions& opts)
    : dir_(dir),
      opts_(opts),
      waits_([this](fuse_req_t req, int64_t id, WaitOutcome o) { answer_open(req, id, o); }),
      kernel_timeout_s_(read_kernel_timeout()) {
    if (kernel_timeout_s_)
        spdlog::info("kernel FUSE request timeout is {} s: waiting opens end before it",
                     kernel_timeout_s_);
}

void ImageFs::attach(fuse_session* se) { se_.store(se); }
void ImageFs::detach() { se_.store(nullptr); }

// ---- catalog events -------------------------------------------------------------------------

void ImageFs::catalog_synced(const std::vector<ImageRow>& rows) { apply(registry_.sync(rows)); }

void ImageFs::image_changed(const ImageRow& row) { apply(registry_.update(row)); }

void ImageFs::image_progress(int64_t id, int64_t bytes) { registry_.set_progress(id, bytes); }

void ImageFs::apply(const std::vector<RegistryEvent>& events) {
    fuse_session* se = se_.load();
    for (const auto& ev : events) {
        const ImageRow& r = ev.row;
        fuse_ino_t ino = inode_of(r.id);
        if (ev.kind == RegistryEvent::removed) {
            {
                std::lock_guard lk(inodes_mu_);
                if (nlookup_.count(ino)) removed_[ino] = r;
            }
            spdlog::info("image '{}' removed", r.name);
            if (se) fuse_lowlevel_notify_inval_entry(se, FUSE_ROOT_ID, r.name.c_str(), r.name.size());
            waits_.resolve_image(r.id, WaitOutcome::removed);
            continue;
        }
        if (ev.kind == RegistryEvent::changed) {
            // Attributes first, so a woken opener's fstat already sees the final size.
            if (se) fuse_lowlevel_notify_inval_inode(se, ino, 0, 0);
        }
        if (ev.kind == RegistryEvent::changed || ev.kind == RegistryEvent::added) {
            if (r.state == State::active)
                waits_.resolve_image(r.id, WaitOutcome::ready);
            else if (r.state == State::failed)
                waits_.resolve_image(r.id, WaitOutcome::failed);
        }
    }
}

// ---- helpers --------------------------------------------------------------------------------

std::optional<ImageRow> ImageFs::image_for(fuse_ino_t ino) const {
    if (auto r = registry_.by_id(image_id(ino))) return r;
    std::lock_guard lk(inodes_mu_);
    auto it = removed_.find(ino);
    if (it == removed_.end()) return std::nullopt;
    return it->second;
}

struct stat ImageFs::stat_of(const ImageRow& r) const {
    struct stat st {};
    st.st_ino = inode_of(r.id);
    st.st_mode = S_IFREG | 0444;
    st.st_nlink = 1;
    st.st_uid = 0;
    st.st_gid = 0;
    st.st_blksize = 1 << 20;
    if (r.state == State::active) {
        st.st_size = r.final_size.value_or(0);
        struct stat data {};
        st.st_blocks = ::stat(dir_.image_path(r.id).c_str(), &data) == 0
                           ? data.st_blocks
                           : (st.st_size + 511) / 512;
    } else {
        st.st_size = r.expected_size.value_or(0);
        st.st_blocks = 0;
    }
    int64_t t = r.activated_at.value_or(r.created_at);
    st.st_mtim.tv_sec = t / 1000;
    st.st_mtim.tv_nsec = (t % 1000) * 1000000;
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
            if (fd < 0) {
                // The row says active but the file is gone: removed in the meantime.
                int e = errno;
                spdlog::warn("open of image #{}: {}", id, std::strerror(e));
                fuse_reply_err(req, e == ENOENT ? ENOENT : EIO);
                return;
            }
            fuse_file_info fi{};
            fi.fh = static_cast<uint64_t>(fd);
            fi.keep_cache = 1;  // the bytes of an active image never change
            if (fuse_reply_open(req, &fi) != 0) ::close(fd);  // the caller went away
            return;
        }
        case WaitOutcome::failed: err = Errc::failed; break;
        case WaitOutcome::removed: err = Errc::not_found; break;
        case WaitOutcome::timed_out: err = Errc::timed_out; break;
        case WaitOutcome::interrupted: err = Errc::cancelled; break;
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
}

void ImageFs::lookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
    reply_guarded(req, "lookup", [&] {
        if (parent != FUSE_ROOT_ID) throw Error(Errc::not_found, "");
        auto row = registry_.by_name(name);
        if (!row) throw Error(Errc::not_found, "");
        fuse_entry_param e{};
        e.ino = inode_of(row->id);
        e.attr = stat_of(*row);
        bool active = row->state == State::active;
        e.attr_timeout = active ? kActiveTimeout : kChangingAttrTimeout;
        e.entry_timeout = active ? kActiveTimeout : kChangingEntryTimeout;
        {
            std::lock_guard lk(inodes_mu_);
            ++nlookup_[e.ino];
        }
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
            struct stat st {};
            st.st_ino = FUSE_ROOT_ID;
            st.st_mode = S_IFDIR | 0555;
            st.st_nlink = 2;
            fuse_reply_attr(req, &st, 1.0);
            return;
        }
        auto row = image_for(ino);
        if (!row) throw Error(Errc::not_found, "");
        struct stat st = stat_of(*row);
        fuse_reply_attr(req, &st,
                        row->state == State::active ? kActiveTimeout : kChangingAttrTimeout);
    });
}

void ImageFs::open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
    reply_guarded(req, "open", [&] {
        if (ino == FUSE_ROOT_ID) throw std::system_error(EISDIR, std::generic_category());
        if ((fi->flags & O_ACCMODE) != O_RDONLY)
            throw std::system_error(EROFS, std::generic_category());
        auto row = registry_.by_id(image_id(ino));
        if (!row) throw Error(Errc::not_found, "");
        if (row->state == State::active) return answer_open(req, row->id, WaitOutcome::ready);
        if (row->state == State::failed) throw Error(Errc::failed, "");
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

void ImageFs::read(fuse_req_t req, size_t size, off_t off, fuse_file_info* fi) {
    fuse_bufvec buf = FUSE_BUFVEC_INIT(size);
    buf.buf[0].flags = static_cast<fuse_buf_flags>(FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK);
    buf.buf[0].fd = static_cast<int>(fi->fh);
    buf.buf[0].pos = off;
    fuse_reply_data(req, &buf, FUSE_BUF_SPLICE_MOVE);
}

void ImageFs::release(fuse_req_t req, fuse_file_info* fi) {
    ::close(static_cast<int>(fi->fh));
    fuse_reply_err(req, 0);
}

void ImageFs::opendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
    if (ino != FUSE_ROOT_ID) return (void)fuse_reply_err(req, ENOTDIR);
    fi->cache_readdir = 0;
    fuse_reply_open(req, fi);
}

void ImageFs::readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off) {
    reply_guarded(req, "readdir", [&] {
        if (ino != FUSE_ROOT_ID) throw std::system_error(ENOTDIR, std::generic_category());
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
                if (next <= off) continue;
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
        auto row = ino == FUSE_ROOT_ID ? std::nullopt : image_for(ino);
        if (!row || n.rfind(kXattrPrefix, 0) != 0)
            throw std::system_error(ENODATA, std::generic_category());
        auto value = xattr_value(*row, n.substr(std::strlen(kXattrPrefix)));
        if (!value) throw std::system_error(ENODATA, std::generic_category());
        reply_buffer(req, *value, size);
    });
}

void ImageFs::listxattr(fuse_req_t req, fuse_ino_t ino, size_t size) {
    reply_guarded(req, "listxattr", [&] {
        std::string names;
        if (auto row = ino == FUSE_ROOT_ID ? std::nullopt : image_for(ino)) {
            for (auto* k : kXattrKeys)
                if (xattr_value(*row, k)) names += std::string(kXattrPrefix) + k + '\0';
        }
        reply_buffer(req, names, size);
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
        o.open = [](fuse_req_t r, fuse_ino_t i, fuse_file_info* fi) { self(r)->open(r, i, fi); };
        o.read = [](fuse_req_t r, fuse_ino_t, size_t s, off_t off, fuse_file_info* fi) {
            self(r)->read(r, s, off, fi);
        };
        o.release = [](fuse_req_t r, fuse_ino_t, fuse_file_info* fi) { self(r)->release(r, fi); };
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
        return o;
    }();
    return ops;
}

}  // namespace imagefs
