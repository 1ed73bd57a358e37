"""The actors of a run, built from its config in one place.

``ActorSet`` owns the rollout pool (rollout workers and reward scorers), the learner group,
the weight-sync transport, and the advantage estimator with its central modulator actor when
the estimator takes one (HARPO). The driver builds one per (re)start and tears it down whole.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from harpo_core import make_estimator
from harpo_core.estimators import Estimator, estimator_parameters
from services.capacity import CapacityWait
from services.config import TrainConfig
from services.learner import LearnerGroup
from services.modulator_actor import ModulatorService, RemoteModulator, modulator_name
from services.prompts import derive_seed
from services.reward_scorer import RewardScorer
from services.rollout.backend import SamplingParams
from services.rollout.placement import STRATEGY as ENGINE_STRATEGY
from services.rollout.placement import engine_actor_options, engine_bundles
from services.rollout.pool import RolloutPool
from services.rollout.worker import RolloutWorker
from services.step_record import WeightSyncReport
from services.weight_sync import make_weight_sync

log = logging.getLogger(__name__)

MODULATOR_STATE = "modulator-live.json"  # the modulator's state after its last update


def sampling_params(config: TrainConfig) -> SamplingParams:
    r = config.rollout
    return SamplingParams(n=r.group_size, max_new_tokens=r.max_new_tokens,
                          temperature=r.temperature, top_p=r.top_p, stop=tuple(r.stop))


def backend_options(config: TrainConfig) -> dict:
    """The engine options of the configured backend: its own section under ``rollout`` (e.g.
    ``rollout.vllm``), if it has one."""
    r = config.rollout
    # every backend: the GPUs its worker asked Ray for, and whether it sleeps during updates
    placement = {"gpus": r.gpus_per_worker, "colocate": r.colocate}
    if config.data.format == "hba":  # media prompts: the worker decodes as the learner does
        from dataclasses import asdict

        from services.media_data import media_limits

        placement["media"] = {"limits": asdict(media_limits(config.data)),
                              "cache_bytes": config.data.media_cache_mb * 2**20}
    section = getattr(r, r.backend, None)
    if section is None:
        return placement
    options = section.model_dump(mode="json")
    options["trust_remote_code"] = config.model.trust_remote_code
    options.pop("device_memory_gib", None)  # the memory plan's, not the engine's
    if "max_model_len" in options and options["max_model_len"] is None:
        options["max_model_len"] = config.data.max_prompt_tokens + config.rollout.max_new_tokens
    return {**options, **placement}


def _start_in_background(factory: Callable, *args, **kwargs) -> Future:
    """``factory(*args, **kwargs)`` on a thread of its own (its Ray calls run concurrently with
    the caller's); the future holds the result or the exception."""
    future: Future = Future()

    def start():
        try:
            future.set_result(factory(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits the future
            future.set_exception(exc)

    threading.Thread(target=start, name=f"harpo-start-{factory.__name__}", daemon=True).start()
    return future


def _shutdown_when_started(future: Future) -> None:
    if future.exception() is None:
        future.result().shutdown()


class ActorSet:
    """Rollout pool, learners, weight sync and estimator of one run (Ray must be initialised).

    ``version`` is the policy version of the weights in ``model_dir``; ``estimator_state`` the
    estimator's state to resume from (None: fresh).
    """

    def __init__(self, config: TrainConfig, model_dir: str, *, version: int,
                 estimator_state: dict | None, run_root: Path,
                 on_restart: Callable[[str], None], on_queue_depth: Callable[[int], None],
                 capacity: CapacityWait | None = None):
        self.config = config
        r = config.rollout
        self.pool = self.learners = None
        sampling, options = sampling_params(config), backend_options(config)

        bundles = engine_bundles(r)  # tensor-parallel vLLM: a placement group per worker
        self._engine_groups: dict[str, object] = {}

        def make_worker(name: str):
            if bundles is None:
                placement = dict(num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker,
                                 resources=dict(r.resources) or None)
            else:
                group = placement_group(bundles, strategy=ENGINE_STRATEGY)
                ray.get(group.ready())
                self._engine_groups[name] = group
                placement = engine_actor_options(r, group)
            return RolloutWorker.options(**placement).remote(
                name, r.backend, model_dir, sampling, r.torch_threads, options, version,
                r.weight_sync)

        def make_scorer(name: str):
            return RewardScorer.options(
                num_cpus=config.reward.cpus_per_scorer,
                resources=dict(config.reward.resources) or None,
            ).remote(config.reward_config(), config.reward.torch_threads)

        self.modulator = None  # the modulator actor, when the estimator takes one
        self.weight_sync = make_weight_sync(r.weight_sync).configure(config)
        # The learners load the model while the rollout workers and scorers load theirs (for
        # a 7B model each side takes minutes). Colocated engines share the learners' GPUs:
        # there the parts start one after the other.
        learners = None if r.colocate else _start_in_background(
            LearnerGroup, config, model_dir, version=version, capacity=capacity)
        try:  # a part that cannot start (no node for it in time): the others go too
            self.pool = RolloutPool(
                make_worker, make_scorer, workers=r.workers, scorers=config.reward.scorers,
                version=version, max_retries=r.request_retries, on_restart=on_restart,
                on_queue_depth=on_queue_depth, learner_shards=config.learner.workers,
                weight_sync=self.weight_sync, capacity=capacity,
                on_retire=self._release_engine_group, resources={
                    "rollout": {"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker,
                                **r.resources},
                    "reward": {"CPU": config.reward.cpus_per_scorer,
                               **config.reward.resources}})
            self.estimator = self._make_estimator(run_root, on_restart)
            if estimator_state is not None:
                self.estimator.load_state_dict(estimator_state)
            self.learners = (learners.result() if learners is not None else
                             LearnerGroup(config, model_dir, version=version,
                                          capacity=capacity))
        except BaseException:
            if learners is not None and self.learners is None:
                # still starting (or failed, and removed what it made): shut them down once up
                learners.add_done_callback(_shutdown_when_started)
            self.shutdown()
            raise

    def _make_estimator(self, run_root: Path, on_restart) -> Estimator:
        """The configured estimator; one that takes a modulator gets the run's central one."""
        alg, run = self.config.algorithm, self.config.run
        if "modulator" not in estimator_parameters(alg.estimator):
            return make_estimator(alg.estimator, **alg.estimator_params())
        # One name per run directory: stable across restarts, distinct between runs. On the
        # driver's node, so that its state file is the run directory's; Ray restarts it after
        # a crash and it reloads that file (see modulator_actor).
        run_key = f"{run.name}-{derive_seed(str(run.output_dir)) % 10**8:08d}"
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.modulator = ModulatorService.options(
            name=modulator_name(run_key), max_restarts=-1, max_task_retries=-1,
            scheduling_strategy=here,
        ).remote(alg.modulator_config(), None, str(run_root / MODULATOR_STATE))
        ray.get(self.modulator.ready.remote())
        central = RemoteModulator(self.modulator, on_restart)
        return make_estimator(alg.estimator, **alg.estimator_params(modulator=central))

    def _release_engine_group(self, name: str) -> None:
        group = self._engine_groups.pop(name, None)
        if group is not None:
            remove_placement_group(group)

    def before_update(self) -> None:
        """``rollout.colocate``: the rollout engines sleep while the learners update (they
        wake for the next weight load or generation)."""
        if self.config.rollout.colocate:
            self.pool.sleep()

    # ------------------------------------------------------------------ weights

    def sync_weights(self, version: int) -> WeightSyncReport:
        """Give the rollout pool the learners' weights (policy ``version``) unless it holds
        them already: the one place weights move from learners to rollout workers."""
        if self.pool.version == version:
            return WeightSyncReport()
        t0 = time.perf_counter()
        handle = self.weight_sync.publish(self.learners, len(self.pool.workers))
        result = self.pool.sync(version, handle)
        self.weight_sync.collect()  # the learners' side is done too
        return WeightSyncReport(True, time.perf_counter() - t0, dict(result.seconds),
                                result.failures)

    # ------------------------------------------------------------------ membership

    def scale_rollouts(self, workers: int) -> tuple[int, set[str]]:
        """Resize the rollout pool (it must be idle); returns the previous size and the names
        of the workers removed."""
        before = {m.name for m in self.pool.workers}
        previous = self.pool.scale(workers)
        return previous, before - {m.name for m in self.pool.workers}

    def modulator_stats(self) -> dict | None:
        return None if self.modulator is None else ray.get(self.modulator.stats.remote())

    def task_factors(self) -> dict[str, float]:
        return {} if self.modulator is None else ray.get(self.modulator.task_factors.remote())

    def shutdown(self) -> None:
        for part in (self.pool, self.learners):
            if part is None:
                continue
            try:
                part.shutdown()
            except Exception as exc:  # noqa: BLE001 - tearing down after a failure
                log.warning("while shutting down: %s", exc)
        if self.modulator is not None:
            ray.kill(self.modulator, no_restart=True)
