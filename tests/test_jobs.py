# SPDX-License-Identifier: GPL-2.0-or-later
"""The job framework (qsd.jobs): state machine, verbs, events, quit.

Jobs run in-process on a :class:`~qsd.daemon.Daemon` whose events are
recorded next to the replies of the commands, so the order of events
relative to a command's reply is checked as QSD shows it (§2.8 of the QSD
reference and transcripts b, l, i2).  Block jobs do not exist yet in the
package, so :class:`CopyJob` below stands in for them: a rate-limited copy
loop with an optional ready phase (mirror-like) and injectable failures.
"""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path
from typing import Any

import pytest

from qsd.block.node import DRIVERS, CreateContext
from qsd.block.protocols.null import NullCoNode
from qsd.daemon import Daemon
from qsd.jobs.job import TRANSITIONS, VERBS, BlockJob, Job, StateMachine
from qsd.jobs.ratelimit import SLICE_S, RateLimit
from qsd.qmp.errors import QMPError

STATUSES = ["undefined", "created", "running", "paused", "ready", "standby", "waiting", "pending",
            "aborting", "concluded", "null"]

# qmp-surface.md §2.8, written out again so that the table in job.py is checked against it.
LEGAL = {
    ("undefined", "created"),
    ("created", "running"), ("created", "aborting"), ("created", "null"),
    ("running", "paused"), ("running", "ready"), ("running", "waiting"), ("running", "aborting"),
    ("paused", "running"),
    ("ready", "standby"), ("ready", "waiting"), ("ready", "aborting"),
    ("standby", "ready"),
    ("waiting", "pending"), ("waiting", "aborting"),
    ("pending", "concluded"), ("pending", "aborting"),
    ("aborting", "concluded"), ("aborting", "aborting"),
    ("concluded", "null"),
}
ALLOWED = {
    "cancel": {"created", "running", "paused", "ready", "standby", "waiting", "pending"},
    "pause": {"created", "running", "paused", "ready", "standby"},
    "resume": {"created", "running", "paused", "ready", "standby"},
    "set-speed": {"created", "running", "paused", "ready", "standby"},
    "complete": {"ready", "standby"},
    "finalize": {"pending"},
    "dismiss": {"concluded"},
}
MiB = 1 << 20


class Harness:
    """A daemon whose events and command replies land in one log."""

    def __init__(self) -> None:
        self.daemon = Daemon()
        self.log: list[tuple[str, Any]] = []
        self.daemon.emit_event = self._emit  # type: ignore[method-assign]

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        self.log.append((name, dict(data)))

    async def qmp(self, command: str, **args: Any) -> Any:
        """Run a command; its reply (or error) is logged after the events it caused."""
        try:
            value = await self.daemon.execute(command, args or None)
        except QMPError as err:
            self.log.append(("error", err.desc))
            raise
        self.log.append(("reply", command))
        return value

    async def error(self, command: str, **args: Any) -> str:
        with pytest.raises(QMPError) as info:
            await self.qmp(command, **args)
        self.log.pop()
        return info.value.desc

    def take(self) -> list[str]:
        """The log so far, compact: statuses, BLOCK_JOB_* names, replies; then cleared."""
        out = []
        for name, data in self.log:
            if name == "JOB_STATUS_CHANGE":
                out.append(f"{data['id']}:{data['status']}")
            elif name == "reply":
                out.append(f"reply {data}")
            else:
                out.append(name)
        self.log.clear()
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        return [data for n, data in self.log if n == name]


