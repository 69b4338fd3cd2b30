# SPDX-License-Identifier: GPL-2.0-or-later
"""The vhost-user-blk export: a thin asyncio transport.

One listening unix socket (or an inherited one) per export, one front-end
(a VM) at a time, as QSD: the next one is accepted when the previous one
disconnects. Messages are read exactly as :class:`MessageReader` asks, so
the descriptors passed with SCM_RIGHTS stay with their message, and are
handled in order by one task (GET_VRING_BASE waits for the ring's requests
to finish before it answers). Each ring's kick eventfd is watched by the
event loop; a kick pops every available chain, page-cache reads finish
inline, the rest run as tasks, and the used index is published (and the
call eventfd written when the driver wants it) once per batch.

Anything the front-end gets wrong, in messages or in the rings, is logged
and ends the connection; the export keeps listening for the next one.
"""

from __future__ import annotations

import array
import asyncio
import collections
import logging
import mmap
import os
import socket
import stat
from typing import Any

from qsd.export.vhost_user_blk import blk
from qsd.export.vhost_user_blk.blk import BadRequest, BlkDevice
from qsd.export.vhost_user_blk.protocol import (
    F_PROTOCOL_FEATURES,
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    MAX_FDS,
    AddMemReg,
    DeviceRequest,
    GetVringBase,
    Message,
    MessageReader,
    ProtocolError,
    Region,
    RemMemReg,
    ResetDevice,
    Session,
    SetConfig,
    SetFeatures,
    SetMemTable,
    SlaveChannel,
    VringAddr,
    VringBase,
    VringEnable,
    VringFd,
    VringNum,
)
from qsd.export.vhost_user_blk.virtqueue import (
    GuestMemory,
    MemRegion,
    SplitQueue,
    VirtqueueError,
)
from qsd.qmp.errors import GenericError
from qsd.sockets import listen, unlink_if_same

log = logging.getLogger("qsd.export.vhost_user_blk")

_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
_WCE_OFFSET = 32
#: How long a reply may wait for the front-end to read.
SEND_TIMEOUT = 10.0
#: Messages read ahead of the one being handled.
MAX_QUEUED_MESSAGES = 64


def _map_region(region: Region, fd: int) -> MemRegion:
    """mmap one region of the front-end's memory (shared, read-write).

    Only a file (memfd, hugetlbfs, ...) that really holds the whole region:
    touching a mapping beyond the end of its file kills us with SIGBUS."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise ProtocolError(f"memory region descriptor: {e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ProtocolError("memory region descriptor is not a file")
    if region.mmap_offset + region.size > st.st_size:
        raise ProtocolError(f"memory region at guest 0x{region.guest_addr:x} of size 0x{region.size:x} "
                            f"(offset 0x{region.mmap_offset:x}) is larger than its file")
    page = mmap.ALLOCATIONGRANULARITY
    start = region.mmap_offset - region.mmap_offset % page
    skew = region.mmap_offset - start
    try:
        m = mmap.mmap(fd, region.size + skew, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                      offset=start)
    except (OSError, ValueError, OverflowError) as e:
        raise ProtocolError(f"cannot map memory region at guest 0x{region.guest_addr:x} "
                            f"of size 0x{region.size:x}: {e}") from None
    view = memoryview(m)[skew:skew + region.size]
    return MemRegion(region.guest_addr, region.size, region.user_addr, view, m)


class _Ring:
    """One virtqueue's vhost-user state."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.num = 0
        self.base = 0
        self.addr: VringAddr | None = None
        self.queue: SplitQueue | None = None
        self.kick: int | None = None
        self.call: int | None = None
        self.err: int | None = None
        self.enabled = False
        self.started = False
        self.tasks: set[asyncio.Task[None]] = set()
        self.publish_scheduled = False


