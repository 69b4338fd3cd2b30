# SPDX-License-Identifier: GPL-2.0-or-later
"""Image locking compatible with QEMU's: OFD byte-range locks on the image.

Each process that opens an image holds shared (read) OFD locks on single
bytes: byte ``100 + bit`` for every permission it uses and byte
``200 + bit`` for every permission it does not share with others (bit order
of :class:`~qsd.block.node.Perm`).  A process may use a permission only if
nobody holds the matching "unshared" byte, and may refuse to share one only
if nobody holds the matching "used" byte; ``F_OFD_GETLK`` with a write-lock
probe tells whether another open file description holds a byte.  Because
QEMU's tools follow the same layout, qsd and ``qemu-img``/``qemu-io``/
``qemu-storage-daemon`` refuse each other's conflicting opens both ways.

OFD locks belong to the open file description, so two nodes of one process
on the same file conflict like two processes do, and closing the fd drops
them.
"""

from __future__ import annotations

import fcntl
import os
import struct

from qsd.block.node import PERM_NAMES, Perm
from qsd.qmp.errors import GenericError

LOCK_USED_BASE = 100
LOCK_UNSHARED_BASE = 200

# struct flock on Linux/x86-64 and other LP64 ABIs: l_type, l_whence (short),
# l_start, l_len (off_t), l_pid (pid_t), padding.
_FLOCK = struct.Struct("hhqqi4x")


class ImageLockError(GenericError):
    """A lock conflict with another user of the image.

    ``desc`` is what QMP replies carry; command-line front ends print
    ``hint`` on the next line, as QEMU's tools do.
    """

    def __init__(self, desc: str, filename: str) -> None:
        super().__init__(desc)
        self.hint = f"Is another process using the image [{filename}]?"


def _flock(fd: int, cmd: int, ltype: int, start: int) -> int:
    """One fcntl on a single byte; returns the (reported) lock type."""
    data = fcntl.fcntl(fd, cmd, _FLOCK.pack(ltype, os.SEEK_SET, start, 1, 0))
    return int(_FLOCK.unpack(data)[0])


def ofd_supported(fd: int) -> bool:
    """True when the file system of ``fd`` answers OFD lock queries."""
    try:
        _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, LOCK_USED_BASE)
    except OSError:
        return False
    return True


def lock_bytes(perm: Perm, unshared: Perm) -> set[int]:
    """The byte offsets held for using ``perm`` and not sharing ``unshared``."""
    held = set()
    for bit in Perm:
        index = bit.bit_length() - 1
        if perm & bit:
            held.add(LOCK_USED_BASE + index)
        if unshared & bit:
            held.add(LOCK_UNSHARED_BASE + index)
    return held


class ImageLock:
    """The lock bytes one open file description holds on an image."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.held: set[int] = set()

    def apply(self, fd: int, perm: Perm, unshared: Perm) -> None:
        """Hold exactly the bytes for ``perm``/``unshared`` on ``fd``.

        Taking a shared lock never conflicts with other readers, so this
        cannot fail because of another process; conflicts are found by
        :meth:`check`.
        """
        want = lock_bytes(perm, unshared)
        for byte in sorted(want - self.held):
            _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, byte)
        for byte in sorted(self.held - want):
            _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, byte)
        self.held = want

    def move(self, fd: int) -> None:
        """Take the currently held bytes on a new description of the same file."""
        for byte in sorted(self.held):
            _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, byte)

    def check(self, fd: int, perm: Perm, unshared: Perm) -> None:
        """Raise :class:`ImageLockError` if another description conflicts.

        Permissions we want are checked before those we refuse to share,
        each in bit order, which decides the message when several conflict.
        """
        for bit in Perm:
            index = bit.bit_length() - 1
            if perm & bit and self._taken(fd, LOCK_UNSHARED_BASE + index):
                raise ImageLockError(f'Failed to get "{PERM_NAMES[bit]}" lock', self.filename)
        for bit in Perm:
            index = bit.bit_length() - 1
            if unshared & bit and self._taken(fd, LOCK_USED_BASE + index):
                raise ImageLockError(f'Failed to get shared "{PERM_NAMES[bit]}" lock',
                                     self.filename)

    @staticmethod
    def _taken(fd: int, byte: int) -> bool:
        return _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK
