// The one place that picks the libfuse API version. Only files in fs/ include this.
#pragma once

// 3.12 (written 312): below it, fuse_session_loop_mt() is the 3.2 entry point, which reads a
// fuse_loop_cfg_create() config as the old struct (clone_fd on, no idle threads kept).
#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>
