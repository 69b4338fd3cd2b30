# SPDX-License-Identifier: GPL-2.0-or-later
"""Server side of the NBD protocol, sans-IO: bytes in, events out.

Written from the NBD protocol specification (NetworkBlockDevice/nbd
``doc/proto.md``): fixed newstyle handshake, option haggling and the
transmission phase with simple and structured replies. Nothing here touches a
socket, so the whole protocol is testable by feeding bytes.

Incoming bytes are written straight into buffers the connection hands out
(:meth:`ServerConnection.get_buffer` / :meth:`ServerConnection.buffer_updated`,
the shape of :class:`asyncio.BufferedProtocol`), so that write payloads land in
their final buffer without an extra copy. Each call returns a list of events:

* ``bytes``: data to send as one unit (handshake replies, error replies);
* :class:`TransmissionStarted`: the client chose an export;
* :class:`Request`: a validated transmission request to carry out;
* :class:`StartTLS`: hand the socket to TLS and call ``tls_started()``;
* :class:`Disconnect`: close the connection (``reason`` None when the client
  asked to, else the log line's text).

Requests that fail validation are answered here and never reach the caller.
Replies to valid requests are built with the module functions
(:func:`simple_reply`, :func:`pack_data_chunk_header`, ...) and
:meth:`ServerConnection.error_reply`.
"""

from __future__ import annotations

import enum
import errno as _errno
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

# ----- constants from the specification ----------------------------------

NBDMAGIC = 0x4E42444D41474943            # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054            # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0             # handshake flags
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0           # client flags
FLAG_C_NO_ZEROES = 1 << 1


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_PLATFORM = (1 << 31) + 4
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_SHUTDOWN = (1 << 31) + 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
    ERR_TOO_BIG = (1 << 31) + 9


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TFlag(enum.IntFlag):
    """Transmission flags."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyType(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


REPLY_FLAG_DONE = 1 << 0

#: base:allocation extent flags.
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# Error values of the transmission phase (the spec's restricted set).
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

_ERRNO_TO_NBD = {
    _errno.EPERM: NBD_EPERM, _errno.EROFS: NBD_EPERM, _errno.EACCES: NBD_EPERM,
    _errno.EIO: NBD_EIO, _errno.ENOMEM: NBD_ENOMEM, _errno.EINVAL: NBD_EINVAL,
    _errno.ENOSPC: NBD_ENOSPC, _errno.EDQUOT: NBD_ENOSPC, _errno.EFBIG: NBD_ENOSPC,
    _errno.EOVERFLOW: NBD_EOVERFLOW, _errno.ENOTSUP: NBD_ENOTSUP,
    _errno.ESHUTDOWN: NBD_ESHUTDOWN,
}


def nbd_errno(err: int | None) -> int:
    """Map a host errno to the spec's set; anything else reads as EINVAL,
    which is also what the spec tells clients to assume for unknown values."""
    return _ERRNO_TO_NBD.get(err or 0, NBD_EINVAL)


# ----- limits ---------------------------------------------------------------

#: Longest string the spec allows (export names, queries, messages).
MAX_STRING = 4096
#: Advertised block sizes: QSD's values for a byte-addressable node.
MIN_BLOCK = 1
PREFERRED_BLOCK = 4096
MAX_PAYLOAD = 32 * 1024 * 1024
#: Options longer than this end the connection (QSD's limit).
MAX_OPTION_LENGTH = 32 * 1024 * 1024
#: Known options with more data than this are skipped and refused with
#: ERR_TOO_BIG instead of being buffered: bounds handshake memory.
MAX_OPTION_BUFFER = 64 * 1024

_OPTION_NAMES: dict[int, str] = {
    Opt.EXPORT_NAME: "export name", Opt.ABORT: "abort", Opt.LIST: "list",
    Opt.STARTTLS: "starttls", Opt.INFO: "info", Opt.GO: "go",
    Opt.STRUCTURED_REPLY: "structured reply",
    Opt.LIST_META_CONTEXT: "list meta context", Opt.SET_META_CONTEXT: "set meta context",
}

_CMD_NAMES: dict[int, str] = {
    Cmd.READ: "read", Cmd.WRITE: "write", Cmd.DISC: "disconnect", Cmd.FLUSH: "flush",
    Cmd.TRIM: "trim", Cmd.CACHE: "cache", Cmd.WRITE_ZEROES: "write zeroes",
    Cmd.BLOCK_STATUS: "block status",
}

#: Command flags each request accepts (FUA is valid on every command), as
#: plain ints: inverting an IntFlag would drop the undefined bits.
_ALLOWED_FLAGS: dict[int, int] = {
    Cmd.READ: CmdFlag.FUA | CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.DISC: CmdFlag.FUA,
    Cmd.FLUSH: CmdFlag.FUA,
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: CmdFlag.FUA,
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.FUA | CmdFlag.REQ_ONE,
}
_ALLOWED_FLAGS = {cmd: int(flags) for cmd, flags in _ALLOWED_FLAGS.items()}
_MODIFYING = frozenset((Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES))
#: Commands whose length is bounded by MAX_PAYLOAD (they carry it on the wire).
_PAYLOAD_LIMITED = frozenset((Cmd.READ, Cmd.WRITE))

# ----- wire structures ------------------------------------------------------

_GREETING = struct.Struct(">QQH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_OPT_HEADER = struct.Struct(">QII")              # magic, option, length
_OPT_REPLY = struct.Struct(">QIII")              # magic, option, type, length
_EXPORT_REPLY = struct.Struct(">QH")             # size, transmission flags
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_REQUEST = struct.Struct(">IHHQQI")              # magic, flags, type, handle, offset, length
_SIMPLE = struct.Struct(">IIQ")                  # magic, error, handle
_CHUNK = struct.Struct(">IHHQI")                 # magic, flags, type, handle, length
_DATA_CHUNK = struct.Struct(">IHHQIQ")           # chunk header + offset
_HOLE_CHUNK = struct.Struct(">IHHQIQI")          # chunk header + offset + hole size
_ERROR_HEAD = struct.Struct(">IHHQIIH")          # chunk header + error + message length
_EXTENT = struct.Struct(">II")

REQUEST_SIZE = _REQUEST.size
SIMPLE_HEADER_SIZE = _SIMPLE.size
DATA_CHUNK_HEADER_SIZE = _DATA_CHUNK.size


# ----- what the connection needs to know about an export --------------------

class MetaContextInfo(Protocol):
    """A metadata context an export offers: its name and the id clients
    are told (which also orders the replies)."""

    @property
    def name(self) -> str: ...

    @property
    def id(self) -> int: ...


class ExportInfo(Protocol):
    """The handshake's view of an export (the server's export objects)."""

    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...

    @property
    def writable(self) -> bool: ...

    @property
    def contexts(self) -> Sequence[MetaContextInfo]: ...

    @property
    def size(self) -> int: ...

    @property
    def min_block(self) -> int:
        """The node's request alignment (1, or e.g. 512 with O_DIRECT)."""
        ...


