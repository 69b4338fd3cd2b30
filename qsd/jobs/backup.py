# SPDX-License-Identifier: GPL-2.0-or-later
"""The backup job (blockdev-backup, drive-backup): a point-in-time copy.

:func:`create_backup` does what QEMU does before the job exists (argument
checks with QSD's texts, freezing the sync bitmap, inserting a
copy-before-write filter above the device) and creates the job. From then
on every change to the device first copies the old data of the clusters it
touches to the target (the filter), and the job copies all other clusters
of its copy bitmap in the background through the same
:class:`~qsd.block.filters.copy_before_write.BlockCopy`, so each cluster
reaches the target once, with its contents as of the job's start.

Sync modes: ``full`` copies everything (zero areas as zero writes),
``top`` skips clusters not allocated in the device's own layer, ``bitmap``
(and ``incremental``) only the dirty clusters of the bitmap, ``none``
copies nothing itself and only serves the filter until cancelled.

The bitmap (QEMU's successor scheme): while the job runs, the user's bitmap
is frozen (``busy``) and a fresh anonymous successor records new writes.
At the end either the successor's bits replace the bitmap's (``on-success``
after success, ``always``; with ``always`` after a failure the clusters
that were not copied are added back) or they are merged into it
(``never``, or a failure with ``on-success``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

from qsd.block.bitmap import DirtyBitmap
from qsd.block.filters.copy_before_write import (BlockCopy, CopyBeforeWriteNode, CopyError,
                                                 find_bitmap)
from qsd.block.node import Node, Perm
from qsd.jobs.job import BlockJob, Job, check_not_busy
from qsd.jobs.ratelimit import RateLimit
from qsd.jobs.txn import JobTxn, TxnJobMixin
from qsd.qmp.errors import GenericError, QMPError

if TYPE_CHECKING:
    from qsd.block.graph import Edge
    from qsd.daemon import Daemon

#: The op blocker a block job puts on its nodes (blockdev-del shows it).
BLOCKER = "block device is in use by block job: backup"


class SyncBitmap:
    """A user's bitmap frozen for a backup, with the successor that records
    writes meanwhile (QEMU's create_successor/abdicate/reclaim)."""

    def __init__(self, node: Node, bitmap: DirtyBitmap, mode: str) -> None:
        self.node = node
        self.bitmap = bitmap
        self.mode = mode
        self.successor = DirtyBitmap(None, bitmap.size, bitmap.granularity,
                                     enabled=bitmap.enabled)
        node.dirty_bitmaps.append(self.successor)
        # The bitmap stays enabled when it was, as QEMU reports it (recording
        # through its successor); whatever it records meanwhile is also in the
        # successor, which is all that counts at the end.
        bitmap.busy = True

    def _take_successor_place(self) -> None:
        """The bitmap moves to the successor's place in the node's list
        (in QEMU the successor takes over the name)."""
        bitmaps = self.node.dirty_bitmaps
        if self.successor in bitmaps:
            if self.bitmap in bitmaps:
                bitmaps.remove(self.bitmap)
            bitmaps[bitmaps.index(self.successor)] = self.bitmap

    def abdicate(self) -> None:
        """The successor's bits (writes since the job started) become the bitmap."""
        self.bitmap.clear()
        self.bitmap.merge_from(self.successor)
        self.bitmap.enabled = self.successor.enabled
        self.bitmap.busy = False
        self._take_successor_place()

    def reclaim(self) -> None:
        """The successor's bits are added to the bitmap, which goes on as before."""
        self.bitmap.merge_from(self.successor)
        self.bitmap.enabled = self.successor.enabled
        self.bitmap.busy = False
        if self.successor in self.node.dirty_bitmaps:
            self.node.dirty_bitmaps.remove(self.successor)

    def finish(self, success: bool, not_copied: DirtyBitmap) -> None:
        sync = (success or self.mode == "always") and self.mode != "never"
        if sync:
            self.abdicate()
        else:
            self.reclaim()
        if not success and self.mode == "always":
            self.bitmap.merge_from(not_copied)


class CopyRateLimit(RateLimit):
    """QEMU's block-copy keeps what the current window already sent when the
    speed changes: a slower limit does not let the next copy go at once."""

    def set_speed(self, speed: int) -> None:
        self.speed = speed


class BackupJob(TxnJobMixin, BlockJob):
    """Copies what the copy bitmap says, alongside the filter's copies."""

    job_type = "backup"

    def __init__(self, daemon: "Daemon", job_id: str, *, cbw: CopyBeforeWriteNode, target: Node,
                 sync: str, sync_bitmap: SyncBitmap | None, on_source_error: str,
                 on_target_error: str, max_workers: int, max_chunk: int,
                 auto_finalize: bool, auto_dismiss: bool) -> None:
        super().__init__(daemon, job_id, auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
        self.limit = CopyRateLimit()
        assert cbw.bcs is not None
        self.cbw = cbw
        self.bcs: BlockCopy = cbw.bcs
        self.target = target
        self.sync = sync
        self.sync_bitmap = sync_bitmap
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        self.max_workers = max_workers
        self.max_chunk = max_chunk
        self.edges: list["Edge"] = []
        self.bcs.on_done = self.progress_update
        self.bcs.on_remaining = self.progress_set_remaining
        if sync == "bitmap" and sync_bitmap is not None:
            self.bcs.copy_bitmap.clear()
            self.bcs.copy_bitmap.merge_from(sync_bitmap.bitmap)
        elif sync == "top":
            self.bcs.skip_unallocated = True
        self.progress_set_remaining(self.bcs.copy_bitmap.count())
        #: Nothing to copy (an empty incremental backup): the job ends
        #: without any I/O of its own.
        self.idle = sync != "none" and self.bcs.copy_bitmap.count() == 0

    async def user_cancel(self, force: bool) -> None:
        """With no copy in flight, QSD ends the job (and its group) before it
        replies to the cancel, as nothing has to be waited for; otherwise
        the reply comes first."""
        idle = self.bcs.in_flight_bytes == 0
        group = list(self.txn.jobs) if self.txn is not None else [self]
        await super().user_cancel(force)
        if idle:
            for job in group:
                await job._gone_or_concluded.wait()

    async def wait_if_idle(self) -> None:
        """QSD ends a job that has nothing to copy (and its whole group, if
        all of it is so) before the command that started it replies."""
        group = list(self.txn.jobs) if self.txn is not None else [self]
        if not all(isinstance(j, BackupJob) and j.idle for j in group):
            return
        for job in group:
            while not (job.status in ("concluded", "null")
                       or (job.status == "pending" and not job.auto_finalize)):
                await asyncio.sleep(0.001)

    async def attach(self) -> None:
        """The job's own edges on the filter and the target (no permissions,
        only the op blocker that blockdev-del reports)."""
        g = self.daemon.graph
        for node in (self.cbw, self.target):
            self.edges.append(await g.attach_user(node, f"block job '{self.id}'", Perm(0),
                                                  Perm.all(), blocker=BLOCKER))

    async def run(self) -> None:
        if self.sync == "top":
            await self._drop_unallocated()
        if self.sync == "none":
            while True:         # the filter does all the copying; until cancelled
                await self.yield_()
        while True:
            try:
                await self.bcs.copy(0, self.bcs.size, throttle=self._throttle,
                                    max_workers=self.max_workers, max_chunk=self.max_chunk)
                return
            except CopyError as err:
                policy = self.on_source_error if err.is_read else self.on_target_error
                if self.error_action(policy, err.is_read, err) == "report":
                    raise
                await self.pause_point()

    async def _throttle(self, nbytes: int) -> None:
        """After launching a copy: wait as the speed limit says, however often
        the wait is interrupted. Without a delay the next copy starts at once
        (QEMU launches its copies without yielding in between), unless a
        pause or cancel is pending."""
        delay = self.limit.delay(nbytes)
        if delay <= 0 and (self.pause_count > 0 or self.is_cancelled):
            await self.pause_point()
        while delay > 0:
            await self.sleep(delay)
            delay = self.limit.delay(0)     # woken early (a pause): still owed?

    async def _drop_unallocated(self) -> None:
        """sync=top: clusters the device's own layer does not allocate need
        no copy (the target shares the backing chain)."""
        source = self.bcs.source.child
        pos = 0
        try:
            while pos < self.bcs.size:
                if self.is_cancelled:
                    return
                extents = await source.block_status(pos, self.bcs.size - pos)
                if not extents:
                    break
                for e in extents:
                    if e.depth != 1:
                        self.bcs.reset(e.offset, e.length)
                    pos = e.offset + e.length
        finally:
            self.bcs.skip_unallocated = False

    async def commit(self) -> None:
        if self.sync_bitmap is not None:
            self.sync_bitmap.finish(True, self.bcs.copy_bitmap)

    async def abort(self) -> None:
        if self.sync_bitmap is not None:
            self.sync_bitmap.finish(False, self.bcs.copy_bitmap)

    async def clean(self) -> None:
        """Drop the job's edges and the filter (its users go back to the node below)."""
        edges, self.edges = self.edges, []
        for edge in edges:
            await self.daemon.graph.detach(edge)
        await remove_filter(self.daemon, self.cbw)


async def remove_filter(daemon: "Daemon", cbw: CopyBeforeWriteNode) -> None:
    """QEMU's bdrv_cbw_drop: the filter's users move to its child and the
    filter closes (detaching its last user may have closed it already)."""
    g = daemon.graph
    if cbw.parents:
        async with g.drained(cbw), paused_jobs_above(daemon, cbw):
            g.replace_node(cbw, cbw.filtered)
    if g.nodes.get(cbw.node_name) is cbw:
        await g.close_node(cbw)


@contextlib.asynccontextmanager
async def paused_jobs_above(daemon: "Daemon", node: Node) -> AsyncIterator[None]:
    """A drained section pauses the running jobs that work on the node or
    above it until it ends (QEMU pauses a job whose node is drained)."""
    jobs = await pause_jobs(jobs_on(daemon, daemon.graph._ancestors(node)))
    try:
        yield
    finally:
        await resume_jobs(jobs)


_JOB_USER = re.compile(r"block job '(.+)'\Z")


def jobs_on(daemon: "Daemon", nodes: Iterable[Node]) -> list[BlockJob]:
    """The block jobs holding one of ``nodes`` (their root edges say so), newest first."""
    ids = set()
    for node in nodes:
        for edge in node.parents:
            m = _JOB_USER.match(edge.user_desc) if edge.parent is None else None
            if m:
                ids.add(m.group(1))
    return [j for j in daemon.jobs.newest_first() if isinstance(j, BlockJob) and j.id in ids]


async def pause_jobs(jobs: Iterable[BlockJob]) -> list[BlockJob]:
    """Pause the running (or ready) ones, oldest first, and wait until they
    sit in a pause point, as a drained section does (a cancelled job ends
    there instead); returns those it paused."""
    active = [j for j in jobs if j.status in ("running", "ready")]
    active.sort(key=lambda j: j.daemon.jobs.newest_first().index(j), reverse=True)
    for job in active:
        job.pause()
    for job in active:
        for _ in range(5000):       # a job reaches its pause point after its copies in flight
            if job.paused or job.status not in ("running", "ready"):
                break
            await asyncio.sleep(0.001)
    return active


async def resume_jobs(jobs: Iterable[BlockJob]) -> None:
    for job in jobs:
        job.resume()
        await Job.settle()


async def drain_all(daemon: "Daemon") -> None:
    """QEMU's bdrv_drain_all() that every transaction starts with: each
    running block job pauses and goes on again."""
    await resume_jobs(await pause_jobs(j for j in daemon.jobs.newest_first()
                                       if isinstance(j, BlockJob)))


def _check_bitmap(bitmap: DirtyBitmap, allow_ro: bool) -> None:
    """QEMU's bdrv_dirty_bitmap_check."""
    if bitmap.busy:
        raise GenericError(f"Bitmap '{bitmap.name}' is currently in use by another operation "
                           f"and cannot be used")
    if not allow_ro and bitmap.readonly:
        raise GenericError(f"Bitmap '{bitmap.name}' is readonly and cannot be modified")
    if bitmap.inconsistent:
        raise GenericError(f"Bitmap '{bitmap.name}' is inconsistent and cannot be used")


async def create_backup(daemon: "Daemon", args: dict[str, Any], source: Node, target: Node,
                        txn: JobTxn | None = None) -> BackupJob:
    """Checks, bitmap freeze, filter, job: everything before the job starts.
    On failure nothing is left behind."""
    sync = args["sync"]
    bitmap_name = args.get("bitmap")
    mode = args.get("bitmap-mode")
    if sync in ("bitmap", "incremental") and bitmap_name is None:
        raise GenericError(f"must provide a valid bitmap name for '{sync}' sync mode")
    if sync == "incremental":
        if mode is not None and mode != "on-success":
            raise GenericError("Bitmap sync mode must be 'on-success' when using sync mode "
                               "'incremental'")
        sync, mode = "bitmap", "on-success"
    bitmap = None
    if bitmap_name is not None:
        bitmap = find_bitmap(source, bitmap_name)
        if bitmap is None:
            raise GenericError(f"Bitmap '{bitmap_name}' could not be found")
        if mode is None:
            raise GenericError("Bitmap sync mode must be given when providing a bitmap")
        _check_bitmap(bitmap, allow_ro=True)
        if sync == "none":
            raise GenericError("sync mode 'none' does not produce meaningful bitmap outputs")
        if mode == "never" and sync != "bitmap":
            raise GenericError(f"Bitmap sync mode 'never' has no meaningful effect when "
                               f"combined with sync mode '{sync}'")
    elif mode is not None:
        raise GenericError("Cannot specify bitmap sync mode without a bitmap")

    if source is target:
        raise GenericError("Source and target cannot be the same")
    compress = bool(args.get("compress"))
    if compress and not callable(getattr(target, "write_compressed", None)):
        # QEMU names the target's BlockBackend here, which QSD never has.
        raise GenericError("Compression is not supported for this drive ")
    # Another backup's blockers sit on its filter and target, not on the
    # source, so the same device can be backed up twice (as in QEMU).
    check_not_busy(source)
    check_not_busy(target)
    perf = args.get("x-perf", {})
    max_workers = perf.get("max-workers", 64)
    max_chunk = perf.get("max-chunk", 0)
    if not 1 <= max_workers <= 0x7fffffff:
        raise GenericError("max-workers must be between 1 and 2147483647")
    if max_chunk < 0:
        raise GenericError("max-chunk must be zero (which means no limit) or positive")

    frozen = None
    if bitmap is not None:
        if mode != "never":
            _check_bitmap(bitmap, allow_ro=False)
        frozen = SyncBitmap(source, bitmap, mode)
    cbw: CopyBeforeWriteNode | None = None
    try:
        if target.size != source.size:
            raise GenericError("Source and target image have different sizes")
        cbw = await insert_filter(daemon, source, target, args.get("filter-node-name"))
        assert cbw.bcs is not None
        cbw.bcs.compress = compress
        if max_chunk and max_chunk < cbw.bcs.cluster_size:
            raise GenericError(f"Required max-chunk ({max_chunk}) is less than backup cluster "
                               f"size ({cbw.bcs.cluster_size})")
        job = BackupJob(daemon, args.get("job-id", ""), cbw=cbw, target=target, sync=sync,
                        sync_bitmap=frozen, on_source_error=args.get("on-source-error", "report"),
                        on_target_error=args.get("on-target-error", "report"),
                        max_workers=max_workers, max_chunk=max_chunk,
                        auto_finalize=args.get("auto-finalize", True),
                        auto_dismiss=args.get("auto-dismiss", True))
    except BaseException:
        if frozen is not None:
            frozen.reclaim()
        if cbw is not None:
            await remove_filter(daemon, cbw)
        raise
    try:
        await job.set_speed(args.get("speed", 0))
        await job.attach()
    except BaseException:
        frozen = job.sync_bitmap
        job.sync_bitmap = None
        if frozen is not None:
            frozen.reclaim()
        await job.clean()
        job.discard()
        raise
    if txn is not None:
        txn.add(job)
    return job


async def insert_filter(daemon: "Daemon", source: Node, target: Node,
                        name: str | None) -> CopyBeforeWriteNode:
    """QEMU's bdrv_cbw_append: open the filter over ``source`` and move every
    user of ``source`` onto it (call inside a drained section of source)."""
    g = daemon.graph
    options: dict[str, Any] = {"driver": "copy-before-write", "file": source.node_name,
                               "target": target.node_name}
    if name is not None:
        options["node-name"] = name
    try:
        cbw = await g.open_node(options)
    except QMPError as err:
        raise GenericError(f"Could not create node: {err.desc}") from None
    assert isinstance(cbw, CopyBeforeWriteNode)
    # Users below the filter stay (QEMU's should_update_child): a fleecing
    # target's backing edge on the source must not loop back to the filter.
    below: set[int] = set()
    stack: list[Node] = [cbw]
    while stack:
        for edge in stack.pop().children.values():
            if id(edge.child) not in below:
                below.add(id(edge.child))
                stack.append(edge.child)
    keep = [e for e in source.parents if e.parent is not None and id(e.parent) in below]
    try:
        g.replace_node(source, cbw, exclude=keep)
    except QMPError as err:
        await g.close_node(cbw)
        raise GenericError(f"Could not replace node: {err.desc}") from None
    return cbw
