# SPDX-License-Identifier: GPL-2.0-or-later
"""Consistency check and repair of qcow2 images (what ``qemu-img check`` does).

The check works on a plain file descriptor rather than on an open qcow2
node: an image worth checking may be one the driver refuses to open (the
corrupt bit, a dirty lazy-refcounts image that opening would repair behind
the caller's back), and the counts must describe the bytes on disk, not a
node's caches. The caller owns the descriptor (opened read-only for a check,
read-write for a repair) and must make sure nothing else writes the image
meanwhile (e.g. by holding the file locks). The blocking reads run in a
worker thread so that an event loop calling :func:`check_image` stays live.

The walk follows docs/interop/qcow2.txt: header cluster, the encryption
header, the active L1 table and its L2 tables, every internal snapshot's L1
table and L2 tables, the snapshot table, the bitmaps directory with its
bitmap tables, the refcount table and refcount blocks. Each reference adds
one to the count its host clusters should have; the counts are compared
with the stored refcounts: a stored count above the computed one is a leak,
below it a corruption. The result's fields and their counting rules follow
``qemu-img check --output=json`` of QEMU 7.2, so that both tools agree on
every image.
"""

from __future__ import annotations

import asyncio
import errno
import os
import struct
from array import array
from dataclasses import dataclass
from typing import Any

from qsd.block.formats.qcow2.cluster import (
    L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO)
from qsd.block.formats.qcow2.header import (
    INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, MAX_L1_BYTES, Header)
from qsd.block.formats.qcow2.refcount import REFT_OFFSET_MASK

#: Bits an L1 entry, and a standard L2 entry, must keep clear.
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
#: Allocation half of an extended L2 entry's subcluster bitmap.
SC_ALLOC_MASK = 0xFFFFFFFF
#: Reads ending beyond this fail in QEMU's block layer (its requests are int64).
MAX_IO_OFFSET = (1 << 63) - 1
#: QEMU's bound on the bitmaps directory.
MAX_BITMAP_DIRECTORY = 64 << 20
#: Bitmap table entries: host offset bits (qcow2.txt "Bitmap table").
BME_OFFSET_MASK = 0x00FFFFFFFFFFFE00
#: Snapshot table entries are at most this large (QEMU's limit, as the driver's).
MAX_SNAPSHOT_EXTRA = 1024


@dataclass
class CheckResult:
    """The counts of one check, named as ``qemu-img check --output=json``."""

    filename: str
    format: str = "qcow2"
    check_errors: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    leaks: int = 0
    corruptions: int = 0
    leaks_fixed: int = 0
    corruptions_fixed: int = 0

    def to_json(self) -> dict[str, Any]:
        """QEMU's ImageCheck: the optional members appear only when non-zero."""
        out: dict[str, Any] = {"filename": self.filename, "format": self.format,
                               "check-errors": self.check_errors}
        for name in ("image_end_offset", "total_clusters", "allocated_clusters",
                     "fragmented_clusters", "compressed_clusters", "leaks", "corruptions",
                     "leaks_fixed", "corruptions_fixed"):
            value = getattr(self, name)
            if value:
                out[name.replace("_", "-")] = value
        return out

    @property
    def clean(self) -> bool:
        return not (self.check_errors or self.leaks or self.corruptions)


async def check_image(fd: int, filename: str = "", repair: str | None = None) -> CheckResult:
    """Check the qcow2 image open on ``fd``; ``repair`` is None, ``"leaks"``
    (lower leaked refcounts) or ``"all"`` (also raise refcounts that are too
    low and fix OFLAG_COPIED). A repair that leaves no corruption also clears
    the lazy-refcounts dirty bit. Raises QMPError when the header is unusable
    (the image cannot be checked at all)."""
    if repair not in (None, "leaks", "all"):
        raise ValueError(f"unknown repair mode {repair!r}")
    res = await asyncio.to_thread(_Checker(fd, filename, repair).run)
    if res.leaks_fixed or res.corruptions_fixed:
        # Like qemu-img: report the state after the repair, plus what it fixed.
        after = await asyncio.to_thread(_Checker(fd, filename, None).run)
        after.leaks_fixed, after.corruptions_fixed = res.leaks_fixed, res.corruptions_fixed
        return after
    return res


