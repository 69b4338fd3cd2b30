# SPDX-License-Identifier: GPL-2.0-or-later
"""block-stream and block-commit, differential against qemu-storage-daemon 7.2
(transcript e's shapes): replies and events equal, images equal to QSD's,
and the rewritten backing file names in the qcow2 headers as QEMU writes them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from test_mirror import Sh, Wait, cmd, pytestmark, run_both  # noqa: F401

CHAIN3 = ("qemu-img create -q -f qcow2 base.qcow2 64M"
          " && qemu-io -c 'write -P 0x11 0 4M' -c 'write -P 0x15 30M 2M' base.qcow2"
          " && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2"
          " && qemu-io -c 'write -P 0x22 4M 4M' -c 'write -z 30M 1M' mid.qcow2"
          " && qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2"
          " && qemu-io -c 'write -P 0x33 8M 4M' -c 'write -P 0x34 3M 2M' top.qcow2")


def _chain() -> list:
    steps = []
    for name, backing in (("base", None), ("mid", "base"), ("top", "mid")):
        steps.append(cmd("blockdev-add", driver="file", node_name=f"{name}-file",
                         filename=f"{name}.qcow2"))
        steps.append(cmd("blockdev-add", driver="qcow2", node_name=name, file=f"{name}-file",
                         backing=backing))
    return steps


def _delete(*names: str) -> list:
    return [cmd("blockdev-del", node_name=n) for n in names]


INFO = "qemu-img info -U top.qcow2 | grep -E '^(image|backing file)'"


def test_stream_intermediate_then_full(tmp_path: Path) -> None:
    steps = _chain() + [
        cmd("block-stream", job_id="s0", device="top", base_node="base"),
        Wait("JOB_STATUS_CHANGE", "null"),
        Sh(INFO),
        *_delete("mid", "mid-file"),
        cmd("block-stream", job_id="s1", device="top", auto_finalize=False, speed=1 << 30),
        Wait("BLOCK_JOB_PENDING"),
        cmd("job-finalize", id="s1"),
        Wait("JOB_STATUS_CHANGE", "null"),
        Sh(INFO),
        cmd("block-stream", job_id="e", device="top", base_node="top"),
        cmd("block-stream", job_id="e", device="top", base_node="base", base="base.qcow2"),
        cmd("block-stream", job_id="e", device="top", bottom="base", base="base.qcow2"),
        cmd("block-stream", job_id="e", device="nope"),
        cmd("block-stream", device="top"),
        *_delete("top", "top-file", "base", "base-file"),
        Sh("qemu-io -r -c 'read -P 0x11 0 3M' -c 'read -P 0x34 3M 2M' -c 'read -P 0x22 5M 3M'"
           " -c 'read -P 0x33 8M 4M' -c 'read -P 0 30M 1M' -c 'read -P 0x15 31M 1M' top.qcow2"
           " | grep -v ops"),
    ]
    run_both(tmp_path, CHAIN3, steps, images=("top.qcow2",))


def test_stream_with_backing_file_name(tmp_path: Path) -> None:
    steps = _chain() + [
        cmd("block-stream", job_id="s0", device="top", base_node="base",
            backing_file="renamed-base.qcow2"),
        Wait("JOB_STATUS_CHANGE", "null"),
        Sh(INFO),
        cmd("block-stream", job_id="s1", device="top", bottom="mid"),
        *_delete("top", "top-file"),
    ]
    run_both(tmp_path, CHAIN3, steps)


def test_commit_intermediate_then_active(tmp_path: Path) -> None:
    steps = _chain() + [
        cmd("block-commit", job_id="c0", device="top", top_node="mid", base_node="base"),
        Wait("JOB_STATUS_CHANGE", "null"),
        Sh(INFO),
        *_delete("mid", "mid-file"),
        cmd("block-commit", job_id="c1", device="top", base_node="base"),
        Wait("BLOCK_JOB_READY"),
        cmd("query-block-jobs"),
        cmd("job-complete", id="c1"),
        Wait("JOB_STATUS_CHANGE", "null"),
        cmd("block-commit", job_id="e", device="top", top_node="base", base_node="base"),
        cmd("block-commit", job_id="e", device="top", base_node="top-file"),
        cmd("block-commit", device="top", base_node="base"),
        cmd("block-commit", job_id="e", device="nope"),
        cmd("block-commit", job_id="e", device="top-file"),
        cmd("block-commit", job_id="e", device="base"),
        *_delete("top", "top-file", "base", "base-file"),
        Sh("qemu-io -r -c 'read -P 0x11 0 3M' -c 'read -P 0x34 3M 2M' -c 'read -P 0x22 5M 3M'"
           " -c 'read -P 0x33 8M 4M' -c 'read -P 0 30M 1M' -c 'read -P 0x15 31M 1M' base.qcow2"
           " | grep -v ops"),
    ]
    run_both(tmp_path, CHAIN3, steps, images=("base.qcow2", "top.qcow2"))


def test_active_commit_soft_cancel_and_backing_file_error(tmp_path: Path) -> None:
    steps = _chain() + [
        cmd("block-commit", job_id="c", device="top", base_node="mid",
            backing_file="x.qcow2"),
        cmd("block-commit", job_id="c", device="top", base_node="mid",
            filter_node_name="ctop"),
        Wait("BLOCK_JOB_READY"),
        cmd("blockdev-del", node_name="top"),
        cmd("block-job-cancel", device="c"),
        Wait("JOB_STATUS_CHANGE", "null"),
        *_delete("top", "top-file", "mid", "mid-file", "base", "base-file"),
    ]
    run_both(tmp_path, CHAIN3, steps, images=("mid.qcow2", "top.qcow2"))


def test_stream_while_guest_writes(tmp_path: Path, qsd: Any) -> None:
    """Writes through an NBD export of the top land while the stream copies
    backing data into the same top: no streamed (older) data may overwrite
    them, and everything else comes from the chain."""
    import subprocess

    subprocess.run(CHAIN3, shell=True, cwd=tmp_path, check=True, capture_output=True)
    d = qsd("--blockdev", "driver=qcow2,node-name=top,file.driver=file,file.filename=top.qcow2",
            "--nbd-server", "addr.type=unix,addr.path=n.sock",
            "--export", "type=nbd,id=e,node-name=top,writable=on", wait_for=["n.sock"],
            cwd=tmp_path)
    q = d.qmp()
    writes = []
    for i in range(64):
        writes += ["-c", f"write -P {0x80 + i % 64} {i * 3 * 65536 + 4096} 8k"]
        if i % 4 == 3:
            writes += ["-c", "sleep 10"]
    writer = subprocess.Popen(["qemu-io", "-f", "raw", *writes, "nbd+unix:///top?socket=n.sock"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL)
    q.cmd("block-stream", **{"job-id": "s", "device": "top", "speed": 16 << 20})
    ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
    assert writer.wait(timeout=60) == 0
    assert "error" not in ev["data"]
    q.cmd("block-export-del", id="e")
    q.wait_event("BLOCK_EXPORT_DELETED")
    d.stop()
    info = subprocess.run(["qemu-img", "info", "top.qcow2"], cwd=tmp_path, capture_output=True,
                          text=True).stdout
    assert "backing file" not in info
    checks = []
    for i in range(64):
        checks += ["-c", f"read -P {0x80 + i % 64} {i * 3 * 65536 + 4096} 8k"]
    checks += ["-c", "read -P 0x11 1M 64k", "-c", "read -P 0x22 7M 64k", "-c", "read -P 0x15 31M 1M", "-c", "read -P 0 30M 1M"]
    res = subprocess.run(["qemu-io", "-r", *checks, "top.qcow2"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert res.returncode == 0 and "verification failed" not in res.stdout, res.stdout


def test_commit_into_implicitly_opened_read_only_backing(tmp_path: Path) -> None:
    """The chain opened from the image headers is read-only below the top:
    both commits make the base (and the overlay whose header changes)
    writable for the job and read-only again after, as QSD."""
    steps = [
        cmd("blockdev-add", driver="qcow2", node_name="top",
            file={"driver": "file", "filename": "top.qcow2"}),
        cmd("block-commit", job_id="c0", device="top", top="mid.qcow2"),
        Wait("JOB_STATUS_CHANGE", "null"),
        Sh(INFO),
        cmd("block-commit", job_id="c1", device="top"),
        Wait("BLOCK_JOB_READY"),
        cmd("job-complete", id="c1"),
        Wait("JOB_STATUS_CHANGE", "null"),
        cmd("blockdev-del", node_name="top"),
        Sh("qemu-io -r -c 'read -P 0x11 0 3M' -c 'read -P 0x34 3M 2M' -c 'read -P 0x22 5M 3M'"
           " -c 'read -P 0x33 8M 4M' base.qcow2 | grep -v ops"),
    ]
    run_both(tmp_path, CHAIN3, steps, images=("base.qcow2", "top.qcow2"))
