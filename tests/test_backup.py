# SPDX-License-Identifier: GPL-2.0-or-later
"""blockdev-backup/drive-backup and the copy-before-write filter, against
the real qemu-storage-daemon.

Each session runs on QSD and on qsd in directories prepared by the same
qemu-img/qemu-io commands: every reply and event (timestamps and generated
node names normalised) must be the same, in the same order, and the backup
images each daemon wrote must compare equal (``qemu-img compare``) to each
other and to what they are copies of. Guest writes come from qemu-io
through an NBD export of the device while the job runs; the backup must
hold the data as of the job's start.

:class:`Script` is also the driver of test_transaction.py and
test_incremental_backup.py.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, RawQMP
from hypothesis import given, settings
from hypothesis import strategies as st
from qmpdiff import normalise

from qsd.block.bitmap import DirtyBitmap
from qsd.block.filters.copy_before_write import BlockCopy, CopyError

pytestmark = pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None,
                                reason="qemu-storage-daemon is missing")

MiB = 1 << 20
KiB = 1 << 10


class Script:
    """One daemon's side of a differential session: commands, waits for job
    ends and shell commands, everything the daemon says logged in order."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.cwd = daemon.cwd
        self.q: RawQMP = daemon.qmp()
        self.log: list[bytes] = []
        #: Job statuses reported and not waited for yet.
        self.seen: list[tuple[str, str]] = []

    def _record(self, raw: bytes) -> dict[str, Any]:
        self.log.append(b"<- " + normalise(raw.rstrip()))
        msg = json.loads(raw)
        if msg.get("event") == "JOB_STATUS_CHANGE":
            self.seen.append((msg["data"]["id"], msg["data"]["status"]))
        return msg

    def cmd(self, command: str, args: dict[str, Any] | None = None, *,
            until: tuple[str, str] | None = None) -> dict[str, Any]:
        """Run a command; with ``until=(job_id, status)`` also wait for that
        job status (the events on the way are logged)."""
        msg: dict[str, Any] = {"execute": command}
        if args is not None:
            msg["arguments"] = args
        self.log.append(b"-> " + json.dumps(msg).encode())
        self.seen.clear()
        self.q.send(msg)
        while True:
            reply = self._record(self.q.recv_raw())
            if "event" not in reply:
                break
        if until is not None:
            self.wait(*until)
        return reply

    def wait(self, job_id: str, status: str = "null", timeout: float = 30) -> None:
        """Until the job has reported ``status`` since the last command or
        awaited event (maybe already, before the command's reply)."""
        while (job_id, status) not in self.seen:
            self._record(self.q.recv_raw(timeout=timeout))
        self.seen.remove((job_id, status))

    def wait_event(self, name: str, timeout: float = 30) -> None:
        """Until event ``name`` arrives; later waits look at what follows it."""
        while self._record(self.q.recv_raw(timeout=timeout)).get("event") != name:
            pass
        self.seen.clear()

    def nodes(self) -> None:
        """query-named-block-nodes as far as backups change it: the filter
        nodes and the nodes with dirty bitmaps, in the listed order (node
        order and the other members are the graph's and drivers' business)."""
        msg = {"execute": "query-named-block-nodes", "arguments": {"flat": True}}
        self.log.append(b"-> " + json.dumps(msg).encode())
        self.q.send(msg)
        while True:
            raw = self.q.recv_raw()
            reply = json.loads(raw)
            if "event" not in reply:
                break
            self._record(raw)
        for node in reply["return"]:
            image = node["image"]
            view = {"node-name": node["node-name"], "drv": node["drv"], "ro": node["ro"],
                    "format": image["format"], "cluster-size": image.get("cluster-size"),
                    "dirty-flag": image.get("dirty-flag"), "dirty-bitmaps": node.get("dirty-bitmaps")}
            if node["drv"] == "copy-before-write":
                view["filename"] = image["filename"]
            elif not node.get("dirty-bitmaps"):
                continue
            self.log.append(b"<- " + normalise(json.dumps(view).encode()))

    def sh(self, command: str, log: bool = True) -> str:
        res = subprocess.run(command, shell=True, cwd=self.cwd, capture_output=True, timeout=120)
        out = (res.stdout + res.stderr).decode(errors="replace")
        if log:
            self.log.append(f"$ {command}\n{out}[exit {res.returncode}]".encode())
        return out

    def io(self, *commands: str, export: str = "src") -> None:
        """qemu-io commands through the NBD export (guest writes)."""
        args = " ".join(f"-c '{c}'" for c in commands)
        self.sh(f"qemu-io -f raw {args} 'nbd+unix:///{export}?socket=nbd.sock' | grep -v ops")


