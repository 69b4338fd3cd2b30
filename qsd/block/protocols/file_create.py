# SPDX-License-Identifier: GPL-2.0-or-later
"""blockdev-create for the ``file`` driver (BlockdevCreateOptionsFile).

What QSD 7.2 does, as observed: the file is created (mode 0644) or, if it
exists, emptied and regrown, so its old contents are gone; the open and
the image locks are checked at once (those errors precede the command's
reply), the truncation and preallocation run in the I/O pool (their errors
follow it).  A file grown from empty gets its first block written (4 KiB of
zeroes, less for a smaller file), which QSD does so that alignment probing
finds data there.  The locks use the write and resize permissions and refuse to
share resize, so a file that a node or another process uses that way is
refused with QEMU's lock error.  ``nocow`` and the extent size hint are
optimisations: failures to set them are ignored (a warning for an explicit
hint), as in QSD.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
from typing import Any

from qsd.block.aio import run_blocking
from qsd.block.locking import ImageLock, ofd_supported
from qsd.block.node import Perm
from qsd.qmp.errors import GenericError

log = logging.getLogger("qsd.block")

_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_NOCOW_FL = 0x00800000
_FS_IOC_FSGETXATTR = 0x801C581F
_FS_IOC_FSSETXATTR = 0x401C5820
_FS_XFLAG_EXTSIZE = 0x00000800
# struct fsxattr: xflags, extsize, nextents, projid, cowextsize, 8 bytes pad
_FSXATTR = struct.Struct("=5I8x")

DEFAULT_EXTENT_SIZE_HINT = 1 << 20
_UINT32_MAX = (1 << 32) - 1
_ZERO_CHUNK = 1 << 16
_FIRST_BLOCK = 4096


def _strerror(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


def _as_off_t(size: int) -> int:
    """A uint64 size as the C off_t it becomes (huge values turn negative)."""
    size &= (1 << 64) - 1
    return size - (1 << 64) if size >= 1 << 63 else size


def _set_nocow(fd: int) -> None:
    """FS_NOCOW_FL (btrfs); filesystems without it simply say no."""
    buf = bytearray(4)
    try:
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, buf)
        flags = struct.unpack("=I", buf)[0] | _FS_NOCOW_FL
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("=I", flags))
    except OSError:
        pass


def _set_extent_size_hint(fd: int, hint: int, explicit: bool) -> None:
    try:
        buf = bytearray(_FSXATTR.size)
        fcntl.ioctl(fd, _FS_IOC_FSGETXATTR, buf)
        xflags, _extsize, nextents, projid, cowextsize = _FSXATTR.unpack(buf)
        fcntl.ioctl(fd, _FS_IOC_FSSETXATTR,
                    _FSXATTR.pack(xflags | _FS_XFLAG_EXTSIZE, hint, nextents, projid, cowextsize))
    except OSError as e:
        if explicit:
            log.warning("Failed to set extent size hint: %s", _strerror(e))


def _resize(fd: int, size: int) -> None:
    try:
        os.ftruncate(fd, size)
    except OSError as e:
        raise GenericError(f"Could not resize file: {_strerror(e)}") from None


def _allocate_first_block(fd: int, size: int) -> None:
    """Write zeroes over the first block of a file grown from empty, as QSD
    does (so that O_DIRECT alignment probing finds allocated data there);
    it is an optimisation, so a failure does not matter."""
    length = min(size, max(_FIRST_BLOCK, os.sysconf("SC_PAGE_SIZE")))
    try:
        os.pwrite(fd, bytes(length), 0)
    except OSError:
        pass


def _truncate(fd: int, size: int, prealloc: str) -> None:
    """Bring the file to ``size`` with the preallocation mode (in the pool)."""
    current = os.fstat(fd).st_size
    if prealloc != "off" and current > size:
        raise GenericError("Cannot use preallocation for shrinking files")
    if prealloc == "off":
        _resize(fd, size)
        if current == 0 and size > 0:
            _allocate_first_block(fd, size)
    elif prealloc == "falloc":
        if size != current:
            try:
                os.posix_fallocate(fd, current, size - current)
            except OSError as e:
                raise GenericError(f"Could not preallocate new data: {_strerror(e)}") from None
            if current == 0:
                _allocate_first_block(fd, size)
    elif prealloc == "full":
        if size != current:
            _resize(fd, size)
        zeroes = memoryview(bytes(_ZERO_CHUNK))
        pos = current
        try:
            while pos < size:
                pos += os.pwrite(fd, zeroes[:min(_ZERO_CHUNK, size - pos)], pos)
        except OSError as e:
            raise GenericError(f"Could not write zeros for preallocation: {_strerror(e)}") from None
        try:
            os.fsync(fd)
        except OSError as e:
            raise GenericError(f"Could not flush file to disk: {_strerror(e)}") from None
    else:
        raise GenericError(f"Unsupported preallocation mode: {prealloc}")


async def create_file(options: dict[str, Any]) -> None:
    """Create (or empty) ``filename`` and size it; QEMU's errors and order."""
    filename: str = options["filename"]
    size = _as_off_t(options["size"])
    prealloc: str = options.get("preallocation", "off")
    explicit_hint = "extent-size-hint" in options
    hint: int = options.get("extent-size-hint", DEFAULT_EXTENT_SIZE_HINT) & ((1 << 64) - 1)
    if hint > _UINT32_MAX:
        raise GenericError("Extent size hint is too large")
    try:
        fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise GenericError(f"Could not create '{filename}': {_strerror(e)}") from None
    try:
        if ofd_supported(fd):
            # Use write and resize, share everything but resize: nobody may
            # change the size while we set it.
            lock = ImageLock(filename)
            perm, unshared = Perm.WRITE | Perm.RESIZE, Perm.RESIZE
            lock.apply(fd, perm, unshared)
            lock.check(fd, perm, unshared)
        await run_blocking(_resize, fd, 0)
        if options.get("nocow", False):
            _set_nocow(fd)
        if hint:
            _set_extent_size_hint(fd, hint, explicit_hint)
        await run_blocking(_truncate, fd, size, prealloc)
    finally:
        os.close(fd)
