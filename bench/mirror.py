#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""blockdev-mirror of a fully allocated qcow2 image: qemu-storage-daemon 7.2 beside qsd.

Each run starts a fresh daemon, opens the source (every cluster written by
qemu-io) and a new empty qcow2 target of the same size, starts
``blockdev-mirror sync=full`` and times it until BLOCK_JOB_READY (the bulk
copy), then completes the job and stops the daemon.  The target file is
removed and created anew before every run.  Servers alternate within a
round; the table shows medians over rounds, MiB/s, and the speed ratio
qsd/QSD (>= 1.0: qsd is no slower).  The page cache is not dropped: both
daemons read a hot source.

    python3 bench/mirror.py [--rounds 3] [--size 1G]

Needs qemu-storage-daemon, qemu-img and qemu-io (bash scripts/setup.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
SERVERS = {
    "QSD": ["qemu-storage-daemon"],
    "qsd": [sys.executable, "-m", "qsd"],
}


class QMP:
    """Just enough QMP: commands, and waiting for an event."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rwb")
        self.file.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, **args: object) -> object:
        msg: dict[str, object] = {"execute": name}
        if args:
            msg["arguments"] = args
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError(f"{name}: {reply['error']}")
            return reply["return"]

    def wait_event(self, name: str) -> None:
        while True:
            line = self.file.readline()
            if not line:
                raise RuntimeError("daemon went away")
            if json.loads(line).get("event") == name:
                return

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def run_one(server: str, d: Path, size: str, job: Callable[[QMP], float]) -> float:
    """Start a fresh daemon with the source and a new empty qcow2 target of
    the same size opened as ``src`` and ``tgt``; ``job`` starts the job and
    returns the seconds it timed."""
    tgt = d / "tgt.qcow2"
    tgt.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tgt), size], check=True)
    sock = d / "qmp.sock"
    sock.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(d / f"{server}.stderr", "ab") as err:
        proc = subprocess.Popen([*SERVERS[server], "--chardev",
                                 f"socket,path={sock},server=on,wait=off,id=c0", "--monitor",
                                 "chardev=c0"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{server} did not start")
            time.sleep(0.02)
        qmp = QMP(sock)
        for name, path in (("src", d / "src.qcow2"), ("tgt", tgt)):
            qmp.cmd("blockdev-add", driver="qcow2", **{"node-name": name},
                    file={"driver": "file", "filename": str(path)})
        elapsed = job(qmp)
        qmp.close()
        return elapsed
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def job_bench(name: str, what: str, job: Callable[[QMP], float],
              check: Callable[[Path], None] | None = None) -> int:
    """The command line and rounds shared by the job benchmarks: a fully
    allocated source, servers alternating, ``check(dir)`` after each run."""
    ap = argparse.ArgumentParser(description=what)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", default="1G")
    opts = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix=f"qsd-bench-{name}-", dir="/var/tmp") as tmp:
        d = Path(tmp)
        src = d / "src.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), opts.size], check=True)
        subprocess.run(["qemu-io", "-c", f"write -P 0xa5 0 {opts.size}", str(src)], check=True,
                       stdout=subprocess.DEVNULL)
        nbytes = src.stat().st_size
        times: dict[str, list[float]] = {s: [] for s in SERVERS}
        ratios: list[float] = []
        for r in range(opts.rounds):
            order = list(SERVERS) if r % 2 == 0 else list(reversed(SERVERS))
            got = {}
            for s in order:
                got[s] = run_one(s, d, opts.size, job)
                if check is not None:
                    check(d)
            for s, t in got.items():
                times[s].append(t)
            ratios.append(got["QSD"] / got["qsd"])
            print(f"round {r + 1}: " + ", ".join(f"{s} {t:.2f}s" for s, t in got.items()),
                  flush=True)
        print(f"\n{name} sync=full of a fully allocated {opts.size} qcow2 "
              f"({nbytes >> 20} MiB file), median of {opts.rounds} rounds")
        for s in SERVERS:
            med = statistics.median(times[s])
            print(f"  {s:4} {med:6.2f} s  {nbytes / med / (1 << 20):8.1f} MiB/s")
        ratio = statistics.median(times["QSD"]) / statistics.median(times["qsd"])
        print(f"  speed ratio qsd/QSD: median {ratio:.2f}, paired per round "
              f"{statistics.median(ratios):.2f}")
    return 0


def mirror_job(qmp: QMP) -> float:
    """Seconds from blockdev-mirror to BLOCK_JOB_READY (the bulk copy)."""
    start = time.monotonic()
    qmp.cmd("blockdev-mirror", **{"job-id": "m"}, device="src", target="tgt", sync="full")
    qmp.wait_event("BLOCK_JOB_READY")
    elapsed = time.monotonic() - start
    qmp.cmd("job-complete", id="m")
    qmp.wait_event("BLOCK_JOB_COMPLETED")
    return elapsed


if __name__ == "__main__":
    raise SystemExit(job_bench("mirror", __doc__.splitlines()[0], mirror_job))
