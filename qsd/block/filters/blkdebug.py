# SPDX-License-Identifier: GPL-2.0-or-later
"""The ``blkdebug`` test filter: fail requests on cue.

Rules come from a ``config`` file in QEMU's config-file format
(``[inject-error]`` / ``[set-state]`` sections of ``key = "value"`` lines)
and then from the inline ``inject-error``/``set-state`` lists. Each rule
waits for an *event* (a BlkdebugEvent name: ``read_aio``, ``write_aio``,
``pwritev``, ``flush_to_disk``, ...) that parents and the block layer fire on
this node (:meth:`Node.debug_event`), and applies only in its ``state``
(0: any; the node starts in state 1):

* set-state rules move the node to ``new_state`` once the event's rules ran;
* inject-error rules become *active*: the next requests of their ``iotype``
  (default: read, write, write-zeroes, discard, flush) covering ``sector``
  (default: any) fail with ``errno`` (default EIO), once or until another
  event activates other rules. Unless ``immediately``, the failure comes
  after one trip through the event loop, as QEMU yields first.

``align``, ``max-transfer`` and the zero-write/discard limits change the
limits the node announces, checked as QEMU checks them.
"""

from __future__ import annotations

import asyncio
import errno as errno_mod
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from qsd.block.filters import FilterNode
from qsd.block.filters.throttle import child_json
from qsd.block.node import Extent, Perm, register_driver
from qsd.qmp.errors import GenericError
from qsd.qmp.keyorder import qemu_items

INT_MAX = (1 << 31) - 1
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
UINT64 = 1 << 64
SECTOR = 512

EVENTS = (
    "l1_update", "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table",
    "l2_load", "l2_update", "l2_update_compressed", "l2_alloc_cow_read", "l2_alloc_write",
    "read_aio", "read_backing_aio", "read_compressed", "write_aio", "write_compressed",
    "vmstate_load", "vmstate_save", "cow_read", "cow_write", "reftable_load", "reftable_grow",
    "reftable_update", "refblock_load", "refblock_update", "refblock_update_part",
    "refblock_alloc", "refblock_alloc_hookup", "refblock_alloc_write",
    "refblock_alloc_write_blocks", "refblock_alloc_write_table", "refblock_alloc_switch_table",
    "cluster_alloc", "cluster_alloc_bytes", "cluster_free", "flush_to_os", "flush_to_disk",
    "pwritev_rmw_head", "pwritev_rmw_after_head", "pwritev_rmw_tail", "pwritev_rmw_after_tail",
    "pwritev", "pwritev_zero", "pwritev_done", "empty_image_prepare", "l1_shrink_write_table",
    "l1_shrink_free_l2_clusters", "cor_write", "cluster_alloc_space", "none")
IO_TYPES = ("read", "write", "write-zeroes", "discard", "flush", "block-status")
DEFAULT_IO_TYPES = frozenset(("read", "write", "write-zeroes", "discard", "flush"))

#: Keys each config group accepts, with their QemuOpts types.
GROUPS: dict[str, dict[str, str]] = {
    "inject-error": {"event": "string", "state": "number", "iotype": "string",
                     "errno": "number", "sector": "number", "once": "bool",
                     "immediately": "bool"},
    "set-state": {"event": "string", "state": "number", "new_state": "number"},
}

# ---------------------------------------------------------------------------
# QEMU's config-file format (qemu_config_parse), byte for byte

_LINE_MAX = 1023          # fgets() into a 1024-byte buffer
_NAME_MAX = 63            # %63s / %63[...]
_VALUE_MAX = 1023         # %1023[^"]
_SPACE = b" \t\n\v\f\r"


class _Scan:
    """A tiny sscanf: the conversions qemu_config_parse uses."""

    def __init__(self, text: bytes) -> None:
        self.text = text
        self.pos = 0

    def literal(self, char: bytes) -> bool:
        if self.text[self.pos:self.pos + 1] == char:
            self.pos += 1
            return True
        return False

    def space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in _SPACE:
            self.pos += 1

    def word(self, limit: int) -> bytes | None:
        """``%Ns``: skip blanks, then up to N non-blanks (at least one)."""
        self.space()
        start = self.pos
        while (self.pos < len(self.text) and self.text[self.pos] not in _SPACE
               and self.pos - start < limit):
            self.pos += 1
        return self.text[start:self.pos] if self.pos > start else None

    def until(self, stop: bytes, limit: int) -> bytes | None:
        """``%N[^x]``: up to N bytes other than ``stop`` (at least one)."""
        start = self.pos
        while (self.pos < len(self.text) and self.text[self.pos] not in stop
               and self.pos - start < limit):
            self.pos += 1
        return self.text[start:self.pos] if self.pos > start else None


