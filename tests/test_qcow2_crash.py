# SPDX-License-Identifier: GPL-2.0-or-later
"""Crash safety of the qcow2 driver: ``kill -9`` of a daemon serving a qcow2
image over NBD while a client writes, zero-writes, discards and flushes.

After every kill, ``qemu-img check`` must find no corruption (leaks are
allowed), our check (:mod:`qsd.block.formats.qcow2.check`) must count
exactly as qemu-img, our leak repair must leave an image qemu-img calls
clean, and every sector whose last acknowledged change came before the last
completed flush must read back (through ``qemu-img convert -O raw``).
Images alternate between plain, over a backing file and lazy-refcounts=on,
with random cluster sizes and refcount widths; half of the clients keep up to
eight requests in flight. The default suite kills 51 times, the ``slow``
variant 600 times.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from test_qcow2_check import ours, qemu_check

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")

SECTOR = 512
SIZE = 4 << 20
SECTORS = SIZE // SECTOR
#: A sector's expected content: a fill byte, or None when unknown (discarded).
Content = int | None


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def make_image(workdir: Path, rnd: random.Random, kind: str) -> Path:
    """A fresh qcow2 image of ``kind`` (plain, backing, lazy) with some data."""
    img = workdir / "c.qcow2"
    for p in workdir.glob("*.qcow2"):
        p.unlink()
    cluster = rnd.choice(["512", "4096", "65536", "16384"])
    # 64-bit refcounts with small clusters make the refcount table grow too
    opts = f"cluster_size={cluster},refcount_bits={rnd.choice([16, 16, 1, 64])}"
    if kind == "lazy":
        opts += ",lazy_refcounts=on"
    if kind == "backing":
        base = workdir / "base.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(SIZE))
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0xbb 0 3M", str(base))
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "-b", "base.qcow2",
            "-F", "qcow2", str(img))
    else:
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(img), str(SIZE))
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0xaa 1M 1M", str(img))
    return img


def initial_model(kind: str) -> list[Content]:
    if kind == "backing":
        based = (3 << 20) // SECTOR
        return [0xBB] * based + [0] * (SECTORS - based)
    m: list[Content] = [0] * SECTORS
    m[(1 << 20) // SECTOR:(2 << 20) // SECTOR] = [0xAA] * ((1 << 20) // SECTOR)
    return m


class Client:
    """Random I/O over NBD; ``durable`` is the model as of the last
    completed flush, ``touched`` the sectors changed since (their content
    after a crash may be old or new)."""

    def __init__(self, nbd: Any, sock: Path, model: list[Content], rnd: random.Random) -> None:
        self.h = nbd.NBD()
        self.h.connect_uri(f"nbd+unix:///q?socket={sock}")
        self.nbd = nbd
        self.model = model
        self.durable = list(model)
        self.touched: set[int] = set()
        self.rnd = rnd
        self.ops = 0

    def one(self) -> None:
        rnd = self.rnd
        start = rnd.randrange(SECTORS)
        count = min(SECTORS - start, rnd.choice([1, 3, 8, 64, 128, 300, 1024]))
        off, n = start * SECTOR, count * SECTOR
        op = rnd.choice("wwwwzzdf")
        span = range(start, start + count)
        if op == "f":
            self.h.flush()
            self.durable = list(self.model)
            self.touched.clear()
            return
        self.touched.update(span)  # before the request: it may land half-way
        if op == "w":
            fill = rnd.randrange(1, 256)
            self.h.pwrite(bytes([fill]) * n, off)
            self.model[start:start + count] = [fill] * count
        elif op == "z":
            flags = self.nbd.CMD_FLAG_NO_HOLE if rnd.random() < 0.5 else 0
            self.h.zero(n, off, flags)
            self.model[start:start + count] = [0] * count
        else:
            self.h.trim(n, off)
            self.model[start:start + count] = [None] * count
        self.ops += 1

    def until_dead(self) -> None:
        while True:
            try:
                self.one()
            except self.nbd.Error:
                return


class ConcurrentClient(Client):
    """Up to ``DEPTH`` requests in flight on disjoint ranges (so the model
    stays exact); a flush waits for them all first, so that it covers every
    request acknowledged before it."""

    DEPTH = 8

    def until_dead(self) -> None:
        self.buffers: dict[int, Any] = {}
        inflight: dict[int, tuple[range, Content | None, bool]] = {}
        try:
            while True:
                while len(inflight) < self.DEPTH:
                    if not self._submit(inflight):
                        break
                self.h.poll(-1)
                for cookie in list(inflight):
                    if self.h.aio_command_completed(cookie):
                        span, fill, trim = inflight.pop(cookie)
                        self.buffers.pop(cookie, None)
                        value = None if trim else fill
                        self.model[span.start:span.stop] = [value] * len(span)
                        self.ops += 1
        except self.nbd.Error:
            return

    def _submit(self, inflight: dict[int, tuple[range, Content | None, bool]]) -> bool:
        """Start one request; False when a flush must wait for the others."""
        rnd = self.rnd
        if rnd.random() < 0.08:
            if inflight:
                return False
            self.h.flush()
            self.durable = list(self.model)
            self.touched.clear()
            return True
        for _ in range(20):
            start = rnd.randrange(SECTORS)
            span = range(start, min(SECTORS, start + rnd.choice([1, 8, 64, 128, 300])))
            if not any(span.start < r.stop and r.start < span.stop
                       for r, _, _ in inflight.values()):
                break
        else:
            return False
        self.touched.update(span)
        off, n = span.start * SECTOR, len(span) * SECTOR
        op = rnd.choice("wwwwzzd")
        if op == "w":
            fill = rnd.randrange(1, 256)
            buf = self.nbd.Buffer.from_bytearray(bytearray([fill]) * n)
            cookie = self.h.aio_pwrite(buf, off)
            self.buffers[cookie] = buf  # must outlive the request
            inflight[cookie] = (span, fill, False)
        elif op == "z":
            inflight[self.h.aio_zero(n, off)] = (span, 0, False)
        else:
            inflight[self.h.aio_trim(n, off)] = (span, None, True)
        return True


def verify_data(img: Path, durable: list[Content], touched: set[int]) -> None:
    raw = img.with_suffix(".raw")
    run("qemu-img", "convert", "-O", "raw", str(img), str(raw))
    data = raw.read_bytes()
    raw.unlink()
    bad = []
    for s in range(SECTORS):
        want = durable[s]
        if want is None or s in touched:
            continue
        got = data[s * SECTOR:(s + 1) * SECTOR]
        if got != bytes([want]) * SECTOR:
            bad.append((s, want, got[:4]))
    assert not bad, f"{len(bad)} flushed sectors lost, first {bad[:5]}"


def crash_once(qsd: Any, libnbd: Any, workdir: Path, seed: int) -> dict[str, Any]:
    rnd = random.Random(seed)
    kind = ("plain", "backing", "lazy")[seed % 3]
    img = make_image(workdir, rnd, kind)
    sock = workdir / f"nbd{seed}.sock"  # a killed daemon leaves its socket file
    d = qsd("--blockdev", f"driver=qcow2,node-name=q,discard=unmap,file.driver=file,"
            f"file.filename={img}",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e0,node-name=q,name=q,writable=on",
            wait_for=[sock])
    cls = ConcurrentClient if seed // 3 % 2 else Client
    client = cls(libnbd, sock, initial_model(kind), rnd)
    timer = threading.Timer(rnd.uniform(0.02, 0.4), os.kill, (d.pid, signal.SIGKILL))
    timer.start()
    try:
        client.until_dead()
    finally:
        timer.cancel()
        d.kill()
    was_dirty = struct_dirty(img)
    theirs = qemu_check(img)
    context = f"seed {seed} ({kind}) after {client.ops} ops: {json.dumps(theirs)}"
    assert theirs["check-errors"] == 0 and not theirs.get("corruptions"), context
    assert ours(img) == theirs, context
    fixed = ours(img, "leaks")
    assert fixed.get("leaks-fixed", 0) == theirs.get("leaks", 0), context
    after = qemu_check(img)
    assert not after.get("leaks") and not after.get("corruptions"), (context, after)
    assert not struct_dirty(img), context
    verify_data(img, client.durable, client.touched)
    return {**theirs, "ops": client.ops, "was-dirty": was_dirty}


def struct_dirty(img: Path) -> bool:
    with open(img, "rb") as f:
        f.seek(72)
        return bool(int.from_bytes(f.read(8), "big") & 1)


def _crash_series(qsd: Any, libnbd: Any, workdir: Path, first: int, count: int) -> None:
    leaky = ops = dirty = 0
    for seed in range(first, first + count):
        r = crash_once(qsd, libnbd, workdir, seed)
        leaky += bool(r.get("leaks"))
        ops += r["ops"]
        dirty += r["was-dirty"]
    print(f"{count} kills after {ops} requests, {leaky} left leaks (all repaired), "
          f"{dirty} left dirty")


def test_kill9_during_io(qsd, libnbd, workdir: Path) -> None:
    _crash_series(qsd, libnbd, workdir, 0, 51)


@pytest.mark.slow
def test_kill9_during_io_long(qsd, libnbd, workdir: Path) -> None:
    _crash_series(qsd, libnbd, workdir, 1000, 600)
