# SPDX-License-Identifier: GPL-2.0-or-later
"""The ``qcow2`` format driver (docs/interop/qcow2.txt).

Reads go through the L2 cache straight to the data file; mapped data
extents are handed to exports (``host_extent``/``block_status``) so NBD
reads leave from the image file without passing through here.
Writes, write-zeroes, discards and resizes are serialised by one lock
(reads are not): clusters are allocated in batches, data is written before
the L2 entries that point to it, refcount increments before L2 entries,
and decrements only after (see :mod:`.refcount`). Before every metadata
write an overlap check refuses writes onto other metadata, marking the
image corrupt as QEMU does.

Lazy refcounts: the dirty bit is set before the first write and cleared on
close, but refcounts are always kept exact, so an image we leave dirty
only ever has leaks. An image found dirty is repaired when opened
read-write (:func:`.refcount` rebuild in :meth:`Qcow2Node._repair`),
read-only opens use it as it is (reads never look at refcounts).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import struct
import zlib
from typing import TYPE_CHECKING, Any, AsyncIterator

from qsd.block.formats.qcow2 import snapshot
from qsd.block.formats.qcow2.bitmaps import BitmapStore, check_constraints
from qsd.block.formats.qcow2.create import create_image, preallocate
from qsd.block.formats.qcow2.crypt import (
    CRYPT_LUKS, Qcow2Crypto, check_format_option, open_crypto)
from qsd.block.formats.qcow2.cluster import (
    BITMAP_ALL_ALLOC, BITMAP_ALL_ZERO, L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED,
    OFLAG_COPIED, OFLAG_ZERO, ClusterMap, Kind)
from qsd.block.formats.qcow2.header import (
    AUTOCLEAR_DATA_FILE_RAW, AUTOCLEAR_KNOWN, COMPAT_LAZY_REFCOUNTS, COMPRESSION_NAMES,
    COMPRESSION_ZSTD, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, MAGIC, Header)
from qsd.block.formats.qcow2.refcount import Refcounts, corrupt
from qsd.block.node import DRIVERS, Extent, Node, Role, register_driver
from qsd.crypto.cipher import SECTOR_SIZE
from qsd.crypto.luks import LuksVolume
from qsd.qmp.errors import GenericError, QMPError
from qsd.qmp.keyorder import qemu_items

if TYPE_CHECKING:
    from qsd.block.node import CreateContext

#: QEMU's default cap on the L2 cache (64-bit hosts) and refcount cache size.
DEFAULT_L2_CACHE_MAX = 32 << 20
DEFAULT_REFCOUNT_CACHE_CLUSTERS = 4
#: Largest run handed to block_status callers in one go.
STATUS_MAX = 1 << 30
_ZERO_CHUNK = 1 << 20


@register_driver
class Qcow2Node(ClusterMap, Node):
    """A qcow2 image on its ``file`` child (and optionally ``data-file``)."""

    driver = "qcow2"
    is_format = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.img = self
        self.header = Header()
        self._lock = asyncio.Lock()
        #: Overwrites of owned clusters in flight outside the lock.
        self._overwrites = 0
        self._overwrites_done: asyncio.Event | None = None
        #: Guest clusters whose new host cluster is being written outside
        #: the lock (its L2 entry is set afterwards), with their done events.
        self._allocating: dict[int, asyncio.Event] = {}
        self._meta: dict[int, str] = {}
        self._compressed_cache: tuple[int, bytes] | None = None
        self._writable = False
        self._marked_dirty = False
        self._corrupt_reported = False
        #: Metadata kinds the overlap-check option leaves out.
        self._overlap_unchecked: frozenset[str] = frozenset()
        self.crypto: Qcow2Crypto | None = None

    # ----- plumbing used by refcount/cluster -------------------------------
    @property
    def file_node(self) -> Node:
        return self.children["file"].child

    @property
    def data_node(self) -> Node:
        edge = self.children.get("data-file")
        return edge.child if edge is not None else self.file_node

    @property
    def has_data_file(self) -> bool:
        return bool(self.header.incompatible & INCOMPAT_DATA_FILE)

    @property
    def backing_node(self) -> Node | None:
        edge = self.children.get("backing")
        return edge.child if edge is not None else None

    def file_end(self) -> int:
        return self.file_node.size

    async def read_file(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        if length:
            await self.file_node.read_into(offset, memoryview(buf))
        return buf

    def add_metadata(self, offset: int, length: int, name: str) -> None:
        for c in range(offset >> self.cbits, (offset + length - 1 >> self.cbits) + 1):
            self._meta[c] = name

    def remove_metadata(self, offset: int, length: int) -> None:
        for c in range(offset >> self.cbits, (offset + length - 1 >> self.cbits) + 1):
            self._meta.pop(c, None)

    def check_overlap(self, offset: int, length: int, name: str | None) -> None:
        """Refuse a write of ``name`` metadata (None: guest data) that would
        land on other metadata the ``overlap-check`` option checks; the image
        is marked corrupt as QEMU does."""
        for c in range(offset >> self.cbits, (offset + length - 1 >> self.cbits) + 1):
            kind = self._meta.get(c)
            if kind is not None and kind != name and kind not in self._overlap_unchecked:
                self._mark_corrupt(f"Preventing invalid write on metadata (overlaps with {kind})",
                                   offset, length)
                raise OSError(errno.EIO, f"Write at {offset:#x} overlaps with {kind}")

    def _mark_corrupt(self, why: str, offset: int = -1, size: int = -1) -> None:
        """QEMU's fatal corruption signal: the corrupt bit, one message and one
        BLOCK_IMAGE_CORRUPTED event (later ones are suppressed)."""
        if not self._corrupt_reported:
            os.write(2, f"qcow2: Marking image as corrupt: {why}; further corruption events "
                        "will be suppressed\n".encode())
            self._corrupt_reported = True
            data: dict[str, Any] = {"device": "", "node-name": self.node_name, "msg": why}
            if offset >= 0:
                data["offset"] = offset
            if size >= 0:
                data["size"] = size
            data["fatal"] = True
            self.graph.emit_event("BLOCK_IMAGE_CORRUPTED", data)
        self.header.incompatible |= INCOMPAT_CORRUPT
        asyncio.ensure_future(self._write_header_quietly())

    async def _write_header_quietly(self) -> None:
        try:
            await self.file_node.write(0, self.header.pack())
        except OSError:
            pass

    async def write_meta(self, offset: int, data: bytes, name: str) -> None:
        self.check_overlap(offset, len(data), name)
        await self.file_node.write(offset, data)

    async def write_header(self) -> None:
        await self.file_node.write(0, self.header.pack())

    async def change_backing_file(self, name: str | None, fmt: str | None) -> None:
        """Rewrite the backing file name (and format) in the header, as
        block-stream, block-commit and change-backing-file do."""
        if name and len(name.encode()) > 1023:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        h = self.header
        old = (h.backing_file, h.backing_fmt)
        h.backing_file, h.backing_fmt = name or None, (fmt or None) if name else None
        try:
            packed = h.pack()
        except GenericError:
            h.backing_file, h.backing_fmt = old
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL)) from None
        await self.file_node.write(0, packed)
        await self.file_node.flush()

    async def write_back_metadata(self) -> None:
        """L2 tables (after the refcounts they depend on) to the disk."""
        await self.l2_cache.flush()
        await self.refcounts.cache.flush()

    async def discard_host(self, frees: list[tuple[int, int]], option: str) -> None:
        """Pass freed clusters down to the file when QEMU's ``option``
        (pass-discard-request, pass-discard-snapshot) allows; advisory."""
        if not self.options.get(option, True):
            return
        for offset, count in frees:
            try:
                await self.file_node.discard(offset, count << self.cbits)
            except OSError:
                pass  # advisory

    # ----- open / close ----------------------------------------------------
    async def open(self, options: dict[str, Any]) -> None:
        file = await self.open_child("file", options["file"])
        first = await self.read_file(0, min(max(file.size, 0), 4096))
        if len(first) >= 24 and first[:4] == MAGIC:
            bits = struct.unpack_from(">I", first, 20)[0]
            if 9 <= bits <= 21 and (1 << bits) > len(first):
                first = await self.read_file(0, min(file.size, 1 << bits))
        h = Header.parse(first, file.size)
        self.header = h
        self._overlap_unchecked = _overlap_unchecked(options.get("overlap-check"))
        self._writable = not self.read_only
        if h.incompatible & INCOMPAT_CORRUPT and self._writable:
            raise GenericError("qcow2: Image is corrupt; cannot be opened read/write")
        await self._open_encryption(options)
        self.size = h.size
        self.init_map(self._l2_cache_entries(options))
        self.refcounts = Refcounts(self, self._refcount_cache_entries(options))
        self.l2_cache.depends_on = self.refcounts.cache
        self.l2_cache.barrier = self.file_node.flush
        self.add_metadata(0, self.cs, "qcow2_header")
        if h.crypto_header is not None:  # guest writes must never land on it
            self.add_metadata(h.crypto_header[0], max(1, h.crypto_header[1]),
                              "encryption header")
        await self.refcounts.load()
        self.add_metadata(h.refcount_table_offset, h.refcount_table_clusters * self.cs,
                          "refcount table")
        for off in self.refcounts.table:
            if off:
                self.add_metadata(off, self.cs, "refcount block")
        if h.l1_size:
            self.add_metadata(h.l1_table_offset, h.l1_size * 8, "active L1 table")
        await self.load_l1()
        await self._load_snapshot_table()
        self.bitmap_store = BitmapStore(self)
        had_bitmaps_ext = h.bitmaps_ext is not None
        await self.bitmap_store.load()
        await self._open_data_file(options)
        await self._open_backing(options)
        self.lazy_refcounts = bool(options.get("lazy-refcounts",
                                               h.compatible & COMPAT_LAZY_REFCOUNTS))
        if self.lazy_refcounts and h.version < 3:
            raise GenericError("Lazy refcounts require a qcow2 image with at least qemu 1.1 "
                               "compatibility level")
        if self._writable:
            if h.incompatible & INCOMPAT_DIRTY:
                await self._repair()
            if h.autoclear & ~AUTOCLEAR_KNOWN or (had_bitmaps_ext and h.bitmaps_ext is None):
                # Unknown auto-clear features are no longer consistent once
                # we write; an ignored bitmaps extension goes away.
                h.autoclear &= AUTOCLEAR_KNOWN
                await self.write_header()

    async def _open_encryption(self, options: dict[str, Any]) -> None:
        """Check ``encrypt.format`` against the header and unlock the
        payload cipher (see :mod:`.crypt`)."""
        h = self.header
        check_format_option(h.crypt_method, options.get("encrypt"))
        if not h.crypt_method:
            return
        self.crypto = await open_crypto(self, options.get("encrypt"))
        self.encrypted = True
        self.request_alignment = SECTOR_SIZE

    def _l2_cache_entries(self, options: dict[str, Any]) -> int:
        cs = self.header.cluster_size
        l1_needed = self.header.l1_entries_needed(self.header.size)
        if "l2-cache-size" in options:
            return max(2, options["l2-cache-size"] // cs)
        if "cache-size" in options:
            refcount = options.get("refcount-cache-size", 0)
            return max(2, (options["cache-size"] - refcount) // cs)
        return max(2, min(l1_needed, DEFAULT_L2_CACHE_MAX // cs))

    def _refcount_cache_entries(self, options: dict[str, Any]) -> int:
        if "refcount-cache-size" in options:
            return max(2, options["refcount-cache-size"] // self.header.cluster_size)
        return DEFAULT_REFCOUNT_CACHE_CLUSTERS

    async def _load_snapshot_table(self) -> None:
        """Remember where the snapshot table and inactive L1 tables are, so
        that writes never land on them (and the repair counts them)."""
        h = self.header
        self.snapshot_l1s: list[tuple[int, int]] = []
        self.snapshot_list: list[snapshot.Snapshot] = []
        self.snapshot_table_len = 0
        if not h.nb_snapshots:
            return
        pos = h.snapshots_offset
        end_file = self.file_end()
        for _ in range(h.nb_snapshots):
            if pos + 40 > end_file:
                raise GenericError("Snapshot table offset invalid")
            raw = await self.read_file(pos, 40)
            l1_off, l1_size, id_len, name_len = struct.unpack_from(">QIHH", raw)
            extra = struct.unpack_from(">I", raw, 36)[0]
            if extra > 1024:
                raise GenericError("Snapshot table entry too large")
            if l1_size > (32 << 20) // 8 or (l1_size and (l1_off % self.cs
                                                          or l1_off + l1_size * 8 > end_file)):
                raise GenericError("Snapshot L1 table offset invalid")
            self.snapshot_l1s.append((l1_off, l1_size))
            if l1_size:
                self.add_metadata(l1_off, l1_size * 8, "inactive L1 table")
            pos += (40 + extra + id_len + name_len + 7) & ~7
        self.add_metadata(h.snapshots_offset, pos - h.snapshots_offset, "snapshot table")
        self.snapshot_table_len = pos - h.snapshots_offset
        self.snapshot_list = await snapshot.load(self)

    def _image_dir_path(self, name: str) -> str:
        if os.path.isabs(name):
            return name
        base = self.file_node.filename
        if base.startswith("json:"):
            return name
        return os.path.join(os.path.dirname(base), name)

    async def _open_data_file(self, options: dict[str, Any]) -> None:
        h = self.header
        ref = options.get("data-file")
        if not self.has_data_file:
            if ref is not None:
                raise GenericError("'data-file' can only be set for images with an external "
                                   "data file")
            if h.autoclear & AUTOCLEAR_DATA_FILE_RAW:
                raise GenericError("data-file-raw cannot be set for images without an "
                                   "external data file")
            return
        if ref is None:
            if not h.data_file:
                raise GenericError("'data-file' is required for this image")
            ref = {"driver": "file", "filename": self._image_dir_path(h.data_file),
                   "read-only": self.read_only}
        await self.open_child("data-file", ref, Role.DATA)

    async def _open_backing(self, options: dict[str, Any]) -> None:
        h = self.header
        if "backing" in options:
            ref = options["backing"]
            if ref is None:
                return
        else:
            if not h.backing_file:
                return
            if self.has_data_file and h.autoclear & AUTOCLEAR_DATA_FILE_RAW:
                raise GenericError("Backing file and data-file-raw cannot be used at the same "
                                   "time")
            path = self._image_dir_path(h.backing_file)
            fmt = h.backing_fmt or _probe(path)
            if fmt not in DRIVERS:
                raise GenericError(f"Could not open backing file: Unknown driver '{fmt}'")
            ref = {"driver": fmt, "file": {"driver": "file", "filename": path},
                   "read-only": True}
        try:
            await self.open_child("backing", ref, Role.COW)
        except QMPError as e:
            if isinstance(ref, str):
                raise
            raise GenericError(f"Could not open backing file: {e.desc}") from None

    async def close(self) -> None:
        if self._writable and "file" in self.children:
            try:
                await self.bitmap_store.store_all()
            except (QMPError, OSError) as e:
                text = e.desc if isinstance(e, QMPError) else os.strerror(e.errno or errno.EIO)
                os.write(2, f"qemu-storage-daemon: Lost persistent bitmaps during inactivation "
                            f"of node '{self.node_name}': {text}\n".encode())
            try:
                await self._flush_metadata()
                if self.header.incompatible & INCOMPAT_DIRTY:
                    self.header.incompatible &= ~INCOMPAT_DIRTY
                    await self.write_header()
                    await self.file_node.flush()
            except OSError:
                pass

    # ----- repair ----------------------------------------------------------
    async def _repair(self) -> None:
        """Rebuild refcounts of a dirty image from its references, then
        clear the dirty bit (what QEMU does on a read-write open)."""
        want = await self.count_references()
        rc = self.refcounts
        top = max(want) + 1 if want else 0
        rc.free_hint = max(rc.free_hint, top)
        for c in range(top):  # raise first: nothing in use may look free
            cur = await rc.get(c)
            if want.get(c, 0) > cur:
                await rc.update(c << self.cbits, 1, want[c] - cur)
        # Lower up to the end of the file (leaks may lie past the last
        # reference); the raise may have allocated refcount blocks: keep them.
        meta_new = self._meta_new_since(want)
        end = max(top, -(-self.file_node.size // self.cs))
        for c in range(end):
            cur = await rc.get(c)
            if cur > want.get(c, 0) and c not in meta_new:
                await rc.update(c << self.cbits, 1, want.get(c, 0) - cur)
        rc.free_hint = 0
        await self.refcounts.cache.flush()
        await self.file_node.flush()
        self.header.incompatible &= ~INCOMPAT_DIRTY
        await self.write_header()
        await self.file_node.flush()

    def _meta_new_since(self, want: dict[int, int]) -> set[int]:
        """Refcount blocks the repair itself allocated (not in ``want``)."""
        return {c for c, kind in self._meta.items() if kind == "refcount block" and c not in want}

    async def count_references(self) -> dict[int, int]:
        """How often each host cluster is referenced by the image's metadata."""
        refs: dict[int, int] = {}
        cs = self.cs
        h = self.header

        def add(offset: int, length: int) -> None:
            for c in range(offset >> self.cbits, (offset + length - 1 >> self.cbits) + 1):
                refs[c] = refs.get(c, 0) + 1

        add(0, cs)
        add(h.refcount_table_offset, h.refcount_table_clusters * cs)
        for off in self.refcounts.table:
            if off:
                add(off, cs)
        if h.crypto_header is not None:
            add(h.crypto_header[0], max(1, h.crypto_header[1]))
        l1s = [(self.l1, True)]
        if h.l1_size:
            add(h.l1_table_offset, h.l1_size * 8)
        snap_meta = [c for c, k in self._meta.items() if k == "snapshot table"]
        for c in snap_meta:
            add(c << self.cbits, 1)
        for off, size in self.snapshot_l1s:
            if size:
                add(off, size * 8)
                raw = await self.read_file(off, size * 8)
                l1s.append((list(struct.unpack(f">{size}Q", raw)), False))
        for off, length in self.bitmap_store.references():
            add(off, length)
        for off, length in await self.bitmap_store.table_references():
            add(off, length)
        for table, _active in l1s:
            for e in table:
                l2 = e & L1E_OFFSET_MASK
                if not l2:
                    continue
                add(l2, cs)
                # Data counts once per L1 table that reaches it (shared L2s too).
                l2t = await self.l2_cache.get(l2)
                for i in range(self.l2_entries):
                    entry, _ = self.entry_pair(l2t, i)
                    if entry & OFLAG_COMPRESSED:
                        host = entry & self.compressed_mask
                        nsect = (entry >> self.csectors_shift & self.csectors_mask) + 1
                        add(host & ~511, nsect * 512)
                    elif entry & L2E_OFFSET_MASK and not self.has_data_file:
                        add(entry & L2E_OFFSET_MASK, cs)
        return refs

    # ----- reads -------------------------------------------------------------
    async def read_into(self, offset: int, buf: memoryview) -> None:
        end = offset + len(buf)
        pos = offset
        while pos < end:
            runs = await self.map_range(pos, end - pos)
            for r in runs:
                view = buf[r.offset - offset:r.offset - offset + r.length]
                if r.kind is Kind.NORMAL:
                    self.data_node.debug_event("read_aio")
                    if self.crypto is not None:
                        await self._read_encrypted(r.offset, r.host, view)
                    else:
                        await self.data_node.read_into(r.host, view)
                elif r.kind is Kind.UNALLOCATED:
                    await self._read_backing(r.offset, view)
                elif r.kind is Kind.ZERO:
                    view[:] = bytes(len(view))
                else:
                    self.file_node.debug_event("read_compressed")
                    data = await self._decompress(r.host)
                    start = r.offset & (self.cs - 1)
                    view[:] = data[start:start + r.length]
            pos = runs[-1].offset + runs[-1].length

    async def _read_encrypted(self, offset: int, host: int, view: memoryview) -> None:
        """Decrypt the whole sectors around a run (host and guest offsets
        share their position within a sector, clusters being aligned)."""
        assert self.crypto is not None
        skip = offset % SECTOR_SIZE
        length = -(-(skip + len(view)) // SECTOR_SIZE) * SECTOR_SIZE
        raw = bytearray(length)
        await self.data_node.read_into(host - skip, memoryview(raw))
        plain = self.crypto.cipher.decrypt(self.crypto.sector(offset - skip, host - skip), raw)
        view[:] = memoryview(plain)[skip:skip + len(view)]

    async def _read_backing(self, offset: int, view: memoryview) -> None:
        backing = self.backing_node
        n = 0
        if backing is not None and offset < backing.size:
            n = min(len(view), backing.size - offset)
            await backing.read_into(offset, view[:n])
        if n < len(view):
            view[n:] = bytes(len(view) - n)

    async def _decompress(self, entry: int) -> bytes:
        cached = self._compressed_cache
        if cached is not None and cached[0] == entry:
            return cached[1]
        host = entry & self.compressed_mask
        nsect = (entry >> self.csectors_shift & self.csectors_mask) + 1
        length = nsect * 512 - (host & 511)
        length = min(length, self.file_end() - host)
        if length <= 0:
            raise corrupt(f"Compressed cluster at {host:#x} lies beyond the end of the image")
        raw = bytes(await self.read_file(host, length))
        try:
            if self.header.compression_type == COMPRESSION_ZSTD:
                out = _zstd_decompress(raw, self.cs)
            else:
                out = zlib.decompressobj(-15).decompress(raw, self.cs)
        except (zlib.error, ValueError) as e:
            raise OSError(errno.EIO, f"Could not decompress cluster at {host:#x}: {e}") from None
        if len(out) < self.cs:
            raise OSError(errno.EIO, f"Compressed cluster at {host:#x} is truncated")
        self._compressed_cache = (entry, out)
        return out

    # ----- writes ------------------------------------------------------------
    def _check_writable(self) -> None:
        if not self._writable:
            raise OSError(errno.EPERM, "Operation not permitted")
        if self.header.incompatible & INCOMPAT_CORRUPT:
            raise OSError(errno.EIO, "Image is corrupt")

    async def _before_write(self) -> None:
        if self.lazy_refcounts and not self._marked_dirty:
            self._marked_dirty = True
            if not self.header.incompatible & INCOMPAT_DIRTY:
                self.header.incompatible |= INCOMPAT_DIRTY
                await self.write_header()
                await self.file_node.flush()

    async def drv_write(self, offset: int, data: bytes | bytearray | memoryview,
                    fua: bool = False) -> None:
        self._check_writable()
        data = memoryview(data).cast("B")
        fresh: tuple[int, int, int, bool] | None = None
        await self._acquire_range(offset, len(data))
        try:
            if self.lazy_refcounts and not self._marked_dirty:
                await self._before_write()
            host = self._overwrite_host(offset, len(data))
            if host is None:
                fresh = await self._fresh_clusters(offset, len(data))
                if fresh is None:
                    await self._write_locked(offset, data)
                    self._compressed_cache = None
                else:
                    first = offset >> self.cbits
                    for cluster in range(first, first + fresh[1]):
                        self._allocating[cluster] = asyncio.Event()
            else:
                self._overwrites += 1
        finally:
            self._lock.release()
        if fresh is not None:
            await self._write_fresh(offset, data, *fresh)
        elif host is not None:
            # Outside the lock: the cluster stays ours until wait_overwrites()
            # lets a free or a snapshot go on.
            try:
                self.data_node.debug_event("write_aio")
                await self.data_node.write(host, data)
            finally:
                self._overwrites -= 1
                if not self._overwrites and self._overwrites_done is not None:
                    self._overwrites_done.set()
        if fua:
            await self.flush()

    async def _acquire_range(self, offset: int = 0, length: int | None = None) -> None:
        """Take the node lock once no cluster of the range (None: of the
        image) is still being allocated outside it; the caller releases it."""
        while True:
            await self._lock.acquire()
            if not self._allocating:
                return
            first = offset >> self.cbits
            last = None if length is None else (offset + max(length, 1) - 1) >> self.cbits
            busy = next((ev for c, ev in self._allocating.items()
                         if c >= first and (last is None or c <= last)), None)
            if busy is None:
                return
            self._lock.release()
            await busy.wait()

    @contextlib.asynccontextmanager
    async def _range_lock(self, offset: int = 0,
                          length: int | None = None) -> AsyncIterator[None]:
        """:meth:`_acquire_range` as a context."""
        await self._acquire_range(offset, length)
        try:
            yield
        finally:
            self._lock.release()

    async def _fresh_clusters(self, offset: int, length: int) -> tuple[int, int, int, bool] | None:
        """For a write into clusters of one L2 table that all read as zeroes
        now (unallocated without backing data, or zero clusters without host
        clusters): allocate a contiguous host run for them and return (first
        cluster's guest start, cluster count, host, whether the run already
        reads as zeroes); the data then goes out without the lock
        (:meth:`_write_fresh`). None: take the full path."""
        cbits, cs = self.cbits, self.cs
        first, last = offset >> cbits, (offset + length - 1) >> cbits
        count = last - first + 1
        c_start = first << cbits
        if self.crypto is not None or self.has_data_file or self.ext_l2:
            return None
        l1_index, idx = divmod(first, self.l2_entries)
        if l1_index >= len(self.l1) or last // self.l2_entries != l1_index:
            return None
        backing = self.backing_node
        backing_end = backing.size if backing is not None else 0
        l2_off = self._l2_offset(l1_index)
        table = await self.l2_cache.get(l2_off) if l2_off else None
        for i in range(count):
            entry = self.entry_pair(table, idx + i)[0] if table is not None else 0
            if entry & ~OFLAG_ZERO:
                return None
            if not entry and c_start + i * cs < backing_end:
                return None
        host, zero_from = await self.refcounts.alloc_data(count)
        self.check_overlap(host, count * cs, None)
        return c_start, count, host, host >= zero_from

    async def _write_fresh(self, offset: int, data: memoryview, c_start: int, count: int,
                           host: int, known_zero: bool) -> None:
        """Write the data of clusters :meth:`_fresh_clusters` allocated (zero
        padding only where the file does not read as zeroes already), then
        point their L2 entries at them, as QEMU links an allocation after
        its data."""
        cs = self.cs
        linked = 0
        try:
            self.data_node.debug_event("write_aio")
            head = offset - c_start
            tail = count * cs - head - len(data)
            if known_zero or not (head or tail):
                await self.data_node.write(host + head, data)
            else:
                buf = bytearray(count * cs)
                buf[head:head + len(data)] = data
                await self.data_node.write(host, buf)
            async with self._lock:
                for linked in range(count):
                    await self.set_entry(c_start + linked * cs, host + linked * cs | OFLAG_COPIED)
                linked = count
                self._compressed_cache = None
        except BaseException:
            # Applied with the next batch of frees; linked clusters stay.
            self.refcounts.free(host + linked * cs, count - linked)
            raise
        finally:
            for i in range(count):
                self._allocating.pop((c_start >> self.cbits) + i).set()

    async def wait_overwrites(self) -> None:
        """Wait for the overwrites running outside the lock (called with the
        lock held, so that no new one starts): before a cluster they may be
        writing to is freed or shared with a snapshot."""
        while self._overwrites:
            self._overwrites_done = asyncio.Event()
            await self._overwrites_done.wait()
        self._overwrites_done = None

    def _overwrite_host(self, offset: int, length: int) -> int | None:
        """Host offset when [offset, offset+length) lies in clusters owned by
        the active L1 alone (QCOW_OFLAG_COPIED), contiguous on the host and
        mapped by a cached L2 table: the common overwrite, which needs no
        metadata change at all. None sends the write down the full path."""
        if self.crypto is not None or not length:
            return None
        cbits = self.cbits
        first, last = offset >> cbits, (offset + length - 1) >> cbits
        l1_index, idx = divmod(first, self.l2_entries)
        if l1_index >= len(self.l1) or last // self.l2_entries != l1_index:
            return None
        l1e = self.l1[l1_index]
        table = self.l2_cache.peek(l1e & L1E_OFFSET_MASK) if l1e & OFLAG_COPIED else None
        if table is None:
            return None
        start = -1
        for i in range(last - first + 1):
            entry, bitmap = self.entry_pair(table, idx + i)
            host = entry & L2E_OFFSET_MASK
            if (entry & (OFLAG_COPIED | OFLAG_COMPRESSED)) != OFLAG_COPIED or host % self.cs:
                return None
            if self.ext_l2:
                if bitmap != BITMAP_ALL_ALLOC:
                    return None
            elif entry & OFLAG_ZERO:
                return None
            if not host and not self.has_data_file:
                return None
            if i == 0:
                start = host
            elif host != start + (i << cbits):
                return None
        host = start + (offset & (self.cs - 1))
        if not self.has_data_file:
            self.check_overlap(host, length, None)
        return host

    def _span_end(self, pos: int, end: int) -> int:
        """End of the part of [pos, end) covered by one L2 table."""
        per = self.l2_entries << self.cbits
        return min(end, (pos // per + 1) * per)

    async def _write_locked(self, offset: int, data: memoryview) -> None:
        end = offset + len(data)
        pos = offset
        while pos < end:
            stop = self._span_end(pos, end)
            await self._write_span(pos, data[pos - offset:stop - offset])
            pos = stop

    def _in_place(self, entry: int) -> bool:
        if entry & OFLAG_COMPRESSED or not entry & OFLAG_COPIED:
            return False
        if not self.ext_l2 and entry & OFLAG_ZERO:
            return False
        return bool(entry & L2E_OFFSET_MASK) or self.has_data_file

    async def _write_span(self, pos: int, data: memoryview) -> None:
        """Write within one L2 table: plan, allocate, COW-pad, write, map."""
        cs, cbits = self.cs, self.cbits
        end = pos + len(data)
        first, last = pos >> cbits, (end - 1) >> cbits
        l1_index, idx0 = divmod(first, self.l2_entries)
        l2_off = self._l2_offset(l1_index)
        table = await self.l2_cache.get(l2_off) if l2_off else None
        # [cluster, entry, bitmap, inplace, pad_s, pad_e, host, zero_src, known_zero]:
        # zero_src: the padding reads as zeroes; known_zero: so does the new host cluster.
        plans: list[list[int]] = []
        fresh = 0
        backing = self.backing_node
        zero_below = 0 if self.crypto is not None else -1  # ciphertext of zeroes is not zero
        for i, c in enumerate(range(first, last + 1)):
            entry, bitmap = self.entry_pair(table, idx0 + i) if table is not None else (0, 0)
            c_start = c << cbits
            ws, we = max(pos, c_start), min(end, c_start + cs)
            inplace = self._in_place(entry)
            if self.ext_l2 and (inplace or not (entry & (OFLAG_COMPRESSED | L2E_OFFSET_MASK))):
                sc = self.sc_size
                pad_s = ws - (ws - c_start) % sc
                pad_e = min(c_start + cs, -(-(we - c_start) // sc) * sc + c_start)
                if inplace and bitmap >> ((ws - c_start) // sc) & 1:
                    pad_s = ws
                if inplace and bitmap >> ((we - 1 - c_start) // sc) & 1:
                    pad_e = we
            elif inplace:
                pad_s, pad_e = ws, we
            else:
                pad_s, pad_e = c_start, c_start + cs
            if self.crypto is not None:  # the cipher works on whole sectors
                pad_s -= pad_s % SECTOR_SIZE
                pad_e += -pad_e % SECTOR_SIZE
            zero_src = 0
            if not inplace:
                fresh += 1
                no_backing = backing is None or c_start >= backing.size
                if zero_below and not entry & (OFLAG_COMPRESSED | L2E_OFFSET_MASK):
                    zero_src = int(no_backing or (not self.ext_l2 and bool(entry & OFLAG_ZERO)))
            host = entry & L2E_OFFSET_MASK if inplace else -1
            plans.append([c, entry, bitmap, int(inplace), pad_s, pad_e, host, zero_src, 0])
        if fresh:
            if self.has_data_file:
                for p in plans:
                    if not p[3]:
                        p[6] = p[0] << cbits
            else:
                base, zero_from = await self.refcounts.alloc_data(fresh)
                for p in plans:
                    if not p[3]:
                        p[6] = base
                        p[8] = int(p[7] and base >= zero_from)
                        base += cs
        # Segments: runs of clusters contiguous in guest and host, padded at the ends only.
        seg_start = 0
        for i in range(1, len(plans) + 1):
            if i < len(plans):
                a, b = plans[i - 1], plans[i]
                if (b[6] == a[6] + cs and a[5] == (a[0] + 1) << cbits and b[4] == b[0] << cbits):
                    continue
            await self._write_segment(plans[seg_start:i], pos, data)
            seg_start = i
        for c, entry, bitmap, inplace, pad_s, pad_e, host, _zs, _kz in plans:
            c_start = c << cbits
            if self.ext_l2:
                if not inplace and entry & (OFLAG_COMPRESSED | L2E_OFFSET_MASK):
                    new_bitmap = BITMAP_ALL_ALLOC
                else:
                    mask = 0
                    for sc in range((pad_s - c_start) // self.sc_size,
                                    (pad_e - 1 - c_start) // self.sc_size + 1):
                        mask |= 1 << sc
                    new_bitmap = (bitmap | mask) & ~(mask << 32)
                if inplace and new_bitmap == bitmap:
                    continue
                await self.set_entry(c_start, host | OFLAG_COPIED, new_bitmap)
            elif inplace:
                continue
            else:
                await self.set_entry(c_start, host | OFLAG_COPIED)
            if not inplace:
                self.free_entry(entry)
        if len(self.refcounts.pending_frees) > 64:
            await self.refcounts.apply_frees()

    async def _write_segment(self, plans: list[list[int]], pos: int, data: memoryview) -> None:
        cbits = self.cbits
        end = pos + len(data)
        g_start, g_end = plans[0][4], plans[-1][5]
        host = plans[0][6] + (g_start - (plans[0][0] << cbits))
        d_start, d_end = max(g_start, pos), min(g_end, end)
        head = d_start - g_start
        tail = g_end - d_end
        body = data[d_start - pos:d_end - pos]
        if not self.has_data_file:
            self.check_overlap(host, g_end - g_start, None)
        # Padding of a new cluster that must read as zeroes where the file
        # already does (never written, past the old end) is not written, as
        # QEMU skips the copy-on-write of zeroes there.
        if head and plans[0][8]:
            host += head
            g_start, head = d_start, 0
        if tail and plans[-1][8]:
            g_end, tail = d_end, 0
        if head or tail:
            buf = bytearray(g_end - g_start)
            if head and not plans[0][7]:
                await self.read_into(g_start, memoryview(buf)[:head])
            if tail and not plans[-1][7]:
                await self.read_into(d_end, memoryview(buf)[len(buf) - tail:])
            buf[head:head + len(body)] = body
            out: bytes | bytearray | memoryview = buf
        else:
            out = body
        if self.crypto is not None:
            out = self.crypto.cipher.encrypt(self.crypto.sector(g_start, host), out)
        self.data_node.debug_event("write_aio")
        await self.data_node.write(host, out)

    # ----- compressed writes (the compress filter) ---------------------------
    def _compress(self, data: bytes) -> bytes | None:
        """The cluster compressed as the image's compression type, None when
        it would not fit in a cluster less one byte (QEMU then writes it
        uncompressed)."""
        if self.header.compression_type == COMPRESSION_ZSTD:
            import zstandard
            out = zstandard.ZstdCompressor().compress(data)
        else:
            obj = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
            out = obj.compress(data) + obj.flush()
        return out if len(out) <= self.cs - 1 else None

    async def write_compressed(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """QEMU's compressed write: whole clusters at cluster boundaries (a
        shorter last one only at the end of the image, zero padded), each
        into a cluster that is not allocated yet (EIO otherwise)."""
        self._check_writable()
        data = memoryview(data).cast("B")
        if self.has_data_file:
            raise OSError(errno.ENOTSUP, "Operation not supported")
        if offset % self.cs:
            raise OSError(errno.EINVAL, "Invalid argument")
        self._begin_write(offset, len(data))
        try:
            pos = 0
            while pos < len(data):
                chunk = bytes(data[pos:pos + self.cs])
                if len(chunk) < self.cs:
                    if offset + pos + len(chunk) != self.size:
                        raise OSError(errno.EINVAL, "Invalid argument")
                    chunk = chunk.ljust(self.cs, b"\0")
                await self._write_compressed_cluster(offset + pos, chunk,
                                                     min(self.cs, len(data) - pos))
                pos += self.cs
        finally:
            self._end_write(offset, len(data))

    async def _write_compressed_cluster(self, c_start: int, chunk: bytes, length: int) -> None:
        comp = await asyncio.to_thread(self._compress, chunk)
        async with self._range_lock(c_start, self.cs):
            await self._before_write()
            if comp is None:
                await self._write_locked(c_start, memoryview(chunk)[:length])
                return
            l1_index, idx = divmod(c_start >> self.cbits, self.l2_entries)
            l2_off = self._l2_offset(l1_index)
            entry, _ = self.entry_pair(await self.l2_cache.get(l2_off), idx) if l2_off \
                else (0, 0)
            if entry & (L2E_OFFSET_MASK | OFLAG_COMPRESSED):
                raise OSError(errno.EIO, "Input/output error")  # compression can't overwrite
            host = await self.refcounts.alloc_bytes(len(comp))
            self.check_overlap(host, len(comp), None)
            self.file_node.debug_event("write_compressed")
            await self.file_node.write(host, comp)
            nsect = ((host + len(comp) - 1) >> 9) - (host >> 9)
            await self.set_entry(c_start, OFLAG_COMPRESSED | nsect << self.csectors_shift | host)
            self._compressed_cache = None

    # ----- zeroes and discards --------------------------------------------
    async def drv_write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                           fua: bool = False, no_fallback: bool = False) -> None:
        self._check_writable()
        async with self._range_lock(offset, length):
            await self._before_write()
            await self._zero_locked(offset, length, may_unmap, no_fallback)
            self._compressed_cache = None
        if fua:
            await self.flush()

    async def _explicit_zeroes(self, offset: int, length: int, no_fallback: bool) -> None:
        if no_fallback:
            raise OSError(errno.ENOTSUP, "Operation not supported")
        zeroes = memoryview(bytes(min(length, _ZERO_CHUNK)))
        pos, end = offset, offset + length
        while pos < end:
            n = min(len(zeroes), end - pos)
            await self._write_locked(pos, zeroes[:n])
            pos += n

    async def _zero_locked(self, offset: int, length: int, may_unmap: bool,
                           no_fallback: bool) -> None:
        h = self.header
        raw_data = bool(h.autoclear & AUTOCLEAR_DATA_FILE_RAW)
        gran = self.sc_size if self.ext_l2 else self.cs
        if raw_data or (h.version < 3 and self.backing_node is not None):
            await self._explicit_zeroes(offset, length, no_fallback)
            return
        end = offset + length
        a_start = -(-offset // gran) * gran
        a_end = max(a_start, end // gran * gran)
        if a_start >= a_end:
            await self._explicit_zeroes(offset, length, no_fallback)
            return
        if offset < a_start:
            await self._explicit_zeroes(offset, a_start - offset, no_fallback)
        pos = a_start
        while pos < a_end:
            c_start = pos >> self.cbits << self.cbits
            stop = min(a_end, c_start + self.cs)
            if await self._zero_cluster(c_start, pos, stop, may_unmap):
                pos = stop
                continue
            await self._explicit_zeroes(pos, stop - pos, no_fallback)
            pos = stop
        if a_end < end:
            await self._explicit_zeroes(a_end, end - a_end, no_fallback)
        if len(self.refcounts.pending_frees) > 64:
            await self.refcounts.apply_frees()

    async def _zero_cluster(self, c_start: int, pos: int, stop: int, may_unmap: bool) -> bool:
        """Zero [pos, stop) of one cluster through metadata; False if not possible."""
        cluster = c_start >> self.cbits
        l1_index, idx = divmod(cluster, self.l2_entries)
        l2_off = self._l2_offset(l1_index)
        table = await self.l2_cache.get(l2_off) if l2_off else None
        entry, bitmap = self.entry_pair(table, idx) if table is not None else (0, 0)
        host = entry & L2E_OFFSET_MASK
        if self.ext_l2:
            mask = 0
            for sc in range((pos - c_start) // self.sc_size, (stop - 1 - c_start) // self.sc_size + 1):
                mask |= 1 << sc
            if entry & OFLAG_COMPRESSED:
                if mask != BITMAP_ALL_ALLOC:
                    return False
                await self.set_entry(c_start, 0, BITMAP_ALL_ZERO)
                self.free_entry(entry)
                return True
            new_bitmap = (bitmap & ~mask) | (mask << 32)
            if may_unmap and not new_bitmap & BITMAP_ALL_ALLOC and host:
                await self.set_entry(c_start, 0, new_bitmap)
                self.free_entry(entry)
                return True
            if not self._in_place(entry) and host:
                return False  # shared cluster with data left: COW by writing
            if new_bitmap != bitmap:
                await self.set_entry(c_start, entry, new_bitmap)
            return True
        if stop - pos < self.cs:
            return False
        if self.header.version < 3:
            if not host and not entry & OFLAG_COMPRESSED:
                return True  # unallocated, no backing: reads as zeroes already
            if not may_unmap:
                return False
            await self.set_entry(c_start, 0)
            self.free_entry(entry)
            return True
        if self._in_place(entry) and not may_unmap:
            await self.set_entry(c_start, entry | OFLAG_ZERO)
            return True
        await self.set_entry(c_start, OFLAG_ZERO)
        if host or entry & OFLAG_COMPRESSED:
            self.free_entry(entry)
        return True

    async def drv_discard(self, offset: int, length: int) -> None:
        if self.discard_mode != "unmap":
            return
        self._check_writable()
        start = -(-offset // self.cs) * self.cs
        end = (offset + length) // self.cs * self.cs
        if start >= end:
            return
        async with self._range_lock(start, end - start):
            await self._before_write()
            self._compressed_cache = None
            for c_start in range(start, end, self.cs):
                cluster = c_start >> self.cbits
                l1_index, idx = divmod(cluster, self.l2_entries)
                l2_off = self._l2_offset(l1_index)
                if not l2_off and self.backing_node is None:
                    continue
                table = await self.l2_cache.get(l2_off) if l2_off else None
                entry, bitmap = self.entry_pair(table, idx) if table is not None else (0, 0)
                allocated = bool(entry & (L2E_OFFSET_MASK | OFLAG_COMPRESSED)) or bool(
                    bitmap & BITMAP_ALL_ALLOC)
                if not allocated and self.backing_node is None:
                    continue
                if self.ext_l2:
                    await self.set_entry(c_start, 0, BITMAP_ALL_ZERO)
                else:
                    await self.set_entry(c_start, OFLAG_ZERO if self.header.version >= 3 else 0)
                self.free_entry(entry)
            await self.refcounts.apply_frees()

    # ----- flush / resize --------------------------------------------------
    async def _flush_metadata(self) -> None:
        await self.refcounts.apply_frees()
        await self.write_back_metadata()

    async def flush(self) -> None:
        if self._writable:
            async with self._lock:
                await self._flush_metadata()
        await super().flush()

    async def drv_truncate(self, size: int, exact: bool = False, prealloc: str = "off") -> None:
        """Grow or shrink as QEMU's qcow2_co_truncate: shrinking drops the
        clusters past the new end (their L2 entries, then L2 tables no longer
        reached, then the file's unused tail); growing makes room in the L1
        table and preallocates the new part when asked."""
        if prealloc not in ("off", "metadata", "falloc", "full"):
            raise GenericError(f"Unsupported preallocation mode '{prealloc}'")
        if size % 512:
            raise GenericError("The new size must be a multiple of 512")
        self._check_writable()
        h = self.header
        async with self._range_lock():
            await self.wait_overwrites()
            if h.nb_snapshots and h.version < 3:
                raise GenericError("Can't resize a v2 image which has snapshots")
            self._truncate_bitmaps_check()
            old = h.size
            if size < old:
                if prealloc != "off":
                    raise GenericError("Preallocation can't be used for shrinking an image")
                await self._shrink(size)
            else:
                needed = h.l1_entries_needed(size)
                if needed > len(self.l1):
                    await self.refcounts.apply_frees()
                    await self.write_back_metadata()
                    try:
                        await self.grow_l1(needed)
                    except OSError as e:
                        raise GenericError("Failed to grow the L1 table: "
                                           f"{os.strerror(e.errno or errno.EIO)}") from None
            self.size = h.size = size
            if prealloc == "off":
                if self.has_data_file and (exact or h.autoclear & AUTOCLEAR_DATA_FILE_RAW):
                    await self.data_node.truncate(size, exact, prealloc)
            elif size > old:
                if self.has_data_file:
                    await self.data_node.truncate(
                        size, exact, "off" if prealloc == "metadata" else prealloc)
                await preallocate(self, prealloc, self.has_data_file,
                                  self.backing_node is not None, start=-(-old // self.cs) * self.cs)
                await self._flush_metadata()
            await self.write_header()
            await self.file_node.flush()

    def _truncate_bitmaps_check(self) -> None:
        """QEMU refuses to resize while a stored bitmap cannot follow."""
        for sb in self.bitmap_store.stored:
            bm = next((b for b in self.dirty_bitmaps if b.name == sb.name), None)
            if bm is None:
                raise GenericError("Cannot resize qcow2 with persistent bitmaps that were not "
                                   "loaded into memory")
            if bm.busy:
                raise GenericError(f"Bitmap '{bm.name}' is currently in use by another "
                                   "operation and cannot be used")
            if bm.readonly:
                raise GenericError(f"Bitmap '{bm.name}' is readonly and cannot be modified")
            if bm.inconsistent:
                raise GenericError(f"Bitmap '{bm.name}' is inconsistent and cannot be used")

    async def _shrink(self, size: int) -> None:
        cs = self.cs
        start = -(-size // cs) * cs
        pos = start
        end = self.header.size
        while pos < end:  # drop the entries past the end, one L2 table at a time
            stop = self._span_end(pos, end)
            l1_index = pos >> self.cbits
            l1_index //= self.l2_entries
            if self._l2_offset(l1_index):
                for c_start in range(pos, stop, cs):
                    cluster = c_start >> self.cbits
                    table = await self.l2_cache.get(self._l2_offset(l1_index))
                    entry, bitmap = self.entry_pair(table, cluster % self.l2_entries)
                    if entry or bitmap:
                        await self.set_entry(c_start, 0, 0)
                        self.free_entry(entry)
            pos = stop
        await self.refcounts.apply_frees()
        await self.write_back_metadata()
        # L2 tables that now map nothing but the cropped part go away.
        first_unused = self.header.l1_entries_needed(size)
        for i in range(first_unused, len(self.l1)):
            off = self._l2_offset(i)
            if off:
                await self.set_l1(i, 0)
                self.l2_cache.discard(off)
                self.remove_metadata(off, cs)
                self.refcounts.free(off, 1)
        await self.file_node.flush()
        await self.refcounts.apply_frees()
        await self.write_back_metadata()
        await self.file_node.flush()
        # The file keeps nothing past its last used cluster.
        last = -(-self.file_end() // cs) - 1
        while last >= 0 and not await self.refcounts.get(last):
            last -= 1
        if (last + 1) * cs < self.file_end():
            try:
                await self.file_node.truncate((last + 1) * cs)
            except QMPError as e:
                os.write(2, "qemu-storage-daemon: warning: Failed to truncate the tail of the "
                            f"image: {e.desc}\n".encode())
            self.refcounts.zero_from = min(self.refcounts.zero_from, last + 1)

    # ----- block status ----------------------------------------------------
    async def block_status(self, offset: int, length: int) -> list[Extent]:
        runs = await self.map_range(offset, min(length, STATUS_MAX))
        extents: list[Extent] = []
        for r in runs:
            if r.kind is Kind.NORMAL:
                # Encrypted data must pass through the cipher: no host fd.
                m = None if self.crypto else self.data_node.host_extent(r.host, r.length)
                fd, host_off = m if m is not None else (-1, 0)
                extents.append(Extent(r.offset, r.length, True, False, 1, fd, host_off))
            elif r.kind is Kind.COMPRESSED:
                extents.append(Extent(r.offset, r.length, True, False, 1))
            elif r.kind is Kind.ZERO:
                extents.append(Extent(r.offset, r.length, False, True, 1))
            else:
                backing = self.backing_node
                if backing is None:
                    extents.append(Extent(r.offset, r.length, False, True, 0))
                    continue
                if r.offset >= backing.size:
                    # Zeroes past a short backing file count as allocated
                    # there (QEMU's block_status_above).
                    extents.append(Extent(r.offset, r.length, False, True, 2))
                    continue
                sub = await backing.block_status(r.offset, min(r.length,
                                                                backing.size - r.offset))
                for e in sub:
                    e.depth = e.depth + 1 if e.depth else 0
                extents.extend(sub)
                covered = sub[-1].offset + sub[-1].length
                if covered < r.offset + r.length:
                    if covered >= backing.size:
                        extents.append(Extent(covered, r.offset + r.length - covered,
                                              False, True, 2))
                    else:
                        break
        return extents

    def host_extent(self, offset: int, length: int) -> tuple[int, int] | None:
        if self.crypto is not None:
            return None
        host = self.peek_host(offset, length)
        if host is None:
            return None
        return self.data_node.host_extent(host, length)

    # ----- introspection -----------------------------------------------------
    @property
    def filename(self) -> str:
        """An encrypted image is spelt out as ``json:``, since its
        ``encrypt.key-secret`` is needed to open it again (as QEMU does)."""
        if self.crypto is None:
            return super().filename
        return "json:" + json.dumps(self.json_options())

    def json_options(self) -> dict[str, Any]:
        """The options QEMU shows for this node inside a ``json:`` filename."""
        child = self.file_node
        child_json = getattr(child, "json_options", None)
        inner = child_json() if child_json else dict(qemu_items(
            {"driver": child.driver, "filename": child.filename}))
        opts: dict[str, Any] = {"driver": self.driver, "file": inner}
        if self.crypto is not None:
            opts["encrypt.key-secret"] = self.crypto.key_secret
        return dict(qemu_items(opts))

    def cluster_size(self) -> int | None:
        return self.header.cluster_size

    def dirty_flag(self) -> bool:
        return bool(self.header.incompatible & INCOMPAT_DIRTY)

    def format_specific(self) -> dict[str, Any] | None:
        h = self.header
        data: dict[str, Any] = {"compat": "1.1" if h.version >= 3 else "0.10"}
        if h.version >= 3:
            if self.has_data_file:
                data["data-file"] = h.data_file or ""
                if not h.data_file:
                    del data["data-file"]
                data["data-file-raw"] = bool(h.autoclear & AUTOCLEAR_DATA_FILE_RAW)
            data["extended-l2"] = h.extended_l2
            data["lazy-refcounts"] = bool(h.compatible & COMPAT_LAZY_REFCOUNTS)
            data["corrupt"] = bool(h.incompatible & INCOMPAT_CORRUPT)
        data["refcount-bits"] = h.refcount_bits
        if self.crypto is not None:
            data["encrypt"] = self.crypto.info()
        if h.version >= 3 and self.bitmap_store.stored:
            data["bitmaps"] = [sb.info() for sb in self.bitmap_store.stored]
        data["compression-type"] = COMPRESSION_NAMES[h.compression_type]
        return {"type": "qcow2", "data": data}

    # ----- persistent dirty bitmaps (see .bitmaps) ----------------------------
    def bitmap_check_persistent(self, name: str, granularity: int) -> None:
        """QEMU's qcow2 test whether a new persistent bitmap can be stored."""
        reason: str | None
        if any(bm.name == name for bm in self.dirty_bitmaps):
            reason = f"Bitmap already exists: {name}"
        elif self.header.version < 3:
            reason = "Cannot store dirty bitmaps in qcow2 v2 files"
        else:
            reason = check_constraints(self, name, granularity)
            if reason is None:
                names = [bm.name or "" for bm in self.dirty_bitmaps if bm.persistent] + [name]
                size = sum(8 * (-(-(24 + len(n.encode())) // 8)) for n in names)
                if len(names) > 65535:
                    reason = "Maximum number of persistent bitmaps is already reached"
                elif size > 1024 * 65535:
                    reason = "Not enough space in the bitmap directory"
        if reason is not None:
            raise GenericError(f"Can't make bitmap '{name}' persistent in "
                               f"'{self.node_name}': {reason}")

    async def bitmap_remove_persistent(self, name: str) -> None:
        if not self.bitmap_store.stored:
            return
        self._check_writable()
        async with self._lock:
            try:
                await self.bitmap_store.remove(name)
            except OSError as e:
                raise GenericError("Failed to update bitmap extension: "
                                   f"{os.strerror(e.errno or errno.EIO)}") from None

    # ----- x-blockdev-amend --------------------------------------------------
    async def amend(self, options: dict[str, Any], force: bool) -> None:
        """QEMU 7.2's qcow2 amend: LUKS key slots of an encrypted image."""
        encrypt = options.get("encrypt")
        if encrypt is None:
            return
        if self.crypto is None:
            raise GenericError("image is not encrypted, can't amend")
        if encrypt["format"] != "luks":
            raise GenericError("Amend can't be used to change the qcow2 encryption format")
        if self.header.crypt_method != CRYPT_LUKS or self.header.crypto_header is None:
            raise GenericError("Only LUKS encryption options can be amended for qcow2 with "
                               "blockdev-amend")
        from qsd.jobs.amend import amend_luks
        base, length = self.header.crypto_header

        async def read(offset: int, n: int) -> bytearray:
            if offset + n > length:
                raise GenericError("Request for data outside of extension header")
            return await self.read_file(base + offset, n)

        async def write(offset: int, data: bytes) -> None:
            if offset + len(data) > length:
                raise GenericError("Request for data outside of extension header")
            await self.write_meta(base + offset, data, "encryption header")

        self._check_writable()
        assert isinstance(self.crypto.cipher, LuksVolume)
        await amend_luks(self.crypto.cipher, read, write, encrypt, force, self.graph.objects,
                         self.crypto.key_secret)
        await self.file_node.flush()

    # ----- internal snapshots (see .snapshot) --------------------------------
    def snapshots(self) -> list[dict[str, Any]] | None:
        return [sn.info() for sn in self.snapshot_list] or None

    async def snapshot_create(self, name: str) -> snapshot.Snapshot:
        self._check_writable()
        async with self._range_lock():
            await self.wait_overwrites()
            return await snapshot.create(self, name)

    async def snapshot_delete(self, ident: str | None, name: str | None) -> snapshot.Snapshot:
        self._check_writable()
        async with self._lock:
            return await snapshot.delete(self, ident, name)

    # ----- creation ----------------------------------------------------------
    @classmethod
    async def create(cls, ctx: "CreateContext", options: dict[str, Any]) -> None:
        """blockdev-create (see :mod:`.create`)."""
        await create_image(ctx, options)


#: overlap-check flags and the metadata kinds (names in messages) they cover.
OVERLAP_FLAGS = {
    "main-header": "qcow2_header", "active-l1": "active L1 table",
    "active-l2": "active L2 table", "refcount-table": "refcount table",
    "refcount-block": "refcount block", "snapshot-table": "snapshot table",
    "inactive-l1": "inactive L1 table", "inactive-l2": "inactive L2 table",
    "bitmap-directory": "bitmap directory",
}
_CONSTANT = {"main-header", "active-l1", "refcount-table", "snapshot-table"}
_CACHED = _CONSTANT | {"active-l2", "refcount-block", "bitmap-directory", "inactive-l1"}
OVERLAP_TEMPLATES = {"none": set(), "constant": _CONSTANT, "cached": _CACHED,
                     "all": _CACHED | {"inactive-l2"}}


def _overlap_unchecked(option: Any) -> frozenset[str]:
    """The metadata kinds an ``overlap-check`` option (a template name or
    flags on a template, default cached) leaves unchecked."""
    if option is None or isinstance(option, str):
        enabled = set(OVERLAP_TEMPLATES[option or "cached"])
    else:
        enabled = set(OVERLAP_TEMPLATES[option.get("template", "cached")])
        for flag in OVERLAP_FLAGS:
            if flag in option:
                (enabled.add if option[flag] else enabled.discard)(flag)
    return frozenset(OVERLAP_FLAGS[f] for f in OVERLAP_FLAGS if f not in enabled)


def _probe(path: str) -> str:
    """Format of a backing file the image names without a format."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError:
        return "raw"  # the open itself reports the error
    return "qcow2" if magic == MAGIC else "raw"


def _zstd_decompress(raw: bytes, size: int) -> bytes:
    """Decompress zstd frames until ``size`` bytes came out (trailing bytes
    of the last sector are ignored, as the specification allows)."""
    import zstandard
    out = bytearray()
    dctx = zstandard.ZstdDecompressor()
    data = raw
    while len(out) < size and data:
        obj = dctx.decompressobj()
        try:
            out += obj.decompress(data)
        except zstandard.ZstdError as e:
            raise ValueError(str(e)) from None
        data = obj.unused_data
        if not obj.eof:
            break
    return bytes(out[:size])