def _lines(data: bytes) -> Iterator[bytes]:
    """What successive fgets() calls into a 1024-byte buffer return."""
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos, pos + _LINE_MAX)
        end = nl + 1 if nl >= 0 else min(pos + _LINE_MAX, len(data))
        yield data[pos:end]
        pos = end


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


@dataclass
class ConfigGroup:
    """One ``[group]`` section: its name and key/value pairs in file order."""

    name: str
    values: dict[str, str]


def parse_config(data: bytes,
                 on_group: Callable[[ConfigGroup], None] = lambda group: None) -> list[ConfigGroup]:
    """Split a config file into groups, raising GenericError with QEMU's text
    where qemu_config_parse does. ``on_group`` sees each group once it is
    complete (at the next header or the end), as QEMU checks groups then, so
    its errors come in QEMU's order."""
    groups: list[ConfigGroup] = []
    # QEMU scans group names into one buffer, which a line that only looks
    # like a header (``[]``) overwrites too; the last group is checked under
    # whatever that buffer holds at the end.
    scanned = ""

    def start(group: ConfigGroup) -> None:
        if groups:
            on_group(groups[-1])
        groups.append(group)

    for line in _lines(data):
        if line[:1] in (b"\n", b"#"):
            continue
        line = line.split(b"\0", 1)[0]
        scan = _Scan(line)
        if scan.literal(b"["):
            head = scan.pos
            name = scan.word(_NAME_MAX)
            if name is not None:
                scanned = _text(name)
                scan.space()
                if scan.literal(b'"'):
                    gid = scan.until(b'"', _NAME_MAX)
                    if gid is not None:
                        start(ConfigGroup(_text(name), {"id": _text(gid)}))
                        continue
            scan.pos = head
            name = scan.until(b"]", _NAME_MAX)
            if name is not None:
                scanned = _text(name)
                start(ConfigGroup(scanned, {}))
                continue
        scan = _Scan(line)
        arg = scan.word(_NAME_MAX)
        if arg is None:
            raise GenericError("parse error")
        value = b""
        scan.space()
        if scan.literal(b"="):
            scan.space()
            if scan.literal(b'"'):
                value = scan.until(b'"', _VALUE_MAX) or b""
        if not groups:
            raise GenericError("no group defined")
        groups[-1].values[_text(arg)] = _text(value)
    if groups:
        groups[-1].name = scanned
        on_group(groups[-1])
    return groups


# ---------------------------------------------------------------------------
# QemuOpts value parsing


def parse_number(name: str, text: str) -> int:
    """qemu_strtou64 with base 0 (C syntax, a sign wraps around)."""
    body = text.lstrip(" \t\n\v\f\r")
    negative = body[:1] == "-"
    if body[:1] in "+-" and body:
        body = body[1:]
    try:
        if body[:2].lower() == "0x" and len(body) > 2:
            value = int(body[2:], 16)
        elif body[:1] == "0" and len(body) > 1:
            value = int(body[1:], 8)
        else:
            value = int(body, 10) if body.isascii() and body.isdigit() else int("x")
    except ValueError:
        raise GenericError(f"Parameter '{name}' expects a number") from None
    if value >= UINT64:
        raise GenericError(f"Value '{text}' is too large for parameter '{name}'")
    return (UINT64 - value) % UINT64 if negative else value


def parse_bool(name: str, text: str) -> bool:
    if text in ("on", "yes", "true", "y"):
        return True
    if text in ("off", "no", "false", "n"):
        return False
    raise GenericError(f"Parameter '{name}' expects 'on' or 'off'")


def _signed(value: int) -> int:
    """A uint64 read back into an int64, as QEMU stores these numbers."""
    return value - UINT64 if value >= 1 << 63 else value


