# SPDX-License-Identifier: GPL-2.0-or-later
"""The ``file``/``host_device`` protocol drivers, differentially against
QEMU 7.2's tools where they define the behaviour."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qsd.block.node import Perm
from qsd.block.protocols.file import FileNode, HostDeviceNode
from qsd.qmp.errors import GenericError

QSD = "qemu-storage-daemon"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def qemu_tools(require_tool: Any) -> None:
    """QEMU 7.2's tools are the oracle: skip without them (fail under CI)."""
    for tool in ("qemu-storage-daemon", "qemu-img", "qemu-io"):
        require_tool(tool)


needs_qemu = pytest.mark.usefixtures("qemu_tools")


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def opened(options: dict[str, Any], cls: type[FileNode] = FileNode) -> FileNode:
    node = cls(None, "f", options)
    await node.open(options)
    return node


def qsd_error(blockdev: str, cwd: Path) -> str:
    """The error QSD 7.2 prints for a --blockdev that fails to open."""
    r = subprocess.run([QSD, "--blockdev", blockdev], cwd=cwd, capture_output=True,
                       text=True, timeout=10, check=False)
    assert r.returncode == 1, r
    prefix = f"qemu-storage-daemon: --blockdev {blockdev}: "
    assert r.stderr.startswith(prefix), r.stderr
    return r.stderr[len(prefix):].rstrip("\n")


async def our_error(options: dict[str, Any], cls: type[FileNode] = FileNode) -> str:
    with pytest.raises(GenericError) as exc:
        await opened(options, cls)
    return exc.value.desc


