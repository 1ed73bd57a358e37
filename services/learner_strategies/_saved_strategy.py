"""Which strategy's training state a checkpoint directory holds, and the refusal to mix them.

``ddp`` writes ``optimizer.safetensors`` + ``optimizer.json`` next to the HF model files;
``fsdp2`` writes ``sharded_state/`` (model and optimizer shards, ``state.json``). Both write
the full model in Hugging Face layout, so the *weights* of either start a new run of the other.
"""

from __future__ import annotations

import json
from pathlib import Path

SHARDED_DIR = "sharded_state"
STATE_JSON = "state.json"
DDP_OPTIMIZER = "optimizer.json"


def saved_strategy(directory: str | Path) -> str | None:
    """The strategy whose training state ``directory`` holds (``None``: none found)."""
    directory = Path(directory)
    state = directory / SHARDED_DIR / STATE_JSON
    if state.is_file():
        return json.loads(state.read_text())["strategy"]
    if (directory / DDP_OPTIMIZER).is_file():
        return "ddp"
    return None


def check_saved_strategy(directory: str | Path, strategy: str) -> None:
    """Refuse to resume training state written by another strategy, naming both."""
    found = saved_strategy(directory)
    if found is None:
        raise FileNotFoundError(f"{directory} holds no learner training state (neither "
                                f"{SHARDED_DIR}/{STATE_JSON} nor {DDP_OPTIMIZER})")
    if found != strategy:
        raise ValueError(
            f"checkpoint {directory} holds {found!r} learner state, but learner.strategy is "
            f"{strategy!r}: resume with learner.strategy: {found}, or start a new run from its "
            f"weights (model.path: {directory}) to train them with {strategy}")
