# SPDX-License-Identifier: GPL-2.0-or-later
"""The same scripted QMP sessions against the real qemu-storage-daemon and
qsd, compared byte for byte after normalisation (see tests/qmpdiff.py).

The sessions follow the recorded transcripts a, a2, a3, n, g, i and m in
../shared/reference/qsd-7.2/transcripts, restricted to what this daemon
implements (raw/file/null nodes instead of qcow2); the job sessions follow b
and m with file images and probes of QSD 7.2.
"""

from __future__ import annotations

import difflib

import pytest

from qmpdiff import Close, Connect, Partial, Shell, Switch, Wait, have_qsd, run_session

pytestmark = pytest.mark.skipif(not have_qsd(), reason="qemu-storage-daemon not installed")

CAPS = '{"execute": "qmp_capabilities"}\n'

SESSIONS: dict[str, tuple[str | None, list]] = {
    "handshake-and-errors": (None, [
        '{"execute": "query-version", "id": "pre-1"}\n',
        '{"execute": "query-block"}\n',
        '{"execute": "no-such-command", "id": "pre-2"}\n',
        '{"execute": "qmp_capabilities", "arguments": {"enable": ["bogus"]}, "id": "cap-bad"}\n',
        '{"execute": "qmp_capabilities", "arguments": {"bogus": 1}, "id": "cap-bad2"}\n',
        '{"execute": "qmp_capabilities", "id": {"any": ["json", 1]}}\n',
        '{"execute": "qmp_capabilities", "id": 2}\n',
        '{"execute": "query-version"}\n',
        '{"execute": "no-such-command", "id": 3}\n',
        Partial('{"execute": "query-version", "id": 4\n'), '}\n',
        '{"execute": query-version}\n',
        '[1, 2]\n', '"hello"\n', '{"id": 5}\n',
        '{"execute": 42, "id": 6}\n',
        '{"execute": "query-version", "arguments": [], "id": 7}\n',
        '{"execute": "query-version", "id": 8, "foo": 1}\n',
        '{"execute": "query-version", "exec-oob": "query-version", "id": 9}\n',
        '{"exec-oob": "query-version", "id": 10}\n',
        '{"execute": "query-named-block-nodes", "arguments": {"flat": "yes"}, "id": 12}\n',
        '{"execute": "blockdev-del", "arguments": {"node-name": true}, "id": 13}\n',
        '{"execute": "blockdev-add", "arguments": {"driver": "nosuchdriver", "node-name": "n"}, "id": 14}\n',
        '{"execute": "blockdev-del", "arguments": {}, "id": 15}\n',
        '{"execute": "blockdev-del", "id": 16}\n',
        '{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "f0"}, "id": 17}\n',
        '{"execute": "query-version", "arguments": {"bogus": 1}, "id": 18}\n',
        '{"execute": "blockdev-del", "arguments": {"node-name": "x", "extra": 1}, "id": 19}\n',
        '{"execute": "query-block-exports", "arguments": {}, "id": 20}\n',
        '{"execute":"query-block","id":21}{"execute":"query-block-exports","id":22}',
        Partial('{"execute":"query-bl'), 'ock","id":23}',
        '{"execute": "blockdev-del", "arguments": {"node-name": "nope"}, "id": 24}\n',
        '{"execute": "object-del", "arguments": {"id": "nope"}, "id": 30}\n',
        '{"execute": "block-export-del", "arguments": {"id": "nope"}, "id": 31}\n',
        '{"execute": "nbd-server-stop", "id": 32}\n',
        '{"execute": "query-block", "id": 33}\n',
    ]),
    "oob": (None, [
        '{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": "c"}\n',
        '{"exec-oob": "query-version"}\n',
        '{"exec-oob": "query-version", "id": "o1"}\n',
        '{"exec-oob": "no-such-command", "id": "o2"}\n',
        '{"execute": "query-version", "id": "ib1"}\n',
        '{"execute": "query-version"}\n',
        Close(), Connect(),
        '{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}',
        '{"execute":"query-version","id":"__qmp#00000"}',
        '{"execute":"blockdev-del","arguments":{"node-name":"nope"},"id":"__qmp#00001"}',
    ]),
    "parser-edge-cases": (None, [
        CAPS,
        "{'execute': 'query-version', 'id': 'sq'}\n",
        '{"execute": "query-version" "id": 5}\n',
        '}\n',
        '{"execute": "query-block", "id": 6}}\n',
        Partial('   \n'),
        Partial('{"execute":\n'), Partial('  "query-block",\n'), '  "id": 7}\n',
        '{"execute": "query-named-block-nodes", "arguments": {"flat": null}, "id": 8}\n',
        '{"execute": "query-block", "id": "\\u00e9t\\u00e9"}\n',
        '{"execute": "query-block", "id": "a\\qb"}\n',
        '{"execute": "query-block", "id": "abc\n', '"}\n',
        'null\n',
        '{"execute": "query-version", "id": 12}\n',
        '{"execute":"query-block","id":{"a":[1,2.5,-3,true,null,"x"],"b":1e3}}',
        '{"execute":"query-block","id":18446744073709551615}',
        '{"execute":"query-block","id":-9223372036854775808}',
        '{"execute":"query-block","id":0.1}',
        '{"execute":"query-block","id":1.5e300}',
        '{"execute":"query-block","id":-0.0}',
        '{"execute":"query-block","id":100000000000000000000}',
        '{"execute":"query-block","id":1e-7}',
        '{"execute":"query-block","id":3.0}',
        '{"execute":"query-block","id":"a/b\\"c\\\\d\\te\\u0001\\u007f\\u00e9\\u20ac\\ud83d\\ude00 raw: '
        + 'é€"}\n',
        '{"execute":"query-block","id":{"zeta":1,"alpha":2,"id":3,"return":4,"m":{"q":[]}}}\n',
    ]),
    "nodes": ("truncate -s 1M f.img && truncate -s 1000 odd.img", [
        CAPS,
        '{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "f", "filename": "f.img"}, "id": 1}\n',
        '{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r", "file": "f"}, "id": 2}\n',
        '{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n"}, "id": 3}\n',
        '{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r2", "file": {"driver": "file", "filename": "odd.img"}}, "id": 4}\n',
        '{"execute": "query-named-block-nodes", "id": 5}\n',
        '{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "f", "filename": "f.img"}, "id": 6}\n',
        '{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "1bad name", "filename": "f.img"}, "id": 7}\n',
        '{"execute": "blockdev-add", "arguments": {"driver": "file", "filename": "f.img"}, "id": 8}\n',
        '{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "nf", "filename": "does-not-exist.img"}, "id": 9}\n',
        '{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "q2", "file": "no-such-node"}, "id": 10}\n',
        '{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "x", "filename": "f.img", "no-such-opt": 1}, "id": 11}\n',
        '{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "abcdefghijabcdefghijabcdefghij12", "filename": "f.img"}, "id": 12}\n',
        '{"execute": "blockdev-del", "arguments": {"node-name": "f"}, "id": 13}\n',
        '{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "ro", "read-only": true, "file": {"driver": "file", "filename": "f.img", "node-name": "rof", "read-only": true}}, "id": 14}\n',
        '{"execute": "blockdev-del", "arguments": {"node-name": "rof"}, "id": 15}\n',
        '{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "ro2", "read-only": true, "cache": {"direct": false, "no-flush": true}, "file": {"driver": "file", "filename": "odd.img"}}, "id": 151}\n',
        '{"execute": "query-named-block-nodes", "arguments": {"flat": true}, "id": 16}\n',
        '{"execute": "blockdev-del", "arguments": {"node-name": "r"}, "id": 17}\n',
        '{"execute": "blockdev-del", "arguments": {"node-name": "f"}, "id": 18}\n',
        '{"execute": "blockdev-del", "arguments": {"node-name": "ro"}, "id": 19}\n',
        '{"execute": "blockdev-del", "arguments": {"node-name": "r2"}, "id": 20}\n',
        '{"execute": "blockdev-del", "arguments": {"node-name": "n"}, "id": 21}\n',
        '{"execute": "blockdev-del", "arguments": {"node-name": "ro2"}, "id": 211}\n',
        '{"execute": "query-named-block-nodes", "arguments": {"flat": true}, "id": 22}\n',
    ]),
    "objects": (None, [
        CAPS,
        '{"execute": "object-add", "arguments": {"qom-type": "secret", "id": "s0", "data": "x"}, "id": 1}\n',
        '{"execute": "object-add", "arguments": {"qom-type": "secret", "id": "s0", "data": "x"}, "id": 2}\n',
        '{"execute": "object-add", "arguments": {"qom-type": "secret", "id": "1s", "data": "x"}, "id": 3}\n',
        '{"execute": "object-add", "arguments": {"qom-type": "secret", "id": "s1"}, "id": 4}\n',
        '{"execute": "object-add", "arguments": {"qom-type": "secret", "id": "s2", "data": "!!", "format": "base64"}, "id": 5}\n',
        '{"execute": "object-add", "arguments": {"qom-type": "secret", "id": "s3", "data": "x", "keyid": "nokey"}, "id": 6}\n',
        '{"execute": "object-add", "arguments": {"qom-type": "secret", "id": "s4", "data": "x", "keyid": "s0"}, "id": 7}\n',
        '{"execute": "object-add", "arguments": {"qom-type": "secret", "id": "s5", "data": "x", "file": "f"}, "id": 8}\n',
        '{"execute": "object-add", "arguments": {"qom-type": "iothread", "id": "io0", "poll-max-ns": -1}, "id": 9}\n',
        '{"execute": "object-add", "arguments": {"qom-type": "iothread", "id": "io1"}, "id": 10}\n',
        '{"execute": "object-add", "arguments": {"qom-type": "nosuch", "id": "x"}, "id": 11}\n',
        '{"execute": "object-del", "arguments": {"id": "io1"}, "id": 12}\n',
        '{"execute": "object-del", "arguments": {"id": "s0"}, "id": 13}\n',
        '{"execute": "object-del", "arguments": {"id": "s0"}, "id": 14}\n',
    ]),
    "exports": ("truncate -s 64M disk.img && truncate -s 32M disk2.img"
                " && qemu-io -f raw -c 'write -P 0x5a 0 1M' disk.img >/dev/null", [
        CAPS,
        '{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "disk", "file": {"driver": "file", "filename": "disk.img"}}, "id": 1}\n',
        '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "disk"}, "id": 3}\n',
        '{"execute": "nbd-server-start", "arguments": {"addr": {"type": "inet", "host": "127.0.0.1", "port": "10899"}}, "id": 4}\n',
        '{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": 5}}}, "id": 5}\n',
        '{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "nbd.sock"}}, "max-connections": 4}, "id": 6}\n',
        '{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "nbd2.sock"}}}, "id": 7}\n',
        '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "exp-ro", "node-name": "disk", "name": "ro", "description": "read-only view"}, "id": 82}\n',
        '{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "disk2", "file": {"driver": "file", "filename": "disk2.img"}}, "id": 10}\n',
        '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "exp-rw", "node-name": "disk2", "writable": true}, "id": 11}\n',
        '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "exp-rw", "node-name": "disk2"}, "id": 12}\n',
        '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "exp-x", "node-name": "disk2", "name": "ro"}, "id": 13}\n',
        '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "exp-y", "node-name": "nope"}, "id": 14}\n',
        '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "exp-z", "node-name": "disk", "bitmaps": ["nope"]}, "id": 15}\n',
        '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "1bad", "node-name": "disk"}, "id": 151}\n',
        '{"execute": "query-block-exports", "id": 16}\n',
        Shell("qemu-img info --output=json 'nbd+unix:///ro?socket=nbd.sock'"),
        Shell("qemu-io -f raw -c 'write -P 0x11 0 64k' 'nbd+unix:///ro?socket=nbd.sock'"),
        Shell("qemu-io -f raw -c 'write -P 0x11 0 64k' -c 'read -P 0x11 0 64k'"
              " 'nbd+unix:///disk2?socket=nbd.sock' | grep -v ops"),
        Shell("qemu-io -f raw -c 'read -P 0x5a 0 1M' -c 'read -P 0 1M 1M'"
              " 'nbd+unix:///ro?socket=nbd.sock' | grep -v ops"),
        Shell("nbdinfo 'nbd+unix:///nosuch?socket=nbd.sock'"),
        '{"execute": "blockdev-del", "arguments": {"node-name": "disk2"}, "id": 161}\n',
        '{"execute": "block-export-del", "arguments": {"id": "exp-rw", "mode": "hard"}, "id": 19}\n',
        '{"execute": "block-export-del", "arguments": {"id": "exp-ro"}, "id": 20}\n',
        '{"execute": "query-block-exports", "id": 21}\n',
        '{"execute": "nbd-server-add", "arguments": {"device": "disk", "name": "legacy", "writable": false}, "id": 22}\n',
        '{"execute": "query-block-exports", "id": 23}\n',
        '{"execute": "nbd-server-remove", "arguments": {"name": "legacy"}, "id": 24}\n',
        '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "exp-last", "node-name": "disk"}, "id": 25}\n',
        '{"execute": "nbd-server-stop", "id": 26}\n',
        '{"execute": "query-block-exports", "id": 27}\n',
        '{"execute": "nbd-server-stop", "id": 28}\n',
        '{"execute": "blockdev-del", "arguments": {"node-name": "disk2"}, "id": 29}\n',
        '{"execute": "blockdev-del", "arguments": {"node-name": "disk"}, "id": 30}\n',
    ]),
    "quit": ("truncate -s 16M q.img", [
        CAPS,
        '{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "q", "file": {"driver": "file", "filename": "q.img"}}, "id": 1}\n',
        '{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}, "id": 2}\n',
        '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e", "node-name": "q"}, "id": 3}\n',
        '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e2", "node-name": "q", "name": "two"}, "id": 31}\n',
        '{"execute": "quit", "arguments": {"now": true}, "id": 4}\n',
        '{"execute": "quit", "id": 5}\n',
        Wait(),
        Shell("ls qmp.sock nbd.sock 2>&1"),
    ]),
    "two-monitors": (None, [
        CAPS,
        Connect("qmp.sock", greeting=False),
        Connect("qmp2.sock"),
        Switch(0),
        '{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n0"}, "id": 1}\n',
        '{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}, "id": 2}\n',
        '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e", "node-name": "n0"}, "id": 3}\n',
        '{"execute": "block-export-del", "arguments": {"id": "e"}, "id": 4}\n',
        Switch(2),
        CAPS,
        Switch(0),
        '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e", "node-name": "n0"}, "id": 5}\n',
        Switch(2),
        '{"execute": "block-export-del", "arguments": {"id": "e"}, "id": "b1"}\n',
        Switch(0),
        Close(),
        Switch(1),
        CAPS,
        '{"execute": "query-block-exports", "id": 6}\n',
    ]),
}

