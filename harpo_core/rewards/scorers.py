"""Batched rule-based reward scorers; each returns a float64 array, one value per sample."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from harpo_core.rewards.parsing import extract_boxed, follows_format, normalize_answer


def exact_match(responses: Sequence[str], answers: Sequence[str]) -> np.ndarray:
    """1.0 where the response's last boxed answer equals the reference, else 0.0.

    Both sides go through :func:`normalize_answer`; a response without a closed box
    scores 0.
    """
    if len(responses) != len(answers):
        raise ValueError(
            f"exact_match needs one answer per response: got {len(responses)} responses "
            f"and {len(answers)} answers"
        )

    def matches(response: str, answer: str) -> bool:
        boxed = extract_boxed(response)
        return boxed is not None and normalize_answer(boxed) == normalize_answer(answer)

    return np.fromiter(
        (matches(r, a) for r, a in zip(responses, answers)), dtype=np.float64, count=len(responses)
    )


def format_score(responses: Sequence[str]) -> np.ndarray:
    """1.0 where the response passes :func:`follows_format`, else 0.0."""
    return np.fromiter(
        (follows_format(r) for r in responses), dtype=np.float64, count=len(responses)
    )


def overlong_penalty(
    response_lengths: np.ndarray,
    max_response_length: int,
    buffer: int,
    factor: float = 0.75,
) -> np.ndarray:
    """DAPO soft over-length penalty, in ``[-factor, 0]``.

    Zero up to ``max_response_length - buffer`` tokens, then falling linearly to
    ``-factor`` at ``max_response_length`` and staying there for longer responses.
    """
    if max_response_length <= 0:
        raise ValueError(f"max_response_length must be positive, got {max_response_length}")
    if not 0 < buffer <= max_response_length:
        raise ValueError(
            f"buffer must be in (0, max_response_length={max_response_length}], got {buffer}"
        )
    if not factor >= 0:  # also rejects NaN
        raise ValueError(f"factor must be >= 0, got {factor}")
    lengths = np.asarray(response_lengths, dtype=np.float64)
    excess = lengths - (max_response_length - buffer)
    fraction = np.clip(excess / buffer, 0.0, 1.0)
    return -factor * fraction + 0.0  # + 0.0 turns -0.0 into 0.0
