# SPDX-License-Identifier: GPL-2.0-or-later
"""The ``qsd`` command line against the real qemu-storage-daemon 7.2.

Differential rows run both programs with the same arguments in the same
scratch directory (QSD first) and compare exit status, stdout and stderr,
after QSD's program name is replaced by ``qsd``.  Rows whose daemon keeps
running get ``--pidfile ready.pid`` (first: ``--`` may end the options), are stopped with a signal once the
pidfile names them, and must then exit 0 with the same output.  All rows run
in parallel, once per session.  Further tests cover the pidfile, signals,
``--daemonize``, the stdio monitor and sd_notify.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
QEMU = shutil.which("qemu-storage-daemon")
QSD = [sys.executable, "-m", "qsd"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
ENV.pop("NOTIFY_SOCKET", None)
TIMEOUT = 20.0

pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-storage-daemon (the oracle) is not installed")


def _export_types() -> list[str]:
    from qsd.schema import get_schema

    union = get_schema().types["BlockExportOptions"]
    return next(m.type.names() for m in union.members if m.name == union.tag)


def _object_types() -> list[str]:
    from qsd.schema import get_schema

    union = get_schema().types["ObjectOptions"]
    return next(m.type.names() for m in union.members if m.name == union.tag)


def _drivers() -> list[str]:
    from qsd.schema import get_schema

    return list(get_schema().types["BlockdevOptions"].variants)


# ---------------------------------------------------------------------------
# Running one program


@dataclass
class Outcome:
    status: int | None
    stdout: str
    stderr: str


def _normalise(text: str) -> str:
    return text.replace("qemu-storage-daemon", "qsd")


def _argv(program: str, args: list[str]) -> list[str]:
    # By name, as in the reference transcripts: getopt's messages start with argv[0].
    return ["qemu-storage-daemon", *args] if program == "qemu" else [*QSD, *args]


def _outcome(program: str, status: int | None, stdout: bytes, stderr: bytes) -> Outcome:
    if program == "qemu":
        return Outcome(status, _normalise(stdout.decode()), _normalise(stderr.decode()))
    return Outcome(status, stdout.decode(), stderr.decode())


def run_to_exit(program: str, args: list[str], cwd: Path, stdin: bytes = b"") -> Outcome:
    proc = subprocess.run(_argv(program, args), check=False, cwd=cwd, input=stdin, capture_output=True,
                          timeout=TIMEOUT, env=ENV)
    return _outcome(program, proc.returncode, proc.stdout, proc.stderr)


def _wait_pidfile(proc: subprocess.Popen[bytes], pidfile: Path, timeout: float = TIMEOUT) -> bool:
    """True once ``pidfile`` names ``proc``; False if it exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if pidfile.read_text() == f"{proc.pid}\n":
                return True
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    raise TimeoutError(f"{proc.args} did not write {pidfile}")


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def run_until_ready(program: str, args: list[str], cwd: Path, sig: int = signal.SIGTERM) -> Outcome:
    """Start, wait for the pidfile, send ``sig``; a daemon that exits by itself is fine too."""
    pidfile = cwd / "ready.pid"
    pidfile.unlink(missing_ok=True)
    with open(cwd / "out", "w+b") as out, open(cwd / "err", "w+b") as err:
        proc = subprocess.Popen(_argv(program, ["--pidfile", "ready.pid", *args]), cwd=cwd,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=ENV)
        try:
            if _wait_pidfile(proc, pidfile):
                os.kill(proc.pid, sig)
            proc.wait(TIMEOUT)
        finally:
            _stop(proc, signal.SIGKILL)
        out.seek(0)
        err.seek(0)
        return _outcome(program, proc.returncode, out.read(), err.read())


# ---------------------------------------------------------------------------
# The rows

DISK = "driver=file,node-name=f0,filename=disk.img"


@dataclass
class Row:
    id: str
    args: list[str]
    running: bool = False          # the daemon keeps running: stop it with a signal
    needs: str = ""                # "driver:NAME", "export:TYPE" or "object:TYPE" qsd must have