class _Checker:
    """One check: computed counts in ``self.want``, indexed by host cluster."""

    def __init__(self, fd: int, filename: str, repair: str | None) -> None:
        self.fd = fd
        self.res = CheckResult(filename)
        self.fix_leaks = repair in ("leaks", "all")
        self.fix_errors = repair == "all"
        self.writes = 0

    # ----- file access ----------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        if offset >= self.file_size:
            return bytes(length)
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            data += bytes(length - len(data))  # past EOF reads as zeroes, as in QEMU
        return data

    def write(self, offset: int, data: bytes) -> None:
        os.pwrite(self.fd, data, offset)
        self.writes += 1

    # ----- the walk --------------------------------------------------------
    def run(self) -> CheckResult:
        self.file_size = os.fstat(self.fd).st_size
        first = self.read(0, min(self.file_size, 1 << 21))
        h = Header.parse(first, self.file_size)
        self.h = h
        self.cs = h.cluster_size
        self.cbits = h.cluster_bits
        self.rbits = h.refcount_bits
        self.rmax = (1 << self.rbits) - 1
        self.per_block = self.cs * 8 // self.rbits
        self.ext_l2 = h.extended_l2
        self.has_data_file = bool(h.incompatible & INCOMPAT_DATA_FILE)
        self.csize_shift = 62 - (self.cbits - 8)
        self.csize_mask = (1 << (self.cbits - 8)) - 1
        self.coffset_mask = (1 << self.csize_shift) - 1
        self.nb_clusters = -(-self.file_size // self.cs)
        self.want = array("Q", bytes(8 * self.nb_clusters))
        self.res.total_clusters = -(-h.size // self.cs)
        raw = self.read(h.refcount_table_offset, h.refcount_table_clusters * self.cs)
        self.reftable = list(struct.unpack(f">{len(raw) // 8}Q", raw))
        self._blocks: dict[int, bytearray] = {}
        self._dirty_blocks: set[int] = set()
        self._calculate()
        highest = self._compare()
        self._check_copied()
        for off in sorted(self._dirty_blocks):
            self.write(off, bytes(self._blocks[off]))
        self.res.image_end_offset = (highest + 1) * self.cs
        if self.writes:
            os.fsync(self.fd)
        if ((self.fix_leaks or self.fix_errors) and not self.res.corruptions
                and not self.res.check_errors and h.incompatible & INCOMPAT_DIRTY):
            h.incompatible &= ~INCOMPAT_DIRTY
            self.write(72, struct.pack(">Q", h.incompatible))
            os.fsync(self.fd)
        return self.res

    def inc(self, offset: int, size: int) -> None:
        """Count one reference to the clusters of [offset, offset+size)."""
        if size <= 0:
            return
        if offset + size - self.file_size >= self.cs:
            self.res.corruptions += 1  # QEMU refuses to count regions past EOF
            return
        first = offset >> self.cbits
        last = (offset + size - 1) >> self.cbits
        if last >= len(self.want):
            self.want.extend(array("Q", bytes(8 * (last + 1 - len(self.want)))))
            self.nb_clusters = len(self.want)
        for c in range(first, last + 1):
            if self.want[c] == self.rmax:
                self.res.corruptions += 1  # reference count overflow
                continue
            self.want[c] += 1

    def _calculate(self) -> None:
        h = self.h
        self.inc(0, self.cs)
        self._check_l1(h.l1_table_offset, h.l1_size, active=True)
        for l1_off, l1_size in self._snapshots():
            self._check_l1(l1_off, l1_size, active=False)
        if h.crypto_header is not None:
            self.inc(h.crypto_header[0], h.crypto_header[1])
        self._bitmaps()
        self.inc(h.refcount_table_offset, len(self.reftable) * 8)
        self._check_refblocks()

    def _snapshots(self) -> list[tuple[int, int]]:
        """(L1 offset, L1 size) of every internal snapshot; counts the table."""
        h = self.h
        if not h.nb_snapshots:
            return []
        out: list[tuple[int, int]] = []
        pos = h.snapshots_offset
        for _ in range(h.nb_snapshots):
            raw = self.read(pos, 40)
            l1_off, l1_size, id_len, name_len = struct.unpack_from(">QIHH", raw)
            extra = struct.unpack_from(">I", raw, 36)[0]
            if extra > MAX_SNAPSHOT_EXTRA:
                self.res.check_errors += 1
                return out
            if l1_size > MAX_L1_BYTES // 8:
                self.res.corruptions += 1  # QEMU skips such a snapshot as well
            else:
                out.append((l1_off, l1_size))
            pos += (40 + extra + id_len + name_len + 7) & ~7
        self.inc(h.snapshots_offset, pos - h.snapshots_offset)
        return out

    def _check_l1(self, offset: int, size: int, active: bool) -> None:
        self.inc(offset, size * 8)
        if not size:
            return
        raw = self.read(offset, size * 8)
        l1 = struct.unpack(f">{size}Q", raw)
        if active:
            self.active_l1 = list(l1)
        for e in l1:
            if not e:
                continue
            if e & L1E_RESERVED_MASK:
                self.res.corruptions += 1
            l2 = e & L1E_OFFSET_MASK
            self.inc(l2, self.cs)
            if l2 % self.cs:
                self.res.corruptions += 1
            self._check_l2(l2, active)

    def l2_pairs(self, raw: bytes) -> list[tuple[int, int]]:
        """(entry, subcluster bitmap) of every entry of an L2 table."""
        words = struct.unpack(f">{len(raw) // 8}Q", raw)
        if self.ext_l2:
            return list(zip(words[0::2], words[1::2]))
        return [(w, 0) for w in words]

    def _check_l2(self, l2_off: int, active: bool) -> None:
        next_contiguous = 0
        for entry, bitmap in self.l2_pairs(self.read(l2_off, self.cs)):
            if entry & OFLAG_COMPRESSED:
                if entry & OFLAG_COPIED or self.has_data_file:
                    self.res.corruptions += 1
                    if self.has_data_file:
                        continue
                if bitmap:
                    self.res.corruptions += 1
                nsect = (entry >> self.csize_shift & self.csize_mask) + 1
                coffset = entry & self.coffset_mask
                self.inc(coffset & ~511, nsect * 512)
                if active:
                    self.res.allocated_clusters += 1
                    self.res.compressed_clusters += 1
                    self.res.fragmented_clusters += 1
                continue
            if entry & L2E_STD_RESERVED_MASK:
                self.res.corruptions += 1
            host = entry & L2E_OFFSET_MASK
            if not self.ext_l2 and entry & OFLAG_ZERO and not host:
                continue
            if not host and not (self.has_data_file and entry & OFLAG_COPIED):
                if bitmap & SC_ALLOC_MASK:
                    self.res.corruptions += 1  # unallocated, yet subclusters allocated
                continue
            if bitmap >> 32 & bitmap & SC_ALLOC_MASK:
                self.res.corruptions += 1  # subclusters both allocated and zero
            if active:
                self.res.allocated_clusters += 1
                if next_contiguous and host != next_contiguous:
                    self.res.fragmented_clusters += 1
                next_contiguous = host + self.cs
            if not self.has_data_file:
                self.inc(host, self.cs)  # unaligned: both clusters it touches, as QEMU
            if host % self.cs:
                self.res.corruptions += 1

    def _bitmaps(self) -> None:
        """The bitmaps directory, each bitmap table and its data clusters."""
        ext = self.h.bitmaps_ext
        if ext is None or len(ext) < 24:
            return
        nb, _, dir_size, dir_off = struct.unpack_from(">IIQQ", ext)
        if dir_size > MAX_BITMAP_DIRECTORY:
            self.res.check_errors += 1
            return
        self.inc(dir_off, dir_size)
        raw = self.read(dir_off, dir_size)
        pos = 0
        for _ in range(nb):
            if pos + 24 > len(raw):
                self.res.check_errors += 1
                return
            t_off, t_size, _flags, _type, _gran, name_size, extra = struct.unpack_from(
                ">QIIBBHI", raw, pos)
            self.inc(t_off, t_size * 8)
            if t_size * 8 > self.file_size:
                self.res.check_errors += 1  # larger than the file: refuse to read it
                return
            for e in struct.unpack(f">{t_size}Q", self.read(t_off, t_size * 8)):
                if e & BME_OFFSET_MASK:
                    self.inc(e & BME_OFFSET_MASK, self.cs)
            pos += (24 + extra + name_size + 7) & ~7

    def _check_refblocks(self) -> None:
        for i, e in enumerate(self.reftable):
            off = e & REFT_OFFSET_MASK
            if e % self.cs:
                self.res.corruptions += 1
                continue
            if not off:
                continue
            if off >> self.cbits >= self.nb_clusters:
                self.res.corruptions += 1  # refcount block outside the image
                continue
            self.inc(off, self.cs)
            if self.want[off >> self.cbits] != 1:
                self.res.corruptions += 1
            self.reftable[i] = off

    # ----- stored refcounts ------------------------------------------------
    def _block(self, index: int) -> bytearray | None:
        """Refcount block ``index``; None when absent; OSError when its
        offset is unaligned (QEMU cannot read refcounts through it either)."""
        if index >= len(self.reftable):
            return None
        off = self.reftable[index] & REFT_OFFSET_MASK
        if not off:
            return None
        if off % self.cs:
            raise OSError(errno.EIO, f"refcount block {index} unaligned")
        if off + self.cs > MAX_IO_OFFSET:
            raise OSError(errno.EIO, f"refcount block {index} beyond any readable offset")
        block = self._blocks.get(off)
        if block is None:
            block = self._blocks[off] = bytearray(self.read(off, self.cs))
        return block

    def stored(self, cluster: int) -> int:
        """The refcount on disk (or as repaired so far); OSError if unreadable."""
        block = self._block(cluster // self.per_block)
        if block is None:
            return 0
        i = cluster % self.per_block
        if self.rbits >= 8:
            n = self.rbits >> 3
            return int.from_bytes(block[i * n:(i + 1) * n], "big")
        per = 8 // self.rbits
        return block[i // per] >> (i % per * self.rbits) & self.rmax

    def set_stored(self, cluster: int, value: int) -> bool:
        """Change a stored refcount (written at the end); False when its
        refcount block is missing, which this repair does not rebuild."""
        index = cluster // self.per_block
        try:
            block = self._block(index)
        except OSError:
            return False
        if block is None:
            return False
        i = cluster % self.per_block
        if self.rbits >= 8:
            n = self.rbits >> 3
            block[i * n:(i + 1) * n] = value.to_bytes(n, "big")
        else:
            per = 8 // self.rbits
            shift = i % per * self.rbits
            block[i // per] = block[i // per] & ~(self.rmax << shift) | value << shift
        self._dirty_blocks.add(self.reftable[index] & REFT_OFFSET_MASK)
        return True

    def _compare(self) -> int:
        """Stored against computed refcounts; the highest cluster in use."""
        highest = 0
        for c in range(self.nb_clusters):
            try:
                have = self.stored(c)
            except OSError:
                self.res.check_errors += 1
                continue
            want = self.want[c]
            if have or want:
                highest = c
            if have == want:
                continue
            if have > want and self.fix_leaks and self.set_stored(c, want):
                self.res.leaks_fixed += 1
            elif have < want and self.fix_errors and self.set_stored(c, want):
                self.res.corruptions_fixed += 1
            elif have > want:
                self.res.leaks += 1
            else:
                self.res.corruptions += 1
        return highest

    def _check_copied(self) -> None:
        """OFLAG_COPIED must be set exactly on active entries of refcount 1."""
        for i, e in enumerate(getattr(self, "active_l1", [])):
            l2 = e & L1E_OFFSET_MASK
            if not l2:
                continue
            try:
                rc = self.stored(l2 >> self.cbits)
            except OSError:
                continue  # counted as a check error already
            if (rc == 1) != bool(e & OFLAG_COPIED):
                if self.fix_errors:
                    e = e | OFLAG_COPIED if rc == 1 else e & ~OFLAG_COPIED
                    self.write(self.h.l1_table_offset + 8 * i, struct.pack(">Q", e))
                    self.res.corruptions_fixed += 1
                else:
                    self.res.corruptions += 1
            raw = bytearray(self.read(l2, self.cs))
            changed = False
            step = 16 if self.ext_l2 else 8
            for j, (entry, _) in enumerate(self.l2_pairs(bytes(raw))):
                host = entry & L2E_OFFSET_MASK
                if entry & OFLAG_COMPRESSED:
                    continue
                normal = bool(host) or (self.has_data_file and entry & OFLAG_COPIED
                                        and not (not self.ext_l2 and entry & OFLAG_ZERO))
                if not normal:
                    continue
                try:
                    rc = 1 if self.has_data_file else self.stored(host >> self.cbits)
                except OSError:
                    continue
                if (rc == 1) != bool(entry & OFLAG_COPIED):
                    if self.fix_errors:
                        entry = entry | OFLAG_COPIED if rc == 1 else entry & ~OFLAG_COPIED
                        struct.pack_into(">Q", raw, j * step, entry)
                        changed = True
                        self.res.corruptions_fixed += 1
                    else:
                        self.res.corruptions += 1
            if changed:
                self.write(l2, bytes(raw))
