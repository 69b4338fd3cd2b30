# SPDX-License-Identifier: GPL-2.0-or-later
"""TLS credentials (``tls-creds-x509``, ``tls-creds-psk``, ``tls-creds-anon``)
and authorization objects (``authz-simple``, ``authz-list``).

QEMU keeps credentials as GnuTLS objects; qsd turns them into
:class:`ssl.SSLContext` objects for asyncio's TLS layer. The files come from
``dir`` under QEMU's names and are checked when the object is created, with
QEMU's texts, so that a bad directory fails ``object-add`` rather than the
first client. Python 3.11's ssl module has no TLS-PSK; ``sslpsk3`` adds
OpenSSL's PSK callbacks to it (Python 3.13's own ones when available), and
the PSK file is read again at each handshake as GnuTLS does, so keys can be
changed without restarting.

After a handshake the server asks :meth:`TLSCreds.check_peer` whether the
client may go on: x509 with ``verify-peer`` needs a client certificate, and
the certificate's distinguished name (RDNs in certificate order, as GnuTLS
prints it) is the identity ``tls-authz`` decides on. As in QEMU 7.2, PSK and
anonymous sessions and x509 without ``verify-peer`` skip the authz check.
"""

from __future__ import annotations

import datetime
import os
import re
import ssl
from collections.abc import Callable
from typing import Any

from cryptography import x509

from qsd.crypto.secret import Secret
from qsd.qmp.errors import GenericError

#: Ciphers a PSK server offers below TLS 1.3 (TLS 1.3 suites stay the defaults).
PSK_CIPHERS = "ECDHE-PSK:DHE-PSK:PSK:@SECLEVEL=0"
#: Anonymous Diffie-Hellman (TLS 1.2 at most: TLS 1.3 has no anonymous suites).
ANON_CIPHERS = "aNULL:!eNULL:@SECLEVEL=0"
#: The psktool file format: one "username:hexkey" per line.
_PSK_LINE = re.compile(r"([^:\n]*):([0-9A-Fa-f]*)\s*\Z")
#: Used when a server has no dh-params.pem: RFC 7919's ffdhe2048 group.
_FFDHE2048 = """-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""
#: Short attribute names in GnuTLS's distinguished names.
_DN_NAMES = {
    x509.NameOID.COUNTRY_NAME: "C", x509.NameOID.STATE_OR_PROVINCE_NAME: "ST",
    x509.NameOID.LOCALITY_NAME: "L", x509.NameOID.ORGANIZATION_NAME: "O",
    x509.NameOID.ORGANIZATIONAL_UNIT_NAME: "OU", x509.NameOID.COMMON_NAME: "CN",
    x509.NameOID.DOMAIN_COMPONENT: "DC", x509.NameOID.USER_ID: "UID",
    x509.NameOID.EMAIL_ADDRESS: "EMAIL",
}


class TLSPeerRejected(Exception):
    """The handshake succeeded but the client may not continue (the text is logged)."""


class Authz:
    """Base of the authz-* objects: decide whether an identity may proceed."""

    qom_type = ""

    def __init__(self, props: dict[str, Any]) -> None:
        self.props = props

    def is_allowed(self, identity: str) -> bool:
        raise NotImplementedError


class AuthzSimple(Authz):
    """Exactly one identity is allowed."""

    qom_type = "authz-simple"

    def is_allowed(self, identity: str) -> bool:
        return identity == self.props["identity"]


def glob_match(pattern: str, text: str) -> bool:
    """GLib's simple patterns: ``*`` any run of characters, ``?`` one; nothing else is special."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, text, re.DOTALL) is not None


class AuthzList(Authz):
    """Rules tried in order, the first match decides; else the list's policy."""

    qom_type = "authz-list"

    def is_allowed(self, identity: str) -> bool:
        for rule in self.props.get("rules", []):
            if rule.get("format", "exact") == "glob":
                hit = glob_match(rule["match"], identity)
            else:
                hit = rule["match"] == identity
            if hit:
                return bool(rule["policy"] == "allow")
        return bool(self.props.get("policy", "deny") == "allow")


