# SPDX-License-Identifier: GPL-2.0-or-later
"""FUSE export (``--export type=fuse``) against the real qemu-storage-daemon 7.2.

Differential sessions run the same shell commands (coreutils, util-linux's
fallocate, qemu-img, qemu-io, Python's os module for O_DIRECT, lseek and
statvfs) on a file mounted by QSD and on one mounted by qsd, and the same
QMP commands on both, and compare everything they print. The acceptance
test drives a qcow2 node through the mount and checks what landed in the
image. In-process tests cover the request parser (hypothesis), the
allow-other fallback and drained sections.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import struct
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from qsd.export import fuse
from qsd.export.fuse import (IN_HEADER, INIT_IN, INIT_OUT, WRITE_IN, FuseProtocolError,
                             init_reply, parse_request, write_payload)

HAVE_FUSE = os.path.exists("/dev/fuse") and os.geteuid() == 0
needs_fuse = pytest.mark.skipif(not HAVE_FUSE, reason="needs /dev/fuse and root (mount(2))")

MiB = 1 << 20


# ---------------------------------------------------------------------------
# helpers


def mount_lines(path: Path) -> list[str]:
    """Lines of /proc/mounts whose mountpoint is ``path``, the path replaced by MNT."""
    want = str(path).replace(" ", "\\040")
    out = []
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == want:
                out.append(" ".join([fields[0], "MNT", *fields[2:]]))
    return out


_TIMING = re.compile(r"(\d+(\.\d+)? (k|M|G)?B(/s)?|[\d.e-]+ s|\d+:\d+:\d+\.\d+"
                     r"|\([\d.]+ [KMG]?i?B/sec and [\d.]+ ops/sec\))")


def sh(cmd: str, cwd: Path) -> str:
    """Run ``cmd`` in ``cwd``; its status, stdout and stderr with paths and timings masked."""
    r = subprocess.run(["sh", "-c", cmd], cwd=cwd, capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    text = f"$ {cmd}\n[{r.returncode}] {r.stdout}{r.stderr}".replace(str(cwd), "DIR")
    return _TIMING.sub("T", text)


def setup_dir(d: Path, fmt: str, size: int = MiB) -> None:
    d.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(d / f"img.{fmt}"), str(size)], check=True)
    (d / "mnt.raw").touch()
    (d / "adir").mkdir()
    (d / "nulllink").symlink_to("/dev/null")
    os.mkfifo(d / "fifo")
    # the same "random" data in every directory
    (d / "pat.bin").write_bytes(bytes((i * 131 + i // 977) & 0xFF for i in range(192 * 1024)))


def start(factory: Any, d: Path, fmt: str, *export: str, node_opts: str = "") -> Any:
    args = ["--blockdev", f"driver=file,node-name=f0,filename=img.{fmt}{node_opts}",
            "--blockdev", f"driver={fmt},node-name=d0,file=f0{node_opts}"]
    for e in export:
        args += ["--export", e]
    return factory(*args, cwd=d)


def qmp_session(q: Any, commands: list[tuple[str, dict[str, Any]]]) -> list[str]:
    out = []
    for name, args in commands:
        r = q.execute(name, args)
        r.pop("id", None)
        out.append(f"{name} {args} -> {r}")
        if name == "block-export-del" and "return" in r:
            ev = q.wait_event("BLOCK_EXPORT_DELETED")
            out.append(f"event {ev['data']}")
    return out


O_DIRECT_PY = (
    "import mmap, os\n"
    "fd = os.open('mnt.raw', os.O_RDWR | os.O_DIRECT)\n"
    "buf = mmap.mmap(-1, 8192); buf.write(b'D' * 4096 + b'E' * 4096)\n"
    "print(os.pwritev(fd, [buf], 81920))\n"
    "back = mmap.mmap(-1, 8192); print(os.preadv(fd, [back], 81920), back[:] == buf[:])\n"
    "os.close(fd)\n")

LSEEK_PY = (
    "import os\n"
    "fd = os.open('mnt.raw', os.O_RDONLY)\n"
    "for off, whence in [(0, os.SEEK_DATA), (0, os.SEEK_HOLE), (4096, os.SEEK_HOLE), (70000, os.SEEK_DATA),\n"
    "                    (1048576, os.SEEK_HOLE), (1048576, os.SEEK_DATA), (2000000, os.SEEK_HOLE)]:\n"
    "    try:\n"
    "        print(off, whence, os.lseek(fd, off, whence))\n"
    "    except OSError as e:\n"
    "        print(off, whence, e.strerror)\n")

STATVFS_PY = "import os; s = os.statvfs('mnt.raw'); print(s.f_bsize, s.f_frsize, s.f_blocks, s.f_namemax, s.f_flag)"
FSYNC_PY = "import os; fd = os.open('mnt.raw', os.O_RDWR); os.write(fd, b'sync'); os.fsync(fd); os.fdatasync(fd); print('ok')"

# Commands every writable session runs: data paths and metadata behaviour.
WRITABLE_COMMON = [
    # st_blocks is the image file's allocation: compared on raw only (qcow2s lay out differently)
    "stat -c '%F %s %a %u %g %B %o %i %h' mnt.raw",
    "qemu-img info -f raw mnt.raw | grep -E '^(file format|virtual size)'",
    "qemu-io -f raw -c 'write -P 0x5a 4096 8192' -c 'read -P 0x5a 4096 8192' -c 'read -P 0 0 4096' mnt.raw",
    "dd if=pat.bin of=mnt.raw bs=64k seek=3 conv=notrunc status=none; md5sum mnt.raw",
    "qemu-io -f raw -t none -c 'write -P 0x33 131072 65536' -c 'read -P 0x33 131072 65536' mnt.raw",
    f"python3 -c \"{O_DIRECT_PY}\"",
    "fallocate -p -o 200704 -l 65536 mnt.raw; md5sum mnt.raw",
    "fallocate -z -o 300000 -l 10000 mnt.raw; md5sum mnt.raw",
    "fallocate -z -n -o 1040384 -l 16384 mnt.raw; stat -c %s mnt.raw; md5sum mnt.raw",
    "fallocate -p -o 1044480 -l 8192 mnt.raw; stat -c %s mnt.raw",
    "fallocate -l 4096 mnt.raw",
    "fallocate -c -o 0 -l 4096 mnt.raw; fallocate -i -o 0 -l 4096 mnt.raw; fallocate -n -o 0 -l 4096 mnt.raw",
    "fallocate -z -n -o 2M -l 4096 mnt.raw",
    "dd if=pat.bin of=mnt.raw bs=4k seek=256 count=1 conv=notrunc status=none; stat -c %s mnt.raw",
    "dd if=pat.bin of=mnt.raw bs=8k seek=127 count=1 conv=notrunc status=none; stat -c %s mnt.raw",
    "dd if=mnt.raw bs=4k skip=255 status=none | wc -c; dd if=mnt.raw bs=4k skip=256 status=none | wc -c",
    f"python3 -c \"{FSYNC_PY}\"",
    ": > mnt.raw; stat -c %s mnt.raw",
    "chmod 644 mnt.raw; stat -c %a mnt.raw; chmod 4755 mnt.raw; stat -c %a mnt.raw; chmod 600 mnt.raw",
    "chown 1:2 mnt.raw; stat -c '%u %g' mnt.raw; chown 0:0 mnt.raw",
    "touch mnt.raw; touch -m -d @0 mnt.raw",
    "ln mnt.raw hard; rm -f mnt.raw; mv mnt.raw other; ls mnt.raw/",
    f"python3 -c \"{STATVFS_PY}\"",
    "md5sum mnt.raw",
]

# Image locks while exported: the export takes RESIZE when writable or growable.
LOCKS = ["qemu-img info -f raw img.raw | head -1", "qemu-io -f raw -c 'read 0 512' img.raw | head -1",
         "qemu-io -r -f raw -c 'read 0 512' img.raw | head -1", "qemu-img resize -f raw img.raw 2M"]

# Resizing: grow, shrink, unaligned sizes, fallocate's preallocating growth.
RESIZING = [
    "truncate -s 2M mnt.raw; stat -c %s mnt.raw; qemu-img info -f raw mnt.raw | grep 'virtual size'",
    "truncate -s 1M mnt.raw; stat -c %s mnt.raw",
    "truncate -s 1000000 mnt.raw; stat -c %s mnt.raw",
    "fallocate -o 2M -l 4096 mnt.raw; stat -c %s mnt.raw; truncate -s 1M mnt.raw",
    "fallocate -o 1048576 -l 65536 mnt.raw; stat -c %s mnt.raw; truncate -s 1M mnt.raw",
    "fallocate -z -o 1M -l 4096 mnt.raw; stat -c %s mnt.raw; truncate -s 1M mnt.raw",
    "md5sum mnt.raw",
]


def run_session(factory: Any, d: Path, fmt: str, export: str, commands: list[str],
                qmp: list[tuple[str, dict[str, Any]]] = (), node_opts: str = "") -> list[str]:
    daemon = start(factory, d, fmt, export, node_opts=node_opts)
    out = mount_lines(d / "mnt.raw")
    out += [sh(c, d) for c in commands]
    q = daemon.qmp()
    out += qmp_session(q, list(qmp))
    out += mount_lines(d / "mnt.raw")
    q.execute("quit")
    out.append(f"exit {daemon.wait()}")
    out += mount_lines(d / "mnt.raw")
    return out


def differential(qemu_sd: Any, qsd: Any, workdir: Path, fmt: str, export: str, commands: list[str],
                 qmp: list[tuple[str, dict[str, Any]]] = (), node_opts: str = "") -> tuple[Path, Path]:
    dirs = []
    outs = []
    for kind, factory in (("qemu", qemu_sd), ("qsd", qsd)):
        d = workdir / kind
        setup_dir(d, fmt)
        outs.append(run_session(factory, d, fmt, export, commands, qmp, node_opts))
        dirs.append(d)
    assert outs[1] == outs[0]
    return dirs[0], dirs[1]


# ---------------------------------------------------------------------------
# differential sessions

BAD_MOUNTPOINTS = [
    ("block-export-add", {"type": "fuse", "id": "x", "node-name": "d0", "mountpoint": m})
    for m in ["nonexistent", "adir", "nulllink", "fifo", "", "nodir/mnt.raw"]
] + [
    ("block-export-add", {"type": "fuse", "id": "x", "node-name": "d0", "mountpoint": "mnt.raw"}),
    ("block-export-add", {"type": "fuse", "id": "e0", "node-name": "d0", "mountpoint": "pat.bin"}),
    ("query-block-exports", {}),
    ("block-export-del", {"id": "e0", "mode": "safe"}),
    ("block-export-del", {"id": "e0"}),
    ("query-block-exports", {}),
]


@needs_fuse
def test_raw_writable_session(qemu_sd: Any, qsd: Any, workdir: Path, require_tool: Any) -> None:
    """Data, metadata, resizing and QMP errors on a raw node: byte-identical output."""
    require_tool("fallocate")
    q, o = differential(qemu_sd, qsd, workdir, "raw",
                        "type=fuse,id=e0,node-name=d0,mountpoint=mnt.raw,writable=on",
                        ["stat -c %b mnt.raw", *WRITABLE_COMMON, *RESIZING,
                         "truncate -s 3M mnt.raw; stat -c '%s %b' mnt.raw; truncate -s 1M mnt.raw", *LOCKS],
                        BAD_MOUNTPOINTS)
    assert (q / "img.raw").read_bytes() == (o / "img.raw").read_bytes()


@needs_fuse
@pytest.mark.parametrize("node_opts", ["", ",discard=unmap"], ids=["discard-ignore", "discard-unmap"])
def test_qcow2_writable_session(qemu_sd: Any, qsd: Any, workdir: Path, node_opts: str) -> None:
    """The same session over qcow2 (growth included), block status as lseek, images equal afterwards;
    punched holes are dropped only with discard=unmap, and only whole clusters."""
    commands = ["qemu-io -f raw -c 'write -P 0x11 4096 8192' mnt.raw", f"python3 -c \"{LSEEK_PY}\"",
                *WRITABLE_COMMON, *RESIZING,
                "fallocate -z -o 2M -l 65536 mnt.raw; stat -c %s mnt.raw; md5sum mnt.raw"]
    q, o = differential(qemu_sd, qsd, workdir, "qcow2",
                        "type=fuse,id=e0,node-name=d0,mountpoint=mnt.raw,writable=on", commands,
                        node_opts=node_opts)
    r = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(q / "img.qcow2"),
                        str(o / "img.qcow2")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(["qemu-img", "check", str(o / "img.qcow2")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_fuse
def test_growable_session(qemu_sd: Any, qsd: Any, workdir: Path) -> None:
    """growable=on: writes past the end grow the node."""
    differential(qemu_sd, qsd, workdir, "raw",
                 "type=fuse,id=e0,node-name=d0,mountpoint=mnt.raw,writable=on,growable=on",
                 ["dd if=pat.bin of=mnt.raw bs=4k seek=256 count=3 conv=notrunc status=none; stat -c %s mnt.raw",
                  "dd if=pat.bin of=mnt.raw bs=1000 seek=2000 count=1 conv=notrunc status=none; stat -c %s mnt.raw",
                  "qemu-io -f raw -c 'write -P 0x77 3M 4096' mnt.raw | head -1; stat -c %s mnt.raw",
                  "md5sum mnt.raw", *LOCKS])


@needs_fuse
@pytest.mark.parametrize("growable", ["", ",growable=on"], ids=["plain", "growable"])
def test_read_only_session(qemu_sd: Any, qsd: Any, workdir: Path, growable: str) -> None:
    """A read-only export (growable or not): mode 0400, every change refused with QSD's errno."""
    differential(qemu_sd, qsd, workdir, "raw", "type=fuse,id=e0,node-name=d0,mountpoint=mnt.raw" + growable,
                 ["stat -c '%F %s %a' mnt.raw",
                  "qemu-io -f raw -r -c 'read -P 0 0 64k' mnt.raw",
                  "dd if=pat.bin of=mnt.raw bs=4k count=1 conv=notrunc status=none",
                  "qemu-io -f raw -c 'write 0 4k' mnt.raw",
                  "truncate -s 2M mnt.raw; fallocate -p -l 4096 mnt.raw; fallocate -z -l 4096 mnt.raw",
                  "fallocate -o 1M -l 4096 mnt.raw",
                  "chmod 644 mnt.raw; chmod 444 mnt.raw; stat -c %a mnt.raw; chmod 400 mnt.raw",
                  "chown 5:6 mnt.raw; stat -c '%u %g' mnt.raw",
                  "md5sum mnt.raw", *LOCKS],
                 [("block-export-add", {"type": "fuse", "id": "e1", "node-name": "d0", "mountpoint": "mnt.raw",
                                        "writable": True}),
                  ("block-export-del", {"id": "e0", "mode": "hard"})])


