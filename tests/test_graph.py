# SPDX-License-Identifier: GPL-2.0-or-later
"""The node graph: naming, ownership, permission planning and conflicts."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from qsd.block.graph import Graph
from qsd.block.node import DRIVERS, Node, Perm, Role
from qsd.qmp.errors import QMPError


class MemProto(Node):
    """A protocol node in memory that records the permissions it was given."""

    driver = "test-mem"

    async def open(self, options: dict[str, Any]) -> None:
        self.size = options.get("size", 1 << 20)
        self.applied: tuple[Perm, Perm] = (Perm(0), Perm.all())
        self.refuse_write = options.get("refuse-write", False)

    @property
    def filename(self) -> str:
        return "mem"

    def check_perm(self, perm: Perm, shared: Perm) -> None:
        if self.refuse_write and perm & Perm.WRITE:
            raise QMPError('Failed to get "write" lock')

    def set_perm(self, perm: Perm, shared: Perm) -> None:
        self.applied = (perm, shared)


class Fmt(Node):
    """A format: its file child carries metadata."""

    driver = "test-fmt"
    is_format = True

    async def open(self, options: dict[str, Any]) -> None:
        await self.open_child("file", options["file"])
        self.size = self.file.size


class Filt(Node):
    driver = "test-filter"
    is_filter = True
    file_role = Role.FILTERED | Role.PRIMARY

    async def open(self, options: dict[str, Any]) -> None:
        await self.open_child("file", options["file"])
        self.size = self.file.size


@pytest.fixture(autouse=True)
def drivers():
    for cls in (MemProto, Fmt, Filt):
        DRIVERS[cls.driver] = cls
    yield
    for cls in (MemProto, Fmt, Filt):
        del DRIVERS[cls.driver]


def run(coro):
    return asyncio.run(coro)


def test_inline_child_gets_generated_name_and_goes_with_parent() -> None:
    async def go():
        g = Graph()
        top = await g.add({"driver": "test-fmt", "node-name": "top",
                           "file": {"driver": "test-mem"}})
        child = top.file
        assert child.node_name.startswith("#block") and child.generated_name
        assert list(g.nodes) == [child.node_name, "top"]
        await g.delete("top")
        assert g.nodes == {}
    run(go())


def test_name_rules() -> None:
    async def go():
        g = Graph()
        with pytest.raises(QMPError, match="'node-name' must be specified for the root node"):
            await g.add({"driver": "test-mem"})
        with pytest.raises(QMPError, match="Invalid node-name: '1x'"):
            await g.add({"driver": "test-mem", "node-name": "1x"})
        with pytest.raises(QMPError, match="Node name too long"):
            await g.add({"driver": "test-mem", "node-name": "a" * 32})
        await g.add({"driver": "test-mem", "node-name": "a" * 31})
        with pytest.raises(QMPError, match="Duplicate nodes with node-name='" + "a" * 31):
            await g.add({"driver": "test-mem", "node-name": "a" * 31})
    run(go())


def test_format_takes_write_and_unshares_it() -> None:
    async def go():
        g = Graph()
        mem = await g.add({"driver": "test-mem", "node-name": "m"})
        assert mem.applied == (Perm(0), Perm.all())
        await g.add({"driver": "test-fmt", "node-name": "f1", "file": "m"})
        perm, shared = mem.applied
        assert perm == Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE
        assert not shared & (Perm.WRITE | Perm.RESIZE)
        with pytest.raises(QMPError, match="Permission conflict on node 'm'"):
            await g.add({"driver": "test-fmt", "node-name": "f2", "file": "m"})
        assert "f2" not in g.nodes and len(mem.parents) == 1
        ro = await g.add({"driver": "test-fmt", "node-name": "f3", "file": "m",
                          "read-only": True, "force-share": True})
        assert ro.read_only
    run(go())


def test_filter_passes_user_permissions_down() -> None:
    async def go():
        g = Graph()
        mem = await g.add({"driver": "test-mem", "node-name": "m"})
        filt = await g.add({"driver": "test-filter", "node-name": "flt", "file": "m"})
        assert mem.applied[0] == Perm(0)
        edge = await g.attach_user(filt, "export 'e'", Perm.CONSISTENT_READ | Perm.WRITE,
                                   Perm.all())
        assert mem.applied[0] == Perm.CONSISTENT_READ | Perm.WRITE
        with pytest.raises(QMPError, match="Node flt is in use"):
            await g.delete("flt")
        await g.detach(edge)
        assert mem.applied[0] == Perm(0)
    run(go())


def test_failed_lock_changes_nothing() -> None:
    async def go():
        g = Graph()
        mem = await g.add({"driver": "test-mem", "node-name": "m", "refuse-write": True})
        with pytest.raises(QMPError, match='Failed to get "write" lock'):
            await g.add({"driver": "test-fmt", "node-name": "f", "file": "m"})
        assert mem.parents == [] and "f" not in g.nodes
    run(go())


def test_delete_rules() -> None:
    async def go():
        g = Graph()
        await g.add({"driver": "test-mem", "node-name": "m"})
        await g.add({"driver": "test-fmt", "node-name": "f", "file": "m"})
        with pytest.raises(QMPError, match="Block device m is in use"):
            await g.delete("m")
        with pytest.raises(QMPError, match="Failed to find node with node-name='nope'"):
            await g.delete("nope")
        await g.add({"driver": "test-fmt", "node-name": "g", "read-only": True,
                     "file": {"driver": "test-mem", "node-name": "inner"}})
        with pytest.raises(QMPError, match="Node inner is not owned by the monitor"):
            await g.delete("inner")
        await g.delete("f")
        await g.delete("m")
        await g.delete("g")
        assert g.nodes == {}
    run(go())
