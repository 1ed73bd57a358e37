"""Sampled-token log-probs from final hidden states, a chunk of tokens at a time.

A causal LM's output layer turns each final hidden state ``h`` (size ``H``) into logits over
the whole vocabulary (``V`` = 151,936 for Qwen). Computing the log-softmax of a sequence at once
keeps ``[T, V]`` float32 logits, their log-softmax and, in the backward pass, their gradient
alive: O(T x V) memory, gigabytes for a few thousand tokens, although the loss needs one number
per token.

:func:`chunked_logprobs` computes, for ``N`` hidden states and their target tokens,

* ``logprobs[i] = log softmax(z_i)[target_i]`` and
* ``entropy[i] = -sum_v softmax(z_i)_v log softmax(z_i)_v`` (reported, not differentiated),

with ``z_i = (W h_i + b) / temperature`` evaluated in float32, ``chunk_tokens`` rows at a time.
Only the outputs (two floats per token) are kept from the forward pass; the backward pass
recomputes each chunk's logits and applies the gradient of the picked log-prob with respect to
the logits, ``g_i (onehot(target_i) - softmax(z_i)) / temperature``, through the linear head.
Peak memory is O(chunk x V) in both passes, and the result equals the full computation up to
float rounding (matrix products summed in another order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _chunk_log_softmax(hidden, weight, bias, temperature):
    """Float32 log-softmax ``[n, V]`` of one chunk's logits ``(hidden @ W^T + b) / T``, with
    at most two ``[n, V]`` tensors alive (outside autograd: the temperature divides in place)."""
    logits = F.linear(hidden, weight, bias).float()
    if temperature != 1.0:
        logits = logits.div_(temperature) if not torch.is_grad_enabled() else logits / temperature
    return F.log_softmax(logits, dim=-1)


class _ChunkedHeadLogprobs(torch.autograd.Function):
    """Autograd of :func:`chunked_logprobs`: logits are recomputed chunk by chunk in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk):
        n = hidden.shape[0]
        logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            logp = _chunk_log_softmax(hidden[start:end], weight, bias, temperature)
            logprobs[start:end] = logp.gather(-1, targets[start:end, None]).squeeze(-1)
            entropy[start:end] = -logp.exp().mul_(logp).sum(-1)
            del logp
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # Accumulated over the chunks in float32 (a 16-bit sum over many chunks would lose
        # the small ones), cast to the weight's dtype at the end.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32,
                                  device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32,
                                device=bias.device) if need_bias else None
        if grad_logprobs is None:
            grad_logprobs = torch.zeros(hidden.shape[0], dtype=torch.float32,
                                        device=hidden.device)
        for start in range(0, hidden.shape[0], ctx.chunk):
            end = min(start + ctx.chunk, hidden.shape[0])
            h = hidden[start:end]
            g = grad_logprobs[start:end].float()
            # d logp[target] / d logits = onehot(target) - softmax; then through "/ T"
            grad_logits = _chunk_log_softmax(h, weight, bias, ctx.temperature).exp_()
            grad_logits.mul_(-g[:, None])
            grad_logits.scatter_add_(-1, targets[start:end, None], g[:, None])
            if ctx.temperature != 1.0:
                grad_logits.div_(ctx.temperature)
            if need_hidden:
                grad_hidden[start:end] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_weight:
                grad_weight.addmm_(grad_logits.t(), h.float())
            if need_bias:
                grad_bias.add_(grad_logits.sum(0))
            del grad_logits
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        if need_bias:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def chunked_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     targets: torch.Tensor, *, temperature: float = 1.0,
                     chunk_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs ``[N]`` of ``targets`` ``[N]`` and entropies ``[N]`` of the next-token
    distributions ``softmax((hidden @ weight^T + bias) / temperature)`` for ``hidden``
    ``[N, H]`` (a linear output head ``weight`` ``[V, H]``, ``bias`` ``[V]`` or None).

    Both are float32. Log-probs are differentiable with respect to ``hidden``, ``weight`` and
    ``bias``; the entropy is a statistic and is not. See the module docstring for the memory.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens!r} is invalid: expected an int >= 1")
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden [N, H] and targets [N] expected, got {tuple(hidden.shape)} "
                         f"and {tuple(targets.shape)}")
    return _ChunkedHeadLogprobs.apply(hidden, weight, bias, targets, temperature, chunk_tokens)


def full_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  targets: torch.Tensor, *, temperature: float = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`chunked_logprobs` computes, with all ``[N, V]`` logits at once and plain
    autograd: the reference it is tested against."""
    logp = _chunk_log_softmax(hidden, weight, bias, temperature)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, targets[:, None]).squeeze(-1), entropy
