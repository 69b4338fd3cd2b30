# SPDX-License-Identifier: GPL-2.0-or-later
"""Mirror (blockdev-mirror, drive-mirror) and active commit.

The job puts a ``mirror_top`` filter above the source (every user of the
source moves onto it), tracks writes in an anonymous dirty bitmap on the
source, copies the dirty chunks to the target until nothing is left, then
says READY and keeps copying what is written.  On job-complete it drains
the source, copies the rest and, when the job is finalized, replaces the
filter (or ``replaces``) by the target: the pivot.  A soft cancel of a
ready job converges the same way but leaves the source in place; a forced
cancel stops at once.  Active commit is the same job with the base of the
chain as target and only what lies above the base to copy.

Copies move whole runs of dirty chunks (at most ``buf_size/16``, at least
1 MiB, as QEMU) with up to 16 in flight; each run is split by the source's
block status so holes and zero ranges become write-zeroes (or nothing
when the target already reads zeroes there), and data between two host
files goes by ``os.copy_file_range``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from qsd.block.bitmap import DirtyBitmap
from qsd.block.filters.mirror_top import MirrorTopNode
from qsd.block.node import Node, Perm
from qsd.jobs.job import BlockJob
from qsd.qmp.errors import GenericError

if TYPE_CHECKING:
    from qsd.block.graph import Edge
    from qsd.daemon import Daemon

#: Most copies in flight at once (QEMU's MAX_IN_FLIGHT).
MAX_IN_FLIGHT = 16
#: Smallest largest copy (QEMU's MAX_IO_BYTES).
MAX_IO_BYTES = 1 << 20
DEFAULT_BUF_SIZE = 16 << 20
#: How long a ready job with nothing to copy waits before it looks again.
READY_POLL_S = 0.1


def default_granularity(target: Node) -> int:
    """The target's cluster size, clamped to 4K..64K (64K without clusters)."""
    cluster = target.cluster_size()
    if not cluster:
        return 1 << 16
    return min(max(cluster, 4096), 1 << 16)


def check_granularity(granularity: int) -> None:
    if granularity < 512 or granularity > 64 << 20:
        raise GenericError("Parameter 'granularity' expects a value in range [512B, 64MB]")
    if granularity & (granularity - 1):
        raise GenericError("Parameter 'granularity' expects a power of 2")


def chain_next(node: Node) -> Node | None:
    """The next image below ``node``: its backing file, or a filter's child."""
    edge = node.children.get("backing")
    if edge is None and node.is_filter:
        edge = node.children.get(getattr(node, "child_name", "file"))
    return edge.child if edge is not None else None


async def allocated_above(top: Node, base: Node | None, offset: int,
                          length: int) -> list[tuple[int, int]]:
    """Ranges of ``top`` whose data lies in an image above ``base`` (base
    excluded; ``None``: anywhere in the chain)."""
    layers = 0
    node: Node | None = top
    while node is not None and node is not base:
        if not node.is_filter:
            layers += 1
        node = chain_next(node)
    out: list[tuple[int, int]] = []
    pos, end = offset, offset + length
    while pos < end:
        extents = await top.block_status(pos, end - pos)
        for e in extents:
            stop = min(e.offset + e.length, end)
            if stop <= pos:
                continue
            if e.depth and (base is None or e.depth <= layers):
                if out and out[-1][0] + out[-1][1] == pos:
                    out[-1] = (out[-1][0], out[-1][1] + stop - pos)
                else:
                    out.append((pos, stop - pos))
            pos = stop
    return out


