# SPDX-License-Identifier: GPL-2.0-or-later
"""qcow2: images made by QEMU read back identically, images written and
created by qsd pass ``qemu-img check`` and compare equal, hostile images
are refused with a clear error."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qsd.block.drivers import load_drivers
from qsd.block.graph import Graph
from qsd.block.node import DRIVERS, CreateContext
from qsd.qmp.errors import QMPError

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")
load_drivers()

MiB = 1 << 20


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def qemu_io(path: Path, *cmds: str, fmt: str = "qcow2") -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    run(*argv, str(path))


def raw_hash(path: Path) -> str:
    out = path.with_suffix(".convert.raw")
    run("qemu-img", "convert", "-O", "raw", str(path), str(out))
    h = hashlib.sha256(out.read_bytes()).hexdigest()
    out.unlink()
    return h


async def _open(path: Path, **opts: Any) -> tuple[Graph, Any]:
    g = Graph()
    node = await g.add({"driver": "qcow2", "node-name": "q",
                        "file": {"driver": "file", "filename": str(path)}, **opts})
    return g, node


async def _read_all(path: Path, **opts: Any) -> bytes:
    g, node = await _open(path, **opts)
    try:
        return bytes(await node.read(0, node.size))
    finally:
        await g.close_all()


def check_clean(path: Path) -> None:
    r = subprocess.run(["qemu-img", "check", "--output=json", str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    info = json.loads(r.stdout)
    assert not info.get("corruptions") and not info.get("leaks"), info


PATTERNS = ("write -P 0x41 0 300k", "write -z 1M 128k", "write -P 0x42 1100k 5k",
            "write -P 0x43 7M 1M", "discard 7M 64k", "write -P 0x44 3M 512")

MATRIX = [
    "compat=1.1", "compat=0.10", "cluster_size=512", "cluster_size=2M",
    "cluster_size=4096,refcount_bits=1", "refcount_bits=2", "refcount_bits=64",
    "extended_l2=on", "extended_l2=on,cluster_size=16k", "lazy_refcounts=on",
    "compression_type=zstd", "data_file={dir}/d.raw", "data_file={dir}/d.raw,data_file_raw=on",
]


def make_image(tmp_path: Path, opts: str, size: str = "8M") -> Path:
    path = tmp_path / "m.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts.format(dir=tmp_path),
        str(path), size)
    qemu_io(path, *PATTERNS)
    return path


@pytest.mark.parametrize("opts", MATRIX)
def test_read_matrix(tmp_path: Path, opts: str) -> None:
    path = make_image(tmp_path, opts)
    assert hashlib.sha256(asyncio.run(_read_all(path))).hexdigest() == raw_hash(path)


@pytest.mark.parametrize("ctype,cluster", [("zlib", "4096"), ("zstd", "65536"), ("zlib", "2M")])
def test_read_compressed(tmp_path: Path, ctype: str, cluster: str) -> None:
    src = tmp_path / "src.raw"
    data = bytearray(random.Random(1).randbytes(1 << 20)) * 3 + bytes(MiB)
    src.write_bytes(data)
    path = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o",
        f"compression_type={ctype},cluster_size={cluster}", str(src), str(path))
    assert asyncio.run(_read_all(path)) == data


def test_read_backing_chain(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "4M")
    qemu_io(base, "write -P 0x11 0 1M", "write -P 0x22 2M 64k")
    mid = tmp_path / "mid.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
        str(mid), "6M")
    qemu_io(mid, "write -P 0x33 512k 100k")
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
        str(top), "8M")
    qemu_io(top, "write -z 2M 4k", "write -P 0x66 5M 10k")
    expected = raw_hash(top)

    async def go() -> None:
        g, node = await _open(top)
        try:
            data = await node.read(0, node.size)
            assert hashlib.sha256(data).hexdigest() == expected
            ext = await node.block_status(0, 64 * 1024)
            assert ext[0].depth == 3 and ext[0].data and ext[0].host_fd >= 0
            # Past the end of the shorter mid.qcow2: zeroes allocated there,
            # as QEMU's block_status_above (allocation depth, stream) sees it.
            ext = await node.block_status(7 * MiB, MiB)
            assert ext[0].depth == 2 and ext[0].zero and not ext[0].data
            names = {n.node_name for n in g.nodes.values()}
            assert len(names) == 6  # three formats and their files, backing ones generated
            assert node.children["backing"].child.read_only
        finally:
            await g.close_all()

    asyncio.run(go())
    # backing: null cuts the chain
    data = asyncio.run(_read_all(top, backing=None))
    assert data[:MiB] == bytes(MiB)


async def _random_io(path: Path, seed: int, ops: int, model: bytearray) -> None:
    rnd = random.Random(seed)
    g, node = await _open(path, discard="unmap")
    try:
        size = node.size
        for _ in range(ops):
            op = rnd.choice("wwwzd")
            off = rnd.randrange(size)
            n = min(size - off, rnd.choice([1, 512, 4096, 65536, 200000, MiB]))
            if op == "w":
                data = bytes([rnd.randrange(1, 256)]) * n
                await node.write(off, data)
                model[off:off + n] = data
            elif op == "z":
                await node.write_zeroes(off, n, may_unmap=rnd.random() < 0.5)
                model[off:off + n] = bytes(n)
            else:
                await node.discard(off, n)
                cs = node.cs
                s, e = -(-off // cs) * cs, (off + n) // cs * cs
                if s < e and (node.header.version >= 3 or node.backing_node is None):
                    model[s:e] = bytes(e - s)
            if rnd.random() < 0.1:
                await node.flush()
        assert await node.read(0, size) == model
    finally:
        await g.close_all()


@pytest.mark.parametrize("opts", MATRIX)
def test_write_matrix(tmp_path: Path, opts: str) -> None:
    path = make_image(tmp_path, opts)
    exp = tmp_path / "exp.raw"
    run("qemu-img", "convert", "-O", "raw", str(path), str(exp))
    model = bytearray(exp.read_bytes())
    asyncio.run(_random_io(path, hash(opts) & 0xFFFF, 80, model))
    exp.write_bytes(model)
    check_clean(path)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(path), str(exp))


def test_write_over_backing(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "8M")
    qemu_io(base, "write -P 0x11 0 8M")
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
        str(top))
    model = bytearray(b"\x11" * (8 * MiB))
    asyncio.run(_random_io(top, 5, 80, model))
    exp = tmp_path / "exp.raw"
    exp.write_bytes(model)
    check_clean(top)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(top), str(exp))


def test_grow(tmp_path: Path) -> None:
    path = tmp_path / "g.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(path), "1M")

    async def go() -> None:
        g, node = await _open(path)
        try:
            await node.truncate(300 * MiB)
            await node.write(299 * MiB, b"x" * 4096)
            await node.flush()
            grown = path.stat().st_size
            await node.truncate(MiB)  # drops the cluster at 299M and its L2 table
            assert path.stat().st_size < grown
        finally:
            await g.close_all()

    asyncio.run(go())
    check_clean(path)
    assert json.loads(run("qemu-img", "info", "--output=json", str(path)))["virtual-size"] \
        == MiB


CREATE_CASES: list[dict[str, Any]] = [
    {},
    {"version": "v2"},
    {"cluster-size": 512, "refcount-bits": 1},
    {"cluster-size": 2 * MiB, "preallocation": "full"},
    {"extended-l2": True, "lazy-refcounts": True, "compression-type": "zstd"},
    {"preallocation": "metadata"},
    {"preallocation": "falloc", "refcount-bits": 64},
    {"backing-file": "base.qcow2", "backing-fmt": "qcow2"},
    {"size": 3 << 40},
]


async def _create(path: Path, opts: dict[str, Any], data: Path | None = None) -> None:
    path.write_bytes(b"")
    g = Graph()
    try:
        await g.add({"driver": "file", "node-name": "f", "filename": str(path)})
        o: dict[str, Any] = {"driver": "qcow2", "file": "f", "size": 64 * MiB}
        if data is not None:
            data.write_bytes(b"")
            await g.add({"driver": "file", "node-name": "d", "filename": str(data)})
            o["data-file"] = "d"
        o.update(opts)
        await DRIVERS["qcow2"].create(CreateContext(g, None), o)  # type: ignore[arg-type]
    finally:
        await g.close_all()


@pytest.mark.parametrize("opts", CREATE_CASES, ids=lambda o: json.dumps(o))
def test_create(tmp_path: Path, opts: dict[str, Any]) -> None:
    run("qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "base.qcow2"), "64M")
    path = tmp_path / "new.qcow2"
    asyncio.run(_create(path, opts))
    check_clean(path)
    info = json.loads(run("qemu-img", "info", "--output=json", str(path)))
    spec = info["format-specific"]["data"]
    assert info["virtual-size"] == opts.get("size", 64 * MiB)
    assert info["cluster-size"] == opts.get("cluster-size", 65536)
    assert spec["compat"] == ("0.10" if opts.get("version") == "v2" else "1.1")
    assert spec["refcount-bits"] == opts.get("refcount-bits", 16)
    assert spec["compression-type"] == opts.get("compression-type", "zlib")
    if opts.get("version") != "v2":
        assert spec["extended-l2"] == opts.get("extended-l2", False)
        assert spec["lazy-refcounts"] == opts.get("lazy-refcounts", False)
    if "backing-file" in opts:
        assert info["backing-filename"] == opts["backing-file"]
        assert info["backing-filename-format"] == opts["backing-fmt"]
    # and qsd writes into it cleanly
    model = bytearray(min(info["virtual-size"], 64 * MiB))
    if "backing-file" not in opts and opts.get("size") is None:
        asyncio.run(_random_io(path, 3, 30, model))
        check_clean(path)


def test_create_data_file(tmp_path: Path) -> None:
    path, data = tmp_path / "n.qcow2", tmp_path / "n.data"
    asyncio.run(_create(path, {"data-file-raw": True}, data))
    check_clean(path)
    spec = json.loads(run("qemu-img", "info", "--output=json", str(path)))["format-specific"]
    assert spec["data"]["data-file"] == str(data) and spec["data"]["data-file-raw"] is True
    qemu_io(path, "write -P 0x5a 1M 64k")
    assert data.read_bytes()[MiB:MiB + 65536] == b"\x5a" * 65536


@pytest.mark.parametrize("opts,text", [
    ({"cluster-size": 1000}, "Cluster size must be a power of two between 512 and 2048k"),
    ({"version": "v2", "lazy-refcounts": True}, "Lazy refcounts only supported"),
    ({"refcount-bits": 3}, "Refcount width must be a power of two"),
    ({"extended-l2": True, "cluster-size": 4096}, "at least 16384 bytes"),
    ({"backing-file": "x", "preallocation": "full"}, "Backing file and preallocation"),
    ({"encrypt": {"format": "luks"}}, "Parameter .encrypt.key-secret. is required for cipher"),
])
def test_create_errors(tmp_path: Path, opts: dict[str, Any], text: str) -> None:
    with pytest.raises(QMPError, match=text):
        asyncio.run(_create(tmp_path / "e.qcow2", opts))


def test_info(tmp_path: Path) -> None:
    path = tmp_path / "i.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(path), "1M")

    async def go() -> None:
        g, node = await _open(path)
        try:
            assert node.cluster_size() == 65536
            assert node.format_specific() == {"type": "qcow2", "data": {
                "compat": "1.1", "extended-l2": False, "lazy-refcounts": True, "corrupt": False,
                "refcount-bits": 16, "compression-type": "zlib"}}
            assert not node.dirty_flag()
            await node.write(0, b"a")
            assert node.dirty_flag()  # lazy refcounts: dirty while in use
        finally:
            await g.close_all()

    asyncio.run(go())
    check_clean(path)


def test_dirty_image_repaired(tmp_path: Path) -> None:
    path = tmp_path / "d.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(path), "4M")
    qemu_io(path, "write -P 1 0 1M")
    with open(path, "r+b") as f:  # leak two clusters and set the dirty bit
        f.seek(72)
        f.write(struct.pack(">Q", 1))
    asyncio.run(_read_all(path))
    check_clean(path)


# ----- hostile images ------------------------------------------------------

def _mutate(base: bytes, off: int, fmt: str, value: int) -> bytes:
    b = bytearray(base)
    struct.pack_into(fmt, b, off, value)
    return bytes(b)


@pytest.fixture(scope="module")
def small_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    d = tmp_path_factory.mktemp("q")
    path = d / "s.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(path), "1M")
    qemu_io(path, "write -P 7 0 64k", "write -P 8 512k 8k")
    return path.read_bytes()


async def _try_open_read(path: Path, read_only: bool = True) -> bytes | None:
    g = Graph()
    try:
        node = await g.add({"driver": "qcow2", "node-name": "q", "read-only": read_only,
                            "file": {"driver": "file", "filename": str(path),
                                     "read-only": read_only}})
        return bytes(await node.read(0, min(node.size, 4 * MiB)))
    except (QMPError, OSError):
        return None
    finally:
        await g.close_all()


@pytest.mark.parametrize("off,fmt,value,text", [
    (0, ">I", 0, "Image is not in qcow2 format"),
    (4, ">I", 4, "Unsupported qcow2 version 4"),
    (20, ">I", 30, "Unsupported cluster size: 2^30"),
    (36, ">I", 1 << 31, "Active L1 table too large"),
    (40, ">Q", 4096 * 1 + 8, "Active L1 table offset invalid"),
    (40, ">Q", (1 << 64) - 4096, "Active L1 table offset invalid"),
    (40, ">Q", 4096, "overlaps the reference count table"),
    (48, ">Q", 1 << 62, "Reference count table offset invalid"),
    (56, ">I", 1 << 30, "Reference count table too large"),
    (72, ">Q", 1 << 40, "Unsupported qcow2 feature(s): Unknown incompatible feature: 10000000000"),
    (96, ">I", 7, "Reference count entry width too large"),
    (100, ">I", 1 << 20, "qcow2 header exceeds cluster size"),
    (36, ">I", 0, "L1 table is too small"),
])
def test_hostile_header(tmp_path: Path, small_image: bytes, off: int, fmt: str, value: int,
                        text: str) -> None:
    path = tmp_path / "h.qcow2"
    path.write_bytes(_mutate(small_image, off, fmt, value))
    g = Graph()
    with pytest.raises(QMPError) as e:
        asyncio.run(g.add({"driver": "qcow2", "node-name": "q",
                           "file": {"driver": "file", "filename": str(path)}}))
    assert text in e.value.desc


def test_corrupt_bit(tmp_path: Path, small_image: bytes) -> None:
    path = tmp_path / "c.qcow2"
    path.write_bytes(_mutate(small_image, 72, ">Q", 2))
    with pytest.raises(QMPError, match="Image is corrupt; cannot be opened read/write"):
        asyncio.run(_open(path))
    assert asyncio.run(_try_open_read(path)) is not None


def test_overlap_check_refuses_metadata_write(tmp_path: Path, small_image: bytes) -> None:
    """An L2 entry pointing at the L1 table: the write is refused, image marked corrupt."""
    path = tmp_path / "o.qcow2"
    path.write_bytes(small_image)
    l1_off = struct.unpack_from(">Q", small_image, 40)[0]
    l2_off = struct.unpack_from(">Q", small_image, l1_off)[0] & 0x00FFFFFFFFFFFE00
    b = bytearray(small_image)
    struct.pack_into(">Q", b, l2_off, l1_off | 1 << 63)
    path.write_bytes(b)

    async def go() -> None:
        g, node = await _open(path)
        try:
            with pytest.raises(OSError):
                await node.write(0, b"z" * 4096)
        finally:
            await g.close_all()

    asyncio.run(go())
    assert struct.unpack_from(">Q", path.read_bytes(), 72)[0] & 2


@settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_hostile_mutations(tmp_path: Path, small_image: bytes, data: st.DataObject) -> None:
    """Random overwrites of header, L1, L2 and refcount structures: open and
    read either work or fail with QMPError/OSError -- no other exception."""
    b = bytearray(small_image)
    regions = [(0, 112), (4096, 4096 + 64), (3 * 4096, 3 * 4096 + 64), (2 * 4096, 2 * 4096 + 64),
               (4 * 4096, 4 * 4096 + 256)]
    for _ in range(data.draw(st.integers(1, 4))):
        lo, hi = data.draw(st.sampled_from(regions))
        pos = data.draw(st.integers(lo, hi - 1))
        blob = data.draw(st.binary(min_size=1, max_size=8))
        b[pos:pos + len(blob)] = blob
    path = tmp_path / "fz.qcow2"
    path.write_bytes(b)
    asyncio.run(_try_open_read(path))
    asyncio.run(_try_open_read(path, read_only=False))


# ----- end to end through the daemon --------------------------------------

def test_nbd_export_end_to_end(qsd, workdir: Path, require_tool) -> None:
    require_tool("qemu-io")
    path = workdir / "e.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M")
    sock = workdir / "nbd.sock"
    d = qsd("--blockdev", f"driver=qcow2,node-name=q,discard=unmap,file.driver=file,"
            f"file.filename={path}",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e0,node-name=q,name=q,writable=on",
            wait_for=[sock])
    url = f"nbd+unix:///q?socket={sock}"
    run("qemu-io", "-f", "raw", "-c", "write -P 0x61 0 1M", "-c", "write -P 0x62 3M 4k",
        "-c", "write -z 8M 2M", "-c", "write -P 0x63 8M 512", "-c", "discard 0 64k",
        "-c", "write -P 0x64 15M 1M", "-c", "flush", url)
    out = run("qemu-io", "-f", "raw", "-c", "read -P 0x61 64k 960k", "-c", "read -P 0x62 3M 4k",
              "-c", "read -P 0x64 15M 1M", "-c", "read -P 0 0 64k", url)
    assert "Pattern verification failed" not in out
    d.stop()
    check_clean(path)
    exp = bytearray(16 * MiB)
    exp[64 * 1024:MiB] = b"\x61" * (MiB - 64 * 1024)
    exp[3 * MiB:3 * MiB + 4096] = b"\x62" * 4096
    exp[8 * MiB:8 * MiB + 512] = b"\x63" * 512
    exp[15 * MiB:16 * MiB] = b"\x64" * MiB
    raw = workdir / "e.raw"
    raw.write_bytes(exp)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(path), str(raw))


def test_concurrent_writes_into_new_clusters(tmp_path: Path) -> None:
    """Writes allocating a cluster run outside the node lock: concurrent
    writes into the same new cluster, zero writes and discards on it wait
    for the allocation, and nothing written is lost."""
    path = tmp_path / "c.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(path), "4M")
    want = bytearray(4 * MiB)
    ops: list[tuple[str, int, int]] = []
    rnd = random.Random(7)
    for _ in range(400):
        off = rnd.randrange(0, 4 * MiB // 512) * 512
        n = min(rnd.choice([512, 1024, 4096]), 4 * MiB - off)
        ops.append((rnd.choice(["w", "w", "w", "z", "d"]), off, n))

    async def go() -> None:
        g, node = await _open(path, discard="unmap")
        try:
            async def one(i: int, kind: str, off: int, n: int) -> None:
                if kind == "w":
                    await node.write(off, bytes([i % 251 + 1]) * n)
                elif kind == "z":
                    await node.write_zeroes(off, n)
                else:
                    await node.discard(off, n)
            # Concurrent batches of requests on disjoint ranges (overlapping
            # concurrent requests have no defined order).
            pending: list[tuple[int, tuple[str, int, int]]] = list(enumerate(ops))
            while pending:
                batch, rest, used = [], [], []
                for i, (kind, off, n) in pending:
                    if any(not (off + n <= a or b <= off) for a, b in used):
                        rest.append((i, (kind, off, n)))
                        continue
                    used.append((off, off + n))
                    batch.append((i, (kind, off, n)))
                await asyncio.gather(*(one(i, *op) for i, op in batch))
                for i, (kind, off, n) in batch:
                    if kind == "w":
                        want[off:off + n] = bytes([i % 251 + 1]) * n
                    elif kind == "z":
                        want[off:off + n] = bytes(n)
                    else:  # discard: whole clusters inside the range read as zeroes
                        a, b = -(-off // 4096) * 4096, (off + n) // 4096 * 4096
                        if a < b:
                            want[a:b] = bytes(b - a)
                pending = rest
            got = await node.read(0, 4 * MiB)
            assert bytes(got) == bytes(want)
        finally:
            await g.close_all()

    asyncio.run(go())
    check_clean(path)
    out = path.with_suffix(".raw")
    run("qemu-img", "convert", "-O", "raw", str(path), str(out))
    assert out.read_bytes() == bytes(want)
