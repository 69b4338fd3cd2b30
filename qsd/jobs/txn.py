# SPDX-License-Identifier: GPL-2.0-or-later
"""Job transactions: the jobs a ``transaction`` with completion-mode=grouped
starts complete, or fail, together (QEMU's JobTxn).

A job of a group that finishes its work waits (status ``waiting``) until
every job of the group has; then all go ``pending`` and are finalized
together (each one's ``prepare`` first, then ``commit`` for all). When one
fails or is cancelled, every other job of the group is force-cancelled and
all of them are aborted. QEMU keeps the group's jobs newest first, so that
is the order in which they change status and send their events.

:class:`TxnJobMixin` plugs this into a job's end (the framework's
``_run_finished``/``_finalize``/``_abort`` steps); a job with no group
behaves exactly as the framework says on its own.
"""

from __future__ import annotations

import asyncio
from typing import Any

from qsd.jobs.job import CANCELED_TEXT, Job, error_text
from qsd.qmp.errors import QMPError

#: Statuses of a job that has not finished its run yet (QEMU: !job_is_completed).
_UNFINISHED = frozenset({"created", "running", "paused", "ready", "standby"})


class JobTxn:
    """The jobs of one grouped transaction."""

    def __init__(self) -> None:
        self.jobs: list["TxnJobMixin"] = []
        self.aborting = False

    def add(self, job: "TxnJobMixin") -> None:
        self.jobs.insert(0, job)        # newest first, as QEMU lists them
        job.txn = self

    def remove(self, job: "TxnJobMixin") -> None:
        if job in self.jobs:
            self.jobs.remove(job)
        job.txn = None

    async def job_succeeded(self, job: "TxnJobMixin") -> None:
        """``job`` is waiting; once all are, move them on together."""
        if any(j.status in _UNFINISHED for j in self.jobs):
            return
        for j in list(self.jobs):
            j.state.transition("pending")
            if not j.auto_finalize:
                j._event_pending()
        if all(j.auto_finalize for j in self.jobs):
            await self.finalize()

    async def finalize(self) -> None:
        """job-finalize (or auto-finalize) of the group: prepare all, then
        commit all, or abort all if a prepare failed."""
        for j in list(self.jobs):
            j._finalizing = True
        for j in list(self.jobs):
            try:
                await j.prepare()
            except (QMPError, OSError) as exc:
                j.error = error_text(exc)
                await self.abort(j)
                return
        for j in list(self.jobs):
            await self._finalize_single(j)

    async def abort(self, failed: "TxnJobMixin") -> None:
        """``failed`` failed or was cancelled: cancel the others, wait for
        them to stop, then abort every job of the group."""
        if self.aborting:
            return
        self.aborting = True
        for j in list(self.jobs):
            if j is not failed:
                j.cancel_for_txn()
        while self.jobs:
            # (Cleaning a job up may drain nodes a cancelled job of the group
            # works on: that job then stops during the clean-up already.)
            job = self.jobs[0]
            await job.stopped()
            await self._finalize_single(job)

    async def _finalize_single(self, job: "TxnJobMixin") -> None:
        job._finalizing = True
        if job.error is None and job.is_cancelled:
            job.error = CANCELED_TEXT
        if job.error is not None:
            job.state.transition("aborting")
            await job._hook(job.abort)
        else:
            await job._hook(job.commit)
        await job._hook(job.clean)
        if job._task is not None:
            job._event_finished()
        self.remove(job)
        job._conclude()


class TxnJobMixin(Job):
    """A job that may belong to a :class:`JobTxn` (backup jobs)."""

    txn: JobTxn | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Set once run() is over (the job is waiting or aborting).
        self._run_done = asyncio.Event()

    async def stopped(self) -> None:
        """Wait until run() is over (a cancelled job is woken to notice)."""
        if self._task is not None and not self._task.done() and not self._run_done.is_set():
            self.enter()
            await self._run_done.wait()

    def cancel_for_txn(self) -> None:
        """Another job of the group failed: a forced cancel that the group
        carries out (no events of its own here)."""
        if self.user_paused:
            self.user_paused = False
            self._user_resumed()
            self.pause_count -= 1
        self.cancelled = True
        self.force_cancel = True

    async def _run_finished(self) -> None:
        txn = self.txn
        if txn is None:
            await super()._run_finished()
            return
        if self.error is None and self.is_cancelled:
            self.error = CANCELED_TEXT
        if self.error is not None:
            self.state.transition("aborting")
            self._run_done.set()
            await txn.abort(self)
            return
        self.state.transition("waiting")
        self._run_done.set()
        await txn.job_succeeded(self)

    async def _finalize(self) -> None:
        if self.txn is None:
            await super()._finalize()
        else:
            await self.txn.finalize()

    async def _abort(self) -> None:
        txn = self.txn
        if txn is None:
            await super()._abort()
            return
        self._finalizing = True
        self.state.transition("aborting")
        self._run_done.set()
        await txn.abort(self)