def _rows() -> list[Row]:
    r = Row
    return [
        # getopt (pass 1) and stray arguments
        r("unknown-long", ["--bogus"]),
        r("unknown-long-value", ["--bogus=1"]),
        r("unknown-short", ["-x"]),
        r("missing-arg", ["--blockdev"]),
        r("missing-arg-pidfile", ["--pidfile"]),
        r("missing-arg-short", ["-T"]),
        r("no-arg-allowed", ["--daemonize=1"]),
        r("no-arg-allowed-help", ["--help=foo"]),
        r("ambiguous", ["--=x"]),
        r("short-cluster-bad-first", ["-xh"]),
        r("stray-argument", ["foo.img"]),
        r("stray-dash", ["-"]),
        r("stray-empty", [""]),
        r("double-dash-ends-options", ["--", "foo.img"], running=True),
        r("getopt-error-before-option-error", ["--blockdev", "driver=file,node-name=f0", "--bogus"]),
        r("stray-before-option", ["foo.img", "--blockdev", "driver=x"]),
        r("option-before-stray", ["--blockdev", "driver=x", "foo.img"]),
        r("joined-long-form", ["--blockdev=driver=file,node-name=f0"]),
        r("joined-empty", ["--blockdev="]),
        r("separate-empty", ["--blockdev", ""]),
        r("abbreviated", ["--block", "driver=file,node-name=f0"]),
        r("abbreviated-short", ["--b", "x"]),
        r("joined-short-T", ["-Tevents=nosuch.txt"]),
        # --blockdev
        r("blockdev-missing-filename", ["--blockdev", "driver=file,node-name=f0"]),
        r("blockdev-bad-driver", ["--blockdev", "driver=nosuch,node-name=f0"]),
        r("blockdev-missing-file", ["--blockdev", "driver=file,node-name=f0,filename=missing.img"]),
        r("blockdev-unexpected", ["--blockdev", f"{DISK},bogus=1"]),
        r("blockdev-no-node-name", ["--blockdev", "driver=file,filename=disk.img"]),
        r("blockdev-duplicate", ["--blockdev", DISK, "--blockdev", DISK]),
        r("blockdev-no-equals", ["--blockdev", "driver=file,node-name=f0,filename"]),
        r("blockdev-help", ["--blockdev", "help"]),
        r("blockdev-driver-help", ["--blockdev", "driver=file,help"]),
        r("blockdev-size-suffix", ["--blockdev", "driver=null-co,node-name=n0,size=1G"]),
        r("blockdev-bad-bool", ["--blockdev", "driver=null-co,node-name=n0,size=1073741824,read-only=maybe"]),
        r("blockdev-ok", ["--blockdev", DISK, "--blockdev", "driver=raw,node-name=r0,file=f0"], running=True),
        r("blockdev-repeated-key", ["--blockdev", "driver=null-co,node-name=n0,node-name=n1"], running=True),
        r("blockdev-bools", ["--blockdev", "driver=null-co,node-name=n,read-only=yes,size=1048576",
                             "--blockdev", "driver=null-co,node-name=m,read-only=true,size=1048576",
                             "--blockdev", "driver=null-co,node-name=o,read-only=on,size=1048576"], running=True),
        r("blockdev-raw-window", ["--blockdev", "driver=file,node-name=f,filename=disk.img",
                                  "--blockdev", "driver=raw,node-name=r,file=f,offset=512,size=1024"], running=True),
        r("blockdev-qcow2", ["--blockdev", DISK, "--blockdev",
                             "qcow2,node-name=q0,file.driver=file,file.filename=disk.qcow2"], running=True,
          needs="driver:qcow2"),
        r("blockdev-qcow2-json", ["--blockdev", ('{"driver": "qcow2", "node-name": "q0", "file": '
                                                 '{"driver": "file", "filename": "disk.qcow2"}}')], running=True,
          needs="driver:qcow2"),
        r("blockdev-comma-in-value", ["--blockdev", "driver=file,node-name=f,filename=a,,b.img"], running=True),
        # --blockdev JSON
        r("json-ok", ["--blockdev", '{"driver": "null-co", "node-name": "n"}'], running=True),
        r("json-single-quotes", ["--blockdev", "{'driver': 'null-co', 'node-name': 'n'}"], running=True),
        r("json-premature-eoi", ["--blockdev", '{"driver": "file"']),
        r("json-premature-eoi-number", ["--blockdev", '{"a": 12']),
        r("json-premature-eoi-nested", ["--blockdev", '{"a": {}']),
        r("json-expecting-value", ["--blockdev", '{"driver": }']),
        r("json-trailing-comma", ["--blockdev", '{"driver": "null-co", "node-name": "n",}']),
        r("json-two-values", ["--blockdev", '{"driver": "null-co", "node-name": "n"} {}']),
        r("json-trailing-word", ["--blockdev", '{"driver": "null-co", "node-name": "n"} x']),
        r("json-trailing-bracket", ["--blockdev", '{"a": 1} ]']),
        r("json-trailing-space", ["--blockdev", '{"a": 1}   ']),
        r("json-unfinished-string", ["--blockdev", '{"a']),
        r("json-bad-keyword", ["--blockdev", '{"a": tru']),
        r("json-stray", ["--blockdev", '{"driver": "null-co", "node-name": "n", "x": @}']),
        r("json-bad-escape", ["--blockdev", '{"a": "\\q"}']),
        r("json-open-brace", ["--blockdev", "{"]),
        r("json-empty-object", ["--blockdev", "{}"]),
        r("json-wrong-type-int", ["--blockdev", '{"driver": "null-co", "node-name": "n", "size": "1024"}']),
        r("json-wrong-type-float", ["--blockdev", '{"driver": "null-co", "node-name": "n", "size": 1.5}']),
        r("json-wrong-type-bool", ["--blockdev", '{"driver": "null-co", "node-name": "n", "read-only": "on"}']),
        r("json-leading-space-is-keyval", ["--blockdev", ' {"driver": "null-co", "node-name": "n"}']),
        # --chardev
        r("chardev-bad-backend", ["--chardev", "nosuch,id=c0"]),
        r("chardev-empty-backend", ["--chardev", ",id=c0"]),
        r("chardev-no-id", ["--chardev", "socket,path=m.sock,server=on,wait=off"]),
        r("chardev-no-id-bad-backend", ["--chardev", "nosuch"]),
        r("chardev-empty", ["--chardev", ""]),
        r("chardev-missing-backend", ["--chardev", "id=c0"]),
        r("chardev-json", ["--chardev", '{"id": "c0", "backend": {"type": "null", "data": {}}}']),
        r("chardev-bad-bool", ["--chardev", "socket,id=c0,path=m.sock,server=maybe"]),
        r("chardev-bool-case", ["--chardev", "socket,id=c,path=m.sock,server=ON,wait=off"]),
        r("chardev-invalid-parameter", ["--chardev", "socket,id=c0,path=m.sock,server=on,wait=off,bogus=1"]),
        r("chardev-invalid-then-bad-bool", ["--chardev", "socket,id=c,bogus=1,server=maybe"]),
        r("chardev-bad-bool-then-invalid", ["--chardev", "socket,id=c,server=maybe,bogus=1"]),
        r("chardev-flag-warning-invalid", ["--chardev", "socket,id=c,flag,bogus=1"]),
        r("chardev-invalid-no-id", ["--chardev", "socket,bogus=1"]),
        r("chardev-bad-id-first", ["--chardev", "socket,bogus=1,id=1a"]),
        r("chardev-bad-id-bad-backend", ["--chardev", "nosuch,id=1a"]),
        r("chardev-invalid-bad-backend", ["--chardev", "nosuch,id=c,bogus=1"]),
        r("chardev-empty-id", ["--chardev", "socket,id=,path=m.sock,server=on,wait=off"]),
        r("chardev-space-id", ["--chardev", "socket,id=a b,path=m.sock,server=on,wait=off"]),
        r("chardev-empty-key", ["--chardev", "socket,id=c,path=x.sock,=on"]),
        r("chardev-escaped-backend", ["--chardev", "socket,,id=c"]),
        r("chardev-escaped-comma-bool", ["--chardev", "socket,id=c,path=x.sock,server=on,,wait=off"]),
        r("chardev-duplicate-id", ["--chardev", "null,id=c0", "--chardev", "null,id=c0"]),
        r("chardev-two-stdio", ["--chardev", "stdio,id=s0", "--chardev", "stdio,id=s1"]),
        r("chardev-path-and-host", ["--chardev",
                                    "socket,id=c0,path=m.sock,host=localhost,port=4444,server=on,wait=off"]),
        r("chardev-host-no-port", ["--chardev", "socket,id=c0,host=localhost,server=on,wait=off"]),
        r("chardev-bad-service", ["--chardev", "socket,id=c0,host=127.0.0.1,port=abc,server=on,wait=off"]),
        r("chardev-bad-host", ["--chardev", "socket,id=c0,host=nosuch.invalid,port=4444,server=on,wait=off"]),
        r("chardev-bind-nodir", ["--chardev", "socket,id=c0,path=nodir/m.sock,server=on,wait=off"]),
        r("chardev-long-path", ["--chardev", f"socket,id=c,path={'x' * 110},server=on,wait=off"]),
        r("chardev-no-address", ["--chardev", "socket,id=c"]),
        r("chardev-bad-fd", ["--chardev", "socket,id=c,fd=abc"]),
        r("chardev-fd-not-socket", ["--chardev", "socket,id=c,fd=0,server=on,wait=off"]),
        r("chardev-backend-key-last-wins", ["--chardev", "null,backend=socket,id=c"]),
        r("chardev-client-unix-refused", ["--chardev", "socket,id=c,path=m.sock,server=off"]),
        r("chardev-client-tcp-refused", ["--chardev", "socket,id=c0,host=127.0.0.1,port=1"]),
        r("chardev-wait-in-client-mode", ["--chardev", "socket,id=c,path=m.sock,server=on,wait=off,server=off"]),
        r("chardev-noflag-client", ["--chardev", "socket,id=c,path=m.sock,server=on,wait=off,noserver"]),
        r("chardev-reconnect-server", ["--chardev", "socket,id=c,path=m.sock,server=on,wait=off,reconnect=1"]),
        r("chardev-tls-creds", ["--chardev", "socket,id=c,path=m.sock,server=on,wait=off,tls-creds=x"]),
        r("chardev-number", ["--chardev", "socket,id=c,path=m.sock,server=on,wait=off,to=abc"]),
        r("chardev-file-no-path", ["--chardev", "file,id=f"]),
        r("chardev-file-nodir", ["--chardev", "file,id=f,path=nodir/x"]),
        r("chardev-ringbuf-size", ["--chardev", "ringbuf,id=r,size=1000"]),
        r("chardev-ringbuf-size-fraction", ["--chardev", "ringbuf,id=r,size=1.5k"]),
        r("chardev-ringbuf-size-syntax", ["--chardev", "ringbuf,id=r,size=abc"]),
        r("chardev-ringbuf-size-negative", ["--chardev", "ringbuf,id=r,size=-1"]),
        r("chardev-options-help", ["--chardev", "socket,help"]),
        r("chardev-options-help-late", ["--chardev", "null,id=x,help"]),
        r("chardev-socket-monitor", ["--chardev", "socket,id=c0,path=m.sock,server=on,wait=off",
                                     "--monitor", "chardev=c0"], running=True),
        r("chardev-pretty-monitor", ["--chardev", "socket,id=c0,path=m.sock,server=on,wait=off",
                                     "--monitor", "c0,pretty=on"], running=True),
        r("chardev-short-form-flags", ["--chardev", "socket,id=c0,path=m.sock,server,nowait"], running=True),
        r("chardev-bool-words", ["--chardev", "socket,id=c,path=m.sock,server=yes,wait=n"], running=True),
        r("chardev-escaped-path", ["--chardev", "socket,id=c,path=a,,b.sock,server=on,wait=off"], running=True),
        r("chardev-first-id-wins", ["--chardev", "socket,id=c0,path=m.sock,server=on,wait=off,id=c1",
                                    "--monitor", "c0"], running=True),
        r("chardev-first-id-wins-2", ["--chardev", "socket,id=c0,path=m.sock,server=on,wait=off,id=c1",
                                      "--monitor", "c1"]),
        r("chardev-bare-id", ["--chardev", "socket,id=c,path=m.sock,server=on,wait=off,id"], running=True),
        r("chardev-trailing-comma", ["--chardev", "socket,id=c,path=x.sock,server=on,wait=off,"], running=True),
        r("chardev-explicit-backend", ["--chardev", "backend=socket,id=c,path=x.sock,server=on,wait=off"],
          running=True),
        r("chardev-tcp", ["--chardev", "socket,id=c,host=127.0.0.1,port=0,server=on,wait=off"], running=True),
        r("chardev-null-monitor", ["--chardev", "null,id=n", "--monitor", "n"], running=True),
        r("chardev-ringbuf", ["--chardev", "ringbuf,id=r,size=1k", "--monitor", "r"], running=True),
        r("chardev-memory", ["--chardev", "memory,id=c"], running=True),
        r("chardev-file", ["--chardev", "file,id=f,path=out.txt", "--monitor", "f"], running=True),
        r("chardev-stdio-signal", ["--chardev", "stdio,id=c,signal=off"], running=True),
        r("chardev-ignored-option", ["--chardev", "null,id=c0,path=x"], running=True),
        # --monitor
        r("monitor-no-chardev", ["--monitor", "chardev=nosuch"]),
        r("monitor-readline", ["--chardev", "socket,id=c0,path=m.sock,server=on,wait=off",
                               "--monitor", "chardev=c0,mode=readline"]),
        r("monitor-lookup-before-mode", ["--monitor", "chardev=nosuch,mode=readline"]),
        r("monitor-bad-mode", ["--chardev", "null,id=c0", "--monitor", "c0,mode=bogus"]),
        r("monitor-bare-pretty", ["--chardev", "null,id=c0", "--monitor", "c0,id=m0,pretty"]),
        r("monitor-bad-pretty", ["--chardev", "null,id=c0", "--monitor", "c0,pretty=1"]),
        r("monitor-unexpected", ["--chardev", "null,id=c0", "--monitor", "c0,bogus=1"]),
        r("monitor-help", ["--monitor", "help"]),
        r("monitor-help-late", ["--monitor", "c0,help"]),
        r("monitor-json-type", ["--monitor", '{"chardev": 1}']),
        r("monitor-in-use", ["--chardev", "socket,id=c0,path=m.sock,server=on,wait=off",
                             "--monitor", "chardev=c0", "--monitor", "chardev=c0"]),
        r("monitor-json", ["--chardev", "socket,id=c0,path=m.sock,server=on,wait=off",
                           "--monitor", '{"chardev": "c0", "pretty": false}'], running=True),
        # --nbd-server, --export
        r("export-no-server", ["--blockdev", DISK, "--export", "type=nbd,id=e0,node-name=f0"]),
        r("export-no-node", ["--export", "type=nbd,id=e0,node-name=f0", "--blockdev", DISK,
                             "--nbd-server", "addr.type=unix,addr.path=n.sock"]),
        r("nbd-server-twice", ["--nbd-server", "addr.type=unix,addr.path=n.sock",
                               "--nbd-server", "addr.type=unix,addr.path=n2.sock"]),
        r("export-bitmap-key", ["--nbd-server", "addr.type=unix,addr.path=n.sock", "--blockdev", DISK,
                                "--export", "nbd,id=e0,node-name=f0,bitmap=nosuch"]),
        r("export-bitmaps-missing", ["--nbd-server", "addr.type=unix,addr.path=n.sock",
                                     "--blockdev", "driver=null-co,node-name=n",
                                     "--export", "type=nbd,id=e,node-name=n,bitmaps.0=nosuch"]),
        r("export-no-id", ["--nbd-server", "addr.type=unix,addr.path=n.sock", "--blockdev", DISK,
                           "--export", "type=nbd,node-name=f0"]),
        r("export-help", ["--export", "help"]),
        r("nbd-server-no-path", ["--nbd-server", "addr.type=unix"]),
        r("nbd-server-help", ["--nbd-server", "help"]),
        r("nbd-server-json-port-int", ["--nbd-server",
                                       '{"addr": {"type": "inet", "host": "127.0.0.1", "port": 10900}}']),
        r("nbd-export-ok", ["--nbd-server", "addr.type=unix,addr.path=n.sock", "--blockdev", DISK,
                            "--export", "type=nbd,id=e0,node-name=f0,name=disk,writable=on"], running=True),
        r("nbd-export-json", ["--nbd-server", '{"addr": {"type": "inet", "host": "127.0.0.1", "port": "0"}}',
                              "--blockdev", DISK, "--export", '{"type": "nbd", "id": "e0", "node-name": "f0"}'],
          running=True),
        r("full-startup-line", ["--blockdev", DISK, "--blockdev", "driver=raw,node-name=r0,file=f0",
                                "--nbd-server", "addr.type=unix,addr.path=n3.sock",
                                "--export", "type=nbd,id=e0,node-name=r0,writable=on",
                                "--export", "type=vhost-user-blk,id=v0,node-name=r0,addr.type=unix,addr.path=v.sock",
                                "--object", "iothread,id=io1"], running=True, needs="export:vhost-user-blk"),
        r("export-fuse-mountpoint", ["--blockdev", "driver=null-co,node-name=n0,size=1073741824",
                                     "--export", "type=fuse,id=fu,node-name=n0,mountpoint=nonexistent"],
          needs="export:fuse"),
        # --object
        r("object-secret-no-data", ["--object", "secret,id=s0"]),
        r("object-bad-type", ["--object", "nosuch,id=x"]),
        r("object-no-id", ["--object", "secret,data=x"]),
        r("object-help-key", ["--object", "help=on"]),
        r("object-json-help-member", ["--object", '{"qom-type":"secret","help":true}']),
        r("object-json-no-data", ["--object", '{"qom-type": "secret", "id": "s0"}']),
        r("object-json-no-id", ["--object", '{"qom-type": "secret"}']),
        r("object-secret-help", ["--object", "secret,help"]),
        r("object-secret-help-late", ["--object", "secret,id=x,help"]),
        r("object-secret-help-explicit", ["--object", "qom-type=secret,help"]),
        r("object-iothread-help", ["--object", "iothread,help"]),
        r("object-after-error", ["--blockdev", "driver=x", "--object", "help"]),
        r("object-ok", ["--object", "secret,id=s0,data=x", "--object", "iothread,id=io0"], running=True),
        r("object-json-ok", ["--object", '{"qom-type": "secret", "id": "s0", "data": "x"}'], running=True),
        r("object-throttle-group", ["--object", "throttle-group,id=tg0,x-iops-total=100"], running=True,
          needs="object:throttle-group"),
        r("object-throttle-group-limits", ["--object", "throttle-group,id=tg0,limits.bps-read=4096,"
                                                       "limits.bps-read-max=8192,limits.bps-read-max-length=3"],
          running=True, needs="object:throttle-group"),
        r("object-throttle-group-max-low", ["--object", ("throttle-group,id=tg0,limits.iops-total=5,"
                                                         "limits.iops-total-max=3")], needs="object:throttle-group"),
        r("object-throttle-group-not-int", ["--object", "throttle-group,id=tg0,x-iops-total=abc"],
          needs="object:throttle-group"),
        r("object-throttle-group-range", ["--object", "throttle-group,id=tg0,limits.bps-total=-1"],
          needs="object:throttle-group"),
        r("blockdev-throttle-no-group", ["--blockdev", ("driver=throttle,node-name=t0,throttle-group=tg0,"
                                                        "file.driver=null-co")], needs="driver:throttle"),
        r("blockdev-throttle-group-order", ["--object", "throttle-group,id=tg0,x-iops-total=100",
                                            "--blockdev", ("driver=throttle,node-name=t0,throttle-group=tg0,"
                                                           "file.driver=null-co")],
          running=True, needs="driver:throttle"),
        r("blockdev-blkdebug-no-config", ["--blockdev", ("driver=blkdebug,node-name=b0,config=nosuch.cfg,"
                                                         "image.driver=null-co")], needs="driver:blkdebug"),
        r("luks-secret-order", ["--blockdev", ("driver=luks,node-name=l,key-secret=sec,file.driver=file,"
                                               "file.filename=disk.img"), "--object", "secret,id=sec,data=pw"],
          needs="driver:luks"),
        # --pidfile
        r("pidfile-nodir", ["--pidfile", "nodir/p.pid"]),
        r("pidfile-empty", ["--pidfile="]),
        r("pidfile-directory", ["--pidfile", "adir"]),
        r("pidfile-after-options", ["--pidfile", "nodir/p.pid", "--blockdev", "driver=x"]),
        # -T
        r("trace-events-missing", ["-T", "events=nosuch.txt"]),
        r("trace-events-empty-name", ["-T", "events="]),
        r("trace-events-last-wins", ["-T", "events=nosuch.txt,events=other.txt"]),
        r("trace-invalid", ["-T", "bogus=1"]),
        r("trace-flag", ["-T", "x,flag"]),
        r("trace-options-help", ["-T", "x,help"]),
        r("trace-logfile", ["-T", "file=/nonexist/t.log"]),
        r("trace-in-order", ["--blockdev", "driver=x", "--trace", "help"]),
        r("trace-unknown-event", ["-T", "nosuchpattern"], running=True),
        r("trace-empty-event", ["-T", "enable="], running=True),
        r("trace-glob", ["-T", "nosuch_*,file=t.log"], running=True),
        r("trace-events-file", ["-T", "events=ev.txt"], running=True),
        r("trace-enable-then-events", ["-T", "events=ev.txt,enable=foo"], running=True),
        # --daemonize
        r("daemonize-stdio", ["--daemonize", "--chardev", "stdio,id=s0", "--monitor", "chardev=s0"]),
        r("daemonize-stdio-late-flag", ["--chardev", "stdio,id=s0", "--daemonize"]),
        r("daemonize-child-fails", ["--daemonize", "--blockdev", "driver=file,node-name=f0,filename=missing.img"]),
        # no options at all, and other signals
        r("no-options", [], running=True),
    ]


