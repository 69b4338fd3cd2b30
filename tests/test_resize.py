# SPDX-License-Identifier: GPL-2.0-or-later
"""block_resize and qcow2 resizing: the same sessions against the real QSD and
qsd give the same replies, and the images they leave read the same
(qemu-img compare), have the same size and pass qemu-img check."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from qsd.block.drivers import load_drivers
from qsd.block.graph import Graph
from qsd.qmp.errors import QMPError

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")
load_drivers()

MiB = 1 << 20


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def img_info(path: Path) -> dict[str, Any]:
    return json.loads(run("qemu-img", "info", "--output=json", str(path)))


def check(path: Path) -> dict[str, Any]:
    res = subprocess.run(["qemu-img", "check", "--output=json", str(path)],
                         capture_output=True, text=True, check=False)
    return json.loads(res.stdout)


def make(path: Path, *opts: str, size: str = "8M") -> None:
    run("qemu-img", "create", "-q", "-f", "qcow2", *opts, str(path), size)
    run("qemu-io", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 3M 64k",
        "-c", "write -P 0x33 7M 1M", str(path))


def session(factory: Any, image: Path, steps: list[tuple[str, dict[str, Any]]],
            read_only: bool = False) -> list[Any]:
    d = factory("--blockdev", f"driver=qcow2,node-name=q,read-only={'on' if read_only else 'off'},"
                f"file.driver=file,file.filename={image}")
    out = []
    with d.qmp() as q:
        for cmd, args in steps:
            r = q.execute(cmd, args)
            out.append(r.get("return", r.get("error")))
        q.execute("quit")
    d.wait()
    return out


def both(qemu_sd: Any, qsd: Any, workdir: Path, steps: list[tuple[str, dict[str, Any]]],
         *create_opts: str, read_only: bool = False) -> tuple[Path, Path, list[Any]]:
    a, b = workdir / "qemu.qcow2", workdir / "qsd.qcow2"
    make(a, *create_opts)
    shutil.copy(a, b)
    ra = session(qemu_sd, a, steps, read_only)
    rb = session(qsd, b, steps, read_only)
    assert rb == ra
    return a, b, ra


def same_images(a: Path, b: Path) -> None:
    ia, ib = img_info(a), img_info(b)
    assert ib["virtual-size"] == ia["virtual-size"]
    run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(a), str(b))
    cb = check(b)
    assert cb.get("corruptions", 0) == 0 and cb.get("leaks", 0) == 0, cb


SIZES = [("grow", 12 * MiB), ("grow-big", 3 << 30), ("shrink", 4 * MiB - 512),
         ("shrink-to-cluster", 2 * MiB), ("same", 8 * MiB)]


@pytest.mark.parametrize("what,size", SIZES, ids=[s[0] for s in SIZES])
def test_block_resize_differential(qemu_sd: Any, qsd: Any, workdir: Path, what: str,
                                   size: int) -> None:
    steps = [("block_resize", {"node-name": "q", "size": size}),
             ("query-named-block-nodes", {})]
    a, b, replies = both(qemu_sd, qsd, workdir, steps[:1])
    assert replies == [{}]
    same_images(a, b)
    if size < 8 * MiB:  # the file gives the cropped clusters back, as QEMU's does
        assert b.stat().st_size <= a.stat().st_size + 65536


def test_block_resize_shrink_then_grow_reads_zeroes(qemu_sd: Any, qsd: Any,
                                                    workdir: Path) -> None:
    steps = [("block_resize", {"node-name": "q", "size": 1 * MiB}),
             ("block_resize", {"node-name": "q", "size": 16 * MiB})]
    a, b, replies = both(qemu_sd, qsd, workdir, steps, "-o", "cluster_size=4096")
    assert replies == [{}, {}]
    same_images(a, b)


ERRORS = [
    ("unaligned", [("block_resize", {"node-name": "q", "size": 1000})], ()),
    ("negative", [("block_resize", {"node-name": "q", "size": -512})], ()),
    ("no-node", [("block_resize", {"node-name": "nope", "size": 512})], ()),
    ("device", [("block_resize", {"device": "d", "size": 512})], ()),
    ("nothing", [("block_resize", {"size": 512})], ()),
    ("v2-snapshots", [("blockdev-snapshot-internal-sync", {"device": "q", "name": "s"}),
                      ("block_resize", {"node-name": "q", "size": 16 * MiB})],
     ("-o", "compat=0.10")),
    ("v3-snapshots", [("blockdev-snapshot-internal-sync", {"device": "q", "name": "s"}),
                      ("block_resize", {"node-name": "q", "size": 2 * MiB}),
                      ("block_resize", {"node-name": "q", "size": 16 * MiB})], ()),
]


@pytest.mark.parametrize("name,steps,opts", ERRORS, ids=[e[0] for e in ERRORS])
def test_block_resize_errors(qemu_sd: Any, qsd: Any, workdir: Path, name: str,
                             steps: list[tuple[str, dict[str, Any]]], opts: tuple[str, ...]) -> None:
    a, b, _ = both(qemu_sd, qsd, workdir, steps, *opts)
    same_images(a, b)


def test_block_resize_read_only(qemu_sd: Any, qsd: Any, workdir: Path) -> None:
    both(qemu_sd, qsd, workdir, [("block_resize", {"node-name": "q", "size": 16 * MiB})],
         read_only=True)


def test_block_resize_inconsistent_bitmap(qemu_sd: Any, qsd: Any, workdir: Path) -> None:
    """A bitmap stored IN_USE (not closed cleanly) forbids resizing."""
    a, b = workdir / "qemu.qcow2", workdir / "qsd.qcow2"
    make(a)
    run("qemu-img", "bitmap", "--add", str(a), "bm")
    raw = bytearray(a.read_bytes())
    import struct
    pos = struct.unpack_from(">I", raw, 100)[0]
    while True:
        t, length = struct.unpack_from(">II", raw, pos)
        if t == 0x23852875:
            dir_off = struct.unpack_from(">Q", raw, pos + 8 + 16)[0]
            break
        pos += 8 + (length + 7) // 8 * 8
    raw[dir_off + 15] |= 1  # flags: in_use
    a.write_bytes(bytes(raw))
    shutil.copy(a, b)
    steps = [("block_resize", {"node-name": "q", "size": 16 * MiB})]
    assert session(qsd, b, steps) == session(qemu_sd, a, steps)


@pytest.mark.parametrize("prealloc", ["metadata", "falloc", "full"])
def test_qcow2_grow_preallocated(workdir: Path, prealloc: str) -> None:
    img = workdir / "p.qcow2"
    make(img)

    async def go() -> None:
        g = Graph()
        node = await g.add({"driver": "qcow2", "node-name": "q",
                            "file": {"driver": "file", "filename": str(img)}})
        await node.truncate(20 * MiB + 512, prealloc=prealloc)
        with pytest.raises(QMPError, match="^Preallocation can't be used for shrinking an "
                                           "image$"):
            await node.truncate(MiB, prealloc=prealloc)
        with pytest.raises(QMPError, match="^Unsupported preallocation mode 'bogus'$"):
            await node.truncate(30 * MiB, prealloc="bogus")
        await g.close_all()
    asyncio.run(go())
    assert img_info(img)["virtual-size"] == 20 * MiB + 512
    c = check(img)
    assert c.get("corruptions", 0) == 0 and c.get("leaks", 0) == 0, c
    mapping = json.loads(run("qemu-img", "map", "--output=json", str(img)))
    tail = [m for m in mapping if m["start"] + m["length"] > 8 * MiB]
    assert tail and all(m["data"] and "offset" in m for m in tail)
    raw = workdir / "p.raw"
    run("qemu-img", "convert", "-O", "raw", str(img), str(raw))
    data = raw.read_bytes()
    assert data[7 * MiB:8 * MiB] == b"\x33" * MiB and data[8 * MiB:] == bytes(12 * MiB + 512)
