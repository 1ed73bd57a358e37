"""Shared-prompt forward passes: a GRPO group's prompt is run through the model once.

A step's rollouts come in groups of ``G`` responses to one prompt, and the learner's batch holds
each of them as its own ``prompt + response`` row, so a plain forward pass computes every prompt
``G`` times. With long prompts and short responses that repetition is most of the work.

:func:`pack_shared_prompts` turns every run of consecutive rows that share a prompt into one
packed row ``prompt, response_1, ..., response_G`` with

* position ids that restart after the prompt for every response (each response sits at the
  positions it had in its own row), and
* a block attention mask: prompt tokens attend causally to the prompt; the tokens of a response
  attend to the prompt and causally to their own response, never to another response.

Each token then sees exactly the context it had in its own row, so the log-probs are those of the
plain forward pass (to float rounding: the attention sums run in another order) for a fraction of
the work — the prompt is computed once per group instead of ``G`` times. The mask is dense
(``[rows, 1, W, W]`` for packed width ``W``), which suits eager and SDPA attention; backends that
take no 4D mask (FlashAttention-2) need the plain path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SharedPromptPack:
    """Packed rows plus the indices that map results back to the ``[B, T]`` layout."""

    input_ids: torch.Tensor  # [P, W] packed rows
    position_ids: torch.Tensor  # [P, W]
    allowed: torch.Tensor  # [P, W, W] bool: query may attend to key
    row_pack: torch.Tensor  # [B] packed row of each original row
    predictor: torch.Tensor  # [B, R] packed column whose logits predict response token j
    target: torch.Tensor  # [B, R] response token ids (0 where invalid)
    column: torch.Tensor  # [B, R] column of response token j in the original row
    valid: torch.Tensor  # [B, R] bool: j < response length

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive 4D mask ``[P, 1, W, W]``: 0 where attention is allowed, the dtype's minimum
        elsewhere (what eager and SDPA attention add to the scores)."""
        mask = torch.zeros(self.allowed.shape, dtype=dtype, device=self.allowed.device)
        mask.masked_fill_(~self.allowed, torch.finfo(dtype).min)
        return mask.unsqueeze(1)


def pack_shared_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        response_mask: torch.Tensor, pad_id: int = 0) -> SharedPromptPack:
    """Pack right-padded ``prompt + response`` rows (the learner layout of
    :func:`harpo_core.schema.to_learner_tensors`) by shared prompt; see the module docstring.

    Rows share a prompt when they are adjacent and their prompt tokens are equal; a row whose
    prompt differs from the previous row's starts a new packed row, so any batch is accepted.
    """
    device = input_ids.device
    rows, width = input_ids.shape
    response_len = response_mask.sum(-1).long()
    prompt_len = attention_mask.sum(-1).long() - response_len
    cols = torch.arange(width, device=device)

    # Same prompt as the previous row: equal length and equal tokens over that length.
    same = torch.zeros(rows, dtype=torch.bool, device=device)
    if rows > 1:
        in_prompt = cols[None, :] < prompt_len[1:, None]
        equal = (input_ids[1:] == input_ids[:-1]) | ~in_prompt
        same[1:] = (prompt_len[1:] == prompt_len[:-1]) & equal.all(-1)
    row_pack = torch.cumsum(~same, 0) - 1
    packs = int(row_pack[-1]) + 1
    first = torch.nonzero(~same).squeeze(-1)  # the first row of each packed row
    pack_prompt = prompt_len[first]

    # Where each response starts in its packed row: after the prompt and the earlier responses.
    ends = torch.cumsum(response_len, 0)
    before_pack = (ends - response_len)[first]  # responses before this packed row
    start = pack_prompt[row_pack] + (ends - response_len) - before_pack[row_pack]
    pack_width = pack_prompt + torch.zeros(packs, dtype=torch.long, device=device).index_add_(
        0, row_pack, response_len)
    packed_width = int(pack_width.max())

    longest = max(int(response_len.max()), 1)
    j = torch.arange(longest, device=device)[None, :]
    valid = j < response_len[:, None]
    dest = torch.where(valid, start[:, None] + j, 0)
    column = torch.where(valid, prompt_len[:, None] + j, 0)
    target = torch.where(valid, input_ids.gather(1, column), 0)
    # token j is predicted by the logits at the previous token: the prompt's last one for j = 0
    predictor = torch.where(j == 0, pack_prompt[row_pack][:, None] - 1, dest - 1)
    predictor = torch.where(valid, predictor, 0)

    packed_cols = torch.arange(packed_width, device=device)
    in_prompt = packed_cols[None, :] < pack_prompt[:, None]
    packed_ids = torch.full((packs, packed_width), pad_id, dtype=input_ids.dtype, device=device)
    prompt_part = input_ids[first][:, :min(width, packed_width)]
    packed_ids[:, :prompt_part.shape[1]] = torch.where(
        in_prompt[:, :prompt_part.shape[1]], prompt_part, pad_id)
    positions = torch.where(in_prompt, packed_cols[None, :], 0)
    # segment of each packed column: -1 prompt, the original row for a response, -2 padding
    segment = torch.where(in_prompt, -1, -2)
    pack_of = row_pack[:, None].expand_as(dest)[valid]
    packed_ids[pack_of, dest[valid]] = target[valid]
    positions[pack_of, dest[valid]] = column[valid]
    segment[pack_of, dest[valid]] = torch.arange(rows, device=device)[:, None].expand_as(
        dest)[valid]

    query, key = segment[:, :, None], segment[:, None, :]
    causal = packed_cols[None, :, None] >= packed_cols[None, None, :]
    allowed = causal & (key != -2) & ((key == -1) | (key == query))
    allowed |= torch.eye(packed_width, dtype=torch.bool, device=device)  # padding sees itself
    return SharedPromptPack(packed_ids, positions, allowed, row_pack, predictor, target, column,
                            valid)


