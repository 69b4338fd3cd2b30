# SPDX-License-Identifier: GPL-2.0-or-later
"""copy-on-read and preallocate filters against the real QSD: the same
graph in both daemons, the same I/O through an NBD export with qemu-io, and
then the images compared with qemu-img (map, check, compare, file size)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

MiB = 1 << 20


def _run(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def _qemu_io(sock: Path, export: str, *cmds: str, cwd: Path) -> list[str]:
    """Each command's first output line (the second has timings)."""
    out = []
    for cmd in cmds:
        res = _run("qemu-io", "-f", "raw", "-c", cmd, f"nbd+unix:///{export}?socket={sock}", cwd=cwd)
        first = res.stdout.splitlines()[0] if res.stdout else res.stderr.strip()
        out.append(f"{res.returncode}: {first}")
    return out


def _map(path: Path) -> list[dict[str, Any]]:
    res = _run("qemu-img", "map", "--output=json", str(path), cwd=path.parent)
    assert res.returncode == 0, res.stderr
    return [{k: v for k, v in e.items() if k != "offset"} for e in json.loads(res.stdout)]


def _check(path: Path) -> None:
    res = _run("qemu-img", "check", str(path), cwd=path.parent)
    assert res.returncode == 0, res.stdout + res.stderr


# ---------------------------------------------------------------------------
# copy-on-read


def _cor_chain(workdir: Path, tag: str) -> Path:
    base = workdir / f"base-{tag}.qcow2"
    mid = workdir / f"mid-{tag}.qcow2"
    top = workdir / f"top-{tag}.qcow2"
    _run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "4M", cwd=workdir)
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 0xaa 0 64k", "-c", "write -P 0xcc 3M 64k", str(base),
         cwd=workdir)
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(mid), cwd=workdir)
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 0xbb 1M 128k", str(mid), cwd=workdir)
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-b", mid.name, "-F", "qcow2", str(top), cwd=workdir)
    return top


READS = ("read -P 0xaa 0 4k", "read -P 0xbb 1052672 4k", "read -P 0 2M 4k", "read -P 0xcc 3M 512",
         "write -P 0xdd 3M 4k", "read -P 0xdd 3M 4k")


@pytest.mark.parametrize("bottom", [None, "mid"], ids=["whole-chain", "bottom"])
def test_copy_on_read_same_as_qsd(qemu_sd: Any, qsd: Any, workdir: Path, bottom: str | None) -> None:
    results = {}
    for tag, factory in (("q", qemu_sd), ("o", qsd)):
        top = _cor_chain(workdir, tag)
        sock = workdir / f"{tag}-nbd.sock"
        cor = "driver=copy-on-read,node-name=cor,file=top" + (f",bottom={bottom}" if bottom else "")
        options = ["--blockdev", f"driver=qcow2,node-name=top,file.driver=file,file.filename={top.name}"
                   + (f",backing.node-name=mid,backing.driver=qcow2,backing.file.driver=file,"
                      f"backing.file.filename=mid-{tag}.qcow2" if bottom else ""),
                   "--blockdev", cor,
                   "--nbd-server", f"addr.type=unix,addr.path={sock}",
                   "--export", "type=nbd,id=e0,node-name=cor,writable=on"]
        daemon = factory(*options, qmp=False, wait_for=[sock])
        io = _qemu_io(sock, "cor", *READS, cwd=workdir)
        daemon.stop()
        _check(top)
        results[tag] = (io, _map(top))
    assert results["o"] == results["q"]
    io, mapping = results["q"]
    assert all(line.startswith("0: read") or line.startswith("0: wrote") for line in io)
    allocated = [e for e in mapping if e["depth"] == 0 and (e["data"] or e["zero"])]
    assert allocated, mapping


# ---------------------------------------------------------------------------
# preallocate