class CopyJob(BlockJob):
    """A test block job: copies ``chunks`` chunks (progress only), then
    optionally waits in ready for job-complete like mirror."""

    job_type = "backup"

    def __init__(self, daemon: Daemon, job_id: str, *, chunks: int = 4, ready: bool = False,
                 fail_at: int | None = None, error_policy: str | None = None,
                 fail_prepare: bool = False, **kw: Any) -> None:
        super().__init__(daemon, job_id, **kw)
        if ready:
            self.job_type = "mirror"
        self.chunks = chunks
        self.with_ready = ready
        self.fail_at = fail_at
        self.error_policy = error_policy
        self.fail_prepare = fail_prepare
        self.should_complete = False
        self.calls: list[str] = []

    async def run(self) -> None:
        self.progress_set_remaining(self.chunks * MiB)
        done = 0
        while done < self.chunks:
            if done == self.fail_at:
                if self.error_policy is None:
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
                self.fail_at = None  # the retry works
                action = self.error_action(self.error_policy, True, OSError(errno.EIO, "EIO"))
                if action == "report":
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
                await self.pause_point()
                continue
            self.progress_update(MiB)
            done += 1
            await self.throttle(MiB)
        if self.with_ready:
            self.set_ready()
            while not self.should_complete and not self.cancel_requested:
                await self.yield_()

    def complete(self) -> None:
        self.should_complete = True

    def on_cancel(self, force: bool) -> bool:
        return force or self.status not in ("ready", "standby")

    async def prepare(self) -> None:
        self.calls.append("prepare")
        if self.fail_prepare:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    async def commit(self) -> None:
        self.calls.append("commit")

    async def abort(self) -> None:
        self.calls.append("abort")

    async def clean(self) -> None:
        self.calls.append("clean")


class ReadyPlainJob(Job):
    """A plain job that reaches ready but cannot be completed."""

    job_type = "amend"

    async def run(self) -> None:
        self.set_ready()
        await self.yield_()


async def idle() -> None:
    """Let jobs run until they block for long (a CopyJob yields once per chunk)."""
    await asyncio.sleep(0.05)


async def start(h: Harness, job_id: str, speed: int = 0, **kw: Any) -> CopyJob:
    """Start a CopyJob as a command would ("reply start"), then let it run."""
    job = CopyJob(h.daemon, job_id, **kw)
    if speed:
        await job.set_speed(speed)
    await job.start()
    h.log.append(("reply", "start"))
    await idle()
    return job


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


# ---------------------------------------------------------------------------------------------
# the tables


@pytest.mark.parametrize("old", STATUSES)
def test_transitions_follow_the_table(old: str) -> None:
    for new in STATUSES:
        changes: list[str] = []
        sm = StateMachine("j", changes.append)
        sm.status = old
        if (old, new) in LEGAL:
            sm.transition(new)
            assert sm.status == new
            assert changes == ([] if new == old else [new])
        else:
            with pytest.raises(RuntimeError, match="illegal transition"):
                sm.transition(new)
            assert sm.status == old and not changes
    assert {(old, new) for new in TRANSITIONS[old]} == {p for p in LEGAL if p[0] == old}


@pytest.mark.parametrize("verb", sorted(ALLOWED))
def test_verbs_follow_the_table(verb: str) -> None:
    assert VERBS[verb] == ALLOWED[verb]
    for status in STATUSES:
        sm = StateMachine("job0", lambda s: None)
        sm.status = status
        if status in ALLOWED[verb]:
            sm.check_verb(verb)
        else:
            with pytest.raises(QMPError) as info:
                sm.check_verb(verb)
            assert info.value.desc == f"Job 'job0' in state '{status}' cannot accept command verb '{verb}'"
            assert info.value.error_class == "GenericError"


def test_rate_limit() -> None:
    limit = RateLimit()
    assert limit.delay(10 * MiB, now=100.0) == 0.0                   # unlimited
    limit.set_speed(MiB)                                              # 1 MiB/s: 104857 bytes per slice
    assert limit.delay(MiB, now=100.0) == pytest.approx(1.0)          # the first chunk goes, then pays
    assert limit.delay(MiB, now=100.5) == pytest.approx(1.5)          # still paying for the first
    assert limit.delay(MiB, now=103.0) == pytest.approx(1.0)          # paid: a new window
    assert limit.delay(1000, now=110.0) == 0.0                        # within the slice's burst
    assert limit.delay(1000, now=110.0 + SLICE_S / 2) == 0.0
    limit.set_speed(1)
    assert limit.delay(MiB, now=111.0) == pytest.approx(MiB)          # speed 1: one chunk, then a long wait


# ---------------------------------------------------------------------------------------------
# ids and lookups