def _need_file(directory: str, name: str) -> str:
    """QEMU's check that a credential file is there (before anything is parsed)."""
    path = os.path.join(directory, name)
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise GenericError(f"Unable to access credentials {path}: {e.strerror}") from None
    return path


def _optional_file(directory: str, name: str) -> str | None:
    path = os.path.join(directory, name)
    return path if os.path.exists(path) else None


def _load_dh(ctx: ssl.SSLContext, path: str | None) -> None:
    """dh-params.pem when given (QEMU's error text), else the RFC 7919 group."""
    if path is not None:
        try:
            ctx.load_dh_params(path)
        except (ssl.SSLError, OSError, ValueError):
            raise GenericError(f"Unable to load DH parameters from {path}: "
                               "Base64 unexpected header error.") from None
        return
    # load_dh_params only reads files: hand it the constant through a pipe.
    r, w = os.pipe()
    try:
        os.write(w, _FFDHE2048.encode())
        os.close(w)
        w = -1
        ctx.load_dh_params(f"/proc/self/fd/{r}")
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


_VERSIONS = {"TLS1.0": ssl.TLSVersion.TLSv1, "TLS1.1": ssl.TLSVersion.TLSv1_1,
             "TLS1.2": ssl.TLSVersion.TLSv1_2, "TLS1.3": ssl.TLSVersion.TLSv1_3}


def apply_priority(ctx: ssl.SSLContext, priority: str | None) -> None:
    """The protocol-version part of a GnuTLS priority string ("NORMAL:-VERS-TLS1.3",
    "-VERS-ALL:+VERS-TLS1.2", ...); cipher keywords are left to OpenSSL's defaults."""
    if not priority:
        return
    enabled = {ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3}
    for token in priority.split(":"):
        sign, name = token[:1], token[1:]
        if sign not in ("+", "-") or not name.startswith("VERS-"):
            continue
        name = name[5:]
        chosen = set(_VERSIONS.values()) if name in ("ALL", "TLS-ALL") else (
            {_VERSIONS[name]} if name in _VERSIONS else set())
        enabled = enabled | chosen if sign == "+" else enabled - chosen
    if enabled:
        ctx.minimum_version = min(enabled)
        ctx.maximum_version = max(enabled)


class TLSCreds:
    """Common properties: ``endpoint``, ``dir``, ``verify-peer``, ``priority``."""

    qom_type = ""

    def __init__(self, props: dict[str, Any]) -> None:
        self.props = props
        self.endpoint: str = props.get("endpoint", "client")
        self.verify_peer: bool = props.get("verify-peer", True)
        self.dir: str | None = props.get("dir")
        self._server_ctx: ssl.SSLContext | None = None

    @property
    def is_server(self) -> bool:
        return self.endpoint == "server"

    def server_context(self) -> ssl.SSLContext:
        """The context a server endpoint hands to asyncio's start_tls."""
        assert self.is_server and self._server_ctx is not None
        return self._server_ctx

    def check_peer(self, sslobj: Any, authz_id: str | None,
                   find_authz: Callable[[str], Authz | None]) -> None:
        """Raise :class:`TLSPeerRejected` if the client may not go on."""


class TLSCredsAnon(TLSCreds):
    """Anonymous Diffie-Hellman: encryption without authentication."""

    qom_type = "tls-creds-anon"

    def __init__(self, props: dict[str, Any]) -> None:
        super().__init__(props)
        if not self.is_server:
            return
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        apply_priority(ctx, props.get("priority"))
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(ANON_CIPHERS)
        ctx.verify_mode = ssl.CERT_NONE
        _load_dh(ctx, _optional_file(self.dir, "dh-params.pem") if self.dir else None)
        self._server_ctx = ctx


