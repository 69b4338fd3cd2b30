# SPDX-License-Identifier: GPL-2.0-or-later
"""QEMU's JSON dialect: the stream parser and dumps().

Expected texts come from qemu-storage-daemon 7.2 (transcripts a, a3, n and live
probes; tests/test_qmp_protocol.py replays many more byte for byte and runs a
differential against the real daemon).  Property tests check the stream
behaviour for arbitrary input.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qsd.qmp import jsonstream
from qsd.qmp.jsonstream import JSONStreamParser, ParseError, dumps


def parse(data: bytes) -> list[object]:
    return JSONStreamParser().feed(data)


def errors(*details: str) -> list[ParseError]:
    return [ParseError("JSON parse error, " + d) for d in details]


# --------------------------------------------------------------------------------------------------
# the stream


def test_values_split_across_feeds_and_several_per_feed() -> None:
    p = JSONStreamParser()
    assert p.feed(b'{"execute":"query-jo') == []
    assert p.feed(b'bs","id":23}{"execute":"query-jobs",') == [{"execute": "query-jobs", "id": 23}]
    assert p.feed(b'\n  "id": 7}   \r\n\t') == [{"execute": "query-jobs", "id": 7}]
    assert p.feed(b"") == []


def test_scalars_need_a_terminator_strings_do_not() -> None:
    p = JSONStreamParser()
    assert p.feed(b'"x"12') == ["x"]
    assert p.feed(b"3") == []
    assert p.feed(b" tr") == [123]
    assert p.feed(b"ue") == []
    assert p.feed(b"[") == [True]
    assert p.feed(b"]") == [[]]


def test_dialect_extensions_and_numbers() -> None:
    assert parse(b"{'a': 'it\\'s \"x\"'}") == [{"a": "it's \"x\""}]
    assert parse("\"raw \u00e9\u20ac\U0001F600 \\u00e9\\uD83D\\uDE00 \\/\"".encode()) == [
        "raw \u00e9\u20ac\U0001F600 \u00e9\U0001F600 /"]
    assert parse(b'"\\u0000\xc0\x80"') == ["\x00\x00"]
    values = parse(b"[9223372036854775807, -9223372036854775808, 18446744073709551615, 18446744073709551616,"
                   b" -9223372036854775809, -0, -0.0, 1e400, 1E-400, 2.5]")[0]
    assert values == [2**63 - 1, -2**63, 2**64 - 1, 2.0**64, -2.0**63, 0, -0.0, math.inf, 0.0, 2.5]
    assert [type(v) for v in values] == [int, int, int, float, float, int, float, float, float, float]
    assert math.copysign(1, values[6]) == -1
    doc = parse(b'{"z": 1, "a": {"y": 2, "b": 3}, "m": [1]}')[0]
    assert list(doc) == ["z", "a", "m"] and list(doc["a"]) == ["y", "b"]


@pytest.mark.parametrize("data,expected", [
    (b'{"execute": query-version}\n', errors("stray '-v'", "expecting value")),
    (b"}\n", errors("expecting value")),
    (b'{"execute": "query-version" "id": 5}', errors("expected separator in dict")),
    (b'{"execute": "query-jobs", "id": 6}}', [{"execute": "query-jobs", "id": 6}, *errors("expecting value")]),
    (b'{"execute": "query-jobs", "id": "a\\qb"}', errors("invalid escape sequence in string")),
    (b'{"execute": "query-jobs", "id": "abc\n"}\n', errors("stray '\"abc\n'", "expecting value")),
    (b'"\\uD800\\u0041"', errors("\\uD800 is not a valid Unicode character")),
    (b'"\\uD83F\\uDFFF"', errors("\\uD83F\\uDFFF is not a valid Unicode character")),
    (b'"\\u12"', errors('\\u12" is not a valid Unicode character')),
    (b'"\xef\xbf\xbf" "\xed\xa0\x80"', errors("invalid UTF-8 sequence in string") * 2),
    (b'"\xe2\x82\xac\xff\n', errors("stray '\"\u20ac\ufffd'")),
    (b'"\xe2\x82\x01\n', errors("stray '\"\ufffd\x01'")),
    (b"-\x00 1\n", errors("stray '-'")),
    (b"01 true\xc3 [1 }", errors("stray '01'", "expected separator in list")),
    (b"0x1 ", [0, *errors("invalid keyword 'x'"), 1]),
    (b"{null: 1}{[1,}: 2}{[1]: 2}", errors("key is not a string in object", "expecting value",
                                          "key is not a string in object")),
    (b'{"a":1,"a":2}{"a":1,"a":[1,}]', errors("duplicate key", "expecting value")),
    (b'{"a"}{"a":}[1,]{,}{"a"::1}', errors("missing : in object pair", *["expecting value"] * 4)),
    (b"\x01xx[1]\x01x\t,", [*errors("stray '\x01'"), [1], *errors("stray '\x01'", "expecting value")]),
    (b"\x01x \x7f\xc3\xa9 \"'{}", [*errors("stray '\x01'"), {}]),
    (b"a" * 2000 + b" ", errors(("invalid keyword '" + "a" * 2000)[:1023])),
])
def test_errors_and_resynchronisation(data: bytes, expected: list[object]) -> None:
    assert parse(data) == expected
    p = JSONStreamParser()
    assert [item for i in range(len(data)) for item in p.feed(data[i:i + 1])] == expected


# --------------------------------------------------------------------------------------------------
# limits


def test_nesting_limit() -> None:
    (deep,) = parse(b"[" * 1024 + b"]" * 1024)
    for _ in range(1023):
        deep = deep[0]
    assert deep == []
    out = parse(b"[" * 1025 + b"1" + b"]" * 1025)
    assert out == [ParseError("JSON nesting depth limit exceeded"), 1, *errors("expecting value") * 1025]
    # After the error the remaining openers start a new value.
    p = JSONStreamParser()
    assert p.feed(b"[" * 1030) == [ParseError("JSON nesting depth limit exceeded")]
    assert p.feed(b"]" * 5) == [[[[[[]]]]]]


def test_token_count_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """2 Mi tokens pass, one more fails (measured on QSD); the logic is checked with a small limit."""
    monkeypatch.setattr(jsonstream, "MAX_TOKEN_COUNT", 10)
    assert parse(b"[1,2,3,[]]") == [[1, 2, 3, []]]  # 10 tokens
    assert parse(b"[1,2,3,4,5] 6 ") == [ParseError("JSON token count limit exceeded"), 6]


def test_token_size_limit_on_real_sizes() -> None:
    """Boundaries and follow-up replies as measured on QSD 7.2 with 64 MiB inputs."""
    limit = jsonstream.MAX_TOKEN_SIZE
    big = parse(b'"' + b"a" * (limit - 3) + b'"')[0]
    assert isinstance(big, str) and len(big) == limit - 3
    assert parse(b'"' + b"a" * (limit - 2) + b'"') == [ParseError("JSON token size limit exceeded")]
    assert parse(b'["' + b"a" * (limit - 5) + b'"]') == [["a" * (limit - 5)]]
    # A token longer than the limit is cut off; lexing restarts right there.
    assert parse(b'"' + b"a" * (limit + 5) + b'"\n') == [
        ParseError("JSON token size limit exceeded"), *errors("invalid keyword 'aaaaa'", "stray '\"\n'")]


def test_endless_string_is_cut_off_with_bounded_memory() -> None:
    p = JSONStreamParser()
    out = p.feed(b'"')
    chunk = b"a" * (1 << 20)
    for _ in range(65):
        out += p.feed(chunk)
        assert len(p._tok) <= jsonstream.MAX_TOKEN_SIZE + 1
    assert out == [ParseError("JSON token size limit exceeded")]


def test_sum_of_tokens_is_limited(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jsonstream, "MAX_TOKEN_SIZE", 16)
    assert parse(b'["abcdefghij"]') == [["abcdefghij"]]  # 1 + 12 + 1 bytes
    # 1 + 14 bytes so far, and the comma would make 16 with QEMU's extra byte
    assert parse(b'["abcdefghijkl", 1]') == [ParseError("JSON token size limit exceeded"), 1,
                                            *errors("expecting value")]


# --------------------------------------------------------------------------------------------------
# properties of the parser

# QEMU's JSON turns surrogates and noncharacters into U+FFFD, in keys as in values.
_chars = st.characters(blacklist_categories=("Cs",)).filter(lambda c: not jsonstream._is_nonchar(ord(c)))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(_chars),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(_chars, max_size=8), children,
                                                                      max_size=5),
    max_leaves=30)


@settings(max_examples=200, deadline=None)
@given(value=json_values, cuts=st.lists(st.integers(min_value=0), max_size=8), ascii_only=st.booleans())
def test_json_dumps_output_parses_back_when_split_anywhere(value: object, cuts: list[int], ascii_only: bool) -> None:
    data = json.dumps(value, ensure_ascii=ascii_only).encode() + b"\n"
    points = sorted({c % (len(data) + 1) for c in cuts})
    p = JSONStreamParser()
    out = []
    for a, b in zip([0, *points], [*points, len(data)], strict=True):
        out += p.feed(data[a:b])
    assert out == [value]
    assert json.dumps(out[0]) == json.dumps(value)  # key order too


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200), cuts=st.lists(st.integers(min_value=0), max_size=6))
def test_arbitrary_bytes_never_raise_and_resynchronise_after_0xff(data: bytes, cuts: list[int]) -> None:
    whole = JSONStreamParser().feed(data)
    p = JSONStreamParser()
    pieces: list[object] = []
    points = sorted({c % (len(data) + 1) for c in cuts})
    for a, b in zip([0, *points], [*points, len(data)], strict=True):
        pieces += p.feed(data[a:b])
    assert pieces == whole
    # 0xFF cannot continue any token: whatever was pending ends (a number or keyword as a value,
    # anything else with an error), 0xFF itself is an error, and the next object is read afresh.
    tail = p.feed(b'\xff{"execute":"qmp_capabilities"}')
    assert tail[-1] == {"execute": "qmp_capabilities"}
    assert isinstance(tail[-2], ParseError) and tail[-2].desc.endswith("\ufffd'") and len(tail) <= 3


@settings(max_examples=200, deadline=None)
@given(value=json_values, pretty=st.booleans())
def test_dumps_parses_back(value: object, pretty: bool) -> None:
    text = dumps(value, pretty)
    assert text.isascii()
    assert JSONStreamParser().feed(text.encode() + b" ") == [value]
    assert json.loads(text) == value


# --------------------------------------------------------------------------------------------------
# dumps


def test_dumps_format() -> None:
    assert dumps({"return": {}, "id": [1, 2.5, -3, True, None, "x", []]}) == (
        '{"return": {}, "id": [1, 2.5, -3, true, null, "x", []]}')
    assert dumps("a/b\"c\\d\te\x01\x7f\u00e9\u20ac\U0001F600\b\f\n\r\x1f") == (
        '"a/b\\"c\\\\d\\te\\u0001\\u007F\\u00E9\\u20AC\\uD83D\\uDE00\\b\\f\\n\\r\\u001F"')
    assert dumps("\ud800 \ufdd0 \uffff \U0001FFFE \x00") == '"\\uFFFD \\uFFFD \\uFFFD \\uFFFD \\u0000"'
    assert [dumps(f) for f in (1e3, 3.0, 0.1, 1e-7, -0.0, 1e20, 1.5e300, math.inf, -math.inf)] == [
        "1000", "3", "0.10000000000000001", "9.9999999999999995e-08", "-0", "1e+20",
        "1.5000000000000001e+300", "inf", "-inf"]
    assert dumps([18446744073709551615, -9223372036854775808, (1, 2)]) == (
        "[18446744073709551615, -9223372036854775808, [1, 2]]")
    with pytest.raises(TypeError):
        dumps({1: 2, "a": 3})
    with pytest.raises(TypeError):
        dumps(b"bytes")


def test_dumps_pretty() -> None:
    assert dumps({"return": {}}, pretty=True) == '{\n    "return": {\n    }\n}'
    assert dumps({"a": [1, {"x": []}], "d": "\u00e9"}, pretty=True) == (
        '{\n    "d": "\\u00E9",\n    "a": [\n        1,\n        {\n            "x": [\n            ]\n'
        '        }\n    ]\n}')
    assert dumps([], pretty=True) == "[\n]"


def test_dumps_uses_qdict_key_order() -> None:
    """QEMU prints objects in hash-bucket order, as every transcript shows."""
    assert dumps({"id": 1, "error": {"desc": "d", "class": "c"}}) == '{"id": 1, "error": {"class": "c", "desc": "d"}}'
    assert dumps({"data": {}, "event": "E", "timestamp": {"microseconds": 2, "seconds": 1}}) == (
        '{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "E", "data": {}}')
    # "micro" and "minor" share a bucket: a dict's own order decides between them.
    assert dumps({"major": 7, "micro": 22, "minor": 2}) == '{"micro": 22, "minor": 2, "major": 7}'
    deep: object = "x"
    for _ in range(5000):
        deep = {"k": [deep]}
    assert dumps(deep).count("[") == 5000


_libc = ctypes.CDLL(ctypes.util.find_library("c"))


def _c_format(value: float) -> str:
    buf = ctypes.create_string_buffer(64)
    _libc.snprintf(buf, 64, b"%.17g", ctypes.c_double(value))
    return buf.value.decode()


@given(st.floats(allow_nan=False))
def test_float_format_is_c_printf_17g(value: float) -> None:
    assert dumps(value) == _c_format(value)
