# SPDX-License-Identifier: GPL-2.0-or-later
"""Monitor and daemon control: versions, introspection, quit."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qsd import PACKAGE, QEMU_VERSION
from qsd.qmp.dispatch import command

if TYPE_CHECKING:
    from qsd.daemon import Daemon


@command("query-version")
async def query_version(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    return {"qemu": dict(QEMU_VERSION), "package": PACKAGE}


@command("query-commands")
async def query_commands(daemon: "Daemon", args: dict[str, Any]) -> list[dict[str, str]]:
    return [{"name": name} for name in daemon.schema.command_names()]


@command("query-qmp-schema")
async def query_qmp_schema(daemon: "Daemon", args: dict[str, Any]) -> list[dict[str, Any]]:
    return daemon.schema.introspect()


@command("quit")
async def quit_(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    await daemon.quit()
    daemon.request_shutdown()
    return {}
