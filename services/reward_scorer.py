"""The reward scorer: a Ray actor that scores rollout batches with harpo_core's rewards.

It returns a small per-rollout summary for the driver and the scored batch cut into one shard
per learner rank (rows with ``rollout_id % shards == r``, order kept), each its own object, so
that a learner rank fetches only its rows.
"""

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
SUMMARY_COLUMNS = ("prompt_index", "group_id", "rollout_id", "task_code", "policy_version")


def split_shards(batch: pa.RecordBatch, shards: int) -> list[pa.RecordBatch]:
    """Rows with ``rollout_id % shards == r`` for every ``r``, in their order (copies, so each
    shard's buffers hold only its rows)."""
    owner = batch.column("rollout_id").to_numpy() % shards
    return [batch.take(pa.array(np.flatnonzero(owner == r))) for r in range(shards)]


def summarize(batch: pa.RecordBatch, rewards: dict[str, np.ndarray],
              lengths: np.ndarray) -> dict[str, np.ndarray]:
    out = {name: batch.column(name).to_numpy() for name in SUMMARY_COLUMNS}
    out.update(rewards)
    out["response_length"] = lengths
    out["stopped"] = np.asarray(batch.column("finish_reason").to_pylist()) == "stop"
    return out


@ray.remote
class RewardScorer:
    """Appends reward columns to a batch; returns a small per-rollout summary and the scored
    batch cut into one shard per learner rank."""

    def __init__(self, config: RewardConfig, torch_threads: int = 1):
        import torch

        torch.set_num_threads(torch_threads)
        self.composer = RewardComposer(config)

    def ready(self) -> int:
        return os.getpid()

    @ray.method(num_returns=2)
    def score(self, batch: pa.RecordBatch, shards: int = 1) -> tuple:
        """``(summary, shard_0, ..., shard_{shards-1})``; call it with
        ``.options(num_returns=shards + 1)``."""
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
        return (summarize(batch, rewards, lengths),
                *split_shards(with_rewards(batch, rewards), shards))
