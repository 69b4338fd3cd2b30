# SPDX-License-Identifier: GPL-2.0-or-later
"""``qsd``: the qemu-storage-daemon 7.2 command line.

Users swap ``qemu-storage-daemon`` for ``qsd`` in scripts and unit files, so
this module reproduces QSD's observable command line (options, their order,
messages, exit codes), not its code:

* The command line is read twice, like QSD does.  The first pass is
  getopt_long's: unknown options and missing arguments fail there, ``-h`` and
  ``-V`` answer there, and ``--daemonize``/``--pidfile`` are noted.  The
  second pass applies ``--blockdev``, ``--chardev``, ``--monitor``,
  ``--nbd-server``, ``--export``, ``--object`` and ``-T`` strictly left to
  right; the first failure prints ``qsd: OPTION ARG: message`` and exits 1.
* Then the pidfile is written (and locked), a ``--daemonize`` parent is told
  that startup worked, monitors start serving, and systemd hears ``READY=1``.
* SIGTERM, SIGINT, SIGHUP and QMP ``quit`` shut down cleanly with status 0.
"""

from __future__ import annotations

import asyncio
import fcntl
import fnmatch
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

from qsd import QEMU_VERSION, __version__
from qsd.chardev import BACKENDS, OPTION_TYPES, open_chardev
from qsd.qmp.errors import QMPError
from qsd.sockets import unlink_if_same

if TYPE_CHECKING:
    from qsd.daemon import Daemon

PROG = "qsd"
log = logging.getLogger("qsd")


# ---------------------------------------------------------------------------
# Output helpers


def _stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


class _Exit(Exception):
    """Leave the program with ``code`` (after cleaning up what startup made)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _fail(message: str, location: str | None = None) -> NoReturn:
    _stderr(f"{PROG}: {message}" if location is None else f"{PROG}: {location}: {message}")
    raise _Exit(1)


# ---------------------------------------------------------------------------
# Pass 1: getopt_long with QSD's option table ("-hT:V" plus long options)

#: long option name -> takes an argument
LONG_OPTIONS: dict[str, bool] = {
    "blockdev": True, "chardev": True, "daemonize": False, "export": True, "help": False,
    "monitor": True, "nbd-server": True, "object": True, "pidfile": True, "trace": True,
    "version": False,
}
_SHORT = {"h": "help", "V": "version", "T": "trace"}


@dataclass
class Item:
    """One option (or stray argument) of pass 2, with its text for error lines."""

    name: str          # long option name, or "" for a stray argument
    arg: str
    location: str      # the argv words as given: "--blockdev x", "--blockdev=x", "-Tx"


@dataclass
class CommandLine:
    items: list[Item] = field(default_factory=list)
    daemonize: bool = False
    pidfile: str | None = None


def _getopt_error(message: str) -> NoReturn:
    _stderr(f"{PROG}: {message}")
    raise _Exit(1)


def _long_option(argv: list[str], i: int) -> tuple[str, str | None, int, str]:
    """Match ``argv[i]`` (``--name[=value]``); returns name, value, next index, location."""
    word = argv[i]
    body = word[2:]
    typed, eq, value = body.partition("=")
    if typed in LONG_OPTIONS:
        name = typed
    else:
        matches = [n for n in LONG_OPTIONS if n.startswith(typed)]
        if len(matches) != 1:
            if matches:
                _getopt_error(f"option '{word}' is ambiguous; possibilities:"
                              + "".join(f" '--{n}'" for n in matches))
            _getopt_error(f"unrecognized option '{word}'")
        name = matches[0]
    if not LONG_OPTIONS[name]:
        if eq:
            _getopt_error(f"option '--{name}' doesn't allow an argument")
        return name, None, i + 1, word
    if eq:
        return name, value, i + 1, word
    if i + 1 >= len(argv):
        _getopt_error(f"option '--{name}' requires an argument")
    return name, argv[i + 1], i + 2, f"{word} {argv[i + 1]}"


def parse_command_line(argv: list[str]) -> CommandLine:
    """Pass 1: getopt errors, ``-h``, ``-V``; everything else is kept in order."""
    cmdline = CommandLine()
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            break
        if word.startswith("--"):
            name, value, i, location = _long_option(argv, i)
            _take(cmdline, name, value, location)
            continue
        if len(word) < 2 or not word.startswith("-"):
            cmdline.items.append(Item("", word, word))
            i += 1
            continue
        j = 1
        i += 1
        while j < len(word):
            letter = word[j]
            j += 1
            if letter not in _SHORT:
                _getopt_error(f"invalid option -- '{letter}'")
            if letter != "T":
                _take(cmdline, _SHORT[letter], None, word)
                continue
            if j < len(word):
                _take(cmdline, "trace", word[j:], word)
            elif i < len(argv):
                _take(cmdline, "trace", argv[i], f"{word} {argv[i]}")
                i += 1
            else:
                _getopt_error("option requires an argument -- 'T'")
            break
    return cmdline


def _take(cmdline: CommandLine, name: str, value: str | None, location: str) -> None:
    if name == "help":
        _stdout(help_text())
        raise _Exit(0)
    if name == "version":
        _stdout(version_text())
        raise _Exit(0)
    if name == "daemonize":
        cmdline.daemonize = True
    elif name == "pidfile":
        cmdline.pidfile = value
    else:
        assert value is not None
        cmdline.items.append(Item(name, value, location))


def version_text() -> str:
    qemu = f"{QEMU_VERSION['major']}.{QEMU_VERSION['minor']}"
    return (f"{PROG} version {__version__} (qemu-storage-daemon {qemu} compatible)\n"
            "Copyright (c) 2024-2025 the qsd authors; licensed under GPL-2.0-or-later\n")


_EXPORT_HELP = {
    "nbd": """\
  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,bitmaps.0=<name>]
                         export the specified block node over NBD
                         (requires --nbd-server)