def test_job_ids_and_lookups() -> None:
    async def main() -> None:
        h = Harness()
        for bad in ("", "1x", "x@y", "a b", "é"):
            with pytest.raises(QMPError, match=f"^Invalid job ID '{bad}'$"):
                CopyJob(h.daemon, bad)
        job = await start(h, "a-b.c_" + "x" * 40, speed=1)
        with pytest.raises(QMPError, match=r"^Job ID 'a-b.c_x+' already in use$"):
            CopyJob(h.daemon, job.id)
        assert await h.error("job-pause", id="nope") == "Job not found"
        with pytest.raises(QMPError) as info:
            await h.qmp("block-job-pause", device="nope")
        assert (info.value.error_class, info.value.desc) == ("DeviceNotActive", "Block job 'nope' not found")
        await h.qmp("job-cancel", id=job.id)
        assert h.daemon.jobs.newest_first() == []
    run(main())


# ---------------------------------------------------------------------------------------------
# event sequences


def test_success_sequence_and_hooks() -> None:
    async def main() -> None:
        h = Harness()
        job = await start(h, "b")
        # the job yields after every chunk, so the reply goes first
        assert h.take() == ["b:created", "b:running", "reply start", "b:waiting", "b:pending",
                            "BLOCK_JOB_COMPLETED", "b:concluded", "b:null"]
        assert job.calls == ["prepare", "commit", "clean"]
        assert await h.error("job-dismiss", id="b") == "Job not found"
    run(main())


def test_failure_sequence() -> None:
    async def main() -> None:
        h = Harness()
        job = await start(h, "f", fail_at=2, auto_dismiss=False)
        completed = h.events("BLOCK_JOB_COMPLETED")
        assert h.take() == ["f:created", "f:running", "reply start", "f:aborting", "BLOCK_JOB_COMPLETED",
                            "f:concluded"]
        assert completed == [{"type": "backup", "device": "f", "len": 4 * MiB, "offset": 2 * MiB, "speed": 0,
                              "error": "Input/output error"}]
        assert job.calls == ["abort", "clean"]
        assert await h.qmp("query-jobs") == [{"id": "f", "type": "backup", "status": "concluded",
                                              "current-progress": 2 * MiB, "total-progress": 4 * MiB,
                                              "error": "Input/output error"}]
        [info] = await h.qmp("query-block-jobs")
        assert info["error"] == "Input/output error" and info["status"] == "concluded"
        h.log.clear()
        await h.qmp("job-dismiss", id="f")
        assert h.take() == ["f:null", "reply job-dismiss"]
    run(main())


def test_prepare_failure_aborts() -> None:
    async def main() -> None:
        h = Harness()
        job = await start(h, "p", fail_prepare=True)
        assert h.take() == ["p:created", "p:running", "reply start", "p:waiting", "p:pending", "p:aborting",
                            "BLOCK_JOB_COMPLETED", "p:concluded", "p:null"]
        assert job.calls == ["prepare", "abort", "clean"]
        assert job.error == "No space left on device"
    run(main())


def test_manual_finalize_and_dismiss() -> None:
    async def main() -> None:
        h = Harness()
        await start(h, "m", auto_finalize=False, auto_dismiss=False)
        pending = h.events("BLOCK_JOB_PENDING")
        assert h.take() == ["m:created", "m:running", "reply start", "m:waiting", "m:pending",
                            "BLOCK_JOB_PENDING"]
        assert pending == [{"type": "backup", "id": "m"}]
        [info] = await h.qmp("query-block-jobs")
        assert (info["status"], info["auto-finalize"], info["auto-dismiss"]) == ("pending", False, False)
        assert await h.error("job-dismiss", id="m") == \
            "Job 'm' in state 'pending' cannot accept command verb 'dismiss'"
        assert await h.error("job-pause", id="m") == "Job 'm' in state 'pending' cannot accept command verb 'pause'"
        h.log.clear()
        await h.qmp("block-job-finalize", id="m")
        assert h.take() == ["BLOCK_JOB_COMPLETED", "m:concluded", "reply block-job-finalize"]
        assert await h.error("job-finalize", id="m") == \
            "Job 'm' in state 'concluded' cannot accept command verb 'finalize'"
        await h.qmp("block-job-dismiss", id="m")
        assert h.take() == ["m:null", "reply block-job-dismiss"]
    run(main())


def test_cancel_pending_job() -> None:
    async def main() -> None:
        h = Harness()
        job = await start(h, "c", auto_finalize=False)
        h.log.clear()
        await h.qmp("job-cancel", id="c")
        assert h.take() == ["c:aborting", "BLOCK_JOB_CANCELLED", "c:concluded", "c:null", "reply job-cancel"]
        assert job.calls == ["abort", "clean"]
    run(main())


