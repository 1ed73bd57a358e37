"""The driver: one training step at a time, through the actors.

Per step (synchronous, on-policy: ``rollout.max_staleness: 0``)::

    sampler ── prompts ──▶ RolloutWorker × W ── batch refs ──▶ RewardScorer × K
                                                                │ small per-rollout summaries
    driver: GRPO advantages, per-group stats ──▶ Modulator ──▶ factors ──▶ A^H
    LearnerGroup(batch refs, A^H) ──▶ new weights (object ref) ──▶ every RolloutWorker

Rollout batches stay in the object store: the driver handles refs and a few numbers per
rollout (rewards, ids), the learners fetch the token data themselves, and the modulator sees
one row per prompt.

Asynchronous mode (``rollout.max_staleness: 1``): as soon as step t's rollouts are in and the
pool holds the newest weights, the pool starts generating step t+1 in a driver thread while
the learners update on step t, so generation and learning overlap. Step t+1 is then trained
one policy version late; PPO's ratio against the rollout log-probs corrects for it. A
checkpoint records the sampler as it was before the prefetched step was drawn, so a resumed
run draws those prompts again: none is lost or trained twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from transformers import AutoConfig, AutoTokenizer

from harpo_core import GroupModulation, GroupStats, HarpoConfig, make_estimator
from harpo_core.batch import GroupedBatch
from harpo_core.data import DataColumns, PromptSet, TaskStratifiedSampler, load_prompts
from harpo_core.estimators import grpo
from services.chat import tokenize_prompts
from services.config import TrainConfig
from services.learner import LearnerFailure, LearnerGroup
from services.modulator_actor import ModulatorService, modulator_name
from services.progress import StepProgress
from services.reward_scorer import RewardScorer
from services.rollout.backend import SamplingParams
from services.rollout.pool import RolloutPool, SyncResult
from services.rollout.worker import RolloutRequest, RolloutWorker
from services.run_dir import RunDir, write_json
from services.trainer_control import TrainerControl

log = logging.getLogger(__name__)

MODULATOR_STATE = "modulator-live.json"  # the modulator's state after its last update


class DataError(ValueError):
    """Training data that cannot be used as configured."""


def derive_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from the run seed and a position (step, chunk, ...)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def check_prompt_lengths(token_ids: list[list[int]], limit: int, split: str) -> None:
    lengths = np.array([len(t) for t in token_ids])
    too_long = np.flatnonzero(lengths > limit)
    if too_long.size:
        shown = ", ".join(f"row {i} ({lengths[i]} tokens)" for i in too_long[:5])
        raise DataError(
            f"{too_long.size} {split} prompt(s) exceed data.max_prompt_tokens={limit}: {shown}; "
            f"raise the limit (within the model's context) or shorten the prompts"
        )


def per_task_means(codes: np.ndarray, values: np.ndarray, names: tuple[str, ...]
                   ) -> dict[str, float]:
    """Mean of ``values`` for each task present in ``codes`` (NaN counts as 0)."""
    count = np.bincount(codes, minlength=len(names))
    sums = np.bincount(codes, weights=np.nan_to_num(values), minlength=len(names))
    return {n: float(s / c) for n, s, c in zip(names, sums, count) if c}


@dataclass
class StepResult:
    metrics: dict
    modulation: GroupModulation | None


@dataclass
class Prefetch:
    """A step whose rollouts are being generated ahead of the learner (asynchronous mode)."""

    step: int
    sampler_state: dict  # the sampler before this step's prompts were drawn
    future: Future  # -> StepRollouts


class Trainer:
    """Builds the actors for a config and runs training steps; Ray must be initialised."""

    def __init__(self, config: TrainConfig, *, resume: bool = False):
        config = config.with_absolute_paths()
        self.config = config
        self.run_dir = RunDir(config.run.output_dir)
        self.restarts: Counter[str] = Counter()  # actor replacements and job restarts, by role
        self.weight_sync_failures = 0
        self.metrics = None  # Prometheus exporter (observability.metrics_port)
        self.control = TrainerControl(self)
        self._control_server = None
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="harpo-prefetch")
        checkpoint = None
        if resume:
            checkpoint = self.run_dir.latest_valid_checkpoint()
            if checkpoint is None:
                raise FileNotFoundError(
                    f"no valid checkpoint under {self.run_dir.checkpoints} to resume from")
        self._setup(checkpoint, fresh_run=not resume)
        try:
            self._start_endpoints()
        except BaseException:
            self.shutdown()
            raise

    def _setup(self, checkpoint: Path | None, *, fresh_run: bool) -> None:
        """Everything a run holds between steps, from the model directory or a checkpoint."""
        config = self.config
        self.step = 0  # steps completed
        self.version = 0  # policy version of the learners' weights
        self._weights = None  # object ref of those weights, until the rollout pool loads them
        self._prefetch: Prefetch | None = None
        self._eval_cache = None  # (split, prompt set, picked rows, token ids)
        model_dir = str(config.model.path)
        trainer_state = None
        if checkpoint is not None:
            trainer_state = json.loads((checkpoint / "trainer.json").read_text())
            self.step, self.version = trainer_state["completed_steps"], trainer_state["version"]
            model_dir = str(checkpoint / "model")
        self._check_model(model_dir)
        self.run_dir.create()
        if fresh_run:
            self.run_dir.config_path.write_text(config.to_yaml())
        if checkpoint is None:
            self.run_dir.clear_metrics()
        else:
            self.run_dir.truncate_metrics(self.step)

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.train_set = self._load_split(config.data.train_split)
        self.train_ids = tokenize_prompts(self.tokenizer, self.train_set.prompts)
        check_prompt_lengths(self.train_ids, config.data.max_prompt_tokens, "train")
        self.sampler = TaskStratifiedSampler(self.train_set, seed=config.run.seed)
        self.estimator = None
        if config.algorithm.estimator != "harpo":
            self.estimator = make_estimator(config.algorithm.estimator,
                                            **config.algorithm.estimator_params())
        if checkpoint is not None:
            self.sampler.load_state_dict(json.loads((checkpoint / "sampler.json").read_text()))
            if self.estimator is not None:
                self.estimator.load_state_dict(trainer_state["estimator"])
        self.last_modulation = None
        self._cooldown = 0
        self._start_actors(model_dir, checkpoint)

    # ------------------------------------------------------------------ set-up

    def _check_model(self, model_dir: str) -> None:
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model.path {str(path)!r} is not a Hugging Face model directory (no config.json)"
                f"; build the tiny one with `harpo init-tiny DIR`")
        model_cfg = AutoConfig.from_pretrained(model_dir)
        context = getattr(model_cfg, "max_position_embeddings", None)
        need = self.config.data.max_prompt_tokens + self.config.rollout.max_new_tokens
        if context is not None and need > context:
            raise ValueError(
                f"data.max_prompt_tokens + rollout.max_new_tokens = {need} exceeds the model's "
                f"context of {context} tokens")

    def _load_split(self, split: str) -> PromptSet:
        d = self.config.data
        columns = DataColumns(prompt=d.prompt_column, answer=d.answer_column, task=d.task_column,
                              dataset=d.dataset_column, task_type=d.task_type_column)
        allowed = ("classification", "qa", *self.config.reward.custom)
        return load_prompts(d.path, split, columns=columns, tasks=d.tasks,
                            task_types_allowed=allowed)

    def _backend_options(self) -> dict:
        cfg = self.config
        if cfg.rollout.backend != "vllm":
            return {}
        options = cfg.rollout.vllm.model_dump(mode="json")
        options["trust_remote_code"] = cfg.model.trust_remote_code
        if options["max_model_len"] is None:
            options["max_model_len"] = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
        return options

    def _start_actors(self, model_dir: str, checkpoint: Path | None) -> None:
        cfg = self.config
        self.sampling = SamplingParams(n=cfg.rollout.group_size,
                                       max_new_tokens=cfg.rollout.max_new_tokens,
                                       temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                       stop=tuple(cfg.rollout.stop))
        base_version = self.version  # the weights in model_dir
        options = self._backend_options()

        def make_worker(name: str):
            return RolloutWorker.options(
                num_cpus=cfg.rollout.cpus_per_worker, num_gpus=cfg.rollout.gpus_per_worker,
                resources=dict(cfg.rollout.resources) or None,
            ).remote(name, cfg.rollout.backend, model_dir, self.sampling,
                     cfg.rollout.torch_threads, options, base_version)

        def make_scorer(name: str):
            return RewardScorer.options(
                num_cpus=cfg.reward.cpus_per_scorer, resources=dict(cfg.reward.resources) or None,
            ).remote(cfg.reward_config(), cfg.reward.torch_threads)

        self.pool = RolloutPool(make_worker, make_scorer, workers=cfg.rollout.workers,
                                scorers=cfg.reward.scorers, version=base_version,
                                max_retries=cfg.rollout.request_retries,
                                on_restart=self._count_restart,
                                on_queue_depth=self._queue_depth)
        self.chunk_prompts = cfg.rollout.prompts_per_request or -(
            -cfg.data.prompts_per_step // cfg.rollout.workers)
        self.modulator = None
        if cfg.algorithm.estimator == "harpo":
            state = None
            if checkpoint is not None:
                state = json.loads((checkpoint / "modulator.json").read_text())
            harpo = HarpoConfig(**cfg.algorithm.harpo.model_dump())
            # one name per run directory: stable across restarts, distinct between runs
            run_key = f"{cfg.run.name}-{derive_seed(str(cfg.run.output_dir)) % 10**8:08d}"
            # On the driver's node, so that its state file is the run directory's; Ray
            # restarts it after a crash and it reloads that file (see modulator_actor).
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                  soft=False)
            self.modulator = ModulatorService.options(
                name=modulator_name(run_key), max_restarts=-1, max_task_retries=-1,
                scheduling_strategy=here,
            ).remote(harpo, state, str(self.run_dir.root / MODULATOR_STATE))
            ray.get(self.modulator.ready.remote())
            self._modulator_restarts = 0
        learner = cfg.learner
        core_kwargs = dict(
            mini_batch_size=learner.mini_batch_prompts * cfg.rollout.group_size,
            lr=learner.lr, weight_decay=learner.weight_decay, max_grad_norm=learner.max_grad_norm,
            warmup_steps=learner.warmup_steps, total_steps=cfg.run.steps,
            lr_schedule=learner.lr_schedule, ppo_epochs=learner.ppo_epochs,
            clip_low=learner.clip_low, clip_high=learner.clip_high,
            aggregation=learner.aggregation, kl_coef=learner.kl_coef,
            kl_estimator=learner.kl_estimator, use_reference=learner.kl_coef > 0,
            seed=cfg.run.seed, logprob_tolerance=learner.logprob_mismatch_tolerance,
            shared_prompt=learner.shared_prompt_forward, temperature=cfg.rollout.temperature,
        )
        self.learners = LearnerGroup(learner.workers, model_dir, core_kwargs,
                                     cpus=learner.cpus_per_worker, gpus=learner.gpus_per_worker,
                                     resources=dict(learner.resources),
                                     torch_threads=learner.torch_threads, version=self.version,
                                     max_staleness=cfg.rollout.max_staleness)
        if checkpoint is not None:
            self.learners.load(str(checkpoint / "model"), self.version)

    def _count_restart(self, role: str) -> None:
        self.restarts[role] += 1
        if self.metrics is not None:
            self.metrics.record_restart(role)

    def _queue_depth(self, depth: int) -> None:
        if self.metrics is not None:
            self.metrics.set_queue_depth(depth)

    def _start_endpoints(self) -> None:
        """The Prometheus endpoint and the gRPC control API; their addresses go to
        RUN_DIR/endpoints.json, where the ``harpo status`` family of commands looks."""
        cfg = self.config
        endpoints = {}
        obs = cfg.observability
        if obs.metrics_port is not None:
            from services.metrics import MetricsExporter

            self.metrics = MetricsExporter(job=cfg.run.name)
            port = self.metrics.start(obs.metrics_host, obs.metrics_port)
            endpoints["metrics"] = f"http://{_advertised(obs.metrics_host)}:{port}/metrics"
            self.metrics.set_rollout_workers(len(self.pool.workers),
                                             desired=len(self.pool.workers))
            self.metrics.set_staleness(0)  # nothing trained yet
        ctl = cfg.control
        if ctl.port is not None:
            from services.control.server import ControlServer, resolve_token

            token = resolve_token(ctl.token_file, ctl.token_env)
            self._control_server = ControlServer(
                self.control, ctl.host, ctl.port, token=token,
                tls_cert=ctl.tls_cert, tls_key=ctl.tls_key)
            port = self._control_server.start()
            endpoints["control"] = f"{_advertised(ctl.host)}:{port}"
        self.endpoints = endpoints
        write_json(self.run_dir.root / "endpoints.json", endpoints)
        for name, address in endpoints.items():
            log.info("%s endpoint: %s", name, address)

    def scale_rollouts(self, workers: int) -> int:
        """Resize the rollout pool now (between steps); returns the previous size."""
        self._settle_prefetch()
        before = {m.name for m in self.pool.workers}
        previous = self.pool.scale(workers)
        if self.metrics is not None:
            self.metrics.set_rollout_workers(len(self.pool.workers), desired=workers)
            for name in before - {m.name for m in self.pool.workers}:
                self.metrics.forget_worker(name)
        return previous

    # ------------------------------------------------------------------ one step

    def _requests(self, step: int, indices: np.ndarray, prompt_set: PromptSet,
                  token_ids: list[list[int]], seed_tag: str) -> list[RolloutRequest]:
        """Cut a step's prompts into requests of ``chunk_prompts`` (the last may be smaller)."""
        positions = np.arange(indices.size)
        chunks = [positions[i:i + self.chunk_prompts]
                  for i in range(0, indices.size, self.chunk_prompts)]
        return [
            RolloutRequest(
                step=step,
                seed=derive_seed(self.config.run.seed, seed_tag, step, k),
                policy_version=self.version,
                prompt_indices=indices[c],
                group_ids=c,
                task_codes=prompt_set.task_codes[indices[c]],
                task_names=prompt_set.task_names,
                task_types=prompt_set.task_types,
                answers=[prompt_set.answers[i] for i in indices[c]],
                prompt_ids=[token_ids[i] for i in indices[c]],
            )
            for k, c in enumerate(chunks)
        ]

    def _advantages(self, step: int, summary: dict) -> tuple[np.ndarray, GroupModulation | None]:
        """Advantages for every rollout of the step (zero for groups dropped by
        ``reward.on_error: drop_group``, which also stay out of the modulator's statistics)."""
        keep = np.ones(summary["reward"].size, dtype=bool)
        self._dropped_groups = 0
        if self.config.reward.on_error == "drop_group" and summary["reward_error"].any():
            bad_groups = np.unique(summary["group_id"][summary["reward_error"]])
            keep = ~np.isin(summary["group_id"], bad_groups)
            self._dropped_groups = int(bad_groups.size)
            log.warning("step %d: dropping %d group(s) whose reward failed", step,
                        bad_groups.size)
        advantages = np.zeros(keep.size)
        self._group_tasks = None  # task of each group, in the modulator's group order
        if not keep.any():
            return advantages, None
        kept = {k: summary[k][keep] for k in ("reward", "group_id", "task_code")}
        advantages[keep], modulation = self._kept_advantages(step, kept)
        return advantages, modulation

    def _kept_advantages(self, step: int, summary: dict):
        names = self.train_set.task_names
        if self.modulator is None:
            out = self.estimator.compute(summary["reward"], summary["group_id"],
                                         summary["task_code"], step=step, task_names=names)
            return out.advantages, None
        alg = self.config.algorithm
        batch = GroupedBatch.build(summary["reward"], summary["group_id"], summary["task_code"],
                                   task_names=names)
        base = grpo(batch, eps=alg.eps, std_ddof=alg.std_ddof)
        stats = GroupStats.from_batch(batch, base)
        self._group_tasks = np.asarray(batch.task_names, dtype=object)[batch.group_task].tolist()
        answer, restarts = ray.get(self.modulator.update.remote(step, stats))
        while self._modulator_restarts < restarts:  # Ray restarted it; it reloaded its state
            self._modulator_restarts += 1
            self._count_restart("modulator")
        mod = GroupModulation.from_dict(answer)
        factor = batch.groups.broadcast(mod.sample_factors * mod.group_task_factors)
        return base * factor, mod

    def train_step(self) -> StepResult:
        cfg = self.config
        step = self.step
        t_start = time.perf_counter()
        rollouts = self._step_rollouts(step)
        summary, times = rollouts.summary, dict(rollouts.times)
        times["rollout_wait_s"] = time.perf_counter() - t_start
        syncs = [self._sync_pool()]  # asynchronous mode: the previous update's weights
        if cfg.rollout.max_staleness and step + 1 < cfg.run.steps:
            self._start_prefetch(step + 1)
        t0 = time.perf_counter()
        advantages, modulation = self._advantages(step, summary)
        times["modulate_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        learner_metrics = self.learners.update(step, rollouts.refs, advantages, self.pad_id)
        times["learn_s"] = time.perf_counter() - t0
        self._weights = self.learners.weights_ref()
        self.version += 1
        if not cfg.rollout.max_staleness:
            syncs.append(self._sync_pool())
        times["sync_s"] = sum(seconds for seconds, _ in syncs)
        sync_failures = sum(result.failures for _, result in syncs if result is not None)
        load_seconds = {w: t for _, result in syncs if result is not None
                        for w, t in result.seconds.items()}
        times["step_s"] = time.perf_counter() - t_start
        self.step += 1
        metrics = self._step_metrics(step, summary, advantages, modulation, learner_metrics,
                                     times, max(load_seconds.values(), default=0.0))
        if self.metrics is not None:
            self.metrics.record_step(metrics, modulation, self._group_tasks)
            self.metrics.set_staleness(metrics["staleness"])
            if any(result is not None for _, result in syncs):
                self.metrics.record_weight_sync(times["sync_s"], ok=sync_failures == 0)
            for worker, seconds in load_seconds.items():
                self.metrics.record_worker(worker, rollouts.per_worker.get(worker, 0), seconds)
        self.last_modulation = modulation
        return StepResult(metrics, modulation)

    # ------------------------------------------------------------------ rollouts ahead

    def _step_rollouts(self, step: int):
        """This step's scored rollouts: prefetched ones if any, otherwise generated now."""
        prefetch = self._prefetch
        if prefetch is not None and prefetch.step == step:
            self._prefetch = None
            return prefetch.future.result()
        self._discard_prefetch()
        indices = self.sampler.next_batch(self.config.data.prompts_per_step)
        return self.pool.run(self._requests(step, indices, self.train_set, self.train_ids,
                                            "train"))

    def _start_prefetch(self, step: int) -> None:
        """Draw ``step``'s prompts and generate them in the background with the current policy."""
        sampler_state = self.sampler.state_dict()
        indices = self.sampler.next_batch(self.config.data.prompts_per_step)
        requests = self._requests(step, indices, self.train_set, self.train_ids, "train")
        self._prefetch = Prefetch(step, sampler_state,
                                  self._prefetcher.submit(self.pool.run, requests))

    def _settle_prefetch(self) -> None:
        """Wait until a prefetch in flight is done, so the rollout pool is idle; keep its result."""
        if self._prefetch is not None:
            wait_futures([self._prefetch.future])

    def _discard_prefetch(self) -> None:
        """Drop a prefetched step (after it ended) and put its prompts back into the sampler."""
        prefetch, self._prefetch = self._prefetch, None
        if prefetch is not None:
            wait_futures([prefetch.future])
            self.sampler.load_state_dict(prefetch.sampler_state)

    def _sync_pool(self) -> tuple[float, SyncResult | None]:
        """Give the rollout pool the learners' newest weights if it does not hold them yet.

        Returns the seconds it took and the pool's report (None when there was nothing to do).
        """
        if self._weights is None or self.pool.version == self.version:
            return 0.0, None
        t0 = time.perf_counter()
        result = self.pool.sync(self.version, self._weights)
        self.weight_sync_failures += result.failures
        self._weights = None
        return time.perf_counter() - t0, result

    def _step_metrics(self, step, summary, advantages, modulation, learner, times,
                      weight_load_s) -> dict:
        names = self.train_set.task_names
        codes = summary["task_code"]
        count = np.bincount(codes, minlength=len(names))

        def per_task(values):
            return per_task_means(codes, values, names)

        n = codes.size
        tokens = float(summary["response_length"].sum())
        row = {
            "step": step,
            "policy_version": int(summary["policy_version"][0]),
            "staleness": int(learner.get("staleness", 0)),  # learner version - rollout version
            "rollouts": n,
            # which prompts, in order: equal digests mean the same samples were trained on
            "prompt_digest": hashlib.blake2b(summary["prompt_index"].astype(np.int64).tobytes(),
                                             digest_size=8).hexdigest(),
            "reward": per_task(summary["reward"]),
            "reward_mean": float(summary["reward"].mean()),
            "accuracy": per_task(summary["accuracy"]),
            "format": per_task(summary["reward_format"]),
            "reward_errors": {k: int(v) for k, v in zip(
                names, np.bincount(codes, weights=summary["reward_error"], minlength=len(names)))
                if v},
            "dropped_groups": self._dropped_groups,
            "batch_share": {k: v for k, v in zip(names, (count / n).tolist()) if v > 0},
            "advantage_abs_mean": per_task(np.abs(advantages)),
            "response_length": float(summary["response_length"].mean()),
            "stop_fraction": float(summary["stopped"].mean()),
            "rollouts_per_s": n / times["step_s"],
            "rollout_workers": len(self.pool.workers),
            "restarts": dict(self.restarts),
            "weight_sync_failures": self.weight_sync_failures,
            "tokens_per_s": tokens / times["step_s"],
            "timing": {**times, "weight_load_s": weight_load_s,
                       "learner_fetch_s": learner.get("fetch_s", 0.0),
                       "learner_update_s": learner.get("update_s", 0.0)},
        }
        for key in ("loss", "kl", "entropy", "clip_frac", "approx_kl", "grad_norm", "lr",
                    "logprob_mismatch_max", "logprob_mismatch_mean"):
            if key in learner:
                row[key] = learner[key]
        if modulation is not None:
            row["task_factor"] = modulation.task_factors
            row["task_log_factor"] = modulation.task_log_factors
            row["task_signal"] = modulation.task_signals
            row["task_signal_ema"] = modulation.task_ema
            row["signal_reference"] = (None if math.isnan(modulation.reference)
                                       else modulation.reference)
            row["zero_signal_groups"] = modulation.zero_signal_groups
            row["sample_factor_mean"] = float(np.mean(modulation.sample_factors))
        return row

    # ------------------------------------------------------------------ loop, eval, checkpoint

    def run(self, steps: int | None = None) -> list[dict]:
        """Train until ``run.steps`` (or ``steps`` more); returns the metric rows written.

        Between steps the loop serves control commands (pause, checkpoint, scale, stop) and
        the autoscaling policy. A learner failure restarts the job from the last valid
        checkpoint, up to ``run.max_restarts`` times; steps after that checkpoint run again
        exactly as they would have (same prompts, same seeds), and their metric rows replace
        the lost ones.
        """
        cfg = self.config
        end = cfg.run.steps if steps is None else min(cfg.run.steps, self.step + steps)
        progress = StepProgress(cfg.run.steps, self.step, cfg.observability.progress)
        rows = []
        self.control.set_state("running")
        try:
            while self.step < end:
                self.control.serve()
                if self.control.stop_requested:
                    break
                try:
                    result = self.train_step()
                except LearnerFailure as exc:
                    self._restart_after(exc)
                    rows = [r for r in rows if r["step"] < self.step]
                    continue
                self.run_dir.append_metrics(result.metrics)
                rows.append(result.metrics)
                m = result.metrics
                self.control.after_step(m, result.modulation)
                progress.update(m["step"], f"reward {m['reward_mean']:.3f} "
                                           f"{m['rollouts_per_s']:.0f} rollouts/s")
                if cfg.run.eval_every and self.step % cfg.run.eval_every == 0:
                    progress.note(self._periodic_eval())
                every = cfg.run.checkpoint_every
                if (every and self.step % every == 0) or self.step == cfg.run.steps:
                    self.checkpoint()
                self._autoscale(m["timing"])
            if self.control.stop_requested and self.step < cfg.run.steps:
                self.control.stopped(self.checkpoint())
        except BaseException:
            self.control.set_state("failed")
            raise
        finally:
            progress.close()
        self.control.finish()
        return rows

    def _restart_after(self, failure: Exception) -> None:
        """Rebuild every actor from the last valid checkpoint (or from scratch)."""
        cfg = self.config
        if self.restarts["job"] >= cfg.run.max_restarts:
            raise RuntimeError(
                f"learner failure after {self.restarts['job']} automatic restart(s) "
                f"(run.max_restarts = {cfg.run.max_restarts}): {failure}") from failure
        checkpoint = self.run_dir.latest_valid_checkpoint()
        where = f"checkpoint {checkpoint.name}" if checkpoint else "the start (no checkpoint yet)"
        log.warning("learner failure at step %d (%s); restarting from %s", self.step, failure,
                    where)
        self._discard_prefetch()
        self._teardown_actors()
        self._count_restart("learner")
        self._count_restart("job")
        self._setup(checkpoint, fresh_run=False)
        if self.metrics is not None:
            self.metrics.set_rollout_workers(len(self.pool.workers),
                                             desired=len(self.pool.workers))

    def _autoscale(self, timing: dict) -> None:
        policy = self.config.rollout.autoscale
        if not policy.enabled:
            return
        if self._cooldown > 0:
            self._cooldown -= 1
            return
        # Asynchronous mode generates during the update: what counts is how long the step
        # waited for its rollouts.
        waited = timing["rollout_wait_s" if self.config.rollout.max_staleness else "generate_s"]
        share = waited / max(timing["step_s"], 1e-9)
        workers = len(self.pool.workers)
        target = workers
        if share > policy.target_generate_share + policy.tolerance:
            target = min(workers + 1, policy.max_workers)
        elif share < policy.target_generate_share - policy.tolerance:
            target = max(workers - 1, policy.min_workers)
        if target != workers:
            log.info("autoscale: generation took %.0f%% of the step; rollout workers %d -> %d",
                     100 * share, workers, target)
            self.scale_rollouts(target)
            self._cooldown = policy.cooldown_steps

    def checkpoint(self) -> Path:
        cfg = self.config
        modulator_state = (ray.get(self.modulator.state_dict.remote())
                           if self.modulator is not None else None)

        def write(tmp: Path) -> None:
            self.learners.save(str(tmp / "model"))
            self.tokenizer.save_pretrained(str(tmp / "model"))
            if modulator_state is not None:
                write_json(tmp / "modulator.json", modulator_state)
            # a prefetched step is not trained yet: its prompts are drawn again on resume
            sampler = (self._prefetch.sampler_state if self._prefetch is not None
                       else self.sampler.state_dict())
            write_json(tmp / "sampler.json", sampler)
            write_json(tmp / "trainer.json", {
                "completed_steps": self.step, "version": self.version,
                "estimator": self.estimator.state_dict() if self.estimator else {},
            })

        return self.run_dir.save_checkpoint(self.step, write, cfg.run.keep_checkpoints)

    def evaluate(self, split: str | None = None, per_task: int | None = None, *,
                 temperature: float | None = None, samples: int | None = None) -> dict:
        """Per-task mean reward, accuracy and format score on held-out prompts.

        Greedy (``temperature`` 0) or ``samples`` responses per prompt sampled at
        ``temperature`` (defaults: ``data.eval_temperature`` / ``data.eval_samples``). Every
        evaluation uses the same seeds, so two evaluations of a run (before and after
        training) compare the policies on the same random numbers.
        """
        cfg = self.config
        split = split or cfg.data.eval_split
        per_task = per_task or cfg.data.eval_prompts_per_task
        temperature = cfg.data.eval_temperature if temperature is None else temperature
        samples = samples or cfg.data.eval_samples
        if temperature == 0 and samples > 1:
            raise ValueError(f"{samples} samples per prompt need a temperature > 0")
        if self._eval_cache is None or self._eval_cache[0] != (split, per_task):
            prompt_set = self._load_split(split)
            picks = np.concatenate([prompt_set.indices_of_task(c)[:per_task]
                                    for c in range(len(prompt_set.task_names))])
            ids = tokenize_prompts(self.tokenizer, [prompt_set.prompts[i] for i in picks])
            check_prompt_lengths(ids, cfg.data.max_prompt_tokens, split)
            token_ids = [None] * len(prompt_set)
            for i, t in zip(picks, ids):
                token_ids[i] = t
            self._eval_cache = ((split, per_task), prompt_set, picks, token_ids)
        _, prompt_set, picks, token_ids = self._eval_cache
        self._settle_prefetch()
        self._sync_pool()  # asynchronous mode: the pool may still serve the previous version
        params = SamplingParams(n=samples, max_new_tokens=cfg.rollout.max_new_tokens,
                                temperature=temperature, top_p=cfg.rollout.top_p,
                                stop=tuple(cfg.rollout.stop))
        requests = self._requests(0, picks, prompt_set, token_ids, "eval")  # fixed seeds
        summary = self.pool.run(requests, params).summary
        result = {metric: per_task_means(summary["task_code"], summary[metric],
                                         prompt_set.task_names)
                  for metric in ("reward", "accuracy", "reward_format")}
        counts = np.bincount(summary["task_code"], minlength=len(prompt_set.task_names))
        result["rollouts"] = {n: int(c) for n, c in zip(prompt_set.task_names, counts) if c}
        return result

    def _periodic_eval(self) -> str:
        """``run.eval_every``: evaluate, append the result to ``eval.jsonl``, return a summary."""
        cfg = self.config
        t0 = time.perf_counter()
        result = self.evaluate()
        row = {"step": self.step, "policy_version": self.version, "split": cfg.data.eval_split,
               "temperature": cfg.data.eval_temperature, "samples": cfg.data.eval_samples,
               "seconds": round(time.perf_counter() - t0, 3), **result}
        self.run_dir.append_eval(row)
        mean = sum(result["reward"].values()) / len(result["reward"])
        return (f"eval after step {self.step}: mean held-out reward {mean:.3f} "
                f"({len(result['reward'])} tasks, {row['seconds']:.1f} s)")

    def final_task_factors(self) -> dict[str, float]:
        return {} if self.modulator is None else ray.get(self.modulator.task_factors.remote())

    def modulator_stats(self) -> dict | None:
        return None if self.modulator is None else ray.get(self.modulator.stats.remote())

    def _teardown_actors(self) -> None:
        self._settle_prefetch()
        for part in (self.pool.shutdown, self.learners.shutdown):
            try:
                part()
            except Exception as exc:  # noqa: BLE001 - tearing down after a failure
                log.warning("while shutting down: %s", exc)
        if self.modulator is not None:
            ray.kill(self.modulator, no_restart=True)

    def shutdown(self) -> None:
        if getattr(self, "_control_server", None) is not None:
            self._control_server.stop(grace=1.0)
            self._control_server = None
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
            self.metrics = None
        if hasattr(self, "learners"):
            self._teardown_actors()
        self._prefetcher.shutdown(wait=True)


def _advertised(host: str) -> str:
    """An address others can reach for a server bound to ``host``."""
    return ray.util.get_node_ip_address() if host in ("0.0.0.0", "::", "") else host
