# SPDX-License-Identifier: GPL-2.0-or-later
"""qcow2 persistent dirty bitmaps: bitmaps QEMU stored (qemu-img bitmap,
qemu-io, the real QSD) load with the same bits (sha256 as QSD's
x-debug-block-dirty-bitmap-sha256), bitmaps qsd stores are what qemu-img and
QSD see, flags follow QEMU (auto, in-use), and hostile bitmap metadata is
refused with QEMU's messages."""

from __future__ import annotations

import asyncio
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qsd.block.bitmap import DirtyBitmap
from qsd.block.drivers import load_drivers
from qsd.block.formats.qcow2 import bitmaps as qbm
from qsd.block.graph import Graph
from qsd.qmp.errors import QMPError

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")
load_drivers()

MiB = 1 << 20


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def info(path: Path) -> dict[str, Any]:
    return json.loads(run("qemu-img", "info", "--output=json", str(path)))["format-specific"]["data"]


def check_clean(path: Path) -> None:
    res = subprocess.run(["qemu-img", "check", "--output=json", str(path)],
                         capture_output=True, text=True, check=False)
    out = json.loads(res.stdout)
    assert out.get("corruptions", 0) == 0 and out.get("leaks", 0) == 0, out
    assert res.returncode == 0, res.stderr


async def _open(path: Path, read_only: bool = False) -> tuple[Graph, Any]:
    g = Graph()
    node = await g.add({"driver": "qcow2", "node-name": "q", "read-only": read_only,
                        "file": {"driver": "file", "filename": str(path)}})
    return g, node


def load(path: Path, read_only: bool = True) -> dict[str, DirtyBitmap]:
    async def go() -> dict[str, DirtyBitmap]:
        g, node = await _open(path, read_only)
        try:
            return {b.name: b for b in node.dirty_bitmaps}
        finally:
            await g.close_all()
    return asyncio.run(go())


_CRASH = """
import asyncio, os, sys
from qsd.block.drivers import load_drivers
from qsd.block.graph import Graph
load_drivers()
async def main():
    g = Graph()
    node = await g.add({"driver": "qcow2", "node-name": "q",
                        "file": {"driver": "file", "filename": sys.argv[1]}})
    await node.write(int(sys.argv[2]), b"z" * 65536)
    await node.flush()
    print(sys.argv[3] if sys.argv[3] == "-" else getattr(
        next(b for b in node.dirty_bitmaps if b.name == sys.argv[3]), sys.argv[4])(), flush=True)
    os._exit(0)  # no close: as after kill -9
asyncio.run(main())
"""


def crash_after_write(path: Path, offset: int, bitmap: str = "-", method: str = "") -> str:
    """Open ``path`` writable in a separate qsd process, write, flush and
    die without closing; returns ``method()`` of the named bitmap before."""
    return subprocess.run([sys.executable, "-c", _CRASH, str(path), str(offset), bitmap, method],
                          check=True, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent).stdout.strip()


def qsd_hashes(qemu_sd: Any, path: Path, names: list[str]) -> dict[str, str]:
    """x-debug-block-dirty-bitmap-sha256 of each bitmap, from the real QSD
    opening the image read-only."""
    d = qemu_sd("--blockdev", f"driver=qcow2,node-name=q,read-only=on,file.driver=file,"
                f"file.filename={path}")
    try:
        with d.qmp() as q:
            return {n: q.cmd("x-debug-block-dirty-bitmap-sha256", node="q", name=n)["sha256"]
                    for n in names}
    finally:
        d.stop()