def test_pause_resume_running_job() -> None:
    async def main() -> None:
        h = Harness()
        job = await start(h, "r", speed=1)
        assert h.take() == ["r:created", "r:running", "reply start"]
        [info] = await h.qmp("query-block-jobs")
        assert info == {"type": "backup", "device": "r", "len": 4 * MiB, "offset": MiB, "busy": False,
                        "paused": False, "speed": 1, "io-status": "ok", "ready": False, "status": "running",
                        "auto-finalize": True, "auto-dismiss": True}
        assert list(info) == [m.name for m in h.daemon.schema.types["BlockJobInfo"].members if m.name in info]
        assert await h.error("job-resume", id="r") == "Can't resume a job that was not paused"
        h.log.clear()
        await h.qmp("job-pause", id="r")
        assert h.take() == ["r:paused", "reply job-pause"]
        assert await h.error("block-job-pause", device="r") == "Job is already paused"
        assert await h.error("job-complete", id="r") == \
            "Job 'r' in state 'paused' cannot accept command verb 'complete'"
        await h.qmp("block-job-set-speed", device="r", speed=2)
        [info] = await h.qmp("query-block-jobs")
        assert (info["status"], info["paused"], info["speed"]) == ("paused", True, 2)
        h.log.clear()
        await h.qmp("block-job-resume", device="r")
        assert h.take() == ["r:running", "reply block-job-resume"]
        # speed 0: the job is woken out of its long sleep and finishes
        await h.qmp("block-job-set-speed", device="r", speed=0)
        await idle()
        assert h.take() == ["reply block-job-set-speed", "r:waiting", "r:pending", "BLOCK_JOB_COMPLETED",
                            "r:concluded", "r:null"]
        assert job.progress_current == 4 * MiB
    run(main())


def test_set_speed_checks() -> None:
    async def main() -> None:
        h = Harness()
        job = await start(h, "s", speed=1000)
        assert await h.error("block-job-set-speed", device="s", speed=-1) == \
            "Parameter 'speed' expects a non-negative value"
        h.log.clear()
        await h.qmp("block-job-set-speed", device="s", speed=1)   # slower: no kick
        assert h.take() == ["reply block-job-set-speed"] and job.status == "running"
        await h.qmp("job-cancel", id="s")
        await start(h, "t", auto_finalize=False)
        assert await h.error("block-job-set-speed", device="t", speed=-1) == \
            "Job 't' in state 'pending' cannot accept command verb 'set-speed'"
    run(main())


def test_cancel_paused_job() -> None:
    """Transcript l: block-job-cancel refuses a user-paused job, job-cancel resumes it first."""
    async def main() -> None:
        h = Harness()
        job = await start(h, "slow", speed=65536)
        await h.qmp("block-job-pause", device="slow")
        assert await h.error("block-job-cancel", device="slow") == \
            "The block job for device 'slow' is currently paused"
        assert await h.error("block-job-cancel", device="slow", force=False) == \
            "The block job for device 'slow' is currently paused"
        h.log.clear()
        await h.qmp("job-cancel", id="slow")
        cancelled = h.events("BLOCK_JOB_CANCELLED")
        assert h.take() == ["slow:running", "slow:aborting", "BLOCK_JOB_CANCELLED", "slow:concluded",
                            "slow:null", "reply job-cancel"]
        assert cancelled == [{"type": "backup", "device": "slow", "len": 4 * MiB, "offset": MiB,
                              "speed": 65536}]
        assert job.error == "Operation canceled"
    run(main())


def test_force_cancel_paused_keeps_error() -> None:
    async def main() -> None:
        h = Harness()
        await start(h, "k", speed=1, auto_dismiss=False)
        await h.qmp("job-pause", id="k")
        await h.qmp("block-job-cancel", device="k", force=True)
        assert (await h.qmp("query-jobs"))[0]["error"] == "Operation canceled"
        [info] = await h.qmp("query-block-jobs")
        assert (info["status"], info["paused"], info["error"]) == ("concluded", False, "Operation canceled")
    run(main())