def differential(qemu_sd: Callable[..., Daemon], qsd: Callable[..., Daemon], workdir: Path,
                 setup: str, session: Callable[[Script], None]) -> tuple[Path, Path]:
    """Run ``session`` on QSD and on qsd, each in its own copy of the setup;
    the logs must be equal. Returns both directories."""
    logs = []
    dirs = []
    for kind, factory in (("qemu", qemu_sd), ("qsd", qsd)):
        d = workdir / kind
        d.mkdir()
        subprocess.run(setup, shell=True, cwd=d, check=True, capture_output=True)
        daemon = factory(cwd=d)
        script = Script(daemon)
        try:
            session(script)
        except (TimeoutError, EOFError, OSError) as err:
            tail = b"\n".join(script.log[-30:]).decode(errors="replace")
            pytest.fail(f"{kind}: {err!r} after:\n{tail}\nstderr: {daemon.stderr()[-3000:]}")
        finally:
            daemon.stop()
        logs.append(b"\n".join(script.log).decode(errors="replace"))
        dirs.append(d)
    if logs[0] != logs[1]:
        import difflib
        diff = difflib.unified_diff(logs[0].splitlines(), logs[1].splitlines(),
                                    "qemu-storage-daemon", "qsd", lineterm="")
        pytest.fail("\n".join(diff))
    return dirs[0], dirs[1]


