# SPDX-License-Identifier: GPL-2.0-or-later
"""``mirror_top``: the filter a mirror (or active commit) job puts above its source.

Every user of the source is moved onto this node for the job's lifetime,
so the job sees each write: in background mode the source's anonymous
dirty bitmap records it and the job copies the range again later; in
write-blocking mode the write also reaches the target before it completes
(:meth:`MirrorJob.write_through`). On completion the job replaces this
node by the target (pivot) or by the source again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qsd.block.filters import FilterNode

if TYPE_CHECKING:
    from qsd.jobs.mirror import MirrorJob


class MirrorTopNode(FilterNode):
    """Pass-through onto ``backing`` (the source), as QEMU's mirror_top."""

    driver = "mirror_top"
    child_name = "backing"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The job, while it wants to see writes (write-blocking mode).
        self.job: "MirrorJob | None" = None

    async def drv_write(self, offset: int, data: bytes | bytearray | memoryview,
                        fua: bool = False) -> None:
        await self.filtered.write(offset, data, fua)
        if self.job is not None:
            await self.job.write_through(offset, len(memoryview(data)), data=data)

    async def drv_write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                               fua: bool = False, no_fallback: bool = False) -> None:
        await self.filtered.write_zeroes(offset, length, may_unmap, fua, no_fallback)
        if self.job is not None:
            await self.job.write_through(offset, length, zero=True, may_unmap=may_unmap)

    async def drv_discard(self, offset: int, length: int) -> None:
        """Dropped, as QEMU drops discards on a node opened without
        discard=unmap (the job's filter never is): nothing changes, nothing
        to copy."""
