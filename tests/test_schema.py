# SPDX-License-Identifier: GPL-2.0-or-later
"""qsd.schema: the schema files, validation texts, keyval coercion, introspection.

Expected texts are QEMU 7.2's: from the recorded transcripts (checked
wholesale below) and from probes of the real daemon (the tables; the
differential test in test_schema_differential.py re-checks them live).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest

from qsd.cli import keyval
from qsd.qmp.errors import QMPError
from qsd.schema import Schema, SchemaDefinitionError, get_schema
from qsd.schema.coerce import parse_int, parse_number, parse_size, parse_uint
from qsd.schema.hashorder import first_unvisited, qdict_order
from qsd.schema.model import SCHEMA_DIR, TOPICS

TRANSCRIPTS = Path("/work/shared/reference/qsd-7.2/transcripts")
SCHEMA_LEVEL = re.compile(r"Invalid parameter type for|is missing$|does not accept value|is unexpected$|"
                          r"are unexpected$|expects ")
# Values valid in QEMU 7.2 whose drivers/types qsd does not implement yet.
NOT_YET = re.compile(r"Parameter '(driver|type|qom-type)' does not accept value '[^']*'$")

CLI_OPTIONS = {"--blockdev": ("driver", "BlockdevOptions"), "--export": ("type", "BlockExportOptions"),
               "--nbd-server": (None, "NbdServerOptions"), "--monitor": ("chardev", "MonitorOptions"),
               "--object": ("qom-type", "ObjectOptions")}


@pytest.fixture(scope="module")
def schema() -> Schema:
    return get_schema()


def desc_of(func: Any, *args: Any) -> str:
    """The QMPError text a call raises, or 'OK'."""
    try:
        func(*args)
    except QMPError as exc:
        return exc.desc
    return "OK"


def cli_desc(schema: Schema, option: str, arg: str) -> str:
    """What qsd's schema layer says about one CLI option argument (keyval or JSON)."""
    implied, type_name = CLI_OPTIONS[option]
    if arg.startswith("{"):
        return desc_of(schema.validate_type, type_name, json.loads(arg))
    return desc_of(lambda: schema.coerce_keyval(
        type_name, keyval.parse(arg, implied, allow_help=option == "--object")))


# ---------------------------------------------------------------------------------------------
# the schema files


def test_every_topic_file_is_loaded() -> None:
    assert sorted(p.stem for p in SCHEMA_DIR.glob("*.json")) == sorted(TOPICS)


def test_definitions_are_documented(schema: Schema) -> None:
    for typ in schema.types.values():
        assert typ.doc, typ.name
        for member in getattr(typ, "members", []):
            assert member.doc, f"{typ.name}.{member.name}"
        for value in getattr(typ, "values", []):
            assert value.doc, f"{typ.name}.{value.name}"
        for _branch, doc in getattr(typ, "branches", []):
            assert doc, typ.name
    for entity in [*schema.commands.values(), *schema.events.values()]:
        assert entity.doc, entity.name


def test_missing_doc_is_refused(tmp_path: Path) -> None:
    for topic in TOPICS:
        shutil.copy(SCHEMA_DIR / f"{topic}.json", tmp_path)
    path = tmp_path / "block-core.json"
    data = json.loads(path.read_text())
    file_struct = next(d for d in data["definitions"] if d.get("struct") == "BlockdevOptionsFile")
    del file_struct["members"][0]["doc"]
    path.write_text(json.dumps(data))
    with pytest.raises(SchemaDefinitionError, match="BlockdevOptionsFile.filename: missing doc"):
        Schema(tmp_path)


def test_adding_a_driver_is_two_entries(tmp_path: Path) -> None:
    """One enum value plus one branch make a new driver validate."""
    for topic in TOPICS:
        shutil.copy(SCHEMA_DIR / f"{topic}.json", tmp_path)
    path = tmp_path / "block-core.json"
    data = json.loads(path.read_text())
    driver_enum = next(d for d in data["definitions"] if d.get("enum") == "BlockdevDriver")
    driver_enum["values"].append({"name": "vdi", "doc": "VDI format."})
    union = next(d for d in data["definitions"] if d.get("union") == "BlockdevOptions")
    union["branches"]["vdi"] = "BlockdevOptionsGenericFormat"
    path.write_text(json.dumps(data))
    extended = Schema(tmp_path)
    extended.validate_command("blockdev-add", {"driver": "vdi", "node-name": "v", "file": "f"})
    assert desc_of(extended.validate_command, "blockdev-add", {"driver": "vdi", "node-name": "v"}) == \
        "Parameter 'file' is missing"


