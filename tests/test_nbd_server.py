# SPDX-License-Identifier: GPL-2.0-or-later
"""The NBD server against real clients, with QSD 7.2 as the oracle.

qemu-img, qemu-io, nbdinfo, nbdcopy, nbdsh and libnbd talk to an NBDServer
running in a background thread; where QSD defines the output, the real
qemu-storage-daemon serves the same image and the outputs must match.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nbdhelpers import (
    FailingNode,
    FileNode,
    RawClient,
    ServerThread,
    import_libnbd,
    make_x509,
    serve,
    uri,
)

MiB = 1 << 20
IMAGE_SIZE = 64 * MiB

pytestmark = pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None
                                or shutil.which("nbdinfo") is None,
                                reason="needs qemu-storage-daemon and libnbd-bin")


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    if check and proc.returncode:
        raise AssertionError(f"{cmd} failed: {proc.stdout}{proc.stderr}")
    return proc


def make_image(path: Path) -> Path:
    """64 MiB, sparse: data at 0 (1 MiB), 4 MiB (64 KiB), 10 MiB (300000 bytes)."""
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
        f.seek(0)
        f.write(b"\x5a" * MiB)
        f.seek(4 * MiB)
        f.write(b"\x11" * 65536)
        f.seek(10 * MiB)
        f.write(os.urandom(300000))
    return path


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "disk.raw")


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
    return str(request.param)


@pytest.fixture
def served(tmp_path: Path, image: Path) -> Iterator[tuple[ServerThread, str, Path]]:
    """Our server with "ro" (the image, with a description) and "rw" (a copy)."""
    rw = tmp_path / "rw.raw"
    shutil.copy(image, rw)
    with serve(tmp_path) as (srv, sock):
        srv.add("ro", FileNode(str(image), read_only=True), description="read-only view")
        srv.add("rw", FileNode(str(rw)), writable=True)
        yield srv, sock, rw


@pytest.fixture
def qsd(tmp_path: Path, image: Path) -> Iterator[str]:
    """The real QSD serving the same two exports; yields its socket."""
    qdir = tmp_path / "qsd"
    qdir.mkdir()
    rw = qdir / "rw.raw"
    shutil.copy(image, rw)
    sock = str(qdir / "nbd.sock")
    proc = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,node-name=f0,filename={image},read-only=on",
         "--blockdev", f"driver=file,node-name=f1,filename={rw}",
         "--nbd-server", f"addr.type=unix,addr.path={sock}",
         "--export", "type=nbd,id=e0,node-name=f0,name=ro,description=read-only view",
         "--export", "type=nbd,id=e1,node-name=f1,name=rw,writable=on"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < deadline, "QSD did not start"
            time.sleep(0.02)
        yield sock
    finally:
        proc.terminate()
        proc.wait(10)


def normalise(text: str, sock: str) -> str:
    return text.replace(sock, "SOCK")


# ----- differential against QSD -------------------------------------------

def test_nbdinfo_list_matches_qsd(served: Any, qsd: str) -> None:
    _, sock, _ = served
    ours = run("nbdinfo", "--list", f"nbd+unix:///?socket={sock}").stdout
    theirs = run("nbdinfo", "--list", f"nbd+unix:///?socket={qsd}").stdout
    assert normalise(ours, sock) == normalise(theirs, qsd)
    assert "can_multi_conn: true" in ours and "block_size_maximum: 33554432" in ours


def test_nbdinfo_map_matches_qsd(served: Any, qsd: str) -> None:
    _, sock, _ = served
    for name in ("rw", "ro"):
        ours = run("nbdinfo", "--map", uri(sock, name)).stdout
        assert ours == run("nbdinfo", "--map", uri(qsd, name)).stdout
    assert ours.splitlines()[1].split() == ["1048576", "3145728", "3", "hole,zero"]


def test_unknown_export_matches_qsd(served: Any, qsd: str) -> None:
    _, sock, _ = served
    ours = run("nbdinfo", uri(sock, "nosuch"), check=False)
    theirs = run("nbdinfo", uri(qsd, "nosuch"), check=False)
    assert (ours.returncode, ours.stderr) == (theirs.returncode, theirs.stderr)
    assert "No such file or directory for export: nosuch" in ours.stderr


def test_qemu_io_readonly_export_matches_qsd(served: Any, qsd: str) -> None:
    _, sock, _ = served
    ours = run("qemu-io", "-f", "raw", "-c", "write 0 4k", uri(sock, "ro"), check=False)
    theirs = run("qemu-io", "-f", "raw", "-c", "write 0 4k", uri(qsd, "ro"), check=False)
    assert ours.returncode == theirs.returncode == 1
    assert normalise(ours.stderr, sock) == normalise(theirs.stderr, qsd)


def test_raw_handshake_replies_match_qsd(served: Any, qsd: str) -> None:
    """Option replies byte for byte, including error texts."""
    def talk(sock: str) -> list[Any]:
        c = RawClient(sock)
        out: list[Any] = [c.greeting]
        name = b"ro"
        for option, data in [
            (3, b""), (3, b"x"), (99, b"zz"), (5, b""), (8, b"a"),
            (6, struct.pack(">I", 6) + b"nosuch" + struct.pack(">H", 0)),
            (6, struct.pack(">I", 2) + name + struct.pack(">HHH", 2, 1, 3)),
            (10, struct.pack(">I", 2) + name + struct.pack(">I", 0)),
            (9, struct.pack(">I", 2) + name + struct.pack(">I", 0)),
            (8, b""), (8, b""),
            (9, struct.pack(">I", 2) + name + struct.pack(">II", 1, 5) + b"base:"),
            (10, struct.pack(">I", 2) + name + struct.pack(">II", 1, 15) + b"base:allocation"),
            (9, struct.pack(">I", 2) + name + struct.pack(">II", 2, 4) + b"base"),
            (7, struct.pack(">I", 2) + name + struct.pack(">H", 0)),
        ]:
            c.option(option, data)
            out.append(c.option_replies())
        c.close()
        return out
    assert talk(served[1]) == talk(qsd)


def test_transmission_errors_match_qsd(served: Any, qsd: str) -> None:
    """Structured error replies for invalid requests, as QSD words them."""
    def talk(sock: str) -> list[Any]:
        c = RawClient(sock)
        c.go(b"rw", meta=(b"base:allocation",))
        out = []
        for rtype, offset, length, flags in [
            (0, IMAGE_SIZE - 512, 1024, 0), (0, 0, 512, 2), (0, 0, 512, 0x40), (9, 0, 0, 0),
            (4, IMAGE_SIZE - 512, 4096, 0), (6, 0, 512, 4), (7, 0, 0, 0),
            (7, IMAGE_SIZE, 512, 0), (3, 0, 0, 0), (5, 0, 4096, 0), (0, 0, 0, 0),
            (7, 0, IMAGE_SIZE, 8), (7, 0, 8 * MiB, 0),
        ]:
            c.request(rtype, offset, length, flags, handle=42)
            out.append(c.reply())
        c.close()
        return out
    assert talk(served[1]) == talk(qsd)


# ----- real clients ---------------------------------------------------------

def test_qemu_img_compare(served: Any, image: Path) -> None:
    _, sock, _ = served
    assert "identical" in run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image),
                              uri(sock, "ro")).stdout
    info = run("qemu-img", "info", "--output=json", uri(sock, "ro")).stdout
    assert '"virtual-size": 67108864' in info


QEMU_IO_SCRIPT = [
    "write -P 0x11 0 64k",
    "write -P 0x22 1000 3000",
    "write -f -P 0x33 2M 1M",
    "write -z 4M 128k",
    "write -z -u 5M 64k",
    "discard 6M 1M",
    "aio_write -P 0x44 8M 4k",
    "aio_write -P 0x55 8196k 4k",
    "aio_write -P 0x66 8200k 1M",
    "aio_flush",
    "writev -P 0x77 9M 4k 4k 512",
    "flush",
    "write -P 0x88 63M 1M",
    "read -P 0x88 63M 1M",
    "read -P 0x22 1000 3000",
    "readv -P 0x77 9M 4k 4k",
]


def test_qemu_io_matches_local_file(tmp_path: Path, image: Path, loop_kind: str) -> None:
    """The same qemu-io script through our export and on a local copy
    leaves identical images."""
    local = tmp_path / "local.raw"
    remote = tmp_path / "remote.raw"
    shutil.copy(image, local)
    shutil.copy(image, remote)
    args = [a for cmd in QEMU_IO_SCRIPT for a in ("-c", cmd)]
    run("qemu-io", "-f", "raw", *args, str(local))
    with serve(tmp_path, use_uvloop=loop_kind == "uvloop") as (srv, sock):
        node = FileNode(str(remote))
        srv.add("rw", node, writable=True)
        out = run("qemu-io", "-f", "raw", *args, uri(sock, "rw")).stdout
        assert "Pattern verification failed" not in out
        assert node.flushes >= 2
    assert local.read_bytes() == remote.read_bytes()


def test_nbdcopy_both_directions(served: Any, image: Path, tmp_path: Path) -> None:
    _, sock, rw = served
    out = tmp_path / "out.raw"
    run("nbdcopy", uri(sock, "ro"), str(out))
    assert out.read_bytes() == image.read_bytes()
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(IMAGE_SIZE)
        f.seek(20 * MiB)
        f.write(os.urandom(3 * MiB + 12345))
    run("nbdcopy", "--connections=4", "--requests=16", str(src), uri(sock, "rw"))
    assert rw.read_bytes() == src.read_bytes()


def test_nbdsh(served: Any) -> None:
    _, sock, rw = served
    env = dict(os.environ, PATH="/usr/bin:" + os.environ["PATH"])
    proc = subprocess.run(
        ["nbdsh", "-u", uri(sock, "rw"), "-c",
         'h.pwrite(b"X" * 512, 4096); print(h.pread(4, 4096)); h.flush()'],
        capture_output=True, text=True, timeout=30, env=env, check=False)
    assert proc.stdout.strip() in ("b'XXXX'", "bytearray(b'XXXX')"), proc.stderr
    with open(rw, "rb") as f:
        f.seek(4096)
        assert f.read(512) == b"X" * 512


def connect_libnbd(sock: str, name: str, meta: bool = True) -> Any:
    nbd = import_libnbd()
    h = nbd.NBD()
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri(sock, name))
    return h


def test_libnbd_flags_and_block_status(served: Any) -> None:
    nbd = import_libnbd()
    _, sock, _ = served
    h = connect_libnbd(sock, "rw")
    assert h.get_structured_replies_negotiated()
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    assert (h.can_fua(), h.can_flush(), h.can_trim(), h.can_zero(), h.can_fast_zero(),
            h.can_df(), h.can_multi_conn(), h.can_cache(), h.is_read_only()) == (
        True, True, True, True, True, True, True, True, False)
    h.shutdown()
    h = connect_libnbd(sock, "ro")
    assert h.is_read_only() and not h.can_trim() and not h.can_zero()
    seen: list[Any] = []

    def extents(metacontext: str, offset: int, entries: list[int], err: Any) -> int:
        seen.append((offset, entries))
        return 0

    h.block_status(8 * MiB, 0, extents)
    assert seen == [(0, [MiB, 0, 3 * MiB, 3, 65536, 0, 4 * MiB - 65536, 3])]
    seen.clear()
    h.block_status(8 * MiB, 2 * MiB, extents, nbd.CMD_FLAG_REQ_ONE)
    assert seen == [(2 * MiB, [2 * MiB, 3])]
    h.shutdown()


def test_libnbd_structured_read_chunks(served: Any, image: Path) -> None:
    """Big reads send holes as hole chunks; DF reads one data chunk."""
    nbd = import_libnbd()
    _, sock, _ = served
    h = connect_libnbd(sock, "ro")
    chunks: list[Any] = []

    def chunk(subbuf: bytes, offset: int, status: int, err: Any) -> int:
        chunks.append((status, offset, len(subbuf)))
        return 0

    buf = h.pread_structured(8 * MiB, 0, chunk)
    assert buf == image.read_bytes()[:8 * MiB]
    assert chunks == [(nbd.READ_DATA, 0, MiB), (nbd.READ_HOLE, MiB, 3 * MiB),
                      (nbd.READ_DATA, 4 * MiB, 65536),
                      (nbd.READ_HOLE, 4 * MiB + 65536, 4 * MiB - 65536)]
    chunks.clear()
    h.pread_structured(2 * MiB, 0, chunk, nbd.CMD_FLAG_DF)
    assert chunks == [(nbd.READ_DATA, 0, 2 * MiB)]
    h.shutdown()


def test_libnbd_many_in_flight(served: Any, image: Path) -> None:
    """Dozens of concurrent requests on one connection, replies matched."""
    nbd = import_libnbd()
    _, sock, rw = served
    h = connect_libnbd(sock, "rw")
    data = image.read_bytes()
    bufs = []
    for i in range(64):
        offset = (i * 37 * 4096 + 512 * i) % (IMAGE_SIZE - 65536)
        length = 4096 * (1 + i % 16)
        buf = nbd.Buffer(length)
        bufs.append((offset, buf, h.aio_pread(buf, offset)))
    wbufs = [nbd.Buffer.from_bytearray(bytearray([i]) * 8192) for i in range(32)]
    writes = [h.aio_pwrite(buf, 30 * MiB + i * 8192) for i, buf in enumerate(wbufs)]
    while h.aio_in_flight():
        h.poll(-1)
    for offset, buf, cookie in bufs:
        assert h.aio_command_completed(cookie)
        assert buf.to_bytearray() == data[offset:offset + buf.size()]
    for cookie in writes:
        assert h.aio_command_completed(cookie)
    h.flush()
    h.shutdown()
    with open(rw, "rb") as f:
        f.seek(30 * MiB)
        assert f.read(32 * 8192) == b"".join(bytes([i]) * 8192 for i in range(32))


def test_libnbd_write_variants(served: Any) -> None:
    nbd = import_libnbd()
    _, sock, _rw = served
    h = connect_libnbd(sock, "rw")
    h.pwrite(b"\x99" * 8192, 12 * MiB, nbd.CMD_FLAG_FUA)
    h.zero(4096, 12 * MiB, nbd.CMD_FLAG_NO_HOLE)
    h.zero(MiB, 0, nbd.CMD_FLAG_FAST_ZERO)
    h.trim(65536, 4 * MiB, nbd.CMD_FLAG_FUA)
    h.cache(MiB, 0)
    h.flush()
    assert h.pread(8192, 12 * MiB) == bytes(4096) + b"\x99" * 4096
    assert h.pread(MiB, 0) == bytes(MiB)
    h.shutdown()


def test_libnbd_readonly_errors(served: Any) -> None:
    nbd = import_libnbd()
    _, sock, _ = served
    h = connect_libnbd(sock, "ro")
    h.set_strict_mode(0)            # let the server see what a client should not send
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"x" * 512, 0)
    assert e.value.errno == "EPERM"
    with pytest.raises(nbd.Error) as e:
        h.pread(1024, IMAGE_SIZE - 512)
    assert e.value.errno == "EINVAL"
    assert h.pread(512, 0) == b"\x5a" * 512   # still connected
    h.shutdown()


def test_driver_errors_reach_the_client(tmp_path: Path, image: Path) -> None:
    nbd = import_libnbd()
    with serve(tmp_path) as (srv, sock):
        srv.add("bad", FailingNode(str(image), fail_from=MiB), writable=True)
        h = connect_libnbd(sock, "bad")
        assert h.pread(4096, 0) == b"\x5a" * 4096
        with pytest.raises(nbd.Error) as e:
            h.pread(4096, MiB)
        assert e.value.errno == "EIO"
        with pytest.raises(nbd.Error) as e:
            h.pwrite(b"x" * 4096, 2 * MiB)
        assert e.value.errno == "ENOSPC"
        assert h.pread(512, 512) == b"\x5a" * 512
        h.shutdown()
        # a structured read that fails part way keeps the chunks before it
        srv.add("late", FailingNode(str(image), fail_from=4 * MiB + 100))
        raw = RawClient(sock)
        raw.go(b"late")
        raw.request(0, 0, 8 * MiB, handle=5)
        chunks = raw.reply()
        assert [(flags, ctype) for flags, ctype, _, _ in chunks] == [(0, 1), (0, 2), (1, 0x8002)]
        assert struct.unpack(">QI", chunks[1][3]) == (MiB, 3 * MiB)
        error, mlen = struct.unpack_from(">IH", chunks[2][3])
        assert (error, chunks[2][3][6:6 + mlen]) == (5, b"Input/output error")
        assert struct.unpack(">Q", chunks[2][3][-8:]) == (4 * MiB,)


def test_page_cache_miss_goes_through_the_pool(tmp_path: Path, image: Path) -> None:
    with serve(tmp_path) as (srv, sock):
        srv.add("ro", FileNode(str(image), read_only=True))
        h = connect_libnbd(sock, "ro", meta=False)
        data = image.read_bytes()
        for i in range(4):
            fd = os.open(image, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
            offset = 10 * MiB + i * 4096 + 7
            assert h.pread(100000, offset) == data[offset:offset + 100000]
        h.shutdown()


def test_node_is_looked_up_per_request(tmp_path: Path, image: Path) -> None:
    other = tmp_path / "other.raw"
    other.write_bytes(b"\x42" * IMAGE_SIZE)
    with serve(tmp_path) as (srv, sock):
        cfg = srv.add("x", FileNode(str(image), read_only=True))
        h = connect_libnbd(sock, "x", meta=False)
        assert h.pread(4, 0) == b"\x5a" * 4
        cfg.edge.child = FileNode(str(other), read_only=True)
        assert h.pread(4, 0) == b"\x42" * 4
        h.shutdown()


def test_tls(tmp_path: Path, image: Path, loop_kind: str) -> None:
    """With a TLS context the server insists on STARTTLS (FORCEDTLS, refusing
    options before it as QSD does), and libnbd and QEMU get through it."""
    certs = tmp_path / "pki"
    certs.mkdir()
    ctx = make_x509(certs)
    srv = ServerThread(use_uvloop=loop_kind == "uvloop", tls_creds=ctx)
    sock = str(tmp_path / "tls.sock")
    try:
        srv.start({"type": "unix", "path": sock})
        srv.add("x", FileNode(str(image), read_only=True))
        plain = run("nbdinfo", uri(sock, "x"), check=False)
        assert plain.returncode == 1
        assert "opt_go request: Operation not supported for export: x" in plain.stderr
        client = RawClient(sock)
        client.option(3)
        assert client.option_replies() == [(3, 0x80000005, b"Option 0x3 not permitted before TLS")]
        client.close()
        tls_uri = f"nbds+unix:///x?socket={sock}&tls-certificates={certs}"
        assert run("nbdinfo", "--map", tls_uri).stdout.splitlines()[:2] == [
            "         0     1048576    0  data", "   1048576     3145728    3  hole,zero"]
        out = tmp_path / "copy.raw"
        run("nbdcopy", "--connections=4", "--requests=1", tls_uri, str(out))
        assert out.read_bytes() == image.read_bytes()
        assert "identical" in run(
            "qemu-img", "compare", "--object",
            f"tls-creds-x509,id=tls0,dir={certs},endpoint=client",
            f"driver=raw,file.driver=file,file.filename={image}", "--image-opts",
            f"driver=nbd,server.type=unix,server.path={sock},export=x,tls-creds=tls0,"
            "tls-hostname=localhost").stdout
    finally:
        srv.close()


# ----- listeners, connections, life cycle -----------------------------------

def test_inet_and_fd_listeners(tmp_path: Path, image: Path) -> None:
    srv = ServerThread()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    try:
        srv.start({"type": "inet", "host": "127.0.0.1", "port": "0"})
        srv.start({"type": "fd", "str": str(lsock.fileno())})
        srv.add("x", FileNode(str(image), read_only=True))
        for host, port in srv.server.addresses:
            out = run("nbdinfo", "--size", f"nbd://{host}:{port}/x").stdout
            assert out.strip() == str(IMAGE_SIZE)
    finally:
        srv.close()


def test_listen_errors_like_qsd(tmp_path: Path) -> None:
    from qsd.qmp.errors import GenericError
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    srv = ServerThread()
    try:
        cases = [
            ({"type": "inet", "host": "127.0.0.1", "port": str(busy.getsockname()[1])},
             "Failed to find an available port: Address already in use"),
            ({"type": "unix", "path": str(tmp_path / "no" / "x.sock")},
             f"Failed to bind socket to {tmp_path / 'no' / 'x.sock'}: No such file or directory"),
            ({"type": "fd", "str": "abc"}, "Unable to parse FD number abc"),
            ({"type": "fd", "str": "999"}, "File descriptor '999' is not a socket"),
        ]
        for addr, message in cases:
            with pytest.raises(GenericError) as e:
                srv.start(addr)
            assert e.value.desc == message
    finally:
        srv.close()
        busy.close()


def test_unix_socket_replaced_and_removed(tmp_path: Path) -> None:
    path = tmp_path / "nbd.sock"
    path.write_text("stale")
    srv = ServerThread()
    srv.start({"type": "unix", "path": str(path)})
    assert path.is_socket()
    srv.close()
    assert not path.exists()


def test_max_connections_holds_back_extra_clients(tmp_path: Path, image: Path) -> None:
    with serve(tmp_path, max_connections=1) as (srv, sock):
        srv.add("x", FileNode(str(image), read_only=True))
        first = RawClient(sock)
        second = socket.socket(socket.AF_UNIX)
        second.settimeout(0.3)
        second.connect(sock)
        with pytest.raises(TimeoutError):
            second.recv(18)
        first.close()
        second.settimeout(5)
        assert second.recv(18) == b"NBDMAGICIHAVEOPT\x00\x03"
        second.close()


def test_clients_count_and_last_client_hook(tmp_path: Path, image: Path) -> None:
    left: list[str] = []
    with serve(tmp_path) as (srv, sock):
        srv.add("x", FileNode(str(image), read_only=True), on_last_client=lambda: left.append("x"))
        assert srv.sync(srv.server.has_export, "x")
        a, b = RawClient(sock), RawClient(sock)
        a.go(b"x")
        b.go(b"x")
        assert srv.sync(srv.server.clients, "x") == 2
        a.request(2)                        # NBD_CMD_DISC
        a.close()
        wait_for(lambda: srv.sync(srv.server.clients, "x") == 1)
        assert left == []
        b.close()                           # hard disconnect
        wait_for(lambda: left == ["x"])
        assert srv.sync(srv.server.clients, "x") == 0


def test_remove_export_drops_its_clients(tmp_path: Path, image: Path) -> None:
    with serve(tmp_path) as (srv, sock):
        srv.add("x", FileNode(str(image), read_only=True))
        srv.add("y", FileNode(str(image), read_only=True))
        cx, cy = RawClient(sock), RawClient(sock)
        cx.go(b"x")
        cy.go(b"y")
        srv.call(srv.server.remove_export, "x")
        assert not srv.sync(srv.server.has_export, "x")
        with pytest.raises((EOFError, ConnectionResetError, BrokenPipeError)):
            cx.request(0, 0, 512)
            cx.reply(512)
        cy.request(0, 0, 512, handle=3)
        assert cy.reply()[0][1:3] == (1, 3)
        assert "nosuch" not in run("nbdinfo", "--list", f"nbd+unix:///?socket={sock}").stdout
        assert run("nbdinfo", uri(sock, "x"), check=False).returncode == 1


def test_stop_closes_connections(tmp_path: Path, image: Path) -> None:
    srv = ServerThread()
    sock = str(tmp_path / "s.sock")
    srv.start({"type": "unix", "path": sock})
    srv.add("x", FileNode(str(image), read_only=True))
    client = RawClient(sock)
    client.go(b"x")
    handshaking = RawClient(sock)
    srv.close()
    for c in (client, handshaking):
        with pytest.raises((EOFError, ConnectionResetError)):
            c.recv(1)


def wait_for(cond: Any, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# ----- bad clients --------------------------------------------------------

BAD_CLIENTS = {
    "garbage": lambda c: c.sock.sendall(os.urandom(5000)),
    "bad option magic": lambda c: c.sock.sendall(b"\0" * 16),
    "huge option": lambda c: c.sock.sendall(struct.pack(">QII", 0x49484156454F5054, 7,
                                                        0xFFFFFFFF)),
    "truncated option": lambda c: c.sock.sendall(struct.pack(">QII", 0x49484156454F5054, 7,
                                                             100) + b"abc"),
    "bad request magic": lambda c: (c.go(b"x"), c.sock.sendall(b"\xff" * 28)),
    "truncated request": lambda c: (c.go(b"x"), c.sock.sendall(b"\x25\x60\x95\x13\0\0")),
    "truncated write": lambda c: (c.go(b"x"), c.request(1, 0, 65536, data=b"x" * 1000)),
    "huge write": lambda c: (c.go(b"x"), c.request(1, 0, 0xFFFFFFFF, data=b"x" * 1000)),
    "reads then vanish": lambda c: (c.go(b"x"), [c.request(0, 0, 4 * MiB, handle=i)
                                                  for i in range(16)]),
}


@pytest.mark.parametrize("behaviour", list(BAD_CLIENTS))
def test_bad_client_does_not_disturb_others(tmp_path: Path, image: Path, behaviour: str,
                                            caplog: pytest.LogCaptureFixture) -> None:
    with serve(tmp_path) as (srv, sock):
        srv.add("x", FileNode(str(image)), writable=True)
        good = connect_libnbd(sock, "x")
        bad = RawClient(sock)
        BAD_CLIENTS[behaviour](bad)
        bad.close()
        assert good.pread(4096, 0) == b"\x5a" * 4096
        wait_for(lambda: srv.sync(srv.server.clients, "x") == 1)
        assert good.pread(4096, 4 * MiB) == b"\x11" * 4096
        good.shutdown()
    if behaviour in ("garbage", "bad option magic", "huge option", "bad request magic",
                     "huge write"):
        assert any(r.name == "qsd.export.nbd" for r in caplog.records)
