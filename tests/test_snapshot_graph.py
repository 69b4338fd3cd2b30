# SPDX-License-Identifier: GPL-2.0-or-later
"""External snapshots and graph changes used with jobs, differential against
qemu-storage-daemon 7.2: blockdev-snapshot, blockdev-snapshot-sync,
change-backing-file, block-set-write-threshold."""

from __future__ import annotations

from pathlib import Path

from test_mirror import Sh, Wait, add_qcow2, cmd, pytestmark, run_both  # noqa: F401

SETUP = ("qemu-img create -q -f qcow2 base.qcow2 64M && qemu-io -c 'write -P 0x11 0 4M' base.qcow2"
         " && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2"
         " && qemu-img create -q -f qcow2 ov.qcow2 64M && qemu-img create -q -f qcow2 ov2.qcow2 64M"
         " && qemu-img create -q -f raw r.raw 64M")


def test_snapshot_commands_and_errors(tmp_path: Path) -> None:
    steps = [
        add_qcow2("top", "top.qcow2"),
        add_qcow2("ov", "ov.qcow2", backing=None),
        add_qcow2("ov2", "ov2.qcow2"),
        cmd("blockdev-add", driver="raw", node_name="r",
            file={"driver": "file", "filename": "r.raw"}),
        cmd("blockdev-snapshot", node="nope", overlay="ov"),
        cmd("blockdev-snapshot", node="top", overlay="nope"),
        cmd("blockdev-snapshot", node="r", overlay="r"),
        cmd("blockdev-snapshot", node="top", overlay="ov2"),
        cmd("blockdev-snapshot", node="top", overlay="ov"),
        cmd("change-backing-file", device="ov", image_node_name="top", backing_file="foo.qcow2"),
        cmd("change-backing-file", device="top", image_node_name="top", backing_file="foo.qcow2"),
        cmd("change-backing-file", device="ov", image_node_name="nope", backing_file="x"),
        cmd("change-backing-file", device="ov", image_node_name="r", backing_file="x"),
        cmd("change-backing-file", device="nope", image_node_name="top", backing_file="x"),
        cmd("change-backing-file", device="ov2", image_node_name="ov2", backing_file="top.qcow2"),
        cmd("change-backing-file", device="ov2", image_node_name="top", backing_file="b2.qcow2"),
        cmd("blockdev-snapshot-sync", node_name="ov", snapshot_file="s1.qcow2",
            snapshot_node_name="s1"),
        cmd("blockdev-snapshot-sync", node_name="s1", snapshot_file="s2.qcow2"),
        cmd("blockdev-snapshot-sync", device="ov", snapshot_file="s3.qcow2"),
        cmd("blockdev-snapshot-sync", snapshot_file="s3.qcow2"),
        cmd("blockdev-snapshot-sync", node_name="ov", snapshot_file="s4.qcow2", format="raw"),
        cmd("blockdev-snapshot-sync", node_name="ov", snapshot_file="s4.qcow2",
            snapshot_node_name="ov2"),
        cmd("block-set-write-threshold", node_name="nope", write_threshold=5),
        cmd("block-set-write-threshold", node_name="ov", write_threshold=1 << 20),
        *[cmd("blockdev-del", node_name=n) for n in ("ov2", "top", "ov")],
        Sh("qemu-img info -U s1.qcow2 | grep -E '^(backing|file format|virtual)'"),
        Sh("qemu-img info -U ov2.qcow2 | grep -E '^backing'"),
        Sh("qemu-img info -U top.qcow2 | grep -E '^backing'"),
    ]
    run_both(tmp_path, SETUP, steps)


def test_snapshot_under_export_and_write_threshold(tmp_path: Path) -> None:
    """An exported node gets an overlay: the export now serves and writes
    the overlay (the old node keeps its data); the threshold fires once."""
    url = "nbd+unix:///top?socket=nbd.sock"
    steps = [
        add_qcow2("top", "top.qcow2"),
        cmd("nbd-server-start", addr={"type": "unix", "data": {"path": "nbd.sock"}}),
        cmd("block-export-add", type="nbd", id="e", node_name="top", writable=True),
        cmd("blockdev-snapshot-sync", node_name="top", snapshot_file="snap.qcow2",
            snapshot_node_name="snap"),
        cmd("query-block-exports"),
        cmd("block-set-write-threshold", node_name="snap", write_threshold=1 << 20),
        Sh(f"qemu-io -f raw -c 'write -P 0x77 0 4k' -c 'write -P 0x78 1M 64k'"
           f" -c 'write -P 0x79 2M 64k' {url} | grep -v ops"),
        Wait("BLOCK_WRITE_THRESHOLD"),
        Sh(f"qemu-io -f raw -r -c 'read -P 0x77 0 4k' -c 'read -P 0x11 4k 1020k' {url}"
           " | grep -v ops"),
        cmd("block-export-del", id="e"),
        Wait("BLOCK_EXPORT_DELETED"),
        cmd("blockdev-del", node_name="top"),
        Sh("qemu-io -r -c 'read -P 0x11 0 4M' top.qcow2 | grep -v ops"),
        Sh("qemu-img info -U snap.qcow2 | grep -E '^backing'"),
    ]
    run_both(tmp_path, SETUP, steps, images=("snap.qcow2", "top.qcow2"))


