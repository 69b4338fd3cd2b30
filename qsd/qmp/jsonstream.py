# SPDX-License-Identifier: GPL-2.0-or-later
"""QEMU's JSON dialect: the streaming QMP input parser and QEMU's output format.

QMP input is a stream of JSON values, not lines.  QEMU accepts a superset of
JSON (single-quoted strings, any byte after a backslash at lexing time) and
reports errors with fixed texts, then resynchronises in a particular way.
Clients and test suites depend on those texts and on how many error replies a
bad input produces, so this module reproduces the behaviour observed on
qemu-storage-daemon 7.2 (see tests/test_qmp_json.py for the evidence):

* A lexer turns bytes into tokens.  A byte that cannot continue the current
  token produces a ``stray '...'`` error carrying the bad token (including the
  offending byte); the lexer then skips input up to a structural character
  (``{ } [ ] , :``), an ASCII control character other than TAB, or the bytes
  0xFE/0xFF, and starts afresh there.
* Tokens are collected until braces and brackets balance (or one count goes
  negative); the collected tokens then form one value or one parse error.
  Parsing happens incrementally as tokens arrive, but an error is only
  reported at that balance point, exactly when QEMU would report it.
* Limits keep hostile input from exhausting memory: a value may not exceed
  64 MiB of token text, 2 Mi tokens or 1024 levels of nesting.

``dumps`` writes QEMU's output format, including the order in which QEMU's
hash-table dictionaries (QDict) list their keys (see qsd.qmp.keyorder), so
that replies, events and ``json:{...}`` file names come out byte-identical
without every caller having to know that order.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from qsd.qmp.keyorder import bucket

MAX_TOKEN_SIZE = 64 << 20
MAX_TOKEN_COUNT = 2 << 20
MAX_NESTING = 1024
# QEMU formats parser messages into a 1024-byte buffer: longer ones are cut.
_MAX_PARSER_MESSAGE = 1023


@dataclass(frozen=True, slots=True)
class ParseError:
    """A lexer, parser or limit error, with QEMU's description text."""

    desc: str


# ---------------------------------------------------------------------------
# Text helpers shared by input and output


def _is_nonchar(cp: int) -> bool:
    return 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE


def _c_text(raw: bytes) -> str:
    """Show bytes the way QEMU prints a C string holding them.

    The text ends at the first NUL; sequences that are not valid (modified)
    UTF-8 become U+FFFD, one per bad sequence as QEMU groups them.
    """
    nul = raw.find(0)
    if nul >= 0:
        raw = raw[:nul]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        if raw.isascii() or not _NONCHAR_UTF8.search(raw):
            return text
    out: list[str] = []
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if c < 0x80:
            out.append(chr(c))
            i += 1
            continue
        if c < 0xC0 or c >= 0xFE:
            out.append("\ufffd")
            i += 1
            continue
        if c < 0xE0:
            need, cp, least = 1, c & 0x1F, 0x80
        elif c < 0xF0:
            need, cp, least = 2, c & 0x0F, 0x800
        elif c < 0xF8:
            need, cp, least = 3, c & 0x07, 0x10000
        elif c < 0xFC:
            need, cp, least = 4, c & 0x03, 0x200000
        else:
            need, cp, least = 5, c & 0x01, 0x4000000
        j = i + 1
        while j < n and j - i <= need and 0x80 <= raw[j] < 0xC0:
            cp = (cp << 6) | (raw[j] & 0x3F)
            j += 1
        complete = j - i - 1 == need
        i = j
        if (not complete or (cp < least and (need, cp) != (1, 0)) or cp > 0x10FFFF
                or 0xD800 <= cp <= 0xDFFF or _is_nonchar(cp)):
            out.append("\ufffd")
        else:
            out.append(chr(cp))
    return "".join(out)


