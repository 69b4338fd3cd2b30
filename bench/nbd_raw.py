# SPDX-License-Identifier: GPL-2.0-or-later
"""NBD export benchmark: the same raw image served by qemu-storage-daemon, nbdkit and qsd.

Run ``python bench/nbd_raw.py --help``. The image (default 1 GiB, fully written, so it sits in the page cache) is
served over a unix socket by one server at a time; fio's ``nbd`` ioengine drives it for ``--seconds`` per run.
Servers alternate inside every round (the machine is shared and noisy: a slow minute then hits every server, not
just one), and each run starts a fresh server so that the server's CPU time (utime+stime from /proc/PID/stat,
all threads) covers exactly that run. The table shows medians over rounds and the ratios qsd/QSD and qsd/nbdkit.

A server that fails to start (or dies) is reported as failed; the others go on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------------
# workloads


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str  # fio's rw=
    bs: str
    iodepth: int

    @property
    def direction(self) -> str:
        return "write" if "write" in self.rw else "read"


WORKLOADS = [
    Workload("seq-read-1M-qd8", "read", "1M", 8),
    Workload("seq-write-1M-qd8", "write", "1M", 8),
    Workload("rand-read-4k-qd1", "randread", "4k", 1),
    Workload("rand-read-4k-qd16", "randread", "4k", 16),
    Workload("rand-write-4k-qd16", "randwrite", "4k", 16),
]
WORKLOADS_BY_NAME = {w.name: w for w in WORKLOADS}


# --------------------------------------------------------------------------------------------------
# servers


@dataclass
class Server:
    key: str  # --servers name
    label: str  # table label
    failed: str | None = None  # why it is out of the race
    version: str = ""

    def argv(self, image: Path, sock: Path, pidfile: Path) -> list[str]:
        raise NotImplementedError


def qsd_style_options(image: Path, sock: Path, pidfile: Path) -> list[str]:
    """The qemu-storage-daemon command line shared by QSD and qsd."""
    return [
        "--blockdev", f"driver=file,node-name=disk,filename={image}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=exp0,node-name=disk,name=disk,writable=on",
        "--pidfile", str(pidfile),
    ]


class QemuSD(Server):
    def argv(self, image, sock, pidfile):
        return ["qemu-storage-daemon", *qsd_style_options(image, sock, pidfile)]


class Qsd(Server):
    def argv(self, image, sock, pidfile):
        return [sys.executable, "-m", "qsd", *qsd_style_options(image, sock, pidfile)]


class Nbdkit(Server):
    def argv(self, image, sock, pidfile):
        # -f: stay in the foreground so that the PID we hold is the server; the file plugin serves any export name.
        return ["nbdkit", "-f", "-U", str(sock), "-P", str(pidfile), "-e", "disk", "file", str(image)]


SERVER_CLASSES = {"qemu": (QemuSD, "QSD"), "nbdkit": (Nbdkit, "nbdkit"), "qsd": (Qsd, "qsd")}


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=server_env())
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text and out.returncode == 0 else f"unavailable (exit {out.returncode}: {' '.join(text)[:200]})"


REPO = Path(__file__).resolve().parent.parent


def server_env() -> dict:
    """The environment for servers: ``python -m qsd`` imports qsd from this checkout, whatever is installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


