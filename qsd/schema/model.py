# SPDX-License-Identifier: GPL-2.0-or-later
"""The schema files (``schema/*.json``) loaded into typed objects.

The files are the single source of truth; this module only reads them,
resolves type references and refuses anything malformed (a missing doc
string included), so that mistakes show up when the daemon starts rather
than as odd validation errors later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schema"

# Definition order matters: it is the order of commands and events in
# query-qmp-schema (and, reversed, of query-commands), as in QEMU where the
# block modules come first and QOM last.
TOPICS = ("sockets", "crypto", "block-core", "jobs", "block-export", "control", "objects", "transaction")

EMPTY_OBJECT = "q_empty"


class SchemaDefinitionError(Exception):
    """A schema file is malformed or inconsistent."""


@dataclass(eq=False)
class Type:
    """Any type: builtin, enum, object, alternate or array."""

    name: str
    doc: str = ""
    features: tuple[str, ...] = ()


@dataclass(eq=False)
class Builtin(Type):
    """A builtin scalar; ``kind`` groups the integer flavours."""

    kind: str = ""          # str, int, uint, size, bool, number, any, null
    bits: int = 64          # for int/uint: the C width QEMU range-checks
    json_type: str = ""     # introspection's json-type


@dataclass(eq=False)
class EnumValue:
    """One value of an enum, with its doc and feature flags."""

    name: str
    doc: str
    features: tuple[str, ...] = ()


@dataclass(eq=False)
class Enum(Type):
    """An enumeration of strings."""

    values: list[EnumValue] = field(default_factory=list)

    def names(self) -> list[str]:
        """The values' names, in definition order."""
        return [v.name for v in self.values]


@dataclass(eq=False)
class Member:
    """A member of an object type."""

    name: str
    type: Type
    optional: bool
    doc: str
    features: tuple[str, ...] = ()


@dataclass(eq=False)
class Object(Type):
    """A struct, or a flat union when ``tag`` is set.

    ``members`` already include inherited base members.  ``variants`` maps
    every value of the tag's enum to its branch (None: no extra members).
    """

    members: list[Member] = field(default_factory=list)
    tag: str | None = None
    variants: dict[str, Object | None] = field(default_factory=dict)

    def members_for(self, value: Any) -> list[Member]:
        """Members QEMU visits for this instance (base, then its branch)."""
        if self.tag is None or not isinstance(value, dict):
            return self.members
        tag_value = value.get(self.tag)
        branch = self.variants.get(tag_value) if isinstance(tag_value, str) else None
        return self.members + branch.members if branch is not None else self.members


@dataclass(eq=False)
class Alternate(Type):
    """A value that may be one of several types, told apart by JSON type."""

    branches: list[tuple[Type, str]] = field(default_factory=list)

    def branch_for(self, value: Any) -> Type | None:
        """The branch QEMU picks for a value (by its JSON type)."""
        category = json_category(value)
        for typ, _doc in self.branches:
            if json_category_of_type(typ) == category:
                return typ
        return None


@dataclass(eq=False)
class Array(Type):
    """A list of one element type (written ["Type"] in the files)."""

    element: Type = field(default_factory=lambda: Type(""))


@dataclass(eq=False)
class Command:
    """A QMP command: argument object (None: no arguments) and return type."""

    name: str
    doc: str
    arg_type: Object | None
    ret_type: Type | None
    features: tuple[str, ...] = ()
    allow_oob: bool = False


@dataclass(eq=False)
class Event:
    """A QMP event and the object type of its data."""

    name: str
    doc: str
    arg_type: Object | None
    features: tuple[str, ...] = ()


def _int_builtin(name: str, kind: str, bits: int, doc: str) -> Builtin:
    return Builtin(name, doc, kind=kind, bits=bits, json_type="int")


BUILTINS: dict[str, Builtin] = {
    b.name: b for b in [
        Builtin("str", "A JSON string.", kind="str", json_type="string"),
        _int_builtin("int", "int", 64, "A 64-bit signed integer."),
        _int_builtin("int8", "int", 8, "An 8-bit signed integer."),
        _int_builtin("int16", "int", 16, "A 16-bit signed integer."),
        _int_builtin("int32", "int", 32, "A 32-bit signed integer."),
        _int_builtin("int64", "int", 64, "A 64-bit signed integer."),
        _int_builtin("uint8", "uint", 8, "An 8-bit unsigned integer."),
        _int_builtin("uint16", "uint", 16, "A 16-bit unsigned integer."),
        _int_builtin("uint32", "uint", 32, "A 32-bit unsigned integer."),
        _int_builtin("uint64", "uint", 64, "A 64-bit unsigned integer (negative values wrap)."),
        _int_builtin("size", "size", 64, "A byte count; on the command line suffixes K, M, G... are allowed."),
        Builtin("bool", "true or false (on/off/yes/no on the command line).", kind="bool", json_type="boolean"),
        Builtin("number", "A JSON number (a C double).", kind="number", json_type="number"),
        Builtin("any", "Any JSON value.", kind="any", json_type="value"),
        Builtin("null", "JSON null.", kind="null", json_type="null"),
    ]
}


