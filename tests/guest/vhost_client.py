# SPDX-License-Identifier: GPL-2.0-or-later
"""A small vhost-user front-end in Python, for tests.

It plays the part QEMU plays: guest memory is a memfd shared with the
back-end, split virtqueues live in it, kicks and calls are eventfds. Tests
drive qsd's and the real QSD's vhost-user-blk exports with it (feature and
config-space differentials, virtio-blk requests with odd framing), and it
can send deliberately malformed messages. Blocking sockets, one thread.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import struct
import time
from dataclasses import dataclass

HDR = struct.Struct("<III")
VERSION = 0x1
F_REPLY = 0x4
F_NEED_REPLY = 0x8

GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
RESET_OWNER = 4
SET_MEM_TABLE = 5
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
SET_VRING_ERR = 14
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18
GET_CONFIG = 24
SET_CONFIG = 25
GET_MAX_MEM_SLOTS = 36
ADD_MEM_REG = 37
REM_MEM_REG = 38

F_VERSION_1 = 1 << 32
F_EVENT_IDX = 1 << 29
F_INDIRECT = 1 << 28
F_PROTOCOL_FEATURES = 1 << 30
PF_MQ = 1 << 0
PF_REPLY_ACK = 1 << 3
PF_CONFIG = 1 << 9
PF_MEM_SLOTS = 1 << 15

DESC_NEXT, DESC_WRITE, DESC_INDIRECT = 1, 2, 4
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13

#: Where the front-end's own mapping of guest memory pretends to live;
#: ring addresses are given in this space, buffer addresses as guest-physical.
USER_BASE = 0x7F0000000000
GUEST_BASE = 0x100000


class Disconnected(Exception):
    """The back-end closed the connection."""


@dataclass
class Used:
    head: int
    length: int


class GuestMemory:
    """A memfd with a bump allocator; addresses are guest-physical."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = os.memfd_create("vhost-test-guest", 0)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size)
        self._next = 0

    def alloc(self, length: int, align: int = 16) -> int:
        start = (self._next + align - 1) & ~(align - 1)
        if start + length > self.size:
            raise MemoryError("guest memory exhausted")
        self._next = start + length
        return GUEST_BASE + start

    def write(self, gpa: int, data: bytes) -> None:
        off = gpa - GUEST_BASE
        self.map[off:off + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        off = gpa - GUEST_BASE
        return bytes(self.map[off:off + length])

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


class Queue:
    """One split virtqueue in guest memory, driven from the driver side."""

    def __init__(self, client: "VhostUserClient", index: int, num: int) -> None:
        self.client, self.index, self.num = client, index, num
        mem = client.mem
        self.desc = mem.alloc(16 * num, 4096)
        self.avail = mem.alloc(6 + 2 * num, 2)
        self.used = mem.alloc(6 + 8 * num, 4096)
        self.avail_idx = 0
        self.used_seen = 0
        self.free = list(range(num))
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_NONBLOCK)

    def set_desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        self.client.mem.write(self.desc + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def publish(self, head: int, kick: bool = True) -> None:
        mem = self.client.mem
        mem.write(self.avail + 4 + 2 * (self.avail_idx % self.num), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        mem.write(self.avail + 2, struct.pack("<H", self.avail_idx))
        if kick:
            os.eventfd_write(self.kick, 1)

    def used_idx(self) -> int:
        return struct.unpack("<H", self.client.mem.read(self.used + 2, 2))[0]

    def wait_used(self, count: int = 1, timeout: float = 10.0) -> list[Used]:
        """Wait for ``count`` more used entries (polling the ring as well as the call eventfd)."""
        deadline = time.monotonic() + timeout
        while (self.used_idx() - self.used_seen) & 0xFFFF < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"queue {self.index}: no completion")
            r, _, _ = select.select([self.call, self.client.sock], [], [], min(left, 0.05))
            if self.call in r:
                try:
                    os.eventfd_read(self.call)
                except BlockingIOError:
                    pass
            if self.client.sock in r and self.client.peer_closed():
                raise Disconnected()
        out = []
        mem = self.client.mem
        for _ in range(count):
            slot = self.used + 4 + 8 * (self.used_seen % self.num)
            head, length = struct.unpack("<II", mem.read(slot, 8))
            out.append(Used(head, length))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out

    def submit(self, segments: list[tuple[bytes | int, bool]], kick: bool = True
               ) -> tuple[list[int], list[int]]:
        """One chain: ``(data, False)`` is device-readable, ``(length, True)`` device-writable.
        Returns its descriptor ids (the head first) and each segment's guest address."""
        ids = [self.free.pop(0) for _ in segments]
        addrs = []
        for n, ((data, writable), i) in enumerate(zip(segments, ids)):
            length = data if isinstance(data, int) else len(data)
            addr = self.client.mem.alloc(max(length, 1))
            if not writable:
                self.client.mem.write(addr, data)          # type: ignore[arg-type]
            addrs.append(addr)
            flags = (DESC_WRITE if writable else 0) | (DESC_NEXT if n + 1 < len(ids) else 0)
            self.set_desc(i, addr, length, flags, ids[n + 1] if n + 1 < len(ids) else 0)
        self.publish(ids[0], kick)
        return ids, addrs


class VhostUserClient:
    def __init__(self, path: str, mem_size: int = 8 << 20, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.mem = GuestMemory(mem_size)
        self.queues: dict[int, Queue] = {}

    def close(self) -> None:
        for q in self.queues.values():
            os.close(q.kick)
            os.close(q.call)
        self.queues.clear()
        self.sock.close()
        self.mem.close()

    def __enter__(self) -> "VhostUserClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- wire --------------------------------------------------------------
    def send(self, req: int, payload: bytes = b"", fds: tuple[int, ...] = (), flags: int = VERSION,
             size: int | None = None) -> None:
        data = HDR.pack(req, flags, len(payload) if size is None else size) + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
        self.sock.sendmsg([data], anc)

    def recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise Disconnected()
            buf += chunk
        return buf

    def recv_reply(self, req: int) -> bytes:
        r, flags, size = HDR.unpack(self.recv_exact(HDR.size))
        assert r == req and flags & F_REPLY, (r, flags)
        return self.recv_exact(size)

    def call(self, req: int, payload: bytes = b"", fds: tuple[int, ...] = (), reply: bool = False,
             need_reply: bool = False) -> bytes | None:
        self.send(req, payload, fds, VERSION | (F_NEED_REPLY if need_reply else 0))
        if reply or need_reply:
            return self.recv_reply(req)
        return None

    def peer_closed(self, timeout: float = 0.0) -> bool:
        """True once the back-end has closed the socket (EOF)."""
        r, _, _ = select.select([self.sock], [], [], timeout)
        if not r:
            return False
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

    def wait_closed(self, timeout: float = 10.0) -> bool:
        """True once the back-end closes the socket (anything it still sends is discarded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.sock], [], [], 0.05)
            if r:
                try:
                    if not self.sock.recv(4096):
                        return True
                except (ConnectionResetError, BrokenPipeError):
                    return True
        return False

    # ----- messages ----------------------------------------------------------
    def u64(self, req: int) -> int:
        data = self.call(req, reply=True)
        assert data is not None and len(data) == 8
        return struct.unpack("<Q", data)[0]

    def get_config(self, size: int = 60, offset: int = 0) -> bytes:
        data = self.call(GET_CONFIG, struct.pack("<III", offset, size, 0) + bytes(size), reply=True)
        assert data is not None
        return data[12:]

    def mem_table_payload(self) -> bytes:
        return struct.pack("<II", 1, 0) + struct.pack("<QQQQ", GUEST_BASE, self.mem.size, USER_BASE, 0)

    def handshake(self, features: int | None = None, protocol: int | None = None,
                  mem_slots: bool = False) -> int:
        """GET/SET features as QEMU does and share guest memory; the negotiated features."""
        offered = self.u64(GET_FEATURES)
        want = offered & (F_VERSION_1 | F_PROTOCOL_FEATURES | F_EVENT_IDX | F_INDIRECT | 0x3FFF)
        if features is not None:
            want = features
        if offered & F_PROTOCOL_FEATURES:
            pf = self.u64(GET_PROTOCOL_FEATURES)
            pwant = pf & (PF_MQ | PF_REPLY_ACK | PF_CONFIG | (PF_MEM_SLOTS if mem_slots else 0))
            if protocol is not None:
                pwant = protocol
            self.call(SET_PROTOCOL_FEATURES, struct.pack("<Q", pwant))
            self.protocol = pwant
        else:
            self.protocol = 0
        self.call(SET_OWNER)
        self.call(SET_FEATURES, struct.pack("<Q", want))
        self.features = want
        if mem_slots:
            self.call(ADD_MEM_REG, struct.pack("<QQQQQ", 0, GUEST_BASE, self.mem.size, USER_BASE, 0),
                      (self.mem.fd,), need_reply=bool(self.protocol & PF_REPLY_ACK))
        else:
            self.call(SET_MEM_TABLE, self.mem_table_payload(), (self.mem.fd,),
                      need_reply=bool(self.protocol & PF_REPLY_ACK))
        return want

    def user(self, gpa: int) -> int:
        return gpa - GUEST_BASE + USER_BASE

    def setup_queue(self, index: int, num: int = 64, enable: bool = True) -> Queue:
        q = Queue(self, index, num)
        self.queues[index] = q
        self.call(SET_VRING_NUM, struct.pack("<II", index, num))
        self.call(SET_VRING_BASE, struct.pack("<II", index, 0))
        self.call(SET_VRING_ADDR, struct.pack("<IIQQQQ", index, 0, self.user(q.desc), self.user(q.used),
                                              self.user(q.avail), 0))
        self.call(SET_VRING_KICK, struct.pack("<Q", index), (q.kick,))
        self.call(SET_VRING_CALL, struct.pack("<Q", index), (q.call,))
        if enable and self.features & F_PROTOCOL_FEATURES:
            self.call(SET_VRING_ENABLE, struct.pack("<II", index, 1))
        return q

    def get_vring_base(self, index: int) -> int:
        data = self.call(GET_VRING_BASE, struct.pack("<II", index, 0), reply=True)
        assert data is not None
        return struct.unpack("<II", data)[1]

    # ----- virtio-blk --------------------------------------------------------
    def blk(self, q: Queue, rtype: int, sector: int = 0, out: bytes = b"", in_len: int = 0,
            split_header: bool = False) -> tuple[int, bytes, int]:
        """One virtio-blk request; (status, data read, used length)."""
        header = struct.pack("<IIQ", rtype, 0, sector)
        segs: list[tuple[bytes | int, bool]] = [(header[:8], False), (header[8:], False)] if split_header \
            else [(header, False)]
        if out:
            segs.append((out, False))
        if in_len:
            segs.append((in_len, True))
        segs.append((1, True))
        mark = self.mem._next
        ids, addrs = q.submit(segs)
        (used,) = q.wait_used()
        assert used.head == ids[0]
        status = self.mem.read(addrs[-1], 1)[0]
        data = self.mem.read(addrs[-2], in_len) if in_len else b""
        q.free.extend(ids)
        self.mem._next = mark
        return status, data, used.length
