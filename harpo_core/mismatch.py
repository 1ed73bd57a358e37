"""The rollout/learner log-prob gap: its statistics and when it means a broken weight sync.

Right after a weight sync the rollout workers and the learner hold the same weights, so the
log-prob the rollout backend reported for each sampled token and the one the learner computes
differ only by arithmetic: nothing in float32 on both sides (harpo's own CPU path: below 1e-5),
but visibly once either side runs 16-bit. On a tiny Qwen2 (0.85 M parameters, trained), bf16
against float32 gives per-token gaps of mean 1.5e-2, p99 8.3e-2, max 0.11; fp16 a tenth of
that. Reports on multi-billion-parameter models (verl's rollout importance sampling, the vLLM vs
FSDP studies behind truncated importance sampling) see larger tails still: a few tokens with
probability ratios beyond 2, i.e. gaps above 0.7. A broken sync is another scale altogether:
rollouts from a random model differ by ~log(vocab) on every token (mean 5.4, p99 8.7 on the
same tiny model), and weights that are many updates stale move every token.

So the check depends on the dtypes in use (:func:`mismatch_rule`):

* float32 rollout and float32 learner: the largest gap must stay within 1e-3 (harpo's check
  since the start; nothing but a wrong weight explains a larger one).
* a 16-bit side: the 99th percentile of the gaps, which one outlier token cannot move but a
  broken sync moves by orders of magnitude, must stay within 1.0 with bf16 and 0.2 with fp16
  (mantissas of 8 and 11 bits).

These thresholds come from the tiny-model measurement above and the published magnitudes; they
have not been calibrated on a GPU run of a large model. A user's own tolerance replaces them.
A sync that misses a single small update stays invisible under 16-bit noise: the check catches
weights that are wrong, not weights one step old.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STATISTICS = ("max", "mean", "p99")
_KINDS = {"float32": "fp32", "fp32": "fp32", "float": "fp32", "float64": "fp32",
          "bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "half": "fp16"}
# (statistic, tolerance) by the narrowest dtype in use
_DEFAULTS = {"fp32": ("max", 1e-3), "fp16": ("p99", 0.2), "bf16": ("p99", 1.0)}


def dtype_kind(dtype: str) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for a dtype name (``torch.bfloat16``, ``bfloat16``, ...)."""
    name = str(dtype).removeprefix("torch.")
    if name not in _KINDS:
        raise ValueError(f"dtype {dtype!r} is unknown; expected one of {sorted(_KINDS)}")
    return _KINDS[name]


@dataclass(frozen=True)
class MismatchRule:
    """Stop when ``stats[statistic] > tolerance``."""

    statistic: str
    tolerance: float
    dtypes: tuple[str, str]  # (rollout, learner) kinds, for the message

    def exceeded(self, stats: dict[str, float]) -> bool:
        return not stats[self.statistic] <= self.tolerance  # NaN is exceeded

    def describe(self) -> str:
        return (f"{self.statistic} <= {self.tolerance:g} for rollout {self.dtypes[0]} / "
                f"learner {self.dtypes[1]}")


def mismatch_rule(rollout_dtype: str, learner_dtype: str,
                  tolerance: float | None = None) -> MismatchRule:
    """The stop rule for a (rollout, learner) dtype pair; ``tolerance`` replaces the default
    threshold (the statistic stays the one that fits the dtypes)."""
    kinds = (dtype_kind(rollout_dtype), dtype_kind(learner_dtype))
    narrowest = "bf16" if "bf16" in kinds else "fp16" if "fp16" in kinds else "fp32"
    statistic, default = _DEFAULTS[narrowest]
    if tolerance is not None and not tolerance > 0:
        raise ValueError(f"tolerance={tolerance!r} is invalid: expected > 0 or None")
    return MismatchRule(statistic, default if tolerance is None else float(tolerance), kinds)


def mismatch_stats(gaps) -> dict[str, float]:
    """``max``, ``mean`` and ``p99`` (linear interpolation) of per-token absolute gaps; all 0
    for no tokens."""
    gaps = np.abs(np.asarray(gaps, dtype=np.float64).ravel())
    if gaps.size == 0:
        return dict.fromkeys(STATISTICS, 0.0)
    return {"max": float(gaps.max()), "mean": float(gaps.mean()),
            "p99": float(np.quantile(gaps, 0.99))}
