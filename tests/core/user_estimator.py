"""User estimators that the tests load as ``"tests.core.user_estimator:<name>"``."""

import numpy as np

from harpo_core import EstimatorOutput, GroupedBatch

NOT_CALLABLE = 3


def scaled_centered(batch: GroupedBatch, scale: float = 1.0) -> np.ndarray:
    """``scale * (r - mean_q r)``."""
    g = batch.groups
    return scale * (batch.values - g.broadcast(g.mean(batch.values)))


def any_keywords(batch: GroupedBatch, **params) -> np.ndarray:
    """The rewards plus ``shift`` (any other keyword is accepted and ignored)."""
    return batch.values + params.get("shift", 0.0)


def one_too_many(batch: GroupedBatch) -> np.ndarray:
    return np.zeros(batch.values.size + 1)


def not_finite(batch: GroupedBatch) -> np.ndarray:
    return np.full(batch.values.size, np.nan)


class RunningBaseline:
    """``r - b`` where ``b`` is an EMA of the batch mean reward (updated before use)."""

    def __init__(self, decay: float = 0.5):
        if not isinstance(decay, float):  # user code may fail with any exception
            raise TypeError(f"decay must be a float, got {type(decay).__name__}")
        self.decay, self.baseline = decay, None

    def compute(self, rewards, group_ids, task_ids=None, *, step=None, task_names=None):
        rewards = np.asarray(rewards, dtype=np.float64)
        mean = float(rewards.mean())
        self.baseline = mean if self.baseline is None else (
            self.decay * self.baseline + (1 - self.decay) * mean)
        return EstimatorOutput(rewards - self.baseline)

    def state_dict(self) -> dict:
        return {"baseline": self.baseline}

    def load_state_dict(self, state: dict) -> None:
        self.baseline = state["baseline"]


class NoCompute:
    def state_dict(self) -> dict:
        return {}
