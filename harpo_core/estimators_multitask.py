"""Newer multi-task estimators: G²RPO, MT-GRPO and GDPO, registered like the paper's six.

Each is vectorised over the batch (segment reductions, one sort), no per-rollout Python loop.
Where a paper's exact definition could not be read here, the docstring says which reading is
implemented.

* ``g2rpo``  (OpenVLThinkerV2, arXiv 2604.08539, "Gaussian GRPO"): each group's rewards are
  mapped onto the standard normal by rank: rank -> quantile -> inverse normal CDF.
* ``mt_grpo`` (arXiv 2602.05547, "Multi-Task GRPO"): GRPO advantages times task weights that an
  improvement-aware update moves towards the worst (lowest reward, least improving) task.
* ``gdpo``   (arXiv 2601.05242, "Group reward-Decoupled normalisation"): every reward component
  (task, format, over-length) is normalised within its group separately, the normalised
  components are summed with the reward's weights, and the sum is whitened over the batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from harpo_core.batch import GroupedBatch, check_finite
from harpo_core.estimators import (
    DEFAULT_EPS,
    EstimatorOutput,
    _check_ddof,
    _check_eps,
    _StepKeyed,
    grpo,
    register_estimator,
)
from harpo_core.segments import Segments

# --------------------------------------------------------------------------- G²RPO


def _normal_scores(values: np.ndarray, segments: Segments) -> np.ndarray:
    """Rank-based normal scores of ``values`` within each segment, ties averaged.

    Within a segment of ``n`` values sorted ascending, position ``j`` (0-based) gets
    ``Φ⁻¹((j + 1/2) / n)``; values that tie share the mean of their positions' scores. The
    scores of a segment sum to 0 (the set is symmetric and averaging keeps the sum), so a
    segment whose values are all equal gets exactly 0.
    """
    seg = segments.index
    order = np.lexsort((values, seg))  # by segment, then by value
    seg_sorted, val_sorted = seg[order], values[order]
    counts = segments.counts
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    position = np.arange(values.size) - starts[seg_sorted]
    quantile = (position + 0.5) / counts[seg_sorted]
    import torch  # here, not at the top: the modulator actor imports the registry, not torch

    score = torch.special.ndtri(torch.from_numpy(quantile)).numpy()
    # tie runs: a new run starts where the segment or the value changes
    new_run = np.ones(values.size, dtype=bool)
    new_run[1:] = (seg_sorted[1:] != seg_sorted[:-1]) | (val_sorted[1:] != val_sorted[:-1])
    run = np.cumsum(new_run) - 1
    run_mean = np.bincount(run, weights=score) / np.bincount(run)
    out = np.empty_like(values)
    out[order] = run_mean[run]
    out[segments.broadcast(segments.is_constant(values))] = 0.0  # exact, not 1e-17
    return out


@register_estimator("g2rpo")
def g2rpo(batch: GroupedBatch) -> np.ndarray:
    """G²RPO: each group's rewards replaced by standard-normal scores of their ranks.

    Reading implemented (the paper's exact equations could not be read here; its abstract and
    summaries describe a 1-D optimal-transport map of a task's reward distribution onto
    N(0, 1) through the CDF, i.e. by rank): within each group of ``n`` rollouts, the ``j``-th
    smallest reward gets ``Φ⁻¹((j + 1/2)/n)`` - the monotone (optimal-transport) map of the
    group's empirical distribution onto the standard normal's ``n`` mid-quantiles. Tied rewards
    share the mean of their positions' scores, so binary rewards get two values and a group's
    advantages still sum to 0; an all-equal group (and a group of one) gets exactly 0. The
    group is the comparison set, as in GRPO: ranking a whole task's rollouts together would
    compare answers to different prompts. The result depends on the rewards' order only, not
    their scale: every task's advantages follow the same distribution for the same group size
    and tie pattern.
    """
    return _normal_scores(batch.values, batch.groups)


# --------------------------------------------------------------------------- MT-GRPO


@register_estimator("mt_grpo")
class MtGrpo(_StepKeyed):
    """MT-GRPO: GRPO advantages scaled by task weights that favour the worst task.

    Reading implemented (the paper's improvement-aware weight update, as published summaries
    state it; its ratio-preserving sampler changes which prompts are drawn and is not part of
    an advantage estimator, so it is left out): task logits ``ξ_m`` start at 0; at each step,
    for the tasks in the batch,

    * ``J_m`` = the task's mean reward in this batch, ``I_m = J_m − J_m(previous batch with
      the task)`` (0 the first time), signal ``u_m = I_m + lam · J_m``;
    * with ``z = softmax(ξ)`` over those tasks, ``ξ_m ← ξ_m − lr · z_m (u_m − Σ_j z_j u_j)``
      (a descent step on ``Σ z_m u_m``: weight moves to tasks with low reward and little
      improvement);
    * the task weight applied is ``w_m = z_m / mean_j z_j`` over the batch's tasks (new ``ξ``),
      so uniform logits give plain GRPO and the mean weight stays 1 (the global step size is
      kept): ``A_i = w_m · Â_i^GRPO``.
    """

    name = "mt_grpo"

    def __init__(self, lam: float = 1.0, lr: float = 0.1, eps: float = DEFAULT_EPS,
                 std_ddof: int = 0):
        super().__init__()
        for key, value in (("lam", lam), ("lr", lr)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value >= 0):
                raise ValueError(f"mt_grpo: {key} must be a number >= 0, got {value!r}")
        _check_eps(eps)
        _check_ddof(std_ddof)
        self.lam, self.lr, self.eps, self.std_ddof = float(lam), float(lr), eps, std_ddof
        self.logits: dict[str, float] = {}
        self.last_reward: dict[str, float] = {}

    def compute(self, rewards, group_ids, task_ids=None, *, step=None, task_names=None):
        cached = self._replay(step)
        if cached is not None:
            return cached
        batch = GroupedBatch.build(rewards, group_ids, task_ids, task_names=task_names)
        names = batch.task_names
        reward = batch.task_mean(batch.values)
        previous = np.array([self.last_reward.get(n, np.nan) for n in names])
        improvement = np.where(np.isnan(previous), 0.0, reward - previous)
        signal = improvement + self.lam * reward
        logits = np.array([self.logits.get(n, 0.0) for n in names])
        z = _softmax(logits)
        logits = logits - self.lr * z * (signal - z @ signal)
        z = _softmax(logits)
        weight = z / z.mean()
        for n, xi, j in zip(names, logits.tolist(), reward.tolist(), strict=True):
            self.logits[n], self.last_reward[n] = xi, j
        adv = grpo(batch, eps=self.eps, std_ddof=self.std_ddof) * batch.task_broadcast(weight)
        out = EstimatorOutput(adv, {"task_weight": dict(zip(names, weight.tolist()))})
        self._last_step, self._last_output = step, out
        return out

    def task_factors(self) -> dict[str, float]:
        """The weight each known task would get if all were in the batch."""
        if not self.logits:
            return {}
        z = _softmax(np.array(list(self.logits.values())))
        return dict(zip(self.logits, (z / z.mean()).tolist()))

    def state_dict(self) -> dict:
        return {"logits": dict(self.logits), "last_reward": dict(self.last_reward),
                "last_step": self._last_step}

    def load_state_dict(self, state: dict) -> None:
        self.logits = {str(k): float(v) for k, v in state["logits"].items()}
        self.last_reward = {str(k): float(v) for k, v in state["last_reward"].items()}
        self._last_step, self._last_output = state.get("last_step"), None


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


# --------------------------------------------------------------------------- GDPO

# How a caller hands reward components to an estimator that takes them: a mapping of
# component name -> (per-rollout values aligned with the rewards, weight in the total reward).
Components = Mapping[str, tuple[np.ndarray, float]]


@register_estimator("gdpo")
def gdpo(batch: GroupedBatch, components: Components | None = None, eps: float = DEFAULT_EPS,
         std_ddof: int = 0) -> np.ndarray:
    """GDPO: each reward component normalised within its group, summed, whitened over the batch.

    ``A_i = whiten_batch(Σ_k w_k · Â_i^(k))`` with ``Â^(k)`` GRPO's group normalisation of
    component ``k`` alone (an all-equal component in a group contributes exactly 0) and
    ``w_k`` the component's weight in the total reward. harpo's rewards have three components:
    ``task`` (weight ``1 − reward.format_weight``), ``format`` (``reward.format_weight``) and
    ``overlong`` (the penalty, weight 1; all zero when it is off); the trainer passes them (see
    ``services/advantages.py``). The whitening is ``(x − mean) / max(std, eps)`` over the
    batch, 0 when the batch has no signal at all, as the paper's code does after summing.
    Without components (a caller that has only the total reward) this is an error, not a
    silent fallback to GRPO.
    """
    _check_eps(eps)
    _check_ddof(std_ddof)
    if not components:
        raise ValueError("gdpo normalises each reward component separately and needs them: "
                         "pass components={name: (values, weight), ...} to compute() (harpo's "
                         "trainer passes task, format and overlong)")
    total = np.zeros(batch.n_rollouts)
    for name, (values, weight) in components.items():
        values = np.asarray(values, dtype=np.float64)
        if values.shape != batch.values.shape:
            raise ValueError(f"gdpo: component {name!r} has {values.size} values for "
                             f"{batch.n_rollouts} rollouts")
        check_finite(f"reward component {name!r}", values)
        part = GroupedBatch(values=values, groups=batch.groups, tasks=batch.tasks,
                            task_names=batch.task_names)
        total += float(weight) * grpo(part, eps=eps, std_ddof=std_ddof)
    std = total.std()
    if std == 0.0:
        return np.zeros_like(total)
    return (total - total.mean()) / max(std, eps)


gdpo.takes_components = True
