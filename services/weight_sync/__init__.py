"""Weight sync: how a new policy version travels from the learners to the rollout workers.

One transport, three sides, one call each::

    driver:         handle = weight_sync.publish(learner_group, receivers)  # after an update
                    pool.sync(version, handle)                      # every rollout worker loads
    learner rank:   WeightSync.send(core, *args)                    # run by publish on all ranks
    rollout worker: state_dict = WeightSync.receive(handle)         # in RolloutWorker.set_weights

``publish`` starts the learners' side (``LearnerGroup.send_weights`` runs :meth:`send` on every
rank as an actor task and returns at once) and returns a small picklable :class:`WeightHandle`;
the workers' :meth:`receive` may run while the learners still send, so a collective transport
(a torch.distributed group of learners and workers) broadcasts from the learners' tasks while
the workers receive. The pool keeps the last handle and gives it to every worker it starts
later through :meth:`WeightSync.reissue`: a handle that can be received again (an object ref)
reissues itself; a collective one, whose broadcast is over once received, makes a new group for
the newcomers. When a worker dies during a sync the pool calls :meth:`WeightSync.abort` on the
handle (members still waiting for it stop) and re-issues to the survivors that did not load.

A transport named ``X`` lives in ``services/weight_sync/X.py`` and registers its class with
``@register_weight_sync("X")``; :func:`available_weight_syncs` lists the files without
importing them (the run configuration validates ``rollout.weight_sync`` against it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from services.plugins import Plugins

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch

    from services.config import TrainConfig
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
    """A weight transport. Every learner rank and every rollout worker build their own with
    :func:`make_weight_sync` for each call; the driver keeps one per run (configured with
    :meth:`configure`), which may hold state between calls (e.g. a rendezvous store)."""

    name: str = ""

    def configure(self, config: TrainConfig) -> WeightSync:
        """Driver: take this transport's settings from the run configuration."""
        return self

    def publish(self, learners: LearnerGroup, receivers: int = 1) -> WeightHandle:
        """Driver: start publishing the learners' current weights to ``receivers`` rollout
        workers; return at once."""
        raise NotImplementedError

    def reissue(self, handle: WeightHandle, receivers: int) -> WeightHandle:
        """Driver: a handle that gives ``receivers`` more workers the weights of ``handle``
        (workers that join or restart after it was received)."""
        return handle

    def abort(self, handle: WeightHandle) -> None:
        """Driver: a receiver of ``handle`` died; let the others stop waiting for it."""

    def collect(self) -> list[dict]:
        """Driver: wait for the learner side of what was published so far; returns what
        each send reported (transport-specific figures, e.g. seconds per phase)."""
        return []

    def send(self, core: LearnerCore, *args) -> Any:
        """Learner rank (inside its actor, on every rank): this rank's part of publishing."""
        raise NotImplementedError

    def receive(self, handle: WeightHandle) -> dict[str, torch.Tensor]:
        """Rollout worker: the full state dict the handle stands for."""
        raise NotImplementedError

    def receive_stream(self, handle: WeightHandle
                       ) -> tuple[list[str], Iterator[tuple[str, torch.Tensor]]] | None:
        """Rollout worker: the tensor names, then ``(name, tensor)`` pairs as they arrive, for
        a backend that loads a stream; None: this transport hands over whole state dicts."""
        return None

    def _check(self, handle: WeightHandle) -> None:
        if handle.transport != self.name:
            raise ValueError(f"a {handle.transport!r} weight handle reached a {self.name!r} "
                             f"weight sync; rollout.weight_sync must be the same everywhere")
