# SPDX-License-Identifier: GPL-2.0-or-later
"""The compress filter over qcow2: clusters written through it are stored
compressed (zlib, zstd), QEMU reads them identically (qemu-img compare),
qemu-img check is clean, incompressible clusters are stored plainly, and
QEMU's refusals (allocated clusters, non-qcow2 child) hold."""

from __future__ import annotations

import asyncio
import json
import os
import random
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

KiB = 1024


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@pytest.mark.parametrize("ctype,cluster", [("zlib", 65536), ("zstd", 65536), ("zlib", 4096),
                                           ("zstd", 512)])
def test_compressed_writes(workdir: Path, ctype: str, cluster: int) -> None:
    img = workdir / "c.qcow2"
    size = 64 * cluster + 1536   # a short last cluster
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o",
        f"compression_type={ctype},cluster_size={cluster}", str(img), str(size))
    want = bytearray(size)
    rnd = random.Random(cluster)

    def text(n: int) -> bytes:
        words = [b"qsd ", b"qcow2 ", b"cluster ", b"zstd ", b"zlib ", b"data "]
        out = b"".join(rnd.choice(words) for _ in range(n // 3))
        return out[:n]

    async def go() -> None:
        g = Graph()
        node = await g.add({"driver": "compress", "node-name": "c",
                            "file": {"driver": "qcow2", "node-name": "q",
                                     "file": {"driver": "file", "filename": str(img)}}})
        try:
            writes = [(0, text(4 * cluster)),                  # whole clusters
                      (8 * cluster, os.urandom(cluster)),      # incompressible: stored plainly
                      (10 * cluster + 100, text(700)),         # partial: rest read first
                      (20 * cluster, bytes(cluster)),          # zeroes compress too
                      (63 * cluster, text(cluster + 1536))]    # up to the short end
            for off, data in writes:
                await node.write(off, data)
                want[off:off + len(data)] = data
            with pytest.raises(OSError) as e:              # compression can't overwrite
                await node.write(0, text(cluster))
            assert e.value.errno == 5
            await node.write_zeroes(30 * cluster, cluster)
            assert bytes(await node.read(0, size)) == bytes(want)
        finally:
            await g.close_all()
    asyncio.run(go())
    out = json.loads(subprocess.run(["qemu-img", "check", "--output=json", str(img)],
                                    capture_output=True, text=True, check=False).stdout)
    assert out.get("corruptions", 0) == 0 and out.get("leaks", 0) == 0, out
    assert out["compressed-clusters"] >= 6, out
    raw = workdir / "want.raw"
    raw.write_bytes(bytes(want))
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(img), str(raw))
    info = json.loads(run("qemu-img", "info", "--output=json", str(img)))
    assert info["format-specific"]["data"]["compression-type"] == ctype


def test_compress_needs_qcow2(workdir: Path, qemu_sd: Any) -> None:
    img = workdir / "r.raw"
    img.write_bytes(bytes(1 << 20))
    d = qemu_sd()
    with d.qmp() as q:
        r = q.execute("blockdev-add", {"driver": "compress", "node-name": "c",
                                       "file": {"driver": "file", "filename": str(img)}})
    d.stop()

    async def go() -> None:
        g = Graph()
        with pytest.raises(QMPError) as e:
            await g.add({"driver": "compress", "node-name": "c",
                         "file": {"driver": "file", "filename": str(img)}})
        assert e.value.desc == r["error"]["desc"]
        await g.close_all()
    asyncio.run(go())


def test_qemu_compressed_and_ours_share_an_image(workdir: Path) -> None:
    """Clusters QEMU compressed (qemu-img convert -c) and clusters qsd
    compresses into the same image afterwards read back right."""
    src = workdir / "src.raw"
    data = bytearray((b"0123456789abcdef" * 4096) * 16)   # 1 MiB
    src.write_bytes(bytes(data))
    img = workdir / "mix.qcow2"
    run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(src), str(img))
    run("qemu-img", "resize", str(img), "2M")

    async def go() -> None:
        g = Graph()
        node = await g.add({"driver": "compress", "node-name": "c",
                            "file": {"driver": "qcow2", "node-name": "q",
                                     "file": {"driver": "file", "filename": str(img)}}})
        await node.write(1 << 20, b"xyz" * (64 * KiB // 3) + b"x")
        await g.close_all()
    asyncio.run(go())
    data += b"xyz" * (64 * KiB // 3) + b"x"
    data += bytes((2 << 20) - len(data))
    want = workdir / "want.raw"
    want.write_bytes(bytes(data))
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(img), str(want))
    out = json.loads(subprocess.run(["qemu-img", "check", "--output=json", str(img)],
                                    capture_output=True, text=True, check=False).stdout)
    assert out.get("corruptions", 0) == 0 and out.get("leaks", 0) == 0, out