@needs_fuse
def test_allow_other_off_session(qemu_sd: Any, qsd: Any, workdir: Path) -> None:
    """allow-other=off: no allow_other mount option, no bits for group/others, no chown."""
    differential(qemu_sd, qsd, workdir, "raw",
                 "type=fuse,id=e0,node-name=d0,mountpoint=mnt.raw,writable=on,allow-other=off",
                 ["stat -c %a mnt.raw", "chmod 640 mnt.raw; chmod 604 mnt.raw; chmod 700 mnt.raw; stat -c %a mnt.raw",
                  "chown 1 mnt.raw; chgrp 1 mnt.raw; stat -c '%u %g' mnt.raw"])


@needs_fuse
def test_cli_errors_match(qemu_sd: Any, qsd: Any, workdir: Path) -> None:
    """Bad mountpoints on the command line: same message, same exit status."""
    setup_dir(workdir, "raw")
    for mp in ["nonexistent", "adir", "fifo"]:
        results = []
        for factory in (qemu_sd, qsd):
            daemon = factory("--blockdev", "driver=file,node-name=f0,filename=img.raw",
                             "--export", f"type=fuse,id=e0,node-name=f0,mountpoint={mp}",
                             cwd=workdir, check=False, qmp=False)
            status = daemon.wait()
            results.append((status, daemon.stderr().replace("qemu-storage-daemon", "qsd")))
        assert results[1] == results[0]
        assert results[0][0] == 1


