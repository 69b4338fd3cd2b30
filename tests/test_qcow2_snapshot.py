# SPDX-License-Identifier: GPL-2.0-or-later
"""qcow2 internal snapshots: tables written by qemu-img read by qsd, and
snapshots taken and deleted by qsd (in process and over QMP) that qemu-img
lists, checks clean and restores to the data of snapshot time, also after
writes that must copy shared clusters instead of overwriting them."""

from __future__ import annotations

import asyncio
import errno
import json
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from qsd.block.drivers import load_drivers
from qsd.block.graph import Graph

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")
load_drivers()

SIZE = 4 << 20


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def check_clean(path: Path) -> None:
    r = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No errors were found" in r.stdout


def snapshot_data(path: Path, name: str | None) -> bytes:
    """The guest data of snapshot ``name`` (None: the active state)."""
    out = path.with_suffix(f".{name or 'active'}.raw")
    opts = ["-l", f"snapshot.name={name}"] if name else []
    run("qemu-img", "convert", *opts, "-O", "raw", str(path), str(out))
    data = out.read_bytes()
    out.unlink()
    return data


def qemu_snapshots(path: Path) -> list[dict[str, Any]]:
    return json.loads(run("qemu-img", "info", "--output=json", "-U", str(path))).get("snapshots", [])


async def _open(path: Path, **opts: Any) -> tuple[Graph, Any]:
    g = Graph()
    node = await g.add({"driver": "qcow2", "node-name": "q",
                        "file": {"driver": "file", "filename": str(path)}, **opts})
    return g, node


def _create(path: Path, *opts: str) -> None:
    run("qemu-img", "create", "-q", "-f", "qcow2", *opts, str(path), str(SIZE))


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_qemu_snapshots_listed_as_qemu_lists_them(tmp_path: Path, compat: str) -> None:
    img = tmp_path / "a.qcow2"
    _create(img, "-o", f"compat={compat}")
    for i, name in enumerate(["one", "two", "three"]):
        run("qemu-io", "-c", f"write -P {i + 1} {i * 65536} 64k", str(img))
        run("qemu-img", "snapshot", "-c", name, str(img))
    run("qemu-img", "snapshot", "-d", "two", str(img))

    async def go() -> list[dict[str, Any]] | None:
        g, node = await _open(img, **{"read-only": True})
        try:
            return node.snapshots()
        finally:
            await g.delete("q")
    assert asyncio.run(go()) == qemu_snapshots(img)


async def _random_writes(node: Any, model: bytearray, rng: random.Random, n: int) -> None:
    for _ in range(n):
        off = rng.randrange(0, SIZE - 1)
        length = min(rng.choice([1, 511, 4096, 65536, 200000]), SIZE - off)
        data = bytes([rng.randrange(256)]) * length
        await node.write(off, data)
        model[off:off + length] = data


