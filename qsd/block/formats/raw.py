# SPDX-License-Identifier: GPL-2.0-or-later
"""The ``raw`` format: the image is the bytes of its ``file`` child.

Optionally a window (``offset``/``size``) into the child.  Without one,
raw is a filter as far as permissions go (QEMU's child role
FILTERED|PRIMARY); with one it is a DATA child, and the permissions it
takes are the ones QSD 7.2 was observed to hold (see :meth:`child_perm`).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from qsd.block.node import Extent, Node, Perm, Role, register_driver
from qsd.qmp.errors import GenericError
from qsd.qmp.keyorder import qemu_items

if TYPE_CHECKING:
    from qsd.block.graph import Edge

SECTOR = 512


def _round_up(value: int) -> int:
    return -(-value // SECTOR) * SECTOR


@register_driver
class RawNode(Node):
    """Pass-through format with an optional window into the child."""

    driver = "raw"
    is_format = True
    file_role = Role.FILTERED | Role.PRIMARY
    # Read by the size property, which Node.__init__ touches before open().
    _fixed_size: int | None = None
    _offset = 0

    async def open(self, options: dict[str, Any]) -> None:
        offset = options.get("offset")
        size = options.get("size")
        for name, value in (("offset", offset), ("size", size)):
            if value is not None and value < 0:
                raise GenericError(f"Parameter '{name}' expects a non-negative number below 2^64")
        self._offset = offset or 0
        self._fixed_size = size
        self._json: dict[str, Any] = {k: options[k] for k in ("offset", "size") if k in options}
        # QEMU decides on the values, so an explicit offset=0 is still a filter.
        self._windowed = bool(self._offset) or size is not None
        role = Role.DATA | Role.PRIMARY if self._windowed else self.file_role
        child = await self.open_child("file", options["file"], role)
        if self._offset > child.size:
            raise GenericError(f"Offset ({self._offset}) cannot be greater than size of the "
                               f"containing file ({child.size})")
        if size is not None:
            if self._offset + size > child.size:
                raise GenericError(
                    f"The sum of offset ({self._offset}) and size ({size}) has to be smaller or "
                    f"equal to the  actual size of the containing file ({child.size})")
            if size % SECTOR:
                raise GenericError("Specified size is not multiple of 512")

    @property
    def size(self) -> int:
        """Follows the child unless fixed, as QEMU recomputes it on resize."""
        if self._fixed_size is not None:
            return self._fixed_size
        if "file" not in self.children:
            return 0
        return _round_up(max(0, self.file.size - self._offset))

    @size.setter
    def size(self, value: int) -> None:
        """Node.__init__ assigns a placeholder; the real size is derived."""

    def child_perm(self, edge: Edge, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        """With a window, pass the parents' permissions through but never
        share resize (observed on QSD 7.2: a lone windowed raw node holds
        only the "unshared resize" lock byte on its file)."""
        if not self._windowed:
            return perm, shared
        if self.force_share:
            return perm, Perm.all()
        return perm, (shared | Perm.WRITE_UNCHANGED) & ~Perm.RESIZE

    # ----- I/O ------------------------------------------------------------
    def _child_span(self, offset: int, length: int) -> int:
        """How many bytes of [offset, offset+length) the child really has."""
        return max(0, min(length, self.file.size - self._offset - offset))

    async def read_into(self, offset: int, buf: memoryview) -> None:
        n = self._child_span(offset, len(buf))
        self.file.debug_event("read_aio")
        if n:
            await self.file.read_into(self._offset + offset, buf[:n])
        if n < len(buf):  # the rounded-up tail past the child's end
            buf[n:] = bytes(len(buf) - n)

    async def drv_write(self, offset: int, data: bytes | bytearray | memoryview,
                    fua: bool = False) -> None:
        self.file.debug_event("write_aio")
        await self.file.write(self._offset + offset, data, fua)

    async def drv_write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                           fua: bool = False, no_fallback: bool = False) -> None:
        await self.file.write_zeroes(self._offset + offset, length, may_unmap, fua, no_fallback)

    async def drv_discard(self, offset: int, length: int) -> None:
        if self.discard_mode != "unmap":
            return
        await self.file.discard(self._offset + offset, length)

    async def drv_truncate(self, size: int, exact: bool = False, prealloc: str = "off") -> None:
        if self._fixed_size is not None:
            raise GenericError("Cannot resize fixed-size raw disks")
        await self.file.truncate(self._offset + size, exact, prealloc)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        n = self._child_span(offset, length)
        if not n:
            return [Extent(offset, length, data=False, zero=True)]
        extents = await self.file.block_status(self._offset + offset, n)
        for e in extents:
            e.offset -= self._offset
        return extents

    def host_extent(self, offset: int, length: int) -> tuple[int, int] | None:
        if self._child_span(offset, length) < length:
            return None
        return self.file.host_extent(self._offset + offset, length)

    # ----- introspection ----------------------------------------------------
    def json_options(self) -> dict[str, Any]:
        """The options QEMU shows for this node inside a ``json:`` filename."""
        child = self.file
        child_json = getattr(child, "json_options", None)
        inner = child_json() if child_json else dict(qemu_items(
            {"driver": child.driver, "filename": child.filename}))
        return dict(qemu_items(dict(self._json, driver=self.driver, file=inner)))

    @property
    def filename(self) -> str:
        """The child's file name, unless raw's own options or the child's
        need spelling out (then QEMU shows a ``json:`` pseudo-filename)."""
        inner = self.file.filename
        if not self._json and not inner.startswith("json:"):
            return inner
        return "json:" + json.dumps(self.json_options())
