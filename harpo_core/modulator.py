"""The HARPO modulator: task- and sample-level rescaling of group-relative advantages.

Given GRPO advantages ``Â_i`` (rollout ``i`` of group ``q`` of task ``m``), HARPO measures how
much each task and each group contributes to the gradient (mean ``|Â|``), and rescales so that
none dominates:

1. group signal      ``p_(m,q) = mean_{i in q} |Â_i|``
2. task signal       ``p_m = mean over the task's rollouts in the batch of |Â_i|``
3. task EMA          ``ρ_m <- β_ρ ρ_m + (1 - β_ρ) p_m``         (first value initialises)
4. reference         ``log ρ_ref = mean_m log ρ_m``               (geometric mean over tasks)
5. factor EMA        ``L_m <- β_s L_m + (1 - β_s)(log ρ_ref - log ρ_m)``,  ``L_m`` starts at 0
6. task factor       ``s_m = clamp(exp L_m, task_clamp)``          (state keeps L_m unclamped)
7. sample factor     ``s_(m,q) = clamp(exp(mean_q' log p_(m,q') - log p_(m,q)), sample_clamp)``
                     in tasks with >= 2 groups in the batch, else 1
8. advantage         ``A^H_i = s_(m,q) s_m Â_i``

Zero-signal groups (all rewards equal, ``p_(m,q) = 0``) and tasks (``p_m = 0``) follow
``zero_signal``: ``"exclude"`` (default) gives such groups factor 1 and leaves such tasks' EMA
state untouched and out of the reference; ``"floor"`` floors signals at ``signal_floor`` and
lets them in, as the paper's reference code does.

The modulator's input is per-group statistics (:class:`GroupStats`, a few numbers per prompt),
so it can run as a central service that never sees whole batches. Updates are keyed by step:
applying a step again returns the stored result and leaves the state alone.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

import numpy as np

from harpo_core.batch import GroupedBatch, check_finite
from harpo_core.segments import Segments

ZeroSignal = Literal["exclude", "floor"]
STATE_VERSION = 1


def _check_clamp(name: str, clamp) -> tuple[float, float] | None:
    if clamp is None:
        return None
    try:
        lo, hi = (float(x) for x in clamp)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high) or None, got {clamp!r}") from None
    if not 0.0 < lo <= 1.0 <= hi < math.inf:
        raise ValueError(f"{name} must satisfy 0 < low <= 1 <= high < inf, got {clamp!r}")
    return lo, hi


@dataclass(frozen=True)
class HarpoConfig:
    """HARPO's knobs; defaults are the paper's."""

    beta_rho: float = 0.95  # EMA of the task signal ρ_m
    beta_s: float = 0.95  # EMA of the log task factor L_m
    task_clamp: tuple[float, float] | None = (0.5, 4.0)  # None: unclamped
    sample_clamp: tuple[float, float] | None = (0.5, 3.0)  # None: unclamped
    zero_signal: ZeroSignal = "exclude"
    signal_floor: float = 1e-6  # floor of zero signals when zero_signal == "floor"
    history: int = 8  # how many recent steps can be replayed from the cache

    def __post_init__(self):
        for name in ("beta_rho", "beta_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
        object.__setattr__(self, "task_clamp", _check_clamp("task_clamp", self.task_clamp))
        object.__setattr__(self, "sample_clamp", _check_clamp("sample_clamp", self.sample_clamp))
        if self.zero_signal not in ("exclude", "floor"):
            raise ValueError(
                f"zero_signal must be 'exclude' or 'floor', got {self.zero_signal!r}"
            )
        if not (isinstance(self.signal_floor, (int, float)) and self.signal_floor > 0):
            raise ValueError(f"signal_floor must be > 0, got {self.signal_floor!r}")
        if not (isinstance(self.history, int) and self.history >= 1):
            raise ValueError(f"history must be an integer >= 1, got {self.history!r}")


def _clamp(x: np.ndarray, bounds: tuple[float, float] | None) -> np.ndarray:
    return x if bounds is None else np.clip(x, bounds[0], bounds[1])


@dataclass(frozen=True)
class GroupStats:
    """What the modulator needs from a batch: one row per group, a few numbers each."""

    task_names: tuple[str, ...]  # [M] names of the tasks the codes refer to
    group_task: np.ndarray  # [G] task code (index into task_names) of each group
    size: np.ndarray  # [G] rollouts in the group
    signal: np.ndarray  # [G] p_(m,q) = mean |Â| over the group

    def __post_init__(self):
        names = tuple(str(t) for t in self.task_names)
        group_task = np.asarray(self.group_task, dtype=np.int64)
        size = np.asarray(self.size, dtype=np.int64)
        signal = np.asarray(self.signal, dtype=np.float64)
        object.__setattr__(self, "task_names", names)
        object.__setattr__(self, "group_task", group_task)
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "signal", signal)
        if not (group_task.ndim == size.ndim == signal.ndim == 1
                and group_task.size == size.size == signal.size):
            raise ValueError(
                f"group stats must be 1-D with equal lengths: group_task {group_task.shape}, "
                f"size {size.shape}, signal {signal.shape}"
            )
        if size.size == 0:
            raise ValueError("group stats are empty: a batch needs at least one group")
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be distinct, got {list(names)}")
        if group_task.min() < 0 or group_task.max() >= len(names):
            raise ValueError(f"group_task codes must lie in [0, {len(names)})")
        if (size < 1).any():
            raise ValueError(f"every group needs >= 1 rollout, got sizes {size[size < 1][:5]}")
        check_finite("group signal", signal)
        if (signal < 0).any():
            raise ValueError("group signal is a mean |advantage| and cannot be negative")

    @classmethod
    def from_task_labels(cls, task, size, signal) -> GroupStats:
        """Build from one task label per group (convenient, not the fast path)."""
        tasks = Segments.from_labels(np.asarray(task))
        return cls(task_names=tuple(str(x) for x in tasks.labels), group_task=tasks.index,
                   size=size, signal=signal)

    @classmethod
    def from_batch(cls, batch: GroupedBatch, advantages: np.ndarray) -> GroupStats:
        """Reduce per-rollout advantages (aligned with ``batch``) to per-group statistics."""
        return cls(task_names=batch.task_names, group_task=batch.group_task,
                   size=batch.groups.counts, signal=batch.groups.mean(np.abs(advantages)))

    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update("\x1f".join(self.task_names).encode())
        for array in (self.group_task, self.size, self.signal):
            h.update(array.tobytes())
        return h.hexdigest()


@dataclass(frozen=True)
class GroupModulation:
    """The modulator's answer for one step: factors per group and per task."""

    step: int
    sample_factors: np.ndarray  # [G] s_(m,q) applied
    group_task_factors: np.ndarray  # [G] s_m applied to each group
    tasks: tuple[str, ...]  # [M] tasks present in the batch
    task_factors: dict[str, float]  # s_m applied (clamped)
    task_log_factors: dict[str, float]  # L_m after this step (unclamped)
    task_signals: dict[str, float]  # p_m this batch
    task_ema: dict[str, float]  # ρ_m after this step (absent for a task never active)
    reference: float  # ρ_ref (geometric mean over active tasks), NaN when none is active
    zero_signal_groups: dict[str, int]  # per task: groups with p_(m,q) == 0
    active_tasks: tuple[str, ...]  # tasks that took part in the reference

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sample_factors"] = self.sample_factors.tolist()
        d["group_task_factors"] = self.group_task_factors.tolist()
        d["reference"] = None if math.isnan(self.reference) else self.reference
        return d

    @classmethod
    def from_dict(cls, d: dict) -> GroupModulation:
        d = dict(d)
        d["sample_factors"] = np.asarray(d["sample_factors"], dtype=np.float64)
        d["group_task_factors"] = np.asarray(d["group_task_factors"], dtype=np.float64)
        d["reference"] = math.nan if d["reference"] is None else float(d["reference"])
        d["tasks"] = tuple(d["tasks"])
        d["active_tasks"] = tuple(d["active_tasks"])
        return cls(**d)


