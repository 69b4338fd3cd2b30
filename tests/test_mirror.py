# SPDX-License-Identifier: GPL-2.0-or-later
"""Mirror jobs, differential against the real qemu-storage-daemon 7.2.

Each scenario runs the same QMP session on both daemons in scratch
directories prepared by qemu-img/qemu-io.  The replies must be equal, and
so must the events (timestamps dropped, generated node names normalised),
in order; how events interleave with replies depends on timing and is not
compared.  Then the images each daemon left are compared with
``qemu-img compare``: ours must equal QSD's.

Helpers here (:func:`run_both`, :class:`Wait`, :class:`Sh`) are shared by
the stream/commit and snapshot tests.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qsd.block.protocols import nbd as nbdc

REPO = Path(__file__).resolve().parent.parent
QEMU_SD = shutil.which("qemu-storage-daemon")
pytestmark = pytest.mark.skipif(QEMU_SD is None or shutil.which("qemu-img") is None,
                                reason="QEMU's tools are missing")

_GENERATED = re.compile(r"#block\d+")


@dataclass
class Wait:
    """Read until this event (with this job/node id, if given) has arrived."""

    event: str
    status: str | None = None
    timeout: float = 30.0


@dataclass
class Sh:
    """A shell command in the scratch directory; its output is compared."""

    cmd: str


class Session:
    """One daemon with a QMP connection, recording replies and events."""

    def __init__(self, kind: str, wd: Path) -> None:
        argv = [QEMU_SD] if kind == "qemu" else [sys.executable, "-m", "qsd"]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        self.wd = wd
        self.proc = subprocess.Popen(
            [*argv, "--chardev", "socket,path=qmp.sock,server=on,wait=off,id=c0",
             "--monitor", "chardev=c0"],
            cwd=wd, env=env, stdout=subprocess.DEVNULL, stderr=open(wd / "daemon.err", "wb"))
        deadline = time.monotonic() + 30
        while not (wd / "qmp.sock").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} did not start: {(wd / 'daemon.err').read_text()}")
            time.sleep(0.02)
        while True:  # the socket file appears at bind(), before listen()
            self.sock = socket.socket(socket.AF_UNIX)
            try:
                self.sock.connect(str(wd / "qmp.sock"))
                break
            except ConnectionRefusedError:
                self.sock.close()
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.buf = b""
        self.replies: list[str] = []
        self.events: list[str] = []
        self.pending: list[dict[str, Any]] = []
        self._recv(timeout=30)
        self.execute({"execute": "qmp_capabilities"})

    def _recv(self, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return None
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError("daemon closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def _note(self, msg: dict[str, Any]) -> None:
        msg.pop("timestamp", None)
        text = _GENERATED.sub("#blockN", json.dumps(msg))
        self.events.append(text)
        self.pending.append(msg)

    def execute(self, cmd: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(cmd).encode() + b"\n")
        while True:
            try:
                msg = self._recv(timeout=60)
            except EOFError:
                self.replies.append("<EOF>")
                return
            if msg is None:
                raise TimeoutError(f"no reply to {cmd}")
            if "event" in msg:
                self._note(msg)
                continue
            self.replies.append(_GENERATED.sub("#blockN", json.dumps(msg)))
            return

    def wait(self, w: Wait) -> None:
        deadline = time.monotonic() + w.timeout
        while True:
            for i, ev in enumerate(self.pending):
                if ev["event"] == w.event and (w.status is None
                                               or ev["data"].get("status") == w.status):
                    del self.pending[: i + 1]
                    return
            msg = self._recv(timeout=max(0.0, deadline - time.monotonic()))
            if msg is None:
                raise TimeoutError(f"no {w} (events: {self.events})")
            if "event" in msg:
                self._note(msg)

    def settle(self, quiet: float = 0.3) -> None:
        while True:
            try:
                msg = self._recv(timeout=quiet)
            except (EOFError, OSError):
                return
            if msg is None:
                return
            if "event" in msg:
                self._note(msg)

    def close(self) -> None:
        self.sock.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_session(kind: str, wd: Path, setup: str, steps: list[Any]) -> tuple[list[str], list[str]]:
    """Replies and events (plus shell outputs among the replies)."""
    wd.mkdir(parents=True, exist_ok=True)
    subprocess.run(setup, shell=True, cwd=wd, check=True, capture_output=True)
    sess = Session(kind, wd)
    try:
        for step in steps:
            if isinstance(step, Wait):
                sess.wait(step)
            elif isinstance(step, Sh):
                res = subprocess.run(step.cmd, shell=True, cwd=wd, capture_output=True,
                                     text=True, timeout=120)
                sess.replies.append(f"$ {step.cmd}\n{res.stdout}{res.stderr}[{res.returncode}]")
            else:
                sess.execute(step)
        sess.settle()
    finally:
        sess.close()
    return sess.replies, sess.events


def run_both(tmp: Path, setup: str, steps: list[Any],
             images: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """Run on both daemons; replies and events must match and so must every
    image in ``images`` (``qemu-img compare`` ours against QSD's)."""
    q_replies, q_events = run_session("qemu", tmp / "qemu", setup, steps)
    o_replies, o_events = run_session("qsd", tmp / "qsd", setup, steps)
    assert o_replies == q_replies
    assert o_events == q_events
    for name in images:
        res = subprocess.run(["qemu-img", "compare", "-U", str(tmp / "qemu" / name),
                              str(tmp / "qsd" / name)], capture_output=True, text=True)
        assert res.returncode == 0, f"{name}: {res.stdout}{res.stderr}"
        if name.endswith(".qcow2"):
            check = subprocess.run(["qemu-img", "check", "-U", str(tmp / "qsd" / name)],
                                   capture_output=True, text=True)
            assert check.returncode == 0, check.stdout + check.stderr
    return o_replies, o_events


def cmd(name: str, **args: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"execute": name}
    if args:
        msg["arguments"] = {k.replace("_", "-"): v for k, v in args.items()}
    return msg


def add_qcow2(name: str, filename: str, **extra: Any) -> dict[str, Any]:
    return {"execute": "blockdev-add", "arguments": {
        "driver": "qcow2", "node-name": name,
        "file": {"driver": "file", "filename": filename}, **extra}}


CHAIN = ("qemu-img create -q -f qcow2 base.qcow2 64M"
         " && qemu-io -c 'write -P 0x11 0 4M' -c 'write -P 0x12 40M 3M' base.qcow2"
         " && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2"
         " && qemu-io -c 'write -P 0x33 2M 4M' -c 'write -z 41M 64k' -c 'write -P 0x34 63M 1M'"
         " top.qcow2")


def test_mirror_full_pivot_and_events(tmp_path: Path) -> None:
    """Transcript d's shape: slow start, illegal verbs, set-speed, READY,
    pause/resume (standby), complete; the target then holds everything."""
    setup = CHAIN + " && qemu-img create -q -f qcow2 tgt.qcow2 64M"
    steps = [
        add_qcow2("src", "top.qcow2"),
        add_qcow2("tgt", "tgt.qcow2"),
        cmd("blockdev-mirror", job_id="m0", device="src", target="tgt", sync="full",
            speed=1 << 20, filter_node_name="mirror-filter"),
        cmd("job-complete", id="m0"),
        cmd("block-job-complete", device="m0"),
        cmd("blockdev-del", node_name="src"),
        cmd("blockdev-del", node_name="tgt"),
        cmd("blockdev-del", node_name="mirror-filter"),
        cmd("blockdev-mirror", job_id="m1", device="src", target="tgt", sync="full"),
        cmd("block-job-set-speed", device="m0", speed=0),
        Wait("BLOCK_JOB_READY"),
        cmd("job-pause", id="m0"),
        cmd("job-pause", id="m0"),
        cmd("query-jobs"),
        cmd("job-resume", id="m0"),
        cmd("job-resume", id="m0"),
        cmd("job-complete", id="m0"),
        Wait("JOB_STATUS_CHANGE", "null"),
        cmd("query-block-jobs"),
        cmd("blockdev-del", node_name="tgt"),
        cmd("blockdev-del", node_name="src"),
        Sh("qemu-img compare -U top.qcow2 tgt.qcow2"),
    ]
    run_both(tmp_path, setup, steps, images=("tgt.qcow2", "top.qcow2"))


def test_mirror_sync_modes_cancel_and_finalize(tmp_path: Path) -> None:
    """sync top (target shares the base), soft cancel at READY with manual
    finalize/dismiss, force cancel, sync none; errors in QSD's order."""
    setup = (CHAIN + " && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 t-top.qcow2"
             " && qemu-img create -q -f qcow2 t2.qcow2 64M && qemu-img create -q -f qcow2 t3.qcow2 64M"
             " && qemu-img create -q -f qcow2 small.qcow2 1M")
    steps = [
        add_qcow2("base", "base.qcow2", backing=None),
        {"execute": "blockdev-add", "arguments": {
            "driver": "qcow2", "node-name": "src", "backing": "base",
            "file": {"driver": "file", "filename": "top.qcow2"}}},
        {"execute": "blockdev-add", "arguments": {
            "driver": "qcow2", "node-name": "ttop", "backing": "base",
            "file": {"driver": "file", "filename": "t-top.qcow2"}}},
        add_qcow2("t2", "t2.qcow2"),
        add_qcow2("t3", "t3.qcow2"),
        add_qcow2("small", "small.qcow2"),
        cmd("blockdev-mirror", job_id="mt", device="src", target="ttop", sync="top"),
        Wait("BLOCK_JOB_READY"),
        cmd("query-block-jobs"),
        cmd("job-complete", id="mt"),
        Wait("JOB_STATUS_CHANGE", "null"),
        cmd("blockdev-mirror", job_id="ms", device="src", target="t2", sync="full",
            auto_finalize=False, auto_dismiss=False),
        Wait("BLOCK_JOB_READY"),
        cmd("block-job-cancel", device="ms"),
        Wait("BLOCK_JOB_PENDING"),
        cmd("query-jobs"),
        cmd("job-dismiss", id="ms"),
        cmd("job-finalize", id="ms"),
        cmd("query-block-jobs"),
        cmd("job-dismiss", id="ms"),
        cmd("blockdev-mirror", job_id="mf", device="src", target="t3", sync="full",
            granularity=65536, buf_size=1 << 20),
        Wait("BLOCK_JOB_READY"),
        cmd("block-job-cancel", device="mf", force=True),
        Wait("JOB_STATUS_CHANGE", "null"),
        cmd("blockdev-mirror", job_id="mn", device="src", target="t3", sync="none"),
        Wait("BLOCK_JOB_READY"),
        cmd("job-cancel", id="mn"),
        Wait("JOB_STATUS_CHANGE", "null"),
        cmd("blockdev-mirror", job_id="m3", device="src", target="small", sync="full"),
        Wait("JOB_STATUS_CHANGE", "null"),
        cmd("blockdev-mirror", job_id="e", device="src", target="t2", sync="incremental"),
        cmd("blockdev-mirror", job_id="e", device="src", target="t2", sync="full", granularity=3000),
        cmd("blockdev-mirror", job_id="e", device="src", target="t2", sync="full", granularity=256),
        cmd("blockdev-mirror", job_id="e", device="src", target="t2", sync="full", buf_size=-1),
        cmd("blockdev-mirror", job_id="e", device="src", target="t2", sync="full", replaces="nope"),
        cmd("blockdev-mirror", job_id="e", device="src", target="t2", sync="full", replaces="t3"),
        cmd("blockdev-mirror", job_id="e", device="src", target="t2", sync="full", speed=-1),
        cmd("blockdev-mirror", job_id="e", device="nope", target="t2", sync="full"),
        cmd("blockdev-mirror", job_id="e", device="src", target="nope", sync="full"),
        cmd("blockdev-mirror", job_id="9", device="src", target="src", sync="full"),
        cmd("blockdev-mirror", device="src", target="t2", sync="full"),
        cmd("blockdev-mirror", job_id="e", device="base", target="t2", sync="full"),
        cmd("blockdev-mirror", job_id="e", device="src", target="t2", sync="full",
            filter_node_name="t3"),
        Sh("true"),
    ]
    for node in ("small", "t3", "t2", "ttop", "src", "base"):
        steps.append(cmd("blockdev-del", node_name=node))
    run_both(tmp_path, setup, steps, images=("t-top.qcow2", "t2.qcow2", "t3.qcow2"))


@pytest.mark.parametrize("mode", ["background", "write-blocking"])
def test_mirror_with_writes_through_export(tmp_path: Path, mode: str) -> None:
    """qemu-io writes through an NBD export of the source while the mirror
    runs (sync none catches only those writes); after the pivot the export
    serves the target, and the target holds every write."""
    setup = CHAIN + " && qemu-img create -q -f qcow2 tgt.qcow2 64M"
    url = "nbd+unix:///src?socket=nbd.sock"
    io = "qemu-io -f raw -c 'write -P 0x5a 1M 3M' -c 'write -z 8M 1M' -c 'discard 40M 1M' " + url
    steps = [
        add_qcow2("src", "top.qcow2"),
        add_qcow2("tgt", "tgt.qcow2"),
        cmd("nbd-server-start", addr={"type": "unix", "data": {"path": "nbd.sock"}}),
        cmd("block-export-add", type="nbd", id="e0", node_name="src", writable=True),
        cmd("blockdev-mirror", job_id="m", device="src", target="tgt", sync="none",
            copy_mode=mode),
        Wait("BLOCK_JOB_READY"),
        Sh(io + " | grep -v ops"),
        cmd("job-complete", id="m"),
        Wait("JOB_STATUS_CHANGE", "null"),
        Sh("qemu-io -f raw -r -c 'read -P 0x5a 1M 3M' -c 'read -P 0 8M 1M' " + url
           + " | grep -v ops"),
        cmd("block-export-del", id="e0"),
        Wait("BLOCK_EXPORT_DELETED"),
        cmd("nbd-server-stop"),
        cmd("blockdev-del", node_name="tgt"),
        cmd("blockdev-del", node_name="src"),
        Sh("qemu-io -r -c 'read -P 0x5a 1M 3M' -c 'read -P 0 8M 1M' tgt.qcow2 | grep -v ops"),
    ]
    run_both(tmp_path, setup, steps, images=("tgt.qcow2",))


def test_drive_mirror_creates_target(tmp_path: Path) -> None:
    """drive-mirror makes the target image itself (format of the source),
    full and top (the new image names the source's backing file)."""
    setup = CHAIN
    steps = [
        add_qcow2("src", "top.qcow2"),
        cmd("drive-mirror", job_id="d1", device="src", target="full.qcow2", sync="full"),
        Wait("BLOCK_JOB_READY"),
        cmd("job-cancel", id="d1"),
        Wait("JOB_STATUS_CHANGE", "null"),
        cmd("drive-mirror", job_id="d2", device="src", target="top2.qcow2", sync="top",
            node_name="t2"),
        Wait("BLOCK_JOB_READY"),
        cmd("block-job-cancel", device="d2"),
        Wait("JOB_STATUS_CHANGE", "null"),
        cmd("drive-mirror", job_id="d3", device="src", target="x.qcow2", sync="full",
            mode="existing"),
        cmd("blockdev-del", node_name="src"),
        Sh("qemu-img info -U top2.qcow2 | grep -E '^(backing file|file format|virtual)'"),
        Sh("qemu-img compare full.qcow2 top.qcow2"),
    ]
    run_both(tmp_path, setup, steps, images=("full.qcow2", "top2.qcow2"))


def test_quit_with_ready_mirror(tmp_path: Path) -> None:
    """Transcript i2: quit force-cancels the ready mirror before its reply."""
    setup = CHAIN + " && qemu-img create -q -f qcow2 t.qcow2 64M"
    steps = [
        add_qcow2("s", "top.qcow2"),
        add_qcow2("t", "t.qcow2"),
        cmd("blockdev-mirror", job_id="m", device="s", target="t", sync="full"),
        Wait("BLOCK_JOB_READY"),
        cmd("quit"),
    ]
    replies, events = run_both(tmp_path, setup, steps)
    assert json.loads(events[-1]) == {"event": "JOB_STATUS_CHANGE",
                                      "data": {"status": "null", "id": "m"}}


@pytest.mark.parametrize("policy", ["stop", "report", "ignore"])
def test_mirror_source_error_policies(tmp_path: Path, policy: str) -> None:
    """Transcript l (with raw, whose reads fire blkdebug's read_aio): a
    blkdebug node fails the first data read with EIO;
    stop pauses with io-status failed until job-resume, report fails the
    job, ignore retries the chunk; the target ends up equal to the source."""
    setup = ("qemu-img create -q -f raw es.raw 16M && qemu-io -f raw -c 'write -P 0x42 0 4M' es.raw"
             " && qemu-img create -q -f raw et.raw 16M")
    steps: list[Any] = [
        {"execute": "blockdev-add", "arguments": {
            "driver": "raw", "node-name": "esrc", "file": {
                "driver": "blkdebug", "inject-error": [{"event": "read_aio", "errno": 5,
                                                        "once": True}],
                "image": {"driver": "file", "filename": "es.raw"}}}},
        cmd("blockdev-add", driver="raw", node_name="et",
            file={"driver": "file", "filename": "et.raw"}),
        cmd("blockdev-mirror", job_id="mj", device="esrc", target="et", sync="full",
            on_source_error=policy),
    ]
    if policy == "stop":
        steps += [Wait("JOB_STATUS_CHANGE", "paused"), cmd("query-block-jobs"),
                  cmd("job-resume", id="mj")]
    if policy == "report":
        steps += [Wait("JOB_STATUS_CHANGE", "null")]
    else:
        steps += [Wait("BLOCK_JOB_READY"), cmd("query-block-jobs"), cmd("job-complete", id="mj"),
                  Wait("JOB_STATUS_CHANGE", "null")]
    steps += [cmd("blockdev-del", node_name="esrc"), cmd("blockdev-del", node_name="et")]
    run_both(tmp_path, setup, steps, images=("et.raw",) if policy != "report" else ())


@pytest.mark.parametrize("direction", ["qsd-to-qemu", "qemu-to-qsd"])
def test_live_migration_over_nbd(tmp_path: Path, qemu_sd: Any, qsd: Any, direction: str) -> None:
    """Storage migration: one daemon mirrors its disk into an NBD export of
    the other (an nbd client node as target) while qemu-io keeps writing
    through the source daemon's own export; after the pivot the export
    writes to the remote image, and every write, before, during and after,
    is there.  Both directions: qsd's nbd client against QSD's server, and
    QSD's client against qsd's server."""
    if direction == "qemu-to-qsd":
        qemu_sd, qsd = qsd, qemu_sd
    src, dst = tmp_path / "src.qcow2", tmp_path / "dst.qcow2"
    subprocess.run(f"qemu-img create -q -f qcow2 {src} 64M && qemu-io -c 'write -P 0x11 32M 8M'"
                   f" {src} >/dev/null && qemu-img create -q -f qcow2 {dst} 64M",
                   shell=True, check=True)
    remote = qemu_sd("--blockdev", f"driver=file,node-name=f,filename={dst}",
                     "--blockdev", "driver=qcow2,node-name=d,file=f",
                     "--nbd-server", f"addr.type=unix,addr.path={tmp_path}/remote.sock",
                     "--export", "type=nbd,id=e,node-name=d,name=dst,writable=on",
                     wait_for=[tmp_path / "remote.sock"])
    ours = qsd("--blockdev", f"driver=file,node-name=sf,filename={src}",
               "--blockdev", "driver=qcow2,node-name=src,file=sf",
               "--nbd-server", f"addr.type=unix,addr.path={tmp_path}/local.sock",
               "--export", "type=nbd,id=e,node-name=src,name=src,writable=on",
               wait_for=[tmp_path / "local.sock"])
    q = ours.qmp()
    q.cmd("blockdev-add", driver="nbd", **{"node-name": "tgt"},
          server={"type": "unix", "path": str(tmp_path / "remote.sock")}, export="dst")
    writes = []
    for i in range(192):
        writes += ["-c", f"write -P {i % 250 + 1} {i * 65536} 64k"]
        if i % 8 == 7:
            writes += ["-c", "sleep 20"]
    url = f"nbd+unix:///src?socket={tmp_path}/local.sock"
    writer = subprocess.Popen(["qemu-io", "-f", "raw", *writes, url],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        q.cmd("blockdev-mirror", **{"job-id": "m"}, device="src", target="tgt", sync="full")
        q.wait_event("BLOCK_JOB_READY", timeout=60)
        q.cmd("job-complete", id="m")
        ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
        assert "error" not in ev["data"]
    finally:
        assert writer.wait(timeout=120) == 0, writer.stderr.read() if writer.stderr else ""
    assert q.cmd("query-block-exports")[0]["node-name"] == "tgt"
    checks = []
    for i in range(192):
        checks += ["-c", f"read -P {i % 250 + 1} {i * 65536} 64k"]
    checks += ["-c", "read -P 0x11 32M 8M", "-c", "read -P 0 12M 20M"]
    res = subprocess.run(["qemu-io", "-f", "raw", "-r", *checks, url], capture_output=True,
                         text=True)
    assert res.returncode == 0 and "Pattern verification failed" not in res.stdout, res.stdout
    q.cmd("block-export-del", id="e")
    q.wait_event("BLOCK_EXPORT_DELETED")
    ours.stop()
    remote.stop()
    res = subprocess.run(["qemu-io", "-r", *checks, str(dst)], capture_output=True, text=True)
    assert res.returncode == 0 and "Pattern verification failed" not in res.stdout, res.stdout
    assert subprocess.run(["qemu-img", "check", str(dst)], capture_output=True).returncode == 0


# ----- the NBD client's parsers of server bytes ------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 1 << 40), st.integers(1, 1 << 25),
       st.integers(0, 1 << 32))
def test_nbd_client_parsers_never_crash(data: bytes, offset: int, length: int, ctx: int) -> None:
    """Hostile bytes: every parser either returns values inside the request
    or raises NBDProtocolError; nothing else escapes."""
    for fn in (lambda: nbdc.parse_greeting(data), lambda: nbdc.parse_option_reply(data, 7),
               lambda: nbdc.parse_chunk_header(data), lambda: nbdc.parse_error_chunk(data)):
        try:
            fn()
        except nbdc.NBDProtocolError:
            pass
    try:
        off, size = nbdc.parse_hole(data, offset, length)
        assert offset <= off and off + size <= offset + length and size > 0
    except nbdc.NBDProtocolError:
        pass
    try:
        extents = nbdc.parse_extents(data, ctx, offset, length)
        assert extents and sum(n for n, _ in extents) <= length
        assert all(n > 0 for n, _ in extents)
    except nbdc.NBDProtocolError:
        pass


@given(st.lists(st.tuples(st.integers(1, 1 << 31), st.integers(0, 3)), min_size=1, max_size=20),
       st.integers(1, 1 << 32))
def test_nbd_client_extents_clipped(extents: list[tuple[int, int]], length: int) -> None:
    payload = struct.pack(">I", 9) + b"".join(struct.pack(">II", n, f) for n, f in extents)
    got = nbdc.parse_extents(payload, 9, 0, length)
    assert sum(n for n, _ in got) == min(length, sum(n for n, _ in extents))
