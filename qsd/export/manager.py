# SPDX-License-Identifier: GPL-2.0-or-later
"""Block exports by id, and the one NBD server they may be served from.

An export is a root user of its node in the graph (QEMU's anonymous
BlockBackend): it takes consistent-read, plus write when writable, and
shares everything. The export types plug in below; only the bookkeeping
that all types share lives here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import partial
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from qsd.block.bitmap import DirtyBitmap
from qsd.block.graph import Edge
from qsd.block.node import Perm
from qsd.export.fuse import start_fuse
from qsd.export.nbd.contexts import AllocationDepth, DirtyBitmapContext, MetaContext, export_bitmaps
from qsd.export.nbd.server import NBDExportConfig, NBDServer
from qsd.export.vhost_user_blk import start_vhost_user_blk
from qsd.qmp.errors import GenericError

if TYPE_CHECKING:
    from qsd.daemon import Daemon

_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
NBD_MAX_STRING = 4096


@dataclass(eq=False)
class Export:
    id: str
    type: str
    node_name: str
    edge: Edge
    name: str
    shutting_down: bool = False
    #: Type-specific teardown (export types without a shared server).
    stop: Callable[[], Awaitable[None]] | None = None
    #: Dirty bitmaps exposed as NBD contexts: busy until the export is gone.
    bitmaps: list[DirtyBitmap] = field(default_factory=list)

    def info(self) -> dict[str, Any]:
        # The node the export serves now (a snapshot or pivot may have moved it).
        return {"id": self.id, "type": self.type, "node-name": self.edge.child.node_name,
                "shutting-down": self.shutting_down}


class ExportManager:
    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon
        self.exports: dict[str, Export] = {}
        self.nbd: NBDServer | None = None

    # ----- NBD server ----------------------------------------------------
    async def nbd_server_start(self, addr: dict[str, Any], tls_creds: str | None,
                               tls_authz: str | None, max_connections: int) -> None:
        """Start the server; ``addr`` is a flat SocketAddress."""
        if self.nbd is not None:
            raise GenericError("NBD server already running")
        ctx = None
        check = None
        if tls_creds is not None:
            creds = self.daemon.objects.tls_creds(tls_creds)
            if creds is None:
                if tls_creds in self.daemon.objects.objects:
                    raise GenericError(f"Object with id '{tls_creds}' is not TLS credentials")
                raise GenericError(f"No TLS credentials with id '{tls_creds}'")
            if not creds.is_server:
                raise GenericError("Expected TLS credentials for a server endpoint")
            ctx = creds.server_context()
            objects = self.daemon.objects
            # tls-authz names an object looked up at each handshake, as QEMU does.
            check = partial(creds.check_peer, authz_id=tls_authz, find_authz=objects.authz)
        server = NBDServer(max_connections=max_connections, tls_creds=ctx, tls_check=check)
        await server.start(addr)
        self.nbd = server

    async def nbd_server_stop(self) -> None:
        if self.nbd is None:
            raise GenericError("NBD server not running")
        for export in [e for e in self.exports.values() if e.type == "nbd"]:
            await self._remove(export)
        server, self.nbd = self.nbd, None
        await server.stop()

    async def stop_servers(self) -> None:
        """Shutdown: close the NBD server, leaving its socket file as QSD does."""
        if self.nbd is not None:
            server, self.nbd = self.nbd, None
            await server.stop(unlink=False)

    # ----- exports -----------------------------------------------------
    async def add(self, args: dict[str, Any]) -> None:
        """block-export-add, with QSD's order of checks."""
        eid = args["id"]
        if not _ID_RE.match(eid):
            raise GenericError("Invalid block export id")
        if eid in self.exports:
            raise GenericError(f"Block export id '{eid}' is already in use")
        node_name = args["node-name"]
        node = self.daemon.graph.find(node_name)
        writable = args.get("writable", False)
        if writable and node.read_only:
            raise GenericError("Cannot export read-only node as writable")
        if args.get("iothread") is not None and args["iothread"] not in self.daemon.objects.objects:
            raise GenericError(f"iothread \"{args['iothread']}\" not found")
        if args["type"] == "vhost-user-blk":
            edge, server = await start_vhost_user_blk(self.daemon, args, node)
            self.exports[eid] = Export(eid, args["type"], node_name, edge, eid, stop=server.stop)
            return
        if args["type"] == "fuse":
            edge, fuse = await start_fuse(self.daemon, args, node)
            self.exports[eid] = Export(eid, "fuse", node_name, edge, eid, stop=fuse.close)
            return
        if self.nbd is None:
            raise GenericError("NBD server not running")
        name = args.get("name", node_name)
        if len(name.encode()) > NBD_MAX_STRING:
            raise GenericError(f"export name '{name}' too long")
        description = args.get("description")
        if description is not None and len(description.encode()) > NBD_MAX_STRING:
            raise GenericError(f"description '{description}' too long")
        if self.nbd.has_export(name):
            raise GenericError(f"NBD server already has export named '{name}'")
        perm = Perm.CONSISTENT_READ | (Perm.WRITE if writable else Perm(0))
        # As QSD: nobody may resize a node while it is exported over NBD
        # (other processes see the resize lock byte unshared).
        edge = await self.daemon.graph.attach_user(node, f"export '{eid}'", perm,
                                                   Perm.all() & ~Perm.RESIZE)
        export = Export(eid, "nbd", node_name, edge, name)
        try:
            bitmaps = export_bitmaps(self.daemon.graph, node, args.get("bitmaps", []),
                                     writable)
            contexts: list[MetaContext] = []
            if args.get("allocation-depth", False):
                contexts.append(AllocationDepth())
            contexts += [DirtyBitmapContext(bm, i) for i, bm in enumerate(bitmaps)]
            self.nbd.add_export(NBDExportConfig(
                name=name, description=description or "", edge=edge, writable=writable,
                contexts=contexts))
        except BaseException:
            await self.daemon.graph.detach(edge)
            raise
        for bm in bitmaps:
            bm.busy = True
        export.bitmaps = bitmaps
        self.exports[eid] = export

    async def delete(self, eid: str, mode: str) -> None:
        export = self.exports.get(eid)
        if export is None:
            raise GenericError(f"Export '{eid}' is not found")
        if (mode == "safe" and export.type == "nbd" and self.nbd is not None
                and self.nbd.clients(export.name)):
            raise GenericError(f"export '{eid}' still in use")
        await self._remove(export)

    async def _remove(self, export: Export) -> None:
        export.shutting_down = True
        if export.stop is not None:
            await export.stop()
        if self.nbd is not None and export.type == "nbd":
            await self.nbd.remove_export(export.name)
        del self.exports[export.id]
        for bm in export.bitmaps:
            bm.busy = False
        await self.daemon.graph.detach(export.edge)
        self.daemon.emit_event("BLOCK_EXPORT_DELETED", {"id": export.id})

    async def remove_all(self) -> None:
        for export in list(self.exports.values()):
            await self._remove(export)

    def query(self) -> list[dict[str, Any]]:
        return [e.info() for e in reversed(list(self.exports.values()))]
