# SPDX-License-Identifier: GPL-2.0-or-later
"""Build and boot a tiny Linux guest for the vhost-user-blk tests and bench.

The guest is Debian's kernel (unpacked from its .deb, not installed) and a
busybox initramfs whose /init loads the virtio modules and then does what
the kernel command line asks (``qsd.do=md5,write,dd,par``), printing
``GUEST-...`` lines on the serial console before powering off:

* ``md5``   ``GUEST-MD5: <md5 of /dev/vda>``
* ``par``   two md5sums of the disk's halves at once, pinned to CPUs 0 and 1
            (so a 2-queue device gets requests on both queues)
* ``write`` writes ``GUEST-WROTE-THIS`` (padded to 4 KiB) at byte offset
            ``qsd.woff`` (default 1 MiB), syncs, prints ``GUEST-WRITE-DONE``
* ``wbig``  writes 8 MiB of random data at 8 MiB, drops the guest's page cache, reads it back:
            ``GUEST-WBIG: <md5 written> <md5 read back>``
* ``dd``    ``GUEST-DD-START``, reads the whole disk with dd (1 MiB blocks), ``GUEST-DD-END``
* ``reboot`` the first time (no ``QSD-REBOOTED`` marker at ``qsd.woff``) writes the marker and
            reboots (the device is reset and set up again on the same connection); after
            the reboot prints ``GUEST-REBOOTED`` and goes on with the next action

Run ``python3 tests/guest/mkguest.py`` (scripts/setup.sh does) to fill the
cache ahead of the tests; :func:`build_guest` does it on first use otherwise.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CACHE = Path(os.environ.get("QSD_GUEST_CACHE", "/var/tmp/qsd-guest"))
MODULES = ["virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
           "virtio_blk"]
QEMU = "qemu-system-x86_64"

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in @MODULES@; do insmod /lib/modules/$m.ko; done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
do=""; woff=1048576
for arg in $(cat /proc/cmdline); do
  case "$arg" in qsd.do=*) do="${arg#qsd.do=}";; qsd.woff=*) woff="${arg#qsd.woff=}";; esac
done
echo "GUEST-SIZE: $(cat /sys/block/vda/size)"
echo "GUEST-QUEUES: $(ls /sys/block/vda/mq | wc -l)"
for action in $(echo "$do" | tr , ' '); do
  case "$action" in
  md5) echo "GUEST-MD5: $(md5sum /dev/vda | cut -d' ' -f1)";;
  par)
    half=$(( $(cat /sys/block/vda/size) / 2 / 2048 ))
    taskset 1 sh -c "dd if=/dev/vda bs=1M count=$half 2>/dev/null | md5sum > /tmp/a" &
    taskset 2 sh -c "dd if=/dev/vda bs=1M skip=$half 2>/dev/null | md5sum > /tmp/b" &
    wait
    echo "GUEST-PAR: $(cut -d' ' -f1 /tmp/a) $(cut -d' ' -f1 /tmp/b)";;
  write)
    echo GUEST-WROTE-THIS | dd of=/dev/vda bs=4096 seek=$((woff / 4096)) count=1 conv=sync,fsync 2>/dev/null
    sync; echo "GUEST-WRITE-DONE";;
  wbig)
    dd if=/dev/urandom of=/tmp/r bs=1M count=8 2>/dev/null
    dd if=/tmp/r of=/dev/vda bs=1M seek=8 conv=fsync 2>/dev/null
    echo 3 > /proc/sys/vm/drop_caches
    echo "GUEST-WBIG: $(md5sum /tmp/r | cut -d' ' -f1) $(dd if=/dev/vda bs=1M skip=8 count=8 2>/dev/null | md5sum | cut -d' ' -f1)";;
  dd)
    echo "GUEST-DD-START"; dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null; echo "GUEST-DD-END";;
  reboot)
    if dd if=/dev/vda bs=4096 skip=$((woff / 4096)) count=1 2>/dev/null | grep -q QSD-REBOOTED; then
      echo "GUEST-REBOOTED"
    else
      echo QSD-REBOOTED | dd of=/dev/vda bs=4096 seek=$((woff / 4096)) count=1 conv=sync,fsync 2>/dev/null
      echo "GUEST-REBOOTING"; reboot -f
    fi;;
  esac
done
echo GUEST-DONE
poweroff -f
"""


@dataclasses.dataclass
class Guest:
    kernel: Path
    initrd: Path


def _kernel_package() -> str:
    out = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], check=True,
                         capture_output=True, text=True).stdout
    m = re.search(r"Depends: (linux-image-[0-9]\S*)", out)
    if m is None:
        raise RuntimeError("cannot find the kernel package behind linux-image-amd64")
    return m.group(1)


def _cpio_newc(root: Path) -> bytes:
    """An initramfs archive of ``root`` (the cpio "newc" format, written here
    so that no cpio program is needed)."""
    out = bytearray()
    ino = 1

    def entry(name: str, mode: int, data: bytes) -> None:
        nonlocal ino
        namez = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(namez), 0))
        ino += 1
        out.extend(hdr.encode() + namez)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        st = path.lstat()
        if path.is_dir():
            entry(rel, st.st_mode, b"")
        else:
            entry(rel, st.st_mode, path.read_bytes())
    entry("TRAILER!!!", 0, b"")
    return bytes(out)


