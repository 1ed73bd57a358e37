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

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from services.plugins import Plugins

if TYPE_CHECKING:
    import torch

    from services.learner import LearnerGroup
    from services.learner_core import LearnerCore

WEIGHT_SYNCS = Plugins("weight sync", __name__, decorator="register_weight_sync")


@dataclass(frozen=True)
class WeightHandle:
    """What the driver hands the rollout workers for one policy version."""

    transport: str  # the registered name of the WeightSync that made it
    payload: Any  # transport-specific: an object ref, a group address, ...


register_weight_sync = WEIGHT_SYNCS.register
available_weight_syncs = WEIGHT_SYNCS.available


def make_weight_sync(name: str) -> WeightSync:
    return WEIGHT_SYNCS.get(name)()


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
