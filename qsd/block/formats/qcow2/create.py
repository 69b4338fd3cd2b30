# SPDX-License-Identifier: GPL-2.0-or-later
"""blockdev-create for qcow2 (BlockdevCreateOptionsQcow2).

Like QEMU: the ``file`` node is emptied and given a minimal image (header,
one refcount table cluster, one refcount block); that image is then opened
as a qcow2 node which grows it to the requested size (allocating the L1
table through the normal allocator), preallocates, and last sets up
encryption (:mod:`.crypt`). The layout matches what ``qemu-img create``
writes.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from qsd.block.formats.qcow2.cluster import BITMAP_ALL_ALLOC, OFLAG_COPIED
from qsd.block.formats.qcow2.crypt import create_crypto
from qsd.block.formats.qcow2.header import (
    AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, COMPRESSION_ZSTD, INCOMPAT_COMPRESSION,
    INCOMPAT_DATA_FILE, INCOMPAT_EXTL2, MAX_L1_BYTES, V2_HEADER_LEN, V3_WRITE_LEN, Header)
from qsd.block.node import Node, Perm
from qsd.qmp.errors import GenericError

if TYPE_CHECKING:
    from qsd.block.formats.qcow2.driver import Qcow2Node
    from qsd.block.node import CreateContext

_V3_ONLY = "only supported with compatibility level 1.1 and above (use version=v3 or greater)"


def _validate(options: dict[str, Any]) -> None:
    """QEMU 7.2's checks and texts, in its order."""
    v3 = options.get("version", "v3") == "v3"
    cs = options.get("cluster-size", 65536)
    if cs < 512 or cs > 2 << 20 or cs & (cs - 1):
        raise GenericError("Cluster size must be a power of two between 512 and 2048k")
    ext_l2 = options.get("extended-l2", False)
    if ext_l2:
        if not v3:
            raise GenericError(f"Extended L2 entries are {_V3_ONLY}")
        if cs < 16384:
            raise GenericError("Extended L2 entries are only supported with cluster sizes "
                               "of at least 16384 bytes")
    if options["size"] % 512:
        raise GenericError("Image size must be a multiple of 512 bytes")
    if options.get("lazy-refcounts", False) and not v3:
        raise GenericError(f"Lazy refcounts {_V3_ONLY}")
    bits = options.get("refcount-bits", 16)
    if bits > 64 or bits < 1 or bits & (bits - 1):
        raise GenericError("Refcount width must be a power of two and may not exceed 64 bits")
    if not v3 and bits != 16:
        raise GenericError("Different refcount widths than 16 bits require compatibility "
                           "level 1.1 or above (use version=v3 or greater)")
    backing = options.get("backing-file")
    prealloc = options.get("preallocation", "off")
    if backing and prealloc != "off" and not ext_l2:
        raise GenericError("Backing file and preallocation can only be used at the same "
                           "time if extended_l2 is on")
    if options.get("backing-fmt") and not backing:
        raise GenericError("Backing format cannot be used without backing file")
    if options.get("data-file") is not None and not v3:
        raise GenericError(f"External data files are {_V3_ONLY}")
    if options.get("data-file-raw", False):
        if options.get("data-file") is None:
            raise GenericError("data-file-raw requires data-file")
        if backing:
            raise GenericError("Backing file and data-file-raw cannot be used at the same time")
    if options.get("compression-type", "zlib") != "zlib" and not v3:
        raise GenericError(f"Non-zlib compression type is {_V3_ONLY}")
    l2_bytes = cs * (cs // (16 if ext_l2 else 8))
    if -(-options["size"] // l2_bytes) * 8 > MAX_L1_BYTES:
        raise GenericError("The image size is too large for file format 'qcow2' (try using "
                           "a larger cluster size)")


def _initial_refblock(cs: int, bits: int, used: int) -> bytes:
    """A refcount block saying clusters 0..used-1 have refcount 1."""
    block = bytearray(cs)
    for i in range(used):
        if bits >= 8:
            n = bits >> 3
            block[(i + 1) * n - 1] = 1
        else:
            per = 8 // bits
            block[i // per] |= 1 << (i % per) * bits
    return bytes(block)


async def _resolve(ctx: "CreateContext", ref: Any) -> tuple[Node, bool]:
    """The node a BlockdevRef names; True when we opened it (and close it)."""
    if isinstance(ref, str):
        return ctx.graph.find(ref), False
    node = await ctx.graph.open_node(ref)
    node.monitor_owned = True  # kept while the create runs
    return node, True


async def create_image(ctx: "CreateContext", options: dict[str, Any]) -> None:
    from qsd.block.formats.qcow2.driver import Qcow2Node

    _validate(options)
    file, own_file = await _resolve(ctx, options["file"])
    data, own_data = (None, False)
    try:
        if options.get("data-file") is not None:
            data, own_data = await _resolve(ctx, options["data-file"])
        await _format(ctx, file, data, options)
        await _grow(ctx, Qcow2Node, file, data, options)
    finally:
        for node, own in ((data, own_data), (file, own_file)):
            if node is not None and own:
                node.monitor_owned = False
                if not node.parents:
                    await ctx.graph.close_node(node)


async def _format(ctx: "CreateContext", file: Node, data: Node | None,
                  options: dict[str, Any]) -> None:
    """Phase 1: an empty image of size 0 written through a temporary user."""
    cs = options.get("cluster-size", 65536)
    v3 = options.get("version", "v3") == "v3"
    bits = options.get("refcount-bits", 16)
    h = Header(version=3 if v3 else 2, cluster_bits=cs.bit_length() - 1, size=0,
               refcount_table_offset=cs, refcount_table_clusters=1,
               refcount_order=bits.bit_length() - 1,
               header_length=V3_WRITE_LEN if v3 else V2_HEADER_LEN)
    if options.get("extended-l2", False):
        h.incompatible |= INCOMPAT_EXTL2
    if options.get("compression-type", "zlib") == "zstd":
        h.incompatible |= INCOMPAT_COMPRESSION
        h.compression_type = COMPRESSION_ZSTD
    if options.get("lazy-refcounts", False):
        h.compatible |= COMPAT_LAZY_REFCOUNTS
    if data is not None:
        h.incompatible |= INCOMPAT_DATA_FILE
        h.data_file = data.filename
        if options.get("data-file-raw", False):
            h.autoclear |= AUTOCLEAR_DATA_FILE_RAW
    h.backing_file = options.get("backing-file")
    h.backing_fmt = options.get("backing-fmt")
    edge = await ctx.graph.attach_user(file, "an unnamed block device",
                                       Perm.WRITE | Perm.RESIZE, Perm.all())
    try:
        await file.truncate(0)
        reftable = struct.pack(">Q", 2 * cs).ljust(cs, b"\0")
        await file.write(0, h.pack().ljust(cs, b"\0") + reftable
                         + _initial_refblock(cs, bits, 3))
        await file.flush()
    finally:
        await ctx.graph.detach(edge)


async def _grow(ctx: "CreateContext", cls: type["Qcow2Node"], file: Node, data: Node | None,
                options: dict[str, Any]) -> None:
    """Phase 2: open the new image, resize it, preallocate."""
    size = options["size"]
    prealloc = options.get("preallocation", "off")
    open_opts: dict[str, Any] = {"driver": "qcow2", "file": file.node_name, "backing": None}
    if data is not None:
        open_opts["data-file"] = data.node_name
    node = cls(ctx.graph, ctx.graph.generate_name(), open_opts, generated_name=True)
    try:
        await node.open(open_opts)
        ctx.graph.check_own_perms(node)
        await node.truncate(size)
        if data is not None and (options.get("data-file-raw", False) or prealloc != "off"):
            await data.truncate(size, prealloc=prealloc if prealloc != "metadata" else "off")
        if prealloc != "off":
            await preallocate(node, prealloc, data is not None,
                              bool(options.get("backing-file")))
            await node.flush()
        if options.get("encrypt") is not None:
            # Last, as QEMU does: the LUKS header follows the L1 table and
            # any preallocated clusters.
            await create_crypto(node, options["encrypt"], ctx.objects)
            await node.flush()
    finally:
        await ctx.graph.close_node(node)


async def preallocate(node: "Qcow2Node", mode: str, data_file: bool, backing: bool,
                      start: int = 0) -> None:
    """Allocate every guest cluster from the one at ``start`` on (one batch
    per L2 table); ``falloc`` and ``full`` also reserve or write the host
    space. The caller flushes (create) or holds the node lock (resize)."""
    cs = node.cs
    clusters = -(-node.size // cs)
    bitmap = 0 if backing else BITMAP_ALL_ALLOC
    end = 0
    first = start // cs
    while first < clusters:
        n = min(node.l2_entries - first % node.l2_entries, clusters - first)
        if data_file:
            base = first * cs
        else:
            base = await node.refcounts.alloc(n)
            end = max(end, base + n * cs)
            if mode == "falloc":
                await node.file_node.write_zeroes(base, n * cs)
            elif mode == "full":
                zeroes = bytes(min(n * cs, 1 << 20))
                for off in range(base, base + n * cs, len(zeroes)):
                    await node.file_node.write(off, zeroes[:base + n * cs - off])
        for i in range(n):
            await node.set_entry((first + i) * cs, (base + i * cs) | OFLAG_COPIED, bitmap)
        first += n
    if end > node.file_node.size:
        await node.file_node.truncate(end)
