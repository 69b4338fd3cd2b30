# SPDX-License-Identifier: GPL-2.0-or-later
"""Shared helpers for the NBD server tests.

``FileNode`` is a tiny file-backed node (host mapping, SEEK_DATA block
status, hole punching) so that the server can be tested before, and apart
from, the real ``file`` driver. ``ServerThread`` runs an NBDServer on its own
event loop in a background thread, so tests can point real clients (qemu-img,
qemu-io, nbdinfo, nbdcopy, libnbd) at it.
"""

from __future__ import annotations

import asyncio
import ctypes
import datetime
import errno
import os
import socket
import ssl
import struct
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from qsd.block.graph import Edge
from qsd.block.node import Extent, Node, Perm, Role
from qsd.export.nbd.server import NBDExportConfig, NBDServer

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class FileNode(Node):
    """A raw file: inline preadv/pwrite, hole-aware block status."""

    driver = "test-file"

    def __init__(self, path: str, read_only: bool = False) -> None:
        super().__init__(None, "test", {"read-only": read_only})  # type: ignore[arg-type]
        self.path = path
        self.fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.writes = 0
        self.flushes = 0

    async def open(self, options: dict[str, Any]) -> None:
        pass

    async def close(self) -> None:
        os.close(self.fd)

    def host_extent(self, offset: int, length: int) -> tuple[int, int] | None:
        return self.fd, offset

    async def read_into(self, offset: int, buf: memoryview) -> None:
        n = os.preadv(self.fd, [buf], offset)
        if n < len(buf):
            buf[n:] = bytes(len(buf) - n)

    async def drv_write(self, offset: int, data: bytes | bytearray | memoryview,
                    fua: bool = False) -> None:
        self.writes += 1
        os.pwrite(self.fd, data, offset)
        if fua:
            os.fdatasync(self.fd)

    async def drv_write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                           fua: bool = False, no_fallback: bool = False) -> None:
        mode = (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) if may_unmap else FALLOC_FL_ZERO_RANGE
        fallocate(self.fd, mode, offset, length)

    async def drv_discard(self, offset: int, length: int) -> None:
        fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    async def flush(self) -> None:
        self.flushes += 1
        os.fdatasync(self.fd)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        end = min(offset + length, self.size)
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            data = self.size
        if data > offset:
            return [Extent(offset, min(data, end) - offset, data=False, zero=True, depth=0)]
        hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        return [Extent(offset, min(hole, end) - offset, data=True, zero=False,
                       host_fd=self.fd, host_offset=offset)]


class FailingNode(FileNode):
    """Fails reads and writes at or past ``fail_from`` with EIO."""

    def __init__(self, path: str, fail_from: int) -> None:
        super().__init__(path)
        self.fail_from = fail_from

    def host_extent(self, offset: int, length: int) -> tuple[int, int] | None:
        return None

    async def read_into(self, offset: int, buf: memoryview) -> None:
        if offset + len(buf) > self.fail_from:
            raise OSError(errno.EIO, "Input/output error")
        await super().read_into(offset, buf)

    async def drv_write(self, offset: int, data: bytes | bytearray | memoryview,
                        fua: bool = False) -> None:
        if offset + len(data) > self.fail_from:
            raise OSError(errno.ENOSPC, "No space left on device")
        await super().drv_write(offset, data, fua)


def edge(node: Node) -> Edge:
    """A root user's edge outside any graph, as the export needs one."""
    return Edge(child=node, name="root", role=Role.DATA, perm=Perm.all(), shared=Perm.all())


