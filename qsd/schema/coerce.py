# SPDX-License-Identifier: GPL-2.0-or-later
"""Turn a keyval tree (string leaves) into typed values, as QEMU's keyval
input visitor does for --blockdev, --export, --nbd-server, --monitor and
--object.

Strings are converted where the schema asks for a number or a boolean,
with QEMU's parsers (``strtoll`` with base 0 for integers, QEMU's size
syntax for ``size``, on/off/yes/no/true/false/y/n for booleans).  A value
that does not convert, or a dict/list where a scalar belongs, becomes a
``KeyvalValue`` carrying QEMU's message; validation later reports it at
the point QEMU's walk would reach it.
"""

from __future__ import annotations

import math
import re
from typing import Any

from qsd.schema.compile import INT64_MAX, INT64_MIN, UINT64_MAX
from qsd.schema.model import Alternate, Array, Builtin, Enum, Object, Type
from qsd.schema.report import KeyPath, KeyvalValue, full_name

# C isspace(): what strtoll/strtod skip before a number.
_C_SPACE = " \t\n\v\f\r"
_STRTOL = re.compile(r"([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\Z")
_DECIMAL_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")
_HEX_FLOAT = re.compile(r"[+-]?0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)(?:[pP][+-]?[0-9]+)?\Z")
_SIZE_SUFFIX = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")


def _decimal(digits: str) -> int:
    """int(digits), saturating instead of tripping Python's digit limit."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 40 else UINT64_MAX + 1


def _strtol(text: str) -> int | None:
    """C strtoll/strtoull with base 0 and the whole string consumed."""
    match = _STRTOL.match(text.lstrip(_C_SPACE))
    if match is None:
        return None
    sign, digits = match.groups()
    if digits[:2] in ("0x", "0X"):
        magnitude = int(digits, 16)
    elif digits.startswith("0"):
        magnitude = int(digits, 8)
    else:
        magnitude = _decimal(digits)
    return -magnitude if sign == "-" else magnitude


def parse_int(text: str) -> int | None:
    """qemu_strtoi64(text, NULL, 0): None unless a whole int64."""
    value = _strtol(text)
    return value if value is not None and INT64_MIN <= value <= INT64_MAX else None


def parse_uint(text: str) -> int | None:
    """qemu_strtou64(text, NULL, 0): negative numbers wrap, as in C."""
    value = _strtol(text)
    if value is None or abs(value) > UINT64_MAX:
        return None
    return value % (1 << 64)


def parse_size(text: str) -> int | None:
    """qemu_strtosz: decimal (or 0x hex) bytes with an optional B/K/M/G/T/P/E
    suffix; a fraction needs a suffix other than B; no exponent."""
    stripped = text.lstrip(_C_SPACE)
    match = re.match(r"[+]?([0-9]+)", stripped)
    if match is None:
        return None
    rest = stripped[match.end():]
    value = _decimal(match.group(1))
    fraction = 0.0
    if value == 0 and rest[:1] in ("x", "X"):
        hex_match = re.match(r"[xX]([0-9a-fA-F]+)", rest)
        if hex_match is None:
            return None
        value = int(hex_match.group(1), 16)
        rest = rest[hex_match.end():]
        if rest[:1] == ".":
            return None
    elif rest[:1] == ".":
        frac_match = re.match(r"\.[0-9]*", rest)
        assert frac_match is not None
        if re.match(r"[eE][+-]?[0-9]", rest[frac_match.end():]):
            return None
        fraction = float("0" + frac_match.group(0)) if frac_match.group(0) != "." else 0.0
        rest = rest[frac_match.end():]
    shift = _SIZE_SUFFIX.get(rest[:1].lower()) if rest else None
    if shift is not None:
        rest = rest[1:]
    if rest:
        return None
    if not shift:
        return value if fraction == 0 and value <= UINT64_MAX else None
    scaled = int(fraction * 2**64) << shift
    result = (value << shift) + (scaled >> 64) + ((scaled >> 63) & 1)
    return result if result <= UINT64_MAX else None


def parse_number(text: str) -> float | None:
    """qemu_strtod_finite: a finite C double, whole string consumed."""
    stripped = text.lstrip(_C_SPACE)
    if _DECIMAL_FLOAT.match(stripped):
        value = float(stripped)
    elif _HEX_FLOAT.match(stripped):
        sign = -1.0 if stripped.startswith("-") else 1.0
        value = sign * float.fromhex(stripped.lstrip("+-"))
    else:
        return None
    return value if math.isfinite(value) else None


_PARSERS = {
    "int": (parse_int, "integer"),
    "uint": (parse_uint, "integer"),
    "size": (parse_size, "size"),
    "number": (parse_number, "number"),
}


def _coerce_scalar(builtin: Builtin, text: str, path: KeyPath) -> Any:
    """Convert one string leaf; strings stay strings where no conversion applies."""
    name = full_name(path, keyval=True)
    if builtin.kind == "bool":
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        return KeyvalValue(f"Parameter '{name}' expects 'on' or 'off'")
    if builtin.kind not in _PARSERS:
        return text
    parser, expected = _PARSERS[builtin.kind]
    converted = parser(text)
    return KeyvalValue(f"Parameter '{name}' expects {expected}") if converted is None else converted


def coerce(typ: Type, value: Any, path: KeyPath) -> Any:
    """Convert the string leaves of ``value`` according to ``typ``."""
    if isinstance(typ, Alternate):
        branch = typ.branch_for(value)
        return value if branch is None else coerce(branch, value, path)
    if isinstance(typ, Object):
        if not isinstance(value, dict):
            return value
        members = {m.name: m for m in typ.members_for(value)}
        return {key: coerce(members[key].type, item, [*path, key]) if key in members else item
                for key, item in value.items()}
    if isinstance(typ, Array):
        if not isinstance(value, list):
            return value
        return [coerce(typ.element, item, [*path, i]) for i, item in enumerate(value)]
    assert isinstance(typ, (Builtin, Enum))
    if isinstance(value, (dict, list)):
        if isinstance(typ, Builtin) and typ.kind == "any":
            return value
        return KeyvalValue(f"Parameters '{full_name(path, keyval=True)}.*' are unexpected")
    if isinstance(typ, Enum) or not isinstance(value, str):
        return value
    return _coerce_scalar(typ, value, path)
