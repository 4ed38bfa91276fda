// libvirt and qemu on the mount, against a real libvirtd (Debian 12: libvirt 9.0, qemu 7.2).
//
// The Libvirtd fixture creates the libvirt-qemu account if it is missing, starts virtlogd (unless
// one is running) and libvirtd with its own socket directory, talks to it with virsh, and stops
// what it started. Pools and domains are transient (pool-create-as, create): libvirt keeps no
// configuration of them. Guests run under KVM where /dev/kvm is usable, else TCG, and are stopped
// as soon as the kernel frees its init memory on the serial console.
//
// Run these alone with `ctest -L libvirt`; they hold the ctest resource lock "libvirtd".
#include <fcntl.h>
#include <grp.h>
#include <linux/kvm.h>
#include <pwd.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <dirent.h>
#include <algorithm>
#include <catch2/catch.hpp>
#include <cerrno>
#include <cstring>
#include <map>
#include <memory>
#include <sstream>
#include <thread>

#include "support.hpp"

using namespace itest;
using Catch::Matchers::Contains;

namespace {

const std::string kFreeingLine = "Freeing unused kernel image";
const std::string kVirtlogdSocket = "/run/libvirt/virtlogd-sock";

// ---- processes --------------------------------------------------------------------------------

// Starts argv with stdin from /dev/null and stdout+stderr appended to `log`.
pid_t spawn(const std::vector<std::string>& argv, const std::string& log) {
    pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        int in = ::open("/dev/null", O_RDONLY);
        int out = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
        ::dup2(in, 0);
        ::dup2(out, 1);
        ::dup2(out, 2);
        sigset_t none;
        sigemptyset(&none);
        ::sigprocmask(SIG_SETMASK, &none, nullptr);
        std::vector<char*> av;
        for (const auto& a : argv) av.push_back(const_cast<char*>(a.c_str()));
        av.push_back(nullptr);
        ::execvp(av[0], av.data());
        ::_exit(127);
    }
    return pid;
}

// Waits for a child; its exit status (128 + signal if killed), or nullopt after `timeout`.
std::optional<int> reap(pid_t pid, std::chrono::milliseconds timeout) {
    auto end = std::chrono::steady_clock::now() + timeout;
    for (;;) {
        int st = 0;
        pid_t r = ::waitpid(pid, &st, WNOHANG);
        if (r == pid) return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        if (r < 0) return -1;
        if (std::chrono::steady_clock::now() >= end) return std::nullopt;
        std::this_thread::sleep_for(20ms);
    }
}

void stop(pid_t pid, std::chrono::seconds grace) {
    if (pid <= 0) return;
    ::kill(pid, SIGTERM);
    if (!reap(pid, grace)) {
        ::kill(pid, SIGKILL);
        reap(pid, 10s);
    }
}

bool socket_alive(const std::string& path) {
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return false;
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strncpy(a.sun_path, path.c_str(), sizeof a.sun_path - 1);
    bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
    ::close(fd);
    return ok;
}

// Pids of processes whose command line contains `needle`.
std::vector<pid_t> processes_with(const std::string& needle) {
    std::vector<pid_t> out;
    std::unique_ptr<DIR, int (*)(DIR*)> d(::opendir("/proc"), ::closedir);
    while (dirent* e = ::readdir(d.get())) {
        pid_t pid = std::atoi(e->d_name);
        if (pid <= 0 || pid == ::getpid()) continue;
        std::string cmd = read_file("/proc/" + std::string(e->d_name) + "/cmdline");
        std::replace(cmd.begin(), cmd.end(), '\0', ' ');
        if (cmd.find(needle) != std::string::npos) out.push_back(pid);
    }
    return out;
}

// True once `path` contains `text`; false after `timeout`.
bool wait_for_text(const std::string& path, const std::string& text, std::chrono::seconds timeout) {
    auto end = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < end) {
        if (read_file(path).find(text) != std::string::npos) return true;
        std::this_thread::sleep_for(100ms);
    }
    return false;
}

// ---- the host -----------------------------------------------------------------------------------

// KVM when the kernel offers it and the CPU advertises hardware virtualization (a nested guest
// can open /dev/kvm and still not run a guest); else TCG.
bool kvm_usable() {
    int fd = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (fd < 0) return false;
    int vm = ::ioctl(fd, KVM_CREATE_VM, 0);
    if (vm >= 0) ::close(vm);
    ::close(fd);
    if (vm < 0) return false;
    std::string cpuinfo = read_file("/proc/cpuinfo");
    return cpuinfo.find(" vmx") != std::string::npos || cpuinfo.find(" svm") != std::string::npos;
}

