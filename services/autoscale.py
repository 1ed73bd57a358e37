"""The rollout pool's autoscaling policy (``rollout.autoscale``), as a pure function."""

from __future__ import annotations

from services.config import AutoscaleSection


def autoscale_target(policy: AutoscaleSection, timing: dict, workers: int, *,
                     asynchronous: bool) -> tuple[int, float]:
    """The pool size after a step that took ``timing`` with ``workers`` rollout workers, and
    the share of the step spent waiting for rollouts.

    One worker more when that share is above ``target_generate_share + tolerance``, one fewer
    below ``target - tolerance``, within ``[min_workers, max_workers]``. Asynchronous mode
    generates during the update, so what counts there is how long the step waited for its
    rollouts, not how long they took.
    """
    waited = timing["rollout_wait_s" if asynchronous else "generate_s"]
    share = waited / max(timing["step_s"], 1e-9)
    if share > policy.target_generate_share + policy.tolerance:
        return min(workers + 1, policy.max_workers), share
    if share < policy.target_generate_share - policy.tolerance:
        return max(workers - 1, policy.min_workers), share
    return workers, share
