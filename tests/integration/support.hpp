// Shared fixtures for tests that run the real daemon on a real mount.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace itest {

using namespace std::chrono_literals;

// A fresh directory under /tmp, removed with everything in it (unmounting nothing).
class TempDir {
  public:
    TempDir();
    ~TempDir();
    const std::string& path() const { return path_; }
    std::string operator/(const std::string& name) const { return path_ + "/" + name; }

  private:
    std::string path_;
};

struct Result {
    int status = -1;  // exit code, or 128+signal
    std::string out;
    std::string err;
};

// Runs argv (no shell) and collects its exit status and output.
Result run(const std::vector<std::string>& argv, std::chrono::seconds timeout = 120s);
// Runs a shell command line.
Result sh(const std::string& cmdline, std::chrono::seconds timeout = 120s);

void write_file(const std::string& path, const std::string& data);
std::string read_file(const std::string& path);
std::string sha256_of(const std::string& path);
void touch(const std::string& path);

// The project's scriptable HTTP server (tests/httpd.py) on 127.0.0.1, serving `root`; HTTPS when
// given a certificate and key (PEM files). Its log is root + "/.httpd.log".
class HttpServer {
  public:
    explicit HttpServer(const std::string& root, const std::string& tls_cert = "",
                        const std::string& tls_key = "");
    ~HttpServer();
    std::string url(const std::string& path_and_query) const;
    int port() const { return port_; }

  private:
    pid_t pid_ = -1;
    int port_ = 0;
    std::string scheme_ = "http";
};

// imagefsd -f on a mountpoint. The destructor unmounts and fails the running test if the daemon
// does not exit cleanly (status 0) within 15 s.
class Mount {
  public:
    Mount(std::string state, std::string mnt, std::string opts = "");
    ~Mount();
    void kill9();    // SIGKILL the daemon; leaves the dead mount behind
    void unmount();  // clean unmount; REQUIREs a clean exit
    pid_t pid() const { return pid_; }
    std::string log() const;
    const std::string& mnt() const { return mnt_; }

  private:
    std::string state_, mnt_, log_;
    pid_t pid_ = -1;
};

bool is_mounted(const std::string& mnt);

// The imagefs CLI against `state`.
Result cli(const std::string& state, const std::vector<std::string>& args,
           std::chrono::seconds timeout = 120s);
// Polls `imagefs status --json` until the image reaches `state`; returns false on timeout.
bool wait_state(const std::string& state_dir, const std::string& name, const std::string& state,
                std::chrono::milliseconds timeout = 30s);
std::string state_of(const std::string& state_dir, const std::string& name);

// A child process that calls open(path, flags) and reports the outcome through its exit status:
// 0 when the open succeeded (and fstat's size was written to a result pipe), 100 + errno otherwise.
// SIGINT and SIGQUIT are reset to their defaults first (a non-interactive parent may ignore them).
class OpenerChild {
  public:
    // `setup` runs in the child before open(), e.g. to install signal handlers.
    OpenerChild(const std::string& path, int flags, std::function<void()> setup = {});
    ~OpenerChild();
    void signal(int sig);
    // Waits for the child; nullopt if it is still running after `timeout`.
    std::optional<int> wait(std::chrono::milliseconds timeout);
    // True once the child is blocked inside the open() (in the kernel, waiting for the daemon).
    bool blocked_in_open(std::chrono::milliseconds timeout = 10s);
    int64_t size_seen() const { return size_seen_; }  // st_size after a successful open
    pid_t pid() const { return pid_; }

  private:
    pid_t pid_ = -1;
    int pipe_ = -1;
    int64_t size_seen_ = -1;
};

// Ensures DI kernel/initrd exist and returns their paths.
std::string di_kernel();
std::string di_initrd();

}  // namespace itest
