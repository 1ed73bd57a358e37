"""The driver: one training step at a time, through the actors.

Per step (synchronous, on-policy)::

    sampler ── prompts ──▶ RolloutWorker × W ── batch refs ──▶ RewardScorer × K
                                                                │ small per-rollout summaries
    driver: GRPO advantages, per-group stats ──▶ Modulator ──▶ factors ──▶ A^H
    LearnerGroup(batch refs, A^H) ──▶ new weights (object ref) ──▶ every RolloutWorker

Rollout batches stay in the object store: the driver handles refs and a few numbers per
rollout (rewards, ids), the learners fetch the token data themselves, and the modulator sees
one row per prompt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
from transformers import AutoConfig, AutoTokenizer

from harpo_core import GroupModulation, GroupStats, HarpoConfig, make_estimator
from harpo_core.batch import GroupedBatch
from harpo_core.data import DataColumns, PromptSet, TaskStratifiedSampler, load_prompts
from harpo_core.estimators import grpo
from services.chat import tokenize_prompts
from services.config import TrainConfig
from services.learner import LearnerGroup
from services.modulator_actor import ModulatorService, modulator_name
from services.progress import StepProgress
from services.reward_scorer import RewardScorer
from services.rollout.backend import SamplingParams
from services.rollout.worker import RolloutRequest, RolloutWorker
from services.run_dir import RunDir, write_json

log = logging.getLogger(__name__)


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


class Trainer:
    """Builds the actors for a config and runs training steps; Ray must be initialised."""

    def __init__(self, config: TrainConfig, *, resume: bool = False):
        config = config.with_absolute_paths()
        self.config = config
        self.run_dir = RunDir(config.run.output_dir)
        self.step = 0  # steps completed
        self.version = 0  # policy version the rollout workers serve
        self._eval_cache = None  # (split, prompt set, picked rows, token ids)
        model_dir = str(config.model.path)
        checkpoint = None
        if resume:
            checkpoint = self.run_dir.latest_valid_checkpoint()
            if checkpoint is None:
                raise FileNotFoundError(
                    f"no valid checkpoint under {self.run_dir.checkpoints} to resume from")
            trainer_state = json.loads((checkpoint / "trainer.json").read_text())
            self.step, self.version = trainer_state["completed_steps"], trainer_state["version"]
            model_dir = str(checkpoint / "model")
        self._check_model(model_dir)
        self.run_dir.create()
        if not resume:
            self.run_dir.config_path.write_text(config.to_yaml())
            if self.run_dir.metrics_path.exists():
                self.run_dir.metrics_path.unlink()
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

    def _start_actors(self, model_dir: str, checkpoint: Path | None) -> None:
        cfg = self.config
        self.sampling = SamplingParams(n=cfg.rollout.group_size,
                                       max_new_tokens=cfg.rollout.max_new_tokens,
                                       temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p)
        self.workers = [
            RolloutWorker.options(num_cpus=cfg.rollout.cpus_per_worker,
                                  num_gpus=cfg.rollout.gpus_per_worker).remote(
                f"rollout-{i}", cfg.rollout.backend, model_dir, self.sampling,
                cfg.rollout.torch_threads, None, self.version)
            for i in range(cfg.rollout.workers)
        ]
        self.scorers = [
            RewardScorer.options(num_cpus=cfg.reward.cpus_per_scorer).remote(
                cfg.reward_config(), cfg.reward.torch_threads)
            for _ in range(cfg.reward.scorers)
        ]
        self.modulator = None
        if cfg.algorithm.estimator == "harpo":
            state = None
            if checkpoint is not None:
                state = json.loads((checkpoint / "modulator.json").read_text())
            harpo = HarpoConfig(**cfg.algorithm.harpo.model_dump())
            # one name per run directory: stable across restarts, distinct between runs
            run_key = f"{cfg.run.name}-{derive_seed(str(cfg.run.output_dir)) % 10**8:08d}"
            self.modulator = ModulatorService.options(name=modulator_name(run_key)).remote(
                harpo, state)
        learner = cfg.learner
        core_kwargs = dict(
            mini_batch_size=learner.mini_batch_prompts * cfg.rollout.group_size,
            lr=learner.lr, weight_decay=learner.weight_decay, max_grad_norm=learner.max_grad_norm,
            warmup_steps=learner.warmup_steps, total_steps=cfg.run.steps,
            lr_schedule=learner.lr_schedule, ppo_epochs=learner.ppo_epochs,
            clip_low=learner.clip_low, clip_high=learner.clip_high,
            aggregation=learner.aggregation, kl_coef=learner.kl_coef,
            kl_estimator=learner.kl_estimator, use_reference=learner.kl_coef > 0,
            seed=cfg.run.seed,
        )
        self.learners = LearnerGroup(learner.workers, model_dir, core_kwargs,
                                     cpus=learner.cpus_per_worker, gpus=learner.gpus_per_worker,
                                     torch_threads=learner.torch_threads, version=self.version)
        if checkpoint is not None:
            self.learners.load(str(checkpoint / "model"), self.version)
        ray.get([w.ready.remote() for w in self.workers] +
                [s.ready.remote() for s in self.scorers])

    # ------------------------------------------------------------------ one step

    def _requests(self, step: int, indices: np.ndarray, prompt_set: PromptSet,
                  token_ids: list[list[int]], seed_tag: str) -> list[RolloutRequest]:
        """Split a step's prompts into one contiguous chunk per rollout worker."""
        chunks = [c for c in np.array_split(np.arange(indices.size), len(self.workers)) if c.size]
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

    def _rollout(self, requests: list[RolloutRequest], params: SamplingParams | None = None):
        """Generate and score; returns (scored batch refs, merged summary, stage times)."""
        t0 = time.perf_counter()
        generated = [self.workers[k % len(self.workers)].generate.remote(r, params)
                     for k, r in enumerate(requests)]
        scored = [self.scorers[k % len(self.scorers)].score.remote(ref)
                  for k, ref in enumerate(generated)]
        ray.wait(generated, num_returns=len(generated))
        t1 = time.perf_counter()
        summaries = ray.get([s[1] for s in scored])
        t2 = time.perf_counter()
        merged = {k: np.concatenate([s[k] for s in summaries]) for k in summaries[0]}
        return [s[0] for s in scored], merged, {"generate_s": t1 - t0, "score_s": t2 - t1}

    def _advantages(self, step: int, summary: dict) -> tuple[np.ndarray, GroupModulation | None]:
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
        mod = GroupModulation.from_dict(ray.get(self.modulator.update.remote(step, stats)))
        factor = batch.groups.broadcast(mod.sample_factors * mod.group_task_factors)
        return base * factor, mod

    def train_step(self) -> StepResult:
        cfg = self.config
        step = self.step
        t_start = time.perf_counter()
        indices = self.sampler.next_batch(cfg.data.prompts_per_step)
        requests = self._requests(step, indices, self.train_set, self.train_ids, "train")
        refs, summary, times = self._rollout(requests)
        t0 = time.perf_counter()
        advantages, modulation = self._advantages(step, summary)
        times["modulate_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        learner_metrics = self.learners.update(step, refs, advantages, self.pad_id)
        times["learn_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        weights = self.learners.weights_ref()
        self.version += 1
        load_times = ray.get([w.set_weights.remote(self.version, weights) for w in self.workers])
        times["sync_s"] = time.perf_counter() - t0
        times["step_s"] = time.perf_counter() - t_start
        self.step += 1
        metrics = self._step_metrics(step, summary, advantages, modulation, learner_metrics,
                                     times, max(load_times))
        tolerance = cfg.learner.logprob_mismatch_tolerance
        if learner_metrics.get("logprob_mismatch_max", 0.0) > tolerance:
            log.warning("step %d: rollout/learner log-prob mismatch %.2e exceeds %.0e", step,
                        learner_metrics["logprob_mismatch_max"], tolerance)
        return StepResult(metrics, modulation)

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
            "rollouts": n,
            "reward": per_task(summary["reward"]),
            "reward_mean": float(summary["reward"].mean()),
            "accuracy": per_task(summary["accuracy"]),
            "format": per_task(summary["reward_format"]),
            "batch_share": {k: v for k, v in zip(names, (count / n).tolist()) if v > 0},
            "advantage_abs_mean": per_task(np.abs(advantages)),
            "response_length": float(summary["response_length"].mean()),
            "stop_fraction": float(summary["stopped"].mean()),
            "rollouts_per_s": n / times["step_s"],
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
        """Train until ``run.steps`` (or ``steps`` more); returns the metric rows written."""
        cfg = self.config
        end = cfg.run.steps if steps is None else min(cfg.run.steps, self.step + steps)
        progress = StepProgress(cfg.run.steps, self.step, cfg.observability.progress)
        rows = []
        try:
            while self.step < end:
                result = self.train_step()
                self.run_dir.append_metrics(result.metrics)
                rows.append(result.metrics)
                m = result.metrics
                progress.update(m["step"], f"reward {m['reward_mean']:.3f} "
                                           f"{m['rollouts_per_s']:.0f} rollouts/s")
                every = cfg.run.checkpoint_every
                if (every and self.step % every == 0) or self.step == cfg.run.steps:
                    self.checkpoint()
        finally:
            progress.close()
        return rows

    def checkpoint(self) -> Path:
        cfg = self.config
        modulator_state = (ray.get(self.modulator.state_dict.remote())
                           if self.modulator is not None else None)

        def write(tmp: Path) -> None:
            self.learners.save(str(tmp / "model"))
            self.tokenizer.save_pretrained(str(tmp / "model"))
            if modulator_state is not None:
                write_json(tmp / "modulator.json", modulator_state)
            write_json(tmp / "sampler.json", self.sampler.state_dict())
            write_json(tmp / "trainer.json", {
                "completed_steps": self.step, "version": self.version,
                "estimator": self.estimator.state_dict() if self.estimator else {},
            })

        return self.run_dir.save_checkpoint(self.step, write, cfg.run.keep_checkpoints)

    def evaluate(self, split: str | None = None, per_task: int | None = None) -> dict:
        """Greedy responses on held-out prompts; per-task mean reward and accuracy."""
        cfg = self.config
        split = split or cfg.data.eval_split
        per_task = per_task or cfg.data.eval_prompts_per_task
        if self._eval_cache is None or self._eval_cache[0] != split:
            prompt_set = self._load_split(split)
            picks = np.concatenate([prompt_set.indices_of_task(c)[:per_task]
                                    for c in range(len(prompt_set.task_names))])
            ids = tokenize_prompts(self.tokenizer, [prompt_set.prompts[i] for i in picks])
            check_prompt_lengths(ids, cfg.data.max_prompt_tokens, split)
            token_ids = [None] * len(prompt_set)
            for i, t in zip(picks, ids):
                token_ids[i] = t
            self._eval_cache = (split, prompt_set, picks, token_ids)
        _, prompt_set, picks, token_ids = self._eval_cache
        greedy = SamplingParams(n=1, max_new_tokens=cfg.rollout.max_new_tokens, temperature=0.0)
        requests = self._requests(self.step, picks, prompt_set, token_ids, "eval")
        _, summary, _ = self._rollout(requests, greedy)
        return {metric: per_task_means(summary["task_code"], summary[metric],
                                       prompt_set.task_names)
                for metric in ("reward", "accuracy", "reward_format")}

    def final_task_factors(self) -> dict[str, float]:
        return {} if self.modulator is None else ray.get(self.modulator.task_factors.remote())

    def modulator_stats(self) -> dict | None:
        return None if self.modulator is None else ray.get(self.modulator.stats.remote())

    def shutdown(self) -> None:
        self.learners.shutdown()
        for actor in [*self.workers, *self.scorers] + ([self.modulator] if self.modulator else []):
            ray.kill(actor)
