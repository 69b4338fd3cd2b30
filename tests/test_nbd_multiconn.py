# SPDX-License-Identifier: GPL-2.0-or-later
"""The NBD server beyond one client: multi-conn, max-connections, listings,
block sizes and nbd-server-stop with clients attached.

Every scenario runs against the real qemu-storage-daemon and against qsd
(``storage_daemon``) and asserts the same observable behaviour; the listing
tests compare the two daemons' output byte for byte.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from test_nbd_tls import pki, require_tool_module  # noqa: F401  (fixtures)

SIZE = 8 * 1024 * 1024


def run(*argv: str | Path, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode:
        raise AssertionError(f"{argv} failed ({r.returncode}): {r.stderr}")
    return r


@pytest.fixture
def source(workdir) -> Path:
    """Random data with a hole, for copies."""
    import random

    rng = random.Random(7)
    path = workdir / "source.raw"
    with open(path, "wb") as f:
        for i in range(SIZE // (1024 * 1024)):
            f.write(bytes(1024 * 1024) if i == 3 else rng.randbytes(1024 * 1024))
    return path


def qcow2(workdir: Path, name: str = "disk.qcow2") -> Path:
    path = workdir / name
    run("qemu-img", "create", "-q", "-f", "qcow2", path, str(SIZE))
    return path


def serve(factory, workdir: Path, blockdevs: list[str], exports: list[str], server: str = "",
          objects: tuple[str, ...] = ()) -> tuple[Any, str]:
    sock = str(workdir / f"nbd{len(factory.daemons)}.sock")
    argv: list[str] = []
    for o in objects:
        argv += ["--object", o]
    for b in blockdevs:
        argv += ["--blockdev", b]
    argv += ["--nbd-server", f"addr.type=unix,addr.path={sock}" + (f",{server}" if server else "")]
    for e in exports:
        argv += ["--export", e]
    return factory(*argv, wait_for=[sock]), sock


def uri(sock: str, name: str = "disk") -> str:
    return f"nbd+unix:///{name}?socket={sock}"


# ----- listings and block sizes -------------------------------------------------------------

def _listing_daemon(factory, workdir: Path, image: Path, **kw: Any) -> tuple[Any, str]:
    return serve(factory, workdir,
                 [f"driver=file,filename={image},node-name=direct,cache.direct=on",
                  f"driver=file,filename={image},node-name=plain,read-only=on",
                  f"driver=file,filename={image},node-name=rw"],
                 ["type=nbd,id=e0,node-name=direct,name=direct,description=O_DIRECT view",
                  "type=nbd,id=e1,node-name=plain,name=ro",
                  "type=nbd,id=e2,node-name=rw,name=rw,writable=on"], **kw)


def test_listing_equals_qsd(qemu_sd, qsd, workdir, source) -> None:
    """qemu-nbd --list and nbdinfo --list print the same for both daemons:
    names, descriptions, flags (multi-conn included), block sizes (512 as
    the minimum of an O_DIRECT export) and contexts."""
    outputs = []
    for factory in (qemu_sd, qsd):
        _, sock = _listing_daemon(factory, workdir, source)
        listing = run("qemu-nbd", "--list", "-k", sock).stdout
        info = run("nbdinfo", "--list", "--json", f"nbd+unix://?socket={sock}").stdout
        info = info.replace(sock, "SOCK")
        outputs.append((listing, json.loads(info)))
    assert outputs[0] == outputs[1]
    listing, info = outputs[1]
    assert "min block: 512" in listing and "flags: 0xded ( flush fua trim zeroes df multi cache fast-zero )" in listing
    assert {e["export-name"]: e["block_size_minimum"] for e in info["exports"]} == {
        "direct": 512, "ro": 1, "rw": 1}


def test_tls_listing_equals_qsd(qemu_sd, qsd, workdir, source, pki) -> None:  # noqa: F811
    outputs = []
    for factory in (qemu_sd, qsd):
        _, sock = _listing_daemon(
            factory, workdir, source, server="tls-creds=tls0",
            objects=(f"tls-creds-x509,id=tls0,dir={pki['srv']},endpoint=server",))
        outputs.append(run("qemu-nbd", "--list", "-k", sock, "--object",
                           f"tls-creds-x509,id=c0,dir={pki['cli']},endpoint=client",
                           "--tls-creds=c0", "--tls-hostname=localhost").stdout)
        plain = run("qemu-nbd", "--list", "-k", sock, check=False)
        assert plain.returncode == 1 and "TLS" in plain.stderr
    assert outputs[0] == outputs[1]
    assert "exports available: 3" in outputs[1]


def test_multi_conn_is_not_an_option(storage_daemon, workdir, source) -> None:
    """QSD 7.2 advertises multi-conn on every export and has no option for it."""
    d, _ = serve(storage_daemon, workdir, [f"driver=file,filename={source},node-name=f0"], [])
    r = d.qmp().execute("block-export-add", {"type": "nbd", "id": "e0", "node-name": "f0",
                                            "multi-conn": "on"})
    assert r["error"] == {"class": "GenericError", "desc": "Parameter 'multi-conn' is unexpected"}


# ----- multi-conn ---------------------------------------------------------------------------

def test_nbdcopy_four_connections(storage_daemon, workdir, source) -> None:
    """nbdcopy writes a qcow2 export and reads it back over 4 connections
    each (it uses them only because the server advertises multi-conn); the
    image equals the source for qemu-img once the daemon has stopped."""
    image = qcow2(workdir)
    d, sock = serve(storage_daemon, workdir,
                    [f"driver=file,filename={image},node-name=file0",
                     "driver=qcow2,file=file0,node-name=q0"],
                    ["type=nbd,id=e0,node-name=q0,name=disk,writable=on"])
    info = json.loads(run("nbdinfo", "--json", uri(sock)).stdout)["exports"][0]
    assert info["can_multi_conn"] is True
    run("nbdcopy", "--connections=4", "--requests=8", "--flush", source, uri(sock))
    back = workdir / "back.raw"
    run("nbdcopy", "--connections=4", uri(sock), back)
    assert back.read_bytes() == source.read_bytes()
    d.stop()
    assert "Images are identical." in run("qemu-img", "compare", "-f", "qcow2", "-F", "raw",
                                          image, source).stdout
    run("qemu-img", "check", "-q", image)


def test_flush_visible_across_connections(storage_daemon, workdir, libnbd) -> None:
    """What one connection wrote is read by another at once, and after its
    flush it is in the qcow2 file for other processes (multi-conn's promise)."""
    image = qcow2(workdir)
    _, sock = serve(storage_daemon, workdir,
                    [f"driver=file,filename={image},node-name=file0",
                     "driver=qcow2,file=file0,node-name=q0"],
                    ["type=nbd,id=e0,node-name=q0,name=disk,writable=on"])
    handles = []
    for _ in range(2):
        h = libnbd.NBD()
        h.connect_uri(uri(sock))
        handles.append(h)
    writer, reader = handles
    assert writer.can_multi_conn() and reader.can_multi_conn()
    writer.pwrite(b"\x5a" * 65536, 3 * 1024 * 1024)
    assert reader.pread(65536, 3 * 1024 * 1024) == b"\x5a" * 65536
    writer.flush()
    io = run("qemu-io", "-U", "-r", "-f", "qcow2", "-c", "read -P 0x5a 3M 64k", image)
    assert "read 65536/65536 bytes" in io.stdout
    reader.pwrite(b"\xa5" * 4096, 0)
    reader.flush()
    assert writer.pread(4096, 0) == b"\xa5" * 4096
    for h in handles:
        h.shutdown()


# ----- max-connections and nbd-server-stop -------------------------------------------------

def _greeting(sock_path: str, timeout: float) -> bytes | None:
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    s.settimeout(timeout)
    try:
        return s.recv(8)
    except TimeoutError:
        return None
    finally:
        s.close()


def test_max_connections(storage_daemon, workdir, source, libnbd) -> None:
    """Beyond max-connections a client is not served (no greeting) until a
    slot frees up; then the next one is."""
    _, sock = serve(storage_daemon, workdir, [f"driver=file,filename={source},node-name=f0"],
                    ["type=nbd,id=e0,node-name=f0,name=disk"], server="max-connections=2")
    handles = []
    for _ in range(2):
        h = libnbd.NBD()
        h.connect_uri(uri(sock))
        handles.append(h)
    waiting = socket.socket(socket.AF_UNIX)
    waiting.connect(sock)
    waiting.settimeout(0.5)
    with pytest.raises(TimeoutError):
        waiting.recv(8)
    handles.pop().shutdown()
    waiting.settimeout(30)
    assert waiting.recv(8) == b"NBDMAGIC"
    waiting.close()
    assert _greeting(sock, 30) == b"NBDMAGIC"        # the slot is free again
    assert handles[0].pread(512, 0) == source.read_bytes()[:512]
    handles[0].shutdown()


def test_server_stop_with_clients(storage_daemon, workdir, source, libnbd) -> None:
    """nbd-server-stop with clients attached: it returns, the exports go
    (BLOCK_EXPORT_DELETED), clients are disconnected, and a new server can
    be started on the same socket."""
    d, sock = serve(storage_daemon, workdir, [f"driver=file,filename={source},node-name=f0"],
                    ["type=nbd,id=e0,node-name=f0,name=disk,writable=on"])
    q = d.qmp()
    handles = []
    for _ in range(2):
        h = libnbd.NBD()
        h.connect_uri(uri(sock))
        h.pwrite(b"x" * 512, 0)
        handles.append(h)
    assert q.execute("nbd-server-stop") == {"return": {}}
    assert q.wait_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "e0"}
    for h in handles:
        with pytest.raises(libnbd.Error):
            h.pread(512, 0)
    assert q.execute("query-block-exports") == {"return": []}
    addr = {"type": "unix", "data": {"path": sock}}
    assert q.execute("nbd-server-start", {"addr": addr}) == {"return": {}}
    assert q.execute("block-export-add", {"type": "nbd", "id": "e1", "node-name": "f0",
                                          "name": "disk"}) == {"return": {}}
    h = libnbd.NBD()
    h.connect_uri(uri(sock))
    assert h.pread(512, 0) == b"x" * 512
    h.shutdown()
