# SPDX-License-Identifier: GPL-2.0-or-later
"""Metadata contexts an NBD export answers NBD_CMD_BLOCK_STATUS for.

Every export offers ``base:allocation``; an export configuration adds more
(``qemu:allocation-depth``, ``qemu:dirty-bitmap:NAME``) as further
:class:`MetaContext` objects. The handshake looks at ``name`` (list and set
queries are matched against it) and ``id`` (QEMU's fixed context ids: 0 for
base:allocation, 1 for allocation depth, 2 + i for the i-th exported bitmap,
also the order of replies); the transmission phase calls
:meth:`MetaContext.extents`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qsd.block.node import Role
from qsd.export.nbd.protocol import STATE_HOLE, STATE_ZERO
from qsd.qmp.commands.bitmaps import Check, check_bitmap, find_bitmap, lookup_bitmap
from qsd.qmp.errors import GenericError

if TYPE_CHECKING:
    from qsd.block.bitmap import DirtyBitmap
    from qsd.block.graph import Graph
    from qsd.block.node import Extent, Node

#: Most descriptors one BLOCK_STATUS chunk carries: 1 MiB of them, as QEMU.
MAX_EXTENTS = (1 << 20) // 8
#: Context ids QEMU gives (NBD_META_ID_*); bitmap i gets DIRTY_BITMAP_ID + i.
BASE_ALLOCATION_ID = 0
ALLOCATION_DEPTH_ID = 1
DIRTY_BITMAP_ID = 2
#: NBD_STATE_DIRTY of qemu:dirty-bitmap contexts.
STATE_DIRTY = 1


class MetaContext:
    """One metadata context, named ``namespace:leaf``."""

    name: str = ""
    id: int = 0

    async def extents(self, node: Node, offset: int, length: int,
                      max_extents: int) -> list[tuple[int, int]]:
        """(length, flags) runs from ``offset``: at least one, at most
        ``max_extents``; they may stop short of or run past ``length``."""
        raise NotImplementedError


class BaseAllocation(MetaContext):
    """``base:allocation``: HOLE for unallocated, ZERO for reads-as-zero."""

    name = "base:allocation"
    id = BASE_ALLOCATION_ID

    async def extents(self, node: Node, offset: int, length: int,
                      max_extents: int) -> list[tuple[int, int]]:
        out = await _status_runs(node, offset, length, max_extents, _allocation_flags)
        return out or [(length, 0)]     # "status unknown" is always a safe answer


class AllocationDepth(MetaContext):
    """``qemu:allocation-depth``: 0 where no layer of the backing chain has
    the data, 1 where the exported node has it, N in the (N-1)th backing."""

    name = "qemu:allocation-depth"
    id = ALLOCATION_DEPTH_ID

    async def extents(self, node: Node, offset: int, length: int,
                      max_extents: int) -> list[tuple[int, int]]:
        return await _status_runs(node, offset, length, max_extents, _depth)


def _allocation_flags(ext: Extent) -> int:
    return (0 if ext.data else STATE_HOLE) | (STATE_ZERO if ext.zero else 0)


def _depth(ext: Extent) -> int:
    return ext.depth


async def _status_runs(node: Node, offset: int, length: int, max_extents: int,
                       flags_of: Callable[[Extent], int]) -> list[tuple[int, int]]:
    """Runs of the node's block status over the range, merged as QEMU merges
    them: it keeps asking until the range is done or the array is full, so
    even one extent (REQ_ONE) covers every equal run that follows."""
    out: list[tuple[int, int]] = []
    pos, end = offset, offset + length
    while pos < end:
        progressed = False
        for ext in await node.block_status(pos, end - pos):
            if ext.offset != pos or ext.length <= 0:
                break
            n = min(ext.length, end - pos)
            if not _add(out, n, flags_of(ext), max_extents):
                return out
            pos += n
            progressed = True
            if pos >= end:
                break
        if not progressed:
            break
    return out


class DirtyBitmapContext(MetaContext):
    """``qemu:dirty-bitmap:NAME``: STATE_DIRTY over the chunks the bitmap has
    dirty, 0 elsewhere (the bitmap is busy while exported, so it stays)."""

    def __init__(self, bitmap: DirtyBitmap, index: int) -> None:
        self.bitmap = bitmap
        self.name = f"qemu:dirty-bitmap:{bitmap.name}"
        self.id = DIRTY_BITMAP_ID + index

    async def extents(self, node: Node, offset: int, length: int,
                      max_extents: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        pos = offset
        end = offset + length
        for start, run in self.bitmap.dirty_extents(offset, length):
            if not (_add(out, start - pos, 0, max_extents)
                    and _add(out, run, STATE_DIRTY, max_extents)):
                return out
            pos = start + run
        _add(out, end - pos, 0, max_extents)
        return out


def _filter_or_cow_child(node: Node) -> Node | None:
    """The node below whose data this node shows: a filter's child, else
    the backing file (QEMU's bdrv_filter_or_cow_bs; raw is no filter there)."""
    for edge in node.children.values():
        if node.is_filter and Role.FILTERED in edge.role:
            return edge.child
    for edge in node.children.values():
        if Role.COW in edge.role:
            return edge.child
    return None


def export_bitmaps(graph: Graph, node: Node, refs: list[Any],
                   writable: bool) -> list[DirtyBitmap]:
    """The bitmaps block-export-add's ``bitmaps`` names, resolved as QEMU 7.2
    does: a bare name on the exported node or down its filter/backing chain
    (an enabled one on a writable node cannot back a read-only export), a
    node/name pair anywhere; busy or inconsistent bitmaps are refused."""
    out: list[DirtyBitmap] = []
    for ref in refs:
        if isinstance(ref, str):
            owner: Node | None = node
            bitmap = None
            while owner is not None:
                bitmap = find_bitmap(owner, ref)
                if bitmap is not None:
                    break
                owner = _filter_or_cow_child(owner)
            if bitmap is None or owner is None:
                raise GenericError(f"Bitmap '{ref}' is not found")
            if not writable and not owner.read_only and bitmap.enabled:
                raise GenericError(f"Enabled bitmap '{ref}' incompatible with readonly export")
        else:
            _, bitmap = lookup_bitmap(graph, ref["node"], ref["name"])
        check_bitmap(bitmap, Check.ALLOW_RO)
        out.append(bitmap)
    return out


def _add(out: list[tuple[int, int]], length: int, flags: int, max_extents: int) -> bool:
    """Append a run as QEMU's extent array does: empty runs vanish, equal
    neighbours merge while the sum fits 32 bits; False once full."""
    if length <= 0:
        return True
    if out and out[-1][1] == flags and out[-1][0] + length <= 0xFFFFFFFF:
        out[-1] = (out[-1][0] + length, flags)
        return True
    if len(out) >= max_extents:
        return False
    out.append((length, flags))
    return True


def _append(out: list[tuple[int, int]], length: int, flags: int) -> None:
    if out and out[-1][1] == flags:
        out[-1] = (out[-1][0] + length, flags)
    else:
        out.append((length, flags))


def clamp_extents(extents: list[tuple[int, int]], length: int,
                  req_one: bool) -> list[tuple[int, int]]:
    """Merge equal neighbours, stop at the requested ``length`` (the spec lets
    the last run go past it, QSD trims it) and keep one run for REQ_ONE."""
    out: list[tuple[int, int]] = []
    total = 0
    for ext_len, flags in extents:
        ext_len = min(ext_len, length - total, 0xFFFFFFFF)
        if ext_len <= 0:
            break
        _append(out, ext_len, flags)
        total += ext_len
        if total >= length:
            break
    if req_one:
        out = out[:1]
    return out


BASE_ALLOCATION = BaseAllocation()
