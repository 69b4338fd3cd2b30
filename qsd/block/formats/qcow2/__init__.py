# SPDX-License-Identifier: GPL-2.0-or-later
"""The qcow2 format driver package (registers ``qcow2`` on import)."""

from qsd.block.formats.qcow2.driver import Qcow2Node

__all__ = ["Qcow2Node"]
