# SPDX-License-Identifier: GPL-2.0-or-later
"""``nbd`` protocol driver: a node backed by an export of an NBD server.

The client does the fixed-newstyle handshake (structured replies, the
``base:allocation`` meta context, NBD_OPT_GO), then keeps many requests in
flight on one connection: each request gets a handle and a future, and one
reader task matches replies to them.  Reads take structured replies
(OFFSET_DATA / OFFSET_HOLE chunks, ERROR chunks) or simple ones; block
status answers come from ``base:allocation``.  Everything the server sends
is parsed with bounds checks by the pure functions at the top
(:func:`parse_chunk_header`, :func:`parse_extents`, ...), which never trust
a length before checking it against what was asked.
"""

from __future__ import annotations

import asyncio
import errno
import os
import struct
from dataclasses import dataclass
from typing import Any

from qsd.block.node import Extent, Node, register_driver
from qsd.export.nbd.protocol import (
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT,
    NBDMAGIC, OPTION_REPLY_MAGIC, REPLY_FLAG_DONE, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
    STATE_HOLE, STATE_ZERO, STRUCTURED_REPLY_MAGIC, Cmd, CmdFlag, Info, Opt, Rep, ReplyType,
    TFlag)
from qsd.qmp.errors import GenericError

#: Largest request sent at once (the protocol's usual maximum payload).
MAX_REQUEST = 32 << 20
#: Longest option reply we accept (names, descriptions): anything larger is hostile.
MAX_OPTION_REPLY = 64 << 10
#: Longest error message in an ERROR chunk we accept.
MAX_ERROR_MESSAGE = 4096

_GREETING = struct.Struct(">QQH")
_OPT = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")

#: NBD error numbers to host errno values (the protocol's fixed list).
_NBD_ERRNO = {1: errno.EPERM, 5: errno.EIO, 12: errno.ENOMEM, 22: errno.EINVAL,
              28: errno.ENOSPC, 75: errno.EOVERFLOW, 95: errno.ENOTSUP, 108: errno.ESHUTDOWN}


class NBDProtocolError(Exception):
    """The server broke the protocol: the connection is unusable."""


def host_errno(nbd_err: int) -> int:
    return _NBD_ERRNO.get(nbd_err, errno.EIO)


# ----- pure parsers (untrusted bytes) ----------------------------------------------
def parse_greeting(data: bytes) -> int:
    """The server's handshake flags; refuse old-style or unknown servers."""
    if len(data) != _GREETING.size:
        raise NBDProtocolError("short greeting")
    magic, opt, flags = _GREETING.unpack(data)
    if magic != NBDMAGIC:
        raise NBDProtocolError("Bad initial magic received")
    if opt != IHAVEOPT:
        raise NBDProtocolError("Server does not support the newstyle protocol")
    if not flags & FLAG_FIXED_NEWSTYLE:
        raise NBDProtocolError("Server does not support fixed newstyle negotiation")
    return flags


def parse_option_reply(data: bytes, option: int) -> tuple[int, int]:
    """(reply type, payload length) of an option reply header."""
    if len(data) != _OPT_REPLY.size:
        raise NBDProtocolError("short option reply")
    magic, opt, rep, length = _OPT_REPLY.unpack(data)
    if magic != OPTION_REPLY_MAGIC:
        raise NBDProtocolError("Unexpected option reply magic")
    if opt != option:
        raise NBDProtocolError(f"Unexpected option type {opt}, expected {option}")
    if length > MAX_OPTION_REPLY:
        raise NBDProtocolError(f"Option reply of {length} bytes is too long")
    return rep, length


@dataclass
class ChunkHeader:
    flags: int
    type: int
    handle: int
    length: int


def parse_chunk_header(data: bytes) -> ChunkHeader:
    """A structured reply chunk header (after its magic was recognised)."""
    if len(data) != _CHUNK.size:
        raise NBDProtocolError("short chunk header")
    magic, flags, typ, handle, length = _CHUNK.unpack(data)
    if magic != STRUCTURED_REPLY_MAGIC:
        raise NBDProtocolError("Bad reply magic")
    return ChunkHeader(flags, typ, handle, length)