def compare(a: Path, b: Path) -> None:
    res = subprocess.run(["qemu-img", "compare", str(a), str(b)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def check(path: Path) -> None:
    res = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def qcow2(name: str, filename: str, backing: bool = False) -> dict[str, Any]:
    opts: dict[str, Any] = {"driver": "qcow2", "node-name": name,
                            "file": {"driver": "file", "filename": filename}}
    if not backing:
        opts["backing"] = None
    return opts


def backup(job_id: str, device: str, target: str, sync: str, **extra: Any) -> dict[str, Any]:
    return {"job-id": job_id, "device": device, "target": target, "sync": sync, **extra}


# --------------------------------------------------------------------------------------------------
# sessions

SETUP = ("qemu-img create -q -f qcow2 src.qcow2 16M"
         " && qemu-io -c 'write -P 0x11 0 4M' -c 'write -z 8M 1M' -c 'write -P 0x12 12M 64k'"
         " src.qcow2 >/dev/null"
         " && cp src.qcow2 orig.qcow2"
         " && for t in tf tn tb small; do qemu-img create -q -f qcow2 $t.qcow2 16M; done"
         " && qemu-img resize -q --shrink small.qcow2 8M"
         " && qemu-img create -q -f qcow2 base.qcow2 16M"
         " && qemu-io -c 'write -P 0x22 0 8M' base.qcow2 >/dev/null"
         " && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 16M"
         " && qemu-io -c 'write -P 0x33 1M 1M' -c 'write -z 6M 64k' top.qcow2 >/dev/null"
         " && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 tt.qcow2 16M")

#: Argument errors, in the order QSD checks them (probed on QSD 7.2).
ERRORS = [
    backup("j", "nope", "tf", "full"),
    backup("j", "src", "nope", "full"),
    backup("j", "src", "small", "full"),
    backup("j", "src", "src", "full"),
    backup("j", "src", "tf", "bitmap"),
    backup("j", "src", "tf", "incremental"),
    backup("j", "src", "tf", "full", bitmap="nope"),
    backup("j", "src", "tf", "full", **{"bitmap-mode": "never"}),
    backup("j", "src", "tf", "incremental", bitmap="b", **{"bitmap-mode": "never"}),
    {"device": "src", "target": "tf", "sync": "full"},
    backup("1j", "src", "tf", "full"),
    backup("j", "src", "tf", "full", **{"filter-node-name": "1bad"}),
    backup("j", "src", "tf", "full", **{"filter-node-name": "tf"}),
    backup("j", "src", "tf", "full", **{"x-perf": {"max-workers": 0}}),
    backup("j", "src", "tf", "full", **{"x-perf": {"max-chunk": 4096}}),
    backup("j", "src", "tf", "full", speed=-1),
]


def session_modes(s: Script) -> None:
    for name, f in (("src", "src.qcow2"), ("tf", "tf.qcow2"), ("tn", "tn.qcow2"),
                    ("tb", "tb.qcow2"), ("small", "small.qcow2"), ("tt", "tt.qcow2")):
        s.cmd("blockdev-add", qcow2(name, f))
    s.cmd("blockdev-add", qcow2("top", "top.qcow2", backing=True))
    for args in ERRORS:
        s.cmd("blockdev-backup", args)
    # full: zero areas and unallocated ones read as zeroes on the target
    s.cmd("blockdev-backup", backup("full", "src", "tf", "full"), until=("full", "null"))
    # top: only what top.qcow2 allocates itself; auto-dismiss off, query in concluded
    s.cmd("blockdev-backup", backup("top", "top", "tt", "top", **{"auto-dismiss": False}),
          until=("top", "concluded"))
    s.cmd("query-block-jobs")
    s.cmd("query-jobs")
    s.cmd("job-dismiss", {"id": "top"})
    # none: the filter copies only what guest writes overwrite, until cancelled
    s.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "nbd.sock"}}})
    s.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "src", "writable": True})
    s.cmd("blockdev-backup", backup("none", "src", "tn", "none", **{"filter-node-name": "cbw"}))
    s.cmd("blockdev-del", {"node-name": "tn"})
    s.cmd("blockdev-del", {"node-name": "cbw"})
    s.cmd("blockdev-del", {"node-name": "src"})
    s.io("write -P 0x44 0 64k", "write -P 0x45 12M 32k", "write -z 3M 1M")
    s.cmd("query-block-jobs")
    s.nodes()
    s.cmd("job-cancel", {"id": "none"}, until=("none", "null"))
    # auto-finalize off: pending until job-finalize
    s.cmd("blockdev-backup", backup("fin", "src", "tb", "full", **{"auto-finalize": False}),
          until=("fin", "pending"))
    s.cmd("job-finalize", {"id": "fin"}, until=("fin", "null"))
    s.cmd("block-export-del", {"id": "e"})
    for name in ("tf", "tn", "tb", "tt", "top", "src", "small"):
        s.cmd("blockdev-del", {"node-name": name})
    s.sh("qemu-img compare orig.qcow2 tf.qcow2; qemu-img compare top.qcow2 tt.qcow2")
    s.sh("qemu-io -c 'read -P 0x11 0 64k' -c 'read -P 0x12 12M 64k' -c 'read -P 0x11 3M 1M'"
         " -c 'read -P 0 64k 3008k' tn.qcow2 | grep -v ops")
    s.sh("qemu-img map --output=json tn.qcow2 | grep -c '\"data\": true'")
    s.sh("qemu-img check -q tf.qcow2 && qemu-img check -q tn.qcow2 && qemu-img check -q tt.qcow2"
         " && echo clean")


def test_backup_modes_match_qsd(qemu_sd, qsd, workdir: Path) -> None:
    theirs, ours = differential(qemu_sd, qsd, workdir, SETUP, session_modes)
    for name in ("tf", "tn", "tb", "tt", "src"):
        compare(theirs / f"{name}.qcow2", ours / f"{name}.qcow2")
        check(ours / f"{name}.qcow2")


