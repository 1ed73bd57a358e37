"""Prometheus metrics of a running job, served by the driver on ``/metrics``.

Every number the trainer writes to ``metrics.jsonl`` for a step is also a series here, so a
dashboard or an alert sees what the run directory records, with the same values. Names start
with ``harpo_``; every series carries ``job`` (the run), per-task series ``task``, per-worker
series ``worker``. The catalogue, with the ``metrics.jsonl`` field behind each metric, is in
``docs/metrics.md``.

Why the exporter keeps state semantics rather than "this step only": Prometheus samples the last
value at each scrape, so a task that is absent from one batch must not blink out of the graphs.
Its factors, log factor and signal EMA *are* state (the modulator keeps them), so they keep their
last value; its per-batch measurements (reward, accuracy, format, signal, |advantage|) keep the
value of the last step that sampled the task, and ``harpo_task_last_step`` says which step that
was; its batch share drops to 0, which is what it is.

Scrape with ``honor_labels: true`` (a ServiceMonitor's ``honorLabels``): the ``job`` label here
names the training run and would otherwise be renamed ``exported_job`` by Prometheus.
"""

from __future__ import annotations

import errno
import math
import socket
import time
from collections.abc import Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from services.control.target import JOB_STATES

# Sample factors are clamped to [0.5, 3.0] by default: fine buckets around 1 (no rescaling),
# and an edge bucket at each default clamp so "pinned at a bound" shows up as a spike there.
SAMPLE_FACTOR_BUCKETS = (0.5, 0.55, 0.65, 0.75, 0.85, 0.95, 1.05, 1.15, 1.3, 1.5, 1.75, 2.0,
                         2.5, 2.99, 3.0)
# Actor roles, and "job": the whole job rebuilt from its last checkpoint.
RESTART_ROLES = ("rollout", "reward", "modulator", "learner", "job")

# metrics.jsonl scalar field -> (metric name, help). Exported when present in the row.
_JOB_GAUGES = {
    "policy_version": ("harpo_policy_version", "Policy version of the rollouts of the last step"),
    "reward_mean": ("harpo_reward_mean", "Mean reward over all rollouts of the last step"),
    "response_length": ("harpo_response_length_tokens", "Mean response length (tokens)"),
    "stop_fraction": ("harpo_stop_fraction", "Fraction of responses that ended with a stop "
                                             "token (not cut at max length)"),
    "rollouts_per_s": ("harpo_rollouts_per_second", "Rollouts per second of the last step"),
    "tokens_per_s": ("harpo_tokens_per_second", "Response tokens per second of the last step"),
    "loss": ("harpo_loss", "Policy loss of the last step (NaN exported as NaN)"),
    "kl": ("harpo_kl", "KL to the reference policy (only with learner.kl_coef > 0)"),
    "entropy": ("harpo_entropy", "Token-mean policy entropy"),
    "clip_frac": ("harpo_clip_fraction", "Fraction of tokens whose ratio was clipped"),
    "approx_kl": ("harpo_approx_kl", "Approximate KL between old and new policy"),
    "grad_norm": ("harpo_grad_norm", "Gradient norm before clipping"),
    "lr": ("harpo_learning_rate", "Learning rate"),
    "logprob_mismatch_max": ("harpo_logprob_mismatch_max",
                             "Largest |rollout - learner| token log-prob gap"),
    "logprob_mismatch_mean": ("harpo_logprob_mismatch_mean",
                              "Mean |rollout - learner| token log-prob gap"),
    "logprob_mismatch_p99": ("harpo_logprob_mismatch_p99",
                             "99th percentile of the |rollout - learner| token log-prob gaps"),
    "tis_weight_mean": ("harpo_tis_weight_mean",
                        "Token mean of the truncated importance weights (learner.tis_cap)"),
    "tis_truncated_frac": ("harpo_tis_truncated_fraction",
                           "Fraction of tokens whose importance ratio exceeded learner.tis_cap"),
    "padding_waste": ("harpo_padding_waste",
                      "Share of the learner's padded token slots holding no token (last step)"),
    "signal_reference": ("harpo_signal_reference",
                         "Reference signal rho_ref (geometric mean of the task EMAs)"),
    "sample_factor_mean": ("harpo_sample_factor_mean", "Mean sample factor over the groups"),
}

