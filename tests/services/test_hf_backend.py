"""The Hugging Face rollout backend: one shared prompt pass per group changes nothing."""

import numpy as np
import pytest
import torch

from harpo_core.data import load_prompts
from services.chat import tokenize_prompts
from services.rollout.backend import SamplingParams
from services.rollout.hf_backend import HFBackend


@pytest.fixture(scope="module")
def backend(tiny_assets):
    return HFBackend(str(tiny_assets.model_dir))


@pytest.fixture(scope="module")
def prompts(tiny_assets, backend):
    """Prompts of very different lengths (the suite's short and long tasks) and one token."""
    data = load_prompts(tiny_assets.data_dir, "train")
    rows = [data.indices_of_task(c)[0] for c in range(len(data.task_names))]
    return tokenize_prompts(backend.tokenizer, [data.prompts[i] for i in rows]) + [[5]]


@pytest.mark.parametrize("params", [
    SamplingParams(n=4, max_new_tokens=12, temperature=1.0),
    SamplingParams(n=3, max_new_tokens=12, temperature=0.7, top_p=0.9),
    SamplingParams(n=2, max_new_tokens=12, temperature=0.0),
])
def test_shared_prefill_samples_what_plain_generate_samples(backend, prompts, params,
                                                            monkeypatch):
    calls = []
    original = backend._prompt_cache
    monkeypatch.setattr(backend, "_prompt_cache",
                        lambda *a: calls.append(a[2]) or original(*a))
    lengths = {len(p) for p in prompts}
    assert min(lengths) == 1 and max(lengths) > 50  # left padding does real work here
    backend.shared_prefill = False
    plain = backend.generate(prompts, params, seed=7)
    backend.shared_prefill = True
    shared = backend.generate(prompts, params, seed=7)
    assert calls == [params.n]  # the prompt pass ran once, for the shared run only
    np.testing.assert_array_equal(shared.token_ids, plain.token_ids)
    np.testing.assert_array_equal(shared.lengths, plain.lengths)
    keep = np.arange(plain.token_ids.shape[1])[None, :] < plain.lengths[:, None]
    np.testing.assert_allclose(shared.logprobs[keep], plain.logprobs[keep], atol=1e-5)
    # and the samples are not all alike, so equal outputs mean something
    assert len({tuple(row) for row in plain.token_ids}) > len(prompts) or params.temperature == 0


@pytest.mark.parametrize("shared_prompt", [True, False])
def test_learner_log_probs_follow_the_sampling_temperature(tiny_assets, backend, prompts,
                                                          shared_prompt):
    """Rollouts sampled at temperature 0.7 are scored by a learner at 0.7 as the backend scored
    them; a learner at temperature 1 would see a different policy (the check can fail)."""
    import pyarrow as pa

    from harpo_core.schema import to_learner_tensors
    from services.config import parse_config
    from services.learner_core import LearnerCore
    from services.rollout.worker import token_columns

    params = SamplingParams(n=3, max_new_tokens=12, temperature=0.7, top_p=0.9)
    gen = backend.generate(prompts, params, seed=3)
    table = pa.table(token_columns(prompts, gen, params.n))
    batch = to_learner_tensors(table, backend.pad_id)
    mask = batch["response_mask"].bool()
    gaps = {}
    for temperature in (0.7, 1.0):
        config = parse_config({
            "model": {"path": str(tiny_assets.model_dir)},
            "data": {"path": str(tiny_assets.data_dir), "prompts_per_step": len(prompts)},
            "rollout": {"group_size": params.n, "temperature": temperature},
            "learner": {"mini_batch_prompts": len(prompts),
                        "shared_prompt_forward": shared_prompt},
        })
        learner = LearnerCore(str(tiny_assets.model_dir), config)
        # the update's own forward pass and the full-sequence one used for reference log-probs
        ours = learner._logprobs(learner.policy, batch, None, responses_only=True)
        full = learner.compute_logprobs(batch)
        assert torch.allclose(ours[mask], full[mask], atol=1e-5)
        gaps[temperature] = (ours - batch["old_logprobs"])[mask].abs().max().item()
    assert gaps[0.7] < 1e-4
    assert gaps[1.0] > 1e-2
