# SPDX-License-Identifier: GPL-2.0-or-later
"""Sector ciphers: a block cipher, a mode and an IV generator, as used by
LUKS (and qcow2's LUKS encryption) to encrypt disk data 512 bytes at a time.

Every sector is encrypted on its own with an IV derived from its sector
number, so any sector can be read or rewritten without touching the others.
Names follow QEMU's QAPI enums (``aes-256``, ``xts``, ``plain64``, ``sha256``)
so that options and query output need no translation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

from cryptography.hazmat.decrepit.ciphers import algorithms as decrepit
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.base import CipherContext

from qsd.qmp.errors import GenericError

SECTOR_SIZE = 512

#: QAPI QCryptoCipherAlgorithm -> (family, key bytes, block bytes).
CIPHER_ALGS: dict[str, tuple[str, int, int]] = {
    "aes-128": ("aes", 16, 16),
    "aes-192": ("aes", 24, 16),
    "aes-256": ("aes", 32, 16),
    "des": ("des", 8, 8),
    "3des": ("3des", 24, 8),
    "cast5-128": ("cast5", 16, 8),
    "serpent-128": ("serpent", 16, 16),
    "serpent-192": ("serpent", 24, 16),
    "serpent-256": ("serpent", 32, 16),
    "twofish-128": ("twofish", 16, 16),
    "twofish-192": ("twofish", 24, 16),
    "twofish-256": ("twofish", 32, 16),
}

#: QAPI QCryptoHashAlgorithm -> (hashlib name, digest bytes).
HASH_ALGS: dict[str, tuple[str, int]] = {
    "md5": ("md5", 16),
    "sha1": ("sha1", 20),
    "sha224": ("sha224", 28),
    "sha256": ("sha256", 32),
    "sha384": ("sha384", 48),
    "sha512": ("sha512", 64),
    "ripemd160": ("ripemd160", 20),
}

MODES = ("ecb", "cbc", "xts", "ctr")
IVGENS = ("plain", "plain64", "essiv")


def hash_digest_size(alg: str) -> int:
    return HASH_ALGS[alg][1]


def hash_bytes(alg: str, data: bytes) -> bytes:
    return hashlib.new(HASH_ALGS[alg][0], data).digest()


def hash_new(alg: str) -> "hashlib._Hash":
    """A fresh hash object, for the anti-forensic diffusion's many calls."""
    return hashlib.new(HASH_ALGS[alg][0])


def _primitive(alg: str, key: bytes) -> algorithms.BlockCipherAlgorithm:
    """The ``cryptography`` algorithm object; serpent and twofish are not in
    it, so they are refused the way QEMU refuses a cipher its backend lacks."""
    family = CIPHER_ALGS[alg][0]
    if family == "aes":
        return algorithms.AES(key)
    if family == "cast5":
        return decrepit.CAST5(key)
    if family == "3des":
        return decrepit.TripleDES(key)
    raise GenericError(f"Unsupported cipher algorithm {alg}")


def check_cipher_supported(alg: str, mode: str) -> None:
    """Raise QEMU's error when this process cannot run ``alg`` in ``mode``."""
    family, nkey, block = CIPHER_ALGS[alg]
    _primitive(alg, bytes(nkey))
    if mode == "xts" and family != "aes":
        raise GenericError(f"Unsupported cipher mode {mode}")