def test_qemu_img_bitmaps_load(workdir: Path, qemu_sd: Any) -> None:
    img = workdir / "a.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "64M")
    run("qemu-img", "bitmap", "--add", str(img), "b1")
    run("qemu-img", "bitmap", "--add", "-g", "128k", str(img), "b2")
    run("qemu-io", "-c", "write 1M 64k", "-c", "write 30M 1k", "-c", "write 63M 1M", str(img))
    run("qemu-img", "bitmap", "--disable", str(img), "b2")
    run("qemu-io", "-c", "write 10M 4k", str(img))      # b1 records it, b2 no longer
    run("qemu-img", "bitmap", "--add", "-g", "512", "--disable", str(img), "b3")
    bms = load(img)
    assert set(bms) == {"b1", "b2", "b3"}
    assert (bms["b1"].granularity, bms["b1"].enabled) == (4096, True)  # the cluster size
    assert (bms["b2"].granularity, bms["b2"].enabled) == (131072, False)
    assert (bms["b3"].granularity, bms["b3"].enabled) == (512, False)
    assert all(b.persistent and not b.inconsistent and b.readonly for b in bms.values())
    assert bms["b1"].get(10 * MiB) and not bms["b2"].get(10 * MiB) and bms["b2"].get(30 * MiB)
    want = qsd_hashes(qemu_sd, img, ["b1", "b2", "b3"])
    assert {n: b.sha256() for n, b in bms.items()} == want
    check_clean(img)


def test_qsd_written_bitmap_and_in_use(workdir: Path, qemu_sd: Any) -> None:
    """A bitmap the real QSD added and filled through an NBD export reads
    the same; while a writable qsd holds the image it is IN_USE on disk, and
    after a crash it loads as inconsistent."""
    img = workdir / "b.qcow2"
    sock = workdir / "nbd.sock"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "32M")
    d = qemu_sd("--blockdev", f"driver=qcow2,node-name=q,file.driver=file,file.filename={img}",
                "--nbd-server", f"addr.type=unix,addr.path={sock}",
                "--export", "type=nbd,id=e,node-name=q,name=x,writable=on")
    with d.qmp() as q:
        q.cmd("block-dirty-bitmap-add", node="q", name="p", persistent=True, granularity=4096)
        run("qemu-io", "-f", "raw", "-c", "write 0 4k", "-c", "write 5M 100k",
            "-c", "write 32505856 4k", f"nbd+unix:///x?socket={sock}")
        want = q.cmd("x-debug-block-dirty-bitmap-sha256", node="q", name="p")["sha256"]
    d.stop()
    assert info(img)["bitmaps"] == [{"name": "p", "granularity": 4096, "flags": ["auto"]}]

    (bm,) = load(img).values()
    assert bm.sha256() == want and bm.enabled and not bm.inconsistent

    async def in_use() -> None:
        g, node = await _open(img)
        flags = [b["flags"] for b in node.format_specific()["data"]["bitmaps"]]
        assert flags == [["in-use", "auto"]]
        await g.close_all()
    asyncio.run(in_use())
    assert crash_after_write(img, 20 * MiB, "p", "sha256") != want
    assert info(img)["bitmaps"][0]["flags"] == ["in-use", "auto"]
    (bm,) = load(img).values()
    assert bm.inconsistent


def test_store_and_remove(workdir: Path, qemu_sd: Any) -> None:
    img = workdir / "c.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(img), "8M")
    run("qemu-img", "bitmap", "--add", str(img), "old")
    hashes: dict[str, str] = {}

    async def go() -> None:
        g, node = await _open(img)
        assert [b.name for b in node.dirty_bitmaps] == ["old"]
        new = DirtyBitmap("new", node.size, 1024, persistent=True)
        off = DirtyBitmap("off", node.size, 1 << 16, persistent=True, enabled=False)
        node.bitmap_check_persistent("new", 1024)
        node.dirty_bitmaps += [new, off]
        await node.write(3 * MiB, b"a" * 3000)
        await node.write(8 * MiB - 512, b"b" * 512)
        off.set_range(0, 4 * MiB)                 # more than one cluster of bitmap data
        for b in node.dirty_bitmaps:
            hashes[b.name] = b.sha256()
        await g.close_all()
    asyncio.run(go())
    assert info(img)["bitmaps"] == [
        {"name": "old", "granularity": 4096, "flags": ["auto"]},
        {"name": "new", "granularity": 1024, "flags": ["auto"]},
        {"name": "off", "granularity": 65536, "flags": []}]
    check_clean(img)
    assert qsd_hashes(qemu_sd, img, list(hashes)) == hashes
    assert {n: b.sha256() for n, b in load(img, read_only=False).items()} == hashes
    check_clean(img)

    async def remove() -> None:
        g, node = await _open(img)
        await node.bitmap_remove_persistent("new")
        node.dirty_bitmaps = [b for b in node.dirty_bitmaps if b.name != "new"]
        await node.bitmap_remove_persistent("absent")
        await g.close_all()
    asyncio.run(remove())
    assert [b["name"] for b in info(img)["bitmaps"]] == ["old", "off"]
    check_clean(img)
    run("qemu-img", "bitmap", "--remove", str(img), "old")
    run("qemu-img", "bitmap", "--remove", str(img), "off")

    async def none_left() -> None:
        g, node = await _open(img)
        assert node.dirty_bitmaps == [] and "bitmaps" not in node.format_specific()["data"]
        await g.close_all()
    asyncio.run(none_left())
    check_clean(img)


