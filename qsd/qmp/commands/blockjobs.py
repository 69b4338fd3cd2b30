# SPDX-License-Identifier: GPL-2.0-or-later
"""Commands that start block jobs (mirror, stream, commit) and the graph
changes used with them (external snapshots, backing file names, write
thresholds, reopen).

Checks run in QSD 7.2's order, with its texts: node look-ups, then the
job's own arguments, then the job (its id), then the graph changes.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any

from qsd.block.node import DRIVERS, CreateContext, Node, Perm, Role
from qsd.jobs.commit import set_read_only, start_commit
from qsd.jobs.job import check_not_busy
from qsd.jobs.mirror import MirrorJob, chain_next, check_granularity, start_mirror
from qsd.jobs.stream import chain_contains, start_stream
from qsd.qmp.actions import Action, action
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

# ----- external snapshots ----------------------------------------------------------
def check_snapshot_source(node: Node) -> None:
    """QEMU's external-snapshot op blockers: jobs and backing links, the
    newest first (QEMU reports the blocker added last)."""
    for edge in reversed(node.parents):
        if edge.blocker:
            raise GenericError(f"Node '{node.node_name}' is busy: {edge.blocker}")


class _SnapshotBase(Action):
    """Shared by blockdev-snapshot and -sync: put ``new`` above ``old``
    (QEMU's bdrv_append: every user of old moves to new, then old becomes
    new's backing file), undone by abort."""

    old: Node | None = None
    new: Node | None = None
    appended = False
    _drain: contextlib.AsyncExitStack | None = None

    async def drain_old(self, old: Node) -> None:
        """As QEMU's transaction: drain everything once, then keep ``old``
        drained until the action is cleaned up (jobs on it pause meanwhile)."""
        g = self.daemon.graph
        async with g.drained(*g.nodes.values()):
            pass
        self._drain = contextlib.AsyncExitStack()
        await self._drain.enter_async_context(g.drained(old))

    async def clean(self) -> None:
        if self._drain is not None:
            drain, self._drain = self._drain, None
            await drain.aclose()

    async def append(self) -> None:
        old, new = self.old, self.new
        assert old is not None and new is not None
        if any(e.parent is None for e in new.parents):
            raise GenericError("The overlay is already in use")
        if "backing" in new.children:
            raise GenericError("The overlay already has a backing image")
        if not hasattr(type(new), "change_backing_file"):
            raise GenericError("The overlay does not support backing images")
        g = self.daemon.graph
        async with g.drained(old):
            g.replace_node(old, new)
            try:
                await g.attach(new, "backing", old, Role.COW)
            except BaseException:
                g.replace_node(new, old)
                raise
        self.appended = True

    async def abort(self) -> None:
        if not self.appended or self.old is None or self.new is None:
            return
        g = self.daemon.graph
        edge = self.new.children["backing"]
        async with g.drained(self.new):
            g.replace_node(self.new, self.old, exclude=[edge])
        await g.detach(edge)
        self.appended = False


@action("blockdev-snapshot")
class BlockdevSnapshot(_SnapshotBase):
    async def prepare(self) -> None:
        g = self.daemon.graph
        self.old = g.find(self.args["node"], None)
        await self.drain_old(self.old)
        check_snapshot_source(self.old)
        self.new = g.find(self.args["overlay"], None)
        await self.append()


@action("blockdev-snapshot-sync")
class BlockdevSnapshotSync(_SnapshotBase):
    created: Node | None = None

    async def prepare(self) -> None:
        g = self.daemon.graph
        device, name = self.args.get("device", ""), self.args.get("node-name", "")
        node = g.lookup(name) if name else None
        if node is None:
            raise GenericError(f"Cannot find device='{device}' nor node-name='{name}'")
        self.old = node
        await self.drain_old(node)
        check_snapshot_source(node)
        new_name = self.args.get("snapshot-node-name")
        if new_name is None:
            raise GenericError("New overlay node-name missing")
        if g.lookup(new_name) is not None:
            raise GenericError("New overlay node-name already in use")
        fmt = self.args.get("format", "qcow2")
        filename = self.args["snapshot-file"]
        if self.args.get("mode", "absolute-paths") != "existing":
            await create_image(self.daemon, filename, fmt, node.size, node.filename, node.driver)
        self.new = self.created = await open_image(self.daemon, filename, fmt, new_name)
        await self.append()

    async def abort(self) -> None:
        await super().abort()
        if self.created is not None and not self.created.parents:
            await self.daemon.graph.close_node(self.created)

    async def clean(self) -> None:
        """An overlay nobody uses (the node had no users) goes at once, as in QSD."""
        await super().clean()
        new = self.created
        if new is not None and self.appended and not new.parents:
            await self.daemon.graph.close_node(new)


# ----- backing file names, write thresholds -------------------------------------
@command("change-backing-file")
async def change_backing_file(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    g = daemon.graph
    device = root_node(daemon, args["device"])
    image = g.find(args["image-node-name"], "")
    backing = chain_next(image)
    if backing is None:
        raise GenericError("not allowing backing file change on an image without a "
                           "backing file")
    it: Node | None = device
    while it is not None and it is not image:
        it = chain_next(it)
    if it is None:
        raise GenericError(f"'{args['device']}' and image file are not in the same chain")
    change = getattr(image, "change_backing_file", None)
    if change is None:
        raise GenericError("Could not change the backing file to "
                           f"'{args['backing-file']}': Operation not supported")
    try:
        await change(args["backing-file"], backing.driver)
    except OSError as e:
        raise GenericError(f"Could not change the backing file to '{args['backing-file']}': "
                           f"{os.strerror(e.errno or 5)}") from None
    return {}


@command("block-set-write-threshold")
async def block_set_write_threshold(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    """One-shot: the first write that reaches past the threshold sends
    BLOCK_WRITE_THRESHOLD (before the write runs) and disarms it."""
    name = args["node-name"]
    node = daemon.graph.lookup(name)
    if node is None:
        raise GenericError(f"Device '{name}' not found")
    for obs in list(node.write_observers):
        if getattr(obs, "write_threshold", False):
            node.write_observers.remove(obs)
    threshold = args["write-threshold"]
    node.write_threshold = threshold
    if not threshold:
        return {}

    def observer(n: Node, offset: int, length: int) -> None:
        end = offset + length
        if end > threshold and observer in n.write_observers:
            n.write_observers.remove(observer)
            n.write_threshold = 0
            daemon.emit_event("BLOCK_WRITE_THRESHOLD", {
                "node-name": n.node_name, "write-threshold": threshold,
                "amount-exceeded": end - threshold})

    observer.write_threshold = True  # type: ignore[attr-defined]
    node.write_observers.append(observer)
    return {}


# ----- blockdev-reopen -------------------------------------------------------------
#: Options blockdev-reopen may change; any other must stay as it was opened.
_REOPEN_MUTABLE = frozenset({"driver", "node-name", "read-only", "auto-read-only", "backing",
                             "file", "detect-zeroes", "discard", "force-share", "cache",
                             "lazy-refcounts", "pass-discard-request", "pass-discard-snapshot",
                             "pass-discard-other", "cache-clean-interval", "l2-cache-size",
                             "refcount-cache-size", "cache-size", "l2-cache-entry-size",
                             "overlap-check"})


@command("blockdev-reopen")
async def blockdev_reopen(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    """All nodes are checked first, then changed: read-only, backing child
    (a node name or null), detect-zeroes and discard; everything else must
    restate the options the node was opened with."""
    g = daemon.graph
    plans: list[tuple[Node, dict[str, Any], Node | None | bool]] = []
    for opts in args["options"]:
        name = opts.get("node-name")
        if name is None:
            raise GenericError("node-name not specified")
        node = g.lookup(name)
        if node is None:
            raise GenericError(f"Failed to find node with node-name='{name}'")
        backing: Node | None | bool = False  # False: unchanged
        if "backing" not in opts:
            if "backing" in node.children:
                raise GenericError(f"backing is missing for '{name}'")
        elif opts["backing"] is None:
            backing = None
        else:
            new = g.find(opts["backing"], "")
            if chain_contains(new, node):
                raise GenericError(f"Making '{new.node_name}' a backing child of '{name}' "
                                   "would create a cycle")
            backing = new
        if opts["driver"] != node.driver:
            raise GenericError("Cannot change the option 'driver'")
        for key, value in opts.items():
            if key not in _REOPEN_MUTABLE and node.options.get(key) != value:
                raise GenericError(f"Cannot change the option '{key}'")
        if "file" in opts and "file" in node.children:
            ref = opts["file"]
            current = node.children["file"].child
            if isinstance(ref, dict):
                # inline options naming the child it already has are accepted
                if any(current.options.get(k) != v for k, v in ref.items()):
                    raise GenericError("Cannot change the option 'file'")
                ref = current.node_name
            new_file = g.find(ref, "")
            if new_file is not node.children["file"].child:
                await g.set_backing(node, new_file, name="file", check_only=True)
        plans.append((node, opts, backing))
    # A node that becomes read-only must not keep users that write.
    new_ro = {id(n): bool(o.get("read-only", False)) for n, o, _ in plans}
    for node, opts, _ in plans:
        if not opts.get("read-only", False):
            continue
        writers = []
        for e in node.parents:
            parent = e.parent
            if parent is not None and id(parent) in new_ro:
                if not new_ro[id(parent)] and e.name != "backing":
                    writers.append(e)  # a parent reopened read-write writes its file
            elif e.perm & (Perm.WRITE | Perm.RESIZE):
                writers.append(e)
        if writers:
            raise GenericError(f"Read-only block node '{node.node_name}' cannot support "
                               "read-write users")
    for node, opts, backing in plans:
        async with g.drained(node):
            await set_read_only(node, bool(opts.get("read-only", False)))
            node.detect_zeroes = opts.get("detect-zeroes", "off")
            node.discard_mode = opts.get("discard", "ignore")
            node.options = {**node.options, **{k: v for k, v in opts.items()
                                               if k not in ("backing", "file")}}
            if "file" in opts and isinstance(opts["file"], str) and "file" in node.children \
                    and opts["file"] != node.children["file"].child.node_name:
                await g.set_backing(node, g.find(opts["file"], ""), name="file")
            if backing is not False:
                await g.set_backing(node, backing)  # type: ignore[arg-type]
            g.check_own_perms(node)
    return {}
