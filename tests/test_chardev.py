# SPDX-License-Identifier: GPL-2.0-or-later
"""Character devices in process: one session at a time, the startup gate, cleanup, errors.

The stdio backend takes over fds 0 and 1, so it runs in a child process
(``python -c``) with pipes and with regular files.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from qsd.chardev import (
    BACKENDS,
    OPTION_TYPES,
    Chardev,
    RingbufChardev,
    SocketServerChardev,
    open_chardev,
)
from qsd.qmp.errors import QMPError

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0


def run(coro: Awaitable[Any]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, TIMEOUT)
    return asyncio.run(bounded())


async def make(backend: str, opts: dict[str, Any], chardev_id: str = "c0", **kw: Any) -> Chardev:
    return await open_chardev(chardev_id, backend, opts, existing=kw.pop("existing", {}), **kw)


def echo_handler(log: list[str]) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """Greets, echoes lines upper-cased, and records when sessions start and end."""
    count = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        count += 1
        me = count
        log.append(f"start {me}")
        writer.write(f"hello {me}\n".encode())
        await writer.drain()
        while line := await reader.readline():
            writer.write(line.upper())
            await writer.drain()
        log.append(f"end {me}")

    return handler


async def unix_client(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(str(path))


# ---------------------------------------------------------------------------
# Listening sockets


def test_one_session_at_a_time(tmp_path: Path) -> None:
    async def main() -> list[str]:
        log: list[str] = []
        path = tmp_path / "m.sock"
        dev = await make("socket", {"path": str(path), "server": True, "wait": False})
        task = asyncio.create_task(dev.serve(echo_handler(log)))
        r1, w1 = await unix_client(path)
        assert await r1.readline() == b"hello 1\n"
        r2, w2 = await unix_client(path)           # connects (the kernel accepts) ...
        with pytest.raises(asyncio.TimeoutError):  # ... but hears nothing yet
            await asyncio.wait_for(r2.readline(), 0.2)
        w1.write(b"abc\n")
        assert await r1.readline() == b"ABC\n"
        w1.close()
        assert await r2.readline() == b"hello 2\n"
        w2.write(b"x\n")
        assert await r2.readline() == b"X\n"
        await dev.close()
        assert await r2.read() == b""              # close ends the session
        await task
        return log

    assert run(main()) == ["start 1", "end 1", "start 2", "end 2"]
    assert not (tmp_path / "m.sock").exists()


def test_held_until_released(tmp_path: Path) -> None:
    async def main() -> None:
        log: list[str] = []
        path = tmp_path / "m.sock"
        dev = await make("socket", {"path": str(path), "server": True, "wait": False}, held=True)
        task = asyncio.create_task(dev.serve(echo_handler(log)))
        reader, writer = await unix_client(path)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.readline(), 0.2)
        assert log == []
        dev.release()
        assert await reader.readline() == b"hello 1\n"
        writer.close()
        await dev.close()
        await task

    run(main())


def test_close_while_held(tmp_path: Path) -> None:
    async def main() -> None:
        dev = await make("socket", {"path": str(tmp_path / "m.sock"), "server": True, "wait": False}, held=True)
        task = asyncio.create_task(dev.serve(echo_handler([])))
        await asyncio.sleep(0)
        await dev.close()
        await dev.close()                           # idempotent
        await task

    run(main())
    assert not (tmp_path / "m.sock").exists()


def test_serve_cancelled_closes_connection(tmp_path: Path) -> None:
    """What Monitor.close() does: cancel serve(); the client sees EOF."""
    async def main() -> None:
        path = tmp_path / "m.sock"
        dev = await make("socket", {"path": str(path), "server": True, "wait": False})
        task = asyncio.create_task(dev.serve(echo_handler([])))
        reader, _ = await unix_client(path)
        assert await reader.readline() == b"hello 1\n"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await reader.read() == b""
        await dev.close()

    run(main())


def test_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "m.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()                                   # a socket file nobody listens on
    path_file = tmp_path / "f.sock"
    path_file.write_text("not a socket")

    async def main() -> None:
        for p in (path, path_file):
            dev = await make("socket", {"path": str(p), "server": True, "wait": False})
            task = asyncio.create_task(dev.serve(echo_handler([])))
            reader, writer = await unix_client(p)
            assert await reader.readline() == b"hello 1\n"
            writer.close()
            await dev.close()
            await task

    run(main())
    assert not path.exists() and not path_file.exists()


def test_close_leaves_a_successors_socket(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "m.sock"
        old = await make("socket", {"path": str(path), "server": True, "wait": False})
        new = await make("socket", {"path": str(path), "server": True, "wait": False}, chardev_id="c1")
        await old.close()
        assert path.is_socket()
        await new.close()
        assert not path.exists()

    run(main())


def test_tcp_listener(tmp_path: Path) -> None:
    async def main() -> None:
        dev = await make("socket", {"host": "127.0.0.1", "port": "0", "server": True, "wait": False})
        assert isinstance(dev, SocketServerChardev)
        port = dev._listeners[0].getsockname()[1]
        task = asyncio.create_task(dev.serve(echo_handler([])))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await reader.readline() == b"hello 1\n"
        writer.close()
        await dev.close()
        await task

    run(main())


def test_abstract_socket() -> None:
    name = f"qsd-test-{os.getpid()}"

    async def main() -> None:
        dev = await make("socket", {"path": name, "server": True, "wait": False, "abstract": True})
        task = asyncio.create_task(dev.serve(echo_handler([])))
        reader, writer = await asyncio.open_unix_connection("\0" + name)
        assert await reader.readline() == b"hello 1\n"
        writer.close()
        await dev.close()
        await task

    run(main())


def test_inherited_listening_fd(tmp_path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "fd.sock"))

    async def main() -> None:
        dev = await make("socket", {"fd": str(sock.fileno()), "server": True, "wait": False})
        task = asyncio.create_task(dev.serve(echo_handler([])))
        reader, writer = await unix_client(tmp_path / "fd.sock")
        assert await reader.readline() == b"hello 1\n"
        writer.close()
        await dev.close()
        await task

    run(main())
    sock.detach()                                   # the chardev closed the fd


def test_wait_for_first_client(tmp_path: Path) -> None:
    """wait=on: creation returns only once a client came, and that client is served first."""
    async def main() -> list[str]:
        path = tmp_path / "w.sock"
        notes: list[str] = []
        creating = asyncio.create_task(make("socket", {"path": str(path), "server": True}, info=notes.append))
        while not path.exists():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert not creating.done()
        reader, writer = await unix_client(path)
        dev = await creating
        task = asyncio.create_task(dev.serve(echo_handler([])))
        assert await reader.readline() == b"hello 1\n"
        writer.close()
        await dev.close()
        await task
        return notes

    label = f"disconnected:unix:{tmp_path / 'w.sock'},server=on"
    assert run(main()) == [f"info: QEMU waiting for connection on: {label}"]


def test_client_mode(tmp_path: Path) -> None:
    async def main() -> list[str]:
        log: list[str] = []
        received: list[bytes] = []

        async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            received.append(await reader.readline())
            writer.close()

        server = await asyncio.start_unix_server(peer, str(tmp_path / "peer.sock"))
        dev = await make("socket", {"path": str(tmp_path / "peer.sock")})
        await dev.serve(echo_handler(log))          # one session, then serve() returns
        server.close()
        await dev.close()
        assert received == [b"hello 1\n"]
        return log

    assert run(main()) == ["start 1", "end 1"]


# ---------------------------------------------------------------------------
# Other backends


def test_file_backend(tmp_path: Path) -> None:
    async def write(opts: dict[str, Any]) -> None:
        dev = await make("file", opts)

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"line\n")
            await writer.drain()
            with pytest.raises(asyncio.TimeoutError):   # no input, ever
                await asyncio.wait_for(reader.read(1), 0.05)

        await dev.serve(handler)
        await dev.close()

    out = tmp_path / "out.txt"
    out.write_text("old\n")
    run(write({"path": str(out)}))
    assert out.read_text() == "line\n"
    run(write({"path": str(out), "append": True}))
    assert out.read_text() == "line\nline\n"


def test_null_backend() -> None:
    async def main() -> None:
        dev = await make("null", {})

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"x" * 100000)
            await writer.drain()

        await dev.serve(handler)
        await dev.close()

    run(main())


def test_ringbuf_backend() -> None:
    async def main() -> None:
        dev = await make("ringbuf", {"size": 8})
        assert isinstance(dev, RingbufChardev)
        got: list[bytes] = []

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"0123456789")
            got.append(await reader.readexactly(3))

        task = asyncio.create_task(dev.serve(handler))
        dev.ring_write(b"abc")
        await task
        assert got == [b"abc"]
        assert dev.ring_read(3) == b"234"          # only the last 8 bytes were kept
        assert dev.ring_read(100) == b"56789"
        await dev.close()

    run(main())


STDIO_CHILD = """
import asyncio, sys
from qsd.chardev import open_chardev

