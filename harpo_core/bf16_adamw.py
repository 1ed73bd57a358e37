"""AdamW whose weights and moments live in bfloat16, updated with stochastic rounding.

:class:`StochasticBF16AdamW` is a ``torch.optim.Optimizer`` for bfloat16 parameters: both
AdamW moments are kept in bfloat16 too, so parameters + gradients + optimizer state take
2 + 2 + 4 = 8 bytes per parameter instead of float32 AdamW's 4 + 4 + 8 = 16 (0.5x). Each step
computes the update in float32, one chunk of a tensor at a time, and rounds the new weight and
moments stochastically into bfloat16 (:mod:`harpo_core.stochastic_rounding`): unbiased, so
updates far below a bf16 step (lr ~1e-6 on weights ~1e-2) still move the weights on average.

The schemes weighed (bytes per parameter; float32 AdamW = 16):

* float32 weights, bf16 moments: 4 + 4 + 4 = 12 (0.75x) - safe, but not enough;
* bf16 weights + a bf16 Kahan compensation buffer (the rounding error carried to the next
  step, Zamirai et al. 2020): 2 + 2 + 4 + 2 = 10 (0.625x) - deterministic and near-exact, but
  still above 0.6x, and a fifth buffer to shard and checkpoint;
* bf16 weights and moments with stochastic rounding (this): 8 (0.5x). The price is noise: each
  rounding adds zero-mean error of up to one bf16 step, a random walk of ``ulp * sqrt(N)``
  over ``N`` steps, against the drift ``N * update`` that survives on average. Zamirai et al.
  found stochastic rounding of the update reaches fp32 accuracy in bf16-only training; Gupta et
  al. 2015 made the same point for 16-bit fixed point.

Parameters may be DTensors (FSDP2 shards): the step works on each rank's local shard, and the
moments are created as DTensors like the parameters so sharded checkpoints save them as such.
Float32 parameters are allowed and get plain float32 AdamW (what the tests compare against
``torch.optim.AdamW``).

Randomness (see :mod:`harpo_core.stochastic_rounding`): the bits of parameter ``i`` at step
``t`` come from ``hash(rounding_seed, stream, i, t, chunk)``. ``rounding_seed`` is a
hyper-parameter of the param group (saved and restored with the optimizer's state dict) and
``t`` is the parameter's step count (also saved), so a resumed run rounds exactly as an
uninterrupted one. ``stream`` is not saved: it is which copy of the parameters this is - the
same on every rank when the ranks hold replicas (DDP: they must round identically or they
drift apart), the rank when each rank holds its own shard (FSDP2).
"""

from __future__ import annotations

import torch

from harpo_core.stochastic_rounding import CHUNK_ELEMENTS, adamw_step_, stream_seed

STATE_DTYPES = (torch.bfloat16, torch.float32)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view: in-place writes reach the DTensor), else the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class StochasticBF16AdamW(torch.optim.Optimizer):
    """AdamW on bfloat16 parameters with bfloat16 moments and stochastic rounding.

    The same hyper-parameters as ``torch.optim.AdamW`` (``lr``, ``betas``, ``eps``,
    ``weight_decay``; no amsgrad, no sparse gradients) plus ``seed`` (kept in the param
    groups as ``rounding_seed``), ``stream`` (0 for replicas, the rank for shards) and
    ``chunk_elements`` (the float32 working set per chunk).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, seed: int = 0,
                 stream: int = 0, chunk_elements: int = CHUNK_ELEMENTS):
        if not 0.0 <= lr:
            raise ValueError(f"lr={lr!r} is invalid: expected >= 0")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas={betas!r} is invalid: expected each in [0, 1)")
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements={chunk_elements!r} is invalid: expected >= 1")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        rounding_seed=int(seed))
        super().__init__(params, defaults)
        self.stream, self.chunk_elements = int(stream), int(chunk_elements)
        for group in self.param_groups:
            for param in group["params"]:
                if param.dtype not in STATE_DTYPES:
                    raise TypeError(f"StochasticBF16AdamW updates bfloat16 (or float32) "
                                    f"parameters, got one of {param.dtype}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = -1
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                index += 1  # every parameter counts, so the indices never shift
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("StochasticBF16AdamW does not support sparse gradients")
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param,
                                                           memory_format=torch.preserve_format)
                state["step"] += 1
                step = int(state["step"].item())
                adamw_step_(_local(param), _local(param.grad), _local(state["exp_avg"]),
                            _local(state["exp_avg_sq"]), step=step, lr=float(group["lr"]),
                            beta1=beta1, beta2=beta2, eps=group["eps"],
                            weight_decay=group["weight_decay"],
                            seed=stream_seed(group["rounding_seed"], self.stream, index, step),
                            chunk_elements=self.chunk_elements)
        return loss


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors an optimizer holds on this rank (a DTensor: its local shard)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                local = _local(value)
                total += local.numel() * local.element_size()
    return total
