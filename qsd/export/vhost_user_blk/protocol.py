# SPDX-License-Identifier: GPL-2.0-or-later
"""The vhost-user protocol, back-end side, without I/O.

Written from QEMU's ``docs/interop/vhost-user.rst``. Two layers:

* :class:`MessageReader` frames the byte stream into :class:`Message`s and
  pairs each with the file descriptors that arrived with its header.
  :meth:`MessageReader.want` says how many bytes to read next, so a
  transport that reads exactly that much never mixes one message's
  descriptors up with another's.
* :class:`Session` is the state machine of one front-end connection. It
  answers what it can by itself (features, queue count, config space) and
  turns everything that touches the device (memory table, vring set-up,
  kick/call descriptors, GET_VRING_BASE) into :class:`DeviceRequest`s for
  the transport to carry out, after which :meth:`Session.complete` gives
  the reply bytes (an explicit reply, a REPLY_ACK, or nothing).

Anything malformed raises :class:`ProtocolError`: the transport logs it and
drops the connection, as the specification allows ("If back-end detects some
error ... it may also close the connection"). Descriptors that come with a
message are owned by the session from :meth:`MessageReader.feed` on: it closes
the ones no request takes over.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size
#: The largest payload any request we accept can have (GET_CONFIG: 12 + 256).
MAX_PAYLOAD = 4096
#: Descriptors one message may carry (SET_MEM_TABLE: one per region).
MAX_FDS = 8
#: Regions in a SET_MEM_TABLE message, and slots for ADD_MEM_REG.
MAX_REGIONS = 8
MAX_MEM_SLOTS = 32
#: Our config space ends where QEMU 7.2's virtio_blk_config does.
MAX_CONFIG = 256

VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

VRING_IDX_MASK = 0xFF
VRING_NOFD = 0x100
MAX_VRING_NUM = 32768


class Req(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_SLAVE_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


# Virtio feature bits the transport layer owns (device bits live in blk.py).
F_RING_INDIRECT_DESC = 1 << 28
F_RING_EVENT_IDX = 1 << 29
F_PROTOCOL_FEATURES = 1 << 30
F_VERSION_1 = 1 << 32


class PF(enum.IntFlag):
    """Protocol features."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    REPLY_ACK = 1 << 3
    SLAVE_REQ = 1 << 5
    CONFIG = 1 << 9
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15


#: What we implement: multiqueue, acknowledgements, config space, a back-end
#: channel (held, used for nothing yet), incremental memory slots.
OUR_PROTOCOL_FEATURES = PF.MQ | PF.REPLY_ACK | PF.SLAVE_REQ | PF.CONFIG | PF.CONFIGURE_MEM_SLOTS


class ProtocolError(Exception):
    """The front-end broke the protocol; the connection must be dropped."""


@dataclass
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)


def encode(request: int, payload: bytes = b"", flags: int = VERSION | FLAG_REPLY) -> bytes:
    return HEADER.pack(request, flags, len(payload)) + payload


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


