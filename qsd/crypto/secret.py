# SPDX-License-Identifier: GPL-2.0-or-later
"""The ``secret`` object: passwords and keys handed to drivers by id.

The value comes from ``data`` or ``file``, optionally base64-encoded, and
optionally AES-256-CBC encrypted with another secret (``keyid``, ``iv``) so
that a password never crosses the wire in clear.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Callable

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from qsd.qmp.errors import GenericError

AES_BLOCK = 16


def b64decode(text: str | bytes) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise GenericError("Base64 data contains invalid characters") from None


class Secret:
    qom_type = "secret"

    def __init__(self, props: dict[str, Any], lookup: Callable[[str], "Secret | None"]) -> None:
        self.props = props
        data, path = props.get("data"), props.get("file")
        if data is not None and path is not None:
            raise GenericError("'file' and 'data' are mutually exclusive")
        if data is None and path is None:
            raise GenericError("Either 'file' or 'data' must be provided")
        if path is not None:
            try:
                with open(path, "rb") as f:
                    raw = f.read()
            except OSError as e:
                raise GenericError(
                    f"Unable to read {path}: Failed to open file \u201c{path}\u201d: "
                    f"{e.strerror}") from None
        else:
            raw = data.encode()
        keyid = props.get("keyid")
        if keyid is not None:
            raw = self._decrypt(raw, keyid, props.get("iv"), lookup)
        elif props.get("format", "raw") == "base64":
            raw = b64decode(raw)
        self.value = raw

    @staticmethod
    def _decrypt(data: bytes, keyid: str, iv_b64: str | None,
                 lookup: Callable[[str], "Secret | None"]) -> bytes:
        master = lookup(keyid)
        if master is None:
            raise GenericError(f"No secret with id '{keyid}'")
        key = master.value
        if len(key) != 32:
            raise GenericError("Key should be 32 bytes in length")
        if iv_b64 is None:
            raise GenericError("IV is required to decrypt secret")
        iv = b64decode(iv_b64)
        if len(iv) != AES_BLOCK:
            raise GenericError(f"IV should be 16 bytes in length not {len(iv)}")
        ciphertext = b64decode(data)
        if len(ciphertext) % AES_BLOCK:
            raise GenericError(
                f"Length {len(ciphertext)} must be a multiple of block size {AES_BLOCK}")
        dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
        plain = dec.update(ciphertext) + dec.finalize()
        pad = plain[-1] if plain else 0
        if pad > len(plain):
            raise GenericError(
                f"Incorrect number of padding bytes ({pad}) found on decrypted data")
        return plain[:len(plain) - pad]

    def as_text(self) -> str:
        return self.value.decode("utf-8", "replace")
