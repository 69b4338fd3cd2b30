# SPDX-License-Identifier: GPL-2.0-or-later
"""The ``raw`` format and the ``null-co``/``null-aio`` drivers."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

# Importing the driver modules registers them in DRIVERS.
import qsd.block.formats.raw
import qsd.block.protocols.file
import qsd.block.protocols.null  # noqa: F401
from qsd.block.node import DRIVERS, Node, Perm, Role
from qsd.qmp.errors import GenericError

QSD = "qemu-storage-daemon"


@pytest.fixture
def qemu_tools(require_tool: Any) -> None:
    """QEMU 7.2's tools are the oracle: skip without them (fail under CI)."""
    for tool in ("qemu-storage-daemon", "qemu-img", "qemu-io"):
        require_tool(tool)


needs_qemu = pytest.mark.usefixtures("qemu_tools")


class FakeEdge:
    def __init__(self, child: Node, role: Role) -> None:
        self.child = child
        self.role = role


class FakeGraph:
    """Just enough graph for raw: open inline children, look up named ones."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}

    async def add(self, options: dict[str, Any]) -> Node:
        node = DRIVERS[options["driver"]](self, options.get("node-name", "#anon"), options)
        await node.open(options)
        self.nodes[node.node_name] = node
        return node

    async def open_child(self, parent: Node, name: str, ref: Any, role: Role) -> Node:
        child = self.nodes[ref] if isinstance(ref, str) else await self.add(ref)
        parent.children[name] = FakeEdge(child, role)  # type: ignore[assignment]
        return child


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def qsd_error(cwd: Path, *blockdevs: str) -> str:
    r = subprocess.run([QSD, *(a for b in blockdevs for a in ("--blockdev", b))], cwd=cwd,
                       capture_output=True, text=True, timeout=10, check=False)
    assert r.returncode == 1, r
    prefix = f"qemu-storage-daemon: --blockdev {blockdevs[-1]}: "
    assert r.stderr.startswith(prefix), r.stderr
    return r.stderr[len(prefix):].rstrip("\n")


async def our_error(*options: dict[str, Any]) -> str:
    graph = FakeGraph()
    for opts in options[:-1]:
        await graph.add(opts)
    with pytest.raises(GenericError) as exc:
        await graph.add(options[-1])
    return exc.value.desc


# ----- raw ------------------------------------------------------------------------
RAW_ERROR_CASES = [
    {"offset": 2000000},
    {"offset": 1048577},
    {"size": 1000},
    {"offset": 512, "size": 1048065},
    {"size": 2000000},
    {"size": 1000, "offset": 1048000},
    {"size": 2000000, "offset": 2000000},
    {"offset": 9223372036854775807},
]


@needs_qemu
@pytest.mark.parametrize("window", RAW_ERROR_CASES)
def test_raw_window_errors_match_qsd(tmp_path: Path, window: dict[str, int]) -> None:
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    file_opts = {"driver": "file", "node-name": "f", "filename": str(tmp_path / "disk.img")}
    raw_opts = {"driver": "raw", "node-name": "r", "file": "f", **window}
    theirs = qsd_error(tmp_path, f"driver=file,node-name=f,filename={tmp_path / 'disk.img'}",
                       "driver=raw,node-name=r,file=f," +
                       ",".join(f"{k}={v}" for k, v in window.items()))
    assert run(our_error(file_opts, raw_opts)) == theirs


@pytest.mark.parametrize("window,name", [({"offset": -1}, "offset"), ({"size": -512}, "size"),
                                         ({"offset": -512, "size": 512}, "offset")])
def test_raw_negative_values(window: dict[str, int], name: str) -> None:
    """As QSD's QMP answers (raw parses its window like a size option)."""
    desc = run(our_error({"driver": "null-co", "node-name": "n"},
                         {"driver": "raw", "node-name": "r", "file": "n", **window}))
    assert desc == f"Parameter '{name}' expects a non-negative number below 2^64"