def session_writes_during_backup(s: Script) -> None:
    """A throttled full backup while qemu-io overwrites the disk: the target
    still gets every cluster's old contents."""
    s.cmd("blockdev-add", qcow2("src", "src.qcow2"))
    s.cmd("blockdev-add", qcow2("tf", "tf.qcow2"))
    s.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "nbd.sock"}}})
    s.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "src", "writable": True})
    s.cmd("blockdev-backup", backup("slow", "src", "tf", "full", speed=4 * MiB))
    s.io("write -P 0x51 0 64k", "write -P 0x52 15M 1M", "write -z 2M 2M", "discard 12M 64k",
         "write -P 0x53 8M 128k")
    s.io("write -P 0x54 15M 1M", "write -P 0x55 100k 8k")
    s.cmd("block-job-set-speed", {"device": "slow", "speed": 0})
    s.wait("slow")
    s.cmd("block-export-del", {"id": "e"})
    s.cmd("blockdev-del", {"node-name": "tf"})
    s.cmd("blockdev-del", {"node-name": "src"})
    s.sh("qemu-img compare orig.qcow2 tf.qcow2 && qemu-img check -q tf.qcow2 && echo clean")
    s.sh("qemu-io -c 'read -P 0x54 15M 1M' -c 'read -P 0x55 100k 8k' -c 'read -P 0 2M 2M'"
         " src.qcow2 | grep -v ops")


def test_guest_writes_during_backup_keep_old_data(qemu_sd, qsd, workdir: Path) -> None:
    theirs, ours = differential(qemu_sd, qsd, workdir, SETUP, session_writes_during_backup)
    compare(theirs / "tf.qcow2", ours / "tf.qcow2")
    compare(theirs / "src.qcow2", ours / "src.qcow2")


def session_compressed(s: Script) -> None:
    """compress=true: a qcow2 target gets compressed clusters (zlib and
    zstd images), a raw target is refused with QSD's text."""
    s.cmd("blockdev-add", qcow2("src", "src.qcow2"))
    for name in ("cz", "cs"):
        s.cmd("blockdev-add", qcow2(name, f"{name}.qcow2"))
    s.cmd("blockdev-add", {"driver": "raw", "node-name": "raw",
                           "file": {"driver": "file", "filename": "raw.img"}})
    s.cmd("blockdev-backup", backup("r", "src", "raw", "full", compress=True))
    s.cmd("blockdev-backup", backup("z", "src", "cz", "full", compress=True), until=("z", "null"))
    s.cmd("blockdev-backup", backup("s", "src", "cs", "full", compress=True), until=("s", "null"))
    for name in ("cz", "cs", "raw", "src"):
        s.cmd("blockdev-del", {"node-name": name})
    for name in ("cz", "cs"):
        s.sh(f"qemu-img compare orig.qcow2 {name}.qcow2")
        s.sh(f"qemu-img check --output=json {name}.qcow2 | grep -E 'compressed|corrupt|leak'")


def test_compressed_backup_matches_qsd(qemu_sd, qsd, workdir: Path) -> None:
    setup = (SETUP + " && qemu-img create -q -f qcow2 cz.qcow2 16M"
             " && qemu-img create -q -f qcow2 -o compression_type=zstd cs.qcow2 16M"
             " && qemu-img create -q -f raw raw.img 16M")
    theirs, ours = differential(qemu_sd, qsd, workdir, setup, session_compressed)
    for name in ("cz", "cs"):
        compare(theirs / f"{name}.qcow2", ours / f"{name}.qcow2")
        check(ours / f"{name}.qcow2")


def session_source_held_by_mirror(s: Script) -> None:
    """A mirror's blocker sits on its source: a backup of it is refused."""
    for name in ("src", "tf", "tb"):
        s.cmd("blockdev-add", qcow2(name, f"{name}.qcow2"))
    s.cmd("blockdev-mirror", {"job-id": "m", "device": "src", "target": "tf", "sync": "full"},
          until=("m", "ready"))
    s.cmd("blockdev-backup", backup("b", "src", "tb", "full"))
    s.cmd("blockdev-backup", backup("b", "tb", "tf", "full"))
    s.cmd("job-cancel", {"id": "m"}, until=("m", "null"))


def test_backup_of_a_mirrored_node_is_refused_as_in_qsd(qemu_sd, qsd, workdir: Path) -> None:
    differential(qemu_sd, qsd, workdir, SETUP, session_source_held_by_mirror)


INFO = ("qemu-img info --output=json {} | python3 -c 'import json, sys; i = json.load(sys.stdin); "
        "print(i[\"format\"], i[\"virtual-size\"], i.get(\"backing-filename\"), i.get(\"cluster-size\"))'")