ROWS = _rows()


def _scratch(base: Path, row: Row) -> Path:
    d = base / row.id
    d.mkdir()
    (d / "disk.img").write_bytes(bytes(1 << 20))
    (d / "a,b.img").touch()
    (d / "adir").mkdir()
    (d / "ev.txt").write_text("nosuch_ev\n# comment\nnosuch_*\n\n")
    if any("disk.qcow2" in arg for arg in row.args):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "disk.qcow2"), "1M"], check=True)
    return d


def _run_row(base: Path, row: Row) -> tuple[Outcome, Outcome] | Exception:
    d = _scratch(base, row)
    run = run_until_ready if row.running else run_to_exit
    try:
        theirs = run("qemu", row.args, d)
        ours = run("qsd", row.args, d)
    except Exception as err:  # noqa: BLE001 -- reported by the row's own test
        return err
    return theirs, ours


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Outcome, Outcome] | Exception]:
    """Every row, run in parallel once (each python start costs a few hundred ms)."""
    base = Path(os.path.realpath(tmp_path_factory.mktemp("cli")))
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        futures = {row.id: pool.submit(_run_row, base, row) for row in ROWS}
        return {key: future.result() for key, future in futures.items()}


def _available(need: str) -> bool:
    if not need:
        return True
    kind, name = need.split(":")
    known = {"driver": _drivers, "export": _export_types, "object": _object_types}[kind]()
    return name in known


