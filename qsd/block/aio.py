# SPDX-License-Identifier: GPL-2.0-or-later
"""A bounded thread pool for syscalls that may block the event loop.

Drivers try their I/O inline first (``RWF_NOWAIT`` reads served from the
page cache) and only hand the rest to this pool.  It differs from
``loop.run_in_executor`` in one way that matters under load: finished jobs
are collected and delivered to their event loop in batches, so N
completions cost one loop wake-up instead of N (a cross-thread wake-up is
most of a pool hop's cost).  Workers start lazily, so a process that forks
(``--daemonize``) before doing any blocking I/O has no threads to lose.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class BlockingPool:
    """Run blocking callables on at most ``max_workers`` threads."""

    def __init__(self, max_workers: int) -> None:
        self.max_workers = max_workers
        self._jobs: collections.deque[_Job] = collections.deque()
        self._cv = threading.Condition(threading.Lock())
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._done_lock = threading.Lock()
        self._done: dict[asyncio.AbstractEventLoop,
                         list[tuple[asyncio.Future[Any], Any, BaseException | None]]] = {}

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue ``fn(*args)``; the returned future resolves on the calling loop."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        with self._cv:
            self._jobs.append((loop, fut, fn, args))
            if self._idle == 0 and len(self._threads) < self.max_workers:
                t = threading.Thread(target=self._worker, name="qsd-io", daemon=True)
                self._threads.append(t)
                t.start()
            else:
                self._cv.notify()
        return fut

    def _worker(self) -> None:
        while True:
            with self._cv:
                while not self._jobs:
                    self._idle += 1
                    self._cv.wait()
                    self._idle -= 1
                loop, fut, fn, args = self._jobs.popleft()
            try:
                result, exc = fn(*args), None
            except BaseException as e:  # noqa: BLE001 -- the awaiting coroutine gets it
                result, exc = None, e
            with self._done_lock:
                pending = self._done.setdefault(loop, [])
                pending.append((fut, result, exc))
                wake = len(pending) == 1
            if wake:
                try:
                    loop.call_soon_threadsafe(self._deliver, loop)
                except RuntimeError:  # the loop closed while we worked
                    with self._done_lock:
                        self._done.pop(loop, None)

    def _deliver(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._done_lock:
            batch = self._done.pop(loop, [])
        for fut, result, exc in batch:
            if fut.cancelled():
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)


#: The process-wide pool for block I/O; sized for a few disks' queue depth.
POOL = BlockingPool(max_workers=max(4, min(16, 4 * (os.cpu_count() or 1))))


def run_blocking(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """Run ``fn(*args)`` on the shared block I/O pool."""
    return POOL.submit(fn, *args)
