# SPDX-License-Identifier: GPL-2.0-or-later
"""Secrets (plain, base64, file, AES-256-CBC with keyid) and the QDict key order."""

from __future__ import annotations

import base64
import os

import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from qsd.objects import ObjectRegistry
from qsd.qmp.errors import QMPError
from qsd.qmp.keyorder import qemu_items


def test_plain_base64_and_file(tmp_path) -> None:
    reg = ObjectRegistry()
    reg.add({"qom-type": "secret", "id": "a", "data": "pw"})
    reg.add({"qom-type": "secret", "id": "b", "data": base64.b64encode(b"\x00\xff").decode(),
             "format": "base64"})
    (tmp_path / "k").write_bytes(b"from-file")
    reg.add({"qom-type": "secret", "id": "c", "file": str(tmp_path / "k")})
    assert reg.secret("a").value == b"pw"
    assert reg.secret("b").value == b"\x00\xff"
    assert reg.secret("c").value == b"from-file"


def test_encrypted_with_keyid() -> None:
    key, iv = os.urandom(32), os.urandom(16)
    padder = padding.PKCS7(128).padder()
    plain = padder.update(b"s3cret password") + padder.finalize()
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    ct = enc.update(plain) + enc.finalize()
    reg = ObjectRegistry()
    reg.add({"qom-type": "secret", "id": "master", "data": base64.b64encode(key).decode(),
             "format": "base64"})
    reg.add({"qom-type": "secret", "id": "pw", "data": base64.b64encode(ct).decode(),
             "format": "base64", "keyid": "master", "iv": base64.b64encode(iv).decode()})
    assert reg.secret("pw").value == b"s3cret password"


@pytest.mark.parametrize("args,text", [
    ({"id": "1x", "data": "x"}, "Parameter 'id' expects an identifier"),
    ({"id": "x"}, "Either 'file' or 'data' must be provided"),
    ({"id": "x", "data": "a", "file": "b"}, "'file' and 'data' are mutually exclusive"),
    ({"id": "x", "data": "!!", "format": "base64"}, "Base64 data contains invalid characters"),
    ({"id": "x", "data": "a", "keyid": "none"}, "No secret with id 'none'"),
    ({"id": "x", "data": "a", "keyid": "short"}, "Key should be 32 bytes in length"),
])
def test_secret_errors(args, text) -> None:
    reg = ObjectRegistry()
    reg.add({"qom-type": "secret", "id": "short", "data": "k"})
    with pytest.raises(QMPError) as exc:
        reg.add({"qom-type": "secret", **args})
    assert exc.value.desc == text


def test_duplicate_and_delete() -> None:
    reg = ObjectRegistry()
    reg.add({"qom-type": "iothread", "id": "io"})
    with pytest.raises(QMPError, match="attempt to add duplicate property 'io'"):
        reg.add({"qom-type": "secret", "id": "io", "data": "x"})
    reg.delete("io")
    with pytest.raises(QMPError, match="object 'io' not found"):
        reg.delete("io")


def test_qdict_order_matches_recorded_qsd_output() -> None:
    assert [k for k, _ in qemu_items({"major": 7, "minor": 2, "micro": 22})] == \
        ["micro", "minor", "major"]
    assert [k for k, _ in qemu_items({"timestamp": 0, "event": 0, "data": 0})] == \
        ["timestamp", "event", "data"]
    assert [k for k, _ in qemu_items({"id": 0, "type": 0, "node-name": 0, "shutting-down": 0})] \
        == ["node-name", "shutting-down", "type", "id"]


def test_qom_get() -> None:
    reg = ObjectRegistry()
    reg.add({"qom-type": "secret", "id": "s", "data": "pw"})
    reg.add({"qom-type": "iothread", "id": "io"})
    assert reg.qom_get("/objects/s", "data") == "pw"
    assert reg.qom_get("/objects/s", "keyid") == ""
    assert reg.qom_get("/objects/s", "loaded") is True
    assert reg.qom_get("/objects/io", "poll-max-ns") == 32768
    assert reg.qom_get("/objects", "type") == "container"
    with pytest.raises(QMPError, match=r"Property 'secret.bogus' not found"):
        reg.qom_get("/objects/s", "bogus")
    with pytest.raises(QMPError) as exc:
        reg.qom_get("/objects/nope", "type")
    assert exc.value.error_class == "DeviceNotFound"