@dataclass(frozen=True)
class ModulationResult:
    """Per-rollout view of a :class:`GroupModulation` for the batch it was computed on."""

    advantages: np.ndarray  # [N] A^H
    groups: GroupModulation = field(repr=False)
    _batch: GroupedBatch = field(repr=False)

    @property
    def sample_factors(self) -> np.ndarray:
        """[N] s_(m,q) of each rollout's group."""
        return self._batch.groups.broadcast(self.groups.sample_factors)

    @property
    def task_factor_per_rollout(self) -> np.ndarray:
        """[N] s_m of each rollout's task."""
        return self._batch.groups.broadcast(self.groups.group_task_factors)

    @property
    def group_tasks(self) -> tuple[str, ...]:
        """[G] task name of each group, in the order of ``groups.sample_factors``."""
        names = np.asarray(self._batch.task_names, dtype=object)
        return tuple(names[self._batch.group_task].tolist())

    @property
    def task_factors(self) -> dict[str, float]:
        return self.groups.task_factors

    @property
    def task_signals(self) -> dict[str, float]:
        return self.groups.task_signals


class Modulator(Protocol):
    """What an advantage path needs from a modulator: :class:`HarpoModulator` in-process, or a
    proxy to a remote one (``services.modulator_actor.RemoteModulator``). ``task_factors()``
    is optional."""

    def update_groups(self, step: int, stats: GroupStats) -> GroupModulation: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