def json_category(value: Any) -> str:
    """The QObject type QEMU would see for a Python JSON value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "other"


def json_category_of_type(typ: Type) -> str:
    """The JSON category an alternate branch of this type accepts."""
    if isinstance(typ, Builtin):
        return {"str": "string", "bool": "boolean", "null": "null"}.get(typ.kind, "number")
    if isinstance(typ, Enum):
        return "string"
    if isinstance(typ, Array):
        return "array"
    return "object"


class _Loader:
    """Resolves the raw definitions of all topic files into the model."""

    def __init__(self, raw: list[tuple[str, dict[str, Any]]]) -> None:
        self.raw: dict[str, tuple[str, dict[str, Any]]] = {}
        self.order: list[tuple[str, str, dict[str, Any]]] = []
        for topic, definition in raw:
            kind, name = self._kind_and_name(topic, definition)
            if kind in ("command", "event"):
                key = f"{kind}:{name}"
            else:
                key = name
                if name in BUILTINS:
                    raise SchemaDefinitionError(f"{topic}: {name} redefines a builtin")
            if key in self.raw:
                raise SchemaDefinitionError(f"{topic}: {kind} {name} defined twice")
            self.raw[key] = (topic, definition)
            self.order.append((kind, name, definition))
        self.types: dict[str, Type] = dict(BUILTINS)
        self.types[EMPTY_OBJECT] = Object(EMPTY_OBJECT, doc="no members")
        self.arrays: dict[str, Array] = {}
        self.filled: set[str] = set()
        self.filling: set[str] = set()

    @staticmethod
    def _kind_and_name(topic: str, definition: dict[str, Any]) -> tuple[str, str]:
        kinds = [k for k in ("enum", "struct", "union", "alternate", "command", "event") if k in definition]
        if len(kinds) != 1:
            raise SchemaDefinitionError(f"{topic}: definition needs exactly one kind key: {definition!r:.80}")
        name = definition[kinds[0]]
        if not isinstance(name, str) or not name:
            raise SchemaDefinitionError(f"{topic}: bad {kinds[0]} name {name!r}")
        _require_doc(f"{kinds[0]} {name}", definition)
        return kinds[0], name

    def type_ref(self, ref: Any, where: str) -> Type:
        """Resolve "Name" or ["Name"] (an array of Name) to a declared type."""
        if isinstance(ref, list) and len(ref) == 1:
            element = self.type_ref(ref[0], where)
            array = self.arrays.get(element.name)
            if array is None:
                array = self.arrays[element.name] = Array(f"{element.name}List", element=element)
            return array
        if not isinstance(ref, str):
            raise SchemaDefinitionError(f"{where}: bad type reference {ref!r}")
        if ref not in self.types:
            raise SchemaDefinitionError(f"{where}: unknown type {ref!r}")
        return self.types[ref]

    def _declare(self, name: str) -> None:
        """Create the (still empty) type object, so that references resolve."""
        _topic, definition = self.raw[name]
        features = _features(name, definition)
        if "enum" in definition:
            self.types[name] = Enum(name, definition["doc"], features, self._enum_values(name, definition))
        elif "alternate" in definition:
            self.types[name] = Alternate(name, definition["doc"], features)
        else:
            self.types[name] = Object(name, definition["doc"], features)

    def _fill(self, name: str) -> None:
        """Fill in members/branches; a base is filled before its users."""
        if name in self.filled:
            return
        if name in self.filling:
            raise SchemaDefinitionError(f"{name}: recursive base")
        self.filling.add(name)
        _topic, definition = self.raw[name]
        typ = self.types[name]
        if isinstance(typ, Alternate):
            for i, branch in enumerate(definition.get("branches", [])):
                _require_doc(f"{name} branch {i}", branch)
                typ.branches.append((self.type_ref(branch.get("type"), name), branch["doc"]))
            categories = [json_category_of_type(t) for t, _ in typ.branches]
            if len(set(categories)) != len(categories) or len(categories) < 2:
                raise SchemaDefinitionError(f"{name}: alternate branches must differ in JSON type")
        elif isinstance(typ, Object):
            typ.members = self._base_members(name, definition.get("base")) + \
                self._members(name, definition.get("members", []))
            _check_unique(name, typ.members)
            if "union" in definition:
                self._fill_union(typ, definition)
        self.filling.discard(name)
        self.filled.add(name)

    @staticmethod
    def _enum_values(name: str, definition: dict[str, Any]) -> list[EnumValue]:
        values = []
        for value in definition.get("values", []):
            _require_doc(f"{name} value", value)
            values.append(EnumValue(value["name"], value["doc"], _features(value["name"], value)))
        if not values or len({v.name for v in values}) != len(values):
            raise SchemaDefinitionError(f"{name}: enum values must be present and unique")
        return values

    def _fill_union(self, union: Object, definition: dict[str, Any]) -> None:
        name = union.name
        tag = definition.get("discriminator")
        tag_member = next((m for m in union.members if m.name == tag), None)
        if tag_member is None or tag_member.optional or not isinstance(tag_member.type, Enum):
            raise SchemaDefinitionError(f"{name}: discriminator must be a required enum base member")
        union.tag = tag
        branches = definition.get("branches", {})
        unknown = set(branches) - set(tag_member.type.names())
        if unknown:
            raise SchemaDefinitionError(f"{name}: branches for unknown values {sorted(unknown)}")
        # QEMU lists the variants with a branch first, in the order they are
        # written, then the tag's other values in enum order.
        values = [v for v in tag_member.type.names() if v in branches]
        values.sort(key=list(branches).index)
        values += [v for v in tag_member.type.names() if v not in branches]
        for value in values:
            branch = self.type_ref(branches[value], name) if value in branches else None
            if branch is not None:
                if not isinstance(branch, Object) or "struct" not in self.raw[branch.name][1]:
                    raise SchemaDefinitionError(f"{name}: branch {value} must be a struct")
                self._fill(branch.name)
                _check_unique(name, union.members + branch.members)
            union.variants[value] = branch

    def _base_members(self, name: str, base: Any) -> list[Member]:
        if base is None:
            return []
        if isinstance(base, list):
            return self._members(name, base)
        base_type = self.type_ref(base, name)
        if not isinstance(base_type, Object) or "struct" not in self.raw[base_type.name][1]:
            raise SchemaDefinitionError(f"{name}: base {base!r} must be a struct")
        self._fill(base_type.name)
        return list(base_type.members)

    def _members(self, owner: str, raw_members: list[dict[str, Any]]) -> list[Member]:
        members = []
        for raw in raw_members:
            member_name = raw.get("name")
            if not isinstance(member_name, str):
                raise SchemaDefinitionError(f"{owner}: member without a name")
            _require_doc(f"{owner}.{member_name}", raw)
            members.append(Member(member_name, self.type_ref(raw.get("type"), f"{owner}.{member_name}"),
                                  bool(raw.get("optional", False)), raw["doc"],
                                  _features(member_name, raw)))
        return members

    def data_type(self, owner: str, data: Any) -> Object | None:
        """A command's/event's argument type: absent, a named object or inline members."""
        if data is None:
            return None
        if isinstance(data, list):
            obj = Object(f"q_obj_{owner}-arg", doc=f"arguments of {owner}")
            obj.members = self._members(owner, data)
            _check_unique(owner, obj.members)
            return obj
        typ = self.type_ref(data, owner)
        if not isinstance(typ, Object):
            raise SchemaDefinitionError(f"{owner}: data must be an object type")
        return typ

    def load(self) -> tuple[dict[str, Type], dict[str, Command], dict[str, Event],
                            list[Command | Event]]:
        commands: dict[str, Command] = {}
        events: dict[str, Event] = {}
        entities: list[Command | Event] = []
        type_names = [name for kind, name, _ in self.order if kind not in ("command", "event")]
        for name in type_names:
            self._declare(name)
        for name in type_names:
            self._fill(name)
        for kind, name, definition in self.order:
            if kind == "command":
                returns = definition.get("returns")
                command = Command(name, definition["doc"], self.data_type(name, definition.get("data")),
                                  self.type_ref(returns, name) if returns is not None else None,
                                  _features(name, definition), bool(definition.get("allow-oob", False)))
                commands[name] = command
                entities.append(command)
            elif kind == "event":
                event = Event(name, definition["doc"], self.data_type(name, definition.get("data")),
                              _features(name, definition))
                events[name] = event
                entities.append(event)
        return self.types, commands, events, entities


def _require_doc(where: str, raw: dict[str, Any]) -> None:
    doc = raw.get("doc") if isinstance(raw, dict) else None
    if not isinstance(doc, str) or not doc.strip():
        raise SchemaDefinitionError(f"{where}: missing doc string")


def _features(where: str, raw: dict[str, Any]) -> tuple[str, ...]:
    features = raw.get("features", [])
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        raise SchemaDefinitionError(f"{where}: features must be a list of names")
    return tuple(features)


def _check_unique(owner: str, members: list[Member]) -> None:
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise SchemaDefinitionError(f"{owner}: duplicate member names")


def load_schema_files(directory: Path = SCHEMA_DIR) -> tuple[dict[str, Type], dict[str, Command],
                                                              dict[str, Event], list[Command | Event]]:
    """Read every topic file in definition order and resolve it."""
    raw: list[tuple[str, dict[str, Any]]] = []
    for topic in TOPICS:
        with open(directory / f"{topic}.json", encoding="utf-8") as f:
            document = json.load(f)
        _require_doc(f"topic {topic}", document)
        raw.extend((topic, d) for d in document.get("definitions", []))
    return _Loader(raw).load()
