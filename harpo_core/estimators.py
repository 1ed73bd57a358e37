"""Advantage estimators, one registered function or class per estimator.

Every estimator maps a flat batch ``(rewards, group_ids, task_ids)`` to one advantage per
rollout, vectorised over the batch with segment reductions (see ``segments.py``). Stateless
estimators are plain functions of a :class:`GroupedBatch`; stateful ones (``ema_grpo``,
``harpo``) are classes with ``state_dict`` / ``load_state_dict``. :func:`make_estimator` gives
both the same interface::

    est = make_estimator("harpo", beta_rho=0.9)
    out = est.compute(rewards, group_ids, task_ids, step=3)
    out.advantages          # [N] float64
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import numpy as np

from harpo_core.batch import GroupedBatch
from harpo_core.modulator import HarpoConfig, HarpoModulator, ModulationResult

DEFAULT_EPS = 1e-6


@dataclass
class EstimatorOutput:
    advantages: np.ndarray  # [N] float64
    extras: dict[str, Any] = field(default_factory=dict)


class Estimator(Protocol):
    name: str

    def compute(self, rewards, group_ids, task_ids=None, *, step: int | None = None,
                task_names: Sequence[str] | None = None) -> EstimatorOutput: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


_REGISTRY: dict[str, Callable | type] = {}


def register_estimator(name: str):
    """Register an estimator function ``fn(batch, **params) -> advantages`` or a class."""

    def decorator(obj):
        if name in _REGISTRY:
            raise ValueError(f"estimator {name!r} is already registered")
        _REGISTRY[name] = obj
        return obj

    return decorator


def available_estimators() -> list[str]:
    return sorted(_REGISTRY)


def _check_params(name: str, target: Callable, params: dict, skip: int) -> None:
    allowed = list(inspect.signature(target).parameters)[skip:]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown} for estimator {name!r}; allowed: {allowed}"
        )


def make_estimator(name: str, **params) -> Estimator:
    """Build a registered estimator by name; unknown names and parameters are errors."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown estimator {name!r}; available: {available_estimators()}")
    target = _REGISTRY[name]
    if inspect.isclass(target):
        _check_params(name, target.__init__, params, skip=1)
        return target(**params)
    _check_params(name, target, params, skip=1)
    return _StatelessEstimator(name, target, params)


def compute_advantages(name: str, rewards, group_ids, task_ids=None, **params) -> np.ndarray:
    """One-shot convenience for stateless estimators."""
    return make_estimator(name, **params).compute(rewards, group_ids, task_ids).advantages


class _StatelessEstimator:
    def __init__(self, name: str, fn: Callable, params: dict):
        self.name, self._fn, self._params = name, fn, params

    def compute(self, rewards, group_ids, task_ids=None, *, step=None, task_names=None):
        batch = GroupedBatch.build(rewards, group_ids, task_ids, task_names=task_names)
        return EstimatorOutput(self._fn(batch, **self._params))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"estimator {self.name!r} is stateless; got state keys {list(state)}")


# --------------------------------------------------------------------------- group baselines


def group_centered(batch: GroupedBatch) -> np.ndarray:
    """``r_i - mean_q r``, exactly 0 in groups whose rewards are all equal.

    A float mean of equal values can differ from them in the last bit (0.1 * 3 / 3); the exact
    zero keeps such groups from producing ``rounding error / eps`` after normalisation.
    """
    g = batch.groups
    centered = batch.values - g.broadcast(g.mean(batch.values))
    centered[g.broadcast(g.is_constant(batch.values))] = 0.0
    return centered


def group_std(batch: GroupedBatch, centered: np.ndarray, ddof: int) -> np.ndarray:
    """Per-group standard deviation; ``inf`` where a group has too few rollouts for ``ddof``."""
    g = batch.groups
    dof = g.counts - ddof
    with np.errstate(divide="ignore", invalid="ignore"):
        var = np.where(dof > 0, g.sum(centered * centered) / np.maximum(dof, 1), np.inf)
    return np.sqrt(var)


def _check_eps(eps: float) -> None:
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")


@register_estimator("grpo")
def grpo(batch: GroupedBatch, eps: float = DEFAULT_EPS, std_ddof: int = 0) -> np.ndarray:
    """``(r - mean_q) / max(std_q, eps)``; population std (ddof 0) by default."""
    _check_eps(eps)
    if std_ddof not in (0, 1):
        raise ValueError(f"std_ddof must be 0 or 1, got {std_ddof!r}")
    g = batch.groups
    centered = batch.values - g.broadcast(g.mean(batch.values))
    std = group_std(batch, centered, std_ddof)
    # A per-group scale of exactly 0 makes all-equal groups (and lone rollouts) exactly 0.
    scale = np.where(g.is_constant(batch.values), 0.0, 1.0 / np.maximum(std, eps))
    return centered * g.broadcast(scale)


@register_estimator("dr_grpo")
def dr_grpo(batch: GroupedBatch) -> np.ndarray:
    """Dr. GRPO: the group mean removed, no division by the std."""
    return group_centered(batch)


