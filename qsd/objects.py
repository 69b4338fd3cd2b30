# SPDX-License-Identifier: GPL-2.0-or-later
"""User-creatable objects (object-add / --object) by id."""

from __future__ import annotations

import re
from typing import Any

from qsd.crypto.secret import Secret
from qsd.qmp.errors import DeviceNotFound, GenericError

_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
INT64_MAX = (1 << 63) - 1

#: Readable properties per object type and the value QEMU shows when unset.
QOM_DEFAULTS: dict[str, dict[str, Any]] = {
    "secret": {"loaded": True, "format": "raw", "data": "", "file": "", "keyid": "",
               "iv": ""},
    "iothread": {"poll-max-ns": 32768, "poll-grow": 0, "poll-shrink": 0,
                 "aio-max-batch": 0, "thread-pool-min": 0, "thread-pool-max": 64},
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
        else:
            obj = IOThread(props)
        self.objects[oid] = obj

    def delete(self, oid: str) -> None:
        if oid not in self.objects:
            raise GenericError(f"object '{oid}' not found")
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
        defaults = QOM_DEFAULTS[obj.qom_type]
        if prop not in defaults:
            raise GenericError(f"Property '{obj.qom_type}.{prop}' not found")
        return obj.props.get(prop, defaults[prop])

    def secret(self, oid: str) -> Secret | None:
        obj = self.objects.get(oid)
        return obj if isinstance(obj, Secret) else None
