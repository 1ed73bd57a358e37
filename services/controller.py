"""The driver: one training step at a time, through the actors.

Read :meth:`Trainer.step` first — sample → generate → score → advantages → update, with the
weights moved to the rollout workers before they generate. Everything else here is what a run
needs around its steps: set-up from a model directory or a checkpoint, the loop with its
control commands, restarts after a learner failure, autoscaling, checkpoints and evaluation.

Rollout batches stay in the object store: the driver handles refs and a few numbers per
rollout (rewards, ids), each learner rank fetches its own shard of the token data, and the
modulator sees one row per prompt.

Asynchronous mode (``rollout.max_staleness: 1``): as soon as step t's rollouts are in and the
pool holds the newest weights, the pool starts generating step t+1 in a driver thread while
the learners update on step t (:mod:`services.prefetch`). Step t+1 is then trained one policy
version late; PPO's ratio against the rollout log-probs corrects for it.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from transformers import AutoConfig, AutoTokenizer

from harpo_core.data import TaskStratifiedSampler
from services.actors import ActorSet
from services.advantages import step_advantages
from services.autoscale import autoscale_target
from services.capacity import CapacityTimeout, CapacityWait
from services.checkpoint_store import CheckpointStore, Uploader, latest_checkpoint
from services.config import TrainConfig
from services.endpoints import Endpoints
from services.learner import LearnerFailure
from services.model_loading import copy_processor_files
from services.prefetch import Prefetcher
from services.progress import StepProgress
from services.prompts import TokenizedPrompts
from services.rollout.backend import SamplingParams
from services.rollout.pool import StepRollouts
from services.run_dir import ESTIMATOR_STATE, RunDir, read_estimator_state, write_json
from services.step_record import StageTimer, StepRecord, metrics_row, per_task_means
from services.trainer_control import TrainerControl

log = logging.getLogger(__name__)

class Trainer:
    """Builds the actors for a config and runs training steps; Ray must be initialised."""

    def __init__(self, config: TrainConfig, *, resume: bool = False, mode: str = "train"):
        """``mode="train"`` owns ``run.output_dir``: a fresh run (``resume`` False) refuses a
        directory that already holds a run, and writes ``config.yaml`` once its actors and
        endpoints are up; a resumed one drops the metric rows of the steps it will train again.
        ``mode="eval"`` (``harpo eval``) only reads: it loads the latest valid checkpoint when
        ``resume``, starts no endpoints and writes nothing into the run directory (the
        modulator's live state goes to a temporary directory)."""
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', not {mode!r}")
        self.config = config = config.with_absolute_paths()
        self.mode = mode
        self.run_dir = RunDir(config.run.output_dir)
        self._scratch: Path | None = None  # eval mode: where the run's live files go
        self.restarts: Counter[str] = Counter()  # actor replacements and job restarts, by role
        self.weight_sync_failures = 0
        self.endpoints = Endpoints(config)
        self.control = TrainerControl(self, config, on_state=self.endpoints.set_state)
        self.prefetch = Prefetcher()
        # a lost node: replacements wait (bounded) for one with their resources
        self.capacity = CapacityWait(config.run.capacity_timeout_s,
                                     on_waiting=self.endpoints.set_waiting_for_capacity)
        uri = config.run.checkpoint_uri if mode == "train" else None
        self.uploader = None if uri is None else Uploader(
            CheckpointStore(uri), config.run.checkpoint_upload_timeout_s,
            on_result=self.endpoints.record_checkpoint_upload)
        checkpoint = None
        if resume:
            if mode == "train":  # what a killed checkpoint writer left
                self.run_dir.remove_leftovers()
            # the run directory's, or (its volume lost) the newest in run.checkpoint_uri
            checkpoint = latest_checkpoint(self.run_dir, uri)
            if checkpoint is None:
                where = f" or in {uri}" if uri else ""
                raise FileNotFoundError(f"no valid checkpoint under {self.run_dir.checkpoints}"
                                        f"{where} to resume from")
        elif mode == "train" and (found := self.run_dir.run_files()):
            raise ValueError(
                f"{self.run_dir.root} already holds a run ({', '.join(found)}); resume it, or "
                f"train into another directory")
        try:
            self._setup(checkpoint)
            if mode == "train":
                self.endpoints.start(self.control, self.run_dir.root,
                                     len(self.actors.pool.workers))
        except BaseException:
            self.shutdown()
            raise
        if mode == "train" and not resume:  # the run has started: the directory is its
            self.run_dir.config_path.write_text(config.to_yaml())

    def _run_root(self, checkpoint: Path | None) -> Path:
        """Where the run's files go: the run directory (training; a resumed run drops the
        metric rows of the steps it trains again), or a temporary one (evaluation)."""
        if self.mode == "eval":
            if self._scratch is None:
                self._scratch = Path(tempfile.mkdtemp(prefix="harpo-eval-"))
            return self._scratch
        self.run_dir.create()
        if checkpoint is None:
            self.run_dir.clear_metrics()
        else:
            self.run_dir.truncate_metrics(self.completed_steps)
        return self.run_dir.root

    def _setup(self, checkpoint: Path | None) -> None:
        """Everything a run holds between steps, from the model directory or a checkpoint;
        the model and the data are checked before anything in the run directory changes."""
        config = self.config
        self.completed_steps = 0  # steps completed
        self.version = 0  # policy version of the learners' weights: the one version counter
        self._eval: TokenizedPrompts | None = None  # held-out prompts, by (split, per task)
        self._eval_key = None
        model_dir, estimator_state = str(config.model.path), None
        if checkpoint is not None:
            state = json.loads((checkpoint / "trainer.json").read_text())
            self.completed_steps, self.version = state["completed_steps"], state["version"]
            model_dir = str(checkpoint / "model")
            estimator_state = read_estimator_state(checkpoint)
        self._check_model(model_dir)
        self._model_dir = model_dir  # the processor's files are copied from it to checkpoints

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.train = TokenizedPrompts.build(config, self.tokenizer, config.data.train_split,
                                            model_dir=model_dir)
        self._share_media(self.train)
        # each training task's modality signature (several joined by "|") for data with
        # media, reported in the metric rows; {} for text-only data (rows stay as they were)
        self.task_modality = {} if not self.train.media_used else {
            task: "|".join(sorted(per_task))
            for task, per_task in self.train.prompts.modality_counts().items()}
        self.sampler = TaskStratifiedSampler(self.train.prompts, seed=config.run.seed,
                                             mix=config.data.task_mix)
        if checkpoint is not None:
            self.sampler.load_state_dict(json.loads((checkpoint / "sampler.json").read_text()))
        self._cooldown = 0
        run_root = self._run_root(checkpoint)
        self.actors = ActorSet(config, model_dir, version=self.version,
                               estimator_state=estimator_state, run_root=run_root,
                               on_restart=self._count_restart,
                               on_queue_depth=self.endpoints.set_queue_depth,
                               capacity=self.capacity)
        if checkpoint is not None:
            self.actors.learners.load(str(checkpoint / "model"), self.version)
        self.chunk_prompts = config.rollout.prompts_per_request or -(
            -config.data.prompts_per_step // config.rollout.workers)

    def _share_media(self, prompts: TokenizedPrompts) -> None:
        """Prompts with media (the model was checked by ``TokenizedPrompts.build``): put the
        split's media table in the object store once; requests and learners carry its ref."""
        if not prompts.media_used:
            return
        import ray

        from services.media_inputs import MediaRows

        prompts.media_ref = ray.put(MediaRows.of(prompts.prompts))

    @property
    def train_set(self):
        return self.train.prompts

    def _check_model(self, model_dir: str) -> None:
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model.path {str(path)!r} is not a Hugging Face model directory (no config.json)"
                f"; build the tiny one with `harpo init-tiny DIR`")
        context = getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", None)
        need = self.config.data.max_prompt_tokens + self.config.rollout.max_new_tokens
        if context is not None and need > context:
            raise ValueError(
                f"data.max_prompt_tokens + rollout.max_new_tokens = {need} exceeds the model's "
                f"context of {context} tokens")

    def _count_restart(self, role: str) -> None:
        self.restarts[role] += 1
        self.endpoints.record_restart(role)

    # ------------------------------------------------------------------ one step

    def step(self) -> StepRecord:
        """One training step: sample → generate → score → advantages → update."""
        cfg, step = self.config, self.completed_steps
        timer = StageTimer()
        with timer("rollout_wait_s"):  # asynchronous: generated during the last update
            prefetched = self.prefetch.take(step)
        with timer("sync_s"):  # the pool is idle: it loads the newest weights
            sync = self.actors.sync_weights(self.version)
        with timer("rollout_wait_s"):  # synchronous: sample, generate and score now
            rollouts = prefetched or self._generate(step)
        if cfg.rollout.max_staleness and step + 1 < cfg.run.steps:
            self._start_prefetch(step + 1)  # generated while the learners update on this step
        with timer("modulate_s"):
            advantages = step_advantages(
                self.actors.estimator, step, rollouts.summary, self.train_set.task_names,
                drop_failed_groups=cfg.reward.on_error == "drop_group",
                format_weight=cfg.reward.format_weight)
        with timer("learn_s"):  # each rank fetches its shard; advantages keyed by rollout id
            self.actors.before_update()  # rollout.colocate: the engines free the GPU
            learner = self.actors.learners.update(
                step, rollouts.shards, advantages.keyed(rollouts.summary["rollout_id"]),
                self.pad_id, media=self.train.media_ref)
        self.version += 1
        self.completed_steps += 1
        self.weight_sync_failures += sync.failures
        return StepRecord(
            step=step, task_names=self.train_set.task_names, summary=rollouts.summary,
            advantages=advantages, learner=learner,
            timings={**rollouts.times, **timer.seconds, "step_s": timer.elapsed()},
            sync=sync, rollouts_per_worker=rollouts.per_worker,
            rollout_workers=len(self.actors.pool.workers), restarts=dict(self.restarts),
            weight_sync_failures=self.weight_sync_failures)

    def _generate(self, step: int) -> StepRollouts:
        """Draw ``step``'s prompts and generate and score their rollouts with the pool."""
        indices = self.sampler.next_batch(self.config.data.prompts_per_step)
        return self.actors.pool.run(self.train.requests(
            indices, step=step, version=self.version, seed=self.config.run.seed,
            seed_tag="train", chunk_prompts=self.chunk_prompts))

    def _start_prefetch(self, step: int) -> None:
        state = self.sampler.state_dict()
        self.prefetch.start(step, state, lambda: self._generate(step))

    def _discard_prefetch(self) -> None:
        """Drop a prefetched step and put its prompts back into the sampler."""
        state = self.prefetch.discard()
        if state is not None:
            self.sampler.load_state_dict(state)

    # ------------------------------------------------------------------ the loop

    def run(self, steps: int | None = None) -> list[dict]:
        """Train until ``run.steps`` (or ``steps`` more); returns the metric rows written.

        Between steps the loop serves control commands (pause, checkpoint, scale, stop) and
        the autoscaling policy. A learner failure restarts the job from the last valid
        checkpoint, up to ``run.max_restarts`` times; steps after that checkpoint run again
        exactly as they would have (same prompts, same seeds), and their metric rows replace
        the lost ones.
        """
        cfg = self.config
        end = cfg.run.steps if steps is None else min(cfg.run.steps, self.completed_steps + steps)
        progress = StepProgress(cfg.run.steps, self.completed_steps, cfg.observability.progress)
        rows = []
        self.control.set_state("running")
        try:
            while self.completed_steps < end:
                self.control.serve()
                if self.control.stop_requested:
                    break
                # the sampler before this step's prompts were drawn (a stop mid-step puts it back)
                before = self.prefetch.sampler_state() or self.sampler.state_dict()
                try:
                    record = self.step()
                except LearnerFailure as exc:
                    self._restart_after(exc)
                    rows = [r for r in rows if r["step"] < self.completed_steps]
                    continue
                except CapacityTimeout as exc:
                    self._stop_for_capacity(exc, before)
                row = metrics_row(record)
                if self.task_modality:  # data with media: each task's modality signature
                    row["modality"] = self.task_modality
                self.run_dir.append_metrics(row)
                self.endpoints.record_step(record, row)
                self.control.after_step(row, record.modulation)
                rows.append(row)
                progress.update(row["step"], f"reward {row['reward_mean']:.3f} "
                                             f"{row['rollouts_per_s']:.0f} rollouts/s")
                try:
                    self._between_steps(row, progress)
                except LearnerFailure as exc:  # e.g. a learner died while saving
                    self._restart_after(exc)
                    rows = [r for r in rows if r["step"] < self.completed_steps]
                except CapacityTimeout as exc:  # e.g. scaling up found no node
                    self._stop_for_capacity(exc, None)
            if self.control.stop_requested and self.completed_steps < cfg.run.steps:
                self.control.stopped(self.checkpoint())
        except BaseException:
            self.control.set_state("failed")
            raise
        finally:
            progress.close()
        self.control.finish()
        return rows

    def _between_steps(self, row: dict, progress: StepProgress) -> None:
        """Periodic evaluation and checkpoint, then the autoscaling policy."""
        run, done = self.config.run, self.completed_steps
        if run.eval_every and done % run.eval_every == 0:
            progress.note(self._periodic_eval())
        if (run.checkpoint_every and done % run.checkpoint_every == 0) or done == run.steps:
            self.checkpoint()
        self._autoscale(row["timing"])

    def _restart_after(self, failure: Exception) -> None:
        """Rebuild every actor from the last valid checkpoint (or from scratch). A learner
        lost with its node waits for a node to place the learners on (run.capacity_timeout_s);
        a learner that dies while the job restarts counts as another restart."""
        cfg = self.config
        while True:
            if self.restarts["job"] >= cfg.run.max_restarts:
                raise RuntimeError(
                    f"learner failure after {self.restarts['job']} automatic restart(s) "
                    f"(run.max_restarts = {cfg.run.max_restarts}): {failure}") from failure
            checkpoint = self.run_dir.latest_valid_checkpoint()
            where = (f"checkpoint {checkpoint.name}" if checkpoint
                     else "the start (no checkpoint yet)")
            log.warning("learner failure at step %d (%s); restarting from %s",
                        self.completed_steps, failure, where)
            self._discard_prefetch()
            self.actors.shutdown()
            self._count_restart("learner")
            self._count_restart("job")
            try:
                self._setup(checkpoint)
            except LearnerFailure as exc:
                failure = exc
                continue
            except CapacityTimeout as exc:  # no learners to checkpoint: the last one stands
                raise self._capacity_message(exc, checkpoint) from None
            break
        workers = len(self.actors.pool.workers)
        self.endpoints.set_rollout_workers(workers, desired=workers)

    def _stop_for_capacity(self, exc: CapacityTimeout, sampler_state: dict | None) -> None:
        """No node for a lost actor in time: checkpoint the completed steps (the step in
        flight gives its prompts back to the sampler) and stop with what is missing."""
        self._discard_prefetch()
        if sampler_state is not None:
            self.sampler.load_state_dict(sampler_state)
        try:
            checkpoint = self.checkpoint()
        except LearnerFailure as failure:
            log.warning("no checkpoint at the stop (%s)", failure)
            checkpoint = self.run_dir.latest_valid_checkpoint()
        raise self._capacity_message(exc, checkpoint) from None

    def _capacity_message(self, exc: CapacityTimeout, checkpoint: Path | None
                          ) -> CapacityTimeout:
        root = self.run_dir.root
        where = (f"checkpoint {checkpoint}; resume with: harpo train --resume {root}"
                 if checkpoint else "no checkpoint yet")
        exc.args = (f"{exc.args[0]}. Stopped at step {self.completed_steps} of "
                    f"{self.config.run.steps}; {where}",)
        exc.checkpoint = checkpoint
        return exc

    def _autoscale(self, timing: dict) -> None:
        policy = self.config.rollout.autoscale
        if not policy.enabled:
            return
        if self._cooldown > 0:
            self._cooldown -= 1
            return
        workers = len(self.actors.pool.workers)
        target, share = autoscale_target(policy, timing, workers,
                                         asynchronous=bool(self.config.rollout.max_staleness))
        if target != workers:
            log.info("autoscale: generation took %.0f%% of the step; rollout workers %d -> %d",
                     100 * share, workers, target)
            self.scale_rollouts(target)
            self._cooldown = policy.cooldown_steps

    def scale_rollouts(self, workers: int) -> int:
        """Resize the rollout pool now (between steps); returns the previous size."""
        self.prefetch.settle()
        previous, removed = self.actors.scale_rollouts(workers)
        self.endpoints.set_rollout_workers(len(self.actors.pool.workers), desired=workers,
                                           removed=removed)
        return previous

    # ------------------------------------------------------------------ state on disk

    def checkpoint(self) -> Path:
        """Write a checkpoint of the completed steps (model, optimizer, estimator, sampler)."""
        estimator_state = self.actors.estimator.state_dict()
        # a prefetched step is not trained yet: its prompts are drawn again on resume
        sampler = self.prefetch.sampler_state() or self.sampler.state_dict()

        def write(tmp: Path) -> None:
            self.actors.learners.save(str(tmp / "model"))
            self.tokenizer.save_pretrained(str(tmp / "model"))
            copy_processor_files(self._model_dir, tmp / "model")  # a multimodal model's
            write_json(tmp / ESTIMATOR_STATE, estimator_state)
            write_json(tmp / "sampler.json", sampler)
            write_json(tmp / "trainer.json", {"completed_steps": self.completed_steps,
                                              "version": self.version})

        keep = self.config.run.keep_checkpoints
        path = self.run_dir.save_checkpoint(self.completed_steps, write, keep)
        if self.uploader is not None:  # bounded; a failure is logged and the run goes on
            self.uploader.upload(path, keep, self.run_dir.config_path)
        return path

    def progress(self) -> dict:
        """Where the run stands (for the control API's status)."""
        return {"step": self.completed_steps, "policy_version": self.version,
                "rollout_workers": len(self.actors.pool.workers)}

    # ------------------------------------------------------------------ evaluation

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
        if self._eval is None or self._eval_key != (split, per_task):
            self._eval = TokenizedPrompts.build(cfg, self.tokenizer, split, per_task,
                                                model_dir=self._model_dir)
            self._share_media(self._eval)
            self._eval_key = (split, per_task)
        self.prefetch.settle()
        self.actors.sync_weights(self.version)  # the pool may still serve an older version
        params = SamplingParams(n=samples, max_new_tokens=cfg.rollout.max_new_tokens,
                                temperature=temperature, top_p=cfg.rollout.top_p,
                                stop=tuple(cfg.rollout.stop))
        requests = self._eval.requests(self._eval.rows, step=0, version=self.version,
                                       seed=cfg.run.seed, seed_tag="eval",
                                       chunk_prompts=self.chunk_prompts)  # fixed seeds
        summary = self.actors.pool.run(requests, params).summary
        names = self._eval.prompts.task_names
        result = {metric: per_task_means(summary["task_code"], summary[metric], names,
                                         skip_undefined=metric == "accuracy")
                  for metric in ("reward", "accuracy", "reward_format")}
        counts = np.bincount(summary["task_code"], minlength=len(names))
        result["rollouts"] = {n: int(c) for n, c in zip(names, counts) if c}
        return result

    def _periodic_eval(self) -> str:
        """``run.eval_every``: evaluate, append the result to ``eval.jsonl``, return a summary."""
        cfg = self.config
        t0 = time.perf_counter()
        result = self.evaluate()
        row = {"step": self.completed_steps, "policy_version": self.version,
               "split": cfg.data.eval_split, "temperature": cfg.data.eval_temperature,
               "samples": cfg.data.eval_samples, "seconds": round(time.perf_counter() - t0, 3),
               **result}
        self.run_dir.append_eval(row)
        mean = sum(result["reward"].values()) / len(result["reward"])
        return (f"eval after step {self.completed_steps}: mean held-out reward {mean:.3f} "
                f"({len(result['reward'])} tasks, {row['seconds']:.1f} s)")

    def final_task_factors(self) -> dict[str, float]:
        return self.actors.task_factors()

    def modulator_stats(self) -> dict | None:
        return self.actors.modulator_stats()

    def shutdown(self) -> None:
        self.endpoints.close()
        if hasattr(self, "actors"):
            self.prefetch.settle()
            self.actors.shutdown()
        self.prefetch.shutdown()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
