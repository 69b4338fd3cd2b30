# SPDX-License-Identifier: GPL-2.0-or-later
"""The qcow2 header and its extensions (docs/interop/qcow2.txt, "Header").

Parsing never trusts a field: every offset and size is checked against the
cluster size, the file size and QEMU's implementation limits before anything
is allocated from it, and failures are QMPErrors with QEMU 7.2's texts.
Serialising keeps unknown extensions and unknown additional header fields,
so an image rewritten by us loses nothing another implementation stored.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from qsd.qmp.errors import GenericError

MAGIC = b"QFI\xfb"
V2_HEADER_LEN = 72
V3_HEADER_LEN = 104
#: Header length QEMU writes for v3: through compression_type, padded to 8.
V3_WRITE_LEN = 112

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
#: QEMU's limits (qcow2.txt notes): 32 MiB of L1 table, 8 MiB of refcount table.
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_BACKING_NAME = 1023
#: Host offsets in tables must stay below 2^56 (qcow2.txt "Cluster mapping").
MAX_HOST_OFFSET = 1 << 56
#: QEMU refuses snapshot tables with more entries than this.
MAX_SNAPSHOTS = 65536

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE
                  | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2)
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

#: The feature name table images carry so that older readers can name
#: features they do not know (names as the specification lists the bits).
FEATURE_NAMES: tuple[tuple[int, int, str], ...] = (
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
)

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")


def _round8(n: int) -> int:
    return (n + 7) & ~7


@dataclass
class Header:
    """The decoded header; ``extensions`` keeps unknown ones verbatim."""

    version: int = 3
    cluster_bits: int = 16
    size: int = 0
    crypt_method: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = V3_WRITE_LEN
    compression_type: int = COMPRESSION_ZLIB
    #: Additional header fields past compression_type we do not know, kept.
    extra_fields: bytes = b""
    backing_file: str | None = None
    backing_fmt: str | None = None
    data_file: str | None = None
    #: (offset, length) of the full disk encryption header, if any.
    crypto_header: tuple[int, int] | None = None
    #: The raw bitmaps extension, kept until bitmaps are supported.
    bitmaps_ext: bytes | None = None
    feature_table: list[tuple[int, int, str]] = field(default_factory=list)
    unknown_extensions: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible & INCOMPAT_EXTL2)

    # ----- parsing ------------------------------------------------------
    @classmethod
    def parse(cls, buf: bytes, file_size: int) -> "Header":
        """Decode the first cluster (or what the file has of it)."""
        if len(buf) < V2_HEADER_LEN or buf[:4] != MAGIC:
            raise GenericError("Image is not in qcow2 format")
        (_, version, backing_off, backing_len, cluster_bits, size, crypt, l1_size, l1_off,
         rt_off, rt_clusters, nb_snap, snap_off) = _V2.unpack_from(buf)
        if version not in (2, 3):
            raise GenericError(f"Unsupported qcow2 version {version}")
        if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
            raise GenericError(f"Unsupported cluster size: 2^{cluster_bits}")
        h = cls(version=version, cluster_bits=cluster_bits, size=size, crypt_method=crypt,
                l1_size=l1_size, l1_table_offset=l1_off, refcount_table_offset=rt_off,
                refcount_table_clusters=rt_clusters, nb_snapshots=nb_snap,
                snapshots_offset=snap_off)
        cs = h.cluster_size
        if version == 3:
            if len(buf) < V3_HEADER_LEN:
                raise GenericError("qcow2 header too short")
            (h.incompatible, h.compatible, h.autoclear, h.refcount_order,
             h.header_length) = _V3.unpack_from(buf, V2_HEADER_LEN)
            if h.header_length < V3_HEADER_LEN:
                raise GenericError("qcow2 header too short")
            if h.header_length > cs:
                raise GenericError("qcow2 header exceeds cluster size")
            if h.header_length > len(buf):
                raise GenericError("qcow2 header too short")
            if h.header_length > V3_HEADER_LEN:
                h.compression_type = buf[V3_HEADER_LEN]
                h.extra_fields = bytes(buf[V3_HEADER_LEN + 1:h.header_length])
        else:
            h.header_length = V2_HEADER_LEN
        if backing_off > cs:
            raise GenericError("Invalid backing file offset")
        if h.refcount_order > 6:
            raise GenericError("Reference count entry width too large; may not exceed 64 bits")
        h._parse_extensions(buf, backing_off)
        unknown = h.incompatible & ~INCOMPAT_KNOWN
        if unknown:
            raise GenericError(f"Unsupported qcow2 feature(s): {h._feature_text(unknown)}")
        if h.compression_type not in COMPRESSION_NAMES:
            raise GenericError(f"qcow2: unknown compression type: {h.compression_type}")
        if bool(h.compression_type) != bool(h.incompatible & INCOMPAT_COMPRESSION):
            if h.compression_type:
                raise GenericError(
                    "qcow2: Compression type incompatible feature bit must be set")
            raise GenericError("qcow2: Compression type incompatible feature bit must not be set")
        if h.extended_l2 and cluster_bits < 14:
            raise GenericError(f"Unsupported subcluster size: {cs // 32}")
        if crypt > 2:
            raise GenericError(f"Unsupported encryption method {crypt}")
        if backing_off:
            if backing_len > MAX_BACKING_NAME or backing_off + backing_len > cs:
                raise GenericError("Backing file name too long")
            if backing_off + backing_len > len(buf):
                raise GenericError("Invalid backing file offset")
            h.backing_file = bytes(buf[backing_off:backing_off + backing_len]).decode(
                "utf-8", "replace")
        h._check_tables(file_size)
        return h

    def _feature_text(self, mask: int) -> str:
        """Names from the image's feature table, then the unnamed rest, as QEMU words it."""
        names = []
        for kind, bit, name in self.feature_table:
            if kind == 0 and mask & (1 << bit):
                names.append(name)
                mask &= ~(1 << bit)
        if mask:
            names.append(f"Unknown incompatible feature: {mask:x}")
        return ", ".join(names)

    def _parse_extensions(self, buf: bytes, backing_off: int) -> None:
        cs = self.cluster_size
        end = min(len(buf), cs, backing_off if backing_off else cs)
        pos = self.header_length
        seen: set[int] = set()
        while pos + 8 <= end:
            ext_type, ext_len = struct.unpack_from(">II", buf, pos)
            pos += 8
            if ext_type == EXT_END:
                return
            if ext_len > end - pos:
                raise GenericError("Invalid header extension: length exceeds the header cluster")
            data = bytes(buf[pos:pos + ext_len])
            pos += _round8(ext_len)
            if ext_type in seen and ext_type != 0:
                raise GenericError(f"Duplicate header extension 0x{ext_type:08x}")
            seen.add(ext_type)
            if ext_type == EXT_BACKING_FORMAT:
                self.backing_fmt = data.decode("utf-8", "replace")
            elif ext_type == EXT_DATA_FILE:
                self.data_file = data.decode("utf-8", "replace")
            elif ext_type == EXT_FEATURE_TABLE:
                for i in range(0, len(data) - 47, 48):
                    name = data[i + 2:i + 48].split(b"\0", 1)[0].decode("utf-8", "replace")
                    self.feature_table.append((data[i], data[i + 1], name))
            elif ext_type == EXT_CRYPTO:
                if ext_len != 16:
                    raise GenericError("Invalid encryption header extension length")
                self.crypto_header = struct.unpack(">QQ", data)
            elif ext_type == EXT_BITMAPS:
                self.bitmaps_ext = data
            else:
                self.unknown_extensions.append((ext_type, data))

    def _check_tables(self, file_size: int) -> None:
        """Offsets aligned, inside the file, sizes within QEMU's limits."""
        cs = self.cluster_size
        rt_bytes = self.refcount_table_clusters * cs
        if rt_bytes > MAX_REFTABLE_BYTES:
            raise GenericError("Reference count table too large")
        if (self.refcount_table_clusters == 0
                or not _table_ok(self.refcount_table_offset, rt_bytes, cs, file_size)):
            raise GenericError("Reference count table offset invalid")
        if self.l1_size > MAX_L1_BYTES // 8:
            raise GenericError("Active L1 table too large")
        if self.l1_size < self.l1_entries_needed(self.size):
            raise GenericError("L1 table is too small")
        if self.l1_size and not _table_ok(self.l1_table_offset, self.l1_size * 8, cs, file_size):
            raise GenericError("Active L1 table offset invalid")
        if self.nb_snapshots > MAX_SNAPSHOTS:
            raise GenericError("Too many snapshots")
        if self.nb_snapshots and not _table_ok(self.snapshots_offset, 1, cs, file_size):
            raise GenericError("Snapshot table offset invalid")
        if self.crypto_header is not None:
            off, length = self.crypto_header
            if not _table_ok(off, max(length, 1), cs, file_size):
                raise GenericError("Invalid encryption header offset")
        if self.l1_size and _overlap(self.l1_table_offset, self.l1_size * 8,
                                     self.refcount_table_offset, rt_bytes):
            raise GenericError("Active L1 table overlaps the reference count table")
        if self.l1_size and self.l1_table_offset < cs:
            raise GenericError("Active L1 table offset invalid")
        if self.refcount_table_offset < cs:
            raise GenericError("Reference count table offset invalid")

    def l1_entries_needed(self, size: int) -> int:
        """L1 entries that cover ``size`` guest bytes."""
        l2_bytes = self.cluster_size * (self.cluster_size // (16 if self.extended_l2 else 8))
        return -(-size // l2_bytes)

    # ----- serialising -------------------------------------------------
    def pack(self) -> bytes:
        """The header cluster's contents: header, extensions, backing name."""
        cs = self.cluster_size
        backing = (self.backing_file or "").encode()
        out = bytearray(_V2.size)
        if self.version == 3:
            out += _V3.pack(self.incompatible, self.compatible, self.autoclear,
                            self.refcount_order, self.header_length)
            tail = bytes([self.compression_type]) + self.extra_fields
            out += tail.ljust(self.header_length - V3_HEADER_LEN, b"\0")
        for ext_type, data in self._extensions():
            out += struct.pack(">II", ext_type, len(data)) + data
            out += bytes(_round8(len(data)) - len(data))
        out += bytes(8)  # end of extensions
        backing_off = len(out) if backing else 0
        out += backing
        if len(out) > cs:
            raise GenericError("Header extensions and backing file name do not fit in a cluster")
        _V2.pack_into(out, 0, MAGIC, self.version, backing_off, len(backing),
                      self.cluster_bits, self.size, self.crypt_method, self.l1_size,
                      self.l1_table_offset, self.refcount_table_offset,
                      self.refcount_table_clusters, self.nb_snapshots, self.snapshots_offset)
        return bytes(out)

    def _extensions(self) -> list[tuple[int, bytes]]:
        exts: list[tuple[int, bytes]] = []
        if self.backing_fmt:
            exts.append((EXT_BACKING_FORMAT, self.backing_fmt.encode()))
        if self.data_file:
            exts.append((EXT_DATA_FILE, self.data_file.encode()))
        if self.crypto_header is not None:
            exts.append((EXT_CRYPTO, struct.pack(">QQ", *self.crypto_header)))
        if self.version >= 3 and self.cluster_size > 4096:
            # QEMU writes the table for v3 images only, and not where the
            # header cluster is small (it would crowd out the rest).
            table = self.feature_table or list(FEATURE_NAMES)
            exts.append((EXT_FEATURE_TABLE, b"".join(
                bytes([kind, bit]) + name.encode()[:46].ljust(46, b"\0")
                for kind, bit, name in table)))
        if self.bitmaps_ext is not None:
            exts.append((EXT_BITMAPS, self.bitmaps_ext))
        exts.extend(self.unknown_extensions)
        return exts


def _table_ok(offset: int, length: int, cluster_size: int, file_size: int) -> bool:
    """Aligned, no overflow, and inside the file."""
    if offset % cluster_size or offset <= 0:
        return False
    if offset >= MAX_HOST_OFFSET or length > MAX_HOST_OFFSET:
        return False
    return offset + length <= file_size


def _overlap(a: int, alen: int, b: int, blen: int) -> bool:
    return a < b + blen and b < a + alen
