# SPDX-License-Identifier: GPL-2.0-or-later
"""Persistent dirty bitmaps in qcow2's bitmaps extension (qcow2.txt "Bitmaps").

The header extension names a bitmap directory; each directory entry names a
bitmap table, whose entries point at clusters of bitmap data (the bit array
of :class:`qsd.block.bitmap.DirtyBitmap`, ``to_bytes`` layout). The
``bitmaps`` auto-clear bit says the extension is consistent: a program that
does not know bitmaps clears it, and such an extension is then ignored.

Lifecycle, as QEMU: on open every stored bitmap becomes a persistent
``DirtyBitmap`` of the node (IN_USE on disk: ``inconsistent``, its data not
loaded); a read-write open then marks the stored ones IN_USE in place. On
close every persistent, consistent bitmap is written to fresh clusters, a new
directory replaces the old one (IN_USE cleared), and the old clusters are
freed. Everything read from the image is bounds-checked before use.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qsd.block.bitmap import DirtyBitmap
from qsd.block.formats.qcow2.header import AUTOCLEAR_BITMAPS
from qsd.qmp.errors import GenericError

if TYPE_CHECKING:
    from qsd.block.formats.qcow2.driver import Qcow2Node

MAX_BITMAPS = 65535
MAX_DIRECTORY_SIZE = 1024 * MAX_BITMAPS
MAX_TABLE_SIZE = 0x8000000
MAX_PHYS_SIZE = 0x20000000
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
MAX_NAME_SIZE = 1023

FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
RESERVED_FLAGS = 0xFFFFFFFC
TYPE_DIRTY_TRACKING = 1

ENTRY_RESERVED_MASK = 0xFF000000000001FE
ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
ENTRY_ALL_ONES = 1

_EXT = struct.Struct(">IIQQ")
_DIRENT = struct.Struct(">QIIBBHI")


@dataclass
class StoredBitmap:
    """One bitmap directory entry as it is on disk."""

    name: str
    table_offset: int
    table_size: int
    flags: int
    granularity_bits: int

    def info(self) -> dict[str, object]:
        """Qcow2BitmapInfo of ``query-named-block-nodes``/``qemu-img info``."""
        flags = []
        if self.flags & FLAG_IN_USE:
            flags.append("in-use")
        if self.flags & FLAG_AUTO:
            flags.append("auto")
        return {"name": self.name, "granularity": 1 << self.granularity_bits, "flags": flags}


def entry_size(name_size: int, extra_size: int = 0) -> int:
    return (_DIRENT.size + name_size + extra_size + 7) & ~7


def bitmap_bytes(disk_size: int, granularity: int) -> int:
    return ((disk_size + granularity - 1) // granularity + 7) // 8


def parse_extension(data: bytes, cluster_size: int) -> tuple[int, int, int]:
    """(nb_bitmaps, directory_size, directory_offset) of the header
    extension, checked as QEMU checks it on open."""
    if len(data) != _EXT.size:
        raise GenericError("bitmaps_ext: Invalid extension length")
    nb, reserved, dir_size, dir_off = _EXT.unpack(data)
    if reserved:
        raise GenericError("bitmaps_ext: Reserved field is not zero")
    if nb > MAX_BITMAPS:
        raise GenericError(f"bitmaps_ext: Image has {nb} bitmaps, exceeding the QEMU "
                           f"supported maximum of {MAX_BITMAPS}")
    if nb == 0:
        raise GenericError("found bitmaps extension with zero bitmaps")
    if dir_off % cluster_size:
        raise GenericError("bitmaps_ext: invalid bitmap directory offset")
    if dir_size > MAX_DIRECTORY_SIZE:
        raise GenericError(f"bitmaps_ext: bitmap directory size ({dir_size}) exceeds the "
                           f"maximum supported size ({MAX_DIRECTORY_SIZE})")
    return nb, dir_size, dir_off


def pack_extension(nb: int, dir_size: int, dir_off: int) -> bytes:
    return _EXT.pack(nb, 0, dir_size, dir_off)


def _entry_ok(table_offset: int, table_size: int, flags: int, btype: int, gran_bits: int,
              name_size: int, cluster_size: int, disk_size: int) -> bool:
    if (table_size == 0 or table_offset == 0 or table_offset % cluster_size
            or table_size > MAX_TABLE_SIZE or not
            MIN_GRANULARITY_BITS <= gran_bits <= MAX_GRANULARITY_BITS
            or flags & RESERVED_FLAGS or name_size > MAX_NAME_SIZE
            or btype != TYPE_DIRTY_TRACKING):
        return False
    phys = table_size * cluster_size
    if phys > MAX_PHYS_SIZE:
        return False
    return bool(flags & FLAG_IN_USE) or disk_size <= (phys * 8) << gran_bits


def parse_directory(raw: bytes, nb: int, cluster_size: int,
                    disk_size: int) -> list[StoredBitmap]:
    """The entries of a bitmap directory, with QEMU's error texts."""
    if not raw:
        raise GenericError("Requested bitmap directory size is zero")
    out: list[StoredBitmap] = []
    pos = 0
    while pos < len(raw):
        if pos + _DIRENT.size > len(raw):
            raise GenericError("Broken bitmap directory")
        if len(out) + 1 > nb:
            raise GenericError("More bitmaps found than specified in header extension")
        t_off, t_size, flags, btype, gbits, name_size, extra = _DIRENT.unpack_from(raw, pos)
        size = entry_size(name_size, extra)
        if pos + size > len(raw):
            raise GenericError("Broken bitmap directory")
        if extra:
            raise GenericError("Bitmap extra data is not supported")
        name_raw = raw[pos + _DIRENT.size:pos + _DIRENT.size + name_size]
        name = name_raw.decode("utf-8", "replace")
        if not _entry_ok(t_off, t_size, flags, btype, gbits, name_size, cluster_size,
                         disk_size):
            raise GenericError(f"Bitmap '{name}' doesn't satisfy the constraints")
        out.append(StoredBitmap(name, t_off, t_size, flags, gbits))
        pos += size
    if len(out) != nb:
        raise GenericError("Less bitmaps found than specified in header extension")
    return out