# ---------------------------------------------------------------------------
# acceptance: a qcow2 node used through the mount


@needs_fuse
def test_qcow2_through_the_mount(qsd: Any, workdir: Path, require_tool: Any) -> None:
    """qemu-img, qemu-io, dd, fallocate -p and O_DIRECT work through the mount; the data lands in
    the qcow2 (qemu-img compare against a plain file given the same commands); del unmounts."""
    require_tool("fallocate")
    setup_dir(workdir, "qcow2", 4 * MiB)
    ref = workdir / "ref"
    ref.mkdir()
    (ref / "mnt.raw").write_bytes(bytes(4 * MiB))
    shutil.copy(workdir / "pat.bin", ref / "pat.bin")
    # discard=unmap: with the default (ignore) a punched hole keeps its data, in QSD too
    daemon = start(qsd, workdir, "qcow2", "type=fuse,id=e0,node-name=d0,mountpoint=mnt.raw,writable=on",
                   node_opts=",discard=unmap")
    lines = mount_lines(workdir / "mnt.raw")
    assert len(lines) == 1 and lines[0].startswith("/dev/fuse MNT fuse rw,nosuid,nodev"), lines
    info = subprocess.run(["qemu-img", "info", "-f", "raw", "--output=json", "mnt.raw"], cwd=workdir,
                          capture_output=True, text=True, check=True).stdout
    assert '"virtual-size": 4194304' in info
    commands = [
        "qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'write -P 0xcd 1536k 512k' -c 'read -P 0xab 0 1M' mnt.raw",
        "dd if=pat.bin of=mnt.raw bs=64k seek=40 conv=notrunc status=none",
        "dd if=pat.bin of=mnt.raw bs=512 seek=3 count=7 conv=notrunc status=none",
        "fallocate -p -o 65536 -l 131072 mnt.raw",
        "fallocate -p -o 1572864 -l 196608 mnt.raw",
        "fallocate -z -o 2700000 -l 70000 mnt.raw",
        f"python3 -c \"{O_DIRECT_PY}\"",
        "qemu-io -f raw -t none -c 'write -P 0x42 3M 256k' -c 'read -P 0x42 3M 256k' mnt.raw",
    ]
    for c in commands:
        mine, expected = sh(c, workdir), sh(c, ref)
        assert "[0]" in mine, mine
        assert mine == expected.replace(str(ref), "DIR")
    md5 = subprocess.run("md5sum < mnt.raw", shell=True, cwd=workdir, capture_output=True, text=True).stdout
    assert md5 == subprocess.run("md5sum < mnt.raw", shell=True, cwd=ref, capture_output=True, text=True).stdout
    q = daemon.qmp()
    assert q.cmd("query-block-exports") == [{"id": "e0", "type": "fuse", "node-name": "d0",
                                             "shutting-down": False}]
    assert q.cmd("block-export-del", id="e0") == {}
    assert q.wait_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "e0"}
    assert mount_lines(workdir / "mnt.raw") == []
    assert (workdir / "mnt.raw").stat().st_size == 0       # the file under the mount again
    q.execute("quit")
    assert daemon.wait() == 0
    for args in (["check", str(workdir / "img.qcow2")],
                 ["compare", "-f", "raw", "-F", "qcow2", str(ref / "mnt.raw"), str(workdir / "img.qcow2")]):
        r = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


