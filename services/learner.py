"""Learner actors and the group that runs them as one torch.distributed job.

``LearnerGroup(config, model_dir)`` gang-schedules ``learner.workers`` ``Learner`` actors in a
placement group and wires them into a process group (gloo on CPU, NCCL on GPU); every actor
builds its :class:`~services.learner_core.LearnerCore` from the same validated run
configuration. The distributed training itself is the configured learner strategy
(:mod:`services.learner_strategies`).

Data: the reward scorers cut every scored rollout batch into one shard per rank (rows whose
``rollout_id % world_size == rank``, see :mod:`services.reward_scorer`), so rank ``r`` fetches
only its own shards — in request order they are exactly rows ``r::world_size`` of the step's
batch, today's strided share (:func:`~services.learner_core.shard_batch`). Advantages travel
with their rows: the driver passes one array indexed by ``rollout_id`` and each rank picks
its rows' values by their ids.

Weights: a weight sync (:mod:`services.weight_sync`) runs its learner side on every rank
through :meth:`LearnerGroup.send_weights`.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from harpo_core.schema import concat, to_learner_tensors
from services.capacity import CapacityWait
from services.config import TrainConfig
from services.devices import actor_device, cpu_only, process_group_backend
from services.learner_core import LearnerCore
from services.ports import free_port
from services.weight_sync import make_weight_sync


class LearnerFailure(RuntimeError):
    """A learner process died; the job restarts from its last checkpoint."""


class PolicyVersionError(RuntimeError):
    """Rollouts were produced by a policy version the learner did not expect."""



@ray.remote
class Learner:
    """Rank ``rank`` of ``config.learner.workers``."""

    def __init__(self, config: TrainConfig, rank: int):
        if config.learner.gpus_per_worker == 0:
            cpu_only()  # before anything here initialises CUDA: see services/devices.py
        torch.set_num_threads(config.learner.torch_threads)
        self.train_config = config  # not "config": see setup()
        self.rank, self.world_size = rank, config.learner.workers
        self.max_staleness = config.rollout.max_staleness  # versions a batch may lag
        self.core: LearnerCore | None = None
        self.version = 0
        self.model_dir: str | None = None
        self._media_rows: tuple = (None, None)  # (ObjectRef, MediaRows) of the train split

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master: tuple[str, int], model_dir: str, version: int = 0) -> int:
        # Not ``self.config``: cloudpickle takes the names a method uses that match torch's
        # submodules (torch.distributed + config) for imports to ship, and cannot pickle that
        # one ("cannot pickle 'ConfigModuleInstance'").
        # the device Ray assigned (learner.gpus_per_worker), never whatever CUDA is visible
        device = actor_device(f"learner rank {self.rank}",
                              self.train_config.learner.gpus_per_worker,
                              "learner.gpus_per_worker")
        if device.type == "cuda":
            torch.cuda.set_device(device)
            if self.train_config.learner.device_memory_gib is None:  # not planned before
                from services.plan import check_learner_device

                check_learner_device(self.train_config, model_dir,
                                     torch.cuda.get_device_properties(device).total_memory,
                                     f"learner rank {self.rank}")
        if self.world_size > 1:
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = master[0], str(master[1])
            torch.distributed.init_process_group(process_group_backend(device), rank=self.rank,
                                                 world_size=self.world_size)
        self.core = LearnerCore(model_dir, self.train_config, rank=self.rank,
                                world_size=self.world_size, device=device,
                                reference_dir=str(self.train_config.model.path))
        self.version = version
        self.model_dir = model_dir
        return os.getpid()

    def update(self, step: int, shard_refs: list, advantages: np.ndarray,
               pad_id: int, media=None) -> dict:
        """One policy update on this rank's shards of the step's scored rollout batches.

        ``shard_refs``: this rank's shard of every request, in request order.
        ``advantages[k]``: the advantage of the rollout whose ``rollout_id`` is ``k``; its
        length is the number of rollouts in the step (all ranks together).
        ``media``: ``[ObjectRef]`` of the split's MediaRows when its prompts have media; each
        prompt's tensors are rebuilt here from ``prompt_index`` (no pixels in the batch).
        """
        t0 = time.perf_counter()
        batches = ray.get(shard_refs)
        fetch_bytes = sum(batch.nbytes for batch in batches)
        table: pa.Table = concat(batches)
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
        ids = table.column("rollout_id").to_numpy()
        rows = len(advantages)
        if ids.size and (ids.min() < 0 or ids.max() >= rows
                         or np.any(ids % self.world_size != self.rank)):
            raise ValueError(
                f"rank {self.rank} of {self.world_size} was given rollout ids "
                f"{ids.min()}..{ids.max()} that are not its own (id % {self.world_size} == "
                f"{self.rank}) of the {rows} rollouts that have advantages")
        tensors = to_learner_tensors(table, pad_id)
        tensors["advantages"] = torch.tensor(advantages[ids], dtype=torch.float32)
        prompt_media = None
        if media is not None:
            prompt_media = self._prompt_media(media[0], table)
            tensors["prompt_index"] = torch.from_numpy(
                table.column("prompt_index").to_numpy().astype(np.int64))
        fetch = time.perf_counter() - t0
        metrics = self.core.update(tensors, global_batch_size=rows,
                                   check_mismatch=staleness == 0, media=prompt_media)
        self.version += 1
        metrics["staleness"] = staleness
        metrics["fetch_s"] = fetch
        metrics["fetch_bytes"] = float(fetch_bytes)  # this rank's, not all-reduced
        metrics["batch_rows"] = float(rows)
        metrics["update_s"] = time.perf_counter() - t0 - fetch
        return metrics

    def _prompt_media(self, media, table: pa.Table) -> dict:
        """The media tensors of the batch's prompts (see :mod:`services.learner_media`)."""
        from services.learner_media import update_media
        from services.media_data import media_limits
        from services.media_inputs import MediaInputs

        if self.core.media_inputs is None:
            d = self.train_config.data
            self.core.media_inputs = MediaInputs(self.model_dir, media_limits(d),
                                                 d.media_cache_mb * 2**20)
        if self._media_rows[0] != media.hex():
            self._media_rows = (media.hex(), ray.get(media))
        return update_media(self.core.media_inputs, self._media_rows[1], table)

    def send_weights(self, transport: str, *args):
        """This rank's part of publishing the weights through weight sync ``transport``."""
        return make_weight_sync(transport).send(self.core, *args)

    def save(self, directory: str) -> None:
        self.core.save(directory)

    def load(self, directory: str, version: int) -> None:
        self.core.load(directory)
        self.version = version

    def shutdown(self) -> None:
        self.core = None  # free the strategy's wrapper while its process group still exists
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class LearnerGroup:
    """``config.learner.workers`` learners, gang-scheduled, acting as one."""

    def __init__(self, config: TrainConfig, model_dir: str, *, version: int = 0,
                 capacity: CapacityWait | None = None):
        learner = config.learner
        self.world_size = learner.workers
        resources = dict(learner.resources)
        gpus = learner.gpus_per_worker
        bundle = {"CPU": learner.cpus_per_worker, **({"GPU": gpus} if gpus else {}),
                  **resources}
        self.pg = placement_group([bundle] * self.world_size, strategy="PACK")
        self.learners: list = []
        try:
            if capacity is None:
                ray.get(self.pg.ready())
            else:  # a lost learner node: wait (bounded) until the group can be placed again
                capacity.placement_group("learner", self.pg, [bundle] * self.world_size)
        except BaseException:
            remove_placement_group(self.pg)
            raise
        try:
            self._start(config, model_dir, version, resources)
        except BaseException:
            self._kill()
            raise

    def _start(self, config: TrainConfig, model_dir: str, version: int, resources: dict):
        learner, gpus = config.learner, config.learner.gpus_per_worker
        self.learners = [
            Learner.options(
                num_cpus=learner.cpus_per_worker, num_gpus=gpus, resources=resources or None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=rank),
            ).remote(config, rank)
            for rank in range(self.world_size)
        ]
        self.rank_metrics: list[dict] = []  # every rank's metrics of the last update
        master = self._all_ranks("start", lambda: self.learners[0].address.remote())
        self.pids = self._all_ranks("start", lambda: [  # each rank's process id
            learner.setup.remote(master, model_dir, version) for learner in self.learners])

    def _all_ranks(self, what: str, call) -> list:
        """``ray.get`` of ``call()``'s per-rank refs; a rank that died (its node too) is a
        :class:`LearnerFailure`, handled like a death at any other moment (a restart from
        the last valid checkpoint)."""
        try:
            return ray.get(call())
        except ray.exceptions.RayActorError as exc:
            if getattr(exc, "actor_init_failed", False):
                raise  # its own start-up failed (a bug, bad input): a restart would too
            raise LearnerFailure(f"a learner died during {what}: {exc}") from exc
        except ray.exceptions.RayTaskError as exc:
            if self._any_dead():  # a survivor's collective broke because a rank died
                raise LearnerFailure(f"a learner died during {what}") from exc
            raise

    def update(self, step: int, shards: list[list], advantages: np.ndarray,
               pad_id: int, media=None) -> dict:
        """One update on every rank; metrics are all-reduced, so rank 0's stand for all
        (except ``fetch_bytes``, each rank's own: see :attr:`rank_metrics`).

        ``shards[r]``: rank ``r``'s scored-batch refs in request order
        (``StepRollouts.shards``). ``advantages[k]``: the advantage of rollout id ``k``.

        Results are collected as they come: when one rank dies, the others may be stuck in a
        collective waiting for it, so the first death raises :class:`LearnerFailure` at once
        rather than after the collective's time-out.
        """
        if len(shards) != self.world_size:
            raise ValueError(f"{len(shards)} shards for {self.world_size} learner ranks: the "
                             f"rollout pool must cut batches for learner.workers ranks")
        advantages_ref = ray.put(np.asarray(advantages, dtype=np.float64))
        media = None if media is None else [media]  # nested: Ray passes the ref, unresolved
        refs = [learner.update.remote(step, shards[rank], advantages_ref, pad_id, media)
                for rank, learner in enumerate(self.learners)]
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
        self.rank_metrics = ray.get(refs)
        return dict(self.rank_metrics[0])

    def _any_dead(self) -> bool:
        for learner in self.learners:
            try:
                ray.get(learner.address.remote(), timeout=30)
            except ray.exceptions.RayActorError:
                return True
        return False

    def send_weights(self, transport: str, *args) -> list[ray.ObjectRef]:
        """Run weight sync ``transport``'s learner side on every rank (actor tasks, started
        now, not awaited); returns their refs by rank. Used by ``WeightSync.publish``."""
        return [learner.send_weights.remote(transport, *args) for learner in self.learners]

    def save(self, directory: str) -> None:
        """Checkpoint through the strategy; every rank takes part (under ``ddp`` rank 0
        writes)."""
        self._all_ranks("save", lambda: [learner.save.remote(directory)
                                         for learner in self.learners])

    def load(self, directory: str, version: int) -> None:
        self._all_ranks("load", lambda: [learner.load.remote(directory, version)
                                         for learner in self.learners])

    def shutdown(self) -> None:
        try:
            ray.get([learner.shutdown.remote() for learner in self.learners], timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass  # a dead or stuck rank: killed below
        finally:
            self._kill()

    def _kill(self) -> None:
        for learner in self.learners:
            ray.kill(learner)
        remove_placement_group(self.pg)