def test_dirty_image_with_bitmaps_is_repaired(workdir: Path) -> None:
    """lazy_refcounts left dirty by a crash: the repair on open counts the
    bitmap clusters too (no leaks, no corruption afterwards)."""
    img = workdir / "d.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(img), "16M")
    run("qemu-img", "bitmap", "--add", str(img), "b")
    run("qemu-io", "-c", "write 0 1M", str(img))

    crash_after_write(img, 2 * MiB)
    assert '"dirty-flag": true' in run("qemu-img", "info", "--output=json", str(img))
    bms = load(img, read_only=False)
    assert bms["b"].inconsistent
    check_clean(img)


@pytest.mark.parametrize("compat,granularity,name,reason", [
    ("0.10", 65536, "x", "Cannot store dirty bitmaps in qcow2 v2 files"),
    ("1.1", 256, "x", "Granularity is under minimum (512 bytes)"),
    ("1.1", 1 << 32, "x", "Granularity exceeds maximum (2147483648 bytes)"),
    ("1.1", 65536, "n" * 1024, "Name length exceeds maximum (1023 characters)"),
])
def test_check_persistent_texts(workdir: Path, qemu_sd: Any, compat: str, granularity: int,
                                name: str, reason: str) -> None:
    img = workdir / "e.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"compat={compat}", str(img), "16M")
    d = qemu_sd("--blockdev", f"driver=qcow2,node-name=q,file.driver=file,file.filename={img}")
    with d.qmp() as q:
        r = q.execute("block-dirty-bitmap-add", {"node": "q", "name": name, "persistent": True,
                                                 "granularity": granularity})
    d.stop()
    want = f"Can't make bitmap '{name}' persistent in 'q': {reason}"
    if granularity > 1 << 31 or granularity < 512:   # QMP checks these first
        assert "error" in r
    else:
        assert r["error"]["desc"] == want

    async def go() -> None:
        g, node = await _open(img)
        with pytest.raises(QMPError) as e:
            node.bitmap_check_persistent(name, granularity)
        assert e.value.desc == want
        await g.close_all()
    asyncio.run(go())


def test_too_big_bitmap_refused(workdir: Path) -> None:
    img = workdir / "f.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "8T")

    async def go() -> None:
        g, node = await _open(img)
        with pytest.raises(QMPError, match="Too much space will be occupied by the bitmap"):
            node.bitmap_check_persistent("x", 512)
        await g.close_all()
    asyncio.run(go())


def test_ignored_when_autoclear_bit_missing(workdir: Path) -> None:
    """A program that does not know bitmaps cleared the auto-clear bit: the
    extension is ignored, and dropped by a writable open, as QEMU does."""
    img = workdir / "g.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M")
    run("qemu-img", "bitmap", "--add", str(img), "b")
    with open(img, "r+b") as f:
        f.seek(88)
        autoclear = struct.unpack(">Q", f.read(8))[0]
        f.seek(88)
        f.write(struct.pack(">Q", autoclear & ~1))
    assert load(img) == {}
    assert load(img, read_only=False) == {}
    assert "bitmaps" not in info(img)


