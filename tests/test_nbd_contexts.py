# SPDX-License-Identifier: GPL-2.0-or-later
"""NBD metadata contexts ``qemu:dirty-bitmap:NAME`` and ``qemu:allocation-depth``.

Differential: the same qcow2 chain, bitmaps and qemu-io writes on the real
qemu-storage-daemon and on qsd; the sessions (QMP replies, ``nbdinfo --map``
of every context, python libnbd ``block_status`` with and without REQ_ONE,
raw LIST/SET_META_CONTEXT exchanges) must be equal byte for byte. Property
tests hold the option parser to a model of QEMU's query matching.
"""

from __future__ import annotations

import difflib
import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qmpdiff import Shell, have_qsd, run_session

from qsd.block.bitmap import DirtyBitmap
from qsd.export.nbd.contexts import (
    BASE_ALLOCATION,
    AllocationDepth,
    DirtyBitmapContext,
    MetaContext,
)
from qsd.export.nbd.protocol import IHAVEOPT, Opt, Rep, ServerConnection

CAPS = '{"execute": "qmp_capabilities"}\n'
URI = "nbd+unix:///{}?socket=nbd.sock"
DIST = "/usr/lib/python3/dist-packages"


def ex(command: str, **args: Any) -> str:
    return json.dumps({"execute": command, "arguments": args}) + "\n"


# A block_status client: every context the export lists, whole-export and
# unaligned sub-ranges, with and without REQ_ONE.
BLOCK_STATUS = r'''
import sys
sys.path.append(sys.argv[2])
import nbd
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(sys.argv[1])
names = []
h.opt_list_meta_context(lambda name: names.append(name) or 0)
print("listed", names)
for name in names:
    h.add_meta_context(name)
h.opt_go()
size = h.get_size()
for off, length in [(0, size), (1, 4095), (70000, 1 << 20), (size - 512, 512),
                    (3 << 20, size - (3 << 20))]:
    for flags in (0, nbd.CMD_FLAG_REQ_ONE):
        got = []
        def cb(ctx, offset, entries, err):
            got.append((ctx, offset, list(entries)))
            return 0
        h.block_status(length, off, cb, flags=flags)
        print(off, length, flags, got)
h.shutdown()
'''

# Raw LIST/SET_META_CONTEXT exchanges (query order, wildcards, duplicates,
# skipped long queries, NULs, bad lengths) printed reply by reply.
RAW_META = r'''
import socket, struct, sys
IHAVEOPT = 0x49484156454F5054
def opt(o, data=b""): return struct.pack(">QII", IHAVEOPT, o, len(data)) + data
def meta(name, *qs):
    d = struct.pack(">I", len(name)) + name + struct.pack(">I", len(qs))
    return d + b"".join(struct.pack(">I", len(q)) + q for q in qs)
def recvn(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: raise EOFError
        b += c
    return b
def replies(s):
    out = []
    while True:
        magic, o, rep, ln = struct.unpack(">QIII", recvn(s, 20))
        out.append((o, hex(rep), recvn(s, ln)))
        if rep == 1 or rep & 0x80000000: return out
def conn():
    s = socket.socket(socket.AF_UNIX); s.connect("nbd.sock")
    recvn(s, 18); s.sendall(struct.pack(">I", 3)); return s
s = conn()
E = b"e"
for o, d in [
        (9, meta(E)), (9, meta(E, b"qemu:")), (9, meta(E, b"qemu:dirty-bitmap:")),
        (9, meta(E, b"base:", b"qemu:dirty-bitmap:c", b"qemu:allocation-depth")),
        (9, meta(E, b"qemu:dirty-bitmap:c:x", b"qemu:dirty-bitmap:c:", b"qemu:dirty-bitmap:",
                 b"qemu:allocation-depth:", b"qemu:foo", b"base:allocation:", b"x:", b":")),
        (9, meta(E, b"q" * 5000, b"base:allocation")), (9, meta(E, b"qemu:dirty-bitmap:\xff")),
        (9, meta(E, b"base:allocation\0")), (9, meta(b"nosuch", b"base:")[:-2]),
        (9, meta(b"x" * 100)), (9, struct.pack(">I", 5000)), (9, meta(E, b"base:")[:-2]),
        (10, meta(E, b"base:allocation")), (8, b""),
        (10, meta(E, b"qemu:dirty-bitmap:c", b"base:", b"qemu:", b"qemu:dirty-bitmap:",
                  b"base:allocation", b"qemu:allocation-depth", b"base:allocation")),
        (10, meta(E, b"qemu:dirty-bitmap:b", b"qemu:dirty-bitmap:c:x")),
        (10, meta(b"nosuch", b"base:allocation")),
        (10, meta(E)),
        ]:
    s.sendall(opt(o, d))
    print(replies(s))
'''