def _create(job_id: str, options: str, req_id: int) -> str:
    return ('{"execute": "blockdev-create", "arguments": {"job-id": "%s", "options": %s}, "id": %d}\n'
            % (job_id, options, req_id))


def _job(verb: str, job_id: str, req_id: int, key: str = "id") -> str:
    return '{"execute": "%s", "arguments": {"%s": "%s"}, "id": %d}\n' % (verb, key, job_id, req_id)


QUERY_JOBS = '{"execute": "query-jobs"}\n'

# blockdev-create of file images (transcript b, probes of QSD 7.2): the job's
# events around the reply, query-jobs, job-dismiss, failures before and after
# the reply, what happens to an existing file, and the lock check.
JOB_SESSIONS: dict[str, tuple[str | None, list]] = {
    "blockdev-create-file": ("printf 'hello world' > old.img && mkdir dir && truncate -s 2M locked.img", [
        CAPS,
        '{"execute": "x-blockdev-create", "arguments": {"job-id": "j", "options": {"driver": "file", "filename": "x", "size": 0}}, "id": 1}\n',
        _create("create-file", '{"driver": "file", "filename": "disk.img", "size": 0}', 2),
        QUERY_JOBS,
        _job("job-dismiss", "create-file", 3),
        _job("job-dismiss", "create-file", 4),
        _create("old", '{"driver": "file", "filename": "old.img", "size": 1000}', 5),
        _job("job-dismiss", "old", 6),
        Shell("stat -c '%n %s %a' disk.img old.img && od -An -c old.img | head -2"),
        _create("j1", '{"driver": "file", "filename": "j1.img", "size": 65536, "preallocation": "falloc"}', 7),
        _create("j2", '{"driver": "file", "filename": "j2.img", "size": 70000, "preallocation": "full"}', 8),
        _create("j1", '{"driver": "file", "filename": "j3.img", "size": 0}', 9),
        _create("j3", '{"driver": "file", "filename": "j3.img", "size": 1048576, "nocow": true, "extent-size-hint": 0}', 10),
        _create("j4", '{"driver": "file", "filename": "j4.img", "size": 4096, "extent-size-hint": 4294967295}', 11),
        QUERY_JOBS,
        '{"execute": "query-block-jobs"}\n',
        _job("job-dismiss", "j2", 12), _job("job-dismiss", "j1", 13),
        _job("job-dismiss", "j3", 14), _job("job-dismiss", "j4", 15),
        Shell("stat -c '%n %s %b' j1.img j2.img j3.img j4.img; ls j3.img"),
        # refused before any job exists
        _create("", '{"driver": "file", "filename": "x.img", "size": 0}', 20),
        _create("1x", '{"driver": "file", "filename": "x.img", "size": 0}', 21),
        _create("x@y", '{"driver": "file", "filename": "x.img", "size": 0}', 22),
        _create("a b", '{"driver": "raw"}', 23),
        _create("r", '{"driver": "raw"}', 24),
        _create("r", '{"driver": "null-co"}', 25),
        _create("r", '{"driver": "host_device"}', 26),
        _create("r", '{"driver": "raw", "size": 1}', 27),
        _create("r", '{"driver": "nosuch"}', 28),
        _create("r", '{"driver": "file", "size": 0}', 29),
        _create("r", '{"driver": "file", "filename": "x.img", "size": "1"}', 30),
        _create("r", '{"driver": "file", "filename": "x.img", "size": 0, "preallocation": "bogus"}', 31),
        '{"execute": "blockdev-create", "arguments": {"options": {"driver": "file", "filename": "x.img", "size": 0}}, "id": 32}\n',
        '{"execute": "blockdev-create", "arguments": {"job-id": "r"}, "id": 33}\n',
        Shell("ls x.img 2>&1 | sed 's/.*: //'"),
        # failures: before the reply (open) and after it (truncate)
        _create("f1", '{"driver": "file", "filename": "nodir/x.img", "size": 0}', 40),
        _create("f2", '{"driver": "file", "filename": "dir", "size": 0}', 41),
        _create("f3", '{"driver": "file", "filename": "", "size": 0}', 42),
        _create("f4", '{"driver": "file", "filename": "meta.img", "size": 1048576, "preallocation": "metadata"}', 43),
        _create("f5", '{"driver": "file", "filename": "neg.img", "size": -1}', 44),
        _create("f6", '{"driver": "file", "filename": "big.img", "size": 9223372036854775807}', 45),
        _create("f7", '{"driver": "file", "filename": "hint.img", "size": 0, "extent-size-hint": 4294967296}', 46),
        _create("f8", '{"driver": "file", "filename": "negfull.img", "size": -1, "preallocation": "full"}', 47),
        QUERY_JOBS,
        *[_job("job-dismiss", f"f{i}", 50 + i) for i in range(1, 9)],
        Shell("stat -c '%n %s' meta.img neg.img big.img; ls hint.img 2>&1 | sed 's/.*: //'"),
        # the file is in use by a node with a writable export: lock error, file untouched
        '{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": "locked.img"}}, "id": 60}\n',
        '{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}, "id": 61}\n',
        '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e", "node-name": "r", "writable": true}, "id": 62}\n',
        _create("l1", '{"driver": "file", "filename": "locked.img", "size": 1048576}', 63),
        QUERY_JOBS,
        _job("job-dismiss", "l1", 64),
        Shell("stat -c '%n %s' locked.img"),
        '{"execute": "block-export-del", "arguments": {"id": "e"}, "id": 65}\n',
        '{"execute": "blockdev-del", "arguments": {"node-name": "r"}, "id": 66}\n',
        _create("l2", '{"driver": "file", "filename": "locked.img", "size": 1048576}', 67),
        _job("job-dismiss", "l2", 68),
        Shell("stat -c '%n %s' locked.img"),
    ]),
    # every verb on a create job, in concluded state and gone
    "create-job-verbs": (None, [
        CAPS,
        _create("c", '{"driver": "file", "filename": "c.img", "size": 0}', 1),
        _job("job-pause", "c", 2), _job("job-resume", "c", 3), _job("job-cancel", "c", 4),
        _job("job-complete", "c", 5), _job("job-finalize", "c", 6),
        _job("block-job-pause", "c", 7, "device"), _job("block-job-resume", "c", 8, "device"),
        _job("block-job-cancel", "c", 9, "device"), _job("block-job-complete", "c", 10, "device"),
        _job("block-job-dismiss", "c", 11), _job("block-job-finalize", "c", 12),
        '{"execute": "block-job-set-speed", "arguments": {"device": "c", "speed": 1}, "id": 13}\n',
        '{"execute": "block-job-cancel", "arguments": {"device": "c", "force": true}, "id": 14}\n',
        '{"execute": "query-block-jobs", "id": 15}\n',
        _job("job-dismiss", "c", 16),
        *[_job(verb, "c", 20 + i) for i, verb in enumerate(
            ["job-pause", "job-resume", "job-cancel", "job-complete", "job-finalize", "job-dismiss"])],
        '{"execute": "block-job-set-speed", "arguments": {"device": "nope", "speed": -1}, "id": 30}\n',
        '{"execute": "block-job-cancel", "arguments": {"device": "nope", "force": false}, "id": 31}\n',
        '{"execute": "job-pause", "arguments": {"id": ""}, "id": 32}\n',
        '{"execute": "job-pause", "arguments": {}, "id": 33}\n',
        '{"execute": "block-job-set-speed", "arguments": {"device": "nope"}, "id": 34}\n',
        '{"execute": "query-jobs", "id": 35}\n',
    ]),
    # quit dismisses concluded create jobs (null) before its reply
    "quit-with-jobs": (None, [
        CAPS,
        _create("q1", '{"driver": "file", "filename": "q1.img", "size": 0}', 1),
        _create("q2", '{"driver": "file", "filename": "nodir/q2.img", "size": 0}', 2),
        '{"execute": "quit", "id": 3}\n',
        Wait(),
    ]),
    # transcript m: a job started on one monitor, seen and dismissed on the other
    "two-monitors-jobs": (None, [
        CAPS,
        Connect("qmp2.sock"),
        CAPS,
        Switch(0),
        _create("j1", '{"driver": "file", "filename": "tm1.img", "size": 0}', 1),
        Switch(1),
        _job("job-dismiss", "j1", 2),
        QUERY_JOBS,
    ]),
}
SESSIONS.update(JOB_SESSIONS)


