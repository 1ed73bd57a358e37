"""Chunked log-probs equal the full-logits computation (values and gradients); micro-batch plans."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from harpo_core.logprobs import chunked_logprobs, full_logprobs
from harpo_core.micro_batches import plan_micro_batches, split_to_count
from harpo_core.packing import shared_prompt_forward, shared_prompt_hidden
from tests.core.test_packing import grouped_batch

N, H, V = 37, 16, 50


def head_inputs(bias: bool):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=gen, requires_grad=True)
    weight = (0.5 * torch.randn(V, H, generator=gen)).requires_grad_()
    b = (0.1 * torch.randn(V, generator=gen)).requires_grad_() if bias else None
    targets = torch.randint(0, V, (N,), generator=gen)
    upstream = torch.randn(N, generator=gen)  # an arbitrary weighting of the tokens
    return hidden, weight, b, targets, upstream


def close(got, want, tol=1e-6):
    """Equal to ``tol`` relative to the largest entry (at least 1): fp32 rounding of sums."""
    return (got - want).abs().max().item() <= tol * max(1.0, want.abs().max().item())


def grads(fn, inputs):
    hidden, weight, bias, targets, upstream = inputs
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    for leaf in leaves:
        leaf.grad = None
    logprobs, entropy = fn(hidden, weight, bias, targets)
    (logprobs * upstream).sum().backward()
    return logprobs.detach(), entropy, [leaf.grad.clone() for leaf in leaves]


@pytest.mark.parametrize("temperature, chunk, bias", [(1.0, 8, False), (0.7, 5, True),
                                                      (1.3, 1, False), (0.7, 100, True)])
def test_chunked_equals_full_logits_values_and_gradients(temperature, chunk, bias):
    inputs = head_inputs(bias)
    full = grads(lambda *a: full_logprobs(*a, temperature=temperature), inputs)
    chunked = grads(lambda *a: chunked_logprobs(*a, temperature=temperature,
                                                chunk_tokens=chunk), inputs)
    assert close(chunked[0], full[0]) and close(chunked[1], full[1])
    assert not chunked[1].requires_grad  # the entropy is a statistic
    for got, want in zip(chunked[2], full[2]):
        assert close(got, want)
    # the temperature is applied: without it the log-probs differ
    if temperature != 1.0:
        plain = full_logprobs(*inputs[:4])[0]
        assert (plain - full[0]).abs().max() > 1e-2


def test_chunked_rejects_bad_shapes_and_chunks():
    hidden, weight, _, targets, _ = head_inputs(False)
    with pytest.raises(ValueError, match=r"chunk_tokens=0 is invalid: expected an int >= 1"):
        chunked_logprobs(hidden, weight, None, targets, chunk_tokens=0)
    with pytest.raises(ValueError, match=r"hidden \[N, H\] and targets \[N\] expected"):
        chunked_logprobs(hidden[None], weight, None, targets)


def test_shared_prompt_hidden_with_chunked_head_matches_the_packed_logits_pass():
    """The chunked head on the packed pass's hidden states gives the packed log-probs and the
    same model gradients (a real Qwen2, temperature 0.8)."""
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)).eval()
    ids, attention, response = grouped_batch()
    mask = response.bool()
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(2))

    packed, _ = shared_prompt_forward(model, ids, attention, response, temperature=0.8)
    (packed * weights)[mask].sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    hidden, targets, (rows, columns) = shared_prompt_hidden(model.base_model, ids, attention,
                                                            response)
    picked, _ = chunked_logprobs(hidden, model.lm_head.weight, None, targets, temperature=0.8,
                                 chunk_tokens=4)
    assert torch.equal(targets, ids[rows, columns])
    assert close(picked, packed[rows, columns])
    (picked * weights[rows, columns]).sum().backward()
    for name, param in model.named_parameters():
        assert close(param.grad, want[name]), name


def test_micro_batch_plans():
    lengths = [5, 3, 8, 2, 2, 9, 1]
    # rows only
    assert plan_micro_batches(lengths, max_rows=3) == [(0, 3, 8), (3, 6, 9), (6, 7, 1)]
    # tokens only: rows x longest <= 16
    assert plan_micro_batches(lengths, max_tokens=16) == [
        (0, 2, 5), (2, 4, 8), (4, 5, 2), (5, 6, 9), (6, 7, 1)]
    # both, and a row longer than the budget gets a micro-batch of its own
    assert plan_micro_batches(lengths, max_rows=2, max_tokens=6) == [
        (0, 1, 5), (1, 2, 3), (2, 3, 8), (3, 5, 2), (5, 6, 9), (6, 7, 1)]
    assert plan_micro_batches(lengths) == [(0, 7, 9)]
    assert plan_micro_batches([0, 0]) == [(0, 2, 1)]
    assert plan_micro_batches([]) == []
    for plan in (plan_micro_batches(lengths, max_tokens=t, max_rows=r)
                 for t in (1, 7, 20, None) for r in (1, 4, None)):
        assert [s for s, _, _ in plan] == [0] + [e for _, e, _ in plan[:-1]]  # in order
        assert plan[-1][1] == len(lengths)
    with pytest.raises(ValueError, match=r"max_tokens=0 is invalid: expected an int >= 1"):
        plan_micro_batches(lengths, max_tokens=0)


def test_chunked_bf16_head_runs_in_its_dtype_and_stays_near_float32():
    """bf16 hidden states and head (a mixed-precision learner): gradients come back in bf16,
    the weight's accumulated over the chunks in float32, as close to the float32 result as the
    full bf16 computation is."""
    inputs = head_inputs(True)
    exact = grads(lambda *a: full_logprobs(*a, temperature=0.7), inputs)
    hidden, weight, bias, targets, upstream = inputs
    low = [t.detach().bfloat16().requires_grad_() for t in (hidden, weight, bias)]
    full = grads(lambda *a: full_logprobs(*a, temperature=0.7), (*low, targets, upstream))
    chunked = grads(lambda *a: chunked_logprobs(*a, temperature=0.7, chunk_tokens=8),
                    (*low, targets, upstream))
    assert chunked[0].dtype == torch.float32
    assert [g.dtype for g in chunked[2]] == [torch.bfloat16] * 3
    assert close(chunked[0], exact[0], 0.1)
    for got, bf16, want in zip(chunked[2], full[2], exact[2]):
        error = (got.float() - want).abs().max()
        assert error <= 0.05 * want.abs().max()
        assert error <= 2 * (bf16.float() - want).abs().max()


def test_micro_batch_plans_split_to_a_count_that_ranks_agree_on():
    lengths = [5, 3, 8, 2, 2, 9, 1]
    plan = plan_micro_batches(lengths, max_tokens=16)  # 5 micro-batches
    assert split_to_count(plan, lengths, 5) == plan
    # the micro-batch with the most rows is halved, each half cut to its longest row
    assert split_to_count(plan, lengths, 6) == [
        (0, 1, 5), (1, 2, 3), (2, 4, 8), (4, 5, 2), (5, 6, 9), (6, 7, 1)]
    assert split_to_count(plan, lengths, 7) == [(i, i + 1, n) for i, n in enumerate(lengths)]
    with pytest.raises(ValueError, match=r"count=8 is invalid: expected at most 7"):
        split_to_count(plan, lengths, 8)