@pytest.mark.parametrize("opts", [
    [], ["-o", "cluster_size=4096"], ["-o", "extended_l2=on"], ["-o", "refcount_bits=64"],
    ["-o", "compat=0.10,refcount_bits=16"], ["-o", "lazy_refcounts=on"],
], ids=["default", "4k", "extl2", "rc64", "v2", "lazy"])
def test_snapshots_by_qsd_keep_their_data(tmp_path: Path, opts: list[str]) -> None:
    img = tmp_path / "a.qcow2"
    _create(img, *opts)
    run("qemu-io", "-c", "write -P 9 0 1M", str(img))
    run("qemu-img", "snapshot", "-c", "qemu", str(img))
    rng = random.Random(len(opts) * 7 + 1)
    expected: dict[str, bytes] = {"qemu": bytes([9]) * (1 << 20) + bytes(SIZE - (1 << 20))}

    async def go() -> bytes:
        model = bytearray(expected["qemu"])
        g, node = await _open(img)
        try:
            for name in ("s1", "s2", "s3"):
                await _random_writes(node, model, rng, 12)
                await node.snapshot_create(name)
                expected[name] = bytes(model)
            await _random_writes(node, model, rng, 12)
            deleted = await node.snapshot_delete(None, "s2")
            assert deleted.name == "s2"
            del expected["s2"]
            await _random_writes(node, model, rng, 6)
            await node.snapshot_delete("1", None)  # qemu-img's, by id
            del expected["qemu"]
            await _random_writes(node, model, rng, 6)
            buf = bytearray(SIZE)
            await node.read_into(0, memoryview(buf))
            assert buf == model
        finally:
            await g.delete("q")
        return bytes(model)
    active = asyncio.run(go())
    check_clean(img)
    assert [s["name"] for s in qemu_snapshots(img)] == ["s1", "s3"]
    assert [s["id"] for s in qemu_snapshots(img)] == ["2", "4"]
    for name, data in expected.items():
        assert snapshot_data(img, name) == data, name
    assert snapshot_data(img, None) == active
    run("qemu-img", "snapshot", "-a", "s1", str(img))
    assert snapshot_data(img, None) == expected["s1"]
    check_clean(img)


def test_delete_gives_freed_clusters_back_to_the_host(tmp_path: Path) -> None:
    """QEMU's file child of a format node discards (unmap) by default."""
    img = tmp_path / "a.qcow2"
    _create(img)
    run("qemu-io", "-c", "write -P 1 0 2M", str(img))

    async def go() -> None:
        g = Graph()
        node = await g.add({"driver": "qcow2", "node-name": "q", "file": {
            "driver": "file", "filename": str(img), "discard": "unmap"}})
        try:
            await node.snapshot_create("s")
            await node.write(0, b"\x02" * (2 << 20))
            await node.flush()
            before = img.stat().st_blocks
            await node.snapshot_delete(None, "s")
            assert img.stat().st_blocks <= before - (2 << 20) // 512
        finally:
            await g.delete("q")
    asyncio.run(go())
    check_clean(img)


