"""``harpo demo``: the embedded default run, end to end on one CPU machine.

Builds a tiny Qwen2-architecture model and a synthetic heterogeneous task suite, gives the
model a short supervised warm start (as the paper starts RL from an SFT checkpoint), trains it
with HARPO through the full Ray pipeline, and prints held-out reward per task before and after
with the final modulation factors.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from services.config import TrainConfig, parse_config

# From the 300-step warm start below, 40 RL steps raise the sampled reward of all three
# half-learned tasks (two seeds); 60 add little on them and cost the greedy answers of emotion.
# The whole demo takes about 3 1/2 minutes on 2 cores (benchmarks/RESULTS.md "## harpo demo").
RL_STEPS = 40
# Held-out evaluation, before and after RL, on EVAL_PROMPTS test prompts per task (all of them
# by default; `harpo demo --eval-prompts`): greedy, and the policy's own sampled reward
# (temperature as in training, EVAL_SAMPLES per prompt) - the quantity RL maximises, which
# moves first: RL makes the right answer likelier before it becomes the mode.
EVAL_SAMPLES, EVAL_PROMPTS = 4, 100
# The supervised warm start is bounded by steps, not time, so every demo starts RL from the
# same model (sft() is bitwise reproducible for fixed settings and thread count). lr 1e-2 for
# 300 steps solves the easy tasks and leaves the hard ones partly learned - greedy accuracy
# emotion 0.81, topic_long 0.52, compare 0.48 (chance 0.13, 0.25, 0.33). With 200 steps compare
# stays at chance, where RL has no feature to sharpen; 400 would spend half the demo's five
# minutes on the warm start alone.
SFT_STEPS = 300
SFT_SETTINGS = {"lr": 1e-2, "warmup_steps": 20, "batch_size": 32, "seed": 0, "num_threads": 2}


def demo_config(model_dir: Path, data_dir: Path, run_dir: Path, steps: int,
                endpoints: dict | None = None, eval_prompts: int = EVAL_PROMPTS) -> TrainConfig:
    """``endpoints``: ``metrics_host``/``metrics_port``/``control_host``/``control_port``
    (None or absent: the defaults, loopback and any free port)."""
    given = {k: v for k, v in (endpoints or {}).items() if v is not None}
    observability = {k: given[k] for k in ("metrics_host", "metrics_port") if k in given}
    control = {k.removeprefix("control_"): given[k] for k in ("control_host", "control_port")
               if k in given}
    return parse_config({
        "run": {"name": "demo", "output_dir": str(run_dir), "steps": steps,
                "checkpoint_every": 0, "seed": 0},
        "model": {"path": str(model_dir)},
        # 4 prompts per task and step: with 2 (14 per step) a task's signal is too thin for
        # RL to move it in 40 steps. All 100 test prompts of a task: standard error <= 0.05.
        "data": {"path": str(data_dir), "prompts_per_step": 28, "max_prompt_tokens": 256,
                 "eval_prompts_per_task": eval_prompts},
        # the longest target response is 26 tokens (QA answers), so 32 leaves room for eos
        "rollout": {"workers": 2, "group_size": 6, "max_new_tokens": 32, "temperature": 1.0,
                    "torch_threads": 1},
        "reward": {"scorers": 1, "torch_threads": 2},
        "algorithm": {"estimator": "harpo"},
        "learner": {"workers": 1, "lr": 3e-4, "mini_batch_prompts": 14, "ppo_epochs": 1,
                    "warmup_steps": 2, "torch_threads": 2},
        "observability": observability,
        "control": control,
    }, source="demo config")


def _saved_sft_matches(sft_dir: Path, steps: int) -> bool:
    """Whether ``sft_dir`` holds a complete warm start made with the demo's settings on the
    current version of the task suite."""
    from services.tiny.tasks import suite_fingerprint  # loads the task suite: only when asked

    path = sft_dir / "sft_metrics.json"
    if not (sft_dir / "model.safetensors").is_file() or not path.is_file():
        return False
    metrics = json.loads(path.read_text())
    settings = metrics.get("settings", {})
    wanted = {"steps": steps, **SFT_SETTINGS}
    return (not metrics.get("stopped_early", True)
            and metrics.get("suite_fingerprint") == suite_fingerprint()
            and all(settings.get(k) == v for k, v in wanted.items()))


def format_report(before: dict, after: dict, factors: dict[str, float],
                  task_types: dict[str, str], modalities: dict[str, str] | None = None) -> str:
    """Per-task table; ``before`` / ``after`` hold a ``sampled`` and a ``greedy`` evaluation.
    ``modalities`` (task -> modality signature) adds a modality column after the type."""
    columns = (("sampled", "reward"), ("greedy", "reward"), ("greedy", "accuracy"))
    lead = "" if modalities is None else f" {'':<11}"
    header = (f"{'':<13} {'':<15}{lead}" + "".join(f" {f'{m} {k}':>17}" for m, k in columns)
              + f" {'factor':>7}")
    sub = (f"{'task':<13} {'type':<15}" + ("" if modalities is None else f" {'modality':<11}")
           + f" {'before':>9} {'after':>7}" * len(columns) + f" {'s_m':>7}")
    lines = [header, sub, "-" * len(sub)]

    def cells(pick) -> str:
        return "".join(f" {pick(before[m][k]):>9.3f} {pick(after[m][k]):>7.3f}"
                       for m, k in columns)

    for task in sorted(before["greedy"]["reward"]):
        lines.append(f"{task:<13} {task_types.get(task, '?'):<15}"
                     + ("" if modalities is None else f" {modalities.get(task, '?'):<11}")
                     + cells(lambda d, task=task: d.get(task, float("nan")))
                     + f" {factors.get(task, float('nan')):>7.3f}")
    lines.append("-" * len(sub))
    lines.append(f"{'mean':<13} {'':<15}{lead}" + cells(lambda d: sum(d.values()) / len(d)))
    return "\n".join(lines)


def _move_earlier_run_aside(run_dir: Path) -> None:
    """A demo run again starts a new run; the earlier one is kept beside it."""
    from services.run_dir import RunDir
    from services.run_lock import LOCK_FILE

    run = RunDir(run_dir)
    if run.run_files():
        aside = run.move_aside(keep=(LOCK_FILE,))
        print(f"      moved the earlier demo run to {aside}", flush=True)


def run_demo(workdir: str | Path = "runs/demo", steps: int = RL_STEPS,
             sft_steps: int = SFT_STEPS, sft_seconds: float | None = None,
             address: str | None = None, endpoints: dict | None = None,
             eval_prompts: int = EVAL_PROMPTS) -> dict:
    """Assets, warm start (``sft_steps`` steps; ``sft_seconds`` is an optional safety cap
    that makes the run irreproducible when it bites), ``steps`` HARPO steps, report on
    ``eval_prompts`` held-out prompts per task. ``endpoints``: hosts and ports of metrics and
    control (``demo_config``)."""
    from services.cluster import connect
    from services.tiny.model import init_tiny
    from services.tiny.sft import sft

    workdir = Path(workdir)
    t_start = time.perf_counter()
    print(f"[1/4] tiny model and task suite in {workdir / 'assets'}", flush=True)
    assets = init_tiny(workdir / "assets", replace_stale=True)  # the demo owns this directory
    sft_dir = workdir / "sft-model"
    if _saved_sft_matches(sft_dir, sft_steps):
        print(f"[2/4] reusing the warm-started model in {sft_dir}", flush=True)
    else:
        print(f"[2/4] supervised warm start ({sft_steps} steps) -> {sft_dir}", flush=True)
        metrics = sft(assets.model_dir, assets.data_dir, sft_dir, steps=sft_steps,
                      max_seconds=sft_seconds, progress=True, **SFT_SETTINGS)
        if metrics["stopped_early"]:
            print(f"warning: the warm start hit --sft-seconds after {metrics['steps']} of "
                  f"{sft_steps} steps; this run is not reproducible", flush=True)
    config = demo_config(sft_dir, assets.data_dir, workdir / "run", steps, endpoints,
                         eval_prompts)
    (workdir / "demo.yaml").write_text(config.to_yaml())
    print(f"[3/4] HARPO RL for {steps} steps on Ray (config: {workdir / 'demo.yaml'})",
          flush=True)
    _move_earlier_run_aside(config.run.output_dir)
    connect(address)
    from services.controller import Trainer

    trainer = Trainer(config)
    for name, where in trainer.endpoints.addresses.items():
        print(f"      {name} endpoint: {where}", flush=True)
    if "control" in trainer.endpoints.addresses:
        print(f"      watch it: harpo status --run {config.run.output_dir}", flush=True)

    def evaluate() -> dict:
        return {"greedy": trainer.evaluate(),
                "sampled": trainer.evaluate(per_task=eval_prompts, samples=EVAL_SAMPLES,
                                            temperature=config.rollout.temperature)}

    try:
        before = evaluate()
        trainer.run()
        after = evaluate()
        factors = trainer.final_task_factors()
    finally:
        trainer.shutdown()
    task_types = dict(zip(trainer.train_set.task_names, trainer.train_set.task_types))
    print(f"[4/4] held-out results per task: sampled = mean reward of {EVAL_SAMPLES} responses "
          f"at temperature {config.rollout.temperature:g} to each of {eval_prompts} test "
          f"prompts (what RL maximises); greedy = one greedy response to each of "
          f"{config.data.eval_prompts_per_task}\n", flush=True)
    print(format_report(before, after, factors, task_types))
    run_dir = config.run.output_dir
    print(f"\nrun directory: {run_dir} (config.yaml, metrics.jsonl, checkpoints/)")
    print(f"total time: {time.perf_counter() - t_start:.0f} s")
    return {"before": before, "after": after, "factors": factors, "run_dir": str(run_dir)}