def test_ready_job_pause_complete_resume() -> None:
    """QSD with a ready mirror: pause → standby; complete while paused is
    accepted silently and happens on resume."""
    async def main() -> None:
        h = Harness()
        job = await start(h, "m", ready=True)
        ready = h.events("BLOCK_JOB_READY")
        assert h.take()[-3:] == ["reply start", "m:ready", "BLOCK_JOB_READY"]
        assert ready == [{"type": "mirror", "device": "m", "len": 4 * MiB, "offset": 4 * MiB, "speed": 0}]
        [info] = await h.qmp("query-block-jobs")
        assert (info["ready"], info["busy"], info["status"]) == (True, False, "ready")
        h.log.clear()
        await h.qmp("job-pause", id="m")
        assert h.take() == ["m:standby", "reply job-pause"]
        [info] = await h.qmp("query-block-jobs")
        assert (info["ready"], info["paused"], info["status"]) == (True, True, "standby")
        h.log.clear()
        await h.qmp("job-complete", id="m")
        assert h.take() == ["reply job-complete"]
        await h.qmp("job-resume", id="m")
        assert h.take() == ["m:ready", "m:waiting", "m:pending", "BLOCK_JOB_COMPLETED", "m:concluded", "m:null",
                            "reply job-resume"]
        assert job.calls == ["prepare", "commit", "clean"]
    run(main())


def test_cancel_ready_job_soft_and_forced() -> None:
    async def main() -> None:
        h = Harness()
        await start(h, "soft", ready=True)
        h.log.clear()
        await h.qmp("block-job-cancel", device="soft")   # not forced: completes without pivot
        assert h.take() == ["soft:waiting", "soft:pending", "BLOCK_JOB_COMPLETED", "soft:concluded", "soft:null",
                            "reply block-job-cancel"]
        await start(h, "hard", ready=True)
        await h.qmp("job-pause", id="hard")
        h.log.clear()
        await h.qmp("job-cancel", id="hard")              # always forced, resumes a paused job
        assert h.take() == ["hard:ready", "hard:aborting", "BLOCK_JOB_CANCELLED", "hard:concluded", "hard:null",
                            "reply job-cancel"]
    run(main())


def test_complete_refused() -> None:
    async def main() -> None:
        h = Harness()
        job = await start(h, "run", speed=1)
        assert await h.error("block-job-complete", device="run") == \
            "Job 'run' in state 'running' cannot accept command verb 'complete'"
        await h.qmp("job-cancel", id="run")
        plain = ReadyPlainJob(h.daemon, "plain")
        await plain.start()
        assert plain.status == "ready"
        assert await h.error("job-complete", id="plain") == "The active block job 'plain' cannot be completed"
        assert await h.error("block-job-complete", device="plain") == "Block job 'plain' not found"
        assert job.status == "null"
        await h.qmp("job-cancel", id="plain")
        assert h.take()[-4:] == ["plain:aborting", "plain:concluded", "plain:null", "reply job-cancel"]
    run(main())


@pytest.mark.parametrize("policy,expect", [
    ("stop", ["BLOCK_JOB_ERROR", "e:paused"]),
    ("enospc", ["BLOCK_JOB_ERROR", "e:aborting", "BLOCK_JOB_COMPLETED", "e:concluded", "e:null"]),
    ("report", ["BLOCK_JOB_ERROR", "e:aborting", "BLOCK_JOB_COMPLETED", "e:concluded", "e:null"]),
    ("ignore", ["BLOCK_JOB_ERROR", "e:waiting", "e:pending", "BLOCK_JOB_COMPLETED", "e:concluded", "e:null"]),
])
def test_io_error_policies(policy: str, expect: list[str]) -> None:
    """Transcript l: on-*-error=stop pauses with io-status failed until job-resume."""
    async def main() -> None:
        h = Harness()
        await start(h, "e", fail_at=1, error_policy=policy)
        errors = h.events("BLOCK_JOB_ERROR")
        action = "report" if policy == "enospc" else policy
        assert errors == [{"device": "e", "operation": "read", "action": action}]
        assert h.take() == ["e:created", "e:running", "reply start", *expect]
        if policy != "stop":
            return
        [info] = await h.qmp("query-block-jobs")
        assert (info["io-status"], info["paused"], info["status"]) == ("failed", True, "paused")
        h.log.clear()
        await h.qmp("job-resume", id="e")
        await idle()
        assert h.take() == ["e:running", "reply job-resume", "e:waiting", "e:pending", "BLOCK_JOB_COMPLETED",
                            "e:concluded", "e:null"]
    run(main())


