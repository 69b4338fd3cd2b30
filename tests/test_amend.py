# SPDX-License-Identifier: GPL-2.0-or-later
"""x-blockdev-amend: the same sessions (LUKS key slots of qcow2 and luks
nodes, every refusal) against the real QSD and qsd give the same replies,
job errors and JOB_STATUS_CHANGE sequences, and the images they leave open
with the same passphrases in qemu-io."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")

SECRETS = {"s0": "alpha", "s1": "bravo", "s2": "charlie"}
#: sha512 because QEMU's PBKDF2 calibration of sha1/sha256 fails on this loaded host.
LUKS = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,encrypt.hash-alg=sha512"


def make(path: Path, fmt: str) -> None:
    opts = LUKS if fmt == "qcow2" else LUKS.replace("encrypt.", "").replace("format=luks,", "")
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, "--object", "secret,id=s0,data=alpha",
                    "-o", opts, str(path), "4M"], check=True, capture_output=True)


def opens_with(path: Path, fmt: str, secret: str) -> bool:
    key = "encrypt.key-secret" if fmt == "qcow2" else "key-secret"
    r = subprocess.run(["qemu-io", "--object", f"secret,id=k,data={SECRETS[secret]}",
                        "--image-opts", f"driver={fmt},file.filename={path},{key}=k",
                        "-c", "read 0 4k"], capture_output=True, text=True, check=False)
    return r.returncode == 0 and "read 4096/4096" in r.stdout


def add(**kw: Any) -> dict[str, Any]:
    return {"state": "active", "iter-time": 10, **kw}


def erase(**kw: Any) -> dict[str, Any]:
    return {"state": "inactive", **kw}


def amend_steps(fmt: str) -> list[tuple[str, dict[str, Any]]]:
    def opts(o: dict[str, Any]) -> dict[str, Any]:
        return {"driver": "qcow2", "encrypt": {"format": "luks", **o}} if fmt == "qcow2" \
            else {"driver": "luks", **o}
    cases = [
        add(**{"new-secret": "s1"}),                          # slot 1
        add(**{"new-secret": "s2", "keyslot": 0}),            # refused: active
        add(),                                                # no new-secret
        add(**{"new-secret": "s2", "old-secret": "s0"}),
        add(**{"new-secret": "s2", "keyslot": 8}),
        add(**{"new-secret": "s2", "keyslot": -1}),
        add(**{"new-secret": "s2", "secret": "s2"}),          # wrong unlocking secret
        add(**{"new-secret": "nope"}),
        add(**{"new-secret": "s2", "keyslot": 5, "secret": "s1"}),
        erase(**{"new-secret": "s1"}),
        erase(**{"iter-time": 5}),
        erase(secret="s0"),
        erase(),
        erase(keyslot=3),                                     # already inactive
        erase(keyslot=9),
        erase(**{"keyslot": 1, "old-secret": "s0"}),          # slot 1 holds s1
        erase(**{"old-secret": "s0"}),                        # slot 0
        erase(**{"old-secret": "s0"}),                        # none left
        erase(keyslot=5),
        erase(**{"old-secret": "s1"}),                        # the only one left
    ]
    steps: list[tuple[str, dict[str, Any]]] = []
    for i, o in enumerate(cases):
        steps.append(("x-blockdev-amend", {"job-id": f"j{i}", "node-name": "n",
                                           "options": opts(o)}))
    steps += [
        ("x-blockdev-amend", {"job-id": "k", "node-name": "n", "force": True,
                              "options": opts(erase(keyslot=3))}),
        ("x-blockdev-amend", {"job-id": "w", "node-name": "n",
                              "options": {"driver": "luks" if fmt == "qcow2" else "qcow2",
                                          "state": "active"} if fmt == "qcow2" else
                              {"driver": "qcow2"}}),
        ("x-blockdev-amend", {"job-id": "x", "node-name": "nope", "options": opts(erase())}),
        ("x-blockdev-amend", {"job-id": "j0", "node-name": "n", "options": opts(erase())}),
        ("x-blockdev-amend", {"job-id": "#bad", "node-name": "n", "options": opts(erase())}),
    ]
    return steps


def session(factory: Any, path: Path, fmt: str) -> list[Any]:
    key = "encrypt.key-secret" if fmt == "qcow2" else "key-secret"
    objs = []
    for sid, data in SECRETS.items():
        objs += ["--object", f"secret,id={sid},data={data}"]
    fmtopt = "encrypt.format=luks," if fmt == "qcow2" else ""
    d = factory(*objs, "--blockdev", f"driver={fmt},node-name=n,{fmtopt}{key}=s0,file.driver=file,"
                f"file.filename={path}")
    log: list[Any] = []
    with d.qmp() as q:
        for cmd, args in amend_steps(fmt):
            r = q.execute(cmd, args)
            log.append(r.get("return", r.get("error")))
            if "return" not in r:
                continue
            while True:
                ev = q.wait_event("JOB_STATUS_CHANGE", timeout=60)
                log.append(ev["data"])
                if ev["data"]["status"] == "concluded":
                    break
            jobs = q.cmd("query-jobs")
            log.append([{k: v for k, v in j.items()} for j in jobs])
            log.append(q.execute("job-dismiss", {"id": args["job-id"]}))
            log.append(q.wait_event("JOB_STATUS_CHANGE")["data"])
        q.execute("quit")
    d.wait()
    return log


@pytest.mark.parametrize("fmt", ["qcow2", "luks"])
def test_amend_differential(qemu_sd: Any, qsd: Any, workdir: Path, fmt: str) -> None:
    a, b = workdir / "qemu.img", workdir / "qsd.img"
    make(a, fmt)
    shutil.copy(a, b)
    want = session(qemu_sd, a, fmt)
    got = session(qsd, b, fmt)
    for i, (w, g) in enumerate(zip(want, got)):
        assert g == w, f"step {i}"
    assert len(got) == len(want)
    for path in (a, b):
        assert [opens_with(path, fmt, s) for s in SECRETS] == [False, True, False], path
