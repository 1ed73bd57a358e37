"""The training loop's side of the control API: commands in, snapshots out.

gRPC calls arrive on server threads, but a step is not something to interrupt: the actors are
mid-flight and the modulator has been told about the step. So commands are queued here and the
training loop runs them between steps (:meth:`TrainerControl.serve`), answering each call's
future. Reads (status, modulator state) never wait for the loop: they return the snapshot taken
after the last step.

The modulator snapshot covers every task the modulator holds state for, not only the last
batch's: each step's answer updates the tasks in it, and the first snapshot (and the first after
a restart rewound the steps) starts from the estimator's own state, read once on the loop's
thread between steps.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Protocol

from services.config import TrainConfig

# How long a blocking command (checkpoint, scale, stop) may wait for the current step to end.
COMMAND_TIMEOUT_S = 3600.0


class Driver(Protocol):
    """What the control API needs from the training loop (``services.controller.Trainer``)."""

    run_dir: object  # services.run_dir.RunDir

    def progress(self) -> dict:
        """``step`` (completed), ``policy_version``, ``rollout_workers``."""
        ...

    def scale_rollouts(self, workers: int) -> int: ...

    def checkpoint(self) -> Path: ...


class TrainerControl:
    """Implements ``services.control.target.ControlTarget`` for a training loop."""

    def __init__(self, driver: Driver, config: TrainConfig,
                 on_state: Callable[[str], None] = lambda state: None):
        self._driver = driver
        self._config = config
        self._on_state = on_state
        self._commands: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._state = "starting"
        self._paused = False
        self.stop_requested = False
        self._signal_stop = False
        self._stop_futures: list[Future] = []
        self._last_row: dict = {}
        self._modulator: dict = {"step": None, "reference": None, "tasks": {}}
        self._tasks: dict[str, dict] = {}  # every task's modulator state, by name
        self._seeded_at: int | None = None  # step after which _tasks was read from the estimator

    # ------------------------------------------------------------------ RPC side (any thread)

    def status(self) -> dict:
        progress = self._driver.progress()
        row = self._last_row
        with self._lock:
            state = self._state
        return {
            "job": self._config.run.name,
            "state": state,
            "step": progress["step"],
            "total_steps": self._config.run.steps,
            "policy_version": progress["policy_version"],
            "rollout_workers": progress["rollout_workers"],
            "rollouts_per_s": float(row.get("rollouts_per_s", 0.0)),
            "tokens_per_s": float(row.get("tokens_per_s", 0.0)),
            "last_step_s": float(row.get("timing", {}).get("step_s", 0.0)),
            "run_dir": str(self._driver.run_dir.root),
        }

    def modulator_state(self) -> dict:
        with self._lock:
            return {**self._modulator,
                    "tasks": {n: dict(t) for n, t in self._modulator["tasks"].items()}}

    def scale_rollouts(self, workers: int) -> dict:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"rollout workers must be a positive integer, got {workers!r}")
        policy = self._config.rollout.autoscale
        if policy.enabled and not policy.min_workers <= workers <= policy.max_workers:
            raise ValueError(
                f"autoscaling keeps rollout workers within [{policy.min_workers}, "
                f"{policy.max_workers}] (rollout.autoscale); asked for {workers}")
        previous = self._submit("scale", workers)
        return {"previous": previous, "target": workers}

    def checkpoint(self) -> str:
        return self._submit("checkpoint")

    def pause(self) -> None:
        self._submit("pause")

    def resume(self) -> None:
        with self._lock:
            if not self._paused:
                raise ValueError("the job is not paused")
        self._submit("resume")

    def stop(self) -> str:
        """Graceful stop: the current step finishes, a checkpoint is written, the job ends."""
        return self._submit("stop")

    def _submit(self, command: str, *args):
        with self._lock:
            if self._state in ("finished", "failed"):
                raise ValueError(f"the job has {self._state}; it takes no more commands")
        future: Future = Future()
        self._commands.put((command, args, future))
        return future.result(timeout=COMMAND_TIMEOUT_S)

    # ------------------------------------------------------------------ loop side

    def set_state(self, state: str) -> None:
        with self._lock:
            self._state = state
        self._on_state(state)
        if state in ("finished", "failed"):
            self._drain(f"the job has {state}")

    def request_stop(self) -> None:
        """Stop after the current step, from a signal handler: sets a flag and nothing else
        (a handler may interrupt the loop inside the queue's lock)."""
        self._signal_stop = True

    def serve(self) -> None:
        """Run queued commands; while paused, keep serving until resumed or stopped."""
        while True:
            if self._signal_stop and not self.stop_requested:
                self.stop_requested, self._paused = True, False
                self.set_state("stopping")
            try:
                command, args, future = self._commands.get(timeout=0.2 if self._paused else 0)
            except queue.Empty:
                if self._paused and not self.stop_requested:
                    continue
                return
            self._run(command, args, future)

    def _run(self, command: str, args: tuple, future: Future) -> None:
        t = self._driver
        try:
            if command == "scale":
                future.set_result(t.scale_rollouts(*args))
            elif command == "checkpoint":
                future.set_result(str(t.checkpoint()))
            elif command == "pause":
                if self._paused:
                    raise ValueError("the job is already paused")
                self._paused = True
                self.set_state("paused")
                future.set_result(None)
            elif command == "resume":
                self._paused = False
                self.set_state("running")
                future.set_result(None)
            elif command == "stop":
                self.stop_requested = True
                self._paused = False
                self.set_state("stopping")
                self._stop_futures.append(future)  # answered once the checkpoint is written
            else:
                raise ValueError(f"unknown command {command!r}")
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            future.set_exception(exc)

    def after_step(self, row: dict, modulation) -> None:
        """Snapshot what the read-only calls return (the row first: reading the estimator's
        state after the first step takes a moment, and status must not lag behind it)."""
        with self._lock:
            self._last_row = row
        if modulation is not None:
            step = row["step"]
            last = self._modulator["step"]
            if last is None or step <= last:  # the first step, or a restart rewound the run
                self._tasks = self._estimator_tasks()
            in_batch = set(modulation.tasks)
            for name, task in self._tasks.items():
                if name not in in_batch:
                    task.update(in_batch=False, signal=0.0, batch_share=0.0,
                                zero_signal_groups=0)
            active = set(getattr(modulation, "active_tasks", modulation.tasks))
            for name in modulation.tasks:
                task = self._tasks.setdefault(name, {"last_update_step": None})
                task.update(
                    factor=modulation.task_factors[name],
                    unclamped_factor=math.exp(modulation.task_log_factors.get(name, 0.0)),
                    signal=modulation.task_signals.get(name, 0.0),
                    signal_ema=modulation.task_ema.get(name),
                    batch_share=row.get("batch_share", {}).get(name, 0.0),
                    zero_signal_groups=int(modulation.zero_signal_groups.get(name, 0)),
                    in_batch=True)
                if name in active:  # the modulator updates a task's state only when active
                    task["last_update_step"] = step
            tasks = {n: dict(t) for n, t in self._tasks.items()}
        with self._lock:
            if modulation is not None:
                reference = None if math.isnan(modulation.reference) else modulation.reference
                self._modulator = {"step": row["step"], "reference": reference, "tasks": tasks,
                                   "updated_at": time.time()}

    def _estimator_tasks(self) -> dict[str, dict]:
        """Every task in the HARPO modulator's state (``HarpoModulator.state_dict``), with the
        step of its last update where the replay history still holds it (else None)."""
        estimator = getattr(getattr(self._driver, "actors", None), "estimator", None)
        try:
            state = estimator.state_dict() if estimator is not None else {}
            saved = state.get("tasks") or {}
            clamp = (state.get("config") or {}).get("task_clamp")
        except Exception:  # noqa: BLE001 - a snapshot is a nicety: never fail a step for it
            return {}
        if not isinstance(saved, dict):
            return {}
        last_update = {}
        for entry in state.get("history") or ():
            for name in entry.get("result", {}).get("active_tasks", ()):
                last_update[name] = entry.get("step")
        tasks = {}
        for name, saved_task in saved.items():
            unclamped = math.exp(float(saved_task.get("log_factor", 0.0)))
            factor = min(max(unclamped, clamp[0]), clamp[1]) if clamp else unclamped
            tasks[name] = {"factor": factor, "unclamped_factor": unclamped, "signal": 0.0,
                           "signal_ema": saved_task.get("rho"), "batch_share": 0.0,
                           "zero_signal_groups": 0, "in_batch": False,
                           "last_update_step": last_update.get(name)}
        return tasks

    def stopped(self, checkpoint) -> None:
        for future in self._stop_futures:
            future.set_result(str(checkpoint))
        self._stop_futures.clear()

    def finish(self) -> None:
        if self.stop_requested and self._stop_futures:  # stopped at the last step anyway
            self.stopped(self._driver.run_dir.latest_valid_checkpoint())
        self.set_state("finished")

    def _drain(self, reason: str) -> None:
        """Answer every waiting call: the loop that would run them is gone."""
        for future in self._stop_futures:
            if not future.done():
                future.set_exception(ValueError(reason))
        self._stop_futures.clear()
        while True:
            try:
                _, _, future = self._commands.get_nowait()
            except queue.Empty:
                return
            future.set_exception(ValueError(reason))
