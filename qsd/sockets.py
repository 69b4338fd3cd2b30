# SPDX-License-Identifier: GPL-2.0-or-later
"""Listening sockets for SocketAddress-style options, with QEMU's error texts.

Shared by the chardevs (QMP monitors) and the NBD server: unix paths (a stale
socket file from a crashed daemon is replaced), abstract names, TCP on every
resolved address (with the ``to`` port range), and inherited descriptors.
Sockets come back bound, listening and non-blocking.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Mapping
from typing import Any

from qsd.qmp.errors import GenericError

UNIX_PATH_MAX = 108


def strerror(err: OSError) -> str:
    return os.strerror(err.errno or 0)


def unix_address(path: str, abstract: bool, tight: bool) -> str | bytes:
    if len(path.encode()) >= UNIX_PATH_MAX:
        raise GenericError(f"UNIX socket path '{path}' is too long\n"
                           f"Path must be less than {UNIX_PATH_MAX} bytes")
    if not abstract:
        return path
    name = b"\0" + path.encode()
    return name if tight else name.ljust(UNIX_PATH_MAX, b"\0")


def listen_unix(path: str, abstract: bool, tight: bool, backlog: int) -> socket.socket:
    address = unix_address(path, abstract, tight)
    if not abstract:
        try:
            os.unlink(path)             # a stale socket from a crashed daemon
        except FileNotFoundError:
            pass
        except OSError as err:
            raise GenericError(f"Failed to unlink socket {path}: {strerror(err)}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(address)
        sock.listen(backlog)
    except OSError as err:
        sock.close()
        raise GenericError(f"Failed to bind socket to {path}: {strerror(err)}") from None
    sock.setblocking(False)
    return sock


def resolve(host: str, port: str, opts: Mapping[str, Any], passive: bool) -> list[tuple[Any, ...]]:
    family = socket.AF_UNSPEC
    if opts.get("ipv4") and not opts.get("ipv6"):
        family = socket.AF_INET
    elif opts.get("ipv6") and not opts.get("ipv4"):
        family = socket.AF_INET6
    try:
        return socket.getaddrinfo(host or None, port, family, socket.SOCK_STREAM, 0,
                                  socket.AI_PASSIVE if passive else 0)
    except socket.gaierror as err:
        raise GenericError(f"address resolution failed for {host}:{port}: {err.strerror}") from None


def listen_tcp(host: str, port: str, opts: Mapping[str, Any], backlog: int) -> list[socket.socket]:
    infos = resolve(host, port, opts, passive=True)
    families = {info[0] for info in infos}
    last = opts.get("to")
    listeners: list[socket.socket] = []
    try:
        for af, kind, proto, _, addr in infos:
            sock = socket.socket(af, kind, proto)
            listeners.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if af == socket.AF_INET6 and socket.AF_INET in families:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            first = addr[1]
            error = 0
            for candidate in range(first, max(first, last or first) + 1):
                try:
                    sock.bind((addr[0], candidate, *addr[2:]))
                    sock.listen(backlog)
                    break
                except OSError as err:
                    error = err.errno or errno.EADDRINUSE
            else:
                raise GenericError(f"Failed to find an available port: {os.strerror(error)}")
            sock.setblocking(False)
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


def inherited_socket(text: str) -> socket.socket:
    """The socket behind descriptor number ``text`` (not yet listening)."""
    try:
        fd = int(text, 10)
        if fd < 0:
            raise ValueError(text)
    except ValueError:
        raise GenericError(f"Unable to parse FD number {text}") from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as err:
        raise GenericError(f"File descriptor '{text}' is not a socket"
                           if err.errno == errno.EBADF else strerror(err)) from None
    if not stat.S_ISSOCK(mode):
        raise GenericError(f"File descriptor '{text}' is not a socket")
    return socket.socket(fileno=fd)


def listen_fd(text: str, backlog: int) -> socket.socket:
    sock = inherited_socket(text)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def listen(addr: Mapping[str, Any], backlog: int) -> list[socket.socket]:
    """Listen on a flat SocketAddress (``type`` unix, inet or fd)."""
    kind = addr.get("type")
    if kind == "unix":
        return [listen_unix(addr["path"], bool(addr.get("abstract")), addr.get("tight", True),
                            backlog)]
    if kind == "inet":
        return listen_tcp(addr.get("host", ""), str(addr.get("port", "")), addr, backlog)
    if kind == "fd":
        return [listen_fd(str(addr["str"]), backlog)]
    raise GenericError(f"Parameter 'type' does not accept value '{kind}'")


def unlink_if_same(path: str, dev: int, ino: int) -> None:
    """Remove ``path`` only if it is still the file we created (another
    process may have replaced it since)."""
    try:
        st = os.stat(path)
        if (st.st_dev, st.st_ino) == (dev, ino):
            os.unlink(path)
    except OSError:
        pass
