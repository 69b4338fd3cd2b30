# SPDX-License-Identifier: GPL-2.0-or-later
"""Guest memory and split virtqueues, from the virtio 1.x specification.

:class:`GuestMemory` translates guest-physical (descriptor buffers) and
front-end user addresses (ring locations, per the vhost-user
specification) into memoryviews of the mapped regions; a range crossing
regions becomes several views. :class:`SplitQueue` walks available
descriptor chains (direct and indirect) into readable and writable views
and publishes used elements, with or without VIRTIO_RING_F_EVENT_IDX.

The guest may write the rings while we read them. Ring indexes are read and
written through native 16-bit memoryview items (one load or store each,
never torn), and what the guest controls is checked before use: a head or
``next`` outside the table, a chain longer than the ring (a loop), nested
indirect tables, readable after writable buffers, or addresses outside
guest memory raise :class:`VirtqueueError`, after which the transport
drops the front-end.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from typing import Any

if sys.byteorder != "little":       # virtio 1.x rings are little-endian
    raise ImportError("vhost-user-blk needs a little-endian host")

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
DESC_SIZE = 16
#: An indirect table may not hold more descriptors than a ring can.
MAX_INDIRECT = 32768


class VirtqueueError(Exception):
    """The driver put something invalid in the ring."""


_fence_lock = threading.Lock()


def memory_fence() -> None:
    """A full barrier: on x86 any locked instruction is one, and taking an
    uncontended lock executes one. Needed between publishing avail_event
    and re-reading the avail index (a store then a load)."""
    _fence_lock.acquire()
    _fence_lock.release()


@dataclass
class MemRegion:
    guest_addr: int
    size: int
    user_addr: int
    view: memoryview
    #: What keeps ``view`` valid (the mmap object) and the region's descriptor.
    owner: Any = None
    fd: int | None = None


class GuestMemory:
    """The front-end's memory regions, looked up by either address space."""

    def __init__(self, regions: list[MemRegion] | None = None) -> None:
        self.regions: list[MemRegion] = list(regions or [])

    def add(self, region: MemRegion) -> None:
        for r in self.regions:
            if (region.guest_addr < r.guest_addr + r.size and r.guest_addr < region.guest_addr + region.size):
                raise VirtqueueError(f"memory region at guest 0x{region.guest_addr:x} overlaps another")
        self.regions.append(region)

    def remove(self, guest_addr: int, size: int, user_addr: int) -> MemRegion:
        for i, r in enumerate(self.regions):
            if (r.guest_addr, r.size, r.user_addr) == (guest_addr, size, user_addr):
                return self.regions.pop(i)
        raise VirtqueueError(f"no memory region at guest 0x{guest_addr:x} of size 0x{size:x}")

    def _translate(self, addr: int, length: int, user: bool) -> list[memoryview]:
        out: list[memoryview] = []
        while True:
            for r in self.regions:
                base = r.user_addr if user else r.guest_addr
                off = addr - base
                if 0 <= off < r.size:
                    n = min(length, r.size - off)
                    out.append(r.view[off:off + n])
                    length -= n
                    addr += n
                    break
            else:
                space = "user" if user else "guest"
                raise VirtqueueError(f"{space} address 0x{addr:x} is outside guest memory")
            if length <= 0:
                return out

    def guest(self, addr: int, length: int) -> list[memoryview]:
        """Views of ``length`` bytes at guest-physical ``addr`` (none for 0 bytes)."""
        if length == 0:
            return []
        return self._translate(addr, length, False)

    def user_contiguous(self, addr: int, length: int) -> memoryview:
        """One view of a ring at front-end user address ``addr``."""
        views = self._translate(addr, length, True)
        if len(views) != 1:
            raise VirtqueueError(f"ring at 0x{addr:x} crosses memory regions")
        return views[0]

    def close(self) -> None:
        """Drop every mapping (each unmaps once no request holds a view)."""
        for r in self.regions:
            r.view.release()
            if r.owner is not None:
                try:
                    r.owner.close()
                except BufferError:     # requests still hold views; GC unmaps later
                    pass
        self.regions.clear()


@dataclass
class Chain:
    """One available descriptor chain."""

    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)

    @property
    def in_len(self) -> int:
        return sum(len(v) for v in self.writable)


