"""Learner strategies: how the ranks of a learner group share the training of one model.

A strategy owns everything distributed in :class:`services.learner_core.LearnerCore`: the
module that forward/backward passes go through (DDP, sharding, ...), the context that skips
gradient synchronisation between micro-batches, the full CPU state dict that is published to
the rollout workers, and checkpoint save/load of model + optimizer. The loss, the mini-batch
scaling and the optimizer step stay in ``LearnerCore``.

A strategy named ``X`` lives in ``services/learner_strategies/X.py`` and registers its class
with ``@register_strategy("X")``: adding one is adding that file. :func:`available_strategies`
lists the files without importing them (the run configuration validates ``learner.strategy``
against it without loading torch); :func:`make_strategy` imports the one asked for.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.plugins import Plugins

if TYPE_CHECKING:
    import torch

STRATEGIES = Plugins("learner strategy", __name__, decorator="register_strategy")
register_strategy = STRATEGIES.register
available_strategies = STRATEGIES.available


def make_strategy(name: str, *, rank: int, world_size: int, device: torch.device,
                  dtype: str = "float32", activation_checkpointing: bool = False
                  ) -> LearnerStrategy:
    return STRATEGIES.get(name)(rank=rank, world_size=world_size, device=device, dtype=dtype,
                                activation_checkpointing=activation_checkpointing)


class LearnerStrategy:
    """One rank's side of a distributed training strategy.

    Every method is called on every rank, in the same order (a strategy may run collectives
    in any of them). ``LearnerCore`` scales each rank's loss so that the *average* of the
    ranks' gradients is the gradient of the global mini-batch loss: a strategy must average
    gradients over the ranks (as DDP's all-reduce and FSDP's reduce-scatter do) before the
    optimizer step, once per mini-batch, on the backward pass of the last micro-batch.

    ``model`` is the Hugging Face causal LM, or a thin ``nn.Module`` whose ``.model`` is one;
    state dicts a strategy returns or writes carry the HF model's own parameter names.
    ``dtype`` (``learner.dtype``) is the compute precision of forward/backward passes;
    ``activation_checkpointing`` recomputes each decoder layer in the backward pass.
    """

    name: str = ""
    # True when every rank holds the same full parameters (ddp): then any randomness in the
    # optimizer step (stochastic rounding) must be the same on every rank, or the replicas
    # drift apart. A strategy whose ranks hold shards sets False (each rank draws its own).
    replicated: bool = True

    def __init__(self, *, rank: int, world_size: int, device: torch.device,
                 dtype: str = "float32", activation_checkpointing: bool = False):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.dtype, self.activation_checkpointing = dtype, activation_checkpointing

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module that training forward/backward passes go through. Called once on the
        model as loaded (fp32, on CPU), before the optimizer is built on
        ``model.parameters()``; moves it to the device and may change it in place."""
        raise NotImplementedError

    def wrap_reference(self, model: torch.nn.Module) -> torch.nn.Module:
        """The frozen reference model (KL), placed like the policy, in the same compute
        precision, without gradients or optimizer; its forward passes run under no_grad."""
        raise NotImplementedError

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        """Clip the (already averaged) gradients of ``model`` to ``max_norm`` in place; returns
        the global pre-clip norm as a plain tensor, the same on every rank."""
        from torch.nn.utils import clip_grad_norm_

        return clip_grad_norm_(model.parameters(), max_norm)

    def no_sync(self, train_model: torch.nn.Module) -> AbstractContextManager:
        """Context for the backward passes of all but the last micro-batch of a mini-batch:
        gradients accumulate locally, without communication."""
        raise NotImplementedError

    #: with media prompts, reduce gradients after every micro-batch instead of only the last
    #: (no :meth:`no_sync`): a strategy that reduces per module (fsdp2) would otherwise reduce
    #: only what the last pass ran, and passes with media leave towers out
    sync_every_pass_with_media = False

    def full_state_dict(self, model: torch.nn.Module, dtype: torch.dtype | None = None,
                        copy: bool = True) -> dict[str, torch.Tensor] | None:
        """The whole policy as a CPU state dict (HF names) on rank 0, cast to ``dtype`` when
        given (the rollout dtype); every rank must call it (a sharded strategy gathers
        collectively), the others get None. ``copy=False`` (no ``dtype``): the model's own
        tensors where a rank holds them whole, on their device, valid until the next update
        (a strategy that must gather returns its gathered copy)."""
        raise NotImplementedError

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
             directory: str | Path) -> None:
        """Write the policy (``save_pretrained`` layout: config.json + model.safetensors, what
        rollout workers and evaluation load) and this strategy's training state (optimizer,
        scheduler; for a sharded strategy also the model's shards)."""
        raise NotImplementedError

    def load(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
             directory: str | Path) -> None:
        """Restore what :meth:`save` wrote, in place (the optimizer keeps its parameters); a
        checkpoint of another strategy is refused with a message naming both."""
        raise NotImplementedError
