"""``ddp``: every rank holds the whole model; gradients are all-reduced by DDP.

With one rank the model is trained as it is (no wrapper, no process group). Checkpoints: rank
0 writes (every rank holds the same state), every rank reads.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM

from services.learner_strategies import LearnerStrategy, register_strategy


@register_strategy("ddp")
class DDPStrategy(LearnerStrategy):
    def __init__(self, *, rank: int, world_size: int, device: torch.device):
        super().__init__(rank=rank, world_size=world_size, device=device)
        if world_size > 1:
            ready = dist.is_available() and dist.is_initialized()
            if not (ready and dist.get_world_size() == world_size and dist.get_rank() == rank):
                raise ValueError(
                    f"world_size={world_size!r} is invalid: expected an initialised "
                    f"torch.distributed process group of that size, with this rank ({rank})")

    def wrap(self, model):
        if self.world_size == 1:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)

    def no_sync(self, train_model):
        return train_model.no_sync() if self.world_size > 1 else nullcontext()

    def full_state_dict(self, model):
        if self.rank != 0:
            return None
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def save(self, model, optimizer, scheduler, directory):
        from services.learner_optim import save_optimizer_state

        if self.rank == 0:
            model.save_pretrained(str(directory))
            save_optimizer_state(optimizer, scheduler, directory)

    def load(self, model, optimizer, scheduler, directory):
        from services.learner_optim import load_optimizer_state

        saved = AutoModelForCausalLM.from_pretrained(str(Path(directory)), dtype=torch.float32)
        with torch.no_grad():  # in place: the optimizer and DDP keep their parameters
            model.load_state_dict(saved.state_dict())
        load_optimizer_state(optimizer, scheduler, directory)