class Running:
    """One started server process."""

    def __init__(self, server: Server, workdir: Path, image: Path, start_timeout: float):
        self.sock = workdir / f"{server.key}.sock"
        self.pidfile = workdir / f"{server.key}.pid"
        self.errlog = workdir / f"{server.key}.stderr"
        for p in (self.sock, self.pidfile):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        argv = server.argv(image, self.sock, self.pidfile)
        with open(self.errlog, "ab") as err:
            err.write(f"--- {' '.join(argv)}\n".encode())
            err.flush()
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                         start_new_session=True, cwd=workdir, env=server_env())
        self.pid = self.proc.pid
        deadline = time.monotonic() + start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with status {self.proc.returncode} at startup: {self.stderr_tail()}")
            if self.sock.exists() and self.pidfile.exists():
                break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"not ready after {start_timeout:.0f}s: {self.stderr_tail()}")
            time.sleep(0.01)

    def stderr_tail(self, n: int = 400) -> str:
        try:
            text = self.errlog.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        text = text.rsplit("--- ", 1)[-1].split("\n", 1)[-1].strip()
        return " ".join(text.split())[-n:] or "(no output)"

    def cpu_seconds(self) -> float:
        """utime + stime of the whole process (all threads), in seconds."""
        with open(f"/proc/{self.pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        # rest[0] is field 3 (state); utime and stime are fields 14 and 15
        return (int(rest[11]) + int(rest[12])) / CLK_TCK

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        return self.proc.returncode


# --------------------------------------------------------------------------------------------------
# one measurement


@dataclass
class Result:
    server: str
    workload: str
    round: int
    ok: bool
    error: str = ""
    mib_s: float = 0.0
    iops: float = 0.0
    cpu_s: float = 0.0
    cpu_s_per_gib: float = 0.0
    bytes: int = 0
    runtime_s: float = 0.0
    fio_usr_cpu: float = 0.0
    fio_sys_cpu: float = 0.0


def parse_fio_json(path: Path) -> dict:
    text = path.read_text()
    # fio's nbd engine may print "fio: connected to NBD server" on the same stream: start at the JSON object
    start = text.find("{")
    if start < 0:
        raise ValueError(f"no JSON in fio output: {text[:200]!r}")
    return json.loads(text[start:])


def record_fio(res: "Result", out: Path, direction: str, cpu_s: float) -> None:
    """Fill ``res`` from fio's JSON output and the server's CPU time; a
    failed or empty fio job leaves ``res.error`` set instead."""
    job = parse_fio_json(out)["jobs"][0]
    if job.get("error"):
        res.error = f"fio job error {job['error']}"
        return
    side = job[direction]
    res.bytes = int(side["io_bytes"])
    res.runtime_s = side["runtime"] / 1000.0  # ms
    if res.runtime_s <= 0 or res.bytes <= 0:
        res.error = "fio moved no data"
        return
    res.mib_s = res.bytes / MiB / res.runtime_s
    res.iops = float(side["iops"])
    res.cpu_s = cpu_s
    res.cpu_s_per_gib = res.cpu_s / (res.bytes / GiB)
    res.fio_usr_cpu = float(job.get("usr_cpu", 0.0))
    res.fio_sys_cpu = float(job.get("sys_cpu", 0.0))
    res.ok = True


def run_fio(args, wl: Workload, uri: str, size: int, out: Path) -> tuple[int, str]:
    argv = [
        args.fio, f"--name={wl.name}", "--ioengine=nbd", f"--uri={uri}",
        f"--rw={wl.rw}", f"--bs={wl.bs}", f"--iodepth={wl.iodepth}", f"--size={size}",
        "--time_based=1", f"--runtime={args.seconds}", "--randrepeat=0", "--norandommap=1",
        "--output-format=json", f"--output={out}",
    ]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=args.seconds + 60)
    except subprocess.TimeoutExpired:
        return -1, "fio timed out"
    return p.returncode, (p.stderr + p.stdout).strip()


def measure(args, server: Server, wl: Workload, rnd: int, workdir: Path, image: Path, size: int) -> Result:
    res = Result(server.key, wl.name, rnd, ok=False)
    try:
        srv = Running(server, workdir, image, args.start_timeout)
    except (RuntimeError, OSError) as e:
        res.error = f"failed to start: {e}"
        server.failed = res.error
        return res
    try:
        uri = f"nbd+unix:///disk?socket={srv.sock}"
        out = workdir / "fio.json"
        if out.exists():
            out.unlink()
        cpu0 = srv.cpu_seconds()
        rc, msg = run_fio(args, wl, uri, size, out)
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
            # a clean shutdown is part of the deal; keep the number but say so
            res.error = f"server exited with status {status} on SIGTERM"


# --------------------------------------------------------------------------------------------------
# image


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    for suffix, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
        if text.endswith(suffix):
            text, mult = text[:-1], m
            break
    n = int(float(text) * mult)
    if n <= 0 or n % 4096:
        raise argparse.ArgumentTypeError("size must be a positive multiple of 4 KiB")
    return n


def make_image(path: Path, size: int) -> None:
    """A fully written raw image (no holes, non-zero data), left in the page cache."""
    block = bytearray(os.urandom(MiB))
    with open(path, "wb") as f:
        off = 0
        while off < size:
            n = min(MiB, size - off)
            block[:8] = off.to_bytes(8, "little")  # every MiB differs a little
            f.write(memoryview(block)[:n])
            off += n
    # read it back once so every page is cached (it is after the write, unless memory is short)
    with open(path, "rb") as f:
        while f.readinto(block):
            pass


