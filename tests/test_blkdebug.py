# SPDX-License-Identifier: GPL-2.0-or-later
"""blkdebug: the config-file parser (property tests), rule semantics, and
QSD's error texts and injected errors as an NBD client sees them."""

from __future__ import annotations

import asyncio
import errno
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qsd.block.filters.blkdebug import (GROUPS, BlkdebugNode, build_rules, parse_config,
                                        parse_number)
from qsd.qmp.errors import GenericError

# ---------------------------------------------------------------------------
# parser


def test_parse_config_groups_and_ids() -> None:
    text = (b'# comment\n\n[inject-error]\nevent = "read_aio"\n  errno = "28"\n'
            b'[set-state "s1"]\nevent = "write_aio"\nnew_state = "2"\n')
    groups = parse_config(text)
    assert [(g.name, g.values) for g in groups] == [
        ("inject-error", {"event": "read_aio", "errno": "28"}),
        ("set-state", {"id": "s1", "event": "write_aio", "new_state": "2"})]


@pytest.mark.parametrize("text, error", [
    (b'event = "read_aio"\n', "no group defined"),
    (b'[inject-error]\n   \n', "parse error"),
    (b'[inject-error]\r\n', "Missing event name for rule"),
    (b'[bogus]\nevent = "x"\n', "There is no option group 'bogus'"),
    (b'[inject-error]\nevent = read_aio\n', "invalid parameter value: "),
    (b'[inject-error]\nevent="read_aio"\n', "Invalid parameter 'event=\"read_aio\"'"),
    (b'[inject-error]\nerrno = "5"\n', "Missing event name for rule"),
    (b'[inject-error]\nevent = "read_aio"\nerrno = "x"\n', "Parameter 'errno' expects a number"),
    (b'[inject-error]\nevent = "read_aio"\nonce = "maybe"\n', "Parameter 'once' expects 'on' or 'off'"),
    (b'[inject-error]\nevent = "read_aio"\niotype = "bogus"\n', "invalid parameter value: bogus"),
    (b'[set-state]\nevent = "read_aio"\n', None),
])
def test_config_errors(text: bytes, error: str | None) -> None:
    if error is None:
        build_rules(text, [], [])
        return
    with pytest.raises(GenericError) as err:
        build_rules(text, [], [])
    assert err.value.desc == error


def test_parse_number_is_c_like() -> None:
    assert parse_number("n", "0x10") == 16
    assert parse_number("n", "010") == 8
    assert parse_number("n", " 7") == 7
    assert parse_number("n", "-1") == (1 << 64) - 1
    for bad in ("", "x", "1x", "0x", "1.5"):
        with pytest.raises(GenericError):
            parse_number("n", bad)


_names = st.sampled_from(sorted(GROUPS))
_keys = st.text(st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters='="'),
                min_size=1, max_size=20).filter(lambda key: key[0] not in "#[")
_values = st.text(st.characters(min_codepoint=32, max_codepoint=126, blacklist_characters='"'),
                  min_size=1, max_size=40)


@given(st.lists(st.tuples(_names, st.dictionaries(_keys, _values, max_size=5)), max_size=6))
@settings(max_examples=200, deadline=None)
def test_well_formed_configs_round_trip(groups: list[tuple[str, dict[str, str]]]) -> None:
    text = b"".join(f"[{name}]\n".encode() + b"".join(f'{k} = "{v}"\n'.encode() for k, v in values.items())
                    for name, values in groups)
    parsed = parse_config(text)
    assert [(g.name, g.values) for g in parsed] == groups


@given(st.binary(max_size=4096))
@settings(max_examples=300, deadline=None)
def test_any_bytes_parse_or_fail_cleanly(data: bytes) -> None:
    try:
        rules = build_rules(data, [], [])
    except GenericError as err:
        assert err.desc
    else:
        assert len(rules) <= data.count(b"[")


@given(st.binary(min_size=2000, max_size=8000))
@settings(max_examples=30, deadline=None)
def test_long_lines_are_bounded(data: bytes) -> None:
    """Lines longer than QEMU's 1023-byte buffer are read in pieces."""
    try:
        groups = parse_config(b"[inject-error]\n" + data.replace(b"\n", b"x"))
    except GenericError:
        return
    for group in groups:
        assert all(len(k) <= 63 and len(v) <= 1023 for k, v in group.values.items())


