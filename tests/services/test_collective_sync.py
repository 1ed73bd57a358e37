"""The ``collective`` weight sync on a real embedded Ray: real gloo groups between two learner
ranks and the rollout workers (Hugging Face and the vLLM CPU build), the tiny model.

One run's actors (``ActorSet``: 2 ``fsdp2`` learner ranks, so every rank takes part in
gathering the weights it publishes; 2 HF rollout workers) serve the whole module,
in order: weights bit-identical to the object store's; a worker killed mid-broadcast is
replaced and every worker loads the version exactly once; a pool scaled up (with a vLLM worker)
serves the new version from all workers, and vLLM's log-probs match the learners' after a
collective sync.
"""

import threading
import time

import numpy as np
import pytest
import torch

from services.config import ConfigError, parse_config
from services.weight_sync._buckets import pack, unpack
from tests.services.conftest import tiny_config

PROMPTS = 4
TIMEOUT_S = 90  # rollout.collective.timeout_s of the module's run
VLLM_OPTIONS = {"dtype": "auto", "max_model_len": 256, "kv_cache_memory_mb": 64,
                "enforce_eager": True}


# ------------------------------------------------------------------ buckets (no Ray)

def test_buckets_round_trip_in_the_rollout_dtype_with_ties_sent_once():
    g = torch.Generator().manual_seed(0)
    embed = torch.randn(50, 8, generator=g)
    state = {"embed": embed, "a": torch.randn(3, 4, generator=g),
             "count": torch.arange(5), "b": torch.randn(200, generator=g), "head": embed}
    layout, buckets = pack(state, torch.bfloat16, bucket_bytes=256)
    # bf16 buckets of <= 256 bytes (128 values) unless one tensor is larger; ints apart
    assert [d for d, _ in layout["buckets"]].count("int64") == 1
    sizes = [n for d, n in layout["buckets"] if d == "bfloat16"]
    assert sizes == [400, 12, 200]  # embed alone, a, then b alone; head not sent again
    out = unpack(layout, buckets)
    assert list(out) == list(state)
    for name, tensor in state.items():
        expected = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
        assert out[name].dtype == expected.dtype and torch.equal(out[name], expected), name
    assert out["head"].data_ptr() == out["embed"].data_ptr()  # still tied
    exact = unpack(*pack(state, None, bucket_bytes=2**20))  # None: every dtype kept
    for name, tensor in state.items():
        assert exact[name].dtype == tensor.dtype and torch.equal(exact[name], tensor), name


@pytest.mark.parametrize("values, message", [
    ({"bucket_mb": 0}, r"rollout.collective.bucket_mb: Input should be greater than 0 "
                       r"\(got 0\)"),
    ({"timeout_s": -5}, r"rollout.collective.timeout_s: Input should be greater than 0"),
    ({"bucket": 8}, r"rollout.collective.bucket: unknown field"),
])
def test_bad_collective_settings_are_named(values, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"model": {"path": "m"}, "data": {"path": "d"},
                      "rollout": {"weight_sync": "collective", "collective": values}})


# ------------------------------------------------------------------ one process, threads

class _Source:
    """What ``CollectiveSync.send`` needs of a ``LearnerCore``: its rank and the weights."""

    def __init__(self, weights, rank=0):
        self.weights, self.rank = weights, rank

    def full_state_dict(self):
        return self.weights if self.rank == 0 else None


def _driver(timeout_s=20.0, bucket_bytes=1024):
    from services.weight_sync.collective import CollectiveSync

    sync = CollectiveSync()
    sync.options.update(timeout_s=timeout_s, bucket_bytes=bucket_bytes)
    return sync


