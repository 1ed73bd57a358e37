"""``collective``: learner rank 0 broadcasts the weights to the rollout workers over a
torch.distributed group of their own (gloo on CPU; NCCL on GPU — written, not yet run on a GPU).

Who takes part. Every learner rank runs :meth:`CollectiveSync.send`, since gathering the full
state dict is a collective of the learners' own group (a sharded strategy needs every rank);
only rank 0, which holds the gathered weights, joins the weight-sync group as its source
(rank 0 of it) and the rollout workers are ranks 1..N. More learner ranks as sources would
split the bytes over several links, which only pays off across machines with their own NICs;
one source keeps the group and its failure modes simple.

The group. It is built directly from a ``TCPStore`` (served by the driver, which outlives every
actor of a run) and ``ProcessGroupGloo`` / ``ProcessGroupNCCL`` — never
``init_process_group``, so it is independent of the learners' default group and of the one
vLLM starts in its worker. Every publish is a new *epoch*: its keys live under their own
prefix, the handle names the store's address, the epoch and the number of receivers, and a
worker takes the next free rank of that epoch when it joins. A finished broadcast cannot be
received again, so a worker that joins later (the pool scales up, or replaces a dead worker)
gets a *re-issued* handle: a new epoch in which learner rank 0 re-broadcasts the buckets it
kept from its last send (it keeps them until the next publish, so a re-issue during an
asynchronous step, while the learners already train the next version, still sends the
version the pool serves).

What travels. The state dict is cast to the rollout dtype (floating-point tensors only) and
packed into flat buckets of ``rollout.collective.bucket_mb`` per dtype
(:mod:`services.weight_sync._buckets`); the layout (names, shapes, dtypes, offsets) goes
through the store as JSON, the bytes only through the group. A backend that takes a stream
(vLLM: ``reload_weights`` consumes an iterator in place, checked on the CPU build) gets the
tensors as each bucket arrives (:meth:`CollectiveSync.receive_stream`), so a worker holds one
bucket, not a second copy of the weights; the Hugging Face backend gets a state dict of views
into all buckets (:meth:`CollectiveSync.receive`). A stream broken part-way leaves some
layers updated: the worker then serves nothing until a full load succeeds
(:class:`services.rollout.worker.RolloutWorker`).

Copies. The source fills its buckets straight from the learner's tensors — under ``ddp`` the
parameters themselves (``LearnerCore.full_state_dict_view``), under ``fsdp2`` the gathered
state dict — casting on the way: one copy. The buckets are allocated once and refilled by
every publish of the same layout (fresh memory would be paged in by the copy, which costs as
much as the copy). Broadcasts are asynchronous, two in flight (:data:`IN_FLIGHT`): the source
fills bucket k+1 while bucket k is on the wire, a streaming receiver has bucket k+1 on the wire
while its backend loads bucket k, and a CPU receiver of whole state dicts keeps its buckets for
the next version. On this machine the broadcast itself (gloo over loopback TCP) is the floor:
``benchmarks/scale_sync.py`` measures a bare gloo broadcast of the same bytes next to it.

Failures never hang. Members first check in through the store; the driver can *abort* an
epoch (the pool does when a member of it died), and a member waiting to check in stops at
once with :class:`SyncAborted`. Once all have checked in, a member that dies mid-broadcast
closes its connections and the others' broadcast fails; anything else stops at
``rollout.collective.timeout_s`` — including a member that dies in the short window between
check-in and the group's formation (gloo's connect cannot be aborted: the others wait the
time-out, then the pool retries). The pool then replaces the dead and re-issues to the rest
(:meth:`services.rollout.pool.RolloutPool.sync`), so each worker loads the version once.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import ray
import torch
import torch.distributed as dist

from services.weight_sync import WeightHandle, WeightSync, register_weight_sync
from services.weight_sync._buckets import (
    dtype_of,
    empty_buckets,
    fill,
    nbytes,
    plan,
    unpack,
    unpack_stream,
)

if TYPE_CHECKING:
    from services.config import TrainConfig

log = logging.getLogger(__name__)

POLL_S = 0.005  # how often a member waiting to check in looks at the store
DEFAULT_BUCKET_MB = 64.0  # rollout.collective's defaults, for a driver not given a config
DEFAULT_TIMEOUT_S = 300.0
IN_FLIGHT = 2  # broadcasts a member keeps outstanding (the one on the wire and the next)


class SyncAborted(RuntimeError):
    """The driver aborted this weight-sync epoch (a member of it died)."""


class WeightSyncBroken(RuntimeError):
    """A broadcast failed part-way (a member died or timed out)."""


@dataclass(frozen=True)
class Rendezvous:
    """The payload of a collective handle: where and how to join one epoch's group."""

    host: str
    port: int
    epoch: int  # this group's key prefix
    receivers: int  # rollout workers in the group (ranks 1..receivers)
    source_epoch: int  # the publish whose weights it carries (== epoch unless re-issued)
    dtype: str  # the rollout dtype the floating-point tensors travel in
    bucket_bytes: int
    backend: str  # gloo | nccl
    timeout_s: float

    @property
    def prefix(self) -> str:
        return f"harpo-weights/{self.epoch}"

    def scope(self, store: dist.Store) -> dist.Store:
        """``store`` seen through this epoch's key prefix."""
        return dist.PrefixStore(self.prefix, store)

    @property
    def world(self) -> int:
        return self.receivers + 1