# ----- hostile bitmap metadata ------------------------------------------------
def _template(workdir: Path) -> tuple[bytes, int, int, int]:
    """A small image with two bitmaps and data: (bytes, ext offset,
    directory offset, table offset of the first bitmap)."""
    img = workdir / "t.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(img), "1M")
    run("qemu-img", "bitmap", "--add", "-g", "512", str(img), "a")
    run("qemu-img", "bitmap", "--add", str(img), "bb")
    run("qemu-io", "-c", "write 0 64k", str(img))
    raw = img.read_bytes()
    pos = struct.unpack_from(">I", raw, 100)[0]  # header_length: extensions follow
    while True:
        t, length = struct.unpack_from(">II", raw, pos)
        if t == 0x23852875:
            ext = pos + 8
            break
        pos += 8 + (length + 7) // 8 * 8
    dir_off = struct.unpack_from(">Q", raw, ext + 16)[0]
    table = struct.unpack_from(">Q", raw, dir_off)[0]
    return raw, ext, dir_off, table


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, int, int, int]:
    return _template(tmp_path_factory.mktemp("bmtpl"))


def _open_mutated(tmp: Path, raw: bytes) -> None:
    path = tmp / "m.qcow2"
    path.write_bytes(raw)

    async def go() -> None:
        g, node = await _open(path, read_only=True)
        try:
            for bm in node.dirty_bitmaps:
                assert bm.size == node.size
            node.format_specific()
        finally:
            await g.close_all()
    try:
        asyncio.run(go())
    except QMPError as e:
        assert e.desc
    except OSError as e:
        assert e.errno


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(where=st.sampled_from(["ext", "dir", "table"]), pos=st.integers(0, 63),
       value=st.integers(0, 255), wide=st.sampled_from([None, 0, 0xFFFFFFFF, 1 << 31, 0x7FFF]))
def test_hostile_bitmap_metadata(template: tuple[bytes, int, int, int], tmp_path_factory: Any,
                                 where: str, pos: int, value: int, wide: int | None) -> None:
    raw, ext, dir_off, table = template
    buf = bytearray(raw)
    base = {"ext": ext, "dir": dir_off, "table": table}[where]
    limit = {"ext": 24, "dir": 64, "table": 64}[where]
    at = base + pos % limit
    if wide is None:
        buf[at] = value
    else:
        at -= at % 4
        struct.pack_into(">I", buf, at, wide)
    _open_mutated(tmp_path_factory.mktemp("bmh"), bytes(buf))


@pytest.mark.parametrize("field,value,message", [
    ("nb", 0, "found bitmaps extension with zero bitmaps"),
    ("nb", 70000, "bitmaps_ext: Image has 70000 bitmaps, exceeding the QEMU supported maximum "
                  "of 65535"),
    ("nb", 3, "Less bitmaps found than specified in header extension"),
    ("nb", 1, "More bitmaps found than specified in header extension"),
    ("dir_size", 1 << 40, "bitmaps_ext: bitmap directory size (1099511627776) exceeds the "
                          "maximum supported size (67107840)"),
    ("dir_off", 7, "bitmaps_ext: invalid bitmap directory offset"),
    ("table_size", 0x7FFFFFFF, "Bitmap 'a' doesn't satisfy the constraints"),
])
def test_bad_bitmap_extension_messages(template: tuple[bytes, int, int, int], workdir: Path,
                                       field: str, value: int, message: str) -> None:
    raw, ext, dir_off, _ = template
    buf = bytearray(raw)
    if field == "nb":
        struct.pack_into(">I", buf, ext, value)
    elif field == "dir_size":
        struct.pack_into(">Q", buf, ext + 8, value)
    elif field == "dir_off":
        struct.pack_into(">Q", buf, ext + 16, struct.unpack_from(">Q", buf, ext + 16)[0] + value)
    else:
        struct.pack_into(">I", buf, dir_off + 8, value)
    path = workdir / "bad.qcow2"
    path.write_bytes(bytes(buf))
    res = subprocess.run(["qemu-img", "info", str(path)], capture_output=True, text=True,
                         check=False)
    assert message in res.stderr

    async def go() -> None:
        g, node = await _open(path, read_only=True)
        await g.close_all()
    with pytest.raises(QMPError) as e:
        asyncio.run(go())
    assert e.value.desc == message


def test_directory_roundtrip() -> None:
    entries = [qbm.StoredBitmap("x", 4096, 1, qbm.FLAG_AUTO, 16),
               qbm.StoredBitmap("yy" * 20, 8192, 2, 0, 9)]
    raw = qbm.pack_directory(entries)
    assert len(raw) == 32 + 64
    assert qbm.parse_directory(raw, 2, 4096, 1 << 20) == entries
