"""The Ray pipeline against its own parts, and against TRL's GRPOTrainer, on one workload.

Workload (issue 3): the tiny Qwen2 (≈1M parameters), 8 prompts × 8 samples, 16 new tokens per
step, 1 learner, 1 rollout worker, the step's prompts in two requests of 4 (so the first
request is scored while the second generates). Measured side by side in one run:

* pipeline   — ``Trainer.train_step`` on embedded Ray (generate, score, modulate, learn, sync),
  synchronous (``rollout.max_staleness: 0``) and asynchronous (``1``: step t+1 is generated
  while the learner updates on step t), ``--mode sync|async|both``;
* standalone — the same HF backend and the same ``LearnerCore`` called in-process, no Ray:
  ``generate`` + ``update`` on a batch of the same shape, one standalone step after each
  synchronous pipeline step (so both see the same phases of the machine);
* TRL        — ``GRPOTrainer`` on the same model, prompts and shape (``pip install .[bench]``).

orchestration overhead = pipeline step time / (standalone generate + standalone update).

Rollout backends (``--backend hf|vllm|both``): each backend in its own ``RolloutWorker`` actor
on the same prompts and seeds, timing generation (rollouts/s, from the driver) and the weight
sync of a fresh state dict every step (``set_weights`` seconds inside the actor, and the round
trip from the driver). The pipeline run uses each selected backend too; the standalone run and
the overhead ratio stay on the HF backend (vLLM must not run in this process).

    python benchmarks/pipeline.py [--steps 12] [--warmup 2] [--no-trl] [--backend both]
                                  [--mode both] [--threads 1] [--prompts-per-request 4]
    python benchmarks/pipeline.py --backend both --rollout-only

``--omni`` (issue 17) measures instead, on a mixed-modality batch of the synthetic omni suite and
the tiny Qwen2.5-Omni thinker: padding waste with and without modality-aware micro-batches, and
the share of the batch's time spent decoding media (decode vs building the model inputs vs a
forward pass) with a cold and a warm media cache (:mod:`benchmarks.omni_batching`), and rollouts/s
of the real HF backend on that batch with its media beside a text-only batch as large
(:mod:`benchmarks.omni_rollouts`).

    python benchmarks/pipeline.py --omni [--omni-prompts 32] [--omni-repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or a module

PROMPTS, SAMPLES, NEW_TOKENS = 8, 8, 16


def build_assets(root: Path):
    from services.tiny.model import init_tiny

    return init_tiny(root / "assets", n_train_per_task=200, n_test_per_task=10)


def pipeline_config(assets, run_dir: Path, steps: int, threads: int, backend: str = "hf",
                    staleness: int = 0, prompts_per_request: int | None = None):
    from services.config import parse_config

    return parse_config({
        "run": {"name": "bench", "output_dir": str(run_dir), "steps": steps,
                "checkpoint_every": 0},
        "model": {"path": str(assets.model_dir)},
        "data": {"path": str(assets.data_dir), "prompts_per_step": PROMPTS,
                 "max_prompt_tokens": 256},
        "rollout": {"backend": backend, "workers": 1, "group_size": SAMPLES,
                    "max_new_tokens": NEW_TOKENS, "torch_threads": threads,
                    "max_staleness": staleness, "prompts_per_request": prompts_per_request},
        "reward": {"scorers": 1, "torch_threads": threads},
        "learner": {"workers": 1, "mini_batch_prompts": PROMPTS, "lr": 1e-5,
                    "torch_threads": threads},
        "observability": {"progress": "never"},
    }, source="benchmark config")


def run_pipeline(config, steps: int, warmup: int, standalone: Standalone | None = None,
                 assets=None) -> dict:
    """``steps`` pipeline steps; with ``standalone`` (and the ``assets`` the config points
    at), each followed by one standalone step on the same prompts.

    Alternating the two means slow and fast phases of the machine (other tenants, frequency
    changes) fall on both alike, so their ratio is measured side by side, not minutes apart.
    Only a synchronous pipeline can alternate: an asynchronous one would generate its next
    step during the standalone step, for free. Returns the pipeline's median stage times and,
    when alternating, the standalone medians.
    """
    from services.cluster import connect

    connect(num_cpus=8)
    from services.controller import Trainer
    from services.step_record import metrics_row

    prompts = step_prompts(assets, steps) if standalone is not None else None
    trainer = Trainer(config)
    rows, alone = [], []
    try:
        for step in range(steps):
            rows.append(metrics_row(trainer.step()))
            if standalone is not None:
                alone.append(standalone.step(step, prompts[step]))
    finally:
        trainer.shutdown()
    rows, alone = rows[warmup:], alone[warmup:]
    stages = ("generate_s", "score_s", "rollout_wait_s", "modulate_s", "learn_s",
              "learner_fetch_s", "learner_update_s", "sync_s", "step_s")
    out = {s: statistics.median(r["timing"][s] for r in rows) for s in stages}
    out["tokens"] = statistics.median(r["response_length"] for r in rows) * PROMPTS * SAMPLES
    if alone:
        out["standalone"] = {k: statistics.median(a[k] for a in alone) for k in alone[0]}
    return out


def run_standalone(standalone: Standalone, assets, steps: int, warmup: int) -> dict:
    """``steps`` standalone steps in a row (when no synchronous pipeline runs to alternate)."""
    prompts = step_prompts(assets, steps)
    alone = [standalone.step(step, prompts[step]) for step in range(steps)][warmup:]
    return {k: statistics.median(a[k] for a in alone) for k in alone[0]}


def step_rows(assets, steps: int) -> tuple:
    """The prompt set and the rows the pipeline's sampler draws, step by step (seed 0)."""
    from harpo_core.data import TaskStratifiedSampler, load_prompts

    prompt_set = load_prompts(assets.data_dir, "train")
    sampler = TaskStratifiedSampler(prompt_set, seed=0)
    return prompt_set, [sampler.next_batch(PROMPTS) for _ in range(steps)]


