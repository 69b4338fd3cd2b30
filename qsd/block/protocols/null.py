# SPDX-License-Identifier: GPL-2.0-or-later
"""The ``null-co`` and ``null-aio`` protocol drivers: a disk with no storage.

Writes vanish.  Reads leave the caller's buffer untouched unless
``read-zeroes`` is set (QEMU's default is the same: benchmarks want the
fast path, and the data is meaningless anyway).  Both names behave the same
here; QEMU only differs in how it completes requests internally.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from qsd.block.node import Extent, Node, register_driver
from qsd.qmp.errors import GenericError
from qsd.qmp.keyorder import qemu_items

SECTOR = 512
#: Largest node size QEMU accepts (INT64_MAX rounded down to 1 GiB).
MAX_LENGTH = (2**63 - 1) // (1 << 30) * (1 << 30)


@register_driver
class NullCoNode(Node):
    """Answers every request at once (after ``latency-ns``)."""

    driver = "null-co"
    #: QEMU's null driver answers no get_info, so no dirty-flag is shown.
    reports_dirty_flag = False

    async def open(self, options: dict[str, Any]) -> None:
        latency = options.get("latency-ns", 0)
        if latency < 0:
            raise GenericError("latency-ns is invalid")
        size = options.get("size", 1 << 30)
        if size < 0:
            # QEMU 7.2 aborts on this; qsd answers with its option parser's text.
            raise GenericError("Parameter 'size' expects a non-negative number below 2^64")
        size = -(-size // SECTOR) * SECTOR
        if size > MAX_LENGTH:
            raise GenericError("Could not refresh total sector count: File too large")
        self.size = size
        self._latency = latency / 1e9
        self._read_zeroes = bool(options.get("read-zeroes", False))
        self._json: dict[str, Any] = {k: options[k] for k in ("read-zeroes", "size")
                                      if k in options}

    async def _delay(self) -> None:
        if self._latency:
            await asyncio.sleep(self._latency)

    async def read_into(self, offset: int, buf: memoryview) -> None:
        await self._delay()
        if self._read_zeroes:
            buf[:] = bytes(len(buf))

    async def drv_write(self, offset: int, data: bytes | bytearray | memoryview,
                    fua: bool = False) -> None:
        await self._delay()

    async def drv_write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                           fua: bool = False, no_fallback: bool = False) -> None:
        await self._delay()

    async def flush(self) -> None:
        await self._delay()

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """Zero and allocated with read-zeroes, else unallocated (neither
        data nor zero), as ``qemu-img map`` shows QEMU's null driver."""
        if self._read_zeroes:
            return [Extent(offset, length, data=False, zero=True, depth=1)]
        return [Extent(offset, length, data=False, zero=False, depth=0)]

    def json_options(self) -> dict[str, Any]:
        """The options QEMU shows for this node inside a ``json:`` filename."""
        return dict(qemu_items(dict(self._json, driver=self.driver)))

    @property
    def filename(self) -> str:
        if not self._json:
            return f"{self.driver}://"
        return "json:" + json.dumps(self.json_options())

    def actual_size(self) -> int | None:
        return 0


@register_driver
class NullAioNode(NullCoNode):
    driver = "null-aio"
