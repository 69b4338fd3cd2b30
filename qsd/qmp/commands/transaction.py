# SPDX-License-Identifier: GPL-2.0-or-later
"""transaction: run several actions all or nothing, as QSD does.

Every action is prepared in order; when one fails, every action prepared so
far (the failing one included, which undoes whatever it did halfway) is
aborted, newest first, and the command fails with that action's error.
Otherwise all are committed in order. Clean-up runs for all at the end
either way. With ``completion-mode: grouped`` the jobs the actions start
form one :class:`~qsd.jobs.txn.JobTxn`; actions that start no job refuse
that mode, with QSD's text.

The ``abort`` action and the transaction form of the internal snapshot
(whose command lives in :mod:`qsd.qmp.commands.snapshots`) are defined here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qsd.jobs.backup import drain_all
from qsd.jobs.txn import JobTxn
from qsd.qmp.actions import ACTIONS, Action, action
from qsd.qmp.dispatch import command
from qsd.qmp.errors import GenericError

if TYPE_CHECKING:
    from qsd.daemon import Daemon

#: Actions that accept completion-mode=grouped (they start jobs, or fail anyway).
GROUPED_OK = frozenset({"abort", "blockdev-backup", "drive-backup"})


@action("abort", standalone=False)
class AbortAction(Action):
    """Always fails: a test of the rollback."""

    async def prepare(self) -> None:
        raise GenericError("Transaction aborted using Abort action")


@action("blockdev-snapshot-internal-sync", standalone=False)
class InternalSnapshotAction(Action):
    """The internal snapshot inside a transaction: the stand-alone command
    (qsd.qmp.commands.snapshots) takes it; an abort deletes it again."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._taken: tuple[Any, str] | None = None

    async def prepare(self) -> None:
        from qsd.qmp.commands import snapshots

        await snapshots.snapshot_internal(self.daemon, self.args)
        target = snapshots._target(self.daemon.graph.find(self.args["device"], None), True)
        self._taken = (target, self.args["name"])

    async def abort(self) -> None:
        taken, self._taken = self._taken, None
        if taken is not None:
            target, name = taken
            snap = next((sn for sn in target.snapshot_list if sn.name == name), None)
            if snap is not None:
                await target.snapshot_delete(snap.id, name)


@command("transaction")
async def transaction(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    properties = {"completion-mode": "individual", **args.get("properties", {})}
    grouped = properties["completion-mode"] == "grouped"
    txn = JobTxn() if grouped else None
    prepared: list[Action] = []
    await drain_all(daemon)
    try:
        for item in args["actions"]:
            kind = item["type"]
            cls = ACTIONS.get(kind)
            if cls is None:
                raise GenericError(f"Action '{kind}' is not supported")
            if grouped and kind not in GROUPED_OK:
                raise GenericError(f"Action '{kind}' does not support Transaction property "
                                   f"completion-mode = grouped")
            act = cls(daemon, item.get("data", {}), properties)
            if hasattr(act, "job_txn"):
                act.job_txn = txn
            prepared.append(act)
            await act.prepare()
    except BaseException:
        for act in reversed(prepared):
            await act.abort()
        for act in prepared:
            await act.clean()
        raise
    for act in prepared:
        await act.commit()
    for act in prepared:
        await act.clean()
    return {}
