"""Modality-aware micro-batch plans and the padding they waste (harpo_core.micro_batches).

The plans below are worked out by hand; ``plan_micro_batches`` itself is tested in
test_logprobs.py and stays as it is."""

import numpy as np
import pytest

from harpo_core.micro_batches import (
    Padding,
    RowMicroBatch,
    plan_micro_batches,
    plan_modality_micro_batches,
    plan_padding,
    split_rows_to_count,
)

T, V, A = "text", "text_video", "text_audio"
# a mixed batch: short text prompts, two long video prompts, one audio prompt
LENGTHS = [5, 30, 3, 28, 8, 12, 2]
SIGNATURES = [T, V, T, V, T, A, T]
REAL = sum(LENGTHS)  # 88


def test_signatures_never_share_a_micro_batch_by_hand():
    # rows bound: text rows 0, 2, 4, 6 together (width 8), not padded to the videos' 30
    assert plan_modality_micro_batches(LENGTHS, SIGNATURES, max_rows=4) == [
        ((0, 2, 4, 6), 8, T), ((1, 3), 30, V), ((5,), 12, A)]
    # ... where the signature-blind planner pads 4 rows to 30 and 3 rows to 12
    assert plan_micro_batches(LENGTHS, max_rows=4) == [(0, 4, 30), (4, 7, 12)]
    # token bound 16 within each signature (text lengths 5, 3, 8, 2: 2 x 5, then 2 x 8);
    # a video row is over the budget alone and goes alone
    assert plan_modality_micro_batches(LENGTHS, SIGNATURES, max_tokens=16) == [
        ((0, 2), 5, T), ((4, 6), 8, T), ((1,), 30, V), ((3,), 28, V), ((5,), 12, A)]
    # longest first within a signature: 8 with 5, then 3 with 2
    assert plan_modality_micro_batches(LENGTHS, SIGNATURES, max_rows=2, by_length=True) == [
        ((4, 0), 8, T), ((2, 6), 3, T), ((1, 3), 30, V), ((5,), 12, A)]
    assert plan_modality_micro_batches(LENGTHS, SIGNATURES, max_rows=2) == [
        ((0, 2), 5, T), ((4, 6), 8, T), ((1, 3), 30, V), ((5,), 12, A)]
    # equal lengths keep their batch order; no bound: one micro-batch per signature
    assert plan_modality_micro_batches([4, 4, 9, 4], [T, T, V, T], by_length=True) == [
        ((0, 1, 3), 4, T), ((2,), 9, V)]
    assert plan_modality_micro_batches([], []) == []
    assert plan_modality_micro_batches([0], [T]) == [((0,), 1, T)]
    assert isinstance(plan_modality_micro_batches([1], [T])[0], RowMicroBatch)


def test_one_signature_is_the_old_planner():
    lengths = [5, 3, 8, 2, 2, 9, 1]
    for tokens in (1, 6, 7, 16, 20, None):
        for rows in (1, 2, 3, 4, None):
            old = plan_micro_batches(lengths, max_rows=rows, max_tokens=tokens)
            new = plan_modality_micro_batches(lengths, [T] * len(lengths), max_rows=rows,
                                              max_tokens=tokens)
            assert new == [(tuple(range(s, e)), w, T) for s, e, w in old], (tokens, rows)


