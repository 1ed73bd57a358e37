import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Qwen2Config, Qwen2ForCausalLM

from harpo_core.losses import (
    aggregate,
    kl_penalty,
    masked_entropy_from_logits,
    policy_loss,
    ppo_clip_loss,
    token_logprobs,
)


def single_token_loss(ratio, advantage, clip_low=0.2, clip_high=0.28):
    logprobs = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, stats = ppo_clip_loss(
        logprobs, torch.zeros(1, 1), torch.tensor([advantage]), torch.ones(1, 1),
        clip_low=clip_low, clip_high=clip_high,
    )
    loss.backward()
    return loss.item(), stats, logprobs.grad.item()


@pytest.mark.parametrize(
    "ratio, advantage, expected_loss, clipped",
    [
        (1.1, 1.0, -1.1, False),    # inside the range
        (1.5, 1.0, -1.28, True),    # above 1 + clip_high, A > 0: clipped
        (0.5, 1.0, -0.5, False),    # below 1 - clip_low, A > 0: pessimistic unclipped term
        (0.9, -1.0, 0.9, False),    # inside the range
        (1.5, -1.0, 1.5, False),    # above the range, A < 0: pessimistic unclipped term
        (0.5, -1.0, 0.8, True),     # below 1 - clip_low, A < 0: clipped
        (1.25, 2.0, -2.5, False),   # inside the asymmetric upper edge 1.28 ...
    ],
)
def test_clip_cases_by_hand(ratio, advantage, expected_loss, clipped):
    loss, stats, grad = single_token_loss(ratio, advantage)
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    assert stats["clip_frac"] == (1.0 if clipped else 0.0)
    # d(-ratio * A)/d logprob = -ratio * A unless the clipped (constant) term is active
    assert grad == pytest.approx(0.0 if clipped else -ratio * advantage, rel=1e-6)


def test_asymmetric_clip_differs_from_symmetric():
    loss_asym, stats_asym, _ = single_token_loss(1.25, 2.0, clip_low=0.2, clip_high=0.28)
    loss_sym, stats_sym, _ = single_token_loss(1.25, 2.0, clip_low=0.2, clip_high=0.2)
    assert loss_asym == pytest.approx(-2.5) and stats_asym["clip_frac"] == 0.0
    assert loss_sym == pytest.approx(-2.4) and stats_sym["clip_frac"] == 1.0


def test_clip_frac_and_stats_ignore_unmasked_tokens():
    ratios = torch.tensor([[1.5, 0.5, 1.0, 2.0]])  # the last (clippable) token is masked out
    mask = torch.tensor([[1, 1, 1, 0]])
    logprobs = ratios.log()
    old = torch.zeros(1, 4)
    _, stats = ppo_clip_loss(logprobs, old, torch.tensor([1.0]), mask)
    assert stats["clip_frac"] == pytest.approx(1 / 3)
    assert stats["ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.0) / 3)
    assert stats["approx_kl"] == pytest.approx(-(math.log(1.5) + math.log(0.5)) / 3)


def test_per_token_advantages_match_broadcast():
    torch.manual_seed(0)
    logprobs, old = -torch.rand(2, 5), -torch.rand(2, 5)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    adv = torch.tensor([0.7, -1.3])
    loss_b, _ = ppo_clip_loss(logprobs, old, adv, mask)
    loss_t, _ = ppo_clip_loss(logprobs, old, adv[:, None].expand(2, 5), mask)
    assert torch.allclose(loss_b, loss_t)


def test_garbage_outside_mask_is_ignored():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    old = torch.tensor([[float("nan"), -2.1, float("inf")]])
    ref = torch.tensor([[float("-inf"), -1.9, float("nan")]])
    mask = torch.tensor([[0, 1, 0]])
    loss, stats = policy_loss(
        logprobs, old, torch.tensor([1.0]), mask, ref_logprobs=ref, kl_coef=0.1
    )
    loss.backward()
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in stats.values())
    assert torch.isfinite(logprobs.grad).all()
    assert logprobs.grad[0, 0] == 0 and logprobs.grad[0, 2] == 0


def test_kl_estimators_by_hand():
    logp = torch.tensor([[-1.0, -0.2, -3.0]])
    ref = torch.tensor([[-1.5, -0.2, -0.5]])
    k1 = kl_penalty(logp, ref, "k1")
    k3 = kl_penalty(logp, ref, "k3")
    for t in range(3):
        d = ref[0, t].item() - logp[0, t].item()
        assert k1[0, t].item() == pytest.approx(-d)
        assert k3[0, t].item() == pytest.approx(math.exp(d) - d - 1, rel=1e-6, abs=1e-7)
    assert k3[0, 1] == 0


def test_unknown_kl_estimator_lists_allowed_names():
    with pytest.raises(ValueError, match="k1.*k3"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k2")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-20, 20, width=32), min_size=1, max_size=16),
    st.lists(st.floats(-20, 20, width=32), min_size=1, max_size=16),
)
def test_k3_is_nonnegative(logps, refs):
    n = min(len(logps), len(refs))
    k3 = kl_penalty(torch.tensor([logps[:n]]), torch.tensor([refs[:n]]), "k3")
    assert (k3 >= 0).all()


PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # lengths 3, 1 and empty


def test_aggregation_modes_by_hand():
    # sequence means 2 and 4 (the empty row does not count): (2 + 4) / 2
    assert aggregate(PER_TOKEN, MASK, "seq-mean-token-mean").item() == pytest.approx(3.0)
    # all masked tokens pooled: (1 + 2 + 3 + 4) / 4
    assert aggregate(PER_TOKEN, MASK, "token-mean").item() == pytest.approx(2.5)


@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "token-mean"])
def test_aggregation_of_empty_mask_is_zero_not_nan(mode):
    assert aggregate(PER_TOKEN, torch.zeros_like(MASK), mode).item() == 0.0


@pytest.mark.parametrize("mode, normalizer", [("seq-mean-token-mean", 2), ("token-mean", 4)])
def test_normalizer_splits_the_loss_into_additive_shares(mode, normalizer):
    whole = aggregate(PER_TOKEN, MASK, mode)
    shares = [aggregate(PER_TOKEN[i:i + 1], MASK[i:i + 1], mode, normalizer) for i in range(3)]
    assert sum(shares).item() == pytest.approx(whole.item())


def test_unknown_aggregation_raises():
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(PER_TOKEN, MASK, "sum")


def on_policy_gradient(mode, kl_coef=0.0, kl_estimator="k3"):
    torch.manual_seed(1)
    logprobs = (-torch.rand(3, 6)).requires_grad_()
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    adv = torch.tensor([1.5, -0.5, 2.0])
    ref = logprobs.detach().clone() if kl_coef else None
    loss, _ = policy_loss(
        logprobs, logprobs.detach(), adv, mask, ref_logprobs=ref, kl_coef=kl_coef,
        kl_estimator=kl_estimator, aggregation=mode,
    )
    loss.backward()
    return logprobs.grad, adv, mask


def test_on_policy_gradient_is_reinforce_seq_mean_token_mean():
    grad, adv, mask = on_policy_gradient("seq-mean-token-mean")
    lengths = mask.sum(-1).float()
    expected = torch.zeros(3, 6)
    for b in range(2):  # two non-empty sequences
        expected[b] = -adv[b] / lengths[b] / 2 * mask[b]
    assert torch.allclose(grad, expected, atol=1e-7)


def test_on_policy_gradient_is_reinforce_token_mean():
    grad, adv, mask = on_policy_gradient("token-mean")
    expected = -adv[:, None] * mask / mask.sum()
    assert torch.allclose(grad, expected, atol=1e-7)


def test_kl_gradient_at_the_reference():
    # k3 has zero slope where policy == reference; k1 has slope 1 everywhere
    grad_k3, adv, mask = on_policy_gradient("token-mean", kl_coef=0.5, kl_estimator="k3")
    assert torch.allclose(grad_k3, -adv[:, None] * mask / mask.sum(), atol=1e-7)
    grad_k1, adv, mask = on_policy_gradient("token-mean", kl_coef=0.5, kl_estimator="k1")
    assert torch.allclose(grad_k1, (0.5 - adv[:, None]) * mask / mask.sum(), atol=1e-7)


def test_policy_loss_is_clip_loss_plus_weighted_kl():
    torch.manual_seed(2)
    logprobs, old, ref = -torch.rand(2, 5), -torch.rand(2, 5), -torch.rand(2, 5)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    adv = torch.tensor([0.7, -1.3])
    clip, _ = ppo_clip_loss(logprobs, old, adv, mask)
    kl = aggregate(kl_penalty(logprobs, ref, "k3"), mask, "seq-mean-token-mean")
    total, stats = policy_loss(logprobs, old, adv, mask, ref_logprobs=ref, kl_coef=0.1)
    assert total.item() == pytest.approx((clip + 0.1 * kl).item(), rel=1e-6)
    assert stats["kl"] > 0
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(logprobs, old, adv, mask, kl_coef=0.1)


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    return Qwen2ForCausalLM(config).eval()


def test_token_logprobs_match_manual_loop(tiny_lm):
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        logits = tiny_lm(input_ids=ids).logits
    out = token_logprobs(logits, ids)
    assert out.shape == ids.shape and (out[:, 0] == 0).all()
    for b in range(2):
        for t in range(1, 7):
            prefix_logits = tiny_lm(input_ids=ids[b:b + 1, :t]).logits[0, -1].detach()
            expected = torch.log_softmax(prefix_logits, -1)[ids[b, t]]
            assert out[b, t].item() == pytest.approx(expected.item(), abs=1e-5)


def test_masked_entropy_matches_categorical():
    torch.manual_seed(3)
    logits = torch.randn(2, 5, 11)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    # token t is predicted by logits[:, t - 1]
    entropies = torch.distributions.Categorical(logits=logits[:, :-1]).entropy()
    expected = entropies[mask[:, 1:].bool()].mean()
    assert masked_entropy_from_logits(logits, mask).item() == pytest.approx(expected.item())
    uniform = masked_entropy_from_logits(torch.zeros(1, 3, 8), torch.ones(1, 3))
    assert uniform.item() == pytest.approx(math.log(8))