class _Connection:
    """One front-end, from accept to disconnect."""

    def __init__(self, export: "VhostUserBlkExport", sock: socket.socket) -> None:
        self.export = export
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.reader = MessageReader()
        self.device = BlkDevice(export.edge, export.writable, export.logical_block_size,
                                export.writethrough)
        self.session = Session(blk.features(export.writable), export.num_queues, self.config)
        self.mem = GuestMemory()
        self.rings = [_Ring(i) for i in range(export.num_queues)]
        self.inbox: collections.deque[Message] = collections.deque()
        self.reading = True
        self.wakeup: asyncio.Future[None] | None = None
        self.closing: str | None = None     # why the connection ends (None: it doesn't yet)
        self.slave: int | None = None
        self.wce = 0
        self.finished: asyncio.Future[None] = self.loop.create_future()

    def config(self) -> bytes:
        return blk.config_space(self.export.capacity, self.export.logical_block_size,
                                self.export.num_queues, self.wce)

    # ----- reading messages ----------------------------------------------------
    def _on_readable(self) -> None:
        try:
            while self.closing is None:
                if len(self.inbox) >= MAX_QUEUED_MESSAGES:
                    # The front-end sends faster than we handle: stop reading until we catch up.
                    self.loop.remove_reader(self.sock.fileno())
                    self.reading = False
                    break
                want = self.reader.want()
                data, anc, flags, _ = self.sock.recvmsg(want, _CMSG_SPACE)
                fds: list[int] = []
                for level, kind, payload in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        arr = array.array("i")
                        arr.frombytes(payload[:len(payload) - len(payload) % arr.itemsize])
                        fds.extend(arr)
                if flags & socket.MSG_CTRUNC:
                    for fd in fds:
                        os.close(fd)
                    raise ProtocolError("too many file descriptors with one message")
                if not data:
                    for fd in fds:
                        os.close(fd)
                    self._close(None)
                    break
                self.inbox.extend(self.reader.feed(data, fds))
        except BlockingIOError:
            pass
        except ProtocolError as e:
            self._fail(str(e))
        except OSError as e:
            self._close(f"connection error: {e}")
        self._wake()

    def _wake(self) -> None:
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    def _close(self, reason: str | None) -> None:
        if self.closing is None:
            self.closing = reason or ""
            self._wake()

    def _fail(self, reason: str) -> None:
        """The front-end broke the protocol: log and drop it."""
        if self.closing is None:
            log.warning("vhost-user-blk export '%s': %s; disconnecting the front-end",
                        self.export.id, reason)
        self._close(reason)

    async def run(self) -> None:
        self.loop.add_reader(self.sock.fileno(), self._on_readable)
        try:
            while True:
                while self.inbox and self.closing is None:
                    msg = self.inbox.popleft()
                    try:
                        await self._handle(msg)
                    except (ProtocolError, VirtqueueError) as e:
                        self._fail(str(e))
                if not self.reading and self.closing is None:
                    self.reading = True
                    self.loop.add_reader(self.sock.fileno(), self._on_readable)
                if self.closing is not None:
                    break
                self.wakeup = self.loop.create_future()
                await self.wakeup
                self.wakeup = None
        finally:
            self.loop.remove_reader(self.sock.fileno())
            try:
                await self._teardown()
            finally:
                self.finished.set_result(None)

    async def _send(self, data: bytes | None) -> None:
        """A reply; a front-end that stops reading them is dropped."""
        if not data:
            return
        try:
            await asyncio.wait_for(self.loop.sock_sendall(self.sock, data), SEND_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as e:
            self._close(f"cannot send a reply: {e!r}")

    # ----- messages --------------------------------------------------------------
    async def _handle(self, msg: Message) -> None:
        out = self.session.receive(msg)
        if out is None or isinstance(out, bytes):
            await self._send(out)
            return
        result = await self._device_request(out)
        await self._send(self.session.complete(out, result))

    async def _device_request(self, req: DeviceRequest) -> Any:
        if isinstance(req, SetFeatures):
            return True
        if isinstance(req, SetMemTable):
            mem = GuestMemory()
            try:
                for region, fd in zip(req.regions, req.fds):
                    mem.add(_map_region(region, fd))
            finally:
                for fd in req.fds:
                    os.close(fd)
            await self._replace_memory(mem)
            return True
        if isinstance(req, AddMemReg):
            try:
                region = _map_region(req.region, req.fd)
            finally:
                os.close(req.fd)
            if len(self.mem.regions) >= 32:
                raise ProtocolError("too many memory regions")
            self.mem.add(region)
            self._remap_rings()
            return True
        if isinstance(req, RemMemReg):
            r = req.region
            await self._quiesce_all()
            removed = self.mem.remove(r.guest_addr, r.size, r.user_addr)
            self._remap_rings()
            removed.view.release()
            return True
        ring = self.rings[getattr(req, "index", 0)]
        if isinstance(req, VringNum):
            if ring.started:
                raise ProtocolError(f"SET_VRING_NUM on running vring {ring.index}")
            ring.num = req.num
            return True
        if isinstance(req, VringBase):
            ring.base = req.base
            if ring.queue is not None:
                ring.queue.last_avail = req.base
            return True
        if isinstance(req, VringAddr):
            if ring.tasks:      # completions must land in the ring they came from
                await asyncio.gather(*ring.tasks, return_exceptions=True)
            ring.addr = req
            if self.mem.regions:        # else once the memory table comes
                self._map_ring(ring)
            return True
        if isinstance(req, GetVringBase):
            return await self._stop_ring(ring)
        if isinstance(req, VringFd):
            self._set_fd(ring, req.kind, req.fd)
            return True
        if isinstance(req, VringEnable):
            ring.enabled = req.enable
            if ring.enabled:
                self._process(ring)
            return True
        if isinstance(req, SetConfig):
            if req.offset != _WCE_OFFSET or len(req.data) != 1:
                # Only the cache mode is writable; QSD drops the front-end too.
                raise ProtocolError(f"SET_CONFIG of {len(req.data)} bytes at offset {req.offset} "
                                    "(only the writeback field is writable)")
            self.wce = req.data[0]
            self.device.writethrough = not self.wce     # the guest's cache mode wins
            return True
        if isinstance(req, SlaveChannel):
            if self.slave is not None:
                os.close(self.slave)
            self.slave = req.fd
            return True
        if isinstance(req, ResetDevice):
            for r in self.rings:
                await self._stop_ring(r)
                r.enabled = False
            return True
        raise ProtocolError(f"unhandled request {type(req).__name__}")

    async def _replace_memory(self, mem: GuestMemory) -> None:
        await self._quiesce_all()
        old, self.mem = self.mem, mem
        self._remap_rings()
        old.close()

    async def _quiesce_all(self) -> None:
        for ring in self.rings:
            if ring.tasks:
                await asyncio.gather(*ring.tasks, return_exceptions=True)

    def _remap_rings(self) -> None:
        """After a memory change: rings follow their addresses into the new
        mappings; one whose memory is gone waits (unmapped) for it to come back."""
        for ring in self.rings:
            if ring.addr is None:
                continue
            try:
                self._map_ring(ring)
            except VirtqueueError:
                if ring.queue is not None:
                    ring.base = ring.queue.last_avail
                    ring.queue.unmap()
                    ring.queue = None
                continue
            self._process(ring)

    def _map_ring(self, ring: _Ring) -> None:
        """(Re)build the ring's queue from its addresses and the memory table."""
        if ring.addr is None:
            return
        if not self.mem.regions:
            raise VirtqueueError(f"vring {ring.index}: no guest memory")
        features = self.session.features
        old = ring.queue
        if not ring.num:
            raise ProtocolError(f"vring {ring.index}: addresses before its size")
        q = SplitQueue(ring.num, event_idx=bool(features & F_RING_EVENT_IDX),
                       indirect=bool(features & F_RING_INDIRECT_DESC))
        q.map(self.mem, ring.addr.desc, ring.addr.avail, ring.addr.used)
        if old is not None:
            q.last_avail, q.used_idx = old.last_avail, old.used_idx
            q.signalled_used = old.signalled_used
            old.unmap()
        else:
            q.last_avail = ring.base
            q.sync_used()
        ring.queue = q

    def _set_fd(self, ring: _Ring, kind: str, fd: int | None) -> None:
        old = getattr(ring, kind)
        if old is not None:
            if kind == "kick":
                self.loop.remove_reader(old)
            os.close(old)
        setattr(ring, kind, fd)
        if fd is None:
            return
        os.set_blocking(fd, False)
        if kind == "kick":
            try:
                self.loop.add_reader(fd, self._on_kick, ring)
            except (OSError, ValueError) as e:
                ring.kick = None
                os.close(fd)
                raise ProtocolError(f"vring {ring.index}: unusable kick descriptor: {e}") from None
            if not self.session.features & F_PROTOCOL_FEATURES:
                ring.enabled = True
            ring.started = True
            if ring.queue is not None:
                ring.queue.event_idx = bool(self.session.features & F_RING_EVENT_IDX)
                ring.queue.indirect = bool(self.session.features & F_RING_INDIRECT_DESC)
                ring.queue.sync_used()
            self._process(ring)

    async def _stop_ring(self, ring: _Ring) -> int:
        """GET_VRING_BASE: stop taking chains, finish the ones in flight."""
        if ring.kick is not None:
            self.loop.remove_reader(ring.kick)
            os.close(ring.kick)
            ring.kick = None
        ring.started = False
        if ring.tasks:
            await asyncio.gather(*ring.tasks, return_exceptions=True)
        base = ring.base
        if ring.queue is not None:
            self._publish(ring)
            base = ring.queue.last_avail
            ring.queue.unmap()
            ring.queue = None
        ring.base = base
        return base

    # ----- the rings ---------------------------------------------------------------
    def _on_kick(self, ring: _Ring) -> None:
        if ring.kick is None:
            return
        try:
            os.eventfd_read(ring.kick)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            self._fail(f"vring {ring.index}: reading the kick descriptor failed: {e}")
            return
        self._process(ring)

    def _process(self, ring: _Ring) -> None:
        q = ring.queue
        if q is None or not ring.enabled or not ring.started or self.closing is not None:
            return
        device = self.device
        try:
            while True:
                while (chain := q.pop()) is not None:
                    req = blk.parse(chain)
                    if device.try_read_inline(req):
                        q.push(chain.head, req.finish(blk.S_OK))
                        continue
                    task = self.loop.create_task(self._run(ring, req))
                    ring.tasks.add(task)
                    task.add_done_callback(ring.tasks.discard)
                if not q.enable_notifications():
                    break
        except (VirtqueueError, BadRequest) as e:
            self._fail(f"vring {ring.index}: {e}")
            return
        self._publish(ring)

    async def _run(self, ring: _Ring, req: blk.Request) -> None:
        try:
            status = await self.device.execute(req)
        except Exception:       # a driver bug must not take the connection down
            log.exception("vhost-user-blk request of type %d failed", req.type)
            status = blk.S_IOERR
        q = ring.queue     # memory changes wait for requests, so this is where it came from
        if q is None:
            return
        q.push(req.chain.head, req.finish(status))
        if not ring.publish_scheduled:
            ring.publish_scheduled = True
            self.loop.call_soon(self._publish, ring)

    def _publish(self, ring: _Ring) -> None:
        ring.publish_scheduled = False
        q = ring.queue
        if q is None:
            return
        if q.publish() and ring.call is not None:
            try:
                os.eventfd_write(ring.call, 1)
            except OSError:
                pass

    # ----- teardown ------------------------------------------------------------------
    async def _teardown(self) -> None:
        for ring in self.rings:
            if ring.kick is not None:
                self.loop.remove_reader(ring.kick)
        tasks = [t for ring in self.rings for t in ring.tasks]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for ring in self.rings:
            for kind in ("kick", "call", "err"):
                fd = getattr(ring, kind)
                if fd is not None:
                    os.close(fd)
                    setattr(ring, kind, None)
            if ring.queue is not None:
                ring.queue.unmap()
                ring.queue = None
        for m in self.inbox:
            for fd in m.fds:
                os.close(fd)
        self.inbox.clear()
        self.reader.close()
        if self.slave is not None:
            os.close(self.slave)
            self.slave = None
        self.mem.close()
        self.sock.close()

    def abort(self) -> None:
        self._close("export removed")


class VhostUserBlkExport:
    """A vhost-user-blk device for one node, on one socket."""

    def __init__(self, export_id: str, edge: Any, *, writable: bool, writethrough: bool,
                 logical_block_size: int, num_queues: int) -> None:
        self.id = export_id
        self.edge = edge
        self.writable = writable
        self.writethrough = writethrough
        self.logical_block_size = logical_block_size
        self.num_queues = num_queues
        #: The config space's capacity is the size at export creation (QSD 7.2
        #: neither updates it nor tells the front-end after block_resize);
        #: requests are checked against the current size.
        self.capacity = int(edge.child.size)
        self._listener: socket.socket | None = None
        self._unix: tuple[str, int, int] | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self.connection: _Connection | None = None

    async def start(self, addr: dict[str, Any]) -> None:
        kind = addr.get("type")
        if kind not in ("unix", "fd"):
            raise GenericError("Only socket address types 'unix' and 'fd' are supported")
        (sock,) = listen(addr, 1)
        self._listener = sock
        if kind == "unix" and not addr.get("abstract"):
            st = os.stat(addr["path"])
            self._unix = (addr["path"], st.st_dev, st.st_ino)
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())

    @property
    def clients(self) -> int:
        return 0 if self.connection is None else 1

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._listener)
            except OSError as e:
                log.warning("vhost-user-blk export '%s': accept failed: %s", self.id, e)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            self.connection = _Connection(self, conn)
            try:
                await self.connection.run()
            except Exception:
                log.exception("vhost-user-blk export '%s': connection failed", self.id)
            finally:
                self.connection = None

    async def stop(self) -> None:
        """Drop the front-end (after its requests end), stop listening, remove the socket."""
        conn = self.connection
        if conn is not None:
            # Its requests finish and it tears down before the accept loop goes.
            conn.abort()
            await asyncio.shield(conn.finished)
        if self._accept_task is not None:
            task, self._accept_task = self._accept_task, None
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._unix is not None:
            unlink_if_same(*self._unix)
            self._unix = None