# ---------------------------------------------------------------------------
# rules


class _Node(BlkdebugNode):
    """A blkdebug node's rule logic without a graph."""

    def __init__(self, rules: list[Any]) -> None:  # noqa: D107 -- no graph needed
        self.rules = rules
        self.state = 1
        self.active = []


def _fails(node: _Node, offset: int = 0, length: int = 512, iotype: str = "read") -> int:
    try:
        asyncio.run(node._check(offset, length, iotype))
    except OSError as err:
        return err.errno
    return 0


def test_rules_arm_on_events_and_respect_states() -> None:
    rules = build_rules(b'[inject-error]\nevent = "read_aio"\nstate = "2"\nerrno = "28"\nonce = "on"\n'
                        b'[set-state]\nevent = "write_aio"\nstate = "1"\nnew_state = "2"\n',
                        [{"event": "flush_to_disk", "iotype": "flush", "errno": 5}], [])
    node = _Node(rules)
    node.debug_event("read_aio")           # state 1: the rule waits for state 2
    assert _fails(node) == 0
    node.debug_event("write_aio")
    assert node.state == 2
    node.debug_event("read_aio")
    assert _fails(node, iotype="write") == errno.ENOSPC
    assert _fails(node) == 0                # once: gone
    node._parent_write_gen += 1            # the parent has something to flush
    node.debug_event("flush_to_disk")
    assert _fails(node) == 0                # only flushes
    assert _fails(node, 0, 0, "flush") == errno.EIO
    assert _fails(node, 0, 0, "flush") == errno.EIO


def test_sector_restricts_the_range() -> None:
    node = _Node(build_rules(None, [{"event": "read_aio", "sector": 8}], []))
    node.debug_event("read_aio")
    assert _fails(node, 0, 4096) == 0
    assert _fails(node, 4096, 512) == errno.EIO
    assert _fails(node, 0, 0, "flush") == 0


# ---------------------------------------------------------------------------
# against QSD

BAD_CONFIGS = {
    "bad1.cfg": b'[inject-error]\nevent = read_aio\n',
    "bad2.cfg": b'[bogus]\nevent = "read_aio"\n',
    "bad3.cfg": b'event = "read_aio"\n',
    "bad4.cfg": b'[inject-error]\nevent = "nosuch"\n',
    "bad5.cfg": b'[inject-error]\nbogus = "1"\n',
    "bad6.cfg": b'[inject-error]\nerrno = "5"\n',
    "bad7.cfg": b'[inject-error]\nevent = "read_aio"\nerrno = "x"\n',
    "bad8.cfg": b'[inject-error]\nevent = "read_aio"\n   \n',
    "bad9.cfg": b'[inject-error]\nevent = "read_aio"\niotype = "bogus"\n',
    "bad10.cfg": b'[inject-error]\nevent="read_aio"\n',
    "bad11.cfg": b'[inject-error]\ngarbage\n[set-state]\n\n',
    "bad12.cfg": b'[inject-error]\nevent = "read_aio"\nonce = "maybe"\n',
    "bad13.cfg": b'[inject-error]\nbogus = "1"\n[set-state]\n \n',
    "bad14.cfg": b'[set-state "x"]\nevent = "read_aio"\nnew_state = "0x10"\n',
    "bad15.cfg": b'[inject-error]\nevent = "read_aio"\nerrno = "99999999999999999999"\n',
    "bad16.cfg": b'[inject-error]\nevent = "read_aio"\n[]\n',
    "bad17.cfg": b'[inject-error "1bad"]\nevent = "read_aio"\n',
    "bad18.cfg": b'[inject-error "x"]\nevent = "read_aio"\n[inject-error "x"]\nevent = "read_aio"\n',
    "bad19.cfg": b'[inject-error "x"]\nevent = "read_aio"\n[set-state "x"]\nevent = "read_aio"\n[xyz\n',
    "good.cfg": b'[inject-error]\nevent = "read_aio"\nerrno = "5"\n',
}