def qemu_io(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-io", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=10, check=False)


@pytest.fixture
def chdir(tmp_path: Path) -> Iterator[Path]:
    """Run in tmp_path so relative file names read as QSD reports them."""
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(old)


# ----- open errors -------------------------------------------------------
OPEN_ERROR_CASES = [
    ("file", {"filename": "missing.img"}),
    ("file", {"filename": "/tmp"}),
    ("file", {"filename": "/tmp", "read-only": True}),
    ("file", {"filename": ""}),
    ("file", {"filename": "/dev/null"}),
    ("file", {"filename": "disk.img", "aio": "native"}),
    ("file", {"filename": "missing.img", "aio": "native"}),
    ("file", {"filename": "disk.img", "pr-manager": "pr0"}),
    ("file", {"filename": "missing.img", "pr-manager": "pr0"}),
    ("file", {"filename": "", "pr-manager": "pr0"}),
    ("host_device", {"filename": "disk.img"}),
    ("host_device", {"filename": "disk.img", "aio": "native"}),
    ("host_device", {"filename": "/tmp", "read-only": True}),
    ("host_device", {"filename": ""}),
    ("host_device", {"filename": "missing.img"}),
]


def _keyval(driver: str, options: dict[str, Any]) -> str:
    parts = [f"driver={driver}", "node-name=f"]
    for key, value in options.items():
        parts.append(f"{key}={'on' if value is True else value}")
    return ",".join(parts)


@needs_qemu
@pytest.mark.parametrize("driver,options", OPEN_ERROR_CASES)
def test_open_errors_match_qsd(chdir: Path, driver: str, options: dict[str, Any]) -> None:
    (chdir / "disk.img").write_bytes(bytes(4096))
    cls = FileNode if driver == "file" else HostDeviceNode
    assert run(our_error(options, cls)) == qsd_error(_keyval(driver, options), chdir)


def _run_without_dac_override(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Root without CAP_DAC_OVERRIDE meets file modes like a normal user."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                           sys.executable, "-c", textwrap.dedent(code)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=20,
                          check=False)


@needs_qemu
def test_permission_denied_and_auto_read_only(tmp_path: Path) -> None:
    (tmp_path / "ro.img").write_bytes(bytes(4096))
    (tmp_path / "ro.img").chmod(0o444)
    (tmp_path / "none.img").write_bytes(bytes(4096))
    (tmp_path / "none.img").chmod(0)
    r = _run_without_dac_override("""
        import asyncio, fcntl, os
        from qsd.block.node import Perm
        from qsd.block.protocols.file import FileNode
        from qsd.qmp.errors import GenericError
        async def err(opts):
            n = FileNode(None, "f", opts)
            try:
                await n.open(opts)
            except GenericError as e:
                return e.desc
            return None
        async def main():
            print(await err({"filename": "ro.img"}))
            print(await err({"filename": "none.img", "read-only": True}))
            print(await err({"filename": "none.img", "auto-read-only": True}))
            opts = {"filename": "ro.img", "auto-read-only": True}
            n = FileNode(None, "f", opts)
            await n.open(opts)
            print(fcntl.fcntl(n.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY)
            try:
                n.check_perm(Perm.CONSISTENT_READ | Perm.WRITE, Perm.all())
            except GenericError as e:
                print(e.desc)
            await n.close()
        asyncio.run(main())
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    ours = r.stdout.splitlines()
    qsd = subprocess.run(
        ["setpriv", "--bounding-set=-dac_override,-dac_read_search", QSD, "--blockdev",
         "driver=file,node-name=f,filename=ro.img"], cwd=tmp_path, capture_output=True,
        text=True, timeout=10, check=False).stderr
    assert qsd.endswith(": Could not open 'ro.img': Permission denied\n")
    assert ours == ["Could not open 'ro.img': Permission denied",
                    "Could not open 'none.img': Permission denied",
                    "Could not open 'none.img': Permission denied",
                    "True",
                    "Could not open 'ro.img': Permission denied"]


def test_auto_read_only_reopens_on_write_permission(tmp_path: Path) -> None:
    """QSD opens auto-read-only files O_RDONLY and switches the descriptor to
    O_RDWR only while a parent writes (observed in /proc/PID/fdinfo)."""
    path = tmp_path / "a.img"
    path.write_bytes(bytes(8192))

    async def main() -> None:
        node = await opened({"filename": str(path), "auto-read-only": True})
        fd = node.fd

        def mode() -> int:
            return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE

        assert mode() == os.O_RDONLY
        with pytest.raises(OSError):
            await node.write(0, b"x")
        node.check_perm(Perm.CONSISTENT_READ | Perm.WRITE, Perm.all() & ~Perm.RESIZE)
        node.set_perm(Perm.CONSISTENT_READ | Perm.WRITE, Perm.all() & ~Perm.RESIZE)
        assert node.fd == fd and mode() == os.O_RDWR
        await node.write(0, b"hello")
        node.set_perm(Perm(0), Perm.all())
        assert node.fd == fd and mode() == os.O_RDONLY
        assert await node.read(0, 5) == b"hello"
        await node.close()

    run(main())


# ----- sizes, reads and writes against qemu-io -------------------------------
@needs_qemu
def test_odd_size_rounds_up_and_tail_reads_zero(tmp_path: Path) -> None:
    path = tmp_path / "odd.img"
    data = os.urandom(1000)
    path.write_bytes(data)
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", "--image-opts", f"driver=file,filename={path}"],
        capture_output=True, text=True, check=True).stdout)

    async def main() -> None:
        node = await opened({"filename": str(path)})
        assert node.size == info["virtual-size"] == 1024
        assert node.actual_size() == info["actual-size"]
        assert node.filename == str(path)
        assert await node.read(0, 1024) == data + bytes(24)
        assert await node.read(1000, 24) == bytes(24)
        # a write into the tail grows the file, as QEMU's does
        await node.write(1000, b"\xaa" * 24)
        assert path.stat().st_size == 1024
        await node.close()

    run(main())


@needs_qemu
@pytest.mark.parametrize("direct", [False, True])
def test_differential_read_write(tmp_path: Path, direct: bool) -> None:
    path = tmp_path / "d.img"
    path.write_bytes(bytes(1 << 20))
    opts: dict[str, Any] = {"filename": str(path), "cache": {"direct": direct}}

    async def ours_write() -> None:
        node = await opened(opts)
        await node.write(4096, b"\x5a" * 65536)
        await node.write(300, b"\x11" * 700)  # unaligned for O_DIRECT
        await node.write(1000, b"\x22" * 3, fua=True)
        await node.flush()
        await node.close()

    run(ours_write())
    r = qemu_io("-f", "raw", "-c", "read -P 0x5a 4096 65536", "-c", "read -P 0x11 300 700",
                "-c", "read -P 0x22 1000 3", "-c", "read -P 0 0 300", str(path))
    assert "Pattern verification failed" not in r.stdout and r.returncode == 0, r.stdout
    qemu_io("-f", "raw", "-c", "write -P 0x77 100001 5000", str(path))

    async def ours_read() -> None:
        node = await opened(opts)
        assert await node.read(100001, 5000) == b"\x77" * 5000
        assert await node.read(99996, 5) == bytes(5)
        await node.close()

    run(ours_read())


def test_direct_unaligned_random_io(tmp_path: Path) -> None:
    """O_DIRECT nodes accept any offset/length, also concurrently."""
    path = tmp_path / "o.img"
    model = bytearray(os.urandom(200_000))
    path.write_bytes(model)
    rng = random.Random(7)

    async def main() -> None:
        node = await opened({"filename": str(path), "cache": {"direct": True}})
        assert node.request_alignment >= 512
        flags = fcntl.fcntl(node.fd, fcntl.F_GETFL)
        assert flags & os.O_DIRECT

        async def write(off: int, data: bytes) -> None:
            await node.write(off, data)
            model[off:off + len(data)] = data

        for _ in range(3):
            await asyncio.gather(*(write(rng.randrange(150_000), os.urandom(rng.randrange(1, 3000)))
                                   for _ in range(60)))
            for _ in range(30):
                off, n = rng.randrange(190_000), rng.randrange(1, 9000)
                n = min(n, len(model) - off)
                assert await node.read(off, n) == model[off:off + n]
        assert node.host_extent(0, 512) is None  # no sendfile from O_DIRECT fds
        await node.close()

    run(main())
    assert path.read_bytes()[:len(model)] == model


def test_nowait_miss_goes_to_pool(tmp_path: Path) -> None:
    """A read the page cache cannot serve (RWF_NOWAIT says EAGAIN) still completes."""
    path = tmp_path / "cold.img"
    data = os.urandom(4 << 20)
    path.write_bytes(data)

    async def main() -> None:
        node = await opened({"filename": str(path)})
        os.fsync(node.fd)
        os.posix_fadvise(node.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        bufs = await asyncio.gather(*(node.read(off, 65536) for off in range(0, 4 << 20, 1 << 20)))
        assert [bytes(b) for b in bufs] == [data[o:o + 65536] for o in range(0, 4 << 20, 1 << 20)]
        await node.close()

    run(main())


# ----- zeroes, discard, truncate --------------------------------------------
def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_write_zeroes_and_discard(tmp_path: Path) -> None:
    path = tmp_path / "z.img"
    path.write_bytes(os.urandom(1 << 20))

    async def main() -> None:
        keep = await opened({"filename": str(path)})
        await keep.write_zeroes(0, 65536, may_unmap=True)  # discard=ignore: no hole
        assert await keep.read(0, 65536) == bytes(65536)
        assert _allocated(path) >= 1 << 20
        await keep.discard(0, 1 << 20)  # no-op without discard=unmap
        assert await keep.read(65536, 16) != bytes(16)
        await keep.close()

        node = await opened({"filename": str(path), "discard": "unmap"})
        await node.write_zeroes(65536, 131072, may_unmap=True)
        assert await node.read(65536, 131072) == bytes(131072)
        assert _allocated(path) <= (1 << 20) - 131072
        await node.discard(524288, 65536)
        assert _allocated(path) <= (1 << 20) - 196608
        # zeroing past EOF grows the file (format drivers append this way)
        await node.write_zeroes((1 << 20) + 4096, 8192)
        assert path.stat().st_size == (1 << 20) + 12288 and node.size == path.stat().st_size
        await node.write_zeroes(300100, 50, fua=True)
        around = await node.read(300090, 70)
        assert around[10:60] == bytes(50) and around[:10] != bytes(10) and around[60:] != bytes(10)
        await node.close()

    run(main())


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs tmpfs at /dev/shm")
def test_write_zeroes_without_host_support() -> None:
    """tmpfs has no FALLOC_FL_ZERO_RANGE: NBD fast-zero must fail with ENOTSUP,
    a normal write-zeroes falls back to writing zeroes."""
    path = Path(f"/dev/shm/qsd-test-{os.getpid()}.img")
    path.write_bytes(b"\xff" * 65536)
    try:
        async def main() -> None:
            node = await opened({"filename": str(path)})
            with pytest.raises(OSError) as exc:
                await node.write_zeroes(0, 4096, no_fallback=True)
            assert exc.value.errno == errno.ENOTSUP
            await node.write_zeroes(4096, 8192)
            assert await node.read(0, 16384) == b"\xff" * 4096 + bytes(8192) + b"\xff" * 4096
            await node.close()

        run(main())
    finally:
        path.unlink()


@needs_qemu
def test_truncate_modes(tmp_path: Path) -> None:
    path = tmp_path / "t.img"
    path.write_bytes(b"\x01" * 4096)

    async def main() -> None:
        node = await opened({"filename": str(path)})
        await node.truncate(1 << 20, prealloc="falloc")
        assert path.stat().st_size == 1 << 20 and _allocated(path) >= 1 << 20
        await node.truncate(3 << 20, prealloc="full")
        assert _allocated(path) >= 3 << 20
        with pytest.raises(GenericError) as exc:
            await node.truncate(4 << 20, prealloc="metadata")
        assert exc.value.desc == "Unsupported preallocation mode: metadata"
        await node.truncate(1000)
        assert path.stat().st_size == 1000 and node.size == 1024
        assert await node.read(0, 1024) == b"\x01" * 1000 + bytes(24)
        await node.truncate(2 * 1024 * 1024 + 1)
        assert node.size == 2 * 1024 * 1024 + 512
        await node.close()

    run(main())
    r = subprocess.run(["qemu-img", "resize", "-f", "raw", "--preallocation=metadata", str(path),
                        "4M"], capture_output=True, text=True, check=False)
    assert r.stderr == "qemu-img: Unsupported preallocation mode: metadata\n"


# ----- mapping ----------------------------------------------------------------
def _map(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run(["qemu-img", "map", "--output=json", "--image-opts",
                          f"driver=file,filename={path}"], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)


async def _our_map(node: FileNode) -> list[dict[str, Any]]:
    """Our block status in qemu-img map's terms, adjacent runs merged as it does."""
    out: list[dict[str, Any]] = []
    pos = 0
    while pos < node.size:
        for e in await node.block_status(pos, node.size - pos):
            assert e.offset == pos and e.host_fd == node.fd and e.host_offset == pos
            row = {"start": e.offset, "length": e.length, "depth": 0, "present": True,
                   "zero": e.zero, "data": e.data, "offset": e.host_offset}
            last = out[-1] if out else None
            if last and (last["zero"], last["data"]) == (e.zero, e.data):
                last["length"] += e.length
            else:
                out.append(row)
            pos += e.length
    return out


@needs_qemu
def test_block_status_matches_qemu_img_map(tmp_path: Path) -> None:
    path = tmp_path / "m.img"
    with open(path, "wb") as f:
        f.truncate(10 << 20)
        f.seek(1 << 20)
        f.write(b"\x01" * 65536)
        f.seek(3 << 20)
        f.write(b"\x02" * 4096)
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"\x03" * 1000)

    async def main() -> None:
        for p in (path, odd):
            node = await opened({"filename": str(p)})
            assert await _our_map(node) == _map(p)
            await node.close()
        node = await opened({"filename": str(path)})
        assert node.host_extent(1 << 20, 65536) == (node.fd, 1 << 20)
        await node.close()
        node = await opened({"filename": str(odd)})
        assert node.host_extent(512, 512) is None  # crosses EOF: zero tail
        await node.close()

    run(main())


# ----- host_device on a loop device -----------------------------------------
@pytest.fixture
def loopdev(tmp_path: Path) -> Iterator[str]:
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("needs root and losetup")
    backing = tmp_path / "loop.img"
    backing.write_bytes(bytes(4 << 20))
    r = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                       text=True, check=False)
    if r.returncode:
        pytest.skip(f"no loop device: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


@needs_qemu
def test_host_device(loopdev: str, tmp_path: Path) -> None:
    assert run(our_error({"filename": loopdev})) == qsd_error(
        f"driver=file,node-name=f,filename={loopdev}", tmp_path)

    async def main() -> None:
        node = await opened({"filename": loopdev}, HostDeviceNode)
        assert node.size == 4 << 20 and node.actual_size() == 0
        await node.write(512, b"\x42" * 1024)
        await node.flush()
        assert await node.read(512, 1024) == b"\x42" * 1024
        await node.truncate(1 << 20)  # a smaller size is accepted, nothing changes
        assert node.size == 4 << 20
        with pytest.raises(GenericError) as exc:
            await node.truncate(8 << 20)
        assert exc.value.desc == "Cannot grow device files"
        ext = await node.block_status(0, node.size)
        assert ext[0].data and ext[0].host_fd == node.fd
        await node.close()
        direct = await opened({"filename": loopdev, "cache": {"direct": True}}, HostDeviceNode)
        assert direct.request_alignment == 512
        assert await direct.read(700, 100) == b"\x42" * 100
        await direct.close()

    run(main())
    r = qemu_io("-f", "raw", "-c", "read -P 0x42 512 1024", loopdev)
    assert "verification failed" not in r.stdout, r.stdout


def test_close_waits_for_pool_requests(tmp_path: Path) -> None:
    path = tmp_path / "c.img"
    path.write_bytes(bytes(1 << 20))

    async def main() -> None:
        node = await opened({"filename": str(path)})
        pending = [asyncio.ensure_future(node.write(i * 4096, b"x" * 4096, fua=True))
                   for i in range(16)]
        await asyncio.sleep(0)
        await node.close()
        for task in pending:
            with contextlib.suppress(OSError):
                await task
        assert node.fd == -1

    run(main())
    assert path.read_bytes()[:4096] == b"x" * 4096
