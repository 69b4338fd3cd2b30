#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""blockdev-backup of a fully allocated qcow2 image: qemu-storage-daemon 7.2 beside qsd.

Each run starts a fresh daemon, opens the source (every cluster written by
qemu-io) and a new empty qcow2 target of the same size, starts
``blockdev-backup sync=full`` and times it until BLOCK_JOB_COMPLETED, then
stops the daemon and checks the copy with ``qemu-img compare`` (a failed
compare aborts the benchmark).  Servers alternate within a round; the table
shows medians over rounds, MiB/s, and the speed ratio qsd/QSD (>= 1.0: qsd
is no slower).  The page cache is not dropped: both daemons read a hot
source.

    python3 bench/backup.py [--rounds 3] [--size 1G]

Needs qemu-storage-daemon, qemu-img and qemu-io (bash scripts/setup.sh).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mirror import QMP, REPO, SERVERS  # noqa: E402


def run_one(server: str, d: Path, size: str) -> float:
    """Seconds from blockdev-backup to BLOCK_JOB_COMPLETED."""
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
        start = time.monotonic()
        qmp.cmd("blockdev-backup", **{"job-id": "b"}, device="src", target="tgt", sync="full")
        qmp.wait_event("BLOCK_JOB_COMPLETED")
        elapsed = time.monotonic() - start
        qmp.close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    subprocess.run(["qemu-img", "compare", "-q", str(d / "src.qcow2"), str(tgt)], check=True)
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", default="1G")
    opts = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="qsd-bench-backup-", dir="/var/tmp") as tmp:
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
            got = {s: run_one(s, d, opts.size) for s in order}
            for s, t in got.items():
                times[s].append(t)
            ratios.append(got["QSD"] / got["qsd"])
            print(f"round {r + 1}: " + ", ".join(f"{s} {t:.2f}s" for s, t in got.items()),
                  flush=True)
        print(f"\nbackup sync=full of a fully allocated {opts.size} qcow2 "
              f"({nbytes >> 20} MiB file), median of {opts.rounds} rounds")
        for s in SERVERS:
            med = statistics.median(times[s])
            print(f"  {s:4} {med:6.2f} s  {nbytes / med / (1 << 20):8.1f} MiB/s")
        ratio = statistics.median(times["QSD"]) / statistics.median(times["qsd"])
        print(f"  speed ratio qsd/QSD: median {ratio:.2f}, paired per round "
              f"{statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
