# SPDX-License-Identifier: GPL-2.0-or-later
"""Dirty bitmap commands: block-dirty-bitmap-* and x-debug-block-dirty-bitmap-sha256.

Every changing command is a transaction :class:`~qsd.qmp.actions.Action`, so
``transaction`` can run it and undo it; alone, the command is the same action
prepared and committed at once. Checks come in QSD 7.2's order with its texts.
The lookups and flag checks here are also what NBD exports use to resolve the
bitmaps they expose.
"""

from __future__ import annotations

import enum
import logging
from typing import TYPE_CHECKING, Any

from qsd.block.bitmap import MAX_GRANULARITY, MIN_GRANULARITY, DirtyBitmap
from qsd.qmp.actions import Action, action
from qsd.qmp.dispatch import command
from qsd.qmp.errors import GenericError, QMPError

if TYPE_CHECKING:
    from qsd.block.graph import Graph
    from qsd.block.node import Node
    from qsd.daemon import Daemon

log = logging.getLogger("qsd.bitmaps")

#: Longest bitmap name QEMU accepts (that qcow2 can store).
MAX_NAME = 1023


class Check(enum.Flag):
    """What a bitmap must not be for an operation (QEMU's BDRV_BITMAP_*)."""

    BUSY = enum.auto()
    RO = enum.auto()
    INCONSISTENT = enum.auto()
    DEFAULT = BUSY | RO | INCONSISTENT
    ALLOW_RO = BUSY | INCONSISTENT


def find_bitmap(node: "Node", name: str) -> DirtyBitmap | None:
    for bitmap in node.dirty_bitmaps:
        if bitmap.name == name:
            return bitmap
    return None


def lookup_bitmap(graph: "Graph", node_name: str, name: str) -> tuple["Node", DirtyBitmap]:
    """A bitmap by node and name, failing as QEMU's block_dirty_bitmap_lookup."""
    node = graph.lookup(node_name)
    if node is None:
        raise GenericError(f"Node '{node_name}' not found")
    bitmap = find_bitmap(node, name)
    if bitmap is None:
        raise GenericError(f"Dirty bitmap '{name}' not found")
    return node, bitmap


def check_bitmap(bitmap: DirtyBitmap, flags: Check) -> None:
    """Refuse a bitmap that is busy, read-only or inconsistent, per ``flags``."""
    if Check.BUSY in flags and bitmap.busy:
        raise GenericError(f"Bitmap '{bitmap.name}' is currently in use by another "
                           "operation and cannot be used")
    if Check.RO in flags and bitmap.readonly:
        raise GenericError(f"Bitmap '{bitmap.name}' is readonly and cannot be modified")
    if Check.INCONSISTENT in flags and bitmap.inconsistent:
        raise GenericError(f"Bitmap '{bitmap.name}' is inconsistent and cannot be used")


def default_granularity(node: "Node") -> int:
    """The node's cluster size clamped to 4 KiB..64 KiB, 64 KiB without one."""
    cluster = node.cluster_size()
    if not cluster:
        return 1 << 16
    return min(max(cluster, 4096), 1 << 16)


def dirty_bitmaps_info(node: "Node") -> list[dict[str, Any]]:
    """BlockDirtyInfo of every bitmap of the node, newest first as QEMU lists
    them (``node.dirty_bitmaps`` is in creation order)."""
    out = []
    for bitmap in reversed(node.dirty_bitmaps):
        info: dict[str, Any] = {}
        if bitmap.name is not None:
            info["name"] = bitmap.name
        info["count"] = bitmap.count()
        info["granularity"] = bitmap.granularity
        info["recording"] = bitmap.enabled
        info["busy"] = bitmap.busy
        info["persistent"] = bitmap.persistent
        if bitmap.inconsistent:
            info["inconsistent"] = True
        out.append(info)
    return out


def _restore(bitmap: DirtyBitmap, backup: DirtyBitmap) -> None:
    bitmap.clear()
    bitmap.merge_from(backup)


class BitmapAction(Action):
    """Common prologue: bitmap actions only run with completion-mode individual."""

    type_name = ""

    def check_completion_mode(self) -> None:
        mode = self.properties.get("completion-mode", "individual")
        if mode != "individual":
            raise GenericError(f"Action '{self.type_name}' does not support Transaction "
                               f"property completion-mode = {mode}")


@action("block-dirty-bitmap-add")
class BitmapAdd(BitmapAction):
    type_name = "block-dirty-bitmap-add"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.node: Node | None = None
        self.bitmap: DirtyBitmap | None = None

    async def prepare(self) -> None:
        self.check_completion_mode()
        args = self.args
        name = args["name"]
        if not name:
            raise GenericError("Bitmap name cannot be empty")
        node = self.daemon.graph.find(args["node"], None)
        if "granularity" in args:
            granularity = args["granularity"]
            if (granularity < MIN_GRANULARITY or granularity > MAX_GRANULARITY
                    or granularity & (granularity - 1)):
                raise GenericError("Granularity must be power of 2 and at least 512")
        else:
            granularity = default_granularity(node)
        persistent = args.get("persistent", False)
        if persistent:
            try:
                node.bitmap_check_persistent(name, granularity)
            except OSError as e:
                raise GenericError(f"Can't store persistent bitmaps to {node.node_name}: "
                                   f"{e.strerror}") from None
        if find_bitmap(node, name) is not None:
            raise GenericError(f"Bitmap already exists: {name}")
        if len(name.encode()) > MAX_NAME:
            raise GenericError(f"Bitmap name too long: {name}")
        bitmap = DirtyBitmap(name, node.size, granularity, persistent=persistent,
                             enabled=not args.get("disabled", False))
        node.dirty_bitmaps.append(bitmap)
        self.node, self.bitmap = node, bitmap

    async def abort(self) -> None:
        if self.node is None or self.bitmap is None:
            return
        if self.bitmap in self.node.dirty_bitmaps:
            self.node.dirty_bitmaps.remove(self.bitmap)
        if self.bitmap.persistent:
            # Nothing is stored yet; the driver treats a missing one as done.
            try:
                await self.node.bitmap_remove_persistent(self.bitmap.name or "")
            except (OSError, QMPError) as e:
                log.warning("could not drop persistent bitmap '%s': %s", self.bitmap.name, e)