def shared_prompt_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          response_mask: torch.Tensor, temperature: float = 1.0
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Response-token log-probs ``[B, T]`` (0 outside ``response_mask``) and the logits that
    predicted each response token ``[N, V]`` (rows in order, tokens in order), computed with
    one packed forward pass per shared prompt.

    ``model`` is any causal LM that takes ``position_ids`` and a 4D additive attention mask.
    ``temperature`` divides the logits first: the log-probs of the distribution the rollouts
    were sampled from.
    """
    pack = pack_shared_prompts(input_ids, attention_mask, response_mask)
    dtype = next(model.parameters()).dtype
    logits = model(input_ids=pack.input_ids, position_ids=pack.position_ids,
                   attention_mask=pack.attention_mask(dtype)).logits
    predicting = logits[pack.row_pack[:, None].expand_as(pack.predictor), pack.predictor]
    if temperature != 1.0:
        predicting = predicting / temperature
    picked = F.log_softmax(predicting.float(), dim=-1).gather(
        -1, pack.target.unsqueeze(-1)).squeeze(-1)
    logprobs = torch.zeros(input_ids.shape, dtype=picked.dtype, device=input_ids.device)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None]
    logprobs = logprobs.index_put((rows.expand_as(pack.column)[pack.valid],
                                   pack.column[pack.valid]), picked[pack.valid])
    return logprobs, predicting[pack.valid]


def shared_prompt_hidden(base_model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         response_mask: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The packed pass of :func:`shared_prompt_forward` without the output head: the final
    hidden states that predict the response tokens ``[N, H]`` (rows in order, tokens in order),
    the tokens they predict ``[N]``, and each token's ``(row, column)`` in ``input_ids``.

    ``base_model`` is the causal LM's decoder (``model.base_model``: embeddings, layers, final
    norm), which returns ``last_hidden_state``; the head is applied by the caller, e.g. chunk by
    chunk with :func:`harpo_core.logprobs.chunked_logprobs`.
    """
    pack = pack_shared_prompts(input_ids, attention_mask, response_mask)
    dtype = next(base_model.parameters()).dtype
    hidden = base_model(input_ids=pack.input_ids, position_ids=pack.position_ids,
                        attention_mask=pack.attention_mask(dtype)).last_hidden_state
    valid = pack.valid
    packs = pack.row_pack[:, None].expand_as(pack.predictor)[valid]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None]
    return (hidden[packs, pack.predictor[valid]], pack.target[valid],
            (rows.expand_as(pack.column)[valid], pack.column[valid]))
