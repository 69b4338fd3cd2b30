# SPDX-License-Identifier: GPL-2.0-or-later
"""Compile the schema model to JSON Schema and jsonschema validators.

jsonschema decides *whether* a value is acceptable and *where* it is not;
``qsd.schema.errors`` then turns those places into the one error QEMU would
report.  The JSON Schema mirrors QEMU's input visitor: integers must be
JSON integers (``1.0`` is not one), unsigned types also take negative
int64 values (QEMU wraps them), ``null`` is never an absent optional
member, flat unions check their branch only once the tag is valid.
"""

from __future__ import annotations

from typing import Any

import jsonschema
from jsonschema.protocols import Validator

from qsd.schema.model import (
    Alternate,
    Array,
    Builtin,
    Enum,
    Object,
    Type,
    json_category_of_type,
)

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1


def _is_json_integer(_checker: Any, instance: Any) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


_TYPE_CHECKER = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_json_integer)
QAPIValidator = jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=_TYPE_CHECKER)


def int_range(builtin: Builtin) -> tuple[int, int]:
    """The integers QEMU's QMP input visitor accepts for an integer builtin."""
    if builtin.kind == "int":
        return -(1 << (builtin.bits - 1)), (1 << (builtin.bits - 1)) - 1
    if builtin.bits == 64:            # uint64, size: negative int64 wraps around
        return INT64_MIN, UINT64_MAX
    return 0, (1 << builtin.bits) - 1


def _builtin_schema(builtin: Builtin) -> dict[str, Any]:
    if builtin.kind in ("int", "uint", "size"):
        low, high = int_range(builtin)
        return {"type": "integer", "minimum": low, "maximum": high}
    return {
        "str": {"type": "string"},
        "bool": {"type": "boolean"},
        "number": {"type": "number"},
        "null": {"type": "null"},
        "any": {},
    }[builtin.kind]


class Compiler:
    """Builds one ``$defs`` document for all types and validators on it."""

    def __init__(self) -> None:
        self.defs: dict[str, Any] = {}
        self._validators: dict[str, Validator] = {}

    def ref(self, typ: Type) -> dict[str, Any]:
        """A schema (or $ref) for a type, compiling named types on first use."""
        if isinstance(typ, Builtin):
            return _builtin_schema(typ)
        if isinstance(typ, Array):
            return {"type": "array", "items": self.ref(typ.element)}
        if typ.name not in self.defs:
            self.defs[typ.name] = {}        # placeholder: types may recurse
            self.defs[typ.name] = self._compile(typ)
        return {"$ref": f"#/$defs/{typ.name}"}

    def _compile(self, typ: Type) -> dict[str, Any]:
        if isinstance(typ, Enum):
            return {"type": "string", "enum": typ.names()}
        if isinstance(typ, Alternate):
            return self._alternate(typ)
        assert isinstance(typ, Object)
        schema: dict[str, Any] = {
            "type": "object",
            "properties": {m.name: self.ref(m.type) for m in typ.members},
            "required": [m.name for m in typ.members if not m.optional],
        }
        if typ.tag is None:
            schema["additionalProperties"] = False
            return schema
        branches = []
        for value, branch in typ.variants.items():
            members = branch.members if branch is not None else []
            branches.append({
                "if": {"properties": {typ.tag: {"const": value}}, "required": [typ.tag]},
                "then": {
                    "properties": {**{m.name: True for m in typ.members},
                                   **{m.name: self.ref(m.type) for m in members}},
                    "required": [m.name for m in members if not m.optional],
                    "additionalProperties": False,
                },
            })
        schema["allOf"] = branches
        return schema

    def _alternate(self, alt: Alternate) -> dict[str, Any]:
        """Dispatch on the JSON type, as QEMU's alternate visitor does."""
        schema: dict[str, Any] = {"not": {}}
        for typ, _doc in reversed(alt.branches):
            guard = {"type": json_category_of_type(typ)}
            schema = {"if": guard, "then": self.ref(typ), "else": schema}
        return schema

    def validator(self, typ: Type) -> Validator:
        """A (cached) validator whose root is ``typ``."""
        validator = self._validators.get(typ.name)
        if validator is None:
            root = self.ref(typ)
            validator = QAPIValidator({"$defs": self.defs, **root})
            self._validators[typ.name] = validator
        return validator
