# SPDX-License-Identifier: GPL-2.0-or-later
"""The driver interface: a node is an object with async methods over byte ranges.

Drivers subclass :class:`Node` and register with :func:`register_driver`.
The graph (``qsd.block.graph``) creates nodes, opens their children through
:meth:`Node.open_child`, and keeps the permissions on every edge consistent.

Contract for drivers
--------------------
* ``async open(options)`` gets the validated blockdev-add options of this
  node (a dict, schema defaults *not* filled in; use ``options.get``).
  Children are opened with ``await self.open_child("file", options["file"])``
  which accepts an inline options dict or a node-name reference.
  ``open`` must set ``self.size``.
* Data methods take byte offsets. ``read_into(offset, buf)`` fills the whole
  memoryview ``buf`` (reads past EOF are the caller's bug). Writes get
  ``bytes``/``memoryview`` data. Drivers implement reads as ``read_into`` and
  changes as ``drv_write``, ``drv_write_zeroes``, ``drv_discard`` and
  ``drv_truncate``; callers use the public ``write``, ``write_zeroes``,
  ``discard`` and ``truncate``, which count requests in flight, run write
  observers and mark dirty bitmaps around the driver's method.
* ``block_status(offset, length)`` returns at least one :class:`Extent`
  starting at ``offset`` (it may cover less than ``length``). Data extents of
  file-backed nodes carry ``host_fd``/``host_offset`` so that an export can
  ``sendfile`` or ``preadv`` straight from the image file.
* Errors are ``OSError`` (errno tells the client what went wrong) or
  :class:`~qsd.qmp.errors.QMPError` during open/create.
* Permissions: a node that reaches the disk (protocol drivers) overrides
  :meth:`check_perm`/:meth:`set_perm`, called with the union of everything
  its parents take and the intersection of what they share.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from qsd.qmp.errors import GenericError

if TYPE_CHECKING:
    from qsd.block.bitmap import DirtyBitmap
    from qsd.block.graph import Edge, Graph
    from qsd.objects import ObjectRegistry


@dataclass
class CreateContext:
    """What a driver's ``create`` may use: the graph (to resolve the node
    given as ``file``) and the objects (secrets for encryption)."""

    graph: "Graph"
    objects: "ObjectRegistry"


class Perm(enum.IntFlag):
    """BlockPermission of QEMU 7.2, bit order as QEMU (and its lock bytes) use it."""

    CONSISTENT_READ = 1 << 0
    WRITE = 1 << 1
    WRITE_UNCHANGED = 1 << 2
    RESIZE = 1 << 3

    @classmethod
    def all(cls) -> "Perm":
        return cls.CONSISTENT_READ | cls.WRITE | cls.WRITE_UNCHANGED | cls.RESIZE


#: Names as QEMU prints them in permission errors, in bit order.
PERM_NAMES: dict[Perm, str] = {
    Perm.CONSISTENT_READ: "consistent read",
    Perm.WRITE: "write",
    Perm.WRITE_UNCHANGED: "write unchanged",
    Perm.RESIZE: "resize",
}


class Role(enum.Flag):
    """What a child is to its parent; decides the default permissions."""

    DATA = enum.auto()
    METADATA = enum.auto()
    FILTERED = enum.auto()
    COW = enum.auto()
    PRIMARY = enum.auto()


@dataclass(slots=True)
class Extent:
    """One run of a node's block status.

    ``data``: allocated with data (NBD's HOLE flag is ``not data``);
    ``zero``: reads as zeroes; ``depth``: 0 unallocated in the whole chain,
    1 allocated in this node, N in the (N-1)th backing file;
    ``host_fd``/``host_offset``: where the bytes of a data extent lie in a
    host file, or ``-1`` when they must be read through the driver.
    """

    offset: int
    length: int
    data: bool = True
    zero: bool = False
    depth: int = 1
    host_fd: int = -1
    host_offset: int = 0


class Node:
    """Base class of every block driver."""

    #: blockdev-add ``driver`` name; set by subclasses.
    driver: ClassVar[str] = ""
    #: Role of the ``file`` child for drivers that have one.
    file_role: ClassVar[Role] = Role.DATA | Role.METADATA | Role.PRIMARY
    #: True for format drivers (query-named-block-nodes lists them as images).
    is_format: ClassVar[bool] = False
    #: True for filters, which pass their parents' permissions through.
    is_filter: ClassVar[bool] = False
    #: Whether query-named-block-nodes shows ``dirty-flag`` (drivers that
    #: answer QEMU's get_info do).
    reports_dirty_flag: ClassVar[bool] = True

    def __init__(self, graph: "Graph", node_name: str, options: dict[str, Any],
                 generated_name: bool = False) -> None:
        self.graph = graph
        self.node_name = node_name
        self.generated_name = generated_name
        self.options = options
        self.read_only: bool = bool(options.get("read-only", False))
        self.auto_read_only: bool = bool(options.get("auto-read-only", False))
        self.force_share: bool = bool(options.get("force-share", False))
        self.detect_zeroes: str = options.get("detect-zeroes", "off")
        self.discard_mode: str = options.get("discard", "ignore")
        cache = options.get("cache", {})
        self.cache_direct: bool = bool(cache.get("direct", False))
        self.cache_no_flush: bool = bool(cache.get("no-flush", False))
        self.size: int = 0
        #: True when the node decrypts its data (query output's ``encrypted``).
        self.encrypted: bool = False
        #: Smallest unit the driver can do I/O in; the node layer aligns to it.
        self.request_alignment: int = 1
        #: Largest single request (0: no limit).
        self.max_transfer: int = 0
        self.children: dict[str, "Edge"] = {}
        self.parents: list["Edge"] = []
        #: True once created by blockdev-add at top level (monitor-owned).
        self.monitor_owned = False
        #: Dirty bitmaps attached to this node (``qsd.block.bitmap``).
        self.dirty_bitmaps: list["DirtyBitmap"] = []
        #: Called as ``observer(node, offset, length)`` before every write,
        #: zero-write and discard (write thresholds use it).
        self.write_observers: list[Callable[["Node", int, int], None]] = []
        #: block-set-write-threshold's offset (0: none), for query-named-block-nodes.
        self.write_threshold = 0
        #: Write requests (and resizes) running in this node right now.
        self.in_flight = 0
        self._idle: asyncio.Event | None = None
        #: Drained sections open on this node; root users wait while > 0.
        self.quiesce_count = 0
        self._unquiesced: asyncio.Event | None = None

    # ----- life cycle -------------------------------------------------
    @classmethod
    async def create(cls, ctx: "CreateContext", options: dict[str, Any]) -> None:
        """blockdev-create: format the image described by ``options`` (this
        driver's BlockdevCreateOptions branch, validated). Runs inside the
        create job; raise QMPError with QEMU's text on failure."""
        raise GenericError(f"Driver '{cls.driver}' does not support blockdev-create")

    async def open(self, options: dict[str, Any]) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Release resources; children are detached by the graph."""

    async def open_child(self, name: str, ref: Any, role: Role | None = None) -> "Node":
        """Open (inline) or look up (reference) a child and attach it as ``name``."""
        return await self.graph.open_child(self, name, ref,
                                           role if role is not None else self.file_role)

    @property
    def file(self) -> "Node":
        return self.children["file"].child

    # ----- permissions -----------------------------------------------
    def child_perm(self, edge: "Edge", perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        """Permissions to take on ``edge`` given what our parents take/share.

        Filters pass them through; storage children of formats take what a
        format needs: read always, write+resize when the node is writable,
        and they share neither write nor resize with anybody else.
        """
        if self.is_filter or Role.FILTERED in edge.role:
            return perm, shared
        p = Perm.CONSISTENT_READ
        s = Perm.all()
        if Role.METADATA in edge.role:
            if not self.read_only:
                p |= Perm.WRITE | Perm.RESIZE
            s &= ~(Perm.WRITE | Perm.RESIZE)
        elif Role.DATA in edge.role:
            p |= perm & (Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE)
            s = shared | Perm.WRITE_UNCHANGED
        if Role.COW in edge.role:
            p = Perm.CONSISTENT_READ
            s = Perm.all() & ~(Perm.WRITE | Perm.RESIZE) | Perm.WRITE_UNCHANGED
            if shared & Perm.WRITE:
                # QEMU: a parent that copes with changing data (nothing above
                # it forbids writes) lets the backing file change too: what
                # lets a commit job write the base under unused overlays.
                s |= Perm.WRITE | Perm.RESIZE
        if self.force_share:
            s = Perm.all()
        return p, s

    def check_perm(self, perm: Perm, shared: Perm) -> None:
        """Raise QMPError if the cumulative permissions cannot be had."""

    def set_perm(self, perm: Perm, shared: Perm) -> None:
        """Apply the cumulative permissions checked by :meth:`check_perm`."""

    # ----- I/O ---------------------------------------------------------
    async def read_into(self, offset: int, buf: memoryview) -> None:
        raise OSError(95, "Operation not supported")

    async def read(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        await self.read_into(offset, memoryview(buf))
        return buf

    # Public entry points: every user (parent node, export, job) calls these.
    # They keep the books QEMU's generic block layer keeps (requests in
    # flight for drained sections, dirty bitmaps, write observers) around
    # the driver's ``drv_*`` method, which is what drivers override.

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    fua: bool = False) -> None:
        length = len(data) if not isinstance(data, memoryview) else data.nbytes
        self._begin_write(offset, length)
        try:
            self.debug_event("pwritev")
            await self.drv_write(offset, data, fua)
        finally:
            self.debug_event("pwritev_done")
            self._end_write(offset, length)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                           fua: bool = False, no_fallback: bool = False) -> None:
        """Zero a range; ``no_fallback`` forbids writing explicit zero buffers
        (NBD's FAST_ZERO): raise ENOTSUP then."""
        self._begin_write(offset, length)
        try:
            self.debug_event("pwritev_zero")
            await self.drv_write_zeroes(offset, length, may_unmap, fua, no_fallback)
        finally:
            self.debug_event("pwritev_done")
            self._end_write(offset, length)

    async def discard(self, offset: int, length: int) -> None:
        """Advisory: drivers that cannot discard do nothing. Dirty bitmaps see
        only discards the node acts on, as in QEMU: opened with discard=unmap
        and with a driver that discards."""
        self._begin_write(offset, length)
        try:
            await self.drv_discard(offset, length)
        finally:
            self._end_write(offset, length, self.discard_mode == "unmap"
                            and type(self).drv_discard is not Node.drv_discard)

    async def truncate(self, size: int, exact: bool = False,
                       prealloc: str = "off") -> None:
        """Resize; dirty bitmaps follow the new size."""
        self.in_flight += 1
        try:
            await self.drv_truncate(size, exact, prealloc)
        finally:
            self._request_done()
        for bitmap in self.dirty_bitmaps:
            bitmap.resize(self.size)

    def _begin_write(self, offset: int, length: int) -> None:
        for observer in self.write_observers:
            observer(self, offset, length)
        self.in_flight += 1

    def _end_write(self, offset: int, length: int, mark: bool = True) -> None:
        # Marked whether or not the write succeeded, as QEMU does: a failed
        # write may still have changed part of the range.
        if mark:
            for bitmap in self.dirty_bitmaps:
                if bitmap.enabled:
                    bitmap.set_range(offset, length)
        self._request_done()

    def _request_done(self) -> None:
        self.in_flight -= 1
        if not self.in_flight and self._idle is not None:
            self._idle.set()
            self._idle = None

    async def wait_idle(self) -> None:
        """Return once no request is in flight in this node."""
        while self.in_flight:
            if self._idle is None:
                self._idle = asyncio.Event()
            await self._idle.wait()

    async def wait_unquiesced(self) -> None:
        """Return once no drained section is open on this node."""
        while self.quiesce_count:
            if self._unquiesced is None:
                self._unquiesced = asyncio.Event()
            await self._unquiesced.wait()

    def unquiesce(self) -> None:
        self.quiesce_count -= 1
        if not self.quiesce_count and self._unquiesced is not None:
            self._unquiesced.set()
            self._unquiesced = None

    def drain_begin(self) -> None:
        """A drained section opened on this node (after ``quiesce_count``
        went up): a node that holds requests back (throttle) lets them go."""

    def drain_end(self) -> None:
        """A drained section on this node closed (``quiesce_count`` is down)."""

    async def drained_poll(self) -> None:
        """Return once what ``drain_begin`` asked for has happened (a job's
        filter: the job has reached its pause point), as QEMU's drain polls."""

    async def undrained_poll(self) -> None:
        """Return once what ``drain_end`` let go has gone on (a job's filter:
        the job has left its pause point), as QEMU resumes jobs at once."""

    def debug_event(self, event: str) -> None:
        """QEMU's bdrv_debug_event: ``event`` (a BlkdebugEvent name) happened
        to this node. Formats fire ``read_aio``/``write_aio`` on their file
        child, the public write methods ``pwritev``/``pwritev_zero`` and
        ``pwritev_done`` on the node itself; blkdebug acts on them."""

    # Driver hooks.
    async def drv_write(self, offset: int, data: bytes | bytearray | memoryview,
                        fua: bool = False) -> None:
        raise OSError(95, "Operation not supported")

    async def drv_write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                               fua: bool = False, no_fallback: bool = False) -> None:
        if no_fallback:
            raise OSError(95, "Operation not supported")
        chunk = 1 << 20
        zeroes = bytes(min(chunk, length))
        pos = offset
        end = offset + length
        while pos < end:
            n = min(chunk, end - pos)
            await self.drv_write(pos, memoryview(zeroes)[:n], fua)
            pos += n

    async def drv_discard(self, offset: int, length: int) -> None:
        pass

    async def drv_truncate(self, size: int, exact: bool = False,
                           prealloc: str = "off") -> None:
        raise GenericError("Image format driver does not support resize")

    async def flush(self) -> None:
        primary = self.children.get("file")
        if primary is not None:
            primary.child.debug_event("flush_to_os")
            if not self.cache_no_flush:
                primary.child.debug_event("flush_to_disk")
        for edge in self.children.values():
            await edge.child.flush()

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return [Extent(offset, length, data=True, zero=False, depth=1)]

    def host_extent(self, offset: int, length: int) -> tuple[int, int] | None:
        """Fast synchronous mapping: ``(fd, host_offset)`` when the whole range
        lies contiguously in one host file, else None. Exports use it to move
        bytes without going through the driver's coroutines."""
        return None

    # ----- persistent dirty bitmaps -------------------------------------
    def bitmap_check_persistent(self, name: str, granularity: int) -> None:
        """Raise QMPError unless a persistent bitmap ``name`` of ``granularity``
        could be stored in this node's image (qcow2 overrides this). The
        caller adds QEMU's "Can't store persistent bitmaps to NODE: " prefix."""
        raise OSError(95, "Operation not supported")

    async def bitmap_remove_persistent(self, name: str) -> None:
        """Drop the stored copy of persistent bitmap ``name`` from the image
        (block-dirty-bitmap-remove does it at once, as QEMU does)."""

    # ----- introspection -----------------------------------------------
    @property
    def filename(self) -> str:
        """The ``file`` member of query-named-block-nodes."""
        if "file" in self.children:
            return self.file.filename
        return ""

    def format_specific(self) -> dict[str, Any] | None:
        """ImageInfoSpecific for query-named-block-nodes, or None."""
        return None

    def dirty_flag(self) -> bool:
        """True while the image is marked in use (qcow2 lazy refcounts)."""
        return False

    def cluster_size(self) -> int | None:
        return None

    def snapshots(self) -> list[dict[str, Any]] | None:
        """SnapshotInfo of the internal snapshots, None when there are none."""
        return None

    def actual_size(self) -> int | None:
        """Bytes the image occupies on the host, or None when unknown."""
        if "file" in self.children:
            return self.file.actual_size()
        return None


DRIVERS: dict[str, type[Node]] = {}


def register_driver(cls: type[Node]) -> type[Node]:
    """Class decorator: make ``cls`` available to blockdev-add by its name."""
    DRIVERS[cls.driver] = cls
    return cls
