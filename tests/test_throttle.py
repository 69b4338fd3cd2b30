# SPDX-License-Identifier: GPL-2.0-or-later
"""Throttle groups: QEMU's leaky buckets, fair queueing between members, the
throttle filter node, and throttle-group objects against the real QSD.

No wall-clock assertions: the group runs on a fake clock advanced by hand,
and what is checked is which requests have gone through by then.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import Any, Callable

import pytest
from conftest import RawQMP

from qsd.block.throttle import (NS, READ, WRITE, LeakyBucket, ThrottleConfig, ThrottleGroup,
                                ThrottleState)
from qsd.qmp.errors import GenericError


class FakeClock:
    """Time moves only when the test says so; timers fire in order."""

    def __init__(self) -> None:
        self.now = 0
        self._timers: list[tuple[int, int, "FakeTimer"]] = []
        self._seq = itertools.count()

    def now_ns(self) -> int:
        return self.now

    def call_at(self, when_ns: int, callback: Callable[[], None]) -> "FakeTimer":
        timer = FakeTimer(callback)
        heapq.heappush(self._timers, (when_ns, next(self._seq), timer))
        return timer

    async def advance(self, ns: int) -> None:
        """Move time on, firing due timers and letting woken requests run."""
        target = self.now + ns
        while True:
            await _settle()
            if not self._timers or self._timers[0][0] > target:
                break
            when, _, timer = heapq.heappop(self._timers)
            self.now = max(self.now, when)
            if not timer.cancelled:
                timer.callback()
        self.now = target
        await _settle()


class FakeTimer:
    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def config(**limits: int) -> ThrottleConfig:
    cfg = ThrottleConfig()
    cfg.apply_limits({k.replace("_", "-"): v for k, v in limits.items()})
    return cfg


# ---------------------------------------------------------------------------
# buckets


def test_bucket_without_burst_allows_a_tenth_of_a_second() -> None:
    bucket = LeakyBucket(avg=100)
    bucket.level = 10
    assert bucket.wait_ns() == 0          # avg/10 = 10 units fit
    bucket.level = 15
    assert bucket.wait_ns() == 5 * NS // 100
    bucket.leak(NS // 20)                 # 5 units leak in 50 ms
    assert bucket.level == pytest.approx(10)
    assert bucket.wait_ns() == 0


def test_bucket_burst_limits_both_levels() -> None:
    bucket = LeakyBucket(avg=100, max=1000, burst_length=2)
    bucket.level = 1500                   # under max * burst_length
    bucket.burst_level = 150              # but over max/10
    assert bucket.wait_ns() == int(50 * NS / 1000)
    bucket.burst_level = 0
    assert bucket.wait_ns() == 0
    bucket.level = 2100
    assert bucket.wait_ns() == int(100 * NS / 100)


def test_account_counts_iops_size_units() -> None:
    clock = FakeClock()
    state = ThrottleState(config(iops_total=10, iops_size=4096, bps_write=1 << 20), clock)
    state.account(WRITE, 16384)
    buckets = state.config.buckets
    assert buckets["iops-total"].level == 4
    assert buckets["bps-write"].level == 16384
    state.account(READ, 100)
    assert buckets["iops-total"].level == 5
    assert buckets["bps-write"].level == 16384


@pytest.mark.parametrize("limits, text", [
    ({"bps-total": 1, "bps-read": 1}, "bps/iops/max total values and read/write values cannot be used "
                                       "at the same time"),
    ({"iops-total-max": 5, "iops-total": 1, "iops-write-max": 6, "iops-write": 1},
     "bps/iops/max total values and read/write values cannot be used at the same time"),
    ({"iops-size": 512}, "iops size requires an iops value to be set"),
    ({"bps-total": 10 ** 15 + 1}, "bps/iops/max values must be within [0, 1000000000000000]"),
    ({"bps-total": 1, "bps-total-max": 2, "bps-total-max-length": 0}, "the burst length cannot be 0"),
    ({"bps-total": 1, "bps-total-max-length": 3}, "burst length set without burst rate"),
    ({"bps-read-max": 3}, "bps_max/iops_max require corresponding bps/iops values"),
    ({"bps-read": 10, "bps-read-max": 3}, "bps_max/iops_max cannot be lower than bps/iops"),
    ({"iops-read-max-length": 1 << 32}, "iops-read-max-length value must be in the range [0, 4294967295]"),
])
def test_invalid_limits(limits: dict[str, int], text: str) -> None:
    with pytest.raises(GenericError) as err:
        ThrottleConfig().apply_limits(limits)
    assert err.value.desc == text


# ---------------------------------------------------------------------------
# groups: pacing and fairness on a fake clock


async def _issue(member: Any, name: str, done: list[str], size: int = 512,
                 is_write: bool = False) -> None:
    await member.intercept(size, is_write)
    done.append(name)


def test_iops_limit_paces_requests() -> None:
    async def run() -> list[int]:
        clock = FakeClock()
        group = ThrottleGroup("g", config(iops_total=10), clock)
        member = group.register()
        done: list[str] = []
        tasks = [asyncio.create_task(_issue(member, f"r{i}", done)) for i in range(12)]
        counts = []
        for _ in range(6):
            await clock.advance(NS // 5)
            counts.append(len(done))
        await clock.advance(10 * NS)
        await asyncio.gather(*tasks)
        assert done == [f"r{i}" for i in range(12)]   # FIFO within a member
        return counts

    counts = asyncio.run(run())
    # Requests pass while the bucket holds no more than a tenth of a second's
    # worth (1 op), so 2 at once, then 10 per second.
    assert counts == [4, 6, 8, 10, 12, 12]


def test_members_share_one_budget_round_robin() -> None:
    async def run() -> list[str]:
        clock = FakeClock()
        group = ThrottleGroup("g", config(bps_total=1 << 20), clock)
        a, b = group.register(), group.register()
        done: list[str] = []
        tasks = [asyncio.create_task(_issue(m, f"{n}{i}", done, size=256 << 10))
                 for i in range(4) for m, n in ((a, "a"), (b, "b"))]
        await clock.advance(NS)
        after_one_second = len(done)
        await clock.advance(10 * NS)
        await asyncio.gather(*tasks)
        assert after_one_second < 8
        # Each second moves 1 MiB in total, whoever asks: at most 4 + the
        # first (unthrottled) request after one second.
        assert after_one_second <= 5
        return done

    done = asyncio.run(run())
    assert sorted(done) == sorted(f"{n}{i}" for i in range(4) for n in "ab")
    # Turns alternate between the two members once queueing starts.
    tail = done[1:]
    assert all(x[0] != y[0] for x, y in zip(tail, tail[1:])), done


def test_reads_and_writes_are_queued_apart() -> None:
    async def run() -> list[str]:
        clock = FakeClock()
        group = ThrottleGroup("g", config(iops_read=10), clock)
        m = group.register()
        done: list[str] = []
        reads = [asyncio.create_task(_issue(m, f"r{i}", done)) for i in range(5)]
        writes = [asyncio.create_task(_issue(m, f"w{i}", done, is_write=True)) for i in range(5)]
        await clock.advance(0)
        first = list(done)
        await clock.advance(NS)
        await asyncio.gather(*reads, *writes)
        return first

    first = asyncio.run(run())
    # Writes are not limited: all five went through with the first read.
    assert [x for x in first if x[0] == "w"] == [f"w{i}" for i in range(5)]
    assert [x for x in first if x[0] == "r"] == ["r0", "r1"]


def test_drained_member_lets_queued_requests_go() -> None:
    async def run() -> tuple[int, int]:
        clock = FakeClock()
        group = ThrottleGroup("g", config(iops_total=1), clock)
        m = group.register()
        done: list[str] = []
        tasks = [asyncio.create_task(_issue(m, f"r{i}", done)) for i in range(4)]
        await clock.advance(0)
        before = len(done)
        m.set_limits_disabled(True)
        await clock.advance(0)
        await asyncio.gather(*tasks)
        return before, len(done)

    assert asyncio.run(run()) == (1, 4)


def test_unregister_releases_waiters() -> None:
    async def run() -> int:
        clock = FakeClock()
        group = ThrottleGroup("g", config(iops_total=1), clock)
        m = group.register()
        done: list[str] = []
        tasks = [asyncio.create_task(_issue(m, f"r{i}", done)) for i in range(3)]
        await clock.advance(0)
        m.leave()
        await asyncio.gather(*tasks)
        return len(done)

    assert asyncio.run(run()) == 3


# ---------------------------------------------------------------------------
# the throttle node in a daemon (in process, fake clock)


def test_throttle_nodes_share_their_group() -> None:
    from qsd.daemon import Daemon

    async def run() -> tuple[list[str], int]:
        d = Daemon()
        await d.execute("object-add", {"qom-type": "throttle-group", "id": "tg",
                                       "limits": {"iops-total": 10}})
        for name in ("t1", "t2"):
            await d.execute("blockdev-add", {"driver": "throttle", "node-name": name, "throttle-group": "tg",
                                             "file": {"driver": "null-co"}})
        group = d.objects.throttle_group("tg")
        assert group is not None and len(group.members) == 2
        clock = FakeClock()
        group.clock = group.state.clock = clock
        done: list[str] = []

        async def read(node: str, i: int) -> None:
            await d.graph.nodes[node].read(i * 512, 512)
            done.append(f"{node}:{i}")

        tasks = [asyncio.create_task(read(n, i)) for i in range(3) for n in ("t1", "t2")]
        await clock.advance(NS // 4)
        early = len(done)
        await clock.advance(5 * NS)
        await asyncio.gather(*tasks)
        with pytest.raises(GenericError, match="object 'tg' is in use, can not be deleted"):
            await d.execute("object-del", {"id": "tg"})
        await d.execute("blockdev-del", {"node-name": "t1"})
        await d.execute("blockdev-del", {"node-name": "t2"})
        await d.execute("object-del", {"id": "tg"})
        return done, early

    done, early = asyncio.run(run())
    assert early == 4            # 2 at once + 10/s for a quarter second
    assert len(done) == 6
    assert [x.split(":")[0] for x in done[1:]] in (["t2", "t1", "t2", "t1", "t2"],
                                                   ["t1", "t2", "t1", "t2", "t1"])


# ---------------------------------------------------------------------------
# differential: throttle-group objects and throttle nodes against QSD

SESSION: list[tuple[str, dict[str, Any]]] = [
    ("object-add", {"qom-type": "throttle-group", "id": "tg0", "x-iops-total": 100}),
    ("qom-get", {"path": "/objects/tg0", "property": "limits"}),
    ("qom-get", {"path": "/objects/tg0", "property": "x-iops-total"}),
    ("qom-get", {"path": "/objects/tg0", "property": "x-bps-write-max-length"}),
    ("qom-get", {"path": "/objects/tg0", "property": "bogus"}),
    ("qom-get", {"path": "/objects/tg0", "property": "type"}),
    ("object-add", {"qom-type": "throttle-group", "id": "tg1", "limits": {"bps-total": 1000, "bps-read": 10}}),
    ("object-add", {"qom-type": "throttle-group", "id": "tg2", "limits": {"bps-total": 1000}, "x-iops-total": 5}),
    ("qom-get", {"path": "/objects/tg2", "property": "limits"}),
    ("object-add", {"qom-type": "throttle-group", "id": "tg3", "limits": {"bps-total": -1}}),
    ("object-add", {"qom-type": "throttle-group", "id": "tg3", "x-bps-total": -1}),
    ("object-add", {"qom-type": "throttle-group", "id": "tg3", "x-bps-total-max-length": 1 << 33}),
    ("object-add", {"qom-type": "throttle-group", "id": "tg3", "limits": {"bps-total-max-length": 1 << 33}}),
    ("object-add", {"qom-type": "throttle-group", "id": "tg3", "limits": {"bps-total-max-length": -1}}),
    ("object-add", {"qom-type": "throttle-group", "id": "tg3", "limits": {"bps-total-max": 100}}),
    ("object-add", {"qom-type": "throttle-group", "id": "tg3", "limits": {"bps-total": 1000, "bps-total-max": 100}}),
    ("object-add", {"qom-type": "throttle-group", "id": "tg3",
                    "limits": {"bps-total": 1000, "bps-total-max": 2000, "bps-total-max-length": 0}}),
    ("object-add", {"qom-type": "throttle-group", "id": "tg3",
                    "limits": {"bps-total": 1000, "bps-total-max-length": 5}}),
    ("object-add", {"qom-type": "throttle-group", "id": "tg3", "limits": {"iops-size": 100}}),
    ("object-add", {"qom-type": "throttle-group", "id": "tg3",
                    "limits": {"iops-write": 10, "iops-write-max": 20, "iops-write-max-length": 60,
                               "iops-size": 4096}}),
    ("qom-get", {"path": "/objects/tg3", "property": "limits"}),
    ("object-add", {"qom-type": "throttle-group", "id": "tg3"}),
    ("blockdev-add", {"driver": "throttle", "node-name": "t0", "throttle-group": "nosuch",
                      "file": {"driver": "file", "filename": "disk.img"}}),
    ("blockdev-add", {"driver": "throttle", "node-name": "t0", "throttle-group": "tg0",
                      "file": {"driver": "file", "filename": "disk.img"}}),
    ("blockdev-add", {"driver": "throttle", "node-name": "t1", "throttle-group": "tg0", "file": "t0"}),
    ("object-del", {"id": "tg0"}),
    ("blockdev-del", {"node-name": "t0"}),
    ("blockdev-del", {"node-name": "t1"}),
    ("blockdev-del", {"node-name": "t0"}),
    ("object-del", {"id": "tg0"}),
    ("object-del", {"id": "tg0"}),
]


def run_session(daemon: Any, session: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The replies to ``session``; the daemon is stopped afterwards (it may
    hold image locks the other daemon needs)."""
    q: RawQMP = daemon.qmp()
    replies = [q.execute(cmd, args) for cmd, args in session]
    daemon.stop()
    return replies


