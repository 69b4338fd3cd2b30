# SPDX-License-Identifier: GPL-2.0-or-later
"""NBD over TLS: tls-creds-x509/psk/anon, verify-peer and tls-authz.

Each scenario runs against the real qemu-storage-daemon and against qsd
(``storage_daemon``) with the same peers (qemu-img, qemu-io, qemu-nbd,
nbdinfo, nbdcopy), certificates made by GnuTLS's certtool and keys by
psktool. What a client sees must be the same; the servers' log lines are
compared after the program name, except for handshake failures, whose text
comes from the TLS library (GnuTLS there, OpenSSL here).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qsd.crypto.tls import AuthzList, distinguished_name, glob_match, read_psk_file

SIZE = 4 * 1024 * 1024
CLIENT_DN = "C=GB,ST=London,L=London,O=Test,CN=client1"


def run(*argv: str | Path, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode:
        raise AssertionError(f"{argv} failed ({r.returncode}): {r.stderr}")
    return r


def _template(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory, require_tool_module) -> dict[str, Path]:
    """A CA, a server certificate for localhost and a client certificate
    (CLIENT_DN), in QEMU's directory layouts: srv/ (server), cli/ (client),
    nocert/ (only the CA)."""
    certtool = require_tool_module("certtool")
    base = tmp_path_factory.mktemp("pki")
    srv, cli, nocert = base / "srv", base / "cli", base / "nocert"
    for d in (srv, cli, nocert):
        d.mkdir()

    def key(path: Path) -> None:
        run(certtool, "--generate-privkey", "--key-type=ecdsa", "--outfile", path)

    key(base / "ca-key.pem")
    run(certtool, "--generate-self-signed", "--load-privkey", base / "ca-key.pem",
        "--template", _template(base / "ca.info", ["cn = qsd test CA", "ca", "cert_signing_key",
                                                   "expiration_days = 2"]),
        "--outfile", srv / "ca-cert.pem")
    key(srv / "server-key.pem")
    run(certtool, "--generate-certificate", "--load-privkey", srv / "server-key.pem",
        "--load-ca-certificate", srv / "ca-cert.pem", "--load-ca-privkey", base / "ca-key.pem",
        "--template", _template(base / "server.info", [
            "organization = Test", "cn = localhost", "dns_name = localhost",
            "ip_address = 127.0.0.1", "tls_www_server", "signing_key", "encryption_key",
            "expiration_days = 2"]),
        "--outfile", srv / "server-cert.pem")
    key(cli / "client-key.pem")
    run(certtool, "--generate-certificate", "--load-privkey", cli / "client-key.pem",
        "--load-ca-certificate", srv / "ca-cert.pem", "--load-ca-privkey", base / "ca-key.pem",
        "--template", _template(base / "client.info", [
            "country = GB", "state = London", "locality = London", "organization = Test",
            "cn = client1", "tls_www_client", "signing_key", "encryption_key",
            "expiration_days = 2"]),
        "--outfile", cli / "client-cert.pem")
    for d in (cli, nocert):
        (d / "ca-cert.pem").write_bytes((srv / "ca-cert.pem").read_bytes())
    return {"srv": srv, "cli": cli, "nocert": nocert, "base": base}


@pytest.fixture(scope="module")
def psk(tmp_path_factory, require_tool_module) -> dict[str, Path]:
    """keys.psk made by psktool: srv/ holds alice and bob, good/ alice's key,
    bad/ another key for alice."""
    psktool = require_tool_module("psktool")
    base = tmp_path_factory.mktemp("psk")
    dirs = {name: base / name for name in ("srv", "good", "bad")}
    for d in dirs.values():
        d.mkdir()
    run(psktool, "-u", "alice", "-p", dirs["srv"] / "keys.psk")
    run(psktool, "-u", "bob", "-p", dirs["srv"] / "keys.psk")
    alice = next(line for line in (dirs["srv"] / "keys.psk").read_text().splitlines()
                 if line.startswith("alice:"))
    (dirs["good"] / "keys.psk").write_text(alice + "\n")
    run(psktool, "-u", "alice", "-p", dirs["bad"] / "keys.psk")
    return dirs


@pytest.fixture(scope="module")
def require_tool_module():
    import shutil

    def require(name: str) -> str:
        path = shutil.which(name)
        if path is None:
            pytest.fail(f"{name} is not installed (scripts/setup.sh installs it)")
        return path
    return require


@pytest.fixture
def image(workdir) -> Path:
    """A raw image with a distinct pattern per MiB and a hole."""
    path = workdir / "disk.raw"
    with open(path, "wb") as f:
        for i in range(SIZE // (1024 * 1024)):
            f.write(bytes([0x30 + i]) * (1024 * 1024) if i != 2 else bytes(1024 * 1024))
    return path


def start(factory, workdir: Path, image: Path, objects: list[str], server: str,
          writable: bool = True) -> tuple[Any, str]:
    sock = str(workdir / f"nbd-{len(factory.daemons)}.sock")
    d = factory(*[a for o in objects for a in ("--object", o)],
                "--blockdev", f"driver=file,filename={image},node-name=f0",
                "--nbd-server", f"addr.type=unix,addr.path={sock},{server}",
                "--export", f"type=nbd,id=e0,node-name=f0,name=disk,writable={'on' if writable else 'off'}",
                wait_for=[sock])
    return d, sock


def log_lines(daemon) -> list[str]:
    """The daemon's stderr lines without the program name."""
    return [line.split(": ", 1)[1] for line in daemon.stderr().splitlines() if ": " in line]


