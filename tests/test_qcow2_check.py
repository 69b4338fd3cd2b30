# SPDX-License-Identifier: GPL-2.0-or-later
"""qcow2 check and repair (qsd.block.formats.qcow2.check) against ``qemu-img
check``: clean images of every kind, images with deliberate leaks and
corruptions, and images left dirty by a killed ``qemu-io``. Counts must be
equal to QEMU's, and repairs must leave images QEMU calls clean."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest

from qsd.block.formats.qcow2.check import check_image
from test_qcow2 import MATRIX, make_image, qemu_io, run

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")

KEYS = ("check-errors", "image-end-offset", "total-clusters", "allocated-clusters",
        "fragmented-clusters", "compressed-clusters", "leaks", "corruptions", "leaks-fixed",
        "corruptions-fixed")


def qemu_check(path: Path, *args: str) -> dict[str, Any]:
    r = subprocess.run(["qemu-img", "check", "--output=json", *args, str(path)],
                       capture_output=True, text=True)
    return json.loads(r.stdout)


def ours(path: Path, repair: str | None = None) -> dict[str, Any]:
    fd = os.open(path, os.O_RDWR if repair else os.O_RDONLY)
    try:
        return asyncio.run(check_image(fd, str(path), repair)).to_json()
    finally:
        os.close(fd)


def counts(info: dict[str, Any]) -> dict[str, int]:
    return {k: info.get(k, 0) for k in KEYS}


def assert_same(path: Path) -> dict[str, Any]:
    """Our check equals qemu-img's on ``path``, field for field."""
    theirs = qemu_check(path)
    mine = ours(path)
    assert mine == theirs
    return mine


def assert_repair_like_qemu(path: Path, mode: str, rebuilds: bool = False) -> None:
    """Repairing a copy with ``qemu-img check -r`` and ours gives the same
    counts and both images end clean. When a used cluster has refcount 0,
    QEMU rebuilds the whole refcount structure elsewhere (``rebuilds``)
    while we raise the refcounts in place: then only the outcome compares."""
    copy = path.with_name("qemu-" + path.name)
    shutil.copy(path, copy)
    theirs = qemu_check(copy, "-r", mode)
    mine = ours(path, mode)
    if rebuilds:
        assert mine.get("corruptions-fixed") and not mine.get("corruptions")
        assert theirs.get("corruptions-fixed") and not theirs.get("corruptions")
    else:
        assert counts(mine) == counts(theirs)
    after = qemu_check(path)
    assert not after.get("leaks") and not after.get("corruptions"), after
    assert ours(path) == after


def header_q(b: bytes | bytearray, off: int) -> int:
    return struct.unpack_from(">Q", b, off)[0]


def refcount_entry(b: bytes | bytearray, cluster: int) -> int:
    """File offset of the 16-bit refcount of ``cluster`` (first refcount block)."""
    cbits = struct.unpack_from(">I", b, 20)[0]
    assert cluster < (1 << cbits) // 2
    return header_q(b, header_q(b, 48)) + 2 * cluster


def first_l2(b: bytes | bytearray) -> int:
    return header_q(b, header_q(b, 40)) & 0x00FFFFFFFFFFFE00


def mutate(path: Path, fn: Callable[[bytearray], None]) -> None:
    b = bytearray(path.read_bytes())
    fn(b)
    path.write_bytes(b)


# ----- clean images ------------------------------------------------------------

@pytest.mark.parametrize("opts", MATRIX)
def test_clean_matrix(tmp_path: Path, opts: str) -> None:
    info = assert_same(make_image(tmp_path, opts))
    assert info["check-errors"] == 0 and "leaks" not in info and "corruptions" not in info


def test_compressed_snapshots_bitmaps_backing(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(1 << 20) + bytes(1 << 20) + b"abc" * 300000)
    img = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", str(src), str(img))
    assert_same(img)
    qemu_io(img, "write -P 5 100k 300k")
    run("qemu-img", "snapshot", "-c", "s1", str(img))
    qemu_io(img, "write -P 6 0 64k", "discard 1M 512k")
    run("qemu-img", "snapshot", "-c", "s2", str(img))
    qemu_io(img, "write -P 7 200k 64k")
    run("qemu-img", "bitmap", "--add", str(img), "b0")
    run("qemu-img", "bitmap", "--add", "-g", "65536", str(img), "b1")
    qemu_io(img, "write -P 8 0 1M")
    info = assert_same(img)
    assert info.get("compressed-clusters") and info.get("fragmented-clusters")
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "c.qcow2", "-F", "qcow2", str(top))
    qemu_io(top, "write -P 9 64k 64k", "write -z 1M 1M")
    assert_same(top)


# ----- leaks ---------------------------------------------------------------------

