"""What one training step produced, and the metrics row made from it.

``Trainer.step`` returns a :class:`StepRecord`; :func:`metrics_row` turns it into the
``metrics.jsonl`` row (and so the Prometheus series) without looking at anything else, which
keeps the row testable without a job and the step free of bookkeeping.
"""

from __future__ import annotations

import hashlib
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from harpo_core import GroupModulation

# Learner metrics copied into the row as they are (when the learner reports them).
LEARNER_KEYS = ("loss", "kl", "entropy", "clip_frac", "approx_kl", "grad_norm", "lr",
                "logprob_mismatch_max", "logprob_mismatch_mean", "logprob_mismatch_p99",
                "tis_weight_mean", "tis_truncated_frac", "padding_waste")


@dataclass(frozen=True)
class StepAdvantages:
    """The estimator's answer for one step, aligned with the step's rollout summary."""

    values: np.ndarray  # [N] advantage of each rollout (0 for dropped groups)
    modulation: GroupModulation | None = None  # HARPO's factors, when the estimator has them
    group_tasks: tuple[str, ...] | None = None  # task of each of the modulation's groups
    dropped_groups: int = 0  # groups left out by reward.on_error: drop_group
    # per-task weights an estimator applied this step (mt_grpo's w_m), task name -> weight
    task_weights: dict[str, float] | None = None

    def keyed(self, rollout_ids: np.ndarray) -> np.ndarray:
        """The advantages indexed by rollout id (``out[k]``: the rollout whose id is k), the
        form in which they travel to the learners with their rows."""
        out = np.zeros(int(rollout_ids.max()) + 1)
        out[rollout_ids] = self.values
        return out


@dataclass(frozen=True)
class WeightSyncReport:
    """The weight sync a step did (``synced`` False: the pool already held the weights)."""

    synced: bool = False
    seconds: float = 0.0
    load_seconds: dict[str, float] = field(default_factory=dict)  # per worker
    failures: int = 0  # workers lost (and replaced) during the sync


@dataclass(frozen=True)
class StepRecord:
    """Everything a training step produced; the metrics row is a pure function of it."""

    step: int
    task_names: tuple[str, ...]
    summary: dict[str, np.ndarray]  # per-rollout numbers from the reward scorers
    advantages: StepAdvantages
    learner: dict  # the learner group's metrics
    timings: dict[str, float]  # seconds per stage, and step_s for the whole step
    sync: WeightSyncReport
    rollouts_per_worker: dict[str, int]
    # the job around the step, as it stood when the step ended
    rollout_workers: int
    restarts: dict[str, int]
    weight_sync_failures: int  # since the job started

    @property
    def modulation(self) -> GroupModulation | None:
        return self.advantages.modulation


class StageTimer:
    """Seconds per named stage; a stage timed twice adds up."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0

    def elapsed(self) -> float:
        return time.perf_counter() - self._start


def per_task_means(codes: np.ndarray, values: np.ndarray, names: tuple[str, ...], *,
                   skip_undefined: bool = False) -> dict[str, float]:
    """Mean of ``values`` for each task present in ``codes``. NaN counts as 0, or with
    ``skip_undefined`` is left out of the mean, and a task with no defined value is left out
    (accuracy: a custom task type's reward function defines none)."""
    if skip_undefined:
        defined = ~np.isnan(values)
        codes, values = codes[defined], values[defined]
    count = np.bincount(codes, minlength=len(names))
    sums = np.bincount(codes, weights=np.nan_to_num(values), minlength=len(names))
    return {n: float(s / c) for n, s, c in zip(names, sums, count) if c}


def signal_share(codes: np.ndarray, advantages: np.ndarray, names: tuple[str, ...]
                 ) -> dict[str, float]:
    """Each task's share of the policy-gradient signal: ``Σ|A|`` over its rollouts ÷ ``Σ|A|``
    over the batch (tasks in the batch; all 0 when no rollout has an advantage)."""
    count = np.bincount(codes, minlength=len(names))
    sums = np.bincount(codes, weights=np.abs(advantages), minlength=len(names))
    total = float(sums.sum())
    return {n: (float(s) / total if total > 0 else 0.0)
            for n, s, c in zip(names, sums, count) if c}


def prompt_digest(prompt_index: np.ndarray) -> str:
    """Which prompts, in order: equal digests mean the same samples were trained on."""
    return hashlib.blake2b(prompt_index.astype(np.int64).tobytes(), digest_size=8).hexdigest()


def metrics_row(record: StepRecord) -> dict:
    """The ``metrics.jsonl`` row of a step."""
    summary, names, learner = record.summary, record.task_names, record.learner
    codes = summary["task_code"]
    count = np.bincount(codes, minlength=len(names))
    n = codes.size
    step_s = record.timings["step_s"]
    advantages = record.advantages

    def per_task(values):
        return per_task_means(codes, values, names)

    row = {
        "step": record.step,
        "policy_version": int(summary["policy_version"][0]),
        "staleness": int(learner.get("staleness", 0)),  # learner version - rollout version
        "rollouts": n,
        "prompt_digest": prompt_digest(summary["prompt_index"]),
        "reward": per_task(summary["reward"]),
        "reward_mean": float(summary["reward"].mean()),
        "accuracy": per_task_means(codes, summary["accuracy"], names, skip_undefined=True),
        "format": per_task(summary["reward_format"]),
        "reward_errors": {k: int(v) for k, v in zip(
            names, np.bincount(codes, weights=summary["reward_error"], minlength=len(names)))
            if v},
        "dropped_groups": advantages.dropped_groups,
        "batch_share": {k: v for k, v in zip(names, (count / n).tolist()) if v > 0},
        "advantage_abs_mean": per_task(np.abs(advantages.values)),
        "signal_share": signal_share(codes, advantages.values, names),
        "response_length": float(summary["response_length"].mean()),
        "stop_fraction": float(summary["stopped"].mean()),
        "rollouts_per_s": n / step_s,
        "rollout_workers": record.rollout_workers,
        "restarts": dict(record.restarts),
        "weight_sync_failures": record.weight_sync_failures,
        "tokens_per_s": float(summary["response_length"].sum()) / step_s,
        "timing": {**record.timings,
                   "weight_load_s": max(record.sync.load_seconds.values(), default=0.0),
                   "learner_fetch_s": learner.get("fetch_s", 0.0),
                   "learner_update_s": learner.get("update_s", 0.0)},
    }
    row.update({key: learner[key] for key in LEARNER_KEYS if key in learner})
    if advantages.task_weights is not None:
        row["task_weight"] = dict(advantages.task_weights)
    modulation = advantages.modulation
    if modulation is not None:
        row["task_factor"] = modulation.task_factors
        row["task_log_factor"] = modulation.task_log_factors
        row["task_signal"] = modulation.task_signals
        row["task_signal_ema"] = modulation.task_ema
        row["signal_reference"] = (None if math.isnan(modulation.reference)
                                   else modulation.reference)
        row["zero_signal_groups"] = modulation.zero_signal_groups
        row["sample_factor_mean"] = float(np.mean(modulation.sample_factors))
    return row
