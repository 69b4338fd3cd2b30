# SPDX-License-Identifier: GPL-2.0-or-later
"""vhost-user-blk export: QSD's ``--export type=vhost-user-blk``.

``protocol`` (vhost-user messages, sans I/O), ``virtqueue`` (guest memory
and split rings), ``blk`` (virtio-blk requests) and ``server`` (the asyncio
transport). :func:`start_vhost_user_blk` is what block-export-add calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qsd.block.node import Perm
from qsd.export.vhost_user_blk.server import VhostUserBlkExport
from qsd.qmp.errors import GenericError

if TYPE_CHECKING:
    from qsd.block.graph import Edge
    from qsd.block.node import Node
    from qsd.daemon import Daemon

MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 2 * 1024 * 1024


async def start_vhost_user_blk(daemon: "Daemon", args: dict[str, Any],
                               node: "Node") -> tuple["Edge", VhostUserBlkExport]:
    """Check the type's options (QSD's order and texts), attach to the node, listen."""
    eid = args["id"]
    lbs = args.get("logical-block-size", 0) or MIN_BLOCK_SIZE
    if not MIN_BLOCK_SIZE <= lbs <= MAX_BLOCK_SIZE:
        raise GenericError(f"Property {eid}.logical-block-size doesn't take value {lbs} "
                           f"(minimum: {MIN_BLOCK_SIZE}, maximum: {MAX_BLOCK_SIZE})")
    if lbs & (lbs - 1):
        raise GenericError(f"Property {eid}.logical-block-size doesn't take value '{lbs}', "
                           "it's not a power of 2")
    num_queues = args.get("num-queues", 1)
    if num_queues == 0:
        raise GenericError("num-queues must be greater than 0")
    addr = args["addr"]
    if addr["type"] not in ("unix", "fd"):
        raise GenericError("Only socket address types 'unix' and 'fd' are supported")
    writable = bool(args.get("writable", False))
    perm = Perm.CONSISTENT_READ | (Perm.WRITE if writable else Perm(0))
    edge = await daemon.graph.attach_user(node, f"export '{eid}'", perm, Perm.all())
    server = VhostUserBlkExport(eid, edge, writable=writable,
                                writethrough=bool(args.get("writethrough", False)),
                                logical_block_size=lbs, num_queues=num_queues)
    try:
        await server.start(addr)
    except BaseException:
        await daemon.graph.detach(edge)
        raise
    return edge, server