SETUP = ("qemu-img create -q -f qcow2 base.qcow2 6M && "
         "qemu-io -c 'write -P 1 0 1M' -c 'write -P 2 3M 64k' -c 'write -P 2 5M 4k' base.qcow2 "
         ">/dev/null && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 6M && "
         "qemu-io -c 'write -P 3 512k 1M' -c 'write -z 2M 64k' -c 'write -P 4 5M 512' "
         "top.qcow2 >/dev/null && qemu-img create -q -f raw raw.img 2M")


def _write_scripts(workdir: Path) -> None:
    (workdir / "bs.py").write_text(BLOCK_STATUS)
    (workdir / "raw_meta.py").write_text(RAW_META)


def nbd_start() -> str:
    return ex("nbd-server-start", addr={"type": "unix", "data": {"path": "nbd.sock"}})


def _sessions() -> dict[str, list]:
    py = sys.executable
    return {
        "chain": [
            CAPS,
            ex("blockdev-add", driver="qcow2", **{"node-name": "top"},
               file={"driver": "file", "filename": "top.qcow2"}),
            ex("block-dirty-bitmap-add", node="top", name="b"),
            ex("block-dirty-bitmap-add", node="top", name="c:x", granularity=4096),
            ex("block-dirty-bitmap-add", node="top", name="c", granularity=512),
            ex("block-dirty-bitmap-add", node="top", name="off", disabled=True),
            nbd_start(),
            ex("block-export-add", type="nbd", id="e", **{"node-name": "top"}, name="e",
               writable=True, bitmaps=["b", "c:x", "c", "c", "off"], **{"allocation-depth": True}),
            ex("query-block-exports"),
            Shell(f"qemu-io -f raw -c 'write -P 5 100k 10k' -c 'write -P 5 5000k 4k' "
                  f"-c 'write -z 1M 100k' -c 'write -P 6 6290944 512' '{URI.format('e')}' "
                  "| grep -v ops"),
            Shell(f"nbdinfo --list '{URI.format('')}' | sed -n '/contexts:/,/is_rot/p'"),
            *(Shell(f"nbdinfo --map={ctx} '{URI.format('e')}'") for ctx in (
                "base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b",
                "qemu:dirty-bitmap:c:x", "qemu:dirty-bitmap:c", "qemu:dirty-bitmap:off")),
            Shell(f"{py} bs.py '{URI.format('e')}' {DIST}"),
            Shell(f"{py} raw_meta.py"),
            ex("x-debug-block-dirty-bitmap-sha256", node="top", name="c"),
            ex("block-dirty-bitmap-remove", node="top", name="c"),
            ex("block-export-del", id="e", mode="hard"),
            ex("block-dirty-bitmap-remove", node="top", name="c"),
        ],
        # Resolution of bare names down the chain, read-only exports, errors.
        "resolve": [
            CAPS,
            ex("blockdev-add", driver="qcow2", **{"node-name": "top"},
               file={"driver": "file", "filename": "top.qcow2", "node-name": "topf"},
               backing={"driver": "qcow2", "node-name": "base",
                        "file": {"driver": "file", "filename": "base.qcow2"}}),
            ex("blockdev-add", driver="raw", **{"node-name": "r"},
               file={"driver": "file", "filename": "raw.img", "node-name": "rf"}),
            ex("blockdev-add", driver="raw", **{"node-name": "ro"}, **{"read-only": True},
               file={"driver": "file", "filename": "raw.img", "node-name": "rof"}),
            ex("block-dirty-bitmap-add", node="base", name="inbase"),
            ex("block-dirty-bitmap-add", node="topf", name="infile"),
            ex("block-dirty-bitmap-add", node="rf", name="under", granularity=4096),
            ex("block-dirty-bitmap-add", node="rof", name="rob"),
            ex("block-dirty-bitmap-add", node="r", name="dis", disabled=True),
            nbd_start(),
            ex("block-export-add", type="nbd", id="e1", **{"node-name": "top"},
               bitmaps=["inbase"]),
            ex("block-export-add", type="nbd", id="e1", **{"node-name": "top"},
               bitmaps=["infile"]),
            ex("block-export-add", type="nbd", id="e1", **{"node-name": "top"},
               bitmaps=[{"node": "base", "name": "inbase"}]),
            ex("block-export-add", type="nbd", id="e2", **{"node-name": "r"},
               bitmaps=["under"]),
            ex("block-export-add", type="nbd", id="e2", **{"node-name": "r"},
               bitmaps=["dis", {"node": "rf", "name": "under"}, "under"]),
            ex("block-export-add", type="nbd", id="e3", **{"node-name": "ro"},
               bitmaps=["rob"]),
            ex("block-export-add", type="nbd", id="e4", **{"node-name": "r"}, name="x",
               bitmaps=["nope"]),
            ex("block-export-add", type="nbd", id="e4", **{"node-name": "r"}, name="x",
               bitmaps=[{"node": "nope", "name": "a"}]),
            ex("block-export-add", type="nbd", id="e4", **{"node-name": "r"}, name="x",
               bitmaps=[{"node": "r", "name": "nope"}]),
            ex("block-export-add", type="nbd", id="e4", **{"node-name": "r"}, name="x",
               bitmaps=["dis"]),
            ex("query-block-exports"),
            Shell(f"nbdinfo --list '{URI.format('')}' | grep -E 'export=|qemu:|base:'"),
            Shell(f"nbdinfo --map=qemu:dirty-bitmap:dis '{URI.format('x')}'"),
            ex("block-dirty-bitmap-clear", node="base", name="inbase"),
            ex("block-dirty-bitmap-enable", node="r", name="dis"),
            ex("nbd-server-stop"),
            ex("block-dirty-bitmap-clear", node="base", name="inbase"),
            ex("block-dirty-bitmap-enable", node="r", name="dis"),
        ],
    }