def session_drive_backup(s: Script) -> None:
    """drive-backup creates (or opens) the target file itself."""
    s.cmd("blockdev-add", qcow2("src", "src.qcow2"))
    s.cmd("blockdev-add", qcow2("top", "top.qcow2", backing=True))
    s.cmd("blockdev-add", {"driver": "raw", "node-name": "rawsrc",
                           "file": {"driver": "file", "filename": "raw.img"}})
    s.cmd("drive-backup", backup("d1", "src", "d-full.qcow2", "full"), until=("d1", "null"))
    s.cmd("drive-backup", backup("d2", "top", "d-top.qcow2", "top"), until=("d2", "null"))
    s.cmd("drive-backup", backup("d3", "src", "d-raw.img", "full", format="raw"),
          until=("d3", "null"))
    s.cmd("drive-backup", backup("d4", "rawsrc", "d-rawsrc.img", "full"), until=("d4", "null"))
    s.cmd("drive-backup", backup("d5", "src", "tf.qcow2", "full", mode="existing"),
          until=("d5", "null"))
    # sync=none: the new image's backing file is the device (image fleecing)
    s.cmd("drive-backup", backup("dn", "src", "d-none.qcow2", "none"))
    s.cmd("query-block-jobs")
    s.cmd("job-cancel", {"id": "dn"}, until=("dn", "null"))
    s.cmd("drive-backup", backup("d6", "src", "nope.qcow2", "full", mode="existing"))
    s.cmd("drive-backup", backup("d7", "src", "d-x.img", "full", format="nosuchfmt"))
    s.cmd("drive-backup", backup("d8", "nope", "d-y.img", "full"))
    s.cmd("drive-backup", backup("d9", "src", "small.qcow2", "full", mode="existing"))
    s.cmd("drive-backup", backup("1d", "src", "d-z.qcow2", "full"))
    s.cmd("query-jobs")
    for name in ("src", "top", "rawsrc"):
        s.cmd("blockdev-del", {"node-name": name})
    for f in ("d-full.qcow2", "d-top.qcow2", "d-raw.img", "d-rawsrc.img", "d-z.qcow2", "d-none.qcow2"):
        s.sh(INFO.format(f))
    s.sh("qemu-img compare orig.qcow2 d-full.qcow2 && qemu-img compare orig.qcow2 d-raw.img"
         " && qemu-img compare top.qcow2 d-top.qcow2 && qemu-img compare raw.img d-rawsrc.img"
         " && qemu-img compare orig.qcow2 tf.qcow2 && qemu-img check -q d-full.qcow2"
         " && qemu-img check -q d-top.qcow2 && echo same")


def test_drive_backup_matches_qsd(qemu_sd, qsd, workdir: Path) -> None:
    setup = SETUP + (" && qemu-img create -q -f raw raw.img 4M"
                     " && qemu-io -f raw -c 'write -P 0x66 1M 1M' raw.img >/dev/null")
    theirs, ours = differential(qemu_sd, qsd, workdir, setup, session_drive_backup)
    for name in ("d-full.qcow2", "d-top.qcow2", "d-raw.img", "tf.qcow2"):
        compare(theirs / name, ours / name)


