"""Advantage estimators, one registered function or class per estimator.

Every estimator maps a flat batch ``(rewards, group_ids, task_ids)`` to one advantage per
rollout, vectorised over the batch with segment reductions (see ``segments.py``). Stateless
estimators are plain functions of a :class:`GroupedBatch`; stateful ones (``ema_grpo``,
``harpo``) are classes with ``state_dict`` / ``load_state_dict``. :func:`make_estimator` gives
both the same interface::

    est = make_estimator("harpo", beta_rho=0.9)
    out = est.compute(rewards, group_ids, task_ids, step=3)
    out.advantages          # [N] float64

An estimator outside the registry is named ``"package.module:function"`` (a function
``fn(batch: GroupedBatch, **params) -> advantages`` or a class like the stateful ones) and is
then built and checked exactly like a registered one.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import numpy as np

from harpo_core.batch import GroupedBatch, check_finite
from harpo_core.modulator import (
    MODULATOR_METHODS,
    HarpoConfig,
    HarpoModulator,
    ModulationResult,
    Modulator,
    modulate,
)

DEFAULT_EPS = 1e-6
DEFAULT_EMA_DECAY = 0.99


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


SPEC_FORM = "'package.module:function'"
ESTIMATOR_METHODS = ("compute", "state_dict", "load_state_dict")


def _load_spec(spec: str) -> Callable | type:
    """Import the estimator named by ``"package.module:attr"`` (``attr`` may be dotted)."""
    module_name, _, attr_path = (part.strip() for part in spec.partition(":"))
    if not module_name or not attr_path:
        empty = "module" if not module_name else "function"
        raise ValueError(f"estimator spec {spec!r} has an empty {empty} part; expected {SPEC_FORM}")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # a module may fail to import with any exception
        raise ValueError(f"cannot import module {module_name!r} for estimator {spec!r}: "
                         f"{type(err).__name__}: {err}") from err
    target: Any = module
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise ValueError(f"estimator {spec!r}: no attribute {attr_path!r} "
                             f"(looked up in module {module_name!r})")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"estimator {spec!r} is not callable: it is a {type(target).__name__}")
    if inspect.isclass(target):
        missing = [m for m in ESTIMATOR_METHODS if not callable(getattr(target, m, None))]
        if missing:
            raise ValueError(f"estimator {spec!r} is a class without {', '.join(missing)}; an "
                             f"estimator class needs {', '.join(ESTIMATOR_METHODS)}")
    return target


def _resolve(name: str) -> Callable | type:
    """The registered estimator ``name``, or the one a ``"module:function"`` spec names."""
    if not isinstance(name, str):
        raise ValueError(f"an estimator is a registered name or a {SPEC_FORM} string, "
                         f"got {name!r}")
    if ":" in name:
        return _load_spec(name)
    if name not in _REGISTRY:
        raise ValueError(f"unknown estimator {name!r}; available: {available_estimators()} "
                         f"(or a user estimator as {SPEC_FORM})")
    return _REGISTRY[name]


def _parameters(target: Callable | type) -> tuple[list[str], bool]:
    """Named parameters of a class's constructor or of a function after its first (``batch``),
    and whether it also takes ``**kwargs``."""
    found = list(inspect.signature(target).parameters.values())
    names, any_keyword = [], False
    for param in found if inspect.isclass(target) else found[1:]:
        if param.name == "components" and getattr(target, "takes_components", False):
            continue  # given per step by the caller (the reward's parts), not a parameter
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            any_keyword = True
        elif param.kind is not inspect.Parameter.VAR_POSITIONAL:
            names.append(param.name)
    return names, any_keyword


def estimator_parameters(name: str) -> list[str]:
    """Names of the parameters that estimator ``name`` (registered or a spec) accepts."""
    return _parameters(_resolve(name))[0]


def make_estimator(name: str, **params) -> Estimator:
    """Build an estimator by registered name or ``"module:function"`` spec; unknown names and
    parameters are errors."""
    target = _resolve(name)
    allowed, any_keyword = _parameters(target)
    unknown = sorted(set(params) - set(allowed))
    if unknown and not any_keyword:
        raise ValueError(
            f"unknown parameter(s) {unknown} for estimator {name!r}; allowed: {allowed}"
        )
    if not inspect.isclass(target):
        return _StatelessEstimator(name, target, params, check_output=name not in _REGISTRY)
    estimator = target(**params)
    if not hasattr(estimator, "name"):
        estimator.name = name
    return estimator


def compute_advantages(name: str, rewards, group_ids, task_ids=None, **params) -> np.ndarray:
    """One-shot convenience for stateless estimators."""
    return make_estimator(name, **params).compute(rewards, group_ids, task_ids).advantages


class _StatelessEstimator:
    def __init__(self, name: str, fn: Callable, params: dict, check_output: bool = False):
        self.name, self._fn, self._params = name, fn, params
        self._check_output = check_output
        # an estimator of several reward components (gdpo) gets them with each batch
        self.takes_components = bool(getattr(fn, "takes_components", False))

    def compute(self, rewards, group_ids, task_ids=None, *, step=None, task_names=None,
                components=None):
        batch = GroupedBatch.build(rewards, group_ids, task_ids, task_names=task_names)
        extra = {"components": components} if self.takes_components else {}
        advantages = self._fn(batch, **self._params, **extra)
        if self._check_output:  # a user function: hold it to what the registered ones give
            advantages = np.asarray(advantages, dtype=np.float64)
            if advantages.shape != batch.values.shape:
                raise ValueError(f"estimator {self.name!r} returned advantages of shape "
                                 f"{advantages.shape} for {batch.values.size} rollouts")
            check_finite(f"advantages of estimator {self.name!r}", advantages)
        return EstimatorOutput(advantages)

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


def _check_ddof(std_ddof: int) -> None:
    if std_ddof not in (0, 1):
        raise ValueError(f"std_ddof must be 0 or 1, got {std_ddof!r}")


@register_estimator("grpo")
def grpo(batch: GroupedBatch, eps: float = DEFAULT_EPS, std_ddof: int = 0) -> np.ndarray:
    """``(r - mean_q) / max(std_q, eps)``; population std (ddof 0) by default."""
    _check_eps(eps)
    _check_ddof(std_ddof)
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

    def __init__(self, decay: float = DEFAULT_EMA_DECAY, eps: float = DEFAULT_EPS):
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
    """GRPO advantages rescaled by HARPO's task and sample factors (see ``modulator.py``).

    The factors come from ``modulator``: any object with ``update_groups(step, GroupStats) ->
    GroupModulation``, ``state_dict()`` and ``load_state_dict(state)`` (an in-process
    :class:`HarpoModulator`, or a proxy to a remote one). Without it, an in-process
    ``HarpoModulator(HarpoConfig(**config))`` is built from the remaining keyword arguments.
    """

    name = "harpo"

    def __init__(self, eps: float = DEFAULT_EPS, std_ddof: int = 0,
                 modulator: Modulator | None = None, **config):
        _check_eps(eps)
        _check_ddof(std_ddof)
        self.eps, self.std_ddof = eps, std_ddof
        self.base = "grpo"
        if modulator is None:
            modulator = HarpoModulator(HarpoConfig(**config))
        elif config:
            raise ValueError(
                f"harpo: got both a modulator and HarpoConfig fields {sorted(config)}; an "
                f"injected modulator carries its own config, so give one or the other"
            )
        else:
            missing = [m for m in MODULATOR_METHODS if not callable(getattr(modulator, m, None))]
            if missing:
                raise TypeError(f"harpo: the modulator ({type(modulator).__name__}) has no "
                                f"{', '.join(missing)}; it needs {', '.join(MODULATOR_METHODS)}")
        self.modulator: Modulator = modulator

    def compute(self, rewards, group_ids, task_ids=None, *, step=None, task_names=None):
        if step is None:
            raise ValueError("the harpo estimator is stateful: pass step=<training step>")
        batch = GroupedBatch.build(rewards, group_ids, task_ids, task_names=task_names)
        base = self.base_advantages(batch)
        result: ModulationResult = modulate(self.modulator, step, batch, base)
        return EstimatorOutput(result.advantages, {"modulation": result})

    def base_advantages(self, batch: GroupedBatch) -> np.ndarray:
        """The advantages HARPO modulates: GRPO's (``harpo_on`` takes another base)."""
        return grpo(batch, eps=self.eps, std_ddof=self.std_ddof)

    def task_factors(self) -> dict[str, float]:
        """The modulator's current task factors ({} when it does not report them)."""
        report = getattr(self.modulator, "task_factors", None)
        return report() if callable(report) else {}

    def state_dict(self) -> dict:
        return self.modulator.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.modulator.load_state_dict(state)


# ``make_estimator("harpo", beta_rho=...)`` checks names against __init__, which takes
# **config: list the modulator's fields explicitly so typos are still caught.
_HARPO_FIELDS = ["eps", "std_ddof", "modulator"] + [f.name for f in fields(HarpoConfig)]


def _harpo_signature(first: tuple[str, ...] = ()):
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY)
               for n in (*first, *_HARPO_FIELDS)]
    return inspect.Signature(params)


Harpo.__init__.__signature__ = _harpo_signature()


# The newer multi-task estimators and HARPO on other bases register themselves here too.
from harpo_core import estimators_modulated, estimators_multitask  # noqa: E402,F401