def _diff(name: str, tmp: Path, steps: list) -> None:
    outs = []
    for kind in ("qemu", "qsd"):
        wd = tmp / f"{name}-{kind}"
        wd.mkdir(parents=True)
        _write_scripts(wd)
        outs.append(run_session(kind, wd, steps, setup=SETUP))
    qemu, ours = outs
    if qemu != ours:
        diff = difflib.unified_diff(qemu.decode(errors="replace").splitlines(),
                                    ours.decode(errors="replace").splitlines(),
                                    "qemu-storage-daemon", "qsd", lineterm="")
        pytest.fail("sessions differ:\n" + "\n".join(diff))


@pytest.mark.skipif(not have_qsd(), reason="qemu-storage-daemon not installed")
@pytest.mark.parametrize("name", ["chain", "resolve"])
def test_session(name: str, tmp_path: Path, require_tool, libnbd) -> None:
    for tool in ("qemu-io", "qemu-img", "nbdinfo"):
        require_tool(tool)
    _diff(name, tmp_path, _sessions()[name])


@pytest.mark.skipif(not have_qsd(), reason="qemu-storage-daemon not installed")
def test_allocation_depth_past_short_backing(tmp_path: Path, require_tool) -> None:
    require_tool("nbdinfo")
    setup = ("qemu-img create -q -f qcow2 base.qcow2 1M && "
             "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 2M")
    steps = [CAPS,
             ex("blockdev-add", driver="qcow2", **{"node-name": "top"},
                file={"driver": "file", "filename": "top.qcow2"}),
             nbd_start(),
             ex("block-export-add", type="nbd", id="e", **{"node-name": "top"},
                **{"allocation-depth": True}),
             Shell(f"nbdinfo --map=qemu:allocation-depth '{URI.format('top')}'")]
    qemu = run_session("qemu", tmp_path / "qemu", steps, setup=setup)
    ours = run_session("qsd", tmp_path / "qsd", steps, setup=setup)
    assert qemu == ours


