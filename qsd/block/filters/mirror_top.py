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
        #: The job, while it runs.
        self.job: "MirrorJob | None" = None
        #: Drained sections that paused the job (QEMU pauses jobs on drain).
        self._drain_pauses = 0

    async def drv_write(self, offset: int, data: bytes | bytearray | memoryview,
                        fua: bool = False) -> None:
        await self.filtered.write(offset, data, fua)
        if self.job is not None and self.job.write_blocking:
            await self.job.write_through(offset, len(memoryview(data)), data=data)

    async def drv_write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                               fua: bool = False, no_fallback: bool = False) -> None:
        await self.filtered.write_zeroes(offset, length, may_unmap, fua, no_fallback)
        if self.job is not None and self.job.write_blocking:
            await self.job.write_through(offset, length, zero=True, may_unmap=may_unmap)

    # A drained section over the job's nodes pauses the job until it ends, so
    # a ready job shows standby/ready around it, as in QSD.
    def drain_begin(self) -> None:
        if self.job is not None and not self.job.own_drain:
            self._drain_pauses += 1
            self.job.pause()

    def drain_end(self) -> None:
        if self._drain_pauses and self.job is not None:
            self._drain_pauses -= 1
            self.job.resume()

    async def drained_poll(self) -> None:
        if self._drain_pauses and self.job is not None:
            await self.job.wait_paused()

    async def undrained_poll(self) -> None:
        if self.job is not None:
            await self.job.wait_resumed()

    def release_job(self) -> None:
        """The job is done with this node: give back the drain pauses it holds."""
        job, self.job = self.job, None
        while self._drain_pauses and job is not None:
            self._drain_pauses -= 1
            job.resume()

    async def drv_discard(self, offset: int, length: int) -> None:
        """Dropped, as QEMU drops discards on a node opened without
        discard=unmap (the job's filter never is): nothing changes, nothing
        to copy."""
