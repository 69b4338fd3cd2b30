# SPDX-License-Identifier: GPL-2.0-or-later
"""External snapshots and graph changes used with jobs, differential against
qemu-storage-daemon 7.2: blockdev-snapshot, blockdev-snapshot-sync,
change-backing-file, block-set-write-threshold."""

from __future__ import annotations

from pathlib import Path

from test_mirror import Sh, add_qcow2, cmd, pytestmark, run_both  # noqa: F401

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
