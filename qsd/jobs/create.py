# SPDX-License-Identifier: GPL-2.0-or-later
"""blockdev-create: format a new image inside a "create" job.

The driver's ``create`` classmethod does the work (see CONTRACTS.md); this
module decides which drivers can create, and wraps the call in a plain job
that waits in ``concluded`` for job-dismiss, as QSD's create jobs do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qsd.block.node import DRIVERS, CreateContext, Node
from qsd.jobs.job import Job
from qsd.qmp.errors import GenericError

if TYPE_CHECKING:
    from qsd.daemon import Daemon


def can_create(driver: type[Node]) -> bool:
    """A driver creates images when its own class defines ``create``; a
    subclass that only inherits it (host_device from file) cannot, as in QSD."""
    return "create" in vars(driver)


class CreateJob(Job):
    """Runs one driver's ``create``; progress is 0/1 until it returns, 1/1 after."""

    job_type = "create"

    def __init__(self, daemon: "Daemon", job_id: str, driver: type[Node],
                 options: dict[str, Any]) -> None:
        super().__init__(daemon, job_id, auto_dismiss=False)
        self._driver = driver
        self._options = options

    async def run(self) -> None:
        self.progress_set_remaining(1)
        try:
            await self._driver.create(CreateContext(self.daemon.graph, self.daemon.objects),
                                      self._options)
        finally:
            self.progress_update(1)


async def blockdev_create(daemon: "Daemon", job_id: str, options: dict[str, Any]) -> None:
    """Check the driver, then start the job; the reply follows the job's
    first wait (its created/running events, or all of them if it failed
    before doing any I/O)."""
    name = options["driver"]
    driver = DRIVERS.get(name)
    if driver is None:
        raise GenericError(f"Block driver '{name}' not found or not supported")
    if not can_create(driver):
        raise GenericError("Driver does not support blockdev-create")
    await CreateJob(daemon, job_id, driver, options).start()
