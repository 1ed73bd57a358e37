"""The central HARPO modulator: one named Ray actor holding the EMA state of a run.

It receives per-group statistics only (``GroupStats``: a task code, a size and a signal per
prompt), never rollout batches, and answers with the factors. Updates are keyed by step, so a
controller that retries a step after a failure gets the stored answer instead of a second update.
"""

from __future__ import annotations

import ray

from harpo_core import GroupStats, HarpoConfig, HarpoModulator


def modulator_name(run_name: str) -> str:
    return f"harpo-modulator:{run_name}"


@ray.remote
class ModulatorService:
    def __init__(self, config: HarpoConfig, state: dict | None = None):
        self.modulator = HarpoModulator(config)
        if state is not None:
            self.modulator.load_state_dict(state)
        self.largest_message = 0  # rows in the largest statistics message received

    def update(self, step: int, stats: GroupStats) -> dict:
        self.largest_message = max(self.largest_message, int(stats.size.size))
        return self.modulator.update_groups(step, stats).to_dict()

    def state_dict(self) -> dict:
        return self.modulator.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.modulator.load_state_dict(state)

    def task_factors(self) -> dict[str, float]:
        return self.modulator.task_factors()

    def stats(self) -> dict:
        return {"largest_message_rows": self.largest_message,
                "last_step": self.modulator.last_step}
