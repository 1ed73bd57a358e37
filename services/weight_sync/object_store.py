"""``object_store``: rank 0's CPU state dict goes through Ray's object store.

Every learner rank runs :meth:`send` (a sharded strategy gathers there); rank 0's return value,
the full state dict, becomes an object that every rollout worker fetches, as often as asked
(so a handle re-issues itself).
"""

from __future__ import annotations

import ray

from services.weight_sync import WeightHandle, WeightSync, register_weight_sync


@register_weight_sync("object_store")
class ObjectStoreSync(WeightSync):
    def publish(self, learners, receivers=1):
        return self.handle(learners.send_weights(self.name)[0])

    def send(self, core):
        return core.full_state_dict()

    def receive(self, handle):
        self._check(handle)
        return ray.get(handle.payload)

    @classmethod
    def handle(cls, ref: ray.ObjectRef) -> WeightHandle:
        """A handle for a state dict already in the object store (e.g. ``ray.put(weights)``)."""
        return WeightHandle(cls.name, ref)
