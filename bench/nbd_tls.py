# SPDX-License-Identifier: GPL-2.0-or-later
"""NBD export benchmark with TLS on: the same raw image served by qemu-storage-daemon (QSD), nbdkit and qsd over
x509 TLS (``nbds+unix://``).

Run ``python bench/nbd_tls.py --help``. Like ``nbd_raw.py`` (whose servers, fio runs, CPU accounting and table it
reuses), but every server requires TLS with the same certificates (a CA and a server certificate for localhost,
made here with ``cryptography``): QSD and qsd with ``--object tls-creds-x509,dir=...,endpoint=server,
verify-peer=off`` and ``tls-creds=`` on ``--nbd-server``, nbdkit with ``--tls=require --tls-certificates=...``.

fio's nbd engine refuses URIs that name local files (``tls-certificates=``, ``tls-psk-file=``), so libnbd finds the
CA in its default place, ``$HOME/.pki/libnbd/ca-cert.pem``, with HOME pointing into the work directory. For the same
reason TLS-PSK cannot be measured with fio; ``--psk`` measures it with nbdcopy (sequential copies, 4 connections)
instead, for QSD and qsd.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nbd_raw import (  # the sibling module, whatever the current directory
    GiB,
    MiB,
    WORKLOADS_BY_NAME,
    Result,
    Running,
    Server,
    Workload,
    make_image,
    parse_size,
    record_fio,
    report,
    select_workloads,
    tool_version,
)


def make_pki(directory: Path) -> tuple[Path, Path]:
    """Server credentials (QEMU's and nbdkit's file names) and a libnbd HOME that trusts their CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    srv = directory / "pki-server"
    home = directory / "home"
    libnbd = home / ".pki" / "libnbd"
    srv.mkdir(parents=True, exist_ok=True)
    libnbd.mkdir(parents=True, exist_ok=True)

    def cert(cn: str, ca: bool, issuer=None, issuer_key=None):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(days=1))
             .not_valid_after(now + datetime.timedelta(days=7))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
        return key, b.sign(issuer_key or key, hashes.SHA256())

    ca_key, ca = cert("qsd bench CA", True)
    key, crt = cert("localhost", False, ca.subject, ca_key)
    pem = serialization.Encoding.PEM
    for d in (srv, libnbd):
        (d / "ca-cert.pem").write_bytes(ca.public_bytes(pem))
    (srv / "server-cert.pem").write_bytes(crt.public_bytes(pem))
    (srv / "server-key.pem").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return srv, home


def make_psk(directory: Path) -> Path:
    psk = directory / "pki-psk"
    psk.mkdir(parents=True, exist_ok=True)
    (psk / "keys.psk").write_text(f"bench:{os.urandom(32).hex()}\n")
    return psk


class TLSServer(Server):
    creds: str = ""  # the --object for QSD/qsd
    dir: Path = Path()

    def daemon_options(self, image: Path, sock: Path, pidfile: Path) -> list[str]:
        return ["--object", self.creds,
                "--blockdev", f"driver=file,node-name=disk,filename={image}",
                "--nbd-server", f"addr.type=unix,addr.path={sock},tls-creds=tls0",
                "--export", "type=nbd,id=exp0,node-name=disk,name=disk,writable=on",
                "--pidfile", str(pidfile)]


class QemuSD(TLSServer):
    def argv(self, image, sock, pidfile):
        return ["qemu-storage-daemon", *self.daemon_options(image, sock, pidfile)]


class Qsd(TLSServer):
    def argv(self, image, sock, pidfile):
        return [sys.executable, "-m", "qsd", *self.daemon_options(image, sock, pidfile)]


class Nbdkit(TLSServer):
    def argv(self, image, sock, pidfile):
        return ["nbdkit", "-f", "-U", str(sock), "-P", str(pidfile), "-e", "disk", "--tls=require",
                f"--tls-certificates={self.dir}", "file", str(image)]