def _exe(command: str, args: str, req_id: int) -> str:
    return f'{{"execute": "{command}", "arguments": {args}, "id": {req_id}}}\n'


def _qcow2(name: str, path: str, extra: str = "") -> str:
    return _exe("blockdev-add", f'{{"driver": "qcow2", "node-name": "{name}", "file": '
                f'{{"driver": "file", "filename": "{path}"}}{extra}}}', 1)


SNAP = "blockdev-snapshot-internal-sync"
SNAP_DEL = "blockdev-snapshot-delete-internal-sync"
#: ID and TAG columns of qemu-img's listing (the times vary).
SNAP_LIST = "qemu-img snapshot -U -l {} | awk 'NR > 2 {{print $1, $2}}'"

# Internal snapshots: transcript j plus probes of the error paths, snapshots
# taken by qemu-img beside ours, images checked and listed by qemu-img.
SESSIONS["internal-snapshots"] = (
    "qemu-img create -q -f qcow2 a.qcow2 1M && qemu-img create -q -f qcow2 ro.qcow2 1M"
    " && qemu-img create -q -f qcow2 pre.qcow2 1M && qemu-io -c 'write -P 7 0 64k' pre.qcow2 >/dev/null"
    " && qemu-img snapshot -c old pre.qcow2 && truncate -s 1M r.img"
    " && qemu-img create -q -f qcow2 b.qcow2 1M && qemu-img create -q -f qcow2 -o data_file=d.data d.qcow2 1M"
    " && qemu-img create -q -f qcow2 ros.qcow2 1M && qemu-img snapshot -c s ros.qcow2", [
        CAPS,
        _qcow2("q", "a.qcow2"), _qcow2("ro", "ro.qcow2", ', "read-only": true'),
        _qcow2("p", "pre.qcow2"),
        _exe("blockdev-add", '{"driver": "file", "node-name": "rf", "filename": "r.img"}', 2),
        _exe("blockdev-add", '{"driver": "raw", "node-name": "r", "file": "rf"}', 3),
        _exe(SNAP, '{"device": "q", "name": "s1"}', 10),
        _exe(SNAP, '{"device": "q", "name": "s1"}', 11),
        _exe(SNAP, '{"device": "q", "name": ""}', 12),
        _exe(SNAP, '{"device": "nosuch", "name": "s"}', 13),
        _exe(SNAP, '{"device": "r", "name": "s"}', 14),
        _exe(SNAP, '{"device": "rf", "name": "s"}', 15),
        _exe(SNAP, '{"device": "ro", "name": "s"}', 16),
        _exe(SNAP, '{"device": "p", "name": "s1"}', 17),
        _exe(SNAP, '{"device": "q", "name": "s2"}', 18),
        _exe(SNAP, '{"device": "q"}', 19),
        Shell(SNAP_LIST.format("a.qcow2") + "; " + SNAP_LIST.format("pre.qcow2")),
        _exe(SNAP_DEL, '{"device": "q", "name": "s1"}', 30),
        _exe(SNAP_DEL, '{"device": "q", "name": "s1"}', 31),
        _exe(SNAP_DEL, '{"device": "q"}', 32),
        _exe(SNAP_DEL, '{"device": "q", "id": "2", "name": "x"}', 33),
        _exe(SNAP_DEL, '{"device": "q", "id": "2", "name": "s2"}', 34),
        _exe(SNAP_DEL, '{"device": "r", "name": "x"}', 35),
        _exe(SNAP_DEL, '{"device": "rf", "name": "x"}', 36),
        _exe(SNAP_DEL, '{"device": "ro", "id": "1"}', 37),
        _exe(SNAP_DEL, '{"device": "nosuch", "id": "1"}', 38),
        _exe(SNAP_DEL, '{"device": "p", "id": "1"}', 39),
        _exe(SNAP, '{"device": "q", "name": "s3"}', 40),
        # raw passes snapshots to its file child; data-file images have none
        _qcow2("b", "b.qcow2"), _qcow2("d", "d.qcow2"),
        _exe("blockdev-add", '{"driver": "raw", "node-name": "rb", "file": "b"}', 4),
        _exe(SNAP, '{"device": "rb", "name": "s"}', 41),
        _exe(SNAP, '{"device": "b", "name": "s"}', 42),
        _exe(SNAP_DEL, '{"device": "rb", "name": "s"}', 43),
        _exe(SNAP, '{"device": "d", "name": "s"}', 44),
        _exe(SNAP_DEL, '{"device": "d", "name": "s"}', 45),
        _qcow2("ros", "ros.qcow2", ', "read-only": true'),
        _exe(SNAP_DEL, '{"device": "ros", "name": "s"}', 46),
        Shell(SNAP_LIST.format("a.qcow2") + "; " + SNAP_LIST.format("pre.qcow2")),
        _exe("blockdev-del", '{"node-name": "q"}', 50),
        _exe("blockdev-del", '{"node-name": "p"}', 51),
        Shell("qemu-img check -q a.qcow2 && qemu-img check -q pre.qcow2 && echo clean"),
    ])

TWO_MONITORS = ["--chardev", "socket,path=qmp.sock,server=on,wait=off,id=char0",
                "--monitor", "chardev=char0",
                "--chardev", "socket,path=qmp2.sock,server=on,wait=off,id=char1",
                "--monitor", "chardev=char1"]


@pytest.mark.parametrize("name", sorted(SESSIONS))
def test_session_matches_qsd(name: str, tmp_path) -> None:
    setup, steps = SESSIONS[name]
    args = TWO_MONITORS if name.startswith("two-monitors") else None
    if name.startswith("quit"):
        args = [*(args or TWO_MONITORS[:4]), "--pidfile", "qsd.pid"]
    theirs = run_session("qemu", tmp_path / "qemu", steps, args, setup)
    ours = run_session("qsd", tmp_path / "qsd", steps, args, setup)
    if ours != theirs:
        diff = difflib.unified_diff(theirs.decode(errors="replace").splitlines(),
                                    ours.decode(errors="replace").splitlines(),
                                    "qemu-storage-daemon", "qsd", lineterm="")
        pytest.fail("\n".join(diff))
