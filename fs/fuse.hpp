// The one place that picks the libfuse API version. Only files in fs/ include this.
#pragma once

#define FUSE_USE_VERSION 34
#include <fuse_lowlevel.h>