# Noncharacters (U+FDD0..U+FDEF, U+xFFFE, U+xFFFF) as they appear in valid UTF-8.
_NONCHAR_UTF8 = re.compile(rb"\xef\xb7[\x90-\xaf]|\xef\xbf[\xbe\xbf]|[\xf0-\xf4][\x8f\x9f\xaf\xbf]\xbf[\xbe\xbf]")


# ---------------------------------------------------------------------------
# Lexer

# Token kinds handed from the lexer to the streamer.
(_T_LCURLY, _T_RCURLY, _T_LSQUARE, _T_RSQUARE, _T_COLON, _T_COMMA,
 _T_STRING, _T_INTEGER, _T_FLOAT, _T_KEYWORD, _T_ERROR, _T_OVERSIZE) = range(12)

# Lexer states.
(_S_START, _S_RECOVERY, _S_KEYWORD, _S_NEG, _S_ZERO, _S_INT, _S_FRAC0, _S_FRAC,
 _S_EXP0, _S_EXPSIGN, _S_EXP, _S_DQ, _S_DQ_ESC, _S_SQ, _S_SQ_ESC) = range(15)

# Table operations: (op, arg).
_OP_ADVANCE = 0     # append the byte, go to state arg
_OP_EMIT = 1        # append the byte, emit token kind arg, go to START
_OP_LOOKAHEAD = 2   # emit the pending token as kind arg, re-read the byte in START
_OP_ERROR = 3       # append the byte, emit a lexical error, go to RECOVERY
_OP_SKIP = 4        # drop the byte (whitespace, or skipped while recovering)
_OP_RESYNC = 5      # leave RECOVERY, re-read the byte in START

_DIGITS = b"0123456789"
_STRUCTURAL = {ord("{"): _T_LCURLY, ord("}"): _T_RCURLY, ord("["): _T_LSQUARE,
               ord("]"): _T_RSQUARE, ord(":"): _T_COLON, ord(","): _T_COMMA}


def _build_tables() -> list[tuple[tuple[int, int], ...]]:
    """One 256-entry row of (op, arg) per lexer state."""
    err = (_OP_ERROR, 0)
    tables: dict[int, list[tuple[int, int]]] = {}

    def row(state: int, default: tuple[int, int], entries: dict[int, tuple[int, int]]) -> None:
        t = [default] * 256
        for c, action in entries.items():
            t[c] = action
        tables[state] = t

    def each(chars: bytes | range | list[int], action: tuple[int, int]) -> dict[int, tuple[int, int]]:
        return {c: action for c in chars}

    lower = range(ord("a"), ord("z") + 1)
    row(_S_START, err, {
        **each(b" \t\r\n", (_OP_SKIP, 0)),
        **{c: (_OP_EMIT, kind) for c, kind in _STRUCTURAL.items()},
        ord('"'): (_OP_ADVANCE, _S_DQ), ord("'"): (_OP_ADVANCE, _S_SQ),
        ord("-"): (_OP_ADVANCE, _S_NEG), ord("0"): (_OP_ADVANCE, _S_ZERO),
        **each(b"123456789", (_OP_ADVANCE, _S_INT)),
        **each(lower, (_OP_ADVANCE, _S_KEYWORD)),
    })
    row(_S_RECOVERY, (_OP_SKIP, 0), {
        **each([*range(0x00, 0x09), *range(0x0A, 0x20), *b",:[]{}", 0xFE, 0xFF], (_OP_RESYNC, 0)),
    })
    row(_S_KEYWORD, (_OP_LOOKAHEAD, _T_KEYWORD), each(lower, (_OP_ADVANCE, _S_KEYWORD)))
    row(_S_NEG, err, {ord("0"): (_OP_ADVANCE, _S_ZERO), **each(b"123456789", (_OP_ADVANCE, _S_INT))})
    dot = {ord("."): (_OP_ADVANCE, _S_FRAC0)}
    exp = each(b"eE", (_OP_ADVANCE, _S_EXP0))
    row(_S_ZERO, (_OP_LOOKAHEAD, _T_INTEGER), {**each(_DIGITS, err), **dot, **exp})
    row(_S_INT, (_OP_LOOKAHEAD, _T_INTEGER), {**each(_DIGITS, (_OP_ADVANCE, _S_INT)), **dot, **exp})
    row(_S_FRAC0, err, each(_DIGITS, (_OP_ADVANCE, _S_FRAC)))
    row(_S_FRAC, (_OP_LOOKAHEAD, _T_FLOAT), {**each(_DIGITS, (_OP_ADVANCE, _S_FRAC)), **exp})
    row(_S_EXP0, err, {**each(_DIGITS, (_OP_ADVANCE, _S_EXP)), **each(b"+-", (_OP_ADVANCE, _S_EXPSIGN))})
    row(_S_EXPSIGN, err, each(_DIGITS, (_OP_ADVANCE, _S_EXP)))
    row(_S_EXP, (_OP_LOOKAHEAD, _T_FLOAT), each(_DIGITS, (_OP_ADVANCE, _S_EXP)))
    for quote, body, esc in ((ord('"'), _S_DQ, _S_DQ_ESC), (ord("'"), _S_SQ, _S_SQ_ESC)):
        # Any byte 0x20..0xFD may follow a backslash: the parser judges escapes.
        row(body, err, {**each(range(0x20, 0xFE), (_OP_ADVANCE, body)),
                        ord("\\"): (_OP_ADVANCE, esc), quote: (_OP_EMIT, _T_STRING)})
        row(esc, err, each(range(0x20, 0xFE), (_OP_ADVANCE, body)))
    return [tuple(tables[s]) for s in range(len(tables))]


