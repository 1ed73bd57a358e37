"""Sharded training state on disk: model + optimizer through ``torch.distributed.checkpoint``.

Every rank writes its own shards — with Hugging Face's safetensors storage layer, so the files
are safetensors with their shard offsets in the header (no pickle; nothing is unpickled on
load) — and reads back exactly the pieces it holds, whatever the world size was at save time.
What is not a tensor (the optimizer's param groups, the LR scheduler's counters) goes to a JSON
file written by rank 0::

    DIRECTORY/sharded_state/
      shard-0000R-model-00001-of-00001.safetensors   rank R-1's shards: "model.<name>" and
                                                     "optim.<name>.<exp_avg|exp_avg_sq|step>"
      state.json                                     strategy, world size, param groups,
                                                     scheduler

The full model in Hugging Face layout sits next to it (``DIRECTORY/config.json``,
``model.safetensors``): rollout workers, evaluation and export read that one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.hf_storage import (
    HuggingFaceStorageReader,
    HuggingFaceStorageWriter,
)
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from services.learner_strategies._saved_strategy import (
    SHARDED_DIR,
    STATE_JSON,
    check_saved_strategy,
)


def _aliases(model: torch.nn.Module) -> dict[str, str]:
    """Second names of shared parameters (tied ``lm_head.weight``) -> the first name. The same
    on every rank, so every rank drops the same names (safetensors refuses shared memory)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def _flatten(model_state: dict, optim_state: dict, aliases: dict) -> tuple[dict, dict]:
    """``(tensors, rest)``: the tensors of both state dicts under flat names (each shared
    parameter once), and the rest."""
    tensors = {f"model.{name}": value for name, value in model_state.items()
               if name not in aliases}
    rest: dict = {"param_groups": optim_state["param_groups"], "non_tensor_state": {}}
    for name, entries in optim_state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{name}.{key}"] = value
            else:
                rest["non_tensor_state"][f"{name}\0{key}"] = value
    return tensors, rest


def save_sharded(strategy: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler, directory: str | Path) -> None:
    """Write model + optimizer shards (every rank) and the JSON rest (rank 0)."""
    path = Path(directory) / SHARDED_DIR
    model_state, optim_state = get_state_dict(model, optimizer)
    tensors, rest = _flatten(model_state, optim_state, _aliases(model))
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(path), save_distributed=True))
    if dist.get_rank() == 0:
        scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        rest.update(strategy=strategy, world_size=dist.get_world_size(),
                    scheduler=scheduler_state)
        (path / STATE_JSON).write_text(json.dumps(rest, indent=1))
    dist.barrier()


def load_sharded(strategy: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler, directory: str | Path) -> None:
    """Restore what :func:`save_sharded` wrote, in place, on every rank."""
    check_saved_strategy(directory, strategy)
    path = Path(directory) / SHARDED_DIR
    rest = json.loads((path / STATE_JSON).read_text())
    model_state, optim_state = get_state_dict(model, optimizer)  # shapes + placements to fill
    aliases = _aliases(model)
    tensors, _ = _flatten(model_state, optim_state, aliases)
    dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path)))
    for name in model_state:
        model_state[name] = tensors[f"model.{aliases.get(name, name)}"]
    for name, entries in optim_state["state"].items():
        for key in entries:
            entries[key] = tensors.get(f"optim.{name}.{key}",
                                       rest["non_tensor_state"].get(f"{name}\0{key}"))
    for group in rest["param_groups"]:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optim_state["param_groups"] = rest["param_groups"]
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    no_lambdas = [None] * len(scheduler.lr_lambdas)  # our schedule is a stateless function
    scheduler.load_state_dict({**rest["scheduler"], "lr_lambdas": no_lambdas})
