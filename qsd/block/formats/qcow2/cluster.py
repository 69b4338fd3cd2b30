# SPDX-License-Identifier: GPL-2.0-or-later
"""Guest-to-host cluster mapping: L1 table, L2 tables, cluster allocation.

:class:`ClusterMap` is the part of the qcow2 node that turns guest ranges
into runs (:class:`Run`) of one kind each, and that allocates clusters and
updates L2 entries for writes. L2 tables live in the write-back cache of
:mod:`.cache`; a new or copied L2 table is written before the L1 entry that
points to it, after the refcount of its cluster.
"""

from __future__ import annotations

import enum
import errno
import struct
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qsd.block.formats.qcow2.cache import TableCache, decode_l2, encode_l2
from qsd.block.formats.qcow2.refcount import corrupt

if TYPE_CHECKING:
    from qsd.block.formats.qcow2.driver import Qcow2Node

OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
SUBCLUSTERS = 32
BITMAP_ALL_ALLOC = (1 << 32) - 1
BITMAP_ALL_ZERO = BITMAP_ALL_ALLOC << 32


class Kind(enum.Enum):
    UNALLOCATED = 0
    ZERO = 1
    NORMAL = 2
    COMPRESSED = 3


@dataclass(slots=True)
class Run:
    """``length`` guest bytes at ``offset`` of one kind. ``host`` is the host
    offset of ``offset`` (NORMAL) or the raw L2 entry (COMPRESSED)."""

    kind: Kind
    offset: int
    length: int
    host: int = 0


