# SPDX-License-Identifier: GPL-2.0-or-later
"""Run the golden-output scenarios in iotests/ (expected outputs were made
by the real qemu-storage-daemon with ``iotests/check --oracle -u``)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

import pytest

IOTESTS = Path(__file__).resolve().parent.parent / "iotests"
_loader = importlib.machinery.SourceFileLoader("iotests_check", str(IOTESTS / "check"))
_spec = importlib.util.spec_from_loader("iotests_check", _loader)
check = importlib.util.module_from_spec(_spec)
_loader.exec_module(check)


@pytest.mark.parametrize("name", check.tests())
def test_iotest(name: str) -> None:
    expected = (IOTESTS / f"{name}.out").read_bytes().decode()
    assert check.run(name) == expected
