# SPDX-License-Identifier: GPL-2.0-or-later
"""Shared pytest fixtures for qsd's tests.

Fixtures (see each docstring):

* ``workdir``       a fresh short directory under /tmp (unix socket paths must stay < 108 bytes)
* ``qemu_sd``       factory: start the real ``qemu-storage-daemon`` -> :class:`Daemon`
* ``qsd``           factory: start ``python -m qsd`` the same way -> :class:`Daemon`
* ``storage_daemon`` parametrized over both (ids ``qemu`` and ``qsd``) for tests that must pass on each
* ``qmp_connect``   factory: a :class:`RawQMP` client on a unix socket path or a (host, port) pair
* ``libnbd``        Debian's python3-libnbd module (``nbd``) imported into this Python
* ``require_tool``  skip (locally) or fail (under CI=true) when a program is missing

Every daemon is started in its own session (``setsid``), is stopped by its PID (SIGTERM, then SIGKILL after a
grace period) when the test ends, and keeps its stdout/stderr in files in the work directory.

Marker: ``slow`` (registered in pyproject.toml) marks tests kept out of the default suite (scripts/test.sh runs
``-m "not slow"``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import pytest
from hypothesis import settings

REPO = Path(__file__).resolve().parent.parent

# No per-example deadline: the suite shares 2 cores with real QEMU processes and
# guests, and a slow example is not a failure of the property being tested.
settings.register_profile("qsd", deadline=None)
settings.load_profile("qsd")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

QEMU_SD_BIN = "qemu-storage-daemon"
QSD_ARGV = (sys.executable, "-m", "qsd")
DEBIAN_DIST_PACKAGES = "/usr/lib/python3/dist-packages"

START_TIMEOUT = float(os.environ.get("QSD_TEST_START_TIMEOUT", "30"))
STOP_TIMEOUT = float(os.environ.get("QSD_TEST_STOP_TIMEOUT", "10"))


def pytest_configure(config: pytest.Config) -> None:
    # Also registered in pyproject.toml; repeated so that a run with another rootdir/ini knows it too.
    config.addinivalue_line("markers", "slow: long-running tests kept out of the default suite")


# --------------------------------------------------------------------------------------------------
# missing programs


def _missing(what: str) -> None:
    msg = f"{what} is not installed (run scripts/setup.sh)"
    if IN_CI:
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


@pytest.fixture
def require_tool():
    """``require_tool("nbdinfo")`` returns the program's path; skips the test if it is missing (fails under CI)."""

    def require(name: str) -> str:
        path = shutil.which(name)
        if path is None:
            _missing(name)
        return path

    return require


# --------------------------------------------------------------------------------------------------
# directories


@pytest.fixture
def workdir() -> Iterable[Path]:
    """A fresh, short directory (``/tmp/qsd-t-XXXXXX``), removed after the test (kept if QSD_TEST_KEEP is set)."""
    d = Path(tempfile.mkdtemp(prefix="qsd-t-", dir="/tmp"))
    yield d
    if not os.environ.get("QSD_TEST_KEEP"):
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# a raw QMP client: exact bytes in and out


class QMPReplyError(Exception):
    """Raised by :meth:`RawQMP.cmd` when the reply is an error; ``.reply`` is the whole message."""

    def __init__(self, reply: dict):
        err = reply.get("error", {})
        super().__init__(f"{err.get('class')}: {err.get('desc')}")
        self.reply = reply
        self.error_class = err.get("class")
        self.desc = err.get("desc")


