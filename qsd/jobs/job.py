# SPDX-License-Identifier: GPL-2.0-or-later
"""Jobs: long-running operations with QEMU 7.2's life cycle.

A job is a :class:`Job` subclass whose :meth:`Job.run` coroutine does the
work as an asyncio task.  Everything around it is the framework's, so that
every job type behaves like QSD's on the wire:

* statuses change only through :class:`StateMachine` (the transition table
  is :data:`TRANSITIONS`), each change sending ``JOB_STATUS_CHANGE``, and
  ``null`` once as the job goes away;
* the QMP verbs (cancel, pause, resume, set-speed, complete, finalize,
  dismiss) are checked against :data:`VERBS` with QSD's error texts;
* after ``run`` the job goes waiting → pending → (finalize: ``prepare``,
  ``commit``, ``clean``) → concluded, or, when it failed or was
  force-cancelled, aborting → (``abort``, ``clean``) → concluded; with
  ``auto-finalize``/``auto-dismiss`` off it stops in pending/concluded for
  job-finalize/job-dismiss;
* pausing, cancelling and rate limiting happen at the pause points the job
  reaches (:meth:`Job.pause_point`, :meth:`Job.sleep`, :meth:`Job.yield_`):
  a force-cancelled job gets :class:`JobCancelled` raised there.

Timing follows QEMU's coroutines: a verb that wakes the job lets it run up
to its next wait before the command replies (:meth:`Job.settle`), so a job
that finishes without real I/O has sent all its events before the reply,
and one waiting for the disk sends them after it, as in QSD.
"""

from __future__ import annotations

import abc
import asyncio
import errno
import logging
import os
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar

from qsd.jobs.ratelimit import RateLimit
from qsd.qmp.errors import DeviceNotActive, GenericError, QMPError

if TYPE_CHECKING:
    from qsd.block.node import Node
    from qsd.daemon import Daemon

log = logging.getLogger("qsd.jobs")

#: Legal status changes of QEMU 7.2 (JobStatus values); aborting may repeat.
TRANSITIONS: dict[str, frozenset[str]] = {
    "undefined": frozenset({"created"}),
    "created": frozenset({"running", "aborting", "null"}),
    "running": frozenset({"paused", "ready", "waiting", "aborting"}),
    "paused": frozenset({"running"}),
    "ready": frozenset({"standby", "waiting", "aborting"}),
    "standby": frozenset({"ready"}),
    "waiting": frozenset({"pending", "aborting"}),
    "pending": frozenset({"concluded", "aborting"}),
    "aborting": frozenset({"concluded", "aborting"}),
    "concluded": frozenset({"null"}),
    "null": frozenset(),
}

_ACTIVE = frozenset({"created", "running", "paused", "ready", "standby"})

#: The statuses in which each QMP verb is accepted.
VERBS: dict[str, frozenset[str]] = {
    "cancel": _ACTIVE | {"waiting", "pending"},
    "pause": _ACTIVE,
    "resume": _ACTIVE,
    "set-speed": _ACTIVE,
    "complete": frozenset({"ready", "standby"}),
    "finalize": frozenset({"pending"}),
    "dismiss": frozenset({"concluded"}),
}

_JOB_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")

#: query-jobs' error for a force-cancelled job (strerror(ECANCELED)).
CANCELED_TEXT = os.strerror(errno.ECANCELED)


class JobCancelled(Exception):
    """Raised at a pause point of a force-cancelled job; ``run`` may clean up
    in ``finally`` and let it through."""


def error_text(exc: BaseException) -> str:
    """The text QSD shows for a job failure (query-jobs, BLOCK_JOB_COMPLETED)."""
    if isinstance(exc, QMPError):
        return exc.desc
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


class StateMachine:
    """A job's status; every change is checked against :data:`TRANSITIONS`."""

    def __init__(self, job_id: str, on_change: Callable[[str], None]) -> None:
        self.job_id = job_id
        self.status = "undefined"
        self._on_change = on_change

    def transition(self, new: str) -> None:
        """Move to ``new``; an illegal move is a bug in the job, not a user error."""
        if new not in TRANSITIONS[self.status]:
            raise RuntimeError(f"job {self.job_id}: illegal transition {self.status} -> {new}")
        old, self.status = self.status, new
        if new != old:
            self._on_change(new)

    def check_verb(self, verb: str) -> None:
        """Refuse ``verb`` in the current status with QSD's text."""
        if self.status not in VERBS[verb]:
            raise GenericError(f"Job '{self.job_id}' in state '{self.status}' "
                               f"cannot accept command verb '{verb}'")


