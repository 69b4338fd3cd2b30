# SPDX-License-Identifier: GPL-2.0-or-later
"""The command registry: QMP command names to async handlers.

Handlers are ``async def handler(daemon, args) -> value`` registered with
:func:`command`. Arguments reach them already validated by the schema, so a
handler only does what the schema cannot say (lookups, state checks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable

if TYPE_CHECKING:
    from qsd.daemon import Daemon

Handler = Callable[["Daemon", dict[str, Any]], Awaitable[Any]]

COMMANDS: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        COMMANDS[name] = fn
        return fn
    return register


def load_commands() -> None:
    """Import every command module so that its handlers register."""
    from qsd.qmp.commands import block, blockjobs, control, exports, jobs, objects, snapshots  # noqa: F401
    from qsd.qmp.commands import backup, bitmaps, transaction  # noqa: F401
    from qsd.qmp.commands import amend  # noqa: F401
