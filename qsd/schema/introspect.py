# SPDX-License-Identifier: GPL-2.0-or-later
"""query-qmp-schema: the SchemaInfo list, shaped like QEMU's.

QEMU lists commands and events in definition order, then every type they
reach, in order of first use.  Non-builtin types are hidden behind numbers
given in order of first use ("0" is the empty object), arrays are named
"[element]", every integer flavour shows as "int".  Key order inside each
entry follows QEMU's QDict order, so the wire bytes match too.
"""

from __future__ import annotations

from typing import Any

from qsd.schema.hashorder import qdict_order
from qsd.schema.model import (
    BUILTINS,
    EMPTY_OBJECT,
    Alternate,
    Array,
    Builtin,
    Command,
    Enum,
    Event,
    Member,
    Object,
    Type,
)


def _ordered(entry: dict[str, Any]) -> dict[str, Any]:
    return {key: entry[key] for key in qdict_order(list(entry))}


class Introspector:
    """One pass over the schema producing the SchemaInfo list."""

    def __init__(self, types: dict[str, Type], entities: list[Command | Event]) -> None:
        self.types = types
        self.entities = entities
        self.used: list[Type] = []
        self.numbers: dict[str, str] = {}
        self.arrays: dict[str, Array] = {}

    def _use(self, typ: Type | None) -> str:
        """Register a type for output and return its (masked) name."""
        if typ is None:
            typ = self.types[EMPTY_OBJECT]
        if isinstance(typ, Builtin) and typ.json_type == "int":
            typ = BUILTINS["int"]
        elif isinstance(typ, Array) and isinstance(typ.element, Builtin) and typ.element.json_type == "int":
            typ = self.arrays.setdefault("int", Array("intList", element=BUILTINS["int"]))
        if typ not in self.used:
            self.used.append(typ)
        if isinstance(typ, Builtin):
            return typ.name
        if isinstance(typ, Array):
            return f"[{self._use(typ.element)}]"
        return self.numbers.setdefault(typ.name, str(len(self.numbers)))

    @staticmethod
    def _with_features(entry: dict[str, Any], features: tuple[str, ...]) -> dict[str, Any]:
        if features:
            entry["features"] = list(features)
        return _ordered(entry)

    def _member(self, member: Member) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": member.name}
        if member.optional:
            entry["default"] = None
        entry["type"] = self._use(member.type)
        return self._with_features(entry, member.features)

    def _type_entry(self, typ: Type, name: str) -> dict[str, Any]:
        if isinstance(typ, Builtin):
            return _ordered({"name": name, "json-type": typ.json_type, "meta-type": "builtin"})
        if isinstance(typ, Array):
            return _ordered({"name": name, "element-type": self._use(typ.element), "meta-type": "array"})
        if isinstance(typ, Enum):
            members = [self._with_features({"name": v.name}, v.features) for v in typ.values]
            entry = {"name": name, "meta-type": "enum", "members": members, "values": typ.names()}
            return self._with_features(entry, typ.features)
        if isinstance(typ, Alternate):
            members = [{"type": self._use(branch)} for branch, _doc in typ.branches]
            return self._with_features({"name": name, "members": members, "meta-type": "alternate"},
                                       typ.features)
        assert isinstance(typ, Object)
        entry = {"name": name, "members": [self._member(m) for m in typ.members], "meta-type": "object"}
        if typ.tag is not None:
            entry["tag"] = typ.tag
            entry["variants"] = [_ordered({"case": case, "type": self._use(branch)})
                                 for case, branch in typ.variants.items()]
        return self._with_features(entry, typ.features)

    def run(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        for entity in self.entities:
            entry: dict[str, Any] = {"name": entity.name, "arg-type": self._use(entity.arg_type)}
            if isinstance(entity, Command):
                entry["meta-type"] = "command"
                entry["ret-type"] = self._use(entity.ret_type)
                if entity.allow_oob:
                    entry["allow-oob"] = True
            else:
                entry["meta-type"] = "event"
            entries.append(self._with_features(entry, entity.features))
        index = 0
        while index < len(self.used):     # visiting a type may use more types
            typ = self.used[index]
            entries.append(self._type_entry(typ, self._use(typ)))
            index += 1
        return entries
