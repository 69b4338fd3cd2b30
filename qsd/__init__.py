# SPDX-License-Identifier: GPL-2.0-or-later
"""qsd: a storage daemon and block layer compatible with qemu-storage-daemon 7.2."""

__version__ = "0.1.0"

#: The QEMU version qsd answers as, in the greeting and query-version.
QEMU_VERSION = {"micro": 0, "minor": 2, "major": 7}
PACKAGE = f"qsd {__version__}"