class Job(abc.ABC):
    """Base of every job; subclasses set :attr:`job_type` and write :meth:`run`.

    Subclass hooks, all optional: :meth:`prepare` (may fail, turning success
    into an abort), :meth:`commit`, :meth:`abort`, :meth:`clean`,
    :meth:`complete` (job-complete on a ready job), :meth:`on_cancel`
    (decide whether a cancel is forced).
    """

    #: The JobType value (query-jobs ``type``).
    job_type: ClassVar[str] = ""

    def __init__(self, daemon: "Daemon", job_id: str, *, auto_finalize: bool = True,
                 auto_dismiss: bool = True) -> None:
        daemon.jobs.check_new_id(job_id)
        self.daemon = daemon
        self.id = job_id
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.state = StateMachine(job_id, self._status_changed)
        #: Pause requests in effect (user, error stop, drain); >0 means pause.
        self.pause_count = 0
        #: Whether one of those requests is the user's (job-pause, error stop).
        self.user_paused = False
        #: True while the job sits in a pause point.
        self.paused = False
        #: False while the job waits in a pause point, sleep or yield.
        self.busy = False
        self.cancelled = False
        self.force_cancel = False
        self.progress_current = 0
        self.progress_total = 0
        #: Why the job failed (or "Operation canceled"); None while it has not.
        self.error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._finalizing = False
        self._gone_or_concluded = asyncio.Event()
        daemon.jobs.add(self)
        self.state.transition("created")

    # ----- what subclasses write -----------------------------------------
    @abc.abstractmethod
    async def run(self) -> None:
        """Do the work; raise (QMPError, OSError, ...) to fail the job."""

    async def prepare(self) -> None:
        """First step of finalization; raising aborts the job instead."""

    async def commit(self) -> None:
        """Finalization of a successful job (graph changes); must not fail."""

    async def abort(self) -> None:
        """Undo after a failure or cancel; must not fail."""

    async def clean(self) -> None:
        """Release what the job holds, after commit or abort; must not fail."""

    def complete(self) -> None:
        """job-complete on a ready job: ask it to finish.  Jobs that have a
        ready phase override this; others cannot be completed."""
        raise GenericError(f"The active block job '{self.id}' cannot be completed")

    def on_cancel(self, force: bool) -> bool:
        """Whether a cancel request is a forced one.  Without ``.cancel()``
        QEMU treats every cancel as forced; mirror overrides this so that a
        soft cancel of a ready job completes without pivoting."""
        return True

    # ----- helpers for run() ---------------------------------------------
    @property
    def status(self) -> str:
        return self.state.status

    @property
    def is_cancelled(self) -> bool:
        """A forced cancel is under way: stop as soon as possible."""
        return self.cancelled and self.force_cancel

    @property
    def cancel_requested(self) -> bool:
        """Any cancel, forced or soft, was asked for."""
        return self.cancelled

    def progress_update(self, done: int) -> None:
        self.progress_current += done

    def progress_set_remaining(self, remaining: int) -> None:
        self.progress_total = self.progress_current + remaining

    def progress_increase_remaining(self, delta: int) -> None:
        self.progress_total += delta

    def set_ready(self) -> None:
        """running → ready: the job has caught up and waits for job-complete."""
        self.state.transition("ready")
        self._event_ready()

    async def pause_point(self) -> None:
        """Block while a pause is requested (showing paused/standby); raise
        :class:`JobCancelled` once the job is force-cancelled."""
        if self.pause_count > 0 and not self.is_cancelled:
            resume_to = self.status
            self.state.transition("standby" if resume_to == "ready" else "paused")
            self.paused = True
            while self.pause_count > 0 and not self.is_cancelled:
                await self._wait(None)
            self.paused = False
            self.state.transition(resume_to)
        if self.is_cancelled:
            raise JobCancelled()

    async def sleep(self, seconds: float) -> None:
        """Sleep (a verb that needs the job wakes it early), then pause point."""
        if self.is_cancelled:
            raise JobCancelled()
        if self.pause_count == 0:
            await self._wait(seconds)
        await self.pause_point()

    async def yield_(self) -> None:
        """Wait until something enters the job (a verb), then pause point."""
        if self.is_cancelled:
            raise JobCancelled()
        if self.pause_count == 0:
            await self._wait(None)
        await self.pause_point()

    async def _wait(self, seconds: float | None) -> None:
        loop = asyncio.get_running_loop()
        self._wake = loop.create_future()
        if seconds is not None:
            self._timer = loop.call_later(seconds, self.enter)
        self.busy = False
        try:
            await self._wake
        finally:
            self.busy = True
            self._wake = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def enter(self) -> None:
        """Wake the job if it is waiting in a sleep, yield or pause point."""
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def enter_if_sleeping(self) -> None:
        """Wake the job only out of a timed sleep (a new speed limit)."""
        if self._timer is not None:
            self.enter()

    @staticmethod
    async def settle() -> None:
        """Let a job just woken run up to its next wait before we go on: QEMU
        enters the job's coroutine synchronously from the command."""
        await asyncio.sleep(0)

    # ----- internal pause (drain) ----------------------------------------
    def pause(self) -> None:
        """Request a pause; it takes effect at the job's next pause point."""
        self.pause_count += 1
        if not self.paused:
            self.enter()

    def resume(self) -> None:
        """Drop one pause request; the last one lets the job go on."""
        if self.pause_count <= 0:
            raise RuntimeError(f"job {self.id}: resume without pause")
        self.pause_count -= 1
        if self.pause_count == 0:
            self.enter()

    # ----- life cycle ----------------------------------------------------
    async def start(self) -> None:
        """created → running; the job runs up to its first wait before we return."""
        self.state.transition("running")
        self.busy = True
        self._task = asyncio.get_running_loop().create_task(self._main(), name=f"job {self.id}")
        await self.settle()

    async def _main(self) -> None:
        try:
            await self.pause_point()  # a job paused before it started waits here
            await self.run()
        except JobCancelled:
            pass
        except (QMPError, OSError) as exc:
            self.error = error_text(exc)
        except Exception as exc:  # a bug must still conclude the job
            log.exception("job %s failed", self.id)
            self.error = error_text(exc)
        self.busy = False
        await self._run_finished()

    async def _run_finished(self) -> None:
        if self.error is None and self.is_cancelled:
            self.error = CANCELED_TEXT
        if self.error is not None:
            await self._abort()
            return
        self.state.transition("waiting")
        self.state.transition("pending")
        if self.auto_finalize:
            await self._finalize()
        else:
            self._event_pending()

    async def _finalize(self) -> None:
        self._finalizing = True
        try:
            await self.prepare()
        except (QMPError, OSError) as exc:
            self.error = error_text(exc)
        if self.error is not None:
            await self._abort()
            return
        await self._hook(self.commit)
        await self._hook(self.clean)
        self._event_finished()
        self._conclude()

    async def _abort(self) -> None:
        self._finalizing = True
        self.state.transition("aborting")
        await self._hook(self.abort)
        await self._hook(self.clean)
        if self._task is not None:  # events only for a job that ran
            self._event_finished()
        self._conclude()

    async def _hook(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run a clean-up hook; a failure there must not strand the job."""
        try:
            await hook()
        except Exception:
            log.exception("job %s: %s failed", self.id, hook.__name__)

    def _conclude(self) -> None:
        self.state.transition("concluded")
        self._gone_or_concluded.set()
        if self.auto_dismiss:
            self._dismiss()

    def _dismiss(self) -> None:
        self.state.transition("null")
        self.daemon.jobs.remove(self)
        self._gone_or_concluded.set()

    def discard(self) -> None:
        """Drop a job that failed to set up before it started (created → null)."""
        self._dismiss()

    # ----- QMP verbs -------------------------------------------------------
    async def user_pause(self) -> None:
        self.state.check_verb("pause")
        if self.user_paused:
            raise GenericError("Job is already paused")
        self.user_paused = True
        self.pause()
        await self.settle()

    async def user_resume(self) -> None:
        if not self.user_paused or self.pause_count <= 0:
            raise GenericError("Can't resume a job that was not paused")
        self.state.check_verb("resume")
        self.user_paused = False
        self._user_resumed()
        self.resume()
        await self.settle()

    async def user_cancel(self, force: bool) -> None:
        self.state.check_verb("cancel")
        await self._cancel(force)

    async def user_complete(self) -> None:
        self.state.check_verb("complete")
        if self.cancelled:
            raise GenericError(f"The active block job '{self.id}' cannot be completed")
        self.complete()
        if not self.paused:
            self.enter()
        await self.settle()

    async def user_finalize(self) -> None:
        self.state.check_verb("finalize")
        if not self._finalizing:
            await self._finalize()

    def user_dismiss(self) -> None:
        self.state.check_verb("dismiss")
        self._dismiss()

    async def _cancel(self, force: bool) -> None:
        if self.status == "concluded":  # only reached from quit
            self._dismiss()
            return
        force = self.on_cancel(force)
        if self.user_paused:
            self.user_paused = False
            self._user_resumed()
            self.pause_count -= 1
        # Once run() is over only a forced cancel changes anything.
        deferred = self._task is not None and self._task.done()
        if force or not deferred:
            self.cancelled = True
            self.force_cancel |= force
        if self._task is None:
            # Never started: it concludes at once (aborting, without BLOCK_JOB_*).
            await self._run_finished()
        elif deferred:
            if self.is_cancelled and not self._finalizing:
                self.error = CANCELED_TEXT
                await self._abort()
        else:
            self.enter()
            await self.settle()

    async def cancel_sync(self) -> None:
        """Force-cancel and wait until the job has concluded or gone (quit)."""
        await self._cancel(True)
        await self._gone_or_concluded.wait()

    # ----- events and queries ------------------------------------------------
    def _status_changed(self, status: str) -> None:
        self.daemon.emit_event("JOB_STATUS_CHANGE", {"id": self.id, "status": status})

    def _event_ready(self) -> None:
        """Extra event after running → ready (block jobs: BLOCK_JOB_READY)."""

    def _event_pending(self) -> None:
        """Extra event when waiting for job-finalize (block jobs: BLOCK_JOB_PENDING)."""

    def _event_finished(self) -> None:
        """Extra event before concluded (block jobs: COMPLETED or CANCELLED)."""

    def _user_resumed(self) -> None:
        """A user pause ended (block jobs forget their I/O error status)."""

    def info(self) -> dict[str, Any]:
        """JobInfo, members in schema order."""
        info: dict[str, Any] = {"id": self.id, "type": self.job_type, "status": self.status,
                                "current-progress": self.progress_current,
                                "total-progress": self.progress_total}
        if self.error is not None:
            info["error"] = self.error
        return info


class BlockJob(Job):
    """A job on block nodes (mirror, stream, commit, backup): listed by
    query-block-jobs, reachable by block-job-*, announced by BLOCK_JOB_*
    events, rate limited by ``speed`` and drained by quit."""

    def __init__(self, daemon: "Daemon", job_id: str, *, auto_finalize: bool = True,
                 auto_dismiss: bool = True) -> None:
        super().__init__(daemon, job_id, auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
        self.speed = 0
        self.limit = RateLimit()
        #: BlockDeviceIoStatus: "ok", or why the job stopped on an I/O error.
        self.iostatus = "ok"

    async def set_speed(self, speed: int) -> None:
        """block-job-set-speed (also usable on a created job before start)."""
        self.state.check_verb("set-speed")
        if speed < 0:
            raise GenericError("Parameter 'speed' expects a non-negative value")
        old, self.speed = self.speed, speed
        self.limit.set_speed(speed)
        if speed == 0 or speed > old:
            self.enter_if_sleeping()
            await self.settle()

    async def throttle(self, done: int) -> None:
        """After moving ``done`` bytes: sleep as the speed limit says (at
        least yield once), which is also a pause point."""
        await self.sleep(self.limit.delay(done))

    def error_action(self, policy: str, is_read: bool, err: OSError) -> str:
        """Apply an on-source-error/on-target-error policy (BlockdevOnError)
        to an I/O error; returns the BlockErrorAction.

        ``stop`` pauses the job as if the user had (job-resume goes on) and
        records the error in ``io-status``; the caller retries after its next
        pause point.  ``report``: fail the job with ``err``; ``ignore``:
        carry on.  ``enospc`` and ``auto`` stop on ENOSPC, report otherwise.
        """
        if policy in ("enospc", "auto"):
            action = "stop" if err.errno == errno.ENOSPC else "report"
        else:
            action = policy
        if action == "stop":
            if not self.user_paused:
                self.pause()
                self.user_paused = True
            if self.iostatus == "ok":
                self.iostatus = "nospace" if err.errno == errno.ENOSPC else "failed"
        self.emit_error("read" if is_read else "write", action)
        return action

    async def retry_io(self, policy: str, io: Callable[[], Awaitable[None]],
                       is_read: bool | None = None) -> None:
        """Run ``io`` under an error policy until it is done: ``report``
        re-raises, ``ignore`` leaves this piece, ``stop`` retries once the
        job resumes. ``is_read`` None: the error's own ``is_read`` says
        which side failed (a copy's read or write)."""
        while True:
            try:
                await io()
                return
            except OSError as e:
                side = getattr(e, "is_read", True) if is_read is None else is_read
                action = self.error_action(policy, side, e)
                if action == "report":
                    raise
                if action == "ignore":
                    return
                await self.pause_point()

    # ----- BLOCK_JOB_* events (device is the job id) --------------------
    def _event_data(self) -> dict[str, Any]:
        return {"type": self.job_type, "device": self.id, "len": self.progress_total,
                "offset": self.progress_current, "speed": self.speed}

    def emit_ready(self) -> None:
        self.daemon.emit_event("BLOCK_JOB_READY", self._event_data())

    def emit_completed(self, error: str | None = None) -> None:
        data = self._event_data()
        if error is not None:
            data["error"] = error
        self.daemon.emit_event("BLOCK_JOB_COMPLETED", data)

    def emit_cancelled(self) -> None:
        self.daemon.emit_event("BLOCK_JOB_CANCELLED", self._event_data())

    def emit_error(self, operation: str, action: str) -> None:
        self.daemon.emit_event("BLOCK_JOB_ERROR",
                               {"device": self.id, "operation": operation, "action": action})

    def emit_pending(self) -> None:
        self.daemon.emit_event("BLOCK_JOB_PENDING", {"type": self.job_type, "id": self.id})

    def _event_ready(self) -> None:
        self.emit_ready()

    def _event_pending(self) -> None:
        self.emit_pending()

    def _event_finished(self) -> None:
        if self.is_cancelled:
            self.emit_cancelled()
        else:
            self.emit_completed(self.error)

    def _user_resumed(self) -> None:
        self.iostatus = "ok"

    def block_info(self) -> dict[str, Any]:
        """BlockJobInfo, members in schema order."""
        info: dict[str, Any] = {
            "type": self.job_type, "device": self.id, "len": self.progress_total,
            "offset": self.progress_current, "busy": self.busy, "paused": self.pause_count > 0,
            "speed": self.speed, "io-status": self.iostatus,
            "ready": self.status in ("ready", "standby"), "status": self.status,
            "auto-finalize": self.auto_finalize, "auto-dismiss": self.auto_dismiss,
        }
        if self.error is not None:
            info["error"] = self.error
        return info


def check_not_busy(node: "Node") -> None:
    """QEMU's op blockers: a node a block job holds (its blocker on the job's
    edge) can be neither the node nor the target of another job."""
    for edge in node.parents:
        if edge.parent is None and edge.blocker:
            raise GenericError(f"Node '{node.node_name}' is busy: {edge.blocker}")


class JobRegistry:
    """The daemon's jobs by id (``daemon.jobs``)."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}

    def check_new_id(self, job_id: str) -> None:
        if not _JOB_ID.match(job_id):
            raise GenericError(f"Invalid job ID '{job_id}'")
        if job_id in self._jobs:
            raise GenericError(f"Job ID '{job_id}' already in use")

    def add(self, job: Job) -> None:
        self._jobs[job.id] = job

    def remove(self, job: Job) -> None:
        del self._jobs[job.id]

    def newest_first(self) -> list[Job]:
        """QEMU keeps jobs newest first; queries and quit walk them so."""
        return list(reversed(self._jobs.values()))

    def find(self, job_id: str) -> Job:
        """For job-*: any job."""
        job = self._jobs.get(job_id)
        if job is None:
            raise GenericError("Job not found")
        return job

    def find_block(self, job_id: str) -> BlockJob:
        """For block-job-*: block jobs only (create/amend jobs are not found)."""
        job = self._jobs.get(job_id)
        if not isinstance(job, BlockJob):
            raise DeviceNotActive(f"Block job '{job_id}' not found")
        return job

    async def cancel_all(self) -> None:
        """quit: drain (pause) the block jobs, then force-cancel every job,
        newest first, waiting for each to go (concluded ones are dismissed)."""
        for job in self.newest_first():
            if isinstance(job, BlockJob):
                job.pause()
        await Job.settle()
        while self._jobs:
            await self.newest_first()[0].cancel_sync()
