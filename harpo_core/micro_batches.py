"""Micro-batches of a mini-batch bounded by rows and by padded tokens.

A learner accumulates gradients over micro-batches so that one forward/backward pass never holds
more than a budget of activations. Rows differ in length, so a fixed number of rows is a poor
bound: :func:`plan_micro_batches` cuts consecutive rows into micro-batches whose *padded* size
(rows x the longest row among them, the shape the model sees once the micro-batch is cut to its
longest row) stays within ``max_tokens``, and whose row count stays within ``max_rows``. Rows
keep their order. A row longer than the token budget on its own gets a micro-batch of its own:
it cannot be split, so the budget is exceeded by that one row.

Prompts with media: :func:`plan_modality_micro_batches` plans the same bounds per modality
signature, so a micro-batch never mixes, say, text rows with video rows (one media-tensor layout
per forward pass, and text rows are not padded to a video's length); its micro-batches hold row
indices, no longer necessarily consecutive. :func:`plan_padding` counts a plan's padded and real
tokens (the learner's ``padding_waste`` metric).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


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


# --------------------------------------------------------------- modality-aware micro-batches
#
# Prompts with media differ in more than length: the rows of one forward pass share one layout
# of media tensors (pixel values and grids, audio features and masks), and a video prompt is many
# times longer than a text prompt. So rows are grouped by modality signature ("text",
# "text_image", "text_audio_video", ...) first, and only rows of one signature share a
# micro-batch; within a signature the token and row bounds are those of plan_micro_batches.


class RowMicroBatch(NamedTuple):
    """One micro-batch of a modality-aware plan: the batch rows it holds (in the order they go
    through the model), its padded width (their longest row, at least 1) and their signature."""

    rows: tuple[int, ...]
    width: int
    signature: str


def _check_bound(name: str, value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                              or value < 1):
        raise ValueError(f"{name}={value!r} is invalid: expected an int >= 1 or None")


def _row_lengths(lengths: Sequence[int]) -> np.ndarray:
    array = np.asarray(lengths)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"lengths must be a flat sequence of ints (token counts), got "
                         f"{array.dtype} of shape {array.shape}")
    if array.size and array.min() < 0:
        row = int(np.argmin(array))
        raise ValueError(f"lengths[{row}]={int(array[row])} is invalid: expected >= 0")
    return array.astype(np.int64, copy=False)


def plan_modality_micro_batches(lengths: Sequence[int], signatures: Sequence[str], *,
                                max_rows: int | None = None, max_tokens: int | None = None,
                                by_length: bool = False) -> list[RowMicroBatch]:
    """Micro-batches of rows ``lengths`` (unpadded token counts) that never mix modality
    ``signatures`` (one per row), each within ``max_rows`` rows and ``max_tokens`` padded
    tokens as in :func:`plan_micro_batches` (a row over the token budget goes alone).

    Signatures are taken in the order they first appear in the batch. Within a signature the
    rows keep their batch order, or with ``by_length`` are taken longest first (ties in batch
    order), which puts rows of similar length together and runs each signature's widest pass
    first (a memory bound is hit at once, not at the end). Deterministic: the same
    inputs give the same plan. With one signature and ``by_length`` off the plan is
    :func:`plan_micro_batches`'s, as row indices.
    """
    _check_bound("max_rows", max_rows)
    _check_bound("max_tokens", max_tokens)
    array = _row_lengths(lengths)
    signatures = list(signatures)
    if len(signatures) != array.size:
        raise ValueError(f"{len(signatures)} signatures for {array.size} rows: expected one "
                         f"modality signature per row")
    bad = [(i, s) for i, s in enumerate(signatures) if not isinstance(s, str) or not s]
    if bad:
        raise ValueError(f"signatures[{bad[0][0]}]={bad[0][1]!r} is invalid: expected a "
                         f"non-empty string such as 'text' or 'text_image'")
    order = {s: None for s in signatures}  # first appearance, insertion-ordered
    index = {s: i for i, s in enumerate(order)}
    codes = np.array([index[s] for s in signatures], dtype=np.int64)
    plan: list[RowMicroBatch] = []
    for code, signature in enumerate(order):
        rows = np.flatnonzero(codes == code)
        if by_length:  # stable: equal lengths keep their batch order
            rows = rows[np.argsort(-array[rows], kind="stable")]
        sub = array[rows]
        for start, end, width in plan_micro_batches(sub.tolist(), max_rows=max_rows,
                                                    max_tokens=max_tokens):
            plan.append(RowMicroBatch(tuple(rows[start:end].tolist()), width, signature))
    return plan


def split_rows_to_count(plan: Sequence[RowMicroBatch], lengths: Sequence[int],
                        count: int) -> list[RowMicroBatch]:
    """:func:`split_to_count` for a modality-aware plan: the micro-batch with the most rows
    (the first of equals) is halved until there are ``count`` micro-batches, each half cut to
    its own longest row and keeping its signature, so every bound still holds and signatures
    still never mix. Data-parallel ranks pass the largest count among them.
    """
    array = _row_lengths(lengths)
    total = sum(len(m.rows) for m in plan)
    if not isinstance(count, int) or isinstance(count, bool) or count > total:
        raise ValueError(f"count={count!r} is invalid: expected an int of at most {total} "
                         f"(one row per micro-batch)")
    plan = list(plan)
    while len(plan) < count:
        index = max(range(len(plan)), key=lambda i: len(plan[i].rows))
        rows, _, signature = plan[index]
        middle = (len(rows) + 1) // 2
        plan[index:index + 1] = [
            RowMicroBatch(half, max(int(array[list(half)].max()), 1), signature)
            for half in (rows[:middle], rows[middle:])]
    return plan


# ------------------------------------------------------------------------------ padding waste


class Padding(NamedTuple):
    """Token slots of a plan's passes: ``padded`` (rows x width, summed over micro-batches) and
    ``real`` (the rows' own tokens); ``waste`` is the share of padded slots holding no token."""

    padded: int
    real: int

    @property
    def waste(self) -> float:
        return 1.0 - self.real / self.padded if self.padded else 0.0


def plan_padding(plan: Sequence, lengths: Sequence[int]) -> Padding:
    """Padded and real tokens of ``plan`` over rows ``lengths``: a plan of
    :func:`plan_micro_batches` (``(start, end, width)``) or of
    :func:`plan_modality_micro_batches` (``(rows, width, signature)``). Every row must be in
    exactly one micro-batch and fit its width."""
    array = _row_lengths(lengths)
    rows, widths = [], []
    for k, micro in enumerate(plan):
        if isinstance(micro[0], (int, np.integer)):  # consecutive rows start:end
            start, end, width = (int(v) for v in micro)
            members = np.arange(start, end)
        else:
            members, width = np.asarray(micro[0], dtype=np.int64).reshape(-1), int(micro[1])
        if members.size == 0:
            raise ValueError(f"micro-batch {k} of the plan holds no row")
        if members.min() < 0 or members.max() >= array.size:
            raise ValueError(f"micro-batch {k} of the plan holds row {int(members.max())} of a "
                             f"batch of {array.size} rows")
        rows.append(members)
        widths.append(np.full(members.size, width, dtype=np.int64))
    rows_all = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    width_all = np.concatenate(widths) if widths else np.zeros(0, dtype=np.int64)
    seen = np.bincount(rows_all, minlength=array.size)
    if (seen != 1).any():
        row = int(np.flatnonzero(seen != 1)[0])
        raise ValueError(f"row {row} is in {int(seen[row])} micro-batches of the plan: "
                         f"expected every row in exactly one")
    over = array[rows_all] > width_all
    if over.any():
        k = int(np.flatnonzero(over)[0])
        raise ValueError(f"row {int(rows_all[k])} has {int(array[rows_all[k]])} tokens, more "
                         f"than the width {int(width_all[k])} of its micro-batch")
    return Padding(int(width_all.sum()), int(array.sum()))
