# SPDX-License-Identifier: GPL-2.0-or-later
"""qcow2 internal snapshots (docs/interop/qcow2.txt, "Snapshots").

A snapshot is a copy of the active L1 table plus one more reference on
every cluster reachable from it (L2 tables and data clusters, counted once
per L1 table that reaches them, as ``qemu-img check`` counts). Entries whose
cluster is then shared lose QCOW_OFLAG_COPIED, which is what makes the
driver copy them before a write (:meth:`Qcow2Node._in_place`,
:meth:`ClusterMap.l2_for_write`).

Ordering for crash safety: references are added (and on disk) before the
snapshot table names the new L1 copy; on delete the table drops the entry
first and references are removed afterwards, so a crash only leaks.
"""

from __future__ import annotations

import errno
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qsd.block.formats.qcow2.cluster import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
)
from qsd.block.formats.qcow2.header import MAX_L1_BYTES, MAX_SNAPSHOTS
from qsd.qmp.errors import GenericError

if TYPE_CHECKING:
    from qsd.block.formats.qcow2.driver import Qcow2Node

_ENTRY = struct.Struct(">QIHHIIQII")
#: What QEMU writes as extra data: vm_state_size_large, disk_size, icount.
_EXTRA = struct.Struct(">QQQ")
#: QEMU refuses extra data larger than this per entry.
MAX_EXTRA = 1024
NO_ICOUNT = (1 << 64) - 1


@dataclass
class Snapshot:
    """One snapshot table entry; ``extra`` keeps unknown extra data."""

    l1_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None = None
    icount: int = NO_ICOUNT
    extra: bytes = b""

    def info(self) -> dict[str, Any]:
        """SnapshotInfo as QEMU reports it."""
        out: dict[str, Any] = {
            "id": self.id, "name": self.name, "vm-state-size": self.vm_state_size,
            "date-sec": self.date_sec, "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000}
        if self.icount != NO_ICOUNT:
            out["icount"] = self.icount
        return out

    def pack(self) -> bytes:
        """The entry, extra data in QEMU's layout first, padded to 8 bytes."""
        ident, name = self.id.encode(), self.name.encode()
        disk = self.disk_size if self.disk_size is not None else 0
        extra = _EXTRA.pack(self.vm_state_size, disk, self.icount) + self.extra
        raw = _ENTRY.pack(self.l1_offset, self.l1_size, len(ident), len(name), self.date_sec,
                          self.date_nsec, self.vm_clock_nsec,
                          min(self.vm_state_size, 0xFFFFFFFF), len(extra))
        raw += extra + ident + name
        return raw + bytes(-len(raw) % 8)


def parse_table(buf: bytes | bytearray, count: int) -> tuple[list[Snapshot], int]:
    """Decode ``count`` entries; returns them and the table's byte length."""
    snaps: list[Snapshot] = []
    pos = 0
    for _ in range(count):
        if pos + _ENTRY.size > len(buf):
            raise GenericError("Snapshot table offset invalid")
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, vmclock, vmstate,
         extra_len) = _ENTRY.unpack_from(buf, pos)
        if extra_len > MAX_EXTRA:
            raise GenericError("Snapshot table entry too large")
        pos += _ENTRY.size
        end = pos + extra_len + id_len + name_len
        if end > len(buf):
            raise GenericError("Snapshot table offset invalid")
        extra = bytes(buf[pos:pos + extra_len])
        sn = Snapshot(l1_off, l1_size, "", "", dsec, dnsec, vmclock, vmstate)
        if extra_len >= 8:
            sn.vm_state_size = struct.unpack_from(">Q", extra)[0]
        if extra_len >= 16:
            sn.disk_size = struct.unpack_from(">Q", extra, 8)[0]
        if extra_len >= 24:
            sn.icount = struct.unpack_from(">Q", extra, 16)[0]
        sn.extra = extra[_EXTRA.size:]
        pos += extra_len
        sn.id = bytes(buf[pos:pos + id_len]).decode("utf-8", "replace")
        pos += id_len
        sn.name = bytes(buf[pos:pos + name_len]).decode("utf-8", "replace")
        pos = (end + 7) & ~7
        snaps.append(sn)
    return snaps, pos