def _leaky(tmp_path: Path) -> Path:
    img = tmp_path / "l.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "8M")
    qemu_io(img, "write -P 1 0 1M", "write -P 2 4M 64k")
    size = img.stat().st_size

    def leak(b: bytearray) -> None:
        b.extend(bytes(3 * 65536))  # three clusters nobody references, counted anyway
        for c in range(size // 65536, size // 65536 + 3):
            struct.pack_into(">H", b, refcount_entry(b, c), 1)
        used = header_q(b, 40) >> 16  # and the L1 table's cluster counted twice
        struct.pack_into(">H", b, refcount_entry(b, used), 2)

    mutate(img, leak)
    return img


def test_leaks_counted_and_repaired(tmp_path: Path) -> None:
    img = _leaky(tmp_path)
    info = assert_same(img)
    assert info["leaks"] == 4 and "corruptions" not in info
    assert_repair_like_qemu(img, "leaks")


def test_leaks_repaired_all(tmp_path: Path) -> None:
    img = _leaky(tmp_path)
    assert_repair_like_qemu(img, "all")


# ----- corruptions -----------------------------------------------------------------

def test_refcount_zero_for_used_cluster(tmp_path: Path) -> None:
    img = tmp_path / "z.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "8M")
    qemu_io(img, "write -P 1 0 256k")

    def zero(b: bytearray) -> None:
        data = header_q(b, first_l2(b)) & 0x00FFFFFFFFFFFE00
        struct.pack_into(">H", b, refcount_entry(b, data >> 16), 0)
        struct.pack_into(">H", b, refcount_entry(b, first_l2(b) >> 16), 0)

    mutate(img, zero)
    info = assert_same(img)
    assert info["corruptions"] >= 2
    assert counts(ours(img, "leaks")) == counts(qemu_check(img))  # leaks mode leaves them
    assert_repair_like_qemu(img, "all", rebuilds=True)


@pytest.mark.parametrize("where", ["past-eof", "far-past-eof", "unaligned", "l1-past-eof"])
def test_bad_l2_entries(tmp_path: Path, where: str) -> None:
    img = tmp_path / "p.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "8M")
    qemu_io(img, "write -P 1 0 256k", "write -P 2 2M 64k")

    def bad(b: bytearray) -> None:
        l2 = first_l2(b)
        if where == "past-eof":
            struct.pack_into(">Q", b, l2 + 8 * 9, 1 << 63 | len(b))
        elif where == "far-past-eof":
            struct.pack_into(">Q", b, l2 + 8 * 9, 1 << 63 | 100 << 16)
        elif where == "unaligned":
            struct.pack_into(">Q", b, l2 + 8 * 1, header_q(b, l2 + 8) + 512)
        else:
            struct.pack_into(">Q", b, header_q(b, 40), 1 << 63 | 200 << 16)

    mutate(img, bad)
    info = assert_same(img)
    assert info.get("corruptions")


def test_overlapping_metadata(tmp_path: Path) -> None:
    """An L2 entry pointing at the L1 table: the L1 cluster is referenced twice."""
    img = tmp_path / "o.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "1M")
    qemu_io(img, "write -P 7 0 64k")
    mutate(img, lambda b: struct.pack_into(">Q", b, first_l2(b) + 8 * 20,
                                           1 << 63 | header_q(b, 40)))
    assert assert_same(img).get("corruptions")


# ----- the lazy-refcounts dirty state ---------------------------------------------

def test_dirty_image_from_killed_qemu_io(tmp_path: Path) -> None:
    """qemu-io killed mid-session leaves a dirty lazy-refcounts image whose
    refcounts lag behind; repair rebuilds them and clears the dirty bit."""
    img = tmp_path / "d.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(img), "8M")
    qemu_io(img, "write -P 1 0 1M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 2 2M 512k", "-c", "discard 0 128k",
                    "-c", "write -P 3 6M 64k", "-c", "flush", "-c", "sigraise 9", str(img)],
                   capture_output=True)
    assert header_q(img.read_bytes(), 72) & 1  # dirty
    assert_same(img)
    assert_repair_like_qemu(img, "all", rebuilds=bool(qemu_check(img).get("corruptions")))
    assert not header_q(img.read_bytes(), 72) & 1
    run("qemu-io", "-f", "qcow2", "-c", "read -P 2 2M 512k", "-c", "read -P 3 6M 64k", str(img))


# ----- random damage ---------------------------------------------------------------