// libvirt runs qemu as libvirt-qemu:libvirt-qemu (its built-in default on Debian); the package that
// creates that account (libvirt-daemon-system) needs systemd, so create it here when missing.
void ensure_qemu_account() {
    if (!::getgrnam("libvirt-qemu"))
        REQUIRE(run({"groupadd", "--system", "libvirt-qemu"}).status == 0);
    if (!::getpwnam("libvirt-qemu"))
        REQUIRE(
            run({"useradd", "--system", "--gid", "libvirt-qemu", "--no-create-home", "--home-dir",
                 "/var/lib/libvirt", "--shell", "/usr/sbin/nologin", "libvirt-qemu"})
                .status == 0);
}

// When /dev/kvm exists but libvirt-qemu cannot open it (no udev rule made it root:kvm 0660),
// libvirt's capabilities cache is never valid: it probes qemu again on every call (measured: about
// a minute per `virsh create`). Grant access the way Debian does (group kvm, mode 0660) for the
// life of the fixture, and put the device back as it was afterwards.
class KvmAccess {
  public:
    KvmAccess() {
        struct stat st {};
        if (::stat("/dev/kvm", &st) != 0) return;
        if (run({"runuser", "-u", "libvirt-qemu", "--", "test", "-r", "/dev/kvm", "-a", "-w",
                 "/dev/kvm"})
                .status == 0)
            return;
        if (!::getgrnam("kvm")) REQUIRE(run({"groupadd", "--system", "kvm"}).status == 0);
        REQUIRE(run({"usermod", "-aG", "kvm", "libvirt-qemu"}).status == 0);
        old_ = st;
        REQUIRE(::chown("/dev/kvm", static_cast<uid_t>(-1), ::getgrnam("kvm")->gr_gid) == 0);
        REQUIRE(::chmod("/dev/kvm", 0660) == 0);
    }
    ~KvmAccess() {
        if (!old_) return;
        ::chown("/dev/kvm", old_->st_uid, old_->st_gid);
        ::chmod("/dev/kvm", old_->st_mode & 07777);
    }
    KvmAccess(const KvmAccess&) = delete;
    KvmAccess& operator=(const KvmAccess&) = delete;

  private:
    std::optional<struct stat> old_;
};

