# SPDX-License-Identifier: GPL-2.0-or-later
"""The loaded schema: validation, keyval coercion and introspection."""

from __future__ import annotations

import copy
import functools
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from qsd.qmp.errors import CommandNotFound, QMPError
from qsd.schema.coerce import coerce
from qsd.schema.compile import Compiler
from qsd.schema.introspect import Introspector
from qsd.schema.model import (
    EMPTY_OBJECT,
    SCHEMA_DIR,
    Command,
    Event,
    Type,
    load_schema_files,
)
from qsd.schema.report import KeyPath, first_error


class Schema:
    """Everything the daemon and the CLI ask of the schema files."""

    def __init__(self, directory: Path = SCHEMA_DIR) -> None:
        self.types, self.commands, self.events, self._entities = load_schema_files(directory)
        self._compiler = Compiler()
        for typ in self.types.values():       # compile up front: validators share $defs
            self._compiler.ref(typ)
        for entity in self._entities:
            if entity.arg_type is not None:
                self._compiler.ref(entity.arg_type)
        self._introspection = Introspector(self.types, self._entities).run()

    def _check(self, typ: Type, value: Any, keyval: bool, prefix: KeyPath = ()) -> Any:
        validator = self._compiler.validator(typ)
        paths = _allowing_deep_nesting(lambda: [list(e.absolute_path) for e in validator.iter_errors(value)])
        if paths:
            raise first_error(typ, value, paths, keyval, prefix)
        return value

    def validate_command(self, name: str, args: dict[str, Any] | None) -> dict[str, Any]:
        """Check a command's arguments as QEMU does; returns them unchanged.

        The caller has already checked that ``args`` is a dict or None.
        """
        command = self.commands.get(name)
        if command is None:
            raise CommandNotFound(f"The command {name} has not been found")
        arg_type = command.arg_type or self.types[EMPTY_OBJECT]
        return self._check(arg_type, {} if args is None else args, keyval=False)

    def validate_type(self, type_name: str, value: Any, path: str = "") -> Any:
        """Check a value (e.g. the JSON form of a CLI option) against a type.

        ``path`` ("addr", "options[0]") says where the value sits inside a
        larger argument, so that messages name it as QEMU would.
        """
        prefix: list[str | int] = [int(i) if i else name
                                   for name, i in re.findall(r"([^.\[\]]+)|\[(\d+)\]", path)]
        return self._check(self.types[type_name], value, keyval=False, prefix=prefix)

    def coerce_keyval(self, type_name: str, tree: Any) -> Any:
        """Convert a keyval tree from ``qsd.cli.keyval.parse`` and validate it.

        Returns the typed value; raises QMPError with QEMU's CLI texts.
        """
        typ = self.types[type_name]
        return self._check(typ, _allowing_deep_nesting(lambda: coerce(typ, tree, [])), keyval=True)

    def command_names(self) -> list[str]:
        """query-commands order: QEMU lists commands newest-registered first."""
        return [entity.name for entity in reversed(self._entities) if isinstance(entity, Command)]

    def has_command(self, name: str) -> bool:
        """Whether the dispatcher should know this command (else CommandNotFound)."""
        return name in self.commands

    def event_names(self) -> list[str]:
        """Events in definition order, for the reference manual and tests."""
        return [entity.name for entity in self._entities if isinstance(entity, Event)]

    def introspect(self) -> list[dict[str, Any]]:
        """The query-qmp-schema answer (a fresh copy each time)."""
        return copy.deepcopy(self._introspection)


# jsonschema spends about a dozen frames per nesting level; QEMU's JSON
# parser allows 1024 levels (e.g. a long chain of inline BlockdevRefs).
_DEEP_RECURSION_LIMIT = 30000
_T = TypeVar("_T")


def _allowing_deep_nesting(func: Callable[[], _T]) -> _T:
    """Run a recursive walk; if it hits the recursion limit, again with a higher one."""
    try:
        return func()
    except RecursionError:
        pass
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, _DEEP_RECURSION_LIMIT))
    try:
        return func()
    except RecursionError:
        raise QMPError("Parameters are nested too deeply") from None
    finally:
        sys.setrecursionlimit(old)


@functools.cache
def get_schema() -> Schema:
    """The schema loaded from ``schema/*.json``, once per process."""
    return Schema()