class Copier:
    """Moves one range from a source node to a target node the cheapest way."""

    def __init__(self, unmap: bool, target_zeroed: bool) -> None:
        self.unmap = unmap
        #: The target read as zeroes everywhere when the job began.
        self.target_zeroed = target_zeroed
        #: Buffers of finished copies, reused (no zero-filled allocation per copy).
        self._free: list[bytearray] = []

    async def copy(self, src: Node, dst: Node, offset: int, length: int) -> None:
        """Copy ``[offset, offset+length)``; OSError carries ``is_read``.
        Neighbouring data extents go as one read and one write."""
        pos, end = offset, offset + length
        while pos < end:
            try:
                extents = await src.block_status(pos, end - pos)
            except OSError as e:
                e.is_read = True  # type: ignore[attr-defined]
                raise
            run = 0  # bytes of data extents gathered from pos on
            for e in extents:
                stop = min(e.offset + e.length, end)
                if stop <= pos + run:
                    continue
                if e.data:
                    run = stop - pos
                    continue
                if run:
                    await self._copy_data(src, dst, pos, run)
                    pos += run
                    run = 0
                if not self.target_zeroed or not await _reads_zero(dst, pos, stop - pos):
                    try:
                        await dst.write_zeroes(pos, stop - pos, may_unmap=self.unmap)
                    except OSError as err:
                        err.is_read = False  # type: ignore[attr-defined]
                        raise
                pos = stop
            if run:
                await self._copy_data(src, dst, pos, run)
                pos += run

    async def _copy_data(self, src: Node, dst: Node, offset: int, length: int) -> None:
        s_map = src.host_extent(offset, length)
        d_map = dst.host_extent(offset, length) if s_map is not None else None
        if s_map is not None and d_map is not None:
            try:
                await asyncio.to_thread(_copy_file_range, s_map, d_map, length)
                return
            except OSError:
                pass  # e.g. EXDEV on old kernels: fall back to read/write
        buf = self._take(length)
        view = memoryview(buf)[:length]
        try:
            try:
                await src.read_into(offset, view)
            except OSError as e:
                e.is_read = True  # type: ignore[attr-defined]
                raise
            try:
                await dst.write(offset, view)
            except OSError as e:
                e.is_read = False  # type: ignore[attr-defined]
                raise
        finally:
            view.release()
            if len(self._free) < MAX_IN_FLIGHT:
                self._free.append(buf)

    def _take(self, length: int) -> bytearray:
        for i, buf in enumerate(self._free):
            if len(buf) >= length:
                return self._free.pop(i)
        return bytearray(length)


def _copy_file_range(src: tuple[int, int], dst: tuple[int, int], length: int) -> None:
    (sfd, soff), (dfd, doff) = src, dst
    done = 0
    while done < length:
        n = os.copy_file_range(sfd, dfd, length - done, soff + done, doff + done)
        if n <= 0:
            raise OSError(5, "short copy_file_range")
        done += n


async def _reads_zero(node: Node, offset: int, length: int) -> bool:
    pos, end = offset, offset + length
    while pos < end:
        extents = await node.block_status(pos, end - pos)
        for e in extents:
            if e.offset + e.length <= pos:
                continue
            if not e.zero:
                return False
            pos = min(e.offset + e.length, end)
    return True


