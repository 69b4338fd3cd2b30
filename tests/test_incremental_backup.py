# SPDX-License-Identifier: GPL-2.0-or-later
"""Incremental backup end to end, against the real qemu-storage-daemon.

The recipe management tools use: one transaction adds a dirty bitmap and
starts a full backup; guest writes (qemu-io through an NBD export) dirty
the bitmap; an incremental backup (sync=incremental) copies only the dirty
clusters into an overlay made by ``qemu-img create -b`` and clears the
bitmap; more writes, a sync=bitmap backup with bitmap-mode=never into the
next overlay. The chain full <- inc0 <- inc1 must read exactly like the
disk, and the same session on both daemons must give the same replies,
events, bitmap hashes and allocation maps of the overlays.

The bitmap semantics at the end of a job (on-success/never/always, writes
during the job, failures) are also checked in-process on bitmaps set up
directly, so they do not depend on the QMP bitmap commands.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import pytest
from test_backup import Script, backup, compare, differential, pytestmark, qcow2  # noqa: F401
from test_jobs import Harness

from qsd.block.bitmap import DirtyBitmap

MiB = 1 << 20
KiB = 1 << 10

SETUP = ("qemu-img create -q -f qcow2 disk.qcow2 16M"
         " && qemu-io -c 'write -P 0x01 0 4M' -c 'write -P 0x09 12M 1M' disk.qcow2 >/dev/null"
         " && qemu-img create -q -f qcow2 full.qcow2 16M"
         " && qemu-img create -q -f qcow2 -u -b full.qcow2 -F qcow2 inc0.qcow2 16M"
         " && qemu-img create -q -f qcow2 -u -b inc0.qcow2 -F qcow2 inc1.qcow2 16M"
         " && qemu-img create -q -f qcow2 -u -b inc1.qcow2 -F qcow2 inc2.qcow2 16M")

#: The overlay's own clusters: (start, length, depth, data, zero) of qemu-img map.
MAP = ("qemu-img map --output=json {} | python3 -c 'import json, sys; "
       "print([(e[\"start\"], e[\"length\"], e[\"depth\"], e[\"data\"], e[\"zero\"]) "
       "for e in json.load(sys.stdin) if e[\"depth\"] == 0 and (e[\"data\"] or e[\"zero\"])])'")


def _sha(s: Script) -> None:
    s.cmd("x-debug-block-dirty-bitmap-sha256", {"node": "drive0", "name": "bitmap0"})


def session_incremental(s: Script) -> None:
    s.cmd("blockdev-add", qcow2("drive0", "disk.qcow2"))
    for name in ("full", "inc0", "inc1", "inc2"):
        s.cmd("blockdev-add", qcow2(name, f"{name}.qcow2"))
    # 1) atomically: the bitmap and the full backup
    s.cmd("transaction", {"actions": [
        {"type": "block-dirty-bitmap-add",
         "data": {"node": "drive0", "name": "bitmap0", "persistent": True, "granularity": 65536}},
        {"type": "blockdev-backup", "data": backup("full", "drive0", "full", "full")}]})
    s.wait("full")
    # 2) guest writes dirty it
    s.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "nbd.sock"}}})
    s.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "drive0", "writable": True})
    s.io("write -P 0x02 1M 64k", "write -P 0x03 10M 100k", "write -z 12M 64k", export="drive0")
    _sha(s)
    # 3) incremental: only the dirty clusters; the bitmap is busy meanwhile, then cleared
    s.cmd("blockdev-backup", backup("inc0", "drive0", "inc0", "incremental", bitmap="bitmap0",
                                    speed=64 * KiB))
    s.cmd("block-dirty-bitmap-clear", {"node": "drive0", "name": "bitmap0"})
    s.cmd("block-dirty-bitmap-remove", {"node": "drive0", "name": "bitmap0"})
    s.io("write -P 0x04 1M 4k", export="drive0")       # during the job: old data to inc0
    s.nodes()       # the filter, the frozen bitmap, its successor, the copy bitmaps
    s.cmd("block-job-set-speed", {"device": "inc0", "speed": 0})
    s.wait("inc0")
    _sha(s)
    # 4) sync=bitmap, bitmap-mode=never: the bitmap keeps its bits
    s.io("write -P 0x05 8M 64k", export="drive0")
    s.cmd("blockdev-backup", backup("inc1", "drive0", "inc1", "bitmap", bitmap="bitmap0",
                                    **{"bitmap-mode": "never"}), until=("inc1", "null"))
    _sha(s)
    # 5) bitmap-mode=always into the last overlay, then nothing is dirty
    s.cmd("blockdev-backup", backup("inc2", "drive0", "inc2", "bitmap", bitmap="bitmap0",
                                    **{"bitmap-mode": "always"}), until=("inc2", "null"))
    _sha(s)
    s.cmd("blockdev-backup", backup("x", "drive0", "inc2", "full", bitmap="bitmap0",
                                    **{"bitmap-mode": "never"}))
    s.cmd("block-export-del", {"id": "e"})
    for name in ("inc2", "inc1", "inc0", "full", "drive0"):
        s.cmd("blockdev-del", {"node-name": name})
    for name in ("inc0", "inc1", "inc2"):
        s.sh(MAP.format(f"{name}.qcow2"))
    s.sh("qemu-img compare inc0.qcow2 orig-inc0.qcow2 2>&1 | head -1; "
         "qemu-img compare inc1.qcow2 disk.qcow2 && qemu-img compare inc2.qcow2 disk.qcow2")
    s.sh("qemu-img info disk.qcow2 | sed -n '/bitmaps:/,/granularity/p'")
    s.sh("for f in disk full inc0 inc1 inc2; do qemu-img check -q $f.qcow2 || echo $f; done")


def test_incremental_backup_chain_matches_qsd(qemu_sd, qsd, workdir: Path) -> None:
    # What inc0 must hold: the disk as of the incremental backup's start.
    setup = SETUP + (" && cp disk.qcow2 orig-inc0.qcow2"
                     " && qemu-io -c 'write -P 0x02 1M 64k' -c 'write -P 0x03 10M 100k'"
                     " -c 'write -z 12M 64k' orig-inc0.qcow2 >/dev/null")
    theirs, ours = differential(qemu_sd, qsd, workdir, setup, session_incremental)
    for name in ("full", "inc0", "inc1", "inc2", "disk"):
        compare(theirs / f"{name}.qcow2", ours / f"{name}.qcow2")
    compare(ours / "inc0.qcow2", ours / "orig-inc0.qcow2")
    compare(ours / "inc2.qcow2", ours / "disk.qcow2")


# --------------------------------------------------------------------------------------------------
# bitmap semantics in-process


async def _setup(h: Harness, workdir: Path, source_fmt: str = "qcow2") -> None:
    subprocess.run("qemu-img create -q -f qcow2 s.qcow2 4M && qemu-io -c 'write -P 0x61 0 4M' s.qcow2"
                   " >/dev/null && qemu-img convert -O raw s.qcow2 s.raw"
                   " && qemu-img create -q -f qcow2 t.qcow2 4M", shell=True, cwd=workdir, check=True)
    if source_fmt == "qcow2":
        await h.qmp("blockdev-add", **qcow2("s", str(workdir / "s.qcow2")))
    else:  # raw over blkdebug failing the third read
        await h.qmp("blockdev-add", driver="raw", **{"node-name": "s"},
                    file={"driver": "blkdebug", "image": {"driver": "file",
                                                         "filename": str(workdir / "s.raw")},
                          "inject-error": [
                              {"event": "read_aio", "errno": 5, "once": True, "sector": 4096}]})
    await h.qmp("blockdev-add", **qcow2("t", str(workdir / "t.qcow2")))


def _bitmap(h: Harness, *dirty: tuple[int, int], enabled: bool = True) -> DirtyBitmap:
    node = h.daemon.graph.find("s")
    bm = DirtyBitmap("b", node.size, 64 * KiB, enabled=enabled)
    for off, n in dirty:
        bm.set_range(off, n)
    node.dirty_bitmaps.append(bm)
    return bm


async def _run(h: Harness, mode: str, write: bool = True, **extra: Any) -> None:
    await h.qmp("blockdev-backup", **backup("j", "s", "t", "bitmap", bitmap="b",
                                            **{"bitmap-mode": mode}, speed=64 * KiB, **extra))
    node = h.daemon.graph.find("s")
    assert [b.busy for b in node.dirty_bitmaps if b.name == "b"] == [True]
    successor = node.dirty_bitmaps[-2]
    assert successor.name is None and successor.enabled == node.dirty_bitmaps[0].enabled
    if write:   # a write during the job lands in the successor
        cbw = next(e.parent for e in node.parents if e.parent is not None)
        await cbw.write(3 * MiB, b"\x77" * 4096)
    await h.daemon.jobs.find("j").set_speed(0)
    for _ in range(400):
        if not h.daemon.jobs.newest_first():
            break
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("mode,expect", [
    ("on-success", [(3 * MiB, 64 * KiB)]),                               # the write only
    ("never", [(0, 128 * KiB), (MiB, 64 * KiB), (3 * MiB, 64 * KiB)]),   # old bits + the write
    ("always", [(3 * MiB, 64 * KiB)]),
])
def test_bitmap_modes_after_success(mode: str, expect: list[tuple[int, int]], workdir: Path) -> None:
    async def main() -> None:
        h = Harness()
        await _setup(h, workdir)
        bm = _bitmap(h, (0, 100 * KiB), (MiB, 4 * KiB))
        await _run(h, mode)
        assert h.events("BLOCK_JOB_COMPLETED")[0]["len"] == 3 * 64 * KiB
        node = h.daemon.graph.find("s")
        assert node.dirty_bitmaps == [bm]             # successor gone, the bitmap object kept
        assert list(bm.dirty_extents()) == expect and bm.enabled and not bm.busy
        await h.daemon.shutdown()
    asyncio.run(asyncio.wait_for(main(), 30))


@pytest.mark.parametrize("mode", ["on-success", "never", "always"])
def test_bitmap_modes_after_failure(mode: str, workdir: Path) -> None:
    """A read error fails the job: on-success/never keep every bit; always
    keeps only what was not copied (plus new writes)."""
    async def main() -> None:
        h = Harness()
        await _setup(h, workdir, source_fmt="raw")
        bm = _bitmap(h, (0, 64 * KiB), (2 * MiB, 64 * KiB), (3 * MiB + 64 * KiB, 64 * KiB),
                     enabled=False)
        await _run(h, mode, write=False, **{"x-perf": {"max-workers": 1}})
        done = h.events("BLOCK_JOB_COMPLETED")[0]
        assert done["error"] == "Input/output error" and done["offset"] == 64 * KiB
        extents = list(bm.dirty_extents())
        if mode == "always":
            assert extents == [(2 * MiB, 64 * KiB), (3 * MiB + 64 * KiB, 64 * KiB)]
        else:
            assert extents == [(0, 64 * KiB), (2 * MiB, 64 * KiB), (3 * MiB + 64 * KiB, 64 * KiB)]
        assert not bm.enabled and not bm.busy        # recording as before the job
        await h.daemon.shutdown()
    asyncio.run(asyncio.wait_for(main(), 30))
