# SPDX-License-Identifier: GPL-2.0-or-later
"""block-commit: merge layers of a backing chain down into a lower image.

Intermediate commit (``top-node`` below the active layer): a
``commit_top`` filter takes the top node's place under its overlay; the
job copies every range that some layer from the top down to (not
including) the base holds into the base, then the overlay's backing edge
goes to the base (one ``replace_node`` of the filter) and its header names
the base (or ``backing-file``).  Active commit (the top is the device
itself) runs the mirror job against the base: it goes READY and pivots
on job-complete (:mod:`qsd.jobs.mirror`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from qsd.block.filters.commit_top import CommitTopNode
from qsd.block.node import Node, Perm
from qsd.jobs.job import BlockJob
from qsd.jobs.mirror import Copier, MirrorJob, allocated_above, chain_next, start_mirror
from qsd.jobs.stream import chain_contains, find_backing_image, set_backing_file_name
from qsd.qmp.errors import DeviceNotFound, GenericError

if TYPE_CHECKING:
    from qsd.block.graph import Edge, Graph
    from qsd.daemon import Daemon

#: Bytes looked at per step (QEMU's COMMIT_BUFFER_SIZE is 512 KiB).
COMMIT_CHUNK = 512 << 10


class CommitJob(BlockJob):
    """Intermediate commit of ``top`` (and the layers under it) into ``base``."""

    job_type = "commit"

    def __init__(self, daemon: "Daemon", job_id: str, device: Node, top: Node, base: Node,
                 overlay: Node, backing_file: str | None, on_error: str,
                 filter_name: str | None, auto_finalize: bool, auto_dismiss: bool) -> None:
        super().__init__(daemon, job_id, auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
        self.graph = daemon.graph
        self.device = device
        self.top = top
        self.base = base
        self.overlay = overlay
        self.backing_file = backing_file
        self.on_error = on_error
        self.filter_name = filter_name
        self.filter: CommitTopNode | None = None
        self.edges: list["Edge"] = []
        self.base_edge: "Edge | None" = None
        self._copier = Copier(True, False)
        #: Undo steps for read-only nodes made writable for the job.
        self.after_clean: list[Callable[[], Awaitable[None]]] = []

    async def setup(self) -> None:
        """Filter above the top, the base for writing, the layers blocked."""
        g = self.graph
        node = await g.insert_filter(CommitTopNode, self.filter_name, self.top)
        self.filter = node
        blocker = "block device is in use by block job: commit"
        desc = f"block job '{self.id}'"
        self.edges.append(await g.attach_user(self.device, desc, Perm(0), Perm.all(),
                                              blocker=blocker))
        it: Node | None = self.top
        while it is not None and it is not self.base:
            self.edges.append(await g.attach_user(it, desc, Perm(0), Perm.all(),
                                                  blocker=blocker))
            it = chain_next(it)
        self.base_edge = await g.attach_user(
            self.base, desc, Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE,
            Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED | Perm.WRITE, blocker=blocker)

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            await asyncio.sleep(0)  # QEMU ends jobs from a bottom half

    async def _run(self) -> None:
        size = self.top.size
        if self.base.size < size:
            await self.base.truncate(size)
        self._copier.target_zeroed = False
        self.progress_set_remaining(size)
        offset = 0
        while offset < size:
            n = min(COMMIT_CHUNK, size - offset)
            copied = 0
            for off, length in await allocated_above(self.top, self.base, offset, n):
                await self.retry_io(self.on_error, lambda: self._copier.copy(
                    self.top, self.base, off, length))
                copied += length
            self.progress_update(n)
            offset += n
            await self.throttle(copied)

    async def prepare(self) -> None:
        """Drop the committed layers: the overlay now backs onto the base."""
        g = self.graph
        name = self.backing_file or self.base.filename
        async with g.drained(self.base, self.overlay):
            assert self.filter is not None
            g.replace_node(self.filter, self.base)
            await set_backing_file_name(self.overlay, name, self.base.driver)

    async def clean(self) -> None:
        g = self.graph
        node, self.filter = self.filter, None
        if node is not None:
            if node.parents:
                async with g.drained(node):
                    g.replace_node(node, self.top)
            if g.nodes.get(node.node_name) is node:
                del g.nodes[node.node_name]
            await g.detach(node.children["backing"])
            await node.close()
        for edge in reversed(self.edges):
            await g.detach(edge)
        self.edges.clear()
        if self.base_edge is not None:
            await g.detach(self.base_edge)
            self.base_edge = None
        while self.after_clean:
            await self.after_clean.pop()()


async def set_read_only(node: Node, read_only: bool) -> None:
    """Switch a format node between read-only and read-write; it flushes what
    it cached before it stops writing (qcow2 then refuses writes, as after a
    read-only open)."""
    if node.read_only == read_only:
        return
    if read_only:
        await node.flush()
    node.read_only = read_only
    if hasattr(node, "_writable"):
        node._writable = not read_only  # type: ignore[attr-defined]


async def reopen_read_write(graph: "Graph", node: Node) -> Callable[[], Awaitable[None]]:
    """QEMU's bdrv_reopen_set_read_only(node, false) for a commit: the node
    and the protocol nodes under it become writable (a file reopens its
    descriptor read-write when a writer comes, as with auto-read-only);
    returns what puts them back when the job is done."""
    if not node.read_only:
        async def nothing() -> None:
            return None
        return nothing
    files: list[tuple[Node, bool]] = []
    it: Node | None = node
    while it is not None and "file" in it.children:
        it = it.children["file"].child
        if it.read_only and hasattr(it, "_dynamic_ro"):
            files.append((it, it._dynamic_ro))  # type: ignore[attr-defined]
            it.read_only = False
            it._dynamic_ro = True  # type: ignore[attr-defined]
    await set_read_only(node, False)
    try:
        graph.check_own_perms(node)
    except BaseException:
        await set_read_only(node, True)
        for f, dyn in files:
            f.read_only = True
            f._dynamic_ro = dyn  # type: ignore[attr-defined]
        raise

    async def restore() -> None:
        await set_read_only(node, True)
        graph.check_own_perms(node)
        for f, dyn in files:
            f.read_only = True
            f._dynamic_ro = dyn  # type: ignore[attr-defined]
    return restore


def find_overlay(device: Node, node: Node) -> Node:
    """The image in ``device``'s chain whose backing file is ``node``."""
    it = device
    while chain_next(it) is not node:
        nxt = chain_next(it)
        assert nxt is not None
        it = nxt
    return it