def build_guest(cache: Path = CACHE) -> Guest:
    """The kernel and initramfs, built once per kernel version into ``cache``."""
    pkg = _kernel_package()
    kver = pkg[len("linux-image-"):]
    recipe = hashlib.sha256((INIT + " ".join(MODULES)).encode()).hexdigest()[:12]
    target = cache / f"{kver}-{recipe}"
    guest = Guest(target / "vmlinuz", target / "initrd.gz")
    if guest.kernel.exists() and guest.initrd.exists():
        return guest
    busybox = shutil.which("busybox")
    if busybox is None:
        raise RuntimeError("busybox is not installed (busybox-static)")
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        work = Path(tmp)
        subprocess.run(["apt-get", "download", "-q=2", pkg], cwd=work, check=True)
        (deb,) = work.glob(f"{pkg}_*.deb")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "kpkg")], check=True)
        root = work / "root"
        for d in ("bin", "dev", "proc", "sys", "tmp", "lib/modules"):
            (root / d).mkdir(parents=True)
        shutil.copy(busybox, root / "bin/busybox")
        moddir = work / "kpkg/lib/modules" / kver
        for m in MODULES:
            (found,) = [p for p in moddir.rglob(f"{m}.ko*") if p.name.split(".ko")[0] == m]
            data = found.read_bytes()
            if found.name.endswith(".xz"):
                import lzma
                data = lzma.decompress(data)
            (root / "lib/modules" / f"{m}.ko").write_bytes(data)
        init = root / "init"
        init.write_text(INIT.replace("@MODULES@", " ".join(MODULES)))
        init.chmod(0o755)
        initrd = gzip.compress(_cpio_newc(root), compresslevel=1)
        tmp_kernel = target / "vmlinuz.tmp"
        shutil.copy(work / "kpkg/boot" / f"vmlinuz-{kver}", tmp_kernel)
        (target / "initrd.gz.tmp").write_bytes(initrd)
        os.replace(target / "initrd.gz.tmp", guest.initrd)
        os.replace(tmp_kernel, guest.kernel)
    for old in cache.glob(f"{kver}-*"):          # guests of an older recipe
        if old != target and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return guest


@dataclasses.dataclass
class BootResult:
    returncode: int
    lines: list[str]                 # GUEST-* lines
    times: dict[str, float]          # host monotonic time each GUEST-* line arrived
    output: str

    def value(self, key: str) -> str:
        for line in self.lines:
            if line.startswith(key + ":"):
                return line.split(":", 1)[1].strip()
        raise KeyError(f"{key} not in guest output:\n{self.output[-3000:]}")


def boot(guest: Guest, socket_path: str | os.PathLike, actions: str, *, smp: int = 1,
         num_queues: int = 1, mem: str = "256M", timeout: float = 240.0, extra_append: str = "",
         machine: str = "q35", device: str = "vhost-user-blk-pci", no_reboot: bool = True) -> BootResult:
    """Boot under TCG with the vhost-user-blk device on ``socket_path``; wait for poweroff."""
    argv = [QEMU, "-accel", "tcg,thread=multi" if smp > 1 else "tcg", "-machine", machine,
            "-bios", "/usr/share/qemu/qboot.rom", "-nodefaults", "-no-user-config", "-nographic",
            "-serial", "stdio", *(["-no-reboot"] if no_reboot else []), "-m", mem, "-smp", str(smp),
            "-object", f"memory-backend-memfd,id=mem,size={mem},share=on", "-numa", "node,memdev=mem",
            "-chardev", f"socket,id=vub,path={socket_path}",
            "-device", f"{device},chardev=vub,num-queues={num_queues}",
            "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
            "-append", f"console=ttyS0 quiet panic=-1 qsd.do={actions} {extra_append}".strip()]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    lines: list[str] = []
    times: dict[str, float] = {}
    out = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    try:
        os.set_blocking(proc.stdout.fileno(), False)
        buf = b""
        import select
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"guest did not power off in {timeout}s:\n{b''.join(out).decode(errors='replace')[-3000:]}")
            r, _, _ = select.select([proc.stdout], [], [], min(left, 1.0))
            if not r:
                continue
            chunk = proc.stdout.read()
            if not chunk:
                break
            now = time.monotonic()
            out.append(chunk)
            buf += chunk
            *complete, buf = buf.split(b"\n")
            for raw in complete:
                line = raw.decode(errors="replace").strip()
                if line.startswith("GUEST-"):
                    lines.append(line)
                    times.setdefault(line.split(":")[0], now)
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    return BootResult(rc, lines, times, b"".join(out).decode(errors="replace"))


if __name__ == "__main__":
    g = build_guest()
    print(g.kernel, g.initrd, file=sys.stderr)