def test_random_metadata_damage(tmp_path: Path) -> None:
    """Random bytes and plausible entries written over the L1 table, an L2
    table, the refcount table and a refcount block of an image with a
    snapshot: our counts equal qemu-img's on every damaged image."""
    img = tmp_path / "f.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "2M")
    qemu_io(img, "write -P 1 0 100k", "write -P 2 1M 20k")
    run("qemu-img", "snapshot", "-c", "s", str(img))
    qemu_io(img, "write -P 3 8k 8k")
    base = img.read_bytes()
    l1, rt = header_q(base, 40), header_q(base, 48)
    rb, l2 = header_q(base, rt), first_l2(base)
    regions = [(l1, 16, 8), (l2, 256, 8), (rb, 64, 2), (rt, 16, 8)]
    rnd = random.Random(7)
    for _ in range(150):
        b = bytearray(base)
        for _ in range(rnd.randint(1, 3)):
            start, length, width = rnd.choice(regions)
            pos = start + rnd.randrange(length)
            if rnd.random() < 0.5:
                b[pos] = rnd.randrange(256)
            elif width == 2:
                struct.pack_into(">H", b, pos & ~1, rnd.choice([0, 1, 2, 3]))
            else:
                struct.pack_into(">Q", b, pos & ~7, 1 << 63 | rnd.randrange(80) << 12
                                 | rnd.choice([0, 0, 0, 512, 1]))
        img.write_bytes(b)
        assert ours(img) == qemu_check(img)


def test_driver_repair_on_open_leaks_past_last_reference(tmp_path: Path) -> None:
    """A dirty lazy-refcounts image whose leaked clusters lie past every
    referenced one: qsd's repair on a read-write open must free them too."""
    from qsd.block.drivers import load_drivers
    from qsd.block.graph import Graph
    load_drivers()
    img = _leaky(tmp_path)
    run("qemu-img", "amend", "-f", "qcow2", "-o", "lazy_refcounts=on", str(img))
    mutate(img, lambda b: struct.pack_into(">Q", b, 72, 1))  # dirty bit
    assert qemu_check(img).get("leaks") == 4

    async def reopen() -> None:
        g = Graph()
        await g.add({"driver": "qcow2", "node-name": "q",
                     "file": {"driver": "file", "filename": str(img)}})
        await g.close_all()

    asyncio.run(reopen())
    after = qemu_check(img)
    assert not after.get("leaks") and not after.get("corruptions"), after


# ----- corruption found while running: overlap checks, corrupt bit, event ----------
def _l2_points_at_l1(path: Path) -> None:
    """Make guest cluster 1 an in-place cluster whose host cluster is the L1 table."""
    raw = bytearray(path.read_bytes())
    l1_off = struct.unpack_from(">Q", raw, 40)[0]
    l2_off = struct.unpack_from(">Q", raw, l1_off)[0] & 0x00FFFFFFFFFFFE00
    struct.pack_into(">Q", raw, l2_off + 8, l1_off | 1 << 63)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("overlap", [None, "constant", "none",
                                     "{'template':'none','active-l1':true}"])
def test_overlap_check_differential(workdir: Path, qemu_sd: Any, qsd: Any,
                                    overlap: str | None) -> None:
    """A guest write onto the active L1 table: refused with the corrupt bit
    set and one BLOCK_IMAGE_CORRUPTED event, unless overlap-check leaves the
    L1 table out; the same events and corrupt flags in QSD and qsd."""
    results = []
    for factory in (qemu_sd, qsd):
        img = workdir / f"{len(results)}.qcow2"
        sock = workdir / f"{len(results)}.sock"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"], check=True)
        subprocess.run(["qemu-io", "-c", "write 0 64k", str(img)], check=True,
                       capture_output=True)
        _l2_points_at_l1(img)
        if overlap is None:
            opt = ""
        elif overlap.startswith("{"):
            opt = ",overlap-check.template=none,overlap-check.active-l1=on"
        else:
            opt = f",overlap-check={overlap}"
        d = factory("--blockdev", f"driver=qcow2,node-name=q{opt},file.driver=file,"
                    f"file.filename={img}",
                    "--nbd-server", f"addr.type=unix,addr.path={sock}",
                    "--export", "type=nbd,id=e,node-name=q,name=x,writable=on")
        with d.qmp() as q:
            w = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x41 64k 4k",
                                "-c", "write -P 0x42 128k 4k", f"nbd+unix:///x?socket={sock}"],
                               capture_output=True, text=True, check=False)
            q.execute("query-version")
            events = [{k: v for k, v in e.items() if k != "timestamp"} for e in q.events]
            q.execute("quit")
        d.wait()
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-U", str(img)],
                                         capture_output=True, text=True,
                                         check=True).stdout)
        results.append((events, info["format-specific"]["data"]["corrupt"],
                        "failed" in w.stdout + w.stderr))
    assert results[1] == results[0]
    expect_refused = overlap in (None, "constant") or (overlap or "").startswith("{")
    assert results[0][1] is expect_refused and bool(results[0][0]) is expect_refused