// A libvirtd of our own (qemu:///system on a private socket), with the default qemu.conf settings:
// dynamic_ownership = 1, remember_owner = 1, qemu as libvirt-qemu.
class Libvirtd {
  public:
    Libvirtd() {
        // One libvirtd per machine: other test runs (another build tree, another worktree) wait
        // for this lock rather than fail on the daemon already running.
        lock_fd_ =
            ::open("/run/lock/imagefs-libvirt-tests.lock", O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        REQUIRE(lock_fd_ >= 0);
        auto give_up = std::chrono::steady_clock::now() + 240s;
        while (::flock(lock_fd_, LOCK_EX | LOCK_NB) != 0) {
            if (std::chrono::steady_clock::now() > give_up)
                FAIL(
                    "another libvirt test run held /run/lock/imagefs-libvirt-tests.lock for 240 s");
            std::this_thread::sleep_for(200ms);
        }
        ensure_qemu_account();
        kvm_ = std::make_unique<KvmAccess>();
        if (!socket_alive(kVirtlogdSocket)) {
            virtlogd_ = spawn({"virtlogd", "-p", dir_ / "virtlogd.pid"}, dir_ / "virtlogd.log");
            auto end = std::chrono::steady_clock::now() + 15s;
            while (!socket_alive(kVirtlogdSocket) && std::chrono::steady_clock::now() < end)
                std::this_thread::sleep_for(50ms);
            REQUIRE(socket_alive(kVirtlogdSocket));
        }
        write_file(dir_ / "libvirtd.conf", "unix_sock_dir = \"" + dir_.path() +
                                               "\"\n"
                                               "auth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\n"
                                               "log_filters = \"1:storage 1:security 3:*\"\n"
                                               "log_outputs = \"1:file:" +
                                               (dir_ / "libvirtd.log") + "\"\n");
        uri_ = "qemu:///system?socket=" + (dir_ / "libvirt-sock");
        libvirtd_ = spawn(
            {"libvirtd", "--config", dir_ / "libvirtd.conf", "--pid-file", dir_ / "libvirtd.pid"},
            dir_ / "libvirtd.out");
        // The first start on a machine probes qemu's capabilities (a few seconds).
        auto end = std::chrono::steady_clock::now() + 120s;
        while (std::chrono::steady_clock::now() < end) {
            if (auto st = reap(libvirtd_, 0ms)) {
                libvirtd_ = -1;
                FAIL("libvirtd exited with "
                     << *st << " (is another libvirtd running? pgrep -a libvirtd):\n"
                     << read_file(dir_ / "libvirtd.out") << log_tail());
            }
            if (virsh({"version"}, 20s).status == 0) return;
            std::this_thread::sleep_for(200ms);
        }
        FAIL("libvirtd did not answer within 120 s:\n" << read_file(dir_ / "libvirtd.out"));
    }

    ~Libvirtd() {
        // libvirtd leaves its guests running when it stops: end the ones the tests left.
        for (const auto& name : lines(virsh({"list", "--name"}, 30s).out))
            if (name.rfind("imagefs-", 0) == 0) virsh({"destroy", name}, 60s);
        for (const auto& name : lines(virsh({"pool-list", "--name"}, 30s).out))
            if (name.rfind("imagefs-", 0) == 0) virsh({"pool-destroy", name}, 60s);
        stop(libvirtd_, 30s);
        stop(virtlogd_, 10s);
        kvm_.reset();
        if (lock_fd_ >= 0) ::close(lock_fd_);  // releases the machine-wide lock
    }

    Libvirtd(const Libvirtd&) = delete;
    Libvirtd& operator=(const Libvirtd&) = delete;

    Result virsh(const std::vector<std::string>& args, std::chrono::seconds timeout = 120s) const {
        std::vector<std::string> argv = {"virsh", "-q", "-c", uri_};
        argv.insert(argv.end(), args.begin(), args.end());
        return run(argv, timeout);
    }
    std::vector<std::string> virsh_argv(const std::vector<std::string>& args) const {
        std::vector<std::string> argv = {"virsh", "-q", "-c", uri_};
        argv.insert(argv.end(), args.begin(), args.end());
        return argv;
    }
    // The end of libvirtd's log (storage and security at debug level), for failure messages.
    std::string log_tail() const {
        std::string l = read_file(dir_ / "libvirtd.log");
        return l.size() > 6000 ? l.substr(l.size() - 6000) : l;
    }

    static std::vector<std::string> lines(const std::string& s) {
        std::vector<std::string> out;
        std::istringstream in(s);
        std::string l;
        while (std::getline(in, l)) {
            auto b = l.find_first_not_of(" \t");
            if (b != std::string::npos)
                out.push_back(l.substr(b, l.find_last_not_of(" \t") - b + 1));
        }
        return out;
    }

    // Volume names of a pool, in the order virsh lists them (by name).
    std::vector<std::string> volumes(const std::string& pool) const {
        auto r = virsh({"vol-list", pool});
        INFO(r.err);
        REQUIRE(r.status == 0);
        std::vector<std::string> names;
        for (const auto& l : lines(r.out)) names.push_back(l.substr(0, l.find(' ')));
        return names;
    }

    // "Capacity" and "Allocation" of `virsh vol-info --bytes`.
    std::pair<int64_t, int64_t> capacity_allocation(const std::string& pool,
                                                    const std::string& vol) const {
        auto r = virsh({"vol-info", "--bytes", "--pool", pool, vol});
        INFO(r.err);
        REQUIRE(r.status == 0);
        auto field = [&](const std::string& key) -> int64_t {
            auto p = r.out.find(key + ":");
            REQUIRE(p != std::string::npos);
            return std::stoll(r.out.substr(p + key.size() + 1));
        };
        return {field("Capacity"), field("Allocation")};
    }

  private:
    TempDir dir_;
    std::string uri_;
    std::unique_ptr<KvmAccess> kvm_;
    pid_t libvirtd_ = -1;
    pid_t virtlogd_ = -1;
    int lock_fd_ = -1;
};

// ---- images and the mount ---------------------------------------------------------------------

// A state dir, its mount and an HTTP server, in a directory libvirt-qemu can traverse (qemu runs
// as that user and must reach the mountpoint).
struct Host {
    TempDir t;
    std::string state = t / "state";
    std::string mnt = t / "mnt";
    std::string www = t / "www";
    std::unique_ptr<HttpServer> http;
    std::unique_ptr<Mount> mount;

    Host() {
        REQUIRE(::chmod(t.path().c_str(), 0711) == 0);
        ::mkdir(www.c_str(), 0755);
        http = std::make_unique<HttpServer>(www);
    }
    // (Re)mounts with `opts`; a previous mount is unmounted first.
    void mount_with(const std::string& opts) {
        mount.reset();
        mount = std::make_unique<Mount>(state, mnt, opts);
    }
    std::string path(const std::string& name) const { return mnt + "/" + name; }

