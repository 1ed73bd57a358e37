"""What ``harpo train`` / ``eval`` / ``sft`` do around the run itself: the checks before it,
the signals during it, the report after it, and the one error message when it fails.

Exit statuses (README "Failures"): 0 done; 2 the input cannot be used (command line, config,
data, model, output directory, ports: nothing was started or written); 1 the run failed after
it started; 130 / 143 stopped by SIGINT / SIGTERM after writing a checkpoint (or aborted by a
second signal).
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
import traceback
from pathlib import Path

EXIT_RUNTIME, EXIT_USAGE = 1, 2
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


# ---------------------------------------------------------------------------- errors


def _ray_cause(exc: BaseException) -> str | None:
    """The last line of a Ray actor's start-up or task failure, or None if not from Ray."""
    try:
        from ray import exceptions as rex
    except ImportError:  # pragma: no cover - ray is a dependency
        return None
    ray_errors = tuple(getattr(rex, n) for n in ("RayActorError", "RayTaskError", "RayError")
                       if hasattr(rex, n))
    if not isinstance(exc, ray_errors):
        return None
    # str() of a Ray error carries the remote traceback; its last line is the cause
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def explain(exc: BaseException, started: bool) -> tuple[str, int]:
    """One message and the exit status for an expected failure (raises what it can't say)."""
    import yaml

    from services.config import ConfigError
    from services.preflight import PreflightError

    cause = _ray_cause(exc)
    if cause is not None:
        return (f"a Ray actor failed: {cause} (run with --debug for the traceback)",
                EXIT_RUNTIME)
    if isinstance(exc, (ConfigError, PreflightError, yaml.YAMLError)):
        return str(exc), EXIT_USAGE
    if isinstance(exc, MemoryError):
        return ("out of memory; lower rollout.group_size, data.prompts_per_step or "
                "learner.micro_batch_size", EXIT_RUNTIME)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {exc.filename}" if exc.filename else ""
        return (f"the disk is full{where}; free some space and resume with "
                f"`harpo train --resume RUN_DIR`", EXIT_RUNTIME)
    if isinstance(exc, (ValueError, OSError, LookupError)):
        message = str(exc) or type(exc).__name__
        if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in message:
            message = f"{exc.filename}: {message}"
        return message, (EXIT_RUNTIME if started else EXIT_USAGE)
    if isinstance(exc, RuntimeError):
        return str(exc), EXIT_RUNTIME
    raise exc


def report_error(exc: BaseException, *, started: bool, debug: bool) -> int:
    message, status = explain(exc, started)
    if debug:
        traceback.print_exception(exc)
    print(f"harpo: error: {message}", file=sys.stderr, flush=True)
    return status


# ---------------------------------------------------------------------------- before


def check_before_start(config, *, resume: bool, splits=None, ports: bool = True,
                       output: bool = True, quiet: bool = False):
    """:func:`services.preflight.preflight`, timed, before Ray starts."""
    import time

    from services.preflight import preflight

    t0 = time.perf_counter()
    plan = preflight(config, resume=resume, splits=splits, ports=ports, output=output)
    if quiet:  # the output is for machines (--json)
        return plan
    tasks = ", ".join(f"{k} {v}" for k, v in plan.tasks.items())
    print(f"preflight: model {plan.model_dir} ({plan.weights_bytes / 2**20:.1f} MiB), "
          f"train prompts: {tasks or '-'} ({time.perf_counter() - t0:.1f} s)", flush=True)
    if plan.memory is not None:
        print(plan.memory.table(), flush=True)
    return plan


def check_sft_args(model: str, data: str, out: str) -> None:
    """``harpo sft``: model, data and output directory, before the model is loaded."""
    from harpo_core.data import find_shards
    from services.preflight import (
        PreflightError,
        check_model_dir,
        check_output_dir,
        load_tokenizer,
    )

    model_config, weights = check_model_dir(model, what="--model")
    load_tokenizer(model, model_config)
    try:
        find_shards(data, "train")
    except (ValueError, OSError) as exc:
        raise PreflightError(f"--data: {exc}") from None
    check_output_dir(out, 2 * weights, what="--out")


def check_init_tiny_out(out: str) -> None:
    from services.preflight import check_output_dir

    check_output_dir(out, what="init-tiny OUT")


# ---------------------------------------------------------------------------- during


