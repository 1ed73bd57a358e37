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


def split_to_count(plan: list[tuple[int, int, int]], lengths: Sequence[int],
                   count: int) -> list[tuple[int, int, int]]:
    """``plan`` with its micro-batches split until there are ``count`` of them: the one with
    the most rows is halved each time (each half cut to its own longest row), so every bound
    still holds. Data-parallel ranks use it to run the same number of passes (a sharded model
    gathers its weights in every forward, a collective each rank must join).
    """
    if count > len(lengths):
        raise ValueError(f"count={count} is invalid: expected at most {len(lengths)} (one row "
                         f"per micro-batch)")
    plan = list(plan)
    while len(plan) < count:
        index = max(range(len(plan)), key=lambda i: plan[i][1] - plan[i][0])
        start, end, _ = plan[index]
        middle = start + (end - start + 1) // 2
        halves = [(a, b, max(max(int(n) for n in lengths[a:b]), 1))
                  for a, b in ((start, middle), (middle, end))]
        plan[index:index + 1] = halves
    return plan