@dataclass
class _Sent:
    """Learner rank 0's buckets: allocated once and refilled by every publish whose layout
    fits them; kept until the next publish, for re-issues."""

    epoch: int | None  # the publish whose weights they hold whole; None while being filled
    layout: dict
    buckets: list
    reused: bool = False  # filled into the previous publish's buckets


class _Timer:
    """Iterate ``items`` counting the seconds spent producing them."""

    def __init__(self, items: Iterator):
        self.items, self.seconds = items, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        try:
            return next(self.items)
        finally:
            self.seconds += time.perf_counter() - t0

    def after(self, first) -> Iterator:
        """``first`` (unless None), then the rest."""
        if first is not None:
            yield first
        yield from self


_LAST_SENT: _Sent | None = None  # in a learner process: its last publish's buckets


def rollout_dtype(config: TrainConfig) -> str:
    """The dtype the rollout backend serves in: ``rollout.vllm.dtype`` (``auto``: the
    checkpoint's) for vLLM; the Hugging Face backend loads float32."""
    if config.rollout.backend == "vllm":
        dtype = config.rollout.vllm.dtype
        if dtype == "auto":
            from services.rollout.vllm_backend import _model_dtype

            dtype = _model_dtype(str(config.model.path))
        return dtype
    return "float32"


def _client(rdv: Rendezvous) -> dist.Store:
    store = dist.TCPStore(rdv.host, rdv.port, is_master=False,
                          timeout=timedelta(seconds=rdv.timeout_s))
    return rdv.scope(store)


def _check_in(store: dist.Store, rdv: Rendezvous, rank: int) -> None:
    """Wait until every member of the epoch checked in, or the driver aborted it."""
    store.add("joined", 1)
    deadline = time.monotonic() + rdv.timeout_s
    while store.add("joined", 0) < rdv.world:
        if store.check(["aborted"]):
            raise SyncAborted(f"weight-sync epoch {rdv.epoch} was aborted (a member died) "
                              f"before rank {rank} of {rdv.world} could start")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"weight-sync epoch {rdv.epoch}: {store.add('joined', 0)} of {rdv.world} "
                f"members joined within rollout.collective.timeout_s = {rdv.timeout_s:g} s")
        time.sleep(POLL_S)


def _group(store: dist.Store, rdv: Rendezvous, rank: int):
    timeout = timedelta(seconds=rdv.timeout_s)
    group_store = dist.PrefixStore("pg", store)
    if rdv.backend == "nccl":  # not run on a GPU yet
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(group_store, rank, rdv.world, options)
    return dist.ProcessGroupGloo(group_store, rank, rdv.world, timeout)