_TABLES = _build_tables()

# Runs of bytes that leave the state unchanged, consumed in one step.
_RUNS: list[re.Pattern[bytes] | None] = [None] * len(_TABLES)
_RUNS[_S_START] = re.compile(rb"[ \t\r\n]+")
_RUNS[_S_RECOVERY] = re.compile(rb"[^\x00-\x08\x0a-\x1f,:\[\]{}\xfe\xff]+")
_RUNS[_S_KEYWORD] = re.compile(rb"[a-z]+")
for _s in (_S_INT, _S_FRAC, _S_EXP):
    _RUNS[_s] = re.compile(rb"[0-9]+")
_RUNS[_S_DQ] = re.compile(rb"[^\"\\\x00-\x1f\xfe\xff]+")
_RUNS[_S_SQ] = re.compile(rb"[^'\\\x00-\x1f\xfe\xff]+")
_ACCUMULATING = frozenset(range(len(_TABLES))) - {_S_START, _S_RECOVERY}


# ---------------------------------------------------------------------------
# Scalar conversion (QEMU's parser checks strings and keywords, not the lexer)


class _Fail(Exception):
    """A parser error message (without the "JSON parse error, " prefix)."""


_SIMPLE_ESCAPES = {ord('"'): '"', ord("'"): "'", ord("\\"): "\\", ord("/"): "/",
                   ord("b"): "\b", ord("f"): "\f", ord("n"): "\n", ord("r"): "\r", ord("t"): "\t"}
_HEX4 = re.compile(rb"[0-9A-Fa-f]{4}")


def _utf8(chunk: bytes) -> str:
    """Decode raw string bytes as QEMU does: modified UTF-8, no noncharacters."""
    if chunk.isascii():
        return chunk.decode("ascii")
    try:
        text = chunk.decode("utf-8")
    except UnicodeDecodeError:
        # "\xC0\x80" is modified UTF-8 for U+0000; raw NULs cannot occur here.
        chunk = chunk.replace(b"\xc0\x80", b"\x00")
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError:
            raise _Fail("invalid UTF-8 sequence in string") from None
    if _NONCHAR_UTF8.search(chunk):
        raise _Fail("invalid UTF-8 sequence in string")
    return text