def test_compressed_clusters_shared_with_a_snapshot(tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    img = tmp_path / "a.qcow2"
    _create(src)
    run("qemu-io", "-c", "write -P 5 0 2M", str(src))
    run("qemu-img", "convert", "-c", "-O", "qcow2", str(src), str(img))

    async def go() -> None:
        g, node = await _open(img)
        try:
            await node.snapshot_create("c")
            await node.write(70000, b"\x01" * 100)
            await node.snapshot_delete(None, "c")
            await node.snapshot_create("d")
            await node.write_zeroes(0, 65536, may_unmap=True)
        finally:
            await g.delete("q")
    asyncio.run(go())
    check_clean(img)
    assert snapshot_data(img, "d")[70000:70100] == b"\x01" * 100
    active = snapshot_data(img, None)
    assert active[:65536] == bytes(65536) and active[65536:70000] == b"\x05" * 4464


def test_refcount_overflow_refused_without_change(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    _create(img, "-o", "refcount_bits=1")
    run("qemu-io", "-c", "write -P 3 0 64k", str(img))

    async def go() -> None:
        g, node = await _open(img)
        try:
            with pytest.raises(OSError) as e:
                await node.snapshot_create("s")
            assert e.value.errno == errno.EINVAL
            assert node.snapshots() is None
            await node.write(0, b"\x04" * 512)
        finally:
            await g.delete("q")
    asyncio.run(go())
    check_clean(img)
    assert qemu_snapshots(img) == []


def test_dirty_image_with_snapshots_repaired_exactly(tmp_path: Path) -> None:
    """The repair counts data under a shared L2 table once per L1 table."""
    img = tmp_path / "a.qcow2"
    _create(img, "-o", "lazy_refcounts=on")
    run("qemu-io", "-c", "write -P 1 0 256k", str(img))
    run("qemu-img", "snapshot", "-c", "s", str(img))
    header = bytearray(img.read_bytes()[:104])
    header[79] |= 1  # incompatible features: dirty
    with open(img, "r+b") as f:
        f.seek(72)
        f.write(header[72:80])

    async def go() -> None:
        g, node = await _open(img)
        try:
            await node.write(0, b"\x02" * 4096)
        finally:
            await g.delete("q")
    asyncio.run(go())
    check_clean(img)
    assert snapshot_data(img, "s")[:4096] == b"\x01" * 4096


def test_qmp_commands_on_a_running_qsd(qsd, tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    _create(img)
    run("qemu-io", "-c", "write -P 1 0 128k", str(img))
    d = qsd("--blockdev", f"driver=file,node-name=f,filename={img}",
            "--blockdev", "driver=qcow2,node-name=q,file=f",
            "--nbd-server", f"addr.type=unix,addr.path={tmp_path / 'nbd.sock'}",
            "--export", "type=nbd,id=e,node-name=q,writable=on")
    with d.qmp() as qmp:
        assert qmp.cmd("blockdev-snapshot-internal-sync", device="q", name="a") == {}
        r = qmp.execute("blockdev-snapshot-internal-sync", {"device": "q", "name": "a"})
        assert r["error"]["desc"] == "Snapshot with name 'a' already exists on device 'q'"
        r = qmp.execute("blockdev-snapshot-internal-sync", {"device": "f", "name": "b"})
        assert r["error"]["desc"] == "Need a root block node"
        nodes = {n["node-name"]: n for n in qmp.cmd("query-named-block-nodes")}
        (listed,) = nodes["q"]["image"]["snapshots"]
        assert listed["id"] == "1" and listed["name"] == "a"
        assert listed["vm-clock-sec"] == listed["date-sec"]
        assert "snapshots" not in nodes["f"]["image"]
        r2 = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 2 0 64k",
                             f"nbd+unix:///q?socket={tmp_path / 'nbd.sock'}"],
                            capture_output=True, text=True, check=False)
        assert r2.returncode == 0, r2.stdout + r2.stderr
        assert qmp.cmd("blockdev-snapshot-internal-sync", device="q", name="b") == {}
        gone = qmp.cmd("blockdev-snapshot-delete-internal-sync", device="q", id="1")
        assert gone == listed
        r = qmp.execute("blockdev-snapshot-delete-internal-sync", {"device": "q", "name": "a"})
        assert r["error"]["desc"] == ("Snapshot with id 'null' and name 'a' does not exist on "
                                      "device 'q'")
    d.stop()
    check_clean(img)
    data = snapshot_data(img, "b")
    assert data[:65536] == b"\x02" * 65536 and data[65536:131072] == b"\x01" * 65536
    assert [s["name"] for s in qemu_snapshots(img)] == ["b"]


def test_snapshots_across_a_resize(tmp_path: Path) -> None:
    """Snapshot L1 tables of another size than the active one; disk sizes kept."""
    img = tmp_path / "a.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(img), "64k")
    run("qemu-io", "-c", "write -P 1 0 64k", str(img))

    async def go() -> None:
        g, node = await _open(img)
        try:
            await node.snapshot_create("small")
            await node.truncate(1 << 20)
            await node.write(65536, b"\x02" * 65536)
            await node.write(0, b"\x03" * 512)
            await node.snapshot_create("big")
            await node.write(65536, b"\x04" * 512)
            await node.snapshot_delete(None, "small")
        finally:
            await g.delete("q")
    asyncio.run(go())
    check_clean(img)
    big = snapshot_data(img, "big")
    assert len(big) == 1 << 20
    assert big[:512] == b"\x03" * 512 and big[512:65536] == b"\x01" * (65536 - 512)
    assert big[65536:131072] == b"\x02" * 65536
    run("qemu-img", "snapshot", "-a", "big", str(img))
    assert snapshot_data(img, None) == big