def step_prompts(assets, steps: int) -> list[list[str]]:
    """The prompts the pipeline's sampler draws, step by step (seed 0), for the other runs."""
    prompt_set, batches = step_rows(assets, steps)
    return [[prompt_set.prompts[i] for i in rows] for rows in batches]


class Standalone:
    """The same backend and learner called in this process, no Ray: one step is ``generate``
    on a step's prompts, then ``update`` on a batch of that shape, then the weight load."""

    def __init__(self, assets, config, threads: int):
        import torch

        from services.learner_core import LearnerCore
        from services.rollout.backend import SamplingParams
        from services.rollout.hf_backend import HFBackend

        torch.set_num_threads(threads)
        self.backend = HFBackend(str(assets.model_dir))
        self.learner = LearnerCore(str(assets.model_dir), config)  # the pipeline's learner
        self.params = SamplingParams(n=SAMPLES, max_new_tokens=NEW_TOKENS)

    def step(self, step: int, prompts: list[str]) -> dict:
        import pyarrow as pa
        import torch

        from harpo_core.schema import to_learner_tensors
        from services.chat import tokenize_prompts
        from services.rollout.worker import token_columns

        batch_ids = tokenize_prompts(self.backend.tokenizer, prompts)
        t0 = time.perf_counter()
        gen = self.backend.generate(batch_ids, self.params, seed=step)
        gen_s = time.perf_counter() - t0
        tensors = to_learner_tensors(pa.table(token_columns(batch_ids, gen, SAMPLES)),
                                     self.backend.pad_id)
        tensors["advantages"] = torch.randn(PROMPTS * SAMPLES)
        t0 = time.perf_counter()
        self.learner.update(tensors, global_batch_size=PROMPTS * SAMPLES)
        learn_s = time.perf_counter() - t0
        self.backend.load_weights(self.learner.full_state_dict())
        return {"generate_s": gen_s, "learn_s": learn_s}


