# SPDX-License-Identifier: GPL-2.0-or-later
"""``copy-before-write``: the filter that makes a backup a point-in-time copy.

The node sits above the source (``file``) and owns a :class:`BlockCopy`
towards its ``target``: before a write, zero-write or discard reaches the
source, the clusters it touches that have not been copied yet are copied to
the target with their old contents. A backup job inserts one above its
device and runs the same :class:`BlockCopy` in the background for the rest;
as in QEMU, users can also create the node with blockdev-add (``target``,
``bitmap``, ``on-cbw-error``, ``cbw-timeout``).

:class:`BlockCopy` copies each cluster at most once: a cluster's bit in the
copy bitmap is cleared when a copy of it starts (so the guest path and the
job never copy it twice), set again if that copy fails, and whoever needs a
cluster that is being copied waits for that copy.
"""

from __future__ import annotations

import asyncio
import errno
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from qsd.block.bitmap import DirtyBitmap
from qsd.block.filters import FilterNode
from qsd.block.node import Node, Perm, Role, register_driver
from qsd.qmp.errors import GenericError

if TYPE_CHECKING:
    from qsd.block.graph import Edge

#: QEMU's smallest block-copy cluster (and the one it assumes when the
#: target cannot tell its own).
DEFAULT_CLUSTER = 64 * 1024
#: Largest read/write a copy does in one go (QEMU's BLOCK_COPY_MAX_BUFFER).
MAX_BUFFER = 1 << 20
#: Copies running in parallel per call (QEMU's default max-workers).
MAX_WORKERS = 64


class CopyError(OSError):
    """A failed copy; ``is_read`` says whether reading the source failed."""

    def __init__(self, err: OSError, is_read: bool) -> None:
        super().__init__(err.errno, err.strerror or os.strerror(err.errno or errno.EIO))
        self.is_read = is_read


def copy_cluster_size(target: Node) -> int:
    """The copy granularity: the target's cluster size, at least 64 KiB, so
    that a copy never leaves half-written clusters behind."""
    return max(DEFAULT_CLUSTER, target.cluster_size() or DEFAULT_CLUSTER)


def find_bitmap(node: Node, name: str) -> DirtyBitmap | None:
    for bitmap in node.dirty_bitmaps:
        if bitmap.name == name:
            return bitmap
    return None


@dataclass(eq=False)
class _Task:
    offset: int
    length: int
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def overlaps(self, offset: int, end: int) -> bool:
        return self.offset < end and offset < self.offset + self.length


