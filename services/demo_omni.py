"""``harpo demo --omni``: the demo on the omni suite (text, image, audio and video tasks).

As ``harpo demo`` (:mod:`services.demo`), with the tiny Qwen2.5-Omni thinker of ``harpo init-tiny
--omni`` and the HBA-format omni suite: a media-aware supervised warm start
(:func:`services.tiny.omni_sft.omni_sft`), HARPO through the full Ray pipeline with media
prompts, and the before/after held-out table per task with its modality.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from services.config import TrainConfig, parse_config
from services.demo import _move_earlier_run_aside, format_report

VIDEO_FPS = 4.0  # the omni suite's clips: 8 frames at 4 fps
# 30 steps: the whole demo took 9 1/2 minutes on 2 loaded cores (benchmarks/RESULTS.md
# "## harpo demo --omni"), a third of it the two held-out evaluations.
RL_STEPS = 30
# held-out: greedy on EVAL_PROMPTS test prompts per task (all 50), and EVAL_SAMPLES sampled
# responses to each
EVAL_SAMPLES, EVAL_PROMPTS = 2, 50
# The warm start is bounded by steps (reproducible per seed and thread count). 80 steps leave
# greedy accuracy image_colour 0.48, image_shape 0.56, parity 0.54, sentiment 0.48 (room for RL)
# with audio_pitch solved and video_motion at chance; 150 steps solve the text tasks and take
# image_colour to 0.74.
SFT_STEPS = 80
SFT_SETTINGS = {"lr": 1e-2, "warmup_steps": 10, "batch_size": 28, "seed": 0, "num_threads": 2,
                "video_fps": VIDEO_FPS}


def omni_demo_config(model_dir: Path, data_dir: Path, run_dir: Path, steps: int,
                     endpoints: dict | None = None,
                     eval_prompts: int = EVAL_PROMPTS) -> TrainConfig:
    given = {k: v for k, v in (endpoints or {}).items() if v is not None}
    observability = {k: given[k] for k in ("metrics_host", "metrics_port") if k in given}
    control = {k.removeprefix("control_"): given[k] for k in ("control_host", "control_port")
               if k in given}
    return parse_config({
        "run": {"name": "demo-omni", "output_dir": str(run_dir), "steps": steps,
                "checkpoint_every": 0, "seed": 0},
        "model": {"path": str(model_dir)},
        # 2 prompts per task and step (7 tasks); by default every test prompt (50 per task)
        "data": {"path": str(data_dir), "format": "hba", "video_fps": VIDEO_FPS,
                 "prompts_per_step": 14, "max_prompt_tokens": 256,
                 "eval_prompts_per_task": eval_prompts},
        "rollout": {"workers": 2, "group_size": 4, "max_new_tokens": 32, "temperature": 1.0,
                    "torch_threads": 1},
        "reward": {"scorers": 1, "torch_threads": 1},
        "algorithm": {"estimator": "harpo"},
        "learner": {"workers": 1, "lr": 3e-4, "mini_batch_prompts": 14, "ppo_epochs": 1,
                    "warmup_steps": 2, "torch_threads": 2},
        "observability": observability,
        "control": control,
    }, source="omni demo config")


def saved_omni_sft_matches(sft_dir: Path, steps: int) -> bool:
    """Whether ``sft_dir`` holds a complete omni warm start with the demo's settings made on
    the current omni suite."""
    from services.tiny.omni_tasks import omni_suite_fingerprint

    path = sft_dir / "sft_metrics.json"
    if not (sft_dir / "model.safetensors").is_file() or not path.is_file():
        return False
    metrics = json.loads(path.read_text())
    settings = metrics.get("settings", {})
    wanted = {"steps": steps, **SFT_SETTINGS}
    return (not metrics.get("stopped_early", True)
            and metrics.get("suite_fingerprint") == omni_suite_fingerprint()
            and all(settings.get(k) == v for k, v in wanted.items()))


def run_omni_demo(workdir: str | Path = "runs/demo-omni", steps: int = RL_STEPS,
                  sft_steps: int = SFT_STEPS, sft_seconds: float | None = None,
                  address: str | None = None, endpoints: dict | None = None,
                  eval_prompts: int = EVAL_PROMPTS) -> dict:
    """Assets, media warm start, ``steps`` HARPO steps on Ray, the per-task report on
    ``eval_prompts`` held-out prompts per task."""
    from services.cluster import connect
    from services.tiny.omni_model import init_tiny_omni
    from services.tiny.omni_sft import omni_sft

    workdir = Path(workdir)
    t_start = time.perf_counter()
    print(f"[1/4] tiny Omni thinker and omni suite in {workdir / 'assets'}", flush=True)
    assets = init_tiny_omni(workdir / "assets")
    sft_dir = workdir / "sft-model"
    if saved_omni_sft_matches(sft_dir, sft_steps):
        print(f"[2/4] reusing the warm-started model in {sft_dir}", flush=True)
    else:
        print(f"[2/4] supervised warm start with media ({sft_steps} steps) -> {sft_dir}",
              flush=True)
        metrics = omni_sft(assets.model_dir, assets.data_dir, sft_dir, steps=sft_steps,
                           max_seconds=sft_seconds, progress=True, **SFT_SETTINGS)
        if metrics["stopped_early"]:
            print(f"warning: the warm start hit --sft-seconds after {metrics['steps']} of "
                  f"{sft_steps} steps; this run is not reproducible", flush=True)
    config = omni_demo_config(sft_dir, assets.data_dir, workdir / "run", steps, endpoints,
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

    def evaluate() -> dict:
        return {"greedy": trainer.evaluate(),
                "sampled": trainer.evaluate(samples=EVAL_SAMPLES,
                                            temperature=config.rollout.temperature)}

    try:
        before = evaluate()
        trainer.run()
        after = evaluate()
        factors = trainer.final_task_factors()
    finally:
        trainer.shutdown()
    task_types = dict(zip(trainer.train_set.task_names, trainer.train_set.task_types))
    n = config.data.eval_prompts_per_task
    print(f"[4/4] held-out results per task: sampled = mean reward of {EVAL_SAMPLES} responses "
          f"at temperature {config.rollout.temperature:g} to each of {n} test prompts (what RL "
          f"maximises); greedy = one greedy response to each of {n}\n", flush=True)
    print(format_report(before, after, factors, task_types, trainer.task_modality))
    print(f"\nrun directory: {config.run.output_dir} (config.yaml, metrics.jsonl, checkpoints/)")
    print(f"total time: {time.perf_counter() - t_start:.0f} s")
    return {"before": before, "after": after, "factors": factors,
            "modality": dict(trainer.task_modality), "run_dir": str(config.run.output_dir)}