    // Imports a local file and waits until it is active.
    void import_active(const std::string& name, const std::string& file) const {
        auto r = cli(state, {"import", name, file, "--wait"}, 120s);
        INFO(r.out << r.err);
        REQUIRE(r.status == 0);
        REQUIRE(state_of(state, name) == "active");
    }
    // Imports www/FILE over HTTP held by ?gate=NAME: the import stays under way, with the first
    // half of the bytes staged, until release(NAME).
    void import_gated(const std::string& name, const std::string& file,
                      const std::string& gate) const {
        auto r = cli(state, {"import", name, http->url(file + "?gate=" + gate)});
        INFO(r.err);
        REQUIRE(r.status == 0);
        REQUIRE(wait_state(state, name, "importing"));
    }
    void release(const std::string& gate) const { touch(www + "/" + gate); }

    // The boot images: the Debian installer's kernel and initrd, and a 64 MiB qcow2 with data.
    void import_boot_images(bool disk_gated = false) {
        make_qcow2(www + "/disk.qcow2", "64M", "4M");
        import_active("linux", di_kernel());
        import_active("initrd.gz", di_initrd());
        if (disk_gated)
            import_gated("disk.qcow2", "disk.qcow2", "go");
        else
            import_active("disk.qcow2", www + "/disk.qcow2");
    }

    static void make_qcow2(const std::string& path, const std::string& vsize,
                           const std::string& data) {
        REQUIRE(run({"qemu-img", "create", "-q", "-f", "qcow2", path, vsize}).status == 0);
        REQUIRE(run({"qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 " + data, path}).status == 0);
    }

    std::string catalog_field(const std::string& name, const std::string& key) const {
        auto r = cli(state, {"status", name, "--json"});
        REQUIRE(r.status == 0);
        auto p = r.out.find("\"" + key + "\": ");
        REQUIRE(p != std::string::npos);
        p += key.size() + 4;
        auto e = r.out.find_first_of(",\n", p);
        std::string v = r.out.substr(p, e - p);
        if (!v.empty() && v.front() == '"') v = v.substr(1, v.size() - 2);
        return v;
    }
    // The file in the state dir that holds an active image's bytes (inode = catalog id + 1).
    std::string data_file(const std::string& name) const {
        struct stat st {};
        REQUIRE(::stat(path(name).c_str(), &st) == 0);
        return state + "/images/" + std::to_string(st.st_ino - 1) + ".img";
    }
};

// Replaces every @KEY@ in `text`.
std::string fill(std::string text, const std::map<std::string, std::string>& values) {
    for (const auto& [key, value] : values) {
        std::string mark = "@" + key + "@";
        for (auto p = text.find(mark); p != std::string::npos;
             p = text.find(mark, p + value.size()))
            text.replace(p, mark.size(), value);
    }
    return text;
}

// A guest booting the installer from the mount, with the qcow2 image as a read-only disk, and
// optionally a writable qcow2 overlay (outside the mount) whose backing file is on the mount.
std::string domain_xml(const std::string& name, const Host& h, const std::string& console,
                       const std::string& overlay = "") {
    const std::string overlay_disk = R"(
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='@OVERLAY@'/>
      <target dev='vdb' bus='virtio'/>
    </disk>)";
    const std::string domain = R"(<domain type='@TYPE@'>
  <name>@NAME@</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>@MNT@/linux</kernel>
    <initrd>@MNT@/initrd.gz</initrd>
    <cmdline>console=ttyS0</cmdline>
  </os>
  <on_reboot>destroy</on_reboot>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='@MNT@/disk.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <readonly/>
    </disk>@OVERLAY_DISK@
    <serial type='file'><source path='@CONSOLE@'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
)";
    return fill(domain, {{"TYPE", kvm_usable() ? "kvm" : "qemu"},
                         {"NAME", name},
                         {"MNT", h.mnt},
                         {"CONSOLE", console},
                         {"OVERLAY_DISK",
                          overlay.empty() ? "" : fill(overlay_disk, {{"OVERLAY", overlay}})}});
}

// What libvirt (or qemu) must leave as it found it: owner root, mode 0444, no trusted.* xattrs
// (they get ENOTSUP, so libvirt's remember_owner stores nothing), only imagefs's own xattrs, and
// the verified bytes.
void check_untouched(const Host& h, const std::string& name, const std::string& sha256) {
    INFO("image " << name);
    struct stat st {};
    REQUIRE(::stat(h.path(name).c_str(), &st) == 0);
    CHECK(st.st_uid == 0);
    CHECK(st.st_gid == 0);
    CHECK((st.st_mode & 07777) == 0444);
    for (const char* x : {"trusted.libvirt.security.dac", "trusted.libvirt.security.ref_dac",
                          "trusted.libvirt.security.timestamp_dac"}) {
        errno = 0;
        CHECK(::getxattr(h.path(name).c_str(), x, nullptr, 0) == -1);
        CHECK(errno == ENOTSUP);
    }
    char names[4096];
    ssize_t n = ::listxattr(h.path(name).c_str(), names, sizeof names);
    REQUIRE(n >= 0);
    for (ssize_t i = 0; i < n; i += static_cast<ssize_t>(std::strlen(names + i)) + 1)
        CHECK(std::string(names + i).rfind("user.imagefs.", 0) == 0);
    CHECK(sha256_of(h.path(name)) == sha256);
    CHECK(h.catalog_field(name, "sha256") == sha256);
}

}  // namespace

