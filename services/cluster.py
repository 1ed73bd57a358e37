"""Connecting to Ray: an embedded local instance by default, or an existing cluster."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
import threading

# Defaults that make a local Ray quiet and self-contained (no auth token, no usage stats, no
# downloads from the Hugging Face Hub, no progress bars); a user's own environment wins.
RAY_ENV_DEFAULTS = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    # OpenMP threads that spin-wait slow everything 15-20x when processes share few cores.
    "OMP_WAIT_POLICY": "PASSIVE",
}


def apply_env_defaults() -> None:
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def connect(address: str | None = None, *, num_cpus: int | None = None,
            working_dir_env: dict | None = None, survive_group_sigterm: bool = False) -> None:
    """``ray.init`` on an embedded instance (address None) or an existing cluster.

    ``survive_group_sigterm``: the embedded instance's processes ignore a SIGTERM sent to the
    whole process group, so the driver can still checkpoint (``harpo train``); the price is
    about 1 s per Ray process (5) when Ray shuts down, as each is killed after a 1 s grace."""
    apply_env_defaults()
    import ray

    if ray.is_initialized():
        return
    env_vars = {k: os.environ[k] for k in RAY_ENV_DEFAULTS if k in os.environ}
    runtime_env = {"env_vars": {**env_vars, **(working_dir_env or {})}}
    if address is None:
        # Logical CPUs: stages of a synchronous step take turns, so actors may share cores.
        cpus = num_cpus or max(8, os.cpu_count() or 1)
        # A signal to the whole process group (Ctrl-C, `kill -- -PGID`, systemd, Slurm)
        # reaches the embedded Ray's processes too. Ray blocks SIGINT in them; with
        # survive_group_sigterm SIGTERM is blocked here while they start (they inherit the
        # mask), so the GCS and the workers outlive a group SIGTERM and the driver can finish
        # its step and write its checkpoint. Should the GCS die anyway, the driver waits this
        # long to reconnect (Ray's default: 60 s); an embedded GCS never comes back.
        os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", "5")
        temp_dir = tempfile.mkdtemp(prefix="harpo-ray-")
        blocked = _block_sigterm() if survive_group_sigterm else None
        try:
            ray.init(num_cpus=cpus, include_dashboard=False, _temp_dir=temp_dir,
                     runtime_env=runtime_env, log_to_driver=True)
        finally:
            if blocked is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        atexit.register(_remove_temp_dir, temp_dir)  # runs before Ray's own atexit shutdown
    elif os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        # A Ray job's driver (`harpo submit`, `ray job submit`): the job's runtime environment
        # already applies, and Ray refuses a second one that names the same variables.
        ray.init(address=address)
    else:
        ray.init(address=address, runtime_env=runtime_env)


def _remove_temp_dir(temp_dir: str) -> None:
    """Shut the embedded Ray down and remove its session files (``/tmp/harpo-ray-*``)."""
    import ray

    try:
        ray.shutdown()
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def _block_sigterm():
    """Block SIGTERM in this thread (the main one only); return the previous mask or None."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