class _Member:
    """This process's place in one epoch's group.

    The group is dropped before an error is raised: its connections close then, so peers
    still in the broadcast fail at once instead of at the timeout (``abort()`` does not close
    a gloo group's connections; releasing the last reference does, and an exception's
    traceback would keep one alive if the group were a local of a failing frame).
    """

    def __init__(self, store: dist.Store, rdv: Rendezvous, rank: int):
        self.rdv, self.rank = rdv, rank
        self.group = _group(store, rdv, rank)
        self.options = dist.BroadcastOptions()
        self.options.rootRank = 0

    def start(self, bucket: torch.Tensor):
        """Start broadcasting ``bucket`` (the source's to everyone's); returns the work to
        :meth:`wait` for."""
        if self.group is None:
            raise WeightSyncBroken(f"weight-sync epoch {self.rdv.epoch}: the group is closed")
        error = None
        try:
            return self.group.broadcast([bucket], self.options)
        except Exception as exc:  # noqa: BLE001 - re-raised below, once the group is gone
            error = f"{type(exc).__name__}: {exc}"
        self._fail(error)

    def wait(self, work) -> None:
        error = None
        try:
            work.wait()
        except Exception as exc:  # noqa: BLE001 - re-raised below, once the group is gone
            error = f"{type(exc).__name__}: {exc}"
        if error is not None:
            self._fail(error)

    def broadcast(self, bucket: torch.Tensor) -> None:
        self.wait(self.start(bucket))

    def broadcast_all(self, buckets: Iterable[torch.Tensor]) -> None:
        """Broadcast ``buckets`` in order, each started before the previous one is waited
        for: the group's thread sends (receives) one while this thread produces (allocates)
        the next, e.g. the source fills bucket k+1 while bucket k is on the wire. At most
        :data:`IN_FLIGHT` broadcasts are outstanding, so a failure stops it soon."""
        works: deque = deque()
        for bucket in buckets:
            works.append(self.start(bucket))
            if len(works) >= IN_FLIGHT:
                self.wait(works.popleft())
        while works:
            self.wait(works.popleft())

    def _fail(self, error: str):
        self.group = None  # no synchronize: the failed work may never end
        raise WeightSyncBroken(f"weight-sync epoch {self.rdv.epoch}, rank {self.rank} of "
                               f"{self.rdv.world}: {error}")

    def close(self) -> None:
        if self.group is not None and self.rdv.backend == "nccl":  # not run on a GPU yet
            torch.cuda.synchronize()  # the last broadcasts ran on NCCL's stream
        self.group = None


def _device(rdv: Rendezvous) -> str:
    return "cuda" if rdv.backend == "nccl" else "cpu"


