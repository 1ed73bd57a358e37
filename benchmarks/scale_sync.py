"""Weight-sync seconds per GB: ``collective`` vs ``object_store`` vs a raw in-memory copy.

Workload (issue 16): a random state dict shaped like a Qwen2 decoder (hidden 768, 12 layers,
MLP 2048, vocab 32,000, tied embeddings: 100.1M parameters, 0.373 GB (2^30 bytes) in float32),
published from one "learner rank 0" actor to 1 or 2 "rollout worker" actors, all on this machine's
embedded Ray. Each transport runs its real code: ``ObjectStoreSync`` / ``CollectiveSync``
``publish`` on the driver, ``send`` in the source actor (the same call a ``Learner`` makes,
on a stand-in for ``LearnerCore`` under ``ddp``: ``full_state_dict`` returns a CPU copy,
``full_state_dict_view`` the weights themselves), ``receive`` in each worker, which keeps one
``WeightSync`` per transport across syncs as a ``RolloutWorker`` does. A worker only receives
(no model to load into), so the figures are the transport's own.

* ``object_store``: the driver's wall time from ``publish`` until every worker holds the
  state dict (``ray.get`` of the returned object);
* ``collective``: the same span: packing into buckets (cast to the rollout dtype, float32
  here), the check-in through the driver's store and the gloo broadcast;
* ``raw copy``: one in-memory copy of the same bytes (``torch.Tensor.copy_`` into a
  pre-touched buffer) inside a worker actor: the floor any transport pays at least once;
* ``bare gloo``: a bare ``ProcessGroupGloo`` broadcast of the same bytes in the same bucket
  size between the same actors (buffers allocated once, one group for all repeats): what
  loopback TCP through gloo costs on this machine, the floor of ``collective`` here.

Seconds per GB = the median of ``--repeats`` timed runs (after one warm-up) / the state's GB.

    python benchmarks/scale_sync.py [--receivers 1 2] [--repeats 3] [--bucket-mb 64]

``run(args) -> list[dict]`` is what a ``benchmarks/scale.py`` driver calls (one row per
receiver count and transport).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or a module

SHAPE = {"hidden": 768, "layers": 12, "mlp": 2048, "vocab": 32000, "kv_heads": 4, "heads": 12}


def qwen2_state_dict(shape: dict = SHAPE, seed: int = 0) -> dict:
    """A random float32 state dict with Qwen2's tensor names and shapes."""
    import torch

    g = torch.Generator().manual_seed(seed)
    h, m, v = shape["hidden"], shape["mlp"], shape["vocab"]
    kv = h // shape["heads"] * shape["kv_heads"]
    state = {"model.embed_tokens.weight": torch.randn(v, h, generator=g)}
    for i in range(shape["layers"]):
        p = f"model.layers.{i}."
        for name, dims in (("self_attn.q_proj.weight", (h, h)), ("self_attn.q_proj.bias", (h,)),
                           ("self_attn.k_proj.weight", (kv, h)), ("self_attn.k_proj.bias", (kv,)),
                           ("self_attn.v_proj.weight", (kv, h)), ("self_attn.v_proj.bias", (kv,)),
                           ("self_attn.o_proj.weight", (h, h)),
                           ("mlp.gate_proj.weight", (m, h)), ("mlp.up_proj.weight", (m, h)),
                           ("mlp.down_proj.weight", (h, m)),
                           ("input_layernorm.weight", (h,)),
                           ("post_attention_layernorm.weight", (h,))):
            state[p + name] = torch.randn(*dims, generator=g)
    state["model.norm.weight"] = torch.ones(h)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied, as Qwen2's small sizes
    return state


def _actors():
    import ray

    @ray.remote(num_cpus=1)
    class Source:
        """Learner rank 0's side: the real ``WeightSync.send`` on a LearnerCore stand-in."""

        def __init__(self, shape):
            import torch

            torch.set_num_threads(1)
            self.state = qwen2_state_dict(shape)
            self.rank = 0

        def full_state_dict(self):  # LearnerCore.full_state_dict under ddp: a CPU copy
            return {k: v.detach().clone() for k, v in self.state.items()}

        def full_state_dict_view(self):  # LearnerCore's, under ddp: the weights themselves
            return self.state

        def nbytes(self):
            seen = {v.data_ptr(): v.numel() * v.element_size() for v in self.state.values()}
            return sum(seen.values())

        def send_weights(self, transport, *args):
            from services.weight_sync import make_weight_sync

            return make_weight_sync(transport).send(self, *args)

        def bare_gloo(self, *args):
            return _bare_gloo(0, *args)

    @ray.remote(num_cpus=1)
    class Sink:
        def __init__(self):
            import torch

            torch.set_num_threads(1)
            self.syncs = {}  # one per transport, kept as a RolloutWorker keeps its own

        def receive(self, transport, handle):
            from services.weight_sync import make_weight_sync

            sync = self.syncs.setdefault(transport, make_weight_sync(transport))
            t0 = time.perf_counter()
            state = sync.receive(handle)
            seconds = time.perf_counter() - t0
            return seconds, len(state)

        def bare_gloo(self, rank, *args):
            return _bare_gloo(rank, *args)

        def raw_copy(self, nbytes, repeats):
            """Median seconds of one in-memory copy of ``nbytes`` (both buffers touched)."""
            import torch

            src = torch.ones(nbytes // 4)
            dst = torch.zeros_like(src)
            times = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                dst.copy_(src)
                times.append(time.perf_counter() - t0)
            return statistics.median(times[1:])

    return Source, Sink


def _bare_gloo(rank, host, port, world, nbytes, bucket_bytes, repeats):
    """Median seconds of a bare gloo broadcast of ``nbytes`` from rank 0 in buckets of
    ``bucket_bytes`` (buffers allocated and touched once; one group for all repeats, its
    members lined up by a barrier before each): the floor of what the ``collective``
    transport's network part costs here."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=120))
    group = dist.ProcessGroupGloo(dist.PrefixStore("bare", store), rank, world,
                                  timedelta(seconds=120))
    per = max(1, bucket_bytes // 4)
    data = torch.ones(nbytes // 4) if rank == 0 else torch.zeros(nbytes // 4)
    options = dist.BroadcastOptions()
    options.rootRank = 0
    times = []
    for _ in range(repeats + 1):
        group.barrier().wait()
        t0 = time.perf_counter()
        for start in range(0, data.numel(), per):
            group.broadcast([data[start:start + per]], options).wait()
        times.append(time.perf_counter() - t0)
    group.barrier().wait()
    assert rank == 0 or bool(data[-1] == 1)
    return statistics.median(times[1:])


def _bare_gloo_seconds(source, sinks, nbytes, bucket_bytes, repeats) -> float:
    """The source's median of :func:`_bare_gloo` between ``source`` and ``sinks``."""
    from datetime import timedelta

    import ray
    import torch.distributed as dist

    host = ray.util.get_node_ip_address()
    store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=120))
    world = len(sinks) + 1
    args = (host, store.port, world, nbytes, bucket_bytes, repeats)
    refs = [source.bare_gloo.remote(*args)]
    refs += [sink.bare_gloo.remote(rank, *args) for rank, sink in enumerate(sinks, 1)]
    return ray.get(refs)[0]