def test_throttle_session_same_as_qsd(qemu_sd: Any, qsd: Any) -> None:
    their = qemu_sd()
    (their.cwd / "disk.img").write_bytes(bytes(1 << 20))
    theirs = run_session(their, SESSION)
    ours = run_session(qsd(), SESSION)
    for (cmd, args), a, b in zip(SESSION, theirs, ours):
        assert b == a, (cmd, args)


def test_throttle_node_info_same_as_qsd(qemu_sd: Any, qsd: Any) -> None:
    session = SESSION[:1] + [
        ("blockdev-add", {"driver": "file", "node-name": "f0", "filename": "disk.img"}),
        ("blockdev-add", {"driver": "throttle", "node-name": "t0", "throttle-group": "tg0", "file": "f0"}),
        ("blockdev-add", {"driver": "throttle", "node-name": "t1", "throttle-group": "tg0", "file": "t0"}),
        ("query-named-block-nodes", {"flat": True}),
    ]
    their = qemu_sd()
    (their.cwd / "disk.img").write_bytes(bytes(1 << 20))
    theirs = run_session(their, session)
    ours = run_session(qsd(), session)
    assert ours == theirs


def test_data_through_throttled_export(qsd: Any, workdir: Any) -> None:
    """Requests through a throttle node over NBD are queued, not refused,
    and carry their data (several nodes in one group)."""
    import subprocess

    (workdir / "a.img").write_bytes(bytes(4 << 20))
    (workdir / "b.img").write_bytes(bytes(4 << 20))
    sock = workdir / "nbd.sock"
    daemon = qsd("--object", "throttle-group,id=tg,limits.iops-total=200,limits.bps-total=33554432",
                 "--blockdev", "driver=file,node-name=fa,filename=a.img",
                 "--blockdev", "driver=file,node-name=fb,filename=b.img",
                 "--blockdev", "driver=throttle,node-name=ta,throttle-group=tg,file=fa",
                 "--blockdev", "driver=throttle,node-name=tb,throttle-group=tg,file=fb",
                 "--nbd-server", f"addr.type=unix,addr.path={sock}",
                 "--export", "type=nbd,id=ea,node-name=ta,writable=on",
                 "--export", "type=nbd,id=eb,node-name=tb,writable=on", wait_for=[sock])
    procs = [subprocess.Popen(["qemu-io", "-f", "raw", "-c", f"write -P {p} 0 2M", "-c", f"read -P {p} 0 2M",
                               "-c", "write -z 2M 1M", f"nbd+unix:///{name}?socket={sock}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, p in (("ta", "0x5a"), ("tb", "0xa5"))]
    outs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    assert all("Pattern verification failed" not in out for out, _ in outs)
    assert daemon.qmp().cmd("qom-get", path="/objects/tg", property="limits")["iops-total"] == 200
    daemon.stop()
    assert (workdir / "a.img").read_bytes()[:2 << 20] == b"\x5a" * (2 << 20)
    assert (workdir / "b.img").read_bytes()[:2 << 20] == b"\xa5" * (2 << 20)


def test_drained_section_releases_throttled_requests() -> None:
    """A drained section on the node below waits for requests in flight; the
    throttle node lets its queued ones go (no time passes on the fake clock)."""
    from qsd.daemon import Daemon

    async def run() -> tuple[int, int, int]:
        d = Daemon()
        await d.execute("object-add", {"qom-type": "throttle-group", "id": "tg", "x-iops-total": 1})
        await d.execute("blockdev-add", {"driver": "null-co", "node-name": "n0"})
        await d.execute("blockdev-add", {"driver": "throttle", "node-name": "t0", "throttle-group": "tg",
                                         "file": "n0"})
        group = d.objects.throttle_group("tg")
        assert group is not None
        clock = FakeClock()
        group.clock = group.state.clock = clock
        node = d.graph.nodes["t0"]
        tasks = [asyncio.create_task(node.write(i * 512, bytes(512))) for i in range(6)]
        await clock.advance(0)
        queued = node.in_flight
        async with d.graph.drained(d.graph.nodes["n0"]):
            during = node.in_flight
        await asyncio.gather(*tasks)
        # Limits apply again after the section.
        more = [asyncio.create_task(node.write(0, bytes(512))) for _ in range(3)]
        await clock.advance(0)
        after = node.in_flight
        await clock.advance(10 * NS)
        await asyncio.gather(*more)
        return queued, during, after

    queued, during, after = asyncio.run(run())
    assert queued == 5          # 1 went through at once (a tenth of 1 op fits)
    assert during == 0
    # The turn handed on while draining lets one through (as QEMU: a woken
    # request does not check again); the bucket holds the other two back.
    assert after == 2