# The first row's setup runs every row of both programs (module fixture).
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_same_as_qsd(row: Row, outcomes: dict[str, tuple[Outcome, Outcome] | Exception]) -> None:
    if not _available(row.needs):
        pytest.skip(f"qsd has no {row.needs} yet")
    result = outcomes[row.id]
    if isinstance(result, Exception):
        raise result
    theirs, ours = result
    assert ours == theirs


# ---------------------------------------------------------------------------
# Intentional differences: listings show what qsd has, in QSD's format


def test_help_and_version(tmp_path: Path) -> None:
    for args in (["-h"], ["--help"], ["--blockdev", "driver=x", "-h"], ["-hx"]):
        out = run_to_exit("qsd", args, tmp_path)
        assert (out.status, out.stderr) == (0, "")
        assert out.stdout.startswith("Usage: qsd [options]\n")
        for option in ("--blockdev", "--chardev", "--daemonize", "--export", "--monitor", "--nbd-server",
                       "--object", "--pidfile", "-T, --trace", "-V, --version"):
            assert option in out.stdout
    for args in (["-V"], ["--version"], ["-V", "--bogus"], ["-T", "events=nosuch.txt", "-V"], ["foo", "-V"]):
        out = run_to_exit("qsd", args, tmp_path)
        assert (out.status, out.stderr) == (0, "")
        first, second = out.stdout.splitlines()
        assert re.fullmatch(r"qsd version \S+ \(qemu-storage-daemon 7\.2 compatible\)", first)
        assert second.startswith("Copyright (c) ")


