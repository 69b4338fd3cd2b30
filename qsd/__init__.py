# SPDX-License-Identifier: GPL-2.0-or-later
"""qsd: a storage daemon and block layer compatible with qemu-storage-daemon 7.2."""

__version__ = "0.1.0"

#: The QEMU version qsd answers as, in the greeting and query-version
#: (members in schema order, like every dict the daemon builds).
QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}
PACKAGE = f"qsd {__version__}"