class TLSCredsX509(TLSCreds):
    """Certificates from ``dir``: ca-cert.pem, ca-crl.pem, {server,client}-{cert,key}.pem,
    dh-params.pem; the key password from the secret ``passwordid``."""

    qom_type = "tls-creds-x509"

    def __init__(self, props: dict[str, Any], find_secret: Callable[[str], Secret | None]) -> None:
        super().__init__(props)
        if self.dir is None:
            raise GenericError("Missing 'dir' property value")
        password: bytes | None = None
        passwordid = props.get("passwordid")
        if passwordid is not None:
            secret = find_secret(passwordid)
            if secret is None:
                raise GenericError(f"No secret with id '{passwordid}'")
            password = secret.value
        role = "server" if self.is_server else "client"
        ca = _need_file(self.dir, "ca-cert.pem")
        crl = _optional_file(self.dir, "ca-crl.pem")
        if self.is_server:
            cert: str | None = _need_file(self.dir, "server-cert.pem")
            key: str | None = _need_file(self.dir, "server-key.pem")
            dh = _optional_file(self.dir, "dh-params.pem")
        else:
            cert = _optional_file(self.dir, "client-cert.pem")
            key = _optional_file(self.dir, "client-key.pem")
            dh = None
        if props.get("sanity-check", True):
            _sanity_check(ca, cert, role)
        if not self.is_server:
            return
        assert cert is not None and key is not None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if _load_pems(ca):      # GnuTLS takes a CA file without certificates as an empty list
            ctx.load_verify_locations(ca)
        try:
            ctx.load_cert_chain(cert, key, password=password)
        except (ssl.SSLError, OSError) as e:
            if not _load_pems(cert):
                why = "Base64 decoding error."
            elif "KEY_VALUES_MISMATCH" in str(e):
                why = "The certificate and the given key do not match."
            else:
                why = "The requested data were not available."
            raise GenericError(f"Cannot load certificate '{cert}' & key '{key}': {why}") from None
        if crl is not None:
            try:
                ctx.load_verify_locations(crl)
            except (ssl.SSLError, OSError):
                raise GenericError(f"Cannot load CRL '{crl}': Base64 decoding error.") from None
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        _load_dh(ctx, dh)
        # The certificate is checked after the handshake (check_peer) so that
        # a client without one is refused with QEMU's message; one that is
        # sent is verified by OpenSSL during the handshake.
        ctx.verify_mode = ssl.CERT_OPTIONAL if self.verify_peer else ssl.CERT_NONE
        apply_priority(ctx, props.get("priority"))
        self._server_ctx = ctx

    def check_peer(self, sslobj: Any, authz_id: str | None,
                   find_authz: Callable[[str], Authz | None]) -> None:
        if not self.verify_peer:
            return
        der = sslobj.getpeercert(binary_form=True)
        if not der:
            raise TLSPeerRejected("Verify failed: No certificate was found.")
        if authz_id is None:
            return
        dn = distinguished_name(x509.load_der_x509_certificate(der).subject)
        authz = find_authz(authz_id)
        if authz is None:
            raise TLSPeerRejected(f"Cannot find QAuthZ object ID {authz_id}")
        if not authz.is_allowed(dn):
            raise TLSPeerRejected(f"TLS x509 authz check for {dn} is denied")


def distinguished_name(name: x509.Name) -> str:
    """A subject as GnuTLS prints it: RDNs in certificate order, short names, RFC 4514 escapes."""
    parts = []
    for rdn in name.rdns:
        attrs = []
        for attr in rdn:
            short = _DN_NAMES.get(attr.oid)
            value = attr.value if isinstance(attr.value, str) else attr.value.hex()
            one = x509.NameAttribute(attr.oid, value).rfc4514_string()
            if short is not None:
                one = short + one[one.index("="):]
            attrs.append(one)
        parts.append("+".join(attrs))
    return ",".join(parts)


