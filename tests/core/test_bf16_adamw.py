"""Stochastic rounding into bfloat16 and the bf16 AdamW built on it (pure torch, CPU).

The statistical bounds are derived in each test's docstring; every test is seeded, so a pass
or a failure is reproducible, and each asserts the failure mode it guards against (nearest
rounding's bias, a dropped update) next to the property, so it can fail."""

import copy
import math

import pytest
import torch

from harpo_core.bf16_adamw import StochasticBF16AdamW, state_bytes
from harpo_core.stochastic_rounding import adamw_step_, stochastic_round, stream_seed


def upper_neighbour(lower: torch.Tensor) -> torch.Tensor:
    """The bf16 value one step further from zero than ``lower`` (bf16)."""
    return (lower.view(torch.int16) + 1).view(torch.bfloat16)


@pytest.mark.parametrize("lower", [1.0, 1e-2, -3.7, 2.5e-30, 6.0e4])
@pytest.mark.parametrize("fraction", [1 / 16, 0.25, 0.5, 0.7, 15 / 16])
def test_rounding_is_unbiased(lower, fraction):
    """x = a + f (b - a) between bf16 neighbours a, b rounds to b with probability f, so over
    N draws the mean is a + p_hat (b - a) with sd(p_hat) = sqrt(f (1 - f) / N). With N = 2^17
    the bound 5 sd is < 0.007 of a bf16 step (a false failure has probability < 1e-6, and the
    seed is fixed); nearest rounding misses x by min(f, 1 - f) >= 1/16 of a step."""
    n = 1 << 17
    a = torch.tensor([lower]).bfloat16()
    b = upper_neighbour(a)
    gap = float(b.float() - a.float())
    x = a.float() + fraction * (b.float() - a.float())
    rounded = stochastic_round(x.expand(n).contiguous(), seed=stream_seed(7, n))
    assert rounded.dtype == torch.bfloat16
    assert set(rounded.float().unique().tolist()) <= {float(a), float(b)}  # a neighbour, always
    bound = 5 * abs(gap) * math.sqrt(fraction * (1 - fraction) / n)
    assert abs(float(rounded.double().mean()) - float(x)) <= bound
    nearest = float(x.bfloat16().float())
    assert abs(nearest - float(x)) > 10 * bound  # what the test would catch


def test_representable_and_non_finite_values_pass_unchanged():
    values = torch.tensor([0.0, -0.0, 1.0, -2.5, 1e-2, float("inf"), float("-inf"),
                           float("nan")]).bfloat16().float()
    for seed in range(20):
        rounded = stochastic_round(values, seed).float()
        assert torch.equal(rounded[:-1], values[:-1]) and rounded[-1].isnan()
    # different seeds draw different bits
    x = torch.full((4096,), 1.0 + 2**-9)  # halfway between 1 and the next bf16 value
    assert not torch.equal(stochastic_round(x, 1), stochastic_round(x, 2))
    assert torch.equal(stochastic_round(x, 1), stochastic_round(x, 1))


def test_float32_parameters_get_exactly_torch_adamw():
    """The float32 arithmetic is torch.optim.AdamW's, step for step (decoupled weight decay,
    bias correction), chunked or not: the reference the bf16 test below relies on."""
    torch.manual_seed(0)
    start = torch.randn(1000)
    grads = [torch.randn(1000) for _ in range(6)]
    ours = torch.nn.Parameter(start.clone())
    theirs = torch.nn.Parameter(start.clone())
    kwargs = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    optimizers = [StochasticBF16AdamW([ours], chunk_elements=128, **kwargs),
                  torch.optim.AdamW([theirs], **kwargs)]
    for grad in grads:
        for param, optimizer in zip((ours, theirs), optimizers):
            param.grad = grad.clone()
            optimizer.step()
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-7)
    assert torch.allclose(optimizers[0].state[ours]["exp_avg_sq"],
                          optimizers[1].state[theirs]["exp_avg_sq"], rtol=1e-6, atol=0)