def session_cbw_node(s: Script) -> None:
    """copy-before-write added by the user (image fleecing): writes through
    it first copy the old clusters to the target; errors of the options."""
    s.cmd("blockdev-add", qcow2("src", "src.qcow2"))
    s.cmd("blockdev-add", qcow2("tf", "tf.qcow2"))
    s.cmd("blockdev-add", qcow2("small", "small.qcow2"))
    s.cmd("block-dirty-bitmap-add", {"node": "src", "name": "b0"})
    for extra in ({"bitmap": {"node": "src", "name": "nope"}},
                  {"bitmap": {"node": "nope", "name": "b0"}},
                  {"target": "nope"}, {"node-name": "1x"}):
        s.cmd("blockdev-add", {"driver": "copy-before-write", "node-name": "fl", "file": "src",
                               "target": "tf", **extra})
    s.cmd("blockdev-add", {"driver": "copy-before-write", "node-name": "fl", "file": "src",
                           "target": "tf", "on-cbw-error": "break-snapshot", "cbw-timeout": 30})
    s.nodes()
    s.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "nbd.sock"}}})
    s.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "fl", "writable": True})
    s.io("write -P 0x71 0 64k", "write -P 0x72 5M 8k", "write -z 12M 1M", "discard 2M 64k",
         export="fl")
    s.io("write -P 0x73 0 64k", export="fl")           # copied once: the target keeps 0x11
    s.nodes()
    s.cmd("block-export-del", {"id": "e"})
    for name in ("fl", "tf", "src", "small"):
        s.cmd("blockdev-del", {"node-name": name})
    s.sh("qemu-io -c 'read -P 0x11 0 64k' -c 'read -P 0 5M 64k' -c 'read -P 0x12 12M 64k'"
         " -c 'read -P 0x11 2M 64k' tf.qcow2 | grep -v ops")
    s.sh("qemu-io -c 'read -P 0x73 0 64k' -c 'read -P 0x72 5M 8k' -c 'read -P 0 12M 1M'"
         " src.qcow2 | grep -v ops")


def test_user_created_cbw_matches_qsd(qemu_sd, qsd, workdir: Path) -> None:
    theirs, ours = differential(qemu_sd, qsd, workdir, SETUP, session_cbw_node)
    compare(theirs / "tf.qcow2", ours / "tf.qcow2")
    compare(theirs / "src.qcow2", ours / "src.qcow2")


def session_running_jobs(s: Script) -> None:
    """New backups of a device a backup already works on: the transaction's
    drain pauses the running job, the device's drain keeps it paused until
    the new jobs run; the filters stack up; quit cancels what is left."""
    for name in ("src", "tf", "tn", "tb"):
        s.cmd("blockdev-add", qcow2(name, f"{name}.qcow2"))
    s.cmd("blockdev-backup", backup("one", "src", "tf", "full", speed=64 << 10))
    s.cmd("transaction", {"actions": [
        {"type": "blockdev-backup", "data": backup("g1", "src", "tn", "full", speed=64 << 10)},
        {"type": "blockdev-backup", "data": backup("g2", "src", "tb", "none")}],
        "properties": {"completion-mode": "grouped"}})
    s.nodes()
    s.sh("sleep 0.3", log=False)
    s.cmd("job-cancel", {"id": "g2"}, until=("g1", "null"))
    s.cmd("quit")


def session_verbs(s: Script) -> None:
    """Transcript l: pause, the verbs a backup refuses, cancel while paused."""
    s.cmd("blockdev-add", qcow2("src", "src.qcow2"))
    s.cmd("blockdev-add", qcow2("tf", "tf.qcow2"))
    s.cmd("blockdev-backup", backup("slow", "src", "tf", "full", speed=64 << 10))
    s.sh("sleep 0.3", log=False)
    s.cmd("block-job-pause", {"device": "slow"})
    s.cmd("query-block-jobs")
    s.cmd("block-job-complete", {"device": "slow"})
    s.cmd("job-complete", {"id": "slow"})
    s.cmd("block-job-cancel", {"device": "slow"})
    s.cmd("block-job-set-speed", {"device": "slow", "speed": 32 << 10})
    s.cmd("job-resume", {"id": "slow"})
    s.cmd("job-finalize", {"id": "slow"})
    s.cmd("job-dismiss", {"id": "slow"})
    s.cmd("block-job-pause", {"device": "slow"})
    s.cmd("job-cancel", {"id": "slow"}, until=("slow", "null"))
    s.cmd("blockdev-backup", backup("q", "src", "tf", "full", speed=64 << 10,
                                    **{"auto-dismiss": False}))
    s.sh("sleep 0.3", log=False)
    s.cmd("block-job-cancel", {"device": "q", "force": True}, until=("q", "concluded"))
    s.cmd("query-jobs")
    s.cmd("block-job-dismiss", {"device": "q"})


def test_job_verbs_match_qsd(qemu_sd, qsd, workdir: Path) -> None:
    differential(qemu_sd, qsd, workdir, SETUP, session_verbs)


