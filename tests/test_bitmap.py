# SPDX-License-Identifier: GPL-2.0-or-later
"""DirtyBitmap against a model that keeps one bool per chunk."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from qsd.block.bitmap import DirtyBitmap

GRAN = st.sampled_from([1, 2, 512, 4096, 65536])


def model_extents(chunks: list[bool], gran: int, size: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i, dirty in enumerate(chunks):
        if not dirty:
            continue
        start, end = i * gran, min((i + 1) * gran, size)
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], end - out[-1][0])
        else:
            out.append((start, end - start))
    return out


@settings(max_examples=300, deadline=None)
@given(gran=GRAN, nchunks=st.integers(1, 300), tail=st.integers(0, 1),
       ops=st.lists(st.tuples(st.booleans(), st.floats(0, 1), st.floats(0, 1)), max_size=30))
def test_matches_model(gran: int, nchunks: int, tail: int,
                       ops: list[tuple[bool, float, float]]) -> None:
    size = nchunks * gran - (gran // 2 if tail and gran > 1 else 0)
    bm = DirtyBitmap("b", size, gran)
    chunks = [False] * ((size + gran - 1) // gran)
    for value, a, b in ops:
        off = int(a * size)
        length = int(b * (size - off))
        if value:
            bm.set_range(off, length)
            if length:
                for i in range(off // gran, (off + length - 1) // gran + 1):
                    chunks[i] = True
        else:
            bm.reset_range(off, length)
            end = off + length
            for i in range(len(chunks)):
                lo, hi = i * gran, min((i + 1) * gran, size)
                if length and off <= lo and hi <= end:
                    chunks[i] = False
    assert list(bm.dirty_extents()) == model_extents(chunks, gran, size)
    assert bm.count() == sum(chunks) * gran
    for i, dirty in enumerate(chunks):
        assert bm.get(i * gran) == dirty


def test_large_scan_and_sha256() -> None:
    size = 1 << 40
    bm = DirtyBitmap(None, size, 65536)
    assert bm.next_dirty(0) == -1
    bm.set_range(size - 65536, 65536)
    bm.set_range(123 << 20, 1)
    assert list(bm.dirty_extents()) == [(123 << 20, 65536), (size - 65536, 65536)]
    assert bm.next_clean(size - 65536) == size
    # QEMU: sha256 over whole 64-bit words of the bottom HBitmap level.
    empty = DirtyBitmap(None, 1, 65536)
    assert empty.sha256() == "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"


def test_merge_and_resize() -> None:
    a = DirtyBitmap("a", 1 << 20, 4096)
    b = DirtyBitmap("b", 1 << 20, 65536)
    b.set_range(70000, 10)
    a.set_range(0, 1)
    a.merge_from(b)
    assert list(a.dirty_extents()) == [(0, 4096), (65536, 65536)]
    a.resize(100000)
    assert list(a.dirty_extents()) == [(0, 4096), (65536, 100000 - 65536)]
    a.resize(1 << 21)
    assert a.next_dirty(100000) == 100000     # the partial last chunk stays dirty
    assert a.next_dirty(102400) == -1
