# SPDX-License-Identifier: GPL-2.0-or-later
"""The sans-IO QMP protocol against what qemu-storage-daemon 7.2 sends, byte for byte.

Three sources of truth: the recorded transcripts (a, a2, a3, k, n) replayed
through QMPConnection with a small fake daemon; a table of tricky inputs whose
replies were recorded from the live QSD 7.2 (parse errors, resynchronisation,
limits, the request envelope, negotiation, oob, number and string
re-serialisation, QDict key order); and a differential test that sends the
same table plus generated inputs to the real qemu-storage-daemon and compares
its reply bytes with ours.
"""

from __future__ import annotations

import random
import re
import select
import socket
from pathlib import Path

import pytest

from qsd.qmp.errors import GenericError, QMPError
from qsd.qmp.jsonstream import dumps
from qsd.qmp.protocol import Execute, OOBReply, QMPConnection
from qsd.schema.hashorder import first_unvisited

VERSION = {"major": 7, "minor": 2, "micro": 22}
PACKAGE = "Debian 1:7.2+dfsg-7+deb12u18+b3"
TRANSCRIPTS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "qsd-7.2" / "transcripts"

# Commands the fake daemon answers; everything else in the transcripts needs the block layer.
FAKE_COMMANDS = {"query-version", "query-jobs", "query-block-jobs", "query-block-exports", "query-block",
                 "query-commands", "chardev-add", "ringbuf-write", "ringbuf-read", "nbd-server-stop"}
BLOCK_COMMANDS = {"block_resize", "query-named-block-nodes", "blockdev-del", "blockdev-add", "block-job-cancel",
                  "job-cancel", "block-dirty-bitmap-add", "qom-get", "object-del", "block-export-del",
                  "block-job-set-speed"}
KNOWN = FAKE_COMMANDS | BLOCK_COMMANDS


class FakeDaemon:
    """Runs the few commands the protocol transcripts use (no arguments checked beyond extras)."""

    def __init__(self) -> None:
        self.ringbufs: dict[str, str] = {}

    def run(self, ex: Execute) -> object:
        args = ex.arguments or {}
        if ex.name.startswith("query-"):
            extra = first_unvisited(list(args), [])
            if extra is not None:
                raise GenericError(f"Parameter '{extra}' is unexpected")
            return {"qemu": VERSION, "package": PACKAGE} if ex.name == "query-version" else []
        if ex.name == "nbd-server-stop":
            raise GenericError("NBD server not running")
        if ex.name == "chardev-add":
            self.ringbufs[args["id"]] = ""
            return {}
        if ex.name == "ringbuf-write":
            self.ringbufs[args["device"]] += args["data"]
            return {}
        if ex.name == "ringbuf-read":
            data, self.ringbufs[args["device"]] = self.ringbufs[args["device"]], ""
            return data
        raise AssertionError(f"fake cannot run {ex}")


def connection(pretty: bool = False, version: dict = VERSION) -> QMPConnection:
    return QMPConnection(version, PACKAGE, pretty=pretty, command_exists=KNOWN.__contains__)


def run_items(conn: QMPConnection, fake: FakeDaemon, items: list[Execute | bytes]) -> list[bytes]:
    """The reply to each item, in order, as a server would write them."""
    out = []
    for item in items:
        if isinstance(item, Execute):
            try:
                out.append(conn.reply(item, fake.run(item)))
            except QMPError as err:
                out.append(conn.error(item, err))
        else:
            out.append(item)
    return out


def exchange(conn: QMPConnection, fake: FakeDaemon, data: bytes) -> bytes:
    """Feed client bytes; everything the server would write back."""
    return b"".join(run_items(conn, fake, conn.feed(data)))


def negotiate(conn: QMPConnection, fake: FakeDaemon, mode: str | None) -> None:
    if mode is not None:
        enable = b',"arguments":{"enable":["oob"]}' if mode == "oob" else b""
        assert exchange(conn, fake, b'{"execute":"qmp_capabilities"%s}' % enable) == b'{"return": {}}\r\n'


# --------------------------------------------------------------------------------------------------
# transcripts


def load_transcript(name: str) -> list[tuple[str, list[tuple[bytes, list[str]]]]]:
    """Connections of a transcript: (greeting, [(client bytes, reply lines), ...])."""
    path = TRANSCRIPTS / name
    if not path.exists():
        pytest.skip(f"reference transcripts not found at {TRANSCRIPTS}")
    conns: list[tuple[str, list[tuple[bytes, list[str]]]]] = []
    for line in path.read_text().splitlines():
        if line.startswith("<- {\"QMP\""):
            conns.append((line[3:], []))
        elif line.startswith("-> "):
            text, newline = line[3:], "\n"
            m = re.search(r"   \[(.*)\]$", text)
            if m:
                text = text[:m.start()]
                newline = "" if m.group(1) in ("sent with no trailing newline", "first write") else "\n"
            conns[-1][1].append(((text + newline).encode(), []))
        elif line.startswith("<- "):
            conns[-1][1][-1][1].append(line[3:])
    return conns


@pytest.mark.parametrize("name", ["a-handshake-and-errors.txt", "a2-oob-negotiation.txt",
                                  "a3-json-parser-edge-cases.txt", "k-qemu-qmp-library-session.txt",
                                  "n-json-output-escaping.txt"])
def test_transcript_replay(name: str) -> None:
    replayed = 0
    for greeting, steps in load_transcript(name):
        conn, fake = connection(), FakeDaemon()
        assert conn.greeting() == greeting.encode() + b"\r\n"
        for data, replies in steps:
            m = re.search(rb'"execute":\s*"([^"]+)"', data)
            if m and m.group(1).decode() in BLOCK_COMMANDS:
                continue
            assert exchange(conn, fake, data) == "".join(r + "\r\n" for r in replies).encode(), data
            replayed += 1
    assert replayed >= 5


# --------------------------------------------------------------------------------------------------
# recorded from the live qemu-storage-daemon 7.2.22


def G(desc: str) -> str:
    """A GenericError line without id (``desc`` as it appears on the wire, i.e. JSON-escaped)."""
    return '{"error": {"class": "GenericError", "desc": "' + desc + '"}}'