@register_weight_sync("collective")
class CollectiveSync(WeightSync):
    """Driver side: one instance per run (it serves the rendezvous store and counts epochs);
    learner and worker sides are stateless calls."""

    def __init__(self):
        self.options: dict = {"dtype": "float32", "bucket_bytes": int(DEFAULT_BUCKET_MB * 2**20),
                              "backend": "gloo", "timeout_s": DEFAULT_TIMEOUT_S}
        self._store: dist.TCPStore | None = None
        self._host = ""
        self._epoch = 0
        self._forgotten = 0  # epochs up to this one have no layout in the store any more
        self._learners = None
        self._sends: list[ray.ObjectRef] = []  # learner tasks not yet collected
        self._inbox: list[torch.Tensor] | None = None  # a CPU receiver's buckets, reused

    def configure(self, config: TrainConfig) -> CollectiveSync:
        section = config.rollout.collective
        on_gpu = config.rollout.gpus_per_worker > 0 and config.learner.gpus_per_worker > 0
        self.options = {"dtype": rollout_dtype(config),
                        "bucket_bytes": max(1, int(section.bucket_mb * 2**20)),
                        "backend": "nccl" if on_gpu else "gloo",
                        "timeout_s": float(section.timeout_s)}
        return self

    # ------------------------------------------------------------------ driver

    def _rendezvous(self, receivers: int, source_epoch: int | None = None) -> Rendezvous:
        if self._store is None:
            self._host = ray.util.get_node_ip_address()
            self._store = dist.TCPStore(self._host, 0, is_master=True, wait_for_workers=False,
                                        timeout=timedelta(seconds=self.options["timeout_s"]))
        self._epoch += 1
        return Rendezvous(self._host, self._store.port, self._epoch, receivers,
                          self._epoch if source_epoch is None else source_epoch,
                          **self.options)

    def publish(self, learners, receivers: int = 1) -> WeightHandle:
        self.collect()  # every earlier epoch is over: its receivers loaded or gave up
        self._forget_layouts()
        self._learners = learners
        rdv = self._rendezvous(receivers)
        self._sends.extend(learners.send_weights(self.name, rdv))
        return WeightHandle(self.name, rdv)

    def reissue(self, handle: WeightHandle, receivers: int) -> WeightHandle:
        """The same weights for ``receivers`` more workers: learner rank 0 re-broadcasts the
        buckets of ``handle``'s publish to a new epoch's group."""
        self._check(handle)
        rdv = self._rendezvous(receivers, source_epoch=handle.payload.source_epoch)
        self._sends.extend(self._learners.send_weights(self.name, rdv))
        return WeightHandle(self.name, rdv)

    def _forget_layouts(self) -> None:
        """Drop the layouts (the only large keys) of the epochs so far from the store, which
        would otherwise grow by one per sync for the whole run."""
        for epoch in range(self._forgotten + 1, self._epoch + 1):
            dist.PrefixStore(f"harpo-weights/{epoch}", self._store).delete_key("layout")
        self._forgotten = self._epoch

    def abort(self, handle: WeightHandle) -> None:
        """Members of ``handle``'s epoch still waiting to start give up at once."""
        if self._store is not None:
            handle.payload.scope(self._store).set("aborted", "1")

    def collect(self) -> list[dict]:
        """Wait for the learner side of every publish and re-issue so far; returns the source's
        figures of each: bytes; seconds filling buckets (``pack_s``, inside ``broadcast_s``
        after the first bucket), checking in, broadcasting, in all (``total_s``); whether the
        kept buckets were refilled (``reused``). Failures are the mirror of the workers' (which
        the pool acts on), so they are logged, not raised."""
        sends, self._sends = self._sends, []
        done = []
        for ref in sends:
            try:
                result = ray.get(ref)
            except Exception as exc:  # noqa: BLE001
                log.warning("a weight-sync send did not complete: %s", exc)
                continue
            if result is not None:
                done.append(result)
        return done

    # ------------------------------------------------------------------ learner

    def send(self, core, rdv: Rendezvous):
        t0 = time.perf_counter()
        weights = None  # a re-issue sends the buckets kept from its publish
        if rdv.source_epoch == rdv.epoch:
            # every rank: a sharded strategy gathers here. In the learner's dtype and, where
            # the strategy holds the whole model (ddp), the live tensors themselves: filling
            # the buckets casts and copies once (a cast or a copy here would be one more, and
            # a cast would untie the tied embeddings, which would then travel twice)
            weights = getattr(core, "full_state_dict_view", core.full_state_dict)()
            if weights is None:  # not the source
                return None
        elif core.rank != 0:
            return None
        store = _client(rdv)
        try:
            sent, fills = self._buckets(weights, rdv)
        except BaseException:
            store.set("aborted", "1")  # the workers stop waiting for a source that never comes
            raise
        weights = None
        filled = _Timer(fills)
        try:
            store.set("layout", json.dumps(sent.layout))
            first = next(filled, None)  # while the workers check in
            t1 = time.perf_counter()
            _check_in(store, rdv, 0)
            t2 = time.perf_counter()
            member = _Member(store, rdv, 0)
            store.add("formed", 1)  # the group is up (a count for tests and debugging)
            member.broadcast_all(filled.after(first))
            member.close()
        finally:  # whatever failed, the kept buckets are filled whole for a re-issue
            for _ in filled:
                pass
        t3 = time.perf_counter()
        return {"bytes": nbytes(sent.buckets), "pack_s": filled.seconds,
                "check_in_s": t2 - t1, "broadcast_s": t3 - t2, "total_s": t3 - t0,
                "reused": sent.reused}

    @staticmethod
    def _buckets(weights: dict | None, rdv: Rendezvous
                 ) -> tuple[_Sent, Iterator[torch.Tensor]]:
        """What to send and the buckets in sending order, each yielded once it is full: a
        publish fills them one by one as they are asked for (the kept buckets again when its
        layout fits them); a re-issue (``weights`` None) sends the kept ones as they are."""
        global _LAST_SENT
        if weights is not None:
            layout, sources = plan(weights, dtype_of(rdv.dtype), rdv.bucket_bytes)
            kept = _LAST_SENT
            _LAST_SENT = None  # the previous version is gone from here on
            if kept is not None and kept.layout["buckets"] == layout["buckets"] \
                    and all(b.device.type == _device(rdv) for b in kept.buckets):
                buckets, reused = kept.buckets, True
            else:
                kept = None  # freed before the new ones are allocated
                buckets, reused = empty_buckets(layout, _device(rdv)), False
            sent = _LAST_SENT = _Sent(None, layout, buckets, reused)

            def fills():
                for members, bucket in zip(sources, buckets):
                    yield fill(members, bucket)
                sent.epoch = rdv.epoch  # whole: a re-issue may send them

            return sent, fills()
        sent = _LAST_SENT
        if sent is None or sent.epoch != rdv.source_epoch:
            raise RuntimeError(
                f"learner rank 0 no longer holds the weights of weight-sync epoch "
                f"{rdv.source_epoch} (it holds {sent and sent.epoch}); publish again")
        return sent, iter(sent.buckets)

    # ------------------------------------------------------------------ rollout worker

    def _join(self, handle: WeightHandle) -> tuple[dict, _Member]:
        """Take a rank in the handle's epoch, wait for the others, read the layout."""
        self._check(handle)
        rdv: Rendezvous = handle.payload
        store = _client(rdv)
        rank = store.add("rank", 1)
        if rank > rdv.receivers:
            raise RuntimeError(f"weight-sync epoch {rdv.epoch} was issued for {rdv.receivers} "
                               f"workers, and a {rank}th joined")
        _check_in(store, rdv, rank)  # the source wrote the layout before it checked in
        layout = json.loads(store.get("layout"))
        member = _Member(store, rdv, rank)
        store.add("formed", 1)
        return layout, member

    def receive(self, handle: WeightHandle) -> dict[str, torch.Tensor]:
        """The state dict, as views into buckets that are received all at once. On CPU this
        instance keeps them and receives the next version into the same memory (a fresh
        allocation would be paged in by the receive itself, which costs as much as the
        transfer): load or copy the tensors before the next ``receive`` on this instance (a
        rollout worker loads them at once). On a GPU the caching allocator reuses memory
        without this, and a kept copy would hold accelerator memory."""
        layout, member = self._join(handle)
        device = _device(handle.payload)
        buckets = self._inbox if device == "cpu" and self._inbox_fits(layout) else None
        if buckets is None:
            self._inbox = None
            buckets = empty_buckets(layout, device)
        member.broadcast_all(buckets)
        member.close()
        if device == "cpu":
            self._inbox = buckets
        return unpack(layout, buckets)

    def _inbox_fits(self, layout: dict) -> bool:
        return self._inbox is not None and len(self._inbox) == len(layout["buckets"]) and all(
            str(b.dtype) == f"torch.{dtype}" and b.numel() == numel
            for b, (dtype, numel) in zip(self._inbox, layout["buckets"]))

    def receive_stream(self, handle: WeightHandle):
        """The names, then ``(name, tensor)`` as each bucket arrives (the group is joined
        before this returns; the broadcast advances as the iterator is consumed, the next
        bucket on the wire while the consumer loads this one's tensors)."""
        layout, member = self._join(handle)
        names = [entry[0] for entry in layout["tensors"]]

        def start(bucket):
            work = member.start(bucket)
            return lambda: member.wait(work)

        def tensors():
            try:
                yield from unpack_stream(layout, start, _device(handle.payload))
            finally:  # done, failed, or abandoned by the consumer: leave the group
                member.close()

        return names, tensors()
