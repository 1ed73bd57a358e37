"""Stochastic rounding of float32 values into bfloat16, and the AdamW step that uses it.

Why: a bfloat16 number keeps 8 significant bits, so near a weight of 1e-2 the representable
values are ~6.1e-5 apart. An AdamW update at an RL learning rate (~1e-6 per step) is a sixtieth
of that gap, and round-to-nearest sends every such update back to the weight it started from:
training silently stops. Rounding *stochastically* - up with probability equal to how far the
exact value lies towards the upper neighbour, down otherwise - makes the rounded weight equal
the exact one in expectation, so small updates accumulate on average instead of vanishing
(the argument of Gupta et al. 2015, "Deep learning with limited numerical precision", and of
Zamirai et al. 2020, "Revisiting BFloat16 training", who show bf16-only training with
stochastic rounding of the weight update reaches fp32 accuracy where nearest rounding does
not). The error of each rounding has mean 0 and variance at most ``ulp^2 / 4``; over ``N``
steps it adds up like a random walk, ``O(ulp * sqrt(N))``, against the ``O(N * update)``
drift that survives.

How (vectorised, integer tricks on the float32 bit pattern): bfloat16 is the upper 16 bits
of a float32. Adding a uniform random integer in ``[0, 2^16)`` to the float32 bits and then
clearing the lower 16 bits carries into the kept bits with probability exactly
``dropped / 2^16`` - i.e. rounds the magnitude up with the probability its fraction says. The
sign bit is separate (sign-magnitude), so negative values round the same way in magnitude,
which is again unbiased. The result has 16 zero low bits, so converting it to bfloat16 is
exact. Non-finite values pass through unchanged; a finite value within one bf16 step of the
largest float rounds to infinity with the corresponding probability (as any rounding would).

Randomness is counter-based, not a running generator: the bits for a tensor come from a
generator seeded with a hash of ``(seed, stream, tensor index, optimizer step, chunk)``. So
the rounding of a step is a pure function of the optimizer's own state (its step count and
the seed kept in its param group): a run resumed from a checkpoint draws exactly the bits an
uninterrupted run would, with no generator state to save, and a sharded rank (``stream``)
draws its own bits for its own shard.

Everything here is torch on whatever device the tensors are on; nothing is per element in
Python. Tensors are processed in chunks of ``chunk_elements`` so the float32 temporaries stay
bounded (a few times ``4 * chunk_elements`` bytes), whatever the tensor's size.
"""

from __future__ import annotations

import math

import torch

# Elements per chunk of the float32 AdamW arithmetic (kept with the memory arithmetic, which
# counts the chunk's temporaries and imports no torch).
from harpo_core.memory import CHUNK_ELEMENTS

_MASK64 = (1 << 64) - 1
_LOW16_CLEARED = -65536  # 0xFFFF0000 as an int32


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def stream_seed(*keys: int) -> int:
    """A 63-bit generator seed hashed from integer ``keys`` (splitmix64, order-sensitive):
    nearby keys give unrelated seeds."""
    state = 0
    for key in keys:
        state = _splitmix64(state ^ (int(key) & _MASK64))
    return state >> 1


def _generator(device: torch.device, seed: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def round_stochastic_(target: torch.Tensor, values: torch.Tensor,
                      generator: torch.Generator) -> torch.Tensor:
    """Write float32 ``values`` into ``target`` (same shape), rounding stochastically when
    ``target`` is bfloat16 and copying when it is float32; returns ``target``.

    ``E[rounded] = values`` for every finite value: each lands on one of its two bf16
    neighbours, the upper one with probability (value - lower) / (upper - lower)."""
    if values.dtype != torch.float32:
        raise TypeError(f"values must be float32, got {values.dtype}")
    if target.dtype == torch.float32:
        return target.copy_(values)
    if target.dtype != torch.bfloat16:
        raise TypeError(f"stochastic rounding writes into bfloat16 (or float32), not "
                        f"{target.dtype}")
    values = values.contiguous()
    noise = torch.randint(0, 1 << 16, values.shape, dtype=torch.int32, device=values.device,
                          generator=generator)
    bits = values.view(torch.int32).add(noise).bitwise_and_(_LOW16_CLEARED)
    rounded = torch.where(torch.isfinite(values), bits.view(torch.float32), values)
    return target.copy_(rounded)  # exact: the low 16 bits are zero


def stochastic_round(values: torch.Tensor, seed: int) -> torch.Tensor:
    """``values`` (float32) rounded stochastically to a new bfloat16 tensor, bits from
    ``seed``."""
    target = torch.empty(values.shape, dtype=torch.bfloat16, device=values.device)
    return round_stochastic_(target, values.float(), _generator(values.device, seed))


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_contiguous():
        raise ValueError("the AdamW step works on contiguous tensors (a parameter, its "
                         "gradient and its moments)")
    return tensor.view(-1)


@torch.no_grad()
def adamw_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                exp_avg_sq: torch.Tensor, *, step: int, lr: float, beta1: float, beta2: float,
                eps: float, weight_decay: float, seed: int,
                chunk_elements: int = CHUNK_ELEMENTS) -> None:
    """One AdamW step (``torch.optim.AdamW``'s formula, decoupled weight decay, bias
    correction for ``step`` >= 1) on one tensor, in place.

    ``param``, ``exp_avg`` and ``exp_avg_sq`` are bfloat16 (or float32: then the step is plain
    float32 AdamW) and ``grad`` bf16 or fp32; each chunk is computed in float32 and the three
    results are rounded stochastically back into their storage, with bits from ``seed`` and
    the chunk's index. The moments are rounded stochastically too: with ``beta2 = 0.999``,
    ``exp_avg_sq * beta2`` is within half a bf16 step of ``exp_avg_sq``, so nearest rounding
    would never let the second moment decay.
    """
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** step)
    step_size = lr / bias_correction1
    flats = [_flat(t) for t in (param, grad, exp_avg, exp_avg_sq)]
    p_all, g_all, m_all, v_all = flats
    for index, start in enumerate(range(0, p_all.numel(), chunk_elements)):
        part = slice(start, start + chunk_elements)
        g = g_all[part].float()
        m = m_all[part].float().lerp_(g, 1.0 - beta1)  # (a view for float32 storage: in place)
        v = v_all[part].float().mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        p = p_all[part].float()
        if weight_decay:
            p.mul_(1.0 - lr * weight_decay)
        denom = v.sqrt().div_(bias_correction2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-step_size)
        generator = _generator(p.device, stream_seed(seed, index))
        round_stochastic_(p_all[part], p, generator)
        round_stochastic_(m_all[part], m, generator)
        round_stochastic_(v_all[part], v, generator)
