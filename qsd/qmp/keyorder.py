# SPDX-License-Identifier: GPL-2.0-or-later
"""The order in which QEMU prints the members of a JSON object.

QEMU builds every QMP output object as a QDict, a hash table of 512
buckets whose chains take new keys at their head, and serialises it by
walking the buckets in order. So the printed order is: by bucket of the key's
hash, and within one bucket the most recently inserted key first. Building
our dicts in the schema's member order and printing them in this order gives
QSD's bytes (``{"micro", "minor", "major"}``, ``{"return", "id"}`` but
``{"id", "error"}``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

BUCKETS = 512
_MASK = 0xFFFFFFFF


@lru_cache(maxsize=8192)
def bucket(key: str) -> int:
    """The QDict bucket of ``key`` (TDB's string hash, as QEMU's QDict uses)."""
    data = key.encode("utf-8", "surrogatepass")
    value = (0x238F13AF * len(data)) & _MASK
    for i, byte in enumerate(data):
        value = (value + (byte << (i * 5 % 24))) & _MASK
    return ((1103515243 * value + 12345) & _MASK) % BUCKETS


def qemu_items(obj: dict[str, Any]) -> list[tuple[str, Any]]:
    """``obj``'s items in QEMU's output order."""
    items = list(obj.items())
    if len(items) < 2:
        return items
    order = sorted(range(len(items)), key=lambda i: (bucket(items[i][0]), -i))
    return [items[i] for i in order]
