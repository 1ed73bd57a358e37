"""Policy-gradient losses for PPO / GRPO-style LLM post-training (pure torch).

Conventions shared by every function here:

* ``logprobs``, ``old_logprobs``, ``ref_logprobs`` and ``mask`` are ``[B, T]``; ``out[b, t]`` is
  the log-prob of token ``t`` of sequence ``b`` given its prefix (see :func:`token_logprobs`).
* ``mask`` is 1 on the response tokens that the loss should see and 0 elsewhere. Values of the
  log-prob tensors outside the mask are ignored, even if they are NaN or infinite.
* Losses are returned as scalar tensors (for ``backward``); statistics as plain floats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The loss knobs and their defaults live in a torch-free module (the run configuration reads them).
from harpo_core.loss_config import AGGREGATIONS, KL_ESTIMATORS, LossConfig  # noqa: F401


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is set; 0 when the mask is empty."""
    mask = mask.bool()
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1)


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token loss to a scalar.

    ``"seq-mean-token-mean"``: average each sequence over its masked tokens, then average those
    means over the sequences that have at least one masked token (1/|G| sum_i 1/n_i sum_t).
    ``"token-mean"``: sum over all masked tokens divided by the number of masked tokens.

    ``normalizer`` replaces the default denominator (number of non-empty sequences, or number of
    masked tokens). Data-parallel training passes the count over the whole global mini-batch so
    that each rank's loss is its exact share of the global loss.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregation mode {mode!r} is unknown; expected one of {AGGREGATIONS}")
    mask = mask.bool()
    masked = torch.where(mask, per_token, torch.zeros_like(per_token))
    tokens_per_seq = mask.sum(dim=-1)
    if mode == "token-mean":
        total = masked.sum()
        count = tokens_per_seq.sum()
    else:
        total = (masked.sum(dim=-1) / tokens_per_seq.clamp(min=1)).sum()
        count = (tokens_per_seq > 0).sum()
    if normalizer is None:
        normalizer = count.clamp(min=1)
    return total / normalizer


def ppo_clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    aggregation: str = "seq-mean-token-mean",
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate with asymmetric clip range ``[1 - clip_low, 1 + clip_high]``.

    ``advantages`` is ``[B]`` (one value per sequence, broadcast to its tokens) or ``[B, T]``.
    Per token: ``-min(ratio * A, clip(ratio) * A)`` with ``ratio = exp(logprobs - old_logprobs)``.
    Stats (over masked tokens): ``clip_frac`` = share of tokens where the clipped term is the
    strictly smaller one (zero gradient), ``approx_kl`` = mean of ``old - new`` (k1),
    ``ratio_mean``.
    """
    per_token, stats = _clipped_surrogate(
        logprobs, old_logprobs, advantages, mask, clip_low, clip_high
    )
    return aggregate(per_token, mask, aggregation, normalizer), stats


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3"
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled-token log-probs.

    ``"k1"``: ``logprobs - ref_logprobs`` (unbiased, can be negative).
    ``"k3"``: ``exp(d) - d - 1`` with ``d = ref_logprobs - logprobs`` (unbiased, never negative).
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k3":
        log_ratio = ref_logprobs - logprobs
        # expm1 keeps precision for small d; the clamp only removes rounding noise below zero.
        return (torch.expm1(log_ratio) - log_ratio).clamp(min=0.0)
    raise ValueError(f"KL estimator {estimator!r} is unknown; expected one of {KL_ESTIMATORS}")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    aggregation: str = "seq-mean-token-mean",
    normalizer: float | torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    tis_cap: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate plus ``kl_coef`` times the KL penalty, aggregated the same way.

    When ``ref_logprobs`` is given, stats gain ``kl``: the token mean of the KL estimate.

    **Truncated importance sampling** (``tis_cap``; Yao et al. 2025, "Your Efficient RL
    Framework Secretly Brings You Off-Policy RL Training", as in verl's rollout importance
    sampling). The rollout engine samples from ``pi_rollout`` (its own kernels, often bf16)
    while the gradient is that of the learner's ``pi_learner``; the two differ even with the
    same weights, so the samples are slightly off-policy. Then ``old_logprobs`` are the
    *learner's* log-probs of the tokens before this update (``log pi_learner_old``, the PPO
    ratio's denominator and clip centre), ``rollout_logprobs`` are the rollout engine's, and
    each token's clipped surrogate is multiplied by the detached weight::

        w = min(exp(old_logprobs - rollout_logprobs), tis_cap)

    so the per-token loss is ``-w * min(r A, clip(r) A)`` with ``r = exp(logprobs -
    old_logprobs)``. The KL term is not weighted. Capping (truncating) ``w`` from above bounds
    the variance that rare tokens the rollout engine found far less likely than the learner
    would add; weights below 1 are kept. Stats gain ``tis_weight_mean`` (token mean of ``w``)
    and ``tis_truncated_frac`` (share of tokens whose ratio exceeded ``tis_cap``).
    ``tis_cap=None`` (the default) leaves the loss as it is.
    """
    per_token, stats = _clipped_surrogate(
        logprobs, old_logprobs, advantages, mask, clip_low, clip_high
    )
    if tis_cap is not None:
        if rollout_logprobs is None:
            raise ValueError(f"tis_cap={tis_cap} needs rollout_logprobs")
        weight, truncated = tis_weights(old_logprobs, rollout_logprobs, mask, tis_cap)
        per_token = per_token * weight
        stats["tis_weight_mean"] = masked_mean(weight, mask).item()
        stats["tis_truncated_frac"] = masked_mean(truncated.float(), mask).item()
    if ref_logprobs is not None:
        mask = mask.bool()
        ref_logprobs = torch.where(mask, ref_logprobs, logprobs.detach())
        kl = kl_penalty(logprobs, ref_logprobs, kl_estimator)
        stats["kl"] = masked_mean(kl.detach(), mask).item()
        per_token = per_token + kl_coef * kl
    elif kl_coef != 0.0:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs")
    return aggregate(per_token, mask, aggregation, normalizer), stats


