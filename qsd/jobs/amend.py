# SPDX-License-Identifier: GPL-2.0-or-later
"""x-blockdev-amend: change options of an open image inside an "amend" job.

The node's driver does the work in ``async amend(options, force)`` (qcow2
and luks: LUKS key slots, :func:`amend_luks`); this module checks the
request and wraps the call in a plain job that waits in ``concluded`` for
job-dismiss, as QSD's amend jobs do (the same event sequence as create).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from qsd.block.formats.luks import secret_password
from qsd.block.node import Node
from qsd.crypto.luks import LuksVolume, unlock
from qsd.jobs.job import Job
from qsd.qmp.errors import GenericError

if TYPE_CHECKING:
    from qsd.daemon import Daemon

#: QEMU's QCRYPTO_BLOCK_LUKS_DEFAULT_ITER_TIME_MS.
DEFAULT_ITER_TIME = 2000
NUM_SLOTS = 8

ReadFn = Callable[[int, int], Awaitable[bytearray]]
WriteFn = Callable[[int, bytes], Awaitable[None]]


class AmendJob(Job):
    """Runs one node's ``amend``; progress is 0/1 until it returns, 1/1 after."""

    job_type = "amend"

    def __init__(self, daemon: "Daemon", job_id: str, node: Node, options: dict[str, Any],
                 force: bool) -> None:
        super().__init__(daemon, job_id, auto_dismiss=False)
        self._node = node
        self._options = options
        self._force = force

    async def run(self) -> None:
        self.progress_set_remaining(1)
        try:
            await self._node.amend(self._options, self._force)  # type: ignore[attr-defined]
        finally:
            self.progress_update(1)


async def blockdev_amend(daemon: "Daemon", job_id: str, node_name: str,
                         options: dict[str, Any], force: bool) -> None:
    """QEMU's checks, in its order, then the job."""
    node = daemon.graph.lookup(node_name)
    if node is None:
        raise GenericError(f"Cannot find device='' nor node-name='{node_name}'")
    fmt = options["driver"]
    if node.driver != fmt:  # every driver of the schema exists in QSD
        raise GenericError("x-blockdev-amend doesn't support changing the block driver")
    if not callable(getattr(node, "amend", None)):
        raise GenericError("Driver does not support x-blockdev-amend")
    await AmendJob(daemon, job_id, node, options, force).start()


def _slot_index_text(k: int) -> int:
    """QEMU prints the keyslot of an activation with %u."""
    return k & 0xFFFFFFFF


async def amend_luks(volume: LuksVolume, read: ReadFn, write: WriteFn, opts: dict[str, Any],
                     force: bool, objects: Any, node_secret: str | None) -> None:
    """Add (state=active) or erase (inactive) key slots of a LUKS header
    read with ``read`` and written with ``write`` (offsets within the
    header), with QEMU's rules and texts."""
    if opts["state"] == "active":
        await _add_keyslot(volume, read, write, opts, force, objects, node_secret)
    else:
        await _erase_keyslots(volume, read, write, opts, force, objects)


async def _add_keyslot(volume: LuksVolume, read: ReadFn, write: WriteFn, opts: dict[str, Any],
                       force: bool, objects: Any, node_secret: str | None) -> None:
    header = volume.header
    if "new-secret" not in opts:
        raise GenericError("'new-secret' is required to activate a keyslot")
    if "old-secret" in opts:
        raise GenericError("'old-secret' must not be given when activating keyslots")
    if "keyslot" in opts:
        k = opts["keyslot"]
        if not 0 <= k < NUM_SLOTS:
            raise GenericError(f"Invalid keyslot {_slot_index_text(k)} specified, must be "
                               f"between 0 and {NUM_SLOTS - 1}")
    else:
        k = next((i for i, s in enumerate(header.slots) if not s.active), -1)
        if k < 0:
            raise GenericError("Can't add a keyslot - all keyslots are in use")
    if not force and header.slots[k].active:
        raise GenericError(f"Refusing to overwrite active keyslot {k} - please erase it first")
    password = secret_password(objects, opts.get("secret", node_secret))
    await unlock(header, password, read)  # the master key must be reachable
    new_password = secret_password(objects, opts["new-secret"])
    _, writes = await volume.add_keyslot(new_password, opts.get("iter-time", DEFAULT_ITER_TIME),
                                         index=k)
    for offset, data in writes:
        await write(offset, data)


async def _slot_matches(volume: LuksVolume, read: ReadFn, index: int, password: bytes) -> bool:
    if not volume.header.slots[index].active:
        return False
    offset, length = volume.header.key_material_range(index)
    material = await read(offset, length)
    return await asyncio.to_thread(volume.slot_opens, index, password, material)


async def _erase_keyslots(volume: LuksVolume, read: ReadFn, write: WriteFn,
                          opts: dict[str, Any], force: bool, objects: Any) -> None:
    header = volume.header
    for key in ("new-secret", "iter-time", "secret"):
        if key in opts:
            raise GenericError(f"'{key}' must not be given when erasing keyslots")
    password = secret_password(objects, opts["old-secret"]) if "old-secret" in opts else None
    active = sum(1 for s in header.slots if s.active)
    if "keyslot" in opts:
        k = opts["keyslot"]
        if not 0 <= k < NUM_SLOTS:
            raise GenericError(f"Invalid keyslot {k} specified, must be between 0 and "
                               f"{NUM_SLOTS - 1}")
        if password is not None and not await _slot_matches(volume, read, k, password):
            raise GenericError(f"Given keyslot {k} doesn't contain the given old password for "
                               "erase operation")
        if not force and not header.slots[k].active:
            raise GenericError(f"Given keyslot {k} is already erased (inactive) ")
        if not force and active == 1:
            raise GenericError(f"Attempt to erase the only active keyslot {k} which will erase "
                               "all the data in the image irreversibly - refusing operation")
        slots = [k]
    elif password is not None:
        slots = [i for i in range(NUM_SLOTS) if await _slot_matches(volume, read, i, password)]
        if not slots:
            raise GenericError("No keyslots match given (old) password for erase operation")
        if not force and len(slots) == active:
            raise GenericError("All the active keyslots match the (old) password that was given "
                               "and erasing them will erase all the data in the image "
                               "irreversibly - refusing operation")
    else:
        raise GenericError("To erase keyslot(s), either explicit keyslot index or the password "
                           "currently contained in them must be given")
    for i in slots:
        for offset, data in volume.erase_keyslot(i):
            await write(offset, data)