def _hex4(raw: bytes, pos: int) -> int:
    m = _HEX4.match(raw, pos, pos + 4)
    return int(m.group(), 16) if m else -1


def _decode_string(raw: bytes) -> str:
    """Turn a string token (quotes included) into text, or raise _Fail."""
    end = len(raw) - 1
    if raw.find(b"\\", 1, end) < 0:
        return _utf8(raw[1:end])
    parts: list[str] = []
    pos = 1
    while True:
        bs = raw.find(b"\\", pos, end)
        if bs < 0:
            parts.append(_utf8(raw[pos:end]))
            return "".join(parts)
        if bs > pos:
            parts.append(_utf8(raw[pos:bs]))
        code = raw[bs + 1]
        simple = _SIMPLE_ESCAPES.get(code)
        if simple is not None:
            parts.append(simple)
            pos = bs + 2
            continue
        if code != ord("u"):
            raise _Fail("invalid escape sequence in string")
        cp = _hex4(raw, bs + 2)
        length = 6
        if 0xD800 <= cp <= 0xDBFF and raw[bs + 6:bs + 8] == b"\\u":
            low = _hex4(raw, bs + 8)
            if 0xDC00 <= low <= 0xDFFF:
                cp = 0x10000 + ((cp & 0x3FF) << 10) + (low & 0x3FF)
                length = 12
            else:
                cp = -1
        if cp < 0 or 0xD800 <= cp <= 0xDFFF or _is_nonchar(cp):
            raise _Fail(_c_text(raw[bs:bs + length]) + " is not a valid Unicode character")
        parts.append(chr(cp))
        pos = bs + length


def _integer(raw: bytes | str) -> int | float:
    """int64, else uint64, else the nearest double, as QEMU represents numbers."""
    if len(raw) <= 20:
        value = int(raw)
        if -(1 << 63) <= value < (1 << 64):
            return value
    return float(raw)


_KEYWORDS = {b"true": True, b"false": False, b"null": None}


# ---------------------------------------------------------------------------
# Fast path: a whole ASCII object in one piece, decoded by the json module


class _Reject(Exception):
    """Something the json module accepts but QEMU's dialect treats differently."""


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise _Reject  # QEMU: "duplicate key"
    return d


def _reject_constant(name: str) -> object:
    raise _Reject  # NaN, Infinity: not JSON for QEMU


_FAST_DECODER = json.JSONDecoder(object_pairs_hook=_unique_pairs, parse_int=_integer,
                                 parse_constant=_reject_constant)


def _fast_object(text: str, start: int) -> tuple[object, int] | None:
    """Decode the object at ``start`` when the result is certain to equal QEMU's.

    Strict JSON without escapes \\uXXXX (lone surrogates, noncharacters),
    duplicate keys or NaN means QEMU's lexer and parser agree with the json
    module; short enough means no limit can be hit (every token has a byte,
    and the C decoder's recursion limit is below QEMU's nesting limit).
    Anything else returns None and goes the slow, exact way.
    """
    try:
        value, end = _FAST_DECODER.raw_decode(text, start)
    except (ValueError, RecursionError, _Reject):
        return None
    if end - start >= MAX_TOKEN_COUNT or text.find("\\u", start, end) >= 0:
        return None
    return value, end


# ---------------------------------------------------------------------------
# Streamer + incremental parser

# Container phases.
(_A_FIRST, _A_VALUE, _A_SEP, _O_FIRST, _O_KEY, _O_COLON, _O_VALUE, _O_SEP) = range(8)
_VALUE_KINDS = frozenset((_T_LCURLY, _T_LSQUARE, _T_STRING, _T_INTEGER, _T_FLOAT, _T_KEYWORD))


class _Frame:
    __slots__ = ("container", "phase", "key")

    def __init__(self, container: Any, phase: int) -> None:
        self.container = container
        self.phase = phase
        self.key: str = ""