def test_blockdev_reopen(tmp_path: Path) -> None:
    """Read-only toggling and backing changes, with QSD's refusals."""
    setup = ("qemu-img create -q -f qcow2 base.qcow2 64M && qemu-io -c 'write -P 0x11 0 4M' base.qcow2"
             " && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2"
             " && qemu-img create -q -f qcow2 b2.qcow2 64M")
    top = {"driver": "qcow2", "node-name": "top", "file": "top-file"}

    def reopen(*opts: dict) -> dict:
        return cmd("blockdev-reopen", options=list(opts))

    steps = []
    for name, backing in (("base", None), ("b2", None), ("top", "base")):
        steps.append(cmd("blockdev-add", driver="file", node_name=f"{name}-file",
                         filename=f"{name}.qcow2"))
        steps.append(cmd("blockdev-add", driver="qcow2", node_name=name, file=f"{name}-file",
                         backing=backing))
    steps += [
        reopen(dict(top)),
        reopen(dict(top, backing="base", **{"read-only": True})),
        Sh("qemu-io -c 'write 0 4k' -f qcow2 top.qcow2 2>&1 | head -1"),
        reopen(dict(top, backing="base"),
               {"driver": "file", "node-name": "top-file", "filename": "top.qcow2",
                "read-only": True}),
        reopen(dict(top, backing=None)),
        reopen(dict(top, backing="b2")),
        reopen(dict(top, backing="nope")),
        reopen(dict(top, backing="top")),
        reopen({"driver": "raw", "node-name": "top", "file": "top-file"}),
        reopen({"driver": "qcow2", "file": "top-file"}),
        reopen({"driver": "qcow2", "node-name": "nope", "file": "top-file"}),
        reopen(dict(top, backing="base", **{"lazy-refcounts": True})),
        reopen(dict(top, backing="base", file="b2-file")),
        reopen({"driver": "file", "node-name": "base-file", "filename": "other.qcow2"}),
        reopen(dict(top, backing="base", **{"detect-zeroes": "on"})),
        cmd("blockdev-del", node_name="base"),
        reopen(dict(top, backing=None)),
        cmd("blockdev-del", node_name="base"),
        cmd("blockdev-del", node_name="base-file"),
        *[cmd("blockdev-del", node_name=n) for n in ("top", "top-file", "b2", "b2-file")],
        Sh("qemu-img info top.qcow2 | grep backing"),
    ]
    run_both(tmp_path, setup, steps, images=("top.qcow2",))


def test_graph_commands_on_a_mirrored_node(tmp_path: Path) -> None:
    """Transcript i2's effect: commands that drain the source of a ready
    mirror make it flap standby/ready (in QSD's number and order) and are
    refused by the job's blocker; quit then cancels the job."""
    setup = ("qemu-img create -q -f qcow2 s.qcow2 64M && qemu-io -c 'write 0 8M' s.qcow2"
             " && qemu-img create -q -f qcow2 t.qcow2 64M && qemu-img create -q -f qcow2 o.qcow2 64M")
    steps = [
        add_qcow2("s", "s.qcow2"),
        add_qcow2("t", "t.qcow2"),
        add_qcow2("o", "o.qcow2", backing=None),
        cmd("blockdev-mirror", job_id="m", device="s", target="t", sync="full"),
        Wait("BLOCK_JOB_READY"),
        cmd("blockdev-snapshot", node="s", overlay="o"),
        cmd("blockdev-snapshot-sync", node_name="s", snapshot_file="x.qcow2",
            snapshot_node_name="x"),
        cmd("change-backing-file", device="s", image_node_name="s", backing_file="x"),
        cmd("blockdev-reopen", options=[{"driver": "qcow2", "node-name": "s",
                                          "file": {"driver": "file", "filename": "s.qcow2"}}]),
        cmd("block-stream", job_id="st", device="s"),
        cmd("block-commit", job_id="c", device="s"),
        cmd("blockdev-mirror", job_id="m2", device="s", target="o", sync="full"),
        cmd("query-block-jobs"),
        cmd("quit"),
    ]
    run_both(tmp_path, setup, steps)