# ----- events -------------------------------------------------------------

@dataclass(slots=True)
class Request:
    """A valid transmission request; ``data`` is the payload of a WRITE."""

    type: int
    flags: int
    handle: int
    offset: int
    length: int
    data: bytearray | None = None


@dataclass(slots=True)
class TransmissionStarted:
    """Option haggling is over: serve ``export``.

    ``contexts`` pairs each selected metadata context with the id the client
    was told; ``flags`` are the transmission flags the client got.
    """

    export: ExportInfo
    structured: bool
    contexts: list[tuple[int, MetaContextInfo]]
    flags: int


@dataclass(slots=True)
class StartTLS:
    """The ACK for NBD_OPT_STARTTLS is queued: send it, hand the socket to
    TLS and call ``tls_started()`` before any decrypted byte comes in."""


@dataclass(slots=True)
class Disconnect:
    """Close the connection; ``reason`` is None for a client's clean exit."""

    reason: str | None
    handshake: bool = False


Event = bytes | Request | TransmissionStarted | StartTLS | Disconnect


class ProtocolError(Exception):
    """The connection was used after it ended."""


class _State(enum.Enum):
    CLIENT_FLAGS = "client flags"
    OPTION = "option"
    OPTION_SKIP = "option skip"
    TLS_WAIT = "tls wait"
    REQUEST = "request"
    PAYLOAD = "payload"
    PAYLOAD_SKIP = "payload skip"
    CLOSED = "closed"


