# SPDX-License-Identifier: GPL-2.0-or-later
"""QEMU's keyval syntax: ``driver=qcow2,file.filename=a,,b.img,children.0=x``.

``parse`` gives a tree of dicts, lists and strings with QEMU's error texts;
``qsd.schema`` then converts the strings to the types the schema wants.
Syntax, as observed from qemu-storage-daemon 7.2:

* items are separated by ``,``; ``,,`` in a value is a literal comma; a
  trailing ``,`` is allowed; empty text is an empty object;
* a key is dot-separated fragments: the first a QAPI name (letter first,
  then letters, digits, ``-``, ``_``; or a ``__vendor.name_`` prefix), the
  others QAPI names or list indexes (digits); fragments stay under 128
  characters;
* the first item may leave out its key (``qcow2,...`` with implied key
  ``driver``); its value then runs to the first comma, with no escaping;
* an item that is exactly ``help`` or ``?`` asks for help;
* a repeated key: the last value wins; a key used both as a value and as
  an object (``a=1,a.b=2``) is an error;
* objects whose keys are all indexes become lists, which must have no gaps.

Where several keys compete (two broken lists), QEMU's QDict order decides
which is reported, and so it does here.
"""

from __future__ import annotations

from typing import Any

from qsd.qmp.errors import QMPError
from qsd.schema.hashorder import qdict_order

_MAX_FRAGMENT = 127
_HELP = ("help", "?")


def _is_alnum(char: str) -> bool:
    return char.isascii() and char.isalnum()


def _qapi_name_length(text: str, start: int) -> int:
    """Length of the QAPI name at ``start`` (0 if there is none)."""
    pos = start
    if text.startswith("_", pos):
        if not text.startswith("__", pos):
            return 0
        pos += 1
        while pos + 1 < len(text) and (_is_alnum(text[pos + 1]) or text[pos + 1] in "-."):
            pos += 1
        pos += 1
        if not text.startswith("_", pos):
            return 0
        pos += 1
    if pos >= len(text) or not (text[pos].isascii() and text[pos].isalpha()):
        return 0
    pos += 1
    while pos < len(text) and (_is_alnum(text[pos]) or text[pos] in "-_"):
        pos += 1
    return pos - start


def _index_length(text: str, start: int, key_end: int) -> int:
    """Length of a list index at ``start`` (digits ending the fragment), else 0."""
    pos = start
    while pos < key_end and text[pos].isascii() and text[pos].isdigit():
        pos += 1
    if pos == start or (pos < key_end and text[pos] != "."):
        return 0
    return pos - start


def _put(cur: dict[str, Any], key: str, value: str | None, shown_key: str) -> Any:
    """Store a value (or get/create an object when ``value`` is None)."""
    old = cur.get(key)
    if old is not None:
        if isinstance(old, dict) != (value is None):
            raise QMPError(f"Parameters '{shown_key}.*' used inconsistently")
        if value is None:
            return old
    cur[key] = {} if value is None else value
    return cur[key]


def _parse_item(root: dict[str, Any], text: str, pos: int, implied_key: str | None) -> tuple[int, bool]:
    """Parse one item at ``pos``; returns the next position and whether it asked for help."""
    key_end = pos
    while key_end < len(text) and text[key_end] not in "=,":
        key_end += 1
    if key_end > pos and not text.startswith("=", key_end):
        if text[pos:key_end] in _HELP:
            return key_end + 1, True
        if implied_key is not None:
            _put(root, implied_key, text[pos:key_end], implied_key)
            return key_end + 1, False
    whole_key = text[pos:key_end]
    cur = root
    fragment = ""
    s = pos
    while True:
        length = _index_length(text, s, key_end) if s != pos else 0
        if not length:
            length = _qapi_name_length(text, s)
        if not length or (s + length < key_end and text[s + length] != "."):
            raise QMPError(f"Invalid parameter '{whole_key}'")
        if length > _MAX_FRAGMENT:
            whole = s == pos and s + length == key_end
            raise QMPError(f"Parameter{'' if whole else ' fragment'} '{text[s:s + length]}' is too long")
        if s != pos:
            cur = _put(cur, fragment, None, text[pos:s - 1])
        fragment = text[s:s + length]
        s += length
        if s >= key_end:
            break
        s += 1
    if not text.startswith("=", s):
        raise QMPError(f"Expected '=' after parameter '{text[pos:s]}'")
    s += 1
    value = []
    while s < len(text):
        if text[s] == ",":
            s += 1
            if not text.startswith(",", s):
                break
        value.append(text[s])
        s += 1
    _put(cur, fragment, "".join(value), whole_key)
    return s, False


def _listify(tree: dict[str, Any], key_path: list[str]) -> Any:
    """Turn objects whose keys are all indexes into lists, QEMU style."""
    has_index = has_member = False
    keys = qdict_order(list(tree))
    for key in keys:
        if key.isdigit():
            has_index = True
        else:
            has_member = True
        if isinstance(tree[key], dict):
            tree[key] = _listify(tree[key], [*key_path, key])
    prefix = "".join(f"{k}." for k in key_path)
    if has_index and has_member:
        raise QMPError(f"Parameters '{prefix}*' used inconsistently")
    if not has_index:
        return tree
    elements: list[Any] = [None] * len(tree)
    max_index = -1
    for key in keys:
        index = int(key) if len(key) < 20 else 1 << 64
        max_index = max(max_index, index)
        if index < len(tree):
            elements[index] = tree[key]
    for i in range(min(len(tree) + 1, max_index + 1)):
        if i == len(tree) or elements[i] is None:
            raise QMPError(f"Parameter '{prefix}{i}' missing")
    return elements[:max_index + 1]


def _parse(text: str, implied_key: str | None) -> tuple[dict[str, Any], bool]:
    root: dict[str, Any] = {}
    wants_help = False
    pos = 0
    while pos < len(text):
        pos, item_help = _parse_item(root, text, pos, implied_key)
        wants_help = wants_help or item_help
        implied_key = None
    return root, wants_help


def parse(text: str, implied_key: str | None = None, *, allow_help: bool = False) -> dict[str, Any]:
    """Parse keyval text into a tree of dicts, lists and strings.

    A help request is an error ("Help is not available for this option")
    unless ``allow_help``; use ``is_help`` to learn whether there was one.
    """
    tree, wants_help = _parse(text, implied_key)
    if wants_help and not allow_help:
        raise QMPError("Help is not available for this option")
    result = _listify(tree, [])
    assert isinstance(result, dict)
    return result


def is_help(text: str, implied_key: str | None = None) -> bool:
    """Whether the text asks for help (``help`` or ``?`` as an item)."""
    return _parse(text, implied_key)[1]