def _as_int(value: int) -> int:
    """Truncated to a C int (errno is one)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


@dataclass(eq=False)
class Rule:
    event: str
    state: int
    #: inject-error rules
    error: int = 0
    iotypes: frozenset[str] = DEFAULT_IO_TYPES
    offset: int = -1
    once: bool = False
    immediately: bool = False
    #: set-state rules (None: an inject-error rule)
    new_state: int | None = None


def _typed_group(group: str, values: dict[str, Any], ids: set[str] | None = None) -> dict[str, Any]:
    """Check one group's id and keys and parse its values
    (qemu_opts_from_qdict: keys in QEMU's dict order, so the first error is
    QEMU's); ``ids`` are the ids the group's earlier sections took."""
    kinds = GROUPS.get(group)
    if kinds is None:
        raise GenericError(f"There is no option group '{group}'")
    gid = values.get("id")
    if gid is not None and ids is not None:
        if not _ID_RE.match(gid):
            raise GenericError("Parameter 'id' expects an identifier")
        if gid in ids:
            raise GenericError(f"Duplicate ID '{gid}' for {group}")
        ids.add(gid)
    out: dict[str, Any] = {}
    for key, value in qemu_items(values):
        if key == "id":
            continue
        kind = kinds.get(key)
        if kind is None:
            raise GenericError(f"Invalid parameter '{key}'")
        if isinstance(value, str) and kind == "number":
            value = parse_number(key, value)
        elif isinstance(value, str) and kind == "bool":
            value = parse_bool(key, value)
        elif isinstance(value, int) and not isinstance(value, bool) and value < 0:
            value %= UINT64
        out[key] = value
    return out


def make_rule(group: str, opts: dict[str, Any]) -> Rule:
    """QEMU's add_rule for one group's parsed options."""
    event = opts.get("event")
    if event is None:
        raise GenericError("Missing event name for rule")
    if event not in EVENTS:
        raise GenericError(f"invalid parameter value: {event}")
    state = _signed(opts.get("state", 0))
    if group == "set-state":
        return Rule(event, state, new_state=_signed(opts.get("new_state", 0)))
    iotype = opts.get("iotype")
    if iotype is not None and iotype not in IO_TYPES:
        raise GenericError(f"invalid parameter value: {iotype}")
    sector = _signed(opts.get("sector", UINT64 - 1))
    return Rule(event, state, error=_as_int(opts.get("errno", errno_mod.EIO)),
                iotypes=frozenset((iotype,)) if iotype else DEFAULT_IO_TYPES,
                offset=-1 if sector == -1 else sector * SECTOR,
                once=bool(opts.get("once", False)),
                immediately=bool(opts.get("immediately", False)))


def build_rules(config: bytes | None, inject: list[dict[str, Any]],
                set_state: list[dict[str, Any]]) -> list[Rule]:
    """All rules: the config file's, then the inline ones; inject-error
    rules before set-state rules (QEMU's order)."""
    parsed: dict[str, list[dict[str, Any]]] = {"inject-error": [], "set-state": []}

    ids: dict[str, set[str]] = {name: set() for name in GROUPS}

    def typed(group: ConfigGroup) -> None:
        opts = _typed_group(group.name, group.values, ids.get(group.name))
        parsed[group.name].append(opts)

    if config is not None:
        parse_config(config, typed)
    parsed["inject-error"] += [_typed_group("inject-error", o) for o in inject]
    parsed["set-state"] += [_typed_group("set-state", o) for o in set_state]
    return [make_rule(group, opts) for group in ("inject-error", "set-state")
            for opts in parsed[group]]


# ---------------------------------------------------------------------------
# The node


@register_driver
class BlkdebugNode(FilterNode):
    driver = "blkdebug"
    #: Every read has to pass the rules.
    maps_host = False
    child_name = "image"

    async def open(self, options: dict[str, Any]) -> None:
        config_path = options.get("config")
        data = None
        if config_path is not None:
            try:
                with open(config_path, "rb") as f:
                    data = f.read(16 << 20)
            except OSError as e:
                raise GenericError("Could not read blkdebug config file: "
                                   f"{e.strerror or 'Unknown error'}") from None
        sizes = {k: options[k] for k in ("align", "max-transfer", "opt-write-zero",
                                          "max-write-zero", "opt-discard", "max-discard")
                 if k in options}
        for name, value in qemu_items(sizes):
            if value < 0:
                raise GenericError(f"Parameter '{name}' expects a non-negative number below 2^64")
        rules = build_rules(data, options.get("inject-error", []), options.get("set-state", []))
        self.config_path = config_path
        self.rules = rules
        self.state = 1
        self.active: list[Rule] = []
        self.take_perms = _perms(options.get("take-child-perms", []))
        self.unshare_perms = _perms(options.get("unshare-child-perms", []))
        self._json = {k: options[k] for k in ("config", "align", "max-transfer", "opt-write-zero",
                                               "max-write-zero", "opt-discard", "max-discard",
                                               "inject-error", "set-state") if k in options}
        await super().open(options)
        self._limits(options)

    def _limits(self, options: dict[str, Any]) -> None:
        """QEMU's checks of the overridden request limits, in its order."""
        child = self.filtered

        def check(name: str, value: int, multiple: int) -> int:
            if value and (value >= INT_MAX or value < 0 or value % multiple):
                raise GenericError(f"Cannot meet constraints with {name} {value % UINT64}")
            return value

        align = options.get("align", 0)
        if align and (align >= INT_MAX or align < 0 or align & (align - 1)):
            raise GenericError(f"Cannot meet constraints with align {align % UINT64}")
        base = max(align, child.request_alignment)
        self.max_transfer = check("max-transfer", options.get("max-transfer", 0), base) \
            or child.max_transfer
        opt_wz = check("opt-write-zero", options.get("opt-write-zero", 0), base)
        check("max-write-zero", options.get("max-write-zero", 0), max(opt_wz, base))
        opt_discard = check("opt-discard", options.get("opt-discard", 0), base)
        check("max-discard", options.get("max-discard", 0), max(opt_discard, base))
        self.request_alignment = base

    def child_perm(self, edge: Any, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        return perm | self.take_perms, shared & ~self.unshare_perms

    # ----- events and rules -------------------------------------------------------
    #: Writes done and writes flushed (QEMU's write_gen/flushed_gen): a flush
    #: with nothing new to flush does nothing. The parent keeps its own pair
    #: (it fires flush_to_disk only when it has something to flush), which
    #: follows ours: its writes are the ones that reach us.
    _write_gen = 0
    _flushed_gen = 0
    _parent_write_gen = 0
    _parent_flushed_gen = 0

    def debug_event(self, event: str) -> None:
        if event == "flush_to_disk":
            if self._parent_write_gen == self._parent_flushed_gen:
                return
            self._parent_flushed_gen = self._parent_write_gen
        new_state = self.state
        activated: list[Rule] | None = None
        # QEMU walks an event's rules newest first and puts each at the head
        # of the active list, so the first rule defined is checked first.
        for rule in reversed(self.rules):
            if rule.event != event or (rule.state and rule.state != self.state):
                continue
            if rule.new_state is not None:
                new_state = rule.new_state
            else:
                if activated is None:
                    activated = []
                activated.insert(0, rule)
        if activated is not None:
            self.active = activated
        self.state = new_state

    async def _check(self, offset: int, length: int, iotype: str) -> None:
        """Fail the request if an active rule says so."""
        if not self.active:
            return
        for rule in self.active:
            if ((rule.offset == -1 or (length and offset <= rule.offset < offset + length))
                    and iotype in rule.iotypes):
                break
        else:
            return
        if not rule.error:
            return
        if rule.once:
            self.active.remove(rule)
            self.rules.remove(rule)
        if not rule.immediately:
            await asyncio.sleep(0)
        raise OSError(rule.error, _strerror(rule.error))

    # ----- I/O ------------------------------------------------------------------
    # With ``align`` above the child's alignment, requests reach the rules in
    # whole aligned blocks, as QEMU's block layer pads them: reads are read
    # whole, unaligned writes read the partial blocks first (through the
    # rules, with the pwritev_rmw_* events) and write whole blocks.

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        align = self.request_alignment
        return offset // align * align, -(-(offset + length) // align) * align

    async def _read_aligned(self, start: int, buf: memoryview) -> None:
        """Read ``buf`` at the aligned ``start``; what lies past the child's
        end reads as zeroes."""
        await self._check(start, len(buf), "read")
        n = max(0, min(len(buf), self.filtered.size - start))
        if n:
            await self.filtered.read_into(start, buf[:n])
        if n < len(buf):
            buf[n:] = bytes(len(buf) - n)

    async def read_into(self, offset: int, buf: memoryview) -> None:
        start, end = self._span(offset, len(buf))
        if start == offset and end == offset + len(buf):
            await self._check(offset, len(buf), "read")
            await self.filtered.read_into(offset, buf)
            return
        bounce = bytearray(end - start)
        await self._read_aligned(start, memoryview(bounce))
        buf[:] = bounce[offset - start:offset - start + len(buf)]

    async def _padded(self, offset: int, data: bytes | bytearray | memoryview) -> tuple[int, bytearray]:
        """An unaligned write as whole blocks: the partial ones read first."""
        length = data.nbytes if isinstance(data, memoryview) else len(data)
        start, end = self._span(offset, length)
        end = min(end, max(self.filtered.size, offset + length))
        align = self.request_alignment
        bounce = bytearray(end - start)
        view = memoryview(bounce)
        # A parent node takes our alignment and pads its requests itself in
        # QEMU: the rmw events are its own then, and its padding reads come
        # to us as reads (read_aio).
        below_node = any(edge.parent is not None for edge in self.parents)

        async def read_block(pos: int, block: memoryview, where: str) -> None:
            if below_node:
                self.debug_event("read_aio")
            else:
                self.debug_event(f"pwritev_rmw_{where}")
            await self._read_aligned(pos, block)
            if not below_node:
                self.debug_event(f"pwritev_rmw_after_{where}")

        if offset != start:
            await read_block(start, view[:min(align, end - start)], "head")
        tail = (end - 1) // align * align
        if end != offset + length and (tail != start or offset == start):
            await read_block(tail, view[tail - start:], "tail")
        bounce[offset - start:offset - start + length] = data
        return start, bounce

    async def drv_write(self, offset: int, data: bytes | bytearray | memoryview,
                        fua: bool = False) -> None:
        try:
            length = data.nbytes if isinstance(data, memoryview) else len(data)
            start, end = self._span(offset, length)
            if start != offset or end != offset + length:
                offset, data = await self._padded(offset, data)
                length = len(data)
            await self._check(offset, length, "write")
            await self.filtered.write(offset, data)
        finally:
            self._written()
        if fua:
            await self._emulate_fua()

    async def drv_write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                               fua: bool = False, no_fallback: bool = False) -> None:
        try:
            start, end = self._span(offset, length)
            align = self.request_alignment
            # Partial blocks at either end become padded writes of zeroes.
            for lo, hi in ((offset, min(offset + length, start + align) if offset != start else offset),
                           (max(offset, (offset + length) // align * align)
                            if end != offset + length else offset + length, offset + length)):
                if lo < hi:
                    pos, data = await self._padded(lo, bytes(hi - lo))
                    await self._check(pos, len(data), "write")
                    await self.filtered.write(pos, data)
            lo = -(-offset // align) * align
            hi = (offset + length) // align * align
            if lo < hi:
                await self._check(lo, hi - lo, "write-zeroes")
                await self.filtered.write_zeroes(lo, hi - lo, may_unmap, False, no_fallback)
        finally:
            self._written()
        if fua:
            await self._emulate_fua()

    async def drv_discard(self, offset: int, length: int) -> None:
        """Discards are advisory: partial blocks are left alone."""
        align = self.request_alignment
        lo, hi = -(-offset // align) * align, (offset + length) // align * align
        if lo >= hi:
            return
        try:
            await self._check(lo, hi - lo, "discard")
            await self.filtered.discard(lo, hi - lo)
        finally:
            self._written()

    def _written(self) -> None:
        self._write_gen += 1
        self._parent_write_gen += 1

    async def _emulate_fua(self) -> None:
        """Neither blkdebug nor a format above it does FUA itself: QEMU
        follows the write with a flush of this node (which the rules see)
        and then with one of the parent, which fires its flush events here."""
        await self.flush()
        if any(edge.parent is not None for edge in self.parents):
            self.debug_event("flush_to_os")
            self.debug_event("flush_to_disk")

    async def flush(self) -> None:
        """Flush what was written since the last successful flush (QEMU
        skips the driver's flush when there is nothing new)."""
        gen = self._write_gen
        if gen == self._flushed_gen:
            return
        await self._check(0, 0, "flush")
        await self.filtered.flush()
        self._flushed_gen = gen

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        await self._check(offset, length, "block-status")
        return await super().block_status(offset, length)

    # ----- introspection --------------------------------------------------------

    def actual_size(self) -> int | None:
        """QEMU shows none for blkdebug."""
        return None

    def json_options(self) -> dict[str, Any]:
        # QEMU copies its flattened options over in its own dict order, so
        # build them in schema order and insert them in that order.
        source: dict[str, Any] = {}
        for key, value in self._json.items():
            if isinstance(value, list):
                for i, item in enumerate(value):
                    for k in (*GROUPS[key],):
                        if k in item:
                            source[f"{key}.{i}.{k}"] = item[k]
            else:
                source[key] = value
        flat = dict(qemu_items(source))
        flat["image"] = child_json(self.filtered)
        flat["driver"] = self.driver
        return dict(qemu_items(flat))

    @property
    def filename(self) -> str:
        inner = self.filtered.filename
        if set(self._json) <= {"config"} and not inner.startswith("json:"):
            return f"blkdebug:{self.config_path or ''}:{inner}"
        return "json:" + json.dumps(self.json_options())


def _perms(names: list[str]) -> Perm:
    bits = {"consistent-read": Perm.CONSISTENT_READ, "write": Perm.WRITE,
            "write-unchanged": Perm.WRITE_UNCHANGED, "resize": Perm.RESIZE}
    out = Perm(0)
    for name in names:
        out |= bits[name]
    return out


def _strerror(code: int) -> str:
    try:
        return os.strerror(code)
    except ValueError:
        return "Unknown error"