class JSONStreamParser:
    """Bytes in, complete JSON values (or ParseError) out, in stream order."""

    def __init__(self) -> None:
        # lexer
        self._state = _S_START
        self._tok = bytearray()
        # streamer
        self._braces = 0
        self._brackets = 0
        self._count = 0
        self._size = 0
        # parser
        self._stack: list[_Frame] = []
        self._failed: str | None = None
        self._result: object = None
        self._out: list[object] = []

    def feed(self, data: bytes) -> list[object]:
        """Consume ``data``; return every value or error it completes."""
        out = self._out = []
        tok = self._tok
        state = self._state
        view = memoryview(data)
        text = data.decode("ascii") if data.isascii() else None
        i, n = 0, len(data)
        while i < n:
            run = _RUNS[state]
            if run is not None:
                m = run.match(data, i)
                if m is not None:
                    j = m.end()
                    if state in _ACCUMULATING:
                        room = MAX_TOKEN_SIZE + 1 - len(tok)
                        if j - i >= room:
                            i += room
                            state = self._overflow()
                            continue
                        tok += view[i:j]
                    i = j
                    if i == n:
                        break
            c = data[i]
            if (c == 0x7B and text is not None and state == _S_START
                    and self._braces == 0 and self._brackets == 0):
                fast = _fast_object(text, i)
                if fast is not None:
                    self._finish(fast[0])
                    i = fast[1]
                    continue
            op, arg = _TABLES[state][c]
            if op == _OP_ADVANCE:
                tok.append(c)
                i += 1
                state = arg
                if len(tok) > MAX_TOKEN_SIZE:
                    state = self._overflow()
            elif op == _OP_EMIT:
                tok.append(c)
                i += 1
                self._token(arg, bytes(tok))
                tok.clear()
                state = _S_START
            elif op == _OP_LOOKAHEAD:
                self._token(arg, bytes(tok))
                tok.clear()
                state = _S_START
            elif op == _OP_SKIP:
                i += 1
            elif op == _OP_RESYNC:
                state = _S_START
            else:  # _OP_ERROR
                tok.append(c)
                i += 1
                self._token(_T_ERROR, bytes(tok))
                tok.clear()
                state = _S_RECOVERY
        self._state = state
        self._out = []
        return out

    def _overflow(self) -> int:
        """A token grew past the limit: hand it on as is and start afresh."""
        self._token(_T_OVERSIZE, b"")
        self._tok.clear()
        return _S_START

    # -- streamer ----------------------------------------------------------

    def _token(self, kind: int, raw: bytes) -> None:
        if kind == _T_ERROR:
            self._finish(ParseError(f"JSON parse error, stray '{_c_text(raw)}'"))
            return
        if kind == _T_LCURLY:
            self._braces += 1
        elif kind == _T_RCURLY:
            self._braces -= 1
        elif kind == _T_LSQUARE:
            self._brackets += 1
        elif kind == _T_RSQUARE:
            self._brackets -= 1
        if kind == _T_OVERSIZE or self._size + len(raw) + 1 > MAX_TOKEN_SIZE:
            self._finish(ParseError("JSON token size limit exceeded"))
            return
        if self._count + 1 > MAX_TOKEN_COUNT:
            self._finish(ParseError("JSON token count limit exceeded"))
            return
        if self._braces + self._brackets > MAX_NESTING:
            self._finish(ParseError("JSON nesting depth limit exceeded"))
            return
        self._size += len(raw)
        self._count += 1
        if self._failed is None:
            try:
                self._parse(kind, raw)
            except _Fail as exc:
                self._failed = "JSON parse error, " + str(exc.args[0])[:_MAX_PARSER_MESSAGE]
        if (self._braces > 0 or self._brackets > 0) and self._braces >= 0 and self._brackets >= 0:
            return
        self._finish(self._result if self._failed is None else ParseError(self._failed))

    def _finish(self, item: object) -> None:
        self._out.append(item)
        self._braces = self._brackets = self._count = self._size = 0
        self._stack.clear()
        self._failed = None
        self._result = None

    # -- parser ------------------------------------------------------------

    def _parse(self, kind: int, raw: bytes) -> None:
        stack = self._stack
        if not stack:
            if kind not in _VALUE_KINDS:
                raise _Fail("expecting value")
            self._start_value(kind, raw)
            return
        frame = stack[-1]
        phase = frame.phase
        if phase == _A_SEP:
            if kind == _T_COMMA:
                frame.phase = _A_VALUE
            elif kind == _T_RSQUARE:
                self._close()
            else:
                raise _Fail("expected separator in list")
        elif phase == _O_SEP:
            if kind == _T_COMMA:
                frame.phase = _O_KEY
            elif kind == _T_RCURLY:
                self._close()
            else:
                raise _Fail("expected separator in dict")
        elif phase == _O_COLON:
            if kind != _T_COLON:
                raise _Fail("missing : in object pair")
            frame.phase = _O_VALUE
        elif (phase == _A_FIRST and kind == _T_RSQUARE) or (phase == _O_FIRST and kind == _T_RCURLY):
            self._close()
        elif kind in _VALUE_KINDS:
            self._start_value(kind, raw)
        else:
            raise _Fail("expecting value")

    def _start_value(self, kind: int, raw: bytes) -> None:
        if kind == _T_STRING:
            self._value(_decode_string(raw))
        elif kind == _T_INTEGER:
            self._value(_integer(raw))
        elif kind == _T_FLOAT:
            self._value(float(raw))
        elif kind == _T_KEYWORD:
            try:
                value = _KEYWORDS[raw]
            except KeyError:
                raise _Fail(f"invalid keyword '{raw.decode('ascii')}'") from None
            self._value(value)
        elif kind == _T_LSQUARE:
            self._stack.append(_Frame([], _A_FIRST))
        else:
            self._stack.append(_Frame({}, _O_FIRST))

    def _close(self) -> None:
        self._value(self._stack.pop().container)

    def _value(self, value: object) -> None:
        """Place a completed value into its parent (or make it the result)."""
        if not self._stack:
            self._result = value
            return
        frame = self._stack[-1]
        phase = frame.phase
        if phase <= _A_VALUE:
            frame.container.append(value)
            frame.phase = _A_SEP
        elif phase == _O_VALUE:
            d = frame.container
            if frame.key in d:
                raise _Fail("duplicate key")
            d[frame.key] = value
            frame.phase = _O_SEP
        else:  # a key
            if type(value) is not str:
                raise _Fail("key is not a string in object")
            frame.key = value
            frame.phase = _O_COLON