def test_cancel_created_job() -> None:
    async def main() -> None:
        h = Harness()
        job = CopyJob(h.daemon, "c0")
        await h.qmp("job-cancel", id="c0")
        assert h.take() == ["c0:created", "c0:aborting", "c0:concluded", "c0:null", "reply job-cancel"]
        assert job.calls == ["abort", "clean"]
        unused = CopyJob(h.daemon, "c1")
        unused.discard()   # a set-up failure before start: created → null
        assert h.take() == ["c1:created", "c1:null"]
        assert job.status == "null" and h.daemon.jobs.newest_first() == []
    run(main())


def test_verbs_in_every_reachable_state() -> None:
    """Each status QMP can see, every verb the table refuses there."""
    async def main() -> None:
        h = Harness()
        jobs = {"running": await start(h, "running", speed=1),
                "paused": await start(h, "paused", speed=1),
                "ready": await start(h, "ready", ready=True),
                "standby": await start(h, "standby", ready=True),
                "pending": await start(h, "pending", auto_finalize=False),
                "concluded": await start(h, "concluded", fail_at=0, auto_dismiss=False)}
        await h.qmp("job-pause", id="paused")
        await h.qmp("job-pause", id="standby")
        commands = {"pause": ("job-pause", "id"), "resume": ("job-resume", "id"), "cancel": ("job-cancel", "id"),
                    "complete": ("job-complete", "id"), "finalize": ("job-finalize", "id"),
                    "dismiss": ("job-dismiss", "id"), "set-speed": ("block-job-set-speed", "device")}
        for status, job in jobs.items():
            assert job.status == status
            for verb, (name, key) in commands.items():
                if status in ALLOWED[verb]:
                    continue
                args: dict[str, Any] = {key: job.id}
                if verb == "set-speed":
                    args["speed"] = 5
                desc = await h.error(name, **args)
                if verb == "resume":
                    assert desc == "Can't resume a job that was not paused"
                else:
                    assert desc == f"Job '{job.id}' in state '{status}' cannot accept command verb '{verb}'"
        infos = await h.qmp("query-jobs")
        assert [i["id"] for i in infos] == ["concluded", "pending", "standby", "ready", "paused", "running"]
        for job in jobs.values():
            if job.status != "null":
                await job.cancel_sync()
    run(main())


# ---------------------------------------------------------------------------------------------
# quit and create jobs


def test_quit_cancels_running_jobs_before_reply(tmp_path: Path) -> None:
    """Transcript i2 and QSD probes: quit drains the block jobs (paused/standby),
    force-cancels each job newest first, and dismisses concluded ones."""
    async def main() -> None:
        h = Harness()
        await h.qmp("blockdev-create", **{"job-id": "c", "options": {
            "driver": "file", "filename": str(tmp_path / "c.img"), "size": 0}})
        await asyncio.sleep(0.2)
        await start(h, "mirror", ready=True)
        await start(h, "paused", speed=1)
        await h.qmp("job-pause", id="paused")
        await start(h, "running", speed=1)
        h.log.clear()
        await h.qmp("quit")
        assert h.take() == [
            "running:paused", "mirror:standby",
            "running:running", "running:aborting", "BLOCK_JOB_CANCELLED", "running:concluded", "running:null",
            "paused:running", "paused:aborting", "BLOCK_JOB_CANCELLED", "paused:concluded", "paused:null",
            "mirror:ready", "mirror:aborting", "BLOCK_JOB_CANCELLED", "mirror:concluded", "mirror:null",
            "c:null", "reply quit"]
        assert h.daemon.jobs.newest_first() == []
    run(main())


