"""Each learner rank fetches only its own shard of a step's rollouts, and advantages travel
with their rows (by ``rollout_id``): real Ray, the tiny model, a real rollout pool."""

import numpy as np
import pyarrow as pa
import pytest

from tests.services.conftest import tiny_config

pytestmark = pytest.mark.slow

PROMPTS, PER_REQUEST = 4, 2  # two requests, so a rank's shards span requests


def _requests(assets, tokenizer, version=0):
    from harpo_core.data import load_prompts
    from services.chat import tokenize_prompts
    from services.rollout.worker import RolloutRequest

    prompt_set = load_prompts(assets.data_dir, "train")
    indices = np.arange(PROMPTS) * 7  # a few different prompts
    ids = tokenize_prompts(tokenizer, [prompt_set.prompts[i] for i in indices])
    positions = np.arange(PROMPTS)
    return [
        RolloutRequest(step=0, seed=100 + k, policy_version=version,
                       prompt_indices=indices[c], group_ids=c,
                       task_codes=prompt_set.task_codes[indices[c]],
                       task_names=prompt_set.task_names, task_types=prompt_set.task_types,
                       answers=[prompt_set.answers[i] for i in indices[c]],
                       prompt_ids=[ids[i] for i in c])
        for k, c in enumerate(np.split(positions, PROMPTS // PER_REQUEST))
    ]


def _pool(config, learner_shards):
    from services.reward_scorer import RewardScorer
    from services.rollout.backend import SamplingParams
    from services.rollout.pool import RolloutPool
    from services.rollout.worker import RolloutWorker

    params = SamplingParams(n=config.rollout.group_size,
                            max_new_tokens=config.rollout.max_new_tokens)

    def make_worker(name):
        return RolloutWorker.options(num_cpus=1).remote(
            name, "hf", str(config.model.path), params, 1, {}, 0,
            weight_sync=config.rollout.weight_sync)

    def make_scorer(name):
        return RewardScorer.options(num_cpus=0.5).remote(config.reward_config(), 1)

    return RolloutPool(make_worker, make_scorer, workers=1, scorers=1, version=0,
                       learner_shards=learner_shards)


def test_each_rank_fetches_only_its_shard_and_two_ranks_match_one(
        ray_cluster, tiny_assets, tmp_path):
    ray = ray_cluster
    from transformers import AutoTokenizer

    from harpo_core.schema import concat
    from services.learner import LearnerGroup
    from services.weight_sync import make_weight_sync

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_assets.model_dir))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    configs = {w: tiny_config(tiny_assets, tmp_path / f"l{w}", run={"steps": 1},
                              data={"prompts_per_step": PROMPTS},
                              rollout={"workers": 1}, reward={"scorers": 1},
                              learner={"workers": w})
               for w in (1, 2)}
    rows = PROMPTS * configs[2].rollout.group_size
    # the advantage of each rollout, by rollout id: the driver scatters its per-row values here
    advantages = np.random.default_rng(0).normal(size=rows)

    pool = _pool(configs[2], learner_shards=2)
    try:
        rollouts = pool.run(_requests(tiny_assets, tokenizer))
        # the same requests (same seeds) scored whole: the step's batch, in request order
        whole = []
        for request in _requests(tiny_assets, tokenizer):
            worker, scorer = pool.workers[0].actor, pool.scorers[0].actor
            gen = worker.generate.remote(request)
            whole.append(ray.get(scorer.score.options(num_returns=2).remote(gen, 1)[1]))
        whole_bytes = sum(batch.nbytes for batch in whole)
        whole = concat(whole)
        assert whole.column("rollout_id").to_pylist() == list(range(rows))
        np.testing.assert_array_equal(rollouts.summary["rollout_id"], np.arange(rows))
        # rank r's shards, in request order, are exactly rows r::2 of the step's batch
        assert len(rollouts.shards) == 2
        for rank, refs in enumerate(rollouts.shards):
            assert len(refs) == PROMPTS // PER_REQUEST
            mine = concat(ray.get(refs))
            expected = whole.take(pa.array(np.arange(rank, rows, 2)))
            assert mine.column("rollout_id").to_pylist() == list(range(rank, rows, 2))
            for name in ("response_ids", "prompt_ids", "response_logprobs", "reward"):
                assert mine.column(name).to_pylist() == expected.column(name).to_pylist(), name

        pool.learner_shards = 1  # the same step again, for one learner rank
        one_rank = pool.run(_requests(tiny_assets, tokenizer))
        np.testing.assert_array_equal(one_rank.summary["reward"], rollouts.summary["reward"])

        results = {}
        for workers, shards in ((2, rollouts.shards), (1, one_rank.shards)):
            learners = LearnerGroup(configs[workers], str(tiny_assets.model_dir))
            try:
                metrics = learners.update(0, shards, advantages, pad_id)
                handle = make_weight_sync("object_store").publish(learners)
                results[workers] = (metrics, learners.rank_metrics, ray.get(handle.payload))
            finally:
                learners.shutdown()
        # the new weights reach the rollout workers through the same handle
        synced = pool.sync(1, handle)
        assert synced.failures == 0 and list(synced.seconds) == [pool.workers[0].name]
        assert ray.get(pool.workers[0].actor.ready.remote())["version"] == 1
    finally:
        pool.shutdown()

    (two, two_ranks, w2), (one, one_ranks, w1) = results[2], results[1]
    for rank_metrics in two_ranks:  # each rank fetched about half of the step's bytes
        assert 0.4 < rank_metrics["fetch_bytes"] / whole_bytes < 0.6, rank_metrics["fetch_bytes"]
        assert rank_metrics["batch_rows"] == rows
    assert sum(m["fetch_bytes"] for m in two_ranks) == pytest.approx(whole_bytes, rel=0.05)
    assert 0.95 < one_ranks[0]["fetch_bytes"] / whole_bytes < 1.05
    assert two["n_sequences"] == one["n_sequences"] == rows
    # two ranks on their shards make the update one rank makes on the whole batch
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-7)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    initial = _initial_weights(tiny_assets)
    moved = max(float((w1[k] - initial[k]).abs().max()) for k in w1)
    assert moved > 1e-4  # the update did something
    total = sum(v.numel() for v in w1.values())
    off = sum(int(((w1[k] - w2[k]).abs() > 1e-6).sum()) for k in w1)
    assert off / total < 1e-3, (off, total)
    assert sum(float((w1[k] - w2[k]).abs().sum()) for k in w1) / total < 1e-8


def _initial_weights(assets):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(assets.model_dir)).state_dict()
