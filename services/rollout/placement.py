"""Where a rollout worker runs when its vLLM engine spans several GPUs (tensor parallelism).

One engine with ``rollout.vllm.tensor_parallel_size = TP > 1`` runs one vLLM worker process
per GPU; vLLM's Ray executor places them in the placement group of the actor that creates
the engine. So such a rollout worker gets its own placement group of TP bundles, one GPU
each, on one node (``STRICT_PACK``: tensor parallelism across nodes is too slow to want); the
actor itself sits in bundle 0 with its CPUs and custom resources and no GPU of its own (the
engine's rank-0 process takes bundle 0's GPU), and captures its child tasks so that vLLM's
workers land in the group. Written for GPU clusters and not yet run on one; the CPU tests
check the request built here.
"""

from __future__ import annotations

from services.config import RolloutSection

STRATEGY = "STRICT_PACK"


def engine_bundles(rollout: RolloutSection) -> list[dict[str, float]] | None:
    """The placement group bundles of one tensor-parallel rollout worker; None when the
    worker holds its GPUs (or none) itself."""
    tp = rollout.vllm.tensor_parallel_size
    if rollout.backend != "vllm" or tp == 1 or rollout.gpus_per_worker == 0:
        return None
    first = {"CPU": rollout.cpus_per_worker, "GPU": 1.0, **rollout.resources}
    return [first] + [{"GPU": 1.0} for _ in range(tp - 1)]


def engine_actor_options(rollout: RolloutSection, placement_group) -> dict:
    """``RolloutWorker.options(...)`` for a worker in its engine's placement group."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {
        "num_cpus": rollout.cpus_per_worker,
        "num_gpus": 0,
        "resources": dict(rollout.resources) or None,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=placement_group, placement_group_bundle_index=0,
            placement_group_capture_child_tasks=True),
    }
