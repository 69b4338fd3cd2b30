# SPDX-License-Identifier: GPL-2.0-or-later
"""User-creatable objects (object-add / --object) by id."""

from __future__ import annotations

import re
from typing import Any

from qsd.block.throttle import LIMIT_NAMES, ThrottleConfig, ThrottleGroup
from qsd.crypto.secret import Secret
from qsd.crypto.tls import (
    Authz,
    AuthzList,
    AuthzSimple,
    TLSCreds,
    TLSCredsAnon,
    TLSCredsPSK,
    TLSCredsX509,
)
from qsd.qmp.errors import DeviceNotFound, GenericError

_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
#: In QSD 7.2's schema but not creatable: QOM names the type authz-list-file.
NOT_CREATABLE = frozenset({"authz-listfile"})
INT64_MAX = (1 << 63) - 1

#: Readable properties per object type and the value QEMU shows when unset.
QOM_DEFAULTS: dict[str, dict[str, Any]] = {
    "secret": {"loaded": True, "format": "raw", "data": "", "file": "", "keyid": "",
               "iv": ""},
    "iothread": {"poll-max-ns": 32768, "poll-grow": 0, "poll-shrink": 0,
                 "aio-max-batch": 0, "thread-pool-min": 0, "thread-pool-max": 64},
    "tls-creds-anon": {"endpoint": "client", "dir": "", "verify-peer": True, "priority": "",
                       "loaded": True},
    "tls-creds-psk": {"endpoint": "client", "dir": "", "verify-peer": True, "priority": "",
                      "loaded": True, "username": ""},
    "tls-creds-x509": {"endpoint": "client", "dir": "", "verify-peer": True, "priority": "",
                       "loaded": True, "sanity-check": True, "passwordid": ""},
    "authz-simple": {"identity": ""},
    "authz-list": {"policy": "deny", "rules": []},
}


class IOThread:
    """Accepted for compatibility: qsd runs every node on its one event loop."""

    qom_type = "iothread"

    def __init__(self, props: dict[str, Any]) -> None:
        for name in ("poll-max-ns", "poll-grow", "poll-shrink", "aio-max-batch"):
            value = props.get(name, 0)
            if not 0 <= value <= INT64_MAX:
                raise GenericError(f"{name} value must be in range [0, {INT64_MAX}]")
        self.props = props


class ThrottleGroupObject:
    """A throttle-group: limits shared by the throttle nodes naming it.

    ``limits`` sets the given ThrottleLimits members; the unstable flat
    ``x-NAME`` properties set one member each. Checked as a whole at the end
    (QEMU's complete()), with QEMU's texts.
    """

    qom_type = "throttle-group"

    def __init__(self, oid: str, props: dict[str, Any]) -> None:
        config = ThrottleConfig()
        for name, value in props.items():
            if name == "limits":
                config.apply_limits(value)
            elif name.startswith("x-"):
                if value < 0:
                    raise GenericError("Property values cannot be negative")
                config.set_limit(name[2:], value, name)
        config.check()
        self.group = ThrottleGroup(oid, config)

    def in_use(self) -> bool:
        return bool(self.group.members)

    def get(self, prop: str) -> Any:
        if prop == "limits":
            return self.group.config.limits()
        if prop.startswith("x-") and prop[2:] in LIMIT_NAMES:
            return self.group.config.get_limit(prop[2:])
        raise GenericError(f"Property '{self.qom_type}.{prop}' not found")


class ObjectRegistry:
    def __init__(self) -> None:
        self.objects: dict[str, Any] = {}

    def add(self, args: dict[str, Any]) -> None:
        oid = args["id"]
        if not _ID_RE.match(oid):
            raise GenericError("Parameter 'id' expects an identifier")
        if oid in self.objects:
            raise GenericError(
                f"attempt to add duplicate property '{oid}' to object (type 'container')")
        props = {k: v for k, v in args.items() if k not in ("qom-type", "id")}
        qom_type = args["qom-type"]
        if qom_type == "secret":
            obj: Any = Secret(props, self.secret)
        elif qom_type == "tls-creds-x509":
            obj = TLSCredsX509(props, self.secret)
        elif qom_type == "tls-creds-psk":
            obj = TLSCredsPSK(props)
        elif qom_type == "tls-creds-anon":
            obj = TLSCredsAnon(props)
        elif qom_type == "authz-simple":
            obj = AuthzSimple(props)
        elif qom_type == "authz-list":
            obj = AuthzList(props)
        elif qom_type in NOT_CREATABLE:
            raise GenericError(f"invalid object type: {qom_type}")
        elif qom_type == "throttle-group":
            obj = ThrottleGroupObject(oid, props)
        else:
            obj = IOThread(props)
        self.objects[oid] = obj

    def delete(self, oid: str) -> None:
        if oid not in self.objects:
            raise GenericError(f"object '{oid}' not found")
        if getattr(self.objects[oid], "in_use", lambda: False)():
            raise GenericError(f"object '{oid}' is in use, can not be deleted")
        del self.objects[oid]

    def qom_get(self, path: str, prop: str) -> Any:
        """qom-get for objects under /objects (the only QOM tree qsd has)."""
        if path == "/objects" and prop == "type":
            return "container"
        obj = self.objects.get(path[len("/objects/"):]) if path.startswith("/objects/") else None
        if obj is None:
            raise DeviceNotFound(f"Device '{path}' not found")
        if prop == "type":
            return obj.qom_type
        if isinstance(obj, ThrottleGroupObject):
            return obj.get(prop)
        defaults = QOM_DEFAULTS[obj.qom_type]
        if prop not in defaults:
            raise GenericError(f"Property '{obj.qom_type}.{prop}' not found")
        return obj.props.get(prop, defaults[prop])

    def secret(self, oid: str) -> Secret | None:
        obj = self.objects.get(oid)
        return obj if isinstance(obj, Secret) else None

    def tls_creds(self, oid: str) -> TLSCreds | None:
        obj = self.objects.get(oid)
        return obj if isinstance(obj, TLSCreds) else None

    def authz(self, oid: str) -> Authz | None:
        obj = self.objects.get(oid)
        return obj if isinstance(obj, Authz) else None

    def throttle_group(self, name: str) -> ThrottleGroup | None:
        obj = self.objects.get(name)
        return obj.group if isinstance(obj, ThrottleGroupObject) else None
