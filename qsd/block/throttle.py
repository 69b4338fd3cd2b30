# SPDX-License-Identifier: GPL-2.0-or-later
"""I/O throttling: QEMU's leaky buckets and throttle groups.

A :class:`ThrottleConfig` holds six buckets (bytes and operations, each for
total, read and write) with an average rate, an optional burst rate
(``*-max``) that may be held for ``*-max-length`` seconds, and ``iops-size``
(a request larger than it counts as several operations). Buckets fill by
what a request moves *after* the request is let through and leak at their
rate; a request waits while a bucket of its direction is over its size
(avg/10 without a burst, max * burst-length with one; the burst level also
has to stay under max/10). That is QEMU 7.2's algorithm, so the same limits
give the same pacing.

A :class:`ThrottleGroup` shares one state between members (throttle filter
nodes). Requests of each member wait in its own FIFO queue per direction;
the group hands the turn round-robin to the next member with queued
requests, so members share the budget fairly and nothing is rejected.

Time comes from a :class:`Clock` (real: the event loop; tests use a fake
one that is advanced by hand).
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from qsd.qmp.errors import GenericError

NS = 1_000_000_000
THROTTLE_VALUE_MAX = 1_000_000_000_000_000
UINT_MAX = (1 << 32) - 1

#: Bucket names in QEMU's order (BucketType); members of ThrottleLimits are
#: NAME, NAME-max and NAME-max-length for each, plus iops-size.
BUCKETS = ("bps-total", "bps-read", "bps-write", "iops-total", "iops-read", "iops-write")
#: ThrottleLimits member order (the schema's, QEMU's).
LIMIT_NAMES = tuple(f"{kind}-{scope}{suffix}"
                    for kind in ("iops", "bps") for scope in ("total", "read", "write")
                    for suffix in ("", "-max", "-max-length")) + ("iops-size",)

READ, WRITE = 0, 1
#: Buckets a request of each direction is checked against and fills.
_DIRECTION_BUCKETS = (("bps-total", "iops-total", "bps-read", "iops-read"),
                      ("bps-total", "iops-total", "bps-write", "iops-write"))


class Clock(Protocol):
    """Where throttling gets the time and its timers."""

    def now_ns(self) -> int: ...

    def call_at(self, when_ns: int, callback: Callable[[], None]) -> "TimerHandle": ...


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class LoopClock:
    """The host's monotonic clock and the running event loop's timers."""

    def now_ns(self) -> int:
        return time.monotonic_ns()

    def call_at(self, when_ns: int, callback: Callable[[], None]) -> asyncio.TimerHandle:
        loop = asyncio.get_running_loop()
        delay = max(0, when_ns - self.now_ns()) / NS
        return loop.call_later(delay, callback)


@dataclass
class LeakyBucket:
    avg: int = 0
    max: int = 0
    burst_length: int = 1
    level: float = 0.0
    burst_level: float = 0.0

    def leak(self, delta_ns: int) -> None:
        self.level = max(self.level - self.avg * delta_ns / NS, 0.0)
        if self.burst_length > 1:
            self.burst_level = max(self.burst_level - self.max * delta_ns / NS, 0.0)

    def wait_ns(self) -> int:
        """How long until the bucket lets the next request through."""
        if not self.avg:
            return 0
        if not self.max:
            # Short bursts stay unthrottled: a tenth of a second's worth.
            size, burst_size = self.avg / 10, 0.0
        else:
            size, burst_size = self.max * self.burst_length, self.max / 10
        extra = self.level - size
        if extra > 0:
            return int(extra * NS / self.avg)
        if self.burst_length > 1:
            extra = self.burst_level - burst_size
            if extra > 0:
                return int(extra * NS / self.max)
        return 0


@dataclass
class ThrottleConfig:
    """The limits of one group (all zero: no throttling)."""

    buckets: dict[str, LeakyBucket] = field(
        default_factory=lambda: {name: LeakyBucket() for name in BUCKETS})
    op_size: int = 0

    def copy(self) -> "ThrottleConfig":
        return ThrottleConfig({n: LeakyBucket(b.avg, b.max, b.burst_length)
                               for n, b in self.buckets.items()}, self.op_size)

    # ----- ThrottleLimits <-> config --------------------------------------
    def set_limit(self, name: str, value: int, what: str = "") -> None:
        """Set one ThrottleLimits member (``what``: the property for error texts)."""
        if name == "iops-size":
            self.op_size = value
            return
        base, _, suffix = name.partition("-max")
        bucket = self.buckets[base]
        if suffix == "-length":
            if value > UINT_MAX:
                # (sic: QEMU's text for the x- properties lacks a space)
                raise GenericError(f"{what} value must be in therange [0, {UINT_MAX}]")
            bucket.burst_length = value & UINT_MAX
        elif name.endswith("-max"):
            bucket.max = value
        else:
            bucket.avg = value

    def get_limit(self, name: str) -> int:
        if name == "iops-size":
            return self.op_size
        base, _, suffix = name.partition("-max")
        bucket = self.buckets[base]
        if suffix == "-length":
            return bucket.burst_length
        return bucket.max if name.endswith("-max") else bucket.avg

    def limits(self) -> dict[str, int]:
        """The ThrottleLimits QSD shows (every member)."""
        return {name: self.get_limit(name) for name in LIMIT_NAMES}

    def apply_limits(self, limits: dict[str, Any]) -> None:
        """QEMU's throttle_limits_to_config: the given members, then checked."""
        for name in LIMIT_NAMES:
            if name in limits:
                value = limits[name]
                if name.endswith("-length") and value > UINT_MAX:
                    raise GenericError(f"{name} value must be in the range [0, {UINT_MAX}]")
                self.set_limit(name, value)
        self.check()

    def check(self) -> None:
        """QEMU's throttle_is_valid, with its texts."""
        b = self.buckets

        def mixed(attr: str, kind: str) -> bool:
            return bool(getattr(b[f"{kind}-total"], attr)
                        and (getattr(b[f"{kind}-read"], attr) or getattr(b[f"{kind}-write"], attr)))

        if any(mixed(attr, kind) for attr in ("avg", "max") for kind in ("bps", "iops")):
            raise GenericError("bps/iops/max total values and read/write values cannot be used "
                               "at the same time")
        if self.op_size and not any(b[n].avg for n in ("iops-total", "iops-read", "iops-write")):
            raise GenericError("iops size requires an iops value to be set")
        for bucket in b.values():
            if not (0 <= bucket.avg <= THROTTLE_VALUE_MAX and 0 <= bucket.max <= THROTTLE_VALUE_MAX):
                raise GenericError(f"bps/iops/max values must be within [0, {THROTTLE_VALUE_MAX}]")
            if not bucket.burst_length:
                raise GenericError("the burst length cannot be 0")
            if bucket.burst_length > 1 and not bucket.max:
                raise GenericError("burst length set without burst rate")
            if bucket.max and not bucket.avg:
                raise GenericError("bps_max/iops_max require corresponding bps/iops values")
            if bucket.max and bucket.max < bucket.avg:
                raise GenericError("bps_max/iops_max cannot be lower than bps/iops")

    def enabled(self) -> bool:
        return any(bucket.avg for bucket in self.buckets.values())