def JP(detail: str) -> str:
    return G("JSON parse error, " + detail)


# (negotiate first: None, "plain" or "oob"; client bytes; reply lines)
CASES: list[tuple[str | None, bytes, list[str]]] = [
    # lexer errors and resynchronisation
    (None, b'{"execute": query-version}\n',
     [JP("stray '-v'"), JP('expecting value')]),
    (None, b'}\n',
     [JP('expecting value')]),
    (None, b'{"execute": "query-jobs", "id": "abc\n"}\n',
     [JP('stray \'\\"abc\\n\''), JP('expecting value')]),
    (None, b'"a\\qb"\n',
     [JP('invalid escape sequence in string')]),
    (None, b'"\\u12"\n',
     [JP('\\\\u12\\" is not a valid Unicode character')]),
    (None, b'"\\u12x"\n',
     [JP('\\\\u12x\\" is not a valid Unicode character')]),
    (None, b'"\\u1"\n',
     [JP('\\\\u1\\" is not a valid Unicode character')]),
    (None, b'"\\uxyz"\n',
     [JP('\\\\uxyz\\" is not a valid Unicode character')]),
    (None, b'"\\u12\xc3\xa9"\n',
     [JP('\\\\u12\\u00E9 is not a valid Unicode character')]),
    (None, b'"\\u12\xe2\x82\xac"\n',
     [JP('\\\\u12\\uFFFD is not a valid Unicode character')]),
    (None, b'"\\uD800"\n',
     [JP('\\\\uD800 is not a valid Unicode character')]),
    (None, b'"\\uD800\\u0041"\n',
     [JP('\\\\uD800 is not a valid Unicode character')]),
    (None, b'"\\uD800\\u"\n',
     [JP('\\\\uD800 is not a valid Unicode character')]),
    (None, b'"\\uD800x"\n',
     [JP('\\\\uD800 is not a valid Unicode character')]),
    (None, b'"\\uDC00"\n',
     [JP('\\\\uDC00 is not a valid Unicode character')]),
    (None, b'"\\uFFFF"\n',
     [JP('\\\\uFFFF is not a valid Unicode character')]),
    (None, b'"\\uFDD0"\n',
     [JP('\\\\uFDD0 is not a valid Unicode character')]),
    (None, b'"\\uD83F\\uDFFF"\n',
     [JP('\\\\uD83F\\\\uDFFF is not a valid Unicode character')]),
    (None, b'"\\U0041"\n',
     [JP('invalid escape sequence in string')]),
    (None, b'"\xc3"\n',
     [JP('invalid UTF-8 sequence in string')]),
    (None, b'"\xed\xa0\x80"\n',
     [JP('invalid UTF-8 sequence in string')]),
    (None, b'"\xef\xbf\xbf"\n',
     [JP('invalid UTF-8 sequence in string')]),
    (None, b'"\xf4\x90\x80\x80"\n',
     [JP('invalid UTF-8 sequence in string')]),
    (None, b'"\xe0\x80\x80"\n',
     [JP('invalid UTF-8 sequence in string')]),
    (None, b'"\xc1\xbf"\n',
     [JP('invalid UTF-8 sequence in string')]),
    (None, b'"\xfe"\n',
     [JP('stray \'\\"\\uFFFD\'')]),
    (None, b"'\xff'\n",
     [JP("stray ''\\uFFFD'")]),
    (None, b'\xc3\xa9 \n',
     [JP("stray '\\uFFFD'")]),
    (None, b'true\xc3 \n',
     [G('QMP input must be a JSON object'), JP("stray '\\uFFFD'")]),
    (None, b'1\xc3 \n',
     [G('QMP input must be a JSON object'), JP("stray '\\uFFFD'")]),
    (None, b'01 \n',
     [JP("stray '01'")]),
    (None, b'-01 \n',
     [JP("stray '-01'")]),
    (None, b'1. \n',
     [JP("stray '1. '")]),
    (None, b'1.e5 \n',
     [JP("stray '1.e'")]),
    (None, b'1e \n',
     [JP("stray '1e '")]),
    (None, b'1e+ \n',
     [JP("stray '1e+ '")]),
    (None, b'Z \n',
     [JP("stray 'Z'")]),
    (None, b'% \n',
     [JP("stray '%'")]),
    (None, b'@\n',
     [JP("stray '@'")]),
    (None, b'-\x00 \n',
     [JP("stray '-'")]),
    (None, b'\x00\n',
     [JP("stray ''")]),
    (None, b'"a\tb"\n',
     [JP('stray \'\\"a\\t\'')]),
    (None, b'"a\\\tb"\n',
     [JP('stray \'\\"a\\\\\\t\'')]),
    (None, b'"\\\x01"\n',
     [JP('stray \'\\"\\\\\\u0001\'')]),
    (None, b'"\\\xfe"\n',
     [JP('stray \'\\"\\\\\\uFFFD\'')]),
    (None, b'- 1\n',
     [JP("stray '- '")]),
    (None, b'0x1 \n',
     [G('QMP input must be a JSON object'), JP("invalid keyword 'x'"), G('QMP input must be a JSON object')]),
    (None, b'2 3 \n',
     [*[G('QMP input must be a JSON object')] * 2]),
    (None, b'"\xe2\x82\x01\n',
     [JP('stray \'\\"\\uFFFD\\u0001\'')]),
    (None, b'"\xe2\x82\xac\xff\n',
     [JP('stray \'\\"\\u20AC\\uFFFD\'')]),
    (None, b'"\xc0\x80\x01\n',
     [JP('stray \'\\"\\u0000\\u0001\'')]),
    (None, b'"\xf4\x90\x80\x80\x01\n',
     [JP('stray \'\\"\\uFFFD\\u0001\'')]),
    (None, b'"\xf8\x88\x80\x80\x80\x01\n',
     [JP('stray \'\\"\\uFFFD\\u0001\'')]),
    (None, b'"\xfc\x84\x80\x80\x80\x80\x01\n',
     [JP('stray \'\\"\\uFFFD\\u0001\'')]),
    (None, b'"\xe0\x80\x80\x01\n',
     [JP('stray \'\\"\\uFFFD\\u0001\'')]),
    (None, b'"\xc1\xbf\x01\n',
     [JP('stray \'\\"\\uFFFD\\u0001\'')]),
    (None, b'"\xef\xbf\xbe\x01\n',
     [JP('stray \'\\"\\uFFFD\\u0001\'')]),
    (None, b'"\x80\xbf\x01\n',
     [JP('stray \'\\"\\uFFFD\\uFFFD\\u0001\'')]),
    (None, b'{"a":1}\xff{"b":2}\n',
     [G("QMP input member 'a' is unexpected"), JP("stray '\\uFFFD'"), G("QMP input member 'b' is unexpected")]),
    (None, b'"abc\xff{"execute":"query-jobs"}\n',
     [JP('stray \'\\"abc\\uFFFD\''),
      '{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with '
      '\'qmp_capabilities\'"}}']),
    (None, b'\x01xx[1]\n',
     [JP("stray '\\u0001'"), G('QMP input must be a JSON object')]),
    (None, b'\x01xx{}\n',
     [JP("stray '\\u0001'"), G("QMP input lacks member 'execute'")]),
    (None, b'\x01xx"a"\n',
     [JP("stray '\\u0001'")]),
    (None, b"\x01xx'a'\n",
     [JP("stray '\\u0001'")]),
    (None, b'\x01x,1\n',
     [JP("stray '\\u0001'"), JP('expecting value'), G('QMP input must be a JSON object')]),
    (None, b'\x01x:1\n',
     [JP("stray '\\u0001'"), JP('expecting value'), G('QMP input must be a JSON object')]),
    (None, b'\x01x]1\n',
     [JP("stray '\\u0001'"), JP('expecting value'), G('QMP input must be a JSON object')]),
    (None, b'\x01x}1\n',
     [JP("stray '\\u0001'"), JP('expecting value'), G('QMP input must be a JSON object')]),
    (None, b'\x01x\t1\n',
     [JP("stray '\\u0001'")]),
    (None, b'\x01x\x7f1\n',
     [JP("stray '\\u0001'")]),
    (None, b'\x01x\x1f1\n',
     [JP("stray '\\u0001'"), JP("stray '\\u001F'")]),
    (None, b'\x01x\xfe1\n',
     [JP("stray '\\u0001'"), JP("stray '\\uFFFD'")]),
    (None, b'"abc\x01xyz\x7f: \n',
     [JP('stray \'\\"abc\\u0001\''), JP('expecting value')]),
    (None, b'a' * 2000 + b' \n',
     [JP("invalid keyword '" + 'a' * 1006)]),
    (None, b'"' + b'b' * 3000 + b'\x01\n',
     [JP('stray \'\\"' + 'b' * 3000 + "\\u0001'")]),
    # parser errors
    (None, b'{foo: 1}',
     [JP("invalid keyword 'foo'")]),
    (None, b'{null: 1}',
     [JP('key is not a string in object')]),
    (None, b'{[1,2]: 3}',
     [JP('key is not a string in object')]),
    (None, b'{{}: 3}',
     [JP('key is not a string in object')]),
    (None, b'{[1,}: 3}',
     [JP('expecting value')]),
    (None, b'{"a":1,"a":2}',
     [JP('duplicate key')]),
    (None, b'[1,]',
     [JP('expecting value')]),
    (None, b'{"a":1,}',
     [JP('expecting value')]),
    (None, b'{"a"}',
     [JP('missing : in object pair')]),
    (None, b'{"a":}',
     [JP('expecting value')]),
    (None, b'[1 }',
     [JP('expected separator in list')]),
    (None, b'{"a":1]',
     [JP('expected separator in dict')]),
    (None, b'{"a":1,"a":[1,}]',
     [JP('expecting value')]),
    (None, b'tru ',
     [JP("invalid keyword 'tru'")]),
    (None, b'nulll ',
     [JP("invalid keyword 'nulll'")]),
    (None, b'True ',
     [JP("stray 'T'")]),
    (None, b'{,}',
     [JP('expecting value')]),
    (None, b'[,]',
     [JP('expecting value')]),
    (None, b'["a" "b"]',
     [JP('expected separator in list')]),
    (None, b'{"a"::1}',
     [JP('expecting value')]),
    (None, b'[}',
     [JP('expecting value')]),
    (None, b'{]',
     [JP('expecting value')]),
    (None, b']',
     [JP('expecting value')]),
    (None, b',',
     [JP('expecting value')]),
    (None, b':',
     [JP('expecting value')]),
    (None, b'[[]]]',
     [G('QMP input must be a JSON object'), JP('expecting value')]),
    (None, b'{"a":[}]',
     [JP('expecting value')]),
    (None, b'{"a":"\\q", "b" 1}',
     [JP('invalid escape sequence in string')]),
    (None, b'{"a" 1, "b":"\\q"}',
     [JP('missing : in object pair')]),
    (None, b'{"a\\q": 1}',
     [JP('invalid escape sequence in string')]),
    # nesting
    (None, b'[' * 1024 + b']' * 1024,
     [G('QMP input must be a JSON object')]),
    (None, b'[' * 1025 + b']' * 1025,
     [G('JSON nesting depth limit exceeded'), *[JP('expecting value')] * 1025]),
    (None, b'[' * 1025 + b'1' + b']' * 1025 + b'\n',
     [G('JSON nesting depth limit exceeded'), G('QMP input must be a JSON object'), *[JP('expecting value')] * 1025]),
    (None, b'[' * 1030 + b']' * 5 + b'\n',
     [G('JSON nesting depth limit exceeded'), G('QMP input must be a JSON object')]),
    (None, b'[' * 512 + b'{"a":' * 513 + b'\n',
     [G('JSON nesting depth limit exceeded'), G('QMP input must be a JSON object'), JP('expecting value')]),
    (None, b'{"a":' * 1024 + b'1' + b'}' * 1024,
     [G("QMP input member 'a' is unexpected")]),
    # top level values and the envelope (before negotiation)
    (None, b'[1, 2]\n"hello"\nnull\n1\ntrue\n{}\n',
     [*[G('QMP input must be a JSON object')] * 5, G("QMP input lacks member 'execute'")]),
    (None, b'{"id": 5}',
     ['{"id": 5, "error": {"class": "GenericError", "desc": "QMP input lacks member \'execute\'"}}']),
    (None, b'{"execute": 42, "id": 6}',
     ['{"id": 6, "error": {"class": "GenericError", "desc": "QMP input member \'execute\' must be a '
      'string"}}']),
    (None, b'{"execute": "query-version", "arguments": [], "id": 7}',
     ['{"id": 7, "error": {"class": "GenericError", "desc": "QMP input member \'arguments\' must be '
      'an object"}}']),
    (None, b'{"execute": "query-version", "id": 8, "foo": 1}',
     ['{"id": 8, "error": {"class": "GenericError", "desc": "QMP input member \'foo\' is unexpected"}'
      '}']),
    (None, b'{"execute": "query-version", "exec-oob": "query-version", "id": 9}',
     ['{"id": 9, "error": {"class": "GenericError", "desc": "QMP input member \'exec-oob\' is '
      'unexpected"}}']),
    (None, b'{"exec-oob": "query-version", "id": 10}',
     ['{"id": 10, "error": {"class": "GenericError", "desc": "QMP input member \'exec-oob\' is '
      'unexpected"}}']),
    (None, b'{"execute": 42, "foo": 1}',
     [G("QMP input member 'execute' must be a string")]),
    (None, b'{"foo": 1, "execute": 42}',
     [G("QMP input member 'execute' must be a string")]),
    (None, b'{"arguments": 1, "foo": 1, "execute":"x"}',
     [G("QMP input member 'arguments' must be an object")]),
    (None, b'{"execute":"query-jobs","control":1}',
     [G("QMP input member 'control' is unexpected")]),
    (None, b'{"execute":"query-jobs","arguments":null}',
     [G("QMP input member 'arguments' must be an object")]),
    (None, b'{"id":1,"execute":"nosuch","arguments":[]}',
     ['{"id": 1, "error": {"class": "GenericError", "desc": "QMP input member \'arguments\' must be '
      'an object"}}']),
    (None, b'{"execute":"nosuch","id":[1,{"b":2,"a":1}]}',
     ['{"id": [1, {"a": 1, "b": 2}], "error": {"class": "CommandNotFound", "desc": "Expecting '
      'capabilities negotiation with \'qmp_capabilities\'"}}']),
    (None, b'{"execute":"query-version","id":"pre-1"}',
     ['{"id": "pre-1", "error": {"class": "CommandNotFound", "desc": "Expecting capabilities '
      'negotiation with \'qmp_capabilities\'"}}']),
    (None, b'{"execute":"query-commands"}',
     ['{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with '
      '\'qmp_capabilities\'"}}']),
    # qmp_capabilities before negotiation
    (None, b'{"execute":"qmp_capabilities","arguments":{"enable":["bogus"]},"id":"cap-bad"}',
     ['{"id": "cap-bad", "error": {"class": "GenericError", "desc": "Parameter \'null\' does not '
      'accept value \'bogus\'"}}']),
    (None, b'{"execute":"qmp_capabilities","arguments":{"enable":[1],"x":1}}',
     [G("Invalid parameter type for 'enable[0]', expected: string")]),
    (None, b'{"execute":"qmp_capabilities","arguments":{"enable":"oob"}}',
     [G("Invalid parameter type for 'enable', expected: array")]),
    (None, b'{"execute":"qmp_capabilities","arguments":{"enable":null}}',
     [G("Invalid parameter type for 'enable', expected: array")]),
    (None, b'{"execute":"qmp_capabilities","arguments":{"x":1,"enable":["bogus"]}}',
     [G("Parameter 'null' does not accept value 'bogus'")]),
    (None, b'{"execute":"qmp_capabilities","arguments":{"y":1,"x":1}}',
     [G("Parameter 'y' is unexpected")]),
    (None, b'{"execute":"qmp_capabilities","arguments":{"enable":["oob", "bogus", 3]}}',
     [G("Parameter 'null' does not accept value 'bogus'")]),
    (None, b'{"execute":"qmp_capabilities","arguments":{"enable":[{}]}}',
     [G("Invalid parameter type for 'enable[0]', expected: string")]),
    (None, b'{"exec-oob":"qmp_capabilities"}',
     [G("QMP input member 'exec-oob' is unexpected")]),
    (None, b'{"execute":"qmp_capabilities","exec-oob":"x"}',
     [G("QMP input member 'exec-oob' is unexpected")]),
    (None, b'{"execute":"qmp_capabilities","arguments":{"enable":["oob","oob"]}, "id":[1]}'
           b'\n{"exec-oob":"qmp_capabilities"}\n{"exec-oob":"nosuch", "id": 1}\n{"exec-oob":"query-jobs",'
           b'"arguments":{"x":1}}\n',
     ['{"return": {}, "id": [1]}',
      G('The command qmp_capabilities does not support OOB'),
      '{"id": 1, "error": {"class": "CommandNotFound", "desc": "The command nosuch has not been '
      'found"}}',
      G('The command query-jobs does not support OOB')]),
    (None, b'{"execute":"qmp_capabilities","arguments":{"enable":[]}}{"exec-oob":"query-jobs"}',
     ['{"return": {}}', G("QMP input member 'exec-oob' is unexpected")]),
    (None, b'{"execute":"qmp_capabilities","id":{"any":["json",1]}}{"execute":"qmp_capabilities","id":2}'
           b'{"execute":"query-version"}',
     ['{"return": {}, "id": {"any": ["json", 1]}}',
      '{"id": 2, "error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already '
      'complete, command ignored"}}',
      '{"return": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian '
      '1:7.2+dfsg-7+deb12u18+b3"}}']),
    # after negotiation
    ("plain", b'{"execute":"qmp_capabilities","arguments":{"enable":["bogus"]}}'
              b'{"execute":"qmp_capabilities","arguments":{"x":1}}{"execute":"qmp_capabilities",'
              b'"arguments":{}}',
     [G("Parameter 'null' does not accept value 'bogus'"),
      G("Parameter 'x' is unexpected"),
      '{"error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, '
      'command ignored"}}']),
    ("plain", b'{"execute": "no-such-command", "id": 3}{"execute": "query-version", "id": 4\n}\n',
     ['{"id": 3, "error": {"class": "CommandNotFound", "desc": "The command no-such-command has not '
      'been found"}}',
      '{"return": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian '
      '1:7.2+dfsg-7+deb12u18+b3"}, "id": 4}']),
    ("plain", b"{'execute': 'query-version', 'id': 'sq'}{'execute': 'query-jobs', 'id': 'a\"b\\'c'}",
     ['{"return": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian '
      '1:7.2+dfsg-7+deb12u18+b3"}, "id": "sq"}',
      '{"return": [], "id": "a\\"b\'c"}']),
    ("plain", b'{"execute":"query-jobs","id":21}{"execute":"query-block-exports","id":22}',
     ['{"return": [], "id": 21}', '{"return": [], "id": 22}']),
    ("plain", b'{"execute":"query-jobs","id":{"a":[1,2.5,-3,true,null,"x"],"b":1e3}}',
     ['{"return": [], "id": {"a": [1, 2.5, -3, true, null, "x"], "b": 1000}}']),
    ("plain", b'{"execute":"query-jobs","id":[1e400,-1e400,1e-400,-0,-0.0,-9223372036854775809,'
              b'18446744073709551616,18446744073709551615,-9223372036854775808,9223372036854775807,0.1,'
              b'1.5e300,1e-7,3.0,1E5,1e+2,123456789012345678901234567890,5e-324,2.2250738585072014e-308,'
              b'1.7976931348623157e308,0.30000000000000004,100,1e16,1e17,123.456,-1.5e-5]}',
     ['{"return": [], "id": [inf, -inf, 0, 0, -0, -9.2233720368547758e+18, 1.8446744073709552e+19, '
      '18446744073709551615, -9223372036854775808, 9223372036854775807, 0.10000000000000001, '
      '1.5000000000000001e+300, 9.9999999999999995e-08, 3, 100000, 100, 1.2345678901234568e+29, '
      '4.9406564584124654e-324, 2.2250738585072014e-308, 1.7976931348623157e+308, '
      '0.30000000000000004, 100, 10000000000000000, 1e+17, 123.456, -1.5e-05]}']),
    ("plain", ('{"execute":"query-jobs","id":"\\u00e9\\u20ac\\ud83d\\ude00 raw: é€😀 \\u0000 \\/ \\\' '
              '\\b\\f\\n\\r\\t \\u001f \\u007f \\u0080 \\u00ff \\u0100 \\ufffd \\u2028 \\uFEFF"}').encode(),
     ['{"return": [], "id": "\\u00E9\\u20AC\\uD83D\\uDE00 raw: \\u00E9\\u20AC\\uD83D\\uDE00 \\u0000 '
      '/ \' \\b\\f\\n\\r\\t \\u001F \\u007F \\u0080 \\u00FF \\u0100 \\uFFFD \\u2028 \\uFEFF"}']),
    ("plain", b'{"execute":"query-jobs","id":"\xc0\x80"}',
     ['{"return": [], "id": "\\u0000"}']),
    ("plain", b'{"execute":"query-jobs","id":{"minor":1,"micro":2}}{"execute":"query-jobs",'
              b'"id":{"micro":1,"minor":2}}{"execute":"query-jobs","id":{"b":1,"a":2,"micro":1,"minor":2,'
              b'"c":{"minor":[],"micro":{}}}}',
     ['{"return": [], "id": {"micro": 2, "minor": 1}}',
      '{"return": [], "id": {"minor": 2, "micro": 1}}',
      '{"return": [], "id": {"minor": 2, "micro": 1, "a": 2, "b": 1, "c": {"micro": {}, "minor": []}}'
      '}']),
    ("plain", b'{"execute":"query-jobs","id":{}}{"execute":"query-jobs","id":[]}{"execute":"query-jobs",'
              b'"id":[[[]],{"":""}]}{"execute":"query-jobs","id":null}{"execute":"query-jobs","id":false}',
     ['{"return": [], "id": {}}',
      '{"return": [], "id": []}',
      '{"return": [], "id": [[[]], {"": ""}]}',
      '{"return": [], "id": null}',
      '{"return": [], "id": false}']),
    ("plain", b'{"execute":"query-jobs","id":' + b'[' * 1000 + b'1' + b']' * 1000 + b'}',
     ['{"return": [], "id": ' + '[' * 1000 + '1' + ']' * 1000 + '}']),
    ("plain", b'{"execute": "query-version", "arguments": {"bogus": 1}, "id": 18}{"execute": '
              b'"query-block-jobs", "arguments": {}, "id": 20}',
     ['{"id": 18, "error": {"class": "GenericError", "desc": "Parameter \'bogus\' is unexpected"}}',
      '{"return": [], "id": 20}']),
    ("plain", b'{"execute":"chardev-add","arguments":{"id":"rb","backend":{"type":"ringbuf",'
              b'"data":{"size":4096}}},"id":1}{"execute":"ringbuf-write","arguments":{"device":"rb",'
              b'"data":"a/b\\"c\\\\d\\te\\u0001\\u007f\\u00e9\\u20ac\\ud83d\\ude00 raw-utf8: '
              b'\xc3\xa9\xe2\x82\xac"},"id":2}{"execute":"ringbuf-read","arguments":{"device":"rb",'
              b'"size":4096},"id":3}',
     ['{"return": {}, "id": 1}',
      '{"return": {}, "id": 2}',
      '{"return": "a/b\\"c\\\\d\\te\\u0001\\u007F\\u00E9\\u20AC\\uD83D\\uDE00 raw-utf8: '
      '\\u00E9\\u20AC", "id": 3}']),
    # oob negotiated
    ("oob", b'{"exec-oob": "query-version"}{"exec-oob": "query-version", "id": "o1"}{"execute": '
            b'"query-version", "id": "ib1"}{"execute": "query-version"}',
     [G('The command query-version does not support OOB'),
      '{"id": "o1", "error": {"class": "GenericError", "desc": "The command query-version does not '
      'support OOB"}}',
      '{"return": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian '
      '1:7.2+dfsg-7+deb12u18+b3"}, "id": "ib1"}',
      '{"return": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian '
      '1:7.2+dfsg-7+deb12u18+b3"}}']),
    ("oob", b'{"exec-oob":"qmp_capabilities","execute":"x"}{"execute":"x","exec-oob":"qmp_capabilities"}'
            b'{"exec-oob":3,"execute":"x"}{"exec-oob":"query-jobs","arguments":[]}{"exec-oob":"nosuch",'
            b'"id":1}{"exec-oob":"qmp_capabilities","id":2}',
     [G("QMP input member 'arguments' must be an object"),
      '{"id": 1, "error": {"class": "CommandNotFound", "desc": "The command nosuch has not been '
      'found"}}',
      '{"id": 2, "error": {"class": "GenericError", "desc": "The command qmp_capabilities does not '
      'support OOB"}}',
      *[G("QMP input member 'execute' clashes with 'exec-oob'")] * 2,
      G("QMP input member 'exec-oob' must be a string")]),
]


