"""The rollout record: what travels between rollout workers, reward scorers and learners.

Rollouts are Arrow record batches, one row per sampled response. Rollout workers fill the
generation columns, reward scorers append the reward columns, and learners turn a batch into
padded tensors with :func:`to_learner_tensors` (no per-row Python loop).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

GENERATION_FIELDS = [
    pa.field("prompt_index", pa.int64()),  # row of the prompt in the data set (the sample id)
    pa.field("group_id", pa.int64()),  # the prompt's group within the step
    # the rollout within the step: group_id × n + sample index (0..N-1 in request order);
    # learner rank r trains on the rows with rollout_id % world_size == r
    pa.field("rollout_id", pa.int64()),
    pa.field("task_code", pa.int32()),
    pa.field("task", pa.string()),
    pa.field("task_type", pa.string()),
    pa.field("answer", pa.string()),
    pa.field("prompt_ids", pa.list_(pa.int32())),
    pa.field("response_ids", pa.list_(pa.int32())),
    pa.field("response_logprobs", pa.list_(pa.float32())),
    pa.field("response_text", pa.string()),
    pa.field("finish_reason", pa.string()),  # "stop" | "length"
    pa.field("policy_version", pa.int64()),
    pa.field("worker", pa.string()),
]
REWARD_FIELDS = [
    pa.field("reward", pa.float64()),
    pa.field("reward_task", pa.float64()),
    pa.field("reward_format", pa.float64()),
    pa.field("reward_overlong", pa.float64()),
    pa.field("accuracy", pa.float64()),
]
GENERATION_SCHEMA = pa.schema(GENERATION_FIELDS)
SCORED_SCHEMA = pa.schema(GENERATION_FIELDS + REWARD_FIELDS)


def with_rewards(batch: pa.RecordBatch, rewards: dict[str, np.ndarray]) -> pa.RecordBatch:
    """Append the reward columns to a generation batch."""
    arrays = list(batch.columns) + [pa.array(rewards[f.name], type=f.type) for f in REWARD_FIELDS]
    return pa.RecordBatch.from_arrays(arrays, schema=SCORED_SCHEMA)


def concat(batches: Sequence[pa.RecordBatch]) -> pa.Table:
    return pa.Table.from_batches(list(batches))


def _list_values(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, per-row lengths) of a list column."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    lengths = np.diff(column.offsets.to_numpy())
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values, lengths


def _scatter_rows(values: np.ndarray, lengths: np.ndarray, starts: np.ndarray, width: int,
                  fill, dtype) -> np.ndarray:
    """Place row ``i``'s ``lengths[i]`` values at columns ``starts[i]:`` of a padded matrix."""
    out = np.full((lengths.size, width), fill, dtype=dtype)
    rows = np.repeat(np.arange(lengths.size), lengths)
    offsets = np.arange(values.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, np.repeat(starts, lengths) + offsets] = values
    return out


def to_learner_tensors(table: pa.Table | pa.RecordBatch, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``prompt + response`` tensors for the learner.

    ``old_logprobs[b, t]`` is the rollout policy's log-prob of ``input_ids[b, t]`` given its
    prefix, valid where ``response_mask`` is 1.
    """
    prompt, prompt_len = _list_values(table.column("prompt_ids"))
    response, response_len = _list_values(table.column("response_ids"))
    logprobs, logprob_len = _list_values(table.column("response_logprobs"))
    if not np.array_equal(response_len, logprob_len):
        bad = int(np.flatnonzero(response_len != logprob_len)[0])
        raise ValueError(f"rollout row {bad} has {response_len[bad]} response tokens but "
                         f"{logprob_len[bad]} log-probs")
    total = prompt_len + response_len
    width = int(total.max())
    zeros = np.zeros_like(prompt_len)
    input_ids = _scatter_rows(prompt, prompt_len, zeros, width, pad_id, np.int64)
    response_ids = _scatter_rows(response, response_len, prompt_len, width, -1, np.int64)
    input_ids = np.where(response_ids >= 0, response_ids, input_ids)
    response_mask = response_ids >= 0
    old = _scatter_rows(logprobs, response_len, prompt_len, width, 0.0, np.float32)
    attention = np.arange(width)[None, :] < total[:, None]
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention.astype(np.int64)),
        "response_mask": torch.from_numpy(response_mask.astype(np.float32)),
        "old_logprobs": torch.from_numpy(old),
    }