class MessageReader:
    """Frames front-end messages from a byte stream (sans I/O)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._fds: list[int] = []
        self._size: int | None = None      # payload size once the header is in

    def want(self) -> int:
        """Bytes to read next: the rest of the header, or of the payload."""
        if self._size is None:
            return HEADER_SIZE - len(self._buf)
        return HEADER_SIZE + self._size - len(self._buf)

    def feed(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> list[Message]:
        """Take bytes (and the descriptors received with them); complete messages.

        Raises ProtocolError for a bad header, an oversized payload, or
        descriptors arriving anywhere but with a message's first bytes.
        Descriptors received with a bad message are closed here."""
        if fds:
            if self._buf:
                self._fds.extend(fds)
                self.close()
                raise ProtocolError("file descriptors in the middle of a message")
            self._fds.extend(fds)
            if len(self._fds) > MAX_FDS:
                self.close()
                raise ProtocolError(f"more than {MAX_FDS} file descriptors with one message")
        out: list[Message] = []
        view = memoryview(data)
        while view:
            need = self.want()
            take = view[:need]
            self._buf += take
            view = view[len(take):]
            if self._size is None and len(self._buf) == HEADER_SIZE:
                request, flags, size = HEADER.unpack(self._buf)
                if flags & FLAG_VERSION_MASK != VERSION:
                    self.close()
                    raise ProtocolError(f"unsupported vhost-user version in flags 0x{flags:x}")
                if size > MAX_PAYLOAD:
                    self.close()
                    raise ProtocolError(f"payload of {size} bytes is too large (request {request})")
                self._size = size
            if self._size is not None and len(self._buf) == HEADER_SIZE + self._size:
                request, flags, _ = HEADER.unpack_from(self._buf)
                msg = Message(request, flags, bytes(self._buf[HEADER_SIZE:]), self._fds)
                self._buf = bytearray()
                self._fds = []
                self._size = None
                out.append(msg)
        return out

    def close(self) -> None:
        close_fds(self._fds)
        self._buf = bytearray()
        self._size = None


# ----- payloads ----------------------------------------------------------------

VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")
U64 = struct.Struct("<Q")
REGION = struct.Struct("<QQQQ")
CONFIG_HDR = struct.Struct("<III")


@dataclass(frozen=True)
class Region:
    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int


def _need(msg: Message, size: int) -> None:
    if len(msg.payload) < size:
        raise ProtocolError(f"{_name(msg.request)}: payload of {len(msg.payload)} bytes, "
                            f"need {size}")


def _name(request: int) -> str:
    try:
        return "VHOST_USER_" + Req(request).name
    except ValueError:
        return f"request {request}"


def _region(guest: int, size: int, user: int, offset: int) -> Region:
    if size == 0:
        raise ProtocolError("memory region of size 0")
    for value in (guest, user, offset):
        if value + size > 1 << 64:
            raise ProtocolError("memory region wraps around the address space")
    return Region(guest, size, user, offset)


def parse_mem_table(msg: Message) -> list[Region]:
    _need(msg, 8)
    nregions, _pad = struct.unpack_from("<II", msg.payload)
    if not 1 <= nregions <= MAX_REGIONS:
        raise ProtocolError(f"SET_MEM_TABLE with {nregions} regions")
    _need(msg, 8 + REGION.size * nregions)
    if len(msg.fds) != nregions:
        raise ProtocolError(f"SET_MEM_TABLE: {nregions} regions but {len(msg.fds)} file descriptors")
    return [_region(*REGION.unpack_from(msg.payload, 8 + REGION.size * i)) for i in range(nregions)]


def parse_single_region(msg: Message) -> Region:
    _need(msg, 8 + REGION.size)
    return _region(*REGION.unpack_from(msg.payload, 8))


# ----- device requests ------------------------------------------------------


@dataclass
class DeviceRequest:
    """Something the transport must do; ``msg`` is what asked for it."""

    msg: Message


@dataclass
class SetMemTable(DeviceRequest):
    regions: list[Region]
    fds: list[int]


@dataclass
class AddMemReg(DeviceRequest):
    region: Region
    fd: int


@dataclass
class RemMemReg(DeviceRequest):
    region: Region


@dataclass
class VringNum(DeviceRequest):
    index: int
    num: int


@dataclass
class VringAddr(DeviceRequest):
    index: int
    flags: int
    desc: int
    used: int
    avail: int


@dataclass
class VringBase(DeviceRequest):
    index: int
    base: int


@dataclass
class GetVringBase(DeviceRequest):
    """Stop the ring; complete with the next available index to use."""

    index: int


@dataclass
class VringFd(DeviceRequest):
    """SET_VRING_KICK/CALL/ERR: ``fd`` is None for polling mode."""

    kind: str
    index: int
    fd: int | None


@dataclass
class VringEnable(DeviceRequest):
    index: int
    enable: bool


@dataclass
class SetConfig(DeviceRequest):
    offset: int
    data: bytes
    flags: int


@dataclass
class SetFeatures(DeviceRequest):
    features: int


@dataclass
class SlaveChannel(DeviceRequest):
    fd: int


@dataclass
class ResetDevice(DeviceRequest):
    pass


class Session:
    """One front-end's conversation with a device.

    ``device_features`` are the virtio feature bits the device offers
    (transport bits included), ``num_queues`` how many rings it has,
    ``config`` a callable returning the current config space bytes.
    """

    def __init__(self, device_features: int, num_queues: int,
                 config: Callable[[], bytes]) -> None:
        self.offered = device_features | F_PROTOCOL_FEATURES
        self.num_queues = num_queues
        self.config = config
        self.features = 0
        self.protocol_features = 0
        self.owner = False          # SET_OWNER seen (informational: QEMU always sends it)

    def has_protocol(self, pf: PF) -> bool:
        return bool(self.protocol_features & pf)

    def _reply(self, msg: Message, payload: bytes) -> bytes:
        return encode(msg.request, payload)

    def _u64(self, msg: Message) -> int:
        _need(msg, 8)
        return U64.unpack_from(msg.payload)[0]

    def _ring(self, index: int) -> int:
        if index >= self.num_queues:
            raise ProtocolError(f"vring index {index} out of range (device has {self.num_queues})")
        return index

    def _vring_fd(self, msg: Message, kind: str) -> VringFd:
        value = self._u64(msg)
        index = self._ring(value & VRING_IDX_MASK)
        nofd = bool(value & VRING_NOFD)
        if nofd:
            if msg.fds:
                raise ProtocolError(f"{_name(msg.request)}: a descriptor despite the no-fd flag")
            return VringFd(msg, kind, index, None)
        if len(msg.fds) != 1:
            raise ProtocolError(f"{_name(msg.request)}: expected one file descriptor, got {len(msg.fds)}")
        return VringFd(msg, kind, index, msg.fds.pop())

    def receive(self, msg: Message) -> bytes | DeviceRequest | None:
        """Handle one message: reply bytes, a request for the device, or None.

        The message's descriptors are consumed (taken over or closed)."""
        try:
            return self._receive(msg)
        finally:
            close_fds(msg.fds)

    def _receive(self, msg: Message) -> bytes | DeviceRequest | None:
        r = msg.request
        if msg.flags & FLAG_REPLY:
            raise ProtocolError(f"{_name(r)} with the reply flag set")
        if r == Req.GET_FEATURES:
            return self._reply(msg, U64.pack(self.offered))
        if r == Req.SET_FEATURES:
            features = self._u64(msg)
            if features & ~self.offered:
                raise ProtocolError(f"front-end set features 0x{features:x} "
                                    f"beyond the offered 0x{self.offered:x}")
            if not features & F_VERSION_1:
                raise ProtocolError("virtio legacy devices aren't supported")
            self.features = features
            return SetFeatures(msg, features)
        if r == Req.GET_PROTOCOL_FEATURES:
            return self._reply(msg, U64.pack(int(OUR_PROTOCOL_FEATURES)))
        if r == Req.SET_PROTOCOL_FEATURES:
            features = self._u64(msg)
            if features & ~int(OUR_PROTOCOL_FEATURES):
                raise ProtocolError(f"front-end set protocol features 0x{features:x} "
                                    f"beyond the offered 0x{int(OUR_PROTOCOL_FEATURES):x}")
            self.protocol_features = features
            return self.ack(msg)
        if r == Req.SET_OWNER:
            self.owner = True
            return self.ack(msg)
        if r == Req.RESET_OWNER:
            # Deprecated; the specification suggests treating it as "disable rings".
            return ResetDevice(msg)
        if r == Req.RESET_DEVICE:
            return ResetDevice(msg)
        if r == Req.GET_QUEUE_NUM:
            return self._reply(msg, U64.pack(self.num_queues))
        if r == Req.GET_MAX_MEM_SLOTS:
            return self._reply(msg, U64.pack(MAX_MEM_SLOTS))
        if r == Req.SET_MEM_TABLE:
            regions = parse_mem_table(msg)
            fds, msg.fds = msg.fds, []
            return SetMemTable(msg, regions, fds)
        if r == Req.ADD_MEM_REG:
            if not self.has_protocol(PF.CONFIGURE_MEM_SLOTS):
                raise ProtocolError("ADD_MEM_REG without CONFIGURE_MEM_SLOTS")
            region = parse_single_region(msg)
            if len(msg.fds) != 1:
                raise ProtocolError(f"ADD_MEM_REG with {len(msg.fds)} file descriptors")
            return AddMemReg(msg, region, msg.fds.pop())
        if r == Req.REM_MEM_REG:
            if not self.has_protocol(PF.CONFIGURE_MEM_SLOTS):
                raise ProtocolError("REM_MEM_REG without CONFIGURE_MEM_SLOTS")
            return RemMemReg(msg, parse_single_region(msg))   # a stray descriptor is closed
        if r in (Req.SET_VRING_NUM, Req.SET_VRING_BASE, Req.GET_VRING_BASE, Req.SET_VRING_ENABLE):
            _need(msg, VRING_STATE.size)
            index, num = VRING_STATE.unpack_from(msg.payload)
            self._ring(index)
            if r == Req.SET_VRING_NUM:
                if not 1 <= num <= MAX_VRING_NUM or num & (num - 1):
                    raise ProtocolError(f"invalid vring size {num}")
                return VringNum(msg, index, num)
            if r == Req.SET_VRING_BASE:
                if num > 0xFFFF:
                    raise ProtocolError(f"invalid vring base {num}")
                return VringBase(msg, index, num)
            if r == Req.GET_VRING_BASE:
                return GetVringBase(msg, index)
            if num > 1:
                raise ProtocolError(f"invalid SET_VRING_ENABLE value {num}")
            return VringEnable(msg, index, bool(num))
        if r == Req.SET_VRING_ADDR:
            _need(msg, VRING_ADDR.size)
            index, flags, desc, used, avail, _log = VRING_ADDR.unpack_from(msg.payload)
            self._ring(index)
            return VringAddr(msg, index, flags, desc, used, avail)
        if r == Req.SET_VRING_KICK:
            return self._vring_fd(msg, "kick")
        if r == Req.SET_VRING_CALL:
            return self._vring_fd(msg, "call")
        if r == Req.SET_VRING_ERR:
            return self._vring_fd(msg, "err")
        if r == Req.GET_CONFIG:
            _need(msg, CONFIG_HDR.size)
            _offset, size, _flags = CONFIG_HDR.unpack_from(msg.payload)
            if len(msg.payload) != CONFIG_HDR.size + size:
                raise ProtocolError(f"GET_CONFIG: size {size} but {len(msg.payload)} payload bytes")
            config = self.config()
            if size > len(config):
                body = b""          # a zero-length payload tells the front-end it failed
            else:
                body = config[:size]
            return self._reply(msg, msg.payload[:CONFIG_HDR.size] + body if body else b"")
        if r == Req.SET_CONFIG:
            _need(msg, CONFIG_HDR.size)
            offset, size, flags = CONFIG_HDR.unpack_from(msg.payload)
            if len(msg.payload) != CONFIG_HDR.size + size or size > MAX_CONFIG:
                raise ProtocolError(f"SET_CONFIG: size {size} but {len(msg.payload)} payload bytes")
            return SetConfig(msg, offset, msg.payload[CONFIG_HDR.size:], flags)
        if r == Req.SET_SLAVE_REQ_FD:
            if len(msg.fds) != 1:
                raise ProtocolError(f"SET_SLAVE_REQ_FD with {len(msg.fds)} file descriptors")
            return SlaveChannel(msg, msg.fds.pop())
        if r in (Req.SET_VRING_ENDIAN, Req.SEND_RARP, Req.NET_SET_MTU):
            raise ProtocolError(f"{_name(r)} is not supported by this device")
        raise ProtocolError(f"unsupported request {_name(r)}")

    def ack(self, msg: Message, ok: bool = True) -> bytes | None:
        """The REPLY_ACK answer when the front-end asked for one."""
        if msg.need_reply and self.has_protocol(PF.REPLY_ACK):
            return self._reply(msg, U64.pack(0 if ok else 1))
        return None

    def complete(self, req: DeviceRequest, result: Any = None, ok: bool = True) -> bytes | None:
        """Reply bytes once the device has carried ``req`` out."""
        if isinstance(req, GetVringBase):
            return self._reply(req.msg, VRING_STATE.pack(req.index, int(result)))
        return self.ack(req.msg, ok)
