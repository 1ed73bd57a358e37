"""The learner's optimizer: AdamW, its learning-rate schedule, and their checkpoint files.

The schedule advances once per RL step (``LearnerCore.update``), so ``learner.warmup_steps``
and ``run.steps`` (where a decaying schedule reaches 0) count RL steps. Checkpoints hold only
safetensors and JSON: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch.optim.lr_scheduler import LambdaLR

from harpo_core.bf16_adamw import StochasticBF16AdamW

if TYPE_CHECKING:
    from services.config import TrainConfig

OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"


def make_optimizer(model: torch.nn.Module, config: TrainConfig, *, stream: int = 0
                   ) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """AdamW over ``model``'s parameters and its LR schedule, from ``config.learner``.

    ``learner.master_weights: bfloat16_stochastic``: the parameters are bf16 (see
    :func:`cast_master_weights`) and the optimizer is
    :class:`harpo_core.bf16_adamw.StochasticBF16AdamW`, its rounding bits seeded from
    ``run.seed`` and ``stream`` (0 where the ranks hold replicas, the rank where they hold
    shards)."""
    learner = config.learner
    hyper = dict(lr=learner.lr, betas=tuple(learner.betas), weight_decay=learner.weight_decay)
    if learner.master_weights == "bfloat16_stochastic":
        optimizer = StochasticBF16AdamW(model.parameters(), seed=config.run.seed, stream=stream,
                                        **hyper)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), **hyper)
    schedule = partial(lr_factor, schedule=learner.lr_schedule,
                       warmup_steps=learner.warmup_steps, total_steps=config.run.steps)
    return optimizer, LambdaLR(optimizer, schedule)


def cast_master_weights(model: torch.nn.Module, config: TrainConfig) -> None:
    """With ``learner.master_weights: bfloat16_stochastic``, store ``model``'s parameters in
    bf16 (in place, before a strategy wraps it); buffers (rotary tables) stay as they are."""
    if config.learner.master_weights == "bfloat16_stochastic":
        for param in model.parameters():  # a tied parameter once
            param.data = param.data.to(torch.bfloat16)


def lr_factor(step: int, *, schedule: str, warmup_steps: int, total_steps: int | None) -> float:
    """Multiplier of the base LR for optimizer step ``step`` (0-based).

    Linear warm-up from ``1/warmup_steps`` to 1 over ``warmup_steps`` steps, then constant, or
    cosine / linear decay reaching 0 at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def save_optimizer_state(optimizer, scheduler, directory: str | Path) -> None:
    """Write AdamW + LambdaLR state as ``optimizer.safetensors`` and ``optimizer.json``.

    Per-parameter tensors (``exp_avg``, ``exp_avg_sq``, ``step``) go to safetensors under
    ``"<param index>.<name>"``; hyper-parameters and the scheduler counters go to JSON.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = optimizer.state_dict()
    tensors, other = {}, {}
    for index, param_state in state["state"].items():
        for name, value in param_state.items():
            key = f"{index}.{name}"
            if torch.is_tensor(value):
                tensors[key] = value.detach().cpu().contiguous()
            else:
                other[key] = value
    scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    meta = {
        "param_groups": state["param_groups"],
        "non_tensor_state": other,
        "scheduler": scheduler_state,
    }
    save_file(tensors, str(directory / OPTIMIZER_TENSORS))
    (directory / OPTIMIZER_META).write_text(json.dumps(meta, indent=2))


def load_optimizer_state(optimizer, scheduler, directory: str | Path) -> None:
    """Restore what :func:`save_optimizer_state` wrote into an identically built optimizer."""
    directory = Path(directory)
    meta = json.loads((directory / OPTIMIZER_META).read_text())
    entries = {**load_file(str(directory / OPTIMIZER_TENSORS)), **meta["non_tensor_state"]}
    state: dict[int, dict] = {}
    for key, value in entries.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    param_groups = meta["param_groups"]
    for group in param_groups:
        group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    no_lambdas = [None] * len(scheduler.lr_lambdas)  # our schedule is a stateless function
    scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": no_lambdas})
