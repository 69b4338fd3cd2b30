# SPDX-License-Identifier: GPL-2.0-or-later
"""Filter drivers: nodes that sit on one child and change how I/O reaches it.

:class:`FilterNode` passes everything through to its ``file`` child with the
parents' permissions (QEMU's FILTERED|PRIMARY role); a filter overrides only
the methods it acts on. Internal filters that jobs insert (mirror_top,
commit_top, copy-before-write) use the same base.
"""

from __future__ import annotations

from typing import Any, ClassVar

from qsd.block.node import Extent, Node, Role


class FilterNode(Node):
    """Pass-through on the ``file`` child (``child_name`` for others)."""

    is_filter = True
    file_role = Role.FILTERED | Role.PRIMARY
    child_name = "file"
    #: False for filters that must see every read: exports then get no host
    #: mapping of the child's file and go through the filter.
    maps_host: ClassVar[bool] = True

    # QEMU's filters have no get_info of their own: the block layer asks the
    # filtered child, so queries show its cluster size and dirty flag.
    @property
    def reports_dirty_flag(self) -> bool:  # type: ignore[override]
        return self.filtered.reports_dirty_flag

    def dirty_flag(self) -> bool:
        return self.filtered.dirty_flag()

    def cluster_size(self) -> int | None:
        return self.filtered.cluster_size()

    async def open(self, options: dict[str, Any]) -> None:
        await self.open_child(self.child_name, options[self.child_name], self.file_role)

    @property
    def filtered(self) -> Node:
        return self.children[self.child_name].child

    @property
    def size(self) -> int:
        edge = self.children.get(self.child_name)
        return edge.child.size if edge is not None else 0

    @size.setter
    def size(self, value: int) -> None:
        """Node.__init__ assigns a placeholder; the size is the child's."""

    async def read_into(self, offset: int, buf: memoryview) -> None:
        await self.filtered.read_into(offset, buf)

    async def drv_write(self, offset: int, data: bytes | bytearray | memoryview,
                        fua: bool = False) -> None:
        await self.filtered.write(offset, data, fua)

    async def drv_write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                               fua: bool = False, no_fallback: bool = False) -> None:
        await self.filtered.write_zeroes(offset, length, may_unmap, fua, no_fallback)

    async def drv_discard(self, offset: int, length: int) -> None:
        await self.filtered.discard(offset, length)

    async def drv_truncate(self, size: int, exact: bool = False, prealloc: str = "off") -> None:
        await self.filtered.truncate(size, exact, prealloc)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        extents = await self.filtered.block_status(offset, length)
        for extent in extents:
            if not self.maps_host:
                extent.host_fd = -1
            # QEMU's allocation depth counts the filter as a layer for
            # whatever lies below its child.
            if extent.depth > 1:
                extent.depth += 1
        return extents

    def host_extent(self, offset: int, length: int) -> tuple[int, int] | None:
        return self.filtered.host_extent(offset, length) if self.maps_host else None

    @property
    def filename(self) -> str:
        return self.filtered.filename
