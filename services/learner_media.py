"""The learner's side of prompts with media: their tensors, rebuilt from ``prompt_index``, and
micro-batches that keep one prompt's rows together.

A rollout batch holds no pixels: its ``prompt_ids`` are the expanded ids the rollout worker's
model saw and ``prompt_index`` names the prompt row. :func:`update_media` rebuilds each prompt's
media tensors once with the learner's own :class:`~services.media_inputs.MediaInputs` (same
processor, same decode bounds, its own cache) and checks that every rollout's placeholder
counts match them. :func:`media_micro_batches` then cuts the batch so that a micro-batch holds
rows of one prompt (its media repeated per row) — simple and exact; modality-aware planning
(``harpo_core.micro_batches``) can replace this one call.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist

from services.media_inputs import MediaInputs, MediaRows, repeat_media


def update_media(builder: MediaInputs, rows: MediaRows, table: pa.Table
                 ) -> dict[int, dict[str, torch.Tensor]]:
    """Media tensors of every prompt row in ``table`` that has media, keyed by prompt row;
    each rollout's expanded prompt ids are checked against them."""
    index = table.column("prompt_index").to_numpy()
    prompt_ids = table.column("prompt_ids")
    media: dict[int, dict[str, torch.Tensor]] = {}
    for row in np.unique(index).tolist():
        tensors, counts = builder.tensors(rows, row)
        for k in np.flatnonzero(index == row).tolist():
            builder.check_expanded(prompt_ids[k].values.to_numpy(), counts,
                                   f"prompt row {row}, rollout {k}")
        if tensors:
            media[row] = tensors
    responses = pc.list_flatten(table.column("response_ids")).to_numpy()
    sampled = np.isin(responses, list(builder.token_ids.values()))
    if sampled.any():
        raise ValueError(f"{int(sampled.sum())} media placeholder token(s) in the rollouts' "
                         f"responses: the rollout backend must not sample them (a placeholder "
                         f"is a slot for media the response does not have)")
    return media


def media_micro_batches(core, batch: dict, max_rows: int | None, *,
                        ranks_agree: bool = False) -> list[dict]:
    """Micro-batches of consecutive rows sharing a prompt (at most ``max_rows`` each), cut to
    their longest row; a prompt with media gets its tensors repeated for its rows under
    ``"media"``. ``ranks_agree``: every rank must form as many (a rank's rows of a group are
    the same prompts on every rank when the group size is a multiple of the ranks)."""
    index = batch["prompt_index"].tolist()
    lengths = batch["attention_mask"].sum(-1).tolist()
    limit = max_rows or len(index)
    spans, start = [], 0
    for k in range(1, len(index) + 1):
        if k == len(index) or index[k] != index[start] or k - start == limit:
            spans.append((start, k))
            start = k
    if ranks_agree and core.world_size > 1:
        count = torch.tensor([len(spans)], dtype=torch.float64, device=core.device)
        most = int(core._global_sum(count.clone(), dist.ReduceOp.MAX))
        if most != len(spans):
            raise ValueError(
                f"rank {core.rank} has {len(spans)} per-prompt micro-batches but another rank "
                f"{most}: with media prompts rollout.group_size must be a multiple of "
                f"learner.workers")
    out = []
    for start, end in spans:
        width = int(max(lengths[start:end]))
        micro = {k: v[start:end, :width] if v.dim() == 2 else v[start:end]
                 for k, v in batch.items()}
        tensors = core._media.get(index[start])
        if tensors:
            tensors = repeat_media({k: v.to(core.device) for k, v in tensors.items()},
                                   end - start)
            micro["media"] = core.media_inputs.model_kwargs(micro["input_ids"], tensors)
        out.append(micro)
    return out
