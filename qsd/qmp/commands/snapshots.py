# SPDX-License-Identifier: GPL-2.0-or-later
"""Internal snapshot commands: blockdev-snapshot-internal-sync and
blockdev-snapshot-delete-internal-sync, with QSD 7.2's checks in its order.

A node without snapshot support passes the request to its only primary
data child (QEMU's snapshot fallback), so raw on qcow2 works as in QEMU.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Any

from qsd.block.formats.qcow2 import snapshot
from qsd.block.formats.qcow2.driver import Qcow2Node
from qsd.block.node import Node, Role
from qsd.qmp.dispatch import command
from qsd.qmp.errors import GenericError

if TYPE_CHECKING:
    from qsd.daemon import Daemon

_CONTENT = Role.DATA | Role.METADATA | Role.FILTERED


def _target(node: Node, need_writable: bool) -> Qcow2Node | None:
    """The node that keeps the snapshots for ``node``, if any."""
    while not isinstance(node, Qcow2Node):
        edges = [e for e in node.children.values() if e.role & _CONTENT]
        if len(edges) != 1 or not edges[0].role & Role.PRIMARY:
            return None
        node = edges[0].child
        if need_writable and node.read_only:
            return None
    return node


def _root(daemon: Daemon, device: str) -> Node:
    """The node named ``device``; only a node no other node uses will do."""
    node = daemon.graph.find(device, None)
    if any(edge.parent is not None for edge in node.parents):
        raise GenericError("Need a root block node")
    return node


def _check_list(target: Qcow2Node) -> None:
    """QEMU cannot list (so never touches) snapshots of a data-file image."""
    if target.has_data_file:
        raise GenericError("Failed to get a snapshot list: Operation not supported")


@command("blockdev-snapshot-internal-sync")
async def snapshot_internal(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    device, name = args["device"], args["name"]
    node = _root(daemon, device)
    if node.read_only:
        raise GenericError(f"Device '{device}' is read only")
    target = _target(node, True)
    if target is None:
        raise GenericError(f"Block format '{node.driver}' used by device '{device}' does not "
                           "support internal snapshots")
    if not name:
        raise GenericError("Name is empty")
    _check_list(target)
    if any(sn.name == name for sn in target.snapshot_list):
        raise GenericError(f"Snapshot with name '{name}' already exists on device '{device}'")
    try:
        await target.snapshot_create(name)
    except OSError as e:
        raise GenericError(f"Failed to create snapshot '{name}' on device '{device}': "
                           f"{os.strerror(e.errno or errno.EIO)}") from None
    return {}


@command("blockdev-snapshot-delete-internal-sync")
async def snapshot_delete_internal(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    device = args["device"]
    ident, name = args.get("id"), args.get("name")
    node = _root(daemon, device)
    if ident is None and name is None:
        raise GenericError("Name or id must be provided")
    target = _target(node, False)
    if target is None:
        raise GenericError("Failed to get a snapshot list: Operation not supported")
    _check_list(target)
    if snapshot.find(target.snapshot_list, ident, name) is None:
        shown_id = "null" if ident is None else ident
        shown_name = "null" if name is None else name
        raise GenericError(f"Snapshot with id '{shown_id}' and name '{shown_name}' "
                           f"does not exist on device '{device}'")
    try:
        sn = await target.snapshot_delete(ident, name)
    except OSError as e:
        raise GenericError("Failed to remove snapshot from snapshot list: "
                           f"{os.strerror(e.errno or errno.EIO)}") from None
    return sn.info()
