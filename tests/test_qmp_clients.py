# SPDX-License-Identifier: GPL-2.0-or-later
"""Real QMP clients unchanged against both daemons: qemu.qmp's async
QMPClient, its legacy synchronous client, and qmp-shell. Plus hostile QMP
input: the daemon answers or closes that connection and keeps serving."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import time

import pytest
from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol


def test_async_qmpclient_session(storage_daemon, workdir) -> None:
    d = storage_daemon()

    async def session() -> list:
        client = QMPClient("test")
        await client.connect(str(d.qmp_path))
        seen = []
        with client.listener() as listener:
            version = await client.execute("query-version")
            assert version["qemu"]["major"] == 7 and version["qemu"]["minor"] == 2
            await client.execute("blockdev-add", {"driver": "null-co", "node-name": "n0",
                                                  "size": 1 << 20})
            with pytest.raises(ExecuteError) as exc:
                await client.execute("blockdev-del", {"node-name": "nope"})
            seen.append(str(exc.value))
            await client.execute("nbd-server-start", {
                "addr": {"type": "unix", "data": {"path": str(workdir / f"{d.name}-nbd.sock")}}})
            await client.execute("block-export-add", {"type": "nbd", "id": "e0",
                                                      "node-name": "n0"})
            seen.append(await client.execute("query-block-exports"))
            await client.execute("block-export-del", {"id": "e0"})
            event = await asyncio.wait_for(listener.get(), 10)
            seen.append((event["event"], event["data"]))
            nodes = await client.execute("query-named-block-nodes", {"flat": True})
            seen.append([(n["node-name"], n["drv"], n["image"]["virtual-size"]) for n in nodes])
        await client.execute("quit")
        try:
            await client.disconnect()
        except EOFError:  # the daemon closed first, as QSD does after quit
            pass
        return seen

    seen = asyncio.run(session())
    assert seen == [
        "Failed to find node with node-name='nope'",
        [{"id": "e0", "type": "nbd", "node-name": "n0", "shutting-down": False}],
        ("BLOCK_EXPORT_DELETED", {"id": "e0"}),
        [("n0", "null-co", 1 << 20)],
    ]
    assert d.wait() == 0


def test_legacy_sync_client(storage_daemon) -> None:
    d = storage_daemon()
    qmp = QEMUMonitorProtocol(str(d.qmp_path))
    qmp.connect(negotiate=True)
    assert qmp.cmd_raw("query-block") == {"return": []}
    reply = qmp.cmd_raw("blockdev-add", {"driver": "nosuch", "node-name": "x"})
    assert reply["error"] == {"class": "GenericError",
                              "desc": "Parameter 'driver' does not accept value 'nosuch'"}
    qmp.close()


def _qmp_shell(sock: str, lines: str) -> str:
    exe = shutil.which("qmp-shell")
    if exe is None:
        pytest.skip("qmp-shell (from the qemu.qmp package) is not installed")
    res = subprocess.run([exe, sock], input=lines, capture_output=True, text=True, timeout=30)
    out = res.stdout + res.stderr
    return re.sub(r'"package": "[^"]*"|"micro": \d+|QEMU \d+\.\d+\.\d+', "X", out)


def test_qmp_shell_output_matches(qemu_sd, qsd) -> None:
    lines = ("query-version\n"
             "blockdev-add driver=null-co node-name=n0 size=4096\n"
             "blockdev-add driver=null-co node-name=n0\n"
             "query-named-block-nodes flat=true\n"
             "blockdev-del node-name=n0\n")
    theirs = _qmp_shell(str(qemu_sd().qmp_path), lines)
    ours = _qmp_shell(str(qsd().qmp_path), lines)
    assert "Duplicate nodes with node-name='n0'" in ours
    assert ours == theirs


def _served(path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.recv(4096)
        s.sendall(b'{"execute":"qmp_capabilities"}{"execute":"query-block","id":1}')
        buf = b""
        while b'"id": 1' not in buf:
            chunk = s.recv(4096)
            if not chunk:
                return False
            buf += chunk
        return b'{"return": [], "id": 1}' in buf


@pytest.mark.parametrize("garbage", [
    b"\xff\xfe\x00garbage}}]]\n" * 100,
    b"[" * 5000 + b"\n",
    b'{"execute": "' + b"a" * (2 << 20) + b'"}\n',
    b'{"execute": "blockdev-add", "arguments": ' + b'{"x": ' * 2000 + b"1" + b"}" * 2001 + b"\n",
    b'"' + b"x" * (80 << 20),
], ids=["binary", "deep-array", "long-name", "deep-args", "80MiB-string"])
def test_hostile_input_leaves_daemon_serving(qsd, garbage: bytes) -> None:
    d = qsd()
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(d.qmp_path))
        s.recv(4096)
        try:
            s.sendall(garbage)
            s.settimeout(2)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and s.recv(1 << 20):
                pass
        except (TimeoutError, ConnectionError, OSError):
            pass
    assert d.alive()
    assert _served(d.qmp_path)
