#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""FUSE export of a raw image: qemu-storage-daemon 7.2 beside qsd, driven by fio.

Each run starts a fresh daemon that mounts the same fully written raw image
on a regular file (``--export type=fuse,...,writable=on``), runs one fio
workload on the mounted file (psync engine, O_DIRECT so that every request
reaches the daemon), and stops the daemon with SIGTERM. Servers alternate
within a round; the table shows medians over rounds and the qsd/QSD ratios,
also paired per round (runs of the same round saw the same machine load).

    python3 bench/fuse.py [--rounds 3] [--seconds 5] [--size 1G] [--only rand-read-4k]

Needs root (mount), fio and qemu-storage-daemon (bash scripts/setup.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKLOADS = {
    "seq-read-1M": ["--rw=read", "--bs=1M"],
    "seq-write-1M": ["--rw=write", "--bs=1M"],
    "rand-read-4k": ["--rw=randread", "--bs=4k"],
    "rand-write-4k": ["--rw=randwrite", "--bs=4k"],
}
SERVERS = {
    "QSD": ["qemu-storage-daemon"],
    "qsd": [sys.executable, "-m", "qsd"],
}


def mounted(path: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def run_one(server: str, workload: str, d: Path, seconds: int) -> float | None:
    """MiB/s of one fio run against a fresh daemon, or None if something failed."""
    mnt, pid = d / "mnt.raw", d / "daemon.pid"
    pid.unlink(missing_ok=True)
    argv = [*SERVERS[server], "--blockdev", f"driver=file,node-name=f0,filename={d / 'img.raw'}",
            "--export", f"type=fuse,id=e0,node-name=f0,mountpoint={mnt},writable=on", "--pidfile", str(pid)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(d / f"{server}.stderr", "ab") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 30
        while not (pid.exists() and mounted(mnt)):
            if proc.poll() is not None or time.monotonic() > deadline:
                print(f"  {server}: did not start (see {d / (server + '.stderr')})", file=sys.stderr)
                return None
            time.sleep(0.05)
        r = subprocess.run(["fio", "--name=fuse", f"--filename={mnt}", "--ioengine=psync", "--direct=1",
                            "--time_based", f"--runtime={seconds}", "--output-format=json",
                            *WORKLOADS[workload]], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"  {server} {workload}: fio failed: {r.stderr.strip()[-300:]}", file=sys.stderr)
            return None
        job = json.loads(r.stdout)["jobs"][0]
        side = job["read"] if job["read"]["io_bytes"] else job["write"]
        return side["bw_bytes"] / (1 << 20)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--only", action="append", default=[])
    args = ap.parse_args()
    workloads = [w for spec in args.only for w in spec.split(",")] or list(WORKLOADS)
    for tool in ("fio", "qemu-storage-daemon", "qemu-img"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (bash scripts/setup.sh)", file=sys.stderr)
            return 1
    d = Path(tempfile.mkdtemp(prefix="qsd-bench-fuse-"))
    try:
        (d / "mnt.raw").touch()
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(d / "img.raw"), args.size], check=True)
        # written through, so that reads are real data from the page cache
        subprocess.run(["dd", "if=/dev/urandom", f"of={d / 'img.raw'}", "bs=1M", "conv=notrunc,fsync",
                        f"count={int(subprocess.check_output(['stat', '-c', '%s', str(d / 'img.raw')])) >> 20}",
                        "status=none"], check=True)
        results: dict[tuple[str, str], list[float | None]] = {}
        order = list(SERVERS)
        for rnd in range(args.rounds):
            for i, w in enumerate(workloads):
                for server in order[i % 2:] + order[:i % 2]:
                    mib = run_one(server, w, d, args.seconds)
                    results.setdefault((server, w), []).append(mib)
                    print(f"round {rnd + 1} {w:14} {server}: "
                          f"{'failed' if mib is None else f'{mib:.1f} MiB/s'}", file=sys.stderr)
        print(f"\n{'workload':14} {'QSD MiB/s':>10} {'qsd MiB/s':>10} {'qsd/QSD':>8} {'paired':>8}")
        for w in workloads:
            q, o = results[("QSD", w)], results[("qsd", w)]
            qm = statistics.median([x for x in q if x is not None] or [0])
            om = statistics.median([x for x in o if x is not None] or [0])
            pairs = [b / a for a, b in zip(q, o) if a and b]
            paired = f"{statistics.median(pairs):8.2f}" if pairs else "       -"
            ratio = f"{om / qm:8.2f}" if qm else "       -"
            print(f"{w:14} {qm:10.1f} {om:10.1f} {ratio} {paired}")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