def test_listings_are_qsd_subsets(tmp_path: Path) -> None:
    for args, heading in ((["--chardev", "help"], "Available chardev backend types: "),
                          (["--chardev", "help,id=x"], "Available chardev backend types: "),
                          (["--object", "help"], "List of user creatable objects:"),
                          (["--object", "nosuch,help"], "List of user creatable objects:"),
                          (["--object", "help", "--blockdev", "x"], "List of user creatable objects:")):
        theirs, ours = run_to_exit("qemu", args, tmp_path), run_to_exit("qsd", args, tmp_path)
        assert (ours.status, ours.stderr) == (theirs.status, theirs.stderr) == (0, "")
        their_lines, our_lines = theirs.stdout.splitlines(), ours.stdout.splitlines()
        assert our_lines[0] == their_lines[0] == heading
        assert len(our_lines) > 1
        assert [line for line in their_lines if line in our_lines] == our_lines


def test_trace_help_lists_loggers(tmp_path: Path) -> None:
    out = run_to_exit("qsd", ["--trace", "help", "--blockdev", "driver=x"], tmp_path)
    assert (out.status, out.stderr) == (0, "")
    names = out.stdout.splitlines()
    assert "qsd" in names and names == sorted(names)
    assert all(name == "qsd" or name.startswith("qsd.") for name in names)