class SplitQueue:
    """The device side of one split virtqueue.

    Ring views come from :meth:`map` (user addresses, as vhost-user
    passes them); ``last_avail`` is where the next chain is taken from
    (SET_VRING_BASE) and ``used_idx`` where the next used element goes.
    """

    def __init__(self, num: int, event_idx: bool = False, indirect: bool = True) -> None:
        if num <= 0 or num > 32768 or num & (num - 1):
            raise VirtqueueError(f"invalid queue size {num}")
        self.num = num
        self.event_idx = event_idx
        self.indirect = indirect
        self.last_avail = 0
        self.used_idx = 0
        self._pending = 0           # used elements written but not yet published
        self.signalled_used = 0
        self.mem: GuestMemory | None = None
        self._desc: memoryview | None = None

    def map(self, mem: GuestMemory, desc: int, avail: int, used: int) -> None:
        """Point at the rings; raises VirtqueueError if they are not in memory."""
        num = self.num
        desc_view = mem.user_contiguous(desc, DESC_SIZE * num)
        avail_view = mem.user_contiguous(avail, 6 + 2 * num)
        used_view = mem.user_contiguous(used, 6 + 8 * num)
        if desc % 16 or avail % 2 or used % 4:
            raise VirtqueueError("misaligned virtqueue")
        self.mem = mem
        self._desc = desc_view
        self._d64 = desc_view.cast("Q")
        self._d32 = desc_view.cast("I")
        self._d16 = desc_view.cast("H")
        self._avail = avail_view.cast("H")
        # The used ring is 4 + 8*num + 2 bytes: view its u16s and its u32 elements.
        self._used16 = used_view.cast("H")
        self._used32 = used_view[:4 + 8 * num].cast("I")

    def unmap(self) -> None:
        for name in ("_d64", "_d32", "_d16", "_avail", "_used16", "_used32", "_desc"):
            view = self.__dict__.pop(name, None)
            if view is not None:
                view.release()
        self._desc = None
        self.mem = None

    def sync_used(self) -> None:
        """Continue from the used index the ring holds (a restarted ring)."""
        self.used_idx = self._used16[1]
        self.signalled_used = self.used_idx

    # ----- available side ----------------------------------------------------
    def has_avail(self) -> bool:
        return self._avail[1] != self.last_avail

    def pop(self) -> Chain | None:
        """The next available chain, or None when the driver has posted none."""
        idx = self._avail[1]
        if idx == self.last_avail:
            return None
        if (idx - self.last_avail) & 0xFFFF > self.num:
            raise VirtqueueError(f"avail index moved from {self.last_avail} to {idx} "
                                 f"in a ring of {self.num}")
        head = self._avail[2 + self.last_avail % self.num]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return self.walk(head)

    def walk(self, head: int) -> Chain:
        if head >= self.num:
            raise VirtqueueError(f"descriptor head {head} out of range (ring of {self.num})")
        assert self.mem is not None
        mem = self.mem
        chain = Chain(head)
        d64, d32, d16, size = self._d64, self._d32, self._d16, self.num
        in_indirect = False
        i = head
        count = 0
        while True:
            count += 1
            if count > size:
                raise VirtqueueError("descriptor chain is longer than its table (a loop)")
            addr, length, flags, nxt = d64[2 * i], d32[4 * i + 2], d16[8 * i + 6], d16[8 * i + 7]
            if flags & DESC_F_INDIRECT:
                if not self.indirect:
                    raise VirtqueueError("indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC")
                if in_indirect:
                    raise VirtqueueError("nested indirect descriptor table")
                if flags & DESC_F_NEXT:
                    raise VirtqueueError("indirect descriptor with the next flag")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_INDIRECT:
                    raise VirtqueueError(f"invalid indirect table length {length}")
                views = mem.guest(addr, length)
                table = views[0] if len(views) == 1 else memoryview(b"".join(views))
                d64, d32, d16 = table.cast("Q"), table.cast("I"), table.cast("H")
                size = length // DESC_SIZE
                in_indirect = True
                i = 0
                count = 0
                continue
            if length:
                views = mem.guest(addr, length)
                if flags & DESC_F_WRITE:
                    chain.writable.extend(views)
                elif chain.writable:
                    raise VirtqueueError("device-readable descriptor after a device-writable one")
                else:
                    chain.readable.extend(views)
            if not flags & DESC_F_NEXT:
                return chain
            if nxt >= size:
                raise VirtqueueError(f"next descriptor {nxt} out of range (table of {size})")
            i = nxt

    def enable_notifications(self) -> bool:
        """Ask for a kick at the next chain; True if one arrived meanwhile
        (the caller then keeps popping)."""
        if self.event_idx:
            self._used16[2 + 4 * self.num] = self.last_avail     # avail_event
            memory_fence()
        return self.has_avail()

    # ----- used side -----------------------------------------------------------
    def push(self, head: int, length: int) -> None:
        """Write a used element; :meth:`publish` makes it visible."""
        slot = (self.used_idx + self._pending) % self.num
        self._used32[1 + 2 * slot] = head
        self._used32[2 + 2 * slot] = length
        self._pending += 1

    def publish(self) -> bool:
        """Advance the used index past the pushed elements; True if the
        driver wants an interrupt for them."""
        if not self._pending:
            return False
        old = self.used_idx
        new = (old + self._pending) & 0xFFFF
        self._pending = 0
        self.used_idx = new
        self._used16[1] = new
        memory_fence()
        if self.event_idx:
            used_event = self._avail[2 + self.num]
            # virtio's vring_need_event, relative to what we last signalled.
            since = self.signalled_used
            if (new - used_event - 1) & 0xFFFF < (new - since) & 0xFFFF:
                self.signalled_used = new
                return True
            return False
        self.signalled_used = new
        return not self._avail[0] & AVAIL_F_NO_INTERRUPT
