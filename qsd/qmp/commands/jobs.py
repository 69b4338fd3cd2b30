# SPDX-License-Identifier: GPL-2.0-or-later
"""Job commands: blockdev-create, the queries, job-* and the legacy block-job-*.

job-* find any job ("Job not found"); block-job-* only block jobs, by the
``device`` (or ``id``) argument, with DeviceNotActive otherwise.  The
verbs' state checks and errors live in :mod:`qsd.jobs.job`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qsd.jobs.create import blockdev_create
from qsd.jobs.job import BlockJob
from qsd.qmp.dispatch import command
from qsd.qmp.errors import GenericError

if TYPE_CHECKING:
    from qsd.daemon import Daemon


@command("blockdev-create")
async def blockdev_create_(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    await blockdev_create(daemon, args["job-id"], args["options"])
    return {}


@command("query-jobs")
async def query_jobs(daemon: "Daemon", args: dict[str, Any]) -> list[dict[str, Any]]:
    return [job.info() for job in daemon.jobs.newest_first()]


@command("query-block-jobs")
async def query_block_jobs(daemon: "Daemon", args: dict[str, Any]) -> list[dict[str, Any]]:
    return [job.block_info() for job in daemon.jobs.newest_first() if isinstance(job, BlockJob)]


@command("job-pause")
async def job_pause(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    await daemon.jobs.find(args["id"]).user_pause()
    return {}


@command("job-resume")
async def job_resume(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    await daemon.jobs.find(args["id"]).user_resume()
    return {}


@command("job-cancel")
async def job_cancel(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    """Always a forced cancel."""
    await daemon.jobs.find(args["id"]).user_cancel(force=True)
    return {}


@command("job-complete")
async def job_complete(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    await daemon.jobs.find(args["id"]).user_complete()
    return {}


@command("job-dismiss")
async def job_dismiss(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    daemon.jobs.find(args["id"]).user_dismiss()
    return {}


@command("job-finalize")
async def job_finalize(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    await daemon.jobs.find(args["id"]).user_finalize()
    return {}


@command("block-job-set-speed")
async def block_job_set_speed(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    await daemon.jobs.find_block(args["device"]).set_speed(args["speed"])
    return {}


@command("block-job-cancel")
async def block_job_cancel(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    """Without force, a job the user paused is refused before any state check."""
    job = daemon.jobs.find_block(args["device"])
    force = args.get("force", False)
    if job.user_paused and not force:
        raise GenericError(f"The block job for device '{args['device']}' is currently paused")
    await job.user_cancel(force)
    return {}


@command("block-job-pause")
async def block_job_pause(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    await daemon.jobs.find_block(args["device"]).user_pause()
    return {}


@command("block-job-resume")
async def block_job_resume(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    await daemon.jobs.find_block(args["device"]).user_resume()
    return {}


@command("block-job-complete")
async def block_job_complete(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    await daemon.jobs.find_block(args["device"]).user_complete()
    return {}


@command("block-job-dismiss")
async def block_job_dismiss(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    daemon.jobs.find_block(args["id"]).user_dismiss()
    return {}


@command("block-job-finalize")
async def block_job_finalize(daemon: "Daemon", args: dict[str, Any]) -> dict[str, Any]:
    await daemon.jobs.find_block(args["id"]).user_finalize()
    return {}