# metrics.jsonl per-task field -> (metric name, help). Gauges labelled job, task.
_TASK_GAUGES = {
    "task_factor": ("harpo_task_factor", "Applied (clamped) task factor s_m"),
    "task_log_factor": ("harpo_task_log_factor", "Unclamped log task factor L_m"),
    "task_signal": ("harpo_task_signal", "Task contribution signal p_m of the last batch"),
    "task_signal_ema": ("harpo_task_signal_ema", "Smoothed task signal rho_m (EMA of p_m)"),
    "task_weight": ("harpo_task_weight", "Task weight w_m an estimator applied (mt_grpo)"),
    "reward": ("harpo_task_reward", "Mean reward of the task's rollouts"),
    "accuracy": ("harpo_task_accuracy", "Mean accuracy of the task's rollouts"),
    "format": ("harpo_task_format_rate", "Mean format reward of the task's rollouts"),
    "advantage_abs_mean": ("harpo_task_advantage_abs_mean",
                           "Mean |modulated advantage| of the task's rollouts"),
    # the per-task numbers that are 0, not "last seen", for a task absent from the batch
    "batch_share": ("harpo_task_batch_share", "Share of the batch's rollouts from the task"),
    "signal_share": ("harpo_task_signal_share",
                     "Task's share of the batch's policy-gradient signal (sum |A|)"),
}


class MetricsPortError(OSError):
    """The configured metrics port cannot be bound."""