class MirrorJob(BlockJob):
    """A mirror job, or (``job_type`` commit) an active commit."""

    job_type = "mirror"

    def __init__(self, daemon: "Daemon", job_id: str, source: Node, target: Node, *,
                 sync: str, base: Node | None = None, replaces: Node | None = None,
                 granularity: int = 0, buf_size: int = 0, on_source_error: str = "report",
                 on_target_error: str = "report", unmap: bool = True,
                 copy_mode: str = "background", filter_name: str | None = None,
                 commit: bool = False, zero_target: bool = True, auto_finalize: bool = True,
                 auto_dismiss: bool = True) -> None:
        super().__init__(daemon, job_id, auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
        if commit:
            self.job_type = "commit"
        self.graph = daemon.graph
        self.source = source
        self.target = target
        self.sync = sync
        self.base = base
        self.replaces = replaces or source
        self.granularity = granularity or default_granularity(target)
        self.buf_size = buf_size or DEFAULT_BUF_SIZE
        self.chunk = max(self.buf_size // MAX_IN_FLIGHT, MAX_IO_BYTES)
        self.chunk -= self.chunk % self.granularity
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        self.unmap = unmap
        self.write_blocking = copy_mode == "write-blocking"
        self.filter_name = filter_name
        self.filter: MirrorTopNode | None = None
        self.bitmap: DirtyBitmap | None = None
        self.src_edge: "Edge | None" = None
        self.top_edge: "Edge | None" = None
        self.tgt_edge: "Edge | None" = None
        self.tgt_block_edge: "Edge | None" = None
        self.should_complete = False
        #: sync=full copies every range (True) or only what the chain holds.
        self.zero_target = zero_target
        self._in_flight: dict[int, int] = {}  # chunk index -> bytes
        self._in_flight_bytes = 0
        self._drain: contextlib.AsyncExitStack | None = None
        #: True while the job opens a drained section of its own (it must not pause for it).
        self.own_drain = False
        self._pivoted = False
        self._copier = Copier(unmap, False)
        self._failure: BaseException | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: Undo steps run last in clean (an active commit's base made writable).
        self.after_clean: list[Callable[[], Awaitable[None]]] = []

    # ----- set-up ---------------------------------------------------------
    async def setup(self) -> None:
        """Insert the filter, take the job's edges and start tracking writes."""
        g = self.graph
        node = await g.insert_filter(MirrorTopNode, self.filter_name, self.source)
        self.filter = node
        try:
            desc = f"block device is in use by block job: {self.job_type}"
            self.top_edge = await g.attach_user(node, f"block job '{self.id}'",
                                                Perm(0), Perm.all(), blocker=desc)
            self.src_edge = await g.attach_user(self.source, f"block job '{self.id}'",
                                                Perm(0), Perm.all(), blocker=desc)
            shared = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED | Perm.WRITE | Perm.RESIZE
            self.tgt_edge = await g.attach_user(self.target, f"block job '{self.id}'",
                                                Perm.WRITE, shared)
            # QEMU's target is a BlockBackend of the job ("in use" to
            # blockdev-del) that also carries the job's op blocker ("busy"
            # to other jobs): two edges here.
            self.tgt_block_edge = await g.attach_user(self.target, f"block job '{self.id}'",
                                                      Perm(0), Perm.all(), blocker=desc)
        except BaseException:
            await self._remove_filter()
            raise
        self.bitmap = DirtyBitmap(None, self.source.size, self.granularity)
        self.source.dirty_bitmaps.append(self.bitmap)
        node.job = self

    # ----- the copy loop -----------------------------------------------
    async def run(self) -> None:
        try:
            await self._run()
        finally:
            await self._wait_in_flight()
            # QEMU ends a job from a bottom half: the events of its end
            # follow the reply of a command that was running it.
            await asyncio.sleep(0)

    async def _run(self) -> None:
        if self.source.size != self.target.size:
            raise GenericError("Source and target image have different sizes")
        assert self.bitmap is not None
        size = self.source.size
        self._copier.target_zeroed = await _reads_zero(self.target, 0, size) if size else True
        if self.sync == "full" and self.zero_target:
            self.bitmap.set_range(0, size)
        elif self.sync == "full":
            for off, length in await allocated_above(self.source, None, 0, size):
                self.bitmap.set_range(off, length)
        elif self.sync == "top":
            for off, length in await allocated_above(self.source, self.base, 0, size):
                self.bitmap.set_range(off, length)
        self._update_progress()
        await self._loop()

    def _update_progress(self) -> None:
        assert self.bitmap is not None
        dirty = min(self.bitmap.count(), self.source.size)
        self.progress_set_remaining(dirty + self._in_flight_bytes)

    async def _loop(self) -> None:
        assert self.bitmap is not None
        while True:
            if self._failure is not None:
                raise self._failure
            launched = self._start_copies(1 if self.speed else MAX_IN_FLIGHT)
            if launched:
                await self.throttle(launched)
                continue
            if self._in_flight:
                await self._wait_one()
                continue
            self._update_progress()
            if self.bitmap.count() == 0:
                if self.status == "running":
                    self.set_ready()
                if self.should_complete or self.cancel_requested:
                    await self._converge()
                    return
                await self.sleep(READY_POLL_S)
            else:
                await self.pause_point()

    def _start_copies(self, most: int) -> int:
        """Start copies of dirty runs not in flight, within the limits;
        the bytes they move."""
        assert self.bitmap is not None
        bm, gran = self.bitmap, self.granularity
        launched = 0
        pos = 0
        while (most and len(self._tasks) < MAX_IN_FLIGHT
               and self._in_flight_bytes < self.buf_size):
            start = bm.next_dirty(pos)
            if start < 0 or start >= self.source.size:
                break
            if start // gran in self._in_flight:
                pos = start + gran
                continue
            stop = min(bm.next_clean(start), start + self.chunk, self.source.size)
            # never overlap a run already in flight
            for idx in range(start // gran + 1, -(-stop // gran)):
                if idx in self._in_flight:
                    stop = idx * gran
                    break
            self._launch(start, stop - start)
            launched += stop - start
            most -= 1
            pos = stop
        return launched

    def _launch(self, offset: int, length: int) -> None:
        assert self.bitmap is not None
        self.bitmap.reset_range(offset, length)
        gran = self.granularity
        for idx in range(offset // gran, -(-(offset + length) // gran)):
            self._in_flight[idx] = length
        self._in_flight_bytes += length
        task = asyncio.get_running_loop().create_task(self._copy_one(offset, length))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _copy_one(self, offset: int, length: int) -> None:
        assert self.bitmap is not None
        try:
            await self._copier.copy(self.source, self.target, offset, length)
            ok = True
        except OSError as e:
            ok = False
            self.bitmap.set_range(offset, length)
            is_read = getattr(e, "is_read", True)
            policy = self.on_source_error if is_read else self.on_target_error
            if self.error_action(policy, is_read, e) == "report" and self._failure is None:
                self._failure = e
        finally:
            gran = self.granularity
            for idx in range(offset // gran, -(-(offset + length) // gran)):
                self._in_flight.pop(idx, None)
            self._in_flight_bytes -= length
        if ok:
            self.progress_update(length)
        self._update_progress()

    async def _wait_one(self) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_COMPLETED)

    async def _wait_in_flight(self) -> None:
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def _converge(self) -> None:
        """Drain the source and copy what is left: in sync (the source then
        stays drained until the job's graph change)."""
        assert self.bitmap is not None
        stack = contextlib.AsyncExitStack()
        self.own_drain = True
        try:
            await stack.enter_async_context(self.graph.drained(self.source))
        finally:
            self.own_drain = False
        try:
            await self._wait_in_flight()
            while self.bitmap.count():
                start = self.bitmap.next_dirty(0)
                stop = min(self.bitmap.next_clean(start), start + self.chunk, self.source.size)
                self._launch(start, stop - start)
                await self._wait_in_flight()
                if self._failure is not None:
                    raise self._failure
            await self.target.flush()
        except BaseException:
            await stack.aclose()
            raise
        self._drain = stack

    async def wait_paused(self) -> None:
        """For a drained section: until the job sits in a pause point (or
        is past the phase in which it runs)."""
        await asyncio.sleep(0)
        while (self.pause_count > 0 and not self.paused and not self.is_cancelled
               and self.status in ("running", "ready") and self._task is not None
               and not self._task.done()):
            await asyncio.sleep(0.001)

    async def wait_resumed(self) -> None:
        """After a drained section: until a job no longer asked to pause has
        left its pause point."""
        while (self.pause_count == 0 and self.paused and self._task is not None
               and not self._task.done()):
            await asyncio.sleep(0)

    async def pause_point(self) -> None:
        """As QEMU's mirror_pause: copies in flight finish before the job
        shows itself paused."""
        if self.pause_count > 0 and not self.is_cancelled:
            await self._wait_in_flight()
        await super().pause_point()

    # ----- write-blocking mode --------------------------------------------
    async def write_through(self, offset: int, length: int, *, data: Any = None,
                            zero: bool = False, may_unmap: bool = False,
                            discard: bool = False) -> None:
        """A write that reached the source goes to the target before it
        completes; chunks it covers entirely and that no copy is moving are
        then clean (partly covered ones stay dirty for the loop)."""
        assert self.bitmap is not None
        if self.status not in ("running", "ready", "standby", "paused"):
            return
        try:
            if data is not None:
                await self.target.write(offset, data)
            elif zero:
                await self.target.write_zeroes(offset, length, may_unmap=may_unmap)
            elif discard:
                return  # the source decides what a discard reads as: copy it
        except OSError as e:
            self.error_action(self.on_target_error, False, e)
            return
        self.progress_increase_remaining(length)
        self.progress_update(length)
        gran = self.granularity
        first, last = -(-offset // gran), (offset + length) // gran
        for idx in range(first, last):
            if idx not in self._in_flight:
                self.bitmap.reset_range(idx * gran, gran)

    # ----- verbs ----------------------------------------------------------
    def complete(self) -> None:
        self.should_complete = True

    def on_cancel(self, force: bool) -> bool:
        return force or self.status not in ("ready", "standby")

    # ----- finalization ---------------------------------------------------
    async def commit(self) -> None:
        """Pivot: the target takes the replaced node's place."""
        if not self.should_complete or self.cancel_requested or self.filter is None:
            return
        g = self.graph
        async with self._drained_for_change():
            own = [self.top_edge] if self.top_edge is not None else []
            if self.replaces is self.source:
                g.replace_node(self.filter, self.target, exclude=own)
            else:
                g.replace_node(self.replaces, self.target)
                g.replace_node(self.filter, self.source, exclude=own)
        self._pivoted = True

    @contextlib.asynccontextmanager
    async def _drained_for_change(self) -> Any:
        if self._drain is not None:
            yield
        else:
            async with self.graph.drained(self.source):
                yield

    async def clean(self) -> None:
        """Drop the bitmap, the filter and the job's edges; end the drain."""
        await self._wait_in_flight()
        if self.bitmap is not None and self.bitmap in self.source.dirty_bitmaps:
            self.source.dirty_bitmaps.remove(self.bitmap)
        if self.filter is not None:
            self.filter.release_job()
        try:
            await self._remove_filter()
        finally:
            for edge in (self.src_edge, self.tgt_edge, self.tgt_block_edge):
                if edge is not None:
                    await self.graph.detach(edge)
            self.src_edge = self.tgt_edge = self.tgt_block_edge = None
            if self._drain is not None:
                drain, self._drain = self._drain, None
                await drain.aclose()
            while self.after_clean:
                await self.after_clean.pop()()

    async def _remove_filter(self) -> None:
        node, self.filter = self.filter, None
        if node is None:
            return
        g = self.graph
        own = [self.top_edge] if self.top_edge is not None else []
        if len(node.parents) > len(own):
            async with self._drained_for_change():
                g.replace_node(node, self.source, exclude=own)
        if self.top_edge is not None:
            edge, self.top_edge = self.top_edge, None
            await g.detach(edge)
        if g.nodes.get(node.node_name) is node:
            del g.nodes[node.node_name]
            edge = node.children.get("backing")
            if edge is not None:
                await g.detach(edge)
            await node.close()


async def start_mirror(daemon: "Daemon", job: MirrorJob, speed: int, has_speed: bool) -> None:
    """Speed, set-up and start, discarding the job if any of it fails."""
    try:
        if has_speed:
            await job.set_speed(speed)
        await job.setup()
    except BaseException:
        job.discard()
        raise
    await job.start()