def test_preallocate_same_as_qsd(qemu_sd: Any, qsd: Any, workdir: Path) -> None:
    sizes = {}
    for tag, factory in (("q", qemu_sd), ("o", qsd)):
        img = workdir / f"p-{tag}.qcow2"
        _run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M", cwd=workdir)
        sock = workdir / f"{tag}-nbd.sock"
        daemon = factory("--blockdev", f"driver=file,node-name=f,filename={img.name}",
                         "--blockdev", "driver=preallocate,node-name=p,file=f,prealloc-size=4194304,"
                                       "prealloc-align=65536",
                         "--blockdev", "driver=qcow2,node-name=q,file=p",
                         "--nbd-server", f"addr.type=unix,addr.path={sock}",
                         "--export", "type=nbd,id=e0,node-name=q,writable=on", wait_for=[sock])
        io = _qemu_io(sock, "q", "write -P 0x11 0 1M", "write -P 0x22 8M 64k", "read -P 0x22 8M 64k",
                      cwd=workdir)
        while_open = img.stat().st_size
        info = daemon.qmp().cmd("query-named-block-nodes", flat=True)
        daemon.stop()
        _check(img)
        closed = img.stat().st_size
        # Preallocated while open (in 64k steps, 4M ahead), cut back on close.
        # Where the steps fall depends on the order of qcow2's writes, so
        # only the rule is compared.
        assert while_open % 65536 == 0 and while_open > closed and while_open >= 4 * MiB, (tag, while_open)
        sizes[tag] = (io, closed, sorted((n["node-name"], n["image"]["virtual-size"]) for n in info
                                         if n["node-name"] in ("p", "q")))
    assert sizes["o"] == sizes["q"]
    res = _run("qemu-img", "compare", str(workdir / "p-q.qcow2"), str(workdir / "p-o.qcow2"), cwd=workdir)
    assert res.returncode == 0, res.stdout


# ---------------------------------------------------------------------------
# option errors


SESSION = [
    ("blockdev-add", {"driver": "copy-on-read", "node-name": "c0", "file": {"driver": "file", "filename": "d.img"}}),
    ("blockdev-add", {"driver": "copy-on-read", "node-name": "c1", "bottom": "nosuch",
                      "file": {"driver": "file", "filename": "d.img", "locking": "off"}}),
    ("blockdev-add", {"driver": "preallocate", "node-name": "p1", "prealloc-align": 1000,
                      "file": {"driver": "file", "filename": "d.img", "locking": "off"}}),
    ("blockdev-add", {"driver": "preallocate", "node-name": "p2", "prealloc-size": -1,
                      "file": {"driver": "file", "filename": "d.img", "locking": "off"}}),
    ("blockdev-add", {"driver": "preallocate", "node-name": "p3", "prealloc-align": -1,
                      "file": {"driver": "file", "filename": "d.img", "locking": "off"}}),
    ("blockdev-add", {"driver": "preallocate", "node-name": "p4", "prealloc-align": 0,
                      "file": {"driver": "file", "filename": "d.img", "locking": "off"}}),
    ("blockdev-add", {"driver": "preallocate", "node-name": "p5", "prealloc-size": 1000,
                      "file": {"driver": "file", "filename": "d.img", "locking": "off"}}),
    ("blockdev-add", {"driver": "raw", "node-name": "ro", "read-only": True,
                      "file": {"driver": "file", "filename": "d.img", "locking": "off"}}),
    ("blockdev-add", {"driver": "copy-on-read", "node-name": "c2", "file": "ro"}),
    ("blockdev-add", {"driver": "copy-on-read", "node-name": "c3", "read-only": True, "file": "ro"}),
    ("blockdev-add", {"driver": "copy-on-read", "node-name": "c4", "bottom": "ro", "file": "ro"}),
    ("blockdev-del", {"node-name": "c0"}),
    ("blockdev-del", {"node-name": "p4"}),
]


def test_filter_option_errors_same_as_qsd(qemu_sd: Any, qsd: Any, workdir: Path) -> None:
    (workdir / "d.img").write_bytes(bytes(MiB))
    replies = {}
    for tag, factory in (("q", qemu_sd), ("o", qsd)):
        daemon = factory()
        q = daemon.qmp()
        replies[tag] = [q.execute(cmd, args) for cmd, args in SESSION]
        daemon.stop()
    assert replies["o"] == replies["q"]



def _normalized(reply: dict[str, Any]) -> str:
    """Generated node names (#blockNNN) are random in both daemons."""
    return re.sub(r"#block[0-9]+", "#block", json.dumps(reply))


