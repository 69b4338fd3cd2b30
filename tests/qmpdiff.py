# SPDX-License-Identifier: GPL-2.0-or-later
"""Differential QMP sessions: the same bytes to the real QSD and to qsd.

A session is a list of steps run against a freshly started daemon in its
own scratch directory:

* ``bytes``/``str``: raw client bytes, written as they are (no newline is
  added); everything the daemon says in answer is collected;
* ``Shell(cmd)``: a shell command run in the scratch directory, its exit
  status and output recorded;
* ``Connect(sock)``/``Switch(n)``: open another QMP connection / talk on
  connection ``n``.

The transcripts are normalised (event timestamps, the greeting's version
and package, generated ``#blockNNN`` names) and must then be equal byte for
byte.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

QSD_BIN = "qemu-storage-daemon"
#: The checkout under test: ``python -m qsd`` must run it, not an installed copy.
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Shell:
    cmd: str


@dataclass
class Connect:
    sock: str = "qmp.sock"
    greeting: bool = True


@dataclass
class Partial:
    """Client bytes that do not complete a request: no reply is awaited."""

    data: str


@dataclass
class Switch:
    index: int


@dataclass
class Close:
    """Close the current connection."""


@dataclass
class Wait:
    """Wait until the daemon process has exited; record its status."""


def daemon_argv(kind: str, args: list[str]) -> list[str]:
    if kind == "qsd":
        return [sys.executable, "-m", "qsd", *args]
    return [QSD_BIN, *args]


_TS = re.compile(rb'"timestamp": \{"seconds": \d+, "microseconds": \d+\}')
_GREETING = re.compile(rb'\{"QMP": \{"version": \{"qemu": \{[^}]*\}, "package": "[^"]*"\}')
_VERSION = re.compile(rb'\{"qemu": \{"micro": \d+, "minor": \d+, "major": \d+\}, "package": "[^"]*"\}')
_GENERATED = re.compile(rb"#block\d+")
#: Internal snapshot times (SnapshotInfo) differ from run to run.
_SNAP_TIME = re.compile(rb'"(date|vm-clock)-(sec|nsec)": \d+')


def normalise(data: bytes) -> bytes:
    data = _TS.sub(b'"timestamp": TS', data)
    data = _GREETING.sub(b'{"QMP": {"version": VERSION', data)
    data = _VERSION.sub(b"VERSION", data)
    data = _SNAP_TIME.sub(rb'"\1-\2": T', data)
    return _GENERATED.sub(b"#blockN", data)


class Session:
    """One daemon and its QMP connections, recording everything said."""

    def __init__(self, kind: str, workdir: Path, args: list[str], quiet: float = 0.15) -> None:
        self.kind = kind
        self.workdir = workdir
        self.quiet = quiet
        self.log: list[bytes] = []
        self.conns: list[socket.socket] = []
        self.current = -1
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(daemon_argv(kind, args), cwd=workdir, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not (workdir / "qmp.sock").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} did not start: {self.proc.stderr.read()!r}")
            time.sleep(0.02)

    def connect(self, sock: str, greeting: bool) -> None:
        # The socket file appears at bind(), a moment before listen(): a loaded
        # machine can land a connect in between.
        deadline = time.monotonic() + 20
        while True:
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(str(self.workdir / sock))
                break
            except ConnectionRefusedError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.conns.append(s)
        self.current = len(self.conns) - 1
        self.log.append(b"# connect %d\n" % self.current)
        if greeting:
            self._collect(until=lambda buf: buf.endswith(b"\r\n"))

    def send(self, data: bytes, expect_reply: bool) -> None:
        self.log.append(b"-> " + data + b"\n")
        self.conns[self.current].sendall(data)
        self._collect(until=(lambda buf: buf.endswith(b"\r\n")) if expect_reply else None)

    def _collect(self, until=None, timeout: float = 10.0) -> None:
        """Read until ``until`` holds (if given) and the daemon has then been
        quiet for a moment, so that late events are caught too."""
        s = self.conns[self.current]
        if s.fileno() < 0:
            return
        buf = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([s], [], [], self.quiet)
            if not ready:
                if until is None or until(buf):
                    break
                continue
            try:
                chunk = s.recv(1 << 20)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                buf += b"<EOF>"
                break
            buf += chunk
        for line in buf.split(b"\r\n"):
            if line:
                self.log.append(b"<- " + line + b"\n")

    def collect_all(self) -> None:
        """Collect pending output on every other connection (events)."""
        here = self.current
        for i in range(len(self.conns)):
            if i != here:
                self.current = i
                self.log.append(b"# on %d\n" % i)
                self._collect()
        self.current = here

    def shell(self, cmd: str) -> None:
        res = subprocess.run(cmd, shell=True, cwd=self.workdir, capture_output=True,
                             timeout=60)
        out = (res.stdout + res.stderr).replace(b"qemu-storage-daemon", b"DAEMON")
        self.log.append(b"$ " + cmd.encode() + b"\n" + out + b"[exit %d]\n" % res.returncode)

    def wait(self) -> None:
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            rc = -1
        self.log.append(b"# daemon exited %d\n" % rc)

    def close(self) -> None:
        for s in self.conns:
            s.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        if self.proc.stderr:
            self.proc.stderr.close()


DEFAULT_ARGS = ["--chardev", "socket,path=qmp.sock,server=on,wait=off,id=char0",
                "--monitor", "chardev=char0"]


def run_session(kind: str, workdir: Path, steps: list, args: list[str] | None = None,
                setup: str | None = None) -> bytes:
    """Run ``steps`` against a new daemon of ``kind`` ('qsd' or 'qemu')."""
    workdir.mkdir(parents=True, exist_ok=True)
    if setup:
        subprocess.run(setup, shell=True, cwd=workdir, check=True, capture_output=True)
    sess = Session(kind, workdir, args if args is not None else DEFAULT_ARGS)
    try:
        if not steps or not isinstance(steps[0], Connect):
            sess.connect("qmp.sock", True)
        for step in steps:
            if isinstance(step, Connect):
                sess.connect(step.sock, step.greeting)
            elif isinstance(step, Switch):
                sess.current = step.index
                sess.log.append(b"# switch %d\n" % step.index)
                sess._collect()
            elif isinstance(step, Close):
                sess.conns[sess.current].close()
                sess.log.append(b"# close %d\n" % sess.current)
                time.sleep(sess.quiet)
            elif isinstance(step, Shell):
                sess.shell(step.cmd)
            elif isinstance(step, Wait):
                sess.wait()
            elif isinstance(step, Partial):
                sess.send(step.data.encode(), expect_reply=False)
            else:
                sess.send(step.encode() if isinstance(step, str) else step, expect_reply=True)
                if len(sess.conns) > 1:
                    sess.collect_all()
    finally:
        sess.close()
    return normalise(b"".join(sess.log))


def have_qsd() -> bool:
    return any((Path(p) / QSD_BIN).exists() for p in os.environ.get("PATH", "").split(":"))