@pytest.mark.parametrize("mode,data,expected", CASES, ids=[repr(c[1][:40]) for c in CASES])
def test_recorded_replies(mode: str | None, data: bytes, expected: list[str]) -> None:
    conn, fake = connection(), FakeDaemon()
    negotiate(conn, fake, mode)
    assert exchange(conn, fake, data) == "".join(line + "\r\n" for line in expected).encode()


def test_recorded_replies_byte_by_byte() -> None:
    """Splitting the input at every byte changes nothing (QMP input is a stream).

    Not for oob sessions: there, what arrives together decides what can overtake what.
    """
    for mode, data, expected in CASES:
        if len(data) > 300 or mode == "oob":
            continue
        conn, fake = connection(), FakeDaemon()
        negotiate(conn, fake, mode)
        got = b"".join(exchange(conn, fake, data[i:i + 1]) for i in range(len(data)))
        assert got == "".join(line + "\r\n" for line in expected).encode(), data


PRETTY_GREETING = (
    '{\r\n    "QMP": {\r\n        "version": {\r\n            "qemu": {\r\n                "micro": 22,\r\n'
    '                "minor": 2,\r\n                "major": 7\r\n            },\r\n'
    '            "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"\r\n        },\r\n        "capabilities": [\r\n'
    '            "oob"\r\n        ]\r\n    }\r\n}\r\n')
