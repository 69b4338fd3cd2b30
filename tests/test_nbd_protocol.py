# SPDX-License-Identifier: GPL-2.0-or-later
"""The sans-IO NBD server protocol, fed bytes directly (no sockets)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qsd.export.nbd.protocol import (
    IHAVEOPT,
    MAX_OPTION_BUFFER,
    NBD_EINVAL,
    NBD_ENOSPC,
    NBD_EOVERFLOW,
    NBD_EPERM,
    Cmd,
    CmdFlag,
    Disconnect,
    Opt,
    ProtocolError,
    Rep,
    Request,
    ServerConnection,
    StartTLS,
    TransmissionStarted,
    block_status_chunk,
    error_chunk,
    match_contexts,
    simple_reply,
    transmission_flags,
)

SIZE = 1 << 20


@dataclass
class Ctx:
    name: str
    id: int = 0


@dataclass
class FakeExport:
    name: str
    description: str = ""
    writable: bool = False
    contexts: list[Ctx] = field(default_factory=lambda: [Ctx("base:allocation")])
    size: int = SIZE
    min_block: int = 1


def exports() -> dict[str, FakeExport]:
    return {
        "ro": FakeExport("ro", "read-only view",
                         contexts=[Ctx("base:allocation", 0), Ctx("qemu:allocation-depth", 1),
                                   Ctx("qemu:dirty-bitmap:b0", 2)]),
        "rw": FakeExport("rw", writable=True),
    }


def opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, option, len(data)) + data


def info_data(name: bytes, *infos: int) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


def meta_data(name: bytes, *queries: bytes) -> bytes:
    return (struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
            + b"".join(struct.pack(">I", len(q)) + q for q in queries))


def req(rtype: int, offset: int = 0, length: int = 0, flags: int = 0, handle: int = 7) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, flags, rtype, handle, offset, length)


def parse_replies(events: list) -> list[tuple[int, int, bytes]]:
    """Option replies in the byte events, as (option, type, data)."""
    data = b"".join(e for e in events if isinstance(e, bytes))
    out = []
    while data:
        magic, option, rtype, length = struct.unpack_from(">QIII", data)
        assert magic == 0x3E889045565A9
        out.append((option, rtype, data[20:20 + length]))
        data = data[20 + length:]
    return out


def connect(flags: int = 3, tls: bool = False) -> ServerConnection:
    conn = ServerConnection(exports(), tls=tls)
    assert conn.receive_data(struct.pack(">I", flags)) == []
    return conn


def negotiated(name: bytes = b"rw", structured: bool = True,
               meta: tuple[bytes, ...] = ()) -> tuple[ServerConnection, TransmissionStarted]:
    conn = connect()
    if structured:
        conn.receive_data(opt(Opt.STRUCTURED_REPLY))
    if meta:
        conn.receive_data(opt(Opt.SET_META_CONTEXT, meta_data(name, *meta)))
    events = conn.receive_data(opt(Opt.GO, info_data(name)))
    assert isinstance(events[-1], TransmissionStarted)
    return conn, events[-1]


# ----- handshake ------------------------------------------------------------

def test_greeting() -> None:
    assert ServerConnection({}).greeting() == b"NBDMAGICIHAVEOPT\x00\x03"


@pytest.mark.parametrize("flags", [4, 0x80000001, 0xFFFFFFFF])
def test_unknown_client_flags_disconnect(flags: int) -> None:
    conn = ServerConnection(exports())
    (ev,) = conn.receive_data(struct.pack(">I", flags))
    assert ev == Disconnect(f"Unknown client flags 0x{flags:x} received", True)
    assert conn.closed
    with pytest.raises(ProtocolError):
        conn.receive_data(b"x")


def test_non_fixed_newstyle_allows_only_export_name() -> None:
    conn = connect(flags=0)
    (ev,) = conn.receive_data(opt(Opt.LIST))
    assert ev == Disconnect("Unsupported option 3 (list)", True)
    conn = connect(flags=0)
    events = conn.receive_data(opt(Opt.EXPORT_NAME, b"ro"))
    assert events[0] == struct.pack(">QH", SIZE, 0x50F) + bytes(124)
    assert isinstance(events[1], TransmissionStarted)


def test_export_name_no_zeroes() -> None:
    events = connect().receive_data(opt(Opt.EXPORT_NAME, b"rw"))
    assert events[0] == struct.pack(">QH", SIZE, 0xD6D)


def test_export_name_unknown_or_too_long_disconnects() -> None:
    (ev,) = connect().receive_data(opt(Opt.EXPORT_NAME, b"nosuch"))
    assert ev == Disconnect("export 'nosuch' not present", True)
    (ev,) = connect().receive_data(opt(Opt.EXPORT_NAME, b"a" * 5000))
    assert ev == Disconnect("Bad length received", True)


def test_list() -> None:
    replies = parse_replies(connect().receive_data(opt(Opt.LIST)))
    assert replies == [(3, Rep.SERVER, b"\0\0\0\x02roread-only view"),
                       (3, Rep.SERVER, b"\0\0\0\x02rw"), (3, Rep.ACK, b"")]
    replies = parse_replies(connect().receive_data(opt(Opt.LIST, b"x")))
    assert replies == [(3, Rep.ERR_INVALID, b"option 'list' has unexpected length")]


def test_info_replies_like_qsd() -> None:
    conn = connect()
    replies = parse_replies(conn.receive_data(opt(Opt.INFO, info_data(b"ro", 1, 2, 3))))
    assert replies == [
        (6, Rep.INFO, b"\0\x01ro"),
        (6, Rep.INFO, b"\0\x02read-only view"),
        (6, Rep.INFO, struct.pack(">HIII", 3, 1, 4096, 32 << 20)),
        (6, Rep.INFO, struct.pack(">HQH", 0, SIZE, 0x50F)),
        (6, Rep.ACK, b""),
    ]
    # no NAME unless asked; no DESCRIPTION when there is none
    replies = parse_replies(conn.receive_data(opt(Opt.INFO, info_data(b"rw"))))
    assert [r[2][:2] for r in replies[:-1]] == [b"\0\x03", b"\0\0"]


def test_info_errors() -> None:
    conn = connect()
    cases = [
        (info_data(b"nosuch"), Rep.ERR_UNKNOWN, b"export 'nosuch' not present"),
        (b"ab", Rep.ERR_INVALID, b"Inconsistent lengths in option info"),
        (info_data(b"ro") + b"junk", Rep.ERR_INVALID, b"option 'info' has unexpected length"),
        (struct.pack(">I", 2) + b"ro" + struct.pack(">H", 3), Rep.ERR_INVALID,
         b"Inconsistent lengths in option info"),
    ]
    for data, rep, message in cases:
        assert parse_replies(conn.receive_data(opt(Opt.INFO, data))) == [(6, rep, message)]
    replies = parse_replies(conn.receive_data(opt(Opt.GO, b"ab")))
    assert replies == [(7, Rep.ERR_INVALID, b"Inconsistent lengths in option go")]


def test_go_enters_transmission_with_df_when_structured() -> None:
    _conn, started = negotiated(b"ro")
    assert started.flags == 0x58F and started.structured
    assert started.export.name == "ro" and started.contexts == []
    _, started = negotiated(b"rw", structured=False)
    assert started.flags == 0xD6D and not started.structured


def test_transmission_flags_match_qsd() -> None:
    assert transmission_flags(False, False) == 0x050F
    assert transmission_flags(False, True) == 0x058F
    assert transmission_flags(True, False) == 0x0D6D
    assert transmission_flags(True, True) == 0x0DED


def test_unknown_and_oversized_options() -> None:
    conn = connect()
    # an unknown option's data is skipped unbuffered, whatever its size
    big = opt(99, b"z" * (3 << 20))
    events = []
    for i in range(0, len(big), 100_000):
        events += conn.receive_data(big[i:i + 100_000])
    assert parse_replies(events) == [(99, Rep.ERR_UNSUP, b"Unsupported option 99 (<unknown>)")]
    replies = parse_replies(conn.receive_data(opt(Opt.LIST, b"x" * (MAX_OPTION_BUFFER + 1))))
    assert replies == [(3, Rep.ERR_TOO_BIG, b"option 'list' is too long")]
    # the connection still works
    assert parse_replies(conn.receive_data(opt(Opt.LIST)))[-1][1] == Rep.ACK
    (ev,) = conn.receive_data(struct.pack(">QII", IHAVEOPT, 3, (32 << 20) + 1))
    assert ev == Disconnect("len (33554433 ) is larger than max len (33554432)", True)


def test_bad_option_magic() -> None:
    (ev,) = connect().receive_data(struct.pack(">QII", 1234, 3, 0))
    assert ev == Disconnect("Bad magic received", True)


def test_abort() -> None:
    events = connect().receive_data(opt(Opt.ABORT, b"abc"))
    assert parse_replies(events) == [(2, Rep.ACK, b"")]
    assert events[-1] == Disconnect(None, True)


def test_structured_reply_twice() -> None:
    conn = connect()
    assert parse_replies(conn.receive_data(opt(Opt.STRUCTURED_REPLY))) == [(8, Rep.ACK, b"")]
    assert parse_replies(conn.receive_data(opt(Opt.STRUCTURED_REPLY))) == [
        (8, Rep.ERR_INVALID, b"structured reply already negotiated")]
    assert parse_replies(conn.receive_data(opt(Opt.STRUCTURED_REPLY, b"a"))) == [
        (8, Rep.ERR_INVALID, b"option 'structured reply' has unexpected length")]


def test_starttls_without_tls() -> None:
    replies = parse_replies(connect().receive_data(opt(Opt.STARTTLS)))
    assert replies == [(5, Rep.ERR_POLICY, b"TLS not configured")]


def test_forced_tls() -> None:
    conn = connect(tls=True)
    replies = parse_replies(conn.receive_data(opt(Opt.LIST)))
    assert replies == [(3, Rep.ERR_TLS_REQD, b"Option 0x3 not permitted before TLS")]
    conn.receive_data(opt(Opt.STRUCTURED_REPLY))
    events = conn.receive_data(opt(Opt.STARTTLS) + b"leftover")
    assert parse_replies(events) == [(5, Rep.ACK, b"")]
    assert isinstance(events[-1], StartTLS)
    conn.tls_started()
    assert not conn.structured
    assert parse_replies(conn.receive_data(opt(Opt.LIST)))[-1][1] == Rep.ACK
    assert parse_replies(conn.receive_data(opt(Opt.STARTTLS))) == [
        (5, Rep.ERR_INVALID, b"TLS already enabled")]
    (ev,) = connect(tls=True).receive_data(opt(Opt.EXPORT_NAME, b"ro"))
    assert isinstance(ev, Disconnect) and ev.reason


# ----- metadata contexts --------------------------------------------------

def test_match_contexts_table() -> None:
    table = [Ctx("base:allocation"), Ctx("qemu:allocation-depth"),
             Ctx("qemu:dirty-bitmap:b0"), Ctx("qemu:dirty-bitmap:b1")]
    assert match_contexts(table, "base:", True) == [0]
    assert match_contexts(table, "base:", False) == []
    assert match_contexts(table, "qemu:", True) == [1, 2, 3]
    assert match_contexts(table, "qemu:dirty-bitmap:", True) == [2, 3]
    assert match_contexts(table, "qemu:dirty-bitmap:b1", False) == [3]
    assert match_contexts(table, "base", True) == []
    assert match_contexts(table, "x-foo:bar", True) == []


def test_list_meta_context() -> None:
    conn = connect()
    names = [r[2][4:] for r in parse_replies(
        conn.receive_data(opt(Opt.LIST_META_CONTEXT, meta_data(b"ro"))))[:-1]]
    assert names == [b"base:allocation", b"qemu:allocation-depth", b"qemu:dirty-bitmap:b0"]
    replies = parse_replies(conn.receive_data(opt(Opt.LIST_META_CONTEXT,
                                                  meta_data(b"ro", b"qemu:dirty-bitmap:"))))
    assert replies == [(9, Rep.META_CONTEXT, b"\0\0\0\0qemu:dirty-bitmap:b0"), (9, Rep.ACK, b"")]
    replies = parse_replies(conn.receive_data(opt(Opt.LIST_META_CONTEXT,
                                                  meta_data(b"rw", b"qemu:", b"foo"))))
    assert replies == [(9, Rep.ACK, b"")]
    replies = parse_replies(conn.receive_data(opt(Opt.LIST_META_CONTEXT, meta_data(b"nosuch"))))
    assert replies == [(9, Rep.ERR_UNKNOWN, b"export 'nosuch' not present")]
    bad = struct.pack(">I", 2) + b"ro" + struct.pack(">II", 2, 4) + b"base"
    replies = parse_replies(conn.receive_data(opt(Opt.LIST_META_CONTEXT, bad)))
    assert replies == [(9, Rep.ERR_INVALID, b"Inconsistent lengths in option list meta context")]


def test_set_meta_context() -> None:
    conn = connect()
    replies = parse_replies(conn.receive_data(opt(Opt.SET_META_CONTEXT,
                                                  meta_data(b"ro", b"base:allocation"))))
    assert replies == [(10, Rep.ERR_INVALID, (b"request option 'set meta context' when "
                                             b"structured reply is not negotiated"))]
    conn.receive_data(opt(Opt.STRUCTURED_REPLY))
    replies = parse_replies(conn.receive_data(opt(Opt.SET_META_CONTEXT, meta_data(
        b"ro", b"qemu:dirty-bitmap:b0", b"base:", b"base:allocation", b"base:allocation"))))
    # As QEMU: replies in context-id order, whatever the order of the queries.
    assert replies == [(10, Rep.META_CONTEXT, b"\0\0\0\0base:allocation"),
                       (10, Rep.META_CONTEXT, b"\0\0\0\x02qemu:dirty-bitmap:b0"), (10, Rep.ACK, b"")]
    started = conn.receive_data(opt(Opt.GO, info_data(b"ro")))[-1]
    assert isinstance(started, TransmissionStarted)
    assert [(i, c.name) for i, c in started.contexts] == [
        (0, "base:allocation"), (2, "qemu:dirty-bitmap:b0")]


def test_meta_contexts_belong_to_their_export() -> None:
    conn = connect()
    conn.receive_data(opt(Opt.STRUCTURED_REPLY))
    conn.receive_data(opt(Opt.SET_META_CONTEXT, meta_data(b"ro", b"base:allocation")))
    started = conn.receive_data(opt(Opt.GO, info_data(b"rw")))[-1]
    assert isinstance(started, TransmissionStarted) and started.contexts == []


# ----- transmission -------------------------------------------------------

def test_read_request() -> None:
    conn, _ = negotiated()
    assert conn.receive_data(req(Cmd.READ, 4096, 512, CmdFlag.FUA, handle=99)) == [
        Request(Cmd.READ, 1, 99, 4096, 512)]


@pytest.mark.parametrize("chunk", [1, 7, 28, 4096, 1 << 20])
def test_write_payload_any_split(chunk: int) -> None:
    conn, _ = negotiated()
    payload = bytes(range(256)) * 1024          # 256 KiB: takes the direct path too
    stream = req(Cmd.WRITE, 0, len(payload), CmdFlag.FUA) + payload + req(Cmd.FLUSH)
    events = []
    for i in range(0, len(stream), chunk):
        events += conn.receive_data(stream[i:i + chunk])
    assert events == [Request(Cmd.WRITE, 1, 7, 0, len(payload), bytearray(payload)),
                      Request(Cmd.FLUSH, 0, 7, 0, 0)]


def err(conn: ServerConnection, data: bytes) -> tuple[int, bytes]:
    """(error, message) of the structured error reply the protocol made."""
    (reply,) = conn.receive_data(data)
    assert isinstance(reply, bytes)
    _, flags, ctype, _, _, error, mlen = struct.unpack_from(">IHHQIIH", reply)
    assert flags == 1 and ctype == 0x8001
    return error, reply[26:26 + mlen]


def test_request_validation() -> None:
    conn, _ = negotiated(b"ro")
    assert err(conn, req(Cmd.WRITE, 0, 4) + b"abcd") == (NBD_EPERM, b"Export is read-only")
    assert err(conn, req(Cmd.TRIM, 0, 4)) == (NBD_EPERM, b"Export is read-only")
    assert err(conn, req(Cmd.WRITE_ZEROES, 0, 4, CmdFlag.FAST_ZERO)) == (
        NBD_EPERM, b"Export is read-only")
    assert err(conn, req(Cmd.READ, SIZE - 512, 1024)) == (
        NBD_EINVAL, b"operation past EOF; From: 1048064, Len: 1024, Size: 1048576")
    assert err(conn, req(Cmd.READ, 0, 512, CmdFlag.NO_HOLE)) == (
        NBD_EINVAL, b"unsupported flags for command read (got 0x2)")
    assert err(conn, req(Cmd.READ, 0, 512, 0x40)) == (
        NBD_EINVAL, b"unsupported flags for command read (got 0x40)")
    assert err(conn, req(Cmd.FLUSH, 0, 0, 0x8000)) == (
        NBD_EINVAL, b"unsupported flags for command flush (got 0x8000)")
    assert err(conn, req(Cmd.READ, 0, (32 << 20) + 1)) == (
        NBD_EOVERFLOW, b"len (33554433 ) is larger than max len (33554432)")
    assert err(conn, req(Cmd.BLOCK_STATUS, 0, 512)) == (
        NBD_EINVAL, b"CMD_BLOCK_STATUS not negotiated")
    assert err(conn, req(9, 0, 512)) == (NBD_EINVAL, b"invalid request type (9) received")
    assert conn.receive_data(req(Cmd.READ, 0, 512, CmdFlag.DF)) == [
        Request(Cmd.READ, CmdFlag.DF, 7, 0, 512)]
    assert conn.receive_data(req(Cmd.FLUSH, 0, 512)) == [Request(Cmd.FLUSH, 0, 7, 0, 512)]


def test_request_validation_writable() -> None:
    conn, _ = negotiated(b"rw", meta=(b"base:allocation",))
    assert err(conn, req(Cmd.WRITE, SIZE - 2, 4) + b"abcd") == (
        NBD_ENOSPC, b"operation past EOF; From: 1048574, Len: 4, Size: 1048576")
    assert err(conn, req(Cmd.WRITE_ZEROES, 0, 4, CmdFlag.DF)) == (
        NBD_EINVAL, b"unsupported flags for command write zeroes (got 0x4)")
    assert err(conn, req(Cmd.BLOCK_STATUS, 0, 0)) == (NBD_EINVAL, b"need non-zero length")
    assert conn.receive_data(req(Cmd.BLOCK_STATUS, 0, SIZE, CmdFlag.REQ_ONE)) == [
        Request(Cmd.BLOCK_STATUS, CmdFlag.REQ_ONE, 7, 0, SIZE)]
    # trim and write zeroes have no payload, so no size limit below the export's
    big = FakeExport("big", writable=True, size=1 << 40)
    conn = ServerConnection({"big": big})
    conn.receive_data(struct.pack(">I", 3) + opt(Opt.GO, info_data(b"big")))
    assert conn.receive_data(req(Cmd.TRIM, 0, 0xFFFFFFFF)) == [
        Request(Cmd.TRIM, 0, 7, 0, 0xFFFFFFFF)]


def test_simple_reply_errors_without_structured() -> None:
    conn, _ = negotiated(b"ro", structured=False)
    assert conn.receive_data(req(Cmd.READ, 0, 512, CmdFlag.DF)) == [simple_reply(7, NBD_EINVAL)]
    assert conn.receive_data(req(Cmd.READ, 0, (32 << 20) + 1)) == [simple_reply(7, NBD_EINVAL)]
    assert conn.receive_data(req(Cmd.BLOCK_STATUS, 0, 512)) == [simple_reply(7, NBD_EINVAL)]


def test_refused_write_payload_is_skipped() -> None:
    conn, _ = negotiated(b"ro")
    events = conn.receive_data(req(Cmd.WRITE, 0, 100_000) + b"x" * 100_000 + req(Cmd.READ, 0, 8))
    assert isinstance(events[0], bytes)
    assert events[1:] == [Request(Cmd.READ, 0, 7, 0, 8)]


def test_oversized_write_disconnects() -> None:
    conn, _ = negotiated()
    events = conn.receive_data(req(Cmd.WRITE, 0, (32 << 20) + 1) + b"xx")
    assert isinstance(events[0], bytes)
    assert events[1] == Disconnect("Request handling failed in intermediate state")


def test_disc_and_bad_magic() -> None:
    conn, _ = negotiated()
    assert conn.receive_data(req(Cmd.DISC)) == [Disconnect(None)]
    conn, _ = negotiated()
    events = conn.receive_data(req(Cmd.READ, 0, 8) + b"\x25\x60\x95\x14" + bytes(24))
    assert events == [Request(0, 0, 7, 0, 8), Disconnect("invalid magic (got 0x25609514)")]


def test_reply_builders() -> None:
    assert simple_reply(5, 22) == struct.pack(">IIQ", 0x67446698, 22, 5)
    chunk = error_chunk(5, 5, "boom", offset=4096)
    assert chunk == struct.pack(">IHHQIIH", 0x668E33EF, 1, 0x8002, 5, 18, 5, 4) + b"boom" + \
        struct.pack(">Q", 4096)
    assert block_status_chunk(5, 2, [(512, 3), (1024, 0)], True) == struct.pack(
        ">IHHQIIIIII", 0x668E33EF, 1, 5, 5, 20, 2, 512, 3, 1024, 0)


# ----- properties -----------------------------------------------------------

EVENT_TYPES = (bytes, Request, TransmissionStarted, StartTLS, Disconnect)


def feed_all(conn: ServerConnection, data: bytes, splits: list[int]) -> list:
    events: list = []
    pos = 0
    for size in [*splits, len(data)]:
        if conn.closed or pos >= len(data):
            break
        events += conn.receive_data(data[pos:pos + size])
        pos += size
    return events


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage=st.binary(max_size=2048), splits=st.lists(st.integers(1, 64), max_size=20),
       phase=st.sampled_from(["flags", "options", "transmission", "transmission-simple"]))
def test_arbitrary_bytes_never_raise(garbage: bytes, splits: list[int], phase: str) -> None:
    """Whatever a client sends, the protocol answers with events and never
    raises; only feeding a closed connection is an error."""
    if phase == "flags":
        conn = ServerConnection(exports())
    elif phase == "options":
        conn = connect()
    else:
        conn, _ = negotiated(b"rw", structured=phase == "transmission",
                             meta=(b"base:allocation",) if phase == "transmission" else ())
    events = feed_all(conn, garbage, splits)
    assert all(isinstance(e, EVENT_TYPES) for e in events)
    assert sum(isinstance(e, Disconnect) for e in events) <= 1
    if conn.closed:
        with pytest.raises(ProtocolError):
            conn.receive_data(b"\0")


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(min_size=1, max_size=512))
def test_arbitrary_options_never_raise(garbage: bytes) -> None:
    """Well-framed options with random payloads always get a reply."""
    conn = connect()
    conn.receive_data(opt(Opt.STRUCTURED_REPLY))
    for option in (Opt.INFO, Opt.GO, Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT, Opt.LIST):
        if conn.closed or conn.export is not None:
            break
        events = conn.receive_data(opt(option, garbage))
        assert events and all(isinstance(e, EVENT_TYPES) for e in events)


request_st = st.tuples(
    st.sampled_from([Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES,
                     Cmd.BLOCK_STATUS]),
    st.integers(0, 2**64 - 1),          # handle
    st.integers(0, SIZE),               # offset
    st.integers(0, 4096),               # length
    st.sampled_from([0, CmdFlag.FUA]),
).filter(lambda r: r[2] + r[3] <= SIZE and (r[0] != Cmd.BLOCK_STATUS or r[3] > 0))


@settings(max_examples=200, deadline=None)
@given(requests=st.lists(request_st, min_size=1, max_size=20),
       splits=st.lists(st.integers(1, 200), max_size=40))
def test_valid_requests_round_trip(requests: list, splits: list[int]) -> None:
    """Valid requests come out field for field, however the stream is cut."""
    conn, _ = negotiated(b"rw", meta=(b"base:allocation",))
    stream = b""
    expected = []
    for i, (rtype, handle, offset, length, flags) in enumerate(requests):
        if rtype == Cmd.FLUSH:
            offset = length = 0
        data = bytes([i % 256]) * length if rtype == Cmd.WRITE else b""
        stream += req(rtype, offset, length, flags, handle) + data
        expected.append(Request(rtype, flags, handle, offset, length,
                                bytearray(data) if rtype == Cmd.WRITE else None))
    assert feed_all(conn, stream, splits) == expected