def x509_opts(directory: Path, sock: str) -> list[str]:
    return ["--object", f"tls-creds-x509,id=tls0,dir={directory},endpoint=client",
            "--image-opts",
            f"driver=nbd,server.type=unix,server.path={sock},export=disk,tls-creds=tls0,"
            "tls-hostname=localhost"]


def psk_opts(directory: Path, sock: str, user: str = "alice") -> list[str]:
    return ["--object", f"tls-creds-psk,id=tls0,dir={directory},endpoint=client,username={user}",
            "--image-opts",
            f"driver=nbd,server.type=unix,server.path={sock},export=disk,tls-creds=tls0"]


# ----- x509 -----------------------------------------------------------------------------------

def test_x509_verify_peer_and_authz(storage_daemon, workdir, image, pki) -> None:
    """Clients with a certificate the authz-list allows read, write and copy
    (qemu-img, qemu-io, nbdinfo, nbdcopy with 4 connections); a client without
    a certificate, or a plain one, is refused, and the refusal is logged."""
    rules = json.dumps({"qom-type": "authz-list", "id": "az0", "policy": "deny",
                        "rules": [{"match": "*,CN=nobody", "policy": "allow", "format": "glob"},
                                  {"match": "C=GB,*,CN=client?", "policy": "allow",
                                   "format": "glob"}]})
    d, sock = start(storage_daemon, workdir, image,
                    [f"tls-creds-x509,id=tls0,dir={pki['srv']},endpoint=server,verify-peer=on",
                     rules], "tls-creds=tls0,tls-authz=az0")
    out = workdir / "copy.raw"
    run("qemu-img", "convert", "-O", "raw", *x509_opts(pki["cli"], sock), out)
    assert out.read_bytes() == image.read_bytes()
    io = run("qemu-io", "-c", "write -P 0x77 1M 64k", "-c", "read -P 0x77 1M 64k",
             *x509_opts(pki["cli"], sock))
    assert "read 65536/65536 bytes" in io.stdout
    uri = f"nbds+unix:///disk?socket={sock}&tls-certificates={pki['cli']}"
    info = run("nbdinfo", "--json", uri)
    assert json.loads(info.stdout)["exports"][0]["export-size"] == SIZE
    copy = workdir / "nbdcopy.raw"
    run("nbdcopy", "--connections=4", uri, copy)
    assert copy.read_bytes() == image.read_bytes()

    nocert = run("qemu-img", "info", *x509_opts(pki["nocert"], sock), check=False)
    assert nocert.returncode == 1
    assert "TLS channel" in nocert.stderr
    plain = run("qemu-img", "info", f"nbd+unix:///disk?socket={sock}", check=False)
    assert "server reported: Option 0x7 not permitted before TLS" in plain.stderr
    assert log_lines(d) == ["option negotiation failed: Verify failed: No certificate was found."]