TEST_CASE(
    "libvirt: a dir pool on a list=active mount starts, refreshes and lists every active "
    "image while another imports",
    "[libvirt]") {
    Host h;
    Host::make_qcow2(h.www + "/disk.qcow2", "1G", "2M");
    h.mount_with("allow_other");
    h.import_active("linux", di_kernel());
    h.import_gated("slow.qcow2", "disk.qcow2", "go");
    {
        auto r = cli(h.state, {"import", "bad.img", h.http->url("missing"), "--wait"});
        REQUIRE(r.status == 1);
        REQUIRE(state_of(h.state, "bad.img") == "failed");
    }
    Libvirtd lv;

    // The default listing shows the importing image, and libvirt gives up on the whole pool.
    auto plain = lv.virsh({"pool-create-as", "imagefs-pool", "dir", "--target", h.mnt});
    CHECK(plain.status != 0);
    CHECK_THAT(plain.err, Contains("cannot open volume '" + h.path("slow.qcow2") +
                                   "': Resource temporarily unavailable"));
    CHECK(lv.virsh({"pool-info", "imagefs-pool"}).status != 0);  // nothing left defined

    // Remount with list=active: the import starts again (still held by the gate).
    h.mount_with("allow_other,list=active");
    REQUIRE(wait_state(h.state, "slow.qcow2", "importing"));
    auto created = lv.virsh({"pool-create-as", "imagefs-pool", "dir", "--target", h.mnt});
    INFO(created.err);
    REQUIRE(created.status == 0);
    CHECK(lv.volumes("imagefs-pool") == std::vector<std::string>{"linux"});
    CHECK(lv.virsh({"pool-refresh", "imagefs-pool"}).status == 0);
    CHECK(lv.volumes("imagefs-pool") == std::vector<std::string>{"linux"});
    CHECK(state_of(h.state, "slow.qcow2") == "importing");

    // The listing hides the other images; names still reach them, with the usual answers.
    auto ls = run({"ls", "-A", h.mnt});
    CHECK(ls.out == "linux\n");
    struct stat st {};
    CHECK(::stat(h.path("slow.qcow2").c_str(), &st) == 0);
    CHECK(::stat(h.path("bad.img").c_str(), &st) == 0);
    errno = 0;
    CHECK(::open(h.path("slow.qcow2").c_str(), O_RDONLY | O_NONBLOCK) == -1);
    CHECK(errno == EAGAIN);
    errno = 0;
    CHECK(::open(h.path("bad.img").c_str(), O_RDONLY) == -1);
    CHECK(errno == EIO);

    // Once the import ends, a refresh lists the image with its virtual size.
    h.release("go");
    REQUIRE(wait_state(h.state, "slow.qcow2", "active"));
    REQUIRE(lv.virsh({"pool-refresh", "imagefs-pool"}).status == 0);
    CHECK(lv.volumes("imagefs-pool") == std::vector<std::string>{"linux", "slow.qcow2"});
    CHECK(lv.capacity_allocation("imagefs-pool", "slow.qcow2").first == 1073741824);
    CHECK(lv.virsh({"pool-destroy", "imagefs-pool"}).status == 0);
}

