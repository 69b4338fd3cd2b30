# SPDX-License-Identifier: GPL-2.0-or-later
"""qcow2 payload encryption (qcow2.txt "Full disk encryption header
pointer" and "Data encryption").

Two methods: LUKS (crypt_method 2), whose header and key slots live in
clusters the header extension points to, and whose data sectors use the
*host* (physical) sector number as IV; and legacy AES (crypt_method 1),
AES-128-CBC keyed by the password itself, IV the *guest* sector number.
Metadata is never encrypted, zero clusters need no cipher at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from qsd.block.formats.luks import secret_password
from qsd.crypto.cipher import SECTOR_SIZE, SectorCipher
from qsd.crypto.luks import LuksCreateOptions, LuksVolume, create_volume, open_volume
from qsd.qmp.errors import GenericError

if TYPE_CHECKING:
    from qsd.block.formats.qcow2.driver import Qcow2Node

CRYPT_NONE = 0
CRYPT_AES = 1
CRYPT_LUKS = 2
#: crypt_method -> the BlockdevQcow2EncryptionFormat name options must use.
FORMAT_NAMES = {CRYPT_AES: "aes", CRYPT_LUKS: "luks"}
#: Legacy AES keys are the password's first 16 bytes, zero padded.
AES_KEY_BYTES = 16


class SectorCrypto(Protocol):
    def encrypt(self, sector: int, data: bytes | bytearray | memoryview) -> bytearray: ...

    def decrypt(self, sector: int, data: bytes | bytearray | memoryview) -> bytearray: ...


@dataclass
class Qcow2Crypto:
    """An unlocked image cipher; ``physical`` selects the IV's sector
    numbering (host offset for LUKS, guest offset for AES)."""

    method: int
    cipher: SectorCrypto
    physical: bool
    key_secret: str

    def sector(self, guest: int, host: int) -> int:
        """IV sector number of the 512 bytes at ``guest`` stored at ``host``."""
        return (host if self.physical else guest) // SECTOR_SIZE

    def info(self) -> dict[str, Any]:
        """ImageInfoSpecificQCow2Encryption."""
        out: dict[str, Any] = {"format": FORMAT_NAMES[self.method]}
        if isinstance(self.cipher, LuksVolume):
            out.update(self.cipher.info())
        return out


def legacy_aes_cipher(password: bytes) -> SectorCipher:
    return SectorCipher("aes-128", "cbc", password[:AES_KEY_BYTES].ljust(AES_KEY_BYTES, b"\0"),
                        "plain64")


def check_format_option(method: int, encrypt: dict[str, Any] | None) -> None:
    """The image's method against ``encrypt.format``, QEMU's texts."""
    fmt = encrypt.get("format") if encrypt else None
    if method == CRYPT_NONE:
        if fmt is not None:
            raise GenericError(f"No encryption in image header, but options specified "
                               f"format '{fmt}'")
        return
    want = FORMAT_NAMES[method]
    if fmt is not None and fmt != want:
        raise GenericError(f"Header reported '{want}' encryption format but options specify "
                           f"'{fmt}'")


async def open_crypto(node: Qcow2Node, encrypt: dict[str, Any] | None) -> Qcow2Crypto:
    """Unlock the image's cipher with ``encrypt.key-secret``."""
    h = node.header
    if h.crypto_header is not None and h.crypt_method != CRYPT_LUKS:
        raise GenericError("CRYPTO header extension only expected with LUKS encryption method")
    if h.crypt_method == CRYPT_LUKS and h.crypto_header is None:
        raise GenericError(f"Missing CRYPTO header for crypt method {h.crypt_method}")
    secret_id = (encrypt or {}).get("key-secret")
    password = secret_password(node.graph.objects, secret_id, "encrypt.key-secret")
    assert secret_id is not None
    if h.crypt_method == CRYPT_AES:
        return Qcow2Crypto(CRYPT_AES, legacy_aes_cipher(password), False, secret_id)
    assert h.crypto_header is not None
    base, length = h.crypto_header

    async def read(offset: int, n: int) -> bytearray:
        if offset + n > length:
            raise GenericError("Request for data outside of extension header")
        return await node.read_file(base + offset, n)

    volume = await open_volume(read, length, password)
    return Qcow2Crypto(CRYPT_LUKS, volume, True, secret_id)


async def create_crypto(node: Qcow2Node, encrypt: dict[str, Any], objects: Any) -> None:
    """Set up encryption on a freshly created, still empty image: for LUKS
    the header goes into newly allocated clusters (zero filled first, as
    QEMU leaves unused key slots), then the header extension points there."""
    password = secret_password(objects, encrypt.get("key-secret"), "encrypt.key-secret")
    h = node.header
    if encrypt["format"] == "qcow":
        h.crypt_method = CRYPT_AES
        await node.write_header()
        return
    volume, writes = await create_volume(password, LuksCreateOptions.from_qapi(encrypt))
    length = volume.header.payload_bytes
    clusters = -(-length // node.cs)
    base = await node.refcounts.alloc(clusters)
    await node.refcounts.cache.flush()
    node.add_metadata(base, clusters * node.cs, "encryption header")
    await node.file_node.write_zeroes(base, clusters * node.cs)
    for offset, data in writes:
        await node.file_node.write(base + offset, data)
    h.crypt_method = CRYPT_LUKS
    h.crypto_header = (base, length)
    await node.write_header()