# ---------------------------------------------------------------------------------------------
# QMP argument errors (texts and choice of error as observed from the real daemon)

QMP_CASES: list[tuple[str, dict | None, str]] = [
    ("blockdev-del", None, "Parameter 'node-name' is missing"),
    ("blockdev-del", {"node-name": True}, "Invalid parameter type for 'node-name', expected: string"),
    ("blockdev-del", {"node-name": "x", "a": 1, "b": 2}, "Parameter 'b' is unexpected"),
    ("query-named-block-nodes", {"flat": None}, "Invalid parameter type for 'flat', expected: boolean"),
    ("query-named-block-nodes", {"flat": True, "x": None}, "Parameter 'x' is unexpected"),
    ("query-version", {"bogus": 1}, "Parameter 'bogus' is unexpected"),
    ("qmp_capabilities", {"enable": ["bogus"]}, "Parameter 'null' does not accept value 'bogus'"),
    ("qmp_capabilities", {"enable": "oob"}, "Invalid parameter type for 'enable', expected: array"),
    ("blockdev-add", {"driver": "file", "node-name": 1}, "Invalid parameter type for 'node-name', expected: string"),
    ("blockdev-add", {"node-name": 1}, "Parameter 'driver' is missing"),
    ("blockdev-add", {"driver": 5}, "Invalid parameter type for 'driver', expected: string"),
    ("blockdev-add", {"driver": "qcow2x", "bogus": 1}, "Parameter 'driver' does not accept value 'qcow2x'"),
    ("blockdev-add", {"driver": "file", "bogus": 1}, "Parameter 'filename' is missing"),
    ("blockdev-add", {"driver": "file", "filename": None}, "Invalid parameter type for 'filename', expected: string"),
    ("blockdev-add", {"driver": "file", "node-name": "x", "filename": "f", "cache": {"direct": "x"}},
     "Invalid parameter type for 'cache.direct', expected: boolean"),
    ("blockdev-add", {"driver": "file", "node-name": "x", "filename": "f", "cache": {"bogus": 1}},
     "Parameter 'cache.bogus' is unexpected"),
    ("blockdev-add", {"driver": "file", "node-name": "x", "filename": "f", "cache": 1},
     "Invalid parameter type for 'cache', expected: object"),
    ("blockdev-add", {"driver": "file", "node-name": "x", "filename": "f", "discard": "bogus"},
     "Parameter 'discard' does not accept value 'bogus'"),
    ("blockdev-add", {"driver": "raw", "node-name": "x", "file": {"driver": "file", "filename": "f", "discard": "b"}},
     "Parameter 'discard' does not accept value 'b'"),
    ("blockdev-add", {"driver": "raw", "node-name": "x", "file": {"driver": "file", "filename": "f", "bogus": 1}},
     "Parameter 'file.bogus' is unexpected"),
    ("blockdev-add", {"driver": "raw", "node-name": "x", "file": {"driver": "file"}},
     "Parameter 'file.filename' is missing"),
    ("blockdev-add", {"driver": "raw", "node-name": "x", "file": {}}, "Parameter 'file.driver' is missing"),
    ("blockdev-add", {"driver": "raw", "node-name": "x", "file": {"driver": "file", "filename": 3}},
     "Invalid parameter type for 'file.filename', expected: string"),
    ("blockdev-add", {"driver": "raw", "node-name": "x", "file": 3},
     "Invalid parameter type for 'file', expected: BlockdevRef"),
    ("blockdev-add", {"driver": "raw", "node-name": "x", "file": None},
     "Invalid parameter type for 'file', expected: BlockdevRef"),
    ("blockdev-add", {"driver": "raw", "node-name": "x", "file": {"driver": "raw", "file": [1]}},
     "Invalid parameter type for 'file', expected: BlockdevRef"),
    ("blockdev-add", {"driver": "raw", "node-name": "x", "file": {"driver": "bogus"}},
     "Parameter 'driver' does not accept value 'bogus'"),
    ("blockdev-add", {"driver": "file", "node-name": "x", "filename": "f", "z1": 1, "a2": 2, "bogus": 1, "extra": 2},
     "Parameter 'z1' is unexpected"),
    ("blockdev-add", {"driver": "file", "node-name": "x", "filename": "f", "extra": 2, "bogus": 1},
     "Parameter 'bogus' is unexpected"),
    ("blockdev-add", {"driver": "null-co", "node-name": "n", "size": 1.5},
     "Invalid parameter type for 'size', expected: integer"),
    ("blockdev-add", {"driver": "null-co", "node-name": "n", "size": 1000.0},
     "Invalid parameter type for 'size', expected: integer"),
    ("blockdev-add", {"driver": "null-co", "node-name": "n", "size": 2 ** 63},
     "Invalid parameter type for 'size', expected: integer"),
    ("blockdev-add", {"driver": "null-co", "node-name": "n", "size": "1"},
     "Invalid parameter type for 'size', expected: integer"),
    ("blockdev-add", {"driver": "null-co", "node-name": "n", "latency-ns": "x"},
     "Parameter 'latency-ns' expects uint64"),
    ("blockdev-add", {"driver": "null-co", "node-name": "n", "latency-ns": 2 ** 64},
     "Parameter 'latency-ns' expects uint64"),
    ("blockdev-add", {"driver": "null-co", "node-name": "n", "read-zeroes": 1},
     "Invalid parameter type for 'read-zeroes', expected: boolean"),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n", "bitmaps": [3]},
     "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n", "bitmaps": [{"node": "a"}]},
     "Parameter 'bitmaps[0].name' is missing"),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n", "bitmaps": [{"node": "a", "name": "b", "x": 1}]},
     "Parameter 'bitmaps[0].x' is unexpected"),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n", "bitmaps": {"0": "b0"}},
     "Invalid parameter type for 'bitmaps', expected: array"),
    ("nbd-server-start", {"addr": {"type": "inet", "host": "127.0.0.1", "port": "10899"}},
     "Parameter 'addr.data' is missing"),
    ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": 10899}}},
     "Invalid parameter type for 'addr.data.port', expected: string"),
    ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "h", "port": "1", "bogus": 1}}},
     "Parameter 'addr.data.bogus' is unexpected"),
    ("nbd-server-start", {"addr": {"type": "inet", "data": 5}}, "Invalid parameter type for 'addr.data', expected: object"),
    ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "h", "port": "1"}, "bogus": 1}},
     "Parameter 'addr.bogus' is unexpected"),
    ("nbd-server-start", {"addr": {"type": "fd", "data": {}}}, "Parameter 'addr.data.str' is missing"),
    ("nbd-server-start", {"addr": "x"}, "Invalid parameter type for 'addr', expected: object"),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "p"}}, "max-connections": -1},
     "Parameter 'max-connections' expects uint32_t"),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "p"}}, "max-connections": "x"},
     "Parameter 'max-connections' expects uint64"),
    ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "h", "port": "1", "to": "x"}}},
     "Parameter 'addr.data.to' expects uint64"),
    ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "h", "port": "1", "to": 65536}}},
     "Parameter 'to' expects uint16_t"),
    ("object-add", {"qom-type": "secret", "id": "s", "format": "x"}, "Parameter 'format' does not accept value 'x'"),
    ("object-add", {"qom-type": "secret", "id": "s", "bogus": 1}, "Parameter 'bogus' is unexpected"),
    ("object-add", {"qom-type": "secret"}, "Parameter 'id' is missing"),
    ("object-add", {"id": "s"}, "Parameter 'qom-type' is missing"),
    ("object-add", {"qom-type": "iothread", "id": "i", "poll-max-ns": "x"},
     "Invalid parameter type for 'poll-max-ns', expected: integer"),
    ("object-add", {"qom-type": "bogus", "id": "s"}, "Parameter 'qom-type' does not accept value 'bogus'"),
]