def run_rollout_backend(assets, backend: str, steps: int, warmup: int, threads: int) -> dict:
    """One ``RolloutWorker`` of ``backend``: start-up, generation and weight-sync times."""
    import ray
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.chat import tokenize_prompts
    from services.cluster import connect
    from services.config import VLLMSection
    from services.rollout.backend import SamplingParams
    from services.rollout.worker import RolloutRequest, RolloutWorker
    from services.weight_sync.object_store import ObjectStoreSync

    connect(num_cpus=8)
    tokenizer = AutoTokenizer.from_pretrained(str(assets.model_dir))
    options = {}
    if backend == "vllm":  # what the controller passes: rollout.vllm + max_model_len
        options = {**VLLMSection().model_dump(mode="json"), "max_model_len": 256 + NEW_TOKENS}
    params = SamplingParams(n=SAMPLES, max_new_tokens=NEW_TOKENS)
    t0 = time.perf_counter()
    worker = RolloutWorker.options(num_cpus=1).remote(
        f"bench-{backend}", backend, str(assets.model_dir), params, threads, options, 0)
    ray.get(worker.ready.remote())
    start_s = time.perf_counter() - t0
    base = AutoModelForCausalLM.from_pretrained(str(assets.model_dir)).state_dict()
    noise = torch.Generator().manual_seed(0)
    gen_s, tokens, load_s, sync_s = [], [], [], []
    first_s = None
    try:
        for step, prompts in enumerate(step_prompts(assets, steps)):
            ids = tokenize_prompts(tokenizer, prompts)
            request = RolloutRequest(
                step=step, seed=step, policy_version=step, prompt_indices=np.arange(PROMPTS),
                group_ids=np.arange(PROMPTS), task_codes=np.zeros(PROMPTS, dtype=np.int32),
                task_names=("t",), task_types=("classification",), answers=[""] * PROMPTS,
                prompt_ids=ids)
            t0 = time.perf_counter()
            batch = ray.get(worker.generate.remote(request))
            elapsed = time.perf_counter() - t0
            first_s = elapsed if first_s is None else first_s
            gen_s.append(elapsed)
            tokens.append(len(batch.column("response_ids").flatten()))
            # a new policy version as the learner would publish it (same size, new values)
            weights = ray.put({k: v + 1e-3 * torch.randn(v.shape, generator=noise)
                               for k, v in base.items()})
            t0 = time.perf_counter()
            handle = ObjectStoreSync.handle(weights)
            load_s.append(ray.get(worker.set_weights.remote(step + 1, handle)))
            sync_s.append(time.perf_counter() - t0)
    finally:
        try:
            ray.get(worker.shutdown.remote(), timeout=60)
        finally:
            ray.kill(worker)
    med = lambda xs: statistics.median(xs[warmup:])  # noqa: E731
    return {"start_s": start_s, "first_generate_s": first_s, "generate_s": med(gen_s),
            "tokens": med(tokens), "set_weights_s": med(load_s), "sync_s": med(sync_s)}


def print_rollout_backends(results: dict[str, dict], steps: int, warmup: int) -> None:
    rollouts = PROMPTS * SAMPLES
    print(f"\nrollout backends: 1 worker (1 CPU), {PROMPTS} prompts x {SAMPLES} samples, "
          f"{NEW_TOKENS} new tokens; medians over {steps - warmup} steps")
    print(f"{'backend':<8}{'start s':>9}{'1st gen s':>10}{'gen s':>8}{'rollouts/s':>11}"
          f"{'tokens/s':>10}{'set_weights s':>14}{'sync s':>8}")
    for name, r in results.items():
        print(f"{name:<8}{r['start_s']:>9.2f}{r['first_generate_s']:>10.2f}"
              f"{r['generate_s']:>8.3f}{rollouts / r['generate_s']:>11.1f}"
              f"{r['tokens'] / r['generate_s']:>10.0f}{r['set_weights_s']:>14.4f}"
              f"{r['sync_s']:>8.4f}")
    print("(start: actor + engine start-up; 1st gen: includes vLLM's compile; set_weights: the "
          "load inside the actor; sync: the driver's round trip of set_weights)")