@needs_qemu
def test_raw_window_io_against_qemu_io(tmp_path: Path) -> None:
    path = tmp_path / "w.img"
    path.write_bytes(bytes(1 << 20))

    async def main() -> None:
        graph = FakeGraph()
        raw = await graph.add({"driver": "raw", "node-name": "r", "offset": 4096, "size": 65536,
                               "file": {"driver": "file", "filename": str(path)}})
        assert raw.size == 65536 and raw.is_format
        assert raw.children["file"].role == Role.DATA | Role.PRIMARY
        await raw.write(0, b"\x61" * 512)
        await raw.write_zeroes(512, 512)
        await raw.flush()
        assert raw.host_extent(0, 512) == (raw.file.fd, 4096)  # type: ignore[attr-defined]
        ext = await raw.block_status(0, 65536)
        assert ext[0].offset == 0 and ext[0].host_offset == 4096
        with pytest.raises(GenericError) as exc:
            await raw.truncate(1 << 16)
        assert exc.value.desc == "Cannot resize fixed-size raw disks"

    run(main())
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x61 4096 512", "-c",
                        "read -P 0 0 4096", str(path)], capture_output=True, text=True,
                       check=False)
    assert "verification failed" not in r.stdout and r.returncode == 0, r.stdout
    subprocess.run(["qemu-io", "-c", "write -P 0x62 1000 24", "--image-opts",
                    f"driver=raw,offset=4096,size=65536,file.driver=file,file.filename={path}"],
                   check=True, capture_output=True)

    async def readback() -> None:
        graph = FakeGraph()
        raw = await graph.add({"driver": "raw", "node-name": "r", "offset": 4096,
                               "file": {"driver": "file", "filename": str(path)}})
        assert raw.size == (1 << 20) - 4096
        assert await raw.read(1000, 24) == b"\x62" * 24

    run(readback())


@needs_qemu
def test_raw_unaligned_offset_and_tail(tmp_path: Path) -> None:
    """QSD: virtual size rounds up to 512; bytes past the child's end read as zero."""
    odd = tmp_path / "odd.img"
    data = os.urandom(1000)
    odd.write_bytes(data)

    async def main() -> None:
        graph = FakeGraph()
        await graph.add({"driver": "file", "node-name": "f", "filename": str(odd)})
        sizes = []
        for offset in (100, 1000, 1024, 1001):
            raw = DRIVERS["raw"](graph, "r", {"file": "f", "offset": offset})
            await raw.open({"file": "f", "offset": offset})
            sizes.append(raw.size)
        assert sizes == [1024, 512, 0, 512]  # as query-named-block-nodes shows them
        raw = DRIVERS["raw"](graph, "r", {"file": "f", "offset": 1000})
        await raw.open({"file": "f", "offset": 1000})
        assert await raw.read(0, 512) == bytes(512)
        assert raw.host_extent(0, 512) is None
        raw = DRIVERS["raw"](graph, "r", {"file": "f", "offset": 100})
        await raw.open({"file": "f", "offset": 100})
        assert await raw.read(800, 224) == data[900:] + bytes(124)

    run(main())
    r = subprocess.run(["qemu-io", "-c", "read -v 0 16", "--image-opts",
                        f"driver=raw,offset=1000,file.driver=file,file.filename={odd}"],
                       capture_output=True, text=True, check=False)
    assert r.stdout.startswith("00000000:  00 00 00 00")


def test_raw_roles_and_permissions() -> None:
    async def main() -> None:
        graph = FakeGraph()
        await graph.add({"driver": "null-co", "node-name": "n"})
        plain = await graph.add({"driver": "raw", "node-name": "p", "file": "n"})
        zero = await graph.add({"driver": "raw", "node-name": "z", "file": "n", "offset": 0})
        window = await graph.add({"driver": "raw", "node-name": "w", "file": "n", "offset": 512})
        for raw in (plain, zero):  # offset=0 still counts as no window in QEMU
            edge = raw.children["file"]
            assert edge.role == Role.FILTERED | Role.PRIMARY
            assert raw.child_perm(edge, Perm.WRITE, Perm.CONSISTENT_READ) == (
                Perm.WRITE, Perm.CONSISTENT_READ)
        edge = window.children["file"]
        assert edge.role == Role.DATA | Role.PRIMARY
        assert window.child_perm(edge, Perm(0), Perm.all()) == (Perm(0), Perm.all() & ~Perm.RESIZE)
        assert window.child_perm(edge, Perm.CONSISTENT_READ | Perm.WRITE, Perm.CONSISTENT_READ) == (
            Perm.CONSISTENT_READ | Perm.WRITE, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)

    run(main())


def test_raw_resize_follows_child(tmp_path: Path) -> None:
    path = tmp_path / "g.img"
    path.write_bytes(bytes(8192))

    async def main() -> None:
        graph = FakeGraph()
        raw = await graph.add({"driver": "raw", "node-name": "r", "offset": 1024,
                               "file": {"driver": "file", "filename": str(path)}})
        assert raw.size == 7168
        await raw.truncate(65536)
        assert path.stat().st_size == 65536 + 1024 and raw.size == 65536

    run(main())