@pytest.mark.parametrize("command, args, desc", QMP_CASES)
def test_qmp_argument_errors(schema: Schema, command: str, args: dict | None, desc: str) -> None:
    assert desc_of(schema.validate_command, command, args) == desc


@pytest.mark.parametrize("command, args", [
    ("blockdev-add", {"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": "x",
                                                                  "cache": {"direct": True}}}),
    ("blockdev-add", {"driver": "null-co", "node-name": "n", "latency-ns": -1, "size": -(2 ** 63)}),
    ("blockdev-add", {"driver": "host_device", "node-name": "h", "filename": "/dev/null", "aio": "io_uring",
                      "x-check-cache-dropped": False}),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n", "bitmaps": ["a", {"node": "n", "name": "b"}]}),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "p"}}, "max-connections": 2 ** 32 - 1}),
    ("object-add", {"qom-type": "secret", "id": "s", "data": "x", "loaded": True}),
    ("qom-get", {"path": "/objects/s", "property": "data"}),
    ("quit", {}),
])
def test_qmp_valid_arguments(schema: Schema, command: str, args: dict) -> None:
    assert schema.validate_command(command, args) is args


def test_unknown_command(schema: Schema) -> None:
    with pytest.raises(QMPError) as exc:
        schema.validate_command("no-such-command", None)
    assert (exc.value.error_class, exc.value.desc) == ("CommandNotFound",
                                                       "The command no-such-command has not been found")


