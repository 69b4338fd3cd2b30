# SPDX-License-Identifier: GPL-2.0-or-later
"""Errors that travel back to a QMP client (or to a CLI error line).

Every failure a user can see is a :class:`QMPError` carrying QEMU's error
class and QEMU's exact text; the QMP layer turns it into
``{"error": {"class": ..., "desc": ...}}`` and the CLI into
``qsd: --OPT ARG: desc``.
"""

from __future__ import annotations


class QMPError(Exception):
    """An error with a QMP error class and QEMU's description text."""

    GENERIC = "GenericError"
    COMMAND_NOT_FOUND = "CommandNotFound"
    DEVICE_NOT_ACTIVE = "DeviceNotActive"
    DEVICE_NOT_FOUND = "DeviceNotFound"

    def __init__(self, desc: str, error_class: str = GENERIC) -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class

    def to_qmp(self) -> dict[str, str]:
        return {"class": self.error_class, "desc": self.desc}


class GenericError(QMPError):
    def __init__(self, desc: str) -> None:
        super().__init__(desc, QMPError.GENERIC)


class CommandNotFound(QMPError):
    def __init__(self, desc: str) -> None:
        super().__init__(desc, QMPError.COMMAND_NOT_FOUND)


class DeviceNotActive(QMPError):
    def __init__(self, desc: str) -> None:
        super().__init__(desc, QMPError.DEVICE_NOT_ACTIVE)


class DeviceNotFound(QMPError):
    def __init__(self, desc: str) -> None:
        super().__init__(desc, QMPError.DEVICE_NOT_FOUND)