def _in_thread(fn, *args):
    box = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def test_a_broadcast_in_threads_and_a_reissue_from_the_kept_buckets():
    from services.weight_sync import WeightHandle
    from services.weight_sync.collective import CollectiveSync

    g = torch.Generator().manual_seed(1)
    weights = {"embed": torch.randn(64, 16, generator=g), "w": torch.randn(16, 16, generator=g)}
    weights["head"] = weights["embed"]
    sync = _driver()
    rdv = sync._rendezvous(2)
    sender, sent = _in_thread(CollectiveSync().send, _Source(weights), rdv)
    handle = WeightHandle("collective", rdv)

    def streamed(handle):  # what the vLLM backend is given: names, then a lazy stream
        names, tensors = CollectiveSync().receive_stream(handle)
        got = {name: tensor.clone() for name, tensor in tensors}
        assert sorted(names) == sorted(got)
        return got

    receivers = [_in_thread(CollectiveSync().receive, handle), _in_thread(streamed, handle)]
    assert CollectiveSync().send(_Source(weights, rank=1), rdv) is None  # not the source
    for thread, box in [(sender, sent), *receivers]:
        thread.join(timeout=60)
        assert "error" not in box, box.get("error")
    assert sent["value"]["bytes"] == (64 * 16 + 16 * 16) * 4  # the tied head travels once
    for _, box in receivers:
        _assert_same(box["value"], weights)
    # a re-issue (a worker that joins later) gets the same weights from the kept buckets
    again = sync._rendezvous(1, source_epoch=rdv.epoch)
    sender, _ = _in_thread(CollectiveSync().send, _Source(None), again)
    _assert_same(CollectiveSync().receive(WeightHandle("collective", again)), weights)
    sender.join(timeout=60)
    # the next publish drops the finished epochs' layouts from the driver's store
    from torch.distributed import PrefixStore

    layouts = [PrefixStore(f"harpo-weights/{e}", sync._store) for e in (rdv.epoch, again.epoch)]
    assert all(store.check(["layout"]) for store in layouts)

    class NoLearners:  # publish's only call to the learners; nothing is sent here
        def send_weights(self, *args):
            return []

    sync.publish(NoLearners(), 1)
    assert not any(store.check(["layout"]) for store in layouts)


@pytest.mark.parametrize("how", ["driver aborts", "source lost the weights"])
def test_a_receiver_waiting_for_a_group_that_cannot_form_stops_at_once(how):
    from services.weight_sync import WeightHandle
    from services.weight_sync.collective import CollectiveSync, SyncAborted

    sync = _driver(timeout_s=60.0)
    t0 = time.monotonic()
    if how == "driver aborts":
        handle = WeightHandle("collective", sync._rendezvous(2))  # two receivers; one comes
        receiver, box = _in_thread(CollectiveSync().receive, handle)
        time.sleep(0.2)
        sync.abort(handle)  # what the pool does when the other receiver died
    else:  # a re-issue of weights the learner no longer holds (e.g. it restarted)
        stale = sync._rendezvous(1, source_epoch=0)
        receiver, box = _in_thread(CollectiveSync().receive, WeightHandle("collective", stale))
        time.sleep(0.2)
        with pytest.raises(RuntimeError, match="no longer holds the weights"):
            CollectiveSync().send(_Source(None), stale)
    receiver.join(timeout=30)
    assert isinstance(box.get("error"), SyncAborted), box
    assert time.monotonic() - t0 < 30  # not the 60 s timeout


def test_a_stream_that_starts_the_next_bucket_early_yields_what_a_blocking_one_does():
    from services.weight_sync._buckets import unpack_stream

    g = torch.Generator().manual_seed(2)
    state = {"a": torch.randn(40, generator=g), "b": torch.randn(3, 10, generator=g),
             "n": torch.arange(6), "c": torch.randn(50, generator=g)}
    state["tied"] = state["a"]
    layout, sent = pack(state, None, bucket_bytes=160)
    assert len(sent) == 4  # a | b | c (float32, 40 values each at most, but c alone) | n
    events = []

    def blocking(bucket):  # fills the bucket before it returns
        events.append(("filled", None))
        bucket.copy_(sent[len(events) - 1])

    def started(bucket):  # "on the wire": filled only when waited for
        k = sum(e[0] == "start" for e in events)
        events.append(("start", k))
        return lambda: (events.append(("wait", k)), bucket.copy_(sent[k]))[0]

    plain = [(name, t.clone()) for name, t in unpack_stream(layout, blocking)]
    events.clear()
    early = []
    for name, t in unpack_stream(layout, started):
        early.append((name, t.clone()))
        events.append(("yield", name))
    assert [n for n, _ in early] == [n for n, _ in plain] == ["a", "tied", "b", "c", "n"]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(early, plain))
    _assert_same(dict(early), state)
    # bucket k+1 is on the wire before bucket k's tensors are handed out, never two ahead
    first_yield = events.index(("yield", "a"))
    assert events[:first_yield] == [("start", 0), ("wait", 0), ("start", 1)]
    assert max(k for e, k in events if e == "start") == len(sent) - 1


