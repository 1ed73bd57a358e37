"""The driver's view of the rollout and reward actors: an elastic pool that never loses a prompt.

A step's prompts are cut into requests (fixed chunks, so a request's content and seed do not
depend on how many workers there are). Idle workers pull the next request; each finished
generation goes straight to a reward scorer, so scoring overlaps the remaining generation.
The scorer returns a small summary for the driver and the scored batch cut into one shard per
learner rank (``learner_shards``); the step's shards are handed on by rank, for each rank to
fetch its own (``LearnerGroup.update``).

Weights: :meth:`RolloutPool.sync` gives every worker a weight-sync handle
(:mod:`services.weight_sync`) and keeps it, so a worker started later loads the same version
(through a handle the run's weight sync re-issues for it: a collective broadcast cannot be
received twice).

Failures: when a request's scored summary cannot be fetched, the pool asks which actor died
(a dead actor answers a ping with an error at once), replaces it — a new rollout worker loads
the current policy weights before it serves — and issues the request again. A request carries
its own seed, so the re-issued request produces the same rollouts: each prompt of a step is
trained on exactly once, whatever failed. An error that is not an actor death (a bug, bad data)
is raised, not retried.

Scaling happens between steps (the pool is idle then, so removal drains nothing in flight):
new workers are ready and hold the current weights before they are given a request.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import ray
from ray.exceptions import RayActorError

from services.capacity import CapacityWait
from services.rollout.backend import SamplingParams
from services.rollout.worker import RolloutRequest
from services.weight_sync import WeightHandle, WeightSync

log = logging.getLogger(__name__)

ActorFactory = Callable[[str], "ray.actor.ActorHandle"]


class RolloutFailure(RuntimeError):
    """A request failed more often than the retry budget allows."""


@dataclass
class _Member:
    name: str
    actor: ray.actor.ActorHandle
    busy: bool = False


@dataclass
class StepRollouts:
    """What a step's rollout phase hands on: scored-batch shard refs and their summaries.

    ``shards[r]``: learner rank ``r``'s shard of every request, in request order (rows with
    ``rollout_id % len(shards) == r``). ``summary``: per-rollout columns of all requests,
    concatenated in request order (``rollout_id`` included).
    """

    shards: list[list]
    summary: dict[str, np.ndarray]
    times: dict[str, float]
    per_worker: dict[str, int] = field(default_factory=dict)  # rollouts generated per worker


@dataclass
class SyncResult:
    seconds: dict[str, float] = field(default_factory=dict)  # load time per worker
    failures: int = 0  # workers lost (and replaced) during the sync


class RolloutPool:
    def __init__(self, make_worker: ActorFactory, make_scorer: ActorFactory, *, workers: int,
                 scorers: int, version: int, max_retries: int = 3,
                 on_restart: Callable[[str], None] | None = None,
                 on_queue_depth: Callable[[int], None] | None = None,
                 learner_shards: int = 1, weight_sync: WeightSync | None = None,
                 capacity: CapacityWait | None = None, resources: dict[str, dict] | None = None,
                 on_retire: Callable[[str], None] | None = None):
        self._make_worker, self._make_scorer = make_worker, make_scorer
        # the driver's weight sync: re-issues handles to newcomers (None: handles are reusable)
        self._weight_sync = weight_sync or WeightSync()
        # node loss: a replacement waits (bounded) for a node with its role's resources
        self._capacity = capacity
        self._resources = resources or {}
        self.version = version
        self.weights: WeightHandle | None = None  # the current version's (None: model_dir's)
        if learner_shards < 1:
            raise ValueError(f"learner_shards must be >= 1 (learner.workers), "
                             f"got {learner_shards}")
        self.learner_shards = learner_shards  # scored batches are cut for this many ranks
        self.max_retries = max_retries
        self._on_restart = on_restart or (lambda role: None)
        self._on_queue_depth = on_queue_depth or (lambda depth: None)
        self._on_retire = on_retire or (lambda name: None)  # after an actor is killed
        self._serial = Counter()
        self.workers: list[_Member] = []
        self.scorers: list[_Member] = []
        self.queue_depth = 0  # requests of the running step not yet handed to a worker
        self._add("rollout", workers)
        self._add("reward", scorers)

    # ------------------------------------------------------------------ membership

    def _new(self, role: str) -> _Member:
        name = f"{role}-{self._serial[role]}"
        self._serial[role] += 1
        factory = self._make_worker if role == "rollout" else self._make_scorer
        return _Member(name, factory(name))

    def _add(self, role: str, count: int) -> None:
        members = [self._new(role) for _ in range(count)]
        for member in members:  # started together, awaited in turn
            member.actor = self._ready(role, member)
        if role == "rollout":
            if self.weights is not None:
                handle = self._weight_sync.reissue(self.weights, len(members))
                ray.get([m.actor.set_weights.remote(self.version, handle) for m in members])
            self.workers.extend(members)
        else:
            self.scorers.extend(members)

    def _ready(self, role: str, member: _Member):
        """``member``'s actor once it answers; on a cluster that lost a node, the wait for a
        node with the role's resources is bounded (``services.capacity``)."""
        if self._capacity is None:
            ray.get(member.actor.ready.remote())
            return member.actor
        factory = self._make_worker if role == "rollout" else self._make_scorer
        return self._capacity.ready(role, member.name, lambda: factory(member.name),
                                    self._resources.get(role, {}), actor=member.actor)

    def scale(self, workers: int) -> int:
        """Grow or shrink the rollout workers to ``workers``; returns the previous count."""
        if workers < 1:
            raise ValueError(f"a job needs at least one rollout worker, asked for {workers}")
        previous = len(self.workers)
        if workers > previous:
            self._add("rollout", workers - previous)
        while len(self.workers) > workers:
            self._retire(self.workers.pop())
        return previous

    def _retire(self, member: _Member) -> None:
        try:
            ray.get(member.actor.shutdown.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - it is going away either way
            pass
        ray.kill(member.actor)
        self._on_retire(member.name)

    def sleep(self) -> None:
        """Every rollout worker releases its accelerator (``rollout.colocate``) until its next
        weight load or request; a worker that died meanwhile is replaced at the next sync."""
        for ref in [m.actor.sleep.remote() for m in self.workers]:
            try:
                ray.get(ref)
            except RayActorError:
                pass

    def _replace(self, role: str, member: _Member) -> _Member:
        members = self.workers if role == "rollout" else self.scorers
        index = next(i for i, m in enumerate(members) if m is member)
        log.warning("%s actor %s died; starting a replacement", role, member.name)
        ray.kill(member.actor)
        self._on_retire(member.name)
        fresh = self._new(role)
        fresh.actor = self._ready(role, fresh)
        if role == "rollout" and self.weights is not None:
            handle = self._weight_sync.reissue(self.weights, 1)
            ray.get(fresh.actor.set_weights.remote(self.version, handle))
        members[index] = fresh
        self._on_restart(role)
        return fresh

    @staticmethod
    def _alive(member: _Member) -> bool:
        try:
            ray.get(member.actor.ready.remote(), timeout=60)
            return True
        except RayActorError:
            return False

    # ------------------------------------------------------------------ weights

    def sync(self, version: int, weights: WeightHandle) -> SyncResult:
        """Every worker loads ``weights`` (a weight-sync handle for all of them) as ``version``.

        A worker that dies while loading is replaced; the replacement loads the same weights
        before it joins, so the pool serves one version only when this returns. When one dies,
        the handle is aborted (a collective transport's other members stop waiting for it) and
        the survivors whose load failed with it are given a re-issued handle, up to
        ``max_retries`` times: every worker loads the version exactly once. A load that fails
        while no worker died is an error, raised.
        """
        self.version, self.weights = version, weights
        result = SyncResult()
        members, handle = list(self.workers), weights
        for _ in range(self.max_retries + 1):
            failed, died = self._load(members, version, handle, result)
            if not failed:
                return result
            if not died:
                raise failed[0][1]
            log.warning("%d rollout workers lost the weight sync with a dead one; re-issuing",
                        len(failed))
            members = [member for member, _ in failed]
            handle = self._weight_sync.reissue(weights, len(members))
        raise RolloutFailure(f"the weight sync of version {version} failed "
                             f"{self.max_retries + 1} times; giving up") from failed[0][1]

    def _load(self, members: list[_Member], version: int, handle: WeightHandle,
              result: SyncResult) -> tuple[list, bool]:
        """One round of ``set_weights`` on ``members``; the dead are replaced. Returns the
        survivors whose load failed (with the error) and whether any member died."""
        refs = {m.actor.set_weights.remote(version, handle): m for m in members}
        failed, died = [], False
        waiting = list(refs)
        while waiting:  # as they come: a death aborts the others' wait at once
            ready, waiting = ray.wait(waiting, num_returns=1)
            member = refs[ready[0]]
            try:
                result.seconds[member.name] = ray.get(ready[0])
            except RayActorError:
                if not died:
                    self._weight_sync.abort(handle)
                died = True
                result.failures += 1
                self._replace("rollout", member)
            except Exception as exc:  # noqa: BLE001 - judged below: collateral or a bug
                failed.append((member, exc))
        if failed and not died:  # a death the survivors noticed before Ray reported it
            for member, _ in list(failed):
                if not self._alive(member):
                    died = True
                    failed = [(m, e) for m, e in failed if m is not member]
                    result.failures += 1
                    self._replace("rollout", member)
        return failed, died

    # ------------------------------------------------------------------ one step

    def run(self, requests: list[RolloutRequest], params: SamplingParams | None = None
            ) -> StepRollouts:
        """Generate and score every request exactly once; results in request order."""
        t0 = time.perf_counter()
        pending = deque(range(len(requests)))
        attempts = Counter()
        generating: dict = {}  # generation ref -> (request index, worker)
        scoring: dict = {}  # summary ref -> (request index, worker, scorer, gen ref, shard refs)
        done: dict[int, tuple] = {}
        per_worker: Counter[str] = Counter()
        last_generated = t0
        turn = 0
        while pending or generating or scoring:
            for member in self.workers:
                if not pending:
                    break
                if not member.busy:
                    k = pending.popleft()
                    member.busy = True
                    generating[member.actor.generate.remote(requests[k], params)] = (k, member)
            if self.queue_depth != len(pending):
                self.queue_depth = len(pending)
                self._on_queue_depth(self.queue_depth)
            ready, _ = ray.wait([*generating, *scoring], num_returns=1)
            ref = ready[0]
            if ref in generating:
                k, worker = generating.pop(ref)
                worker.busy = False
                scorer = self.scorers[turn % len(self.scorers)]
                turn += 1
                summary_ref, *shard_refs = self._score(scorer, ref)
                scoring[summary_ref] = (k, worker, scorer, ref, shard_refs)
                last_generated = time.perf_counter()
                continue
            k, worker, scorer, gen_ref, shard_refs = scoring.pop(ref)
            try:
                summary = ray.get(ref)
            except RayActorError:
                self._recover(k, worker, scorer, gen_ref, attempts, pending, scoring)
                continue
            done[k] = (shard_refs, summary)
            per_worker[worker.name] += len(summary["reward"])
        self.queue_depth = 0
        self._on_queue_depth(0)
        t_end = time.perf_counter()
        summaries = [done[k][1] for k in range(len(requests))]
        merged = {key: np.concatenate([s[key] for s in summaries]) for key in summaries[0]}
        return StepRollouts(
            shards=[[done[k][0][r] for k in range(len(requests))]
                    for r in range(self.learner_shards)],
            summary=merged,
            times={"generate_s": last_generated - t0, "score_s": t_end - last_generated},
            per_worker=dict(per_worker))

    def _recover(self, k, worker, scorer, gen_ref, attempts, pending, scoring) -> None:
        """Request ``k`` lost an actor: replace whichever died, then generate or score again."""
        attempts[k] += 1
        if attempts[k] > self.max_retries:
            raise RolloutFailure(f"request {k} lost an actor {attempts[k]} times; giving up")
        if scorer in self.scorers and not self._alive(scorer):
            scorer = self._replace("reward", scorer)
        if worker in self.workers and not self._alive(worker):
            self._replace("rollout", worker)
        try:
            ray.get(gen_ref)  # failure path only: did the generation itself survive?
        except RayActorError:
            pending.appendleft(k)  # the worker died mid-generation: generate again
            return
        if scorer not in self.scorers:
            scorer = self.scorers[0]
        summary_ref, *shard_refs = self._score(scorer, gen_ref)
        scoring[summary_ref] = (k, worker, scorer, gen_ref, shard_refs)

    def _score(self, scorer: _Member, gen_ref) -> list:
        """Refs of the summary, then of one scored shard per learner rank."""
        shards = self.learner_shards
        return scorer.actor.score.options(num_returns=shards + 1).remote(gen_ref, shards)

    def inflight(self) -> int:
        return sum(m.busy for m in self.workers)

    def shutdown(self) -> None:
        for member in [*self.workers, *self.scorers]:
            self._retire(member)
        self.workers, self.scorers = [], []
