"""Training jobs on a Ray cluster through Ray's Job Submission API.

``harpo submit CONFIG --address http://HEAD:8265`` validates the configuration here, before the
cluster spends anything, then submits ``harpo train --address auto`` as a Ray job. The resolved
configuration travels in the job's runtime environment (an environment variable: no shared
file system needed for the config itself); model, data and output paths inside it are paths on
the cluster. ``--working-dir`` additionally ships a local directory (custom reward modules, say).

Plain Ray works too: ``ray job submit --address http://HEAD:8265 -- harpo train CONFIG
--address auto`` with a CONFIG that exists on the cluster.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from services.cluster import RAY_ENV_DEFAULTS
from services.config import TrainConfig

CONFIG_ENV = "HARPO_JOB_CONFIG"  # the runtime-env variable carrying the resolved config
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_S = 120.0  # how long to wait for a fresh head's job agent


class JobError(ValueError):
    """A job request that cannot be carried out; the message says why."""


def dashboard_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if address == "auto" or address.startswith("ray://"):
        raise JobError(f"job commands need the Ray dashboard address (http://HEAD:8265), got "
                       f"{address!r}")
    return address if "://" in address else f"http://{address}"


def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    url = dashboard_address(address)
    try:
        return JobSubmissionClient(url)
    except (ConnectionError, RuntimeError) as exc:
        raise JobError(f"no Ray Jobs API answers at {url} ({exc}); is the head running with "
                       f"its dashboard (ray start --head --dashboard-host ...)?") from None


def submit(config: TrainConfig, address: str | None, *, working_dir: str | None = None,
           job_id: str | None = None) -> str:
    """Submit ``harpo train`` for ``config``; returns the job id."""
    env_vars = {k: os.environ.get(k, v) for k, v in RAY_ENV_DEFAULTS.items()}
    env_vars[CONFIG_ENV] = config.with_absolute_paths().to_yaml()
    runtime_env: dict = {"env_vars": env_vars}
    if working_dir is not None:
        path = Path(working_dir)
        if not path.is_dir():
            raise JobError(f"--working-dir {working_dir!r} is not a directory")
        runtime_env["working_dir"] = str(path.resolve())
    client = _client(address)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(
                entrypoint=f"harpo train --config-env {CONFIG_ENV} --address auto",
                runtime_env=runtime_env, submission_id=job_id,
                metadata={"harpo_run": config.run.name},
            )
        except RuntimeError as exc:
            # A head that has just started answers before its job agent is up.
            if "No available agent" in str(exc) and time.monotonic() < deadline:
                time.sleep(2.0)
                continue
            raise JobError(f"the cluster at {dashboard_address(address)} refused the job: "
                           f"{exc}") from None


def _status(client, job: str) -> str:
    try:
        return str(client.get_job_status(job).value)
    except RuntimeError as exc:
        raise JobError(f"no job {job!r} at {client.get_address()} ({exc})") from None


def status(job: str, address: str | None) -> str:
    return _status(_client(address), job)


def follow(job: str, address: str | None, out=sys.stdout) -> str:
    """Stream a job's logs until it ends; returns its final status."""
    client = _client(address)
    _status(client, job)  # a clear error for an unknown job

    async def tail() -> None:
        async for lines in client.tail_job_logs(job):
            out.write(lines)
            out.flush()

    asyncio.run(tail())
    for _ in range(100):  # the log stream can close a moment before the status settles
        state = _status(client, job)
        if state in TERMINAL:
            return state
        time.sleep(0.1)
    return _status(client, job)


def logs(job: str, address: str | None) -> str:
    client = _client(address)
    _status(client, job)
    return client.get_job_logs(job)


def stop_job(address: str | None, job: str) -> str:
    client = _client(address)
    state = _status(client, job)
    if state in TERMINAL:
        return f"job {job} already ended ({state})"
    client.stop_job(job)
    return f"stop requested for job {job} (was {state}); `harpo logs {job}` follows it"


def config_from_env(name: str) -> str:
    text = os.environ.get(name)
    if not text:
        raise JobError(f"--config-env {name}: the environment variable is not set (it is set "
                       f"by `harpo submit` in the job's runtime environment)")
    return text