@needs_fuse
@pytest.mark.parametrize("how", ["quit", "sigterm"])
def test_unmounted_on_exit(storage_daemon: Any, workdir: Path, how: str) -> None:
    setup_dir(workdir, "raw")
    daemon = start(storage_daemon, workdir, "raw", "type=fuse,id=e0,node-name=d0,mountpoint=mnt.raw,writable=on")
    assert len(mount_lines(workdir / "mnt.raw")) == 1
    assert (workdir / "mnt.raw").stat().st_size == MiB
    if how == "quit":
        daemon.qmp().execute("quit")
        assert daemon.wait() == 0
    else:
        assert daemon.stop(signal.SIGTERM) == 0
    assert mount_lines(workdir / "mnt.raw") == []


@needs_fuse
def test_two_exports_and_external_umount(qsd: Any, workdir: Path) -> None:
    """Several FUSE exports in one daemon; one unmounted from outside stays listed until deleted."""
    setup_dir(workdir, "raw")
    (workdir / "m2").touch()
    daemon = start(qsd, workdir, "raw", "type=fuse,id=e0,node-name=d0,mountpoint=mnt.raw,writable=on",
                   "type=fuse,id=e1,node-name=d0,mountpoint=m2")
    assert (workdir / "m2").stat().st_mode & 0o777 == 0o400
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x21 0 64k", "mnt.raw"], cwd=workdir, check=True,
                   capture_output=True)
    assert (workdir / "m2").read_bytes()[:65536] == b"\x21" * 65536
    subprocess.run(["umount", str(workdir / "m2")], check=True)
    q = daemon.qmp()
    assert [e["id"] for e in q.cmd("query-block-exports")] == ["e1", "e0"]
    assert q.cmd("block-export-del", id="e1") == {}
    assert q.wait_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "e1"}
    assert len(mount_lines(workdir / "mnt.raw")) == 1
    q.execute("quit")
    assert daemon.wait() == 0
    assert mount_lines(workdir / "mnt.raw") == [] and mount_lines(workdir / "m2") == []