SERVER_CLASSES = {"qemu": (QemuSD, "QSD"), "nbdkit": (Nbdkit, "nbdkit"), "qsd": (Qsd, "qsd")}


def measure_fio(args, server: Server, wl: Workload, rnd: int, workdir: Path, image: Path, home: Path) -> Result:
    res = Result(server.key, wl.name, rnd, ok=False)
    try:
        srv = Running(server, workdir, image, args.start_timeout)
    except (RuntimeError, OSError) as e:
        res.error = server.failed = f"failed to start: {e}"
        return res
    try:
        out = workdir / "fio.json"
        out.unlink(missing_ok=True)
        argv = [args.fio, f"--name={wl.name}", "--ioengine=nbd", f"--uri=nbds+unix:///disk?socket={srv.sock}",
                f"--rw={wl.rw}", f"--bs={wl.bs}", f"--iodepth={wl.iodepth}", f"--size={args.size}",
                "--time_based=1", f"--runtime={args.seconds}", "--randrepeat=0", "--norandommap=1",
                "--output-format=json", f"--output={out}"]
        cpu0 = srv.cpu_seconds()
        p = subprocess.run(argv, capture_output=True, text=True, timeout=args.seconds + 60,
                           env={**os.environ, "HOME": str(home)})
        if not srv.alive():
            res.error = f"server died during the run: {srv.stderr_tail()}"
            return res
        cpu1 = srv.cpu_seconds()
        if p.returncode:
            res.error = f"fio exit {p.returncode}: {' '.join((p.stderr + p.stdout).split())[-300:]}"
            return res
        record_fio(res, out, wl.direction, cpu1 - cpu0)
        return res
    except (OSError, ValueError, KeyError, subprocess.TimeoutExpired) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    finally:
        srv.stop()