def run_trl(assets, steps: int, warmup: int) -> dict | None:
    try:
        from benchmarks.trl_baseline import run_trl_grpo
    except ImportError as exc:
        print(f"TRL baseline skipped ({exc}); install it with: pip install -e '.[bench]'")
        return None
    from transformers import AutoTokenizer

    from services.chat import render_prompts

    tokenizer = AutoTokenizer.from_pretrained(str(assets.model_dir))
    # the same prompts as the pipeline, chat-templated as the pipeline does it, scored by the
    # same reward; TRL's sampler shuffles them, so steps see the same prompts in another grouping
    prompt_set, batches = step_rows(assets, steps + warmup)
    rows = [i for batch in batches for i in batch]
    prompts = render_prompts(tokenizer, [prompt_set.prompts[i] for i in rows])
    return run_trl_grpo(str(assets.model_dir), prompts, steps=steps,
                        answers=[prompt_set.answers[i] for i in rows],
                        task_types=[prompt_set.task_types[prompt_set.task_codes[i]]
                                    for i in rows],
                        prompts_per_step=PROMPTS, group_size=SAMPLES,
                        max_new_tokens=NEW_TOKENS, warmup_steps=warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument("--backend", choices=("hf", "vllm", "both"), default="hf",
                        help="rollout backend(s) to measure and to run the pipeline with")
    parser.add_argument("--mode", choices=("sync", "async", "both"), default="both",
                        help="pipeline mode(s): on-policy, or generation one step ahead")
    parser.add_argument("--prompts-per-request", type=int, default=PROMPTS // 2,
                        help="rollout.prompts_per_request for the pipeline (default "
                             f"{PROMPTS // 2}: two requests, so the first is scored while the "
                             f"second generates; {PROMPTS}: one request, scoring after it)")
    parser.add_argument("--rollout-only", action="store_true",
                        help="only the rollout-backend comparison (no pipeline, TRL, standalone)")
    parser.add_argument("--omni", action="store_true",
                        help="only the omni batch: padding waste with and without "
                             "modality-aware micro-batches, share of time decoding media (cold "
                             "and warm cache); rollouts/s on a mixed batch is not measured yet "
                             "(media through rollout and learner: the omni end-to-end work)")
    parser.add_argument("--omni-prompts", type=int, default=32, help="prompts in the omni batch")
    parser.add_argument("--omni-repeats", type=int, default=3,
                        help="cold/warm passes over the omni batch (medians)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.omni:
        from benchmarks.omni_batching import print_omni, run_omni
        from benchmarks.omni_rollouts import main_rollouts, print_rollouts

        root = Path(tempfile.mkdtemp(prefix="harpo-bench-omni-"))
        print_omni(run_omni(root, args.omni_prompts, args.omni_repeats, args.threads),
                   args.omni_repeats, args.threads)
        print_rollouts(main_rollouts(root, args.omni_prompts, args.omni_repeats, args.threads))
        return
    backends = ("hf", "vllm") if args.backend == "both" else (args.backend,)
    modes = {"sync": 0, "async": 1}
    if args.mode != "both":
        modes = {args.mode: modes[args.mode]}

    root = Path(tempfile.mkdtemp(prefix="harpo-bench-"))
    assets = build_assets(root)
    rollout = {b: run_rollout_backend(assets, b, args.steps, args.warmup, args.threads)
               for b in backends}
    print_rollout_backends(rollout, args.steps, args.warmup)
    if args.rollout_only:
        return
    standalone = Standalone(assets, pipeline_config(assets, root / "standalone", args.steps,
                                                    args.threads), args.threads)
    pipelines = {}
    for b in backends:
        for mode, staleness in modes.items():
            config = pipeline_config(assets, root / f"run-{b}-{mode}", args.steps, args.threads,
                                     b, staleness, args.prompts_per_request)
            alongside = standalone if b == "hf" and mode == "sync" else None
            pipelines[f"{b}, {mode}"] = run_pipeline(config, args.steps, args.warmup, alongside,
                                                     assets)
    if "hf, sync" in pipelines:
        alone, where = pipelines["hf, sync"]["standalone"], "alternating with the sync run"
    else:
        alone = run_standalone(standalone, assets, args.steps, args.warmup)
        where = "on its own"
    trl = None if args.no_trl else run_trl(assets, args.steps, args.warmup)

    rollouts = PROMPTS * SAMPLES
    print(f"\n# {platform.machine()}, {os.cpu_count()} cores, {args.threads} torch thread(s) "
          f"per process; {PROMPTS} prompts x {SAMPLES} samples, {NEW_TOKENS} new tokens; "
          f"medians over {args.steps - args.warmup} steps")
    print(f"{'':<32}{'step s':>8} {'steps/s':>8} {'rollouts/s':>11}")

    def line(name: str, t: float) -> None:
        print(f"{name:<32}{t:>8.3f} {1 / t:>8.2f} {rollouts / t:>11.1f}")

    base = alone["generate_s"] + alone["learn_s"]
    for b, pipeline in pipelines.items():
        line(f"harpo (Ray, {b})", pipeline["step_s"])
    line("standalone gen + update", base)
    if trl is not None:
        line(f"TRL GRPOTrainer {trl['trl_version']}", trl["step_time_s_median"])
    for b, pipeline in pipelines.items():
        print(f"\npipeline stages, {b} (s): " + ", ".join(
            f"{k.removesuffix('_s')} {pipeline[k]:.3f}" for k in
            ("generate_s", "score_s", "rollout_wait_s", "modulate_s", "learn_s",
             "learner_fetch_s", "learner_update_s", "sync_s")))
    print(f"standalone stages ({where}) (s): generate {alone['generate_s']:.3f}, "
          f"update {alone['learn_s']:.3f}")
    for mode in modes:  # the standalone baseline runs the HF backend
        if f"hf, {mode}" not in pipelines:
            continue
        step = pipelines[f"hf, {mode}"]["step_s"]
        print(f"{mode}: orchestration overhead = {step:.3f} / {base:.3f} = "
              f"{step / base:.2f}  (target <= 1.15)", end="")
        if trl is not None:
            print(f"; throughput vs TRL = {trl['step_time_s_median'] / step:.2f}x "
                  f"(target >= 1)", end="")
        print()


if __name__ == "__main__":
    main()
