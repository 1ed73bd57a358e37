"""The Ray pipeline against its own parts, and against TRL's GRPOTrainer, on one workload.

Workload (issue 3): the tiny Qwen2 (≈1M parameters), 8 prompts × 8 samples, 16 new tokens per
step, 1 learner, 1 rollout worker. Measured side by side in one run:

* pipeline   — ``Trainer.train_step`` on embedded Ray (generate, score, modulate, learn, sync);
* standalone — the same HF backend and the same ``LearnerCore`` called in-process, no Ray:
  ``generate`` + ``update`` on a batch of the same shape;
* TRL        — ``GRPOTrainer`` on the same model, prompts and shape (``pip install .[bench]``).

orchestration overhead = pipeline step time / (standalone generate + standalone update).

    python benchmarks/pipeline.py [--steps 12] [--warmup 2] [--no-trl]
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


def pipeline_config(assets, run_dir: Path, steps: int, threads: int):
    from services.config import parse_config

    return parse_config({
        "run": {"name": "bench", "output_dir": str(run_dir), "steps": steps,
                "checkpoint_every": 0},
        "model": {"path": str(assets.model_dir)},
        "data": {"path": str(assets.data_dir), "prompts_per_step": PROMPTS,
                 "max_prompt_tokens": 256},
        "rollout": {"workers": 1, "group_size": SAMPLES, "max_new_tokens": NEW_TOKENS,
                    "torch_threads": threads},
        "reward": {"scorers": 1, "torch_threads": threads},
        "learner": {"workers": 1, "mini_batch_prompts": PROMPTS, "lr": 1e-5,
                    "torch_threads": threads},
        "observability": {"progress": "never"},
    }, source="benchmark config")


def run_pipeline(config, steps: int, warmup: int) -> dict:
    from services.cluster import connect

    connect(num_cpus=8)
    from services.controller import Trainer

    trainer = Trainer(config)
    rows = []
    try:
        for _ in range(steps):
            rows.append(trainer.train_step().metrics)
    finally:
        trainer.shutdown()
    rows = rows[warmup:]
    stages = ("generate_s", "score_s", "modulate_s", "learn_s", "learner_fetch_s",
              "learner_update_s", "sync_s", "step_s")
    out = {s: statistics.median(r["timing"][s] for r in rows) for s in stages}
    out["tokens"] = statistics.median(r["response_length"] for r in rows) * PROMPTS * SAMPLES
    return out


def step_prompts(assets, steps: int) -> list[list[str]]:
    """The prompts the pipeline's sampler draws, step by step (seed 0), for the other runs."""
    from harpo_core.data import TaskStratifiedSampler, load_prompts

    prompt_set = load_prompts(assets.data_dir, "train")
    sampler = TaskStratifiedSampler(prompt_set, seed=0)
    return [[prompt_set.prompts[i] for i in sampler.next_batch(PROMPTS)] for _ in range(steps)]


def run_standalone(assets, steps: int, warmup: int, threads: int) -> dict:
    """The same backend and learner, in this process, on batches of the same shape."""
    import pyarrow as pa
    import torch

    from harpo_core.schema import to_learner_tensors
    from services.chat import tokenize_prompts
    from services.learner_core import LearnerCore
    from services.rollout.backend import SamplingParams
    from services.rollout.hf_backend import HFBackend

    torch.set_num_threads(threads)
    backend = HFBackend(str(assets.model_dir))
    learner = LearnerCore(str(assets.model_dir), mini_batch_size=PROMPTS * SAMPLES, lr=1e-5)
    params = SamplingParams(n=SAMPLES, max_new_tokens=NEW_TOKENS)
    gen_times, learn_times = [], []
    for step, prompts in enumerate(step_prompts(assets, steps)):
        batch_ids = tokenize_prompts(backend.tokenizer, prompts)
        t0 = time.perf_counter()
        gen = backend.generate(batch_ids, params, seed=step)
        gen_times.append(time.perf_counter() - t0)
        tokens, logprobs = gen.flat()
        offsets = np.concatenate([[0], np.cumsum(gen.lengths)]).astype(np.int32)
        prompt_rows = [p for p in batch_ids for _ in range(SAMPLES)]
        table = pa.table({
            "prompt_ids": pa.array(prompt_rows, pa.list_(pa.int32())),
            "response_ids": pa.ListArray.from_arrays(pa.array(offsets),
                                                     pa.array(tokens, pa.int32())),
            "response_logprobs": pa.ListArray.from_arrays(pa.array(offsets),
                                                          pa.array(logprobs, pa.float32())),
        })
        tensors = to_learner_tensors(table, backend.pad_id)
        tensors["advantages"] = torch.randn(PROMPTS * SAMPLES)
        t0 = time.perf_counter()
        learner.update(tensors, global_batch_size=PROMPTS * SAMPLES)
        learn_times.append(time.perf_counter() - t0)
        backend.load_weights(learner.state_dict_cpu())
    return {"generate_s": statistics.median(gen_times[warmup:]),
            "learn_s": statistics.median(learn_times[warmup:])}


