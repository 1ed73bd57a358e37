"""A validated, grouped batch of scalar per-rollout values (rewards or advantages).

Every estimator and the modulator start from a :class:`GroupedBatch`, so the checks a user
relies on live in one place: matching lengths, a non-empty batch, finite values (the error names
the offending rollouts), and each group belonging to exactly one task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from harpo_core.segments import Segments

_MAX_NAMED = 5  # how many offending rollouts an error message lists


def _as_1d(name: str, values, n: int | None = None) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {array.shape}")
    if n is not None and array.size != n:
        raise ValueError(f"{name} has {array.size} entries but the batch has {n} rollouts")
    return array


def check_finite(name: str, values: np.ndarray) -> None:
    """Raise a ValueError naming the rollouts whose value is NaN or infinite."""
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        shown = ", ".join(f"rollout {i} ({float(values[i])})" for i in bad[:_MAX_NAMED])
        more = f" and {bad.size - _MAX_NAMED} more" if bad.size > _MAX_NAMED else ""
        raise ValueError(f"{name} must be finite; got NaN/inf at {shown}{more}")


@dataclass(frozen=True)
class GroupedBatch:
    """Per-rollout values with their group and task partitions."""

    values: np.ndarray  # [N] float64
    groups: Segments  # rollouts -> groups
    tasks: Segments  # groups -> tasks (tasks are indexed at group level: G, not N, entries)
    task_names: tuple[str, ...]  # [M] name of each task segment

    @property
    def group_task(self) -> np.ndarray:
        """[G] task segment of each group."""
        return self.tasks.index

    def task_broadcast(self, per_task: np.ndarray) -> np.ndarray:
        """Per-rollout view of a per-task array."""
        return self.groups.broadcast(per_task[self.tasks.index])

    def task_mean(self, values: np.ndarray) -> np.ndarray:
        """Per-task mean of a per-rollout array."""
        sums = self.tasks.sum(self.groups.sum(values))
        return sums / self.tasks.sum(self.groups.counts.astype(np.float64))

    @classmethod
    def build(
        cls,
        values,
        group_ids,
        task_ids=None,
        *,
        task_names: Sequence[str] | None = None,
        name: str = "rewards",
    ) -> GroupedBatch:
        """Validate and index a batch.

        ``group_ids`` and ``task_ids`` may be any 1-D labels (ints or strings). When
        ``task_names`` is given, ``task_ids`` are integer codes into it (the cheap form, e.g. an
        Arrow dictionary column). Without ``task_ids`` every rollout belongs to one task "all".
        """
        values = _as_1d(name, values).astype(np.float64, copy=False)
        n = values.size
        if n == 0:
            raise ValueError(f"{name} is empty: a batch needs at least one rollout")
        check_finite(name, values)
        group_ids = _as_1d("group_ids", group_ids, n)
        if task_ids is None:
            task_ids = np.zeros(n, dtype=np.int64)
            task_names = ("all",)
        task_ids = _as_1d("task_ids", task_ids, n)

        groups = Segments.from_labels(group_ids)
        rep = groups.representative
        tasks = Segments.from_labels(task_ids[rep])
        if task_names is not None:
            codes = tasks.labels
            if codes.dtype.kind not in "iu" or codes.min() < 0 or codes.max() >= len(task_names):
                raise ValueError(
                    f"task_ids must be integer codes in [0, {len(task_names)}) when task_names "
                    f"is given; got values from {codes.min()!r} to {codes.max()!r}"
                )
            names = tuple(str(task_names[c]) for c in codes)
        else:
            names = tuple(str(label) for label in tasks.labels)
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be distinct, got {list(names)}")

        mixed = np.flatnonzero(task_ids != groups.broadcast(task_ids[rep]))
        if mixed.size:
            i = int(mixed[0])
            q = groups.index[i]
            raise ValueError(
                f"group {groups.labels[q].item()!r} spans several tasks (rollout {i} is task "
                f"{task_ids[i].item()!r}, rollout {int(rep[q])} is task "
                f"{task_ids[rep[q]].item()!r}); every group must belong to one task"
            )
        return cls(values=values, groups=groups, tasks=tasks, task_names=names)

    @property
    def n_rollouts(self) -> int:
        return int(self.values.size)
