# SPDX-License-Identifier: GPL-2.0-or-later
"""virtio-blk: feature bits, config space and request processing.

Written from the virtio 1.x specification ("Block Device"). The values a
front-end sees (features, config space, the GET_ID string, which status a
malformed request gets) are those QSD 7.2's vhost-user-blk export shows;
tests compare the two with the same requests.

A request is a descriptor chain: a 16-byte header (type, reserved, sector)
in the readable part, data after it (OUT) or in the writable part (IN,
GET_ID), and a status byte as the last writable byte. The specification
lets drivers frame these any way they like, so the parts are cut out of
the concatenated views rather than taken descriptor by descriptor.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qsd.block.aio import run_blocking
from qsd.export.vhost_user_blk.virtqueue import Chain

# Feature bits (device-specific and the transport bits QSD offers).
F_SIZE_MAX = 1 << 1
F_SEG_MAX = 1 << 2
F_RO = 1 << 5
F_BLK_SIZE = 1 << 6
F_FLUSH = 1 << 9
F_TOPOLOGY = 1 << 10
F_CONFIG_WCE = 1 << 11
F_MQ = 1 << 12
F_DISCARD = 1 << 13
F_WRITE_ZEROES = 1 << 14
F_INDIRECT_DESC = 1 << 28
F_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32

BASE_FEATURES = (F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_TOPOLOGY | F_CONFIG_WCE | F_MQ
                 | F_DISCARD | F_WRITE_ZEROES | F_INDIRECT_DESC | F_EVENT_IDX | F_VERSION_1)

T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_DISCARD = 11
T_WRITE_ZEROES = 13

S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

SECTOR = 512
SEG_MAX = 126
MAX_DISCARD_SECTORS = 32768
MAX_WRITE_ZEROES_SECTORS = 32768
ID_BYTES = 20
SERIAL = b"vhost_user_blk"
WZ_FLAG_UNMAP = 1
#: The largest request QEMU's block layer takes in one piece.
MAX_REQUEST_BYTES = 0x7FFFFE00
#: Bounce buffers (requests the node cannot map to a host file) move at most this much at once.
BOUNCE_CHUNK = 4 << 20
IOV_MAX = 1024

HEADER = struct.Struct("<IIQ")
DWZ = struct.Struct("<QII")
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
assert CONFIG.size == 60


def features(writable: bool) -> int:
    return BASE_FEATURES | (0 if writable else F_RO)


def config_space(capacity: int, logical_block_size: int, num_queues: int, wce: int) -> bytes:
    """virtio_blk_config as QSD 7.2 fills it (capacity in 512-byte sectors)."""
    return CONFIG.pack(capacity // SECTOR, 0, SEG_MAX, 0, 0, 0, logical_block_size,
                       0, 0, 1, 1, wce, 0, num_queues,
                       MAX_DISCARD_SECTORS, 1, logical_block_size // SECTOR,
                       MAX_WRITE_ZEROES_SECTORS, 1, 0)


def gather(views: Sequence[memoryview], start: int, length: int) -> bytes:
    """``length`` bytes at ``start`` of the concatenation of ``views``."""
    out = bytearray()
    for v in views:
        if start >= len(v):
            start -= len(v)
            continue
        piece = v[start:start + length - len(out)]
        out += piece
        start = 0
        if len(out) == length:
            break
    return bytes(out)


def split(views: Sequence[memoryview], start: int, length: int | None = None) -> list[memoryview]:
    """Views covering ``length`` bytes from ``start`` (to the end if None)."""
    out = []
    for v in views:
        if start >= len(v):
            start -= len(v)
            continue
        piece = v[start:] if length is None else v[start:start + length]
        start = 0
        if not piece:
            break
        out.append(piece)
        if length is not None:
            length -= len(piece)
            if length <= 0:
                break
    return out


def scatter(views: Sequence[memoryview], data: bytes | bytearray | memoryview) -> None:
    pos = 0
    for v in views:
        n = min(len(v), len(data) - pos)
        v[:n] = data[pos:pos + n]
        pos += n


@dataclass
class Request:
    """A parsed request: what to do, and where its data and status are."""

    chain: Chain
    type: int
    sector: int
    data: list[memoryview]      # OUT: readable payload; IN/GET_ID: writable payload
    status: memoryview
    length: int                 # payload bytes

    def finish(self, status: int) -> int:
        """Write the status byte; the used length to report (every writable byte)."""
        self.status[0] = status
        return self.chain.in_len


class BadRequest(Exception):
    """A chain without a header or a status byte."""


def parse(chain: Chain) -> Request:
    readable, writable = chain.readable, chain.writable
    if sum(len(v) for v in readable) < HEADER.size:
        raise BadRequest("virtio-blk request missing headers")
    if not writable:
        raise BadRequest("virtio-blk request has no status byte")
    rtype, _ioprio, sector = HEADER.unpack(gather(readable, 0, HEADER.size))
    last = writable[-1]
    status = last[len(last) - 1:]
    if rtype in (T_OUT, T_DISCARD, T_WRITE_ZEROES):
        data = split(readable, HEADER.size)
    else:
        data = split(writable, 0, chain.in_len - 1)
    return Request(chain, rtype, sector, data, status, sum(len(v) for v in data))


class BlkDevice:
    """Carries requests out on an export's edge."""

    def __init__(self, edge: Any, writable: bool, logical_block_size: int,
                 writethrough: bool) -> None:
        self.edge = edge
        self.writable = writable
        self.lbs = logical_block_size
        self.writethrough = writethrough

    @property
    def size(self) -> int:
        return int(self.edge.child.size)

    def range_ok(self, sector: int, length: int) -> bool:
        # As QSD: the start must be aligned to the logical block size, the
        # length only to sectors.
        if length > MAX_REQUEST_BYTES or length % SECTOR:
            return False
        offset = sector * SECTOR
        if offset % self.lbs:
            return False
        return offset + length <= self.size

    # ----- the inline fast path ------------------------------------------------
    def try_read_inline(self, req: Request) -> bool:
        """Serve an IN request from the page cache without a task; False
        when it needs the slow path."""
        if req.type != T_IN or not req.length or len(req.data) > IOV_MAX:
            return False
        if not self.range_ok(req.sector, req.length):
            return False
        mapping = self.edge.child.host_extent(req.sector * SECTOR, req.length)
        if mapping is None:
            return False
        fd, host_offset = mapping
        try:
            n = os.preadv(fd, req.data, host_offset, os.RWF_NOWAIT)
        except OSError:
            return False
        return n == req.length

    # ----- the general path ----------------------------------------------------
    async def execute(self, req: Request) -> int:
        """Process the request; its status."""
        rtype = req.type
        try:
            if rtype == T_IN:
                if not self.range_ok(req.sector, req.length):
                    return S_IOERR
                await self._read(req.sector * SECTOR, req.data, req.length)
                return S_OK
            if rtype == T_OUT:
                if not self.writable or not self.range_ok(req.sector, req.length):
                    return S_IOERR
                await self._write(req.sector * SECTOR, req.data, req.length)
                if self.writethrough:
                    await self.edge.flush()
                return S_OK
            if rtype == T_FLUSH:
                await self.edge.flush()
                return S_OK
            if rtype == T_GET_ID:
                scatter(req.data, SERIAL.ljust(ID_BYTES, b"\0")[:min(ID_BYTES, req.length)])
                return S_OK
            if rtype in (T_DISCARD, T_WRITE_ZEROES):
                if not self.writable:
                    return S_IOERR
                return await self._discard_write_zeroes(req)
        except OSError:
            return S_IOERR
        return S_UNSUPP

    async def _read(self, offset: int, views: list[memoryview], length: int) -> None:
        node = self.edge.child
        if len(views) <= IOV_MAX:
            mapping = node.host_extent(offset, length)
            if mapping is not None:
                await run_blocking(_preadv_full, mapping[0], views, mapping[1])
                return
        if len(views) == 1:
            await self.edge.read_into(offset, views[0])
            return
        pos = 0
        while pos < length:
            n = min(BOUNCE_CHUNK, length - pos)
            buf = bytearray(n)
            await self.edge.read_into(offset + pos, memoryview(buf))
            scatter(split(views, pos, n), buf)
            pos += n

    async def _write(self, offset: int, views: list[memoryview], length: int) -> None:
        if len(views) == 1:
            await self.edge.write(offset, views[0])
            return
        pos = 0
        while pos < length:
            n = min(BOUNCE_CHUNK, length - pos)
            await self.edge.write(offset + pos, b"".join(split(views, pos, n)))
            pos += n

    async def _discard_write_zeroes(self, req: Request) -> int:
        if req.length > DWZ.size:
            return S_UNSUPP         # only one segment is supported
        if req.length < DWZ.size:
            return S_IOERR
        sector, num, flags = DWZ.unpack(gather(req.data, 0, DWZ.size))
        limit = MAX_WRITE_ZEROES_SECTORS if req.type == T_WRITE_ZEROES else MAX_DISCARD_SECTORS
        if num > limit:
            return S_IOERR
        length = num * SECTOR
        if not self.range_ok(sector, length):
            return S_IOERR
        if flags & ~WZ_FLAG_UNMAP:
            return S_UNSUPP
        if req.type == T_WRITE_ZEROES:
            if length:
                await self.edge.write_zeroes(sector * SECTOR, length, may_unmap=bool(flags & WZ_FLAG_UNMAP))
            return S_OK
        if flags & WZ_FLAG_UNMAP:
            return S_UNSUPP
        if length:
            await self.edge.discard(sector * SECTOR, length)
        return S_OK


def _preadv_full(fd: int, views: list[memoryview], offset: int) -> None:
    """Blocking read filling every view; past the end of the file reads zeroes."""
    while views:
        n = os.preadv(fd, views, offset)
        if n == 0:
            for v in views:
                v[:] = bytes(len(v))
            return
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views = views[1:]
        if n:
            views = [views[0][n:], *views[1:]]
