# SPDX-License-Identifier: GPL-2.0-or-later
"""Block node commands: blockdev-add/-del and the node queries."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qsd.block.filters import FilterNode
from qsd.block.node import Node, Perm
from qsd.qmp.commands.bitmaps import dirty_bitmaps_info
from qsd.qmp.dispatch import command
from qsd.qmp.errors import GenericError

if TYPE_CHECKING:
    from qsd.daemon import Daemon


@command("blockdev-add")
async def blockdev_add(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    await daemon.graph.add(args)
    return {}


@command("blockdev-del")
async def blockdev_del(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    await daemon.graph.delete(args["node-name"])
    return {}


@command("block_resize")
async def block_resize(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    """Resize through a temporary user that takes the resize permission,
    inside a drained section, as QEMU's qmp_block_resize."""
    device, name, size = args.get("device"), args.get("node-name"), args["size"]
    node = daemon.graph.lookup(name) if name is not None else None
    if node is None:
        raise GenericError(f"Cannot find device='{device or ''}' nor node-name='{name or ''}'")
    if size < 0:
        raise GenericError("Parameter 'size' expects a >0 size")
    edge = await daemon.graph.attach_user(node, "an unnamed block device", Perm.RESIZE,
                                          Perm.all())
    try:
        async with daemon.graph.drained(node):
            if node.read_only:
                raise GenericError("Image is read-only")
            await node.truncate(size)
    finally:
        await daemon.graph.detach(edge)
    return {}


@command("query-block")
async def query_block(daemon: "Daemon", args: dict[str, Any]) -> list[Any]:
    """QSD has no BlockBackends with names, so there is nothing to list."""
    return []


@command("query-named-block-nodes")
async def query_named_block_nodes(daemon: "Daemon", args: dict[str, Any]) -> list[dict[str, Any]]:
    flat = args.get("flat", False)
    return [node_info(node, flat) for node in reversed(list(daemon.graph.nodes.values()))]


def _backing(node: Node) -> Node | None:
    edge = node.children.get("backing")
    return edge.child if edge is not None else None


def _filtered_or_backing(node: Node) -> Node | None:
    """QEMU's bdrv_filter_or_cow_bs: what the nested image info goes on to."""
    if isinstance(node, FilterNode):
        return node.filtered
    return _backing(node)


def image_info(node: Node, nested: bool) -> dict[str, Any]:
    """ImageInfo, members inserted in the schema's order."""
    info: dict[str, Any] = {"filename": node.filename, "format": node.driver}
    if node.reports_dirty_flag:
        info["dirty-flag"] = node.dirty_flag()
    actual = node.actual_size()
    if actual is not None:
        info["actual-size"] = actual
    info["virtual-size"] = node.size
    cluster = node.cluster_size()
    if cluster is not None:
        info["cluster-size"] = cluster
    if node.encrypted:
        info["encrypted"] = True
    backing = _backing(node)
    if backing is not None:
        info["backing-filename"] = backing.filename
        info["full-backing-filename"] = backing.filename
        info["backing-filename-format"] = backing.driver
    snapshots = node.snapshots()
    if snapshots is not None:
        info["snapshots"] = snapshots
    below = _filtered_or_backing(node) if nested else None
    if below is not None:
        info["backing-image"] = image_info(below, nested)
    specific = node.format_specific()
    if specific is not None:
        info["format-specific"] = specific
    return info


def node_info(node: Node, flat: bool) -> dict[str, Any]:
    """BlockDeviceInfo, members inserted in the schema's order."""
    info: dict[str, Any] = {"file": node.filename, "node-name": node.node_name,
                            "ro": node.read_only, "drv": node.driver}
    backing = _backing(node)
    if backing is not None:
        info["backing_file"] = backing.filename
    # QEMU counts the nesting of the image info: filters and backing files
    # alike, and nothing in flat output.
    depth = 0
    below = None if flat else _filtered_or_backing(node)
    while below is not None:
        depth += 1
        below = _filtered_or_backing(below)
    info["backing_file_depth"] = depth
    info["encrypted"] = node.encrypted
    info["detect_zeroes"] = node.detect_zeroes
    for key in ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"):
        info[key] = 0
    info["image"] = image_info(node, not flat)
    info["cache"] = {"writeback": True, "direct": node.cache_direct,
                     "no-flush": node.cache_no_flush}
    info["write_threshold"] = node.write_threshold
    if node.dirty_bitmaps:
        info["dirty-bitmaps"] = dirty_bitmaps_info(node)
    return info
