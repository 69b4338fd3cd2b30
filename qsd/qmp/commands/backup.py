# SPDX-License-Identifier: GPL-2.0-or-later
"""blockdev-backup and drive-backup, as transaction actions and commands.

Like QSD, the stand-alone commands are one-action transactions: prepare
drains the device and creates the job (its filter already in place), commit
starts it, clean ends the drain. A job created inside a drained section is
paused from the start, so it shows running, paused and (when the last
drain on its device ends) running again before the command replies.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from qsd.block.node import Node, Role
from qsd.jobs.backup import BackupJob, create_backup, drain_all, jobs_on, pause_jobs, resume_jobs
from qsd.jobs.job import BlockJob
from qsd.jobs.txn import JobTxn
from qsd.qmp.actions import Action, action

if TYPE_CHECKING:
    from qsd.daemon import Daemon

#: Per device node (by id): the backup actions whose drained section is
#: still open, and the jobs they paused. The jobs resume, newest first, when
#: the last of those sections ends (QEMU resumes them with the node's drain).
_DRAINS: dict[int, tuple[list["_BackupAction"], list[BlockJob]]] = {}


class _BackupAction(Action):
    """Shared by both commands; subclasses find or open the target."""

    #: Set by ``transaction`` when its completion-mode is grouped.
    job_txn: JobTxn | None = None

    def __init__(self, daemon: "Daemon", args: dict[str, Any],
                 properties: dict[str, Any] | None = None) -> None:
        super().__init__(daemon, args, properties)
        self.job: BackupJob | None = None
        self._source: Node | None = None
        self._drain: contextlib.AsyncExitStack | None = None

    async def _begin_drain(self, source: Node) -> None:
        """Drain the device; running jobs on it or above it pause until the
        last drain of the transaction on it ends."""
        self._source = source
        actions, jobs = _DRAINS.setdefault(id(source), ([], []))
        actions.append(self)
        holders = jobs_on(self.daemon, self.daemon.graph._ancestors(source))
        jobs[:0] = await pause_jobs(j for j in holders if j not in jobs)
        self._drain = contextlib.AsyncExitStack()
        await self._drain.enter_async_context(self.daemon.graph.drained(source))

    async def _target(self, source: Node) -> Node:
        raise NotImplementedError

    async def prepare(self) -> None:
        graph = self.daemon.graph
        source = graph.find(self.args["device"], None)
        if not self.properties:     # the command alone is a transaction of its own
            await drain_all(self.daemon)
        await self._begin_drain(source)
        target = await self._target(source)
        self.job = await create_backup(self.daemon, self.args, source, target, self.job_txn)
        self.job.pause()
        _DRAINS[id(source)][1].append(self.job)

    async def commit(self) -> None:
        if self.job is not None:
            await self.job.start()

    async def abort(self) -> None:
        job, self.job = self.job, None
        # A job of a group may be gone already (the group aborted with the first).
        if job is not None and job.status != "null":
            await job.cancel_sync()

    async def clean(self) -> None:
        if self._drain is None or self._source is None:
            return
        await self._drain.aclose()
        self._drain = None
        actions, jobs = _DRAINS[id(self._source)]
        actions.remove(self)
        if actions:
            return
        del _DRAINS[id(self._source)]
        # New jobs newest first, then the ones that were running before.
        await resume_jobs(j for j in reversed(jobs) if j.pause_count > 0)
        for job in reversed(jobs):
            if isinstance(job, BackupJob):
                await job.wait_if_idle()


@action("blockdev-backup")
class BlockdevBackupAction(_BackupAction):
    """The target is an existing node."""

    async def _target(self, source: Node) -> Node:
        return self.daemon.graph.find(self.args["target"], None)

    async def prepare(self) -> None:
        # QSD looks both nodes up before it drains the device.
        graph = self.daemon.graph
        graph.find(self.args["device"], None)
        graph.find(self.args["target"], None)
        await super().prepare()


@action("drive-backup")
class DriveBackupAction(_BackupAction):
    """The target is an image file, created first unless mode=existing."""

    async def _target(self, source: Node) -> Node:
        from qsd.qmp.commands.blockjobs import create_image, open_image

        args = self.args
        mode = args.get("mode", "absolute-paths")
        fmt = args.get("format") or (None if mode == "existing" else source.driver)
        sync = args["sync"]
        backing = _cow_child(source)
        if sync == "top" and backing is None:
            sync = "full"
            self.args = dict(args, sync="full")
        if sync == "none":
            backing = source
        elif sync != "top":
            backing = None
        if mode != "existing":
            assert fmt is not None
            if backing is not None:
                await create_image(self.daemon, args["target"], fmt, source.size,
                                   backing.filename, backing.driver)
            else:
                await create_image(self.daemon, args["target"], fmt, source.size)
        target = await open_image(self.daemon, args["target"], fmt, None)
        if sync == "none" and "backing" not in target.children:
            try:
                await self.daemon.graph.attach(target, "backing", source, Role.COW)
            except BaseException:
                await self.daemon.graph.close_node(target)
                raise
        self._opened = target
        return target

    async def prepare(self) -> None:
        self._opened: Node | None = None
        try:
            await super().prepare()
        finally:
            # The job holds the target now; the command's own reference goes.
            opened, self._opened = self._opened, None
            if opened is not None and not opened.parents:
                await self.daemon.graph.close_node(opened)


def _cow_child(node: Node) -> Node | None:
    """The first backing file below ``node`` and the filters above it."""
    while node.is_filter:
        node = node.children[getattr(node, "child_name", "file")].child
    edge = node.children.get("backing")
    return edge.child if edge is not None else None
