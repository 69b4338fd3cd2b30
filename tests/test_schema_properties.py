# SPDX-License-Identifier: GPL-2.0-or-later
"""Property tests: whatever a client or a command line sends, the schema layer
answers with a QMPError or the (validated) value, never anything else."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from qsd.qmp.errors import QMPError
from qsd.schema import get_schema
from qsd.schema.report import KeyvalValue

SCHEMA = get_schema()

# Names that occur in the schema, so that random values reach deep into it.
WORDS = ["driver", "node-name", "file", "filename", "raw", "null-co", "file", "host_device", "cache", "direct",
         "size", "latency-ns", "read-only", "type", "nbd", "id", "bitmaps", "node", "name", "addr", "data", "inet",
         "unix", "fd", "vsock", "host", "port", "path", "str", "to", "qom-type", "secret", "iothread", "format",
         "base64", "enable", "oob", "flat", "mode", "hard", "chardev", "pretty", "max-connections", "x", ""]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
                    st.floats(allow_nan=True), st.sampled_from(WORDS), st.text(max_size=5))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.sampled_from(WORDS), inner, max_size=6)),
                    max_leaves=25)
COMMANDS = sorted(SCHEMA.commands)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(COMMANDS), st.one_of(st.none(), st.dictionaries(st.sampled_from(WORDS), JSON, max_size=8)))
def test_validate_command_only_raises_qmperror(command: str, args: dict[str, Any] | None) -> None:
    try:
        result = SCHEMA.validate_command(command, args)
    except QMPError as exc:
        assert exc.desc and exc.error_class == "GenericError"
    else:
        assert args is None or result is args


BLOCKDEV = st.fixed_dictionaries(
    {"driver": st.sampled_from(["raw", "file", "null-co", "host_device", "qcow2"])},
    optional={"node-name": st.text(max_size=3), "file": JSON, "filename": JSON, "cache": JSON, "size": JSON,
              "read-only": JSON, "discard": JSON, "bogus": JSON})


@settings(max_examples=100, deadline=None)
@given(BLOCKDEV)
def test_blockdev_add_only_raises_qmperror(args: dict[str, Any]) -> None:
    try:
        SCHEMA.validate_command("blockdev-add", args)
    except QMPError as exc:
        assert exc.desc


KEYVAL_TREE = st.recursive(st.one_of(st.sampled_from(WORDS + ["on", "off", "y", "0x10", "-1", "1G", "1.5"]),
                                     st.text(max_size=4)),
                           lambda inner: st.one_of(st.lists(inner, min_size=1, max_size=3),
                                                   st.dictionaries(st.sampled_from(WORDS), inner, min_size=1,
                                                                   max_size=5)),
                           max_leaves=12)
CLI_TYPES = ["BlockdevOptions", "BlockExportOptions", "NbdServerOptions", "MonitorOptions", "ObjectOptions"]


def _has_keyval_value(value: Any) -> bool:
    if isinstance(value, KeyvalValue):
        return True
    if isinstance(value, dict):
        return any(_has_keyval_value(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_keyval_value(v) for v in value)
    return False


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(CLI_TYPES), st.dictionaries(st.sampled_from(WORDS), KEYVAL_TREE, max_size=8))
def test_coerce_keyval_only_raises_qmperror(type_name: str, tree: dict[str, Any]) -> None:
    try:
        value = SCHEMA.coerce_keyval(type_name, tree)
    except QMPError as exc:
        assert exc.desc
    else:
        assert not _has_keyval_value(value)
