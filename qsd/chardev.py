# SPDX-License-Identifier: GPL-2.0-or-later
"""Character devices: the byte streams QMP monitors talk over.

A chardev hands connections to a frontend (the QMP monitor) through
``await chardev.serve(handler)``: ``handler(reader, writer)`` is awaited once
per connection, and never for two connections at once, because QSD serves
one client per chardev and leaves a second client (accepted by the kernel)
without even a greeting until the first one has gone.  ``serve`` returns when
the chardev is closed, or when a backend that only ever has one session
(stdio, file, null, ringbuf, a client socket) has finished it.

Chardevs made while the command line is applied are *held*: they do not
start serving until :meth:`Chardev.release`, so that, as in QSD, no client
sees a greeting before startup is complete (and none at all if it fails).

Backends: ``socket`` (unix or TCP; listening or connecting; an inherited
``fd``), ``stdio``, ``file`` (output only), ``null``, ``ringbuf``/``memory``.
Errors are :class:`~qsd.qmp.errors.QMPError` with QEMU 7.2's texts.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from qsd.qmp.errors import GenericError
from qsd.sockets import (inherited_socket, listen_fd, listen_tcp, listen_unix, resolve,
                         unix_address, unlink_if_same)

log = logging.getLogger("qsd.chardev")

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

#: Every option ``--chardev`` knows, with its QemuOpts type, as in QEMU 7.2
#: (options a backend does not use are accepted and ignored, as there).
OPTION_TYPES: dict[str, str] = {
    "abstract": "bool", "append": "bool", "backend": "str", "chardev": "str",
    "clipboard": "bool", "cols": "number", "debug": "number", "delay": "bool",
    "fd": "str", "height": "number", "host": "str", "ipv4": "bool", "ipv6": "bool",
    "localaddr": "str", "localport": "str", "logappend": "bool", "logfile": "str",
    "mouse": "bool", "mux": "bool", "name": "str", "nodelay": "bool", "path": "str",
    "port": "str", "reconnect": "number", "rows": "number", "server": "bool",
    "signal": "bool", "size": "size", "telnet": "bool", "tight": "bool",
    "tls-authz": "str", "tls-creds": "str", "tn3270": "bool", "to": "number",
    "wait": "bool", "websocket": "bool", "width": "number",
}

#: Backends qsd implements, in the order ``--chardev help`` lists them.
BACKENDS = ("memory", "file", "socket", "stdio", "ringbuf", "null")

#: Features QSD has and qsd does not; asking for them is an error, not a surprise.
_UNSUPPORTED = ("telnet", "tn3270", "websocket", "mux", "logfile")

_UNIX_PATH_MAX = 108
_RINGBUF_DEFAULT = 65536
_LISTEN_BACKLOG = 1      # as QSD: one client served, one more waiting in the kernel


# ---------------------------------------------------------------------------
# Transports for file descriptors the event loop cannot poll


class _SinkTransport(asyncio.WriteTransport):
    """A write transport that hands every write to a blocking sink at once.

    Used where epoll cannot help (regular files, /dev/null) or where the
    bytes stay in memory (null, ringbuf); such writes never block for long.
    """

    def __init__(self, sink: Callable[[bytes], None]) -> None:
        super().__init__()
        self._sink = sink
        self._protocol: asyncio.BaseProtocol | None = None
        self._closing = False

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closing and data:
            self._sink(bytes(data))

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            if self._protocol is not None:   # lets StreamWriter.wait_closed() return
                asyncio.get_running_loop().call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, 0)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """Nothing is ever buffered, so there is nothing to limit."""


def _writer_for(transport: asyncio.WriteTransport) -> asyncio.StreamWriter:
    """A StreamWriter over ``transport``; its protocol's reader is never read."""
    loop = asyncio.get_running_loop()
    protocol = asyncio.StreamReaderProtocol(asyncio.StreamReader())
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    return asyncio.StreamWriter(transport, protocol, None, loop)


def _strerror(err: OSError) -> str:
    return os.strerror(err.errno or 0)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            os.set_blocking(fd, True)


# ---------------------------------------------------------------------------
# Chardevs