class StopSignals:
    """SIGINT and SIGTERM stop gracefully: the step in flight finishes (an update is never
    cut in half), a checkpoint is written and the loop ends; a second signal aborts at once
    (checkpoints are atomic renames, so the last one stays intact)."""

    def __init__(self, control, checkpoints: Path | None = None):
        self.control = control
        self.checkpoints = checkpoints  # where a failed or aborted run may leave a .tmp-*
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        for sig in SIGNAL_EXIT:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # The loop is over and its checkpoint written: a signal now (while Ray shuts down,
        # in its atexit hook) ends the process at once instead of a traceback from Ray's
        # shutdown; Ray's own processes share its fate.
        for sig in self._previous:
            signal.signal(sig, _exit_now)
        if exc_type is not None and self.checkpoints is not None:
            remove_partial_checkpoints(self.checkpoints)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            os.write(2, f"\nharpo: second {name}: aborting now\n".encode())
            raise KeyboardInterrupt(name)
        self.received = signum
        self.control.request_stop()
        # os.write, not print: a handler may interrupt a print in progress
        os.write(2, f"\nharpo: {name} received: finishing the step in flight, then writing a "
                    f"checkpoint (send it again to abort at once)\n".encode())

    @property
    def name(self) -> str | None:
        return None if self.received is None else signal.Signals(self.received).name


def _exit_now(signum, frame) -> None:
    name = signal.Signals(signum).name
    os.write(2, f"\nharpo: {name} while shutting down: exiting now\n".encode())
    os._exit(SIGNAL_EXIT.get(signum, 1))


def remove_partial_checkpoints(checkpoints: Path) -> None:
    """Remove the checkpoint this process was writing when it failed or was aborted (a
    ``.tmp-*-PID`` directory: never renamed into place, so never used by --resume)."""
    import shutil

    for partial in Path(checkpoints).glob(f".tmp-*-{os.getpid()}"):
        shutil.rmtree(partial, ignore_errors=True)


# ---------------------------------------------------------------------------- after


def format_task_table(row: dict, task_types: dict[str, str]) -> str:
    """Per-task reward, accuracy, format and modulation factor of one metrics row."""
    factors = row.get("task_factor") or {}
    header = (f"{'task':<15} {'type':<15} {'reward':>7} {'accuracy':>8} {'format':>7} "
              f"{'factor':>7}")
    lines = [header, "-" * len(header)]
    for task in sorted(row["reward"]):
        factor = factors.get(task)
        lines.append(f"{task:<15} {task_types.get(task, '?'):<15} {row['reward'][task]:>7.3f} "
                     f"{row['accuracy'].get(task, float('nan')):>8.3f} "
                     f"{row['format'].get(task, float('nan')):>7.3f} "
                     + (f"{factor:>7.3f}" if factor is not None else f"{'-':>7}"))
    return "\n".join(lines)


def report_train(config, trainer, rows: list[dict], signals: StopSignals) -> int:
    """The end of ``harpo train``: a per-task table, where things are, and the exit status."""
    run_dir = Path(os.path.normpath(Path(config.run.output_dir).absolute()))
    done, total = trainer.completed_steps, config.run.steps
    types = dict(zip(trainer.train_set.task_names, trainer.train_set.task_types))
    if rows:
        print(f"\nlast step ({rows[-1]['step'] + 1}): reward per task\n"
              + format_task_table(rows[-1], types))
    stopped = trainer.control.stop_requested and done < total
    if stopped:
        checkpoint = trainer.run_dir.latest_valid_checkpoint()
        by = signals.name or "harpo stop"
        print(f"stopped at step {done} of {total} by {by}; checkpoint {checkpoint}; resume "
              f"with: harpo train --resume {run_dir}", flush=True)
        return SIGNAL_EXIT.get(signals.received, 0)
    if rows:
        print(f"finished step {done}/{total}: mean reward {rows[-1]['reward_mean']:.3f}; "
              f"run directory {run_dir}")
    else:
        print(f"nothing to do: the run already completed {total} steps; run directory "
              f"{run_dir}")
    return 0


def format_eval(result: dict) -> str:
    header = f"{'task':<15} {'reward':>7} {'accuracy':>8} {'format':>7} {'rollouts':>8}"
    lines = [header, "-" * len(header)]
    for task in sorted(result["reward"]):
        lines.append(f"{task:<15} {result['reward'][task]:>7.3f} "
                     f"{result['accuracy'].get(task, float('nan')):>8.3f} "
                     f"{result['reward_format'].get(task, float('nan')):>7.3f} "
                     f"{result['rollouts'].get(task, 0):>8d}")
    mean = sum(result["reward"].values()) / max(len(result["reward"]), 1)
    lines += ["-" * len(header), f"{'mean':<15} {mean:>7.3f}"]
    return "\n".join(lines)
