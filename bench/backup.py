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

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mirror import QMP, job_bench  # noqa: E402


def backup_job(qmp: QMP) -> float:
    """Seconds from blockdev-backup to BLOCK_JOB_COMPLETED."""
    start = time.monotonic()
    qmp.cmd("blockdev-backup", **{"job-id": "b"}, device="src", target="tgt", sync="full")
    qmp.wait_event("BLOCK_JOB_COMPLETED")
    return time.monotonic() - start


def compare(d: Path) -> None:
    """A wrong copy aborts the benchmark."""
    subprocess.run(["qemu-img", "compare", "-q", str(d / "src.qcow2"), str(d / "tgt.qcow2")],
                   check=True)


if __name__ == "__main__":
    raise SystemExit(job_bench("backup", __doc__.splitlines()[0], backup_job, compare))
