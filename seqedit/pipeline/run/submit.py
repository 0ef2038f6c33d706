"""Campaigns as Ray jobs: submit to a running cluster, follow, cancel, rerun.

`seqedit submit SPEC --out DIR --address http://HEAD:8265` hands `seqedit run SPEC --out
DIR` to the cluster's job server (the Ray Jobs API, at the dashboard address); the job's
driver runs on the head node and places the editor, evaluator and covariance actors on the
workers. With `--address auto`, `ray://HEAD:10001` (Ray Client) or `HEAD:6379`, the driver
runs in this process and joins that cluster instead (nothing to follow afterwards). The
campaign directory must be where every node reaches it: a shared file system mounted at
the same path, or a storage URI (`s3://...`, `seqedit.storage`); the paths in the spec
(model, dataset) on a shared file system. A submission is recorded in `DIR/job.json`,
so `seqedit logs DIR`, `seqedit cancel DIR` and `seqedit status DIR` find the job again;
`seqedit rerun DIR --address` submits the rerun the same way. Without an address,
`submit` runs the campaign here.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from pydantic import BaseModel
from ray.job_submission import JobStatus, JobSubmissionClient

from seqedit.errors import SeqeditError
from seqedit.storage import Where, location

JOB_FILE = "job.json"
"""The last job submitted for a campaign directory (`SubmittedJob`)."""


class SubmittedJob(BaseModel):
    """A campaign job on a cluster: its id and the job server it was submitted to."""

    job_id: str
    address: str
    entrypoint: str
    submitted_at: float


class SubmitError(SeqeditError, ValueError):
    """A job that cannot be found or submitted; the message names the directory or job."""


def is_job_server(address: str) -> bool:
    """Whether `address` names a job server (the dashboard: http:// or https://), rather
    than a cluster a driver joins (auto, ray://HEAD:10001, HEAD:6379)."""
    return address.startswith(("http://", "https://"))


def submit_command(
    command: list[str], campaign_dir: Where, address: str, *, runtime_env: dict | None = None
) -> SubmittedJob:
    """Submit `seqedit <command>` as a Ray job at `address`; recorded in `campaign_dir`."""
    client = JobSubmissionClient(address)
    entrypoint = shlex.join(["seqedit", *command])
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    job = SubmittedJob(job_id=job_id, address=address, entrypoint=entrypoint,
                       submitted_at=time.time())  # fmt: skip
    (location(campaign_dir) / JOB_FILE).write_text(job.model_dump_json(indent=1) + "\n")
    return job


def submit_campaign(spec_file: Path, campaign_dir: Where, address: str) -> SubmittedJob:
    """Submit `seqedit run SPEC --out DIR` (absolute paths or URIs: the job runs elsewhere)."""
    out = str(location(campaign_dir))
    command = ["run", str(spec_file.resolve()), "--out", out, "--quiet"]
    return submit_command(command, campaign_dir, address)


def submit_rerun(campaign_dir: Where, address: str, flags: list[str]) -> SubmittedJob:
    """Submit `seqedit rerun DIR [flags]` to the cluster at `address`."""
    command = ["rerun", str(location(campaign_dir)), *flags, "--quiet"]
    return submit_command(command, campaign_dir, address)


def recorded_job(campaign_dir: Where) -> SubmittedJob:
    """The job last submitted for `campaign_dir`."""
    path = location(campaign_dir) / JOB_FILE
    try:
        return SubmittedJob.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise SubmitError(f"{campaign_dir}: no job was submitted for it (no {JOB_FILE})") from None


def job_status(job: SubmittedJob) -> JobStatus:
    """The job's status on its cluster (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    return JobSubmissionClient(job.address).get_job_status(job.job_id)


def job_logs(job: SubmittedJob) -> str:
    """Everything the job's driver has printed so far."""
    return JobSubmissionClient(job.address).get_job_logs(job.job_id)


def cancel_job(job: SubmittedJob) -> bool:
    """Ask the cluster to stop the job; whether it was still running."""
    return JobSubmissionClient(job.address).stop_job(job.job_id)


def wait_for(job: SubmittedJob, *, poll_s: float = 1.0, timeout_s: float | None = None
             ) -> JobStatus:  # fmt: skip
    """Poll until the job ends; its final status."""
    client = JobSubmissionClient(job.address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(job.job_id)
        if status.is_terminal():
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job.job_id} still {status} after {timeout_s} s")
        time.sleep(poll_s)
