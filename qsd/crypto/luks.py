# SPDX-License-Identifier: GPL-2.0-or-later
"""LUKS1 volumes as QEMU writes and reads them (LUKS On-Disk Format 1.2).

Usable without a block node, so that both the ``luks`` format driver and
qcow2's ``encrypt.format=luks`` share it. The caller owns the I/O: reads go
through an async ``read(offset, length)`` callback relative to the start of
the LUKS header, and writes come back as ``(offset, bytes)`` lists.

Layout: a 592-byte header (magic, cipher, hash, payload offset, master key
digest, eight key slots), then the anti-forensically split master key of
each slot encrypted with a password-derived key, then the payload. QEMU
aligns the slots' key material and the payload to 4 KiB.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import struct
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from qsd.crypto.cipher import (CIPHER_ALGS, HASH_ALGS, IVGENS, MODES, SECTOR_SIZE, CipherSpec,
                               SectorCipher, check_cipher_supported, essiv_cipher, hash_new)
from qsd.qmp.errors import GenericError

MAGIC = b"LUKS\xba\xbe"
VERSION = 1
HEADER_SIZE = 592
NUM_SLOTS = 8
STRIPES = 4000
DIGEST_SIZE = 20
SALT_SIZE = 32
KEY_ACTIVE = 0x00AC71F3
KEY_DISABLED = 0x0000DEAD
#: QEMU aligns key material and payload to 4 KiB (8 sectors).
ALIGN_SECTORS = 4096 // SECTOR_SIZE
MIN_SLOT_ITERS = 1000
MIN_MASTER_KEY_ITERS = 1000
UINT32_MAX = 0xFFFFFFFF
UINT64_MAX = 0xFFFFFFFFFFFFFFFF

_HDR = struct.Struct(">6sH32s32s32sII20s32sI40s")
_SLOT = struct.Struct(">II32sII")
assert _HDR.size + NUM_SLOTS * _SLOT.size == HEADER_SIZE

ReadFn = Callable[[int, int], Awaitable[bytes | bytearray]]
Writes = list[tuple[int, bytes]]

#: LUKS cipher names <-> QAPI cipher families that have a LUKS name.
_LUKS_CIPHER_NAMES = ("aes", "cast5", "serpent", "twofish")


def _cstr(raw: bytes) -> str:
    """A NUL-terminated header string; QEMU takes any bytes (a binary uuid
    opens), and non-ASCII names simply match no algorithm."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _round_up(value: int, align: int) -> int:
    return -(-value // align) * align


def split_sectors(key_bytes: int, stripes: int) -> int:
    """Sectors the split key material of one slot occupies."""
    return -(-key_bytes * stripes // SECTOR_SIZE)


# ----- PBKDF2 and the anti-forensic splitter ------------------------------------
def pbkdf2(hash_alg: str, password: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    """PBKDF2-HMAC; OpenSSL through hashlib, which knows every QAPI hash
    (``cryptography`` lacks ripemd160) and releases the GIL while it runs."""
    return hashlib.pbkdf2_hmac(HASH_ALGS[hash_alg][0], password, salt, iterations, length)


def _diffuse(hash_alg: str, block: bytes) -> bytes:
    """AF diffusion: each digest-sized piece i becomes H(be32(i) || piece),
    the last piece's hash cut to its length."""
    proto = hash_new(hash_alg)
    size = proto.digest_size
    out = bytearray()
    for i, pos in enumerate(range(0, len(block), size)):
        piece = block[pos:pos + size]
        h = proto.copy()
        h.update(i.to_bytes(4, "big"))
        h.update(piece)
        out += h.digest()[:len(piece)]
    return bytes(out)


def af_split(hash_alg: str, key: bytes, stripes: int) -> bytes:
    """Spread ``key`` over ``stripes`` blocks so that losing any block loses the key."""
    n = len(key)
    material = bytearray(os.urandom(n * (stripes - 1)))
    acc = bytes(n)
    for i in range(stripes - 1):
        mixed = bytes(a ^ b for a, b in zip(acc, material[i * n:(i + 1) * n]))
        acc = _diffuse(hash_alg, mixed)
    material += bytes(a ^ b for a, b in zip(acc, key))
    return bytes(material)


def af_merge(hash_alg: str, material: bytes | bytearray, key_bytes: int, stripes: int) -> bytes:
    """Inverse of :func:`af_split`."""
    n = key_bytes
    acc = 0
    for i in range(stripes - 1):
        acc ^= int.from_bytes(material[i * n:(i + 1) * n], "big")
        acc = int.from_bytes(_diffuse(hash_alg, acc.to_bytes(n, "big")), "big")
    acc ^= int.from_bytes(material[(stripes - 1) * n:stripes * n], "big")
    return acc.to_bytes(n, "big")


# ----- iteration time calibration --------------------------------------------------
_BENCH_CACHE: dict[tuple[str, int], tuple[float, int]] = {}
#: Seconds a calibration result is reused; CPU speed does not change faster,
#: and it spares a second of CPU per create.
BENCH_REUSE = 60.0


def pbkdf2_iters_per_second(hash_alg: str, out_len: int) -> int:
    """PBKDF2 iterations per second of this thread's CPU time, measured the
    way QEMU does: grow the count until one run takes over half a second."""
    cached = _BENCH_CACHE.get((hash_alg, out_len))
    if cached is not None and time.monotonic() - cached[0] < BENCH_REUSE:
        return cached[1]
    key, salt = bytes(out_len), bytes(SALT_SIZE)
    iterations = 1 << 15
    while True:
        start = time.thread_time_ns()
        pbkdf2(hash_alg, key, salt, iterations, out_len)
        delta_ms = (time.thread_time_ns() - start) / 1e6
        if delta_ms <= 0:
            raise GenericError("Unable to get accurate CPU usage")
        if delta_ms > 500:
            break
        if delta_ms < 100:
            iterations *= 10
        else:
            iterations = int(iterations * 1000 / delta_ms)
    result = int(iterations * 1000 / delta_ms)
    _BENCH_CACHE[(hash_alg, out_len)] = (time.monotonic(), result)
    return result


def scaled_iters(hash_alg: str, out_len: int, iter_time: int, divisor: int, minimum: int) -> int:
    """Iterations that take ``iter_time`` ms (divided by ``divisor``), with QEMU's limits."""
    per_sec = pbkdf2_iters_per_second(hash_alg, out_len)
    iter_time = max(iter_time, 0)
    if iter_time and per_sec > UINT64_MAX // iter_time:
        raise GenericError(f"PBKDF iterations {per_sec} too large to scale")
    iters = per_sec * iter_time // 1000 // divisor
    if iters > UINT32_MAX:
        raise GenericError(f"PBKDF iterations {iters} larger than {UINT32_MAX}")
    return max(iters, minimum)


# ----- the header -------------------------------------------------------------------
@dataclass
class LuksSlot:
    """One key slot; ``key_offset`` in sectors from the header start."""

    active: bool
    iterations: int
    salt: bytes
    key_offset: int
    stripes: int

    def info(self) -> dict[str, Any]:
        """QCryptoBlockInfoLUKSSlot (inactive slots show no iters/stripes)."""
        if not self.active:
            return {"active": False, "key-offset": self.key_offset * SECTOR_SIZE}
        return {"active": True, "iters": self.iterations, "stripes": self.stripes,
                "key-offset": self.key_offset * SECTOR_SIZE}


@dataclass
class LuksHeader:
    """A parsed LUKS1 header; ``spec`` and ``hash_alg`` are its cipher in QAPI terms."""

    cipher_name: str
    cipher_mode: str
    hash_spec: str
    payload_offset: int
    key_bytes: int
    mk_digest: bytes
    mk_salt: bytes
    mk_iterations: int
    uuid: str
    slots: list[LuksSlot]
    spec: CipherSpec = field(init=False)
    hash_alg: str = field(init=False)

    def __post_init__(self) -> None:
        self.spec = _parse_cipher(self.cipher_name, self.cipher_mode, self.key_bytes)
        self.hash_alg = _parse_hash(self.hash_spec)

    @property
    def payload_bytes(self) -> int:
        """Byte offset of the payload = size of the whole LUKS header area."""
        return self.payload_offset * SECTOR_SIZE

    def key_material_range(self, index: int) -> tuple[int, int]:
        """(byte offset, byte length) of a slot's encrypted key material."""
        slot = self.slots[index]
        return (slot.key_offset * SECTOR_SIZE,
                split_sectors(self.key_bytes, slot.stripes) * SECTOR_SIZE)

    @classmethod
    def parse(cls, data: bytes | bytearray, limit: int | None = None) -> "LuksHeader":
        """Parse and check a header; ``limit`` is how many bytes the
        container holds, so offsets past it are refused before any read."""
        if len(data) < HEADER_SIZE:
            raise GenericError("Volume is not in LUKS format")
        (magic, version, cname, cmode, hspec, payload, key_bytes, digest, salt, mk_iters,
         uuid) = _HDR.unpack_from(data, 0)
        if magic != MAGIC:
            raise GenericError("Volume is not in LUKS format")
        if version != VERSION:
            raise GenericError(f"LUKS version {version} is not supported")
        slots = []
        for i in range(NUM_SLOTS):
            active, iters, ssalt, koff, stripes = _SLOT.unpack_from(
                data, _HDR.size + i * _SLOT.size)
            if active not in (KEY_ACTIVE, KEY_DISABLED):
                raise GenericError(f"Keyslot {i} state (active/disable) is corrupted")
            slots.append(LuksSlot(active == KEY_ACTIVE, iters, ssalt, koff, stripes))
        # The layout is checked before the cipher is looked at, as QEMU does.
        _check_layout(payload, key_bytes, mk_iters, slots, limit)
        return cls(_cstr(cname), _cstr(cmode), _cstr(hspec), payload, key_bytes, digest, salt,
                   mk_iters, _cstr(uuid), slots)

    def pack(self) -> bytes:
        out = bytearray(_HDR.pack(MAGIC, VERSION, self.cipher_name.encode(),
                                  self.cipher_mode.encode(), self.hash_spec.encode(),
                                  self.payload_offset, self.key_bytes, self.mk_digest,
                                  self.mk_salt, self.mk_iterations, self.uuid.encode()))
        for slot in self.slots:
            out += _SLOT.pack(KEY_ACTIVE if slot.active else KEY_DISABLED, slot.iterations,
                              slot.salt, slot.key_offset, slot.stripes)
        return bytes(out)

    def info(self) -> dict[str, Any]:
        """QCryptoBlockInfoLUKS, members in schema order."""
        spec = self.spec
        out: dict[str, Any] = {"cipher-alg": spec.alg, "cipher-mode": spec.mode,
                               "ivgen-alg": spec.ivgen}
        if spec.ivgen_hash is not None:
            out["ivgen-hash-alg"] = spec.ivgen_hash
        out.update({"hash-alg": self.hash_alg, "payload-offset": self.payload_bytes,
                    "master-key-iters": self.mk_iterations, "uuid": self.uuid,
                    "slots": [s.info() for s in self.slots]})
        return out


#: Largest PBKDF2 iteration count we run. QEMU and cryptsetup calibrate to
#: about 2 s of CPU (1-5 million here); a header asking for far more is a
#: corrupt or hostile one that would hang the opener for minutes or hours.
MAX_PBKDF_ITERATIONS = 1 << 24


def _check_layout(payload_offset: int, key_bytes: int, mk_iterations: int,
                  slots: list[LuksSlot], limit: int | None) -> None:
    """Bounds checks that keep a hostile header from steering reads or
    allocations: stripes are fixed, so key material is at most 256 KB, and
    it must lie between the header and the payload, which lies in the image."""
    header_sectors = -(-HEADER_SIZE // SECTOR_SIZE)
    if payload_offset < header_sectors:
        raise GenericError("LUKS payload is overlapping with the header")
    if mk_iterations == 0:
        raise GenericError("LUKS key iteration count is zero")
    if mk_iterations > MAX_PBKDF_ITERATIONS:
        raise GenericError(f"LUKS key iteration count {mk_iterations} is larger than "
                           f"{MAX_PBKDF_ITERATIONS}")
    spans: list[tuple[int, int]] = []
    for i, slot in enumerate(slots):
        if slot.active and slot.iterations == 0:
            raise GenericError(f"Keyslot {i} iteration count is zero")
        if slot.active and slot.iterations > MAX_PBKDF_ITERATIONS:
            raise GenericError(f"Keyslot {i} iteration count {slot.iterations} is larger "
                               f"than {MAX_PBKDF_ITERATIONS}")
        if slot.stripes != STRIPES:
            raise GenericError(f"Keyslot {i} is corrupted (stripes {slot.stripes} != "
                               f"{STRIPES})")
        start = slot.key_offset
        end = start + split_sectors(key_bytes, slot.stripes)
        if start < header_sectors:
            raise GenericError(f"Keyslot {i} is overlapping with the LUKS header")
        if end > payload_offset:
            raise GenericError(f"Keyslot {i} is overlapping with the encrypted payload")
        for j, (s2, e2) in enumerate(spans):
            if start < e2 and s2 < end:
                raise GenericError(f"Keyslots {j} and {i} are overlapping in the header")
        spans.append((start, end))
    if limit is not None and payload_offset * SECTOR_SIZE > limit:
        raise GenericError(f"LUKS payload offset {payload_offset * SECTOR_SIZE} is beyond "
                           f"the end of the image ({limit} bytes)")


def _parse_cipher(name: str, mode_spec: str, key_bytes: int) -> CipherSpec:
    """``aes`` + ``xts-plain64`` + 64 bytes -> aes-256/xts/plain64."""
    mode, sep, ivspec = mode_spec.partition("-")
    if not sep:
        raise GenericError(f"Unexpected cipher mode string format '{mode_spec}'")
    if mode not in MODES:
        raise GenericError(f"Cipher mode '{mode}' not supported")
    ivgen, sep, ivhash = ivspec.partition(":")
    if ivgen not in IVGENS:
        raise GenericError(f"IV generator '{ivgen}' not supported")
    ivgen_hash = None
    if ivgen == "essiv":
        if not sep:
            raise GenericError("Missing IV generator hash specification")
        ivgen_hash = _parse_hash(ivhash)
    nkey = key_bytes // 2 if mode == "xts" else key_bytes
    for alg, (family, size, _) in CIPHER_ALGS.items():
        if family == name and name in _LUKS_CIPHER_NAMES and size == nkey:
            break
    else:
        raise GenericError(f"Algorithm '{name}' with key size {nkey} bytes not supported")
    spec = CipherSpec(alg, mode, ivgen, ivgen_hash)
    check_cipher_supported(alg, mode)
    if ivgen_hash is not None:
        essiv_cipher(alg, ivgen_hash)
    return spec


def _parse_hash(name: str) -> str:
    if name not in HASH_ALGS:
        raise GenericError(f"Hash algorithm '{name}' not supported")
    return name


# ----- an unlocked volume --------------------------------------------------------------
class LuksVolume:
    """A header with its master key: encrypts and decrypts payload sectors
    (numbered from the start of the payload, 512 bytes each)."""

    def __init__(self, header: LuksHeader, master_key: bytes) -> None:
        self.header = header
        self.master_key = master_key
        self.cipher: SectorCipher = header.spec.sector_cipher(master_key)

    def encrypt(self, sector: int, data: bytes | bytearray | memoryview) -> bytearray:
        return self.cipher.encrypt(sector, data)

    def decrypt(self, sector: int, data: bytes | bytearray | memoryview) -> bytearray:
        return self.cipher.decrypt(sector, data)

    def info(self) -> dict[str, Any]:
        return self.header.info()

    # ----- key slots ---------------------------------------------------------------
    async def add_keyslot(self, password: bytes, iter_time: int,
                          index: int | None = None) -> tuple[int, Writes]:
        """Put the master key under ``password`` in slot ``index`` (the first
        free one by default); returns the slot and the writes to make
        (key material first, then the header)."""
        header = self.header
        if index is None:
            index = next((i for i, s in enumerate(header.slots) if not s.active), -1)
            if index < 0:
                raise GenericError("Can't add a keyslot - all keyslots are in use")
        material = await asyncio.to_thread(self._seal_slot, index, password, iter_time)
        offset = header.slots[index].key_offset * SECTOR_SIZE
        return index, [(offset, material), (0, header.pack())]

    def _seal_slot(self, index: int, password: bytes, iter_time: int) -> bytes:
        header = self.header
        slot = header.slots[index]
        salt = os.urandom(SALT_SIZE)
        iters = scaled_iters(header.hash_alg, header.key_bytes, iter_time, 1, MIN_SLOT_ITERS)
        slot_key = pbkdf2(header.hash_alg, password, salt, iters, header.key_bytes)
        split = af_split(header.hash_alg, self.master_key, slot.stripes)
        padded = split.ljust(split_sectors(header.key_bytes, slot.stripes) * SECTOR_SIZE, b"\0")
        material = bytes(header.spec.sector_cipher(slot_key).encrypt(0, padded))
        slot.active, slot.iterations, slot.salt = True, iters, salt
        return material

    def erase_keyslot(self, index: int) -> Writes:
        """Deactivate a slot and overwrite its key material with random bytes."""
        header = self.header
        offset, length = header.key_material_range(index)
        slot = header.slots[index]
        slot.active, slot.iterations, slot.salt = False, 0, bytes(SALT_SIZE)
        return [(offset, os.urandom(length)), (0, header.pack())]

    def slot_opens(self, index: int, password: bytes, material: bytes | bytearray) -> bool:
        """Whether ``password`` opens slot ``index`` to this volume's master key."""
        return _open_slot(self.header, index, password, material) == self.master_key


def _open_slot(header: LuksHeader, index: int, password: bytes,
               material: bytes | bytearray) -> bytes | None:
    """The master key if ``password`` opens slot ``index`` (CPU-heavy: run in a thread)."""
    slot = header.slots[index]
    slot_key = pbkdf2(header.hash_alg, password, slot.salt, slot.iterations, header.key_bytes)
    split = header.spec.sector_cipher(slot_key).decrypt(0, material)
    key = af_merge(header.hash_alg, split, header.key_bytes, slot.stripes)
    digest = pbkdf2(header.hash_alg, key, header.mk_salt, header.mk_iterations, DIGEST_SIZE)
    return key if hmac.compare_digest(digest, header.mk_digest) else None


async def read_header(read: ReadFn, limit: int) -> LuksHeader:
    """Read and check the header of a container holding ``limit`` bytes."""
    if limit < HEADER_SIZE:
        raise GenericError("Volume is not in LUKS format")
    return LuksHeader.parse(bytes(await read(0, HEADER_SIZE)), limit)


async def unlock(header: LuksHeader, password: bytes, read: ReadFn) -> LuksVolume:
    """Try every active slot with ``password``; QEMU's error when none opens."""
    for index, slot in enumerate(header.slots):
        if not slot.active:
            continue
        offset, length = header.key_material_range(index)
        material = await read(offset, length)
        key = await asyncio.to_thread(_open_slot, header, index, password, material)
        if key is not None:
            return LuksVolume(header, key)
    raise GenericError("Invalid password, cannot unlock any keyslot")


async def open_volume(read: ReadFn, limit: int, password: bytes) -> LuksVolume:
    return await unlock(await read_header(read, limit), password, read)


@dataclass
class LuksCreateOptions:
    """QCryptoBlockCreateOptionsLUKS with QEMU's defaults."""

    cipher_alg: str = "aes-256"
    cipher_mode: str = "xts"
    ivgen_alg: str = "plain64"
    ivgen_hash_alg: str = "sha256"
    hash_alg: str = "sha256"
    iter_time: int = 2000

    @classmethod
    def from_qapi(cls, options: dict[str, Any]) -> "LuksCreateOptions":
        """From a BlockdevCreateOptionsLUKS / QCryptoBlockCreateOptionsLUKS dict."""
        out = cls()
        for key in ("cipher-alg", "cipher-mode", "ivgen-alg", "ivgen-hash-alg", "hash-alg",
                    "iter-time"):
            if key in options:
                setattr(out, key.replace("-", "_"), options[key])
        return out


async def create_volume(password: bytes, opts: LuksCreateOptions) -> tuple[LuksVolume, Writes]:
    """A new volume with a random master key in slot 0; returns it and the
    writes that lay its header area out (``header.payload_bytes`` long)."""
    family = CIPHER_ALGS[opts.cipher_alg][0]
    if family not in _LUKS_CIPHER_NAMES:
        raise GenericError(f"Algorithm '{opts.cipher_alg}' not supported")
    ivgen_hash = opts.ivgen_hash_alg if opts.ivgen_alg == "essiv" else None
    spec = CipherSpec(opts.cipher_alg, opts.cipher_mode, opts.ivgen_alg, ivgen_hash)
    check_cipher_supported(spec.alg, spec.mode)
    if ivgen_hash is not None:
        essiv_cipher(spec.alg, ivgen_hash)
    mode_spec = f"{spec.mode}-{spec.ivgen}" + (f":{ivgen_hash}" if ivgen_hash else "")
    key_bytes = spec.key_bytes
    master_key = os.urandom(key_bytes)
    mk_salt = os.urandom(SALT_SIZE)
    mk_iters = await asyncio.to_thread(scaled_iters, opts.hash_alg, DIGEST_SIZE, opts.iter_time,
                                       8, MIN_MASTER_KEY_ITERS)
    digest = await asyncio.to_thread(pbkdf2, opts.hash_alg, master_key, mk_salt, mk_iters,
                                     DIGEST_SIZE)
    first = _round_up(-(-HEADER_SIZE // SECTOR_SIZE), ALIGN_SECTORS)
    step = _round_up(split_sectors(key_bytes, STRIPES), ALIGN_SECTORS)
    slots = [LuksSlot(False, 0, bytes(SALT_SIZE), first + i * step, STRIPES)
             for i in range(NUM_SLOTS)]
    header = LuksHeader(family, mode_spec, opts.hash_alg, first + NUM_SLOTS * step, key_bytes,
                        digest, mk_salt, mk_iters, str(uuidlib.uuid4()), slots)
    volume = LuksVolume(header, master_key)
    _, writes = await volume.add_keyslot(password, opts.iter_time, 0)
    return volume, writes
