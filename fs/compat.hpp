// Answers imagefs gives to the ownership, locking and xattr calls that hypervisor stacks make on
// images, so that they accept the mount. Measured against libvirt 9.0 (Debian 12) with its default
// qemu.conf (dynamic_ownership = 1, remember_owner = 1, qemu running as libvirt-qemu); the
// measurements are in docs/libvirt.md and tests/integration/test_libvirt.cpp holds them.
//
// What libvirt does when it starts a domain whose kernel, initrd or disk is an image here:
// - it opens the image O_RDWR to lock it for its metadata; only EROFS lets the start continue
//   (EACCES and EPERM abort it with "unable to open ...: Invalid argument");
// - it reads trusted.libvirt.security.ref_dac and, if that is merely missing (ENODATA) and the
//   O_RDWR open succeeded, must store trusted.libvirt.security.{dac,timestamp_dac,ref_dac}: any
//   setxattr error (ENOTSUP, EROFS, EPERM) aborts the start. ENOTSUP from getxattr instead tells it
//   the file system keeps no such attributes, and it records nothing;
// - it chowns the image to the qemu user: EROFS, EPERM, ENOTSUP and EINVAL are accepted (qemu then
//   reads the image through its mode 0444), EACCES and EIO abort the start.
#pragma once

#include <cerrno>
#include <string_view>

namespace imagefs::compat {

// errno for an open for writing (O_WRONLY/O_RDWR/O_TRUNC) of an image that is not an upload in
// progress: images never change.
inline constexpr int kImageWriteErrno = EROFS;

// errno for a chown that would change the owner of an image that is not being written: libvirt
// chowns every image a domain uses to its qemu user and does not give read-only ones back.
inline constexpr int kImageOwnershipErrno = EPERM;

// True for xattr names imagefs neither stores nor serves: the trusted.* namespace, where libvirt
// remembers owners and labels. getxattr, setxattr and removexattr of these answer ENOTSUP (not
// ENODATA), so that nothing is ever left behind on an image.
inline bool xattr_unsupported(std::string_view name) {
    return name.rfind("trusted.", 0) == 0;
}

}  // namespace imagefs::compat