# ---------------------------------------------------------------------------
# Output

_NEEDS_ESCAPE = re.compile("[\x00-\x1f\"\\\\\x7f-\U0010ffff]")
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match[str]) -> str:
    ch = m.group()
    short = _SHORT_ESCAPES.get(ch)
    if short is not None:
        return short
    cp = ord(ch)
    if 0xD800 <= cp <= 0xDFFF or _is_nonchar(cp):
        # QEMU cannot hold these in a string; it prints the replacement character.
        return "\\uFFFD"
    if cp < 0x10000:
        return "\\u%04X" % cp
    cp -= 0x10000
    return "\\u%04X\\u%04X" % (0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF))


def _quote(s: str) -> str:
    if _NEEDS_ESCAPE.search(s) is None:
        return '"' + s + '"'
    return '"' + _NEEDS_ESCAPE.sub(_escape, s) + '"'


def _scalar(v: Any) -> str:
    t = type(v)
    if t is str:
        return _quote(v)
    if v is True:
        return "true"
    if v is False:
        return "false"
    if v is None:
        return "null"
    if t is int or (isinstance(v, int) and not isinstance(v, bool)):
        return "%d" % v
    if isinstance(v, float):
        return "%.17g" % v
    if isinstance(v, str):
        return _quote(v)
    raise TypeError(f"cannot encode {t.__name__} as QMP JSON")