def _sanity_check(ca_path: str, cert_path: str | None, role: str) -> None:
    """QEMU's load-time checks: validity periods, and that the CA is a CA."""
    now = datetime.datetime.now(datetime.UTC)
    certs: list[tuple[x509.Certificate, str, str]] = []
    if cert_path is not None:
        found = _load_pems(cert_path)
        if not found:
            raise GenericError(f"Unable to import {role} certificate {cert_path}: "
                               f"{_pem_error(cert_path)}")
        certs.append((found[0], f"The {role} certificate {cert_path}", cert_path))
    cas = _load_pems(ca_path)
    if not cas:
        raise GenericError(f"Unable to import CA certificate list {ca_path}")
    for cert in cas:
        certs.append((cert, f"The CA certificate {ca_path}", ca_path))
    for cert, what, path in certs:
        if cert.not_valid_after_utc < now:
            raise GenericError(f"{what} has expired")
        if cert.not_valid_before_utc > now:
            raise GenericError(f"{what} is not yet active")
        if what.startswith("The CA"):
            try:
                bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            except x509.ExtensionNotFound:
                continue
            if not bc.ca:
                raise GenericError(f"The certificate {path} basic constraints do not show a CA")


def _load_pems(path: str) -> list[x509.Certificate]:
    """The certificates in a PEM file; none when it cannot be parsed."""
    try:
        with open(path, "rb") as f:
            return x509.load_pem_x509_certificates(f.read())
    except (OSError, ValueError):
        return []


def _pem_error(path: str) -> str:
    """GnuTLS's reason for a PEM file it cannot decode."""
    try:
        with open(path, "rb") as f:
            header = b"-----BEGIN" in f.read()
    except OSError:
        header = False
    return "Base64 decoding error." if header else "Base64 unexpected header error."


def read_psk_file(path: str) -> dict[str, bytes]:
    """keys.psk as psktool writes it; malformed lines are skipped as GnuTLS does."""
    keys: dict[str, bytes] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = _PSK_LINE.match(line.rstrip("\n"))
            if m is None or len(m.group(2)) % 2:
                continue
            keys.setdefault(m.group(1), bytes.fromhex(m.group(2)))
    return keys


class TLSCredsPSK(TLSCreds):
    """Pre-shared keys from ``dir``/keys.psk; a client uses ``username``'s key."""

    qom_type = "tls-creds-psk"

    def __init__(self, props: dict[str, Any]) -> None:
        super().__init__(props)
        if self.dir is None:
            raise GenericError("Missing 'dir' property value")
        self.keys_path = _need_file(self.dir, "keys.psk")
        if not self.is_server:
            username = props.get("username", "qemu")
            try:
                with open(self.keys_path, encoding="utf-8", errors="replace") as f:
                    lines = f.read().splitlines()
            except OSError as e:
                raise GenericError(f"Unable to access credentials {self.keys_path}: "
                                   f"{e.strerror}") from None
            for line in lines:
                user, sep, key = line.partition(":")
                if sep and user == username:
                    if not key or len(key) % 2 or not re.fullmatch(r"[0-9A-Fa-f]*", key):
                        raise GenericError("Cannot set PSK client credentials: Error in parsing.")
                    break
            else:
                raise GenericError(f"Username {username} not found in PSK file {self.keys_path}")
            return
        dh = _optional_file(self.dir, "dh-params.pem")
        self._server_ctx = _psk_server_context(self.keys_path, dh)
        apply_priority(self._server_ctx, props.get("priority"))


def _psk_server_context(keys_path: str, dh: str | None) -> ssl.SSLContext:
    from sslpsk3 import SSLPSKContext

    class _PSKObject(ssl.SSLObject):
        """Installs the PSK callbacks once: asyncio calls do_handshake()
        repeatedly and sslpsk3's own object would reset the state each time."""

        _psk_ready = False

        def do_handshake(self) -> None:
            if not self._psk_ready:
                self._psk_ready = True
                self.context.setup_psk_callbacks(self)
            super().do_handshake()

    class _PSKContext(SSLPSKContext):
        sslobject_class = _PSKObject

    def lookup(identity: str | None) -> bytes:
        try:
            keys = read_psk_file(keys_path)
        except OSError:
            return b""
        return keys.get(identity or "", b"")

    ctx = _PSKContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.set_ciphers(PSK_CIPHERS)
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_psk_server_callback(lookup)
    _load_dh(ctx, dh)
    return ctx
