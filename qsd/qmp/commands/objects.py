# SPDX-License-Identifier: GPL-2.0-or-later
"""object-add / object-del."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qsd.qmp.dispatch import command

if TYPE_CHECKING:
    from qsd.daemon import Daemon


@command("object-add")
async def object_add(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    daemon.objects.add(args)
    return {}


@command("object-del")
async def object_del(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    daemon.objects.delete(args["id"])
    return {}


@command("qom-get")
async def qom_get(daemon: "Daemon", args: dict[str, Any]) -> Any:
    return daemon.objects.qom_get(args["path"], args["property"])