def test_validate_type_with_path(schema: Schema) -> None:
    assert desc_of(schema.validate_type, "SocketAddress", {"type": "unix"}, "addr") == \
        "Parameter 'addr.path' is missing"
    assert desc_of(schema.validate_type, "BlockdevOptions", {"driver": "file"}, "options[0]") == \
        "Parameter 'options[0].filename' is missing"
    assert desc_of(schema.validate_type, "BlockdevRef", 5) == "Invalid parameter type for 'null', expected: BlockdevRef"
    assert desc_of(schema.validate_type, "BlockdevRefOrNull", 5, "backing") == \
        "Invalid parameter type for 'backing', expected: BlockdevRefOrNull"
    assert schema.validate_type("BlockdevRefOrNull", None) is None
    assert schema.validate_type("BlockdevRef", "node0") == "node0"


def _qmp_exchanges(name: str) -> list[tuple[dict, dict]]:
    """(request, reply) pairs of a transcript; events and unparsable writes skipped."""
    pairs: list[tuple[dict, dict]] = []
    pending: dict | None = None
    for line in (TRANSCRIPTS / name).read_text().splitlines():
        if line.startswith("-> "):
            try:
                pending = json.loads(line[3:])
            except json.JSONDecodeError:
                pending = None
        elif line.startswith("<- ") and pending is not None:
            reply = json.loads(line[3:])
            if "event" not in reply:
                pairs.append((pending, reply))
                pending = None
    return pairs


@pytest.mark.parametrize("transcript", ["a-handshake-and-errors.txt", "a3-json-parser-edge-cases.txt",
                                        "c-blockdev-add-chain-and-del.txt", "g-nbd-server-and-exports.txt",
                                        "h-secret-and-luks.txt", "j-misc-commands.txt"])
def test_transcript_argument_errors(schema: Schema, transcript: str) -> None:
    """Every schema-level error in a transcript is ours too; nothing the daemon accepted is refused."""
    if not (TRANSCRIPTS / transcript).exists():
        pytest.skip(f"{transcript} not available")
    checked = 0
    for request, reply in _qmp_exchanges(transcript):
        if not isinstance(request, dict):
            continue
        command, args = request.get("execute"), request.get("arguments")
        if set(request) - {"execute", "arguments", "id"} or not schema.has_command(command) \
                or not isinstance(args, (dict, type(None))):
            continue
        if reply.get("error", {}).get("class") == "CommandNotFound":
            continue
        mine = desc_of(schema.validate_command, command, args)
        real = reply["error"]["desc"] if "error" in reply else None
        if real is not None and SCHEMA_LEVEL.search(real):
            assert mine == real, (request, real)
        else:
            assert mine == "OK" or NOT_YET.match(mine), (request, mine)
        checked += 1
    assert checked


def _cli_runs(name: str) -> list[tuple[list[str], str | None]]:
    """(argv, stderr error line) of every qemu-storage-daemon run in a cli-probes transcript."""
    runs: list[tuple[list[str], str | None]] = []
    for line in (TRANSCRIPTS / name).read_text().splitlines():
        if line.startswith("$ qemu-storage-daemon") and ";" not in line and "&" not in line and "|" not in line:
            runs.append((shlex.split(line[2:])[1:], None))
        elif line.startswith("| 2> qemu-storage-daemon: --") and runs and runs[-1][1] is None:
            runs[-1] = (runs[-1][0], line[len("| 2> qemu-storage-daemon: "):])
    return runs


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