def test_x509_authz_denied(storage_daemon, workdir, image, pki) -> None:
    d, sock = start(storage_daemon, workdir, image,
                    [f"tls-creds-x509,id=tls0,dir={pki['srv']},endpoint=server",
                     "authz-simple,id=az0,identity=CN=client1", "authz-simple,id=az1,identity="
                     + CLIENT_DN.replace(",", ",,")], "tls-creds=tls0,tls-authz=az0")
    r = run("qemu-img", "info", *x509_opts(pki["cli"], sock), check=False)
    assert r.returncode == 1
    assert log_lines(d) == [f"option negotiation failed: TLS x509 authz check for {CLIENT_DN} is denied"]


def test_x509_authz_missing_object(storage_daemon, workdir, image, pki) -> None:
    d, sock = start(storage_daemon, workdir, image,
                    [f"tls-creds-x509,id=tls0,dir={pki['srv']},endpoint=server"],
                    "tls-creds=tls0,tls-authz=nope")
    assert run("qemu-img", "info", *x509_opts(pki["cli"], sock), check=False).returncode == 1
    assert log_lines(d) == ["option negotiation failed: Cannot find QAuthZ object ID nope"]


def test_objects_deleted_while_serving(storage_daemon, workdir, image, pki) -> None:
    """object-del of the server's creds and authz succeeds: the server keeps
    its credentials, but the authz object is looked up per client."""
    d, sock = start(storage_daemon, workdir, image,
                    [f"tls-creds-x509,id=tls0,dir={pki['srv']},endpoint=server",
                     "authz-simple,id=az0,identity=" + CLIENT_DN.replace(",", ",,")],
                    "tls-creds=tls0,tls-authz=az0", writable=False)
    run("qemu-img", "info", *x509_opts(pki["cli"], sock))
    q = d.qmp()
    assert q.execute("object-del", {"id": "tls0"}) == {"return": {}}
    assert q.execute("object-del", {"id": "az0"}) == {"return": {}}
    assert run("qemu-img", "info", *x509_opts(pki["cli"], sock), check=False).returncode == 1
    assert log_lines(d) == ["option negotiation failed: Cannot find QAuthZ object ID az0"]


def test_x509_without_verify_peer(storage_daemon, workdir, image, pki) -> None:
    """verify-peer=off: any TLS client gets in, tls-authz is not consulted (QEMU 7.2)."""
    _, sock = start(storage_daemon, workdir, image,
                    [f"tls-creds-x509,id=tls0,dir={pki['srv']},endpoint=server,verify-peer=off",
                     "authz-simple,id=az0,identity=nobody"], "tls-creds=tls0,tls-authz=az0",
                    writable=False)
    r = run("qemu-img", "info", "--output=json", *x509_opts(pki["nocert"], sock))
    assert json.loads(r.stdout)["virtual-size"] == SIZE


# ----- PSK and anonymous ----------------------------------------------------------------------

