# SPDX-License-Identifier: GPL-2.0-or-later
"""QMP monitors: the asyncio side of :mod:`qsd.qmp.protocol`.

A monitor serves one chardev, one client at a time (the chardev holds
later clients back until the current one leaves). Requests of one client
run strictly in order; events from anywhere in the daemon are written to
every negotiated client as they happen, so they can precede the reply of
the command that caused them, as in QSD.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from qsd import PACKAGE, QEMU_VERSION
from qsd.qmp.errors import QMPError
from qsd.qmp.protocol import Execute, QMPConnection

if TYPE_CHECKING:
    from qsd.chardev import Chardev
    from qsd.daemon import Daemon

log = logging.getLogger("qsd.qmp")

#: A client that lets this much output pile up unread is disconnected.
MAX_PENDING_OUTPUT = 64 << 20
READ_SIZE = 65536


class Monitor:
    def __init__(self, daemon: "Daemon", chardev: "Chardev", pretty: bool) -> None:
        self.daemon = daemon
        self.chardev = chardev
        self.pretty = pretty
        self._conn: QMPConnection | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.chardev.serve(self._serve))

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self.chardev.in_use = False

    def send_event(self, name: str, data: dict[str, Any], seconds: int, micro: int) -> None:
        if self._conn is None or self._writer is None:
            return
        line = self._conn.event(name, data, seconds, micro)
        if line is not None:
            self._write(line)

    def _write(self, data: bytes) -> None:
        writer = self._writer
        if writer is None or writer.is_closing():
            return
        writer.write(data)
        if writer.transport.get_write_buffer_size() > MAX_PENDING_OUTPUT:
            log.warning("QMP client does not read its replies; disconnecting it")
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = QMPConnection(QEMU_VERSION, PACKAGE, pretty=self.pretty,
                             command_exists=self.daemon.command_exists)
        self._conn, self._writer = conn, writer
        try:
            self._write(conn.greeting())
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                for item in conn.feed(data):
                    if isinstance(item, Execute):
                        self._write(await self._run(conn, item))
                    else:
                        self._write(item)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._conn = self._writer = None

    async def _run(self, conn: QMPConnection, ex: Execute) -> bytes:
        try:
            value = await self.daemon.execute(ex.name, ex.arguments)
        except QMPError as err:
            return conn.error(ex, err)
        except Exception as err:  # a bug must not take the monitor down
            log.exception("command %s failed", ex.name)
            return conn.error(ex, QMPError(str(err) or type(err).__name__))
        return conn.reply(ex, value)
