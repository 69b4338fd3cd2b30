# SPDX-License-Identifier: GPL-2.0-or-later
"""FUSE export: a node shown as a regular file mounted over a regular file.

This is QSD's ``--export type=fuse``: the mountpoint must be an existing
regular file, and once mounted it *is* the image, so that any program can
read, write, truncate, fallocate and fsync it.

The kernel's FUSE protocol (``linux/fuse.h``) is spoken directly on a
``/dev/fuse`` descriptor watched by the daemon's asyncio loop, one task per
request. A binding such as pyfuse3 was tried first: it runs on asyncio, but
it has no FALLOCATE or LSEEK handler (``fallocate -p`` fails with
EOPNOTSUPP) and holds a single session per process, while QSD serves punch
hole, zero range, SEEK_DATA/SEEK_HOLE and any number of FUSE exports.

Mounting is done as libfuse does it: ``mount(2)`` with the descriptor in
the options when we may (root), else the set-uid ``fusermount3`` helper,
which hands the descriptor back over a socket. The request handlers follow
QEMU 7.2's FUSE export (modes, permitted attribute changes, errno values).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import os
import select
import socket
import stat
import struct
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from qsd.block.node import Perm
from qsd.qmp.errors import GenericError, QMPError

if TYPE_CHECKING:
    from qsd.block.graph import Edge
    from qsd.block.node import Node
    from qsd.daemon import Daemon

log = logging.getLogger("qsd.export.fuse")

# ----- protocol constants (linux/fuse.h) -----------------------------------

KERNEL_MAJOR = 7
#: Newest protocol minor we speak; 7.28 added max_pages, the oldest we accept.
KERNEL_MINOR = 31
OLDEST_MINOR = 28

LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
OPEN, READ, WRITE, STATFS, RELEASE = 14, 15, 16, 17, 18
FSYNC, FLUSH, INIT = 20, 25, 26
INTERRUPT, DESTROY, BATCH_FORGET = 36, 38, 42
FALLOCATE, LSEEK = 43, 46

#: Requests the kernel sends without waiting for a reply.
NO_REPLY = frozenset({FORGET, INTERRUPT, BATCH_FORGET})

# INIT flags libfuse 3 asks for by default when the kernel offers them
# (QEMU's export adds none); ATOMIC_O_TRUNC means an O_TRUNC open does not
# truncate the image, as with QSD.
FUSE_ASYNC_READ = 1 << 0
FUSE_ATOMIC_O_TRUNC = 1 << 3
FUSE_BIG_WRITES = 1 << 5
FUSE_HAS_IOCTL_DIR = 1 << 11
FUSE_AUTO_INVAL_DATA = 1 << 12
FUSE_ASYNC_DIO = 1 << 15
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_HANDLE_KILLPRIV = 1 << 19
FUSE_MAX_PAGES = 1 << 22
WANTED_FLAGS = (FUSE_ASYNC_READ | FUSE_ATOMIC_O_TRUNC | FUSE_BIG_WRITES | FUSE_HAS_IOCTL_DIR
                | FUSE_AUTO_INVAL_DATA | FUSE_ASYNC_DIO | FUSE_PARALLEL_DIROPS
                | FUSE_HANDLE_KILLPRIV | FUSE_MAX_PAGES)

FOPEN_DIRECT_IO = 1 << 0

FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FATTR_ATIME, FATTR_MTIME = 1 << 4, 1 << 5
FATTR_ATIME_NOW, FATTR_MTIME_NOW, FATTR_CTIME, FATTR_KILL_SUIDGID = 1 << 7, 1 << 8, 1 << 10, 1 << 11
#: What libfuse passes on to a filesystem's setattr (FH and LOCKOWNER only
#: say which open file asked).
SETATTR_PASSED = (FATTR_MODE | FATTR_UID | FATTR_GID | FATTR_SIZE | FATTR_ATIME | FATTR_MTIME
                  | FATTR_ATIME_NOW | FATTR_MTIME_NOW | FATTR_CTIME | FATTR_KILL_SUIDGID)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

SEEK_DATA, SEEK_HOLE = 3, 4

PAGE_SIZE = 4096
MAX_PAGES = 256
#: Largest write the kernel may send (libfuse's buffer: 256 pages).
MAX_WRITE = MAX_PAGES * PAGE_SIZE
#: QEMU's FUSE_MAX_BOUNCE_BYTES, passed as the max_read mount option.
MAX_READ = 64 << 20
#: Requests longer than this are split (QEMU's BDRV_REQUEST_MAX_BYTES).
REQUEST_MAX = (1 << 31) - 512

IN_HEADER = struct.Struct("<IIQQIIIHH")      # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")           # len error unique
INIT_IN = struct.Struct("<IIII")             # major minor max_readahead flags
INIT_OUT = struct.Struct("<IIIIHHIIHHI7I")   # ... max_write time_gran max_pages ... (64 bytes)
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")    # struct fuse_attr (88 bytes)
ATTR_OUT_HEAD = struct.Struct("<QII")        # attr_valid attr_valid_nsec dummy
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
OPEN_OUT = struct.Struct("<QII")             # fh open_flags padding
READ_IN = struct.Struct("<QQIIQII")          # fh offset size read_flags lock_owner flags pad
WRITE_IN = struct.Struct("<QQIIQII")         # fh offset size write_flags lock_owner flags pad
WRITE_OUT = struct.Struct("<II")
KSTATFS = struct.Struct("<QQQQQIIII6I")         # blocks..ffree bsize namelen frsize pad spare
FALLOCATE_IN = struct.Struct("<QQQII")       # fh offset length mode pad
LSEEK_IN = struct.Struct("<QQII")            # fh offset whence pad
LSEEK_OUT = struct.Struct("<Q")


class FuseProtocolError(Exception):
    """A request from /dev/fuse that does not parse."""


@dataclass(slots=True)
class Request:
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    body: memoryview


def parse_request(buf: memoryview) -> Request:
    """One request as read(2) returned it; lengths are checked, never trusted."""
    if len(buf) < IN_HEADER.size:
        raise FuseProtocolError(f"short request ({len(buf)} bytes)")
    length, opcode, unique, nodeid, uid, gid, pid, _extlen, _pad = IN_HEADER.unpack_from(buf)
    if length != len(buf):
        raise FuseProtocolError(f"request length {length} but {len(buf)} bytes read")
    return Request(opcode, unique, nodeid, uid, gid, pid, buf[IN_HEADER.size:])


def unpack_body(req: Request, fmt: struct.Struct) -> tuple[Any, ...]:
    if len(req.body) < fmt.size:
        raise FuseProtocolError(f"opcode {req.opcode}: body of {len(req.body)} bytes, "
                                f"{fmt.size} needed")
    return fmt.unpack_from(req.body)


def write_payload(req: Request) -> tuple[int, bytes]:
    """(offset, data) of a WRITE request, the data copied out of the read buffer."""
    _fh, offset, size, _wflags, _owner, _flags, _pad = unpack_body(req, WRITE_IN)
    if len(req.body) - WRITE_IN.size < size:
        raise FuseProtocolError(f"write of {size} bytes carries {len(req.body) - WRITE_IN.size}")
    if offset >= 1 << 63:
        raise FuseProtocolError("negative write offset")
    return offset, bytes(req.body[WRITE_IN.size:WRITE_IN.size + size])


def init_reply(body: memoryview) -> bytes:
    """The INIT answer: our version, libfuse 3's default wishes, 1 MiB writes."""
    if len(body) < INIT_IN.size:
        raise FuseProtocolError("short INIT")
    major, minor, max_readahead, flags = INIT_IN.unpack_from(body)
    if major > KERNEL_MAJOR:
        # Tell a newer kernel what we speak; it asks again in our major.
        return INIT_OUT.pack(KERNEL_MAJOR, KERNEL_MINOR, 0, 0, 0, 0, 0, 0, 0, 0, 0, *[0] * 7)
    if major < KERNEL_MAJOR or minor < OLDEST_MINOR:
        raise OSError(errno.EPROTO, f"FUSE protocol {major}.{minor} is too old")
    want = flags & WANTED_FLAGS
    pages = MAX_PAGES if want & FUSE_MAX_PAGES else 32
    return INIT_OUT.pack(KERNEL_MAJOR, min(minor, KERNEL_MINOR), max_readahead, want,
                         0, 0, min(MAX_WRITE, pages * PAGE_SIZE), 1, pages, 0, 0, *[0] * 7)