@pytest.mark.parametrize("transcript", ["cli-probes.txt", "cli-probes-2.txt"])
def test_transcript_cli_errors(schema: Schema, transcript: str) -> None:
    """Every schema-level CLI error in the probes is ours too; accepted options validate."""
    if not (TRANSCRIPTS / transcript).exists():
        pytest.skip(f"{transcript} not available")
    checked = 0
    for argv, error in _cli_runs(transcript):
        options = [(argv[i], argv[i + 1]) for i in range(len(argv) - 1) if argv[i] in CLI_OPTIONS]
        for option, arg in options:
            if arg.startswith("{") and not _is_json(arg):
                break                       # the JSON parser's business, not the schema's
            if option == "--object" and not arg.startswith("{") and keyval.is_help(arg, "qom-type"):
                break                       # help listings are the CLI's business
            mine = cli_desc(schema, option, arg)
            prefix = f"{option} {arg}: "
            if error is not None and error.startswith(prefix):
                real = error[len(prefix):]
                if SCHEMA_LEVEL.search(real) or real.startswith(("Expected", "Invalid parameter", "Help is")):
                    assert mine == real, (option, arg)
                    checked += 1
                    break
            assert mine == "OK" or NOT_YET.match(mine), (option, arg, mine)
            checked += 1
    assert checked


# ---------------------------------------------------------------------------------------------
# keyval coercion (CLI)

KEYVAL_ERRORS = [
    ("--blockdev", "driver=file,node-name=f0", "Parameter 'filename' is missing"),
    ("--blockdev", "driver=nosuch,node-name=f0", "Parameter 'driver' does not accept value 'nosuch'"),
    ("--blockdev", "null-co,size=1G", "Parameter 'size' expects integer"),
    ("--blockdev", "null-co,size=08", "Parameter 'size' expects integer"),
    ("--blockdev", "null-co,size=0x", "Parameter 'size' expects integer"),
    ("--blockdev", "null-co,size=5 ", "Parameter 'size' expects integer"),
    ("--blockdev", "null-co,size=9223372036854775808", "Parameter 'size' expects integer"),
    ("--blockdev", "null-co,read-only=maybe", "Parameter 'read-only' expects 'on' or 'off'"),
    ("--blockdev", "null-co,read-only=ON", "Parameter 'read-only' expects 'on' or 'off'"),
    ("--blockdev", "null-co,cache.direct=maybe", "Parameter 'cache.direct' expects 'on' or 'off'"),
    ("--blockdev", "null-co,cache=on", "Invalid parameter type for 'cache', expected: object"),
    ("--blockdev", "null-co,read-only.x=on", "Parameters 'read-only.*' are unexpected"),
    ("--blockdev", "null-co,size.0=1", "Parameters 'size.*' are unexpected"),
    ("--blockdev", "null-co,x.00=a", "Parameter 'x' is unexpected"),
    ("--blockdev", "null-co,read-only=maybe,size=x", "Parameter 'read-only' expects 'on' or 'off'"),
    ("--blockdev", "null-co,size=x,read-only=maybe", "Parameter 'read-only' expects 'on' or 'off'"),
    ("--blockdev", "raw,size=x", "Parameter 'file' is missing"),
    ("--blockdev", "raw,file.read-only=maybe", "Parameter 'file.driver' is missing"),
    ("--blockdev", "raw,file.size=x,file.driver=null-co", "Parameter 'file.size' expects integer"),
    ("--blockdev", "raw,file.0=a", "Invalid parameter type for 'file', expected: BlockdevRef"),
    ("--blockdev", "raw,file.driver=null-co,file.size.x=1", "Parameters 'file.size.*' are unexpected"),
    ("--blockdev", "null-co,bogus=2,cache.direct=on,cache.bogus=1", "Parameter 'cache.bogus' is unexpected"),
    ("--blockdev", "", "Parameter 'driver' is missing"),
    ("--export", "nbd,id=e,node-name=n,bitmaps=b0", "Invalid parameter type for 'bitmaps', expected: array"),
    ("--export", "nbd,id=e,node-name=n,bitmaps.0.x=a", "Parameter 'bitmaps.0.node' is missing"),
    ("--export", "nbd,id=e,node-name=n,bitmaps.0.node=a", "Parameter 'bitmaps.0.name' is missing"),
    ("--export", "nbd,id=e,node-name=n,bitmaps.1=a", "Parameter 'bitmaps.0' missing"),
    ("--export", "nbd,id=e,node-name=n,bitmap=nosuch", "Parameter 'bitmap' is unexpected"),
    ("--nbd-server", "addr.type=unix", "Parameter 'addr.path' is missing"),
    ("--nbd-server", "max-connections=x", "Parameter 'addr' is missing"),
    ("--nbd-server", "addr.type=unix,addr.path=p,max-connections=-1", "Parameter 'max-connections' expects uint32_t"),
    ("--nbd-server", "addr.type=unix,addr.path=p,max-connections=x", "Parameter 'max-connections' expects integer"),
    ("--nbd-server", "addr.type=inet,addr.host=h,addr.port=1,addr.to=70000", "Parameter 'to' expects uint16_t"),
    ("--nbd-server", "addr.type=inet,addr.host=h,addr.port=1,addr.to=0x", "Parameter 'addr.to' expects integer"),
    ("--nbd-server", "x", "Expected '=' after parameter 'x'"),
    ("--monitor", "mode=bogus", "Parameter 'mode' does not accept value 'bogus'"),
    ("--monitor", "mode=control", "Parameter 'chardev' is missing"),
    ("--monitor", "pretty=x,id=1", "Parameter 'pretty' expects 'on' or 'off'"),
    ("--monitor", "id.a=1", "Parameters 'id.*' are unexpected"),
    ("--object", "secret,data=x", "Parameter 'id' is missing"),
    ("--object", "nosuch,id=x", "Parameter 'qom-type' does not accept value 'nosuch'"),
    ("--object", "secret,id=s,loaded=x", "Parameter 'loaded' expects 'on' or 'off'"),
    ("--object", "iothread,id=i,poll-max-ns=x", "Parameter 'poll-max-ns' expects integer"),
]