# ---------------------------------------------------------------------------
# in process: the allow-other fallback and drained sections


def _daemon_with_raw(path: Path) -> Any:
    from qsd.daemon import Daemon

    path.write_bytes(bytes(MiB))
    (path.parent / "mnt.raw").touch()
    return Daemon()


@needs_fuse
def test_allow_other_auto_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capfd: pytest.CaptureFixture[str]) -> None:
    """When the allow_other mount is refused (as fusermount3 refuses it without user_allow_other in
    /etc/fuse.conf), auto mounts without it and the export behaves as allow-other=off; on fails."""
    real = fuse._sys_mount

    def refuse_allow_other(fd: int, mountpoint: str, options: str) -> None:
        if "allow_other" in options:
            raise OSError(1, "Operation not permitted")
        real(fd, mountpoint, options)

    monkeypatch.setattr(fuse, "_sys_mount", refuse_allow_other)
    mnt = str(tmp_path / "mnt.raw")

    async def main() -> None:
        d = _daemon_with_raw(tmp_path / "img.raw")
        try:
            await checks(d)
        finally:
            await d.shutdown()      # unmounts whatever is still mounted

    async def checks(d: Any) -> None:
        await d.execute("blockdev-add", {"driver": "file", "node-name": "f0", "filename": str(tmp_path / "img.raw")})
        with pytest.raises(Exception, match="^Failed to mount FUSE session to export$"):
            await d.execute("block-export-add", {"type": "fuse", "id": "e0", "node-name": "f0",
                                                 "mountpoint": mnt, "allow-other": "on"})
        await d.execute("block-export-add", {"type": "fuse", "id": "e0", "node-name": "f0",
                                             "mountpoint": mnt, "writable": True})
        lines = mount_lines(Path(mnt))
        assert len(lines) == 1 and "allow_other" not in lines[0] and "default_permissions" in lines[0]
        # the mount is served by this very loop: touch it from a thread
        with pytest.raises(PermissionError):
            await asyncio.to_thread(os.chmod, mnt, 0o640)
        await asyncio.to_thread(os.chmod, mnt, 0o700)
        assert (await asyncio.to_thread(os.stat, mnt)).st_mode & 0o7777 == 0o700
        await d.execute("block-export-del", {"id": "e0"})
        assert mount_lines(Path(mnt)) == []

    asyncio.run(main())
    assert "fuse: mount failed: Operation not permitted" in capfd.readouterr().err


