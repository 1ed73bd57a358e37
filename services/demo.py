"""``harpo demo``: the embedded default run, end to end on one CPU machine.

Builds a tiny Qwen2-architecture model and a synthetic heterogeneous task suite, gives the
model a short supervised warm start (as the paper starts RL from an SFT checkpoint), trains it
with HARPO through the full Ray pipeline, and prints held-out reward per task before and after
with the final modulation factors.
"""

from __future__ import annotations

import time
from pathlib import Path

from services.config import TrainConfig, parse_config


def demo_config(model_dir: Path, data_dir: Path, run_dir: Path, steps: int) -> TrainConfig:
    return parse_config({
        "run": {"name": "demo", "output_dir": str(run_dir), "steps": steps,
                "checkpoint_every": 0, "seed": 0},
        "model": {"path": str(model_dir)},
        "data": {"path": str(data_dir), "prompts_per_step": 14, "max_prompt_tokens": 256,
                 "eval_prompts_per_task": 48},
        "rollout": {"workers": 2, "group_size": 6, "max_new_tokens": 40, "temperature": 1.0,
                    "torch_threads": 1},
        "reward": {"scorers": 1, "torch_threads": 2},
        "algorithm": {"estimator": "harpo"},
        "learner": {"workers": 1, "lr": 5e-5, "mini_batch_prompts": 7, "ppo_epochs": 1,
                    "warmup_steps": 2, "torch_threads": 2},
    }, source="demo config")


def format_report(before: dict, after: dict, factors: dict[str, float],
                  task_types: dict[str, str]) -> str:
    header = (f"{'task':<13} {'type':<15} {'reward before':>13} {'after':>7} "
              f"{'accuracy before':>15} {'after':>7} {'factor s_m':>10}")
    lines = [header, "-" * len(header)]
    for task in sorted(before["reward"]):
        lines.append(
            f"{task:<13} {task_types.get(task, '?'):<15} {before['reward'][task]:>13.3f} "
            f"{after['reward'][task]:>7.3f} {before['accuracy'][task]:>15.2f} "
            f"{after['accuracy'][task]:>7.2f} {factors.get(task, float('nan')):>10.3f}"
        )
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    lines.append("-" * len(header))
    lines.append(f"{'mean':<13} {'':<15} {mean(before['reward']):>13.3f} "
                 f"{mean(after['reward']):>7.3f} {mean(before['accuracy']):>15.2f} "
                 f"{mean(after['accuracy']):>7.2f}")
    return "\n".join(lines)


def run_demo(workdir: str | Path = "runs/demo", steps: int = 60, sft_seconds: float = 75.0,
             address: str | None = None) -> dict:
    from services.cluster import connect
    from services.tiny.model import init_tiny
    from services.tiny.sft import sft

    workdir = Path(workdir)
    t_start = time.perf_counter()
    print(f"[1/4] tiny model and task suite in {workdir / 'assets'}", flush=True)
    assets = init_tiny(workdir / "assets")
    sft_dir = workdir / "sft-model"
    if not (sft_dir / "model.safetensors").is_file():
        print(f"[2/4] supervised warm start ({sft_seconds:.0f} s budget) -> {sft_dir}",
              flush=True)
        sft(assets.model_dir, assets.data_dir, sft_dir, max_seconds=sft_seconds, progress=True)
    else:
        print(f"[2/4] reusing the warm-started model in {sft_dir}", flush=True)
    config = demo_config(sft_dir, assets.data_dir, workdir / "run", steps)
    (workdir / "demo.yaml").write_text(config.to_yaml())
    print(f"[3/4] HARPO RL for {steps} steps on Ray (config: {workdir / 'demo.yaml'})",
          flush=True)
    connect(address)
    from services.controller import Trainer

    trainer = Trainer(config)
    try:
        before = trainer.evaluate()
        trainer.run()
        after = trainer.evaluate()
        factors = trainer.final_task_factors()
    finally:
        trainer.shutdown()
    task_types = dict(zip(trainer.train_set.task_names, trainer.train_set.task_types))
    print(f"[4/4] held-out results ({config.data.eval_prompts_per_task} test prompts per task, "
          f"greedy)\n", flush=True)
    print(format_report(before, after, factors, task_types))
    run_dir = config.run.output_dir
    print(f"\nrun directory: {run_dir} (config.yaml, metrics.jsonl, checkpoints/)")
    print(f"total time: {time.perf_counter() - t_start:.0f} s")
    return {"before": before, "after": after, "factors": factors, "run_dir": str(run_dir)}
