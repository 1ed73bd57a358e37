"""``ddp``: every rank holds the whole model; gradients are all-reduced by DDP.

With one rank the model is trained as it is (no wrapper, no process group). Checkpoints: rank
0 writes (every rank holds the same state), every rank reads.

Precision (``learner.dtype: bfloat16``): fp32 parameters, gradients and AdamW state, bf16
compute through ``torch.autocast`` around the training forward pass (the same scheme as
``fsdp2``'s, see there for why the parameters stay fp32). With ``learner.master_weights:
bfloat16_stochastic`` the parameters are bf16 (cast before ``wrap``), so DDP all-reduces bf16
gradients, and every rank rounds the update with the same bits (``replicated``): the replicas
stay identical. Activation checkpointing recomputes each decoder layer in the backward pass.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from services.learner_strategies import LearnerStrategy, register_strategy
from services.learner_strategies._model_parts import checkpoint_activations, hf_model, hf_state_dict
from services.learner_strategies._saved_strategy import check_saved_strategy


class BF16Autocast(torch.nn.Module):
    """``module``'s forward pass under ``torch.autocast(bfloat16)`` (parameters stay fp32)."""

    def __init__(self, module: torch.nn.Module, device_type: str):
        super().__init__()
        self.module, self.device_type = module, device_type

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.module(*args, **kwargs)


# Buffers (rotary tables) are the same on every rank and never change: no sync in forward.
# torch 2.13 renamed the knob (the old one warns on every start); older torch has only that.
_DDP_ARGS = inspect.signature(DistributedDataParallel).parameters
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_ARGS
                   else {"broadcast_buffers": False})


def _multimodal(model) -> bool:
    from services.model_loading import MULTIMODAL

    _, hf = hf_model(model)
    return type(hf).__name__ in {name for name, _ in MULTIMODAL.values()}


@register_strategy("ddp")
class DDPStrategy(LearnerStrategy):
    def __init__(self, *, rank: int, world_size: int, device: torch.device,
                 dtype: str = "float32", activation_checkpointing: bool = False):
        super().__init__(rank=rank, world_size=world_size, device=device, dtype=dtype,
                         activation_checkpointing=activation_checkpointing)
        if world_size > 1:
            ready = dist.is_available() and dist.is_initialized()
            if not (ready and dist.get_world_size() == world_size and dist.get_rank() == rank):
                raise ValueError(
                    f"world_size={world_size!r} is invalid: expected an initialised "
                    f"torch.distributed process group of that size, with this rank ({rank})")

    def _precision(self, module):
        return BF16Autocast(module, self.device.type) if self.dtype == "bfloat16" else module

    def wrap(self, model):
        model.to(self.device)
        if self.activation_checkpointing:
            checkpoint_activations(model)
        if self.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # a multimodal model's passes leave parameters unused: a tower the pass's media do
            # not need, and the Omni thinker's audio_bos_eos_token in every pass
            towers = _multimodal(model)
            model = DistributedDataParallel(model, device_ids=device_ids,
                                            find_unused_parameters=towers, **_NO_BUFFER_SYNC)
        return self._precision(model)

    def wrap_reference(self, model):
        return self._precision(model.requires_grad_(False).to(self.device))

    def no_sync(self, train_model):
        if isinstance(train_model, BF16Autocast):
            train_model = train_model.module
        return train_model.no_sync() if self.world_size > 1 else nullcontext()

    def full_state_dict(self, model, dtype=None, copy=True):
        if self.rank != 0:
            return None
        state = hf_state_dict(model, model.state_dict())
        if not copy and dtype is None:  # the parameters themselves (tied ones stay tied)
            return {k: v.detach() for k, v in state.items()}
        return {k: v.detach().to("cpu", dtype=dtype, copy=True) for k, v in state.items()}

    def save(self, model, optimizer, scheduler, directory):
        from services.learner_optim import save_optimizer_state

        if self.rank == 0:
            hf_model(model)[1].save_pretrained(str(directory))
            save_optimizer_state(optimizer, scheduler, directory)

    def load(self, model, optimizer, scheduler, directory):
        from services.learner_optim import load_optimizer_state

        check_saved_strategy(directory, self.name)
        _, hf = hf_model(model)
        from services.model_loading import load_model

        saved = load_model(Path(directory), dtype=torch.float32)  # the multimodal class too
        with torch.no_grad():  # in place: the optimizer and DDP keep their parameters
            hf.load_state_dict(saved.state_dict())
        load_optimizer_state(optimizer, scheduler, directory)
