"""A job's two network endpoints: the Prometheus exporter and the gRPC control API.

Their addresses go to ``RUN_DIR/endpoints.json``, where the ``harpo status`` family of commands
looks, with the run id (a fresh uuid4 hex per Trainer), the driver's pid and host. The control
server tags every reply with the run id and refuses calls meant for another one, so a command
for a finished run cannot act on the job that took its port; ``close`` removes the file, so a
run that has ended no longer looks running. Ports default to 0 (the OS picks a free one).

Without an exporter (``observability.metrics_port: null``) every ``record_*`` call is a no-op,
so the training loop never asks whether metrics are on.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from pathlib import Path

import ray

from services.config import TrainConfig
from services.run_dir import write_json
from services.step_record import StepRecord

log = logging.getLogger(__name__)


def _advertised(host: str) -> str:
    """An address others can reach for a server bound to ``host``."""
    return ray.util.get_node_ip_address() if host in ("0.0.0.0", "::", "") else host


ENDPOINTS_FILE = "endpoints.json"


class Endpoints:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.run_id = uuid.uuid4().hex
        self._token = None
        ctl = config.control
        if ctl.port is not None:
            # the token is resolved and the bind checked here, before any actor is built
            from services.control.server import ControlConfigError, is_loopback, resolve_token

            self._token = resolve_token(ctl.token_file, ctl.token_env)
            if self._token is None and not is_loopback(ctl.host):
                raise ControlConfigError(
                    f"control.host {ctl.host!r} is not loopback, so the control API needs a "
                    f"token, and ${ctl.token_env} (control.token_env) is not set in the "
                    "driver's environment: set it, or control.token_file, or use control.host: "
                    "127.0.0.1")
        self.metrics = None
        if config.observability.metrics_port is not None:
            from services.metrics import MetricsExporter

            self.metrics = MetricsExporter(job=config.run.name)
        self._control_server = None
        self._written: Path | None = None
        self.addresses: dict[str, str] = {}

    def start(self, control, run_root, rollout_workers: int) -> dict[str, str]:
        """Serve metrics and the control API (``control``: a ControlTarget); returns and writes
        their addresses."""
        obs, ctl = self.config.observability, self.config.control
        if self.metrics is not None:
            port = self.metrics.start(obs.metrics_host, obs.metrics_port)
            self.addresses["metrics"] = f"http://{_advertised(obs.metrics_host)}:{port}/metrics"
            self.set_rollout_workers(rollout_workers, desired=rollout_workers)
            self.metrics.set_staleness(0)  # nothing trained yet
        if ctl.port is not None:
            from services.control.server import ControlServer

            self._control_server = ControlServer(control, ctl.host, ctl.port, token=self._token,
                                                 tls_cert=ctl.tls_cert, tls_key=ctl.tls_key,
                                                 run_id=self.run_id)
            port = self._control_server.start()
            self.addresses["control"] = f"{_advertised(ctl.host)}:{port}"
        path = Path(run_root) / ENDPOINTS_FILE
        write_json(path, {**self.addresses, "run_id": self.run_id, "pid": os.getpid(),
                          "host": socket.gethostname()})
        self._written = path
        log.info("run id %s", self.run_id)
        for name, address in self.addresses.items():
            log.info("%s endpoint: %s", name, address)
        return self.addresses

    # ------------------------------------------------------------------ what the loop reports

    def record_step(self, record: StepRecord, row: dict) -> None:
        if self.metrics is None:
            return
        self.metrics.record_step(row, record.modulation, record.advantages.group_tasks)
        self.metrics.set_staleness(row["staleness"])
        if record.sync.synced:
            self.metrics.record_weight_sync(record.sync.seconds, ok=record.sync.failures == 0)
        loads, produced = record.sync.load_seconds, record.rollouts_per_worker
        for worker in sorted({*loads, *produced}):
            self.metrics.record_worker(worker, produced.get(worker, 0), loads.get(worker))

    def record_restart(self, role: str) -> None:
        if self.metrics is not None:
            self.metrics.record_restart(role)

    def set_waiting_for_capacity(self, role: str, waiting: bool) -> None:
        if self.metrics is not None:
            self.metrics.set_waiting_for_capacity(role, waiting)

    def record_checkpoint_upload(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.record_checkpoint_upload(result)

    def set_queue_depth(self, depth: int) -> None:
        if self.metrics is not None:
            self.metrics.set_queue_depth(depth)

    def set_rollout_workers(self, workers: int, desired: int, removed: set[str] = frozenset()
                            ) -> None:
        if self.metrics is None:
            return
        self.metrics.set_rollout_workers(workers, desired=desired)
        for name in removed:
            self.metrics.forget_worker(name)

    def set_state(self, state: str) -> None:
        if self.metrics is not None:
            self.metrics.set_state(state)

    def close(self) -> None:
        self._remove_file()
        if self._control_server is not None:
            self._control_server.stop(grace=1.0)
            self._control_server = None
        if self.metrics is not None:
            self.metrics.close()

    def _remove_file(self) -> None:
        """Remove endpoints.json if it is still this run's (a later run in the same directory,
        e.g. a resume, may have written its own since)."""
        path, self._written = self._written, None
        if path is None:
            return
        try:
            if json.loads(path.read_text()).get("run_id") == self.run_id:
                path.unlink()
        except (OSError, ValueError):
            pass  # already gone, or not ours to judge