TEST_CASE(
    "libvirt: vol-list --details and vol-info report the virtual size and the allocation of "
    "raw, qcow2 and iso images",
    "[libvirt]") {
    Host h;
    // raw: 64 MiB with 3 MiB of data at 10 MiB (the rest holes); qcow2: 1 GiB guest, 5 MiB written;
    // iso: a real ISO 9660 image holding one 1 MiB file.
    std::string raw = h.www + "/disk.raw";
    REQUIRE(run({"truncate", "-s", "64M", raw}).status == 0);
    REQUIRE(sh("dd if=/dev/urandom of=" + raw + " bs=1M count=3 seek=10 conv=notrunc status=none")
                .status == 0);
    Host::make_qcow2(h.www + "/disk.qcow2", "1G", "5M");
    ::mkdir((h.t / "cd").c_str(), 0755);
    REQUIRE(sh("head -c 1048576 /dev/urandom > " + (h.t / "cd/data.bin")).status == 0);
    REQUIRE(run({"genisoimage", "-quiet", "-V", "IMAGEFS", "-o", h.www + "/cd.iso", h.t / "cd"})
                .status == 0);
    h.mount_with("allow_other,list=active");
    h.import_active("disk.raw", raw);
    h.import_active("disk.qcow2", h.www + "/disk.qcow2");
    h.import_active("cd.iso", h.www + "/cd.iso");

    Libvirtd lv;
    auto created = lv.virsh({"pool-create-as", "imagefs-pool", "dir", "--target", h.mnt});
    INFO(created.err);
    REQUIRE(created.status == 0);

    struct Expect {
        std::string name, format;
        int64_t virtual_size;
    };
    struct stat iso {};
    REQUIRE(::stat((h.www + "/cd.iso").c_str(), &iso) == 0);
    for (const Expect& e :
         {Expect{"disk.raw", "raw", 64 << 20}, Expect{"disk.qcow2", "qcow2", int64_t(1) << 30},
          Expect{"cd.iso", "iso", int64_t(iso.st_size)}}) {
        INFO("volume " << e.name);
        CHECK(h.catalog_field(e.name, "format") == e.format);
        CHECK(h.catalog_field(e.name, "virtual_size") == std::to_string(e.virtual_size));
        auto [capacity, allocation] = lv.capacity_allocation("imagefs-pool", e.name);
        CHECK(capacity == e.virtual_size);
        // Allocation: the blocks the bytes take in the state dir, as the mount reports them.
        struct stat on_mount {
        }, data{};
        REQUIRE(::stat(h.path(e.name).c_str(), &on_mount) == 0);
        REQUIRE(::stat(h.data_file(e.name).c_str(), &data) == 0);
        CHECK(on_mount.st_blocks == data.st_blocks);
        CHECK(allocation == int64_t(data.st_blocks) * 512);
        CHECK(allocation > 0);
        auto xml = lv.virsh({"vol-dumpxml", "--pool", "imagefs-pool", e.name});
        CHECK_THAT(xml.out, Contains("<format type='" + e.format + "'/>"));
    }
    // The sparse raw image takes far less than its size; the qcow2 about what was written.
    CHECK(lv.capacity_allocation("imagefs-pool", "disk.raw").second < (8 << 20));
    CHECK(lv.capacity_allocation("imagefs-pool", "disk.qcow2").second < (8 << 20));

    auto details = lv.virsh({"vol-list", "--details", "imagefs-pool"});
    REQUIRE(details.status == 0);
    std::map<std::string, std::string> rows;
    for (const auto& l : Libvirtd::lines(details.out)) rows[l.substr(0, l.find(' '))] = l;
    REQUIRE(rows.size() == 3);
    CHECK_THAT(rows["disk.raw"], Contains("file   64.00 MiB"));
    CHECK_THAT(rows["disk.qcow2"], Contains("file   1.00 GiB"));
    CHECK_THAT(rows["cd.iso"], Contains(h.path("cd.iso")));
    CHECK(lv.virsh({"pool-destroy", "imagefs-pool"}).status == 0);
}

TEST_CASE(
    "libvirt: a domain whose kernel, initrd and read-only qcow2 disk are on the mount boots "
    "with dynamic ownership and remembered owners, and leaves nothing behind",
    "[libvirt]") {
    Host h;
    h.mount_with("allow_other");
    h.import_boot_images();
    std::map<std::string, std::string> sha = {{"linux", sha256_of(di_kernel())},
                                              {"initrd.gz", sha256_of(di_initrd())},
                                              {"disk.qcow2", sha256_of(h.www + "/disk.qcow2")}};
    // The usual way to give a guest a writable disk: an overlay elsewhere, backed by the image.
    std::string overlay = h.t / "vm.qcow2";
    REQUIRE(run({"qemu-img", "create", "-q", "-f", "qcow2", "-b", h.path("disk.qcow2"), "-F",
                 "qcow2", overlay})
                .status == 0);
    Libvirtd lv;
    std::string console = h.t / "console.log";
    write_file(h.t / "domain.xml", domain_xml("imagefs-boot", h, console, overlay));

    auto created = lv.virsh({"create", h.t / "domain.xml"});
    INFO(created.err << lv.log_tail());
    REQUIRE(created.status == 0);
    INFO("console:\n" << read_file(console));
    REQUIRE(wait_for_text(console, kFreeingLine, 180s));
    // qemu runs as libvirt-qemu and reads the images through their mode 0444; libvirt's chown got
    // EROFS and its owner bookkeeping found no trusted.* support: nothing changed on the images.
    for (const auto& [name, sum] : sha) check_untouched(h, name, sum);
    auto qemu = processes_with("guest=imagefs-boot");
    REQUIRE(qemu.size() == 1);
    CHECK(read_file("/proc/" + std::to_string(qemu[0]) + "/status").find("Uid:\t0") ==
          std::string::npos);

    struct stat ov {};
    REQUIRE(::stat(overlay.c_str(), &ov) == 0);
    CHECK(ov.st_uid == ::getpwnam("libvirt-qemu")->pw_uid);  // libvirt chowned what it could

    REQUIRE(lv.virsh({"destroy", "imagefs-boot"}).status == 0);
    CHECK(Libvirtd::lines(lv.virsh({"list", "--all", "--name"}).out).empty());
    for (const auto& [name, sum] : sha) check_untouched(h, name, sum);
    REQUIRE(::stat(overlay.c_str(), &ov) == 0);
    CHECK(ov.st_uid == 0);  // and gave it back
}