def parse_hole(payload: bytes, req_offset: int, req_length: int) -> tuple[int, int]:
    """(offset, length) of an OFFSET_HOLE chunk, inside the request."""
    if len(payload) != 12:
        raise NBDProtocolError("Protocol error: invalid payload for NBD_REPLY_TYPE_OFFSET_HOLE")
    offset, size = struct.unpack(">QI", payload)
    if offset < req_offset or size == 0 or offset + size > req_offset + req_length:
        raise NBDProtocolError("Protocol error: server sent chunk exceeding requested region")
    return offset, size


def check_data_chunk(offset: int, size: int, req_offset: int, req_length: int) -> None:
    if offset < req_offset or size == 0 or offset + size > req_offset + req_length:
        raise NBDProtocolError("Protocol error: server sent chunk exceeding requested region")


def parse_error_chunk(payload: bytes) -> tuple[int, str]:
    """(NBD error, message) of an ERROR/ERROR_OFFSET chunk."""
    if len(payload) < 6:
        raise NBDProtocolError("Protocol error: invalid payload for structured error")
    err, msglen = struct.unpack_from(">IH", payload)
    if msglen > len(payload) - 6 or msglen > MAX_ERROR_MESSAGE:
        raise NBDProtocolError("Protocol error: server sent a too long error message")
    if err == 0:
        raise NBDProtocolError("Protocol error: server sent structured error with error = 0")
    return err, payload[6:6 + msglen].decode("utf-8", "replace")


def parse_extents(payload: bytes, context_id: int, req_offset: int,
                  req_length: int) -> list[tuple[int, int]]:
    """(length, flags) pairs of a BLOCK_STATUS chunk for our context,
    clipped to the request; at least one extent of nonzero length."""
    if len(payload) < 12 or (len(payload) - 4) % 8:
        raise NBDProtocolError("Protocol error: invalid payload for NBD_REPLY_TYPE_BLOCK_STATUS")
    (ctx,) = struct.unpack_from(">I", payload)
    if ctx != context_id:
        raise NBDProtocolError("Protocol error: unexpected context id")
    out: list[tuple[int, int]] = []
    left = req_length
    for pos in range(4, len(payload), 8):
        length, flags = struct.unpack_from(">II", payload, pos)
        if length == 0:
            raise NBDProtocolError("Protocol error: server sent an extent of length 0")
        if left <= 0:
            break
        length = min(length, left)
        out.append((length, flags))
        left -= length
    return out


# ----- the driver ----------------------------------------------------------------
@dataclass
class _Pending:
    cmd: int
    offset: int
    length: int
    future: "asyncio.Future[Any]"
    buf: memoryview | None = None
    extents: list[tuple[int, int]] | None = None
    error: int = 0


