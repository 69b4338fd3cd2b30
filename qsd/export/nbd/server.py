# SPDX-License-Identifier: GPL-2.0-or-later
"""The NBD server: a thin asyncio layer over :mod:`qsd.export.nbd.protocol`.

Listeners accept connections (holding back beyond ``max_connections``, as
QSD does), each connection feeds its bytes to a sans-IO
:class:`~qsd.export.nbd.protocol.ServerConnection` and carries out the
requests it yields against the export's node, re-read from ``edge.child`` on
every request because the graph may swap it.

Data path (see ARCHITECTURE.md, "The data path"): the next request is parsed
while earlier ones run; a read whose range the node maps into a host file is
served inline with ``preadv(RWF_NOWAIT)`` into a pooled buffer that already
has room for the reply header, so header and data leave in one write; only a
page-cache miss goes to the shared block I/O pool (:mod:`qsd.block.aio`).
Holes found by block status become hole chunks without disk reads. Every
reply is handed to the transport whole, so replies never interleave, and
replies queued in one loop iteration leave in one writev.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from qsd.block.aio import run_blocking
from qsd.crypto.tls import TLSPeerRejected
from qsd.export.nbd.contexts import (
    BASE_ALLOCATION,
    MAX_EXTENTS,
    MetaContext,
    clamp_extents,
)
from qsd.export.nbd.protocol import (
    DATA_CHUNK_HEADER_SIZE,
    NBD_EIO,
    SIMPLE_HEADER_SIZE,
    Cmd,
    CmdFlag,
    Disconnect,
    ProtocolError,
    Request,
    ServerConnection,
    StartTLS,
    TransmissionStarted,
    block_status_chunk,
    error_chunk,
    hole_chunk,
    nbd_errno,
    none_chunk,
    pack_data_chunk_header,
    pack_simple_header,
    simple_reply,
)
from qsd.qmp.errors import GenericError
from qsd.sockets import listen

if TYPE_CHECKING:
    from qsd.block.node import Node

log = logging.getLogger("qsd.export.nbd")

#: Structured reads at least this long look for holes first (hole chunks
#: save the disk reads and the bytes on the wire); shorter ones just read.
HOLE_SCAN_MIN = 256 * 1024
#: Per connection: stop reading requests while this many payload bytes
#: (read buffers and write data) are in flight ...
MAX_INFLIGHT_BYTES = 64 * 1024 * 1024
#: ... or this many requests are.
MAX_INFLIGHT_REQUESTS = 256
LISTEN_BACKLOG = 128
#: Without a native writev, replies queued together are joined up to this
#: size and written one by one beyond it.
_JOIN_MAX = 256 * 1024


@dataclass
class NBDExportConfig:
    """What ``add_export`` serves.

    ``edge.child`` is the node, looked up again for every request.
    ``contexts`` are metadata contexts offered besides ``base:allocation``.
    ``on_last_client`` runs when the export's last connected client leaves.
    """

    name: str
    edge: Any
    description: str = ""
    writable: bool = False
    contexts: list[MetaContext] = field(default_factory=list)
    on_last_client: Callable[[], None] | None = None


class _Export:
    """An export as the handshake sees it (protocol.ExportInfo) plus its clients."""

    def __init__(self, cfg: NBDExportConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.description = cfg.description or ""
        self.writable = cfg.writable
        self.contexts: list[MetaContext] = [BASE_ALLOCATION, *cfg.contexts]
        self.clients: set[_Client] = set()

    @property
    def size(self) -> int:
        return int(self.cfg.edge.child.size)

    @property
    def min_block(self) -> int:
        return max(1, int(getattr(self.cfg.edge.child, "request_alignment", 1)))


class _BufferPool:
    """Reply buffers by power-of-two class, with room for a reply header.

    A buffer handed to the transport comes back through :meth:`put` at once
    but is reused only once nothing else holds a view of it: resizing a
    bytearray with live exports raises BufferError, which is the probe.
    (asyncio copies what it cannot send at once; uvloop keeps a view until
    the data is written.)
    """

    _HEADROOM = 32

    def __init__(self, max_bytes: int = 64 * 1024 * 1024, per_class: int = 16,
                 max_busy: int = 256) -> None:
        self._free: dict[int, list[bytearray]] = collections.defaultdict(list)
        self._busy: collections.deque[bytearray] = collections.deque()
        self._bytes = 0
        self._max_bytes = max_bytes
        self._per_class = per_class
        self._max_busy = max_busy

    @staticmethod
    def _class(length: int) -> int:
        return 1 << max(12, (length - 1).bit_length())

    def get(self, length: int) -> bytearray:
        """A buffer of at least ``length`` bytes (contents undefined)."""
        self._reclaim()
        free = self._free.get(self._class(length))
        if free:
            buf = free.pop()
            self._bytes -= len(buf)
            return buf
        return bytearray(self._class(length) + self._HEADROOM)

    def put(self, buf: bytearray) -> None:
        """Take ``buf`` back once its reply has been handed on."""
        if len(self._busy) >= self._max_busy:
            self._busy.popleft()
        self._busy.append(buf)

    def _reclaim(self) -> None:
        busy = self._busy
        while busy:
            buf = busy[0]
            try:
                buf.append(buf.pop())       # raises while a view is alive
            except BufferError:
                return
            busy.popleft()
            free = self._free[len(buf) - self._HEADROOM]
            if len(free) < self._per_class and self._bytes + len(buf) <= self._max_bytes:
                free.append(buf)
                self._bytes += len(buf)


def _pread_full(fd: int, view: memoryview, offset: int) -> None:
    """Blocking read of all of ``view``; past the end of the file reads zeroes."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            view[done:] = bytes(len(view) - done)
            return
        done += n


