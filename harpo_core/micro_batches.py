"""Micro-batches of a mini-batch bounded by rows and by padded tokens.

A learner accumulates gradients over micro-batches so that one forward/backward pass never holds
more than a budget of activations. Rows differ in length, so a fixed number of rows is a poor
bound: :func:`plan_micro_batches` cuts consecutive rows into micro-batches whose *padded* size
(rows x the longest row among them, the shape the model sees once the micro-batch is cut to its
longest row) stays within ``max_tokens``, and whose row count stays within ``max_rows``. Rows
keep their order. A row longer than the token budget on its own gets a micro-batch of its own:
it cannot be split, so the budget is exceeded by that one row.
"""

from __future__ import annotations

from collections.abc import Sequence


def plan_micro_batches(lengths: Sequence[int], *, max_rows: int | None = None,
                       max_tokens: int | None = None) -> list[tuple[int, int, int]]:
    """``(start, end, width)`` of each micro-batch of rows ``lengths`` (their unpadded token
    counts), in order: rows ``start:end``, padded to ``width`` (their longest, at least 1).

    Greedy: a row joins the current micro-batch while ``rows <= max_rows`` and
    ``rows x width <= max_tokens`` still hold with it; otherwise it starts the next one.
    ``None`` leaves that bound off.
    """
    for name, value in (("max_rows", max_rows), ("max_tokens", max_tokens)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value!r} is invalid: expected an int >= 1 or None")
    plan: list[tuple[int, int, int]] = []
    start, width = 0, 0
    for row, length in enumerate(int(n) for n in lengths):
        wider = max(width, length, 1)
        rows = row - start + 1
        fits = ((max_rows is None or rows <= max_rows)
                and (max_tokens is None or rows * wider <= max_tokens))
        if rows > 1 and not fits:
            plan.append((start, row, width))
            start, wider = row, max(length, 1)
        width = wider
    if len(lengths):
        plan.append((start, len(lengths), width))
    return plan
