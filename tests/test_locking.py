# SPDX-License-Identifier: GPL-2.0-or-later
"""Image locking: the OFD lock bytes qsd holds must be the ones QSD 7.2
holds for the same graph, and QEMU's tools and qsd must refuse each other's
conflicting opens both ways."""
# The tools run while a coroutine holds a node open; blocking the loop then is the point.
# ruff: noqa: ASYNC221

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

import qsd.block.formats.raw  # noqa: F401  (registers the raw driver)
from qsd.block.locking import ImageLockError, lock_bytes
from qsd.block.node import DRIVERS, Node, Perm, Role
from qsd.block.protocols.file import FileNode

QSD = "qemu-storage-daemon"


@pytest.fixture
def qemu_tools(require_tool: Any) -> None:
    """QEMU 7.2's tools are the oracle: skip without them (fail under CI)."""
    for tool in ("qemu-storage-daemon", "qemu-img", "qemu-io"):
        require_tool(tool)


needs_qemu = pytest.mark.usefixtures("qemu_tools")

# What an NBD export takes on its node, as QSD 7.2 holds it.
EXPORT_SHARED = Perm.all() & ~Perm.RESIZE
EXPORT_RO = Perm.CONSISTENT_READ
EXPORT_RW = Perm.CONSISTENT_READ | Perm.WRITE


class FakeEdge:
    def __init__(self, child: Node | None, role: Role) -> None:
        self.child = child
        self.role = role


