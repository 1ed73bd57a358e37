"""The learner's side of the rollout/learner log-prob check: which dtypes are in use, and the
per-token gaps of a mini-batch gathered over the ranks (:mod:`harpo_core.mismatch` has the
statistics and the rule)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F

from harpo_core.mismatch import MismatchRule, mismatch_rule, mismatch_stats

if TYPE_CHECKING:
    from services.config import TrainConfig


def checkpoint_dtype(model_dir: str | Path) -> str:
    """The dtype a Hugging Face checkpoint is stored in (``config.json``), float32 if unstated."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def rollout_dtype(config: TrainConfig, model_dir: str | Path) -> str:
    """The dtype the rollout backend computes in: ``hf`` loads float32; another backend
    takes its section's ``dtype`` (``rollout.vllm.dtype``), ``auto`` (or none) meaning the
    checkpoint's own."""
    backend = config.rollout.backend
    if backend == "hf":
        return "float32"
    dtype = getattr(getattr(config.rollout, backend, None), "dtype", None) or "auto"
    return checkpoint_dtype(model_dir) if dtype == "auto" else dtype


def learner_mismatch_rule(config: TrainConfig, model_dir: str | Path) -> MismatchRule:
    """The stop rule of this run: by (rollout, learner) dtype, unless
    ``learner.logprob_mismatch_tolerance`` sets the threshold."""
    return mismatch_rule(rollout_dtype(config, model_dir), config.learner.dtype,
                         config.learner.logprob_mismatch_tolerance)


def all_gather_1d(values: torch.Tensor, world_size: int,
                  device: torch.device) -> list[torch.Tensor]:
    """Every rank's 1-D ``values`` (lengths may differ), in rank order, on CPU."""
    if world_size == 1:
        return [values]
    values = values.to(device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([len(values)], device=device))
    longest = max(int(size) for size in sizes)
    padded = [torch.zeros(longest, dtype=values.dtype, device=device)
              for _ in range(world_size)]
    dist.all_gather(padded, F.pad(values, (0, longest - len(values))))
    return [part[:int(size)].cpu() for part, size in zip(padded, sizes)]


class MismatchGaps:
    """Per-token ``learner - rollout`` log-prob gaps of one mini-batch, this rank's until
    :meth:`gather` brings every rank's together."""

    def __init__(self, parts: list[torch.Tensor] | None = None):
        self.parts = list(parts or [])

    def add(self, gaps: torch.Tensor) -> None:
        self.parts.append(gaps.detach().float().abs().cpu())

    def values(self) -> torch.Tensor:
        return torch.cat(self.parts) if self.parts else torch.zeros(0)

    def gather(self, world_size: int, device: torch.device) -> MismatchGaps:
        """Every rank's gaps (a collective: every rank calls it)."""
        return MismatchGaps(all_gather_1d(self.values(), world_size, device))

    @property
    def stats(self) -> dict[str, float]:
        """``max``, ``mean``, ``p99`` of the gaps held."""
        return mismatch_stats(self.values().numpy())