PRETTY_CASES = [
    (None, b'{"execute":"query-version","id":[]}}\n"\xfe\n',
     '{\r\n    "id": [\r\n    ],\r\n    "error": {\r\n        "class": "CommandNotFound",\r\n'
     '        "desc": "Expecting capabilities negotiation with \'qmp_capabilities\'"\r\n    }\r\n}\r\n'
     '{\r\n    "error": {\r\n        "class": "GenericError",\r\n'
     '        "desc": "JSON parse error, expecting value"\r\n    }\r\n}\r\n'
     '{\r\n    "error": {\r\n        "class": "GenericError",\r\n'
     '        "desc": "JSON parse error, stray \'\\"\\uFFFD\'"\r\n    }\r\n}\r\n'),
    ("plain", b'{"execute":"query-jobs","id":{"a":[],"b":{},"c":[1,{"x":[]}],"d":"\xc3\xa9","e":[[{}]],'
              b'"f":{"g":{"h":null}}}}{"execute":"query-version"}',
     '{\r\n    "return": [\r\n    ],\r\n    "id": {\r\n        "d": "\\u00E9",\r\n        "e": [\r\n'
     '            [\r\n                {\r\n                }\r\n            ]\r\n        ],\r\n'
     '        "a": [\r\n        ],\r\n        "f": {\r\n            "g": {\r\n                "h": null\r\n'
     '            }\r\n        },\r\n        "b": {\r\n        },\r\n        "c": [\r\n            1,\r\n'
     '            {\r\n                "x": [\r\n                ]\r\n            }\r\n        ]\r\n    }\r\n}\r\n'
     '{\r\n    "return": {\r\n        "qemu": {\r\n            "micro": 22,\r\n            "minor": 2,\r\n'
     '            "major": 7\r\n        },\r\n        "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"\r\n    }\r\n}\r\n'),
    ("oob", b'{"exec-oob":"query-version","id":1.5}',
     '{\r\n    "id": 1.5,\r\n    "error": {\r\n        "class": "GenericError",\r\n'
     '        "desc": "The command query-version does not support OOB"\r\n    }\r\n}\r\n'),
]