def test_blockdev_create_events_around_reply(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness()
        await h.qmp("blockdev-create", **{"job-id": "ok", "options": {
            "driver": "file", "filename": str(tmp_path / "a.img"), "size": 1 << 20}})
        assert h.take() == ["ok:created", "ok:running", "reply blockdev-create"]
        for _ in range(100):
            if h.daemon.jobs.find("ok").status == "concluded":
                break
            await asyncio.sleep(0.01)
        assert h.take() == ["ok:waiting", "ok:pending", "ok:concluded"]
        assert await h.qmp("query-block-jobs") == []
        assert await h.error("block-job-dismiss", id="ok") == "Block job 'ok' not found"
        assert await h.error("blockdev-create", **{"job-id": "ok", "options": {
            "driver": "file", "filename": str(tmp_path / "b.img"), "size": 0}}) == "Job ID 'ok' already in use"
        assert os.path.getsize(tmp_path / "a.img") == 1 << 20
        # an open error precedes the reply; nothing but JOB_STATUS_CHANGE events
        await h.qmp("blockdev-create", **{"job-id": "bad", "options": {
            "driver": "file", "filename": str(tmp_path / "no" / "x.img"), "size": 0}})
        assert h.take() == ["reply query-block-jobs", "bad:created", "bad:running", "bad:aborting",
                            "bad:concluded", "reply blockdev-create"]
        [bad, ok] = await h.qmp("query-jobs")
        assert bad == {"id": "bad", "type": "create", "status": "concluded", "current-progress": 1,
                       "total-progress": 1, "error": f"Could not create '{tmp_path}/no/x.img': "
                                                     "No such file or directory"}
        assert list(ok) == ["id", "type", "status", "current-progress", "total-progress"]
        assert await h.error("blockdev-create", **{"job-id": "r", "options": {"driver": "raw"}}) == \
            "Driver does not support blockdev-create"
        assert await h.error("blockdev-create", **{"job-id": "r", "options": {"driver": "host_device"}}) == \
            "Driver does not support blockdev-create"
        await h.qmp("job-dismiss", id="ok")
        await h.qmp("job-dismiss", id="bad")
    run(main())


class SlowCreate(NullCoNode):
    """null-co with a create that waits until the test lets it finish."""

    release: asyncio.Event

    @classmethod
    async def create(cls, ctx: CreateContext, options: dict[str, Any]) -> None:
        await cls.release.wait()


@pytest.fixture
def slow_create(monkeypatch: pytest.MonkeyPatch) -> type[SlowCreate]:
    monkeypatch.setitem(DRIVERS, "null-co", SlowCreate)
    return SlowCreate


def test_running_create_job_verbs(slow_create: type[SlowCreate]) -> None:
    """A create job has no pause points: pause is accepted but shows nothing,
    cancel takes effect when the driver returns ("Operation canceled")."""
    async def main() -> None:
        h = Harness()
        slow_create.release = asyncio.Event()
        await h.qmp("blockdev-create", **{"job-id": "s", "options": {"driver": "null-co"}})
        assert await h.qmp("query-jobs") == [{"id": "s", "type": "create", "status": "running",
                                              "current-progress": 0, "total-progress": 1}]
        assert await h.error("job-complete", id="s") == "Job 's' in state 'running' cannot accept command verb 'complete'"
        assert await h.error("job-dismiss", id="s") == "Job 's' in state 'running' cannot accept command verb 'dismiss'"
        await h.qmp("job-pause", id="s")
        await h.qmp("job-resume", id="s")
        await h.qmp("job-cancel", id="s")
        assert h.take() == ["s:created", "s:running", "reply blockdev-create", "reply query-jobs", "reply job-pause",
                            "reply job-resume", "reply job-cancel"]
        slow_create.release.set()
        await idle()
        assert h.take() == ["s:aborting", "s:concluded"]
        assert (await h.qmp("query-jobs"))[0]["error"] == "Operation canceled"
        await h.qmp("job-dismiss", id="s")
    run(main())


def test_quit_waits_for_running_create_job(slow_create: type[SlowCreate]) -> None:
    async def main() -> None:
        h = Harness()
        slow_create.release = asyncio.Event()
        await h.qmp("blockdev-create", **{"job-id": "s", "options": {"driver": "null-co"}})
        asyncio.get_running_loop().call_later(0.05, slow_create.release.set)
        h.log.clear()
        await h.qmp("quit")
        assert h.take() == ["s:aborting", "s:concluded", "s:null", "reply quit"]
    run(main())


def test_job_paused_before_start_waits() -> None:
    async def main() -> None:
        h = Harness()
        job = CopyJob(h.daemon, "early")
        await h.qmp("job-pause", id="early")
        await job.start()
        assert h.take() == ["early:created", "reply job-pause", "early:running", "early:paused"]
        await h.qmp("job-resume", id="early")
        await idle()
        assert h.take()[:2] == ["early:running", "reply job-resume"] and job.status == "null"
    run(main())