class ThrottleState:
    """A config with its bucket levels and the time they last leaked."""

    def __init__(self, config: ThrottleConfig, clock: Clock) -> None:
        self.clock = clock
        self.config = config
        self.previous_leak = clock.now_ns()

    def reset(self, config: ThrottleConfig) -> None:
        """New limits start with empty buckets, as in QEMU."""
        self.config = config
        self.previous_leak = self.clock.now_ns()

    def leak(self, now: int) -> None:
        delta = now - self.previous_leak
        self.previous_leak = now
        if delta <= 0:
            return
        for bucket in self.config.buckets.values():
            bucket.leak(delta)

    def wait_ns(self, direction: int) -> int:
        """Leak up to now, then the longest wait any bucket of ``direction`` asks."""
        self.leak(self.clock.now_ns())
        return max(self.config.buckets[n].wait_ns() for n in _DIRECTION_BUCKETS[direction])

    def account(self, direction: int, size: int) -> None:
        """A request of ``size`` bytes goes through: fill its buckets."""
        op_size = self.config.op_size
        units = size / op_size if op_size and size > op_size else 1.0
        for name in _DIRECTION_BUCKETS[direction]:
            bucket = self.config.buckets[name]
            amount = size if name.startswith("bps") else units
            bucket.level += amount
            if bucket.burst_length > 1:
                bucket.burst_level += amount


class ThrottleGroupMember:
    """One user of a group (a throttle node): its queues and timers."""

    def __init__(self, group: "ThrottleGroup") -> None:
        self.group = group
        self.queues: tuple[collections.deque[asyncio.Future[None]], ...] = (
            collections.deque(), collections.deque())
        self.pending = [0, 0]
        self.timers: list[TimerHandle | None] = [None, None]
        #: Set while drained: queued requests go through unthrottled.
        self.limits_disabled = False

    async def intercept(self, size: int, is_write: bool) -> None:
        """Wait for this request's turn and budget, then account for it."""
        await self.group.intercept(self, size, WRITE if is_write else READ)

    def leave(self) -> None:
        self.group.unregister(self)

    def set_limits_disabled(self, disabled: bool) -> None:
        """While disabled (drained), every queued request goes through now."""
        self.limits_disabled = disabled
        if disabled:
            for direction in (READ, WRITE):
                while self.group._restart_queue(self, direction):
                    pass