def test_pretty_greeting() -> None:
    assert connection(pretty=True).greeting() == PRETTY_GREETING.encode()


@pytest.mark.parametrize("mode,data,expected", PRETTY_CASES)
def test_pretty_replies(mode: str | None, data: bytes, expected: str) -> None:
    conn, fake = connection(pretty=True), FakeDaemon()
    if mode is not None:
        enable = b',"arguments":{"enable":["oob"]}' if mode == "oob" else b""
        negotiated = exchange(conn, fake, b'{"execute":"qmp_capabilities"%s}' % enable)
        assert negotiated == b'{\r\n    "return": {\r\n    }\r\n}\r\n'
    assert exchange(conn, fake, data) == expected.encode()


# --------------------------------------------------------------------------------------------------
# API details


def test_execute_items_and_replies() -> None:
    conn = connection()
    assert not conn.negotiated and not conn.oob_enabled
    assert conn.event("JOB_STATUS_CHANGE", {"status": "created", "id": "j"}, 1, 2) is None
    assert conn.feed(b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}') == [b'{"return": {}}\r\n']
    assert conn.negotiated and conn.oob_enabled
    items = conn.feed(b'{"execute":"query-jobs"}{"arguments":{"a":1},"id":null,"execute":"blockdev-del"}')
    assert items == [Execute("query-jobs", None, None, False), Execute("blockdev-del", {"a": 1}, None, True)]
    assert conn.reply(items[0], []) == b'{"return": []}\r\n'
    assert conn.reply(items[1], {"x": 1}) == b'{"return": {"x": 1}, "id": null}\r\n'
    assert conn.error(items[1], QMPError("Job not found")) == (
        b'{"id": null, "error": {"class": "GenericError", "desc": "Job not found"}}\r\n')
    assert conn.error(items[0], QMPError("Block job 'x' not found", QMPError.DEVICE_NOT_ACTIVE)) == (
        b'{"error": {"class": "DeviceNotActive", "desc": "Block job \'x\' not found"}}\r\n')
    assert conn.event("JOB_STATUS_CHANGE", {"status": "created", "id": "j"}, 1795548403, 840490) == (
        b'{"timestamp": {"seconds": 1795548403, "microseconds": 840490}, "event": "JOB_STATUS_CHANGE",'
        b' "data": {"status": "created", "id": "j"}}\r\n')


