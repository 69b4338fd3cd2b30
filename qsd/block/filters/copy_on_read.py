# SPDX-License-Identifier: GPL-2.0-or-later
"""The ``copy-on-read`` filter: data read from the backing chain is written
into the top image, so later reads find it there.

The copy is done in whole clusters of the top node (as QEMU rounds copy-on-read
to clusters); an all-zero cluster is copied as a zero write. With ``bottom``
only data that comes from the chain down to (and including) that node is
copied; without it all data the backing chain holds is. Ranges allocated
nowhere in the chain are not copied (as QEMU). Writes through the filter wait for copies of
the ranges they overlap, so a copy never puts old data over a new write.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from qsd.block.filters import FilterNode
from qsd.block.filters.throttle import child_json
from qsd.block.node import Node, Perm, register_driver
from qsd.qmp.errors import GenericError
from qsd.qmp.keyorder import qemu_items

#: Largest piece copied in one go.
MAX_COPY = 1 << 24


def _backing(node: Node) -> Node | None:
    edge = node.children.get("backing")
    return edge.child if edge is not None else None


@register_driver
class CopyOnReadNode(FilterNode):
    driver = "copy-on-read"

    async def open(self, options: dict[str, Any]) -> None:
        self.bottom_name: str | None = options.get("bottom")
        if self.bottom_name is not None and self.graph.lookup(self.bottom_name) is None:
            raise GenericError(f"Bottom node '{self.bottom_name}' not found")
        await super().open(options)
        if self.filtered.read_only:
            # The copies need write-unchanged, which a read-only node cannot give.
            raise GenericError("Block node is read-only")
        self._copying: list[tuple[int, int]] = []
        self._copied = asyncio.Condition()

    def child_perm(self, edge: Any, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        """Writes of unchanged data (the copies) need write-unchanged."""
        return perm | Perm.WRITE_UNCHANGED, shared | Perm.WRITE_UNCHANGED

    def _bottom_depth(self) -> int | None:
        """Block-status depth of the bottom node below our child (None: no bottom)."""
        if self.bottom_name is None:
            return None
        depth, node = 1, self.filtered
        while node is not None:
            if node.node_name == self.bottom_name:
                return depth
            node = _backing(node)
            depth += 1
        return 0

    def _wanted(self, depth: int, bottom: int | None) -> bool:
        """Whether data found at ``depth`` (block status) is copied up."""
        if depth < 2:
            return False        # in the top node already, or nowhere in the chain
        return bottom is None or depth <= bottom

    async def read_into(self, offset: int, buf: memoryview) -> None:
        top = self.filtered
        end = offset + len(buf)
        bottom = self._bottom_depth()
        pos = offset
        while pos < end:
            extent = (await top.block_status(pos, end - pos))[0]
            n = min(extent.length, end - pos) or end - pos
            if not self._wanted(extent.depth, bottom):
                await top.read_into(pos, buf[pos - offset:pos - offset + n])
            else:
                await self._copy_up(pos, n, buf[pos - offset:pos - offset + n])
            pos += n

    def _cluster(self) -> int:
        return max(self.filtered.cluster_size() or 0, self.filtered.request_alignment, 1)

    async def _copy_up(self, offset: int, length: int, out: memoryview) -> None:
        """Read [offset, offset+length) through the top node into ``out`` and
        write the clusters it touches into the top node."""
        top = self.filtered
        cluster = self._cluster()
        start = offset // cluster * cluster
        end = min(-(-(offset + length) // cluster) * cluster, top.size)
        await self._claim(start, end)
        try:
            pos = start
            while pos < end:
                n = min(MAX_COPY, end - pos)
                data = await top.read(pos, n)
                if not any(data):
                    await top.write_zeroes(pos, n)
                else:
                    await top.write(pos, data)
                lo, hi = max(pos, offset), min(pos + n, offset + length)
                if lo < hi:
                    out[lo - offset:hi - offset] = data[lo - pos:hi - pos]
                pos += n
        finally:
            await self._release(start, end)

    async def _claim(self, start: int, end: int) -> None:
        async with self._copied:
            await self._copied.wait_for(lambda: not self._overlaps(start, end))
            self._copying.append((start, end))

    async def _release(self, start: int, end: int) -> None:
        async with self._copied:
            self._copying.remove((start, end))
            self._copied.notify_all()

    def _overlaps(self, start: int, end: int) -> bool:
        return any(s < end and start < e for s, e in self._copying)

    async def _wait_copies(self, offset: int, length: int) -> None:
        if self._copying and self._overlaps(offset, offset + length):
            async with self._copied:
                await self._copied.wait_for(lambda: not self._overlaps(offset, offset + length))

    async def drv_write(self, offset: int, data: bytes | bytearray | memoryview,
                        fua: bool = False) -> None:
        await self._wait_copies(offset, data.nbytes if isinstance(data, memoryview) else len(data))
        await self.filtered.write(offset, data, fua)

    async def drv_write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                               fua: bool = False, no_fallback: bool = False) -> None:
        await self._wait_copies(offset, length)
        await self.filtered.write_zeroes(offset, length, may_unmap, fua, no_fallback)

    async def drv_discard(self, offset: int, length: int) -> None:
        await self._wait_copies(offset, length)
        await self.filtered.discard(offset, length)

    def host_extent(self, offset: int, length: int) -> tuple[int, int] | None:
        """Only where the top node itself has the data (nothing to copy)."""
        mapping = self.filtered.host_extent(offset, length)
        if mapping is None or _backing(self.filtered) is not None:
            return None
        return mapping

    # ----- introspection --------------------------------------------------------

    def json_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"driver": self.driver, "file": child_json(self.filtered)}
        if self.bottom_name is not None:
            opts["bottom"] = self.bottom_name
        return dict(qemu_items(opts))

    @property
    def filename(self) -> str:
        return "json:" + json.dumps(self.json_options())