TEST_CASE(
    "libvirt: starting a domain whose disk is still importing waits for the import, then "
    "boots the verified image",
    "[libvirt]") {
    Host h;
    h.mount_with("allow_other");
    h.import_boot_images(/*disk_gated=*/true);
    Libvirtd lv;
    std::string console = h.t / "console.log";
    write_file(h.t / "domain.xml", domain_xml("imagefs-wait", h, console));

    pid_t create = spawn(lv.virsh_argv({"create", h.t / "domain.xml"}), h.t / "create.log");
    // libvirt reads the disk's header with a blocking open: it waits, and no qemu starts.
    auto until = std::chrono::steady_clock::now() + 60s;
    while (h.mount->log().find("open of 'disk.qcow2' waits") == std::string::npos &&
           std::chrono::steady_clock::now() < until)
        std::this_thread::sleep_for(100ms);
    REQUIRE(h.mount->log().find("open of 'disk.qcow2' waits") != std::string::npos);
    std::this_thread::sleep_for(2s);
    CHECK_FALSE(reap(create, 0ms).has_value());
    CHECK(processes_with("guest=imagefs-wait").empty());
    CHECK(state_of(h.state, "disk.qcow2") == "importing");

    h.release("go");
    auto st = reap(create, 120s);
    INFO(read_file(h.t / "create.log"));
    REQUIRE(st.has_value());
    REQUIRE(*st == 0);
    CHECK(state_of(h.state, "disk.qcow2") == "active");
    INFO("console:\n" << read_file(console));
    REQUIRE(wait_for_text(console, kFreeingLine, 180s));
    REQUIRE(lv.virsh({"destroy", "imagefs-wait"}).status == 0);
    check_untouched(h, "disk.qcow2", sha256_of(h.www + "/disk.qcow2"));
}

TEST_CASE(
    "libvirt: with open_timeout, starting a domain whose disk is still importing fails "
    "with a clear error and leaves no domain",
    "[libvirt]") {
    Host h;
    h.mount_with("allow_other,open_timeout=2");
    h.import_boot_images(/*disk_gated=*/true);
    Libvirtd lv;
    write_file(h.t / "domain.xml", domain_xml("imagefs-timeout", h, h.t / "console.log"));

    auto r = lv.virsh({"create", h.t / "domain.xml"}, 60s);
    CHECK(r.status == 1);
    CHECK_THAT(r.err, Contains("Failed to open file '" + h.path("disk.qcow2") +
                               "': Connection timed out"));
    CHECK(Libvirtd::lines(lv.virsh({"list", "--all", "--name"}).out).empty());
    CHECK(processes_with("guest=imagefs-timeout").empty());
    CHECK(state_of(h.state, "disk.qcow2") == "importing");
    h.release("go");
}

TEST_CASE(
    "libvirt: without allow_other qemu's user cannot reach the images and the start fails "
    "naming the file",
    "[libvirt]") {
    Host h;
    h.mount_with("");
    h.import_boot_images();
    Libvirtd lv;
    write_file(h.t / "domain.xml", domain_xml("imagefs-noallow", h, h.t / "console.log"));
    auto r = lv.virsh({"create", h.t / "domain.xml"});
    CHECK(r.status == 1);
    CHECK_THAT(r.err, Contains("Cannot access storage file '" + h.path("disk.qcow2") + "'"));
    CHECK_THAT(r.err, Contains("Permission denied"));
    CHECK(Libvirtd::lines(lv.virsh({"list", "--all", "--name"}).out).empty());
}