def test_oob_replies_overtake_queued_in_band_requests() -> None:
    """With oob negotiated QEMU answers exec-oob at once, even before in-band work read earlier."""
    conn = connection()
    conn.feed(b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}')
    items = conn.feed(b'{"execute":"query-jobs","id":1}{"exec-oob":"query-jobs","id":2}')
    assert isinstance(items[0], OOBReply) and b'"id": 2' in items[0]
    assert items[1] == Execute("query-jobs", None, 1, True)
    # Without oob the monitor reads nothing more until the in-band request is done: no overtaking.
    plain = connection()
    plain.feed(b'{"execute":"qmp_capabilities"}')
    items = plain.feed(b'{"execute":"query-jobs","id":1}{"exec-oob":"query-jobs","id":2}')
    assert isinstance(items[0], Execute) and not isinstance(items[1], OOBReply)
    # Negotiating oob is itself in-band: what follows it in the same write is read afterwards.
    late = connection()
    items = late.feed(b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}{"exec-oob":"x"}')
    assert items[0] == b'{"return": {}}\r\n' and isinstance(items[1], OOBReply)


def test_unknown_command_uses_command_exists() -> None:
    seen: list[str] = []

    def exists(name: str) -> bool:
        seen.append(name)
        return name == "query-jobs"

    conn = QMPConnection(VERSION, PACKAGE, command_exists=exists)
    conn.feed(b'{"execute":"qmp_capabilities"}')
    assert conn.feed(b'{"execute":"query-jobs"}{"execute":"nope","id":"x"}') == [
        Execute("query-jobs", None, None, False),
        b'{"id": "x", "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}\r\n']
    assert seen == ["query-jobs", "nope"]