def _errno_of(err: BaseException) -> int:
    """The errno QEMU's block layer would have returned for a failure of ours."""
    if isinstance(err, OSError) and err.errno:
        return err.errno
    if isinstance(err, QMPError):
        # Resize errors: QEMU's drivers return -EINVAL for a bad size and
        # -ENOTSUP for what they cannot do.
        return errno.EINVAL if "must be a multiple of" in err.desc else errno.ENOTSUP
    return errno.EIO


# ----- mounting --------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
MS_NOSUID, MS_NODEV = 2, 4
MNT_DETACH = 2
FUSERMOUNT = "fusermount3"


def _sys_mount(fd: int, mountpoint: str, options: str) -> None:
    """mount(2) of a FUSE file system served on ``fd`` (needs CAP_SYS_ADMIN)."""
    data = f"fd={fd},rootmode={stat.S_IFREG:o},user_id={os.getuid()},group_id={os.getgid()},{options}"
    if _libc.mount(b"/dev/fuse", os.fsencode(mountpoint), b"fuse", MS_NOSUID | MS_NODEV,
                   data.encode()) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


async def _fusermount(mountpoint: str, options: str) -> int:
    """Mount through the set-uid helper; it passes the /dev/fuse descriptor back."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = {**os.environ, "_FUSE_COMMFD": str(theirs.fileno())}
        try:
            proc = await asyncio.create_subprocess_exec(
                FUSERMOUNT, "-o", options, "--", mountpoint, env=env,
                pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL)
        except OSError as e:
            print(f"fuse: failed to exec {FUSERMOUNT}: {e.strerror}", file=sys.stderr)
            raise
        theirs.close()
        loop = asyncio.get_running_loop()
        _msg, fds, _flags, _addr = await loop.run_in_executor(
            None, socket.recv_fds, ours, 1, 1)
        status = await proc.wait()
        if not fds:
            raise OSError(errno.EIO, f"{FUSERMOUNT} failed (status {status})")
        return fds[0]
    finally:
        ours.close()
        theirs.close()


#: Mountpoints of this process's FUSE exports, as given (QEMU's table).
_MOUNTPOINTS: set[str] = set()


class FuseExport:
    """One mounted FUSE export of ``edge``'s node."""

    def __init__(self, edge: "Edge", mountpoint: str, writable: bool, growable: bool,
                 writethrough: bool = False) -> None:
        self.edge = edge
        self.mountpoint = mountpoint
        self.writable = writable
        self.growable = growable
        self.writethrough = writethrough
        self.allow_other = False
        # QEMU's initial mode: read for the owner, write too when writable.
        self.st_mode = stat.S_IFREG | stat.S_IRUSR | (stat.S_IWUSR if writable else 0)
        self.st_uid = os.getuid()
        self.st_gid = os.getgid()
        self.fd = -1
        self._reading = False
        self._buf = bytearray(MAX_WRITE + PAGE_SIZE)
        self._tasks: set[asyncio.Task[None]] = set()

    # ----- setting up and tearing down -----------------------------------
    async def start(self, allow_other: str) -> None:
        """Check the mountpoint and mount, with QEMU's errors; ``allow_other``
        is "on", "off" or "auto" (try with it, fall back without)."""
        if self.mountpoint in _MOUNTPOINTS:
            raise GenericError(f"There already is a FUSE export on '{self.mountpoint}'")
        _MOUNTPOINTS.add(self.mountpoint)       # taken while we wait below
        try:
            await self._check_and_mount(allow_other)
        except BaseException:
            _MOUNTPOINTS.discard(self.mountpoint)
            raise
        os.set_blocking(self.fd, False)
        asyncio.get_running_loop().add_reader(self.fd, self._on_readable)
        self._reading = True

    async def _check_and_mount(self, allow_other: str) -> None:
        # In a thread: stat'ing a file another of our exports serves would
        # wait for this very loop.
        try:
            st = await asyncio.to_thread(os.stat, self.mountpoint)
        except OSError as e:
            raise GenericError(f"Failed to stat '{self.mountpoint}': {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise GenericError(f"'{self.mountpoint}' is not a regular file")
        if allow_other == "auto":
            self.allow_other = await self._mount(True)
            if not self.allow_other and not await self._mount(False):
                raise GenericError("Failed to mount FUSE session to export")
        else:
            self.allow_other = allow_other == "on"
            if not await self._mount(self.allow_other):
                raise GenericError("Failed to mount FUSE session to export")

    async def _mount(self, allow_other: bool) -> bool:
        options = f"max_read={MAX_READ},default_permissions" + (",allow_other" if allow_other else "")
        try:
            fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            print(f"fuse: failed to open /dev/fuse: {e.strerror}", file=sys.stderr)
            return False
        try:
            await asyncio.to_thread(_sys_mount, fd, self.mountpoint, options)
        except OSError as e:
            os.close(fd)
            if e.errno != errno.EPERM or os.geteuid() == 0:
                print(f"fuse: mount failed: {e.strerror}", file=sys.stderr)
                return False
            try:
                fd = await _fusermount(self.mountpoint, options)
            except OSError:
                return False
        self.fd = fd
        return True

    async def close(self) -> None:
        """Stop taking requests, let running ones finish, unmount."""
        _MOUNTPOINTS.discard(self.mountpoint)
        self._stop_reading()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        # As libfuse: POLLERR says someone unmounted us already; close the
        # device first so that unmounting cannot wait for our own replies.
        p = select.poll()
        p.register(fd, 0)
        gone = any(ev & select.POLLERR for _fd, ev in p.poll(0))
        os.close(fd)
        if gone:
            return
        if os.geteuid() == 0:
            if _libc.umount2(os.fsencode(self.mountpoint), MNT_DETACH) != 0:
                e = ctypes.get_errno()
                print(f"fuse: failed to unmount {self.mountpoint}: {os.strerror(e)}",
                      file=sys.stderr)
            return
        proc = await asyncio.create_subprocess_exec(
            FUSERMOUNT, "-u", "-q", "-z", "--", self.mountpoint, stdin=asyncio.subprocess.DEVNULL)
        await proc.wait()

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            asyncio.get_running_loop().remove_reader(self.fd)

    # ----- the request loop -----------------------------------------------
    def _on_readable(self) -> None:
        view = memoryview(self._buf)
        for _ in range(64):         # then let the loop run other work
            try:
                n = os.readv(self.fd, [self._buf])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno == errno.ENOENT:     # interrupted before we read it
                    continue
                # ENODEV: unmounted behind our back; the export stays listed
                # until deleted, as in QSD.
                if e.errno != errno.ENODEV:
                    log.error("FUSE export on %s: read failed: %s", self.mountpoint, e.strerror)
                self._stop_reading()
                return
            try:
                req = parse_request(view[:n])
            except FuseProtocolError as e:
                log.error("FUSE export on %s: %s", self.mountpoint, e)
                continue
            self._dispatch(req)

    def _dispatch(self, req: Request) -> None:
        if req.opcode in NO_REPLY:
            return
        try:
            handler = self._SYNC.get(req.opcode)
            if handler is not None:
                self._reply(req.unique, 0, handler(self, req))
                return
            make = self._ASYNC.get(req.opcode)
            if make is None:
                self._reply(req.unique, errno.ENOSYS)
                return
            # Handlers parse the shared buffer now; a few answer at once.
            coro = make(self, req)
            if isinstance(coro, bytearray):
                self._reply(req.unique, 0, coro)
                return
        except FuseProtocolError as e:
            log.error("FUSE export on %s: %s", self.mountpoint, e)
            self._reply(req.unique, errno.EIO)
            return
        except OSError as e:
            self._reply(req.unique, e.errno or errno.EIO)
            return
        task = asyncio.ensure_future(self._run(req.unique, coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, unique: int, coro: Awaitable[bytes | memoryview]) -> None:
        try:
            payload = await coro
        except FuseProtocolError as e:
            log.error("FUSE export on %s: %s", self.mountpoint, e)
            self._reply(unique, errno.EIO)
        except (OSError, QMPError) as e:
            self._reply(unique, _errno_of(e))
        else:
            self._reply(unique, 0, payload)

    def _reply(self, unique: int, error: int, payload: bytes | memoryview = b"") -> None:
        if self.fd < 0:
            return
        if error:
            payload = b""
        head = OUT_HEADER.pack(OUT_HEADER.size + len(payload), -error, unique)
        try:
            os.writev(self.fd, [head, payload] if payload else [head])
        except OSError as e:
            # ENOENT: the request was interrupted and is gone; ENODEV: unmounted.
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                log.error("FUSE export on %s: reply failed: %s", self.mountpoint, e.strerror)

    # ----- requests answered at once --------------------------------------
    def _init(self, req: Request) -> bytes:
        return init_reply(req.body)

    def _getattr(self, req: Request) -> bytes:
        node = self.edge.child
        length = node.size
        allocated = node.actual_size()
        blocks = -(-allocated // 512) if allocated and allocated > 0 else -(-length // 512)
        now = time.time_ns()
        sec, nsec = divmod(now, 1_000_000_000)
        attr = ATTR.pack(req.nodeid, length, blocks, sec, sec, sec, nsec, nsec, nsec,
                         self.st_mode, 1, self.st_uid, self.st_gid, 0,
                         node.request_alignment, 0)
        return ATTR_OUT_HEAD.pack(1, 0, 0) + attr

    def _open(self, req: Request) -> bytes:
        return OPEN_OUT.pack(0, FOPEN_DIRECT_IO, 0)

    def _statfs(self, req: Request) -> bytes:
        # libfuse's answer for file systems without statfs (as QEMU's).
        return KSTATFS.pack(0, 0, 0, 0, 0, 512, 255, 0, 0, *[0] * 6)

    def _empty(self, req: Request) -> bytes:
        return b""

    # ----- requests that do I/O ---------------------------------------------
    # Each of these parses its request now (the read buffer is reused for
    # the next one) and returns the coroutine that does the work.
    def _read(self, req: Request) -> Awaitable[bytes | memoryview] | bytearray:
        _fh, offset, size, *_ = unpack_body(req, READ_IN)
        if size > MAX_READ:
            raise OSError(errno.EINVAL, "read larger than max_read")
        # Short reads at the end, as clients expect of a file.
        size = max(0, min(size, self.edge.child.size - offset))
        buf = bytearray(size)
        if not size:
            return buf
        # Fast path: bytes that lie in the page cache of a host file are
        # answered at once (such reads are not gated, see CONTRACTS).
        mapping = self.edge.child.host_extent(offset, size)
        if mapping is not None:
            try:
                if os.preadv(mapping[0], [buf], mapping[1], os.RWF_NOWAIT) == size:
                    return buf
            except OSError:
                pass
        return self._do_read(offset, buf)

    async def _do_read(self, offset: int, buf: bytearray) -> bytes | memoryview:
        await self.edge.read_into(offset, memoryview(buf))
        return buf

    def _write(self, req: Request) -> Awaitable[bytes]:
        offset, data = write_payload(req)
        return self._do_write(offset, data)

    async def _do_write(self, offset: int, data: bytes) -> bytes:
        if not self.writable:
            raise OSError(errno.EACCES, "read-only export")
        size = len(data)
        length = self.edge.child.size
        if offset + size > length:
            if self.growable:
                await self._truncate(offset + size)
            else:
                # Short write up to the end; nothing left to write is an
                # I/O error, as QSD answers.
                size = length - offset
                if size <= 0:
                    raise OSError(errno.EIO, "write beyond the end")
        if size:
            await self.edge.write(offset, memoryview(data)[:size], self.writethrough)
        return WRITE_OUT.pack(size, 0)

    async def _truncate(self, size: int, prealloc: str = "off") -> None:
        edge = self.edge
        while edge.child.quiesce_count:         # a drained section holds requests back
            await edge.child.wait_unquiesced()
        await edge.child.truncate(size, True, prealloc)

    def _setattr(self, req: Request) -> Awaitable[bytes]:
        (valid, _pad, _fh, size, _owner, _atime, _mtime, _ctime, _an, _mn, _cn,
         mode, _u4, uid, gid, _u5) = unpack_body(req, SETATTR_IN)
        return self._do_setattr(req, valid & SETATTR_PASSED, size, mode, uid, gid)

    async def _do_setattr(self, req: Request, valid: int, size: int, mode: int, uid: int,
                          gid: int) -> bytes:
        supported = FATTR_SIZE | FATTR_MODE
        if self.allow_other:
            supported |= FATTR_UID | FATTR_GID
        if valid & ~supported:
            raise OSError(errno.ENOTSUP, "attribute cannot be set")
        if valid & FATTR_MODE:
            # Without allow_other only the owner can get in: no bits for others.
            if not self.allow_other and mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise OSError(errno.EPERM, "group/other bits need allow-other")
            if not self.writable and mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
                raise OSError(errno.EROFS, "read-only export")
        if valid & FATTR_SIZE:
            if not self.writable:
                raise OSError(errno.EACCES, "read-only export")
            if size >= 1 << 63:
                raise OSError(errno.EINVAL, "negative size")
            await self._truncate(size)
        if valid & FATTR_MODE:
            self.st_mode = stat.S_IFREG | (mode & 0o7777)
        if valid & FATTR_UID:
            self.st_uid = uid
        if valid & FATTR_GID:
            self.st_gid = gid
        return self._getattr(req)

    def _fsync(self, req: Request) -> Awaitable[bytes]:
        return self._do_fsync()

    async def _do_fsync(self) -> bytes:
        await self.edge.flush()
        return b""

    def _fallocate(self, req: Request) -> Awaitable[bytes]:
        _fh, offset, length, mode, _pad = unpack_body(req, FALLOCATE_IN)
        return self._do_fallocate(offset, length, mode)

    async def _do_fallocate(self, offset: int, length: int, mode: int) -> bytes:
        if not self.writable:
            raise OSError(errno.EACCES, "read-only export")
        if offset >= 1 << 63 or length >= 1 << 63:
            raise OSError(errno.EINVAL, "negative range")
        blk_len = self.edge.child.size
        if mode & FALLOC_FL_KEEP_SIZE:
            length = min(length, blk_len - offset)
        if not mode:
            # Allocation is only possible at the end, by growing.
            if offset < blk_len:
                raise OSError(errno.EOPNOTSUPP, "fallocate inside the image")
            if offset > blk_len:
                await self._truncate(offset)
            await self._truncate(offset + length, "falloc")
        elif mode & FALLOC_FL_PUNCH_HOLE:
            if not mode & FALLOC_FL_KEEP_SIZE:
                raise OSError(errno.EINVAL, "punch hole without keep size")
            await self._chunked(self.edge.discard, offset, length)
        elif mode & FALLOC_FL_ZERO_RANGE:
            if not mode & FALLOC_FL_KEEP_SIZE and offset + length > blk_len:
                await self._truncate(offset + length)
            await self._chunked(self._zero, offset, length)
        else:
            raise OSError(errno.EOPNOTSUPP, "fallocate mode")
        return b""

    def _zero(self, offset: int, length: int) -> Awaitable[None]:
        return self.edge.write_zeroes(offset, length, False, self.writethrough)

    async def _chunked(self, op: Callable[[int, int], Awaitable[None]], offset: int,
                       length: int) -> None:
        """QEMU's loop of requests of at most REQUEST_MAX bytes; a range left
        negative by the keep-size clamp is an I/O error as in QEMU."""
        while True:
            size = min(length, REQUEST_MAX)
            if size < 0 or offset + size > self.edge.child.size:
                raise OSError(errno.EIO, "range outside the image")
            if size:
                await op(offset, size)
            offset += size
            length -= size
            if length <= 0:
                return

    def _lseek(self, req: Request) -> Awaitable[bytes]:
        _fh, offset, whence, _pad = unpack_body(req, LSEEK_IN)
        return self._do_lseek(offset, whence)

    async def _do_lseek(self, offset: int, whence: int) -> bytes:
        if whence not in (SEEK_DATA, SEEK_HOLE):
            raise OSError(errno.EINVAL, "whence")
        node = self.edge.child
        while True:
            size = node.size
            if offset >= size:
                if offset > size or whence == SEEK_DATA:
                    raise OSError(errno.ENXIO, "past the end")
                return LSEEK_OUT.pack(offset)
            extents = await node.block_status(offset, size - offset)
            if not extents:
                raise OSError(errno.ENXIO, "no block status")
            for ext in extents:
                if ext.data == (whence == SEEK_DATA):
                    return LSEEK_OUT.pack(max(offset, ext.offset))
                offset = ext.offset + ext.length

    _SYNC: dict[int, Callable[["FuseExport", Request], bytes]] = {
        INIT: _init, GETATTR: _getattr, OPEN: _open, STATFS: _statfs,
        RELEASE: _empty, DESTROY: _empty,
    }
    _ASYNC: dict[int, Callable[["FuseExport", Request], Awaitable[bytes | memoryview] | bytearray]] = {
        READ: _read, WRITE: _write, SETATTR: _setattr, FSYNC: _fsync, FLUSH: _fsync,
        FALLOCATE: _fallocate, LSEEK: _lseek,
    }


async def start_fuse(daemon: "Daemon", args: dict[str, Any], node: "Node") -> tuple["Edge", FuseExport]:
    """block-export-add type=fuse once the common checks passed: attach, then mount.

    Writable and growable exports may resize the node (truncate, growing
    writes and fallocate), so they take RESIZE for as long as they exist.
    """
    writable = args.get("writable", False)
    growable = args.get("growable", False)
    perm = Perm.CONSISTENT_READ
    if writable:
        perm |= Perm.WRITE
    if writable or growable:
        perm |= Perm.RESIZE
    edge = await daemon.graph.attach_user(node, f"export '{args['id']}'", perm, Perm.all())
    export = FuseExport(edge, args["mountpoint"], writable, growable, args.get("writethrough", False))
    try:
        await export.start(args.get("allow-other", "auto"))
    except BaseException:
        await daemon.graph.detach(edge)
        raise
    return edge, export