def measure_nbdcopy(args, server: Server, rnd: int, workdir: Path, image: Path, psk: Path) -> Result:
    """Copy the whole export to /dev/null with nbdcopy (4 connections) over TLS-PSK."""
    res = Result(server.key, "psk-nbdcopy-read", rnd, ok=False)
    try:
        srv = Running(server, workdir, image, args.start_timeout)
    except (RuntimeError, OSError) as e:
        res.error = server.failed = f"failed to start: {e}"
        return res
    try:
        uri = f"nbds+unix://bench@/disk?socket={srv.sock}&tls-psk-file={psk / 'keys.psk'}"
        cpu0 = srv.cpu_seconds()
        t0 = time.monotonic()
        p = subprocess.run(["nbdcopy", "--connections=4", uri, "null:"], capture_output=True, text=True,
                           timeout=600)
        elapsed = time.monotonic() - t0
        cpu1 = srv.cpu_seconds() if srv.alive() else cpu0
        if p.returncode:
            res.error = f"nbdcopy exit {p.returncode}: {' '.join(p.stderr.split())[-300:]}"
            return res
        res.bytes, res.runtime_s = args.size, elapsed
        res.mib_s = args.size / MiB / elapsed
        res.cpu_s = cpu1 - cpu0
        res.cpu_s_per_gib = res.cpu_s / (args.size / GiB)
        res.ok = True
        return res
    finally:
        srv.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="fio-style NBD ratios with TLS on: QSD, nbdkit and qsd serving one raw "
                                             "image over x509 TLS (and, with --psk, nbdcopy over TLS-PSK).")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (3)")
    ap.add_argument("--seconds", type=int, default=5, help="fio runtime per run, seconds (5)")
    ap.add_argument("--size", type=parse_size, default=GiB // 2, help="image size (512M)")
    ap.add_argument("--only", action="append", metavar="WORKLOAD",
                    help="only these workloads (repeatable or comma-separated): " + ", ".join(WORKLOADS_BY_NAME))
    ap.add_argument("--servers", default="qemu,nbdkit,qsd", help="subset of qemu,nbdkit,qsd (all)")
    ap.add_argument("--psk", action="store_true", help="also copy the image with nbdcopy over TLS-PSK (QSD, qsd)")
    ap.add_argument("--fio", default="fio", help="fio binary (needs the nbd ioengine)")
    ap.add_argument("--start-timeout", type=float, default=30.0, help="seconds a server may take to start (30)")
    args = ap.parse_args(argv)

    workloads = select_workloads(ap, args.only)
    keys = [k.strip() for k in args.servers.split(",") if k.strip()]
    if any(k not in SERVER_CLASSES for k in keys) or not keys or args.rounds < 1 or args.seconds < 1:
        ap.error("servers among qemu,nbdkit,qsd; at least one round and one second")
    if shutil.which(args.fio) is None:
        print(f"nbd_tls: {args.fio} not found", file=sys.stderr)
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="qsd-bench-tls-", dir="/tmp"))
    srv_dir, home = make_pki(workdir)
    psk_dir = make_psk(workdir)
    servers: list[Server] = []
    for key in keys:
        cls, label = SERVER_CLASSES[key]
        s = cls(key, label)
        s.creds = f"tls-creds-x509,id=tls0,dir={srv_dir},endpoint=server,verify-peer=off"
        s.dir = srv_dir
        servers.append(s)
    versions = {"qemu": ["qemu-storage-daemon", "--version"], "nbdkit": ["nbdkit", "--version"],
                "qsd": [sys.executable, "-m", "qsd", "--version"]}
    for s in servers:
        s.version = tool_version(versions[s.key])

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    image = workdir / "bench.raw"
    make_image(image, args.size)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    load_before = os.getloadavg()
    results: list[Result] = []
    psk_results: list[Result] = []
    try:
        for rnd in range(args.rounds):
            for wi, wl in enumerate(workloads):
                shift = (rnd + wi) % len(servers)
                for s in servers[shift:] + servers[:shift]:
                    if s.failed:
                        continue
                    r = measure_fio(args, s, wl, rnd, workdir, image, home)
                    results.append(r)
                    log(f"round {rnd + 1} {wl.name:<19} {s.label:<7} "
                        + (f"{r.mib_s:9.1f} MiB/s {r.cpu_s_per_gib:.3f} cpu-s/GiB" if r.ok else f"FAILED: {r.error}"))
            if args.psk:
                for s in servers:
                    if s.key == "nbdkit" or s.failed:
                        continue
                    s.creds = f"tls-creds-psk,id=tls0,dir={psk_dir},endpoint=server"
                    r = measure_nbdcopy(args, s, rnd, workdir, image, psk_dir)
                    s.creds = f"tls-creds-x509,id=tls0,dir={srv_dir},endpoint=server,verify-peer=off"
                    psk_results.append(r)
                    log(f"round {rnd + 1} psk-nbdcopy-read     {s.label:<7} "
                        + (f"{r.mib_s:9.1f} MiB/s" if r.ok else f"FAILED: {r.error}"))
    except KeyboardInterrupt:
        log("nbd_tls: interrupted; reporting what was measured")
    finally:
        load_after = os.getloadavg()
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(f"nbd_tls: {started}, {platform.node()}, {os.cpu_count()} CPUs, image {args.size / GiB:.2f} GiB raw in "
          f"page cache, x509 TLS over unix sockets, fio nbd engine, {args.seconds}s per run, {args.rounds} rounds")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    for s in servers:
        print(f"  {s.label:<7} {s.version}")
    print()
    print(report(results, servers, workloads, args.rounds))
    if psk_results:
        print()
        print("TLS-PSK, nbdcopy --connections=4 of the whole image to null: (medians)")
        for s in servers:
            xs = [r.mib_s for r in psk_results if r.server == s.key and r.ok]
            if xs:
                print(f"  {s.label:<7} {statistics.median(xs):9.1f} MiB/s  ({len(xs)} runs)")
        q = [r.mib_s for r in psk_results if r.server == "qemu" and r.ok]
        o = [r.mib_s for r in psk_results if r.server == "qsd" and r.ok]
        if q and o:
            print(f"  qsd/QSD {statistics.median(o) / statistics.median(q):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
