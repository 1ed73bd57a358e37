"""Asynchronous mode's look-ahead: one step's rollouts generated while the learners update.

The prefetched step keeps the sampler state from before its prompts were drawn: a checkpoint
written while it is in flight records that state, and a prefetch that is thrown away (a
restart, an evaluation at another step) gives it back, so no prompt is lost or trained twice.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass

from services.rollout.pool import StepRollouts


@dataclass
class _Pending:
    step: int
    sampler_state: dict  # the sampler before this step's prompts were drawn
    future: Future  # -> StepRollouts


class Prefetcher:
    def __init__(self):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="harpo-prefetch")
        self._pending: _Pending | None = None

    def start(self, step: int, sampler_state: dict, generate: Callable[[], StepRollouts]
              ) -> None:
        """Run ``generate()`` (step ``step``'s rollouts) in the background."""
        self._pending = _Pending(step, sampler_state, self._executor.submit(generate))

    def take(self, step: int) -> StepRollouts | None:
        """Step ``step``'s prefetched rollouts (waiting for them), or None if there are none."""
        pending = self._pending
        if pending is None or pending.step != step:
            return None
        self._pending = None
        return pending.future.result()

    def settle(self) -> None:
        """Wait until a prefetch in flight is done (the rollout pool is idle); keep its result."""
        if self._pending is not None:
            wait_futures([self._pending.future])

    def discard(self) -> dict | None:
        """Drop a prefetched step once it ended; returns the sampler state to restore."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        wait_futures([pending.future])
        return pending.sampler_state

    def sampler_state(self) -> dict | None:
        """The sampler before the prefetched prompts were drawn (None: nothing prefetched)."""
        return None if self._pending is None else self._pending.sampler_state

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
