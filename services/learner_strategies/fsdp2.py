"""``fsdp2``: parameters, gradients and optimizer state sharded over the learner ranks.

``torch.distributed.fsdp.fully_shard`` is applied to every decoder layer (each submodule whose
class is in a ``PreTrainedModel``'s ``_no_split_modules``), then to the root, on a 1-D device
mesh over the ranks (``cuda`` mesh / NCCL on GPU, ``cpu`` mesh / gloo on CPU). Each rank keeps
``1/W`` of every parameter (a DTensor), its gradient and its AdamW moments; a layer's full
parameters exist only while it runs (all-gathered before its forward and again before its
backward). Untied input and output embeddings are groups of their own (gathered only around
their use); tied ones (Qwen2's small models: ``lm_head`` = ``embed_tokens``) stay in the root
group, which FSDP2 keeps gathered from the forward pass to the end of the backward pass.
Gradients are reduce-scattered, i.e. averaged over the ranks, on the last
micro-batch's backward pass; earlier micro-batches accumulate unsharded gradients locally
(``set_requires_gradient_sync(False)``). Batches with media (prompts with images, audio,
video) reduce-scatter after every micro-batch instead (``sync_every_pass_with_media``): a pass
runs only the towers its modality signature needs, and a tower's unit (the thinker's
``_no_split_modules`` are its vision and audio encoders) that an earlier pass ran but the last
did not would otherwise never be reduced (FSDP2 fails on it). Each unit that ran reduce-scatters
and adds into its gradient shards; one that did not has no gradient and sends nothing, the same
on every rank since pass ``k`` runs the same towers on all (:mod:`services.learner_media`).
With one rank it runs on a process group of one.

Precision (``learner.dtype: bfloat16``): fp32 master parameters and fp32 AdamW state, bf16
compute. ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`` casts each
layer's gathered parameters to bf16 for its forward/backward and reduces gradients in fp32 into
fp32 gradient shards; the optimizer then updates fp32 shards. Why not bf16 parameters: bf16
keeps 8 mantissa bits, so a parameter of magnitude ~1e-2 moves only in steps of ~6e-5, and an
AdamW update of ~lr = 1e-6 (the paper's rate) rounds to no change at all. The cost: bf16 does
not shrink the state held between steps (4 + 4 + 8 bytes per parameter, divided by W); it
shrinks the all-gathered layer copies, the activations and the communication of parameters.
``learner.master_weights: bfloat16_stochastic`` shards bf16 parameters instead (LearnerCore
casts them before ``wrap``): the gradient shards come back bf16 (reduced in fp32) and the
optimizer (:mod:`harpo_core.bf16_adamw`) rounds each rank's update stochastically into its own
bf16 shards, with bits of its own (``replicated = False``): 8 bytes per parameter, ``/W``.

Activation checkpointing (``learner.activation_checkpointing``) is applied to the decoder
layers before sharding: each layer's forward is recomputed in its backward pass.

Checkpoints: sharded model + optimizer state through ``torch.distributed.checkpoint`` (every
rank writes its shards, see :mod:`services.learner_strategies._sharded_checkpoint`), plus the
full model in Hugging Face layout (gathered collectively, written by rank 0) for serving.

On GPU (NCCL, ``cuda`` mesh) this code has not run: it is written for it and tested on CPU
over gloo only.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from services.learner_strategies import LearnerStrategy, register_strategy
from services.learner_strategies._model_parts import (
    checkpoint_activations,
    decoder_layers,
    hf_model,
    hf_state_dict,
    untied_embeddings,
)
from services.learner_strategies._sharded_checkpoint import load_sharded, save_sharded


def _one_rank_group(device: torch.device) -> None:
    """A default process group of one (an in-memory store), for a single-rank fsdp2 run."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


@register_strategy("fsdp2")
class FSDP2Strategy(LearnerStrategy):
    replicated = False  # each rank holds (and rounds) its own shards
    # a media tower (its own unit: the thinker's _no_split_modules) that a non-last pass ran
    # but the last did not: reduce-scatter every pass's gradients into the shards instead
    sync_every_pass_with_media = True

    def __init__(self, *, rank: int, world_size: int, device: torch.device,
                 dtype: str = "float32", activation_checkpointing: bool = False):
        super().__init__(rank=rank, world_size=world_size, device=device, dtype=dtype,
                         activation_checkpointing=activation_checkpointing)
        if not dist.is_initialized():
            if world_size > 1:
                raise ValueError(f"world_size={world_size!r} is invalid: fsdp2 with several "
                                 f"ranks needs an initialised torch.distributed process group")
            _one_rank_group(device)
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise ValueError(
                f"world_size={world_size!r} is invalid: the torch.distributed process group has "
                f"{dist.get_world_size()} ranks and this is rank {dist.get_rank()} (expected "
                f"rank {rank})")
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # the mesh, and the shards, go to the current device
        self.mesh = init_device_mesh(device.type, (world_size,))
        compute = torch.bfloat16 if dtype == "bfloat16" else None
        self.policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32,
                                           output_dtype=None)

    def _shard(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.activation_checkpointing:
            checkpoint_activations(model)
        for group in [*decoder_layers(model), *untied_embeddings(model)]:
            fully_shard(group, mesh=self.mesh, mp_policy=self.policy)
        fully_shard(model, mesh=self.mesh, mp_policy=self.policy)
        return model

    def wrap(self, model):
        return self._shard(model)

    def wrap_reference(self, model):
        return self._shard(model.requires_grad_(False))

    @contextmanager
    def no_sync(self, train_model):
        train_model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            train_model.set_requires_gradient_sync(True)

    def full_state_dict(self, model, dtype=None, copy=True):
        # gathered to CPU either way (copy=False has nothing to save). On a GPU the collective
        # sync then copies host to device; gathering tensor by tensor on the device straight
        # into its buckets would save that copy (not built)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)  # collective, rank 0 keeps it
        if self.rank != 0:
            return None
        state = hf_state_dict(model, state)
        if dtype is not None:
            state = {name: value.to(dtype) for name, value in state.items()}
        return state

    def save(self, model, optimizer, scheduler, directory):
        weights = self.full_state_dict(model)
        if self.rank == 0:
            _, hf = hf_model(model)
            hf.save_pretrained(str(directory), state_dict=weights)
        save_sharded(self.name, model, optimizer, scheduler, directory)

    def load(self, model, optimizer, scheduler, directory):
        load_sharded(self.name, model, optimizer, scheduler, Path(directory))

    def clip_grad_norm(self, model, max_norm):
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