@pytest.mark.skipif(not have_qsd(), reason="qemu-storage-daemon not installed")
def test_allocation_depth_counts_filters(tmp_path: Path, require_tool) -> None:
    """Filters count as layers for what lies below their child."""
    require_tool("nbdinfo")
    setup = ("qemu-img create -q -f qcow2 base.qcow2 4M && "
             "qemu-io -c 'write 0 1M' base.qcow2 >/dev/null && "
             "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 8M && "
             "qemu-io -c 'write 512k 1M' top.qcow2 >/dev/null")
    steps = [CAPS,
             ex("blockdev-add", driver="qcow2", **{"node-name": "top"},
                file={"driver": "file", "filename": "top.qcow2"}),
             ex("blockdev-add", driver="copy-on-read", **{"node-name": "cor"}, file="top"),
             ex("blockdev-add", driver="blkdebug", **{"node-name": "dbg"}, image="cor"),
             nbd_start(),
             ex("block-export-add", type="nbd", id="e", **{"node-name": "dbg"},
                **{"allocation-depth": True}),
             Shell(f"nbdinfo --map=qemu:allocation-depth '{URI.format('dbg')}'")]
    qemu = run_session("qemu", tmp_path / "qemu", steps, setup=setup)
    ours = run_session("qsd", tmp_path / "qsd", steps, setup=setup)
    assert qemu == ours


# ----- the contexts on their own ----------------------------------------------

class _Node:
    """Just enough of a node for the contexts: block_status from a table."""

    def __init__(self, runs: list[tuple[int, int]]) -> None:
        from qsd.block.node import Extent
        self.extents = []
        pos = 0
        for length, depth in runs:
            self.extents.append(Extent(pos, length, data=depth > 0, depth=depth))
            pos += length
        self.size = pos

    async def block_status(self, offset: int, length: int) -> list[Any]:
        from qsd.block.node import Extent
        out = []
        for e in self.extents:
            if e.offset + e.length <= offset or e.offset >= offset + length:
                continue
            start = max(e.offset, offset)
            out.append(Extent(start, min(e.offset + e.length, offset + length) - start,
                              depth=e.depth))
            if len(out) == 2:       # drivers may answer short
                break
        return out


def _run(coro: Any) -> Any:
    import asyncio
    return asyncio.run(coro)


@settings(max_examples=200, deadline=None)
@given(runs=st.lists(st.tuples(st.integers(1, 5000), st.integers(0, 3)), min_size=1,
                     max_size=12),
       data=st.data())
def test_allocation_depth_extents(runs: list[tuple[int, int]], data: Any) -> None:
    node = _Node(runs)
    offset = data.draw(st.integers(0, node.size - 1))
    length = data.draw(st.integers(1, node.size - offset))
    limit = data.draw(st.integers(1, 20))
    got = _run(AllocationDepth().extents(node, offset, length, limit))
    depth_at = [d for n, d in runs for _ in range(n)]
    want: list[list[int]] = []
    for d in depth_at[offset:offset + length]:
        if want and want[-1][1] == d:
            want[-1][0] += 1
        else:
            want.append([1, d])
    assert got == [tuple(w) for w in want[:limit]]


@settings(max_examples=200, deadline=None)
@given(gran_shift=st.integers(9, 13), marks=st.lists(st.tuples(st.integers(0, 60000),
                                                                st.integers(1, 9000)),
                                                      max_size=8), data=st.data())
def test_dirty_bitmap_extents(gran_shift: int, marks: list[tuple[int, int]], data: Any) -> None:
    size = 65536 + 1000
    bm = DirtyBitmap("b", size, 1 << gran_shift)
    for off, n in marks:
        bm.set_range(off, n)
    ctx = DirtyBitmapContext(bm, 3)
    assert (ctx.name, ctx.id) == ("qemu:dirty-bitmap:b", 5)
    offset = data.draw(st.integers(0, size - 1))
    length = data.draw(st.integers(1, size - offset))
    limit = data.draw(st.integers(1, 10))
    got = _run(ctx.extents(None, offset, length, limit))        # type: ignore[arg-type]
    want: list[list[int]] = []
    for pos in range(offset, offset + length):
        flag = int(bm.get(pos))
        if want and want[-1][1] == flag:
            want[-1][0] += 1
        else:
            want.append([1, flag])
    assert got == [tuple(w) for w in want[:limit]]