def _session(daemon: Any) -> list[dict[str, Any]]:
    q = daemon.qmp()
    image = {"driver": "file", "filename": "disk.img", "locking": "off"}
    replies = []
    for i, name in enumerate(["nosuch.cfg", *BAD_CONFIGS]):
        replies.append(q.execute("blockdev-add", {"driver": "blkdebug", "node-name": f"b{i}",
                                                  "config": name, "image": image}))
    for i, extra in enumerate([{"align": 3}, {"align": 4096}, {"align": 1 << 31}, {"align": -1},
                               {"align": 4096, "max-transfer": 512}, {"opt-write-zero": 3},
                               {"opt-write-zero": 1024, "max-write-zero": 512}, {"opt-discard": 3},
                               {"max-discard": 3}, {"max-transfer": -3},
                               {"inject-error": [{"event": "read_aio", "sector": 3, "once": True}],
                                "set-state": [{"event": "write_aio", "new_state": 2}]},
                               {"take-child-perms": ["resize"], "unshare-child-perms": ["write"]}]):
        replies.append(q.execute("blockdev-add", {"driver": "blkdebug", "node-name": f"o{i}",
                                                  "image": image, **extra}))
    daemon.stop()
    return replies


def test_config_and_option_errors_same_as_qsd(qemu_sd: Any, qsd: Any, workdir: Path) -> None:
    (workdir / "disk.img").write_bytes(bytes(1 << 20))
    for name, data in BAD_CONFIGS.items():
        (workdir / name).write_bytes(data)
    theirs = _session(qemu_sd())
    ours = _session(qsd())
    assert ours == theirs


NBD_CONFIG = (b'[inject-error]\nevent = "read_aio"\nerrno = "5"\nonce = "on"\n\n'
              b'[inject-error]\nevent = "write_aio"\nerrno = "28"\nsector = "1"\n\n'
              b'[set-state]\nevent = "write_aio"\nnew_state = "2"\n')


