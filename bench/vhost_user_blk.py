# SPDX-License-Identifier: GPL-2.0-or-later
"""vhost-user-blk benchmark: a TCG guest's sequential read of the whole disk, from QSD and from qsd.

Run ``python bench/vhost_user_blk.py --help``. One image (default 1 GiB raw, fully written, so the host serves
it from the page cache) is exported over vhost-user-blk by qemu-storage-daemon and by qsd in turn, with the same
command line. For each run a fresh daemon starts, qemu-system-x86_64 boots the tests' busybox guest from it
(tests/guest/mkguest.py) and the guest runs ``dd if=/dev/vda of=/dev/null bs=1M``; the time between the guest's
``GUEST-DD-START`` and ``GUEST-DD-END`` lines, taken on the host as they arrive on the serial console, is the
measurement. The daemons alternate inside every round (the machine is shared and noisy); the table shows medians,
the ratio qsd/QSD of throughput, and each daemon's CPU time per GiB (utime+stime from /proc/PID/stat).

The guest runs under TCG (KVM is not usable on this machine kind), so QEMU's CPU emulation bounds both daemons;
the ratio says how much of the guest's I/O time qsd adds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from guest.mkguest import QEMU, boot, build_guest  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVERS = {"qemu": ["qemu-storage-daemon"], "qsd": [sys.executable, "-m", "qsd"]}
LABELS = {"qemu": "QSD", "qsd": "qsd"}


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": GiB}
    if text[-1].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


def make_image(path: Path, size: int, fmt: str) -> None:
    """Every byte written (no holes), distinct data per MiB."""
    raw = path if fmt == "raw" else path.with_suffix(".raw")
    block = bytearray(os.urandom(MiB))
    with open(raw, "wb") as f:
        for i in range(size // MiB):
            block[:8] = i.to_bytes(8, "little")
            f.write(block)
    if fmt != "raw":
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, str(raw), str(path)], check=True)
        raw.unlink()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def run_once(server: str, image: Path, fmt: str, work: Path, guest, args) -> dict:
    sock = work / f"{server}.sock"
    pidfile = work / f"{server}.pid"
    for p in (sock, pidfile):
        p.unlink(missing_ok=True)
    argv = [*SERVERS[server],
            "--blockdev", f"driver=file,node-name=f0,filename={image}",
            "--blockdev", f"driver={fmt},node-name=d0,file=f0",
            "--export", (f"type=vhost-user-blk,id=v0,node-name=d0,addr.type=unix,addr.path={sock},"
                         f"num-queues={args.queues}"),
            "--pidfile", str(pidfile)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(work / f"{server}.stderr", "ab") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 30
        while not (sock.exists() and pidfile.exists()):
            if proc.poll() is not None or time.monotonic() > deadline:
                return {"error": f"{server} did not start: {(work / f'{server}.stderr').read_text()[-500:]}"}
            time.sleep(0.02)
        cpu0 = cpu_seconds(proc.pid)
        result = boot(guest, sock, "dd", smp=args.smp, num_queues=args.queues, timeout=args.timeout)
        cpu = cpu_seconds(proc.pid) - cpu0
        if result.returncode != 0 or "GUEST-DD-END" not in result.times:
            return {"error": f"guest failed: {result.output[-800:]}"}
        seconds = result.times["GUEST-DD-END"] - result.times["GUEST-DD-START"]
        return {"seconds": seconds, "mib_s": args.size / MiB / seconds, "cpu_per_gib": cpu / (args.size / GiB)}
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=parse_size, default=GiB, help="image size (1G)")
    ap.add_argument("--format", choices=("raw", "qcow2"), default="raw")
    ap.add_argument("--smp", type=int, default=1, help="guest vCPUs (1)")
    ap.add_argument("--queues", type=int, default=1, help="num-queues of the export and the device (1)")
    ap.add_argument("--timeout", type=float, default=600.0, help="per guest run, seconds")
    ap.add_argument("--dir", type=Path, help="work directory (default: a fresh one under /tmp, removed)")
    ap.add_argument("--json", type=Path, help="also write every run's numbers here")
    args = ap.parse_args()
    for tool in (QEMU, "qemu-storage-daemon", "qemu-img"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (bash scripts/setup.sh)", file=sys.stderr)
            return 1
    guest = build_guest()
    work = args.dir or Path(tempfile.mkdtemp(prefix="qsd-bench-vub-"))
    work.mkdir(parents=True, exist_ok=True)
    image = work / f"disk.{args.format}"
    try:
        print(f"image: {args.size // MiB} MiB {args.format}; guest: {args.smp} vCPU(s), {args.queues} queue(s), "
              f"TCG; {args.rounds} round(s)", flush=True)
        make_image(image, args.size, args.format)
        runs: dict[str, list[dict]] = {"qemu": [], "qsd": []}
        for rnd in range(args.rounds):
            order = ["qemu", "qsd"] if rnd % 2 == 0 else ["qsd", "qemu"]
            for server in order:
                r = run_once(server, image, args.format, work, guest, args)
                runs[server].append(r)
                shown = r.get("error") or (f"{r['seconds']:.2f} s  {r['mib_s']:.1f} MiB/s  "
                                           f"cpu {r['cpu_per_gib']:.2f} s/GiB")
                print(f"round {rnd + 1} {LABELS[server]:4} {shown}", flush=True)
        med = {}
        for server, rs in runs.items():
            ok = [r for r in rs if "error" not in r]
            if ok:
                med[server] = {k: statistics.median(r[k] for r in ok) for k in ("seconds", "mib_s", "cpu_per_gib")}
        print()
        print(f"{'daemon':8} {'dd seconds':>10} {'MiB/s':>8} {'CPU s/GiB':>10}")
        for server, m in med.items():
            print(f"{LABELS[server]:8} {m['seconds']:10.2f} {m['mib_s']:8.1f} {m['cpu_per_gib']:10.2f}")
        if len(med) == 2:
            paired = [b["mib_s"] / a["mib_s"] for a, b in zip(runs["qemu"], runs["qsd"])
                      if "error" not in a and "error" not in b]
            print(f"\nqsd/QSD throughput ratio (medians): {med['qsd']['mib_s'] / med['qemu']['mib_s']:.2f}")
            if paired:
                print(f"qsd/QSD throughput ratio (paired, median over rounds): {statistics.median(paired):.2f}")
            print(f"qsd/QSD CPU per GiB: {med['qsd']['cpu_per_gib'] / med['qemu']['cpu_per_gib']:.2f}")
        if args.json:
            args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs},
                                            indent=2))
        return 0 if len(med) == 2 else 1
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