""",
    "fuse": """\
  --export [type=]fuse,id=<id>,node-name=<node-name>,mountpoint=<file>
           [,growable=on|off][,writable=on|off][,allow-other=on|off|auto]
                         export the specified block node over FUSE
""",
    "vhost-user-blk": """\
  --export [type=]vhost-user-blk,id=<id>,node-name=<node-name>,
           addr.type=unix,addr.path=<socket-path>[,writable=on|off]
           [,logical-block-size=<block-size>][,num-queues=<num-queues>]
                         export the specified block node as a
                         vhost-user-blk device over UNIX domain socket
  --export [type=]vhost-user-blk,id=<id>,node-name=<node-name>,
           addr.type=fd,addr.str=<fd>[,writable=on|off]
           [,logical-block-size=<block-size>][,num-queues=<num-queues>]
                         export the specified block node as a
                         vhost-user-blk device over file descriptor
""",
}


def help_text() -> str:
    """Usage in QSD's layout; export types are those this qsd has."""
    export_types = _tag_values("BlockExportOptions")
    exports = "\n".join(text for kind, text in _EXPORT_HELP.items() if kind in export_types)
    return f"""\
Usage: {PROG} [options]
qsd: a storage daemon compatible with qemu-storage-daemon 7.2

  -h, --help             display this help and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         specify tracing options
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,driver specific parameters...]
                         configure a block backend

  --chardev <options>    configure a character device backend
                         (socket, stdio, file, null or ringbuf)

  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete

{exports}
  --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                         configure a QMP monitor

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
                         start an NBD server for exporting block nodes

  --object help          list object types that can be added
  --object <type>,help   list properties for the given object type
  --object <type>[,<property>=<value>...]
                         create a new object of type <type>, setting
                         properties in the order they are specified. Note
                         that the 'id' property must be set.

  --pidfile <path>       write process ID to a file after startup

qsd speaks qemu-storage-daemon's command line and QMP; see its manual.
"""


