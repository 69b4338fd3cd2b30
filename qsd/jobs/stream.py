# SPDX-License-Identifier: GPL-2.0-or-later
"""block-stream: copy the data of backing layers into the top image, then
drop those layers from the chain.

The job walks the image in chunks; a chunk the top image does not hold
but some layer above the base does is read through the top (so the chain
supplies it) and written back into the top.  A guest write to the top that
overlaps a chunk while it is being copied makes the job look at that chunk
again (only the parts still unallocated are copied), so streamed data
never lands over newer guest data.  On completion the top's backing edge
goes to the base and its image header names the base (or ``backing-file``)
as QEMU writes it.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any

from qsd.block.node import Node, Perm
from qsd.jobs.job import BlockJob
from qsd.jobs.mirror import allocated_above, chain_next
from qsd.qmp.errors import GenericError

if TYPE_CHECKING:
    from qsd.block.graph import Edge
    from qsd.daemon import Daemon

#: Bytes looked at per step (QEMU's STREAM_CHUNK).
STREAM_CHUNK = 512 << 10


def chain_contains(top: Node, node: Node) -> bool:
    """Whether ``node`` is ``top`` or below it in its chain (a new backing
    link from ``node`` to ``top`` would make a cycle)."""
    it: Node | None = top
    while it is not None:
        if it is node:
            return True
        it = chain_next(it)
    return False


def skip_filters(node: Node | None) -> Node | None:
    while node is not None and node.is_filter:
        node = chain_next(node)
    return node


def find_backing_image(top: Node, filename: str) -> Node | None:
    """A node below ``top`` whose file name is ``filename`` (QEMU compares
    the names as given and as absolute paths)."""
    want = {filename, _abs(filename)}
    it = chain_next(top)
    while it is not None:
        if not it.is_filter and (it.filename in want or _abs(it.filename) in want):
            return it
        it = chain_next(it)
    return None


def _abs(name: str) -> str:
    return os.path.abspath(name) if name and not name.startswith("json:") else name


async def set_backing_file_name(node: Node, name: str | None, fmt: str | None) -> None:
    """Rewrite the backing file name in ``node``'s image header (qcow2)."""
    change = getattr(node, "change_backing_file", None)
    if change is None:
        raise GenericError("Operation not supported")
    await change(name, fmt)