@pytest.mark.parametrize("option, arg, desc", KEYVAL_ERRORS)
def test_keyval_errors(schema: Schema, option: str, arg: str, desc: str) -> None:
    assert cli_desc(schema, option, arg) == desc


def test_keyval_values(schema: Schema) -> None:
    tree = keyval.parse("null-co,node-name=n,size=010,latency-ns=-1,read-zeroes=y,read-only=no,"
                        "cache.direct=true,detect-zeroes=unmap", "driver")
    assert schema.coerce_keyval("BlockdevOptions", tree) == {
        "driver": "null-co", "node-name": "n", "size": 8, "latency-ns": 2 ** 64 - 1, "read-zeroes": True,
        "read-only": False, "cache": {"direct": True}, "detect-zeroes": "unmap"}
    tree = keyval.parse("raw,node-name=r,file=f0,offset= +0x10", "driver")
    assert schema.coerce_keyval("BlockdevOptions", tree) == {
        "driver": "raw", "node-name": "r", "file": "f0", "offset": 16}
    tree = keyval.parse("nbd,id=e,node-name=n,bitmaps.0=b0,bitmaps.1.node=x,bitmaps.1.name=b1,writable=on", "type")
    assert schema.coerce_keyval("BlockExportOptions", tree) == {
        "type": "nbd", "id": "e", "node-name": "n", "bitmaps": ["b0", {"node": "x", "name": "b1"}], "writable": True}
    tree = keyval.parse("addr.type=inet,addr.host=127.0.0.1,addr.port=10900,max-connections=2")
    assert schema.coerce_keyval("NbdServerOptions", tree) == {
        "addr": {"type": "inet", "host": "127.0.0.1", "port": "10900"}, "max-connections": 2}


@pytest.mark.parametrize("text, value", [
    ("0", 0), ("42", 42), ("-5", -5), ("+5", 5), (" 5", 5), ("\t7", 7), ("010", 8), ("0x1F", 31), ("-0x10", -16),
    ("9223372036854775807", 2 ** 63 - 1), ("-0x8000000000000000", -(2 ** 63)),
    ("", None), ("5 ", None), ("08", None), ("0x", None), ("1e3", None), ("1.5", None), ("1G", None),
    ("9223372036854775808", None), ("1" * 5000, None),
])
def test_parse_int(text: str, value: int | None) -> None:
    assert parse_int(text) == value


def test_parse_uint() -> None:
    assert parse_uint("-1") == 2 ** 64 - 1
    assert parse_uint("0xffffffffffffffff") == 2 ** 64 - 1
    assert parse_uint("18446744073709551616") is None
    assert parse_uint("x") is None


