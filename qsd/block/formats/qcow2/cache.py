# SPDX-License-Identifier: GPL-2.0-or-later
"""Write-back caches of qcow2 metadata clusters (L2 tables, refcount blocks).

Entries are whole clusters keyed by host offset, kept in LRU order. Dirty
entries are written back on eviction and on flush. A cache may depend on
another one (the L2 cache on the refcount cache): before any of its dirty
entries is written, the other is flushed first, so a crash can leave
refcounts too high (a leak) but never an L2 entry pointing at a cluster
whose refcount says free.
"""

from __future__ import annotations

import asyncio
import sys
from array import array
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T", bytearray, array)

Loader = Callable[[int], Awaitable[bytes]]
Writer = Callable[[int, bytes], Awaitable[None]]


class TableCache(Generic[T]):
    """An LRU cache of ``capacity`` tables with write-back."""

    def __init__(self, capacity: int, load: Loader, write: Writer,
                 decode: Callable[[bytes], T], encode: Callable[[T], bytes]) -> None:
        self.capacity = max(2, capacity)
        self._load = load
        self._write = write
        self._decode = decode
        self._encode = encode
        self.tables: OrderedDict[int, T] = OrderedDict()
        self.dirty: set[int] = set()
        self._loading: dict[int, asyncio.Future[T]] = {}
        #: Flushed before any dirty entry of this cache is written.
        self.depends_on: "TableCache" | None = None  # type: ignore[type-arg]
        #: Called before a write-back (overlap checks).
        self.before_write: Callable[[int], None] | None = None
        #: Awaited between flushing ``depends_on`` and writing our entries
        #: (a flush of the image file: order survives a host crash too).
        self.barrier: Callable[[], Awaitable[None]] | None = None

    def peek(self, offset: int) -> T | None:
        """The table if cached (no I/O): the synchronous fast path."""
        return self.tables.get(offset)

    async def get(self, offset: int) -> T:
        table = self.tables.get(offset)
        if table is not None:
            self.tables.move_to_end(offset)
            return table
        pending = self._loading.get(offset)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._loading[offset] = fut
        try:
            table = self._decode(await self._load(offset))
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._loading[offset]
        if not fut.done():
            fut.set_result(table)
        await self._insert(offset, table)
        return table

    async def put_new(self, offset: int, table: T) -> None:
        """Insert a freshly made table (dirty: it is not on disk yet)."""
        await self._insert(offset, table)
        self.dirty.add(offset)

    def mark_dirty(self, offset: int) -> None:
        self.dirty.add(offset)

    def discard(self, offset: int) -> None:
        """Forget a table whose cluster was freed, without writing it."""
        self.tables.pop(offset, None)
        self.dirty.discard(offset)

    async def _insert(self, offset: int, table: T) -> None:
        self.tables[offset] = table
        self.tables.move_to_end(offset)
        while len(self.tables) > self.capacity:
            victim = next(iter(self.tables))
            if victim in self.dirty:
                await self._write_back([victim])
            self.tables.pop(victim, None)

    async def _write_back(self, offsets: list[int]) -> None:
        if self.depends_on is not None and self.depends_on.dirty:
            await self.depends_on.flush()
            if self.barrier is not None:
                await self.barrier()
        for off in sorted(offsets):
            table = self.tables.get(off)
            if table is None or off not in self.dirty:
                continue
            if self.before_write is not None:
                self.before_write(off)
            self.dirty.discard(off)
            try:
                await self._write(off, self._encode(table))
            except BaseException:
                self.dirty.add(off)
                raise

    async def flush(self) -> None:
        """Write every dirty entry back (dependencies first)."""
        if self.dirty:
            await self._write_back(list(self.dirty))


def decode_l2(raw: bytes) -> array:
    """An L2 table as native 64-bit integers."""
    table = array("Q", raw)
    if sys.byteorder == "little":
        table.byteswap()
    return table


def encode_l2(table: array) -> bytes:
    if sys.byteorder == "little":
        out = array("Q", table)
        out.byteswap()
        return out.tobytes()
    return table.tobytes()


def decode_block(raw: bytes) -> bytearray:
    return bytearray(raw)


def encode_block(block: bytearray) -> bytes:
    return bytes(block)