class Chardev:
    """Base class: the gate, the in-use flag and the single-session backends."""

    def __init__(self, chardev_id: str, held: bool) -> None:
        self.id = chardev_id
        #: Set by the daemon while a monitor owns this chardev.
        self.in_use = False
        self.closed = False
        self._released = asyncio.Event()
        self._closed_event = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        if not held:
            self._released.set()

    def release(self) -> None:
        """Startup is complete: start serving connections."""
        self._released.set()

    async def _wait_released(self) -> bool:
        """Wait for :meth:`release`; False if the chardev was closed first."""
        if not self._released.is_set():
            waiter = asyncio.ensure_future(self._released.wait())
            closer = asyncio.ensure_future(self._closed_event.wait())
            try:
                await asyncio.wait((waiter, closer), return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                closer.cancel()
        return not self.closed

    async def serve(self, handler: Handler) -> None:
        """Run ``handler`` over this chardev's one session, then return."""
        if not await self._wait_released():
            return
        try:
            reader, writer = await self._open_session()
        except OSError as err:      # e.g. a stdio whose fds were closed by our parent
            log.warning("chardev %s: %s", self.id, err)
            return
        await self._run_session(handler, reader, writer)

    async def _open_session(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        raise NotImplementedError

    async def _run_session(self, handler: Handler, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        try:
            await handler(reader, writer)
        except (ConnectionError, OSError) as err:
            log.debug("chardev %s: connection ended: %s", self.id, err)
        except Exception:  # a frontend bug must not stop the chardev
            log.exception("chardev %s: frontend failed", self.id)
        finally:
            self._writer = None
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def close(self) -> None:
        """Stop serving and release what the backend holds; idempotent."""
        if self.closed:
            return
        self.closed = True
        self._closed_event.set()
        if self._writer is not None:
            self._writer.close()
        self._close_backend()

    def _close_backend(self) -> None:
        """Backend-specific cleanup (sockets, files, terminal flags)."""


class NullChardev(Chardev):
    """Discards output; never has input."""

    async def _open_session(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader = asyncio.StreamReader()
        return reader, _writer_for(_SinkTransport(lambda data: None))


class FileChardev(Chardev):
    """Appends or truncates ``path`` and writes the output there; no input."""

    def __init__(self, chardev_id: str, held: bool, path: str, append: bool) -> None:
        super().__init__(chardev_id, held)
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
        try:
            self._fd = os.open(path, flags, 0o666)
        except OSError as err:
            raise GenericError(f"Could not open '{path}': {_strerror(err)}") from None

    async def _open_session(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader = asyncio.StreamReader()
        return reader, _writer_for(_SinkTransport(lambda data: _write_all(self._fd, data)))

    def _close_backend(self) -> None:
        os.close(self._fd)


class RingbufChardev(Chardev):
    """Keeps the last ``size`` bytes of output; input comes from :meth:`ring_write`."""

    def __init__(self, chardev_id: str, held: bool, size: int) -> None:
        super().__init__(chardev_id, held)
        self.size = size
        self._ring = bytearray()
        self._input = asyncio.StreamReader()

    def _store(self, data: bytes) -> None:
        self._ring += data
        if len(self._ring) > self.size:
            del self._ring[:len(self._ring) - self.size]

    def ring_read(self, size: int) -> bytes:
        """Take up to ``size`` of the oldest output bytes (ringbuf-read)."""
        data = bytes(self._ring[:size])
        del self._ring[:size]
        return data

    def ring_write(self, data: bytes) -> None:
        """Give bytes to the frontend as input (ringbuf-write)."""
        self._input.feed_data(data)

    async def _open_session(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return self._input, _writer_for(_SinkTransport(self._store))


def _pollable(fd: int) -> bool:
    """Whether epoll can watch ``fd`` (pipes, sockets, terminals; not files or /dev/null)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or (stat.S_ISCHR(mode) and os.isatty(fd))


class StdioChardev(Chardev):
    """stdin as input, stdout as output; EOF on stdin ends only the session."""

    def __init__(self, chardev_id: str, held: bool) -> None:
        super().__init__(chardev_id, held)
        self._own_fds: list[int] = []
        self._blocking = {0: os.get_blocking(0), 1: os.get_blocking(1)}
        self._read_transport: asyncio.ReadTransport | None = None
        self._feeder: asyncio.Task[None] | None = None

    async def _open_session(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        # Transports get duplicates (uvloop closes what it is given); the
        # duplicates share O_NONBLOCK with 0 and 1, restored on close.
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        if _pollable(0):
            self._read_transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(os.dup(0), "rb", buffering=0))
        else:
            in_fd = os.dup(0)
            self._own_fds.append(in_fd)
            self._feeder = loop.create_task(self._feed_blocking(in_fd, reader))
        if _pollable(1):
            transport, protocol = await loop.connect_write_pipe(
                lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()),
                os.fdopen(os.dup(1), "wb", buffering=0))
            writer = asyncio.StreamWriter(transport, protocol, None, loop)
        else:
            out_fd = os.dup(1)
            self._own_fds.append(out_fd)
            writer = _writer_for(_SinkTransport(lambda data: _write_all(out_fd, data)))
        return reader, writer

    @staticmethod
    async def _feed_blocking(fd: int, reader: asyncio.StreamReader) -> None:
        """Read a stdin the loop cannot watch (a file), in a thread."""
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.run_in_executor(None, os.read, fd, 65536)
            if not data:
                reader.feed_eof()
                return
            reader.feed_data(data)

    def _close_backend(self) -> None:
        if self._read_transport is not None:
            self._read_transport.close()
        if self._feeder is not None:
            self._feeder.cancel()
        for fd in self._own_fds:
            os.close(fd)
        self._own_fds = []
        for fd, blocking in self._blocking.items():
            try:
                os.set_blocking(fd, blocking)
            except OSError:
                pass


class SocketClientChardev(Chardev):
    """A connection made at creation (``server=off``); one session."""

    def __init__(self, chardev_id: str, held: bool, sock: socket.socket) -> None:
        super().__init__(chardev_id, held)
        self._sock: socket.socket | None = sock

    async def _open_session(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock, self._sock = self._sock, None
        assert sock is not None
        return await asyncio.open_connection(sock=sock)

    def _close_backend(self) -> None:
        if self._sock is not None:
            self._sock.close()


class SocketServerChardev(Chardev):
    """Listening socket(s): clients are served one after the other."""

    def __init__(self, chardev_id: str, held: bool, listeners: list[socket.socket],
                 unix_path: str | None) -> None:
        super().__init__(chardev_id, held)
        self._listeners = listeners
        self._pending: socket.socket | None = None
        # The file to remove on close, and its identity (never remove a successor's).
        self._unix_file: tuple[str, int, int] | None = None
        if unix_path is not None:
            st = os.stat(unix_path)
            self._unix_file = (os.path.abspath(unix_path), st.st_dev, st.st_ino)

    async def wait_for_client(self) -> None:
        """``wait=on``: block until the first client connects (it is served first)."""
        self._pending = await self._accept()

    async def _accept(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        tasks = [asyncio.ensure_future(loop.sock_accept(sock)) for sock in self._listeners]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
        first = done.pop().result()[0]
        for task in done:                 # two clients in the same instant
            task.result()[0].close()
        return first

    async def serve(self, handler: Handler) -> None:
        if not await self._wait_released():
            return
        closed = asyncio.ensure_future(self._closed_event.wait())
        try:
            while not self.closed:
                conn, self._pending = self._pending, None
                if conn is None:
                    accept = asyncio.ensure_future(self._accept())
                    await asyncio.wait((accept, closed), return_when=asyncio.FIRST_COMPLETED)
                    if not accept.done():
                        accept.cancel()
                        return
                    conn = accept.result()
                reader, writer = await asyncio.open_connection(sock=conn)
                await self._run_session(handler, reader, writer)
        finally:
            closed.cancel()

    def _close_backend(self) -> None:
        for sock in self._listeners:
            sock.close()
        if self._pending is not None:
            self._pending.close()
        if self._unix_file is not None:
            unlink_if_same(*self._unix_file)


# ---------------------------------------------------------------------------
# Creation from --chardev options


def _connect(opts: Mapping[str, Any]) -> socket.socket:
    if "path" in opts:
        path = opts["path"]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(unix_address(path, bool(opts.get("abstract")), opts.get("tight", True)))
        except OSError as err:
            sock.close()
            raise GenericError(f"Failed to connect to '{path}': {_strerror(err)}") from None
        return sock
    if "host" in opts:
        host, port = opts["host"], opts.get("port", "")
        error = errno.ECONNREFUSED
        for af, kind, proto, _, addr in resolve(host, port, opts, passive=False):
            sock = socket.socket(af, kind, proto)
            try:
                sock.connect(addr)
                return sock
            except OSError as err:
                error = err.errno or error
                sock.close()
        raise GenericError(f"Failed to connect to '{host}:{port}': {os.strerror(error)}")
    return inherited_socket(opts.get("fd", ""))


def _describe(opts: Mapping[str, Any]) -> str:
    """QSD's label of a listening socket, shown while it waits for a client."""
    if "path" in opts:
        where = f"unix:{opts['path']}"
    elif "host" in opts:
        where = f"tcp:{opts['host']}:{opts.get('port', '')}"
    else:
        where = f"fd:{opts.get('fd', '')}"
    return f"disconnected:{where},server=on"


def _check_socket_options(opts: Mapping[str, Any]) -> None:
    where = sum(key in opts for key in ("path", "fd", "host"))
    if where > 1:
        raise GenericError("None or one of 'path', 'fd' or 'host' option required.")
    if "host" in opts and "port" not in opts:
        raise GenericError("chardev: socket: no port given")
    server = opts.get("server", False)
    if server and opts.get("reconnect"):
        raise GenericError("'reconnect' option is incompatible with socket in server listen mode")
    if not server and "wait" in opts:
        raise GenericError("'wait' option is incompatible with socket in client connect mode")
    if not server and opts.get("reconnect"):
        raise GenericError("chardev: socket: 'reconnect' is not supported by qsd")
    if "tls-creds" in opts:
        # qsd has no TLS credential objects, so no id can name one.
        raise GenericError(f"No TLS credentials with id '{opts['tls-creds']}'")


async def _open_socket(chardev_id: str, opts: Mapping[str, Any], held: bool,
                       info: Callable[[str], None]) -> Chardev:
    _check_socket_options(opts)
    if not opts.get("server", False):
        return SocketClientChardev(chardev_id, held, _connect(opts))
    unix_path = None
    if "path" in opts:
        abstract = bool(opts.get("abstract"))
        listeners = [listen_unix(opts["path"], abstract, opts.get("tight", True),
                                 _LISTEN_BACKLOG)]
        unix_path = None if abstract else opts["path"]
    elif "host" in opts:
        listeners = listen_tcp(opts["host"], opts["port"], opts, _LISTEN_BACKLOG)
    else:
        listeners = [listen_fd(opts.get("fd", ""), _LISTEN_BACKLOG)]
    chardev = SocketServerChardev(chardev_id, held, listeners, unix_path)
    if opts.get("wait", True):
        info(f"info: QEMU waiting for connection on: {_describe(opts)}")
        try:
            await chardev.wait_for_client()
        except BaseException:
            await chardev.close()
            raise
    return chardev


def _ringbuf_size(opts: Mapping[str, Any]) -> int:
    size = opts.get("size", _RINGBUF_DEFAULT)
    if size & (size - 1):
        raise GenericError("size of ringbuf chardev must be power of two")
    return size


async def open_chardev(chardev_id: str, backend: str, opts: Mapping[str, Any], *,
                       existing: Mapping[str, Chardev], daemonize: bool = False,
                       held: bool = False, info: Callable[[str], None] = log.info) -> Chardev:
    """Create a chardev from typed ``--chardev`` options (QSD's checks, in QSD's order).

    ``info`` receives the note printed while ``wait=on`` waits for a client.
    """
    if backend not in BACKENDS:
        raise GenericError(f"'{backend}' is not a valid char driver name")
    for key in _UNSUPPORTED:
        if opts.get(key):
            raise GenericError(f"chardev: '{key}' is not supported by qsd")
    if backend == "file" and "path" not in opts:
        raise GenericError("chardev: file: no filename given")
    size = _ringbuf_size(opts) if backend in ("ringbuf", "memory") else 0
    if chardev_id in existing:
        raise GenericError(
            f"attempt to add duplicate property '{chardev_id}' to object (type 'container')")
    if backend == "socket":
        return await _open_socket(chardev_id, opts, held, info)
    if backend == "stdio":
        if daemonize:
            raise GenericError("cannot use stdio with -daemonize")
        if any(isinstance(c, StdioChardev) for c in existing.values()):
            raise GenericError("cannot use stdio by multiple character devices")
        return StdioChardev(chardev_id, held)
    if backend == "file":
        return FileChardev(chardev_id, held, opts["path"], bool(opts.get("append")))
    if backend == "null":
        return NullChardev(chardev_id, held)
    return RingbufChardev(chardev_id, held, size)

