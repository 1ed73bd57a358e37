"""One run of a ``harpo compare`` study, in its own process (``python -m services.compare_run``).

It is a normal harpo run (the run directory, its lock and its checkpoints as ``harpo train``
makes them), framed by the study's held-out evaluation: greedy and sampled reward per task
before training (kept in ``results/RUN.before.json``, so a resumed run does not evaluate the
untrained model again) and after. The run counts as finished once ``results/RUN.json`` exists:
it is written last, atomically, after the final checkpoint and evaluation. A run interrupted
before that resumes from its latest valid checkpoint; one with no checkpoint yet starts again,
its partial directory moved aside (``RUN_DIR.old-…``), never deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

RESULT_VERSION = 1


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def is_finished(result_path: Path, steps: int) -> bool:
    """Whether a run's result says it completed all ``steps`` and was evaluated after."""
    if not result_path.is_file():
        return False
    try:
        result = json.loads(result_path.read_text())
    except (OSError, ValueError):
        return False
    return bool(result.get("finished")) and result.get("steps") == steps


def evaluate(trainer, samples: int) -> dict:
    """Greedy reward/accuracy per task, and the policy's sampled reward (``samples`` responses
    per prompt at the training temperature)."""
    temperature = trainer.config.rollout.temperature
    out = {"greedy": trainer.evaluate()}
    if samples > 0 and temperature > 0:
        out["sampled"] = trainer.evaluate(samples=samples, temperature=temperature)
    return out


def run_one(plan: Path, result: Path, before: Path, address: str | None, samples: int) -> int:
    from services.cluster import connect
    from services.config import load_config
    from services.run_dir import RunDir
    from services.run_owner import claim_for_training, move_earlier_run, record_config

    config = load_config(plan)
    started = time.perf_counter()
    resume = RunDir(config.run.output_dir).latest_valid_checkpoint() is not None
    lock = claim_for_training(config, resume=resume, overwrite=False, move_unfinished=True)
    with lock:
        move_earlier_run(config, resume=resume)
        connect(address)
        from services.controller import Trainer

        trainer = Trainer(config, resume=resume)
        record_config(trainer, resume=resume, overrides={}, note=None)
        try:
            if before.is_file():
                evaluated_before = json.loads(before.read_text())
            else:
                evaluated_before = evaluate(trainer, samples)
                write_json_atomic(before, evaluated_before)
            trainer.run()
            evaluated_after = evaluate(trainer, samples)
            factors = trainer.final_task_factors()
            steps = trainer.completed_steps
        finally:
            trainer.shutdown()
    write_json_atomic(result, {
        "version": RESULT_VERSION, "finished": steps == config.run.steps, "steps": steps,
        "resumed": resume, "before": evaluated_before, "after": evaluated_after,
        "final_task_factors": factors, "wall_s": time.perf_counter() - started})
    return 0 if steps == config.run.steps else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.compare_run")
    parser.add_argument("plan", type=Path, help="the run's configuration (plans/RUN.yaml)")
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--address", default=None)
    parser.add_argument("--eval-samples", type=int, default=4)
    args = parser.parse_args(argv)
    from services.cluster import apply_env_defaults

    apply_env_defaults()
    return run_one(args.plan, args.result, args.before, args.address, args.eval_samples)


if __name__ == "__main__":
    sys.exit(main())