def test_trace_enables_a_logger(tmp_path: Path) -> None:
    """-T qsd.chardev,file=t.log: the chardev logger writes there."""
    out = run_until_ready("qsd", ["-T", "qsd.chardev,file=t.log", "--chardev", "null,id=n"], tmp_path)
    assert out == Outcome(0, "", "")
    assert (tmp_path / "t.log").exists()


# ---------------------------------------------------------------------------
# Pidfile and signals


def _start(program: str, args: list[str], cwd: Path, **kw: Any) -> subprocess.Popen[bytes]:
    kw.setdefault("stdin", subprocess.DEVNULL)
    kw.setdefault("stdout", subprocess.DEVNULL)
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("env", ENV)
    return subprocess.Popen(_argv(program, args), cwd=cwd, **kw)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["TERM", "INT", "HUP"])
def test_signal_stops_cleanly(tmp_path: Path, sig: int) -> None:
    proc = _start("qsd", ["--pidfile", "p.pid", "--chardev", "socket,id=c0,path=m.sock,server=on,wait=off",
                          "--monitor", "chardev=c0"], tmp_path)
    try:
        assert _wait_pidfile(proc, tmp_path / "p.pid")
        assert (tmp_path / "m.sock").is_socket()
        os.kill(proc.pid, sig)
        assert proc.wait(TIMEOUT) == 0
        assert proc.stderr is not None and proc.stderr.read() == b""
    finally:
        _stop(proc, signal.SIGKILL)
    assert not (tmp_path / "p.pid").exists()
    assert not (tmp_path / "m.sock").exists()


def test_pidfile_lifecycle(tmp_path: Path) -> None:
    """Content, mode, lock (against qsd and against QSD, both ways), removal."""
    pidfile = tmp_path / "p.pid"
    proc = _start("qsd", ["--pidfile", "p.pid"], tmp_path)
    try:
        assert _wait_pidfile(proc, pidfile)
        assert pidfile.stat().st_mode & 0o777 == 0o600
        for program in ("qsd", "qemu"):
            out = run_to_exit(program, ["--pidfile", "p.pid"], tmp_path)
            assert out == Outcome(1, "", "qsd: cannot create PID file: Cannot lock pid file: "
                                         "Resource temporarily unavailable\n")
        assert pidfile.read_text() == f"{proc.pid}\n"
    finally:
        _stop(proc)
    assert proc.returncode == 0
    assert not pidfile.exists()
    qemu = _start("qemu", ["--pidfile", "p.pid"], tmp_path)
    try:
        assert _wait_pidfile(qemu, pidfile)
        assert run_to_exit("qsd", ["--pidfile", "p.pid"], tmp_path).stderr.endswith(
            "Cannot lock pid file: Resource temporarily unavailable\n")
    finally:
        _stop(qemu)


def test_pidfile_replaces_stale_content(tmp_path: Path) -> None:
    pidfile = tmp_path / "p.pid"
    pidfile.write_text("1234567890123\n")
    proc = _start("qsd", ["--pidfile", "p.pid"], tmp_path)
    try:
        assert _wait_pidfile(proc, pidfile)
    finally:
        _stop(proc)
    assert not pidfile.exists()


def test_quit_exits_and_cleans_up(tmp_path: Path) -> None:
    proc = _start("qsd", ["--pidfile", "p.pid", "--chardev", "socket,id=c0,path=m.sock,server=on,wait=off",
                          "--monitor", "chardev=c0"], tmp_path)
    try:
        assert _wait_pidfile(proc, tmp_path / "p.pid")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(str(tmp_path / "m.sock"))
            sock.sendall(b'{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n')
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        assert data.split(b"\r\n")[1:] == [b'{"return": {}}', b'{"return": {}}', b""]
        assert proc.wait(TIMEOUT) == 0
    finally:
        _stop(proc, signal.SIGKILL)
    assert not (tmp_path / "p.pid").exists()
    assert not (tmp_path / "m.sock").exists()