# ---------------------------------------------------------------------------
# QemuOpts: the older option syntax of --chardev and -T

_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")
_BOOL_WORDS = {"on": True, "yes": True, "true": True, "y": True,
               "off": False, "no": False, "false": False, "n": False}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|0[xX][0-9a-fA-F]+)([bBkKmMgGtTpPeE]?)\Z")
_SIZE_SHIFT = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_HELP_WORDS = ("help", "?")


def _opt_value(text: str, pos: int) -> tuple[str, int]:
    """A value up to the next single comma; ``,,`` is a literal comma."""
    out = []
    while pos < len(text):
        if text[pos] == ",":
            if text.startswith(",,", pos):
                out.append(",")
                pos += 2
                continue
            break
        out.append(text[pos])
        pos += 1
    return "".join(out), pos


def _opt_items(text: str, implied: str | None) -> list[tuple[str, str, bool]]:
    """Split QemuOpts text into (key, value, was it a bare flag) in order.

    With ``implied``, the first item may leave out its key (``socket,...``);
    its value runs to the first single comma, so ``socket,,id=c`` names the
    backend ``socket,id=c``.  QEMU looks for the id without an implied key,
    where the same text is a flag, an empty flag and ``id=c``.
    """
    items = []
    pos = 0
    while pos < len(text):
        start = name_end = pos
        while name_end < len(text) and text[name_end] not in "=,":
            name_end += 1
        if name_end < len(text) and text[name_end] == "=":
            value, pos = _opt_value(text, name_end + 1)
            items.append((text[start:name_end], value, False))
        elif start == 0 and implied is not None:
            value, pos = _opt_value(text, 0)
            items.append((implied, value, False))
        else:
            items.append((text[start:name_end], "", True))
            pos = name_end
        pos += 1                 # the separating comma
    return items


def _c_unsigned(text: str) -> int | None:
    """strtoull with base 0, whole string: decimal, 0x hex or 0 octal."""
    for pattern, base in ((r"0[xX][0-9a-fA-F]+\Z", 16), (r"0[0-7]*\Z", 8), (r"[1-9][0-9]*\Z", 10)):
        if re.match(pattern, text):
            value = int(text, base)
            return value if value < 1 << 64 else None
    return None


def _size(text: str) -> int | None:
    match = _SIZE.match(text)
    if match is None:
        return None
    number, suffix = match.groups()
    shift = _SIZE_SHIFT[suffix.lower()]
    if number.lower().startswith("0x"):
        value = int(number, 16) << shift
    elif "." in number and suffix:
        value = int(float(number) * (1 << shift))
    elif "." in number:
        return None
    else:
        value = int(number) << shift
    return value if value < 1 << 64 else None


def _typed_opt(key: str, value: str, kind: str) -> Any:
    if kind == "bool":
        if value not in _BOOL_WORDS:
            raise QMPError(f"Parameter '{key}' expects 'on' or 'off'")
        return _BOOL_WORDS[value]
    if kind == "number":
        number = _c_unsigned(value)
        if number is None:
            raise QMPError(f"Parameter '{key}' expects a number")
        return number
    if kind == "size":
        size = _size(value)
        if size is None:
            raise QMPError(f"Parameter '{key}' expects a non-negative number below 2^64\n"
                           "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
                           "and exabytes, respectively.")
        return size
    return value


@dataclass
class QemuOpts:
    """A parsed QemuOpts argument: ``id``, typed values, and whether help was asked."""

    id: str | None
    values: dict[str, Any]
    help: bool = False


