# SPDX-License-Identifier: GPL-2.0-or-later
"""NBD server and block export commands."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qsd.qmp.dispatch import command
from qsd.qmp.errors import GenericError

if TYPE_CHECKING:
    from qsd.daemon import Daemon


def flat_address(legacy: dict[str, Any]) -> dict[str, Any]:
    """SocketAddressLegacy ({"type", "data": {...}}) to the flat SocketAddress."""
    return {"type": legacy["type"], **legacy["data"]}


@command("nbd-server-start")
async def nbd_server_start(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    await daemon.exports.nbd_server_start(
        flat_address(args["addr"]), args.get("tls-creds"), args.get("tls-authz"),
        args.get("max-connections", 0))
    return {}


@command("nbd-server-stop")
async def nbd_server_stop(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    await daemon.exports.nbd_server_stop()
    return {}


@command("block-export-add")
async def block_export_add(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    await daemon.exports.add(args)
    return {}


@command("block-export-del")
async def block_export_del(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    await daemon.exports.delete(args["id"], args.get("mode", "safe"))
    return {}


@command("query-block-exports")
async def query_block_exports(daemon: "Daemon", args: dict[str, Any]) -> list[dict[str, Any]]:
    return daemon.exports.query()


@command("nbd-server-add")
async def nbd_server_add(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    """The pre-5.2 form: the export id is the export name."""
    if daemon.exports.nbd is None:
        raise GenericError("NBD server not running")
    name = args.get("name", args["device"])
    export: dict[str, Any] = {"type": "nbd", "id": name, "node-name": args["device"],
                              "name": name, "writable": args.get("writable", False)}
    if "description" in args:
        export["description"] = args["description"]
    if "bitmap" in args:
        export["bitmaps"] = [args["bitmap"]]
    await daemon.exports.add(export)
    return {}


@command("nbd-server-remove")
async def nbd_server_remove(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    await daemon.exports.delete(args["name"], args.get("mode", "safe"))
    return {}
