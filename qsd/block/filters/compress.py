# SPDX-License-Identifier: GPL-2.0-or-later
"""The ``compress`` filter: writes through it become compressed clusters of
the qcow2 image below (zlib or zstd, the image's compression type).

As QEMU's filter, it works in whole clusters of its child: a write that
does not cover whole clusters has the rest of them read first and is written
as whole clusters; the image refuses clusters that are allocated already
(compression cannot overwrite). Zero writes and discards pass through.
"""

from __future__ import annotations

from typing import Any

from qsd.block.filters import FilterNode
from qsd.block.node import register_driver
from qsd.qmp.errors import GenericError


@register_driver
class CompressNode(FilterNode):
    driver = "compress"

    async def open(self, options: dict[str, Any]) -> None:
        await super().open(options)
        child = self.filtered
        if not callable(getattr(child, "write_compressed", None)):
            raise GenericError("Compression is not supported for underlying format: "
                               f"{child.driver}")

    async def drv_write(self, offset: int, data: bytes | bytearray | memoryview,
                        fua: bool = False) -> None:
        child: Any = self.filtered
        cs = child.cluster_size()
        data = memoryview(data).cast("B")
        start = offset - offset % cs
        end = min(-(-(offset + len(data)) // cs) * cs, max(child.size, offset + len(data)))
        if start != offset or end != offset + len(data):
            buf = bytearray(end - start)
            await child.read_into(start, memoryview(buf))
            buf[offset - start:offset - start + len(data)] = data
            data = memoryview(buf)
        await child.write_compressed(start, data)
        if fua:
            await child.flush()
