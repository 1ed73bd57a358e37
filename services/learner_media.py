"""The learner's side of prompts with media: their tensors, rebuilt from ``prompt_index``, and
micro-batches planned by modality signature.

A rollout batch holds no pixels: its ``prompt_ids`` are the expanded ids the rollout worker's
model saw and ``prompt_index`` names the prompt row. :func:`update_media` rebuilds each prompt's
media tensors once with the learner's own :class:`~services.media_inputs.MediaInputs` (same
processor, same decode bounds, its own cache) and checks that every rollout's placeholder
counts match them. :func:`media_micro_batches` then plans the batch with
:func:`~harpo_core.micro_batches.plan_modality_micro_batches` (``by_length``) under
``learner.micro_batch_size`` and ``learner.micro_batch_tokens``: a pass holds rows of one
modality signature, possibly of several prompts, whose media tensors are concatenated in the
pass's row order (every media tensor is per item along dim 0: patches, grids, audio features
and masks, seconds per video grid); the model scatters them into its placeholder tokens in that
order and computes each row's M-RoPE positions from its own ids and attention mask.

Data-parallel ranks (each holds the same prompts when the group size is a multiple of the
ranks) run the same number of passes *per signature*, in one canonical signature order, so
pass ``k`` runs the same media towers on every rank.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist

from services.media_inputs import MediaInputs, MediaRows


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


KIND_KEYS = (("image", "pixel_values"), ("audio", "input_features"),
             ("video", "pixel_values_videos"))


def media_signature(tensors: dict | None) -> str:
    """A prompt's modality signature from its media tensors: ``text`` plus the kinds it has,
    in the order image, audio, video (``text_image``, ``text_audio_video``, ...)."""
    kinds = [kind for kind, key in KIND_KEYS if tensors and key in tensors]
    return "_".join(("text", *kinds))


def _signature_rank(signature: str) -> int:
    """A fixed order of signatures, the same on every rank: text first, then by kinds."""
    kinds = signature.split("_")[1:]
    return sum(1 << i for i, (kind, _) in enumerate(KIND_KEYS) if kind in kinds)


def signature_counts(plan) -> list[int]:
    """Passes of each signature in ``plan``, indexed by the fixed signature order."""
    counts = [0] * (1 << len(KIND_KEYS))
    for micro in plan:
        counts[_signature_rank(micro.signature)] += 1
    return counts


def align_passes(plan, lengths, most: list[int], rank: int = 0) -> list:
    """``plan`` (in the fixed signature order) split so that it runs ``most[code]`` passes of
    each signature (the largest count among the ranks, :func:`signature_counts`): every rank
    then runs pass ``k`` on the same signature, i.e. the same media towers."""
    from harpo_core.micro_batches import split_rows_to_count

    out = []
    for code, count in enumerate(most):
        part = [m for m in plan if _signature_rank(m.signature) == code]
        rows = sum(len(m.rows) for m in part)
        if count > rows:
            what = f"{rows} row(s) of modality signature {part[0].signature!r}" if part else \
                "no rows of a modality signature"
            raise ValueError(
                f"rank {rank} has {what} but another rank runs {count} pass(es) of it: with "
                f"media prompts rollout.group_size must be a multiple of learner.workers")
        out += split_rows_to_count(part, lengths, count) if part else []
    return out


def collate_media(tensors: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The media tensors of several rows (one dict per row, in the pass's row order; rows of
    one signature have the same keys) as one batch: each tensor concatenated along dim 0."""
    return {k: torch.cat([t[k] for t in tensors]) for k in tensors[0]}


def media_micro_batches(core, batch: dict, max_rows: int | None, *,
                        ranks_agree: bool = False) -> list[dict]:
    """Micro-batches of rows of one modality signature (several prompts each), planned longest
    first within a signature under ``max_rows`` rows and ``learner.micro_batch_tokens`` padded
    tokens, each cut to its longest row. A micro-batch's ``"rows"`` are its batch row indices
    (in the pass's order); one with media holds their tensors, concatenated row by row, under
    ``"media"``. ``ranks_agree``: every rank runs as many passes of each signature, in the same
    order (a rank's rows of a group are the same prompts on every rank when the group size is
    a multiple of the ranks)."""
    from harpo_core.micro_batches import plan_modality_micro_batches

    index = batch["prompt_index"].tolist()
    lengths = batch["attention_mask"].sum(-1).tolist()
    signatures = [media_signature(core._media.get(i)) for i in index]
    plan = plan_modality_micro_batches(lengths, signatures, max_rows=max_rows,
                                       max_tokens=core.micro_batch_tokens, by_length=True)
    plan.sort(key=lambda m: _signature_rank(m.signature))  # stable: the same order everywhere
    if ranks_agree and core.world_size > 1:
        counts = torch.tensor(signature_counts(plan), dtype=torch.float64, device=core.device)
        most = core._global_sum(counts, dist.ReduceOp.MAX).long().tolist()
        plan = align_passes(plan, lengths, most, core.rank)
    on_device: dict[int, dict] = {}
    out = []
    for rows, width, signature in plan:
        picked = torch.tensor(rows, dtype=torch.long, device=batch["input_ids"].device)
        micro = {k: v[picked, :width] if v.dim() == 2 else v[picked] for k, v in batch.items()}
        micro["rows"] = picked
        if signature != "text":
            for r in rows:
                if index[r] not in on_device:
                    on_device[index[r]] = {k: v.to(core.device)
                                           for k, v in core._media[index[r]].items()}
            tensors = collate_media([on_device[index[r]] for r in rows])
            micro["media"] = core.media_inputs.model_kwargs(micro["input_ids"], tensors)
        out.append(micro)
    return out
