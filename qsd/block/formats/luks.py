# SPDX-License-Identifier: GPL-2.0-or-later
"""The ``luks`` format: a LUKS1 header on the ``file`` child, then the
payload encrypted sector by sector with the volume's master key.

The guest sees ``file size - payload offset`` bytes; sector ``n`` of the
guest (512 bytes) is encrypted with IV ``n``. Requests that do not cover
whole sectors are done by read-modify-write, and writes touching the same
sectors are serialised so that two of them never mix stale plaintext.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from qsd.block.node import CreateContext, Node, register_driver
from qsd.crypto.cipher import SECTOR_SIZE
from qsd.crypto.luks import LuksCreateOptions, LuksVolume, create_volume, open_volume
from qsd.qmp.errors import GenericError
from qsd.qmp.keyorder import qemu_items


def secret_password(objects: Any, secret_id: str | None, param: str = "key-secret") -> bytes:
    """The passphrase of secret ``secret_id`` with QEMU's errors (missing
    parameter, unknown id, not UTF-8)."""
    if secret_id is None:
        raise GenericError(f"Parameter '{param}' is required for cipher")
    secret = objects.secret(secret_id) if objects is not None else None
    if secret is None:
        raise GenericError(f"No secret with id '{secret_id}'")
    try:
        secret.value.decode("utf-8")
    except UnicodeDecodeError:
        raise GenericError(f"Data from secret {secret_id} is not valid UTF-8") from None
    return bytes(secret.value)


def _file_reader(node: Node, base: int = 0) -> Any:
    async def read(offset: int, length: int) -> bytearray:
        return await node.read(base + offset, length)
    return read


@register_driver
class LuksNode(Node):
    """LUKS1 encrypted image over its ``file`` child."""

    driver = "luks"
    is_format = True

    async def open(self, options: dict[str, Any]) -> None:
        file = await self.open_child("file", options["file"])
        password = secret_password(self.graph.objects, options.get("key-secret"))
        self.volume: LuksVolume = await open_volume(_file_reader(file), file.size, password)
        self._payload = self.volume.header.payload_bytes
        self._key_secret: str = options["key-secret"]
        self.encrypted = True
        self.request_alignment = SECTOR_SIZE
        # Sector ranges [start, end) of writes in flight, with their done events.
        self._inflight: list[tuple[int, int, asyncio.Event]] = []

    @property
    def size(self) -> int:
        """Follows the child, as QEMU recomputes it after a resize."""
        if "file" not in self.children:
            return 0
        return max(0, self.file.size - self._payload)

    @size.setter
    def size(self, value: int) -> None:
        """Node.__init__ assigns a placeholder; the real size is derived."""

    # ----- I/O ------------------------------------------------------------
    async def _read_sectors(self, first: int, count: int) -> bytearray:
        """Decrypted sectors ``first..first+count``; past the child's end
        the ciphertext reads as zeroes (a truncated last sector)."""
        start = self._payload + first * SECTOR_SIZE
        length = count * SECTOR_SIZE
        have = max(0, min(length, self.file.size - start))
        cipher = bytearray(length)
        if have:
            await self.file.read_into(start, memoryview(cipher)[:have])
        return self.volume.decrypt(first, cipher)

    async def read_into(self, offset: int, buf: memoryview) -> None:
        if not len(buf):
            return
        first = offset // SECTOR_SIZE
        end = -(-(offset + len(buf)) // SECTOR_SIZE)
        plain = await self._read_sectors(first, end - first)
        skip = offset - first * SECTOR_SIZE
        buf[:] = memoryview(plain)[skip:skip + len(buf)]

    async def drv_write(self, offset: int, data: bytes | bytearray | memoryview,
                    fua: bool = False) -> None:
        length = len(memoryview(data).cast("B"))
        if not length:
            return
        first = offset // SECTOR_SIZE
        end = -(-(offset + length) // SECTOR_SIZE)
        await self._claim(first, end)
        try:
            skip = offset - first * SECTOR_SIZE
            if skip or (offset + length) % SECTOR_SIZE:
                plain = await self._read_sectors(first, end - first)
                plain[skip:skip + length] = data
            else:
                plain = data
            await self.file.write(self._payload + first * SECTOR_SIZE,
                                  self.volume.encrypt(first, plain), fua)
        finally:
            self._release(first, end)

    async def _claim(self, first: int, end: int) -> None:
        """Wait until no write in flight touches sectors [first, end), then own them."""
        while True:
            busy = [ev for s, e, ev in self._inflight if s < end and first < e]
            if not busy:
                break
            await busy[0].wait()
        self._inflight.append((first, end, asyncio.Event()))

    def _release(self, first: int, end: int) -> None:
        for i, (s, e, ev) in enumerate(self._inflight):
            if s == first and e == end:
                del self._inflight[i]
                ev.set()
                return

    async def drv_truncate(self, size: int, exact: bool = False, prealloc: str = "off") -> None:
        await self.file.truncate(self._payload + size, exact, prealloc)

    # ----- introspection ----------------------------------------------------
    def json_options(self) -> dict[str, Any]:
        """The options QEMU shows for this node inside a ``json:`` filename."""
        child = self.file
        child_json = getattr(child, "json_options", None)
        inner = child_json() if child_json else dict(qemu_items(
            {"driver": child.driver, "filename": child.filename}))
        return dict(qemu_items({"driver": self.driver, "file": inner,
                                "key-secret": self._key_secret}))

    @property
    def filename(self) -> str:
        """Always a ``json:`` pseudo-filename: key-secret must be spelt out."""
        return "json:" + json.dumps(self.json_options())

    async def amend(self, options: dict[str, Any], force: bool) -> None:
        """x-blockdev-amend: add or erase key slots (see qsd.jobs.amend)."""
        from qsd.jobs.amend import amend_luks
        file = self.file

        async def write(offset: int, data: bytes) -> None:
            await file.write(offset, data)

        await amend_luks(self.volume, _file_reader(file), write, options, force,
                         self.graph.objects, self._key_secret)
        await file.flush()

    def format_specific(self) -> dict[str, Any]:
        return {"type": "luks", "data": self.volume.info()}

    # ----- blockdev-create --------------------------------------------------------
    @classmethod
    async def create(cls, ctx: CreateContext, options: dict[str, Any]) -> None:
        """Write a LUKS header (slot 0 under key-secret) to the ``file`` node
        and size it to hold ``size`` bytes of payload."""
        password = secret_password(ctx.objects, options.get("key-secret"))
        ref = options["file"]
        if isinstance(ref, str):
            file = ctx.graph.lookup(ref)
            if file is None:
                raise GenericError(f"Cannot find device='{ref}' nor node-name='{ref}'")
        else:
            file = await ctx.graph.open_node(ref)
        try:
            volume, writes = await create_volume(password, LuksCreateOptions.from_qapi(options))
            await file.truncate(volume.header.payload_bytes + options["size"], False,
                                options.get("preallocation", "off"))
            for offset, data in writes:
                await file.write(offset, data)
            await file.flush()
        finally:
            if not isinstance(ref, str):
                await ctx.graph.close_node(file)
