# SPDX-License-Identifier: GPL-2.0-or-later
"""transaction against the real qemu-storage-daemon: all-or-nothing
rollback (jobs created by earlier actions are aborted newest first, without
block-job events), the abort action, completion-mode=grouped (jobs wait for
each other, fail and cancel together, finalize together) and the errors.

The sessions run on both daemons through :class:`test_backup.Script`; the
normalised logs must be equal and the backups ``qemu-img compare``-equal.
"""

from __future__ import annotations

from pathlib import Path

from test_backup import SETUP, Script, backup, compare, differential, pytestmark, qcow2  # noqa: F401

MiB = 1 << 20


def act(kind: str, **data: object) -> dict[str, object]:
    return {"type": kind, "data": data}


def bk(job_id: str, device: str, target: str, sync: str = "full", **extra: object) -> dict[str, object]:
    return act("blockdev-backup", **backup(job_id, device, target, sync, **extra))


GROUPED = {"completion-mode": "grouped"}


def _nodes(s: Script) -> None:
    for name, f in (("src", "src.qcow2"), ("tf", "tf.qcow2"), ("tn", "tn.qcow2"),
                    ("tb", "tb.qcow2")):
        s.cmd("blockdev-add", qcow2(name, f))


def session_rollback(s: Script) -> None:
    _nodes(s)
    s.cmd("transaction", {"actions": []})
    s.cmd("transaction", {"actions": [act("abort")]})
    s.cmd("transaction", {"actions": [act("abort")], "properties": GROUPED})
    s.cmd("transaction", {"actions": [{"type": "nope", "data": {}}]})
    s.cmd("transaction", {"actions": [act("abort", x=1)]})
    # jobs created by earlier actions go away again, newest first
    s.cmd("transaction", {"actions": [bk("a", "src", "tf", speed=MiB), bk("b", "src", "tn", speed=MiB),
                                      act("abort")]})
    # (QSD 7.2 hangs when a grouped transaction with two backups is aborted.)
    s.cmd("transaction", {"actions": [bk("a", "src", "tf"), bk("b", "src", "nope")]})
    s.cmd("transaction", {"actions": [bk("a", "src", "tf"), bk("a", "src", "tn")]})
    s.cmd("transaction", {"actions": [bk("a", "src", "tf"), bk("b", "src", "tn", sync="bitmap")],
                          "properties": GROUPED})
    s.cmd("query-jobs")
    for name in ("tf", "tn", "tb", "src"):
        s.cmd("blockdev-del", {"node-name": name})


def test_rollback_matches_qsd(qemu_sd, qsd, workdir: Path) -> None:
    differential(qemu_sd, qsd, workdir, SETUP, session_rollback)


def session_grouped(s: Script) -> None:
    _nodes(s)
    # both succeed: each waits for the other, then both finalize
    s.cmd("transaction", {"actions": [bk("a", "src", "tf"), bk("b", "src", "tn", speed=8 * MiB)],
                          "properties": GROUPED})
    s.wait("a")
    s.wait("b")
    # one is cancelled: the other is cancelled with it
    s.cmd("transaction", {"actions": [bk("c", "src", "tf", speed=MiB), bk("d", "src", "tn", speed=MiB)],
                          "properties": GROUPED})
    s.sh("sleep 0.5", log=False)    # both copied their first chunk and wait (rate limit)
    s.cmd("job-cancel", {"id": "c"}, until=("c", "null"))
    # manual finalization: both pending, one job-finalize finalizes the group
    s.cmd("transaction", {"actions": [bk("e", "src", "tf", **{"auto-finalize": False}),
                                      bk("f", "src", "tb", speed=8 * MiB, **{"auto-finalize": False})],
                          "properties": GROUPED})
    s.wait("e", "pending")
    s.wait("f", "pending")
    s.cmd("query-jobs")
    s.cmd("job-finalize", {"id": "f"}, until=("e", "null"))
    # individual completion: the same two jobs are independent
    s.cmd("transaction", {"actions": [bk("g", "src", "tf", speed=64 << 10), bk("h", "src", "tn")]})
    s.wait("h")
    s.cmd("job-cancel", {"id": "g"}, until=("g", "null"))
    for name in ("tf", "tn", "tb", "src"):
        s.cmd("blockdev-del", {"node-name": name})


def test_grouped_completion_matches_qsd(qemu_sd, qsd, workdir: Path) -> None:
    theirs, ours = differential(qemu_sd, qsd, workdir, SETUP, session_grouped)
    for name in ("tn", "tb"):
        compare(theirs / f"{name}.qcow2", ours / f"{name}.qcow2")
        compare(theirs / "orig.qcow2", ours / f"{name}.qcow2")


#: blkdebug's read_aio event comes from the raw format (as in QEMU).
ERROR_SETUP = SETUP + (" && qemu-img create -q -f qcow2 tx.qcow2 16M"
                       " && qemu-img convert -O raw src.qcow2 src.raw")