def test_id_echo_keeps_qdict_order_and_deep_nesting() -> None:
    conn, fake = connection(), FakeDaemon()
    negotiate(conn, fake, "plain")
    deep = b"[" * 1022 + b'{"minor":1,"micro":2}' + b"]" * 1022
    out = exchange(conn, fake, b'{"execute":"query-jobs","id":' + deep + b"}")
    assert out == b'{"return": [], "id": ' + b"[" * 1022 + b'{"micro": 2, "minor": 1}' + b"]" * 1022 + b"}\r\n"
    assert dumps({"minor": 1, "micro": 2}) == '{"minor": 1, "micro": 2}'


# --------------------------------------------------------------------------------------------------
# differential: the real qemu-storage-daemon


SYNC = b'{"execute":"x-sync-no-such","id":"__sync"}'


class LiveMonitor:
    """Raw sessions with a live monitor; each exchange ends with a request whose reply marks the end."""

    def __init__(self, path: Path, pretty: bool = False) -> None:
        self.path = path
        # how the last line of a message ends
        self.end = b"\r\n}\r\n" if pretty else b"}\r\n"
        self.sock: socket.socket | None = None
        self.greeting = b""

    def connect(self) -> None:
        self.close()
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(self.path))
        self.greeting = self._read_until(lambda buf: buf.endswith(self.end))

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _read_until(self, done, timeout: float = 20.0) -> bytes:
        buf = b""
        while not done(buf):
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                raise TimeoutError(f"no complete reply from QSD; have {buf[-300:]!r}")
            chunk = self.sock.recv(1 << 20)  # type: ignore[union-attr]
            if not chunk:
                raise EOFError(buf[-300:])
            buf += chunk
        return buf

    def exchange(self, data: bytes) -> bytes:
        """Everything QSD answers to ``data`` followed by the sync request (its reply included)."""
        self.sock.sendall(data + SYNC)  # type: ignore[union-attr]

        def done(buf: bytes) -> bool:
            i = buf.rfind(b"__sync")
            return i >= 0 and buf.endswith(self.end) and buf.find(self.end, i) == len(buf) - len(self.end)

        return self._read_until(done)


def assert_same_replies(live: LiveMonitor, conn: QMPConnection, fake: FakeDaemon, data: bytes) -> None:
    """QSD's reply bytes equal ours.

    With oob negotiated QSD answers exec-oob in its I/O thread while the main
    loop drains queued in-band requests, a race: then only the order among
    out-of-band replies and among in-band replies is compared.
    """
    got = live.exchange(data)
    replies = run_items(conn, fake, conn.feed(data + SYNC))
    oob = [r for r in replies if isinstance(r, OOBReply)]
    inband = [r for r in replies if not isinstance(r, OOBReply)]
    if not oob:
        assert got == b"".join(replies), data
        return
    pos = 0
    while oob or inband:
        if oob and got.startswith(oob[0], pos):
            pos += len(oob.pop(0))
        elif inband and got.startswith(inband[0], pos):
            pos += len(inband.pop(0))
        else:
            raise AssertionError(f"{data!r}: QSD sent {got[pos:]!r}, we expected {oob + inband!r}")
    assert pos == len(got), data


def _live_session(live: LiveMonitor, mode: str | None, pretty: bool = False) -> tuple[QMPConnection, FakeDaemon]:
    live.connect()
    conn, fake = connection(pretty=pretty), FakeDaemon()
    assert live.greeting == conn.greeting()
    if mode is not None:
        enable = b',"arguments":{"enable":["oob"]}' if mode == "oob" else b""
        assert_same_replies(live, conn, fake, b'{"execute":"qmp_capabilities"%s}' % enable)
    return conn, fake


@pytest.fixture
def live(qemu_sd):
    d = qemu_sd()
    monitor = LiveMonitor(d.qmp_path)
    yield monitor
    monitor.close()


