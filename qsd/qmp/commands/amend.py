# SPDX-License-Identifier: GPL-2.0-or-later
"""x-blockdev-amend (see :mod:`qsd.jobs.amend`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qsd.jobs.amend import blockdev_amend
from qsd.qmp.dispatch import command

if TYPE_CHECKING:
    from qsd.daemon import Daemon


@command("x-blockdev-amend")
async def x_blockdev_amend(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    await blockdev_amend(daemon, args["job-id"], args["node-name"], args["options"],
                         args.get("force", False))
    return {}
