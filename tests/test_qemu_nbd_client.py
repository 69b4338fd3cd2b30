# SPDX-License-Identifier: GPL-2.0-or-later
"""QEMU itself as a client of the NBD export: a real qemu-system-x86_64
(``-machine none``, driven over QMP) attaches the export with
``blockdev-add driver=nbd`` (plain and x509 TLS), reads and writes through
it, and mirrors its own disk into it while that disk keeps being written,
ending with ``block-job-cancel`` in the ready phase as libvirt's storage
migration does. The target must then equal the source for qemu-img.

Run against the real qemu-storage-daemon and against qsd alike.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import RawQMP, wait_for_path
from test_nbd_tls import pki, require_tool_module  # noqa: F401  (fixtures)

SIZE = 32 * 1024 * 1024


def run(*argv: str | Path) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120)
    if r.returncode:
        raise AssertionError(f"{argv} failed ({r.returncode}): {r.stderr}")
    return r


class QemuVM:
    """qemu-system-x86_64 without a guest: a block layer with a QMP monitor."""

    def __init__(self, workdir: Path, objects: list[str]) -> None:
        binary = shutil.which("qemu-system-x86_64")
        if binary is None:
            pytest.fail("qemu-system-x86_64 is not installed (scripts/setup.sh installs it)")
        self.qmp_path = workdir / "vm-qmp.sock"
        argv = [binary, "-machine", "none", "-nodefaults", "-display", "none", "-accel", "tcg",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        for o in objects:
            argv += ["-object", o]
        self.log = open(workdir / "vm.log", "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_path(self.qmp_path, proc=self.proc)
        self.qmp = RawQMP(self.qmp_path, timeout=60)
        self.qmp.negotiate()

    def cmd(self, command: str, **args: Any) -> Any:
        reply = self.qmp.execute(command, args or None)
        assert "error" not in reply, (command, reply)
        return reply["return"]

    def qemu_io(self, node: str, command: str) -> str:
        out = self.cmd("human-monitor-command", **{"command-line": f'qemu-io {node} "{command}"'})
        assert "error" not in out.lower() and "failed" not in out.lower(), out
        return str(out)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.qmp.execute("quit")
            except OSError:
                pass
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.qmp.close()
        self.log.close()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_qemu_mirrors_into_export(storage_daemon, workdir, tls: bool, pki) -> None:  # noqa: F811
    source = workdir / "vm-disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", source, str(SIZE))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 5M 3M",
        "-c", "write -z 12M 1M", "-c", "write -P 0x33 31M 1M", source)
    target = workdir / "target.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", target, str(SIZE))

    sock = str(workdir / "nbd.sock")
    objects = [f"--object=tls-creds-x509,id=tls0,dir={pki['srv']},endpoint=server"] if tls else []
    daemon = storage_daemon(*objects,
                            "--blockdev", f"driver=file,filename={target},node-name=file0",
                            "--blockdev", "driver=qcow2,file=file0,node-name=t0",
                            "--nbd-server", f"addr.type=unix,addr.path={sock}"
                            + (",tls-creds=tls0" if tls else ""),
                            "--export", "type=nbd,id=e0,node-name=t0,name=disk,writable=on",
                            wait_for=[sock])
    vm = QemuVM(workdir, [f"tls-creds-x509,id=tls0,dir={pki['cli']},endpoint=client"] if tls else [])
    try:
        vm.cmd("blockdev-add", driver="qcow2", **{"node-name": "src"},
               file={"driver": "file", "filename": str(source)})
        nbd: dict[str, Any] = {"driver": "nbd", "node-name": "tgt", "export": "disk",
                               "server": {"type": "unix", "path": sock}}
        if tls:
            nbd.update({"tls-creds": "tls0", "tls-hostname": "localhost"})
        vm.cmd("blockdev-add", **nbd)

        # Plain reads and writes through QEMU's NBD client.
        vm.qemu_io("tgt", "write -P 0x44 8M 256k")
        vm.qemu_io("tgt", "read -P 0x44 8M 256k")
        vm.qemu_io("tgt", "read -P 0 0 64k")
        vm.qemu_io("tgt", "flush")

        # Storage migration: mirror the whole disk, keep writing the source
        # while the job is ready, then cancel in the ready phase.
        vm.cmd("blockdev-mirror", **{"job-id": "m0"}, device="src", target="tgt", sync="full")
        vm.qmp.wait_event("BLOCK_JOB_READY", timeout=120)
        vm.qemu_io("src", "write -P 0x55 2M 1M")
        vm.qemu_io("src", "write -z 5M 64k")
        vm.cmd("block-job-cancel", device="m0")
        done = vm.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=120)
        assert "error" not in done["data"], done
        vm.cmd("blockdev-del", **{"node-name": "tgt"})
        vm.cmd("blockdev-del", **{"node-name": "src"})
    finally:
        vm.close()
    assert daemon.stop() == 0
    assert "Images are identical." in run("qemu-img", "compare", source, target).stdout
    run("qemu-img", "check", "-q", target)
