# SPDX-License-Identifier: GPL-2.0-or-later
"""vhost-user message framing/session and the split-virtqueue walker, without sockets.

Property tests feed arbitrary bytes and arbitrary ring contents: the code
under test may only answer, ask the device for something, or raise its
own error (ProtocolError / VirtqueueError / BadRequest) -- never another
exception, never a hang, and every view it hands out lies inside guest memory.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qsd.export.vhost_user_blk import blk
from qsd.export.vhost_user_blk.protocol import (
    HEADER,
    MAX_PAYLOAD,
    OUR_PROTOCOL_FEATURES,
    PF,
    DeviceRequest,
    GetVringBase,
    Message,
    MessageReader,
    ProtocolError,
    Req,
    Session,
    SetMemTable,
    VringFd,
    encode,
)
from qsd.export.vhost_user_blk.virtqueue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    GuestMemory,
    MemRegion,
    SplitQueue,
    VirtqueueError,
)

FEATURES = blk.features(True)
CONFIG = blk.config_space(64 << 20, 512, 2, 0)


def session() -> Session:
    return Session(FEATURES, 2, lambda: CONFIG)


def msg(req: int, payload: bytes = b"", flags: int = 1, fds: list[int] | None = None) -> Message:
    return Message(req, flags, payload, fds or [])


# ----- framing ----------------------------------------------------------------------------------

def test_reader_frames_split_and_joined_messages() -> None:
    stream = encode(Req.GET_FEATURES, b"", 1) + encode(Req.SET_FEATURES, struct.pack("<Q", 5), 1)
    r = MessageReader()
    out = []
    for i in range(len(stream)):            # byte by byte
        out += r.feed(stream[i:i + 1])
    assert [(m.request, m.payload) for m in out] == [(1, b""), (2, struct.pack("<Q", 5))]
    r2 = MessageReader()
    assert len(r2.feed(stream)) == 2        # all at once


def test_reader_wants_exactly_the_next_part() -> None:
    r = MessageReader()
    assert r.want() == 12
    r.feed(HEADER.pack(5, 1, 40)[:5])
    assert r.want() == 7
    r.feed(HEADER.pack(5, 1, 40)[5:])
    assert r.want() == 40


def test_reader_refuses_bad_version_and_huge_payloads() -> None:
    with pytest.raises(ProtocolError, match="version"):
        MessageReader().feed(HEADER.pack(1, 2, 0))
    with pytest.raises(ProtocolError, match="too large"):
        MessageReader().feed(HEADER.pack(1, 1, MAX_PAYLOAD + 1))


def test_reader_closes_descriptors_of_a_bad_message() -> None:
    r_fd, w_fd = os.pipe()
    try:
        r = MessageReader()
        r.feed(HEADER.pack(1, 1, 8))
        with pytest.raises(ProtocolError, match="middle"):
            r.feed(b"x", [r_fd])
        with pytest.raises(OSError):
            os.fstat(r_fd)                  # closed by the reader
    finally:
        os.close(w_fd)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=80), max_size=12))
def test_reader_and_session_never_crash(chunks: list[bytes]) -> None:
    """Arbitrary bytes: only messages, replies, device requests or ProtocolError."""
    r = MessageReader()
    s = session()
    try:
        for chunk in chunks:
            for m in r.feed(chunk):
                assert len(m.payload) <= MAX_PAYLOAD
                out = s.receive(m)
                assert out is None or isinstance(out, (bytes, DeviceRequest))
                if isinstance(out, bytes):
                    req, flags, size = HEADER.unpack_from(out)
                    assert req == m.request and flags & 0x4 and size == len(out) - 12
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(Req)), st.binary(max_size=300), st.integers(0, 15))
def test_session_on_any_request(req: Req, payload: bytes, flags: int) -> None:
    s = session()
    s.protocol_features = int(OUR_PROTOCOL_FEATURES)
    try:
        out = s.receive(msg(req, payload, flags | 1))
    except ProtocolError:
        return
    if isinstance(out, DeviceRequest):
        reply = s.complete(out, 7)
        assert reply is None or isinstance(reply, bytes)


# ----- session ------------------------------------------------------------------------------

def u64(data: bytes) -> int:
    return struct.unpack_from("<Q", data, 12)[0]


def test_features_and_protocol_features() -> None:
    s = session()
    offered = u64(s.receive(msg(Req.GET_FEATURES)))
    assert offered & (1 << 32) and offered & (1 << 30)
    assert u64(s.receive(msg(Req.GET_PROTOCOL_FEATURES))) == int(OUR_PROTOCOL_FEATURES)
    assert s.receive(msg(Req.SET_PROTOCOL_FEATURES, struct.pack("<Q", PF.REPLY_ACK | PF.MQ), 1 | 8)) \
        == encode(Req.SET_PROTOCOL_FEATURES, struct.pack("<Q", 0))
    assert u64(s.receive(msg(Req.GET_QUEUE_NUM))) == 2
    with pytest.raises(ProtocolError, match="beyond"):
        s.receive(msg(Req.SET_PROTOCOL_FEATURES, struct.pack("<Q", PF.LOG_SHMFD)))


def test_legacy_negotiation_is_refused() -> None:
    s = session()
    with pytest.raises(ProtocolError, match="legacy"):
        s.receive(msg(Req.SET_FEATURES, struct.pack("<Q", 1 << 30)))


def test_config_space_reply() -> None:
    s = session()
    reply = s.receive(msg(Req.GET_CONFIG, struct.pack("<III", 0, 60, 0) + bytes(60)))
    assert isinstance(reply, bytes) and reply[12 + 12:] == CONFIG
    # more than the device has: a zero-length payload reports the failure
    reply = s.receive(msg(Req.GET_CONFIG, struct.pack("<III", 0, 61, 0) + bytes(61)))
    assert reply == encode(Req.GET_CONFIG, b"")


def test_vring_messages_check_their_index_and_fds() -> None:
    s = session()
    with pytest.raises(ProtocolError, match="out of range"):
        s.receive(msg(Req.SET_VRING_NUM, struct.pack("<II", 2, 64)))
    with pytest.raises(ProtocolError, match="invalid vring size"):
        s.receive(msg(Req.SET_VRING_NUM, struct.pack("<II", 0, 100)))
    with pytest.raises(ProtocolError, match="expected one file descriptor"):
        s.receive(msg(Req.SET_VRING_KICK, struct.pack("<Q", 0)))
    out = s.receive(msg(Req.SET_VRING_CALL, struct.pack("<Q", 0x101)))
    assert isinstance(out, VringFd) and out.fd is None and out.index == 1
    out = s.receive(msg(Req.GET_VRING_BASE, struct.pack("<II", 1, 0)))
    assert isinstance(out, GetVringBase)
    assert s.complete(out, 42) == encode(Req.GET_VRING_BASE, struct.pack("<II", 1, 42))


def test_mem_table_needs_one_fd_per_region() -> None:
    s = session()
    region = struct.pack("<QQQQ", 0, 4096, 0x1000, 0)
    r_fd, w_fd = os.pipe()
    try:
        with pytest.raises(ProtocolError, match="file descriptors"):
            s.receive(msg(Req.SET_MEM_TABLE, struct.pack("<II", 2, 0) + region * 2, fds=[r_fd]))
        with pytest.raises(OSError):
            os.fstat(r_fd)                  # the session closed it
        r_fd, w2 = os.pipe()
        os.close(w2)
        out = s.receive(msg(Req.SET_MEM_TABLE, struct.pack("<II", 1, 0) + region, fds=[r_fd]))
        assert isinstance(out, SetMemTable) and out.fds == [r_fd] and out.regions[0].size == 4096
        os.close(r_fd)
    finally:
        os.close(w_fd)


def test_reply_ack_only_when_negotiated() -> None:
    s = session()
    assert s.receive(msg(Req.SET_OWNER, flags=1 | 8)) is None
    s.protocol_features = int(PF.REPLY_ACK)
    assert s.receive(msg(Req.SET_OWNER, flags=1 | 8)) == encode(Req.SET_OWNER, struct.pack("<Q", 0))
    out = s.receive(msg(Req.SET_CONFIG, struct.pack("<III", 0, 1, 0) + b"\1", flags=1 | 8))
    assert isinstance(out, DeviceRequest)
    assert s.complete(out, False, ok=False) == encode(Req.SET_CONFIG, struct.pack("<Q", 1))


# ----- virtqueue walker ---------------------------------------------------------------------

GUEST = 0x10000
USER = 0x7F0000000000
NUM = 8
MEM_SIZE = 0x4000
DESC, AVAIL, USED = 0x0, 0x100, 0x200          # offsets in memory


def make_queue(event_idx: bool = False) -> tuple[bytearray, SplitQueue]:
    buf = bytearray(MEM_SIZE)
    mem = GuestMemory([MemRegion(GUEST, MEM_SIZE, USER, memoryview(buf))])
    q = SplitQueue(NUM, event_idx=event_idx)
    q.map(mem, USER + DESC, USER + AVAIL, USER + USED)
    return buf, q


def put_desc(buf: bytearray, i: int, addr: int, length: int, flags: int, nxt: int = 0,
             table: int = DESC) -> None:
    struct.pack_into("<QIHH", buf, table + 16 * i, addr, length, flags, nxt)


def post(buf: bytearray, heads: list[int]) -> None:
    idx = struct.unpack_from("<H", buf, AVAIL + 2)[0]
    for h in heads:
        struct.pack_into("<H", buf, AVAIL + 4 + 2 * (idx % NUM), h)
        idx = (idx + 1) & 0xFFFF
    struct.pack_into("<H", buf, AVAIL + 2, idx)


def test_walk_direct_and_indirect_chains() -> None:
    buf, q = make_queue()
    put_desc(buf, 0, GUEST + 0x1000, 16, DESC_F_NEXT, 1)
    put_desc(buf, 1, GUEST + 0x1100, 512, DESC_F_NEXT | DESC_F_WRITE, 2)
    put_desc(buf, 2, GUEST + 0x1300, 1, DESC_F_WRITE)
    # an indirect table at 0x2000 with two entries
    put_desc(buf, 3, GUEST + 0x2000, 32, DESC_F_INDIRECT)
    put_desc(buf, 0, GUEST + 0x1400, 16, DESC_F_NEXT, 1, table=0x2000)
    put_desc(buf, 1, GUEST + 0x1500, 1, DESC_F_WRITE, table=0x2000)
    post(buf, [0, 3])
    c1 = q.pop()
    assert c1 is not None and c1.head == 0
    assert [len(v) for v in c1.readable] == [16] and [len(v) for v in c1.writable] == [512, 1]
    c1.writable[1][0] = 0x77
    assert buf[0x1300] == 0x77                # views write guest memory
    c2 = q.pop()
    assert c2 is not None and c2.head == 3 and c2.in_len == 1
    assert q.pop() is None
    q.push(0, 513)
    q.push(3, 1)
    assert q.publish()                        # no NO_INTERRUPT flag: notify
    assert struct.unpack_from("<HH", buf, USED) == (0, 2)
    assert struct.unpack_from("<IIII", buf, USED + 4) == (0, 513, 3, 1)


@pytest.mark.parametrize("setup, error", [
    (lambda b: put_desc(b, 0, GUEST + 0x1000, 16, DESC_F_NEXT, 0), "loop"),
    (lambda b: put_desc(b, 0, GUEST + MEM_SIZE - 8, 16, 0), "outside guest memory"),
    (lambda b: put_desc(b, 0, 0x10, 16, 0), "outside guest memory"),
    (lambda b: put_desc(b, 0, GUEST, 16, DESC_F_NEXT, NUM), "out of range"),
    (lambda b: (put_desc(b, 0, GUEST, 1, DESC_F_WRITE | DESC_F_NEXT, 1), put_desc(b, 1, GUEST, 16, 0)),
     "readable descriptor after"),
    (lambda b: put_desc(b, 0, GUEST + 0x2000, 24, DESC_F_INDIRECT), "indirect table length"),
    (lambda b: (put_desc(b, 0, GUEST + 0x2000, 16, DESC_F_INDIRECT),
                put_desc(b, 0, GUEST + 0x2000, 16, DESC_F_INDIRECT, table=0x2000)), "nested"),
    (lambda b: (put_desc(b, 0, GUEST + 0x2000, 32, DESC_F_INDIRECT),
                put_desc(b, 0, GUEST, 16, DESC_F_NEXT, 1, table=0x2000),
                put_desc(b, 1, GUEST, 16, DESC_F_NEXT, 0, table=0x2000)), "loop"),
])
def test_walk_refuses_bad_chains(setup, error: str) -> None:
    buf, q = make_queue()
    setup(buf)
    post(buf, [0])
    with pytest.raises(VirtqueueError, match=error):
        q.pop()


def test_head_out_of_range_and_runaway_avail_index() -> None:
    buf, q = make_queue()
    post(buf, [NUM])
    with pytest.raises(VirtqueueError, match="head"):
        q.pop()
    buf, q = make_queue()
    struct.pack_into("<H", buf, AVAIL + 2, NUM + 1)
    with pytest.raises(VirtqueueError, match="avail index"):
        q.pop()


def test_event_idx_suppresses_interrupts() -> None:
    buf, q = make_queue(event_idx=True)
    for i in range(3):
        put_desc(buf, i, GUEST + 0x1000, 1, DESC_F_WRITE)
    struct.pack_into("<H", buf, AVAIL + 4 + 2 * NUM, 1)      # used_event: interrupt after entry 1
    post(buf, [0, 1, 2])
    assert q.pop() is not None
    q.push(0, 1)
    assert not q.publish()                   # used idx 1: the driver wants to hear after idx 2
    q.pop(), q.pop()
    q.push(1, 1)
    q.push(2, 1)
    assert q.publish()                       # 1 -> 3 crosses used_event + 1
    assert not q.enable_notifications()
    assert struct.unpack_from("<H", buf, USED + 4 + 8 * NUM)[0] == 3      # avail_event


_desc = st.tuples(st.integers(0, GUEST + MEM_SIZE + 64), st.integers(0, 600),
                  st.integers(0, 7), st.integers(0, NUM + 1))


@settings(max_examples=400, deadline=None)
@given(st.lists(_desc, min_size=NUM, max_size=NUM), st.lists(_desc, max_size=6),
       st.lists(st.integers(0, NUM), min_size=1, max_size=NUM), st.integers(0, 0xFFFF))
def test_walker_on_arbitrary_rings(table, indirect, heads, start) -> None:
    """Whatever the driver writes: chains of views inside memory, or VirtqueueError; no hang."""
    buf, q = make_queue()
    for i, (addr, length, flags, nxt) in enumerate(table):
        put_desc(buf, i, addr, length, flags, nxt)
    for i, (addr, length, flags, nxt) in enumerate(indirect):
        put_desc(buf, i, addr, length, flags, nxt, table=0x3000)
    struct.pack_into("<H", buf, AVAIL + 2, start)
    q.last_avail = start
    post(buf, heads)
    popped = 0
    try:
        while (chain := q.pop()) is not None:
            popped += 1
            total = 0
            for v in chain.readable + chain.writable:
                total += len(v)
                assert v.obj is buf or isinstance(v.obj, (bytes, bytearray))
            assert total <= NUM * MEM_SIZE * 2
            try:
                req = blk.parse(chain)
                assert req.status.nbytes == 1
            except blk.BadRequest:
                pass
    except VirtqueueError:
        pass
    assert popped <= len(heads)


def test_buffers_spanning_two_regions_become_two_views() -> None:
    low, high = bytearray(0x1000), bytearray(0x1000)
    mem = GuestMemory([MemRegion(0x0, 0x1000, 0x10000, memoryview(low)),
                       MemRegion(0x1000, 0x1000, 0x11000, memoryview(high))])
    views = mem.guest(0xF00, 0x200)
    assert [len(v) for v in views] == [0x100, 0x100]
    views[0][:] = b"a" * 0x100
    views[1][:] = b"b" * 0x100
    assert low[0xF00:] == b"a" * 0x100 and high[:0x100] == b"b" * 0x100
    with pytest.raises(VirtqueueError, match="crosses memory regions"):
        mem.user_contiguous(0x10F00, 0x200)     # a ring must lie in one mapping
    with pytest.raises(VirtqueueError, match="outside guest memory"):
        mem.user_contiguous(0x11F00, 0x200)
    with pytest.raises(VirtqueueError, match="overlaps"):
        mem.add(MemRegion(0x1800, 0x1000, 0x50000, memoryview(bytearray(0x1000))))
