# SPDX-License-Identifier: GPL-2.0-or-later
"""Sans-IO QMP: one monitor connection as bytes in, requests and reply lines out.

Everything a QMP monitor answers without running a command lives here: the
greeting, JSON errors, the request envelope checks, capabilities negotiation
and unknown commands.  The server feeds received bytes, runs the
:class:`Execute` items it gets back (in order) and writes the ``bytes`` items
and its own :meth:`QMPConnection.reply`/:meth:`QMPConnection.error` lines.
Texts and check order follow qemu-storage-daemon 7.2 as recorded in
``reference/qsd-7.2/transcripts`` (a, a2, a3, k) and probed live.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qsd.qmp.errors import QMPError
from qsd.qmp.jsonstream import JSONStreamParser, ParseError, dumps
from qsd.qmp.keyorder import qemu_items
from qsd.schema.hashorder import first_unvisited

_CAPABILITIES = ("oob",)


@dataclass
class Execute:
    """A request the daemon must run (``arguments`` is None when absent)."""

    name: str
    arguments: dict | None
    id: object
    has_id: bool


class OOBReply(bytes):
    """A reply to an ``exec-oob`` request: QEMU sends it at once, ahead of queued in-band work."""


def _any_command(name: str) -> bool:
    return True


def _as_qobject(value: Any) -> Any:
    """Copy a value with its dicts in the order QEMU stores them.

    QEMU builds every output object as a QDict, so keys sharing a hash bucket
    come back in reverse insertion order; dumps() keeps the order it is given
    within a bucket. Client ids and everything the daemon builds (in schema
    member order) pass through here.
    Iterative, because ids may nest 1024 levels deep.
    """
    if type(value) is not dict and type(value) is not list:
        return value
    result: Any = {} if type(value) is dict else []
    stack: list[tuple[Any, Any]] = [(value, result)]
    while stack:
        src, dst = stack.pop()
        pairs = qemu_items(src) if type(src) is dict else enumerate(src)
        for key, item in pairs:
            if type(item) is dict or type(item) is list:
                copy: Any = {} if type(item) is dict else []
                stack.append((item, copy))
                item = copy
            if type(dst) is dict:
                dst[key] = item
            else:
                dst.append(item)
    return result


class QMPConnection:
    """The protocol state of one monitor connection."""

    def __init__(self, version: dict, package: str, pretty: bool = False,
                 command_exists: Callable[[str], bool] = _any_command) -> None:
        self._version = version
        self._package = package
        self._pretty = pretty
        self._command_exists = command_exists
        self._parser = JSONStreamParser()
        self._negotiated = False
        self._oob = False

    @property
    def negotiated(self) -> bool:
        """True once qmp_capabilities succeeded (commands and events flow)."""
        return self._negotiated

    @property
    def oob_enabled(self) -> bool:
        return self._oob

    # -- output -------------------------------------------------------------

    def _line(self, obj: dict) -> bytes:
        if self._pretty:
            return (dumps(obj, True).replace("\n", "\r\n") + "\r\n").encode("ascii")
        return (dumps(obj) + "\r\n").encode("ascii")

    def _error_line(self, has_id: bool, id_: object, error_class: str, desc: str) -> bytes:
        body = {"class": error_class, "desc": desc}
        if has_id:
            return self._line({"id": _as_qobject(id_), "error": body})
        return self._line({"error": body})

    def greeting(self) -> bytes:
        return self._line({"QMP": {"version": {"qemu": _as_qobject(self._version),
                                               "package": self._package},
                                   "capabilities": list(_CAPABILITIES)}})

    def reply(self, ex: Execute, value: object) -> bytes:
        """The success reply to ``ex``."""
        value = _as_qobject(value)
        if ex.has_id:
            return self._line({"return": value, "id": _as_qobject(ex.id)})
        return self._line({"return": value})

    def error(self, ex: Execute, err: QMPError) -> bytes:
        """The error reply to ``ex``."""
        return self._error_line(ex.has_id, ex.id, err.error_class, err.desc)

    def event(self, name: str, data: dict | None, seconds: int, microseconds: int) -> bytes | None:
        """An event line, or None while the client has not negotiated."""
        if not self._negotiated:
            return None
        msg: dict = {"timestamp": {"seconds": seconds, "microseconds": microseconds}, "event": name}
        if data is not None:
            msg["data"] = _as_qobject(data)
        return self._line(msg)

    # -- input --------------------------------------------------------------

    def feed(self, data: bytes) -> list[Execute | bytes]:
        """Consume received bytes; return requests to run and ready replies, in order.

        With oob negotiated, QEMU keeps reading while in-band requests wait
        in its queue and answers ``exec-oob`` requests at once, so their
        replies (:class:`OOBReply`) are placed ahead of the in-band items of
        the same call.  Without oob, QEMU reads nothing more until an in-band
        request is done, so nothing can overtake it.
        """
        out: list[Execute | bytes] = []
        barrier = 0
        for item in self._parser.feed(data):
            queued_with_oob = self._oob
            if isinstance(item, ParseError):
                result: Execute | bytes = self._error_line(False, None, QMPError.GENERIC, item.desc)
            else:
                result = self._request(item)
            if isinstance(result, OOBReply):
                out.insert(barrier, result)
                barrier += 1
                continue
            out.append(result)
            if not queued_with_oob:
                barrier = len(out)
        return out

    def _request(self, req: object) -> Execute | bytes:
        if type(req) is not dict:
            return self._error_line(False, None, QMPError.GENERIC, "QMP input must be a JSON object")
        has_id = "id" in req
        id_ = req.get("id")
        # QEMU runs a request at once when it has exec-oob and no execute; with
        # oob negotiated nothing holds its reply back behind queued requests.
        reply_type = OOBReply if self._oob and "exec-oob" in req and "execute" not in req else bytes

        def fail(desc: str, error_class: str = QMPError.GENERIC) -> bytes:
            if error_class == QMPError.COMMAND_NOT_FOUND and not self._negotiated:
                desc = "Expecting capabilities negotiation with 'qmp_capabilities'"
            return reply_type(self._error_line(has_id, id_, error_class, desc))

        # The envelope is checked member by member in QEMU's dict order.
        exec_key = None
        for key, value in qemu_items(req):
            if key == "execute" or (key == "exec-oob" and self._oob):
                if type(value) is not str:
                    return fail(f"QMP input member '{key}' must be a string")
                if exec_key is not None:
                    return fail(f"QMP input member '{key}' clashes with '{exec_key}'")
                exec_key = key
            elif key == "arguments":
                if type(value) is not dict:
                    return fail("QMP input member 'arguments' must be an object")
            elif key != "id":
                return fail(f"QMP input member '{key}' is unexpected")
        if exec_key is None:
            return fail("QMP input lacks member 'execute'")

        name: str = req[exec_key]
        exists = name == "qmp_capabilities" or (self._negotiated and self._command_exists(name))
        if not exists:
            return fail(f"The command {name} has not been found", QMPError.COMMAND_NOT_FOUND)
        if exec_key == "exec-oob":
            # No qemu-storage-daemon 7.2 command allows out-of-band execution.
            return fail(f"The command {name} does not support OOB")
        arguments = req.get("arguments")
        if name != "qmp_capabilities":
            return Execute(name, arguments, id_, has_id)

        problem = self._check_capabilities_arguments(arguments or {})
        if problem is not None:
            return fail(problem)
        if self._negotiated:
            return fail("Capabilities negotiation is already complete, command ignored",
                        QMPError.COMMAND_NOT_FOUND)
        self._negotiated = True
        self._oob = "oob" in (arguments or {}).get("enable", ())
        return self._line({"return": {}, "id": _as_qobject(id_)} if has_id else {"return": {}})

    @staticmethod
    def _check_capabilities_arguments(arguments: dict) -> str | None:
        """QAPI's verdict on qmp_capabilities' ``{'*enable': ['QMPCapability']}``."""
        if "enable" in arguments:
            enable = arguments["enable"]
            if type(enable) is not list:
                return "Invalid parameter type for 'enable', expected: array"
            for index, cap in enumerate(enable):
                if type(cap) is not str:
                    return f"Invalid parameter type for 'enable[{index}]', expected: string"
                if cap not in _CAPABILITIES:
                    # QEMU names list elements 'null' in this message (sic).
                    return f"Parameter 'null' does not accept value '{cap}'"
        extra = first_unvisited(list(arguments), ["enable"])
        if extra is not None:
            return f"Parameter '{extra}' is unexpected"
        return None