async def start_commit(daemon: "Daemon", args: dict[str, Any]) -> None:
    """block-commit's checks in QSD's order, then the job."""
    g = daemon.graph
    device = args["device"]
    node = g.lookup(device)
    if node is None:
        raise DeviceNotFound(f"Device '{device}' not found")
    if any(e.parent is not None for e in node.parents):
        raise GenericError("Need a root block node")
    for edge in node.parents:
        if edge.parent is None and edge.blocker:
            raise GenericError(f"Node '{device}' is busy: {edge.blocker}")
    top: Node | None = node
    if "top-node" in args and "top" in args:
        raise GenericError("'top-node' and 'top' are mutually exclusive")
    if "top-node" in args:
        top = g.find(args["top-node"], "")
        if not chain_contains(node, top):
            raise GenericError(f"'{args['top-node']}' is not in this backing file chain")
    elif "top" in args and args["top"] != node.filename:
        top = find_backing_image(node, args["top"])
        if top is None:
            raise GenericError(f"Top image file {args['top']} not found")
    assert top is not None
    if "base-node" in args and "base" in args:
        raise GenericError("'base-node' and 'base' are mutually exclusive")
    if "base-node" in args:
        base = g.find(args["base-node"], "")
        if not chain_contains(top, base):
            raise GenericError(f"'{args['base-node']}' is not in this backing file chain")
    elif "base" in args:
        found = find_backing_image(top, args["base"])
        if found is None:
            raise GenericError(f"Can't find '{args['base']}' in the backing chain")
        base = found
    else:
        base = top
        while chain_next(base) is not None:
            base = chain_next(base)  # type: ignore[assignment]
        if base is top:
            raise GenericError("There is no backimg image")
    if top is base:
        raise GenericError("cannot commit an image into itself")
    it: Node | None = top
    while it is not None and it is not base:
        for edge in it.parents:
            if edge.parent is None and edge.blocker:
                raise GenericError(f"Node '{it.node_name}' is busy: {edge.blocker}")
        it = chain_next(it)
    options = {"auto_finalize": args.get("auto-finalize", True),
               "auto_dismiss": args.get("auto-dismiss", True)}
    on_error = args.get("on-error", "report")
    filter_name = args.get("filter-node-name")
    if filter_name is not None:
        g.check_node_name(filter_name)
        if g.lookup(filter_name) is not None:
            raise GenericError(f"Duplicate nodes with node-name='{filter_name}'")
    if top is node:
        if "backing-file" in args:
            raise GenericError("'backing-file' specified, but 'top' is the active layer")
        job = MirrorJob(daemon, args.get("job-id", ""), node, base, sync="top", base=base,
                        on_source_error=on_error, on_target_error=on_error,
                        filter_name=filter_name, commit=True, **options)
        try:
            job.after_clean.append(await reopen_read_write(g, base))
        except BaseException:
            job.discard()
            raise
        try:
            await start_mirror(daemon, job, args.get("speed", 0), "speed" in args)
        except BaseException:
            for undo in job.after_clean:
                await undo()
            raise
        return
    overlay = find_overlay(node, top)
    job = CommitJob(daemon, args.get("job-id", ""), node, top, base, overlay,
                    args.get("backing-file"), on_error, filter_name,
                    options["auto_finalize"], options["auto_dismiss"])
    try:
        job.after_clean.append(await reopen_read_write(g, base))
        job.after_clean.append(await reopen_read_write(g, overlay))
        if "speed" in args:
            await job.set_speed(args["speed"])
        await job.setup()
    except BaseException:
        await job.clean()
        job.discard()
        raise
    await job.start()