@pytest.mark.parametrize("text, value", [
    ("1G", 1 << 30), ("1.5G", 3 << 29), ("1b", 1), ("1B", 1), (" 1k", 1024), ("1.k", 1024), ("0x10", 16),
    ("0x10k", 16384), ("010", 10), ("08", 8), ("+1", 1), ("1.0", 1), ("18446744073709551615", 2 ** 64 - 1),
    ("1.5", None), ("0.5", None), ("x", None), ("-1", None), ("16E", None), ("1kb", None), ("1 k", None),
    ("18446744073709551616", None), ("1.5B", None), (".5k", None), ("1e3", None), ("0x1.8k", None), ("1Z", None),
    ("", None),
])
def test_parse_size(text: str, value: int | None) -> None:
    assert parse_size(text) == value


def test_parse_number() -> None:
    assert parse_number("1.5") == 1.5
    assert parse_number(" -2e3") == -2000.0
    assert parse_number("0x1p4") == 16.0
    assert parse_number("inf") is None
    assert parse_number("1e999") is None
    assert parse_number("1.5 ") is None


# ---------------------------------------------------------------------------------------------
# command list and introspection

# query-commands of qemu-storage-daemon 7.2, in its order.
QEMU_QUERY_COMMANDS = [
    "transaction", "object-del", "object-add", "qom-list-properties", "qom-list-types", "qom-set", "qom-get",
    "qom-list", "query-qmp-schema", "quit", "query-commands", "query-version", "qmp_capabilities",
    "chardev-send-break", "chardev-remove", "chardev-change", "chardev-add", "ringbuf-read", "ringbuf-write",
    "query-chardev-backends", "query-chardev", "query-block-exports", "block-export-del", "block-export-add",
    "nbd-server-stop", "nbd-server-remove", "nbd-server-add", "nbd-server-start", "query-jobs",
    "job-finalize", "job-dismiss", "job-complete", "job-cancel", "job-resume", "job-pause",
    "blockdev-snapshot-delete-internal-sync", "blockdev-snapshot-internal-sync", "x-blockdev-set-iothread",
    "x-blockdev-change", "block-set-write-threshold", "x-blockdev-amend", "blockdev-create", "blockdev-del",
    "blockdev-reopen", "blockdev-add", "block-job-finalize", "block-job-dismiss", "block-job-complete",
    "block-job-resume", "block-job-pause", "block-job-cancel", "block-job-set-speed", "block-stream",
    "blockdev-mirror", "x-debug-block-dirty-bitmap-sha256", "block-dirty-bitmap-merge",
    "block-dirty-bitmap-disable", "block-dirty-bitmap-enable", "block-dirty-bitmap-clear",
    "block-dirty-bitmap-remove", "block-dirty-bitmap-add", "drive-mirror", "x-debug-query-block-graph",
    "query-named-block-nodes", "blockdev-backup", "drive-backup", "block-commit", "change-backing-file",
    "blockdev-snapshot", "blockdev-snapshot-sync", "block_resize", "query-block-jobs", "query-blockstats",
    "query-block",
]


def test_command_names(schema: Schema) -> None:
    names = schema.command_names()
    assert {"qmp_capabilities", "query-version", "query-commands", "query-qmp-schema", "quit", "blockdev-add",
            "blockdev-del", "query-named-block-nodes", "object-add", "object-del", "nbd-server-start",
            "nbd-server-stop", "nbd-server-add", "nbd-server-remove", "block-export-add", "block-export-del",
            "query-block-exports", "query-block", "qom-list", "qom-get", "blockdev-create", "query-jobs",
            "query-block-jobs", "job-pause", "job-resume", "job-cancel", "job-complete", "job-dismiss",
            "job-finalize", "block-job-set-speed", "block-job-cancel", "block-job-pause", "block-job-resume",
            "block-job-complete", "block-job-dismiss", "block-job-finalize",
            "blockdev-snapshot-internal-sync", "blockdev-snapshot-delete-internal-sync",
            "blockdev-backup", "drive-backup", "transaction"} <= set(names)
    assert names == [n for n in QEMU_QUERY_COMMANDS if n in names]     # QEMU's relative order
    assert all(schema.has_command(n) for n in names) and not schema.has_command("block-mirror")
    assert [e for e in schema.event_names() if e != "BLOCK_WRITE_THRESHOLD"] == [
        "BLOCK_IMAGE_CORRUPTED", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR", "BLOCK_JOB_READY",
        "BLOCK_JOB_PENDING", "JOB_STATUS_CHANGE", "BLOCK_EXPORT_DELETED"]