def parse_qemu_opts(text: str, implied: str, types: Mapping[str, str],
                    warn: Callable[[str], None]) -> QemuOpts:
    """QemuOpts as QEMU 7.2 reads it: the id first, then items in order.

    A bare ``flag`` is ``flag=on`` (``noflag`` is ``flag=off``) with a
    deprecation warning; later values of a key replace earlier ones; the first
    ``id=`` wins; a bare ``help`` stops parsing and asks for the option list.
    """
    opt_id = next((value for key, value, bare in _opt_items(text, None) if key == "id" and not bare), None)
    if opt_id is not None and not _IDENTIFIER.match(opt_id):
        raise QMPError("Parameter 'id' expects an identifier\n"
                       "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.")
    values: dict[str, Any] = {}
    for key, value, bare in _opt_items(text, implied):
        if bare:
            if key in _HELP_WORDS:
                return QemuOpts(opt_id, values, help=True)
            raw = key
            key, value = (key[2:], "off") if key.startswith("no") else (key, "on")
            warn(f"warning: short-form boolean option '{raw}' deprecated\n"
                 f"Please use {key}={value} instead")
        if key == "id":
            continue
        kind = types.get(key)
        if kind is None:
            raise QMPError(f"Invalid parameter '{key}'")
        values[key] = _typed_opt(key, value, kind)
    return QemuOpts(opt_id, values)


def qemu_opts_help(list_name: str, types: Mapping[str, str]) -> str:
    labels = {"bool": "bool (on/off)", "number": "num", "size": "size", "str": "str"}
    return f"{list_name} options:\n" + "".join(
        f"  {key}=<{labels[types[key]]}>\n" for key in sorted(types))


# ---------------------------------------------------------------------------
# The JSON form of --blockdev, --monitor, --nbd-server, --export, --object


def _parse_json_argument(text: str) -> dict[str, Any]:
    """Exactly one JSON object, with QEMU's parser and its messages."""
    from qsd.qmp.jsonstream import JSONStreamParser, ParseError

    class _ArgumentParser(JSONStreamParser):
        """Adds the end of input, which a QMP stream never has."""

        def parse_all(self, data: bytes) -> list[object]:
            items = self.feed(data)
            if self._tok[:1] in (b'"', b"'"):
                items += self.feed(b"\0")   # as QEMU: an unfinished string is a stray token
            elif self._tok:
                items += self.feed(b" ")    # ends a trailing number or keyword
            if self._count:                 # tokens of a value that never finished
                items.append(ParseError(self._failed or "JSON parse error, premature EOI"))
            return items

    items = _ArgumentParser().parse_all(text.encode("utf-8", "surrogateescape"))
    first = items[0] if items else ParseError("JSON parse error, premature EOI")
    if isinstance(first, ParseError):
        raise QMPError(first.desc)
    if len(items) > 1:
        raise QMPError("Expecting at most one JSON value")
    assert isinstance(first, dict)
    return first


def _structured(text: str, type_name: str, implied: str | None) -> dict[str, Any]:
    """Keyval or JSON text to a value of ``type_name``, checked by the schema."""
    from qsd.cli import keyval
    from qsd.schema import get_schema

    schema = get_schema()
    if text.startswith("{"):
        return schema.validate_type(type_name, _parse_json_argument(text))
    return schema.coerce_keyval(type_name, keyval.parse(text, implied))


def _union(type_name: str) -> Any:
    """A union type of the schema (an object with a tag and variants)."""
    from qsd.schema import get_schema

    return get_schema().types[type_name]


def _tag_values(type_name: str) -> list[str]:
    """The values of a union's tag (object types, export types) in the schema."""
    union = _union(type_name)
    return next(m.type.names() for m in union.members if m.name == union.tag)


def _object_help(text: str) -> str:
    """``--object help`` / ``--object TYPE,help``, limited to what qsd creates."""
    from qsd.cli import keyval

    from qsd.objects import NOT_CREATABLE

    types = sorted(t for t in _tag_values("ObjectOptions") if t not in NOT_CREATABLE)
    try:
        wanted = keyval.parse(text, "qom-type", allow_help=True).get("qom-type")
    except QMPError:
        wanted = None
    if wanted not in types:
        return "List of user creatable objects:\n" + "".join(f"  {t}\n" for t in types)
    branch = _union("ObjectOptions").variants[wanted]
    members = sorted((m for m in branch.members if "deprecated" not in m.features),
                     key=lambda m: m.name)
    return f"{wanted} options:\n" + "".join(f"  {m.name}=<{_property_type(m.type)}>\n" for m in members)


