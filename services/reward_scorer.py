"""The reward scorer: a Ray actor that scores rollout batches with harpo_core's rewards."""

from __future__ import annotations

import logging
import os

import numpy as np
import pyarrow as pa
import ray

from harpo_core.rewards import RewardComposer, RewardConfig
from harpo_core.schema import with_rewards

log = logging.getLogger(__name__)

# What the driver needs from a scored batch: a few numbers per rollout, never the tokens.
SUMMARY_COLUMNS = ("prompt_index", "group_id", "task_code", "policy_version")


def summarize(batch: pa.RecordBatch, rewards: dict[str, np.ndarray],
              lengths: np.ndarray) -> dict[str, np.ndarray]:
    out = {name: batch.column(name).to_numpy() for name in SUMMARY_COLUMNS}
    out.update(rewards)
    out["response_length"] = lengths
    out["stopped"] = np.asarray(batch.column("finish_reason").to_pylist()) == "stop"
    return out


@ray.remote
class RewardScorer:
    """Appends reward columns to a batch and returns it with a small per-rollout summary."""

    def __init__(self, config: RewardConfig, torch_threads: int = 1):
        import torch

        torch.set_num_threads(torch_threads)
        self.composer = RewardComposer(config)

    def ready(self) -> int:
        return os.getpid()

    @ray.method(num_returns=2)
    def score(self, batch: pa.RecordBatch) -> tuple[pa.RecordBatch, dict]:
        lengths = np.diff(batch.column("response_ids").offsets.to_numpy())
        result = self.composer.score(
            responses=batch.column("response_text").to_pylist(),
            answers=batch.column("answer").to_pylist(),
            task_types=batch.column("task_type").to_pylist(),
            response_lengths=lengths,
        )
        rewards = {
            "reward": result.total,
            "reward_task": result.components["task"],
            "reward_format": result.components["format"],
            "reward_overlong": result.components["overlong"],
            "accuracy": result.accuracy,
            "reward_error": result.errors,
        }
        if result.error_messages:
            prompts = batch.column("prompt_index").to_numpy()
            versions = batch.column("policy_version").to_numpy()
            for row, message in result.error_messages:
                # the sample id: which prompt of the data set, which policy version
                log.warning("reward function failed on prompt %d (rollout row %d, policy version "
                            "%d); scored by reward.on_error: %s", prompts[row], row,
                            versions[row], message)
        return with_rewards(batch, rewards), summarize(batch, rewards, lengths)
