# SPDX-License-Identifier: GPL-2.0-or-later
"""Commands that start block jobs (mirror, stream, commit) and the graph
changes used with them (external snapshots, backing file names, write
thresholds, reopen).

Checks run in QSD 7.2's order, with its texts: node look-ups, then the
job's own arguments, then the job (its id), then the graph changes.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from qsd.block.node import DRIVERS, CreateContext, Node, Role
from qsd.jobs.commit import start_commit
from qsd.jobs.mirror import MirrorJob, chain_next, check_granularity, start_mirror
from qsd.jobs.stream import start_stream
from qsd.qmp.dispatch import command
from qsd.qmp.errors import GenericError

if TYPE_CHECKING:
    from qsd.daemon import Daemon


# ----- look-ups ------------------------------------------------------------
def root_node(daemon: "Daemon", name: str) -> Node:
    """A node named as ``device``: it must not be a child of another node."""
    node = daemon.graph.find(name, None)
    if any(e.parent is not None for e in node.parents):
        raise GenericError("Need a root block node")
    return node


def check_not_busy(node: Node) -> None:
    """QEMU's op blockers: a node a job holds cannot start another one."""
    for edge in node.parents:
        if edge.parent is None and edge.blocker:
            raise GenericError(f"Node '{node.node_name}' is busy: {edge.blocker}")


def job_options(args: dict[str, Any]) -> dict[str, Any]:
    return {"auto_finalize": args.get("auto-finalize", True),
            "auto_dismiss": args.get("auto-dismiss", True)}


def filtered_chain(node: Node) -> list[Node]:
    """``node`` and the nodes it reaches through filters only."""
    out = [node]
    while node.is_filter:
        edge = node.children.get(getattr(node, "child_name", "file"))
        if edge is None:
            break
        node = edge.child
        out.append(node)
    return out


def replaces_node(daemon: "Daemon", source: Node, name: str) -> Node:
    """The node a mirror may replace: the source or a filter chain it sits on."""
    node = daemon.graph.lookup(name)
    if node is None:
        raise GenericError(f"Failed to find node with node-name='{name}'")
    if node not in filtered_chain(source):
        raise GenericError(f"Cannot replace '{name}' by a node mirrored from "
                           f"'{source.node_name}', because it cannot be guaranteed that doing "
                           "so would not lead to an abrupt change of visible data")
    return node


# ----- mirror ------------------------------------------------------------------
async def _mirror(daemon: "Daemon", args: dict[str, Any], source: Node, target: Node,
                  zero_target: bool) -> None:
    sync = args["sync"]
    granularity = args.get("granularity", 0)
    if granularity:
        check_granularity(granularity)
    if sync in ("incremental", "bitmap"):
        raise GenericError(f"Sync mode '{sync}' not supported")
    if sync == "top" and chain_next(source) is None:
        sync = "full"
    replaces = None
    if "replaces" in args:
        replaces = replaces_node(daemon, source, args["replaces"])
        if replaces.size != target.size:
            raise GenericError("Replaced node and target node must have the same size")
    buf_size = args.get("buf-size", 0)
    if buf_size < 0:
        raise GenericError("Invalid parameter 'buf-size'")
    if source is target:
        raise GenericError("Can't mirror node into itself")
    filter_name = args.get("filter-node-name")
    if filter_name is not None:
        daemon.graph.check_node_name(filter_name)
        if daemon.graph.lookup(filter_name) is not None:
            raise GenericError(f"Duplicate nodes with node-name='{filter_name}'")
    job = MirrorJob(daemon, args.get("job-id", ""), source, target, sync=sync,
                    base=chain_next(source) if sync == "top" else None, replaces=replaces,
                    granularity=granularity, buf_size=buf_size,
                    on_source_error=args.get("on-source-error", "report"),
                    on_target_error=args.get("on-target-error", "report"),
                    unmap=args.get("unmap", True),
                    copy_mode=args.get("copy-mode", "background"),
                    filter_name=filter_name, zero_target=zero_target, **job_options(args))
    await start_mirror(daemon, job, args.get("speed", 0), "speed" in args)


