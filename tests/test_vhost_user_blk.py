# SPDX-License-Identifier: GPL-2.0-or-later
"""The vhost-user-blk export, against the real QSD and a real QEMU guest.

* Differential: the same front-end conversation (tests/guest/vhost_client.py)
  with qemu-storage-daemon 7.2 and with qsd: features, config space, and
  the status, data and used length of a battery of virtio-blk requests
  (misaligned, out of range, odd framing, discard/write-zeroes variants,
  read-only exports); the images end up identical.
* Option errors as QSD reports them (command line and QMP).
* Bad front-ends (malformed messages, descriptors outside guest memory,
  descriptor loops, legacy negotiation) are logged and dropped, and the
  next front-end is served.
* qemu-system-x86_64 (TCG) boots from the export, reads the whole disk
  (md5 equal to the host's), writes, and a second guest reconnects; and a
  2-queue device with 2 vCPUs.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from guest import vhost_client as vc
from guest.mkguest import QEMU, build_guest, boot

MiB = 1 << 20
SIZE = 64 * MiB
SECTORS = SIZE // 512


def make_image(path: Path, fmt: str = "qcow2", size: int = SIZE) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)], check=True)
    if size < SIZE:
        return
    cmds = ["write -P 0x11 0 1M", "write -P 0x22 3M 64k", "write -P 0x33 33M 1M",
            f"write -P 0x44 {size - 4096} 4096"]
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    subprocess.run([*args, str(path)], check=True, capture_output=True)


def host_read(path: Path, fmt: str = "qcow2", start: int = 0, length: int | None = None) -> bytes:
    """Guest-visible bytes of an image, as qemu-img converts them."""
    raw = path.with_suffix(".raw-copy")
    subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(path), str(raw)], check=True)
    try:
        with open(raw, "rb") as f:
            f.seek(start)
            return f.read() if length is None else f.read(length)
    finally:
        raw.unlink()


def host_md5(path: Path, fmt: str = "qcow2", start: int = 0, length: int | None = None) -> str:
    return hashlib.md5(host_read(path, fmt, start, length)).hexdigest()


def export_args(img: Path, sock: Path, extra: str = "", fmt: str = "qcow2", ro: bool = False) -> list[str]:
    ro_opt = ",read-only=on" if ro else ""
    return ["--blockdev", f"driver=file,node-name=f0,filename={img}{ro_opt}",
            "--blockdev", f"driver={fmt},node-name=d0,file=f0{ro_opt}",
            "--export", f"type=vhost-user-blk,id=v0,node-name=d0,addr.type=unix,addr.path={sock}{extra}"]


# ----- the differential front-end conversation -----------------------------------------------

#: Bits QSD offers for features qsd leaves out: VHOST_F_LOG_ALL (migration dirty log) and
#: VIRTIO_F_NOTIFY_ON_EMPTY (legacy), and protocol features for migration/postcopy,
#: host notifiers and passing fds back (LOG_SHMFD, PAGEFAULT, SLAVE_SEND_FD, HOST_NOTIFIER).
QSD_ONLY_FEATURES = (1 << 26) | (1 << 24)
QSD_ONLY_PROTOCOL = (1 << 1) | (1 << 8) | (1 << 10) | (1 << 11)


def wz(sector: int, num: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, num, flags)


def battery(c: vc.VhostUserClient, q: vc.Queue, lbs: int) -> list[tuple]:
    """Requests whose outcome (status, data, used length) both daemons must agree on."""
    s = lbs // 512
    last = SECTORS - s
    out: list[tuple] = []

    def run(name: str, *args, **kw) -> None:
        status, data, used = c.blk(q, *args, **kw)
        out.append((name, status, hashlib.md5(data).hexdigest(), used))

    run("get-id", vc.T_GET_ID, in_len=20)
    run("get-id-short", vc.T_GET_ID, in_len=8)
    run("read-0", vc.T_IN, 0, in_len=lbs)
    run("read-big", vc.T_IN, 0, in_len=128 * 1024)
    run("read-last", vc.T_IN, last, in_len=lbs)
    run("read-past-end", vc.T_IN, SECTORS, in_len=lbs)
    run("read-straddle", vc.T_IN, last, in_len=2 * lbs)
    run("read-misaligned-sector", vc.T_IN, 1, in_len=lbs)
    run("read-partial-block", vc.T_IN, 0, in_len=512 if lbs > 512 else 256)
    run("read-split-header", vc.T_IN, 2 * s, in_len=lbs, split_header=True)
    run("write", vc.T_OUT, 16 * s, out=b"\xab" * (2 * lbs))
    run("read-back", vc.T_IN, 16 * s, in_len=2 * lbs)
    run("write-past-end", vc.T_OUT, SECTORS, out=b"\xcd" * lbs)
    run("write-misaligned", vc.T_OUT, 1, out=b"\xcd" * lbs)
    run("flush", vc.T_FLUSH)
    run("flush-odd-sector", vc.T_FLUSH, 12345)
    run("discard", vc.T_DISCARD, out=wz(64 * s, 8 * s))
    run("discard-unmap-flag", vc.T_DISCARD, out=wz(64 * s, 8 * s, 1))
    run("discard-bad-flag", vc.T_DISCARD, out=wz(64 * s, 8 * s, 4))
    run("discard-two-segments", vc.T_DISCARD, out=wz(64 * s, s) + wz(80 * s, s))
    run("discard-short-segment", vc.T_DISCARD, out=wz(64 * s, s)[:8])
    run("discard-too-long", vc.T_DISCARD, out=wz(0, 32768 + s))
    run("discard-past-end", vc.T_DISCARD, out=wz(last, 2 * s))
    run("write-zeroes", vc.T_WRITE_ZEROES, out=wz(2048, 16 * s))
    run("write-zeroes-unmap", vc.T_WRITE_ZEROES, out=wz(4096, 16 * s, 1))
    run("write-zeroes-bad-flag", vc.T_WRITE_ZEROES, out=wz(2048, s, 2))
    run("write-zeroes-misaligned", vc.T_WRITE_ZEROES, out=wz(1, s))
    run("read-zeroed", vc.T_IN, 2048, in_len=16 * lbs)
    run("get-lifetime", 10, in_len=8)
    run("unknown-type", 99)
    # Linux-style framing: the data in several descriptors
    segs: list[tuple[bytes | int, bool]] = [(struct.pack("<IIQ", vc.T_IN, 0, 6144), False),
                                           (4096, True), (4096, True), (lbs, True), (1, True)]
    mark = c.mem._next
    ids, addrs = q.submit(segs)
    (used,) = q.wait_used()
    data = b"".join(c.mem.read(a, n) for a, (n, _) in zip(addrs[1:4], segs[1:4]))  # type: ignore[misc]
    out.append(("read-scattered", c.mem.read(addrs[-1], 1)[0], hashlib.md5(data).hexdigest(), used.length))
    q.free.extend(ids)
    c.mem._next = mark
    return out


def conversation(path: Path, lbs: int) -> dict:
    with vc.VhostUserClient(str(path)) as c:
        offered = c.u64(vc.GET_FEATURES)
        pf = c.u64(vc.GET_PROTOCOL_FEATURES)
        c.call(vc.SET_PROTOCOL_FEATURES, struct.pack("<Q", pf & (vc.PF_MQ | vc.PF_REPLY_ACK | vc.PF_CONFIG)))
        c.protocol = pf & (vc.PF_MQ | vc.PF_REPLY_ACK | vc.PF_CONFIG)
        result = {
            "features": offered & ~QSD_ONLY_FEATURES,
            "protocol": pf & ~QSD_ONLY_PROTOCOL,
            "queues": c.u64(vc.GET_QUEUE_NUM),
            "slots": c.u64(vc.GET_MAX_MEM_SLOTS),
            "config": c.get_config(60),
            "config-sizes": [len(c.get_config(n)) for n in (1, 8, 59, 61, 64)],
        }
        # the guest's cache mode (the only writable field), and a write elsewhere
        result["set-wce"] = c.call(vc.SET_CONFIG, struct.pack("<III", 32, 1, 0) + b"\1", need_reply=True)
        result["wce"] = c.get_config(60)[32]
        result["set-wce-0"] = c.call(vc.SET_CONFIG, struct.pack("<III", 32, 1, 0) + b"\0", need_reply=True)
        c.call(vc.SET_OWNER)
        want = offered & (vc.F_VERSION_1 | vc.F_PROTOCOL_FEATURES | vc.F_EVENT_IDX | vc.F_INDIRECT | 0x7FFF)
        c.call(vc.SET_FEATURES, struct.pack("<Q", want))
        c.features = want
        c.call(vc.SET_MEM_TABLE, c.mem_table_payload(), (c.mem.fd,), need_reply=True)
        q = c.setup_queue(0)
        result["requests"] = battery(c, q, lbs)
        result["vring-base"] = c.get_vring_base(0)
        # a read-only field: QSD drops the front-end
        c.send(vc.SET_CONFIG, struct.pack("<III", 0, 8, 0) + bytes(8), flags=vc.VERSION | vc.F_NEED_REPLY)
        result["set-capacity-drops"] = c.wait_closed()
    return result


@pytest.mark.parametrize("writable, lbs, queues", [(True, 512, 1), (False, 512, 1), (True, 4096, 3)],
                         ids=["rw-512", "ro-512", "rw-4096-3q"])
def test_conversation_same_as_qsd(qemu_sd, qsd, workdir: Path, writable: bool, lbs: int, queues: int) -> None:
    results = {}
    images = {}
    for name, factory in (("qemu", qemu_sd), ("qsd", qsd)):
        img = workdir / f"{name}.qcow2"
        make_image(img)
        images[name] = img
        sock = workdir / f"{name}.sock"
        extra = f",logical-block-size={lbs},num-queues={queues}" + (",writable=on" if writable else "")
        d = factory(*export_args(img, sock, extra, ro=not writable), wait_for=[sock])
        results[name] = conversation(sock, lbs)
        d.stop()
    theirs, ours = results["qemu"], results["qsd"]
    assert ours.pop("requests") == theirs.pop("requests")
    assert ours == theirs
    cmp = subprocess.run(["qemu-img", "compare", str(images["qemu"]), str(images["qsd"])],
                         capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    check = subprocess.run(["qemu-img", "check", str(images["qsd"])], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


# ----- option errors --------------------------------------------------------------------------

ERROR_CASES = {
    "no-addr": "",
    "lbs-not-power-of-2": ",addr.type=unix,addr.path=x.sock,logical-block-size=1000",
    "lbs-too-small": ",addr.type=unix,addr.path=x.sock,logical-block-size=256",
    "lbs-too-big": ",addr.type=unix,addr.path=x.sock,logical-block-size=4194304",
    "lbs-negative": ",addr.type=unix,addr.path=x.sock,logical-block-size=-512",
    "zero-queues": ",addr.type=unix,addr.path=x.sock,num-queues=0",
    "negative-queues": ",addr.type=unix,addr.path=x.sock,num-queues=-1",
    "lbs-before-queues": ",addr.type=unix,addr.path=x.sock,logical-block-size=1000,num-queues=0",
    "inet": ",addr.type=inet,addr.host=127.0.0.1,addr.port=1",
    "vsock": ",addr.type=vsock,addr.cid=1,addr.port=2",
    "fd-not-socket": ",addr.type=fd,addr.str=0",
    "fd-not-open": ",addr.type=fd,addr.str=99",
    "bad-dir": ",addr.type=unix,addr.path=/nonexistent/x.sock",
    "iothread": ",addr.type=unix,addr.path=x.sock,iothread=nope",
    "ro-node-writable": ",addr.type=unix,addr.path=x.sock,writable=on,logical-block-size=1000",
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_option_errors_as_qsd(qemu_sd, qsd, workdir: Path, case: str) -> None:
    make_image(workdir / "d.qcow2", size=MiB)
    outs = []
    for factory, prog in ((qemu_sd, "qemu-storage-daemon"), (qsd, "qsd")):
        node = "ro" if case == "ro-node-writable" else "f0"
        opts = f"type=vhost-user-blk,id=v0,node-name={node}{ERROR_CASES[case]}"
        d = factory("--blockdev", "driver=file,node-name=f0,filename=d.qcow2",
                    "--blockdev", "driver=file,node-name=ro,filename=d.qcow2,read-only=on",
                    "--export", opts, qmp=False, pidfile=False, check=False)
        status = d.wait()
        outs.append((status, d.stderr().replace(prog + ":", "PROG:")))
    assert outs[1] == outs[0]
    assert outs[0][0] == 1


def test_qmp_add_errors_and_del(qemu_sd, qsd, workdir: Path) -> None:
    """block-export-add errors through QMP; delete with a front-end connected drops it
    (mode=safe too, as QSD), removes the socket and emits BLOCK_EXPORT_DELETED."""
    make_image(workdir / "d.qcow2", size=MiB)
    transcripts = []
    for name, factory in (("qemu", qemu_sd), ("qsd", qsd)):
        d = factory("--blockdev", "driver=file,node-name=f0,filename=d.qcow2")
        q = d.qmp()
        sock = workdir / f"{name}.sock"
        lines = []
        base = {"type": "vhost-user-blk", "id": "v0", "node-name": "f0",
                "addr": {"type": "unix", "path": str(sock)}}
        for extra in ({"logical-block-size": 3000}, {"num-queues": 0}, {"addr": {"type": "inet", "host": "::1",
                                                                                   "port": "1"}},
                      {"logical-block-size": 4096, "num-queues": 2, "writable": True}, {}):
            lines.append(q.execute("block-export-add", {**base, **extra}))
        lines.append(q.execute("query-block-exports"))
        with vc.VhostUserClient(str(sock)) as c:
            c.handshake()
            vq = c.setup_queue(0)
            assert c.blk(vq, vc.T_IN, 0, in_len=4096)[0] == 0
            lines.append(q.execute("block-export-del", {"id": "v0"}))
            lines.append(q.wait_event("BLOCK_EXPORT_DELETED")["data"])
            assert c.wait_closed()
        lines.append(sock.exists())
        lines.append(q.execute("query-block-exports"))
        lines.append(q.execute("block-export-del", {"id": "v0"}))
        transcripts.append(lines)
    assert transcripts[1] == transcripts[0]


# ----- bad front-ends ----------------------------------------------------------------------------

def _ready_client(path: Path) -> tuple[vc.VhostUserClient, vc.Queue]:
    c = vc.VhostUserClient(str(path))
    c.handshake()
    return c, c.setup_queue(0, num=8)


def _bad_version(c: vc.VhostUserClient) -> None:
    c.send(vc.GET_FEATURES, flags=0x2)


def _huge_payload(c: vc.VhostUserClient) -> None:
    c.send(vc.SET_FEATURES, b"", size=1 << 30)


def _mem_table_without_fd(c: vc.VhostUserClient) -> None:
    c.send(vc.SET_MEM_TABLE, c.mem_table_payload())


def _mem_table_bad_count(c: vc.VhostUserClient) -> None:
    c.send(vc.SET_MEM_TABLE, struct.pack("<II", 200, 0), (c.mem.fd,))


def _region_beyond_file(c: vc.VhostUserClient) -> None:
    c.send(vc.SET_MEM_TABLE, struct.pack("<II", 1, 0) + struct.pack("<QQQQ", vc.GUEST_BASE, 2 * c.mem.size,
                                                                    vc.USER_BASE, 0), (c.mem.fd,))


def _region_not_a_file(c: vc.VhostUserClient) -> None:
    r, w = os.pipe()
    c.send(vc.SET_MEM_TABLE, c.mem_table_payload(), (r,))
    os.close(r)
    os.close(w)


def _vring_index(c: vc.VhostUserClient) -> None:
    c.send(vc.SET_VRING_NUM, struct.pack("<II", 7, 64))


def _short_payload(c: vc.VhostUserClient) -> None:
    c.send(vc.SET_VRING_ADDR, struct.pack("<II", 0, 0))


def _legacy(c: vc.VhostUserClient) -> None:
    c.u64(vc.GET_FEATURES)
    c.send(vc.SET_FEATURES, struct.pack("<Q", vc.F_PROTOCOL_FEATURES))


def _ring_outside_memory(c: vc.VhostUserClient) -> None:
    c.handshake()
    c.call(vc.SET_VRING_NUM, struct.pack("<II", 0, 64))
    c.send(vc.SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 0, 0x1000, 0x2000, 0x3000, 0))


def _unknown_request(c: vc.VhostUserClient) -> None:
    c.send(9999)


def _desc_outside_memory(c: vc.VhostUserClient) -> None:
    c.handshake()
    q = c.setup_queue(0, num=8)
    q.set_desc(0, 0x1000_0000_0000, 512, vc.DESC_WRITE)
    q.publish(0)


def _desc_straddles_end(c: vc.VhostUserClient) -> None:
    c.handshake()
    q = c.setup_queue(0, num=8)
    q.set_desc(0, vc.GUEST_BASE, 16, vc.DESC_NEXT, 1)
    q.set_desc(1, vc.GUEST_BASE + c.mem.size - 100, 4096, vc.DESC_WRITE)
    q.publish(0)


def _desc_loop(c: vc.VhostUserClient) -> None:
    c.handshake()
    q = c.setup_queue(0, num=8)
    hdr = c.mem.alloc(16)
    c.mem.write(hdr, struct.pack("<IIQ", vc.T_IN, 0, 0))
    q.set_desc(0, hdr, 16, vc.DESC_NEXT, 1)
    q.set_desc(1, hdr, 16, vc.DESC_NEXT, 2)
    q.set_desc(2, hdr, 16, vc.DESC_NEXT, 0)
    q.publish(0)


def _indirect_nested(c: vc.VhostUserClient) -> None:
    c.handshake()
    q = c.setup_queue(0, num=8)
    table = c.mem.alloc(32, 16)
    c.mem.write(table, struct.pack("<QIHH", table, 16, vc.DESC_INDIRECT, 0))
    q.set_desc(0, table, 16, vc.DESC_INDIRECT)
    q.publish(0)


def _avail_runaway(c: vc.VhostUserClient) -> None:
    c.handshake()
    q = c.setup_queue(0, num=8)
    c.mem.write(q.avail + 2, struct.pack("<H", 1000))
    os.eventfd_write(q.kick, 1)


def _no_status(c: vc.VhostUserClient) -> None:
    c.handshake()
    q = c.setup_queue(0, num=8)
    q.submit([(struct.pack("<IIQ", vc.T_IN, 0, 0), False)])


def _garbage(c: vc.VhostUserClient) -> None:
    c.sock.sendall(random.Random(6).randbytes(4096))


BAD = [_bad_version, _huge_payload, _mem_table_without_fd, _mem_table_bad_count, _region_beyond_file,
       _region_not_a_file, _vring_index,
       _short_payload, _legacy, _ring_outside_memory, _unknown_request, _desc_outside_memory,
       _desc_straddles_end, _desc_loop, _indirect_nested, _avail_runaway, _no_status, _garbage]


def test_bad_front_ends_are_dropped_and_the_next_one_served(qsd, workdir: Path) -> None:
    img = workdir / "d.qcow2"
    make_image(img)
    sock = workdir / "v.sock"
    d = qsd(*export_args(img, sock, ",writable=on"), wait_for=[sock])
    for n, bad in enumerate(BAD):
        with vc.VhostUserClient(str(sock)) as c:
            bad(c)
            assert c.wait_closed(), f"{bad.__name__}: still connected"
        log = d.stderr()
        assert log.count("disconnecting the front-end") == n + 1, f"{bad.__name__}:\n{log}"
        # the next front-end works
        c2, q = _ready_client(sock)
        with c2:
            status, data, _ = c2.blk(q, vc.T_IN, 0, in_len=4096)
            assert (status, data) == (0, b"\x11" * 4096)
    assert d.alive()
    lines = d.stderr().splitlines()
    assert any("legacy" in line for line in lines)
    assert any("loop" in line for line in lines)
    assert any("outside guest memory" in line for line in lines)


def test_second_front_end_waits_for_the_first(qsd, workdir: Path) -> None:
    """One front-end at a time, as QSD: a second connection is served once the first leaves."""
    img = workdir / "d.qcow2"
    make_image(img)
    sock = workdir / "v.sock"
    qsd(*export_args(img, sock), wait_for=[sock])
    first, q1 = _ready_client(sock)
    second = vc.VhostUserClient(str(sock))
    second.send(vc.GET_FEATURES)
    second.sock.settimeout(0.5)
    with pytest.raises(socket.timeout):
        second.recv_reply(vc.GET_FEATURES)
    assert first.blk(q1, vc.T_IN, 0, in_len=512)[0] == 0
    first.close()
    second.sock.settimeout(10)
    assert second.recv_reply(vc.GET_FEATURES)
    second.close()


def test_memory_slots_and_event_idx(qsd, workdir: Path) -> None:
    """ADD_MEM_REG instead of SET_MEM_TABLE, many requests in flight, with and without event idx."""
    img = workdir / "d.qcow2"
    make_image(img)
    sock = workdir / "v.sock"
    qsd(*export_args(img, sock, ",writable=on,num-queues=2"), wait_for=[sock])
    for features in (None, vc.F_VERSION_1 | vc.F_PROTOCOL_FEATURES):
        with vc.VhostUserClient(str(sock)) as c:
            c.handshake(features=features, mem_slots=True)
            qs = [c.setup_queue(0, num=32), c.setup_queue(1, num=32)]
            for q in qs:
                heads = []
                for i in range(10):
                    ids, addrs = q.submit([(struct.pack("<IIQ", vc.T_IN, 0, 2048 * i), False),
                                           (4096, True), (1, True)], kick=(i == 9))
                    heads.append((ids, addrs))
                used = q.wait_used(10)
                assert sorted(u.head for u in used) == sorted(ids[0] for ids, _ in heads)
                for ids, addrs in heads:
                    assert c.mem.read(addrs[2], 1) == b"\0"
                    q.free.extend(ids)
            # the memory goes away and comes back (hotplug-style): rings follow it
            region = struct.pack("<QQQQQ", 0, vc.GUEST_BASE, c.mem.size, vc.USER_BASE, 0)
            c.call(vc.REM_MEM_REG, region, need_reply=True)
            c.call(vc.ADD_MEM_REG, region, (c.mem.fd,), need_reply=True)
            assert c.blk(qs[1], vc.T_IN, 0, in_len=4096)[:2] == (0, b"\x11" * 4096)
            assert c.get_vring_base(0) == 10 and c.get_vring_base(1) == 11


# ----- real guests ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def guest():
    if shutil.which(QEMU) is None or not os.path.exists("/usr/share/qemu/qboot.rom"):
        from conftest import _missing
        _missing(QEMU)
    return build_guest()


def test_guest_boots_reads_writes_and_a_second_guest_reconnects(qsd, workdir: Path, guest) -> None:
    img = workdir / "disk.qcow2"
    make_image(img)
    before = host_md5(img)
    sock = workdir / "vub.sock"
    d = qsd(*export_args(img, sock, ",writable=on"), wait_for=[sock])
    first = boot(guest, sock, "md5,write", extra_append="qsd.woff=2097152")
    assert first.returncode == 0, first.output[-3000:]
    assert first.value("GUEST-SIZE") == str(SECTORS)
    assert first.value("GUEST-MD5") == before
    assert "GUEST-WRITE-DONE" in first.lines
    second = boot(guest, sock, "md5")
    assert second.returncode == 0, second.output[-3000:]
    assert second.value("GUEST-MD5") != before
    assert d.stop() == 0
    assert host_md5(img) == second.value("GUEST-MD5")
    assert host_read(img, start=2 * MiB, length=4096) == b"GUEST-WROTE-THIS\n".ljust(4096, b"\0")
    subprocess.run(["qemu-img", "check", "-q", str(img)], check=True)


def test_guest_two_queues_two_cpus(qsd, workdir: Path, guest) -> None:
    """Reads on both queues at once, then 8 MiB of random writes (multi-descriptor OUT requests)."""
    img = workdir / "disk.raw"
    make_image(img, "raw")
    before = [host_md5(img, "raw"), host_md5(img, "raw", 0, SIZE // 2), host_md5(img, "raw", SIZE // 2)]
    sock = workdir / "vub.sock"
    d = qsd(*export_args(img, sock, ",num-queues=2,writable=on", fmt="raw"), wait_for=[sock])
    r = boot(guest, sock, "md5,par,wbig", smp=2, num_queues=2)
    assert r.returncode == 0, r.output[-3000:]
    assert r.value("GUEST-QUEUES") == "2"
    assert r.value("GUEST-MD5") == before[0]
    assert r.value("GUEST-PAR").split() == before[1:]
    written, read_back = r.value("GUEST-WBIG").split()
    assert written == read_back
    assert d.stop() == 0
    assert host_md5(img, "raw", 8 * MiB, 8 * MiB) == written


def test_inherited_socket_and_socket_removed_on_exit(qemu_sd, qsd, workdir: Path) -> None:
    """addr.type=fd serves a socket the daemon inherited; a unix socket file goes away at exit, as QSD."""
    make_image(workdir / "d.qcow2", size=MiB)
    gone = []
    for name, factory in (("qemu", qemu_sd), ("qsd", qsd)):
        sock = workdir / f"{name}.sock"
        d = factory("--blockdev", "driver=file,node-name=f0,filename=d.qcow2", "--export",
                    f"type=vhost-user-blk,id=v0,node-name=f0,addr.type=unix,addr.path={sock}", wait_for=[sock])
        d.stop()
        gone.append(sock.exists())
    assert gone == [False, False]

    path = workdir / "inherited.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    fd = listener.fileno()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.Popen([sys.executable, "-m", "qsd", "--blockdev", "driver=file,node-name=f0,filename=d.qcow2",
                             "--export", f"type=vhost-user-blk,id=v0,node-name=f0,addr.type=fd,addr.str={fd}"],
                            cwd=workdir, pass_fds=[fd], env=env, stdin=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    listener.close()
    try:
        with vc.VhostUserClient(str(path)) as c:
            c.handshake()
            q = c.setup_queue(0)
            status, data, _ = c.blk(q, vc.T_IN, 0, in_len=512)
            assert (status, data[:4]) == (0, b"QFI\xfb")      # the file node: a qcow2 header
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        assert proc.stderr is not None and proc.stderr.read() == b""
        proc.stderr.close()


def test_front_end_that_stops_reading_does_not_stall_the_daemon(qsd, workdir: Path) -> None:
    """Thousands of requests whose replies are never read: QMP still answers, the next front-end is served."""
    img = workdir / "d.qcow2"
    make_image(img)
    sock = workdir / "v.sock"
    d = qsd(*export_args(img, sock), wait_for=[sock])
    q = d.qmp()
    flood = vc.VhostUserClient(str(sock))
    flood.sock.setblocking(False)
    message = struct.pack("<III", vc.GET_QUEUE_NUM, vc.VERSION, 0)
    sent = 0
    try:
        while sent < 20000:
            flood.sock.send(message * 100)
            sent += 100
    except BlockingIOError:
        pass
    assert q.execute("query-block-exports")["return"][0]["id"] == "v0"
    flood.close()
    c, vq = _ready_client(sock)
    with c:
        assert c.blk(vq, vc.T_IN, 0, in_len=512)[:2] == (0, b"\x11" * 512)
    assert d.alive()


@pytest.mark.slow
def test_guest_reboot_resets_the_device_on_the_same_connection(qsd, workdir: Path, guest) -> None:
    """A reboot stops the rings (GET_VRING_BASE) and sets them up again without reconnecting."""
    img = workdir / "disk.qcow2"
    make_image(img)
    sock = workdir / "vub.sock"
    d = qsd(*export_args(img, sock, ",writable=on"), wait_for=[sock])
    r = boot(guest, sock, "reboot,md5", no_reboot=False, timeout=240)
    assert r.returncode == 0, r.output[-3000:]
    assert r.lines.count("GUEST-REBOOTING") == 1 and "GUEST-REBOOTED" in r.lines
    assert d.stop() == 0
    assert host_md5(img) == r.value("GUEST-MD5")


def test_block_resize_as_qsd(qemu_sd, qsd, workdir: Path) -> None:
    """After block_resize the config space keeps the old capacity (QSD 7.2 does not update it), while
    requests up to the new size succeed."""
    outcomes = []
    for name, factory in (("qemu", qemu_sd), ("qsd", qsd)):
        img = workdir / f"{name}.img"
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(img), "16M"], check=True)
        sock = workdir / f"{name}.sock"
        d = factory("--blockdev", f"driver=file,node-name=f0,filename={img}", "--export",
                    f"type=vhost-user-blk,id=v0,node-name=f0,addr.type=unix,addr.path={sock},writable=on",
                    wait_for=[sock])
        q = d.qmp()
        with vc.VhostUserClient(str(sock)) as c:
            c.handshake()
            vq = c.setup_queue(0)
            before = c.blk(vq, vc.T_IN, 32768, in_len=512)[0]
            q.cmd("block_resize", **{"node-name": "f0", "size": 32 * MiB})
            outcomes.append((before, c.get_config(8), c.blk(vq, vc.T_IN, 32768, in_len=512)[0],
                             c.blk(vq, vc.T_IN, 65536, in_len=512)[0]))
    assert outcomes[1] == outcomes[0]
    assert outcomes[0][0] == 1 and outcomes[0][2] == 0