@needs_fuse
def test_mount_through_fusermount3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, require_tool: Any) -> None:
    """The path a daemon without CAP_SYS_ADMIN takes: mount(2) says EPERM, fusermount3 mounts and hands
    the /dev/fuse descriptor back over a socket, and unmounts again (``-u -z``)."""
    require_tool("fusermount3")

    def refused(fd: int, mountpoint: str, options: str) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(fuse, "_sys_mount", refused)
    monkeypatch.setattr(fuse.os, "geteuid", lambda: 1000)
    mnt = str(tmp_path / "mnt.raw")

    async def main() -> None:
        d = _daemon_with_raw(tmp_path / "img.raw")
        try:
            await checks(d)
        finally:
            await d.shutdown()      # unmounts whatever is still mounted

    async def checks(d: Any) -> None:
        await d.execute("blockdev-add", {"driver": "file", "node-name": "f0", "filename": str(tmp_path / "img.raw")})
        await d.execute("block-export-add", {"type": "fuse", "id": "e0", "node-name": "f0", "mountpoint": mnt,
                                             "writable": True, "allow-other": "on"})
        lines = mount_lines(Path(mnt))
        assert len(lines) == 1 and "allow_other" in lines[0], lines

        def use() -> bytes:
            with open(mnt, "r+b", buffering=0) as f:
                f.seek(512)
                f.write(b"via fusermount3")
                f.seek(512)
                return f.read(15)

        assert await asyncio.to_thread(use) == b"via fusermount3"
        await d.execute("block-export-del", {"id": "e0"})
        assert mount_lines(Path(mnt)) == []

    asyncio.run(main())
    assert (tmp_path / "img.raw").read_bytes()[512:527] == b"via fusermount3"