@command("blockdev-mirror")
async def blockdev_mirror(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    source = root_node(daemon, args["device"])
    target = daemon.graph.find(args["target"], None)
    check_not_busy(source)
    await _mirror(daemon, args, source, target, args["sync"] == "full")
    return {}


async def create_image(daemon: "Daemon", filename: str, fmt: str, size: int,
                       backing_file: str | None = None,
                       backing_fmt: str | None = None) -> None:
    """Create an image file as qemu-img create would (drive-mirror,
    blockdev-snapshot-sync), through the drivers' blockdev-create."""
    g = daemon.graph
    file_cls = DRIVERS["file"]
    ctx = CreateContext(g, daemon.objects)
    if fmt == "raw":
        await file_cls.create(ctx, {"driver": "file", "filename": filename, "size": size})
        return
    cls = DRIVERS.get(fmt)
    if cls is None or "create" not in vars(cls):
        raise GenericError(f"Unknown file format '{fmt}'")
    await file_cls.create(ctx, {"driver": "file", "filename": filename, "size": 0})
    file = await g.open_node({"driver": "file", "filename": filename})
    file.monitor_owned = True
    try:
        opts: dict[str, Any] = {"driver": fmt, "file": file.node_name, "size": size}
        if backing_file is not None:
            opts["backing-file"] = backing_file
            if backing_fmt:
                opts["backing-fmt"] = backing_fmt
        await cls.create(ctx, opts)
    finally:
        file.monitor_owned = False
        if not file.parents:
            await g.close_node(file)


async def open_image(daemon: "Daemon", filename: str, fmt: str | None,
                     node_name: str | None) -> Node:
    """Open an image by file name, without its backing file (QEMU's
    BDRV_O_NO_BACKING); not monitor-owned, so it goes with its last user."""
    opts: dict[str, Any] = {"driver": fmt or _probe(filename),
                            "file": {"driver": "file", "filename": filename}}
    if node_name is not None:
        opts["node-name"] = node_name
    if opts["driver"] not in ("raw",):
        opts["backing"] = None
    return await daemon.graph.open_node(opts)


def _probe(filename: str) -> str:
    try:
        with open(filename, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise GenericError(f"Could not open '{filename}': {os.strerror(e.errno or 5)}") from None
    return "qcow2" if magic == b"QFI\xfb" else "raw"


@command("drive-mirror")
async def drive_mirror(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    source = root_node(daemon, args["device"])
    check_not_busy(source)
    mode = args.get("mode", "absolute-paths")
    fmt = args.get("format") or (None if mode == "existing" else source.driver)
    sync = args["sync"]
    backing = chain_next(source)
    if backing is None and sync == "top":
        sync = "full"
    if sync == "none":
        backing = source
    if "replaces" in args:
        rep = replaces_node(daemon, source, args["replaces"])
        if rep.size != source.size:
            raise GenericError("Replaced node and target node must have the same size")
    target_file = args["target"]
    if mode != "existing":
        if sync == "full" or backing is None:
            await create_image(daemon, target_file, fmt or "raw", source.size)
        else:
            await create_image(daemon, target_file, fmt or "raw", source.size,
                               backing.filename, backing.driver)
    target = await open_image(daemon, target_file, fmt, args.get("node-name"))
    try:
        if sync in ("top", "none") and backing is not None and "backing" not in target.children:
            await daemon.graph.attach(target, "backing", backing, Role.COW)
        await _mirror(daemon, dict(args, sync=sync), source, target,
                      sync == "full" and mode == "existing")
    except BaseException:
        if not target.parents:
            await daemon.graph.close_node(target)
        raise
    if not target.parents:  # the job already ended
        await daemon.graph.close_node(target)
    return {}


# ----- stream / commit -----------------------------------------------------------
@command("block-stream")
async def block_stream(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    await start_stream(daemon, args)
    return {}


@command("block-commit")
async def block_commit(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    await start_commit(daemon, args)
    return {}