def test_psk(storage_daemon, workdir, image, psk) -> None:
    """The psktool file: the right key connects (qemu-img, qemu-io, nbdinfo,
    nbdcopy), a wrong key or an unknown user is refused and logged."""
    d, sock = start(storage_daemon, workdir, image,
                    [f"tls-creds-psk,id=tls0,dir={psk['srv']},endpoint=server"], "tls-creds=tls0")
    out = workdir / "copy.raw"
    run("qemu-img", "convert", "-O", "raw", *psk_opts(psk["good"], sock), out)
    assert out.read_bytes() == image.read_bytes()
    io = run("qemu-io", "-c", "write -P 0x66 0 4k", "-c", "read -P 0x66 0 4k",
             *psk_opts(psk["srv"], sock, "bob"))
    assert "read 4096/4096 bytes" in io.stdout
    uri = f"nbds+unix://alice@/disk?socket={sock}&tls-psk-file={psk['good'] / 'keys.psk'}"
    copy = workdir / "nbdcopy.raw"
    run("nbdcopy", "--connections=4", uri, copy)
    assert copy.read_bytes() == image.read_bytes()

    bad = run("qemu-img", "info", *psk_opts(psk["bad"], sock), check=False)
    assert "TLS handshake failed" in bad.stderr
    unknown = workdir / "unknown"
    unknown.mkdir()
    (unknown / "keys.psk").write_text((psk["good"] / "keys.psk").read_text().replace("alice", "carol"))
    assert run("qemu-img", "info", *psk_opts(unknown, sock, "carol"), check=False).returncode == 1
    nokey = run("nbdinfo", f"nbd+unix:///disk?socket={sock}", check=False)
    assert nokey.returncode == 1
    lines = log_lines(d)
    assert len(lines) == 2
    assert all(line.startswith("option negotiation failed: TLS handshake failed: ") for line in lines)


def test_anon(storage_daemon, workdir, image) -> None:
    _, sock = start(storage_daemon, workdir, image, ["tls-creds-anon,id=tls0,endpoint=server"],
                    "tls-creds=tls0", writable=False)
    r = run("qemu-img", "compare", "--object", "tls-creds-anon,id=tls0,endpoint=client",
            "--image-opts", f"driver=raw,file.driver=file,file.filename={image}",
            f"driver=nbd,server.type=unix,server.path={sock},export=disk,tls-creds=tls0")
    assert "Images are identical." in r.stdout


# ----- objects and nbd-server-start over QMP -------------------------------------------------

