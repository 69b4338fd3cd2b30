# SPDX-License-Identifier: GPL-2.0-or-later
"""Key orders that QEMU's data structures impose on what users see.

QEMU keeps JSON objects in a QDict (512 hash buckets, newest entry first
within a bucket; see ``qsd.qmp.keyorder``), and its input visitor tracks
the not-yet-visited keys of an object in a GLib hash table.  Two observable
things follow from that and have to be reproduced bit for bit:

* the order in which QEMU walks an object's keys (``qdict_order``: the
  keyval list checks, introspection entries), and
* which key is named when several arguments are unexpected
  (``first_unvisited``): the first one in the hash table's slot order after
  the visited members were removed, resizes included.

Both were checked against a live qemu-storage-daemon 7.2 with hundreds of
random key sets.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from qsd.qmp.keyorder import bucket

_MASK32 = 0xFFFFFFFF
# Largest prime below 2**shift, per table size (GLib's modulus table).
_PRIME_MOD = (1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191,
              16381, 32749, 65521, 131071, 262139, 524287, 1048573)
_MIN_SHIFT = 3
_UNUSED = 0
_TOMBSTONE = 1


def qdict_order(keys: Sequence[str]) -> list[str]:
    """Return ``keys`` (given in insertion order) in QDict iteration order."""
    position = {key: i for i, key in enumerate(keys)}
    return sorted(keys, key=lambda k: (bucket(k), -position[k]))


def _str_hash(key: str) -> int:
    """GLib's g_str_hash (djb2 over *signed* chars)."""
    value = 5381
    for byte in key.encode():
        if byte >= 128:
            byte -= 256
        value = (value * 33 + byte) & _MASK32
    return value


class _GHashTable:
    """Slot layout of a GLib hash table of strings (insert/remove/resize)."""

    def __init__(self) -> None:
        self._set_shift(_MIN_SHIFT)
        self.hashes = [_UNUSED] * self.size
        self.keys: list[str | None] = [None] * self.size
        self.nnodes = 0
        self.noccupied = 0

    def _set_shift(self, shift: int) -> None:
        self.size = 1 << shift
        self.mod = _PRIME_MOD[shift]
        self.mask = self.size - 1

    def _index(self, hash_value: int) -> int:
        return ((hash_value * 11) & _MASK32) % self.mod

    def _lookup(self, key: str) -> tuple[int, int]:
        hash_value = _str_hash(key)
        hash_value = max(hash_value, 2)
        index = self._index(hash_value)
        step = 0
        tombstone = None
        while self.hashes[index] != _UNUSED:
            if self.hashes[index] == hash_value and self.keys[index] == key:
                return index, hash_value
            if self.hashes[index] == _TOMBSTONE and tombstone is None:
                tombstone = index
            step += 1
            index = (index + step) & self.mask
        return (index if tombstone is None else tombstone), hash_value

    def insert(self, key: str) -> None:
        index, hash_value = self._lookup(key)
        if self.hashes[index] >= 2:
            return
        was_unused = self.hashes[index] == _UNUSED
        self.hashes[index] = hash_value
        self.keys[index] = key
        self.nnodes += 1
        if was_unused:
            self.noccupied += 1
            self._maybe_resize()

    def remove(self, key: str) -> None:
        index, _ = self._lookup(key)
        if self.hashes[index] < 2:
            return
        self.hashes[index] = _TOMBSTONE
        self.keys[index] = None
        self.nnodes -= 1
        self._maybe_resize()

    def _maybe_resize(self) -> None:
        too_sparse = self.size > self.nnodes * 4 and self.size > 1 << _MIN_SHIFT
        too_full = self.size <= self.noccupied + self.noccupied // 16
        if too_sparse or too_full:
            self._resize()

    def _resize(self) -> None:
        """Rehash in place, the way GLib does (evicting as it goes)."""
        old_size = self.size
        wanted = int(self.nnodes * 1.333)
        shift = 0
        while wanted:
            wanted >>= 1
            shift += 1
        self._set_shift(max(shift, _MIN_SHIFT))
        if self.size > old_size:
            self.hashes += [_UNUSED] * (self.size - old_size)
            self.keys += [None] * (self.size - old_size)
        placed = [False] * max(self.size, old_size)
        for i in range(old_size):
            node_hash = self.hashes[i]
            if node_hash < 2:
                self.hashes[i] = _UNUSED
                continue
            if placed[i]:
                continue
            self.hashes[i] = _UNUSED
            key = self.keys[i]
            self.keys[i] = None
            while True:
                index = self._index(node_hash)
                step = 0
                while placed[index]:
                    step += 1
                    index = (index + step) & self.mask
                placed[index] = True
                replaced = self.hashes[index]
                self.hashes[index] = node_hash
                if replaced < 2:
                    self.keys[index] = key
                    break
                node_hash = replaced
                key, self.keys[index] = self.keys[index], key
        del self.hashes[self.size:]
        del self.keys[self.size:]
        self.noccupied = self.nnodes

    def first(self) -> str | None:
        for hash_value, key in zip(self.hashes, self.keys):
            if hash_value >= 2:
                return key
        return None


def first_unvisited(keys: Sequence[str], visited: Iterable[str]) -> str | None:
    """The key QEMU names in "Parameter 'x' is unexpected".

    ``keys`` are the object's keys in insertion order; ``visited`` the
    members the visitor consumed, in visiting order.
    """
    table = _GHashTable()
    for key in qdict_order(keys):
        table.insert(key)
    for key in visited:
        table.remove(key)
    return table.first()
