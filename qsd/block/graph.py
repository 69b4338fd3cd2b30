# SPDX-License-Identifier: GPL-2.0-or-later
"""The node graph: named nodes, child edges with permissions, ownership.

Every user of a node is an :class:`Edge`: a parent node's child link
(``file``, ``backing``, ...) or a *root user* such as an export or a job,
which QEMU models as an anonymous BlockBackend. Each edge carries the
permissions the user takes and those it shares. Permission changes are
planned for the whole affected subgraph, checked (conflicts between users of
one node, then protocol nodes' image locks), and only then applied, so a
failed attach leaves nothing changed.
"""

from __future__ import annotations

import random
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Iterable

from qsd.block.node import DRIVERS, PERM_NAMES, Node, Perm, Role
from qsd.qmp.errors import GenericError, QMPError

if TYPE_CHECKING:
    from qsd.objects import ObjectRegistry

_NODE_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
NODE_NAME_MAX = 31


def perm_names(perm: Perm) -> str:
    return ", ".join(name for bit, name in PERM_NAMES.items() if perm & bit)


def inherited_options(parent: Node, options: dict[str, Any], role: Role) -> dict[str, Any]:
    """Options an inline child takes from its parent where it sets none itself,
    as QEMU's block layer hands them down: read-only (always, for a backing
    child), auto-read-only, the cache mode, and ``discard=unmap`` (each node
    still decides for itself whether it passes discards on)."""
    child = dict(options)
    child.setdefault("discard", "unmap")
    if Role.COW in role:
        child.setdefault("read-only", True)
    for key in ("read-only", "auto-read-only"):
        if key in parent.options:
            child.setdefault(key, parent.options[key])
    if "cache" in parent.options:
        child["cache"] = {**parent.options["cache"], **child.get("cache", {})}
    return child


@dataclass(eq=False)
class Edge:
    """One user of ``child``: a parent node's child link or a root user."""

    child: Node
    name: str
    role: Role
    perm: Perm
    shared: Perm
    parent: Node | None = None
    #: Description of a root user for error texts ("export 'e0'", ...).
    user_desc: str = ""
    #: Op blocker reason shown by blockdev-del while this edge exists.
    blocker: str | None = None

    def parent_desc(self) -> str:
        if self.parent is not None:
            return f"node '{self.parent.node_name}'"
        return self.user_desc

    # I/O of a root user (QEMU's BlockBackend): requests wait while a drained
    # section is open on the child and then go to whatever node the edge
    # points at by then, so a graph change made while drained (a pivot, a
    # snapshot) is seen by every later request. Not coroutines themselves:
    # without a drained section they cost no extra frame.
    def write(self, offset: int, data: bytes | bytearray | memoryview,
              fua: bool = False) -> Awaitable[None]:
        if self.child.quiesce_count:
            return self._gated("write", offset, data, fua)
        return self.child.write(offset, data, fua)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                     fua: bool = False, no_fallback: bool = False) -> Awaitable[None]:
        if self.child.quiesce_count:
            return self._gated("write_zeroes", offset, length, may_unmap, fua, no_fallback)
        return self.child.write_zeroes(offset, length, may_unmap, fua, no_fallback)

    def discard(self, offset: int, length: int) -> Awaitable[None]:
        if self.child.quiesce_count:
            return self._gated("discard", offset, length)
        return self.child.discard(offset, length)

    def read_into(self, offset: int, buf: memoryview) -> Awaitable[None]:
        if self.child.quiesce_count:
            return self._gated("read_into", offset, buf)
        return self.child.read_into(offset, buf)

    def flush(self) -> Awaitable[None]:
        if self.child.quiesce_count:
            return self._gated("flush")
        return self.child.flush()

    async def _gated(self, method: str, *args: Any) -> None:
        while self.child.quiesce_count:
            await self.child.wait_unquiesced()
        await getattr(self.child, method)(*args)


@dataclass
class _Plan:
    """Permissions planned for edges and nodes before they are applied."""

    edges: dict[Edge, tuple[Perm, Perm]] = field(default_factory=dict)
    removed: set[Edge] = field(default_factory=set)
    added: list[Edge] = field(default_factory=list)

    def perms(self, edge: Edge) -> tuple[Perm, Perm]:
        return self.edges.get(edge, (edge.perm, edge.shared))