def test_an_rl_rate_update_lands_in_bf16_weights():
    """lr 1e-6 on weights in [0.010, 0.0145), constant gradients (Adam then moves every weight
    by ~lr per step): fp32 AdamW moves each weight by ~N lr = 3e-4 over N = 300 steps.

    Round-to-nearest bf16 AdamW (torch's own, on bf16 parameters) moves none: one update is
    1/61 of the bf16 step there (2^-14 = 6.1e-5). Stochastic rounding: each step's rounding
    error has mean 0 and variance <= ulp^2 / 4 given the past, so the mean over E weights of
    their N-step error has sd <= ulp sqrt(N / (4 E)) = 5.8e-6 (E = 8192); bf16 moments add a
    zero-mean relative error of ~2^-9 per step to the update size, at most N lr 2^-8 in all.
    The bound: 5 sd + N lr 2^-8 (10% of the displacement)."""
    torch.manual_seed(0)
    elements, steps, lr = 8192, 300, 1e-6
    start = (0.010 + 0.0045 * torch.rand(elements)).bfloat16()
    grad = -(0.5 + torch.rand(elements)) * 1e-3  # every weight wants to grow
    runs = {}
    for name, dtype, make in [
        ("fp32", torch.float32, lambda p: torch.optim.AdamW([p], lr=lr)),
        ("nearest", torch.bfloat16, lambda p: torch.optim.AdamW([p], lr=lr)),
        ("stochastic", torch.bfloat16,
         lambda p: StochasticBF16AdamW([p], lr=lr, seed=3, chunk_elements=1000)),
    ]:
        param = torch.nn.Parameter(start.to(dtype, copy=True))
        optimizer = make(param)
        for _ in range(steps):
            param.grad = grad.to(dtype)
            optimizer.step()
        runs[name] = (param.detach().double() - start.double()).mean().item()
    ulp = 2.0**-14
    assert runs["fp32"] == pytest.approx(steps * lr, rel=0.01)
    assert runs["nearest"] == 0.0  # every update rounded away
    bound = 5 * ulp * math.sqrt(steps / (4 * elements)) + steps * lr * 2.0**-8
    assert abs(runs["stochastic"] - runs["fp32"]) <= bound, (runs, bound)
    assert bound < 0.15 * runs["fp32"]  # the bound is tight enough to mean something


def test_the_second_moment_decays_only_with_stochastic_rounding():
    """With beta2 = 0.999, v * beta2 is within half a bf16 step of v: nearest rounding keeps v
    forever, stochastic rounding lets it decay as in fp32 (0.999^2000 = 0.135)."""
    v = torch.full((4096,), 1.0).bfloat16()
    nearest, stochastic = v.clone(), v.clone()
    for step in range(2000):
        nearest = (nearest.float() * 0.999).bfloat16()
        stochastic = stochastic_round(stochastic.float() * 0.999, seed=step)
    assert torch.equal(nearest, v)
    assert float(stochastic.float().mean()) == pytest.approx(0.999**2000, rel=0.02)


def test_state_is_bf16_and_half_of_fp32_adamw():
    """Parameters + gradients + moments: 8 bytes per parameter against 16 (plus a 4-byte step
    counter per tensor in both)."""
    def held(dtype, make):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 32)).to(dtype)
        optimizer = make(model.parameters())
        model(torch.randn(4, 64, dtype=dtype)).square().sum().backward()
        optimizer.step()
        tensors = [*model.parameters(), *(p.grad for p in model.parameters())]
        return sum(t.numel() * t.element_size() for t in tensors) + state_bytes(optimizer)

    fp32 = held(torch.float32, lambda p: torch.optim.AdamW(p, lr=1e-3))
    bf16 = held(torch.bfloat16, lambda p: StochasticBF16AdamW(p, lr=1e-3))
    n = 64 * 128 + 128 + 128 * 32 + 32
    assert (fp32, bf16) == (16 * n + 4 * 4, 8 * n + 4 * 4)
    assert bf16 / fp32 <= 0.6


def test_resume_from_a_state_dict_rounds_exactly_as_an_uninterrupted_run():
    """The rounding bits are a function of (seed, stream, index, step): a fresh optimizer that
    loads the state dict continues bit for bit; another stream (rank) draws other bits."""
    torch.manual_seed(0)
    start = torch.randn(3000).bfloat16()
    grads = [torch.randn(3000).bfloat16() for _ in range(4)]

    def run(param, optimizer, steps):
        for grad in steps:
            param.grad = grad.clone()
            optimizer.step()

    first = torch.nn.Parameter(start.clone())
    uninterrupted = StochasticBF16AdamW([first], lr=1e-3, weight_decay=0.1, seed=5)
    run(first, uninterrupted, grads[:2])
    saved = copy.deepcopy(uninterrupted.state_dict())  # (state_dict() holds live tensors)
    saved_weights = first.detach().clone()
    run(first, uninterrupted, grads[2:])

    second = torch.nn.Parameter(saved_weights)
    resumed = StochasticBF16AdamW([second], lr=1e-3, weight_decay=0.1, seed=99)  # seed restored
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["rounding_seed"] == 5
    run(second, resumed, grads[2:])
    assert torch.equal(first, second)
    assert resumed.state[second]["exp_avg"].dtype == torch.bfloat16

    other = torch.nn.Parameter(start.clone())
    run(other, StochasticBF16AdamW([other], lr=1e-3, weight_decay=0.1, seed=5, stream=1), grads)
    assert not torch.equal(other, first)


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match=r"updates bfloat16 \(or float32\) parameters, got one "
                                        r"of torch.float16"):
        StochasticBF16AdamW([torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))])
    with pytest.raises(ValueError, match=r"betas=\(0.9, 1.0\) is invalid"):
        StochasticBF16AdamW([torch.nn.Parameter(torch.zeros(2))], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match=r"contiguous"):
        t = torch.zeros(4, 4).t()
        adamw_step_(t, t, t, t, step=1, lr=1.0, beta1=0.9, beta2=0.9, eps=1e-8,
                    weight_decay=0.0, seed=0)
