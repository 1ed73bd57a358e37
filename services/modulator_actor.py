"""The central HARPO modulator: one named Ray actor holding the EMA state of a run.

It receives per-group statistics only (``GroupStats``: a task code, a size and a signal per
prompt), never rollout batches, and answers with the factors. Updates are keyed by step, so a
controller that retries a step after a failure gets the stored answer instead of a second update.

Restarts: given a ``state_path``, the actor writes its state there (atomically) after every
update, before answering. Ray restarts a dead modulator with the same constructor arguments;
the restarted actor sees that it was reconstructed and loads the file, which holds every update
it ever answered. The caller's retried update is then either applied for the first time or
answered from the replay cache: never applied twice.

:class:`RemoteModulator` puts the actor behind the in-process modulator's surface, so the
``harpo`` estimator takes it as its modulator: ``make_estimator("harpo", modulator=
RemoteModulator(handle))``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import ray

from harpo_core import GroupModulation, GroupStats, HarpoConfig, HarpoModulator


def modulator_name(run_name: str) -> str:
    return f"harpo-modulator:{run_name}"


@ray.remote
class ModulatorService:
    def __init__(self, config: HarpoConfig, state: dict | None = None,
                 state_path: str | None = None):
        self.modulator = HarpoModulator(config)
        self.state_path = Path(state_path) if state_path else None
        self.restarts = 0  # times Ray restarted this actor after a crash
        with warnings.catch_warnings():  # Ray 2.60 warns from inside its own property
            warnings.simplefilter("ignore", DeprecationWarning)
            reconstructed = ray.get_runtime_context().was_current_actor_reconstructed
        if reconstructed and self.state_path is not None and self.state_path.is_file():
            saved = json.loads(self.state_path.read_text())
            state, self.restarts = saved["modulator"], saved["restarts"] + 1
        if state is not None:
            self.modulator.load_state_dict(state)
        self._persist()
        self.largest_message = 0  # rows in the largest statistics message received

    def _persist(self) -> None:
        if self.state_path is None:
            return
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"modulator": self.modulator.state_dict(),
                                   "restarts": self.restarts}))
        os.replace(tmp, self.state_path)

    def update(self, step: int, stats: GroupStats) -> tuple[dict, int]:
        """The step's factors (``GroupModulation.to_dict``) and this actor's restart count."""
        self.largest_message = max(self.largest_message, int(stats.size.size))
        result = self.modulator.update_groups(step, stats).to_dict()
        self._persist()
        return result, self.restarts

    def ready(self) -> dict:
        return {"pid": os.getpid(), "restarts": self.restarts}

    def state_dict(self) -> dict:
        return self.modulator.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.modulator.load_state_dict(state)
        self._persist()  # a restart after this must reload the loaded state, not the old one

    def task_factors(self) -> dict[str, float]:
        return self.modulator.task_factors()

    def stats(self) -> dict:
        return {"largest_message_rows": self.largest_message,
                "last_step": self.modulator.last_step}


class RemoteModulator:
    """A :class:`ModulatorService` actor behind the in-process modulator's surface.

    ``on_restart("modulator")`` is called once for every restart of the actor that an update
    reports (Ray restarted it and it reloaded its live state file), so the caller can count it.
    """

    def __init__(self, handle, on_restart: Callable[[str], None] | None = None):
        self.handle = handle
        self.on_restart = on_restart
        self.restarts_seen = 0

    def update_groups(self, step: int, stats: GroupStats) -> GroupModulation:
        answer, restarts = ray.get(self.handle.update.remote(step, stats))
        while self.restarts_seen < restarts:
            self.restarts_seen += 1
            if self.on_restart is not None:
                self.on_restart("modulator")
        return GroupModulation.from_dict(answer)

    def state_dict(self) -> dict:
        return ray.get(self.handle.state_dict.remote())

    def load_state_dict(self, state: dict) -> None:
        ray.get(self.handle.load_state_dict.remote(state))

    def task_factors(self) -> dict[str, float]:
        return ray.get(self.handle.task_factors.remote())

    def stats(self) -> dict:
        return ray.get(self.handle.stats.remote())
