"""Learner actors and the group that runs them as one torch.distributed job.

``LearnerGroup`` gang-schedules L ``Learner`` actors in a placement group, wires them into a
process group (gloo on CPU, NCCL on GPU) and hands every rank its strided share of each batch.
Rank 0 publishes the new weights as a versioned object in the object store.
"""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from harpo_core.schema import concat, to_learner_tensors
from services.learner_core import LearnerCore, shard_batch


class LearnerFailure(RuntimeError):
    """A learner process died; the job restarts from its last checkpoint."""


class PolicyVersionError(RuntimeError):
    """Rollouts were produced by a policy version the learner did not expect."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@ray.remote
class Learner:
    def __init__(self, rank: int, world_size: int, torch_threads: int = 1,
                 max_staleness: int = 0):
        torch.set_num_threads(torch_threads)
        self.rank, self.world_size = rank, world_size
        self.max_staleness = max_staleness  # policy versions a batch may lag the learner
        self.core: LearnerCore | None = None
        self.version = 0

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), _free_port()

    def setup(self, master: tuple[str, int], model_dir: str, core_kwargs: dict,
              version: int = 0) -> int:
        if self.world_size > 1:
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = master[0], str(master[1])
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend, rank=self.rank,
                                                 world_size=self.world_size)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.core = LearnerCore(model_dir, rank=self.rank, world_size=self.world_size,
                                device=device, **core_kwargs)
        self.version = version
        return os.getpid()

    def update(self, step: int, batch_refs: list, advantages: np.ndarray,
               pad_id: int) -> dict:
        """One policy update on this rank's share of the step's scored rollout batches."""
        t0 = time.perf_counter()
        table: pa.Table = concat(ray.get(batch_refs))
        versions = np.unique(table.column("policy_version").to_numpy())
        staleness = self.version - int(versions[0])
        if versions.size != 1 or not 0 <= staleness <= self.max_staleness:
            allowed = (f"{self.version}, on-policy" if self.max_staleness == 0 else
                       f"{self.version - self.max_staleness}..{self.version}, "
                       f"rollout.max_staleness = {self.max_staleness}")
            raise PolicyVersionError(
                f"step {step}: rollouts carry policy versions {versions.tolist()} but the "
                f"learner is at version {self.version} (allowed: {allowed})"
            )
        if len(advantages) != table.num_rows:
            raise ValueError(f"{len(advantages)} advantages for {table.num_rows} rollouts")
        tensors = to_learner_tensors(table, pad_id)
        tensors["advantages"] = torch.tensor(advantages, dtype=torch.float32)
        local = shard_batch(tensors, self.rank, self.world_size)
        fetch = time.perf_counter() - t0
        metrics = self.core.update(local, global_batch_size=table.num_rows,
                                   check_mismatch=staleness == 0)
        self.version += 1
        metrics["staleness"] = staleness
        metrics["fetch_s"] = fetch
        metrics["update_s"] = time.perf_counter() - t0 - fetch
        return metrics

    def weights(self) -> dict[str, torch.Tensor]:
        """CPU state dict of the policy (returned into the object store)."""
        return self.core.state_dict_cpu()

    def save(self, directory: str) -> None:
        if self.rank == 0:
            self.core.save(directory)

    def load(self, directory: str, version: int) -> None:
        self.core.load(directory)
        self.version = version

    def shutdown(self) -> None:
        self.core = None  # free the DDP wrapper while its process group still exists
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class LearnerGroup:
    """L learners, gang-scheduled, acting as one."""

    def __init__(self, world_size: int, model_dir: str, core_kwargs: dict, *,
                 cpus: float = 1.0, gpus: float = 0.0, resources: dict | None = None,
                 torch_threads: int = 1, version: int = 0, max_staleness: int = 0):
        resources = dict(resources or {})
        bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **resources}
        self.pg = placement_group([bundle] * world_size, strategy="PACK")
        ray.get(self.pg.ready())
        self.learners = [
            Learner.options(
                num_cpus=cpus, num_gpus=gpus, resources=resources or None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=rank),
            ).remote(rank, world_size, torch_threads, max_staleness)
            for rank in range(world_size)
        ]
        master = ray.get(self.learners[0].address.remote())
        ray.get([learner.setup.remote(master, model_dir, core_kwargs, version)
                 for learner in self.learners])

    def update(self, step: int, batch_refs: list, advantages: np.ndarray, pad_id: int) -> dict:
        """One update on every rank; metrics are all-reduced, so rank 0's stand for all.

        Results are collected as they come: when one rank dies, the others may be stuck in a
        collective waiting for it, so the first death raises :class:`LearnerFailure` at once
        rather than after the collective's time-out.
        """
        refs = [learner.update.remote(step, batch_refs, advantages, pad_id)
                for learner in self.learners]
        waiting = list(refs)
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            try:
                ray.get(ready[0])
            except ray.exceptions.RayActorError as exc:
                raise LearnerFailure(f"learner rank {refs.index(ready[0])} died: {exc}") from exc
            except ray.exceptions.RayTaskError as exc:
                if self._any_dead():  # a survivor's collective broke because a rank died
                    raise LearnerFailure(f"a learner died during step {step}") from exc
                raise
        return ray.get(refs[0])

    def _any_dead(self) -> bool:
        for learner in self.learners:
            try:
                ray.get(learner.address.remote(), timeout=30)
            except ray.exceptions.RayActorError:
                return True
        return False

    def weights_ref(self) -> ray.ObjectRef:
        return self.learners[0].weights.remote()

    def save(self, directory: str) -> None:
        ray.get(self.learners[0].save.remote(directory))

    def load(self, directory: str, version: int) -> None:
        ray.get([learner.load.remote(directory, version) for learner in self.learners])

    def shutdown(self) -> None:
        try:
            ray.get([learner.shutdown.remote() for learner in self.learners], timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass  # a dead or stuck rank: killed below
        finally:
            for learner in self.learners:
                ray.kill(learner)
            remove_placement_group(self.pg)