class BlockCopy:
    """Copy-once state between a source edge and a target edge (QEMU's
    block-copy), shared by the filter's write path and the backup job."""

    def __init__(self, source: "Edge", target: "Edge", cluster_size: int,
                 bitmap: DirtyBitmap | None) -> None:
        self.source = source
        self.target = target
        self.cluster_size = cluster_size
        self.size = source.child.size
        #: Clusters still to copy. Anonymous and not recording: only copies
        #: change it. It lives on the source node as in QEMU (queries list it).
        self.copy_bitmap = DirtyBitmap(None, self.size, cluster_size, enabled=False)
        if bitmap is None:
            self.copy_bitmap.set_range(0, self.size)
        else:
            self.copy_bitmap.merge_from(bitmap)
        self._bitmap_owner = source.child
        source.child.dirty_bitmaps.append(self.copy_bitmap)
        #: While set, clusters unallocated in the source's top layer are
        #: dropped instead of copied (sync=top's first pass).
        self.skip_unallocated = False
        #: Write data as compressed clusters (backup's ``compress``; the
        #: target node has ``write_compressed``).
        self.compress = False
        self.in_flight_bytes = 0
        self._tasks: list[_Task] = []
        #: Progress callbacks of the job that owns the copy (done, remaining).
        self.on_done: Callable[[int], None] | None = None
        self.on_remaining: Callable[[int], None] | None = None

    def release(self) -> None:
        """Take the copy bitmap off the source (the filter goes away)."""
        if self.copy_bitmap in self._bitmap_owner.dirty_bitmaps:
            self._bitmap_owner.dirty_bitmaps.remove(self.copy_bitmap)

    # ----- bookkeeping ---------------------------------------------------
    def _report_remaining(self) -> None:
        if self.on_remaining is not None:
            self.on_remaining(self.copy_bitmap.count() + self.in_flight_bytes)

    def reset(self, offset: int, length: int) -> None:
        """Mark a range as needing no copy (sync=top: unallocated clusters)."""
        self.copy_bitmap.reset_range(offset, length)
        self._report_remaining()

    def _take(self, offset: int, end: int, chunk: int) -> _Task | None:
        """The next dirty run in [offset, end), at most ``chunk`` long, now
        owned by a new task (its bits cleared)."""
        start = self.copy_bitmap.next_dirty(offset)
        if start < 0 or start >= end:
            return None
        # Offsets are whole clusters (or the end of a last, partial one).
        stop = min(self.copy_bitmap.next_clean(start), end, start + chunk)
        task = _Task(start, stop - start)
        self.copy_bitmap.reset_range(task.offset, task.length)
        self.in_flight_bytes += task.length
        self._tasks.append(task)
        return task

    def _shrink(self, task: _Task, n: int) -> None:
        """Give the tail of a task back (its status differs from the head's)."""
        self.copy_bitmap.set_range(task.offset + n, task.length - n)
        self.in_flight_bytes -= task.length - n
        task.length = n

    def _end(self, task: _Task, err: BaseException | None) -> None:
        if err is not None:
            self.copy_bitmap.set_range(task.offset, task.length)
        self.in_flight_bytes -= task.length
        self._tasks.remove(task)
        self._report_remaining()
        if not task.done.done():
            task.done.set_result(None)

    # ----- the copy --------------------------------------------------------
    async def _status(self, offset: int, length: int) -> tuple[int, bool, bool]:
        """(bytes, zero, allocated) of the source from ``offset``, in whole
        clusters (one data cluster when the status is finer than that)."""
        try:
            extents = await self.source.child.block_status(offset, length)
        except OSError:
            extents = []
        if not extents:
            return min(self.cluster_size, length), False, True
        first = extents[0]
        n = first.length
        for e in extents[1:]:
            if (e.zero, e.depth == 1) != (first.zero, first.depth == 1) or e.offset != offset + n:
                break
            n += e.length
        n = min(n, length)
        if offset + n >= self.size:
            n = self.size - offset
        elif n < self.cluster_size:
            return min(self.cluster_size, length), False, True
        else:
            n -= n % self.cluster_size
        allocated = first.depth == 1 if self.skip_unallocated else True
        return n, first.zero, allocated

    async def _run_task(self, task: _Task, zero: bool) -> None:
        """Copy one task's range; the task ends (and re-dirties on failure) here."""
        err: BaseException | None = None
        try:
            if zero:
                try:
                    await self.target.write_zeroes(task.offset, task.length)
                except OSError as exc:
                    raise CopyError(exc, False) from exc
            else:
                buf = bytearray(task.length)
                try:
                    await self.source.read_into(task.offset, memoryview(buf))
                except OSError as exc:
                    raise CopyError(exc, True) from exc
                try:
                    if self.compress:
                        await self.target.child.write_compressed(task.offset, buf)
                    else:
                        await self.target.write(task.offset, buf)
                except OSError as exc:
                    raise CopyError(exc, False) from exc
        except BaseException as exc:
            err = exc
            raise
        finally:
            if err is None and self.on_done is not None:
                self.on_done(task.length)
            self._end(task, err)

    async def copy(self, offset: int, length: int, *,
                   throttle: Callable[[int], Awaitable[None]] | None = None,
                   max_workers: int = MAX_WORKERS, max_chunk: int = 0) -> None:
        """Copy every not yet copied cluster of [offset, offset+length) and
        wait for copies of that range others started; raise :class:`CopyError`
        (the first failure) when a copy fails. ``throttle(nbytes)`` is awaited
        after each copy is launched (the job's speed limit and pause point)."""
        end = min(self.size, -(-(offset + length) // self.cluster_size) * self.cluster_size)
        offset -= offset % self.cluster_size
        chunk = max(self.cluster_size, MAX_BUFFER)
        if max_chunk:
            chunk = min(chunk, max_chunk)
        while True:
            progressed = False
            running: set[asyncio.Task[None]] = set()
            failure: BaseException | None = None
            pos = offset
            try:
                while pos < end and failure is None:
                    task = self._take(pos, end, chunk)
                    if task is None:
                        break
                    progressed = True
                    n, zero, allocated = await self._status(task.offset, task.length)
                    if n < task.length:
                        self._shrink(task, n)
                    pos = task.offset + task.length
                    if not allocated:
                        self._end(task, None)
                        continue
                    while len(running) >= max_workers:
                        finished, running = await asyncio.wait(running,
                                                               return_when=asyncio.FIRST_COMPLETED)
                        failure = failure or _first_error(finished)
                    if failure is not None:
                        self._end(task, failure)
                        break
                    running.add(asyncio.ensure_future(self._run_task(task, zero)))
                    if throttle is not None:
                        await throttle(task.length)
                    failure = failure or _first_error({t for t in running if t.done()})
            finally:
                if running:
                    done, _ = await asyncio.wait(running)
                    failure = failure or _first_error(done)
            if failure is not None:
                raise failure
            if not progressed:
                waiting = next((t for t in self._tasks if t.overlaps(offset, end)), None)
                if waiting is None:
                    return
                await asyncio.shield(waiting.done)



def _first_error(tasks: set[asyncio.Task[None]]) -> BaseException | None:
    for t in tasks:
        if not t.cancelled() and t.exception() is not None:
            return t.exception()
    return None


@register_driver
class CopyBeforeWriteNode(FilterNode):
    """Filter over ``file`` copying old data to ``target`` before changes."""

    driver = "copy-before-write"
    #: QSD lists dirty-flag for it (the filter answers get_info through its child).

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bcs: BlockCopy | None = None
        self.on_cbw_error = "break-guest-write"
        self.cbw_timeout = 0
        #: The first copy failure under on-cbw-error=break-snapshot.
        self.snapshot_error: OSError | None = None
        #: QEMU's bookkeeping bitmaps of the snapshot-access side: what the
        #: guest path copied, and what a reader may still access.
        self.done_bitmap: DirtyBitmap | None = None
        self.access_bitmap: DirtyBitmap | None = None

    async def open(self, options: dict[str, Any]) -> None:
        await self.open_child("file", options["file"], self.file_role)
        target = await self.open_child("target", options["target"], Role.DATA)
        bitmap = None
        if "bitmap" in options:
            ref = options["bitmap"]
            owner = self.graph.lookup(ref["node"])
            if owner is None:
                raise GenericError(f"Node '{ref['node']}' not found")
            bitmap = find_bitmap(owner, ref["name"])
            if bitmap is None:
                raise GenericError(f"Dirty bitmap '{ref['name']}' not found")
            if bitmap.inconsistent:
                raise GenericError(f"Bitmap '{ref['name']}' is inconsistent and cannot be used")
            if bitmap.size != self.filtered.size:
                raise GenericError(f"Cannot create block-copy-state: Failed to merge bitmap "
                                   f"'{ref['name']}' to internal copy-bitmap: Bitmaps are of "
                                   f"different sizes")
        self.on_cbw_error = options.get("on-cbw-error", "break-guest-write")
        self.cbw_timeout = options.get("cbw-timeout", 0)
        cluster = copy_cluster_size(target)
        self.bcs = BlockCopy(self.children["file"], self.children["target"], cluster, bitmap)
        self.done_bitmap = DirtyBitmap(None, self.size, cluster, enabled=False)
        self.access_bitmap = self.bcs.copy_bitmap.copy()
        self.access_bitmap.enabled = False
        self.dirty_bitmaps += [self.done_bitmap, self.access_bitmap]

    async def close(self) -> None:
        if self.bcs is not None:
            self.bcs.release()
        self.dirty_bitmaps.clear()

    def child_perm(self, edge: "Edge", perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        """The target is written and may be written by others, never resized;
        the source shares no writes once the filter has users (all of them
        write through it)."""
        if edge.name == "target":
            return Perm.WRITE, Perm.all() & ~Perm.RESIZE
        if self.parents:
            if perm & Perm.WRITE:
                perm |= Perm.CONSISTENT_READ
            shared &= ~(Perm.WRITE | Perm.RESIZE)
        return perm, shared

    async def _copy_old(self, offset: int, length: int) -> None:
        """Copy the clusters a change to [offset, offset+length) touches."""
        bcs = self.bcs
        if bcs is None or self.snapshot_error is not None or length <= 0:
            return
        try:
            copy = bcs.copy(offset, length)
            if self.cbw_timeout:
                try:
                    await asyncio.wait_for(copy, self.cbw_timeout)
                except asyncio.TimeoutError:
                    raise OSError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT)) from None
            else:
                await copy
        except OSError as err:
            if self.on_cbw_error == "break-guest-write":
                raise OSError(err.errno, err.strerror) from err
            self.snapshot_error = err
            return
        if self.done_bitmap is not None:
            self.done_bitmap.set_range(offset, length)

    async def drv_write(self, offset: int, data: bytes | bytearray | memoryview,
                        fua: bool = False) -> None:
        await self._copy_old(offset, memoryview(data).nbytes)
        await self.filtered.write(offset, data, fua)

    async def drv_write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                               fua: bool = False, no_fallback: bool = False) -> None:
        await self._copy_old(offset, length)
        may_unmap = may_unmap and self.discard_mode == "unmap"
        await self.filtered.write_zeroes(offset, length, may_unmap, fua, no_fallback)

    async def drv_discard(self, offset: int, length: int) -> None:
        """Like any QEMU node, it drops discards unless opened with
        discard=unmap (a backup's filter is not: discards wait for its end)."""
        if self.discard_mode != "unmap":
            return
        await self._copy_old(offset, length)
        await self.filtered.discard(offset, length)

    async def drv_truncate(self, size: int, exact: bool = False, prealloc: str = "off") -> None:
        raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))

    def host_extent(self, offset: int, length: int) -> tuple[int, int] | None:
        return self.filtered.host_extent(offset, length)

    async def flush(self) -> None:
        await self.filtered.flush()