def test_qmp_errors(storage_daemon, workdir, pki, psk) -> None:
    """object-add and nbd-server-start with bad TLS input: QSD's replies."""
    bad = workdir / "bad"
    for name in ("empty", "keyjunk", "dhjunk", "psk-junk", "psk-nouser", "cajunk", "certjunk",
                 "crljunk"):
        (bad / name).mkdir(parents=True)
    for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
        for d in ("cajunk", "certjunk", "crljunk"):
            (bad / d / name).write_bytes((pki["srv"] / name).read_bytes())
    (bad / "cajunk" / "ca-cert.pem").write_text("junk\n")
    (bad / "certjunk" / "server-cert.pem").write_text("junk\n")
    (bad / "crljunk" / "ca-crl.pem").write_text("junk\n")
    for name in ("ca-cert.pem", "server-cert.pem"):
        (bad / "keyjunk" / name).write_bytes((pki["srv"] / name).read_bytes())
        (bad / "dhjunk" / name).write_bytes((pki["srv"] / name).read_bytes())
    (bad / "keyjunk" / "server-key.pem").write_text("junk\n")
    (bad / "dhjunk" / "server-key.pem").write_bytes((pki["srv"] / "server-key.pem").read_bytes())
    (bad / "dhjunk" / "dh-params.pem").write_text("junk\n")
    (bad / "psk-junk" / "keys.psk").write_text("alice:zz\n")
    (bad / "psk-nouser" / "keys.psk").write_text("bob:0011\nalice\n")
    d = storage_daemon()
    q = d.qmp()

    def add(qom_type: str, oid: str, **props: Any) -> Any:
        return q.execute("object-add", {"qom-type": qom_type, "id": oid, **props})

    srv = str(pki["srv"])
    replies = [
        add("tls-creds-x509", "x1", dir=str(bad / "empty"), endpoint="server"),
        add("tls-creds-x509", "x2", endpoint="server"),
        add("tls-creds-x509", "x3", dir=str(bad / "keyjunk"), endpoint="server"),
        add("tls-creds-x509", "x4", dir=str(bad / "dhjunk"), endpoint="server"),
        add("tls-creds-x509", "x5", dir=srv, endpoint="server", passwordid="nosuch"),
        add("tls-creds-x509", "x6", dir=str(pki["nocert"])),
        add("tls-creds-x509", "x7", dir=str(bad / "cajunk"), endpoint="server"),
        add("tls-creds-x509", "x8", dir=str(bad / "certjunk"), endpoint="server"),
        add("tls-creds-x509", "x9", dir=str(bad / "cajunk"), endpoint="server",
            **{"sanity-check": False}),
        add("tls-creds-x509", "x10", dir=str(bad / "certjunk"), endpoint="server",
            **{"sanity-check": False}),
        add("tls-creds-x509", "x11", dir=str(bad / "crljunk"), endpoint="server"),
        add("tls-creds-x509", "srv", dir=srv, endpoint="server", **{"verify-peer": False}),
        add("tls-creds-psk", "p1", dir=str(bad / "empty"), endpoint="server"),
        add("tls-creds-psk", "p2", dir=str(bad / "psk-junk"), endpoint="client", username="alice"),
        add("tls-creds-psk", "p3", dir=str(bad / "psk-nouser"), endpoint="client", username="alice"),
        add("tls-creds-psk", "p4", dir=str(psk["srv"]), endpoint="client"),
        add("tls-creds-psk", "p5", dir=str(psk["srv"]), endpoint="server"),
        add("tls-creds-anon", "a1", endpoint="server"),
        add("authz-simple", "z1"),
        add("authz-simple", "z2", identity="x"),
        add("authz-list", "z3", policy="allow", rules=[{"match": "a*", "policy": "deny",
                                                         "format": "glob"}]),
        add("authz-listfile", "z4", filename=str(bad / "rules.json")),
        q.execute("qom-get", {"path": "/objects/srv", "property": "verify-peer"}),
        q.execute("qom-get", {"path": "/objects/srv", "property": "endpoint"}),
        q.execute("qom-get", {"path": "/objects/srv", "property": "dir"}),
        q.execute("qom-get", {"path": "/objects/srv", "property": "loaded"}),
        q.execute("qom-get", {"path": "/objects/srv", "property": "sanity-check"}),
        q.execute("qom-get", {"path": "/objects/p5", "property": "username"}),
        q.execute("qom-get", {"path": "/objects/z2", "property": "identity"}),
        q.execute("qom-get", {"path": "/objects/z3", "property": "rules"}),
        q.execute("qom-get", {"path": "/objects/z3", "property": "policy"}),
    ]
    sock = {"type": "unix", "data": {"path": str(workdir / "n.sock")}}
    for creds in ("nope", "x6", "z2"):
        replies.append(q.execute("nbd-server-start", {"addr": sock, "tls-creds": creds}))
    replies.append(q.execute("nbd-server-start", {"addr": sock, "tls-creds": "srv",
                                                  "tls-authz": "z2"}))
    replies.append(q.execute("nbd-server-stop"))
    replies.append(q.execute("nbd-server-start", {"addr": sock, "tls-authz": "z2"}))
    replies.append(q.execute("object-del", {"id": "srv"}))
    expected = [
        f"Unable to access credentials {bad / 'empty' / 'ca-cert.pem'}: No such file or directory",
        "Missing 'dir' property value",
        f"Cannot load certificate '{bad / 'keyjunk' / 'server-cert.pem'}' & key "
        f"'{bad / 'keyjunk' / 'server-key.pem'}': The requested data were not available.",
        f"Unable to load DH parameters from {bad / 'dhjunk' / 'dh-params.pem'}: "
        "Base64 unexpected header error.",
        "No secret with id 'nosuch'",
        {},
        f"Unable to import CA certificate list {bad / 'cajunk' / 'ca-cert.pem'}",
        f"Unable to import server certificate {bad / 'certjunk' / 'server-cert.pem'}: "
        "Base64 unexpected header error.",
        {},
        f"Cannot load certificate '{bad / 'certjunk' / 'server-cert.pem'}' & key "
        f"'{bad / 'certjunk' / 'server-key.pem'}': Base64 decoding error.",
        f"Cannot load CRL '{bad / 'crljunk' / 'ca-crl.pem'}': Base64 decoding error.",
        {},
        f"Unable to access credentials {bad / 'empty' / 'keys.psk'}: No such file or directory",
        "Cannot set PSK client credentials: Error in parsing.",
        f"Username alice not found in PSK file {bad / 'psk-nouser' / 'keys.psk'}",
        f"Username qemu not found in PSK file {psk['srv'] / 'keys.psk'}",
        {}, {},
        "Parameter 'identity' is missing",
        {}, {},
        "invalid object type: authz-listfile",
        False, "server", srv, True, True, "", "x",
        [{"match": "a*", "policy": "deny", "format": "glob"}], "allow",
        "No TLS credentials with id 'nope'",
        "Expected TLS credentials for a server endpoint",
        "Object with id 'z2' is not TLS credentials",
        {}, {}, {}, {},
    ]
    got = [r["error"]["desc"] if "error" in r else r["return"] for r in replies]
    assert got == expected