def test_the_source_and_a_receiver_reuse_their_buckets_and_an_aborted_publish_stays_whole():
    """Two publishes of the same layout fill the same source buckets and land in the same
    receiver buckets, each with the right weights; a publish aborted while the source waits
    for a worker still fills its buckets whole, so a re-issue sends that version."""
    from services.weight_sync import WeightHandle
    from services.weight_sync.collective import CollectiveSync, SyncAborted

    g = torch.Generator().manual_seed(3)
    versions = [{"embed": torch.randn(64, 16, generator=g), "w": torch.randn(40, generator=g),
                 "steps": torch.arange(3)} for _ in range(3)]
    sync, receiver = _driver(bucket_bytes=512), CollectiveSync()  # a worker keeps its own
    got, reports = [], []
    for weights in versions[:2]:
        rdv = sync._rendezvous(1)
        sender, sent = _in_thread(CollectiveSync().send, _Source(weights), rdv)
        got.append(receiver.receive(WeightHandle("collective", rdv)))
        _assert_same({k: v.clone() for k, v in got[-1].items()}, weights)
        sender.join(timeout=60)
        assert "error" not in sent, sent.get("error")
        reports.append(sent["value"])
    assert [r["reused"] for r in reports] == [False, True]
    assert reports[1]["bytes"] == (64 * 16 + 40) * 4 + 3 * 8
    assert got[0]["embed"].data_ptr() == got[1]["embed"].data_ptr()  # the same memory
    # aborted while waiting for its second worker: the source still fills every bucket
    rdv = sync._rendezvous(2)
    sender, sent = _in_thread(CollectiveSync().send, _Source(versions[2]), rdv)
    time.sleep(0.2)
    sync.abort(WeightHandle("collective", rdv))
    sender.join(timeout=30)
    assert isinstance(sent.get("error"), SyncAborted), sent
    again = sync._rendezvous(1, source_epoch=rdv.epoch)
    sender, sent = _in_thread(CollectiveSync().send, _Source(None), again)
    _assert_same(receiver.receive(WeightHandle("collective", again)), versions[2])
    sender.join(timeout=60)
    assert "error" not in sent, sent.get("error")


# ------------------------------------------------------------------ one run's actors

@pytest.fixture(scope="module")
def run(ray_cluster, tiny_assets, tmp_path_factory):
    from transformers import AutoTokenizer

    from services.actors import ActorSet

    root = tmp_path_factory.mktemp("collective")
    config = tiny_config(
        tiny_assets, root / "run", data={"prompts_per_step": PROMPTS},
        rollout={"workers": 2, "weight_sync": "collective",
                 "collective": {"bucket_mb": 0.25, "timeout_s": TIMEOUT_S}},
        reward={"scorers": 1}, learner={"workers": 2, "strategy": "fsdp2"},
        algorithm={"estimator": "grpo"}).with_absolute_paths()
    actors = ActorSet(config, str(config.model.path), version=0, estimator_state=None,
                      run_root=root, on_restart=lambda role: None,
                      on_queue_depth=lambda depth: None)
    tokenizer = AutoTokenizer.from_pretrained(str(config.model.path))
    try:
        yield actors, tokenizer, tiny_assets
    finally:
        actors.shutdown()


def _requests(assets, tokenizer, version, seed):
    from harpo_core.data import load_prompts
    from services.chat import tokenize_prompts
    from services.rollout.worker import RolloutRequest

    prompt_set = load_prompts(assets.data_dir, "train")
    indices = (np.arange(PROMPTS) * 7 + seed) % len(prompt_set.prompts)
    ids = tokenize_prompts(tokenizer, [prompt_set.prompts[i] for i in indices])
    return [RolloutRequest(step=seed, seed=1000 + 10 * seed + k, policy_version=version,
                           prompt_indices=indices[[k]], group_ids=np.array([k]),
                           task_codes=prompt_set.task_codes[indices[[k]]],
                           task_names=prompt_set.task_names,
                           task_types=prompt_set.task_types,
                           answers=[prompt_set.answers[indices[k]]], prompt_ids=[ids[k]])
            for k in range(PROMPTS)]


def _step(run, seed):
    """Generate, score and train one step on the pool's version; returns (metrics, rollouts)."""
    actors, tokenizer, assets = run
    rollouts = actors.pool.run(_requests(assets, tokenizer, actors.pool.version, seed))
    rows = len(rollouts.summary["rollout_id"])
    advantages = np.random.default_rng(seed).normal(size=rows)
    metrics = actors.learners.update(seed, rollouts.shards, advantages,
                                     int(tokenizer.pad_token_id))
    return metrics, rollouts


def _learner_weights(actors):
    """The learners' weights through the object store: what ``object_store`` would serve."""
    import ray

    from services.weight_sync.object_store import ObjectStoreSync

    return ray.get(ObjectStoreSync().publish(actors.learners).payload)


def _worker_weights(member):
    import ray

    return ray.get(member.actor.__ray_call__.remote(
        lambda worker: {k: v.detach().clone() for k, v in
                        worker.backend.model.state_dict().items()}))


def _ready(member):
    import ray

    return ray.get(member.actor.ready.remote())


