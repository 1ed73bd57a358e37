"""Weight sync: how a new policy version travels from the learners to the rollout workers.

One transport, three sides, one call each::

    driver:         handle = weight_sync.publish(learner_group)    # after an update
                    pool.sync(version, handle)                      # every rollout worker loads
    learner rank:   WeightSync.send(core, *args)                    # run by publish on all ranks
    rollout worker: state_dict = WeightSync.receive(handle)         # in RolloutWorker.set_weights

``publish`` starts the learners' side (``LearnerGroup.send_weights`` runs :meth:`send` on every
rank as an actor task and returns at once) and returns a small picklable :class:`WeightHandle`;
the workers' :meth:`receive` may run while the learners still send, so a collective transport
(a torch.distributed group of learners and workers) broadcasts from the learners' tasks while
the workers receive. The pool keeps the last handle and gives it to every worker it starts
later, so a handle must stay receivable until the next one replaces it.

A transport named ``X`` lives in ``services/weight_sync/X.py`` and registers its class with
``@register_weight_sync("X")``; :func:`available_weight_syncs` lists the files without
importing them (the run configuration validates ``rollout.weight_sync`` against it).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from services.learner import LearnerGroup
    from services.learner_core import LearnerCore

_REGISTRY: dict[str, type[WeightSync]] = {}


@dataclass(frozen=True)
class WeightHandle:
    """What the driver hands the rollout workers for one policy version."""

    transport: str  # the registered name of the WeightSync that made it
    payload: Any  # transport-specific: an object ref, a group address, ...


def register_weight_sync(name: str):
    """Class decorator: register a :class:`WeightSync` under ``name`` (its file's name)."""

    def decorator(cls):
        if name in _REGISTRY:
            raise ValueError(f"weight sync {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def available_weight_syncs() -> list[str]:
    """Names of the transports in this package (one module each; nothing is imported)."""
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
                  if not m.name.startswith("_"))


def make_weight_sync(name: str) -> WeightSync:
    if name not in available_weight_syncs():
        raise ValueError(f"unknown weight sync {name!r}; available: {available_weight_syncs()}")
    importlib.import_module(f"{__name__}.{name}")
    if name not in _REGISTRY:
        raise ValueError(f"{__name__}.{name} registers no weight sync named {name!r}")
    return _REGISTRY[name]()


class WeightSync:
    """A weight transport. Instances are cheap and stateless between calls: the driver, every
    learner rank and every rollout worker each build their own with :func:`make_weight_sync`."""

    name: str = ""

    def publish(self, learners: LearnerGroup) -> WeightHandle:
        """Driver: start publishing the learners' current weights; return at once."""
        raise NotImplementedError

    def send(self, core: LearnerCore, *args) -> Any:
        """Learner rank (inside its actor, on every rank): this rank's part of publishing."""
        raise NotImplementedError

    def receive(self, handle: WeightHandle) -> dict[str, torch.Tensor]:
        """Rollout worker: the full state dict the handle stands for."""
        raise NotImplementedError

    def _check(self, handle: WeightHandle) -> None:
        if handle.transport != self.name:
            raise ValueError(f"a {handle.transport!r} weight handle reached a {self.name!r} "
                             f"weight sync; rollout.weight_sync must be the same everywhere")