def pack_directory(entries: list[StoredBitmap]) -> bytes:
    out = bytearray()
    for e in entries:
        name = e.name.encode()
        rec = _DIRENT.pack(e.table_offset, e.table_size, e.flags, TYPE_DIRTY_TRACKING,
                           e.granularity_bits, len(name), 0) + name
        out += rec.ljust(entry_size(len(name)), b"\0")
    return bytes(out)


def check_table_entry(entry: int, cluster_size: int) -> bool:
    if entry & ENTRY_RESERVED_MASK:
        return False
    off = entry & ENTRY_OFFSET_MASK
    return not off or (not entry & ENTRY_ALL_ONES and off % cluster_size == 0)


def table_clusters(disk_size: int, granularity: int, cluster_size: int) -> int:
    """Entries of the bitmap table a bitmap of this size needs."""
    return -(-bitmap_bytes(disk_size, granularity) // cluster_size)


def check_constraints(img: "Qcow2Node", name: str, granularity: int) -> str | None:
    """QEMU's reason why a bitmap cannot be stored in this image, or None."""
    bits = granularity.bit_length() - 1
    if bits > MAX_GRANULARITY_BITS:
        return f"Granularity exceeds maximum ({1 << MAX_GRANULARITY_BITS} bytes)"
    if bits < MIN_GRANULARITY_BITS:
        return f"Granularity is under minimum ({1 << MIN_GRANULARITY_BITS} bytes)"
    need = bitmap_bytes(img.size, granularity)
    if need > MAX_PHYS_SIZE or need > MAX_TABLE_SIZE * img.cs:
        return "Too much space will be occupied by the bitmap. Use larger granularity"
    if len(name.encode()) > MAX_NAME_SIZE:
        return f"Name length exceeds maximum ({MAX_NAME_SIZE} characters)"
    return None


class BitmapStore:
    """The bitmaps extension of one open image."""

    def __init__(self, img: "Qcow2Node") -> None:
        self.img = img
        #: The directory as it is on disk now.
        self.stored: list[StoredBitmap] = []
        self.dir_offset = 0
        self.dir_size = 0

    # ----- open ----------------------------------------------------------
    async def load(self) -> None:
        """Read the extension and turn every stored bitmap into a
        ``DirtyBitmap`` of the node; mark them IN_USE on a writable open."""
        img = self.img
        h = img.header
        if h.bitmaps_ext is None:
            return
        if not h.autoclear & AUTOCLEAR_BITMAPS:
            if h.version < 3:
                why = ("This qcow2 v2 image contains bitmaps, but they may have been modified "
                       "by a program without persistent bitmap support; so now they must all "
                       "be considered inconsistent")
            else:
                why = ("a program lacking bitmap support modified this file, so all bitmaps "
                       "are now considered inconsistent")
            os.write(2, f"qemu-storage-daemon: warning: {why}\nSome clusters may be leaked, "
                        "run 'qemu-img check -r' on the image file to fix.".encode())
            h.bitmaps_ext = None  # dropped from the header on the next rewrite
            return
        nb, self.dir_size, self.dir_offset = parse_extension(h.bitmaps_ext, img.cs)
        self.stored = await self._read_directory()
        img.add_metadata(self.dir_offset, self.dir_size, "bitmap directory")
        for sb in self.stored:
            if bitmap_bytes(img.size, 1 << sb.granularity_bits) > MAX_PHYS_SIZE:
                # Bounded for bitmaps whose table is not checked (IN_USE) too.
                raise GenericError(f"Bitmap '{sb.name}' doesn't satisfy the constraints")
            bm = DirtyBitmap(sb.name, img.size, 1 << sb.granularity_bits, persistent=True,
                             enabled=bool(sb.flags & FLAG_AUTO))
            if sb.flags & FLAG_IN_USE:
                bm.inconsistent = True
            else:
                await self._load_data(sb, bm)
            bm.readonly = img.read_only
            img.dirty_bitmaps.append(bm)
        if not img.read_only and any(not sb.flags & FLAG_IN_USE for sb in self.stored):
            for sb in self.stored:
                sb.flags |= FLAG_IN_USE
            await self._rewrite_directory_in_place()

    async def _read_directory(self) -> list[StoredBitmap]:
        img = self.img
        nb = struct.unpack_from(">I", img.header.bitmaps_ext or bytes(4))[0]
        if self.dir_offset + self.dir_size > img.file_end():
            raise GenericError("Failed to read bitmap directory: Input/output error")
        raw = bytes(await img.read_file(self.dir_offset, self.dir_size))
        return parse_directory(raw, nb, img.cs, img.size)

    async def _read_table(self, sb: StoredBitmap) -> list[int]:
        img = self.img
        length = sb.table_size * 8
        if sb.table_offset + length > img.file_end():
            raise OSError(errno.EIO, "Input/output error")
        raw = await img.read_file(sb.table_offset, length)
        table = list(struct.unpack(f">{sb.table_size}Q", raw))
        if not all(check_table_entry(e, img.cs) for e in table):
            raise OSError(errno.EINVAL, "Invalid argument")
        return table

    async def _load_data(self, sb: StoredBitmap, bm: DirtyBitmap) -> None:
        img = self.img
        try:
            table = await self._read_table(sb)
        except OSError as e:
            raise GenericError(f"Could not read bitmap_table table from image for bitmap "
                               f"'{sb.name}': {e.strerror}") from None
        if sb.table_size != table_clusters(img.size, bm.granularity, img.cs):
            raise GenericError(f"Could not read bitmap '{sb.name}' from image: "
                               "Invalid argument")
        data = bytearray(bitmap_bytes(img.size, bm.granularity))
        for i, entry in enumerate(table):
            off = entry & ENTRY_OFFSET_MASK
            start = i * img.cs
            n = min(img.cs, len(data) - start)
            if off:
                if off + img.cs > img.file_end():
                    raise GenericError(f"Could not read bitmap '{sb.name}' from image: "
                                       "Input/output error")
                data[start:start + n] = (await img.read_file(off, img.cs))[:n]
            elif entry & ENTRY_ALL_ONES:
                data[start:start + n] = b"\xff" * n
        bm.from_bytes(bytes(data))

    def references(self) -> list[tuple[int, int]]:
        """(offset, length) of every host area the stored bitmaps use, for
        the refcount repair (the tables are read on demand)."""
        if not self.stored:
            return []
        return [(self.dir_offset, self.dir_size)]

    async def table_references(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for sb in self.stored:
            out.append((sb.table_offset, sb.table_size * 8))
            try:
                table = await self._read_table(sb)
            except OSError:
                continue
            out.extend((e & ENTRY_OFFSET_MASK, self.img.cs) for e in table
                       if e & ENTRY_OFFSET_MASK)
        return out

    # ----- writing ---------------------------------------------------------
    async def _sync_header(self) -> None:
        await self.img.write_header()
        await self.img.file_node.flush()

    async def _rewrite_directory_in_place(self) -> None:
        """Flag changes: the directory keeps its size, so it is rewritten
        where it is, with the auto-clear bit off meanwhile."""
        img = self.img
        h = img.header
        h.autoclear &= ~AUTOCLEAR_BITMAPS
        await self._sync_header()
        raw = pack_directory(self.stored)
        await img.file_node.write(self.dir_offset, raw)
        h.autoclear |= AUTOCLEAR_BITMAPS
        await self._sync_header()

    async def _free_table(self, sb: StoredBitmap) -> None:
        img = self.img
        try:
            table = await self._read_table(sb)
        except OSError:
            table = []  # unreadable: its clusters leak, as QEMU leaves them
        for e in table:
            if e & ENTRY_OFFSET_MASK:
                img.remove_metadata(e & ENTRY_OFFSET_MASK, img.cs)
                img.refcounts.free(e & ENTRY_OFFSET_MASK, 1)
        n = -(-sb.table_size * 8 // img.cs)
        img.remove_metadata(sb.table_offset, n * img.cs)
        img.refcounts.free(sb.table_offset, n)

    async def _write_bitmap(self, bm: DirtyBitmap) -> StoredBitmap:
        img = self.img
        cs = img.cs
        data = bm.to_bytes()
        n = table_clusters(bm.size, bm.granularity, cs)
        if n > MAX_TABLE_SIZE or n * cs > MAX_PHYS_SIZE:
            raise GenericError(f"Bitmap '{bm.name}' is too big")
        table = [0] * n
        zero = bytes(cs)
        for i in range(n):
            chunk = data[i * cs:(i + 1) * cs]
            if chunk == zero[:len(chunk)]:
                continue
            off = await img.refcounts.alloc(1)
            img.add_metadata(off, cs, "bitmap data")
            await img.write_meta(off, chunk.ljust(cs, b"\0"), "bitmap data")
            table[i] = off
        t_clusters = -(-n * 8 // cs)
        t_off = await img.refcounts.alloc(t_clusters)
        img.add_metadata(t_off, t_clusters * cs, "bitmap table")
        await img.write_meta(t_off, struct.pack(f">{n}Q", *table), "bitmap table")
        flags = FLAG_AUTO if bm.enabled else 0
        return StoredBitmap(bm.name or "", t_off, n, flags, bm.granularity.bit_length() - 1)

    async def _replace_directory(self, entries: list[StoredBitmap]) -> None:
        """Write ``entries`` as a new directory (none: drop the extension),
        point the header at it, then free the old directory."""
        img = self.img
        h = img.header
        old_off, old_size = self.dir_offset, self.dir_size
        if entries:
            raw = pack_directory(entries)
            if len(entries) > MAX_BITMAPS or len(raw) > MAX_DIRECTORY_SIZE:
                raise GenericError("Bitmap directory is too large")
            clusters = -(-len(raw) // img.cs)
            off = await img.refcounts.alloc(clusters)
            img.add_metadata(off, clusters * img.cs, "bitmap directory")
            await img.write_meta(off, raw, "bitmap directory")
            await img.write_back_metadata()
            await img.file_node.flush()
            h.autoclear |= AUTOCLEAR_BITMAPS
            h.bitmaps_ext = pack_extension(len(entries), len(raw), off)
            self.dir_offset, self.dir_size = off, len(raw)
        else:
            h.autoclear &= ~AUTOCLEAR_BITMAPS
            h.bitmaps_ext = None
            self.dir_offset = self.dir_size = 0
        await self._sync_header()
        self.stored = entries
        if old_size:
            n = -(-old_size // img.cs)
            img.remove_metadata(old_off, n * img.cs)
            img.refcounts.free(old_off, n)

    async def store_all(self) -> None:
        """Close: every persistent, consistent, writable bitmap to disk."""
        img = self.img
        todo = [bm for bm in img.dirty_bitmaps
                if bm.persistent and not bm.inconsistent and not bm.readonly and bm.name]
        if not todo:
            return
        for bm in todo:
            reason = check_constraints(img, bm.name or "", bm.granularity)
            if reason is not None:
                raise GenericError(f"Bitmap '{bm.name}' doesn't satisfy the constraints: "
                                   f"{reason}")
        entries = list(self.stored)
        drop: list[StoredBitmap] = []
        for bm in todo:
            new = await self._write_bitmap(bm)
            for i, sb in enumerate(entries):
                if sb.name == bm.name:
                    drop.append(sb)
                    entries[i] = new
                    break
            else:
                entries.append(new)
        await self._replace_directory(entries)
        for sb in drop:
            await self._free_table(sb)

    async def remove(self, name: str) -> None:
        """Drop the stored bitmap ``name`` (absent: nothing to do)."""
        for sb in self.stored:
            if sb.name == name:
                break
        else:
            return
        entries = [e for e in self.stored if e is not sb]
        await self._replace_directory(entries)
        await self._free_table(sb)
        await self.img.refcounts.apply_frees()