@action("block-dirty-bitmap-remove")
class BitmapRemove(BitmapAction):
    """Prepare takes the bitmap out of use (busy) and drops its stored copy;
    commit releases it, abort gives it back (stored again on close)."""

    type_name = "block-dirty-bitmap-remove"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.node: Node | None = None
        self.bitmap: DirtyBitmap | None = None

    async def prepare(self) -> None:
        self.check_completion_mode()
        node, bitmap = lookup_bitmap(self.daemon.graph, self.args["node"], self.args["name"])
        check_bitmap(bitmap, Check.BUSY | Check.RO)
        if bitmap.persistent:
            await node.bitmap_remove_persistent(bitmap.name or "")
        bitmap.busy = True
        self.node, self.bitmap = node, bitmap

    async def commit(self) -> None:
        assert self.node is not None and self.bitmap is not None
        self.bitmap.busy = False
        if self.bitmap in self.node.dirty_bitmaps:
            self.node.dirty_bitmaps.remove(self.bitmap)

    async def abort(self) -> None:
        if self.bitmap is not None:
            self.bitmap.busy = False


class _BitsAction(BitmapAction):
    """Changes a bitmap's bits: :meth:`save` keeps a copy for abort."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.bitmap: DirtyBitmap | None = None
        self.backup: DirtyBitmap | None = None

    def save(self, bitmap: DirtyBitmap) -> None:
        self.bitmap, self.backup = bitmap, bitmap.copy()

    async def abort(self) -> None:
        if self.bitmap is not None and self.backup is not None:
            _restore(self.bitmap, self.backup)


@action("block-dirty-bitmap-clear")
class BitmapClear(_BitsAction):
    type_name = "block-dirty-bitmap-clear"

    async def prepare(self) -> None:
        self.check_completion_mode()
        _, bitmap = lookup_bitmap(self.daemon.graph, self.args["node"], self.args["name"])
        check_bitmap(bitmap, Check.DEFAULT)
        self.save(bitmap)
        bitmap.clear()


class _Recording(BitmapAction):
    """enable/disable: set ``enabled``, remember the old value for abort."""

    enable = True

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.bitmap: DirtyBitmap | None = None
        self.was_enabled = False

    async def prepare(self) -> None:
        self.check_completion_mode()
        _, bitmap = lookup_bitmap(self.daemon.graph, self.args["node"], self.args["name"])
        check_bitmap(bitmap, Check.ALLOW_RO)
        self.bitmap, self.was_enabled = bitmap, bitmap.enabled
        bitmap.enabled = self.enable

    async def abort(self) -> None:
        if self.bitmap is not None:
            self.bitmap.enabled = self.was_enabled


@action("block-dirty-bitmap-enable")
class BitmapEnable(_Recording):
    type_name = "block-dirty-bitmap-enable"
    enable = True


@action("block-dirty-bitmap-disable")
class BitmapDisable(_Recording):
    type_name = "block-dirty-bitmap-disable"
    enable = False


@action("block-dirty-bitmap-merge")
class BitmapMerge(_BitsAction):
    """Sources are merged into a scratch bitmap of the target's granularity
    first, so the target changes only once every source passed its checks.
    (An empty source list crashes QSD 7.2; here it merges nothing.)"""

    type_name = "block-dirty-bitmap-merge"

    async def prepare(self) -> None:
        self.check_completion_mode()
        graph = self.daemon.graph
        node, target = lookup_bitmap(graph, self.args["node"], self.args["target"])
        scratch = DirtyBitmap(None, node.size, target.granularity)
        for src_ref in self.args["bitmaps"]:
            if isinstance(src_ref, str):
                src = find_bitmap(node, src_ref)
                if src is None:
                    raise GenericError(f"Dirty bitmap '{src_ref}' not found")
            else:
                _, src = lookup_bitmap(graph, src_ref["node"], src_ref["name"])
            # QSD checks the target again with every source, before the source.
            check_bitmap(target, Check.DEFAULT)
            check_bitmap(src, Check.ALLOW_RO)
            if src.size != scratch.size:
                raise GenericError(
                    f"Bitmaps are of different sizes (destination size is {scratch.size}, "
                    f"source size is {src.size}) and can't be merged")
            scratch.merge_from(src)
        self.save(target)
        target.merge_from(scratch)


@command("x-debug-block-dirty-bitmap-sha256")
async def bitmap_sha256(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    _, bitmap = lookup_bitmap(daemon.graph, args["node"], args["name"])
    return {"sha256": bitmap.sha256()}