def _assert_same(got, expected):
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def test_two_learner_ranks_give_the_workers_the_object_store_weights_bit_for_bit(run):
    actors = run[0]
    _step(run, seed=1)
    report = actors.sync_weights(1)
    assert report.synced and report.failures == 0
    assert sorted(report.load_seconds) == sorted(m.name for m in actors.pool.workers)
    expected = _learner_weights(actors)
    for member in actors.pool.workers:
        _assert_same(_worker_weights(member), expected)
        assert _ready(member)["version"] == 1 and _ready(member)["loads"] == 1
    # the update moved the weights: a sync that did nothing would not pass the check above
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(str(run[2].model_dir)).state_dict()
    assert max(float((expected[k] - before[k]).abs().max()) for k in expected) > 1e-4


def test_a_worker_killed_mid_broadcast_is_replaced_and_each_worker_loads_once(run):
    import ray

    actors = run[0]
    _step(run, seed=2)
    sync = actors.weight_sync
    sync.options["bucket_bytes"] = 512  # ~7000 broadcasts: the kill lands inside them
    victim = actors.pool.workers[0]
    survivor = actors.pool.workers[1]
    killed, done = threading.Event(), threading.Event()

    def killer():
        deadline = time.monotonic() + 120
        from torch.distributed import PrefixStore

        # the next publish's check-ins
        store = PrefixStore(f"harpo-weights/{sync._epoch + 1}", sync._store)
        while time.monotonic() < deadline and not done.is_set():
            # once the group is formed: a death between check-in and formation is only
            # noticed at rollout.collective.timeout_s (gloo's connect has no abort)
            if store.check(["formed"]) and store.add("formed", 0) == 3:
                ray.kill(victim.actor, no_restart=True)  # every member is broadcasting
                killed.set()
                return
            time.sleep(0.001)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        report = actors.sync_weights(2)
    finally:
        done.set()
        sync.options["bucket_bytes"] = int(0.25 * 2**20)
    thread.join(timeout=10)
    assert killed.is_set(), "the kill never happened"
    assert report.failures == 1
    # the survivors did not wait out rollout.collective.timeout_s: the death broke their
    # broadcast at once (the sync's time is mostly the replacement's start)
    assert report.seconds < TIMEOUT_S, report.seconds
    names = [m.name for m in actors.pool.workers]
    assert victim.name not in names and survivor.name in names and len(names) == 2
    expected = _learner_weights(actors)
    for member in actors.pool.workers:  # the survivor loaded version 2 once, the new one once
        _assert_same(_worker_weights(member), expected)
        state = _ready(member)
        assert state["version"] == 2
        assert state["loads"] == (2 if member is survivor else 1), (member.name, state)
    # and the pool serves: the next step runs on both workers at version 2
    metrics, rollouts = _step(run, seed=3)
    assert sorted(rollouts.per_worker) == sorted(names)
    assert metrics["logprob_mismatch_max"] < 1e-4


def test_a_scaled_up_pool_with_a_vllm_worker_serves_the_new_version(run):
    from services.actors import sampling_params
    from services.rollout.worker import RolloutWorker

    actors, _, assets = run
    report = actors.sync_weights(3)  # the step of the previous test trained version 3
    assert report.failures == 0
    hf_factory = actors.pool._make_worker

    def vllm_worker(name):  # the scaled-up member runs the vLLM CPU build
        return RolloutWorker.options(num_cpus=1).remote(
            name, "vllm", str(assets.model_dir), sampling_params(actors.config), 1,
            VLLM_OPTIONS, 0, "collective")

    actors.pool._make_worker = vllm_worker
    try:
        previous, _ = actors.scale_rollouts(3)
    finally:
        actors.pool._make_worker = hf_factory
    assert previous == 2
    newcomer = actors.pool.workers[-1]
    assert _ready(newcomer)["version"] == 3 and _ready(newcomer)["loads"] == 1
    # a step on all three workers: vLLM's log-probs (weights received through a re-issued
    # group) match the learners' in fp32
    metrics, rollouts = _step(run, seed=4)
    assert rollouts.per_worker.get(newcomer.name, 0) > 0, rollouts.per_worker
    assert metrics["logprob_mismatch_max"] < 1e-4, metrics["logprob_mismatch_max"]
    # and once more through a regular publish to all three
    report = actors.sync_weights(4)
    assert report.failures == 0 and len(report.load_seconds) == 3
    metrics, rollouts = _step(run, seed=5)
    assert rollouts.per_worker.get(newcomer.name, 0) > 0, rollouts.per_worker
    assert metrics["logprob_mismatch_max"] < 1e-4, metrics["logprob_mismatch_max"]
    for member in actors.pool.workers:
        assert _ready(member)["version"] == 4