class Graph:
    """All nodes of the daemon, by name, most recently created last."""

    def __init__(self, objects: "ObjectRegistry | None" = None) -> None:
        self.nodes: dict[str, Node] = {}
        self._generated = 0
        #: The daemon's objects, for drivers that open with secrets (luks).
        self.objects = objects
        #: How drivers send QMP events (qcow2's BLOCK_IMAGE_CORRUPTED); the
        #: daemon connects it to its monitors.
        self.emit_event: Callable[[str, dict[str, Any]], None] = lambda name, data: None

    # ----- names -------------------------------------------------------
    def generate_name(self) -> str:
        """QEMU's shape: a running counter followed by two random digits."""
        name = f"#block{self._generated}{random.randrange(100):02d}"
        self._generated += 1
        return name

    @staticmethod
    def check_node_name(name: str) -> None:
        if not _NODE_NAME_RE.match(name):
            raise GenericError(f"Invalid node-name: '{name}'")
        if len(name) > NODE_NAME_MAX:
            raise GenericError("Node name too long")

    def lookup(self, name: str) -> Node | None:
        return self.nodes.get(name)

    def find(self, name: str, device: str | None = "") -> Node:
        """Look a node up the way QSD commands with device/node-name do."""
        node = self.nodes.get(name)
        if node is None:
            dev = name if device is None else device
            raise GenericError(f"Cannot find device='{dev}' nor node-name='{name}'")
        return node

    # ----- opening -----------------------------------------------------
    async def add(self, options: dict[str, Any]) -> Node:
        """blockdev-add: open a monitor-owned node and its inline children."""
        if "node-name" not in options:
            raise GenericError("'node-name' must be specified for the root node")
        node = await self.open_node(options)
        node.monitor_owned = True
        return node

    async def open_node(self, options: dict[str, Any]) -> Node:
        name = options.get("node-name")
        generated = name is None
        if generated:
            name = self.generate_name()
        else:
            self.check_node_name(name)
            if name in self.nodes:
                raise GenericError(f"Duplicate nodes with node-name='{name}'")
        cls = DRIVERS.get(options["driver"])
        if cls is None:
            raise GenericError(f"Parameter 'driver' does not accept value '{options['driver']}'")
        node = cls(self, name, options, generated_name=generated)
        try:
            await node.open(options)
            self.check_own_perms(node)
        except BaseException:
            if self.nodes.get(name) is node:
                del self.nodes[name]
            await self._abort_open(node)
            raise
        self.nodes[name] = node
        return node

    async def _abort_open(self, node: Node) -> None:
        for edge in list(node.children.values()):
            await self.detach(edge)
        await node.close()

    async def open_child(self, parent: Node, name: str, ref: Any, role: Role) -> Node:
        """Attach a child given inline (dict) or by node-name reference (str)."""
        if name != "file" and parent.node_name not in self.nodes:
            # QEMU names a node once its "file" is open (probing opens that
            # first) and before the driver opens any other child, which
            # decides the order of query-named-block-nodes.
            self.nodes[parent.node_name] = parent
        if isinstance(ref, str):
            child = self.nodes.get(ref)
            if child is None:
                raise GenericError(f"Cannot find device='{ref}' nor node-name='{ref}'")
            await self.attach(parent, name, child, role)
            return child
        child = await self.open_node(inherited_options(parent, ref, role))
        try:
            await self.attach(parent, name, child, role)
        except BaseException:
            if not child.parents and not child.monitor_owned:
                await self.close_node(child)
            raise
        return child

    # ----- edges ---------------------------------------------------------
    async def attach(self, parent: Node, name: str, child: Node, role: Role) -> Edge:
        """Attach ``child`` under ``parent`` as ``name`` with derived permissions."""
        edge = Edge(child=child, name=name, role=role, perm=Perm(0), shared=Perm.all(),
                    parent=parent)
        if name == "backing":
            edge.blocker = f"node is used as backing hd of '{parent.node_name}'"
        perm, shared = parent.child_perm(edge, *self.cumulative(parent))
        self._commit(self._plan_add(edge, perm, shared))
        parent.children[name] = edge
        return edge

    async def attach_user(self, child: Node, user_desc: str, perm: Perm, shared: Perm,
                          blocker: str | None = None) -> Edge:
        """Attach a root user (export, job) that takes ``perm`` and shares ``shared``."""
        edge = Edge(child=child, name="root", role=Role.DATA, perm=Perm(0),
                    shared=Perm.all(), user_desc=user_desc, blocker=blocker)
        self._commit(self._plan_add(edge, perm, shared))
        return edge

    async def detach(self, edge: Edge) -> None:
        """Remove a user; a child left without users or owner is closed."""
        plan = _Plan(removed={edge})
        self._propagate([edge.child], plan)
        self._commit(plan)
        child = edge.child
        if edge.parent is not None and edge.parent.children.get(edge.name) is edge:
            del edge.parent.children[edge.name]
        if not child.parents and not child.monitor_owned:
            await self.close_node(child)

    async def set_backing(self, parent: Node, child: Node | None, name: str = "backing",
                          check_only: bool = False) -> None:
        """QEMU's bdrv_set_backing_hd: point ``parent``'s backing edge (or
        child ``name``) at ``child`` (None drops it), permission-checked
        first; a former child left unused is closed. ``check_only`` only
        checks. Call it inside a drained section."""
        edge = parent.children.get(name)
        if check_only:
            if edge is not None and child is not None and edge.child is not child:
                self._move_edges([edge], edge.child, child, commit=False)
            return
        if child is None:
            if edge is not None:
                await self.detach(edge)
            return
        if edge is None:
            await self.attach(parent, name, child, Role.COW if name == "backing" else
                              parent.file_role)
            return
        old = edge.child
        if old is child:
            return
        self._move_edges([edge], old, child)
        if not old.parents and not old.monitor_owned:
            await self.close_node(old)

    def _move_edges(self, edges: list[Edge], old: Node, new: Node, commit: bool = True) -> None:
        """Point ``edges`` (users of ``old``) at ``new`` with both nodes'
        permissions planned and checked; on a conflict, or when only
        checking (``commit=False``), the edges are put back."""
        def repoint(src: Node, dst: Node) -> None:
            for edge in edges:
                src.parents.remove(edge)
                edge.child = dst
                dst.parents.append(edge)

        repoint(old, new)
        try:
            plan = _Plan()
            self._propagate([new, old], plan)
        except BaseException:
            repoint(new, old)
            raise
        if not commit:
            repoint(new, old)
            return
        self._commit(plan)
        for node in (old, new):
            node.set_perm(*self.cumulative(node))

    async def insert_filter(self, cls: type[Node], name: str | None, below: Node,
                            child: str = "backing") -> Node:
        """An internal filter node of class ``cls`` (named ``name``, or a
        generated name) over ``below``, as its ``child``; every user of
        ``below`` moves onto it inside a drained section (jobs' mirror_top
        and commit_top)."""
        generated = name is None
        node_name = self.generate_name() if name is None else name
        node = cls(self, node_name, {"driver": cls.driver}, generated_name=generated)
        await self.attach(node, child, below, node.file_role)
        try:
            async with self.drained(below):
                self.replace_node(below, node)
        except BaseException:
            await self.detach(node.children[child])
            raise
        self.nodes[node_name] = node
        return node

    def replace_node(self, old: Node, new: Node, exclude: Iterable[Edge] = ()) -> None:
        """QEMU's bdrv_replace_node: every user of ``old`` (but ``exclude`` and
        edges from ``new`` itself) becomes a user of ``new``, keeping its edge
        object (exports and parents keep their references). Checked first;
        on a conflict nothing changes. Call it inside a drained section."""
        skip = set(map(id, exclude))
        moved = [e for e in old.parents if id(e) not in skip and e.parent is not new]
        self._move_edges(moved, old, new)

    # ----- permission planning -------------------------------------------
    def cumulative(self, node: Node, plan: _Plan | None = None) -> tuple[Perm, Perm]:
        perm, shared = Perm(0), Perm.all()
        for edge in self._users(node, plan):
            p, s = plan.perms(edge) if plan else (edge.perm, edge.shared)
            perm |= p
            shared &= s
        return perm, shared

    @staticmethod
    def _users(node: Node, plan: _Plan | None) -> list[Edge]:
        users = list(node.parents)
        if plan:
            users = [e for e in users if e not in plan.removed]
            users += [e for e in plan.added if e.child is node and e not in users]
        return users

    def _plan_add(self, edge: Edge, perm: Perm, shared: Perm) -> _Plan:
        plan = _Plan(added=[edge])
        plan.edges[edge] = (perm, shared)
        self._propagate([edge.child], plan)
        return plan

    def _propagate(self, start: Iterable[Node], plan: _Plan) -> None:
        """Plan permissions downwards from ``start`` and check every node."""
        order = self._topological(start)
        for node in order:
            self._check_conflicts(node, plan)
            perm, shared = self.cumulative(node, plan)
            node.check_perm(perm, shared)
            for edge in node.children.values():
                if edge in plan.removed:
                    continue
                plan.edges[edge] = node.child_perm(edge, perm, shared)

    def _topological(self, start: Iterable[Node]) -> list[Node]:
        seen: set[int] = set()
        out: list[Node] = []

        def visit(node: Node) -> None:
            if id(node) in seen:
                return
            seen.add(id(node))
            for edge in node.children.values():
                visit(edge.child)
            out.append(node)

        for node in start:
            visit(node)
        out.reverse()
        return out

    def _check_conflicts(self, node: Node, plan: _Plan) -> None:
        users = self._users(node, plan)
        for a in users:
            a_perm, _ = plan.perms(a)
            for b in users:
                if a is b:
                    continue
                _, b_shared = plan.perms(b)
                clash = a_perm & ~b_shared
                if clash:
                    raise GenericError(
                        f"Permission conflict on node '{node.node_name}': permissions "
                        f"'{perm_names(clash)}' are both required by {a.parent_desc()} "
                        f"(uses node '{node.node_name}' as '{a.name}' child) and unshared by "
                        f"{b.parent_desc()} (uses node '{node.node_name}' as '{b.name}' child).")

    def check_own_perms(self, node: Node) -> None:
        """Re-derive a freshly opened node's child permissions (its flags are final now)."""
        plan = _Plan()
        self._propagate([node], plan)
        self._commit(plan)

    def _commit(self, plan: _Plan) -> None:
        touched: list[Node] = []
        for edge in plan.added:
            edge.child.parents.append(edge)
        for edge in plan.removed:
            if edge in edge.child.parents:
                edge.child.parents.remove(edge)
            touched.append(edge.child)
        for edge, (perm, shared) in plan.edges.items():
            edge.perm, edge.shared = perm, shared
            touched.append(edge.child)
        done: set[int] = set()
        for node in touched:
            if id(node) not in done:
                done.add(id(node))
                node.set_perm(*self.cumulative(node))

    # ----- drained sections ------------------------------------------------
    @staticmethod
    def _ancestors(node: Node) -> list[Node]:
        """``node`` and every node above it (the ones whose requests reach it)."""
        seen: dict[int, Node] = {}
        stack = [node]
        while stack:
            n = stack.pop()
            if id(n) not in seen:
                seen[id(n)] = n
                stack.extend(e.parent for e in n.parents if e.parent is not None)
        return list(seen.values())

    @asynccontextmanager
    async def drained(self, *nodes: Node) -> AsyncIterator[None]:
        """QEMU's bdrv_drained_begin/end: root users of ``nodes`` and of every
        node above them hold new requests back, and the section starts once
        the requests already running there have finished. Change the graph
        inside; held requests then go to the edges' new children."""
        quiet: dict[int, Node] = {}
        for node in nodes:
            for n in self._ancestors(node):
                quiet[id(n)] = n
        for n in quiet.values():
            n.quiesce_count += 1
            n.drain_begin()
        try:
            for n in quiet.values():
                await n.drained_poll()
            for n in quiet.values():
                await n.wait_idle()
            yield
        finally:
            for n in quiet.values():
                n.unquiesce()
                n.drain_end()
            for n in quiet.values():
                await n.undrained_poll()

    # ----- closing -----------------------------------------------------
    async def close_node(self, node: Node) -> None:
        """Close a node nobody uses, then its children that become unused."""
        if self.nodes.get(node.node_name) is node:
            del self.nodes[node.node_name]
        try:
            await node.flush()
        except OSError:
            pass
        await node.close()
        for edge in list(node.children.values()):
            await self.detach(edge)

    async def delete(self, name: str) -> None:
        """blockdev-del with QSD's checks and texts."""
        node = self.nodes.get(name)
        if node is None or node.generated_name:
            raise GenericError(f"Failed to find node with node-name='{name}'")
        roots = [e for e in node.parents if e.parent is None]
        if roots:
            # QEMU checks for a BlockBackend (an export) before op blockers (jobs).
            blocked = [e for e in roots if e.blocker]
            if blocked and len(blocked) == len(roots):
                raise GenericError(f"Node '{name}' is busy: {blocked[0].blocker}")
            raise GenericError(f"Node {name} is in use")
        for edge in node.parents:
            if edge.blocker:
                raise GenericError(f"Node '{name}' is busy: {edge.blocker}")
        if not node.monitor_owned:
            raise GenericError(f"Node {name} is not owned by the monitor")
        if node.parents:
            raise GenericError(f"Block device {name} is in use")
        node.monitor_owned = False
        await self.close_node(node)

    async def close_all(self) -> None:
        """Shutdown: close every node top-down."""
        for node in reversed(list(self.nodes.values())):
            if self.nodes.get(node.node_name) is node and not node.parents:
                node.monitor_owned = False
                try:
                    await self.close_node(node)
                except (OSError, QMPError):
                    pass