async def load(img: Qcow2Node) -> list[Snapshot]:
    """The image's snapshot table, ``snapshot_table_len`` bytes as measured
    when the image opened; QEMU lists none for an image with a data file."""
    h = img.header
    if not h.nb_snapshots or img.has_data_file:
        return []
    buf = await img.read_file(h.snapshots_offset, img.snapshot_table_len)
    return parse_table(buf, h.nb_snapshots)[0]


def find(snaps: list[Snapshot], ident: str | None, name: str | None) -> Snapshot | None:
    """The snapshot matching both given keys (QEMU's find_by_id_and_name)."""
    for sn in snaps:
        if (ident is None or sn.id == ident) and (name is None or sn.name == name):
            return sn
    return None


def _new_id(snaps: list[Snapshot]) -> str:
    """One more than the largest numeric id (non-numeric ids count as 0)."""
    top = 0
    for sn in snaps:
        digits = ""
        for ch in sn.id.lstrip():
            if not ch.isdigit():
                break
            digits += ch
        top = max(top, int(digits) if digits else 0)
    return str(top + 1)


class _Refs:
    """Host clusters an L1 table reaches: L2 tables and data, per L1 walk."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}

    def add(self, offset: int, length: int, cbits: int) -> None:
        for c in range(offset >> cbits, ((offset + length - 1) >> cbits) + 1):
            self.counts[c] = self.counts.get(c, 0) + 1


async def _reachable(img: Qcow2Node, l1: list[int]) -> _Refs:
    refs = _Refs()
    cbits = img.cbits
    for l1e in l1:
        l2 = l1e & L1E_OFFSET_MASK
        if not l2:
            continue
        refs.add(l2, img.cs, cbits)
        table = await img.l2_cache.get(l2)
        for i in range(img.l2_entries):
            entry, _ = img.entry_pair(table, i)
            if entry & OFLAG_COMPRESSED:
                host = entry & img.compressed_mask
                nsect = (entry >> img.csectors_shift & img.csectors_mask) + 1
                refs.add(host & ~511, nsect * 512, cbits)
            elif entry & L2E_OFFSET_MASK and not img.has_data_file:
                refs.add(entry & L2E_OFFSET_MASK, img.cs, cbits)
    return refs


async def _fix_copied(img: Qcow2Node) -> None:
    """Set QCOW_OFLAG_COPIED exactly where the active tables' clusters have
    refcount 1 (QEMU's update with addend 0), then write the active L1."""
    rc = img.refcounts
    for i, l1e in enumerate(img.l1):
        l2 = l1e & L1E_OFFSET_MASK
        if not l2:
            continue
        table = await img.l2_cache.get(l2)
        step = 2 if img.ext_l2 else 1
        changed = False
        for j in range(img.l2_entries):
            entry = table[j * step]
            host = entry & L2E_OFFSET_MASK
            if entry & OFLAG_COMPRESSED or not host or img.has_data_file:
                continue
            want = OFLAG_COPIED if await rc.get(host >> img.cbits) == 1 else 0
            if entry & OFLAG_COPIED != want:
                table[j * step] = entry & ~OFLAG_COPIED | want
                changed = True
        if changed:
            img.l2_cache.mark_dirty(l2)
        want = OFLAG_COPIED if await rc.get(l2 >> img.cbits) == 1 else 0
        img.l1[i] = l1e & ~OFLAG_COPIED | want
    await img.write_back_metadata()
    h = img.header
    if h.l1_size:
        await img.write_meta(h.l1_table_offset, struct.pack(f">{h.l1_size}Q", *img.l1),
                             "active L1 table")


async def _write_table(img: Qcow2Node, snaps: list[Snapshot]) -> tuple[int, int] | None:
    """Write the table to new clusters, point the header at it, free the old
    (returned as a run of clusters to discard)."""
    h = img.header
    cs = img.cs
    raw = b"".join(sn.pack() for sn in snaps)
    old_off, old_len = h.snapshots_offset, img.snapshot_table_len
    new_off = 0
    if raw:
        clusters = -(-len(raw) // cs)
        new_off = await img.refcounts.alloc(clusters)
        await img.refcounts.cache.flush()
        img.add_metadata(new_off, len(raw), "snapshot table")
        await img.write_meta(new_off, raw, "snapshot table")
    await img.file_node.flush()
    h.nb_snapshots, h.snapshots_offset = len(snaps), new_off
    await img.write_header()
    await img.file_node.flush()
    img.snapshot_table_len = len(raw)
    if old_len:
        img.remove_metadata(old_off, old_len)
        await img.refcounts.update(old_off, -(-old_len // cs), -1)
        return old_off, -(-old_len // cs)
    return None


async def create(img: Qcow2Node, name: str) -> Snapshot:
    """Snapshot the active state under ``name``, the driver's write lock held
    (errors are OSErrors whose strerror QEMU appends to its message)."""
    snaps = img.snapshot_list
    if len(snaps) >= MAX_SNAPSHOTS:
        raise OSError(errno.EFBIG, "File too large")
    if img.has_data_file:
        raise OSError(errno.ENOTSUP, "Operation not supported")
    await img.refcounts.apply_frees()
    await img.write_back_metadata()
    rc = img.refcounts
    refs = await _reachable(img, img.l1)
    for c, n in refs.counts.items():
        if await rc.get(c) + n > rc.max_value:
            raise OSError(errno.EINVAL, "Invalid argument")  # QEMU: refcount overflow
    h = img.header
    l1_copy = [e & ~OFLAG_COPIED for e in img.l1]
    l1_off = 0
    if h.l1_size:
        l1_off = await rc.alloc(-(-h.l1_size * 8 // img.cs))
        await rc.cache.flush()
        img.add_metadata(l1_off, h.l1_size * 8, "inactive L1 table")
        await img.write_meta(l1_off, struct.pack(f">{h.l1_size}Q", *l1_copy),
                             "inactive L1 table")
    for c, n in sorted(refs.counts.items()):
        await rc.update(c << img.cbits, 1, n)
    await rc.cache.flush()
    await img.file_node.flush()
    await _fix_copied(img)
    rt = time.time_ns() // 1000
    sn = Snapshot(l1_off, h.l1_size, _new_id(snaps), name, rt // 1_000_000,
                  rt % 1_000_000 * 1000, rt * 1000, 0, img.size)
    old_table = await _write_table(img, snaps + [sn])
    img.snapshot_list = snaps + [sn]
    img.snapshot_l1s.append((l1_off, h.l1_size))
    await rc.cache.flush()
    await img.file_node.flush()
    await img.discard_host([old_table] if old_table else [], "pass-discard-snapshot")
    return sn


async def delete(img: Qcow2Node, ident: str | None, name: str | None) -> Snapshot:
    """Remove the snapshot matching ``ident``/``name`` and drop its
    references, the driver's write lock held."""
    snaps = img.snapshot_list
    sn = find(snaps, ident, name)
    if sn is None:
        raise OSError(errno.ENOENT, "Can't find the snapshot")
    if sn.l1_size > MAX_L1_BYTES // 8 or (sn.l1_size and sn.l1_offset % img.cs):
        raise GenericError("Snapshot L1 table offset invalid")
    await img.refcounts.apply_frees()
    await img.write_back_metadata()
    raw = await img.read_file(sn.l1_offset, sn.l1_size * 8) if sn.l1_size else b""
    l1 = list(struct.unpack(f">{sn.l1_size}Q", raw))
    refs = await _reachable(img, l1)
    rest = [s for s in snaps if s is not sn]
    old_table = await _write_table(img, rest)
    freed = [old_table] if old_table else []
    img.snapshot_list = rest
    img.snapshot_l1s.remove((sn.l1_offset, sn.l1_size))
    rc = img.refcounts
    for c, n in sorted(refs.counts.items()):
        await rc.update(c << img.cbits, 1, -n)
        if not await rc.get(c):
            img.l2_cache.discard(c << img.cbits)
            freed.append((c << img.cbits, 1))
    if sn.l1_size:
        l1_clusters = -(-sn.l1_size * 8 // img.cs)
        img.remove_metadata(sn.l1_offset, sn.l1_size * 8)
        await rc.update(sn.l1_offset, l1_clusters, -1)
        freed.append((sn.l1_offset, l1_clusters))
    await _fix_copied(img)
    await rc.cache.flush()
    await img.file_node.flush()
    await img.discard_host(freed, "pass-discard-snapshot")
    return sn