class StreamJob(BlockJob):
    job_type = "stream"

    def __init__(self, daemon: "Daemon", job_id: str, top: Node, base: Node | None,
                 base_overlay: Node, backing_file: str | None, on_error: str,
                 auto_finalize: bool, auto_dismiss: bool) -> None:
        super().__init__(daemon, job_id, auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
        self.graph = daemon.graph
        self.top = top
        self.base = base
        self.base_overlay = base_overlay
        self.backing_file = backing_file
        self.on_error = on_error
        self.edges: list["Edge"] = []
        self._touched: list[tuple[int, int]] = []

    async def setup(self) -> None:
        """Take the top for writing and block the layers being streamed."""
        g = self.graph
        blocker = "block device is in use by block job: stream"
        self.edges.append(await g.attach_user(
            self.top, f"block job '{self.id}'", Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED,
            Perm.all(), blocker=blocker))
        it = chain_next(self.top)
        while it is not None and it is not self.base:
            self.edges.append(await g.attach_user(it, f"block job '{self.id}'", Perm(0),
                                                  Perm.all(), blocker=blocker))
            it = chain_next(it)
        self.top.write_observers.append(self._observe)

    def _observe(self, node: Node, offset: int, length: int) -> None:
        self._touched.append((offset, length))

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            await asyncio.sleep(0)  # QEMU ends jobs from a bottom half

    async def _run(self) -> None:
        size = self.top.size
        self.progress_set_remaining(size)
        offset = 0
        below = chain_next(self.top)
        while offset < size:
            n = min(STREAM_CHUNK, size - offset)
            copied = 0
            if below is not None:
                copied = await self._stream_chunk(offset, n)
            self.progress_update(n)
            offset += n
            await self.throttle(copied)

    async def _stream_chunk(self, offset: int, length: int) -> int:
        """Copy what the chain above the base holds and the top does not."""
        copied = 0
        while True:
            todo = [r for r in await allocated_above(chain_next(self.top), self.base,
                                                     offset, length)]
            todo = [r for part in todo for r in await self._unallocated_in_top(*part)]
            if not todo:
                return copied
            self._touched.clear()
            bufs = []
            for off, n in todo:
                buf = bytearray(n)
                await self.retry_io(self.on_error,
                                    lambda: self.top.read_into(off, memoryview(buf)), True)
                bufs.append(buf)
            if any(_overlaps(t, todo) for t in self._touched):
                continue  # a guest write raced with us: look again
            for (off, n), buf in zip(todo, bufs):
                await self.retry_io(self.on_error, lambda: self.top.write(off, buf), False)
                copied += n
            return copied

    async def _unallocated_in_top(self, offset: int, length: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        pos, end = offset, offset + length
        while pos < end:
            for e in await self.top.block_status(pos, end - pos):
                stop = min(e.offset + e.length, end)
                if stop <= pos:
                    continue
                if e.depth != 1:
                    out.append((pos, stop - pos))
                pos = stop
        return out

    async def prepare(self) -> None:
        """The top's backing becomes the base; its header says so."""
        top = self.top
        if chain_next(top) is None:
            return
        base = skip_filters(self.base)
        name = fmt = None
        if base is not None:
            name = self.backing_file or base.filename
            fmt = base.driver
        g = self.graph
        async with g.drained(top):
            edge = top.children["backing"]
            if base is None:
                await g.detach(edge)
            else:
                await g.set_backing(top, base)
            await set_backing_file_name(top, name, fmt)

    async def clean(self) -> None:
        if self._observe in self.top.write_observers:
            self.top.write_observers.remove(self._observe)
        for edge in reversed(self.edges):
            await self.graph.detach(edge)
        self.edges.clear()


def _overlaps(t: tuple[int, int], ranges: list[tuple[int, int]]) -> bool:
    return any(t[0] < off + n and off < t[0] + t[1] for off, n in ranges)


async def start_stream(daemon: "Daemon", args: dict[str, Any]) -> None:
    """block-stream's checks in QSD's order, then the job."""
    has_base, has_node, has_bottom = "base" in args, "base-node" in args, "bottom" in args
    if has_base and has_node:
        raise GenericError("'base' and 'base-node' cannot be specified at the same time")
    if has_base and has_bottom:
        raise GenericError("'base' and 'bottom' cannot be specified at the same time")
    if has_bottom and has_node:
        raise GenericError("'bottom' and 'base-node' cannot be specified at the same time")
    g = daemon.graph
    device = args["device"]
    top = g.find(device, None)
    base: Node | None = None
    if has_base:
        base = find_backing_image(top, args["base"])
        if base is None:
            raise GenericError(f"Can't find '{args['base']}' in the backing chain")
    if has_node:
        base = g.find(args["base-node"], "")
        if base is top or not chain_contains(top, base):
            raise GenericError(f"Node '{args['base-node']}' is not a backing image of '{device}'")
    bottom: Node | None = None
    if has_bottom:
        bottom = g.find(args["bottom"], "")
        if bottom.is_filter:
            raise GenericError(f"Node '{args['bottom']}' is a filter, use a non-filter node "
                               "as 'bottom'")
        if not chain_contains(top, bottom):
            raise GenericError(f"Node '{args['bottom']}' is not in a chain starting from "
                               f"'{device}'")
        base = chain_next(bottom)
    it: Node | None = top
    while it is not None and it is not base:
        for edge in it.parents:
            if edge.parent is None and edge.blocker:
                raise GenericError(f"Node '{it.node_name}' is busy: {edge.blocker}")
        it = chain_next(it)
    if base is None and "backing-file" in args:
        raise GenericError("backing file specified, but streaming the entire chain")
    overlay = bottom
    if overlay is None:
        overlay = top
        while chain_next(overlay) is not None and chain_next(overlay) is not base:
            overlay = chain_next(overlay)  # type: ignore[assignment]
    job = StreamJob(daemon, args.get("job-id", ""), top, base, overlay,
                    args.get("backing-file"), args.get("on-error", "report"),
                    args.get("auto-finalize", True), args.get("auto-dismiss", True))
    try:
        if "speed" in args:
            await job.set_speed(args["speed"])
        await job.setup()
    except BaseException:
        await job.clean()
        job.discard()
        raise
    await job.start()