@register_driver
class NBDNode(Node):
    """A node whose data lies in an export of an NBD server."""

    driver = "nbd"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: dict[int, _Pending] = {}
        self._next = 1
        self._structured = False
        self._context_id: int | None = None
        self._tflags = 0
        self._dead: BaseException | None = None
        self._uri = ""

    # ----- connection and handshake ------------------------------------------
    async def open(self, options: dict[str, Any]) -> None:
        if options.get("tls-creds"):
            raise GenericError("TLS is not supported by this NBD client")
        server = options["server"]
        export = options.get("export", "")
        self._uri = _uri(server, export)
        try:
            if server["type"] == "unix":
                where = server["path"]
                self._reader, self._writer = await asyncio.open_unix_connection(where)
            elif server["type"] == "inet":
                where = f"{server['host']}:{server['port']}"
                self._reader, self._writer = await asyncio.open_connection(
                    server["host"], int(server["port"]))
            else:
                raise GenericError(f"Unsupported NBD server address type '{server['type']}'")
        except OSError as e:
            raise GenericError(f"Failed to connect to '{where}': "
                               f"{os.strerror(e.errno or errno.EIO)}") from None
        try:
            await self._handshake(export)
        except NBDProtocolError as e:
            self._writer.close()
            raise GenericError(str(e)) from None
        except (OSError, asyncio.IncompleteReadError):
            self._writer.close()
            raise GenericError("Failed to read initial magic: Unexpected end-of-file before "
                               "all data were read") from None
        if self._tflags & TFlag.READ_ONLY and not self.read_only:
            self._writer.close()
            raise GenericError("An explicit read-only is required for a read-only NBD export")
        self._task = asyncio.get_running_loop().create_task(self._read_replies())

    async def _handshake(self, export: str) -> None:
        assert self._reader is not None and self._writer is not None
        flags = parse_greeting(await self._reader.readexactly(_GREETING.size))
        cflags = FLAG_C_FIXED_NEWSTYLE | (FLAG_C_NO_ZEROES if flags & FLAG_NO_ZEROES else 0)
        self._writer.write(struct.pack(">I", cflags))
        rep, _ = await self._option(Opt.STRUCTURED_REPLY, b"")
        self._structured = rep == Rep.ACK
        name = export.encode()
        if self._structured:
            query = b"base:allocation"
            data = struct.pack(">I", len(name)) + name + struct.pack(">II", 1, len(query)) + query
            self._send_option(Opt.SET_META_CONTEXT, data)
            while True:
                rep, payload = await self._option_reply(Opt.SET_META_CONTEXT)
                if rep == Rep.META_CONTEXT and len(payload) >= 4:
                    if payload[4:] == query:
                        (self._context_id,) = struct.unpack_from(">I", payload)
                elif rep != Rep.META_CONTEXT:
                    break
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self._send_option(Opt.GO, data)
        size = None
        while True:
            rep, payload = await self._option_reply(Opt.GO)
            if rep == Rep.INFO:
                if len(payload) >= 2 and struct.unpack_from(">H", payload)[0] == Info.EXPORT:
                    if len(payload) != 12:
                        raise NBDProtocolError("Invalid length to NBD_INFO_EXPORT")
                    size, self._tflags = struct.unpack_from(">QH", payload, 2)
            elif rep == Rep.ACK:
                break
            elif rep & (1 << 31):
                text = payload.decode("utf-8", "replace")
                raise NBDProtocolError(f"Requested export not available\nserver reported: {text}"
                                       if text else "Requested export not available")
            else:
                raise NBDProtocolError(f"Unexpected reply type {rep} to NBD_OPT_GO")
        if size is None:
            raise NBDProtocolError("Server did not send the export size")
        self.size = size

    def _send_option(self, opt: int, data: bytes) -> None:
        assert self._writer is not None
        self._writer.write(_OPT.pack(IHAVEOPT, opt, len(data)) + data)

    async def _option(self, opt: int, data: bytes) -> tuple[int, bytes]:
        self._send_option(opt, data)
        return await self._option_reply(opt)

    async def _option_reply(self, opt: int) -> tuple[int, bytes]:
        assert self._reader is not None
        rep, length = parse_option_reply(await self._reader.readexactly(_OPT_REPLY.size), opt)
        return rep, await self._reader.readexactly(length)

    # ----- requests -------------------------------------------------------------
    def _submit(self, cmd: int, offset: int, length: int, flags: int = 0,
                payload: bytes | bytearray | memoryview | None = None,
                buf: memoryview | None = None) -> "asyncio.Future[Any]":
        if self._dead is not None or self._writer is None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        handle = self._next
        self._next += 1
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[handle] = _Pending(cmd, offset, length, fut, buf)
        self._writer.write(_REQUEST.pack(REQUEST_MAGIC, flags, cmd, handle, offset, length))
        if payload is not None:
            self._writer.write(payload)
        return fut

    async def _request(self, cmd: int, offset: int, length: int, flags: int = 0,
                       payload: Any = None, buf: memoryview | None = None) -> Any:
        fut = self._submit(cmd, offset, length, flags, payload, buf)
        assert self._writer is not None
        await self._writer.drain()
        return await fut

    async def read_into(self, offset: int, buf: memoryview) -> None:
        pos = 0
        while pos < len(buf):
            n = min(MAX_REQUEST, len(buf) - pos)
            await self._request(Cmd.READ, offset + pos, n, buf=buf[pos:pos + n])
            pos += n

    async def drv_write(self, offset: int, data: bytes | bytearray | memoryview,
                        fua: bool = False) -> None:
        self._check_writable()
        view = memoryview(data).cast("B")
        flags = CmdFlag.FUA if fua and self._tflags & TFlag.SEND_FUA else 0
        pos = 0
        while pos < len(view):
            n = min(MAX_REQUEST, len(view) - pos)
            await self._request(Cmd.WRITE, offset + pos, n, flags, view[pos:pos + n])
            pos += n

    async def drv_write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                               fua: bool = False, no_fallback: bool = False) -> None:
        self._check_writable()
        if not self._tflags & TFlag.SEND_WRITE_ZEROES:
            await super().drv_write_zeroes(offset, length, may_unmap, fua, no_fallback)
            return
        flags = 0 if may_unmap else CmdFlag.NO_HOLE
        if fua and self._tflags & TFlag.SEND_FUA:
            flags |= CmdFlag.FUA
        if no_fallback:
            if not self._tflags & TFlag.SEND_FAST_ZERO:
                raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
            flags |= CmdFlag.FAST_ZERO
        pos = 0
        while pos < length:
            n = min(1 << 30, length - pos)
            await self._request(Cmd.WRITE_ZEROES, offset + pos, n, flags)
            pos += n

    async def drv_discard(self, offset: int, length: int) -> None:
        if not self._tflags & TFlag.SEND_TRIM or self.read_only:
            return
        pos = 0
        while pos < length:
            n = min(1 << 30, length - pos)
            await self._request(Cmd.TRIM, offset + pos, n)
            pos += n

    async def flush(self) -> None:
        if self._tflags & TFlag.SEND_FLUSH and not self.read_only and self._dead is None:
            await self._request(Cmd.FLUSH, 0, 0)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        length = min(length, self.size - offset, 1 << 30)
        if self._context_id is None or length <= 0:
            return [Extent(offset, max(length, 0), data=True, zero=False, depth=1)]
        extents = await self._request(Cmd.BLOCK_STATUS, offset, length)
        out: list[Extent] = []
        pos = offset
        for n, flags in extents:
            out.append(Extent(pos, n, data=not flags & STATE_HOLE,
                              zero=bool(flags & STATE_ZERO), depth=1))
            pos += n
        return out

    def _check_writable(self) -> None:
        if self.read_only:
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    # ----- replies ---------------------------------------------------------------
    async def _read_replies(self) -> None:
        assert self._reader is not None
        try:
            while True:
                head = await self._reader.readexactly(4)
                (magic,) = struct.unpack(">I", head)
                if magic == SIMPLE_REPLY_MAGIC:
                    await self._simple_reply(head)
                elif magic == STRUCTURED_REPLY_MAGIC and self._structured:
                    await self._chunk(head)
                else:
                    raise NBDProtocolError("Bad reply magic")
        except (asyncio.IncompleteReadError, OSError, NBDProtocolError) as e:
            self._fail_all(e)
        except asyncio.CancelledError:
            self._fail_all(OSError(errno.ESHUTDOWN, os.strerror(errno.ESHUTDOWN)))
            raise

    def _fail_all(self, exc: BaseException) -> None:
        self._dead = exc
        for p in self._pending.values():
            if not p.future.done():
                p.future.set_exception(OSError(errno.EIO, os.strerror(errno.EIO)))
        self._pending.clear()

    def _take(self, handle: int) -> _Pending:
        p = self._pending.get(handle)
        if p is None:
            raise NBDProtocolError(f"Unexpected reply handle {handle}")
        return p

    async def _simple_reply(self, head: bytes) -> None:
        assert self._reader is not None
        rest = await self._reader.readexactly(_SIMPLE.size - 4)
        _, err, handle = _SIMPLE.unpack(head + rest)
        p = self._take(handle)
        if p.cmd == Cmd.READ and not err:
            assert p.buf is not None
            p.buf[:] = await self._reader.readexactly(p.length)
        elif p.cmd in (Cmd.READ, Cmd.BLOCK_STATUS) and self._structured and not err:
            raise NBDProtocolError("Protocol error: simple reply to a structured request")
        del self._pending[handle]
        self._finish(p, err)

    async def _chunk(self, head: bytes) -> None:
        assert self._reader is not None
        h = parse_chunk_header(head + await self._reader.readexactly(_CHUNK.size - 4))
        p = self._take(h.handle)
        if h.type == ReplyType.OFFSET_DATA and p.cmd == Cmd.READ:
            if h.length < 8:
                raise NBDProtocolError("Protocol error: invalid payload for OFFSET_DATA")
            (off,) = struct.unpack(">Q", await self._reader.readexactly(8))
            size = h.length - 8
            check_data_chunk(off, size, p.offset, p.length)
            assert p.buf is not None
            p.buf[off - p.offset:off - p.offset + size] = await self._reader.readexactly(size)
        else:
            if h.length > MAX_REQUEST + 16 or (h.type != ReplyType.BLOCK_STATUS
                                                and h.length > MAX_OPTION_REPLY):
                raise NBDProtocolError("Protocol error: chunk too long")
            payload = await self._reader.readexactly(h.length)
            if h.type == ReplyType.OFFSET_HOLE and p.cmd == Cmd.READ:
                off, size = parse_hole(payload, p.offset, p.length)
                assert p.buf is not None
                p.buf[off - p.offset:off - p.offset + size] = bytes(size)
            elif h.type == ReplyType.BLOCK_STATUS and p.cmd == Cmd.BLOCK_STATUS:
                assert self._context_id is not None
                if p.extents is None:
                    p.extents = parse_extents(payload, self._context_id, p.offset, p.length)
            elif h.type in (ReplyType.ERROR, ReplyType.ERROR_OFFSET):
                err, _msg = parse_error_chunk(payload)
                p.error = p.error or err
            elif h.type != ReplyType.NONE:
                raise NBDProtocolError(f"Protocol error: unexpected reply type {h.type}")
        if h.flags & REPLY_FLAG_DONE:
            del self._pending[h.handle]
            if p.cmd == Cmd.BLOCK_STATUS and not p.error and not p.extents:
                raise NBDProtocolError("Protocol error: no block status for the request")
            self._finish(p, p.error)

    @staticmethod
    def _finish(p: _Pending, err: int) -> None:
        if p.future.done():
            return
        if err:
            code = host_errno(err)
            p.future.set_exception(OSError(code, os.strerror(code)))
        else:
            p.future.set_result(p.extents)

    async def close(self) -> None:
        if self._writer is not None and self._dead is None:
            try:
                self._writer.write(_REQUEST.pack(REQUEST_MAGIC, 0, Cmd.DISC, 0, 0, 0))
                await self._writer.drain()
            except OSError:
                pass
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._writer is not None:
            self._writer.close()

    # ----- introspection ------------------------------------------------------------
    @property
    def filename(self) -> str:
        return self._uri

    def actual_size(self) -> int | None:
        return None


def _uri(server: dict[str, Any], export: str) -> str:
    """The name QEMU shows for an NBD node."""
    if server["type"] == "unix":
        return f"nbd+unix:///{export}?socket={server['path']}"
    return f"nbd://{server['host']}:{server['port']}/{export}"
