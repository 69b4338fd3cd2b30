# SPDX-License-Identifier: GPL-2.0-or-later
"""NBD export benchmark for qcow2: the same images served by qemu-storage-daemon (QSD) and qsd.

Run ``python bench/nbd_qcow2.py --help``. Two images, both 1 GiB (``--size``) with 64 KiB clusters:

* ``full``: made by ``qemu-img create -f qcow2 -o preallocation=metadata`` and then written completely by qemu-io
  (pattern 0x5a), so every cluster is allocated and sits in the page cache; read workloads and 4 KiB random
  overwrites run on it;
* ``fill``: a fresh sparse image per run (``qemu-img create -f qcow2``), filled by 4 KiB random writes at QD16.
  fio replays an I/O log of one 4 KiB write per cluster, clusters in a random order (the same order for both
  servers of a round), so every write allocates a cluster; a run ends after ``--seconds`` or after its last write.

After every run that wrote, ``qemu-img check`` runs on the image; corruption or leaks are reported loudly (in the
log, in the table's note and in a check summary) and make the exit status 1: a benchmark must not hide a broken
image. The servers, the fio runs, the measurement of server CPU and the table come from ``nbd_raw.py``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nbd_raw import (  # the sibling module, whatever the current directory
    GiB,
    MiB,
    Result,
    Running,
    Server,
    Workload,
    parse_size,
    record_fio,
    report,
    tool_version,
)

EXPORT = "x"
CLUSTER = 64 * 1024  # qemu-img's default cluster size, used for both images


# --------------------------------------------------------------------------------------------------
# workloads


@dataclass(frozen=True)
class QWorkload(Workload):
    image: str = "full"  # "full": the shared fully allocated image; "fill": a fresh sparse image per run


WORKLOADS = [
    QWorkload("seq-read-1M-qd8", "read", "1M", 8),
    QWorkload("rand-read-4k-qd1", "randread", "4k", 1),
    QWorkload("rand-read-4k-qd16", "randread", "4k", 16),
    QWorkload("rand-write-4k-qd16", "randwrite", "4k", 16),  # overwrites of allocated clusters
    QWorkload("fill-4k-qd16", "randwrite", "4k", 16, image="fill"),  # every write allocates a cluster
]
WORKLOADS_BY_NAME = {w.name: w for w in WORKLOADS}


# --------------------------------------------------------------------------------------------------
# servers: the same command line for both


def qcow2_options(image: Path, sock: Path, pidfile: Path) -> list[str]:
    return [
        "--blockdev", f"driver=qcow2,node-name=q,file.driver=file,file.filename={image}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", f"type=nbd,id=e,node-name=q,name={EXPORT},writable=on",
        "--pidfile", str(pidfile),
    ]


class QemuSD(Server):
    def argv(self, image, sock, pidfile):
        return ["qemu-storage-daemon", *qcow2_options(image, sock, pidfile)]


class Qsd(Server):
    def argv(self, image, sock, pidfile):
        return [sys.executable, "-m", "qsd", *qcow2_options(image, sock, pidfile)]


SERVER_CLASSES = {"qemu": (QemuSD, "QSD"), "qsd": (Qsd, "qsd")}


# --------------------------------------------------------------------------------------------------
# images


def run(argv: list[str], timeout: float = 600) -> str:
    p = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {p.returncode}: {(p.stderr + p.stdout).strip()[-400:]}")
    return p.stdout


def make_full_image(path: Path, size: int) -> None:
    """A qcow2 image with metadata preallocated and every cluster written (pattern 0x5a), left in the page cache."""
    if path.exists():
        path.unlink()
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"preallocation=metadata,cluster_size={CLUSTER}",
         str(path), str(size)])
    chunk = 64 * MiB
    cmds = []
    for off in range(0, size, chunk):
        cmds += ["-c", f"write -q -P 0x5a {off} {min(chunk, size - off)}"]
    run(["qemu-io", "-f", "qcow2", *cmds, str(path)])
    buf = bytearray(MiB)
    with open(path, "rb") as f:  # read once so that every page is cached
        while f.readinto(buf):
            pass


def make_sparse_image(path: Path, size: int) -> None:
    if path.exists():
        path.unlink()
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", str(path), str(size)])


@dataclass
class Check:
    ok: bool
    summary: str


def qemu_img_check(path: Path) -> Check:
    """``qemu-img check``; anything but a clean image (corruption, leaks, a failed check) is not ok."""
    try:
        p = subprocess.run(["qemu-img", "check", "-f", "qcow2", "--output=json", str(path)],
                           check=False, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return Check(False, "qemu-img check timed out")
    try:
        info = json.loads(p.stdout)
    except ValueError:
        return Check(False, f"qemu-img check exit {p.returncode}: {' '.join((p.stderr + p.stdout).split())[:300]}")
    corrupt, leaks = info.get("corruptions", 0), info.get("leaks", 0)
    errs = info.get("check-errors", 0)
    alloc = f"{info.get('allocated-clusters', '?')}/{info.get('total-clusters', '?')} clusters allocated"
    if p.returncode == 0 and not (corrupt or leaks or errs):
        return Check(True, f"clean, {alloc}")
    parts = []
    if corrupt:
        parts.append(f"{corrupt} CORRUPTIONS")
    if leaks:
        parts.append(f"{leaks} leaked clusters")
    if errs:
        parts.append(f"{errs} check errors")
    detail = " ".join(p.stderr.split())[:300]
    return Check(False, f"exit {p.returncode}: {', '.join(parts) or 'failed'}; {alloc}" + (f"; {detail}" if detail else ""))


# --------------------------------------------------------------------------------------------------
# one measurement


@dataclass
class QResult(Result):
    check: str = ""  # qemu-img check after a run that wrote ("" when not checked)
    check_ok: bool = True


def fio_argv(args, wl: QWorkload, uri: str, size: int, out: Path) -> list[str]:
    argv = [args.fio, f"--name={wl.name}", "--ioengine=nbd", f"--uri={uri}", f"--rw={wl.rw}", f"--bs={wl.bs}",
            f"--iodepth={wl.iodepth}", f"--size={size}", "--randrepeat=0", f"--runtime={args.seconds}",
            "--output-format=json", f"--output={out}"]
    if wl.image == "fill":
        # fio turns its random map off with blockalign=, and without the map random offsets repeat; so the fill
        # replays an I/O log: one 4 KiB write per --fill-align slot, slots in a random order (see fill_iolog)
        argv += [f"--read_iolog={fill_iolog(args, size, out.parent)}", "--replay_no_stall=1"]
    else:
        argv += ["--time_based=1", "--norandommap=1"]
    return argv


def fill_iolog(args, size: int, workdir: Path) -> Path:
    """A fio iolog (version 2) writing 4 KiB at the start of every --fill-align slot of the image, in an order
    shuffled with the seed ``args.fill_seed`` (set per round, so both servers of a round replay the same log)."""
    path = workdir / f"fill-{args.fill_seed}.iolog"
    if not path.exists():
        offsets = list(range(0, size, args.fill_align))
        random.Random(args.fill_seed).shuffle(offsets)
        lines = ["fio version 2 iolog", "nbd add", "nbd open"]
        lines += [f"nbd write {off} 4096" for off in offsets]
        lines.append("nbd close")
        path.write_text("\n".join(lines) + "\n")
    return path


def measure(args, server: Server, wl: QWorkload, rnd: int, workdir: Path, image: Path, size: int) -> QResult:
    res = QResult(server.key, wl.name, rnd, ok=False)
    try:
        srv = Running(server, workdir, image, args.start_timeout)
    except (RuntimeError, OSError) as e:
        res.error = f"failed to start: {e}"
        server.failed = res.error
        return res
    status = None
    try:
        out = workdir / "fio.json"
        if out.exists():
            out.unlink()
        cpu0 = srv.cpu_seconds()
        argv = fio_argv(args, wl, f"nbd+unix:///{EXPORT}?socket={srv.sock}", size, out)
        try:
            p = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=args.seconds + 60)
            rc, msg = p.returncode, (p.stderr + p.stdout).strip()
        except subprocess.TimeoutExpired:
            rc, msg = -1, "fio timed out"
        alive = srv.alive()
        cpu1 = srv.cpu_seconds() if alive else cpu0
        if not alive:
            res.error = f"server died during the run (status {srv.proc.returncode}): {srv.stderr_tail()}"
            return res
        if rc != 0:
            res.error = f"fio exit {rc}: {' '.join(msg.split())[-300:]}"
            return res
        record_fio(res, out, wl.direction, cpu1 - cpu0)
        return res
    except (OSError, ValueError, KeyError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    finally:
        status = srv.stop()
        if res.ok and status not in (0, None):
            res.error = f"server exited with status {status} on SIGTERM"
        if wl.direction == "write":
            # checked whatever happened to the run: a server that died mid-write may still have broken the image
            chk = qemu_img_check(image)
            res.check, res.check_ok = chk.summary, chk.ok
            if not chk.ok:
                res.error = f"QEMU-IMG CHECK FAILED: {chk.summary}" + (f"; {res.error}" if res.error else "")


# --------------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Serve qcow2 images (fully allocated, and sparse being filled) from qemu-storage-daemon (QSD) "
                    "and qsd over NBD unix sockets, alternating servers in rounds, and compare them with fio's "
                    "nbd engine; qemu-img check after every run that wrote.")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each runs every workload on every server (3)")
    ap.add_argument("--seconds", type=int, default=5, help="fio runtime per run, seconds (5)")
    ap.add_argument("--size", type=parse_size, default=GiB, help="virtual size of both images, e.g. 1G (1G)")
    ap.add_argument("--only", action="append", metavar="WORKLOAD",
                    help="run only this workload (repeatable or comma-separated): " + ", ".join(WORKLOADS_BY_NAME))
    ap.add_argument("--servers", default="qemu,qsd",
                    help="comma-separated servers to compare, among qemu (qemu-storage-daemon) and qsd (both)")
    ap.add_argument("--fill-align", type=parse_size, default=CLUSTER,
                    help="fill-4k-qd16: one 4 KiB write per slot of this size, slots in random order; the default, "
                         "the cluster size (64K), makes every write allocate; 4K writes every 4 KiB block once, "
                         "so only one write in 16 allocates")
    ap.add_argument("--dir", type=Path, default=None,
                    help="work directory for the images and sockets (default: a new /tmp/qsd-bench-*)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (images, server logs)")
    ap.add_argument("--json", type=Path, default=None, help="also write every run's numbers to this JSON file")
    ap.add_argument("--fio", default="fio", help="fio binary (needs the nbd ioengine)")
    ap.add_argument("--start-timeout", type=float, default=30.0, help="seconds a server may take to start (30)")
    args = ap.parse_args(argv)
    args.fill_seed = 0

    workloads = WORKLOADS
    if args.only:
        names = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
        unknown = [n for n in names if n not in WORKLOADS_BY_NAME]
        if unknown:
            ap.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS_BY_NAME)}")
        workloads = [WORKLOADS_BY_NAME[n] for n in names]
    servers: list[Server] = []
    for key in [k.strip() for k in args.servers.split(",") if k.strip()]:
        if key not in SERVER_CLASSES:
            ap.error(f"unknown server '{key}'; choose from {', '.join(SERVER_CLASSES)}")
        cls, label = SERVER_CLASSES[key]
        servers.append(cls(key, label))
    if not servers or args.rounds < 1 or args.seconds < 1:
        ap.error("need at least one server, one round and one second")
    if args.size % args.fill_align:
        ap.error("--size must be a multiple of --fill-align")

    for tool in (args.fio, "qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            print(f"nbd_qcow2: {tool} not found (bash scripts/setup.sh)", file=sys.stderr)
            return 2
    eng = subprocess.run([args.fio, "--enghelp=nbd"], check=False, capture_output=True, text=True)
    if eng.returncode != 0 or "uri" not in eng.stdout:
        print(f"nbd_qcow2: {args.fio} has no nbd ioengine", file=sys.stderr)
        return 2

    versions = {"qemu": ["qemu-storage-daemon", "--version"], "qsd": [sys.executable, "-m", "qsd", "--version"]}
    for s in servers:
        s.version = tool_version(versions[s.key])

    own_dir = args.dir is None
    workdir = Path(tempfile.mkdtemp(prefix="qsd-bench-", dir="/tmp")) if own_dir else args.dir
    workdir.mkdir(parents=True, exist_ok=True)
    full = workdir / "full.qcow2"
    fill = workdir / "fill.qcow2"

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    total = args.rounds * len(workloads) * len(servers)
    log(f"nbd_qcow2: {total} runs of up to {args.seconds}s ({args.rounds} rounds x {len(workloads)} workloads x "
        f"{len(servers)} servers), work dir {workdir}")
    if any(w.image == "full" for w in workloads):
        t0 = time.monotonic()
        make_full_image(full, args.size)
        chk = qemu_img_check(full)
        log(f"nbd_qcow2: wrote {args.size / GiB:.2f} GiB fully allocated qcow2 in {time.monotonic() - t0:.1f}s "
            f"({chk.summary})")
        if not chk.ok:
            log("nbd_qcow2: the freshly made image does not check clean; giving up")
            return 2
    load_before = os.getloadavg()

    results: list[QResult] = []
    started = datetime.datetime.now().isoformat(timespec="seconds")
    try:
        n = 0
        for rnd in range(args.rounds):
            for wi, wl in enumerate(workloads):
                shift = (rnd + wi) % len(servers)
                order = servers[shift:] + servers[:shift]
                for s in order:
                    n += 1
                    if s.failed and s.failed.startswith("failed to start"):
                        results.append(QResult(s.key, wl.name, rnd, ok=False, error=""))
                        continue
                    if wl.image == "fill":
                        make_sparse_image(fill, args.size)
                        args.fill_seed = rnd
                    r = measure(args, s, wl, rnd, workdir, fill if wl.image == "fill" else full, args.size)
                    results.append(r)
                    chk = f"  check: {r.check}" if r.check and r.check_ok else ""
                    if r.ok:
                        log(f"[{n:>3}/{total}] round {rnd + 1} {wl.name:<19} {s.label:<7} {r.mib_s:9.1f} MiB/s "
                            f"{r.iops:9.0f} IOPS  server {r.cpu_s:5.2f} cpu-s = {r.cpu_s_per_gib:.3f} s/GiB"
                            + (f"  ({r.error})" if r.error else "") + chk)
                    else:
                        log(f"[{n:>3}/{total}] round {rnd + 1} {wl.name:<19} {s.label:<7} FAILED: {r.error}")
                    if not r.check_ok:
                        log(f"!!!!!! {s.label} {wl.name} round {rnd + 1}: qemu-img check FAILED: {r.check} !!!!!!")
                        if args.keep or not own_dir:
                            saved = workdir / f"broken-{s.key}-{wl.name}-r{rnd + 1}.qcow2"
                            shutil.copyfile(fill if wl.image == "fill" else full, saved)
                            log(f"       image saved as {saved}")
                        if wl.image == "full":
                            # later runs would measure a broken image: remake it
                            make_full_image(full, args.size)
    except KeyboardInterrupt:
        log("nbd_qcow2: interrupted; reporting what was measured")
    finally:
        load_after = os.getloadavg()
        if own_dir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(f"nbd_qcow2: {started}, {platform.node()}, {os.cpu_count()} CPUs, kernel {platform.release()}, "
          f"qcow2 {args.size / GiB:.2f} GiB ({CLUSTER // 1024} KiB clusters) in page cache, unix sockets, "
          f"fio nbd engine, {args.seconds}s per run, {args.rounds} rounds (medians)")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    for s in servers:
        print(f"  {s.label:<7} {s.version}")
    print()
    print(report(results, servers, workloads, args.rounds))

    checked = [r for r in results if r.check]
    failed = [r for r in checked if not r.check_ok]
    label = {s.key: s.label for s in servers}
    print()
    print(f"qemu-img check after every run that wrote: {len(checked) - len(failed)}/{len(checked)} clean")
    for wl in workloads:
        for s in servers:
            rs = [r for r in checked if r.workload == wl.name and r.server == s.key]
            if rs:
                bad = [r for r in rs if not r.check_ok]
                print(f"  {wl.name:<20} {s.label:<7} {len(rs) - len(bad)}/{len(rs)} clean"
                      + (f"; last: {rs[-1].check}" if not bad else ""))
                for r in bad:
                    print(f"    !!! round {r.round + 1}: {r.check}")
    if failed:
        print(f"\n!!!!!! {len(failed)} IMAGE(S) FAILED qemu-img check: "
              + ", ".join(f"{label[r.server]} {r.workload} round {r.round + 1}" for r in failed) + " !!!!!!")
    if any(r.workload == "fill-4k-qd16" for r in results):
        print(f"(fill-4k-qd16: fresh sparse image per run, one 4 KiB write per {args.fill_align // 1024} KiB slot in "
              f"random order, ends after {args.seconds}s or {args.size // args.fill_align} writes)")

    if args.json:
        args.json.write_text(json.dumps({
            "started": started, "seconds": args.seconds, "rounds": args.rounds, "size": args.size,
            "fill_align": args.fill_align,
            "servers": {s.key: {"label": s.label, "version": s.version, "failed": s.failed} for s in servers},
            "results": [r.__dict__ for r in results],
        }, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