class ServerThread:
    """An NBDServer on a private event loop in a daemon thread."""

    def __init__(self, max_connections: int = 0, use_uvloop: bool = False,
                 tls_creds: ssl.SSLContext | None = None) -> None:
        if use_uvloop:
            import uvloop
            self.loop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: NBDServer = self.call(self._make, max_connections, tls_creds)

    @staticmethod
    async def _make(max_connections: int, tls_creds: ssl.SSLContext | None) -> NBDServer:
        return NBDServer(max_connections=max_connections, tls_creds=tls_creds)

    def call(self, fn: Callable[..., Awaitable[Any]], *args: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(fn(*args), self.loop).result(timeout)

    def sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        async def run() -> Any:
            return fn(*args)
        return self.call(run)

    def start(self, addr: dict[str, Any]) -> None:
        self.call(self.server.start, addr)

    def add(self, name: str, node: Node, writable: bool = False, description: str = "",
            **kw: Any) -> NBDExportConfig:
        cfg = NBDExportConfig(name=name, edge=edge(node), description=description,
                              writable=writable, **kw)
        self.sync(self.server.add_export, cfg)
        return cfg

    def close(self) -> None:
        self.call(self.server.stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextmanager
def serve(tmp_path: Any, **kw: Any) -> Iterator[tuple[ServerThread, str]]:
    """A started ServerThread on a unix socket in ``tmp_path``."""
    srv = ServerThread(**kw)
    sock = str(tmp_path / "nbd.sock")
    try:
        srv.start({"type": "unix", "path": sock})
        yield srv, sock
    finally:
        srv.close()


def make_x509(directory: Any) -> ssl.SSLContext:
    """A CA and a server certificate for "localhost" in ``directory`` (as
    libnbd's tls-certificates and QEMU's tls-creds-x509 dir=... expect:
    ca-cert.pem, server-cert.pem, server-key.pem) and a server context."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(name: str, ca: bool, issuer: Any = None, issuer_key: Any = None) -> Any:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (x509.CertificateBuilder().subject_name(subject)
                   .issuer_name(issuer or subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        return key, builder.sign(issuer_key or key, hashes.SHA256())

    ca_key, ca_cert = cert("qsd test CA", True)
    key, crt = cert("localhost", False, ca_cert.subject, ca_key)
    pem = serialization.Encoding.PEM
    (directory / "ca-cert.pem").write_bytes(ca_cert.public_bytes(pem))
    (directory / "server-cert.pem").write_bytes(crt.public_bytes(pem))
    (directory / "server-key.pem").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(directory / "server-cert.pem", directory / "server-key.pem")
    return ctx


def uri(sock: str, name: str) -> str:
    return f"nbd+unix:///{name}?socket={sock}"


def import_libnbd() -> Any:
    """libnbd's Python binding lives in Debian's dist-packages."""
    if "/usr/lib/python3/dist-packages" not in sys.path:
        sys.path.append("/usr/lib/python3/dist-packages")
    import nbd  # type: ignore[import-not-found]
    return nbd


# ----- a raw protocol client, for what real clients never send -----------

REQUEST_MAGIC = 0x25609513


class RawClient:
    """Speaks the handshake and requests byte by byte over a unix socket."""

    def __init__(self, path: str, client_flags: int = 3, timeout: float = 10) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.greeting = self.recv(18)
        if client_flags is not None:
            self.sock.sendall(struct.pack(">I", client_flags))

    def recv(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError(bytes(out))
            out += chunk
        return bytes(out)

    def option(self, opt: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", 0x49484156454F5054, opt, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv(20))
        assert magic == 0x3E889045565A9
        return opt, rtype, self.recv(length)

    def option_replies(self) -> list[tuple[int, int, bytes]]:
        """Replies up to the final ACK or error."""
        out = []
        while True:
            reply = self.option_reply()
            out.append(reply)
            if reply[1] == 1 or reply[1] & 0x80000000:
                return out

    def go(self, name: bytes, structured: bool = True,
           meta: tuple[bytes, ...] = ()) -> list[tuple[int, int, bytes]]:
        if structured:
            self.option(8)
            assert self.option_replies()[-1][1] == 1
        if meta:
            queries = b"".join(struct.pack(">I", len(m)) + m for m in meta)
            self.option(10, struct.pack(">I", len(name)) + name + struct.pack(">I", len(meta))
                        + queries)
            self.option_replies()
        self.option(7, struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, 3))
        return self.option_replies()

    def request(self, rtype: int, offset: int = 0, length: int = 0, flags: int = 0,
                handle: int = 1, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, rtype, handle, offset,
                                      length) + data)

    def reply(self, read_length: int = 0) -> list[tuple[Any, ...]]:
        """One whole reply: [("simple", error, handle, data)] or the list of
        structured chunks (flags, type, handle, payload)."""
        (magic,) = struct.unpack(">I", self.recv(4))
        if magic == 0x67446698:
            error, handle = struct.unpack(">IQ", self.recv(12))
            data = self.recv(read_length) if read_length and not error else b""
            return [("simple", error, handle, data)]
        chunks = []
        while True:
            assert magic == 0x668E33EF, hex(magic)
            flags, ctype, handle, length = struct.unpack(">HHQI", self.recv(16))
            chunks.append((flags, ctype, handle, self.recv(length)))
            if flags & 1:
                return chunks
            (magic,) = struct.unpack(">I", self.recv(4))

    def close(self) -> None:
        self.sock.close()
