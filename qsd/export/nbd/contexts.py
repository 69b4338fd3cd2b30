# SPDX-License-Identifier: GPL-2.0-or-later
"""Metadata contexts an NBD export answers NBD_CMD_BLOCK_STATUS for.

Every export offers ``base:allocation``; an export configuration adds more
(``qemu:dirty-bitmap:NAME``, ``qemu:allocation-depth``) as further
:class:`MetaContext` objects. The handshake only looks at ``name`` (list and
set queries are matched against it), the transmission phase calls
:meth:`MetaContext.extents`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qsd.export.nbd.protocol import STATE_HOLE, STATE_ZERO

if TYPE_CHECKING:
    from qsd.block.node import Node

#: Most descriptors one BLOCK_STATUS chunk carries (the spec asks for <= 2^20).
MAX_EXTENTS = 1 << 16


class MetaContext:
    """One metadata context, named ``namespace:leaf``."""

    name: str = ""

    async def extents(self, node: Node, offset: int, length: int,
                      max_extents: int) -> list[tuple[int, int]]:
        """(length, flags) runs from ``offset``: at least one, at most
        ``max_extents``; they may stop short of or run past ``length``."""
        raise NotImplementedError


class BaseAllocation(MetaContext):
    """``base:allocation``: HOLE for unallocated, ZERO for reads-as-zero."""

    name = "base:allocation"

    async def extents(self, node: Node, offset: int, length: int,
                      max_extents: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        pos, end = offset, offset + length
        while pos < end and len(out) < max_extents:
            progressed = False
            for ext in await node.block_status(pos, end - pos):
                if ext.offset != pos or ext.length <= 0:
                    break
                flags = (0 if ext.data else STATE_HOLE) | (STATE_ZERO if ext.zero else 0)
                _append(out, ext.length, flags)
                pos += ext.length
                progressed = True
                if pos >= end or len(out) >= max_extents:
                    break
            if not progressed:
                break
        if not out:
            out.append((length, 0))     # "status unknown" is always a safe answer
        return out


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
