# SPDX-License-Identifier: GPL-2.0-or-later
"""Transaction actions: commands that can also run inside ``transaction``.

An action does its work in :meth:`Action.prepare`, which may fail; the
transaction then calls :meth:`Action.abort` on every action already prepared
(newest first) to undo it, or :meth:`Action.commit` on all of them when
every prepare succeeded; :meth:`Action.clean` runs last either way. The same
class serves the stand-alone command of the same name, so the command and
the transaction action cannot drift apart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from qsd.qmp.dispatch import command

if TYPE_CHECKING:
    from qsd.daemon import Daemon


class Action:
    """One action with its validated arguments (the command's arguments)."""

    def __init__(self, daemon: "Daemon", args: dict[str, Any],
                 properties: dict[str, Any] | None = None) -> None:
        self.daemon = daemon
        self.args = args
        #: The transaction's ``properties`` (``completion-mode``), {} alone.
        self.properties = properties or {}

    async def prepare(self) -> None:
        raise NotImplementedError

    async def commit(self) -> None:
        """Make the prepared change final (cannot fail)."""

    async def abort(self) -> None:
        """Undo what prepare did."""

    async def clean(self) -> None:
        """Release what prepare took, after commit or abort."""

    def result(self) -> Any:
        """The stand-alone command's return value."""
        return {}


#: Transaction action type names (TransactionAction's ``type``) to classes.
ACTIONS: dict[str, type[Action]] = {}


def action(name: str, *, standalone: bool = True) -> Callable[[type[Action]], type[Action]]:
    """Register ``cls`` as transaction action ``name`` and, unless
    ``standalone`` is False, as the QMP command of that name."""
    def register(cls: type[Action]) -> type[Action]:
        ACTIONS[name] = cls
        if standalone:
            async def run(daemon: "Daemon", args: dict[str, Any]) -> Any:
                act = cls(daemon, args)
                try:
                    await act.prepare()
                except BaseException:
                    await act.abort()
                    await act.clean()
                    raise
                await act.commit()
                await act.clean()
                return act.result()
            command(name)(run)
        return cls
    return register