# ----- LIST/SET_META_CONTEXT against a model of QEMU's matching -----------------

class _Ctx(MetaContext):
    def __init__(self, name: str, cid: int) -> None:
        self.name = name
        self.id = cid


class _Export:
    def __init__(self, name: str, contexts: list[MetaContext]) -> None:
        self.name = name
        self.description = ""
        self.writable = False
        self.size = 1 << 20
        self.contexts = contexts


def _model(depth: bool, bitmaps: list[str], queries: list[bytes] | None,
           listing: bool) -> list[tuple[int, str]]:
    """What QEMU 7.2 answers: flags per context set by each query, replies in
    id order (base 0, depth 1, bitmap i at 2 + i)."""
    base, want_depth, chosen = False, False, [False] * len(bitmaps)
    if listing and not queries:
        base, want_depth, chosen = True, depth, [True] * len(bitmaps)
    for q in queries or []:
        if len(q) > 4096:
            continue
        if q.startswith(b"base:"):
            rest = q[5:]
            base |= rest == b"allocation" or (listing and rest == b"")
        elif q.startswith(b"qemu:"):
            rest = q[5:]
            if rest == b"":
                if listing:
                    want_depth, chosen = want_depth or depth, [True] * len(bitmaps)
            elif rest == b"allocation-depth":
                want_depth = want_depth or depth
            elif rest.startswith(b"dirty-bitmap:"):
                leaf = rest[13:]
                if leaf == b"":
                    if listing:
                        chosen = [True] * len(bitmaps)
                else:
                    for i, name in enumerate(bitmaps):
                        if name.encode() == leaf:
                            chosen[i] = True
                            break
    out = []
    if base:
        out.append((0, "base:allocation"))
    if want_depth:
        out.append((1, "qemu:allocation-depth"))
    out += [(2 + i, f"qemu:dirty-bitmap:{n}") for i, n in enumerate(bitmaps) if chosen[i]]
    return [(0 if listing else i, n) for i, n in out]


def _replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    pos = 0
    while pos < len(data):
        magic, option, rep, length = struct.unpack_from(">QIII", data, pos)
        out.append((option, rep, data[pos + 20:pos + 20 + length]))
        pos += 20 + length
    return out


names_st = st.sampled_from(["a", "b", "c:x", "c", "a:", "dirty-bitmap:", "é"])
query_st = st.one_of(
    st.sampled_from([b"base:", b"base:allocation", b"base:allocationx", b"qemu:",
                     b"qemu:allocation-depth", b"qemu:dirty-bitmap:", b"qemu:dirty-bitmap:a",
                     b"qemu:dirty-bitmap:c:x", b"qemu:dirty-bitmap:c", b"qemu:foo", b"x:",
                     b"", b":", b"base", b"qemu:dirty-bitmap:\xc3\xa9", b"q" * 4097]),
    st.binary(max_size=24).filter(lambda b: b"\0" not in b))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(depth=st.booleans(), bitmaps=st.lists(names_st, max_size=4),
       queries=st.lists(query_st, max_size=6), listing=st.booleans())
def test_meta_context_matching(depth: bool, bitmaps: list[str], queries: list[bytes],
                               listing: bool) -> None:
    contexts: list[MetaContext] = [BASE_ALLOCATION]
    if depth:
        contexts.append(_Ctx("qemu:allocation-depth", 1))
    contexts += [_Ctx(f"qemu:dirty-bitmap:{n}", 2 + i) for i, n in enumerate(bitmaps)]
    conn = ServerConnection({"e": _Export("e", contexts)})     # type: ignore[dict-item]
    conn.receive_data(struct.pack(">I", 3))
    conn.receive_data(_opt(Opt.STRUCTURED_REPLY))
    option = Opt.LIST_META_CONTEXT if listing else Opt.SET_META_CONTEXT
    payload = struct.pack(">I", 1) + b"e" + struct.pack(">I", len(queries)) + b"".join(
        struct.pack(">I", len(q)) + q for q in queries)
    replies = _replies(b"".join(e for e in conn.receive_data(_opt(option, payload))
                                if isinstance(e, bytes)))
    assert replies[-1] == (option, Rep.ACK, b"")
    got = [(struct.unpack(">I", d[:4])[0], d[4:].decode()) for _, r, d in replies[:-1]]
    assert all(r == Rep.META_CONTEXT for _, r, _ in replies[:-1])
    assert got == _model(depth, bitmaps, queries, listing)