# --------------------------------------------------------------------------------------------------
# report


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def fmt(x: float | None, spec: str) -> str:
    if x is None:
        return format("-", ">" + spec.split(".")[0])
    return format(x, spec)


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def report(results: list[Result], servers: list[Server], workloads: list[Workload], rounds: int) -> str:
    lines = []
    by = {}
    for r in results:
        by.setdefault((r.workload, r.server), []).append(r)

    def med(wl, srv, attr):
        return median([getattr(r, attr) for r in by.get((wl, srv), []) if r.ok])

    def spread(wl, srv):
        xs = [r.mib_s for r in by.get((wl, srv), []) if r.ok]
        if len(xs) < 2 or not statistics.median(xs):
            return None
        return 100.0 * (max(xs) - min(xs)) / statistics.median(xs)

    head = (f"{'workload':<20} {'server':<7} {'MiB/s':>9} {'spread':>7} {'IOPS':>9} {'CPU s/GiB':>10} {'runs':>5}"
            "  note")
    lines.append(head)
    lines.append("-" * len(head))
    for wl in workloads:
        for s in servers:
            rs = by.get((wl.name, s.key), [])
            ok = [r for r in rs if r.ok]
            note = ""
            bad = [r.error for r in rs if r.error]
            if bad:
                note = bad[-1][:120]
            elif s.failed:
                note = s.failed[:120]
            sp = spread(wl.name, s.key)
            lines.append(f"{wl.name:<20} {s.label:<7} {fmt(med(wl.name, s.key, 'mib_s'), '9.1f')} "
                         f"{'-' if sp is None else f'{sp:.0f}%':>7} "
                         f"{fmt(med(wl.name, s.key, 'iops'), '9.0f')} "
                         f"{fmt(med(wl.name, s.key, 'cpu_s_per_gib'), '10.3f')} "
                         f"{len(ok):>2}/{rounds:<2}  {note}")
    lines.append("")
    keys = [s.key for s in servers]
    pairs = [(a, b) for a, b in (("qsd", "qemu"), ("qsd", "nbdkit"), ("nbdkit", "qemu")) if a in keys and b in keys]
    label = {s.key: s.label for s in servers}
    if pairs:
        cols = [f"{label[a]}/{label[b]}" for a, b in pairs]
        head = (f"{'ratios (medians)':<20} " + " ".join(f"{'thr ' + c:>16}" for c in cols) + "  "
                + " ".join(f"{'cpu/GiB ' + c:>20}" for c in cols))
        lines.append(head)
        lines.append("-" * len(head))
        for wl in workloads:
            thr = [ratio(med(wl.name, a, "mib_s"), med(wl.name, b, "mib_s")) for a, b in pairs]
            cpu = [ratio(med(wl.name, a, "cpu_s_per_gib"), med(wl.name, b, "cpu_s_per_gib")) for a, b in pairs]
            lines.append(f"{wl.name:<20} " + " ".join(f"{t:>16}" for t in thr) + "  "
                         + " ".join(f"{c:>20}" for c in cpu))
        # Paired ratios: each round ran the servers back to back, so the per-round ratio cancels slow drifts in
        # machine load; their median is the steadier estimate on a noisy machine.
        rounds_of = {}
        for r in results:
            if r.ok:
                rounds_of.setdefault((r.workload, r.server), {})[r.round] = r.mib_s

        def paired(wl, a, b):
            ra, rb = rounds_of.get((wl, a), {}), rounds_of.get((wl, b), {})
            xs = [ra[k] / rb[k] for k in ra if k in rb and rb[k]]
            return f"{statistics.median(xs):.2f}x" if xs else "-"

        lines.append("")
        head = f"{'paired (per round)':<20} " + " ".join(f"{'thr ' + c:>16}" for c in cols)
        lines.append(head)
        lines.append("-" * len(head))
        for wl in workloads:
            lines.append(f"{wl.name:<20} " + " ".join(f"{paired(wl.name, a, b):>16}" for a, b in pairs))
        lines.append("(spread: (max - min) / median of MiB/s over rounds; "
                     "thr: throughput ratio, higher is better for the first; cpu/GiB: server CPU per GiB moved, "
                     "lower is better for the first; paired: median over rounds of the ratio within one round)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# main


def select_workloads(ap: argparse.ArgumentParser, only: list[str] | None) -> list[Workload]:
    """The workloads ``--only`` names (repeatable or comma-separated), all without it."""
    if not only:
        return list(WORKLOADS)
    names = [n.strip() for item in only for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS_BY_NAME]
    if unknown:
        ap.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS_BY_NAME)}")
    return [WORKLOADS_BY_NAME[n] for n in names]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Serve one raw image from qemu-storage-daemon (QSD), nbdkit and qsd over NBD unix sockets, "
                    "alternating servers in rounds, and compare them with fio's nbd engine.")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each runs every workload on every server (3)")
    ap.add_argument("--seconds", type=int, default=5, help="fio runtime per run, seconds (5)")
    ap.add_argument("--size", type=parse_size, default=GiB, help="image size, e.g. 1G, 256M (1G)")
    ap.add_argument("--only", action="append", metavar="WORKLOAD",
                    help="run only this workload (repeatable or comma-separated): " + ", ".join(WORKLOADS_BY_NAME))
    ap.add_argument("--servers", default="qemu,nbdkit,qsd",
                    help="comma-separated servers to compare, among qemu (qemu-storage-daemon), nbdkit, qsd "
                         "(default: all three)")
    ap.add_argument("--dir", type=Path, default=None,
                    help="work directory for the image and sockets (default: a new /tmp/qsd-bench-*)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (image, server logs)")
    ap.add_argument("--json", type=Path, default=None, help="also write every run's numbers to this JSON file")
    ap.add_argument("--fio", default="fio", help="fio binary (needs the nbd ioengine)")
    ap.add_argument("--start-timeout", type=float, default=30.0, help="seconds a server may take to start (30)")
    args = ap.parse_args(argv)

    workloads = select_workloads(ap, args.only)
    servers: list[Server] = []
    for key in [k.strip() for k in args.servers.split(",") if k.strip()]:
        if key not in SERVER_CLASSES:
            ap.error(f"unknown server '{key}'; choose from {', '.join(SERVER_CLASSES)}")
        cls, label = SERVER_CLASSES[key]
        servers.append(cls(key, label))
    if not servers or args.rounds < 1 or args.seconds < 1:
        ap.error("need at least one server, one round and one second")

    if shutil.which(args.fio) is None:
        print(f"nbd_raw: {args.fio} not found (Debian: apt-get install fio)", file=sys.stderr)
        return 2
    eng = subprocess.run([args.fio, "--enghelp=nbd"], capture_output=True, text=True)
    if eng.returncode != 0 or "uri" not in eng.stdout:
        print(f"nbd_raw: {args.fio} has no nbd ioengine", file=sys.stderr)
        return 2

    versions = {"qemu": ["qemu-storage-daemon", "--version"], "nbdkit": ["nbdkit", "--version"],
                "qsd": [sys.executable, "-m", "qsd", "--version"]}
    for s in servers:
        s.version = tool_version(versions[s.key])

    own_dir = args.dir is None
    workdir = Path(tempfile.mkdtemp(prefix="qsd-bench-", dir="/tmp")) if own_dir else args.dir
    workdir.mkdir(parents=True, exist_ok=True)
    image = workdir / "bench.raw"

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    total = args.rounds * len(workloads) * len(servers)
    log(f"nbd_raw: {total} runs of {args.seconds}s ({args.rounds} rounds x {len(workloads)} workloads x "
        f"{len(servers)} servers), work dir {workdir}")
    t0 = time.monotonic()
    make_image(image, args.size)
    log(f"nbd_raw: wrote {args.size / GiB:.2f} GiB image in {time.monotonic() - t0:.1f}s")
    load_before = os.getloadavg()

    results: list[Result] = []
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
                        results.append(Result(s.key, wl.name, rnd, ok=False, error=""))
                        continue
                    r = measure(args, s, wl, rnd, workdir, image, args.size)
                    results.append(r)
                    if r.ok:
                        log(f"[{n:>3}/{total}] round {rnd + 1} {wl.name:<19} {s.label:<7} {r.mib_s:9.1f} MiB/s "
                            f"{r.iops:9.0f} IOPS  server {r.cpu_s:5.2f} cpu-s = {r.cpu_s_per_gib:.3f} s/GiB"
                            + (f"  ({r.error})" if r.error else ""))
                    else:
                        log(f"[{n:>3}/{total}] round {rnd + 1} {wl.name:<19} {s.label:<7} FAILED: {r.error}")
    except KeyboardInterrupt:
        log("nbd_raw: interrupted; reporting what was measured")
    finally:
        load_after = os.getloadavg()
        if own_dir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(f"nbd_raw: {started}, {platform.node()}, {os.cpu_count()} CPUs, kernel {platform.release()}, "
          f"image {args.size / GiB:.2f} GiB raw in page cache, unix sockets, fio nbd engine, "
          f"{args.seconds}s per run, {args.rounds} rounds (medians)")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    for s in servers:
        print(f"  {s.label:<7} {s.version}")
    print()
    print(report(results, servers, workloads, args.rounds))

    if args.json:
        args.json.write_text(json.dumps({
            "started": started, "seconds": args.seconds, "rounds": args.rounds, "size": args.size,
            "servers": {s.key: {"label": s.label, "version": s.version, "failed": s.failed} for s in servers},
            "results": [r.__dict__ for r in results],
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
