# SPDX-License-Identifier: GPL-2.0-or-later
"""Every driver module, imported once so that each registers itself."""

from __future__ import annotations

import importlib

DRIVER_MODULES = (
    "qsd.block.protocols.file",
    "qsd.block.protocols.null",
    "qsd.block.protocols.nbd",
    "qsd.block.formats.raw",
    "qsd.block.formats.qcow2",
    "qsd.block.formats.luks",
    "qsd.block.filters.copy_before_write",
    "qsd.block.filters.throttle",
    "qsd.block.filters.copy_on_read",
    "qsd.block.filters.compress",
    "qsd.block.filters.blkdebug",
    "qsd.block.filters.preallocate",
)


def load_drivers() -> None:
    for name in DRIVER_MODULES:
        importlib.import_module(name)