def _opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, option, len(data)) + data


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=64), listing=st.booleans(),
       cut=st.integers(0, 40))
def test_meta_context_garbage(payload: bytes, listing: bool, cut: int) -> None:
    """Any payload gets one well-formed answer (contexts then ACK, or one
    error) and leaves the connection negotiating."""
    conn = ServerConnection({"e": _Export("e", [BASE_ALLOCATION])})  # type: ignore[dict-item]
    conn.receive_data(struct.pack(">I", 3))
    conn.receive_data(_opt(Opt.STRUCTURED_REPLY))
    option = Opt.LIST_META_CONTEXT if listing else Opt.SET_META_CONTEXT
    framed = struct.pack(">I", 1) + b"e" + payload[:cut] if cut else payload
    replies = _replies(b"".join(e for e in conn.receive_data(_opt(option, framed))
                                if isinstance(e, bytes)))
    assert replies and all(o == option for o, _, _ in replies)
    last = replies[-1][1]
    assert last == Rep.ACK or (last & 0x80000000 and len(replies) == 1)
    follow = _replies(b"".join(e for e in conn.receive_data(_opt(Opt.LIST))
                               if isinstance(e, bytes)))
    assert follow[-1] == (Opt.LIST, Rep.ACK, b"")


# ----- incremental backup by NBD pull -----------------------------------------

def test_incremental_pull_with_libnbd(storage_daemon, workdir: Path, libnbd: Any,
                                      require_tool) -> None:
    """Full copy, guest writes, then only the extents ``qemu:dirty-bitmap:b``
    reports dirty are pulled over NBD into the copy: it must equal the disk."""
    for tool in ("qemu-img", "qemu-io"):
        require_tool(tool)
    disk = workdir / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "8M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x11 0 3M", "-c", "write -P 0x22 6M 1M", str(disk)],
                   check=True, capture_output=True)
    sock = workdir / "nbd.sock"
    daemon = storage_daemon("--blockdev", f"driver=qcow2,node-name=d,file.driver=file,"
                            f"file.filename={disk}",
                            "--nbd-server", f"addr.type=unix,addr.path={sock}",
                            wait_for=[sock])
    qmp = daemon.qmp()
    qmp.cmd("block-dirty-bitmap-add", node="d", name="b", granularity=4096)
    qmp.cmd("block-export-add", type="nbd", id="w", **{"node-name": "d"}, writable=True)
    uri = f"nbd+unix:///{{}}?socket={sock}"
    full = workdir / "full.raw"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri.format("d"), str(full)],
                   check=True)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x33 1000 5000",
                    "-c", "write -z 2M 1M", "-c", "write -P 0x44 8384512 4096",
                    "-c", "discard 6M 64k", uri.format("d")], check=True, capture_output=True)
    qmp.cmd("block-dirty-bitmap-disable", node="d", name="b")
    qmp.cmd("block-export-add", type="nbd", id="r", **{"node-name": "d"}, name="inc",
            bitmaps=["b"])
    h = libnbd.NBD()
    h.add_meta_context("qemu:dirty-bitmap:b")
    h.connect_uri(uri.format("inc"))
    dirty: list[tuple[int, int]] = []
    covered = [0]

    def extents(ctx: str, offset: int, entries: list[int], err: Any) -> int:
        pos = offset
        for length, flags in zip(entries[::2], entries[1::2]):
            if flags & 1:
                dirty.append((pos, length))
            pos += length
        covered[0] = pos
        return 0
    size = h.get_size()
    while covered[0] < size:
        h.block_status(size - covered[0], covered[0], extents)
    with open(full, "r+b") as f:
        for offset, length in dirty:
            f.seek(offset)
            f.write(h.pread(length, offset))
    h.shutdown()
    assert sum(n for _, n in dirty) == qmp.cmd("query-named-block-nodes", flat=True)[0][
        "dirty-bitmaps"][0]["count"] == 4096 * 2 + (1 << 20) + 4096
    res = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(full),
                          uri.format("inc")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
