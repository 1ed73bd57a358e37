"""What a running job offers to its control API.

The training loop's ``services.trainer_control.TrainerControl`` implements this;
``ControlServer`` turns each RPC into one call. Keeping the interface a plain Protocol with dict
results keeps gRPC and protobuf out of the driver, and lets the tests serve a small in-process
double instead of a job.

Errors: raise ``ValueError`` when the user asked for something wrong or not possible now (the
message reaches the user as is: INVALID_ARGUMENT for ``scale_rollouts``, FAILED_PRECONDITION for
the others). Any other exception is a bug or a failure of the job: the caller gets INTERNAL with
its message, and the server keeps serving.

Threads: the server calls the target from its worker threads, several at a time (``status`` while
a ``stop`` waits, two clients at once), so implementations must be thread-safe. ``checkpoint`` and
``stop`` block until their checkpoint is written; the server keeps answering other calls meanwhile.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

JOB_STATES = ("starting", "running", "paused", "stopping", "finished", "failed")
JobState = Literal["starting", "running", "paused", "stopping", "finished", "failed"]


@runtime_checkable
class ControlTarget(Protocol):
    def status(self) -> dict:
        """Where the job is.

        Keys: ``job`` (str), ``state`` (one of ``JOB_STATES``), ``step`` (completed steps),
        ``total_steps``, ``policy_version``, ``rollout_workers`` (ints), ``rollouts_per_s``,
        ``tokens_per_s``, ``last_step_s`` (floats), ``run_dir`` (str).
        """
        ...

    def modulator_state(self) -> dict:
        """The HARPO modulator after the last step.

        ``{"step": int, "reference": float | None, "tasks": {name: {"factor", "unclamped_factor",
        "signal", "signal_ema" (float | None), "batch_share", "zero_signal_groups" (int)}}}``;
        ``tasks`` is empty when the estimator is not harpo or no step ran yet.
        """
        ...

    def scale_rollouts(self, workers: int) -> dict:
        """Resize the rollout pool to ``workers`` (>= 1, checked by the server already).

        Returns ``{"previous": int, "target": int}``; raises ValueError for a number the job cannot
        use (the message says why).
        """
        ...

    def checkpoint(self) -> str:
        """Write a checkpoint now; returns its path once it is written."""
        ...

    def pause(self) -> None:
        """Hold the job before its next step; ValueError when not running."""
        ...

    def resume(self) -> None:
        """Continue a paused job; ValueError when not paused."""
        ...

    def stop(self) -> str:
        """Graceful stop: finish the current step, checkpoint, exit.

        Blocks until the final checkpoint is written and returns its path. A second ``stop``
        while one is under way should wait for the same checkpoint.
        """
        ...