class _OptionError(Exception):
    """An option request to refuse with an error reply."""

    def __init__(self, rep: Rep, message: str) -> None:
        super().__init__(message)
        self.rep = rep
        self.message = message


def _sanitize(name: str) -> str:
    """Names in error replies: at most 80 bytes, then "..." (as QEMU)."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) < 80:
        return name
    return raw[:80].decode("utf-8", "replace") + "..."


# ----- reply builders -----------------------------------------------------

def option_reply(option: int, rep: int, data: bytes = b"") -> bytes:
    return _OPT_REPLY.pack(OPTION_REPLY_MAGIC, option, rep, len(data)) + data


def simple_reply(handle: int, error: int = 0) -> bytes:
    return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, handle)


def pack_simple_header(buf: bytearray | memoryview, handle: int, error: int = 0) -> None:
    _SIMPLE.pack_into(buf, 0, SIMPLE_REPLY_MAGIC, error, handle)


def pack_data_chunk_header(buf: bytearray | memoryview, pos: int, handle: int,
                           offset: int, length: int, done: bool) -> None:
    """Header of an OFFSET_DATA chunk whose ``length`` data bytes follow at pos+28."""
    _DATA_CHUNK.pack_into(buf, pos, STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0,
                          ReplyType.OFFSET_DATA, handle, length + 8, offset)


def hole_chunk(handle: int, offset: int, length: int, done: bool) -> bytes:
    return _HOLE_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0,
                            ReplyType.OFFSET_HOLE, handle, 12, offset, length)


def none_chunk(handle: int) -> bytes:
    return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.NONE, handle, 0)


def error_chunk(handle: int, error: int, message: str, offset: int | None = None,
                done: bool = True) -> bytes:
    """ERROR (or ERROR_OFFSET when ``offset`` is given) chunk."""
    msg = message.encode("utf-8", "replace")[:MAX_STRING]
    tail = b"" if offset is None else struct.pack(">Q", offset)
    rtype = ReplyType.ERROR if offset is None else ReplyType.ERROR_OFFSET
    head = _ERROR_HEAD.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, rtype,
                            handle, 6 + len(msg) + len(tail), error, len(msg))
    return head + msg + tail


def block_status_chunk(handle: int, context_id: int, extents: Iterable[tuple[int, int]],
                       done: bool) -> bytes:
    """BLOCK_STATUS chunk from (length, flags) pairs."""
    body = bytearray(_U32.pack(context_id))
    for length, flags in extents:
        body += _EXTENT.pack(length, flags)
    head = _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0,
                       ReplyType.BLOCK_STATUS, handle, len(body))
    return head + bytes(body)


def transmission_flags(writable: bool, structured: bool) -> int:
    """The flags QSD 7.2 sends: flush, FUA, multi-conn and cache always;
    trim, zeroes and fast zero when writable; DF once structured replies
    are on."""
    flags = (TFlag.HAS_FLAGS | TFlag.SEND_FLUSH | TFlag.SEND_FUA | TFlag.CAN_MULTI_CONN
             | TFlag.SEND_CACHE)
    if writable:
        flags |= TFlag.SEND_TRIM | TFlag.SEND_WRITE_ZEROES | TFlag.SEND_FAST_ZERO
    else:
        flags |= TFlag.READ_ONLY
    if structured:
        flags |= TFlag.SEND_DF
    return int(flags)


#: Queries that, when listing, stand for every context under them.
_WILDCARDS = ("base:", "qemu:", "qemu:dirty-bitmap:")


def match_contexts(contexts: Sequence[MetaContextInfo], query: str,
                   listing: bool) -> list[int]:
    """Indices of ``contexts`` a query selects, as QEMU 7.2 matches them.

    Listing treats the bare namespaces "base:", "qemu:" and
    "qemu:dirty-bitmap:" as wildcards; otherwise a query names one context
    exactly (the first of that name: an export may list a bitmap twice).
    Unknown namespaces and leaves match nothing.
    """
    if listing and query in _WILDCARDS:
        return [i for i, c in enumerate(contexts) if c.name.startswith(query)]
    for i, c in enumerate(contexts):
        if c.name == query:
            return [i]
    return []


class _OptionReader:
    """Reads an option's payload field by field, failing where QEMU's
    sequential reads fail (and with its texts)."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def _inconsistent(self) -> _OptionError:
        return _OptionError(Rep.ERR_INVALID, f"Inconsistent lengths in option {self.what}")

    def u32(self) -> int:
        if len(self.data) - self.pos < 4:
            raise self._inconsistent()
        (value,) = _U32.unpack_from(self.data, self.pos)
        self.pos += 4
        return value

    def string(self, length: int) -> str:
        if length > len(self.data) - self.pos:
            raise self._inconsistent()
        raw = self.data[self.pos:self.pos + length]
        self.pos += length
        if b"\0" in raw:
            raise _OptionError(Rep.ERR_INVALID, f"Unexpected embedded NUL in option {self.what}")
        # Undecodable bytes stay distinct from every valid name.
        return raw.decode("utf-8", "surrogateescape")

    def name(self) -> str:
        length = self.u32()
        if length > MAX_STRING:
            raise _OptionError(Rep.ERR_INVALID, f"Invalid name length: {length}")
        return self.string(length)

    def query(self) -> str | None:
        """The next query, or None for one too long to consider (skipped)."""
        length = self.u32()
        if length > MAX_STRING:
            if length > len(self.data) - self.pos:
                raise self._inconsistent()
            self.pos += length
            return None
        return self.string(length)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise self._inconsistent()


