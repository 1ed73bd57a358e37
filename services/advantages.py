"""A step's advantages: the configured estimator over the step's scored rollouts.

Every estimator goes through the same path (``harpo_core.make_estimator``); HARPO differs only
in that its modulator is the run's central modulator actor (``services.modulator_actor``).
Groups whose reward failed are dropped here when ``reward.on_error: drop_group`` asks for it:
they get advantage 0 and stay out of the estimator's (and so the modulator's) statistics.
"""

from __future__ import annotations

import logging

import numpy as np

from harpo_core.estimators import Estimator
from services.step_record import StepAdvantages

log = logging.getLogger(__name__)


def reward_components(summary: dict[str, np.ndarray], keep: np.ndarray,
                      format_weight: float) -> dict[str, tuple[np.ndarray, float]]:
    """The reward's parts and their weights in it (``total = (1 - w) task + w format +
    overlong``), for an estimator that normalises each part on its own (gdpo)."""
    return {"task": (summary["reward_task"][keep], 1.0 - format_weight),
            "format": (summary["reward_format"][keep], format_weight),
            "overlong": (summary["reward_overlong"][keep], 1.0)}


def step_advantages(estimator: Estimator, step: int, summary: dict[str, np.ndarray],
                    task_names: tuple[str, ...], *, drop_failed_groups: bool,
                    format_weight: float = 0.2) -> StepAdvantages:
    """Advantages of every rollout of ``summary`` (the scorers' per-rollout numbers);
    ``format_weight`` is ``reward.format_weight``, the weights of the reward's parts."""
    keep = np.ones(summary["reward"].size, dtype=bool)
    dropped = 0
    if drop_failed_groups and summary["reward_error"].any():
        bad_groups = np.unique(summary["group_id"][summary["reward_error"]])
        keep = ~np.isin(summary["group_id"], bad_groups)
        dropped = int(bad_groups.size)
        log.warning("step %d: dropping %d group(s) whose reward failed", step, dropped)
    values = np.zeros(keep.size)
    if not keep.any():
        return StepAdvantages(values, dropped_groups=dropped)
    extra = ({"components": reward_components(summary, keep, format_weight)}
             if getattr(estimator, "takes_components", False) else {})
    out = estimator.compute(summary["reward"][keep], summary["group_id"][keep],
                            summary["task_code"][keep], step=step, task_names=task_names,
                            **extra)
    values[keep] = out.advantages
    weights = out.extras.get("task_weight")  # mt_grpo: the task weights it applied
    weights = None if weights is None else {str(k): float(v) for k, v in weights.items()}
    modulation = out.extras.get("modulation")
    if modulation is None:
        return StepAdvantages(values, dropped_groups=dropped, task_weights=weights)
    return StepAdvantages(values, modulation.groups, tuple(modulation.group_tasks), dropped,
                          weights)
