"""Truncated importance sampling by hand, and the dtype-aware mismatch rule."""

import math

import numpy as np
import pytest
import torch

from harpo_core.losses import LossConfig, policy_loss
from harpo_core.mismatch import MismatchRule, mismatch_rule, mismatch_stats


def test_truncated_importance_weights_by_hand():
    # learner-old / rollout probability ratios 0.5, 1.5, 4 (capped at 2); a 4th token is
    # outside the mask with a garbage rollout log-prob
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    rollout = old - torch.log(torch.tensor([[0.5, 1.5, 4.0, 1.0]]))
    rollout[0, 3] = float("-inf")
    mask = torch.tensor([[1, 1, 1, 0]])
    logprobs = old.clone().requires_grad_()  # the first step: ratio 1 on every token
    advantages = torch.tensor([2.0])
    loss, stats = policy_loss(logprobs, old, advantages, mask, rollout_logprobs=rollout,
                              tis_cap=2.0)
    # per token -A * w = -2 * [0.5, 1.5, 2]; seq-mean-token-mean over 3 tokens
    assert loss.item() == pytest.approx(-(1.0 + 3.0 + 4.0) / 3, rel=1e-6)
    assert stats["tis_weight_mean"] == pytest.approx(4.0 / 3, rel=1e-6)
    assert stats["tis_truncated_frac"] == pytest.approx(1.0 / 3, rel=1e-6)
    loss.backward()
    # d/d logprob of -A w exp(logprob - old) / 3 at ratio 1; weights are constants
    assert torch.allclose(logprobs.grad, torch.tensor([[-1 / 3, -1.0, -4 / 3, 0.0]]), atol=1e-6)

    # the weight multiplies the clipped term too: ratio 1.5 > 1 + clip_high, A > 0
    moved = (old + math.log(1.5)).requires_grad_()
    loss, _ = policy_loss(moved, old, advantages, mask, rollout_logprobs=rollout, tis_cap=2.0)
    assert loss.item() == pytest.approx(-2 * 1.28 * (0.5 + 1.5 + 2.0) / 3, rel=1e-6)

    # off: the same call without tis_cap ignores the rollout log-probs
    plain, stats = policy_loss(logprobs, old, advantages, mask, rollout_logprobs=rollout)
    assert plain.item() == pytest.approx(-2.0, rel=1e-6) and "tis_weight_mean" not in stats
    with pytest.raises(ValueError, match=r"tis_cap=2.0 needs rollout_logprobs"):
        policy_loss(logprobs, old, advantages, mask, tis_cap=2.0)
    with pytest.raises(ValueError, match=r"tis_cap=0.5 is invalid: expected >= 1 or None"):
        LossConfig(tis_cap=0.5)


def test_mismatch_rule_by_dtype_pair():
    assert mismatch_rule("float32", "float32").statistic == "max"
    assert mismatch_rule("float32", "float32").tolerance == 1e-3  # today's strictness
    assert (mismatch_rule("bfloat16", "float32").statistic,
            mismatch_rule("bfloat16", "float32").tolerance) == ("p99", 1.0)
    assert mismatch_rule("float32", "bfloat16") == MismatchRule("p99", 1.0, ("fp32", "bf16"))
    assert mismatch_rule("float16", "float32").tolerance == 0.2
    assert mismatch_rule("float16", "bfloat16").tolerance == 1.0  # bf16 anywhere
    assert mismatch_rule("torch.bfloat16", "float32", 0.05).tolerance == 0.05  # user's value
    assert mismatch_rule("bfloat16", "float32", 0.05).statistic == "p99"
    with pytest.raises(ValueError, match=r"dtype 'int8' is unknown"):
        mismatch_rule("int8", "float32")


def test_mismatch_statistics_and_one_outlier():
    gaps = np.full(1000, 0.01)
    gaps[0] = 5.0  # one outlier token
    stats = mismatch_stats(-gaps)  # the sign of the gap does not matter
    assert stats["max"] == 5.0
    assert stats["p99"] == pytest.approx(0.01)
    assert stats["mean"] == pytest.approx((999 * 0.01 + 5.0) / 1000)
    bf16 = mismatch_rule("bfloat16", "float32")
    assert not bf16.exceeded(stats)  # one token does not stop a bf16 run
    assert mismatch_rule("float32", "float32").exceeded(stats)  # in float32 it does
    assert bf16.exceeded({**stats, "p99": float("nan")})
    assert mismatch_stats([]) == {"max": 0.0, "mean": 0.0, "p99": 0.0}