# ----- the connection -----------------------------------------------------

_RECV_BUFFER = 256 * 1024
#: Payload tails at least this long are received straight into the payload.
_DIRECT_PAYLOAD = 64 * 1024


class ServerConnection:
    """One client connection, from greeting to disconnect.

    ``exports`` is the server's live name -> export mapping, consulted on
    every option so that exports added or removed meanwhile are seen.
    ``tls`` turns on FORCEDTLS mode: every option but STARTTLS and ABORT is
    refused until :meth:`tls_started` is called.
    """

    def __init__(self, exports: Mapping[str, ExportInfo], tls: bool = False) -> None:
        self.exports = exports
        self.tls_required = tls
        self.tls_active = False
        self.fixed_newstyle = False
        self.no_zeroes = False
        self.structured = False
        self.export: ExportInfo | None = None
        self.size = 0
        self.read_only = True
        self._meta_export: str | None = None
        self._meta_selected: list[tuple[int, MetaContextInfo]] = []
        self._state = _State.CLIENT_FLAGS
        self._buf = bytearray(_RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._option = 0
        self._option_length = 0
        self._skip = 0
        self._skip_reply: bytes = b""
        self._payload: bytearray | None = None
        self._payload_fill = 0
        self._payload_request: Request | None = None
        self._direct = False

    # ----- I/O surface ------------------------------------------------------
    def greeting(self) -> bytes:
        return _GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)

    @property
    def closed(self) -> bool:
        return self._state is _State.CLOSED

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes should go (never empty)."""
        if self._state is _State.PAYLOAD and self._payload is not None:
            remaining = len(self._payload) - self._payload_fill
            if remaining >= _DIRECT_PAYLOAD and self._start == self._end:
                self._direct = True
                return memoryview(self._payload)[self._payload_fill:]
        self._direct = False
        if self._end == len(self._buf):
            self._make_room()
        return self._view[self._end:]

    def buffer_updated(self, nbytes: int) -> list[Event]:
        """Account for ``nbytes`` written into the last :meth:`get_buffer`."""
        if self._state is _State.CLOSED:
            raise ProtocolError("data received on a closed NBD connection")
        out: list[Event] = []
        if self._direct:
            self._direct = False
            self._payload_fill += nbytes
            if self._payload_fill == len(self._payload or b""):
                self._finish_payload(out)
        else:
            self._end += nbytes
        self._run(out)
        return out

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Convenience for tests: copy ``data`` in through the buffer API."""
        out: list[Event] = []
        view = memoryview(data).cast("B")
        while view:
            dest = self.get_buffer(len(view))
            n = min(len(dest), len(view))
            dest[:n] = view[:n]
            view = view[n:]
            out += self.buffer_updated(n)
            if self._state is _State.CLOSED:
                break
        return out

    def tls_started(self) -> None:
        """The connection now belongs to the TLS layer: forget what was
        negotiated before and read options again (decrypted)."""
        self.tls_active = True
        self.structured = False
        self._meta_export = None
        self._meta_selected = []
        self._start = self._end = 0
        self._state = _State.OPTION

    def close(self) -> None:
        self._state = _State.CLOSED

    def error_reply(self, handle: int, error: int, message: str) -> bytes:
        """A failed request's reply: an ERROR chunk when structured replies
        are on (so the text reaches the user), else a simple reply."""
        if self.structured:
            return error_chunk(handle, error, message)
        return simple_reply(handle, error)

    # ----- buffer management ---------------------------------------------
    def _make_room(self, need: int = 0) -> None:
        """Move unconsumed bytes to the front, growing for a long option."""
        pending = self._end - self._start
        if need > len(self._buf):
            new = bytearray(need)
            new[:pending] = self._buf[self._start:self._end]
            self._buf = new
            self._view = memoryview(new)
        elif self._start:
            self._buf[:pending] = self._buf[self._start:self._end]
        self._start = 0
        self._end = pending

    def _shrink(self) -> None:
        """Return to the normal buffer once a long option is consumed."""
        if len(self._buf) > _RECV_BUFFER and self._end - self._start <= _RECV_BUFFER:
            pending = self._buf[self._start:self._end]
            self._buf = bytearray(_RECV_BUFFER)
            self._view = memoryview(self._buf)
            self._buf[:len(pending)] = pending
            self._start, self._end = 0, len(pending)

    # ----- state machine --------------------------------------------------
    def _run(self, out: list[Event]) -> None:
        while self._STEPS[self._state](self, out):
            pass
        if self._start == self._end:
            self._start = self._end = 0

    def _close(self, out: list[Event], reason: str | None) -> bool:
        handshake = self.export is None
        self._state = _State.CLOSED
        out.append(Disconnect(reason, handshake))
        return False

    def _step_client_flags(self, out: list[Event]) -> bool:
        if self._end - self._start < 4:
            return False
        (flags,) = _U32.unpack_from(self._buf, self._start)
        self._start += 4
        if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            return self._close(out, f"Unknown client flags 0x{flags:x} received")
        self.fixed_newstyle = bool(flags & FLAG_C_FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        self._state = _State.OPTION
        return True

    def _step_option(self, out: list[Event]) -> bool:
        avail = self._end - self._start
        if avail < _OPT_HEADER.size:
            return False
        magic, option, length = _OPT_HEADER.unpack_from(self._buf, self._start)
        if magic != IHAVEOPT:
            return self._close(out, "Bad magic received")
        if length > MAX_OPTION_LENGTH:
            return self._close(out, f"len ({length} ) is larger than max len "
                                    f"({MAX_OPTION_LENGTH})")
        if not self.fixed_newstyle and option != Opt.EXPORT_NAME:
            return self._close(out, f"Unsupported option {option} "
                                    f"({_OPTION_NAMES.get(option, '<unknown>')})")
        handler = self._OPTIONS.get(option)
        if handler is None or length > MAX_OPTION_BUFFER:
            self._start += _OPT_HEADER.size
            if handler is None:
                reply = option_reply(option, Rep.ERR_UNSUP, self._unsupported(option))
            else:
                reply = option_reply(option, Rep.ERR_TOO_BIG,
                                     f"option '{_OPTION_NAMES[option]}' is too long".encode())
            self._skip, self._skip_reply = length, reply
            self._state = _State.OPTION_SKIP
            return True
        if avail < _OPT_HEADER.size + length:
            if self._start + _OPT_HEADER.size + length > len(self._buf):
                self._make_room(_OPT_HEADER.size + length)
            return False
        begin = self._start + _OPT_HEADER.size
        data = bytes(self._buf[begin:begin + length])
        self._start = begin + length
        self._shrink()
        self._option = option
        if self.tls_required and not self.tls_active and option not in (
                Opt.STARTTLS, Opt.ABORT):
            if option == Opt.EXPORT_NAME:
                return self._close(out, "Option 0x1 not permitted before TLS")
            out.append(option_reply(option, Rep.ERR_TLS_REQD,
                                    f"Option 0x{option:x} not permitted before TLS".encode()))
            return True
        try:
            return handler(self, data, out)
        except _OptionError as e:
            out.append(option_reply(option, e.rep, e.message.encode("utf-8", "replace")))
            return True

    def _unsupported(self, option: int) -> bytes:
        name = _OPTION_NAMES.get(option, "<unknown>")
        return f"Unsupported option {option} ({name})".encode()

    def _step_option_skip(self, out: list[Event]) -> bool:
        n = min(self._skip, self._end - self._start)
        self._start += n
        self._skip -= n
        if self._skip:
            self._start = self._end = 0
            return False
        out.append(self._skip_reply)
        self._state = _State.OPTION
        return True

    def _step_tls_wait(self, out: list[Event]) -> bool:
        self._start = self._end = 0       # a client must not send before TLS
        return False

    # ----- options ------------------------------------------------------
    def _no_data(self, data: bytes) -> None:
        if data:
            raise _OptionError(Rep.ERR_INVALID,
                               f"option '{_OPTION_NAMES[self._option]}' has unexpected length")

    def _lookup(self, name: str) -> ExportInfo:
        export = self.exports.get(name)
        if export is None:
            raise _OptionError(Rep.ERR_UNKNOWN, f"export '{_sanitize(name)}' not present")
        return export

    def _opt_export_name(self, data: bytes, out: list[Event]) -> bool:
        if len(data) > MAX_STRING:
            return self._close(out, "Bad length received")
        name = data.decode("utf-8", "replace")
        export = self.exports.get(name)
        if export is None:
            return self._close(out, f"export '{name}' not present")
        self._keep_contexts_for(name)
        started = self._enter_transmission(export)
        reply = _EXPORT_REPLY.pack(self.size, started.flags)
        out.append(reply if self.no_zeroes else reply + bytes(124))
        out.append(started)
        return True

    def _opt_abort(self, data: bytes, out: list[Event]) -> bool:
        out.append(option_reply(Opt.ABORT, Rep.ACK))
        return self._close(out, None)

    def _opt_list(self, data: bytes, out: list[Event]) -> bool:
        self._no_data(data)
        for export in list(self.exports.values()):
            name = export.name.encode()
            out.append(option_reply(Opt.LIST, Rep.SERVER,
                                    _U32.pack(len(name)) + name + export.description.encode()))
        out.append(option_reply(Opt.LIST, Rep.ACK))
        return True

    def _opt_starttls(self, data: bytes, out: list[Event]) -> bool:
        self._no_data(data)
        if not self.tls_required:
            raise _OptionError(Rep.ERR_POLICY, "TLS not configured")
        if self.tls_active:
            raise _OptionError(Rep.ERR_INVALID, "TLS already enabled")
        out.append(option_reply(Opt.STARTTLS, Rep.ACK))
        out.append(StartTLS())
        self._state = _State.TLS_WAIT
        return False

    def _opt_info_go(self, data: bytes, out: list[Event]) -> bool:
        what = _OPTION_NAMES[self._option]
        inconsistent = _OptionError(Rep.ERR_INVALID, f"Inconsistent lengths in option {what}")
        if len(data) < 6:
            raise inconsistent
        (nlen,) = _U32.unpack_from(data, 0)
        if nlen > len(data) - 6:
            raise inconsistent
        if nlen > MAX_STRING:
            raise _OptionError(Rep.ERR_INVALID, "export name too long")
        name = data[4:4 + nlen].decode("utf-8", "replace")
        (count,) = _U16.unpack_from(data, 4 + nlen)
        rest = len(data) - 6 - nlen
        if rest < 2 * count:
            raise inconsistent
        if rest > 2 * count:
            raise _OptionError(Rep.ERR_INVALID, f"option '{what}' has unexpected length")
        requests = {r for (r,) in struct.iter_unpack(">H", data[6 + nlen:])}
        export = self._lookup(name)
        option = self._option
        align = export.min_block
        # QEMU tolerates any client on GO, but NBD_OPT_INFO for an aligned
        # export must ask for the block sizes.
        if option == Opt.INFO and Info.BLOCK_SIZE not in requests and align > 1:
            raise _OptionError(Rep.ERR_BLOCK_SIZE_REQD,
                               "request NBD_INFO_BLOCK_SIZE to use this export")
        # The real minimum only for clients that promise to honour it.
        minimum = align if option == Opt.INFO or Info.BLOCK_SIZE in requests else MIN_BLOCK
        if Info.NAME in requests:
            out.append(option_reply(option, Rep.INFO, _U16.pack(Info.NAME) + export.name.encode()))
        if export.description:
            out.append(option_reply(option, Rep.INFO, _U16.pack(Info.DESCRIPTION)
                                    + export.description.encode()))
        out.append(option_reply(option, Rep.INFO, _INFO_BLOCK_SIZE.pack(
            Info.BLOCK_SIZE, minimum, max(PREFERRED_BLOCK, minimum), MAX_PAYLOAD)))
        flags = transmission_flags(export.writable, self.structured)
        out.append(option_reply(option, Rep.INFO, _INFO_EXPORT.pack(Info.EXPORT, export.size, flags)))
        out.append(option_reply(option, Rep.ACK))
        if option == Opt.GO:
            self._keep_contexts_for(name)
            out.append(self._enter_transmission(export))
        return True

    def _opt_structured_reply(self, data: bytes, out: list[Event]) -> bool:
        self._no_data(data)
        if self.structured:
            raise _OptionError(Rep.ERR_INVALID, "structured reply already negotiated")
        self.structured = True
        out.append(option_reply(Opt.STRUCTURED_REPLY, Rep.ACK))
        return True

    def _opt_meta_context(self, data: bytes, out: list[Event]) -> bool:
        """LIST/SET_META_CONTEXT. Replies come in context-id order whatever
        the order of the queries; SET replaces the previous selection even
        when it fails."""
        option = self._option
        listing = option == Opt.LIST_META_CONTEXT
        what = _OPTION_NAMES[option]
        if not listing:
            self._meta_export, self._meta_selected = None, []
            if not self.structured:
                raise _OptionError(Rep.ERR_INVALID, f"request option '{what}' when "
                                   "structured reply is not negotiated")
        reader = _OptionReader(data, what)
        name = reader.name()
        export = self._lookup(name)
        contexts = export.contexts
        count = reader.u32()
        chosen: set[int] = set()
        if listing and not count:
            chosen.update(range(len(contexts)))
        for _ in range(count):
            query = reader.query()
            if query is not None:
                chosen.update(match_contexts(contexts, query, listing))
        # QEMU would read trailing bytes as the next option; refuse them.
        reader.end()
        order = sorted(chosen, key=lambda i: contexts[i].id)
        for i in order:
            cid = 0 if listing else contexts[i].id
            out.append(option_reply(option, Rep.META_CONTEXT,
                                    _U32.pack(cid) + contexts[i].name.encode()))
        if not listing:
            self._meta_export = name
            self._meta_selected = [(contexts[i].id, contexts[i]) for i in order]
        out.append(option_reply(option, Rep.ACK))
        return True

    def _keep_contexts_for(self, name: str) -> None:
        """Selected contexts only count for the export they were set for."""
        if self._meta_export != name:
            self._meta_selected = []

    def _enter_transmission(self, export: ExportInfo) -> TransmissionStarted:
        flags = transmission_flags(export.writable, self.structured)
        self.export = export
        self.size = export.size
        self.read_only = not export.writable
        self._state = _State.REQUEST
        return TransmissionStarted(export, self.structured, list(self._meta_selected), flags)

    _OPTIONS: ClassVar[dict[int, Callable[[ServerConnection, bytes, list[Event]], bool]]] = {
        Opt.EXPORT_NAME: _opt_export_name,
        Opt.ABORT: _opt_abort,
        Opt.LIST: _opt_list,
        Opt.STARTTLS: _opt_starttls,
        Opt.INFO: _opt_info_go,
        Opt.GO: _opt_info_go,
        Opt.STRUCTURED_REPLY: _opt_structured_reply,
        Opt.LIST_META_CONTEXT: _opt_meta_context,
        Opt.SET_META_CONTEXT: _opt_meta_context,
    }

    # ----- transmission -------------------------------------------------
    def _step_request(self, out: list[Event]) -> bool:
        buf = self._buf
        start = self._start
        end = self._end
        size = self.size
        while end - start >= REQUEST_SIZE:
            magic, flags, rtype, handle, offset, length = _REQUEST.unpack_from(buf, start)
            start += REQUEST_SIZE
            if magic != REQUEST_MAGIC:
                self._start = start
                return self._close(out, f"invalid magic (got 0x{magic:x})")
            # The common case, checked inline: a plain read inside the export.
            if rtype == 0 and not flags & ~1 and length <= MAX_PAYLOAD and offset + length <= size:
                out.append(Request(0, flags, handle, offset, length))
                continue
            error = self._validate(flags, rtype, offset, length)
            if rtype == Cmd.WRITE:
                self._start = start
                return self._begin_payload(out, Request(rtype, flags, handle, offset, length),
                                           error)
            if error is not None:
                out.append(self.error_reply(handle, *error))
            elif rtype == Cmd.DISC:
                self._start = start
                return self._close(out, None)
            else:
                out.append(Request(rtype, flags, handle, offset, length))
        self._start = start
        return False

    def _validate(self, flags: int, rtype: int, offset: int,
                  length: int) -> tuple[int, str] | None:
        """(error, message) for a request to refuse, else None."""
        allowed = _ALLOWED_FLAGS.get(rtype)
        if allowed is None:
            return NBD_EINVAL, f"invalid request type ({rtype}) received"
        if not self.structured:
            allowed &= ~int(CmdFlag.DF)
        if flags & ~allowed:
            return NBD_EINVAL, (f"unsupported flags for command {_CMD_NAMES[rtype]} "
                                f"(got 0x{flags:x})")
        if rtype == Cmd.DISC or rtype == Cmd.FLUSH:
            return None
        if self.read_only and rtype in _MODIFYING:
            return NBD_EPERM, "Export is read-only"
        if length > MAX_PAYLOAD and rtype in _PAYLOAD_LIMITED:
            err = NBD_EOVERFLOW if rtype == Cmd.READ and self.structured else NBD_EINVAL
            return err, f"len ({length} ) is larger than max len ({MAX_PAYLOAD})"
        if offset > self.size or length > self.size - offset:
            err = NBD_ENOSPC if rtype in (Cmd.WRITE, Cmd.WRITE_ZEROES) else NBD_EINVAL
            return err, f"operation past EOF; From: {offset}, Len: {length}, Size: {self.size}"
        if rtype == Cmd.BLOCK_STATUS:
            if not self.structured or not self._meta_selected:
                return NBD_EINVAL, "CMD_BLOCK_STATUS not negotiated"
            if not length:
                return NBD_EINVAL, "need non-zero length"
        return None

    def _begin_payload(self, out: list[Event], request: Request,
                       error: tuple[int, str] | None) -> bool:
        length = request.length
        if error is not None:
            out.append(self.error_reply(request.handle, *error))
            if length > MAX_PAYLOAD:
                return self._close(out, "Request handling failed in intermediate state")
            self._skip = length
            self._state = _State.PAYLOAD_SKIP
            return True
        payload = bytearray(length)
        n = min(length, self._end - self._start)
        payload[:n] = self._view[self._start:self._start + n]
        self._start += n
        request.data = payload
        self._payload, self._payload_fill, self._payload_request = payload, n, request
        self._state = _State.PAYLOAD
        if n == length:
            self._finish_payload(out)
        return True

    def _step_payload(self, out: list[Event]) -> bool:
        payload = self._payload
        assert payload is not None
        n = min(len(payload) - self._payload_fill, self._end - self._start)
        if n:
            payload[self._payload_fill:self._payload_fill + n] = \
                self._view[self._start:self._start + n]
            self._start += n
            self._payload_fill += n
        if self._payload_fill < len(payload):
            return False
        self._finish_payload(out)
        return True

    def _finish_payload(self, out: list[Event]) -> None:
        assert self._payload_request is not None
        out.append(self._payload_request)
        self._payload = self._payload_request = None
        self._payload_fill = 0
        self._state = _State.REQUEST

    def _step_payload_skip(self, out: list[Event]) -> bool:
        n = min(self._skip, self._end - self._start)
        self._start += n
        self._skip -= n
        if self._skip:
            return False
        self._state = _State.REQUEST
        return True

    def _step_closed(self, out: list[Event]) -> bool:
        return False

    _STEPS: ClassVar[dict[_State, Callable[[ServerConnection, list[Event]], bool]]] = {
        _State.CLIENT_FLAGS: _step_client_flags,
        _State.OPTION: _step_option,
        _State.OPTION_SKIP: _step_option_skip,
        _State.TLS_WAIT: _step_tls_wait,
        _State.REQUEST: _step_request,
        _State.PAYLOAD: _step_payload,
        _State.PAYLOAD_SKIP: _step_payload_skip,
        _State.CLOSED: _step_closed,
    }