def session_grouped_failure(s: Script) -> None:
    """A read error fails one job of the group: the other is cancelled."""
    s.cmd("blockdev-add", {"driver": "raw", "node-name": "bad",
                           "file": {"driver": "blkdebug",
                                    "inject-error": [{"event": "read_aio", "errno": 5, "once": True}],
                                    "image": {"driver": "file", "filename": "src.raw"}}})
    s.cmd("blockdev-add", qcow2("tf", "tf.qcow2"))
    s.cmd("blockdev-add", qcow2("tx", "tx.qcow2"))
    s.cmd("blockdev-add", qcow2("top", "top.qcow2", backing=True))
    s.cmd("blockdev-add", qcow2("tt", "tt.qcow2"))
    s.cmd("transaction", {"actions": [bk("slow", "top", "tt", speed=MiB), bk("bad", "bad", "tf")],
                          "properties": GROUPED})
    s.wait("slow")
    s.cmd("query-jobs")
    # on-source-error=stop: the job pauses with io-status failed; resume retries
    s.cmd("blockdev-del", {"node-name": "bad"})
    s.cmd("blockdev-add", {"driver": "raw", "node-name": "bad2",
                           "file": {"driver": "blkdebug",
                                    "inject-error": [{"event": "read_aio", "errno": 5, "once": True}],
                                    "image": {"driver": "file", "filename": "src.raw"}}})
    s.cmd("blockdev-backup", backup("st", "bad2", "tx", "full", **{"on-source-error": "stop"}))
    s.wait_event("BLOCK_JOB_ERROR")
    s.wait("st", "paused")
    s.cmd("query-block-jobs")
    s.cmd("job-resume", {"id": "st"}, until=("st", "null"))
    for name in ("tf", "tx", "tt", "top", "bad2"):
        s.cmd("blockdev-del", {"node-name": name})


def test_grouped_failure_and_error_policies_match_qsd(qemu_sd, qsd, workdir: Path) -> None:
    theirs, ours = differential(qemu_sd, qsd, workdir, ERROR_SETUP, session_grouped_failure)
    compare(theirs / "tx.qcow2", ours / "tx.qcow2")
    compare(ours / "orig.qcow2", ours / "tx.qcow2")


SNAPS = ("qemu-img info --output=json {} | python3 -c 'import json, sys; "
         "print([s[\"name\"] for s in json.load(sys.stdin).get(\"snapshots\", [])])'")


def session_mixed(s: Script) -> None:
    """Bitmap, internal snapshot and backup actions together: rolled back by
    a failing action, then committed."""
    _nodes(s)
    s.cmd("block-dirty-bitmap-add", {"node": "src", "name": "old"})
    rollback = [act("block-dirty-bitmap-add", node="src", name="b1"),
                act("blockdev-snapshot-internal-sync", device="tb", name="s1"),
                act("block-dirty-bitmap-clear", node="src", name="old"),
                bk("j1", "src", "tf", "incremental", bitmap="old"),
                act("block-dirty-bitmap-remove", node="src", name="old")]
    s.cmd("transaction", {"actions": [*rollback, act("abort")]})
    s.cmd("transaction", {"actions": [*rollback[:2],
                                      act("blockdev-snapshot-internal-sync", device="tb", name="s1")]})
    s.cmd("transaction", {"actions": [act("blockdev-snapshot-internal-sync", device="tb", name="s0")],
                          "properties": GROUPED})
    s.cmd("x-debug-block-dirty-bitmap-sha256", {"node": "src", "name": "b1"})
    s.cmd("transaction", {"actions": rollback[:4]})
    s.wait("j1")
    s.cmd("x-debug-block-dirty-bitmap-sha256", {"node": "src", "name": "b1"})
    s.cmd("x-debug-block-dirty-bitmap-sha256", {"node": "src", "name": "old"})
    for name in ("tf", "tn", "tb", "src"):
        s.cmd("blockdev-del", {"node-name": name})
    s.sh(SNAPS.format("tb.qcow2"))
    s.sh("qemu-img check -q tb.qcow2 && echo clean")


def test_mixed_actions_match_qsd(qemu_sd, qsd, workdir: Path) -> None:
    differential(qemu_sd, qsd, workdir, SETUP, session_mixed)


TARGET_ERROR_SETUP = SETUP + " && qemu-img create -q -f raw tr.raw 16M"


def session_target_errors(s: Script) -> None:
    """Write errors on the target: on-target-error=enospc stops on ENOSPC
    (io-status nospace) and resumes; report fails with the error."""
    s.cmd("blockdev-add", qcow2("src", "src.qcow2"))
    for name, errno, once in (("t28", 28, True), ("t5", 5, False)):
        s.cmd("blockdev-add", {"driver": "raw", "node-name": name,
                               "file": {"driver": "blkdebug", "image": {"driver": "file",
                                                                        "filename": "tr.raw"},
                                        "inject-error": [{"event": "write_aio", "errno": errno,
                                                          "once": once}]}})
        s.cmd("blockdev-backup", backup("j", "src", name, "full", **{"on-target-error": "enospc",
                                                                     "x-perf": {"max-workers": 1}}))
        s.wait_event("BLOCK_JOB_ERROR")
        if once:
            s.wait("j", "paused")
            s.cmd("query-block-jobs")
            s.cmd("job-resume", {"id": "j"}, until=("j", "null"))
        else:
            s.wait("j")
        s.cmd("blockdev-del", {"node-name": name})
    s.cmd("blockdev-del", {"node-name": "src"})
    s.sh("qemu-img compare -f qcow2 -F raw orig.qcow2 tr.raw")


def test_target_errors_match_qsd(qemu_sd, qsd, workdir: Path) -> None:
    differential(qemu_sd, qsd, workdir, TARGET_ERROR_SETUP, session_target_errors)
