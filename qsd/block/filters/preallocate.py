# SPDX-License-Identifier: GPL-2.0-or-later
"""The ``preallocate`` filter: a file that grows by writes past its end is
extended in big steps (``prealloc-size`` beyond the write, rounded up to
``prealloc-align``), so the host file system allocates it in few large
pieces. Parents see the size the data reaches (``data_end``); the file is
cut back to it on close and before a resize.

As QEMU, the filter only acts while its parents may write and resize (a
format on top); then it keeps others from writing or resizing the file.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from qsd.block.filters import FilterNode
from qsd.block.filters.throttle import child_json
from qsd.block.node import Extent, Perm, register_driver
from qsd.qmp.errors import GenericError
from qsd.qmp.keyorder import qemu_items

SECTOR = 512
DEFAULT_ALIGN = 1 << 20
DEFAULT_SIZE = 128 << 20


def _align_up(value: int, align: int) -> int:
    return -(-value // align) * align


@register_driver
class PreallocateNode(FilterNode):
    driver = "preallocate"
    #: Size the parents' data reaches, end of the preallocated zeroes and
    #: end of the file; -1 while unknown (no write/resize permission yet).
    data_end = -1
    zero_start = -1
    file_end = -1

    async def open(self, options: dict[str, Any]) -> None:
        self.prealloc_align: int = options.get("prealloc-align", DEFAULT_ALIGN)
        self.prealloc_size: int = options.get("prealloc-size", DEFAULT_SIZE)
        given = {k: options[k] for k in ("prealloc-align", "prealloc-size") if k in options}
        for name, _ in qemu_items(given):
            if options[name] < 0:
                raise GenericError(f"Parameter '{name}' expects a non-negative number below 2^64")
        if self.prealloc_align % SECTOR:
            raise GenericError("prealloc-align parameter of preallocate filter is not aligned "
                               f"to {SECTOR}")
        await super().open(options)

    # ----- permissions ----------------------------------------------------------
    def child_perm(self, edge: Any, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        if perm & Perm.WRITE and perm & Perm.RESIZE:
            return perm, shared & ~(Perm.WRITE | Perm.RESIZE)
        return perm, shared

    def set_perm(self, perm: Perm, shared: Perm) -> None:
        """Parents that stop writing and resizing (a format closed above us)
        leave the file as long as their data: the preallocation goes, and
        the sizes are found again if writers come back."""
        if perm & Perm.WRITE and perm & Perm.RESIZE or self.data_end < 0:
            return
        if self.file_end > self.data_end:
            self._dropping = asyncio.get_running_loop().create_task(self._drop_and_forget())
        else:
            self.data_end = self.file_end = self.zero_start = -1

    async def _drop_and_forget(self) -> None:
        try:
            await self._drop_preallocation()
        except (OSError, GenericError, KeyError):
            pass
        self.data_end = self.file_end = self.zero_start = -1

    def _active(self) -> bool:
        edge = self.children.get(self.child_name)
        return edge is not None and bool(edge.perm & Perm.WRITE and edge.perm & Perm.RESIZE)

    # ----- size ---------------------------------------------------------------
    @property
    def size(self) -> int:
        if self.data_end >= 0:
            return self.data_end
        return super().size

    @size.setter
    def size(self, value: int) -> None:
        """Node.__init__ assigns a placeholder; the size is derived."""

    async def _handle_write(self, offset: int, length: int, merge_zero: bool) -> bool:
        """Preallocate for a write of [offset, offset+length); True when a zero
        write there needs no doing (it lies in preallocated zeroes)."""
        if not self._active():
            return False
        child = self.filtered
        end = offset + length
        if self.data_end < 0:
            self.data_end = self.file_end = child.size
        if end <= self.data_end:
            return False
        self.data_end = end
        if self.zero_start < 0 or not merge_zero:
            self.zero_start = end
        if self.file_end < 0:
            self.file_end = child.size
        if end <= self.file_end:
            return merge_zero and offset >= self.zero_start
        align = max(self.prealloc_align, child.request_alignment, 1)
        new_end = _align_up(end + self.prealloc_size, align)
        try:
            await child.truncate(new_end, True, "falloc")
        except (OSError, GenericError):
            self.file_end = -1
            return False
        self.file_end = new_end
        return merge_zero

    async def _drop_preallocation(self) -> None:
        if self.data_end >= 0 and self.file_end > self.data_end:
            await self.filtered.truncate(self.data_end, True, "off")
            self.file_end = self.data_end

    # ----- I/O ------------------------------------------------------------------
    async def read_into(self, offset: int, buf: memoryview) -> None:
        await self.filtered.read_into(offset, buf)

    async def drv_write(self, offset: int, data: bytes | bytearray | memoryview,
                        fua: bool = False) -> None:
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        await self._handle_write(offset, size, False)
        await self.filtered.write(offset, data, fua)

    async def drv_write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                               fua: bool = False, no_fallback: bool = False) -> None:
        if await self._handle_write(offset, length, not may_unmap and not fua):
            return
        await self.filtered.write_zeroes(offset, length, may_unmap, fua, no_fallback)

    async def drv_truncate(self, size: int, exact: bool = False, prealloc: str = "off") -> None:
        if self.data_end >= 0 and size > self.data_end:
            if prealloc == "falloc" and size <= self.file_end:
                self.data_end = size
                return
            await self._drop_preallocation()
            self.data_end = size
        try:
            await self.filtered.truncate(size, exact, prealloc)
        except BaseException:
            self.data_end = self.file_end = self.zero_start = -1
            raise
        if self._active():
            self.data_end = self.file_end = self.zero_start = size

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return await self.filtered.block_status(offset, length)

    async def close(self) -> None:
        """Cut the file back to where the data ends."""
        if self.children.get(self.child_name) is not None:
            try:
                await self._drop_preallocation()
            except (OSError, GenericError):
                pass

    # ----- introspection --------------------------------------------------------

    def json_options(self) -> dict[str, Any]:
        """QEMU spells out none of the filter's own options."""
        return dict(qemu_items({"driver": self.driver, "file": child_json(self.filtered)}))

    @property
    def filename(self) -> str:
        return "json:" + json.dumps(self.json_options())