class MetricsExporter:
    """One job's metrics in its own registry, optionally served over HTTP.

    The registry is private so that several jobs (or tests) in one process never collide, and so
    that the endpoint shows only this job's series.
    """

    def __init__(self, job: str, registry: CollectorRegistry | None = None):
        self.job = str(job)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.host: str | None = None
        self.port: int | None = None
        self._server = None
        self._thread = None
        self._tasks_seen: set[str] = set()
        self._state: str | None = None
        r = self.registry
        job_l, task_l = ("job",), ("job", "task")

        self._job_gauges = {key: Gauge(name, doc, job_l, registry=r)
                            for key, (name, doc) in _JOB_GAUGES.items()}
        self._task_gauges = {key: Gauge(name, doc, task_l, registry=r)
                             for key, (name, doc) in _TASK_GAUGES.items()}
        self._unclamped = Gauge("harpo_task_factor_unclamped",
                                "Unclamped task factor exp(L_m)", task_l, registry=r)
        self._task_last_step = Gauge("harpo_task_last_step",
                                     "Last step whose batch held the task", task_l, registry=r)
        self._zero_groups = Counter("harpo_zero_signal_groups",
                                    "Groups whose rewards were all equal (no signal)", task_l,
                                    registry=r)
        self._reward_errors = Counter("harpo_reward_errors",
                                      "Samples whose user reward function failed (scored by "
                                      "reward.on_error)", task_l, registry=r)
        self._sample_factor = Histogram("harpo_sample_factor",
                                        "Sample factors s_(m,q) applied, one per group", task_l,
                                        buckets=SAMPLE_FACTOR_BUCKETS, registry=r)
        self._steps = Counter("harpo_steps", "Training steps completed by this process", job_l,
                              registry=r)
        self._step = Gauge("harpo_step", "Index of the last completed step (metrics.jsonl step)",
                           job_l, registry=r)
        self._last_step_time = Gauge("harpo_last_step_timestamp_seconds",
                                     "Unix time the last step completed", job_l, registry=r)
        self._rollouts = Counter("harpo_rollouts", "Rollouts trained on", job_l, registry=r)
        self._stage = Gauge("harpo_stage_seconds", "Seconds spent in each stage of the last step",
                            ("job", "stage"), registry=r)
        self._workers = Gauge("harpo_rollout_workers", "Live rollout workers", job_l, registry=r)
        self._workers_desired = Gauge("harpo_rollout_workers_desired",
                                      "Rollout workers the job is scaled to", job_l, registry=r)
        self._queue = Gauge("harpo_queue_depth", "Rollout requests waiting for a worker", job_l,
                            registry=r)
        self._staleness = Gauge("harpo_staleness_versions",
                                "Policy versions between the learner and the rollouts it trains "
                                "on", job_l, registry=r)
        self._sync_seconds = Gauge("harpo_weight_sync_seconds",
                                   "Seconds of the last weight broadcast to the rollout workers",
                                   job_l, registry=r)
        self._syncs = Counter("harpo_weight_syncs", "Weight broadcasts attempted", job_l,
                              registry=r)
        self._sync_failures = Counter("harpo_weight_sync_failures", "Weight broadcasts that "
                                      "failed", job_l, registry=r)
        self._restarts = Counter("harpo_restarts", "Actor restarts by role", ("job", "role"),
                                 registry=r)
        self._job_state = Gauge("harpo_job_state", "1 for the job's current state, 0 otherwise",
                                ("job", "state"), registry=r)
        self._worker_rollouts = Counter("harpo_worker_rollouts", "Rollouts generated per worker",
                                        ("job", "worker"), registry=r)
        self._worker_load = Gauge("harpo_worker_weight_load_seconds",
                                  "Seconds the worker took to load the last weights",
                                  ("job", "worker"), registry=r)

        self._waiting_capacity = Gauge(
            "harpo_waiting_for_capacity", "1 while a replacement actor (or the learners' "
            "placement group) of the role waits for a node with its resources "
            "(run.capacity_timeout_s)", ("job", "role"), registry=r)
        self._uploads = Counter("harpo_checkpoint_uploads", "Checkpoint uploads to "
                                "run.checkpoint_uri by result (ok, failed, timeout, skipped)",
                                ("job", "result"), registry=r)

        # Counters exist at 0 from the start: increase() only sees an increment between two
        # samples, so a counter born at 1 would hide the first restart or failure from alerts.
        for role in RESTART_ROLES:
            self._restarts.labels(self.job, role)
        self._syncs.labels(self.job)
        self._sync_failures.labels(self.job)
        self._steps.labels(self.job)
        self._rollouts.labels(self.job)
        for role in ("rollout", "reward", "learner"):
            self._waiting_capacity.labels(self.job, role).set(0.0)
        for result in ("ok", "failed", "timeout", "skipped"):
            self._uploads.labels(self.job, result)

    # ------------------------------------------------------------------ HTTP endpoint

    def start(self, host: str = "0.0.0.0", port: int = 9400) -> int:
        """Serve ``/metrics`` from a background thread; returns the bound port (0 picks one)."""
        if self._server is not None:
            raise RuntimeError(f"metrics endpoint already serving on port {self.port}")
        try:
            self._server, self._thread = start_http_server(port, addr=host,
                                                           registry=self.registry)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise MetricsPortError(
                    exc.errno, f"observability.metrics_port {port} is already in use on "
                    f"{host}; choose a free port, 0 for any free port, or null to turn the "
                    f"metrics endpoint off") from exc
            raise MetricsPortError(
                exc.errno, f"cannot serve metrics on {host}:{port} "
                f"(observability.metrics_host / observability.metrics_port): {exc}") from exc
        self.host, self.port = host, int(self._server.server_address[1])
        return self.port

    @property
    def url(self) -> str | None:
        """Where a scraper reaches the endpoint (a wildcard host becomes this host's address)."""
        if self.port is None:
            return None
        host = self.host
        if host in ("", "0.0.0.0", "::"):
            try:
                host = socket.gethostbyname(socket.gethostname())
            except OSError:
                host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving; the registry and its values stay readable."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
        self._server = self._thread = None

    # ------------------------------------------------------------------ per step

    def record_step(self, row: Mapping, modulation=None, group_tasks: Sequence[str] | None = None,
                    *, now: float | None = None) -> None:
        """Export one ``metrics.jsonl`` row; with the step's ``GroupModulation`` and the task of
        each of its groups, also observe the sample factors per task."""
        job = self.job
        step = int(row["step"])
        for key, gauge in self._job_gauges.items():
            value = row.get(key)
            if value is not None:
                gauge.labels(job).set(float(value))

        present = set()
        for key in _TASK_GAUGES:
            for task, value in (row.get(key) or {}).items():
                present.add(task)
                if value is not None:
                    self._task_gauges[key].labels(job, task).set(float(value))
        for task, log_factor in (row.get("task_log_factor") or {}).items():
            self._unclamped.labels(job, task).set(_safe_exp(float(log_factor)))
        for task, n in (row.get("zero_signal_groups") or {}).items():
            self._zero_groups.labels(job, task).inc(int(n))
        for task, n in (row.get("reward_errors") or {}).items():
            self._reward_errors.labels(job, task).inc(int(n))
        batch = set(row.get("batch_share") or {})
        for task in self._tasks_seen - batch:
            self._task_gauges["batch_share"].labels(job, task).set(0.0)
            if "signal_share" in row:
                self._task_gauges["signal_share"].labels(job, task).set(0.0)
        for task in batch:
            self._task_last_step.labels(job, task).set(step)
        self._tasks_seen |= present

        for key, seconds in (row.get("timing") or {}).items():
            stage = key[:-2] if key.endswith("_s") else key
            self._stage.labels(job, stage).set(float(seconds))

        if modulation is not None:
            self._observe_sample_factors(modulation, group_tasks)

        if row.get("rollout_workers") is not None:
            self._workers.labels(job).set(row["rollout_workers"])
        self._rollouts.labels(job).inc(int(row.get("rollouts", 0)))
        self._step.labels(job).set(step)
        self._steps.labels(job).inc()
        self._last_step_time.labels(job).set(time.time() if now is None else now)

    def _observe_sample_factors(self, modulation, group_tasks) -> None:
        factors = modulation.sample_factors
        if group_tasks is None or len(group_tasks) != len(factors):
            got = None if group_tasks is None else len(group_tasks)
            raise ValueError(f"group_tasks must name the task of each of the "
                             f"{len(factors)} groups, got {got}")
        children = {}
        for task, factor in zip(group_tasks, factors.tolist()):
            child = children.get(task)
            if child is None:
                child = children[task] = self._sample_factor.labels(self.job, task)
            child.observe(factor)

    # ------------------------------------------------------------------ job events

    def set_rollout_workers(self, n: int, desired: int | None = None) -> None:
        """Live rollout workers (and, when known, how many the job is scaled to)."""
        self._workers.labels(self.job).set(n)
        if desired is not None:
            self._workers_desired.labels(self.job).set(desired)

    def set_queue_depth(self, n: int) -> None:
        self._queue.labels(self.job).set(n)

    def set_staleness(self, versions: int) -> None:
        self._staleness.labels(self.job).set(versions)

    def record_restart(self, role: str) -> None:
        if role not in RESTART_ROLES:
            raise ValueError(f"restart role must be one of {RESTART_ROLES}, got {role!r}")
        self._restarts.labels(self.job, role).inc()

    def set_waiting_for_capacity(self, role: str, waiting: bool) -> None:
        self._waiting_capacity.labels(self.job, role).set(1.0 if waiting else 0.0)

    def record_checkpoint_upload(self, result: str) -> None:
        self._uploads.labels(self.job, result).inc()

    def record_weight_sync(self, seconds: float, ok: bool = True) -> None:
        """One weight broadcast: its duration, and whether every worker took the weights."""
        self._syncs.labels(self.job).inc()
        self._sync_seconds.labels(self.job).set(seconds)
        if not ok:
            self._sync_failures.labels(self.job).inc()

    def set_state(self, state: str) -> None:
        """The job's state as a one-hot gauge over states (a new state name is added)."""
        self._state = str(state)
        for known in {*JOB_STATES, self._state}:
            self._job_state.labels(self.job, known).set(1.0 if known == self._state else 0.0)

    def record_worker(self, worker: str, rollouts: int, weight_load_s: float | None = None
                      ) -> None:
        """Rollouts a worker produced since the last call, and its last weight-load time."""
        self._worker_rollouts.labels(self.job, worker).inc(rollouts)
        if weight_load_s is not None:
            self._worker_load.labels(self.job, worker).set(weight_load_s)

    def forget_worker(self, worker: str) -> None:
        """Drop a removed worker's series so a scaled-down pool does not linger in graphs."""
        for metric in (self._worker_rollouts, self._worker_load):
            try:
                metric.remove(self.job, worker)
            except KeyError:
                pass


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