class _Client(asyncio.BufferedProtocol):
    """One connection: feeds the protocol and runs its requests."""

    def __init__(self, server: NBDServer) -> None:
        self.server = server
        self.conn = ServerConnection(server._exports, tls=server.tls_creds is not None)
        self.transport: asyncio.Transport | None = None
        self.export: _Export | None = None
        self.contexts: list[tuple[int, MetaContext]] = []
        self.structured = False
        self.tasks: set[asyncio.Task[None]] = set()
        self.inflight_bytes = 0
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._lost = False
        self._closing = False
        self._read_paused = False
        self._write_paused = False
        self._out: list[bytes | bytearray | memoryview] = []
        self._out_bytes = 0
        self._flush_scheduled = False
        self._native_writev = False
        self._tls_pending = False

    # ----- transport callbacks ------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)   # uvloop's are not subclasses
        self._native_writev = (type(self.transport).writelines
                               is not asyncio.WriteTransport.writelines)
        self.server._clients.add(self)
        self.transport.write(self.conn.greeting())

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            events = self.conn.buffer_updated(nbytes)
        except ProtocolError:
            return
        for ev in events:
            kind = type(ev)
            if kind is Request:
                self._dispatch(ev)          # type: ignore[arg-type]
            elif kind is bytes:
                self._send(ev)              # type: ignore[arg-type]
            elif kind is TransmissionStarted:
                self._started(ev)           # type: ignore[arg-type]
            elif kind is Disconnect:
                self._disconnect(ev)        # type: ignore[arg-type]
            elif kind is StartTLS:
                # The next bytes are the client's TLS hello, for the TLS
                # layer; what it decrypts may reach us before _start_tls
                # resumes, so the protocol must be waiting for it already.
                assert self.transport is not None
                self._flush()               # the ACK, in clear text
                self.transport.pause_reading()
                self.conn.tls_started()
                self._tls_pending = True
                self._spawn(self._start_tls(), 0)
        if self._out:
            self._flush()
        self._flow()

    def eof_received(self) -> bool | None:
        return None

    def pause_writing(self) -> None:
        self._write_paused = True
        self._flow()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._flow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.conn.close()
        self._maybe_finished()

    # ----- plumbing --------------------------------------------------------
    def _send(self, data: bytes | bytearray | memoryview) -> None:
        """Queue one whole reply; replies queued in one loop iteration leave
        together (one writev where the transport has it)."""
        if self._lost:
            return
        self._out.append(data)
        self._out_bytes += len(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _sendv(self, chunks: list[bytes | memoryview]) -> None:
        for chunk in chunks:
            self._send(chunk)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._tls_pending:       # replies wait for the TLS transport
            return
        out, self._out = self._out, []
        size, self._out_bytes = self._out_bytes, 0
        transport = self.transport
        if not out or transport is None or self._lost:
            return
        if len(out) == 1:
            transport.write(out[0])
        elif self._native_writev or size <= _JOIN_MAX:
            transport.writelines(out)
        else:                   # a joining writelines would copy big payloads
            for data in out:
                transport.write(data)

    def _flow(self) -> None:
        """Read more requests only while little is in flight and the
        client keeps up with our replies."""
        if self.transport is None or self._lost or self._tls_pending:
            return
        busy = (self._write_paused or len(self.tasks) >= MAX_INFLIGHT_REQUESTS
                or self.inflight_bytes >= MAX_INFLIGHT_BYTES)
        if busy and not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()
        elif not busy and self._read_paused:
            self._read_paused = False
            self.transport.resume_reading()

    def _spawn(self, coro: Any, nbytes: int) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        self.inflight_bytes += nbytes
        task.add_done_callback(lambda t: self._task_done(t, nbytes))

    def _task_done(self, task: asyncio.Task[None], nbytes: int) -> None:
        self.tasks.discard(task)
        self.inflight_bytes -= nbytes
        if not task.cancelled() and task.exception() is not None:
            log.error("NBD request failed", exc_info=task.exception())
        if self._closing and not self.tasks and self.transport is not None:
            self._flush()
            self.transport.close()
        self._flow()
        self._maybe_finished()

    def _maybe_finished(self) -> None:
        """A connection is gone once its socket closed and its requests ended."""
        if not self._lost or self.tasks or self.finished.done():
            return
        self.finished.set_result(None)
        self.server._client_gone(self)

    def abort(self) -> None:
        if self.transport is not None and not self._lost:
            self.transport.abort()

    def _started(self, ev: TransmissionStarted) -> None:
        export = ev.export
        assert isinstance(export, _Export)
        self.export = export
        self.structured = ev.structured
        self.contexts = ev.contexts         # type: ignore[assignment]
        export.clients.add(self)

    def _disconnect(self, ev: Disconnect) -> None:
        if ev.reason is not None:
            if ev.handshake:
                log.warning("option negotiation failed: %s", ev.reason)
            else:
                log.warning("Disconnect client, due to: %s", ev.reason)
        self._closing = True
        if not self.tasks and self.transport is not None:
            self._flush()
            self.transport.close()

    async def _start_tls(self) -> None:
        """Upgrade after the STARTTLS ACK; failure ends the connection."""
        assert self.transport is not None and self.server.tls_creds is not None
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(self.transport, self, self.server.tls_creds,
                                             server_side=True)
        except (OSError, ssl.SSLError, ConnectionError) as e:
            log.warning("option negotiation failed: TLS handshake failed: %s", e)
            self.abort()
            return
        if self.server.tls_check is not None:
            try:
                self.server.tls_check(transport.get_extra_info("ssl_object"))
            except TLSPeerRejected as e:
                log.warning("option negotiation failed: %s", e)
                self.transport = cast(asyncio.Transport, transport)
                self.abort()
                return
        self.transport = cast(asyncio.Transport, transport)
        self._tls_pending = False
        self._flush()
        self._flow()

    # ----- requests ---------------------------------------------------
    def _dispatch(self, req: Request) -> None:
        if req.type == Cmd.READ:
            if self._read_inline(req):
                return
            self._spawn(self._handle(req), req.length)
        elif req.type == Cmd.WRITE:
            self._spawn(self._handle(req), req.length)
        else:
            self._spawn(self._handle(req), 0)

    def _read_inline(self, req: Request) -> bool:
        """Serve a read from the page cache without leaving this callback.

        Returns False when the read needs the slow path (unmapped range,
        hole scan, errors); a partial cache hit finishes in the pool.
        """
        assert self.export is not None
        length = req.length
        if self.structured:
            if length >= HOLE_SCAN_MIN and not req.flags & CmdFlag.DF:
                return False
            hdr = DATA_CHUNK_HEADER_SIZE
        else:
            hdr = SIMPLE_HEADER_SIZE
        if not length:
            self._send(none_chunk(req.handle) if self.structured else simple_reply(req.handle))
            return True
        node = self.export.cfg.edge.child
        mapping = node.host_extent(req.offset, length)
        if mapping is None:
            return False
        fd, host_offset = mapping
        pool = self.server._buffers
        buf = pool.get(hdr + length)
        view = memoryview(buf)[:hdr + length]
        try:
            n = os.preadv(fd, [view[hdr:]], host_offset, os.RWF_NOWAIT)
        except BlockingIOError:
            n = 0
        except OSError:
            pool.put(buf)
            return False
        if n < length:
            self._spawn(self._finish_read(req, buf, view, hdr, fd, host_offset, n), length)
            return True
        self._send_read(req, buf, view, hdr)
        return True

    def _send_read(self, req: Request, buf: bytearray, view: memoryview, hdr: int) -> None:
        if hdr == SIMPLE_HEADER_SIZE:
            pack_simple_header(view, req.handle)
        else:
            pack_data_chunk_header(view, 0, req.handle, req.offset, req.length, True)
        self._send(view)
        self.server._buffers.put(buf)

    async def _finish_read(self, req: Request, buf: bytearray, view: memoryview, hdr: int,
                           fd: int, host_offset: int, done: int) -> None:
        try:
            await run_blocking(_pread_full, fd, view[hdr + done:], host_offset + done)
        except OSError as e:
            self._send(self.conn.error_reply(req.handle, nbd_errno(e.errno), _strerror(e)))
            return
        self._send_read(req, buf, view, hdr)

    async def _read_into(self, node: Node, offset: int, view: memoryview) -> None:
        """Fill ``view`` from the node: page cache first, pool on a miss,
        the driver when the node does not map the range to a host file."""
        mapping = node.host_extent(offset, len(view))
        if mapping is not None:
            fd, host_offset = mapping
            try:
                n = os.preadv(fd, [view], host_offset, os.RWF_NOWAIT)
            except BlockingIOError:
                n = 0
            except OSError as e:
                if e.errno != errno.EINVAL:     # e.g. O_DIRECT alignment: use the driver
                    raise
                mapping = None
            if mapping is not None:
                if n < len(view):
                    await run_blocking(_pread_full, fd, view[n:], host_offset + n)
                return
        await node.read_into(offset, view)

    async def _handle(self, req: Request) -> None:
        assert self.export is not None
        node = self.export.cfg.edge.child
        handle = req.handle
        rtype = req.type
        fua = bool(req.flags & CmdFlag.FUA)
        try:
            if rtype == Cmd.READ:
                await self._read(node, req)
                return
            if rtype == Cmd.BLOCK_STATUS:
                await self._block_status(node, req)
                return
            edge = self.export.cfg.edge      # changes wait out drained sections
            if rtype == Cmd.WRITE:
                if req.length:
                    assert req.data is not None
                    await edge.write(req.offset, req.data, fua)
            elif rtype == Cmd.FLUSH:
                await edge.flush()
            elif rtype == Cmd.TRIM:
                if req.length:
                    await edge.discard(req.offset, req.length)
                    if fua:
                        await edge.flush()
            elif rtype == Cmd.WRITE_ZEROES:
                if req.length:
                    await edge.write_zeroes(req.offset, req.length,
                                            may_unmap=not req.flags & CmdFlag.NO_HOLE, fua=fua,
                                            no_fallback=bool(req.flags & CmdFlag.FAST_ZERO))
            elif rtype == Cmd.CACHE:
                mapping = node.host_extent(req.offset, req.length) if req.length else None
                if mapping is not None:
                    os.posix_fadvise(mapping[0], mapping[1], req.length, os.POSIX_FADV_WILLNEED)
            self._send(simple_reply(handle))
        except OSError as e:
            self._send(self.conn.error_reply(handle, nbd_errno(e.errno), _strerror(e)))
        except Exception as e:  # a driver bug must not take the connection down
            log.exception("NBD request %s failed", Cmd(rtype).name)
            self._send(self.conn.error_reply(handle, NBD_EIO, str(e)))

    async def _read(self, node: Node, req: Request) -> None:
        if not req.length:
            self._send(none_chunk(req.handle) if self.structured else simple_reply(req.handle))
            return
        if self.structured and not req.flags & CmdFlag.DF and req.length >= HOLE_SCAN_MIN:
            await self._read_chunked(node, req)
            return
        hdr = DATA_CHUNK_HEADER_SIZE if self.structured else SIMPLE_HEADER_SIZE
        buf = self.server._buffers.get(hdr + req.length)
        view = memoryview(buf)[:hdr + req.length]
        await self._read_into(node, req.offset, view[hdr:])
        self._send_read(req, buf, view, hdr)

    async def _read_chunked(self, node: Node, req: Request) -> None:
        """Structured read as data and hole chunks following block status."""
        segments: list[list[Any]] = []      # [offset, length, is_zero]
        pos, end = req.offset, req.offset + req.length
        while pos < end:
            exts = await node.block_status(pos, end - pos)
            progressed = False
            for ext in exts:
                if ext.offset != pos or ext.length <= 0:
                    break
                n = min(ext.length, end - pos)
                if segments and segments[-1][2] == ext.zero:
                    segments[-1][1] += n
                else:
                    segments.append([pos, n, ext.zero])
                pos += n
                progressed = True
                if pos >= end:
                    break
            if not progressed:              # no usable status: read the rest as data
                segments.append([pos, end - pos, False])
                pos = end
        pool = self.server._buffers
        chunks: list[bytes | memoryview] = []
        bufs: list[bytearray] = []
        last = len(segments) - 1
        for i, (offset, length, zero) in enumerate(segments):
            if zero:
                chunks.append(hole_chunk(req.handle, offset, length, i == last))
                continue
            buf = pool.get(DATA_CHUNK_HEADER_SIZE + length)
            view = memoryview(buf)[:DATA_CHUNK_HEADER_SIZE + length]
            try:
                await self._read_into(node, offset, view[DATA_CHUNK_HEADER_SIZE:])
            except OSError as e:        # what was read so far stays valid
                chunks.append(error_chunk(req.handle, nbd_errno(e.errno), _strerror(e), offset))
                break
            pack_data_chunk_header(view, 0, req.handle, offset, length, i == last)
            chunks.append(view)
            bufs.append(buf)
        self._sendv(chunks)
        for buf in bufs:
            pool.put(buf)

    async def _block_status(self, node: Node, req: Request) -> None:
        req_one = bool(req.flags & CmdFlag.REQ_ONE)
        chunks: list[bytes | memoryview] = []
        last = len(self.contexts) - 1
        for i, (cid, ctx) in enumerate(self.contexts):
            extents = await ctx.extents(node, req.offset, req.length,
                                        1 if req_one else MAX_EXTENTS)
            extents = clamp_extents(extents, req.length, req_one) or [(req.length, 0)]
            chunks.append(block_status_chunk(req.handle, cid, extents, i == last))
        self._sendv(chunks)


def _strerror(e: OSError) -> str:
    return e.strerror or os.strerror(e.errno or errno.EIO)


class NBDServer:
    """NBD server: listeners, exports by name and their connections.

    ``tls_creds`` is the server-side :class:`ssl.SSLContext` built from the
    daemon's tls-creds object; when set, clients must STARTTLS first.
    ``tls_check(ssl_object)`` runs after each handshake and raises
    :class:`~qsd.crypto.tls.TLSPeerRejected` to refuse the client (verify-peer,
    tls-authz).
    """

    def __init__(self, max_connections: int = 0,
                 tls_creds: ssl.SSLContext | None = None,
                 tls_check: Callable[[Any], None] | None = None) -> None:
        self.max_connections = max_connections
        self.tls_creds = tls_creds
        self.tls_check = tls_check
        self._exports: dict[str, _Export] = {}
        self._clients: set[_Client] = set()
        self._connections = 0
        self._slot_freed = asyncio.Event()
        self._listeners: list[socket.socket] = []
        self._unix_paths: list[str] = []
        self._accept_tasks: list[asyncio.Task[None]] = []
        self._buffers = _BufferPool()

    # ----- listeners ----------------------------------------------------
    async def start(self, addr: dict[str, Any]) -> None:
        """Listen on a flat SocketAddress; errors carry QEMU's texts."""
        socks = listen(addr, LISTEN_BACKLOG)
        loop = asyncio.get_running_loop()
        for sock in socks:
            sock.setblocking(False)
            self._listeners.append(sock)
            self._accept_tasks.append(loop.create_task(self._accept_loop(sock)))
        if addr.get("type") == "unix" and not addr.get("abstract"):
            self._unix_paths.append(addr["path"])

    @property
    def addresses(self) -> list[Any]:
        """Where the listeners are bound (to learn an ephemeral port)."""
        return [s.getsockname() for s in self._listeners]

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self.max_connections and self._connections >= self.max_connections:
                self._slot_freed.clear()
                await self._slot_freed.wait()
            try:
                conn, _ = await loop.sock_accept(lsock)
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("NBD accept failed: %s", e)
                    await asyncio.sleep(0.1)
                    continue
                raise
            self._connections += 1
            try:
                await loop.connect_accepted_socket(lambda: _Client(self), conn)
            except OSError:
                conn.close()
                self._connections -= 1

    def _client_gone(self, client: _Client) -> None:
        self._clients.discard(client)
        self._connections -= 1
        self._slot_freed.set()
        export = client.export
        if export is not None and client in export.clients:
            export.clients.discard(client)
            if not export.clients and export.cfg.on_last_client is not None:
                export.cfg.on_last_client()

    # ----- exports ------------------------------------------------------
    def add_export(self, cfg: NBDExportConfig) -> None:
        if cfg.name in self._exports:
            raise GenericError(f"NBD server already has export named '{cfg.name}'")
        self._exports[cfg.name] = _Export(cfg)

    def has_export(self, name: str) -> bool:
        return name in self._exports

    def clients(self, name: str) -> int:
        export = self._exports.get(name)
        return len(export.clients) if export is not None else 0

    async def remove_export(self, name: str) -> None:
        """Unlist the export and drop its clients once their requests end."""
        export = self._exports.pop(name, None)
        if export is None:
            return
        clients = list(export.clients)
        for client in clients:
            client.abort()
        if clients:
            await asyncio.gather(*(c.finished for c in clients))

    async def stop(self, unlink: bool = True) -> None:
        """Close the listeners and every connection. ``nbd-server-stop``
        removes a unix socket file; QSD's shutdown leaves it behind."""
        for task in self._accept_tasks:
            task.cancel()
        for task in self._accept_tasks:
            try:
                await task
            except (asyncio.CancelledError, OSError):
                pass
        self._accept_tasks.clear()
        for sock in self._listeners:
            sock.close()
        self._listeners.clear()
        for path in self._unix_paths if unlink else ():
            try:
                os.unlink(path)
            except OSError:
                pass
        self._unix_paths.clear()
        clients = list(self._clients)
        for client in clients:
            client.abort()
        if clients:
            await asyncio.gather(*(c.finished for c in clients))
        self._exports.clear()
