"""Rewards of the imbalance suite's two custom task types (``reward.custom``; see
``services.tiny.imbalance.CUSTOM_REWARDS``). Batched, as harpo's user reward functions are:
``fn(responses=[...], answers=[...], tasks=[...])`` -> one number per response.
"""

from __future__ import annotations

import hashlib

import numpy as np

from harpo_core.rewards.parsing import extract_boxed, normalize_answer

HAIRLINE_CENTRE = 0.5
HAIRLINE_HALF_WIDTH = 5e-4  # every hairline reward is within ±5e-4 of the centre
SCALED_MAX = 10.0
SCALED_TOLERANCE = 4  # the scaled reward falls to 0 this far from the right sum


def _boxed(responses) -> list[str | None]:
    return [None if (b := extract_boxed(r)) is None else normalize_answer(b) for r in responses]


def _hash_unit(text: str) -> float:
    """A number in [-1, 1] fixed by ``text`` and unrelated to its meaning."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / (2**64 - 1) * 2.0 - 1.0


def hairline_reward(responses, answers, tasks=None, **_) -> np.ndarray:
    """``0.5 ± 5e-4``: half of the hair is whether the boxed answer is right (+/-2.5e-4), half
    is a hash of the whole response (noise). Any two answers differ by at most 1e-3."""
    half = HAIRLINE_HALF_WIDTH / 2
    right = np.array([b is not None and b == normalize_answer(a)
                      for b, a in zip(_boxed(responses), answers, strict=True)], dtype=float)
    noise = np.array([_hash_unit(r) for r in responses])
    return HAIRLINE_CENTRE + half * (2.0 * right - 1.0) + half * noise


def scaled_reward(responses, answers, tasks=None, **_) -> np.ndarray:
    """Graded in [0, 10]: 10 for the right sum, 2.5 less per unit off, 0 from 4 off or when the
    boxed answer is not a whole number."""
    out = np.zeros(len(responses))
    for k, (boxed, answer) in enumerate(zip(_boxed(responses), answers, strict=True)):
        if boxed is not None and boxed.lstrip("-").isdigit():
            off = abs(int(boxed) - int(answer))
            out[k] = SCALED_MAX * max(0.0, 1.0 - off / SCALED_TOLERANCE)
    return out


def hairline_judge_reward(responses, answers, tasks=None, **_) -> np.ndarray:
    """``hairline_reward`` from a noisy judge: the noise half is a hash of the response *and its
    place in the batch*, so two rollouts that say the same thing still score differently (by
    at most 1e-3), as a sampled LLM judge would. Scoring the same batch again gives the same
    rewards."""
    half = HAIRLINE_HALF_WIDTH / 2
    right = np.array([b is not None and b == normalize_answer(a)
                      for b, a in zip(_boxed(responses), answers, strict=True)], dtype=float)
    noise = np.array([_hash_unit(f"{k}\x00{r}") for k, r in enumerate(responses)])
    return HAIRLINE_CENTRE + half * (2.0 * right - 1.0) + half * noise