def test_filter_node_info_same_as_qsd(qemu_sd: Any, qsd: Any, workdir: Path) -> None:
    (workdir / "d.img").write_bytes(bytes(MiB))
    (workdir / "r.cfg").write_bytes(b'[inject-error]\nevent = "read_aio"\n')
    image = {"driver": "file", "filename": "d.img", "locking": "off"}
    session = [
        ("blockdev-add", {"driver": "copy-on-read", "node-name": "c0", "file": image}),
        ("blockdev-add", {"driver": "preallocate", "node-name": "p0", "prealloc-size": 1000, "file": image}),
        ("blockdev-add", {"driver": "blkdebug", "node-name": "b0", "image": image}),
        ("blockdev-add", {"driver": "blkdebug", "node-name": "b1", "config": "r.cfg", "image": image}),
        ("blockdev-add", {"driver": "blkdebug", "node-name": "b2", "align": 4096, "image": image}),
        ("blockdev-add", {"driver": "blkdebug", "node-name": "b3", "image": image,
                          "inject-error": [{"event": "read_aio", "errno": 5, "sector": 3, "once": True}],
                          "set-state": [{"event": "write_aio", "new_state": 2}]}),
        ("blockdev-add", {"driver": "blkdebug", "node-name": "b4", "image": "b1"}),
        ("query-named-block-nodes", {"flat": True}),
    ]
    replies = {}
    for tag, factory in (("q", qemu_sd), ("o", qsd)):
        daemon = factory()
        q = daemon.qmp()
        replies[tag] = [_normalized(q.execute(cmd, args)) for cmd, args in session]
        daemon.stop()
    assert replies["o"] == replies["q"]


def test_nested_node_info_over_a_chain_same_as_qsd(qemu_sd: Any, qsd: Any, workdir: Path) -> None:
    """Nested (non-flat) query-named-block-nodes: a filter's child is its
    backing-image and counts in backing_file_depth, filters show the qcow2
    child's cluster size and dirty flag, flat output counts no depth, and a
    node is listed before its backing (named once its file is open)."""
    for cmd in ("qemu-img create -q -f qcow2 base.qcow2 1M",
                "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 1M",
                "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 hdr.qcow2 1M"):
        subprocess.run(cmd, shell=True, cwd=workdir, check=True)
    session = [
        ("blockdev-add", {"driver": "qcow2", "node-name": "top",
                          "file": {"driver": "file", "filename": "top.qcow2", "node-name": "tf"},
                          "backing": {"driver": "qcow2", "node-name": "base", "file": {
                              "driver": "file", "filename": "base.qcow2", "node-name": "bf"}}}),
        ("blockdev-add", {"driver": "copy-on-read", "node-name": "cor", "file": "top"}),
        ("blockdev-add", {"driver": "blkdebug", "node-name": "bd", "image": "cor"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "hdr",
                          "file": {"driver": "file", "filename": "hdr.qcow2"}}),
        ("query-named-block-nodes", None),
        ("query-named-block-nodes", {"flat": True}),
    ]
    replies = {}
    for tag, factory in (("q", qemu_sd), ("o", qsd)):
        daemon = factory(cwd=workdir)
        q = daemon.qmp()
        replies[tag] = [_normalized(q.execute(cmd, args)) for cmd, args in session]
        daemon.stop()
    assert replies["o"] == replies["q"]


def test_preallocation_dropped_when_writers_leave(qemu_sd: Any, qsd: Any, workdir: Path) -> None:
    """blockdev-del of the format above the filter cuts the file back (the
    filter node itself stays); qsd may finish just after the reply, so the
    size is polled."""
    import time

    sizes = {}
    for tag, factory in (("q", qemu_sd), ("o", qsd)):
        img = workdir / f"d-{tag}.qcow2"
        _run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M", cwd=workdir)
        sock = workdir / f"{tag}-nbd.sock"
        daemon = factory("--blockdev", f"driver=file,node-name=f,filename={img.name}",
                         "--blockdev", "driver=preallocate,node-name=p,file=f,prealloc-size=4194304",
                         "--blockdev", "driver=qcow2,node-name=q,file=p",
                         "--nbd-server", f"addr.type=unix,addr.path={sock}",
                         "--export", "type=nbd,id=e0,node-name=q,writable=on", wait_for=[sock])
        wrote = _qemu_io(sock, "q", "write -P 0x33 0 1M", cwd=workdir)
        assert wrote == ["0: wrote 1048576/1048576 bytes at offset 0"]
        grown = img.stat().st_size
        q = daemon.qmp()
        q.cmd("block-export-del", id="e0")
        q.wait_event("BLOCK_EXPORT_DELETED")
        q.cmd("blockdev-del", **{"node-name": "q"})
        deadline = time.monotonic() + 30
        while img.stat().st_size == grown and time.monotonic() < deadline:
            time.sleep(0.05)
        sizes[tag] = img.stat().st_size
        daemon.stop()
        assert img.stat().st_size == sizes[tag]
        _check(img)
    assert sizes["o"] == sizes["q"]