def test_stale_socket_does_not_block_restart(tmp_path: Path) -> None:
    args = ["--pidfile", "p.pid", "--chardev", "socket,id=c0,path=m.sock,server=on,wait=off",
            "--monitor", "chardev=c0"]
    first = _start("qsd", args, tmp_path)
    try:
        assert _wait_pidfile(first, tmp_path / "p.pid")
    finally:
        _stop(first, signal.SIGKILL)
    assert (tmp_path / "m.sock").is_socket()       # left behind by the crash
    second = _start("qsd", args, tmp_path)
    try:
        assert _wait_pidfile(second, tmp_path / "p.pid")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(str(tmp_path / "m.sock"))
            assert sock.recv(4096).startswith(b'{"QMP": ')
    finally:
        _stop(second)
    assert second.returncode == 0


def test_second_client_waits_for_the_first(tmp_path: Path) -> None:
    proc = _start("qsd", ["--pidfile", "p.pid", "--chardev", "socket,id=c0,path=m.sock,server=on,wait=off",
                          "--monitor", "chardev=c0"], tmp_path)
    try:
        assert _wait_pidfile(proc, tmp_path / "p.pid")
        first, second = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
        first.settimeout(TIMEOUT)
        first.connect(str(tmp_path / "m.sock"))
        assert first.recv(4096).startswith(b'{"QMP": ')
        second.connect(str(tmp_path / "m.sock"))       # accepted by the kernel ...
        second.settimeout(0.3)
        with pytest.raises(socket.timeout):             # ... but not greeted
            second.recv(4096)
        first.close()
        second.settimeout(TIMEOUT)
        assert second.recv(4096).startswith(b'{"QMP": ')
        second.close()
    finally:
        _stop(proc)
    assert proc.returncode == 0


def test_wait_on_blocks_startup_like_qsd(tmp_path: Path) -> None:
    """server=on without wait=off: the info line, then nothing until a client comes."""
    results = []
    for program in ("qemu", "qsd"):
        d = tmp_path / program
        d.mkdir()
        proc = _start(program, ["--pidfile", "p.pid", "--chardev", "socket,id=c,path=w.sock,server=on",
                                "--monitor", "c"], d)
        try:
            deadline = time.monotonic() + TIMEOUT
            while not (d / "w.sock").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.3)
            assert not (d / "p.pid").exists()
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(TIMEOUT)
                sock.connect(str(d / "w.sock"))
                greeting = sock.recv(4096)
                assert _wait_pidfile(proc, d / "p.pid")
        finally:
            _stop(proc)
        assert proc.stderr is not None
        results.append((proc.returncode, greeting[:8], _normalise(proc.stderr.read().decode())))
    assert results[0] == results[1]
    assert results[1][2] == ("qsd: --chardev socket,id=c,path=w.sock,server=on: info: QEMU waiting for "
                             "connection on: disconnected:unix:w.sock,server=on\n")


# ---------------------------------------------------------------------------
# --daemonize