class _Learners:
    """The one method of ``LearnerGroup`` a weight sync calls, over one source actor."""

    def __init__(self, source):
        self.source = source

    def send_weights(self, transport, *args):
        return [self.source.send_weights.remote(transport, *args)]


def _time_sync(sync, learners, sinks, transport) -> tuple[float, dict]:
    """Seconds from publish until every sink holds the state dict; the source's phases."""
    import ray

    t0 = time.perf_counter()
    handle = sync.publish(learners, len(sinks))
    got = ray.get([s.receive.remote(transport, handle) for s in sinks])
    seconds = time.perf_counter() - t0
    phases = (sync.collect() or [{}])[0]
    assert all(n == got[0][1] for _, n in got)
    return seconds, phases


def run(args) -> list[dict]:
    """One row per (receivers, transport): seconds per GB, median of ``args.repeats``."""
    import ray

    from services.cluster import connect
    from services.weight_sync import make_weight_sync

    connect(num_cpus=max(4, 1 + max(args.receivers)))
    Source, Sink = _actors()
    source = Source.remote(SHAPE)
    nbytes = ray.get(source.nbytes.remote())
    gb = nbytes / 2**30
    learners = _Learners(source)
    rows = []
    for receivers in args.receivers:
        sinks = [Sink.remote() for _ in range(receivers)]
        raw = ray.get(sinks[0].raw_copy.remote(nbytes, args.repeats))
        rows.append({"receivers": receivers, "transport": "raw copy", "gb": gb,
                     "s_per_gb": raw / gb, "x_raw": 1.0})
        bare = _bare_gloo_seconds(source, sinks, nbytes, int(args.bucket_mb * 2**20),
                                  args.repeats)
        rows.append({"receivers": receivers, "transport": "bare gloo", "gb": gb,
                     "s_per_gb": bare / gb, "x_raw": bare / raw})
        for transport in ("object_store", "collective"):
            sync = make_weight_sync(transport)
            if transport == "collective":
                sync.options["bucket_bytes"] = int(args.bucket_mb * 2**20)
            runs = [_time_sync(sync, learners, sinks, transport)
                    for _ in range(args.repeats + 1)][1:]
            seconds = statistics.median(t for t, _ in runs)
            row = {"receivers": receivers, "transport": transport, "gb": gb,
                   "s_per_gb": seconds / gb, "x_raw": seconds / raw}
            for phase in ("pack_s", "check_in_s", "broadcast_s"):  # collective's source
                if phase in runs[0][1]:
                    row[phase] = statistics.median(p[phase] for _, p in runs)
            row["x_gloo"] = seconds / bare
            rows.append(row)
        for sink in sinks:
            ray.kill(sink)
    ray.kill(source)
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--receivers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-mb", type=float, default=64.0)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = run(args)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; state {rows[0]['gb']:.3f} GB float32; "
          f"median of {args.repeats}; collective buckets {args.bucket_mb:g} MB")
    print(f"{'receivers':>9}  {'transport':<13} {'s/GB':>8}  {'× raw copy':>10}  "
          f"{'× bare gloo':>11}  source phases (s): pack, check-in, broadcast")
    for row in rows:
        phases = ", ".join(f"{row[p]:.3f}" for p in ("pack_s", "check_in_s", "broadcast_s")
                           if p in row)
        x_gloo = f"{row['x_gloo']:.2f}" if "x_gloo" in row else ""
        print(f"{row['receivers']:>9}  {row['transport']:<13} {row['s_per_gb']:>8.3f}  "
              f"{row['x_raw']:>10.2f}  {x_gloo:>11}  {phases}")


if __name__ == "__main__":
    main()
