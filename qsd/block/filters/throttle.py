# SPDX-License-Identifier: GPL-2.0-or-later
"""The ``throttle`` filter: I/O through it obeys a throttle-group's limits.

Every node naming one group is a member of it and shares its budget
(``qsd.block.throttle``). Reads count as reads; writes, zero writes and
discards as writes; flushes and block status pass unthrottled. Requests
are queued, never refused. While the node is drained, queued requests go
through at once, as QEMU lifts the limits for a drained section.
"""

from __future__ import annotations

import json
from typing import Any

from qsd.block.filters import FilterNode
from qsd.block.node import register_driver
from qsd.block.throttle import ThrottleGroupMember
from qsd.qmp.errors import GenericError
from qsd.qmp.keyorder import qemu_items


def child_json(node: Any) -> dict[str, Any]:
    """How QEMU spells a child inside a parent's ``json:`` filename."""
    spelled = getattr(node, "json_options", None)
    if spelled is not None:
        return spelled()
    return dict(qemu_items({"driver": node.driver, "filename": node.filename}))


@register_driver
class ThrottleNode(FilterNode):
    driver = "throttle"
    #: Reads must come through the limits.
    maps_host = False
    member: ThrottleGroupMember | None = None

    async def open(self, options: dict[str, Any]) -> None:
        name = options["throttle-group"]
        objects = self.graph.objects
        group = objects.throttle_group(name) if objects is not None else None
        if group is None:
            raise GenericError(f"Throttle group '{name}' does not exist")
        self.group_name = name
        await super().open(options)
        self.member = group.register()

    async def close(self) -> None:
        if self.member is not None:
            self.member.leave()
            self.member = None

    async def _throttle(self, size: int, is_write: bool) -> None:
        if self.member is not None:
            await self.member.intercept(size, is_write)

    def drain_begin(self) -> None:
        """A drained section waits for our requests: let the queued ones go."""
        if self.member is not None:
            self.member.set_limits_disabled(True)

    def drain_end(self) -> None:
        if self.member is not None and not self.quiesce_count:
            self.member.set_limits_disabled(False)

    # ----- I/O ----------------------------------------------------------------
    async def read_into(self, offset: int, buf: memoryview) -> None:
        await self._throttle(len(buf), False)
        await self.filtered.read_into(offset, buf)

    async def drv_write(self, offset: int, data: bytes | bytearray | memoryview,
                        fua: bool = False) -> None:
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        await self._throttle(size, True)
        await self.filtered.write(offset, data, fua)

    async def drv_write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                               fua: bool = False, no_fallback: bool = False) -> None:
        await self._throttle(length, True)
        await self.filtered.write_zeroes(offset, length, may_unmap, fua, no_fallback)

    async def drv_discard(self, offset: int, length: int) -> None:
        await self._throttle(length, True)
        await self.filtered.discard(offset, length)


    # ----- introspection --------------------------------------------------------

    def json_options(self) -> dict[str, Any]:
        return dict(qemu_items({"throttle-group": self.group_name, "driver": self.driver,
                                "file": child_json(self.filtered)}))

    @property
    def filename(self) -> str:
        return "json:" + json.dumps(self.json_options())
