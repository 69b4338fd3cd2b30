# SPDX-License-Identifier: GPL-2.0-or-later
"""qcow2 reference counts: the refcount table, refcount blocks, allocation.

Ordering (qcow2.txt "Host cluster management" plus crash safety):

* an increment reaches the disk before anything that references the
  cluster (the L2 cache depends on the refcount cache; new refcount blocks
  are written before the table entry that points to them);
* a decrement is only applied once the metadata that dropped the reference
  is on disk (frees are queued and applied by :meth:`Refcounts.apply_frees`),
  so a crash at any point leaks clusters but never frees a used one.
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING

from qsd.block.formats.qcow2.cache import TableCache, decode_block, encode_block
from qsd.block.formats.qcow2.header import MAX_HOST_OFFSET, MAX_REFTABLE_BYTES

if TYPE_CHECKING:
    from qsd.block.formats.qcow2.driver import Qcow2Node

REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
#: Queued frees beyond this many clusters are applied right away.
FREE_BATCH = 4096


def corrupt(msg: str) -> OSError:
    return OSError(errno.EIO, msg)


class Refcounts:
    """Refcount table in memory, refcount blocks in a write-back cache."""

    def __init__(self, img: "Qcow2Node", cache_entries: int) -> None:
        self.img = img
        h = img.header
        self.cs = h.cluster_size
        self.cbits = h.cluster_bits
        self.bits = h.refcount_bits
        self.max_value = (1 << self.bits) - 1
        self.per_block = self.cs * 8 // self.bits
        self.table: list[int] = []
        self.cache: TableCache[bytearray] = TableCache(
            cache_entries, self._load_block, self._store_block, decode_block, encode_block)
        self.cache.before_write = lambda off: img.check_overlap(off, self.cs, "refcount block")
        #: No free cluster lies below this index.
        self.free_hint = 0
        self.pending_frees: list[tuple[int, int]] = []
        #: Runs handed out by find_free whose refcounts are not set yet.
        self.reserved: list[tuple[int, int]] = []
        #: Clusters from this index on were never handed out since open and
        #: lay past the end of the file then: they still read as zeroes, so
        #: a new data cluster there needs no zero padding written.
        self.zero_from = -(-img.file_end() // self.cs)
        #: Where the next compressed cluster may go: the byte after the last
        #: one, inside a host cluster that compressed data already uses
        #: (0: none; reset once that cluster loses a reference).
        self.pack_next = 0

    async def load(self) -> None:
        h = self.img.header
        raw = await self.img.read_file(h.refcount_table_offset, h.refcount_table_clusters * self.cs)
        self.table = [e & REFT_OFFSET_MASK for e in struct.unpack(f">{len(raw) // 8}Q", raw)]

    async def _load_block(self, offset: int) -> bytes:
        return bytes(await self.img.read_file(offset, self.cs))

    async def _store_block(self, offset: int, data: bytes) -> None:
        await self.img.file_node.write(offset, data)

    # ----- entries ------------------------------------------------------
    def _get(self, block: bytearray, i: int) -> int:
        bits = self.bits
        if bits >= 8:
            n = bits >> 3
            return int.from_bytes(block[i * n:(i + 1) * n], "big")
        per = 8 // bits
        return (block[i // per] >> ((i % per) * bits)) & self.max_value

    def _set(self, block: bytearray, i: int, value: int) -> None:
        bits = self.bits
        if bits >= 8:
            n = bits >> 3
            block[i * n:(i + 1) * n] = value.to_bytes(n, "big")
            return
        per = 8 // bits
        shift = (i % per) * bits
        b = block[i // per] & ~(self.max_value << shift)
        block[i // per] = b | (value << shift)

    def _block_offset(self, bi: int) -> int:
        """The refcount block's offset, 0 when absent; EIO when insane."""
        if bi >= len(self.table):
            return 0
        off = self.table[bi]
        if off and (off % self.cs or off >= MAX_HOST_OFFSET
                    or off + self.cs > self.img.file_end()):
            raise corrupt(f"Refblock offset {off:#x} invalid (reftable index: {bi:#x})")
        return off

    async def get(self, cluster: int) -> int:
        """The refcount of host cluster ``cluster`` (an index)."""
        off = self._block_offset(cluster // self.per_block)
        if not off:
            return 0
        return self._get(await self.cache.get(off), cluster % self.per_block)

    # ----- updates ------------------------------------------------------
    async def update(self, offset: int, count: int, delta: int) -> None:
        """Add ``delta`` to the refcounts of ``count`` clusters at ``offset``."""
        first = offset >> self.cbits
        for c in range(first, first + count):
            bi, i = divmod(c, self.per_block)
            off = self._block_offset(bi)
            if not off:
                if delta < 0:
                    raise corrupt(f"Refcount of cluster {c:#x} would drop below zero")
                off = await self._new_block(bi)
            block = await self.cache.get(off)
            value = self._get(block, i) + delta
            if value < 0 or value > self.max_value:
                raise corrupt(f"Refcount of cluster {c:#x} out of range ({value})")
            self._set(block, i, value)
            self.cache.mark_dirty(off)
            if delta < 0 and c == self.pack_next >> self.cbits:
                self.pack_next = 0
            if value == 0 and c < self.free_hint:
                self.free_hint = c

    async def alloc(self, count: int) -> int:
        """Allocate ``count`` contiguous clusters; returns the host offset."""
        return (await self.alloc_data(count))[0]

    async def alloc_data(self, count: int) -> tuple[int, int]:
        """Allocate like :meth:`alloc`; also returns the host offset from
        which the run is known to read as zeroes (never written before)."""
        old_zero_from = self.zero_from
        start = await self.find_free(count)
        try:
            await self.update(start << self.cbits, count, 1)
        finally:
            self.reserved.remove((start, start + count))
        return start << self.cbits, max(start, old_zero_from) << self.cbits

    async def alloc_bytes(self, length: int) -> int:
        """Host bytes for one compressed cluster: packed behind the previous
        one when they fit in its host cluster (whose refcount then counts one
        more user, as every compressed cluster touching a host cluster
        references it), else at the start of newly allocated clusters."""
        cs = self.cs
        nxt = self.pack_next
        if nxt % cs and nxt % cs + length <= cs:
            await self.update(nxt, 1, 1)
            off = nxt
        else:
            off = await self.alloc(-(-length // cs))
        self.pack_next = off + length
        return off

    def free(self, offset: int, count: int) -> None:
        """Queue a decrement, applied once the dropping metadata is on disk."""
        self.pending_frees.append((offset, count))

    async def apply_frees(self) -> None:
        """Flush L2 tables (the references), then apply the queued decrements."""
        if not self.pending_frees:
            return
        await self.img.wait_overwrites()  # none may still target a freed cluster
        await self.img.write_back_metadata()
        frees, self.pending_frees = self.pending_frees, []
        for offset, count in frees:
            await self.update(offset, count, -1)
        if self.img.discard_mode == "unmap":
            await self.img.discard_host(frees, "pass-discard-request")

    def _reserved_end(self, c: int) -> int | None:
        for start, end in self.reserved:
            if start <= c < end:
                return end
        return None

    async def _conflict(self, c: int, count: int) -> int | None:
        """The first cluster of [c, c+count) that is used or reserved, where
        ``c`` itself is known to have refcount 0."""
        for x in range(c, c + count):
            if (self.reserved and self._reserved_end(x) is not None) or (
                    x > c and await self.get(x)):
                return x
        return None

    async def find_free(self, count: int) -> int:
        """Index of the first run of ``count`` free clusters, reserved until
        the caller releases it (its refcount is still 0 meanwhile)."""
        # Nothing below the first free cluster is free: the hint moves there.
        c = self.free_hint = await self._next_free(self.free_hint)
        while True:
            bad = await self._conflict(c, count)
            if bad is None:
                break
            c = await self._next_free(bad + 1)
        if c == self.free_hint:
            self.free_hint = c + count
        self.reserved.append((c, c + count))
        self.zero_from = max(self.zero_from, c + count)
        return c

    async def _next_free(self, c: int) -> int:
        """The first cluster index >= ``c`` with refcount 0."""
        while True:
            bi, i = divmod(c, self.per_block)
            off = self._block_offset(bi)
            if not off:
                return c
            block = await self.cache.get(off)
            j = self._find_zero(block, i)
            if j is not None:
                return bi * self.per_block + j
            c = (bi + 1) * self.per_block

    def _find_zero(self, block: bytearray, start: int) -> int | None:
        bits = self.bits
        if bits >= 8:
            n = bits >> 3
            pattern = bytes(n)
            pos = start * n
            while True:
                pos = block.find(pattern, pos)
                if pos < 0:
                    return None
                if pos % n == 0:
                    return pos // n
                pos += n - pos % n
        for i in range(start, self.per_block):
            if self._get(block, i) == 0:
                return i
        return None

    async def _new_block(self, bi: int) -> int:
        """Allocate refcount block ``bi``: written before the table entry."""
        if bi >= len(self.table):
            await self._grow_table(bi)
            off = self._block_offset(bi)
            if off:
                return off
        c = await self.find_free(1)
        try:
            block = bytearray(self.cs)
            if c // self.per_block == bi:
                self._set(block, c % self.per_block, 1)
            else:
                await self.update(c << self.cbits, 1, 1)
        finally:
            self.reserved.remove((c, c + 1))
        offset = c << self.cbits
        self.img.add_metadata(offset, self.cs, "refcount block")
        await self.cache.flush()
        self.img.check_overlap(offset, self.cs, "refcount block")
        await self.img.file_node.write(offset, block)
        await self.cache.put_new(offset, block)
        self.cache.dirty.discard(offset)
        self.table[bi] = offset
        h = self.img.header
        await self.img.write_meta(h.refcount_table_offset + bi * 8, struct.pack(">Q", offset),
                                  "refcount table")
        return offset

    async def _grow_table(self, need: int) -> None:
        """Move the refcount table to a bigger place that covers block ``need``.

        The new table, and new refcount blocks for the clusters it and they
        occupy, go into one free run; all are written before the header
        points to the new table, and the old table is freed afterwards.
        """
        cs, per = self.cs, self.per_block
        entries = max(need + 1, len(self.table) * 3 // 2)
        while True:
            t_clusters = -(-entries * 8 // cs)
            if t_clusters * cs > MAX_REFTABLE_BYTES:
                raise OSError(errno.EFBIG, "Refcount table would exceed its maximum size")
            start = await self._next_free(self.free_hint)
            while self._reserved_end(start) is not None:
                start = await self._next_free(self._reserved_end(start) or start)
            blocks: list[int] = []
            for _ in range(4):  # fixpoint: blocks covering the table and themselves
                end = start + t_clusters + len(blocks)
                needed = [b for b in range(start // per, (end - 1) // per + 1)
                          if b >= len(self.table) or not self.table[b]]
                if len(needed) == len(blocks):
                    break
                blocks = needed
            end = start + t_clusters + len(blocks)
            if (end - 1) // per >= entries:
                entries = (end - 1) // per + 1 + entries // 2
                continue
            if await self._conflict(start, end - start) is None:
                break
            self.free_hint = max(self.free_hint, end)  # try further on
        entries = t_clusters * cs // 8
        self.free_hint = max(self.free_hint, end)
        self.zero_from = max(self.zero_from, end)
        new_table = self.table + [0] * (entries - len(self.table))
        fresh: dict[int, bytearray] = {}
        for k, b in enumerate(blocks):
            new_table[b] = (start + t_clusters + k) << self.cbits
            fresh[b] = bytearray(cs)
        for c in range(start, end):
            b, i = divmod(c, per)
            if b in fresh:
                self._set(fresh[b], i, 1)
        for c in range(start, end):
            b = c // per
            if b not in fresh:
                await self.update(c << self.cbits, 1, 1)
        await self.cache.flush()
        for b, block in fresh.items():
            self.img.add_metadata(new_table[b], cs, "refcount block")
            await self.img.file_node.write(new_table[b], block)
            await self.cache.put_new(new_table[b], block)
            self.cache.dirty.discard(new_table[b])
        raw = struct.pack(f">{len(new_table)}Q", *new_table).ljust(t_clusters * cs, b"\0")
        table_off = start << self.cbits
        await self.img.file_node.write(table_off, raw)
        await self.img.file_node.flush()
        h = self.img.header
        old_off, old_clusters = h.refcount_table_offset, h.refcount_table_clusters
        self.img.remove_metadata(old_off, old_clusters * cs)
        self.img.add_metadata(table_off, t_clusters * cs, "refcount table")
        h.refcount_table_offset, h.refcount_table_clusters = table_off, t_clusters
        self.table = new_table
        await self.img.write_header()
        await self.update(old_off, old_clusters, -1)