def test_differential_recorded_cases(live: LiveMonitor) -> None:
    """Every recorded case, now against the live daemon (catches a stale table as well as our bugs)."""
    for mode, data, _ in CASES:
        conn, fake = _live_session(live, mode)
        assert_same_replies(live, conn, fake, data)


def test_differential_pretty(qemu_sd, workdir: Path) -> None:
    sock = workdir / "pretty.sock"
    qemu_sd("--chardev", f"socket,path={sock},server=on,wait=off,id=p", "--monitor", "chardev=p,pretty=on",
            qmp=False, wait_for=[sock])
    live = LiveMonitor(sock, pretty=True)
    try:
        for mode, data, _ in PRETTY_CASES:
            conn, fake = _live_session(live, mode, pretty=True)
            assert_same_replies(live, conn, fake, data)
    finally:
        live.close()


# Generated inputs: fragments of QEMU's JSON dialect, good and bad, glued with random whitespace.
_KEYS = ["micro", "minor", "major", "a", "b", "x", "y", "id", "", "é", "node-name", "error", "return", "k\u20ac",
         "iops_rd", "detect_zeroes", "cache", "file"]
_CHARS = ["a", "Z", " ", "/", "'", '"', "\\", "\x00", "\x01", "\x1f", "\x7f", "\x80", "é", "\u20ac", "\u2028",
          "\ufeff", "\ufffd", "\U0001F600", "\U0010FFFD", "\ufdd0", "\uffff", "\U0001FFFF"]
_NUMBERS = ["0", "-0", "1", "-1", "0.1", "-0.0", "1e3", "1E-7", "3.0", "1.5e300", "1e400", "-1e400", "1e-400",
            "9223372036854775807", "9223372036854775808", "-9223372036854775808", "-9223372036854775809",
            "18446744073709551615", "18446744073709551616", "123456789012345678901234567890", "5e-324",
            "0.30000000000000004", "2.5", "100", "1e16", "1e17", "-1.5e-5"]
_JUNK = [b"01", b"-", b"1.", b"1e", b"1e+", b"tru", b"nul", b"True", b"%", b"@", b"\\", b"\xc3", b"\xe2\x82",
         b"\xfe", b"\x01", b"\t", b"\x00", b"'", b'"', b"\"\\q\"", b"\"\\u12\"", b"\"\\uD800\"", b"\"\\uDC00x\"",
         b"\"\xed\xa0\x80\"", b"\"\xc0\x80\"", b"\"\xf4\x90\x80\x80\"", b"\"\xef\xbf\xbe\"", b"\xff"]


def _string(rng: random.Random) -> bytes:
    quote = rng.choice("\"'")
    out = [quote]
    for _ in range(rng.randrange(6)):
        ch = rng.choice(_CHARS)
        cp = ord(ch)
        style = rng.randrange(3)
        if ch == quote or ch == "\\" or cp < 0x20:
            style = 0
        if style == 0 and cp < 0x10000:
            out.append(rng.choice(["\\u%04x", "\\u%04X"]) % cp if ch not in "\"'\\/" or rng.random() < 0.5
                       else "\\" + ch)
        elif style == 0:
            cp -= 0x10000
            out.append("\\u%04X\\u%04x" % (0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF)))
        else:
            out.append(ch)
    out.append(quote)
    return "".join(out).encode("utf-8", "surrogatepass")


def _value(rng: random.Random, depth: int = 0) -> bytes:
    kind = rng.randrange(8 if depth < 4 else 5)
    ws = lambda: rng.choice([b"", b"", b" ", b"\n", b"\t", b"\r\n  "])  # noqa: E731
    if kind == 0:
        return _string(rng)
    if kind == 1:
        return rng.choice(_NUMBERS).encode()
    if kind == 2:
        return rng.choice([b"true", b"false", b"null"])
    if kind in (3, 4):
        return rng.choice([b"[]", b"{}", b'""', b"''", b"0"])
    if kind in (5, 6):
        keys = rng.sample(_KEYS, rng.randrange(5))
        members = [ws() + _string_key(rng, k) + ws() + b":" + ws() + _value(rng, depth + 1) for k in keys]
        return b"{" + b",".join(members) + ws() + b"}"
    return b"[" + b",".join(ws() + _value(rng, depth + 1) for _ in range(rng.randrange(4))) + b"]"


def _string_key(rng: random.Random, key: str) -> bytes:
    if rng.random() < 0.2:
        return b'"' + "".join("\\u%04X" % ord(c) for c in key).encode() + b'"'
    quote = rng.choice("\"'")
    return (quote + key + quote).encode()


def _garbage(rng: random.Random) -> bytes:
    parts = []
    for _ in range(rng.randrange(1, 6)):
        r = rng.random()
        if r < 0.35:
            parts.append(_value(rng))
        elif r < 0.6:
            parts.append(rng.choice(_JUNK))
        elif r < 0.8:
            parts.append(bytes(rng.choice(b"{}[],: \n") for _ in range(rng.randrange(1, 4))))
        else:
            parts.append(b'{"execute":"query-jobs","id":' + _value(rng) + b"}")
        parts.append(rng.choice([b"", b" ", b"\n", b"\t"]))
    # 0xFF always ends a pending token or value, so the sync request that follows is read afresh.
    return b"".join(parts) + b"\xff"


def test_differential_generated(live: LiveMonitor) -> None:
    rng = random.Random(7211)
    conn, fake = _live_session(live, "plain")
    for i in range(250):
        if i % 50 == 0:
            conn, fake = _live_session(live, rng.choice([None, "plain", "oob"]))
        assert_same_replies(live, conn, fake, _garbage(rng))


def test_differential_ids_and_unexpected_arguments(live: LiveMonitor) -> None:
    """Generated ids come back re-serialised; extra arguments pick the same 'unexpected' member."""
    rng = random.Random(1723)
    conn, fake = _live_session(live, "plain")
    for _ in range(200):
        args = b""
        if rng.random() < 0.3:
            keys = rng.sample(_KEYS, rng.randrange(1, 8))
            args = b',"arguments":{' + b",".join(b'"%s":1' % k.encode() for k in keys) + b"}"
        assert_same_replies(live, conn, fake, b'{"execute":"query-jobs"' + args + b',"id":' + _value(rng) + b"}")