def test_filenames_as_qsd_reports_them(tmp_path: Path) -> None:
    """file / image.filename of query-named-block-nodes, as observed on QSD 7.2."""
    disk = str(tmp_path / "disk.img")
    Path(disk).write_bytes(bytes(1 << 20))
    f = {"driver": "file", "filename": disk}
    cases = [
        ({"driver": "null-co"}, "null-co://"),
        ({"driver": "null-aio", "latency-ns": 5}, "null-aio://"),
        ({"driver": "null-co", "size": 1024}, 'json:{"driver": "null-co", "size": 1024}'),
        ({"driver": "null-co", "read-zeroes": False},
         'json:{"read-zeroes": false, "driver": "null-co"}'),
        ({"driver": "null-aio", "size": 4096, "read-zeroes": True, "latency-ns": 5},
         'json:{"read-zeroes": true, "driver": "null-aio", "size": 4096}'),
        ({"driver": "raw", "file": f}, disk),
        ({"driver": "raw", "file": f, "offset": 512},
         f'json:{{"offset": 512, "driver": "raw", "file": {{"driver": "file", "filename": "{disk}"}}}}'),
        ({"driver": "raw", "file": dict(f, locking="off"), "offset": 512, "size": 1024},
         (f'json:{{"offset": 512, "driver": "raw", "size": 1024, "file": {{"driver": "file", '
          f'"filename": "{disk}"}}}}')),
        ({"driver": "raw", "file": {"driver": "null-co", "size": 4096}},
         'json:{"driver": "raw", "file": {"driver": "null-co", "size": 4096}}'),
        ({"driver": "raw", "offset": 512, "file": {"driver": "null-co"}},
         'json:{"offset": 512, "driver": "raw", "file": {"driver": "null-co"}}'),
    ]

    async def main() -> None:
        for options, expected in cases:
            node = await FakeGraph().add(options)
            assert node.filename == expected, options

    run(main())


# ----- null -------------------------------------------------------------------------
def test_null_options() -> None:
    async def size(**opts: Any) -> int:
        node = await FakeGraph().add({"driver": "null-co", **opts})
        return node.size

    assert run(size()) == 1 << 30
    assert run(size(size=1000)) == 1024
    assert run(size(size=0)) == 0
    assert run(size(size=2**63 - 2**30)) == 2**63 - 2**30
    assert run(size(size=2**63 - 2**30 - 1)) == 2**63 - 2**30
    for opts, desc in [({"size": 2**63 - 2**30 + 1},
                        "Could not refresh total sector count: File too large"),
                       ({"latency-ns": -1}, "latency-ns is invalid"),
                       ({"latency-ns": -1, "size": 2**63 - 1}, "latency-ns is invalid"),
                       ({"size": -1}, "Parameter 'size' expects a non-negative number below 2^64")]:
        assert run(our_error({"driver": "null-aio", **opts})) == desc


def test_null_io_and_latency() -> None:
    async def main() -> None:
        plain = await FakeGraph().add({"driver": "null-co", "size": 1 << 20})
        buf = bytearray(b"\xab" * 4096)
        await plain.read_into(0, memoryview(buf))
        assert buf == b"\xab" * 4096  # untouched, as QEMU leaves qemu-io's buffer
        await plain.write(0, b"x" * 4096)
        await plain.write_zeroes(0, 4096)
        await plain.flush()
        with pytest.raises(GenericError) as exc:
            await plain.truncate(4096)
        assert exc.value.desc == "Image format driver does not support resize"
        assert plain.actual_size() == 0
        zeroes = await FakeGraph().add({"driver": "null-aio", "read-zeroes": True})
        await zeroes.read_into(0, memoryview(buf))
        assert buf == bytes(4096)
        slow = await FakeGraph().add({"driver": "null-co", "latency-ns": 20_000_000})
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.gather(*(slow.read(0, 512) for _ in range(5)))
        assert 0.015 < loop.time() - t0 < 0.5  # concurrent, each delayed

    run(main())


@needs_qemu
@pytest.mark.parametrize("driver", ["null-co", "null-aio"])
@pytest.mark.parametrize("read_zeroes", [False, True])
def test_null_block_status_matches_qemu_img_map(driver: str, read_zeroes: bool) -> None:
    opts = {"driver": driver, "size": 1 << 20, "read-zeroes": read_zeroes}
    out = subprocess.run(["qemu-img", "map", "--output=json", "json:" + json.dumps(opts)],
                         capture_output=True, text=True, check=True).stdout
    (theirs,) = json.loads(out)

    async def main() -> None:
        graph = FakeGraph()
        node = await graph.add(opts)
        raw = await graph.add({"driver": "raw", "node-name": "r", "file": node.node_name})
        for n in (node, raw):
            (e,) = await n.block_status(0, 1 << 20)
            assert (e.offset, e.length) == (theirs["start"], theirs["length"])
            assert (e.data, e.zero, e.depth > 0) == (theirs["data"], theirs["zero"],
                                                    theirs["present"])

    run(main())