def _qemu_io_through_export(daemon_factory: Any, workdir: Path, tag: str) -> list[tuple[int, str]]:
    sock = workdir / f"{tag}-nbd.sock"
    daemon = daemon_factory(
        "--blockdev", "driver=file,node-name=f0,filename=disk.img,locking=off",
        "--blockdev", "driver=blkdebug,node-name=b0,config=nbd.cfg,image=f0",
        "--blockdev", "driver=raw,node-name=r0,file=b0",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=r0,writable=on", qmp=False, wait_for=[sock])
    out = []
    uri = f"nbd+unix:///r0?socket={sock}"
    for cmd in ("read 0 512", "read 0 512", "write 0 512", "write 512 512", "write 4096 512"):
        res = subprocess.run(["qemu-io", "-f", "raw", "-c", cmd, uri], capture_output=True, text=True,
                             timeout=60)
        # The first line says what happened; the second carries timings.
        out.append((res.returncode, res.stdout.splitlines()[0] if res.stdout else res.stderr))
    daemon.stop()
    return out


def test_injected_errors_reach_nbd_clients(qemu_sd: Any, qsd: Any, workdir: Path) -> None:
    (workdir / "disk.img").write_bytes(bytes(1 << 20))
    (workdir / "nbd.cfg").write_bytes(NBD_CONFIG)
    theirs = _qemu_io_through_export(qemu_sd, workdir, "q")
    time.sleep(0)
    ours = _qemu_io_through_export(qsd, workdir, "o")
    assert ours == theirs
    assert theirs[0] == (1, "read failed: Input/output error")
    assert theirs[3] == (1, "write failed: No space left on device")


def _random_config(rng: random.Random) -> bytes:
    """A config file that is mostly right, with the mistakes people make."""
    keys = ["event", "errno", "sector", "once", "immediately", "state", "iotype", "new_state", "bogus"]
    values = ["read_aio", "write_aio", "flush_to_disk", "nosuch", "5", "28", "0x1c", "010", "-1", "x", "on",
              "off", "yes", "maybe", "read", "write", "flush", "1", "2", ""]
    lines = []
    for _ in range(rng.randint(1, 4)):
        group = rng.choice(["inject-error", "set-state", "inject-error", "set-state", "bogus", ""])
        lines.append(rng.choice([f"[{group}]", f'[{group} "id{rng.randint(0, 2)}"]', f"[{group}", f" [{group}]"]))
        for _ in range(rng.randint(0, 4)):
            key, value = rng.choice(keys), rng.choice(values)
            lines.append(rng.choice([f'{key} = "{value}"', f'{key} = "{value}"', f'  {key}="{value}"',
                                     f"{key} = {value}", f'{key}  =  "{value}" trailing', "# c", "", "   ",
                                     f"\t{key} = \"{value}\""]))
    return "\n".join(lines).encode() + rng.choice([b"\n", b""])


def test_random_configs_same_as_qsd(qemu_sd: Any, qsd: Any, workdir: Path) -> None:
    """The parser and rule checks give QSD's answer on many near-miss files."""
    rng = random.Random(7)
    (workdir / "disk.img").write_bytes(bytes(1 << 20))
    names = []
    for i in range(80):
        name = f"r{i}.cfg"
        (workdir / name).write_bytes(_random_config(rng))
        names.append(name)
    image = {"driver": "file", "filename": "disk.img", "locking": "off"}
    replies = {}
    for tag, factory in (("q", qemu_sd), ("o", qsd)):
        daemon = factory()
        q = daemon.qmp()
        replies[tag] = [q.execute("blockdev-add", {"driver": "blkdebug", "node-name": f"n{i}", "config": name,
                                                   "image": image}) for i, name in enumerate(names)]
        daemon.stop()
    mismatches = [(names[i], (workdir / names[i]).read_bytes(), a, b)
                  for i, (a, b) in enumerate(zip(replies["q"], replies["o"])) if a != b]
    assert not mismatches


# Rules at work through an NBD export, with blkdebug exported directly (only
# the block layer's own events fire) or under a raw format (read_aio/write_aio
# too). Reads fail with EIO here: QSD drops the connection when a read fails,
# so its clients only ever see EIO for reads.
RUNTIME_CASES = {
    "pwritev": (b'[inject-error]\nevent = "pwritev"\niotype = "write"\nerrno = "28"\n', False,
                ["read 0 512", "write 0 512", "write -z 0 4k", "read 0 512", "write 4k 512"]),
    "states": (b'[set-state]\nevent = "write_aio"\nstate = "1"\nnew_state = "2"\n'
               b'[inject-error]\nevent = "read_aio"\nstate = "2"\nerrno = "5"\n', True,
               ["read 0 512", "write 0 512", "read 0 512", "read 0 512"]),
    "sector": (b'[inject-error]\nevent = "read_aio"\nsector = "9"\n', True,
               ["read 0 4k", "read 4k 4k", "read 0 4k", "read 4608 512"]),
    "zeroes": (b'[inject-error]\nevent = "pwritev_zero"\nerrno = "5"\niotype = "write-zeroes"\n', True,
               ["write -z 0 4k", "write 0 4k", "write -z 0 4k", "discard 0 4k"]),
    "flush": (b'[inject-error]\nevent = "flush_to_disk"\niotype = "flush"\nerrno = "5"\n', True,
              ["write 0 4k", "flush", "read 0 512;flush", "write 0 4k;flush"]),
    "discard": (b'[inject-error]\nevent = "write_aio"\niotype = "discard"\nerrno = "1"\n', True,
                ["discard 0 4k", "write 0 4k", "discard 0 4k", "write 0 4k"]),
    "immediately": (b'[inject-error]\nevent = "read_aio"\nimmediately = "on"\nonce = "on"\n', True,
                    ["read 0 512", "read 0 512"]),
    # align=4096: requests reach the rules padded to whole blocks.
    "align-sector": (b'[inject-error]\nevent = "write_aio"\nsector = "7"\nerrno = "28"\n', True,
                     ["write 0 512", "write 8k 512", "write -z 0 512", "write 4096 4096",
                      "write -z 1024 8192"]),
}


@pytest.mark.parametrize("case", sorted(RUNTIME_CASES))
def test_rules_at_work_same_as_qsd(qemu_sd: Any, qsd: Any, workdir: Path, case: str) -> None:
    config, under_raw, commands = RUNTIME_CASES[case]
    (workdir / "r.cfg").write_bytes(config)
    results = {}
    for tag, factory in (("q", qemu_sd), ("o", qsd)):
        (workdir / "disk.img").write_bytes(bytes(1 << 20))
        sock = workdir / f"{tag}-nbd.sock"
        top = "r0" if under_raw else "b0"
        raw = ["--blockdev", "driver=raw,node-name=r0,file=b0,discard=unmap"] if under_raw else []
        align = ",align=4096" if case.startswith("align") else ""
        daemon = factory("--blockdev", "driver=file,node-name=f0,filename=disk.img,locking=off,discard=unmap",
                         "--blockdev", f"driver=blkdebug,node-name=b0,config=r.cfg,image=f0,discard=unmap{align}",
                         *raw,
                         "--nbd-server", f"addr.type=unix,addr.path={sock}",
                         "--export", f"type=nbd,id=e0,node-name={top},writable=on", qmp=False, wait_for=[sock])
        out = []
        for cmd in commands:
            # Commands joined by ";" run in one qemu-io process, one connection.
            args = [arg for part in cmd.split(";") for arg in ("-c", part)]
            res = subprocess.run(["qemu-io", "-f", "raw", *args, f"nbd+unix:///{top}?socket={sock}"],
                                 capture_output=True, text=True, timeout=60)
            lines = [line for line in res.stdout.splitlines() if not line.startswith(("0", "1", "2", "3", "4",
                                                                                      "5", "6", "7", "8", "9"))]
            out.append((cmd, res.returncode, lines or [res.stderr.strip()]))
        daemon.stop()
        results[tag] = out
    assert results["o"] == results["q"]
    assert any(rc for _, rc, _ in results["q"])      # every case makes something fail


# The same under qcow2: its data reads and writes fire read_aio/write_aio on
# its file child as QEMU's qcow2 does (metadata I/O does not).
QCOW2_CASES = {
    "read": (b'[inject-error]\nevent = "read_aio"\nonce = "on"\n',
             ["write -P 7 0 4k", "read -P 7 0 4k", "read -P 7 0 4k", "read 64k 4k"]),
    "write": (b'[inject-error]\nevent = "write_aio"\nerrno = "28"\nonce = "on"\n',
              ["read 0 4k", "write -P 9 0 4k", "write -P 9 0 4k", "read -P 9 0 4k"]),
    "overwrite": (b'[set-state]\nevent = "write_aio"\nstate = "1"\nnew_state = "2"\n'
                  b'[inject-error]\nevent = "write_aio"\nstate = "2"\nerrno = "5"\n',
                  ["write -P 1 0 64k", "write -P 2 0 4k", "read -P 1 0 64k"]),
}


@pytest.mark.parametrize("case", sorted(QCOW2_CASES))
def test_rules_under_qcow2_same_as_qsd(qemu_sd: Any, qsd: Any, workdir: Path, case: str) -> None:
    config, commands = QCOW2_CASES[case]
    (workdir / "r.cfg").write_bytes(config)
    results = {}
    for tag, factory in (("q", qemu_sd), ("o", qsd)):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(workdir / "disk.qcow2"), "1M"],
                       check=True)
        sock = workdir / f"{tag}-nbd.sock"
        daemon = factory("--blockdev", "driver=file,node-name=f0,filename=disk.qcow2,locking=off",
                         "--blockdev", "driver=blkdebug,node-name=b0,config=r.cfg,image=f0",
                         "--blockdev", "driver=qcow2,node-name=q0,file=b0",
                         "--nbd-server", f"addr.type=unix,addr.path={sock}",
                         "--export", "type=nbd,id=e0,node-name=q0,writable=on", qmp=False, wait_for=[sock])
        out = []
        for cmd in commands:
            res = subprocess.run(["qemu-io", "-f", "raw", "-c", cmd, f"nbd+unix:///q0?socket={sock}"],
                                 capture_output=True, text=True, timeout=60)
            lines = [line for line in res.stdout.splitlines() if not line[:1].isdigit()]
            out.append((cmd, res.returncode, lines or [res.stderr.strip()]))
        daemon.stop()
        results[tag] = out
    assert results["o"] == results["q"]
    assert any(rc for _, rc, _ in results["q"])