def test_random_plans_hold_every_bound_and_are_deterministic():
    rng = np.random.default_rng(0)
    kinds = [T, V, A, "text_image", "text_audio_video"]
    for trial in range(200):
        n = int(rng.integers(0, 40))
        lengths = rng.integers(0, 300, n).tolist()
        signatures = [kinds[k] for k in rng.integers(0, len(kinds), n)]
        rows = [None, 1, 3, 8][trial % 4]
        tokens = [None, 64, 256, 1000][trial // 4 % 4]
        by_length = bool(trial % 2)
        plan = plan_modality_micro_batches(lengths, signatures, max_rows=rows,
                                           max_tokens=tokens, by_length=by_length)
        assert plan == plan_modality_micro_batches(lengths, signatures, max_rows=rows,
                                                   max_tokens=tokens, by_length=by_length)
        assert sorted(r for m in plan for r in m.rows) == list(range(n))  # each row once
        for m in plan:
            assert {signatures[r] for r in m.rows} == {m.signature}
            assert m.width == max(max(lengths[r] for r in m.rows), 1)
            assert rows is None or len(m.rows) <= rows
            assert tokens is None or len(m.rows) * m.width <= tokens or len(m.rows) == 1
            if by_length:
                assert [lengths[r] for r in m.rows] == sorted(
                    (lengths[r] for r in m.rows), reverse=True)
        assert plan_padding(plan, lengths).real == sum(lengths)


def test_split_rows_to_count_keeps_signatures_apart():
    plan = plan_modality_micro_batches(LENGTHS, SIGNATURES, max_rows=4)  # 3 micro-batches
    assert split_rows_to_count(plan, LENGTHS, 3) == plan
    assert split_rows_to_count(plan, LENGTHS, 2) == plan  # never merges
    # the one with the most rows is halved, each half cut to its longest row
    assert split_rows_to_count(plan, LENGTHS, 4) == [
        ((0, 2), 5, T), ((4, 6), 8, T), ((1, 3), 30, V), ((5,), 12, A)]
    # then the first of the two-row ones
    assert split_rows_to_count(plan, LENGTHS, 5) == [
        ((0,), 5, T), ((2,), 3, T), ((4, 6), 8, T), ((1, 3), 30, V), ((5,), 12, A)]
    assert sorted(m.rows for m in split_rows_to_count(plan, LENGTHS, 7)) == [
        (r,) for r in range(7)]
    with pytest.raises(ValueError, match=r"count=8 is invalid: expected an int of at most 7 "
                                         r"\(one row per micro-batch\)"):
        split_rows_to_count(plan, LENGTHS, 8)


def test_padding_waste_by_hand():
    # signature-blind, 4 rows: 4 x 30 + 3 x 12 = 156 slots for 88 tokens
    blind = plan_padding(plan_micro_batches(LENGTHS, max_rows=4), LENGTHS)
    assert blind == Padding(156, REAL) and blind.waste == pytest.approx(68 / 156)
    # by signature: 4 x 8 + 2 x 30 + 12 = 104
    aware = plan_padding(plan_modality_micro_batches(LENGTHS, SIGNATURES, max_rows=4), LENGTHS)
    assert aware == Padding(104, REAL) and aware.waste == pytest.approx(16 / 104)
    # two rows each: in batch order 2 x 5 + 2 x 8 + 60 + 12 = 98, longest first 16 + 6 + 72 = 94
    kept = plan_modality_micro_batches(LENGTHS, SIGNATURES, max_rows=2)
    assert plan_padding(kept, LENGTHS) == Padding(98, REAL)
    ordered = plan_modality_micro_batches(LENGTHS, SIGNATURES, max_rows=2, by_length=True)
    assert plan_padding(ordered, LENGTHS) == Padding(94, REAL)
    # the old planner's form: (0,2,5) (2,4,8) (4,5,2) (5,6,9) (6,7,1) -> 10+16+2+9+1 = 38 for 30
    lengths = [5, 3, 8, 2, 2, 9, 1]
    assert plan_padding(plan_micro_batches(lengths, max_tokens=16), lengths) == Padding(38, 30)
    assert Padding(0, 0).waste == 0.0 and Padding(10, 10).waste == 0.0
    assert plan_padding([], []) == Padding(0, 0)


@pytest.mark.parametrize("call, message", [
    (lambda: plan_modality_micro_batches([3, 4], [T]),
     r"1 signatures for 2 rows: expected one modality signature per row"),
    (lambda: plan_modality_micro_batches([3, 4], [T, ""]),
     r"signatures\[1\]='' is invalid: expected a non-empty string such as 'text' or "
     r"'text_image'"),
    (lambda: plan_modality_micro_batches([3], [None]), r"signatures\[0\]=None is invalid"),
    (lambda: plan_modality_micro_batches([3], [T], max_rows=0),
     r"max_rows=0 is invalid: expected an int >= 1 or None"),
    (lambda: plan_modality_micro_batches([3], [T], max_tokens=2.5),
     r"max_tokens=2.5 is invalid: expected an int >= 1 or None"),
    (lambda: plan_modality_micro_batches([3, -1], [T, T]),
     r"lengths\[1\]=-1 is invalid: expected >= 0"),
    (lambda: plan_modality_micro_batches([3.5], [T]),
     r"lengths must be a flat sequence of ints \(token counts\), got float64 of shape \(1,\)"),
    (lambda: plan_padding([(0, 2, 4)], [3, 5]),
     r"row 1 has 5 tokens, more than the width 4 of its micro-batch"),
    (lambda: plan_padding([((0, 1), 5, T), ((1,), 5, T)], [3, 5]),
     r"row 1 is in 2 micro-batches of the plan: expected every row in exactly one"),
    (lambda: plan_padding([((0,), 5, T)], [3, 5]),
     r"row 1 is in 0 micro-batches of the plan"),
    (lambda: plan_padding([((0, 2), 5, T)], [3, 5]),
     r"micro-batch 0 of the plan holds row 2 of a batch of 2 rows"),
    (lambda: plan_padding([((), 5, T)], []), r"micro-batch 0 of the plan holds no row"),
])
def test_bad_inputs_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
