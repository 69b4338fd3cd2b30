# SPDX-License-Identifier: GPL-2.0-or-later
"""Dirty bitmaps: one bit per ``granularity`` bytes of a node.

A :class:`DirtyBitmap` lives in its node's ``dirty_bitmaps`` list; the node's
public write methods mark it (``Node._end_write``). Jobs keep anonymous
bitmaps (``name=None``) the same way: mirror to know what to copy again,
backup for incremental sync. The bits are a little-endian bit array in a
bytearray, which is exactly the bottom level of QEMU's HBitmap, so
:meth:`sha256` equals ``x-debug-block-dirty-bitmap-sha256`` of QEMU and
:meth:`to_bytes`/:meth:`from_bytes` are the on-disk bitmap data of qcow2.
"""

from __future__ import annotations

import hashlib
from typing import Iterator

_SCAN = 1 << 16
_ZEROES = bytes(_SCAN)
_ONES = b"\xff" * _SCAN
#: Limits QEMU puts on granularity (block-dirty-bitmap-add).
MIN_GRANULARITY = 512
MAX_GRANULARITY = 1 << 31


class DirtyBitmap:
    """A bit per granularity-sized chunk of a node of ``size`` bytes."""

    def __init__(self, name: str | None, size: int, granularity: int, *,
                 persistent: bool = False, enabled: bool = True) -> None:
        if granularity & (granularity - 1) or granularity < 1:
            raise ValueError("granularity must be a power of two")
        self.name = name
        self.granularity = granularity
        self.shift = granularity.bit_length() - 1
        self.persistent = persistent
        #: False while disabled: writes no longer mark it (QEMU's ``recording``).
        self.enabled = enabled
        #: In use by an operation (export, backup job) that forbids changes.
        self.busy = False
        #: Loaded from an image that was not closed cleanly: unusable.
        self.inconsistent = False
        #: On a read-only image: cannot be changed nor cleared.
        self.readonly = False
        self.size = size
        self._bits = bytearray(self._nbytes(size))

    def _nbits(self, size: int) -> int:
        return (size + self.granularity - 1) >> self.shift

    def _nbytes(self, size: int) -> int:
        return (self._nbits(size) + 7) // 8

    # ----- changes -------------------------------------------------------
    def set_range(self, offset: int, length: int) -> None:
        self._fill(offset, length, True)

    def reset_range(self, offset: int, length: int) -> None:
        self._fill(offset, length, False)

    def _fill(self, offset: int, length: int, value: bool) -> None:
        end = min(offset + length, self.size)
        if length <= 0 or offset >= end:
            return
        first = offset >> self.shift
        last = (end + self.granularity - 1) >> self.shift      # exclusive
        if not value:
            # Only chunks the range covers completely are clean afterwards.
            first = (offset + self.granularity - 1) >> self.shift
            last = end >> self.shift if end < self.size else self._nbits(self.size)
            if first >= last:
                return
        bits = self._bits
        lo_byte, hi_byte = (first + 7) // 8, last // 8
        if lo_byte > hi_byte:       # inside one byte
            mask = ((1 << (last - first)) - 1) << (first & 7)
            self._mask(first // 8, mask, value)
            return
        if first & 7:
            self._mask(first // 8, (0xff << (first & 7)) & 0xff, value)
        if hi_byte > lo_byte:
            bits[lo_byte:hi_byte] = (b"\xff" if value else b"\0") * (hi_byte - lo_byte)
        if last & 7:
            self._mask(hi_byte, (1 << (last & 7)) - 1, value)

    def _mask(self, index: int, mask: int, value: bool) -> None:
        if value:
            self._bits[index] |= mask
        else:
            self._bits[index] &= ~mask & 0xff

    def clear(self) -> None:
        self._bits[:] = bytes(len(self._bits))

    def resize(self, size: int) -> None:
        """Follow the node's new size; bits past the old end start clean."""
        self.size = size
        n = self._nbytes(size)
        del self._bits[n:]
        self._bits.extend(bytes(n - len(self._bits)))
        tail = self._nbits(size) & 7
        if tail and self._bits:
            self._bits[-1] &= (1 << tail) - 1

    def merge_from(self, other: "DirtyBitmap") -> None:
        """OR the dirty areas of ``other`` (any granularity) into this bitmap."""
        if other.granularity == self.granularity:
            n = min(len(self._bits), len(other._bits))
            merged = int.from_bytes(self._bits[:n], "little") | \
                int.from_bytes(other._bits[:n], "little")
            self._bits[:n] = merged.to_bytes(n, "little")
            return
        for off, length in other.dirty_extents():
            self.set_range(off, length)

    def copy(self, name: str | None = None) -> "DirtyBitmap":
        dup = DirtyBitmap(name, self.size, self.granularity, enabled=self.enabled)
        dup._bits[:] = self._bits
        return dup

    # ----- queries -------------------------------------------------------
    def get(self, offset: int) -> bool:
        bit = offset >> self.shift
        return bool(self._bits[bit >> 3] >> (bit & 7) & 1)

    def count(self) -> int:
        """Dirty bytes, whole chunks each (QEMU's ``count``)."""
        return int.from_bytes(self._bits, "little").bit_count() << self.shift

    def _next(self, bit: int, dirty: bool) -> int:
        """Index of the first bit at or after ``bit`` that is ``dirty``, or -1."""
        nbits = self._nbits(self.size)
        bits = self._bits
        skip, pad = (_ZEROES, b"\0") if dirty else (_ONES, b"\xff")
        while bit < nbits:
            sub = bit & 7
            byte = bits[bit >> 3]
            if sub or (byte != pad[0]):
                val = byte if dirty else ~byte & 0xff
                val >>= sub
                if val:
                    found = bit + ((val & -val).bit_length() - 1)
                    return found if found < nbits else -1
                bit = (bit | 7) + 1
                continue
            start = bit >> 3
            chunk = bytes(bits[start:start + _SCAN])
            if chunk == skip[:len(chunk)]:
                bit = (start + len(chunk)) * 8
                continue
            bit = (start + len(chunk) - len(chunk.lstrip(pad))) * 8
        return -1

    def next_dirty(self, offset: int) -> int:
        """Byte offset of the first dirty chunk at or after ``offset``, or -1."""
        bit = self._next(offset >> self.shift, True)
        return -1 if bit < 0 else max(bit << self.shift, offset)

    def next_clean(self, offset: int) -> int:
        """Byte offset of the first clean chunk at or after ``offset`` (the size
        when there is none)."""
        bit = self._next(offset >> self.shift, False)
        return self.size if bit < 0 else max(bit << self.shift, offset)

    def dirty_extents(self, offset: int = 0,
                      length: int | None = None) -> Iterator[tuple[int, int]]:
        """``(offset, length)`` runs of dirty bytes inside the range, clipped to it."""
        end = self.size if length is None else min(self.size, offset + length)
        pos = offset
        while pos < end:
            start = self.next_dirty(pos)
            if start < 0 or start >= end:
                return
            stop = min(self.next_clean(start), end)
            yield start, stop - start
            pos = stop

    # ----- serialisation -------------------------------------------------
    def to_bytes(self) -> bytes:
        """The bit array, bit ``i`` for chunk ``i``, little-endian bit order."""
        return bytes(self._bits)

    def from_bytes(self, data: bytes) -> None:
        n = min(len(data), len(self._bits))
        self._bits[:n] = data[:n]
        self.resize(self.size)      # drop bits past the end

    def sha256(self) -> str:
        """The hash QEMU's x-debug-block-dirty-bitmap-sha256 reports: over the
        bits padded to whole 64-bit words (at least one)."""
        n = max(1, (len(self._bits) + 7) // 8) * 8
        return hashlib.sha256(bytes(self._bits) + bytes(n - len(self._bits))).hexdigest()