def run_trl(assets, steps: int, warmup: int) -> dict | None:
    try:
        from benchmarks.trl_baseline import run_trl_grpo
    except ImportError as exc:
        print(f"TRL baseline skipped ({exc}); install it with: pip install -e '.[bench]'")
        return None
    from transformers import AutoTokenizer

    from services.chat import render_prompts

    tokenizer = AutoTokenizer.from_pretrained(str(assets.model_dir))
    # the same prompts as the pipeline, chat-templated as the pipeline does it; TRL's sampler
    # shuffles them, so steps see the same prompts in another grouping
    prompts = render_prompts(tokenizer, [p for batch in step_prompts(assets, steps + 1)
                                         for p in batch])
    return run_trl_grpo(str(assets.model_dir), prompts, steps=steps,
                        prompts_per_step=PROMPTS, group_size=SAMPLES,
                        max_new_tokens=NEW_TOKENS, warmup_steps=warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--no-trl", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    root = Path(tempfile.mkdtemp(prefix="harpo-bench-"))
    assets = build_assets(root)
    standalone = run_standalone(assets, args.steps, args.warmup, args.threads)
    pipeline = run_pipeline(pipeline_config(assets, root / "run", args.steps, args.threads),
                            args.steps, args.warmup)
    trl = None if args.no_trl else run_trl(assets, args.steps, args.warmup)

    rollouts = PROMPTS * SAMPLES
    base = standalone["generate_s"] + standalone["learn_s"]
    print(f"\n# {platform.machine()}, {os.cpu_count()} cores, {args.threads} torch thread(s) "
          f"per process; {PROMPTS} prompts x {SAMPLES} samples, {NEW_TOKENS} new tokens; "
          f"medians over {args.steps - args.warmup} steps")
    print(f"{'':<26}{'step s':>8} {'steps/s':>8} {'rollouts/s':>11}")
    print(f"{'harpo pipeline (Ray)':<26}{pipeline['step_s']:>8.3f} {1 / pipeline['step_s']:>8.2f} "
          f"{rollouts / pipeline['step_s']:>11.1f}")
    print(f"{'standalone gen + update':<26}{base:>8.3f} {1 / base:>8.2f} {rollouts / base:>11.1f}")
    if trl is not None:
        t = trl["step_time_s_median"]
        print(f"{'TRL GRPOTrainer ' + trl['trl_version']:<26}{t:>8.3f} {1 / t:>8.2f} "
              f"{rollouts / t:>11.1f}")
    print("\npipeline stages (s): " + ", ".join(
        f"{k.removesuffix('_s')} {pipeline[k]:.3f}" for k in
        ("generate_s", "score_s", "modulate_s", "learn_s", "learner_fetch_s", "learner_update_s",
         "sync_s")))
    print(f"standalone stages (s): generate {standalone['generate_s']:.3f}, "
          f"update {standalone['learn_s']:.3f}")
    print(f"orchestration overhead = {pipeline['step_s']:.3f} / {base:.3f} = "
          f"{pipeline['step_s'] / base:.2f}  (target <= 1.15)")
    if trl is not None:
        print(f"throughput vs TRL = {trl['step_time_s_median'] / pipeline['step_s']:.2f}x  "
              f"(target >= 1)")


if __name__ == "__main__":
    main()