_END = object()
_INDENT = "    "


def _bucket(key: Any) -> int:
    if type(key) is not str:
        raise TypeError(f"JSON object keys must be str, not {type(key).__name__}")
    return bucket(key)


class _TooDeep(Exception):
    """The recursive encoder stops here; the iterative one takes over."""


_RECURSION_BUDGET = 200


def _compact(v: Any, app: Any, depth: int) -> None:
    """The common case, recursive because that is fastest in CPython."""
    t = type(v)
    if t is str:
        app(_quote(v))
    elif t is dict or (t is not list and t is not tuple and isinstance(v, dict)):
        if not v:
            app("{}")
            return
        if depth > _RECURSION_BUDGET:
            raise _TooDeep
        sep = "{"
        for key in sorted(v, key=_bucket) if len(v) > 1 else v:
            if type(key) is not str:
                raise TypeError(f"JSON object keys must be str, not {type(key).__name__}")
            app(sep)
            app(_quote(key))
            app(": ")
            _compact(v[key], app, depth + 1)
            sep = ", "
        app("}")
    elif t is list or t is tuple or isinstance(v, (list, tuple)):
        if not v:
            app("[]")
            return
        if depth > _RECURSION_BUDGET:
            raise _TooDeep
        sep = "["
        for item in v:
            app(sep)
            _compact(item, app, depth + 1)
            sep = ", "
        app("]")
    else:
        app(_scalar(v))


def dumps(value: object, pretty: bool = False) -> str:
    """Serialise ``value`` exactly as QEMU does (no line terminator).

    Dict keys come out in QDict order: by hash bucket, and in the dict's own
    order within a bucket.  So a dict already in QEMU's printed order (as in
    the transcripts, or from ``dict(keyorder.qemu_items(d))``) is kept as is;
    only keys sharing a bucket (e.g. "micro"/"minor") depend on the caller.
    Any nesting depth works (deep values are written without recursion).
    """
    out: list[str] = []
    if not pretty:
        try:
            _compact(value, out.append, 0)
            return "".join(out)
        except _TooDeep:
            out.clear()
    app = out.append
    # Each frame: [iterator, is_dict, first]
    stack: list[list[Any]] = []
    v: Any = value
    while True:
        t = type(v)
        if t is dict or t is list or t is tuple or isinstance(v, (dict, list, tuple)):
            is_dict = isinstance(v, dict)
            if not v:
                if pretty:
                    app(("{\n" if is_dict else "[\n") + _INDENT * len(stack) + ("}" if is_dict else "]"))
                else:
                    app("{}" if is_dict else "[]")
            else:
                app("{" if is_dict else "[")
                if is_dict:
                    items = iter([(k, v[k]) for k in sorted(v, key=_bucket)] if len(v) > 1 else v.items())
                else:
                    items = iter(v)
                stack.append([items, is_dict, True])
        else:
            app(_scalar(v))
        while stack:
            frame = stack[-1]
            item: Any = next(frame[0], _END)
            if item is _END:
                stack.pop()
                close = "}" if frame[1] else "]"
                app("\n" + _INDENT * len(stack) + close if pretty else close)
                continue
            if frame[2]:
                frame[2] = False
                if pretty:
                    app("\n" + _INDENT * len(stack))
            else:
                app(",\n" + _INDENT * len(stack) if pretty else ", ")
            if frame[1]:
                key, v = item
                if type(key) is not str:
                    raise TypeError(f"JSON object keys must be str, not {type(key).__name__}")
                app(_quote(key))
                app(": ")
            else:
                v = item
            break
        else:
            return "".join(out)