def test_backups_of_a_busy_device_match_qsd(qemu_sd, qsd, workdir: Path) -> None:
    differential(qemu_sd, qsd, workdir, SETUP, session_running_jobs)


# --------------------------------------------------------------------------------------------------
# BlockCopy on its own (no daemon): the copy-once rule between the guest path and the job


class _Mem:
    """Just enough of an edge/node over a bytearray."""

    def __init__(self, size: int, fail_read_at: int | None = None) -> None:
        self.data = bytearray(size)
        self.size = size
        self.dirty_bitmaps: list[DirtyBitmap] = []
        self.writes: list[tuple[int, int]] = []
        self.fail_read_at = fail_read_at
        self.child = self

    async def read_into(self, offset: int, buf: memoryview) -> None:
        await asyncio.sleep(0)
        if self.fail_read_at is not None and offset <= self.fail_read_at < offset + len(buf):
            self.fail_read_at = None
            raise OSError(5, "Input/output error")
        buf[:] = self.data[offset:offset + len(buf)]

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        await asyncio.sleep(0)
        self.writes.append((offset, len(data)))
        self.data[offset:offset + len(data)] = data

    async def write_zeroes(self, offset: int, length: int) -> None:
        await self.write(offset, bytes(length))

    async def block_status(self, offset: int, length: int) -> list[Any]:
        from qsd.block.node import Extent
        return [Extent(offset, length)]


def test_block_copy_copies_each_cluster_once_and_retries_failures() -> None:
    async def main() -> None:
        size = 4 * MiB + 64 * KiB
        src, dst = _Mem(size, fail_read_at=2 * MiB), _Mem(size)
        src.data[:] = bytes(range(256)) * (size // 256)
        done: list[int] = []
        bcs = BlockCopy(src, dst, 64 * KiB, None)  # type: ignore[arg-type]
        bcs.on_done = done.append
        # a guest-path copy and the background copy at once
        background = asyncio.ensure_future(bcs.copy(0, size))
        await bcs.copy(3 * MiB + 100, 10)
        with pytest.raises(CopyError) as info:
            await background
        assert info.value.is_read
        assert bcs.copy_bitmap.count() == MiB       # the failed chunk is dirty again
        await bcs.copy(0, size)
        assert bcs.copy_bitmap.count() == 0 and bcs.in_flight_bytes == 0
        assert dst.data == src.data
        assert sum(done) == size
        covered = sorted(dst.writes)
        for (a, n), (b, _) in zip(covered, covered[1:]):
            assert a + n <= b, "a cluster was copied twice"
        bcs.release()
        assert src.dirty_bitmaps == []
    asyncio.run(asyncio.wait_for(main(), 20))


@settings(max_examples=60, deadline=None)
@given(writes=st.lists(st.tuples(st.integers(0, 2 * MiB - 1), st.integers(1, 200 * KiB),
                                 st.integers(0, 3)), max_size=12),
       workers=st.integers(1, 8), cluster=st.sampled_from([64 * KiB, 128 * KiB]))
def test_block_copy_keeps_the_point_in_time(writes: list[tuple[int, int, int]], workers: int,
                                            cluster: int) -> None:
    """Guest writes racing the background copy (each first copying what it
    overwrites, as the filter does): the target ends up as the source was."""
    async def main() -> None:
        size = 2 * MiB + 4096
        src, dst = _Mem(size), _Mem(size)
        src.data[:] = bytes((i * 7) & 0xff for i in range(256)) * (size // 256)
        original = bytes(src.data)
        bcs = BlockCopy(src, dst, cluster, None)  # type: ignore[arg-type]

        async def guest(offset: int, length: int, delay: int) -> None:
            for _ in range(delay):
                await asyncio.sleep(0)
            length = min(length, size - offset)
            await bcs.copy(offset, length)
            await src.write(offset, b"\xee" * length)

        await asyncio.gather(bcs.copy(0, size, max_workers=workers),
                             *(guest(*w) for w in writes))
        assert bytes(dst.data) == original
        assert bcs.copy_bitmap.count() == 0 and bcs.in_flight_bytes == 0
    asyncio.run(asyncio.wait_for(main(), 20))