class ThrottleGroup:
    """Shared limits and a round-robin turn per direction among members."""

    def __init__(self, name: str, config: ThrottleConfig | None = None,
                 clock: Clock | None = None) -> None:
        self.name = name
        self.clock: Clock = clock or LoopClock()
        self.state = ThrottleState(config or ThrottleConfig(), self.clock)
        self.members: list[ThrottleGroupMember] = []
        self.tokens: list[ThrottleGroupMember | None] = [None, None]
        self.any_timer_armed = [False, False]

    @property
    def config(self) -> ThrottleConfig:
        return self.state.config

    def set_config(self, config: ThrottleConfig) -> None:
        """New limits: empty buckets, and every queued request is retried."""
        self.state.reset(config)
        for member in self.members:
            for direction in (READ, WRITE):
                self._cancel_timer(member, direction)
                self._restart_queue(member, direction)

    # ----- membership ------------------------------------------------------
    def register(self) -> ThrottleGroupMember:
        member = ThrottleGroupMember(self)
        self.members.append(member)
        for direction in (READ, WRITE):
            if self.tokens[direction] is None:
                self.tokens[direction] = member
        return member

    def unregister(self, member: ThrottleGroupMember) -> None:
        for direction in (READ, WRITE):
            self._cancel_timer(member, direction)
            while member.queues[direction]:
                fut = member.queues[direction].popleft()
                if not fut.done():
                    fut.set_result(None)
        index = self.members.index(member)
        self.members.remove(member)
        for direction in (READ, WRITE):
            if self.tokens[direction] is member:
                self.tokens[direction] = (self.members[index % len(self.members)]
                                          if self.members else None)

    # ----- scheduling ---------------------------------------------------------
    def _next_member(self, member: ThrottleGroupMember) -> ThrottleGroupMember:
        i = self.members.index(member)
        return self.members[(i + 1) % len(self.members)]

    def _next_token(self, member: ThrottleGroupMember, direction: int) -> ThrottleGroupMember:
        """Round robin: the member after the current token that has requests
        queued, or ``member`` when nobody has."""
        if member.pending[direction] and member.limits_disabled:
            return member
        start = self.tokens[direction] or member
        if start not in self.members:
            start = member
        token = self._next_member(start)
        while token is not start and not token.pending[direction]:
            token = self._next_member(token)
        if token is start and not token.pending[direction]:
            token = member
        return token

    def _schedule_timer(self, member: ThrottleGroupMember, direction: int) -> bool:
        """True if ``member``'s next request must wait (a timer is armed then)."""
        if member.limits_disabled:
            return False
        if self.any_timer_armed[direction]:
            return True
        wait = self.state.wait_ns(direction)
        if not wait:
            return False
        if member.timers[direction] is None:
            when = self.clock.now_ns() + wait
            member.timers[direction] = self.clock.call_at(
                when, lambda: self._timer_fired(member, direction))
        self.tokens[direction] = member
        self.any_timer_armed[direction] = True
        return True

    def _timer_fired(self, member: ThrottleGroupMember, direction: int) -> None:
        member.timers[direction] = None
        self.any_timer_armed[direction] = False
        if not self._restart_queue(member, direction):
            # Nothing was waiting there any more: give the turn on.
            self._schedule_next(member, direction)

    def _cancel_timer(self, member: ThrottleGroupMember, direction: int) -> None:
        timer = member.timers[direction]
        if timer is not None:
            timer.cancel()
            member.timers[direction] = None
            self.any_timer_armed[direction] = False

    @staticmethod
    def _restart_queue(member: ThrottleGroupMember, direction: int) -> bool:
        """Let the oldest queued request of ``member`` go; False if none."""
        queue = member.queues[direction]
        while queue:
            fut = queue.popleft()
            if not fut.done():
                fut.set_result(None)
                return True
        return False

    def _schedule_next(self, member: ThrottleGroupMember, direction: int) -> None:
        token = self._next_token(member, direction)
        if not token.pending[direction]:
            return
        if not self._schedule_timer(token, direction):
            # Prefer the member whose request just went through.
            if not (member.pending[direction] and self._restart_queue(member, direction)):
                self._cancel_timer(token, direction)
                token.timers[direction] = self.clock.call_at(
                    self.clock.now_ns(), lambda: self._timer_fired(token, direction))
                self.any_timer_armed[direction] = True
            else:
                token = member
            self.tokens[direction] = token

    async def intercept(self, member: ThrottleGroupMember, size: int, direction: int) -> None:
        must_wait = self._schedule_timer(member, direction)
        if must_wait or member.pending[direction]:
            member.pending[direction] += 1
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            member.queues[direction].append(fut)
            try:
                await fut
            finally:
                member.pending[direction] -= 1
                if not fut.done():
                    fut.cancel()
        if member not in self.members:
            return
        self.state.account(direction, size)
        self._schedule_next(member, direction)