class SectorCipher:
    """Encrypt/decrypt whole 512-byte sectors with per-sector IVs.

    ``key`` is the full cipher key (both halves for XTS). The IV of sector
    ``n`` is ``n`` (``plain``: its low 32 bits) little-endian, or for
    ``essiv`` that value encrypted with ``hash(key)`` as key.
    """

    def __init__(self, alg: str, mode: str, key: bytes, ivgen: str,
                 ivgen_hash: str | None = None) -> None:
        if alg not in CIPHER_ALGS:
            raise GenericError(f"Unsupported cipher algorithm {alg}")
        if mode not in MODES:
            raise GenericError(f"Unsupported cipher mode {mode}")
        check_cipher_supported(alg, mode)
        family, nkey, block = CIPHER_ALGS[alg]
        want = nkey * 2 if mode == "xts" else nkey
        if len(key) != want:
            raise GenericError(f"Cipher key length {len(key)} should be {want}")
        self.alg, self.mode, self.ivgen, self.ivgen_hash = alg, mode, ivgen, ivgen_hash
        self.block_size = block
        self.iv_len = 0 if mode == "ecb" else block
        self._key = key
        self._make: Callable[[bytes], modes.Mode | None] = {
            "ecb": lambda iv: modes.ECB(),
            "cbc": modes.CBC,
            "xts": modes.XTS,
            "ctr": modes.CTR,
        }[mode]
        self._essiv: Cipher | None = None
        if ivgen == "essiv":
            if ivgen_hash is None:
                raise GenericError("Missing IV generator hash")
            salt = hash_bytes(ivgen_hash, key)
            self._essiv = Cipher(_primitive(essiv_cipher(alg, ivgen_hash), salt), modes.ECB())
        elif ivgen not in ("plain", "plain64"):
            raise GenericError(f"Unsupported IV generator {ivgen}")
        # OpenSSL's XTS takes AES-128 and AES-256 only; other key sizes run
        # XTS by hand over ECB (see _xts_soft).
        self._soft_xts = mode == "xts" and nkey not in (16, 32)
        if self._soft_xts:
            half = len(key) // 2
            self._ecb1 = Cipher(_primitive(alg, key[:half]), modes.ECB())
            self._ecb2 = Cipher(_primitive(alg, key[half:]), modes.ECB())
        else:
            self._algo = _primitive(alg, key)

    def _iv(self, sector: int) -> bytes:
        if not self.iv_len:
            return b""
        if self.ivgen == "plain":
            sector &= 0xFFFFFFFF
        raw = (sector & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little").ljust(self.iv_len, b"\0")
        if self._essiv is not None:
            enc = self._essiv.encryptor()
            raw = enc.update(raw) + enc.finalize()
        return raw

    def _context(self, sector: int, encrypt: bool) -> CipherContext:
        cipher = Cipher(self._algo, self._make(self._iv(sector)))
        return cipher.encryptor() if encrypt else cipher.decryptor()

    def _xts_soft(self, sector: int, data: memoryview, encrypt: bool) -> bytes:
        """XTS (IEEE 1619) of one sector whose length is whole blocks: the
        tweak is the IV encrypted with the second key, multiplied by x in
        GF(2^128) for every next block."""
        enc2 = self._ecb2.encryptor()
        tweak = int.from_bytes(enc2.update(self._iv(sector)), "little")
        tweaks = bytearray()
        for _ in range(len(data) // 16):
            tweaks += tweak.to_bytes(16, "little")
            tweak <<= 1
            if tweak >> 128:
                tweak = (tweak & ((1 << 128) - 1)) ^ 0x87
        mask = int.from_bytes(tweaks, "little")
        n = len(data)
        pre = (int.from_bytes(data, "little") ^ mask).to_bytes(n, "little")
        ctx = self._ecb1.encryptor() if encrypt else self._ecb1.decryptor()
        return (int.from_bytes(ctx.update(pre), "little") ^ mask).to_bytes(n, "little")

    def _run(self, sector: int, data: bytes | bytearray | memoryview, encrypt: bool,
             sector_size: int) -> bytearray:
        view = memoryview(data).cast("B")
        if len(view) % sector_size:
            raise ValueError("data is not a whole number of sectors")
        out = bytearray(len(view))
        if self._soft_xts:
            for pos in range(0, len(view), sector_size):
                out[pos:pos + sector_size] = self._xts_soft(
                    sector + pos // sector_size, view[pos:pos + sector_size], encrypt)
            return out
        for pos in range(0, len(view), sector_size):
            ctx = self._context(sector + pos // sector_size, encrypt)
            out[pos:pos + sector_size] = ctx.update(view[pos:pos + sector_size])
        return out

    def encrypt(self, sector: int, data: bytes | bytearray | memoryview,
                sector_size: int = SECTOR_SIZE) -> bytearray:
        """Encrypt whole sectors; ``sector`` is the number of the first one."""
        return self._run(sector, data, True, sector_size)

    def decrypt(self, sector: int, data: bytes | bytearray | memoryview,
                sector_size: int = SECTOR_SIZE) -> bytearray:
        """Decrypt whole sectors; ``sector`` is the number of the first one."""
        return self._run(sector, data, False, sector_size)


def essiv_cipher(alg: str, ivgen_hash: str) -> str:
    """The cipher keyed by the hashed key: same family, key size = digest
    size (sha256 with any AES gives aes-256); QEMU's error when none fits."""
    family = CIPHER_ALGS[alg][0]
    digest = hash_digest_size(ivgen_hash)
    for name, (fam, nkey, _) in CIPHER_ALGS.items():
        if fam == family and nkey == digest:
            return name
    raise GenericError(f"No {family.upper()} cipher with key size {digest} available")


@dataclass(frozen=True)
class CipherSpec:
    """A payload cipher as a LUKS header names it, in QAPI terms."""

    alg: str
    mode: str
    ivgen: str
    ivgen_hash: str | None = None

    @property
    def key_bytes(self) -> int:
        """Master key length: XTS needs two keys."""
        nkey = CIPHER_ALGS[self.alg][1]
        return nkey * 2 if self.mode == "xts" else nkey

    def sector_cipher(self, key: bytes) -> SectorCipher:
        return SectorCipher(self.alg, self.mode, key, self.ivgen, self.ivgen_hash)