class FakeGraph:
    """Just enough graph for raw: open inline children, look up named ones."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}

    async def open_child(self, parent: Node, name: str, ref: Any, role: Role) -> Node:
        if isinstance(ref, str):
            child = self.nodes[ref]
        else:
            child = DRIVERS[ref["driver"]](self, ref.get("node-name", "#anon"), ref)
            await child.open(ref)
        parent.children[name] = FakeEdge(child, role)  # type: ignore[assignment]
        return child


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def lock_set(fdinfo: str) -> set[int]:
    """Bytes locked according to a /proc/PID/fdinfo/FD text."""
    held: set[int] = set()
    for line in fdinfo.splitlines():
        if line.startswith("lock:"):
            fields = line.split()
            assert fields[2:5] == ["OFDLCK", "ADVISORY", "READ"], line
            held.update(range(int(fields[-2]), int(fields[-1]) + 1))
    return held


def fdinfo_of(pid: int, path: Path) -> str:
    st = path.stat()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if (target.st_dev, target.st_ino) == (st.st_dev, st.st_ino):
            return Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
    raise AssertionError(f"{pid} has no fd on {path}")


@pytest.fixture
def images(workdir: Path, qemu_tools: None) -> Path:
    (workdir / "disk.img").write_bytes(bytes(1 << 20))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(workdir / "d.qcow2"), "1M"],
                   check=True)
    return workdir


def test_lock_byte_layout() -> None:
    assert lock_bytes(Perm.CONSISTENT_READ | Perm.WRITE, Perm.RESIZE) == {100, 101, 203}
    assert lock_bytes(Perm.all(), Perm.all()) == {100, 101, 102, 103, 200, 201, 202, 203}
    assert lock_bytes(Perm(0), Perm(0)) == set()


# Each case: the QSD command line, the image, and how to get the cumulative
# permissions our file node would be given for the same graph.
def _bare(_: FakeGraph) -> tuple[Perm, Perm]:
    return Perm(0), Perm.all()


def _qcow2(read_only: bool) -> Any:
    def perms(_: FakeGraph) -> tuple[Perm, Perm]:
        # A format node's metadata child, by node.py's defaults.
        fmt = Node(None, "q", {"read-only": read_only})  # type: ignore[arg-type]
        return fmt.child_perm(FakeEdge(None, Node.file_role), Perm(0), Perm.all())  # type: ignore[arg-type]
    return perms


def _raw(options: dict[str, Any], export: Perm | None) -> Any:
    async def perms(graph: FakeGraph) -> tuple[Perm, Perm]:
        raw = DRIVERS["raw"](graph, "r", options)
        await raw.open(options)
        if export is None:
            return raw.child_perm(raw.children["file"], Perm(0), Perm.all())
        return raw.child_perm(raw.children["file"], export, EXPORT_SHARED)
    return perms


NBD = ["--nbd-server", "addr.type=unix,addr.path=nbd.sock"]
LAYOUT_CASES = {
    "bare-file": (["--blockdev", "driver=file,node-name=f,filename=disk.img"],
                  "disk.img", False, _bare),
    "raw-ro": (["--blockdev", "driver=file,node-name=f,filename=disk.img,read-only=on",
                "--blockdev", "driver=raw,node-name=r,file=f,read-only=on"],
               "disk.img", True, _raw({"file": "f", "read-only": True}, None)),
    "raw-ro-export": (["--blockdev", "driver=file,node-name=f,filename=disk.img,read-only=on",
                       "--blockdev", "driver=raw,node-name=r,file=f,read-only=on", *NBD,
                       "--export", "type=nbd,id=e,node-name=r"],
                      "disk.img", True, _raw({"file": "f", "read-only": True}, EXPORT_RO)),
    "raw-rw-export": (["--blockdev", "driver=file,node-name=f,filename=disk.img",
                       "--blockdev", "driver=raw,node-name=r,file=f", *NBD,
                       "--export", "type=nbd,id=e,node-name=r,writable=on"],
                      "disk.img", False, _raw({"file": "f"}, EXPORT_RW)),
    "raw-window-alone": (["--blockdev", "driver=file,node-name=f,filename=disk.img",
                          "--blockdev", "driver=raw,node-name=r,file=f,offset=512"],
                         "disk.img", False, _raw({"file": "f", "offset": 512}, None)),
    "raw-window-export": (["--blockdev", "driver=file,node-name=f,filename=disk.img",
                           "--blockdev", "driver=raw,node-name=r,file=f,size=4096", *NBD,
                           "--export", "type=nbd,id=e,node-name=r,writable=on"],
                          "disk.img", False, _raw({"file": "f", "size": 4096}, EXPORT_RW)),
    "qcow2-rw": (["--blockdev", "driver=file,node-name=f,filename=d.qcow2",
                  "--blockdev", "driver=qcow2,node-name=q,file=f"],
                 "d.qcow2", False, _qcow2(False)),
    "qcow2-ro": (["--blockdev", "driver=file,node-name=f,filename=d.qcow2,read-only=on",
                  "--blockdev", "driver=qcow2,node-name=q,file=f,read-only=on"],
                 "d.qcow2", True, _qcow2(True)),
}


@needs_qemu
@pytest.mark.parametrize("case", LAYOUT_CASES)
def test_lock_layout_matches_qsd(images: Path, qemu_sd: Any, case: str) -> None:
    args, image, read_only, perms = LAYOUT_CASES[case]
    qsd = qemu_sd(*args, qmp=False)
    theirs = lock_set(fdinfo_of(qsd.pid, images / image))
    qsd.stop()

    async def ours() -> set[int]:
        graph = FakeGraph()
        opts = {"filename": str(images / image), "read-only": read_only}
        node = FileNode(graph, "f", opts)
        await node.open(opts)
        graph.nodes["f"] = node
        result = perms(graph)
        perm, shared = await result if asyncio.iscoroutine(result) else result
        node.check_perm(perm, shared)
        node.set_perm(perm, shared)
        held = lock_set(Path(f"/proc/self/fdinfo/{node.fd}").read_text())
        await node.close()
        return held

    assert run(ours()) == theirs


# ----- conflicts both ways ----------------------------------------------------
QCOW2_RW = (Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE,
            Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)


async def _holding(path: Path, perm: Perm, shared: Perm, **opts: Any) -> FileNode:
    options = {"filename": str(path), **opts}
    node = FileNode(None, "f", options)
    await node.open(options)
    node.check_perm(perm, shared)
    node.set_perm(perm, shared)
    return node


@needs_qemu
def test_qemu_tools_refused_while_we_write(images: Path) -> None:
    async def main() -> None:
        held = await _holding(images / "disk.img", *QCOW2_RW)
        io = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 512", "disk.img"],
                            cwd=images, capture_output=True, text=True, check=False)
        await held.close()
        assert io.returncode == 1
        assert io.stderr == ("qemu-io: can't open device disk.img: Failed to get \"write\" lock\n"
                             "Is another process using the image [disk.img]?\n")
        # qemu-img info of a raw image takes no conflicting lock (in QEMU 7.2
        # as here); of a qcow2 image it refuses to share write.
        held = await _holding(images / "d.qcow2", *QCOW2_RW)
        info = subprocess.run(["qemu-img", "info", "d.qcow2"], cwd=images,
                              capture_output=True, text=True, check=False)
        forced = subprocess.run(["qemu-img", "info", "-U", "d.qcow2"], cwd=images,
                                capture_output=True, check=False)
        await held.close()
        assert info.returncode == 1
        assert info.stderr == ("qemu-img: Could not open 'd.qcow2': Failed to get shared "
                               "\"write\" lock\nIs another process using the image [d.qcow2]?\n")
        assert forced.returncode == 0
        for image in ("disk.img", "d.qcow2"):
            unlocked = await _holding(images / image, *QCOW2_RW, locking="off")
            assert subprocess.run(["qemu-img", "info", "d.qcow2"], cwd=images,
                                  capture_output=True, check=False).returncode == 0
            assert subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 512", "disk.img"],
                                  cwd=images, capture_output=True, check=False).returncode == 0
            await unlocked.close()

    run(main())


class HeldByQemuIO:
    """An interactive qemu-io keeps the image open until its stdin closes."""

    def __init__(self, path: Path, *args: str) -> None:
        self.proc = subprocess.Popen(["qemu-io", *args, str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self._locked(path):
            assert self.proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)

    def _locked(self, path: Path) -> bool:
        try:
            return bool(lock_set(fdinfo_of(self.proc.pid, path)))
        except (AssertionError, OSError):  # not open yet
            return False

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


@needs_qemu
def test_we_are_refused_while_qemu_io_holds(images: Path) -> None:
    raw_holder = HeldByQemuIO(images / "disk.img", "-f", "raw")  # holds read+write
    qcow2_holder = HeldByQemuIO(images / "d.qcow2", "-f", "qcow2")  # also unshares write+resize

    async def refused(path: Path, perm: Perm, shared: Perm) -> ImageLockError:
        options = {"filename": str(path)}
        node = FileNode(None, "f", options)
        await node.open(options)
        node.set_perm(Perm.CONSISTENT_READ, Perm.all())
        before = lock_set(Path(f"/proc/self/fdinfo/{node.fd}").read_text())
        with pytest.raises(ImageLockError) as exc:
            node.check_perm(perm, shared)
        # a refused check leaves the held bytes as they were
        assert lock_set(Path(f"/proc/self/fdinfo/{node.fd}").read_text()) == before
        await node.close()
        return exc.value

    async def main() -> None:
        err = await refused(images / "disk.img", *QCOW2_RW)
        assert err.desc == 'Failed to get shared "write" lock'
        assert err.hint == f"Is another process using the image [{images / 'disk.img'}]?"
        err = await refused(images / "d.qcow2", EXPORT_RW, EXPORT_SHARED)
        assert err.desc == 'Failed to get "write" lock'
        err = await refused(images / "d.qcow2", EXPORT_RO, EXPORT_SHARED)
        assert err.desc == 'Failed to get shared "resize" lock'
        # a writer that shares everything but resize coexists with qemu-io's raw user
        node = await _holding(images / "disk.img", EXPORT_RW, EXPORT_SHARED)
        await node.close()
        node = await _holding(images / "d.qcow2", *QCOW2_RW, locking="off")
        await node.close()

    try:
        run(main())
    finally:
        raw_holder.close()
        qcow2_holder.close()


@needs_qemu
def test_real_qsd_refused_by_us_and_us_by_it(images: Path, qemu_sd: Any) -> None:
    async def main() -> None:
        node = await _holding(images / "d.qcow2", *QCOW2_RW)
        r = subprocess.run([QSD, "--blockdev",
                            "driver=qcow2,node-name=q,file.driver=file,file.filename=d.qcow2"], cwd=images, capture_output=True, text=True,
                           timeout=10, check=False)
        assert r.stderr.endswith(': Failed to get "write" lock\n'
                                 "Is another process using the image [d.qcow2]?\n")
        await node.close()

    run(main())
    qemu_sd("--blockdev", "driver=file,node-name=f,filename=d.qcow2",
            "--blockdev", "driver=qcow2,node-name=q,file=f", qmp=False)

    async def refused() -> None:
        options = {"filename": str(images / "d.qcow2"), "read-only": True}
        node = FileNode(None, "f", options)
        await node.open(options)
        with pytest.raises(ImageLockError) as exc:
            node.check_perm(Perm.CONSISTENT_READ, Perm.all() & ~(Perm.WRITE | Perm.RESIZE))
        assert exc.value.desc == 'Failed to get shared "write" lock'
        await node.close()

    run(refused())


def test_two_nodes_in_one_process_conflict(tmp_path: Path) -> None:
    """OFD locks belong to the open file description, as in QEMU."""
    path = tmp_path / "x.img"
    path.write_bytes(bytes(4096))

    async def main() -> None:
        first = await _holding(path, *QCOW2_RW, locking="on")
        options = {"filename": str(path), "locking": "on"}
        second = FileNode(None, "g", options)
        await second.open(options)
        with pytest.raises(ImageLockError) as exc:
            second.check_perm(*QCOW2_RW)
        assert exc.value.desc == 'Failed to get "write" lock'
        await first.close()
        second.check_perm(*QCOW2_RW)
        second.set_perm(*QCOW2_RW)
        await second.close()

    run(main())