@needs_fuse
def test_requests_wait_for_drained_sections(tmp_path: Path) -> None:
    """I/O through the mount goes through the export's edge: held while the node is drained."""

    async def main() -> None:
        d = _daemon_with_raw(tmp_path / "img.raw")
        try:
            await checks(d)
        finally:
            await d.shutdown()      # unmounts whatever is still mounted

    async def checks(d: Any) -> None:
        node = await d.graph.add({"driver": "file", "node-name": "f0", "filename": str(tmp_path / "img.raw")})
        mnt = str(tmp_path / "mnt.raw")
        await d.execute("block-export-add", {"type": "fuse", "id": "e0", "node-name": "f0",
                                             "mountpoint": mnt, "writable": True})
        done = threading.Event()

        def write() -> None:
            fd = os.open(mnt, os.O_WRONLY)
            try:
                os.pwrite(fd, b"Q" * 4096, 8192)
            finally:
                os.close(fd)
            done.set()

        async with d.graph.drained(node):
            writer = asyncio.create_task(asyncio.to_thread(write))
            for _ in range(50):
                await asyncio.sleep(0.01)
            assert not done.is_set()
            assert (tmp_path / "img.raw").read_bytes()[8192:8196] == bytes(4)
        await writer
        assert (tmp_path / "img.raw").read_bytes()[8192:8192 + 4096] == b"Q" * 4096
        await d.execute("block-export-del", {"id": "e0"})

    asyncio.run(main())


# ---------------------------------------------------------------------------
# the request parser (bytes from /dev/fuse)


def _request(opcode: int, body: bytes, unique: int = 7) -> memoryview:
    return memoryview(IN_HEADER.pack(IN_HEADER.size + len(body), opcode, unique, 1, 0, 0, 42, 0, 0) + body)


@given(st.binary(max_size=256))
@settings(max_examples=300)
def test_parser_never_fails_otherwise(data: bytes) -> None:
    try:
        req = parse_request(memoryview(data))
    except FuseProtocolError:
        return
    assert len(req.body) == len(data) - IN_HEADER.size
    for fn in (write_payload, lambda r: init_reply(r.body)):
        try:
            fn(req)
        except (FuseProtocolError, OSError):
            pass