async def handler(reader, writer):
    writer.write(b"hello\\n")
    while line := await reader.readline():
        writer.write(line.upper())
        await writer.drain()
    writer.write(b"eof\\n")

async def main():
    dev = await open_chardev("s0", "stdio", {}, existing={})
    await dev.serve(handler)
    await dev.close()

asyncio.run(main())
"""


@pytest.mark.parametrize("kind", ["pipes", "files"])
def test_stdio_backend(tmp_path: Path, kind: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if kind == "pipes":
        proc = subprocess.run([sys.executable, "-c", STDIO_CHILD], input=b"a\nb\n", capture_output=True,
                              timeout=TIMEOUT, env=env, check=False)
        out = proc.stdout
    else:
        (tmp_path / "in").write_bytes(b"a\nb\n")
        with open(tmp_path / "in", "rb") as stdin, open(tmp_path / "out", "wb") as stdout:
            proc = subprocess.run([sys.executable, "-c", STDIO_CHILD], stdin=stdin, stdout=stdout,
                                  stderr=subprocess.PIPE, timeout=TIMEOUT, env=env, check=False)
        out = (tmp_path / "out").read_bytes()
    assert (proc.returncode, proc.stderr, out) == (0, b"", b"hello\nA\nB\neof\n")


# ---------------------------------------------------------------------------
# Errors, in QSD's words


@pytest.mark.parametrize(("backend", "opts", "message"), [
    ("nosuch", {}, "'nosuch' is not a valid char driver name"),
    ("pty", {}, "'pty' is not a valid char driver name"),
    ("file", {}, "chardev: file: no filename given"),
    ("ringbuf", {"size": 1000}, "size of ringbuf chardev must be power of two"),
    ("socket", {}, "Unable to parse FD number "),
    ("socket", {"fd": "x"}, "Unable to parse FD number x"),
    ("socket", {"path": "a", "host": "b"}, "None or one of 'path', 'fd' or 'host' option required."),
    ("socket", {"host": "localhost"}, "chardev: socket: no port given"),
    ("socket", {"path": "a", "wait": False}, "'wait' option is incompatible with socket in client connect mode"),
    ("socket", {"path": "a", "server": True, "reconnect": 1},
     "'reconnect' option is incompatible with socket in server listen mode"),
    ("socket", {"path": "a", "server": True, "telnet": True}, "chardev: 'telnet' is not supported by qsd"),
    ("socket", {"path": "nodir/a", "server": True, "wait": False},
     "Failed to bind socket to nodir/a: No such file or directory"),
    ("socket", {"path": "nosuch.sock"}, "Failed to connect to 'nosuch.sock': No such file or directory"),
    ("stdio", {}, "cannot use stdio with -daemonize"),
])
def test_errors(tmp_path: Path, backend: str, opts: dict[str, Any], message: str) -> None:
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(QMPError) as err:
            run(make(backend, opts, daemonize=True))
    finally:
        os.chdir(cwd)
    assert err.value.desc == message


def test_duplicate_and_second_stdio() -> None:
    async def main() -> None:
        first = await make("null", {})
        with pytest.raises(QMPError, match="attempt to add duplicate property 'c0' to object"):
            await make("null", {}, existing={"c0": first})
        stdio = await make("stdio", {}, chardev_id="s0")
        with pytest.raises(QMPError, match="cannot use stdio by multiple character devices"):
            await make("stdio", {}, chardev_id="s1", existing={"s0": stdio})
        await stdio.close()

    run(main())


def test_tables() -> None:
    assert set(BACKENDS) <= {"pty", "udp", "memory", "file", "socket", "stdio", "ringbuf", "null",
                             "parallel", "pipe", "mux", "serial"}
    assert {"path", "host", "port", "server", "wait", "fd", "size", "backend"} <= set(OPTION_TYPES)
