# SPDX-License-Identifier: GPL-2.0-or-later
"""Pick the one error QEMU would report, with QEMU's text.

QEMU's input visitor walks the value depth first in member order and stops
at the first problem: a wrong type or enum value when it reaches a member,
a missing member at that member's position, unexpected keys only after all
members of an object.  jsonschema reports every problem with its location;
for each location this module works out what QEMU would say there and at
which point of its walk, and keeps the earliest.

Names follow QEMU's quirks: most messages carry the full path
(``options[0].filename``, or ``bitmaps.0.name`` on the command line), but
enum values, alternates and fixed-width integer ranges use the bare member
name, which is ``null`` for list elements.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from qsd.qmp.errors import QMPError
from qsd.schema.compile import INT64_MAX, INT64_MIN, UINT64_MAX
from qsd.schema.hashorder import first_unvisited
from qsd.schema.model import Alternate, Array, Builtin, Enum, Object, Type

KeyPath = Sequence[str | int]
# Sorts after every member position: unexpected keys are checked last.
_AFTER_MEMBERS = 1 << 62


class KeyvalValue:
    """A command-line string that could not be converted to its type.

    It stays in the tree at its place so that the error is reported in
    QEMU's order, not before problems QEMU would have found first.
    """

    def __init__(self, message: str) -> None:
        self.message = message

    def __repr__(self) -> str:
        return f"KeyvalValue({self.message!r})"


def full_name(path: KeyPath, keyval: bool) -> str:
    """QEMU's full parameter name for a path ('null' at the top)."""
    name = ""
    for segment in path:
        if isinstance(segment, int):
            name += f".{segment}" if keyval else f"[{segment}]"
        else:
            name = f"{name}.{segment}" if name else segment
    return name or "null"


def bare_name(path: KeyPath) -> str:
    """The member's own name, as QEMU's enum/alternate/range errors use it."""
    return path[-1] if path and isinstance(path[-1], str) else "null"


def _type_error(path: KeyPath, keyval: bool, expected: str) -> str:
    return f"Invalid parameter type for '{full_name(path, keyval)}', expected: {expected}"


def _c_int_name(builtin: Builtin) -> str:
    return f"{'u' if builtin.kind != 'int' else ''}int{builtin.bits}_t"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _scalar_error(builtin: Builtin, value: Any, path: KeyPath, keyval: bool) -> str | None:
    kind = builtin.kind
    if kind == "any":
        return None
    if kind in ("str", "bool", "null"):
        ok = {"str": isinstance(value, str), "bool": isinstance(value, bool), "null": value is None}[kind]
        expected = {"str": "string", "bool": "boolean", "null": "null"}[kind]
        return None if ok else _type_error(path, keyval, expected)
    if kind == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else _type_error(path, keyval, "number")
    if kind == "int":
        if not _is_int(value) or not INT64_MIN <= value <= INT64_MAX:
            return _type_error(path, keyval, "integer")
        low, high = -(1 << (builtin.bits - 1)), (1 << (builtin.bits - 1)) - 1
    else:
        if not _is_int(value) or not INT64_MIN <= value <= UINT64_MAX:
            return f"Parameter '{full_name(path, keyval)}' expects uint64"
        value %= 1 << 64
        low, high = 0, (1 << builtin.bits) - 1
    if low <= value <= high:
        return None
    return f"Parameter '{bare_name(path)}' expects {_c_int_name(builtin)}"


def _node_error(typ: Type, value: Any, path: KeyPath, keyval: bool) -> tuple[tuple[int, ...], str] | None:
    """The first problem QEMU finds at this node itself (not below it).

    Returns the position of the problem among the node's members (empty
    when it is found on entering the node) and the message.
    """
    if isinstance(value, KeyvalValue):
        return (), value.message
    if isinstance(typ, Alternate):
        branch = typ.branch_for(value)
        if branch is None:
            return (), f"Invalid parameter type for '{bare_name(path)}', expected: {typ.name}"
        return _node_error(branch, value, path, keyval)
    if isinstance(typ, Builtin):
        message = _scalar_error(typ, value, path, keyval)
        return None if message is None else ((), message)
    if isinstance(typ, Enum):
        if not isinstance(value, str):
            return (), _type_error(path, keyval, "string")
        if value not in typ.names():
            return (), f"Parameter '{bare_name(path)}' does not accept value '{value}'"
        return None
    if isinstance(typ, Array):
        return None if isinstance(value, list) else ((), _type_error(path, keyval, "array"))
    assert isinstance(typ, Object)
    if not isinstance(value, dict):
        return (), _type_error(path, keyval, "object")
    members = typ.members_for(value)
    for i, member in enumerate(members):
        if not member.optional and member.name not in value:
            return (i,), f"Parameter '{full_name([*path, member.name], keyval)}' is missing"
    names = {m.name for m in members}
    if all(key in names for key in value):
        return None
    unexpected = first_unvisited(list(value), [m.name for m in members if m.name in value])
    assert unexpected is not None
    return (_AFTER_MEMBERS,), f"Parameter '{full_name([*path, unexpected], keyval)}' is unexpected"


def _locate(typ: Type, value: Any, path: KeyPath) -> tuple[list[int], Type, Any]:
    """Walk to a path, returning QEMU's visiting position of each step."""
    position: list[int] = []
    for segment in path:
        if isinstance(typ, Alternate):
            branch = typ.branch_for(value)
            assert branch is not None
            typ = branch
        if isinstance(typ, Array):
            assert isinstance(segment, int)
            position.append(segment)
            typ, value = typ.element, value[segment]
            continue
        assert isinstance(typ, Object) and isinstance(segment, str)
        members = typ.members_for(value)
        index = next(i for i, m in enumerate(members) if m.name == segment)
        position.append(index)
        typ, value = members[index].type, value[segment]
    return position, typ, value


def first_error(typ: Type, value: Any, paths: Iterable[KeyPath], keyval: bool,
                prefix: KeyPath = ()) -> QMPError:
    """QEMU's error among the failing locations jsonschema found.

    ``prefix`` is where ``value`` sits in a larger value (for messages only).
    """
    best: tuple[tuple[int, ...], str] | None = None
    for path in paths:
        position, node_type, node_value = _locate(typ, value, path)
        found = _node_error(node_type, node_value, [*prefix, *path], keyval)
        if found is None:
            continue
        key = (*position, *found[0])
        if best is None or key < best[0]:
            best = (key, found[1])
    assert best is not None, "jsonschema and the QEMU walk disagree"
    return QMPError(best[1])