@given(st.integers(0, 2**64 - 1), st.binary(max_size=4096), st.integers(0, 8192))
def test_write_payload_bounds(offset: int, data: bytes, claimed: int) -> None:
    req = parse_request(_request(fuse.WRITE, WRITE_IN.pack(0, offset, claimed, 0, 0, 0, 0) + data))
    if claimed > len(data) or offset >= 1 << 63:
        with pytest.raises(FuseProtocolError):
            write_payload(req)
    else:
        assert write_payload(req) == (offset, data[:claimed])


@given(st.integers(0, 12), st.integers(0, 60), st.integers(0, 2**32 - 1))
def test_init_negotiation(major: int, minor: int, flags: int) -> None:
    body = memoryview(INIT_IN.pack(major, minor, 131072, flags))
    if major < 7 or (major == 7 and minor < fuse.OLDEST_MINOR):
        with pytest.raises(OSError):
            init_reply(body)
        return
    out = INIT_OUT.unpack(init_reply(body))
    assert out[0] == 7
    if major == 7:
        assert out[1] == min(minor, fuse.KERNEL_MINOR)
        assert out[3] == flags & fuse.WANTED_FLAGS       # never a flag the kernel did not offer
        assert out[6] <= fuse.MAX_WRITE                  # max_write fits our read buffer


def test_length_mismatch_refused() -> None:
    good = bytes(_request(fuse.GETATTR, bytes(16)))
    assert parse_request(memoryview(good)).opcode == fuse.GETATTR
    with pytest.raises(FuseProtocolError):
        parse_request(memoryview(good[:-1]))
    with pytest.raises(FuseProtocolError):
        parse_request(memoryview(struct.pack("<I", 5) + good[4:]))


OPCODES = [fuse.LOOKUP, fuse.FORGET, fuse.GETATTR, fuse.SETATTR, fuse.OPEN, fuse.READ, fuse.WRITE, fuse.STATFS,
           fuse.RELEASE, fuse.FSYNC, fuse.FLUSH, fuse.INIT, fuse.INTERRUPT, fuse.BATCH_FORGET, fuse.FALLOCATE,
           fuse.LSEEK, 0, 9, 22, 99, 2**32 - 1]


@given(st.lists(st.tuples(st.sampled_from(OPCODES), st.binary(max_size=96)), max_size=12),
       st.booleans())
@settings(max_examples=60, deadline=None)
def test_every_request_gets_one_reply(requests: list[tuple[int, bytes]], writable: bool) -> None:
    """Whatever the kernel sends (bodies short, long or garbage), each request that wants an answer gets
    exactly one, with its own unique id and a valid errno, and nothing escapes the handlers."""
    from qsd.daemon import Daemon
    from qsd.block.node import Perm

    async def main() -> list[tuple[int, int, bytes]]:
        d = Daemon()
        # 4 KiB: the replies of 12 requests fit the pipe, read only at the end
        node = await d.graph.add({"driver": "null-co", "node-name": "n0", "size": 4096, "read-zeroes": True})
        edge = await d.graph.attach_user(node, "export 'e'", Perm.CONSISTENT_READ, Perm.all())
        export = fuse.FuseExport(edge, "unused", writable, growable=False)
        rfd, wfd = os.pipe()
        export.fd = wfd
        for unique, (opcode, body) in enumerate(requests, 1):
            export._dispatch(parse_request(_request(opcode, body, unique)))
        while export._tasks:
            await asyncio.gather(*list(export._tasks))
        os.close(wfd)
        data = b""
        while chunk := os.read(rfd, 65536):
            data += chunk
        os.close(rfd)
        replies = []
        while data:
            length, error, unique = fuse.OUT_HEADER.unpack_from(data)
            replies.append((unique, -error, data[fuse.OUT_HEADER.size:length]))
            data = data[length:]
        return replies

    replies = asyncio.run(main())
    wanted = [u for u, (op, _b) in enumerate(requests, 1) if op not in fuse.NO_REPLY]
    assert sorted(u for u, _e, _p in replies) == wanted
    for _u, err, payload in replies:
        assert 0 <= err < 200 and (err == 0 or payload == b"")