def test_daemonize_parent_returns_when_ready(tmp_path: Path) -> None:
    args = ["--daemonize", "--pidfile", "d.pid", "--chardev", "socket,id=c0,path=d.sock,server=on,wait=off",
            "--monitor", "chardev=c0", "--blockdev", DISK]
    (tmp_path / "disk.img").write_bytes(bytes(65536))
    parent = subprocess.run(_argv("qsd", args), check=False, cwd=tmp_path, capture_output=True,
                            timeout=TIMEOUT, env=ENV)
    assert (parent.returncode, parent.stdout, parent.stderr) == (0, b"", b"")
    pid = int((tmp_path / "d.pid").read_text())
    try:
        with socket.socket(socket.AF_UNIX) as sock:       # answers at once: startup was complete
            sock.settimeout(TIMEOUT)
            sock.connect(str(tmp_path / "d.sock"))
            sock.sendall(b'{"execute":"qmp_capabilities"}\n')
            assert sock.recv(4096).startswith(b'{"QMP": ')
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        assert os.getsid(pid) != os.getsid(0)
        assert all(os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null" for fd in (0, 1, 2))
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + TIMEOUT
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _running(pid)
    assert not (tmp_path / "d.pid").exists()
    assert not (tmp_path / "d.sock").exists()


def _running(pid: int) -> bool:
    """Alive and not a zombie (init may take its time to reap a daemon)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------------------
# QMP over stdio


def _qmp_stdio(program: str, args: list[str], cwd: Path, commands: bytes) -> tuple[int, bytes]:
    """Exit status and stdout after the greeting (which names the program)."""
    proc = _start(program, args, cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(commands)
        proc.stdin.close()
        out = proc.stdout.read()
        status = proc.wait(TIMEOUT)
    finally:
        _stop(proc, signal.SIGKILL)
    text = out.decode()
    greeting, end = json.JSONDecoder().raw_decode(text)
    assert "QMP" in greeting
    return status, text[end:].encode()


QUERY_NODES = (b'{"execute":"qmp_capabilities"}\n{"execute":"query-named-block-nodes"}\n'
               b'{"execute":"quit"}\n')


@pytest.mark.parametrize("options", [
    ["--blockdev", "driver=null-co,node-name=n0,node-name=n1"],
    ["--blockdev", "driver=file,node-name=f,filename=a,,b.img"],
    ["--blockdev", "driver=null-co,node-name=a", "--blockdev", "driver=null-co,node-name=b",
     "--blockdev", "quorum,node-name=q,vote-threshold=1,children.0=a,children.1=b"],
], ids=["repeated-key", "comma-in-filename", "quorum-list"])
def test_options_seen_over_qmp_like_qsd(tmp_path: Path, options: list[str]) -> None:
    """What the options created, as query-named-block-nodes shows it (cli-probes transcripts)."""
    if "quorum" in options[-1] and "quorum" not in _drivers():
        pytest.skip("qsd has no quorum driver yet")
    (tmp_path / "a,b.img").touch()
    args = ["--chardev", "stdio,id=s0", "--monitor", "chardev=s0", *options]
    assert _qmp_stdio("qsd", args, tmp_path, QUERY_NODES) == _qmp_stdio("qemu", args, tmp_path, QUERY_NODES)


@pytest.mark.parametrize("pretty", [False, True], ids=["plain", "pretty"])
def test_stdio_monitor_like_qsd(tmp_path: Path, pretty: bool) -> None:
    commands = (b'{"execute":"qmp_capabilities"}\n{"execute":"nosuch", "id": [1]}\n'
                b'{"execute":"quit"}\n')
    monitor = "chardev=s0" + (",pretty=on" if pretty else "")
    args = ["--chardev", "stdio,id=s0", "--monitor", monitor]
    theirs = _qmp_stdio("qemu", args, tmp_path, commands)
    ours = _qmp_stdio("qsd", args, tmp_path, commands)
    assert ours == theirs
    assert theirs[0] == 0


def test_stdio_monitor_from_files(tmp_path: Path) -> None:
    """stdin and stdout redirected to regular files work too."""
    (tmp_path / "in.txt").write_bytes(b'{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n')
    with open(tmp_path / "in.txt", "rb") as stdin, open(tmp_path / "out.txt", "wb") as stdout:
        proc = _start("qsd", ["--chardev", "stdio,id=s0", "--monitor", "chardev=s0"], tmp_path,
                      stdin=stdin, stdout=stdout)
        try:
            assert proc.wait(TIMEOUT) == 0
        finally:
            _stop(proc, signal.SIGKILL)
    lines = (tmp_path / "out.txt").read_bytes().split(b"\r\n")
    assert lines[0].startswith(b'{"QMP": ') and lines[1:] == [b'{"return": {}}', b'{"return": {}}', b""]


def test_stdin_eof_does_not_stop_the_daemon(tmp_path: Path) -> None:
    proc = _start("qsd", ["--pidfile", "p.pid", "--chardev", "stdio,id=s0", "--monitor", "chardev=s0"],
                  tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b'{"execute":"qmp_capabilities"}\n')
        proc.stdin.close()
        assert _wait_pidfile(proc, tmp_path / "p.pid")
        assert proc.stdout.readline().startswith(b'{"QMP": ')
        assert proc.stdout.readline() == b'{"return": {}}\r\n'
        time.sleep(0.3)
        assert proc.poll() is None
    finally:
        _stop(proc)
    assert proc.returncode == 0


def test_no_greeting_when_startup_fails(tmp_path: Path) -> None:
    """qsd never greets before startup is complete (QSD does so only now and then, racing its exit)."""
    args = ["--chardev", "stdio,id=s0", "--monitor", "s0", "--blockdev", "driver=file,node-name=f,filename=no.img"]
    expected = ("qsd: --blockdev driver=file,node-name=f,filename=no.img: "
                "Could not open 'no.img': No such file or directory\n")
    theirs = run_to_exit("qemu", args, tmp_path, stdin=b'{"execute":"qmp_capabilities"}\n')
    assert (theirs.status, theirs.stderr) == (1, expected)
    for _ in range(3):
        ours = run_to_exit("qsd", args, tmp_path, stdin=b'{"execute":"qmp_capabilities"}\n')
        assert ours == Outcome(1, "", expected)


# ---------------------------------------------------------------------------
# sd_notify


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_sd_notify(tmp_path: Path, abstract: bool) -> None:
    name = f"@qsd-test-notify-{os.getpid()}" if abstract else str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name[1:] if abstract else name)
        listener.settimeout(TIMEOUT)
        proc = _start("qsd", ["--pidfile", "p.pid"], tmp_path, env={**ENV, "NOTIFY_SOCKET": name})
        try:
            assert listener.recv(4096) == b"READY=1"
            assert (tmp_path / "p.pid").read_text() == f"{proc.pid}\n"     # ready means ready
            os.kill(proc.pid, signal.SIGTERM)
            assert listener.recv(4096) == b"STOPPING=1"
            assert proc.wait(TIMEOUT) == 0
        finally:
            _stop(proc, signal.SIGKILL)


def test_json_argument_parser() -> None:
    """The end-of-input cases of the JSON form, in process."""
    from qsd.cli.daemon import _parse_json_argument
    from qsd.qmp.errors import QMPError

    assert _parse_json_argument('{"a": [1, {"b": null}]}  ') == {"a": [1, {"b": None}]}
    for text, message in (('{"a": 12', "JSON parse error, premature EOI"),
                          ('{"a": tru', "JSON parse error, invalid keyword 'tru'"),
                          ('{"a', "JSON parse error, stray '\"a'"),
                          ('{"a": 1}}', "Expecting at most one JSON value")):
        with pytest.raises(QMPError) as err:
            _parse_json_argument(text)
        assert err.value.desc == message


def test_qemu_opts_parser() -> None:
    from qsd.cli.daemon import parse_qemu_opts

    warnings: list[str] = []
    types = {"backend": "str", "path": "str", "server": "bool", "wait": "bool", "to": "number", "size": "size"}
    opts = parse_qemu_opts("socket,id=c,path=a,,b,server,nowait,to=0x10,size=2k,path=z,id=d", "backend",
                           types, warnings.append)
    assert opts.id == "c" and not opts.help
    assert opts.values == {"backend": "socket", "path": "z", "server": True, "wait": False, "to": 16,
                           "size": 2048}
    assert warnings == ["warning: short-form boolean option 'server' deprecated\nPlease use server=on instead",
                        "warning: short-form boolean option 'nowait' deprecated\nPlease use wait=off instead"]
    assert parse_qemu_opts("x,help,bogus=1", "backend", types, warnings.append).help


def test_nbd_server_address_is_converted(tmp_path: Path) -> None:
    """The flat address of --nbd-server becomes nbd-server-start's legacy form (unix and inet)."""
    for addr in ("addr.type=unix,addr.path=n.sock", "addr.type=inet,addr.host=127.0.0.1,addr.port=0"):
        out = run_until_ready("qsd", ["--nbd-server", addr], tmp_path)
        assert out == Outcome(0, "", "")
