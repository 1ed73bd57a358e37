"""Waiting for a node that can host an actor or the learners' placement group.

When a node dies (a preempted spot instance, an OOM-killed pod), the actors on it die with it
and their replacements need a node with the same resources. Until KubeRay or the autoscaler
brings one, Ray keeps the request pending; :class:`CapacityWait` waits for it with progress
(a log line every ``log_every_s`` and ``on_waiting(role, True/False)``, which the driver turns
into the ``harpo_waiting_for_capacity`` gauge), up to ``run.capacity_timeout_s`` of waiting,
after which :class:`CapacityTimeout` names the resources nobody could provide.

Only time spent *unplaced* counts against the deadline — until Ray has leased a worker
process for the actor on some node (starting that process is included, seconds on a loaded
host); after that the actor may take as long as it needs to start (a large model loads
slowly). Placement is read from the GCS actor table (``ray._private.state``, a private API:
where it cannot be read, all waiting counts). A replacement placed on a node
that is already dead but not yet known to be (Ray marks a node dead after missed heartbeats)
dies at once; it is started again, on whatever node has the resources.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import ray
from ray.exceptions import RayActorError

log = logging.getLogger(__name__)

_PENDING_STATES = ("DEPENDENCIES_UNREADY", "PENDING_CREATION")


class CapacityTimeout(RuntimeError):
    """No node could host ``what`` (needing ``resources``) within the deadline."""

    def __init__(self, role: str, what: str, resources: dict, waited_s: float, timeout_s: float):
        self.role, self.resources, self.waited_s = role, dict(resources), waited_s
        super().__init__(
            f"no node with {format_resources(resources)} for {what} after waiting "
            f"{waited_s:.0f} s (run.capacity_timeout_s = {timeout_s:g}); add a node with "
            f"these resources (or raise run.capacity_timeout_s) and resume")


def format_resources(resources: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}"
                     for k, v in sorted(resources.items()) if v) or "no resources"


def _placed(actor) -> bool | None:
    """Whether Ray has found a node for ``actor`` (None: cannot tell). An actor not yet placed
    has no worker address in the GCS actor table."""
    try:
        from ray._private.state import state

        entry = state.actor_table(actor._actor_id.hex())
    except Exception:  # noqa: BLE001 - a private API: without it, every wait counts
        return None
    if not entry:
        return None
    if entry.get("State") not in _PENDING_STATES:
        return True
    return bool((entry.get("Address") or {}).get("Port"))


class CapacityWait:
    """Deadline-bounded waits for placement; ``timeout_s`` counts unplaced time only."""

    def __init__(self, timeout_s: float, on_waiting: Callable[[str, bool], None] | None = None,
                 log_every_s: float = 10.0):
        self.timeout_s = timeout_s
        self.log_every_s = log_every_s
        self._on_waiting = on_waiting or (lambda role, waiting: None)

    def ready(self, role: str, name: str, make: Callable[[], object], resources: dict,
              actor=None):
        """``actor`` (or ``make()``'s) once its ``ready()`` answers. One that dies before
        (placed on a node that was dying) is made again; ``CapacityTimeout`` after
        ``timeout_s`` unplaced."""
        actor = make() if actor is None else actor
        ref = actor.ready.remote()
        unplaced, waiting, last_log = 0.0, False, time.monotonic()
        tick = min(1.0, self.log_every_s)
        try:
            while True:
                t0 = time.monotonic()
                done, _ = ray.wait([ref], timeout=tick)
                if done:
                    try:
                        ray.get(ref)
                        return actor
                    except RayActorError as exc:
                        if getattr(exc, "actor_init_failed", False):
                            raise  # its own start-up failed (a bug, bad input): no retry
                        log.warning("%s %s died while starting (%s); starting it again",
                                    role, name, _last_line(exc))
                        ray.kill(actor)
                        actor = make()
                        ref = actor.ready.remote()
                        continue
                if _placed(actor) is True:
                    continue  # placed: starting, however long that takes
                unplaced += time.monotonic() - t0
                if not waiting and unplaced >= tick:
                    waiting = True
                    self._on_waiting(role, True)
                if waiting and time.monotonic() - last_log >= self.log_every_s:
                    last_log = time.monotonic()
                    log.warning("%s %s: waiting for a node with %s (%.0f s of %g s, "
                                "run.capacity_timeout_s)", role, name,
                                format_resources(resources), unplaced, self.timeout_s)
                if unplaced >= self.timeout_s:
                    ray.kill(actor)
                    raise CapacityTimeout(role, f"{role} {name}", resources, unplaced,
                                          self.timeout_s)
        finally:
            if waiting:
                self._on_waiting(role, False)

    def placement_group(self, role: str, pg, bundles: list[dict]) -> None:
        """Wait until placement group ``pg`` (``bundles``) is placed."""
        start = last_log = time.monotonic()
        waiting = False
        try:
            while not pg.wait(timeout_seconds=min(1.0, self.log_every_s)):
                waited = time.monotonic() - start
                if not waiting:
                    waiting = True
                    self._on_waiting(role, True)
                if time.monotonic() - last_log >= self.log_every_s:
                    last_log = time.monotonic()
                    log.warning("%s: waiting for nodes for %d bundle(s) of %s (%.0f s of %g s, "
                                "run.capacity_timeout_s)", role, len(bundles),
                                format_resources(bundles[0]), waited, self.timeout_s)
                if waited >= self.timeout_s:
                    total = {k: v * len(bundles) for k, v in bundles[0].items()}
                    raise CapacityTimeout(role, f"the {len(bundles)} {role}(s)' placement group",
                                          total, waited, self.timeout_s)
        finally:
            if waiting:
                self._on_waiting(role, False)


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