class RawQMP:
    """A small, synchronous QMP client over a stream socket that keeps the exact bytes.

    QMP output is a stream of JSON values (one per CRLF-terminated line in the default mode, several lines per value
    with ``pretty=on``); :meth:`recv_raw` returns one value's bytes exactly as received, including the CRLF that
    ends it. ``transcript`` records ``("->", bytes)`` and ``("<-", bytes)`` in order. Events that arrive while
    :meth:`execute` waits for its reply are appended to ``events``.
    """

    def __init__(self, address: str | os.PathLike | tuple[str, int], timeout: float = 30.0,
                 read_greeting: bool = True):
        if isinstance(address, tuple):
            self.sock = socket.create_connection(address, timeout=timeout)
        else:
            # The socket file appears at bind(), a moment before listen(): on a
            # loaded machine a connect can land in between, so retry briefly.
            deadline = time.monotonic() + 10
            while True:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                try:
                    self.sock.connect(os.fspath(address))
                    break
                except ConnectionRefusedError:
                    self.sock.close()
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
        self._buf = b""
        self._decoder = json.JSONDecoder()
        self.transcript: list[tuple[str, bytes]] = []
        self.events: list[dict] = []
        self.greeting: dict | None = None
        self.greeting_raw: bytes | None = None
        if read_greeting:
            self.greeting_raw = self.recv_raw()
            self.greeting = json.loads(self.greeting_raw)

    # -- context manager
    def __enter__(self) -> "RawQMP":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # -- bytes
    def send_raw(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        self.transcript.append(("->", data))
        self.sock.sendall(data)

    def _split_one(self) -> bytes | None:
        """One complete JSON value (plus trailing whitespace through the first LF) from the buffer, or None."""
        text = self._buf.decode("utf-8", errors="surrogateescape")
        start = len(text) - len(text.lstrip())
        if start == len(text):
            return None
        try:
            _, end = self._decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            return None
        nl = text.find("\n", end)
        if nl < 0:
            if text[end:].strip():
                nl = end - 1  # something else follows on the same line: cut right after the value
            else:
                return None  # wait for the terminator
        cut = len(text[: nl + 1].encode("utf-8", errors="surrogateescape"))
        msg, self._buf = self._buf[:cut], self._buf[cut:]
        return msg

    def recv_raw(self, timeout: float | None = None) -> bytes:
        """The next message's exact bytes. Raises EOFError if the server closed the connection."""
        old = self.sock.gettimeout()
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            while True:
                msg = self._split_one()
                if msg is not None:
                    self.transcript.append(("<-", msg))
                    return msg
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise EOFError(f"QMP connection closed (pending bytes: {self._buf!r})")
                self._buf += chunk
        finally:
            if timeout is not None:
                self.sock.settimeout(old)

    def recv(self, timeout: float | None = None) -> dict:
        return json.loads(self.recv_raw(timeout))

    def read_until_eof(self, timeout: float = 10.0) -> bytes:
        """Everything the server sends until it closes the connection (e.g. after ``quit``)."""
        self.sock.settimeout(timeout)
        data = self._buf
        self._buf = b""
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            data += chunk
        if data:
            self.transcript.append(("<-", data))
        return data

    # -- messages
    def send(self, obj: Any) -> bytes:
        data = json.dumps(obj).encode() + b"\n"
        self.send_raw(data)
        return data

    def execute(self, command: str, arguments: dict | None = None, id: Any = None) -> dict:
        """Send one command, return its reply (a dict with "return" or "error"); events seen meanwhile go to
        ``events``."""
        msg: dict[str, Any] = {"execute": command}
        if arguments is not None:
            msg["arguments"] = arguments
        if id is not None:
            msg["id"] = id
        self.send(msg)
        while True:
            reply = self.recv()
            if "event" in reply:
                self.events.append(reply)
                continue
            return reply

    def cmd(self, command: str, **arguments: Any) -> Any:
        """``qmp.cmd("blockdev-add", driver="file", **{"node-name": "f0"})``: the "return" value, or raises
        :class:`QMPReplyError`. Keyword arguments are passed as they are (use ``**{"node-name": ...}`` for dashes)."""
        reply = self.execute(command, arguments or None)
        if "error" in reply:
            raise QMPReplyError(reply)
        return reply["return"]

    def negotiate(self) -> dict:
        reply = self.execute("qmp_capabilities")
        if "error" in reply:
            raise QMPReplyError(reply)
        return reply

    def wait_event(self, name: str, timeout: float = 10.0) -> dict:
        """Return (and remove) the first event called ``name``, reading more messages if needed."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("event") == name:
                    return self.events.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {name} event within {timeout}s (have {self.events!r})")
            msg = self.recv(timeout=left)
            if "event" in msg:
                self.events.append(msg)


@pytest.fixture
def qmp_connect():
    """Factory: ``qmp_connect(path_or_(host, port), negotiate=True)`` -> a connected :class:`RawQMP`, closed after
    the test."""
    clients: list[RawQMP] = []

    def connect(address, negotiate: bool = True, **kw) -> RawQMP:
        q = RawQMP(address, **kw)
        clients.append(q)
        if negotiate:
            q.negotiate()
        return q

    yield connect
    for q in clients:
        q.close()


# --------------------------------------------------------------------------------------------------
# daemons


class DaemonStartError(Exception):
    pass


class Daemon:
    """One storage daemon process (the real qemu-storage-daemon or qsd).

    Attributes: ``argv`` (full command line), ``cwd``, ``pid``, ``proc`` (the Popen), ``qmp_path`` (the QMP
    monitor's unix socket, or None), ``pidfile`` (or None), ``stdout_path``/``stderr_path``.
    """

    def __init__(self, name: str, argv: Sequence[str], cwd: Path, qmp_path: Path | None,
                 pidfile: Path | None, stdio: bool = False, env: dict | None = None):
        self.name = name
        self.argv = list(argv)
        self.cwd = cwd
        self.qmp_path = qmp_path
        self.pidfile = pidfile
        self.stdout_path = cwd / f"{name}.stdout"
        self.stderr_path = cwd / f"{name}.stderr"
        self._clients: list[RawQMP] = []
        full_env = dict(os.environ)
        # ``python -m qsd`` must run the checkout under test, not whatever editable install pip last made
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), full_env.get("PYTHONPATH", "")) if p)
        full_env.update(env or {})
        if stdio:
            stdin, stdout = subprocess.PIPE, subprocess.PIPE
        else:
            stdin, stdout = subprocess.DEVNULL, open(self.stdout_path, "wb")
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, cwd=cwd, stdin=stdin, stdout=stdout, stderr=err,
                                         start_new_session=True, env=full_env)
        if not stdio:
            stdout.close()
        self.pid = self.proc.pid

    # -- state
    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stdout(self) -> str:
        try:
            return self.stdout_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, sockets: Iterable[os.PathLike | str] = (), timeout: float = START_TIMEOUT) -> None:
        """Wait until the pidfile holds our pid (QSD writes it once every option has been applied) and every path
        in ``sockets`` exists. Raises DaemonStartError if the process exits first or time runs out."""
        want = [Path(self.cwd, s) for s in sockets]
        if self.pidfile is None and self.qmp_path is not None:
            want.append(self.qmp_path)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise DaemonStartError(f"{self.name} exited with status {self.proc.returncode} during startup:\n"
                                       f"argv: {self.argv}\nstderr: {self.stderr()}")
            ok = all(p.exists() for p in want)
            if ok and self.pidfile is not None:
                try:
                    ok = self.pidfile.read_text() == f"{self.pid}\n"
                except FileNotFoundError:
                    ok = False
            if ok:
                return
            if time.monotonic() > deadline:
                self.stop()
                raise DaemonStartError(f"{self.name} not ready after {timeout}s:\nargv: {self.argv}\n"
                                       f"stderr: {self.stderr()}")
            time.sleep(0.02)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the process to exit by itself (e.g. after QMP ``quit`` or a startup error); its exit status."""
        return self.proc.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Signal the daemon by its PID and wait; SIGKILL if it is still there after ``timeout``. Exit status."""
        for q in self._clients:
            q.close()
        self._clients.clear()
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()
        return self.proc.returncode

    def kill(self) -> int:
        return self.stop(signal.SIGKILL)

    # -- QMP
    def qmp(self, negotiate: bool = True, **kw) -> RawQMP:
        """A new :class:`RawQMP` connected to this daemon's monitor (negotiated unless told otherwise)."""
        if self.qmp_path is None:
            raise ValueError(f"{self.name} was started without a QMP monitor")
        q = RawQMP(self.qmp_path, **kw)
        self._clients.append(q)
        if negotiate:
            q.negotiate()
        return q


class DaemonFactory:
    """Start daemons of one kind: ``factory(*options, qmp=True, pidfile=True, cwd=None, wait_for=(), check=True)``.

    ``options`` are qemu-storage-daemon command-line arguments, passed as they are (relative paths resolve in
    ``cwd``, by default the test's work directory). With ``qmp=True`` a monitor is added first:
    ``--chardev socket,path=<name>-qmp.sock,server=on,wait=off,id=qmp0 --monitor chardev=qmp0``; with
    ``pidfile=True``, ``--pidfile <name>.pid`` comes last and readiness means "the pidfile holds our pid". With
    ``check=False`` nothing is waited for (use it for startup errors: ``d.wait()``, ``d.stderr()``).
    """

    def __init__(self, kind: str, base_argv: Sequence[str], workdir: Path):
        self.kind = kind
        self.base_argv = list(base_argv)
        self.workdir = workdir
        self.daemons: list[Daemon] = []

    def __call__(self, *options: str, qmp: bool = True, pidfile: bool = True, cwd: Path | str | None = None,
                 wait_for: Iterable[str | os.PathLike] = (), check: bool = True, stdio: bool = False,
                 env: dict | None = None, timeout: float = START_TIMEOUT) -> Daemon:
        cwd = Path(cwd) if cwd is not None else self.workdir
        cwd.mkdir(parents=True, exist_ok=True)
        name = f"{self.kind}{len(self.daemons)}"
        argv = list(self.base_argv)
        qmp_path = None
        if qmp:
            qmp_path = cwd / f"{name}-qmp.sock"
            argv += ["--chardev", f"socket,path={qmp_path},server=on,wait=off,id=qmp0", "--monitor", "chardev=qmp0"]
        argv += list(options)
        pid_path = None
        if pidfile:
            pid_path = cwd / f"{name}.pid"
            argv += ["--pidfile", str(pid_path)]
        d = Daemon(name, argv, cwd, qmp_path, pid_path, stdio=stdio, env=env)
        self.daemons.append(d)
        if check:
            d.wait_ready(wait_for, timeout=timeout)
        return d

    def stop_all(self) -> None:
        for d in reversed(self.daemons):
            d.stop()


def _qemu_sd_argv() -> list[str]:
    path = shutil.which(QEMU_SD_BIN)
    if path is None:
        _missing(QEMU_SD_BIN)
    return [path]


@pytest.fixture
def qemu_sd(workdir):
    """Factory starting the real qemu-storage-daemon (see :class:`DaemonFactory`); all stopped after the test."""
    f = DaemonFactory("qemu", _qemu_sd_argv(), workdir)
    yield f
    f.stop_all()


@pytest.fixture
def qsd(workdir):
    """Factory starting ``python -m qsd`` with the same options (see :class:`DaemonFactory`)."""
    f = DaemonFactory("qsd", QSD_ARGV, workdir)
    yield f
    f.stop_all()


@pytest.fixture(params=["qemu", "qsd"])
def storage_daemon(request, workdir):
    """The same test once against qemu-storage-daemon and once against qsd; ``storage_daemon.kind`` tells which."""
    argv = _qemu_sd_argv() if request.param == "qemu" else QSD_ARGV
    f = DaemonFactory(request.param, argv, workdir)
    yield f
    f.stop_all()


# --------------------------------------------------------------------------------------------------
# libnbd


@pytest.fixture(scope="session")
def libnbd():
    """Debian's python3-libnbd (``import nbd``), importable from this Python 3.11 via Debian's dist-packages."""
    try:
        import nbd  # type: ignore
    except ImportError:
        if DEBIAN_DIST_PACKAGES not in sys.path and os.path.isdir(DEBIAN_DIST_PACKAGES):
            sys.path.append(DEBIAN_DIST_PACKAGES)
        try:
            import nbd  # type: ignore  # noqa: F811
        except ImportError:
            _missing("python3-libnbd")
    return nbd


# --------------------------------------------------------------------------------------------------
# helpers usable from tests: ``from conftest import wait_for_path`` works because pytest puts tests/ on sys.path


def wait_for_path(path: str | os.PathLike, timeout: float = START_TIMEOUT, proc: subprocess.Popen | None = None
                  ) -> None:
    """Poll until ``path`` exists (no fixed sleeps); raise if ``proc`` exits first or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc is not None and proc.poll() is not None:
            raise DaemonStartError(f"process {proc.args!r} exited with {proc.returncode} before {path} appeared")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout}s")
        time.sleep(0.02)
