# SPDX-License-Identifier: GPL-2.0-or-later
"""qsd.schema against the real qemu-storage-daemon 7.2.

The same malformed arguments go to the live daemon and to
``validate_command`` / ``coerce_keyval``; wherever the schema layer refuses
them, the texts must be the daemon's.  (Cases the schema accepts are not
compared: the daemon's answer then comes from opening things.)  The
introspection answer is compared in shape with the daemon's.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, RawQMP
from test_schema import KEYVAL_ERRORS, QMP_CASES, cli_desc, desc_of

from qsd.schema import Schema, get_schema

QEMU_SD = shutil.which("qemu-storage-daemon")
pytestmark = pytest.mark.skipif(QEMU_SD is None, reason="qemu-storage-daemon (Debian qemu-system-common) is missing")

DIFF_COMMANDS = ("blockdev-add", "block-export-add", "nbd-server-start", "object-add", "blockdev-del")

# Valid-looking arguments that the daemon refuses only after validation, without
# opening anything (no top-level node-name, unbindable addresses, bad object ids).
BASES: list[tuple[str, dict[str, Any]]] = [
    ("blockdev-add", {"driver": "raw", "file": {"driver": "file", "filename": "/nonexistent", "cache": {"direct": False}},
                      "offset": 0, "read-only": True}),
    ("blockdev-add", {"driver": "null-co", "size": 1024, "latency-ns": 5, "read-zeroes": True, "detect-zeroes": "off",
                      "discard": "unmap"}),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "nope", "bitmaps": ["a", {"node": "n", "name": "b"}],
                          "writable": False, "name": "x"}),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/nonexistent/x", "abstract": False}},
                          "max-connections": 3}),
    ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "256.1.1.1", "port": "1", "to": 5}},
                          "tls-creds": "x"}),
    ("object-add", {"qom-type": "iothread", "id": "1bad", "poll-max-ns": 5, "aio-max-batch": 1}),
    ("object-add", {"qom-type": "secret", "id": "1bad", "data": "x", "format": "raw"}),
    ("blockdev-del", {"node-name": "nope"}),
]
ODD_VALUES: list[Any] = [None, True, 0, -1, 1.5, "x", "", [], [1], {}, {"a": 1}, 2 ** 63, -(2 ** 63) - 1, 2 ** 64,
                         70000, "unix", "inet", "raw", "file"]
ODD_KEYS = ["bogus", "x", "driver", "type", "file", "data", "node", "name", "id", "size", "a-b", "zz", "path"]


def _paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, (*prefix, i))


def _mutate(rng: random.Random, value: dict[str, Any]) -> dict[str, Any]:
    """Break a valid argument set in one to three places."""
    value = copy.deepcopy(value)
    for _ in range(rng.randint(1, 3)):
        paths = [p for p in _paths(value) if p]
        if not paths:
            value[rng.choice(ODD_KEYS)] = copy.deepcopy(rng.choice(ODD_VALUES))
            continue
        path = rng.choice(paths)
        parent = value
        for key in path[:-1]:
            parent = parent[key]
        roll = rng.random()
        if roll < 0.4 or not isinstance(parent, dict):
            parent[path[-1]] = copy.deepcopy(rng.choice(ODD_VALUES))
        elif roll < 0.6:
            del parent[path[-1]]
        else:
            for _ in range(rng.randint(1, 4)):
                parent[rng.choice(ODD_KEYS) + rng.choice(["", "1", "2"])] = copy.deepcopy(rng.choice(ODD_VALUES))
    if "driver" in value:
        value.pop("node-name", None)        # no top-level node-name: the daemon never opens the node
    return value


def _random_cases(count: int) -> list[tuple[str, dict[str, Any]]]:
    rng = random.Random(20240722)
    cases = []
    for _ in range(count):
        command, base = rng.choice(BASES)
        cases.append((command, _mutate(rng, base)))
    return cases


# The fixed cases all fail validation, so the daemon never gets to open anything for them.
FIXED = [(c, a) for c, a, _ in QMP_CASES if c in DIFF_COMMANDS]
CASES = FIXED + _random_cases(60)


@pytest.fixture(scope="module")
def real_qmp() -> Iterator[RawQMP]:
    workdir = Path(tempfile.mkdtemp(prefix="qsd-sch-", dir="/tmp"))
    daemon = Daemon("qemu", [QEMU_SD, "--chardev", f"socket,path={workdir}/qmp.sock,server=on,wait=off,id=c",
                             "--monitor", "chardev=c", "--pidfile", str(workdir / "qsd.pid")],
                    workdir, workdir / "qmp.sock", workdir / "qsd.pid")
    try:
        daemon.wait_ready()
        yield daemon.qmp()
    finally:
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def schema() -> Schema:
    return get_schema()


def _real_desc(qmp: RawQMP, command: str, args: dict | None) -> str:
    reply = qmp.execute(command, args)
    if "error" not in reply:
        undo = {"object-add": ("object-del", {"id": (args or {}).get("id")}), "nbd-server-start": ("nbd-server-stop", None)}
        if command in undo:
            qmp.execute(*undo[command])
        return "OK"
    return reply["error"]["desc"]


@pytest.mark.parametrize("command, args", CASES, ids=[f"{c}-{i}" for i, (c, _) in enumerate(CASES)])
def test_qmp_errors_match_the_daemon(real_qmp: RawQMP, schema: Schema, command: str, args: dict | None) -> None:
    mine = desc_of(schema.validate_command, command, copy.deepcopy(args))
    real = _real_desc(real_qmp, command, args)
    if mine != "OK":
        assert mine == real


def _real_cli_error(option: str, arg: str) -> str:
    with tempfile.TemporaryDirectory(prefix="qsd-cli-", dir="/tmp") as cwd:
        proc = subprocess.Popen([QEMU_SD, option, arg], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail(f"qemu-storage-daemon {option} {arg!r} did not fail")
    prefix = f"qemu-storage-daemon: {option} {arg}: "
    line = err.strip().splitlines()[-1]
    assert line.startswith(prefix), err
    return line[len(prefix):]


@pytest.mark.parametrize("option, arg", [(o, a) for o, a, _ in KEYVAL_ERRORS])
def test_cli_errors_match_the_daemon(schema: Schema, option: str, arg: str) -> None:
    assert cli_desc(schema, option, arg) == _real_cli_error(option, arg)


def test_introspection_matches_the_daemon_in_shape(real_qmp: RawQMP, schema: Schema) -> None:
    """Same entries, members, key orders and type structure; enums and unions may hold fewer values."""
    real = {e["name"]: e for e in real_qmp.cmd("query-qmp-schema")}
    mine_list = schema.introspect()
    mine = {e["name"]: e for e in mine_list}
    seen: set[tuple[str, str]] = set()

    def compare(a: str, b: str, where: str) -> None:
        if (a, b) in seen:
            return
        seen.add((a, b))
        ours, theirs = mine[a], real[b]
        assert list(ours) == list(theirs), where
        kind = ours["meta-type"]
        assert kind == theirs["meta-type"], where
        if kind in ("command", "event"):
            assert ours.get("features") == theirs.get("features"), where
            for key in ("arg-type", "ret-type"):
                if key in ours:
                    compare(ours[key], theirs[key], f"{where}.{key}")
        elif kind == "array":
            compare(ours["element-type"], theirs["element-type"], f"{where}[]")
        elif kind == "builtin":
            assert ours == theirs
        elif kind == "enum":
            assert ours["values"] == [v for v in theirs["values"] if v in ours["values"]], where
            assert [m for m in theirs["members"] if m["name"] in ours["values"]] == ours["members"], where
        elif kind == "alternate":
            assert len(ours["members"]) == len(theirs["members"]), where
            for x, y in zip(ours["members"], theirs["members"]):
                compare(x["type"], y["type"], f"{where}|")
        else:
            assert [{k: v for k, v in m.items() if k != "type"} for m in ours["members"]] == \
                [{k: v for k, v in m.items() if k != "type"} for m in theirs["members"]], where
            for x, y in zip(ours["members"], theirs["members"]):
                compare(x["type"], y["type"], f"{where}.{x['name']}")
            assert ours.get("tag") == theirs.get("tag") and ours.get("features") == theirs.get("features"), where
            cases = {v["case"]: v["type"] for v in theirs.get("variants", [])}
            for variant in ours.get("variants", []):
                compare(variant["type"], cases[variant["case"]], f"{where}<{variant['case']}>")

    for entry in mine_list:
        if entry["meta-type"] in ("command", "event"):
            compare(entry["name"], entry["name"], entry["name"])
    assert json.dumps(mine_list)  # serialisable as is