TEST_CASE(
    "qemu: qemu-system-x86_64 started directly boots the installer kernel from the mount "
    "with a read-only qcow2 disk",
    "[libvirt][qemu]") {
    Host h;
    h.mount_with("");
    h.import_boot_images();
    std::string sha = sha256_of(h.www + "/disk.qcow2");
    std::string accel = kvm_usable() ? "kvm" : "tcg";
    auto qemu_argv = [&](const std::string& console, const std::string& readonly) {
        return std::vector<std::string>{
            "qemu-system-x86_64",
            "-accel",
            accel,
            "-m",
            "256",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "file:" + console,
            "-kernel",
            h.path("linux"),
            "-initrd",
            h.path("initrd.gz"),
            "-append",
            "console=ttyS0",
            "-drive",
            "file=" + h.path("disk.qcow2") + ",format=qcow2,if=virtio,readonly=" + readonly};
    };

    // Writable use of an image is refused: images never change.
    auto rw = run(qemu_argv(h.t / "rw.log", "off"), 60s);
    CHECK(rw.status == 1);
    CHECK_THAT(rw.err, Contains("Read-only file system"));

    std::string console = h.t / "console.log";
    pid_t qemu = spawn(qemu_argv(console, "on"), h.t / "qemu.log");
    bool booted = wait_for_text(console, kFreeingLine, 180s);
    // qemu holds the disk open from the mount while the guest runs.
    bool disk_open = false;
    std::string fd_dir = "/proc/" + std::to_string(qemu) + "/fd";
    if (std::unique_ptr<DIR, int (*)(DIR*)> d(::opendir(fd_dir.c_str()), ::closedir); d) {
        while (dirent* e = ::readdir(d.get())) {
            char target[4096];
            ssize_t n = ::readlink((fd_dir + "/" + e->d_name).c_str(), target, sizeof target - 1);
            if (n > 0 && std::string(target, n) == h.path("disk.qcow2")) disk_open = true;
        }
    }
    ::kill(qemu, SIGKILL);
    reap(qemu, 10s);
    INFO("console:\n" << read_file(console) << "\nqemu:\n" << read_file(h.t / "qemu.log"));
    CHECK(booted);
    CHECK(disk_open);
    check_untouched(h, "disk.qcow2", sha);
}

TEST_CASE("compat: images answer libvirt's locking open, chown and trusted.* calls as it needs",
          "[libvirt][compat]") {
    Host h;
    h.mount_with("");
    h.import_active("linux", di_kernel());
    const std::string img = h.path("linux");

    // Opening for writing: EROFS, the one errno libvirt's metadata lock goes on with.
    errno = 0;
    CHECK(::open(img.c_str(), O_RDWR) == -1);
    CHECK(errno == EROFS);
    // chown to another owner: EPERM (libvirt goes on); to the same owner: a no-op that succeeds.
    CHECK(::chown(img.c_str(), 999, 999) == -1);
    CHECK(errno == EPERM);
    CHECK(::chown(img.c_str(), 0, 0) == 0);
    // trusted.*: not supported, for reading as for writing, so remember_owner records nothing.
    errno = 0;
    CHECK(::getxattr(img.c_str(), "trusted.libvirt.security.ref_dac", nullptr, 0) == -1);
    CHECK(errno == ENOTSUP);
    errno = 0;
    CHECK(::setxattr(img.c_str(), "trusted.libvirt.security.dac", "+0:+0", 5, 0) == -1);
    CHECK(errno == ENOTSUP);
    struct stat st {};
    REQUIRE(::stat(img.c_str(), &st) == 0);
    CHECK(st.st_uid == 0);
    CHECK(st.st_gid == 0);

    // A file being written into the mount is its writer's: its owner can still be set.
    int fd = ::open(h.path("upload.img").c_str(), O_WRONLY | O_CREAT | O_EXCL, 0644);
    REQUIRE(fd >= 0);
    REQUIRE(::write(fd, "data", 4) == 4);
    CHECK(::fchown(fd, 1234, 1234) == 0);
    ::close(fd);
    REQUIRE(wait_state(h.state, "upload.img", "active"));
    REQUIRE(::stat(h.path("upload.img").c_str(), &st) == 0);
    CHECK(st.st_uid == 1234);
    CHECK(::chown(h.path("upload.img").c_str(), 0, 0) == -1);
    CHECK(errno == EPERM);
}

TEST_CASE("compat: with -o ro the kernel answers libvirt's locking open and chown with EROFS",
          "[libvirt][compat]") {
    Host h;
    h.mount_with("ro");
    h.import_active("linux", di_kernel());
    const std::string img = h.path("linux");
    errno = 0;
    CHECK(::open(img.c_str(), O_RDWR) == -1);
    CHECK(errno == EROFS);
    errno = 0;
    CHECK(::chown(img.c_str(), 999, 999) == -1);
    CHECK(errno == EROFS);
    errno = 0;
    CHECK(::getxattr(img.c_str(), "trusted.libvirt.security.ref_dac", nullptr, 0) == -1);
    CHECK(errno == ENOTSUP);
}
