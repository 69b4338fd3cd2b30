# SPDX-License-Identifier: GPL-2.0-or-later
"""The daemon core: the state every monitor and CLI option acts on.

One :class:`Daemon` holds the node graph, user-creatable objects, exports
and monitors, runs commands (from QMP or the command line) through the
schema and the command registry, and broadcasts events to every negotiated
monitor.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from qsd.block.drivers import load_drivers
from qsd.block.graph import Graph
from qsd.export.manager import ExportManager
from qsd.jobs.job import JobRegistry
from qsd.objects import ObjectRegistry
from qsd.qmp.dispatch import COMMANDS, load_commands
from qsd.qmp.errors import CommandNotFound, GenericError
from qsd.schema import get_schema

if TYPE_CHECKING:
    from qsd.chardev import Chardev
    from qsd.qmp.server import Monitor

log = logging.getLogger("qsd")


class Daemon:
    def __init__(self) -> None:
        load_commands()
        load_drivers()
        self.schema = get_schema()
        self.objects = ObjectRegistry()
        self.graph = Graph(self.objects)
        self.graph.emit_event = self.emit_event
        self.exports = ExportManager(self)
        self.jobs = JobRegistry()
        self.chardevs: dict[str, "Chardev"] = {}
        self.monitors: list["Monitor"] = []
        self._shutdown = asyncio.Event()
        self._quit_done = False

    # ----- commands ---------------------------------------------------
    def command_exists(self, name: str) -> bool:
        return name in COMMANDS and self.schema.has_command(name)

    async def execute(self, name: str, args: dict[str, Any] | None) -> Any:
        """Validate and run one command; raises QMPError."""
        handler = COMMANDS.get(name)
        if handler is None or not self.schema.has_command(name):
            raise CommandNotFound(f"The command {name} has not been found")
        args = self.schema.validate_command(name, args)
        return await handler(self, args)

    # ----- events -------------------------------------------------------
    def emit_event(self, name: str, data: dict[str, Any]) -> None:
        now = time.time()
        seconds = int(now)
        micro = int((now - seconds) * 1_000_000)
        for monitor in self.monitors:
            monitor.send_event(name, data, seconds, micro)

    # ----- monitors ---------------------------------------------------
    async def add_monitor(self, chardev: "Chardev", pretty: bool = False) -> "Monitor":
        from qsd.qmp.server import Monitor

        if chardev.in_use:
            raise GenericError(f"Device '{chardev.id}' is in use")
        monitor = Monitor(self, chardev, pretty)
        chardev.in_use = True
        self.monitors.append(monitor)
        monitor.start()
        return monitor

    # ----- shutdown -------------------------------------------------------
    def request_shutdown(self) -> None:
        self._shutdown.set()

    async def run_until_shutdown(self) -> None:
        await self._shutdown.wait()

    async def quit(self) -> None:
        """What ``quit`` does before its reply: exports and jobs go first."""
        if self._quit_done:
            return
        self._quit_done = True
        await self.exports.remove_all()
        await self.jobs.cancel_all()

    async def shutdown(self) -> None:
        """Tear everything down after the shutdown request."""
        await self.quit()
        for monitor in list(self.monitors):
            await monitor.close()
        await self.exports.stop_servers()
        for chardev in list(self.chardevs.values()):
            await chardev.close()
        await self.graph.close_all()