@torch.no_grad()
def tis_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance weights ``min(exp(old - rollout), cap)`` (1 outside ``mask``) and
    where the cap applied; see :func:`policy_loss`."""
    mask = mask.bool()
    log_ratio = torch.where(mask, old_logprobs - rollout_logprobs, 0.0)
    ratio = torch.exp(log_ratio)
    return ratio.clamp(max=cap), mask & (ratio > cap)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-prob of each token given its prefix: ``out[b, t] = log p(input_ids[b, t] | ids[b, :t])``.

    ``logits`` is the ``[B, T, V]`` causal-LM output for ``input_ids`` ``[B, T]``. Position 0
    has no prefix and gets 0. The result is float32 (or wider) whatever the logits dtype.
    """
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:].unsqueeze(-1)
    picked = F.log_softmax(logits, dim=-1).gather(-1, targets).squeeze(-1)
    return F.pad(picked, (1, 0), value=0.0)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution at each position, ``[B, T, V] -> [B, T]``.

    Works one sequence at a time so that only a ``[T, V]`` slice of temporaries is alive.
    """
    rows = []
    for row in logits:
        logp = F.log_softmax(row.float(), dim=-1)
        rows.append(-(logp.exp() * logp).sum(dim=-1))
    return torch.stack(rows)


def masked_entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token entropy over masked positions (a scalar tensor).

    Pass the mask aligned with :func:`token_logprobs`: the distribution that produced token
    ``t`` comes from ``logits[:, t - 1]``, so the mask is shifted left by one here.
    """
    entropy = token_entropy(logits[:, :-1])
    return masked_mean(entropy, mask[:, 1:])


def _clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_low, clip_high):
    """Per-token clipped PPO loss ``[B, T]`` and its token-mean statistics."""
    mask = mask.bool()
    # Positions outside the mask may hold garbage; make their ratio exactly 1.
    old_logprobs = torch.where(mask, old_logprobs, logprobs.detach())
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped < unclipped).float(), mask).item(),
            "approx_kl": masked_mean(-log_ratio, mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
        }
    return per_token, stats