# ----- parsers and rules (unit) ---------------------------------------------------------------

def test_glob_and_list_rules() -> None:
    assert glob_match("C=GB,*,CN=client?", CLIENT_DN)
    assert not glob_match("C=GB,*,CN=client?", CLIENT_DN + "0")
    assert glob_match("a[b]*", "a[b]c")            # brackets are literal in GLib's patterns
    rules = AuthzList({"policy": "allow", "rules": [
        {"match": "eve", "policy": "deny"}, {"match": "e*", "policy": "allow", "format": "glob"}]})
    assert not rules.is_allowed("eve") and rules.is_allowed("evelyn") and rules.is_allowed("x")
    assert not AuthzList({}).is_allowed("x")


def test_distinguished_name_order_and_escapes() -> None:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "GB"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "A, B"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "c+d")])
    assert distinguished_name(name) == r"C=GB,O=A\, B,CN=c\+d"


@given(st.binary(max_size=2000))
def test_psk_file_parser_never_fails(tmp_path_factory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("psk") / "keys.psk"
    path.write_bytes(data)
    keys = read_psk_file(str(path))
    for user, key in keys.items():
        assert ":" not in user and "\n" not in user
        assert (user + ":" + key.hex()).encode() in data.lower() or key.hex() in data.decode(
            "utf-8", "replace").lower()


def test_psk_file_first_entry_wins(tmp_path) -> None:
    path = tmp_path / "keys.psk"
    path.write_text("alice:00ff\nbob:zz\nalice:11\ncarol:abc\n\ndave:\n")
    assert read_psk_file(str(path)) == {"alice": b"\x00\xff", "dave": b""}


def test_priority_versions(storage_daemon, workdir, image, pki) -> None:
    """A priority string that leaves only TLS 1.2 still serves QEMU's client
    (and qsd's context is limited to TLS 1.2)."""
    _, sock = start(storage_daemon, workdir, image,
                    [f"tls-creds-x509,id=tls0,dir={pki['srv']},endpoint=server,verify-peer=off,"
                     "priority=NORMAL:-VERS-TLS1.3"], "tls-creds=tls0", writable=False)
    r = run("qemu-img", "info", "--output=json", *x509_opts(pki["nocert"], sock))
    assert json.loads(r.stdout)["virtual-size"] == SIZE


def test_priority_parsing(pki) -> None:
    import ssl

    from qsd.crypto.tls import TLSCredsX509

    def versions(priority: str) -> tuple[Any, Any]:
        ctx = TLSCredsX509({"dir": str(pki["srv"]), "endpoint": "server", "priority": priority},
                           lambda _: None).server_context()
        return ctx.minimum_version, ctx.maximum_version

    assert versions("NORMAL:-VERS-TLS1.3") == (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2)
    assert versions("NORMAL:-VERS-ALL:+VERS-TLS1.3") == (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_3)
    assert versions("@SYSTEM") == (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3)