def _property_type(typ: Any) -> str:
    """How QOM names a property's type in help listings."""
    kind = getattr(typ, "kind", None)
    if kind is None:
        return typ.name
    return {"str": "string", "bool": "bool", "size": "size", "number": "number"}.get(
        kind, "int" if typ.bits == 64 else f"{kind}{typ.bits}_t")


def _file_warner(where: str) -> Callable[[str], None]:
    """Warnings about a line of a file: ``qsd:FILE:LINE: message``, as QEMU prints them."""
    return lambda message: _stderr(f"{PROG}:{where}: {message}")


# ---------------------------------------------------------------------------
# Tracing (-T): qsd's trace events are its loggers


TRACE_OPTION_TYPES = {"enable": "str", "events": "str", "file": "str"}


class Tracing:
    """Maps QSD's trace options onto Python logging.

    The "events" are the names of qsd's loggers; enabling one logs it at
    DEBUG, to stderr or to the ``file=`` given.
    """

    def __init__(self) -> None:
        self.handler = logging.StreamHandler(sys.stderr)
        self.handler.setFormatter(logging.Formatter("%(process)d@%(created).6f:%(name)s %(message)s"))
        # Warnings and errors already reach stderr through the "qsd: " handler.
        self.handler.addFilter(lambda record: record.levelno < logging.WARNING)

    @staticmethod
    def events() -> list[str]:
        return sorted(name for name in logging.Logger.manager.loggerDict
                      if name == "qsd" or name.startswith("qsd."))

    def enable(self, pattern: str, warn: Callable[[str], None]) -> None:
        disable = pattern.startswith("-")
        pattern = pattern[1:] if disable else pattern
        names = [name for name in self.events() if fnmatch.fnmatchcase(name, pattern)]
        if not names and not any(c in pattern for c in "*?"):
            warn(f"warning: trace event '{pattern}' does not exist")
        for name in names:
            logger = logging.getLogger(name)
            if disable:
                logger.removeHandler(self.handler)
                logger.setLevel(logging.NOTSET)
            else:
                logger.setLevel(logging.DEBUG)
                if self.handler not in logger.handlers:
                    logger.addHandler(self.handler)

    def apply(self, text: str, location: str) -> None:
        def warn(message: str) -> None:
            _stderr(f"{PROG}: {location}: {message}")

        opts = parse_qemu_opts(text, "enable", TRACE_OPTION_TYPES, warn)
        if opts.help:
            _stdout(qemu_opts_help("trace", TRACE_OPTION_TYPES))
            raise _Exit(1)
        enable, events, path = (opts.values.get(k) for k in ("enable", "events", "file"))
        if enable == "help":
            _stdout("".join(f"{name}\n" for name in self.events()))
            raise _Exit(0)
        if enable is not None:
            self.enable(enable, warn)
        if events is not None:
            self._enable_from_file(events)
        if path is not None:
            try:
                stream = open(path, "w", encoding="utf-8")  # noqa: SIM115 -- open until exit
            except OSError as err:
                raise QMPError(f"Error opening logfile {path}: {os.strerror(err.errno or 0)}") from None
            self.handler.setStream(stream)

    def _enable_from_file(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as events:
                lines = events.read().splitlines()
        except OSError as err:
            _stderr(f"{PROG}:{path}: {os.strerror(err.errno or 0)}")
            raise _Exit(1) from None
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                self.enable(line, _file_warner(f"{path}:{number}"))


# ---------------------------------------------------------------------------
# Pass 2: applying the options


class Startup:
    """Applies the pass-2 options to a daemon, strictly in order."""

    def __init__(self, daemon: Daemon, cmdline: CommandLine) -> None:
        self.daemon = daemon
        self.cmdline = cmdline
        self.tracing = Tracing()

    async def run(self) -> None:
        for item in self.cmdline.items:
            try:
                await self.apply(item)
            except QMPError as err:
                _fail(err.desc, item.location)

    async def apply(self, item: Item) -> None:
        if item.name == "":
            raise QMPError("Unexpected argument")
        if item.name == "trace":
            self.tracing.apply(item.arg, item.location)
        elif item.name == "chardev":
            await self.chardev(item)
        elif item.name == "monitor":
            await self.monitor(item.arg)
        elif item.name == "object":
            await self.object(item.arg)
        elif item.name == "blockdev":
            await self.daemon.execute("blockdev-add", _structured(item.arg, "BlockdevOptions", "driver"))
        elif item.name == "export":
            await self.daemon.execute("block-export-add",
                                      _structured(item.arg, "BlockExportOptions", "type"))
        else:
            await self.nbd_server(item.arg)

    async def chardev(self, item: Item) -> None:
        def say(message: str) -> None:
            _stderr(f"{PROG}: {item.location}: {message}")

        opts = parse_qemu_opts(item.arg, "backend", OPTION_TYPES, say)
        if opts.help:
            _stdout(qemu_opts_help("chardev", OPTION_TYPES))
            raise _Exit(1)
        backend = opts.values.pop("backend", None)
        if backend in _HELP_WORDS:
            _stdout("Available chardev backend types: \n" + "".join(f"  {b}\n" for b in BACKENDS))
            raise _Exit(0)
        if opts.id is None:
            raise QMPError("chardev: no id specified")
        if backend is None:
            raise QMPError(f'chardev: "{opts.id}" missing backend')
        chardevs = self.daemon.chardevs
        chardevs[opts.id] = await open_chardev(opts.id, backend, opts.values, existing=chardevs,
                                               daemonize=self.cmdline.daemonize, held=True,
                                               info=say)

    async def monitor(self, text: str) -> None:
        opts = _structured(text, "MonitorOptions", "chardev")
        chardev = self.daemon.chardevs.get(opts["chardev"])
        if chardev is None:
            raise QMPError(f'chardev "{opts["chardev"]}" not found')
        if opts.get("mode", "control") != "control":
            raise QMPError("Only QMP is supported")
        await self.daemon.add_monitor(chardev, opts.get("pretty", False))

    async def object(self, text: str) -> None:
        from qsd.cli import keyval

        if not text.startswith("{") and keyval.is_help(text, "qom-type"):
            _stdout(_object_help(text))
            raise _Exit(0)
        await self.daemon.execute("object-add", _structured(text, "ObjectOptions", "qom-type"))

    async def nbd_server(self, text: str) -> None:
        """--nbd-server takes the flat SocketAddress; nbd-server-start the legacy one."""
        opts = _structured(text, "NbdServerOptions", None)
        addr = opts.pop("addr")
        legacy = {"type": addr["type"], "data": {k: v for k, v in addr.items() if k != "type"}}
        await self.daemon.execute("nbd-server-start", {"addr": legacy, **opts})


# ---------------------------------------------------------------------------
# Pidfile, daemonizing, systemd notification


class PidFile:
    """QSD's pidfile: ``<pid>\\n``, locked with lockf while we run, removed at exit."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._identity: tuple[str, int, int] | None = None

    def write(self) -> None:
        path = self.path
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as err:
                raise QMPError(f"cannot create PID file: Could not create '{path}': "
                               f"{os.strerror(err.errno or 0)}") from None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                mine, there = os.fstat(fd), os.stat(path)
            except OSError as err:
                os.close(fd)
                if isinstance(err, FileNotFoundError):
                    continue        # removed by its previous owner meanwhile: again
                raise QMPError("cannot create PID file: Cannot lock pid file: "
                               f"{os.strerror(err.errno or 0)}") from None
            if (mine.st_dev, mine.st_ino) != (there.st_dev, there.st_ino):
                os.close(fd)        # replaced meanwhile: lock the new one
                continue
            break
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        self._identity = (os.path.abspath(path), mine.st_dev, mine.st_ino)

    def remove(self) -> None:
        if self._identity is not None:
            unlink_if_same(*self._identity)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = self._identity = None


def sd_notify(state: str) -> None:
    """Tell the service manager about our state, if it asked (``NOTIFY_SOCKET``)."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as err:
        log.warning("cannot notify the service manager: %s", err)


def daemonize() -> int:
    """Detach (python-daemon); the original process stays until startup is done.

    Returns, in the daemon, the pipe on which to report readiness.  The
    original process exits 0 when it reads that report and 1 when the pipe
    closes without it; the daemon's error messages reach the same stderr.
    """
    import daemon as python_daemon

    sys.stdout.flush()
    sys.stderr.flush()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(ready_w)
        status = os.read(ready_r, 1)
        os.waitpid(pid, 0)
        os._exit(0 if status == b"1" else 1)
    os.close(ready_r)
    context = python_daemon.DaemonContext(
        working_directory=os.getcwd(),      # relative paths of the options still work
        umask=0o027,
        detach_process=True,
        prevent_core=False,
        files_preserve=[ready_w],
        stdout=sys.stdout,                  # until startup is complete, as QSD
        stderr=sys.stderr,
        signal_map={signal.SIGTSTP: None, signal.SIGTTIN: None, signal.SIGTTOU: None},
    )
    context.open()
    return ready_w


def report_ready(ready_w: int) -> None:
    """Daemon startup is done: let go of the terminal and the waiting parent."""
    sys.stdout.flush()
    sys.stderr.flush()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    os.chdir("/")
    os.write(ready_w, b"1")
    os.close(ready_w)


# ---------------------------------------------------------------------------
# Running


async def run_daemon(cmdline: CommandLine, ready_w: int | None) -> int:
    """Pass 2, then serve until a signal or ``quit``; returns the exit status."""
    from qsd.daemon import Daemon

    daemon = Daemon()
    loop = asyncio.get_running_loop()
    startup = asyncio.ensure_future(Startup(daemon, cmdline).run())

    def stop() -> None:
        if startup.done():
            daemon.request_shutdown()
        else:
            startup.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signum, stop)
    pidfile = PidFile(cmdline.pidfile) if cmdline.pidfile is not None else None
    try:
        await startup
        if pidfile is not None:
            try:
                pidfile.write()
            except QMPError as err:
                _fail(err.desc)
    except asyncio.CancelledError:      # a signal during startup
        await _shut_down(daemon)
        return 0
    except _Exit as ex:
        await _shut_down(daemon)
        return ex.code
    if ready_w is not None:
        report_ready(ready_w)
    for chardev in list(daemon.chardevs.values()):
        chardev.release()
    sd_notify(f"READY=1\nMAINPID={os.getpid()}" if ready_w is not None else "READY=1")
    await daemon.run_until_shutdown()
    sd_notify("STOPPING=1")
    await _shut_down(daemon)
    if pidfile is not None:
        pidfile.remove()
    return 0


async def _shut_down(daemon: Daemon) -> None:
    try:
        await daemon.shutdown()
    except Exception:
        log.exception("shutdown failed")


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    handler.setLevel(logging.WARNING)
    log.addHandler(handler)


def _open_standard_fds() -> None:
    """A closed fd 0, 1 or 2 becomes /dev/null, so no socket or file gets its number."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)      # the lowest free number: this one


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qsd`` console script and ``python -m qsd``."""
    _open_standard_fds()
    args = sys.argv[1:] if argv is None else argv
    try:
        cmdline = parse_command_line(args)
    except _Exit as ex:
        return ex.code
    _setup_logging()
    ready_w = daemonize() if cmdline.daemonize else None
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(run_daemon(cmdline, ready_w))