class ClusterMap:
    """L1/L2 state and lookups of a qcow2 node (mixed into the node)."""

    img: "Qcow2Node"

    def init_map(self, l2_cache_entries: int) -> None:
        img = self.img
        h = img.header
        self.cs = h.cluster_size
        self.cbits = h.cluster_bits
        self.ext_l2 = h.extended_l2
        self.l2_entry_words = 2 if self.ext_l2 else 1
        self.l2_entries = self.cs // (8 * self.l2_entry_words)
        self.sc_size = self.cs // SUBCLUSTERS if self.ext_l2 else self.cs
        self.l1: list[int] = []
        self.l2_cache: TableCache[array] = TableCache(
            l2_cache_entries, self._load_l2, self._store_l2, decode_l2, encode_l2)
        self.l2_cache.before_write = lambda off: img.check_overlap(off, self.cs, "active L2 table")
        self.compressed_mask = (1 << (62 - (self.cbits - 8))) - 1
        self.csectors_shift = 62 - (self.cbits - 8)
        self.csectors_mask = (1 << (self.cbits - 8)) - 1

    async def load_l1(self) -> None:
        h = self.img.header
        raw = await self.img.read_file(h.l1_table_offset, h.l1_size * 8) if h.l1_size else b""
        self.l1 = list(struct.unpack(f">{h.l1_size}Q", raw))
        for i, e in enumerate(self.l1):
            off = e & L1E_OFFSET_MASK
            if off:
                self.img.add_metadata(off, self.cs, "active L2 table")

    async def _load_l2(self, offset: int) -> bytes:
        return bytes(await self.img.read_file(offset, self.cs))

    async def _store_l2(self, offset: int, data: bytes) -> None:
        await self.img.file_node.write(offset, data)

    def _l2_offset(self, l1_index: int) -> int:
        if l1_index >= len(self.l1):
            return 0
        off = self.l1[l1_index] & L1E_OFFSET_MASK
        if off and (off % self.cs or off + self.cs > self.img.file_end()):
            raise corrupt(f"L2 table offset {off:#x} invalid (L1 index: {l1_index:#x})")
        return off

    # ----- lookups --------------------------------------------------------
    def _classify(self, entry: int, bitmap: int, sc: int, l2_off: int, idx: int) -> Kind:
        if entry & OFLAG_COMPRESSED:
            if self.img.data_node is not self.img.file_node:
                raise corrupt("Compressed cluster in an image with an external data file")
            return Kind.COMPRESSED
        if self.ext_l2:
            alloc = bitmap >> sc & 1
            zero = bitmap >> (32 + sc) & 1
            if alloc and zero:
                raise corrupt(f"Subcluster both allocated and zero (L2 offset: {l2_off:#x}, "
                              f"L2 index: {idx:#x})")
            kind = Kind.NORMAL if alloc else Kind.ZERO if zero else Kind.UNALLOCATED
        elif entry & OFLAG_ZERO:
            if self.img.header.version < 3:
                raise corrupt("Zero cluster in a version 2 image")
            return Kind.ZERO
        elif entry & L2E_OFFSET_MASK or (entry & OFLAG_COPIED and self.img.has_data_file):
            kind = Kind.NORMAL
        else:
            return Kind.UNALLOCATED
        if kind is Kind.NORMAL:
            host = entry & L2E_OFFSET_MASK
            if host % self.cs:
                raise corrupt(f"Cluster allocation offset {host:#x} unaligned "
                              f"(L2 offset: {l2_off:#x}, L2 index: {idx:#x})")
            if not self.img.has_data_file and host == 0:
                raise corrupt(f"Cluster at offset 0 (L2 offset: {l2_off:#x}, L2 index: {idx:#x})")
        return kind

    def entry_pair(self, table: array, idx: int) -> tuple[int, int]:
        if self.ext_l2:
            return table[2 * idx], table[2 * idx + 1]
        return table[idx], 0

    async def map_range(self, offset: int, length: int) -> list[Run]:
        """Runs covering [offset, offset+length), within one L2 table at most
        (the caller loops); adjacent runs of one kind are merged."""
        runs: list[Run] = []
        end = offset + length
        cluster = offset >> self.cbits
        l1_index, idx = divmod(cluster, self.l2_entries)
        l2_off = self._l2_offset(l1_index)
        table = await self.l2_cache.get(l2_off) if l2_off else None
        pos = offset
        while pos < end and idx < self.l2_entries:
            c_start = (cluster << self.cbits)
            c_end = min(end, c_start + self.cs)
            entry, bitmap = self.entry_pair(table, idx) if table is not None else (0, 0)
            while pos < c_end:
                sc = (pos - c_start) // self.sc_size
                stop = min(c_end, c_start + (sc + 1) * self.sc_size)
                kind = self._classify(entry, bitmap, sc, l2_off, idx)
                if kind is Kind.COMPRESSED:
                    stop = c_end
                    host = entry
                elif kind is Kind.NORMAL:
                    host = (entry & L2E_OFFSET_MASK) + (pos - c_start)
                else:
                    host = 0
                last = runs[-1] if runs else None
                if (last is not None and last.kind is kind and kind is not Kind.COMPRESSED
                        and (kind is not Kind.NORMAL or last.host + last.length == host)):
                    last.length += stop - pos
                else:
                    runs.append(Run(kind, pos, stop - pos, host))
                pos = stop
            cluster += 1
            idx += 1
        return runs

    def peek_host(self, offset: int, length: int) -> int | None:
        """Host offset of a guest range that is one contiguous NORMAL run in
        cached L2 tables (no I/O), else None: the export's fast path."""
        cluster = offset >> self.cbits
        last = (offset + length - 1) >> self.cbits
        l1_index, idx = divmod(cluster, self.l2_entries)
        if l1_index >= len(self.l1) or last // self.l2_entries != l1_index:
            return None
        l2_off = self.l1[l1_index] & L1E_OFFSET_MASK
        table = self.l2_cache.peek(l2_off) if l2_off else None
        if table is None:
            return None
        host_start = -1
        for i, c in enumerate(range(cluster, last + 1)):
            entry, bitmap = self.entry_pair(table, idx + i)
            if entry & (OFLAG_COMPRESSED | OFLAG_ZERO) and not self.ext_l2:
                return None
            host = entry & L2E_OFFSET_MASK
            if entry & OFLAG_COMPRESSED or (not host and not self.img.has_data_file) \
                    or host % self.cs:
                return None
            if self.ext_l2 and bitmap & BITMAP_ALL_ALLOC != BITMAP_ALL_ALLOC:
                return None
            if not self.ext_l2 and not host and not entry & OFLAG_COPIED:
                return None
            if i == 0:
                host_start = host
            elif host != host_start + i * self.cs:
                return None
        return host_start + (offset & (self.cs - 1))

    # ----- L2 tables for writing ---------------------------------------------
    async def l2_for_write(self, l1_index: int) -> tuple[int, array]:
        """The L2 table of ``l1_index``, allocated or copied (when shared with
        a snapshot) so that it may be modified in place."""
        img = self.img
        if l1_index >= len(self.l1):
            raise OSError(errno.EINVAL, "Guest offset beyond the L1 table")
        l1e = self.l1[l1_index]
        old = self._l2_offset(l1_index)
        if old and l1e & OFLAG_COPIED:
            return old, await self.l2_cache.get(old)
        if old:
            table = array("Q", await self.l2_cache.get(old))
        else:
            table = array("Q", bytes(self.cs))
        new = await img.refcounts.alloc(1)
        img.add_metadata(new, self.cs, "active L2 table")
        await img.refcounts.cache.flush()
        img.check_overlap(new, self.cs, "active L2 table")
        await img.file_node.write(new, encode_l2(table))
        await self.l2_cache.put_new(new, table)
        self.l2_cache.dirty.discard(new)
        await self.set_l1(l1_index, new | OFLAG_COPIED)
        if old:
            self.l2_cache.discard(old)
            img.remove_metadata(old, self.cs)
            img.refcounts.free(old, 1)
        return new, table

    async def set_l1(self, l1_index: int, value: int) -> None:
        self.l1[l1_index] = value
        h = self.img.header
        await self.img.write_meta(h.l1_table_offset + 8 * l1_index, struct.pack(">Q", value),
                                  "active L1 table")

    async def set_entry(self, guest: int, entry: int, bitmap: int = 0) -> tuple[int, int]:
        """Set the L2 entry of ``guest``'s cluster; returns the old (entry, bitmap)."""
        cluster = guest >> self.cbits
        l1_index, idx = divmod(cluster, self.l2_entries)
        l2_off, table = await self.l2_for_write(l1_index)
        old = self.entry_pair(table, idx)
        if self.ext_l2:
            table[2 * idx] = entry
            table[2 * idx + 1] = bitmap
        else:
            table[idx] = entry
        self.l2_cache.mark_dirty(l2_off)
        return old

    def free_entry(self, entry: int) -> None:
        """Queue the host clusters an old L2 entry referenced for freeing."""
        img = self.img
        if entry & OFLAG_COMPRESSED:
            host = entry & self.compressed_mask
            nsect = (entry >> self.csectors_shift & self.csectors_mask) + 1
            end = (host & ~511) + nsect * 512
            first = host >> self.cbits
            last = (end - 1) >> self.cbits
            img.refcounts.free(first << self.cbits, last - first + 1)
            return
        host = entry & L2E_OFFSET_MASK
        if host and not img.has_data_file:
            img.refcounts.free(host, 1)

    # ----- L1 growth --------------------------------------------------------
    async def grow_l1(self, entries: int) -> None:
        """Move the L1 table to a place with room for ``entries`` entries."""
        img = self.img
        h = img.header
        if entries <= len(self.l1):
            return
        nbytes = entries * 8
        clusters = -(-nbytes // self.cs)
        new = await img.refcounts.alloc(clusters)
        table = self.l1 + [0] * (entries - len(self.l1))
        await img.refcounts.cache.flush()
        img.check_overlap(new, clusters * self.cs, "active L1 table")
        await img.file_node.write(new, struct.pack(f">{entries}Q", *table))
        await img.file_node.flush()
        old_off, old_size = h.l1_table_offset, h.l1_size
        img.add_metadata(new, clusters * self.cs, "active L1 table")
        self.l1 = table
        h.l1_table_offset, h.l1_size = new, entries
        await img.write_header()
        if old_size:
            old_clusters = -(-old_size * 8 // self.cs)
            img.remove_metadata(old_off, old_clusters * self.cs)
            img.refcounts.free(old_off, old_clusters)