MODULATOR_METHODS = ("update_groups", "state_dict", "load_state_dict")


def modulate(modulator: Modulator, step: int, batch: GroupedBatch, advantages: np.ndarray
             ) -> ModulationResult:
    """Reduce ``advantages`` (aligned with ``batch``) to group statistics, apply one step of
    ``modulator`` to them and scale each rollout by its group's ``s_(m,q) * s_m``.

    The one place the factors meet the advantages, whichever modulator answers.
    """
    check_finite("advantages", advantages)
    mod = modulator.update_groups(step, GroupStats.from_batch(batch, advantages))
    n_groups = batch.groups.n_segments
    if mod.sample_factors.shape != (n_groups,) or mod.group_task_factors.shape != (n_groups,):
        raise ValueError(
            f"the modulator answered step {step} with {mod.sample_factors.shape} sample factors "
            f"and {mod.group_task_factors.shape} task factors for a batch of {n_groups} groups"
        )
    factor = batch.groups.broadcast(mod.sample_factors * mod.group_task_factors)
    return ModulationResult(advantages=advantages * factor, groups=mod, _batch=batch)


@dataclass
class _TaskState:
    rho: float | None = None  # ρ_m; None until the task first carries signal
    log_factor: float = 0.0  # L_m, unclamped


class HarpoModulator:
    """Holds HARPO's EMA state across steps.

    >>> mod = HarpoModulator(HarpoConfig())
    >>> out = mod.update(step, task_ids, group_ids, grpo_advantages)
    >>> out.advantages, out.sample_factors, out.task_factors
    """

    def __init__(self, config: HarpoConfig | None = None):
        self.config = config or HarpoConfig()
        self.tasks: dict[str, _TaskState] = {}
        self.last_step: int | None = None
        self._history: OrderedDict[int, tuple[str, GroupModulation]] = OrderedDict()

    # ------------------------------------------------------------------ per-rollout surface

    def update(self, step: int, task_ids, group_ids, advantages, *,
               task_names=None) -> ModulationResult:
        """Modulate one batch of GRPO advantages (flat, one per rollout)."""
        batch = GroupedBatch.build(advantages, group_ids, task_ids, task_names=task_names,
                                   name="advantages")
        return self.update_batch(step, batch, batch.values)

    def update_batch(self, step: int, batch: GroupedBatch, advantages: np.ndarray
                     ) -> ModulationResult:
        """As :meth:`update`, for a batch already indexed (the advantages aligned with it)."""
        return modulate(self, step, batch, advantages)

    # ------------------------------------------------------------------ per-group surface

    def update_groups(self, step: int, stats: GroupStats) -> GroupModulation:
        """Apply one step from per-group statistics; a replayed step returns its stored result."""
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        step = int(step)
        fingerprint = stats.fingerprint()
        if step in self._history:
            seen, result = self._history[step]
            if seen != fingerprint:
                raise ValueError(
                    f"step {step} was already applied with different group statistics; a "
                    f"replayed step must carry the same batch"
                )
            return result
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(
                f"step {step} is not after the last applied step {self.last_step} and is no "
                f"longer in the replay history (the last {self.config.history} steps)"
            )
        result = self._apply(step, stats)
        self.last_step = step
        self._history[step] = (fingerprint, result)
        while len(self._history) > self.config.history:
            self._history.popitem(last=False)
        return result

    def _apply(self, step: int, stats: GroupStats) -> GroupModulation:
        cfg = self.config
        floor = cfg.zero_signal == "floor"
        by_task = Segments.from_labels(stats.group_task)
        names = tuple(stats.task_names[c] for c in by_task.labels)
        size = stats.size.astype(np.float64)

        # Task signal p_m: a rollout-weighted mean of the group signals (= mean |Â| per task).
        p_task = by_task.sum(size * stats.signal) / by_task.sum(size)
        if floor:
            group_signal = np.maximum(stats.signal, cfg.signal_floor)
            p_task = np.maximum(p_task, cfg.signal_floor)
            group_active = np.ones(stats.signal.size, dtype=bool)
        else:
            group_signal = stats.signal
            group_active = stats.signal > 0
        task_active = p_task > 0

        # Inertial smoothing of ρ_m and the geometric-mean reference over active tasks.
        states = [self.tasks.get(n, _TaskState()) for n in names]
        rho_prev = np.array([np.nan if s.rho is None else s.rho for s in states])
        log_prev = np.array([s.log_factor for s in states])
        rho = np.where(np.isnan(rho_prev), p_task,
                       cfg.beta_rho * rho_prev + (1 - cfg.beta_rho) * p_task)
        rho = np.where(task_active, rho, rho_prev)
        log_factor = log_prev.copy()
        reference = math.nan
        if task_active.any():
            log_rho = np.log(rho[task_active])
            log_ref = float(log_rho.mean())
            reference = math.exp(log_ref)
            log_factor[task_active] = (cfg.beta_s * log_prev[task_active]
                                       + (1 - cfg.beta_s) * (log_ref - log_rho))
        task_factor = _clamp(np.exp(log_factor), cfg.task_clamp)

        for i, name in enumerate(names):
            if task_active[i]:
                self.tasks[name] = _TaskState(rho=float(rho[i]), log_factor=float(log_factor[i]))

        # Sample factors: geometric mean of active group signals within each task.
        active = group_active.astype(np.float64)
        log_signal = np.log(np.where(group_active, group_signal, 1.0))
        n_active = by_task.sum(active)
        mean_log = by_task.sum(log_signal * active) / np.maximum(n_active, 1)
        eligible = group_active & (by_task.broadcast(n_active) >= 2)
        sample = np.where(eligible,
                          _clamp(np.exp(by_task.broadcast(mean_log) - log_signal),
                                 cfg.sample_clamp),
                          1.0)

        zero_groups = by_task.sum((stats.signal == 0).astype(np.float64)).astype(int)
        return GroupModulation(
            step=step,
            sample_factors=sample,
            group_task_factors=by_task.broadcast(task_factor),
            tasks=names,
            task_factors=dict(zip(names, task_factor.tolist())),
            task_log_factors=dict(zip(names, log_factor.tolist())),
            task_signals=dict(zip(names, p_task.tolist())),
            task_ema={n: self.tasks[n].rho for n in names if n in self.tasks},
            reference=reference,
            zero_signal_groups=dict(zip(names, zero_groups.tolist())),
            active_tasks=tuple(n for n, a in zip(names, task_active) if a),
        )

    # ------------------------------------------------------------------ inspection and state

    def task_factors(self) -> dict[str, float]:
        """Current applied (clamped) factor of every task seen so far."""
        names = sorted(self.tasks)
        log_factor = np.array([self.tasks[n].log_factor for n in names])
        return dict(zip(names, _clamp(np.exp(log_factor), self.config.task_clamp).tolist()))

    def state_dict(self) -> dict:
        """Plain JSON-serialisable state (floats round-trip exactly through ``json``)."""
        return {
            "version": STATE_VERSION,
            "config": asdict(self.config),
            "last_step": self.last_step,
            "tasks": {n: {"rho": s.rho, "log_factor": s.log_factor}
                      for n, s in sorted(self.tasks.items())},
            "history": [{"step": k, "fingerprint": fp, "result": r.to_dict()}
                        for k, (fp, r) in self._history.items()],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`. The config in use stays this modulator's own."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            found = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"not a HARPO modulator state of version {STATE_VERSION} (got version {found!r})"
            )
        try:
            tasks = {str(n): _TaskState(rho=None if v["rho"] is None else float(v["rho"]),
                                        log_factor=float(v["log_factor"]))
                     for n, v in state["tasks"].items()}
            history = OrderedDict(
                (int(h["step"]), (str(h["fingerprint"]), GroupModulation.from_dict(h["result"])))
                for h in state["history"]
            )
            last_step = None if state["last_step"] is None else int(state["last_step"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed HARPO modulator state: {exc!r}") from exc
        self.tasks, self._history, self.last_step = tasks, history, last_step