def test_introspection_shape(schema: Schema) -> None:
    info = schema.introspect()
    names = {e["name"] for e in info}
    key_orders = {
        "command": ["name", "ret-type", "meta-type", "arg-type"],
        "event": ["name", "meta-type", "arg-type"],
        "builtin": ["name", "json-type", "meta-type"],
        "array": ["name", "element-type", "meta-type"],
        "enum": ["name", "members", "meta-type", "values"],
        "alternate": ["name", "members", "meta-type"],
    }
    for entry in info:
        keys = [k for k in entry if k != "features"]
        if entry["meta-type"] == "object":
            assert keys in (["name", "members", "meta-type"], ["name", "tag", "variants", "members", "meta-type"])
            for member in entry["members"]:
                assert list(member) in (["name", "type"], ["name", "default", "type"],
                                        ["name", "type", "features"], ["name", "default", "type", "features"])
                assert member.get("default", None) is None
        else:
            assert keys == key_orders[entry["meta-type"]], entry
        if "features" in entry:
            assert list(entry)[-1] == "features"
        assert "allow-oob" not in entry
        for ref in (entry.get("arg-type"), entry.get("ret-type"), entry.get("element-type"),
                    *(m.get("type") for m in entry.get("members", [])),
                    *(v["type"] for v in entry.get("variants", []))):
            assert ref is None or ref in names, (entry["name"], ref)
    numbered = [e["name"] for e in info if e["name"].isdigit()]
    assert numbered == [str(i) for i in range(len(numbered))]
    by_name = {e["name"]: e for e in info}
    assert info[0] == {"name": "query-block", "ret-type": "[1]", "meta-type": "command", "arg-type": "0"}
    assert by_name["0"] == {"name": "0", "members": [], "meta-type": "object"}
    assert {e["name"]: e["json-type"] for e in info if e["meta-type"] == "builtin"} == {
        "str": "string", "int": "int", "bool": "boolean", "any": "value", "null": "null"}
    blockdev_add = by_name[by_name["blockdev-add"]["arg-type"]]
    assert blockdev_add["tag"] == "driver"
    assert [m["name"] for m in blockdev_add["members"]] == [
        "driver", "node-name", "discard", "cache", "read-only", "auto-read-only", "force-share", "detect-zeroes"]
    file_branch = by_name[next(v["type"] for v in blockdev_add["variants"] if v["case"] == "file")]
    assert file_branch["features"] == ["dynamic-auto-read-only"]
    assert file_branch["members"][-1] == {"name": "x-check-cache-dropped", "default": None, "type": "bool",
                                          "features": ["unstable"]}
    assert by_name["nbd-server-add"]["features"] == ["deprecated"]
    start_args = by_name[by_name["nbd-server-start"]["arg-type"]]
    assert start_args["members"][-1] == {"name": "max-connections", "default": None, "type": "int"}
    schema_info = by_name[by_name["query-qmp-schema"]["ret-type"][1:-1]]
    enum_info = by_name[next(v["type"] for v in schema_info["variants"] if v["case"] == "enum")]
    assert enum_info["members"][1] == {"name": "values", "type": "[str]", "features": ["deprecated"]}
    assert schema.introspect() is not schema.introspect()


# ---------------------------------------------------------------------------------------------
# QEMU's hash orders


def test_qdict_order() -> None:
    assert qdict_order(["major", "minor", "micro"]) == ["micro", "minor", "major"]
    assert qdict_order(["QMP"]) == ["QMP"]
    assert qdict_order(["version", "capabilities"]) == ["version", "capabilities"]
    assert qdict_order(["qemu", "package"]) == ["qemu", "package"]
    assert qdict_order(["id", "error"]) == ["id", "error"]
    assert qdict_order(["return", "id"]) == ["return", "id"]
    assert qdict_order(["timestamp", "event", "data"]) == ["timestamp", "event", "data"]
    assert qdict_order(["id", "type", "node-name", "shutting-down"]) == ["node-name", "shutting-down", "type", "id"]


def test_first_unvisited() -> None:
    base = ["driver", "node-name", "filename"]
    assert first_unvisited([*base, "z1", "a2", "bogus", "extra"], base) == "z1"
    assert first_unvisited([*base, "extra", "bogus"], base) == "bogus"
    assert first_unvisited(["node-name", "a", "b"], ["node-name"]) == "b"
    assert first_unvisited(["a"], ["a"]) is None
    many = [f"k{i}" for i in range(40)]
    assert first_unvisited(many, many[:-1]) == "k39"