@register_estimator("rloo")
def rloo(batch: GroupedBatch) -> np.ndarray:
    """Leave-one-out baseline: ``r_i - mean_{j != i} r_j = n/(n-1) (r_i - mean_q)``; 0 alone."""
    n = batch.groups.counts.astype(np.float64)
    scale = np.divide(n, n - 1, out=np.zeros_like(n), where=n > 1)
    return group_centered(batch) * batch.groups.broadcast(scale)


@register_estimator("reinforce_pp_baseline")
def reinforce_pp_baseline(batch: GroupedBatch, eps: float = DEFAULT_EPS) -> np.ndarray:
    """REINFORCE++ with baseline: the group mean removed, then whitened over the whole batch."""
    _check_eps(eps)
    centered = group_centered(batch)
    std = centered.std()
    if std == 0.0:
        return np.zeros_like(centered)
    return (centered - centered.mean()) / max(std, eps)


@register_estimator("gpg")
def gpg(batch: GroupedBatch) -> np.ndarray:
    """GPG: ``alpha (r - mean_q)`` with ``alpha = N / #(rollouts with a nonzero reward)``."""
    nonzero = int(np.count_nonzero(batch.values))
    alpha = batch.n_rollouts / max(nonzero, 1)
    return alpha * group_centered(batch)


# --------------------------------------------------------------------------- stateful


class _StepKeyed:
    """Step bookkeeping shared by stateful estimators: one update per step, replay is a read."""

    def __init__(self):
        self._last_step: int | None = None
        self._last_output: EstimatorOutput | None = None

    def _replay(self, step: int | None) -> EstimatorOutput | None:
        if step is None or self._last_step is None:
            return None
        if step == self._last_step and self._last_output is not None:
            return self._last_output
        if step <= self._last_step:
            raise ValueError(f"step {step} is not after the last applied step {self._last_step}")
        return None


@register_estimator("ema_grpo")
class EmaGrpo(_StepKeyed):
    """Group mean removed, divided by a per-task std from EMAs of the first two moments.

    The first batch that contains a task initialises its moments; later batches update them
    with ``m <- decay * m + (1 - decay) * batch_moment``. The current batch is included before
    normalising.
    """

    name = "ema_grpo"

    def __init__(self, decay: float = 0.99, eps: float = DEFAULT_EPS):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        _check_eps(eps)
        self.decay, self.eps = decay, eps
        self.moments: dict[str, tuple[float, float]] = {}

    def compute(self, rewards, group_ids, task_ids=None, *, step=None, task_names=None):
        cached = self._replay(step)
        if cached is not None:
            return cached
        batch = GroupedBatch.build(rewards, group_ids, task_ids, task_names=task_names)
        m1_batch, m2_batch = batch.task_mean(batch.values), batch.task_mean(batch.values**2)
        prev = np.array([self.moments.get(n, (np.nan, np.nan)) for n in batch.task_names])
        seen = ~np.isnan(prev[:, 0])
        m1 = np.where(seen, self.decay * prev[:, 0] + (1 - self.decay) * m1_batch, m1_batch)
        m2 = np.where(seen, self.decay * prev[:, 1] + (1 - self.decay) * m2_batch, m2_batch)
        for name, a, b in zip(batch.task_names, m1, m2, strict=True):
            self.moments[name] = (float(a), float(b))
        std = np.sqrt(np.maximum(m2 - m1 * m1, 0.0))
        adv = group_centered(batch) / batch.task_broadcast(np.maximum(std, self.eps))
        out = EstimatorOutput(adv, {"task_std": dict(zip(batch.task_names, std.tolist()))})
        self._last_step, self._last_output = step, out
        return out

    def state_dict(self) -> dict:
        return {"moments": {k: list(v) for k, v in self.moments.items()},
                "last_step": self._last_step}

    def load_state_dict(self, state: dict) -> None:
        self.moments = {str(k): (float(a), float(b)) for k, (a, b) in state["moments"].items()}
        self._last_step, self._last_output = state.get("last_step"), None


@register_estimator("harpo")
class Harpo:
    """GRPO advantages rescaled by HARPO's task and sample factors (see ``modulator.py``)."""

    name = "harpo"

    def __init__(self, eps: float = DEFAULT_EPS, std_ddof: int = 0, **modulator):
        _check_eps(eps)
        self.eps, self.std_ddof = eps, std_ddof
        self.modulator = HarpoModulator(HarpoConfig(**modulator))

    def compute(self, rewards, group_ids, task_ids=None, *, step=None, task_names=None):
        if step is None:
            raise ValueError("the harpo estimator is stateful: pass step=<training step>")
        batch = GroupedBatch.build(rewards, group_ids, task_ids, task_names=task_names)
        base = grpo(batch, eps=self.eps, std_ddof=self.std_ddof)
        result: ModulationResult = self.modulator.update_batch(step, batch, base)
        return EstimatorOutput(result.advantages, {"modulation": result})

    def state_dict(self) -> dict:
        return self.modulator.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.modulator.load_state_dict(state)


# ``make_estimator("harpo", beta_rho=...)`` checks names against __init__, which takes
# **modulator: list the modulator's fields explicitly so typos are still caught.
_HARPO_FIELDS = ["eps", "std_ddof"] + [f.name for f in fields(HarpoConfig)]


def _harpo_signature():
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in _HARPO_FIELDS]
    return inspect.Signature(params)


Harpo.__init__.__signature__ = _harpo_signature()
