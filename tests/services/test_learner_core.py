import copy
import json
import math
import os
import types
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from harpo_core.losses import LossConfig, token_logprobs
from services.config import ConfigError, LearnerSection, parse_config
from services.learner_core import LearnerCore, LogprobMismatchError, shard_batch
from services.learner_forward import PolicyLogprobs
from services.learner_optim import lr_factor
from services.learner_strategies import available_strategies, make_strategy
from services.ports import free_port

BATCH, SEQ_LEN, VOCAB = 8, 12, 64
GROUP = 2  # rollout.group_size of the test configs: a mini-batch of 4 sequences is 2 prompts
COMMON = dict(lr=1e-3, clip_low=0.2, clip_high=0.28)


def config_data(mini_batch=4, *, run=(), rollout=(), **learner):
    """A run configuration (as a dict) with ``mini_batch`` sequences per optimizer step and
    ``learner`` knobs; the data and model paths are never read by LearnerCore."""
    return {
        "model": {"path": "unused"},
        "data": {"path": "unused", "prompts_per_step": BATCH // GROUP},
        "run": dict(run),
        "rollout": {"group_size": GROUP, **dict(rollout)},
        "learner": {"mini_batch_prompts": mini_batch // GROUP, **learner},
    }


def make_config(mini_batch=4, **kwargs):
    return parse_config(config_data(mini_batch, **kwargs))


def train(learner, batch):
    """One update on an off-policy test batch (its log-probs are not the policy's, so the
    rollout/learner mismatch is measured but not enforced)."""
    return learner.update(batch, global_batch_size=BATCH, check_mismatch=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    path = tmp_path_factory.mktemp("tiny_qwen2")
    Qwen2ForCausalLM(config).save_pretrained(path)
    return str(path)


def make_batch(seed=0, old_logprobs=None, grouped=False):
    """Right-padded prompt + response rows of different lengths; row 5 has no response.

    ``grouped``: rows 0-3 and rows 4-7 share a prompt, as the responses of a GRPO group do."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ_LEN), generator=gen)
    attention_mask = torch.zeros(BATCH, SEQ_LEN, dtype=torch.long)
    response_mask = torch.zeros(BATCH, SEQ_LEN, dtype=torch.long)
    for row in range(BATCH):
        prompt = 2 + row % 3
        if grouped:
            prompt = 3 + row // 4
            input_ids[row, :prompt] = input_ids[row - row % 4, :prompt]
        response = 0 if row == 5 else 1 + (3 * row) % (SEQ_LEN - prompt)
        attention_mask[row, : prompt + response] = 1
        response_mask[row, prompt : prompt + response] = 1
    input_ids = input_ids * attention_mask
    if old_logprobs is None:  # plausible log-probs, off-policy enough that some ratios clip
        old_logprobs = -4.0 - 0.5 * torch.rand(BATCH, SEQ_LEN, generator=gen)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "old_logprobs": old_logprobs,
        "advantages": torch.randn(BATCH, generator=gen),
    }


def params(learner):
    return {name: p.detach().clone() for name, p in learner.model.named_parameters()}


def test_update_changes_params_and_returns_finite_metrics(model_dir):
    learner = LearnerCore(model_dir, make_config(**COMMON))
    before = params(learner)
    metrics = train(learner, make_batch())
    after = params(learner)
    assert any(not torch.equal(before[name], after[name]) for name in before)
    expected = {"loss", "clip_frac", "approx_kl", "ratio_mean", "entropy", "grad_norm", "lr",
                "logprob_mismatch_max", "logprob_mismatch_mean", "n_sequences", "n_tokens",
                "n_steps", "skipped_steps"}
    assert expected <= metrics.keys()
    assert all(math.isfinite(value) for value in metrics.values())
    assert metrics["n_steps"] == 2 and metrics["skipped_steps"] == 0
    assert metrics["n_sequences"] == BATCH
    assert metrics["n_tokens"] == make_batch()["response_mask"].sum().item()
    assert 0 < metrics["entropy"] <= math.log(VOCAB) + 1e-5


def test_the_weights_view_is_the_live_parameters_and_equals_the_copy(model_dir):
    """What the collective weight sync fills its buckets from under ddp: no copy."""
    learner = LearnerCore(model_dir, make_config(**COMMON))
    view, copy_ = learner.full_state_dict_view(), learner.full_state_dict()
    assert view.keys() == copy_.keys()
    assert all(torch.equal(view[k], copy_[k]) for k in view)
    live = {p.data_ptr() for p in learner.model.parameters()}
    assert view["model.embed_tokens.weight"].data_ptr() in live
    assert copy_["model.embed_tokens.weight"].data_ptr() not in live
    train(learner, make_batch())  # the view moves with the model, the copy does not
    moved = [k for k in view if not torch.equal(view[k], copy_[k])]
    assert moved and all(torch.equal(view[k], v)
                         for k, v in learner.full_state_dict().items())


def test_on_policy_batch_has_no_mismatch_and_no_clipping(model_dir):
    learner = LearnerCore(model_dir, make_config(BATCH, lr=1e-3, micro_batch_size=3))
    batch = make_batch()
    batch["old_logprobs"] = learner.compute_logprobs(batch, micro_batch_size=5)
    metrics = learner.update(batch, global_batch_size=BATCH)
    assert metrics["logprob_mismatch_max"] < 1e-5
    assert metrics["logprob_mismatch_mean"] < 1e-6
    assert metrics["clip_frac"] == 0.0
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert abs(metrics["approx_kl"]) < 1e-6


def test_compute_logprobs_matches_a_plain_forward(model_dir):
    learner = LearnerCore(model_dir, make_config(kl_coef=0.1))  # kl_coef > 0: a reference
    batch = make_batch()
    model = Qwen2ForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])
    got = learner.compute_logprobs(batch, micro_batch_size=3)
    assert torch.allclose(got[:, 1:], expected.squeeze(-1), atol=1e-5)
    assert torch.allclose(learner.compute_ref_logprobs(batch), got, atol=1e-5)
    with pytest.raises(ValueError, match=r"needs a reference model: learner.kl_coef > 0"):
        LearnerCore(model_dir, make_config()).compute_ref_logprobs(batch)


def test_a_resumed_learner_keeps_the_initial_model_as_its_kl_reference(model_dir, tmp_path):
    """On resume the policy comes from the checkpoint, the KL reference from the model the run
    started from (``reference_dir``): loading both from the checkpoint would reset the KL."""
    trained = LearnerCore(model_dir, make_config(BATCH, lr=1e-2, kl_coef=0.1))
    batch = make_batch()
    batch["old_logprobs"] = trained.compute_logprobs(batch)
    trained.update(batch, global_batch_size=BATCH)
    trained.save(tmp_path)
    resumed = LearnerCore(str(tmp_path), make_config(BATCH, kl_coef=0.1),
                          reference_dir=model_dir)
    initial = LearnerCore(model_dir, make_config(BATCH, kl_coef=0.1))
    assert torch.equal(resumed.compute_ref_logprobs(batch), initial.compute_logprobs(batch))
    assert torch.equal(resumed.compute_logprobs(batch), trained.compute_logprobs(batch))
    assert not torch.allclose(resumed.compute_logprobs(batch), initial.compute_logprobs(batch))


def test_micro_batching_does_not_change_the_update(model_dir):
    whole = LearnerCore(model_dir, make_config(**COMMON))
    micro = LearnerCore(model_dir, make_config(micro_batch_size=1, **COMMON))
    assert (whole.micro_batch_size, micro.micro_batch_size) == (None, 1)  # from the config
    metrics_whole = train(whole, make_batch())
    metrics_micro = train(micro, make_batch())
    for name, value in params(whole).items():
        assert torch.allclose(value, params(micro)[name], atol=1e-6), name
    assert metrics_micro["grad_norm"] == pytest.approx(metrics_whole["grad_norm"], rel=1e-5)
    assert metrics_micro["loss"] == pytest.approx(metrics_whole["loss"], rel=1e-5, abs=1e-7)


def test_non_finite_gradients_skip_the_step(model_dir):
    learner = LearnerCore(model_dir, make_config(**COMMON))
    batch = make_batch()
    batch["advantages"][:] = float("nan")
    before = params(learner)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = train(learner, batch)
    assert metrics["skipped_steps"] == 2
    # the update still counts as an RL step for the LR schedule, without torch's
    # "scheduler before optimizer" warning (that order is intended here)
    assert learner.scheduler.last_epoch == 1
    assert [str(w.message) for w in caught if "lr_scheduler" in str(w.message)] == []
    assert all(torch.equal(before[name], value) for name, value in params(learner).items())


# ----------------------------------------------------------- data parallel equivalence

# The plain forward pass: every rank's rows go through kernels of the same shapes as one rank's,
# so the weights agree to 1e-6. The shared-prompt pass (on a grouped batch) packs each rank's
# half of a group into a shorter row than one rank's whole group: the attention sums change
# shape and order, hence the looser check on the weights.
DDP_CONFIGS = [
    dict(aggregation="seq-mean-token-mean", shared_prompt_forward=False),
    dict(aggregation="token-mean", shared_prompt_forward=False),
    dict(aggregation="seq-mean-token-mean", kl_coef=0.5, micro_batch_size=1,
         shared_prompt_forward=False),
    dict(aggregation="seq-mean-token-mean", shared_prompt_forward=True),
    dict(aggregation="token-mean", kl_coef=0.5, shared_prompt_forward=True),
    # the chunked head's own backward under DDP's gradient hooks, token-budget micro-batches
    # (14 tokens: rank 0 cuts its first mini-batch in two, rank 1 not, unless they agree)
    dict(aggregation="seq-mean-token-mean", shared_prompt_forward=True, logprob_chunk_tokens=4,
         micro_batch_tokens=14),
]


def ddp_batch(config):
    return make_batch(seed=1, grouped=config["shared_prompt_forward"])


def omni_updates(omni, rank=0, world_size=1, strategy="ddp"):
    """Two updates of the tiny thinker on a batch of image, audio, video and text prompts whose
    last pass (video) leaves the audio tower out (tests/services/test_omni_e2e.py)."""
    from tests.services.test_omni_e2e import mixed_learner

    learner, batch, media = mixed_learner(omni, drop_all_three=True, rank=rank,
                                          world_size=world_size, strategy=strategy)
    for _ in range(2):  # DDP finds parameters left out of a step's last pass at the next one
        metrics = learner.update(shard_batch(batch, rank, world_size), media=media,
                                 global_batch_size=len(batch["input_ids"]),
                                 check_mismatch=False)
    return learner, metrics


def ddp_worker(rank, world_size, port, model_dir, out_dir, omni=None):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for index, config in enumerate(DDP_CONFIGS):
            learner = LearnerCore(model_dir, make_config(workers=world_size, **COMMON, **config),
                                  rank=rank, world_size=world_size)
            passes = []
            learner.policy.register_forward_hook(lambda *_, passes=passes: passes.append(1))
            metrics = train(learner, shard_batch(ddp_batch(config), rank, world_size))
            # every rank runs as many forward passes (a sharded model gathers in each)
            counts = [torch.zeros(1, dtype=torch.long) for _ in range(world_size)]
            dist.all_gather(counts, torch.tensor([len(passes)]))
            assert len({int(c) for c in counts}) == 1, (config, counts)
            weights = learner.full_state_dict()  # every rank calls it; rank 0 gets the dict
            assert (weights is None) == (rank != 0)
            if rank == 0:
                save_file(weights, os.path.join(out_dir, f"{index}.safetensors"))
                with open(os.path.join(out_dir, f"{index}.json"), "w") as f:
                    json.dump(metrics, f)
            # Free the DDP wrapper while the process group lives: destroying it after
            # destroy_process_group can block forever once the other rank has exited.
            del learner
        if omni is not None:  # media prompts: planned by signature, towers left out of passes
            for strategy in ("ddp", "fsdp2"):
                learner, metrics = omni_updates(omni, rank, world_size, strategy)
                weights = learner.full_state_dict()
                if rank == 0:
                    save_file(weights, os.path.join(out_dir, f"omni-{strategy}.safetensors"))
                del learner
        dist.barrier()
    finally:
        dist.destroy_process_group()



def test_two_ranks_match_one_rank_on_the_whole_batch(model_dir, omni_assets, tmp_path):
    omni = types.SimpleNamespace(model_dir=str(omni_assets.model_dir),
                                 data_dir=str(omni_assets.data_dir))
    mp.spawn(ddp_worker, args=(2, free_port(), model_dir, str(tmp_path), omni), nprocs=2)
    # the multimodal thinker under DDP: every pass leaves a parameter out (a tower, the
    # audio_bos_eos_token), so DDP looks for unused ones; a tower's gradient accumulated in an
    # earlier pass is still all-reduced when the step's last pass leaves it out. fsdp2 (the
    # towers are units of their own) reduce-scatters every pass with media: with only the last
    # pass synced it failed on the audio tower's unit, run before but not in the last pass
    single, _ = omni_updates(omni)
    initial = load_file(str(omni_assets.model_dir / "model.safetensors"))
    for strategy in ("ddp", "fsdp2"):
        ddp_params = load_file(str(tmp_path / f"omni-{strategy}.safetensors"))
        for name, value in single.state_dict_cpu().items():
            assert torch.allclose(value, ddp_params[name], atol=1e-5, rtol=0), (strategy, name)
    moved = {name for name, value in initial.items()
             if not torch.allclose(value, ddp_params[name], atol=1e-4, rtol=0)}
    assert any(name.startswith("audio_tower.") for name in moved)  # the towers did train
    assert any(name.startswith("visual.") for name in moved)
    for index, config in enumerate(DDP_CONFIGS):
        single = LearnerCore(model_dir, make_config(**COMMON, **config))
        metrics = train(single, ddp_batch(config))
        assert 0 < metrics["clip_frac"] < 1  # the clipped branch is exercised
        ddp_params = load_file(str(tmp_path / f"{index}.safetensors"))
        if not config["shared_prompt_forward"]:
            for name, value in single.state_dict_cpu().items():
                assert torch.allclose(value, ddp_params[name], atol=1e-6, rtol=0), (config, name)
        else:  # Adam's first step (~ lr * sign(g)) blows up rounding only where g is ~0
            diffs = torch.cat([(value - ddp_params[name]).abs().flatten()
                               for name, value in single.state_dict_cpu().items()])
            assert (diffs > 1e-6).float().mean() < 1e-3, config
            assert diffs.mean() < 1e-8, config
        ddp_metrics = json.loads((tmp_path / f"{index}.json").read_text())
        # Adam hides a constant gradient scale; the pre-clip norm does not.
        for name in ("grad_norm", "loss", "clip_frac", "entropy", "n_tokens", "n_sequences"):
            assert ddp_metrics[name] == pytest.approx(metrics[name], rel=1e-5, abs=1e-7), name
        if "micro_batch_tokens" not in config:  # passes as wide as the batch on both ranks:
            # the waste over both ranks' rows equals one rank's (each rank's own differs)
            assert ddp_metrics["padding_waste"] == pytest.approx(metrics["padding_waste"])


def test_shard_batch_puts_every_global_mini_batch_on_all_ranks():
    rows = torch.arange(10)
    shards = [shard_batch({"x": rows}, rank, 2)["x"] for rank in range(2)]
    # with mini_batch_size 4 each rank takes 2 local rows per step: global rows 0-3, 4-7, 8-9
    for start, end in [(0, 2), (2, 4), (4, 5)]:
        step_rows = torch.cat([shard[start:end] for shard in shards]).sort().values
        assert torch.equal(step_rows, torch.arange(2 * start, min(2 * end, 10)))


# ------------------------------------------------------------------- checkpointing

@pytest.mark.parametrize("precision", [{}, dict(dtype="bfloat16",
                                                master_weights="bfloat16_stochastic")])
def test_save_and_load_resume_identically(model_dir, tmp_path, precision):
    config = make_config(run={"steps": 10}, lr_schedule="cosine", warmup_steps=1,
                         weight_decay=0.1, **COMMON, **precision)
    first, second = make_batch(seed=2), make_batch(seed=3)
    uninterrupted = LearnerCore(model_dir, config)
    train(uninterrupted, first)
    uninterrupted.save(tmp_path / "ckpt")
    expected = train(uninterrupted, second)

    resumed = LearnerCore(model_dir, config)
    resumed.load(tmp_path / "ckpt")
    got = train(resumed, second)
    for name, value in params(uninterrupted).items():
        assert torch.allclose(value, params(resumed)[name], atol=1e-7, rtol=0), name
    assert got["lr"] == expected["lr"]
    assert got["loss"] == pytest.approx(expected["loss"], abs=1e-7)
    assert not any(path.suffix in (".pt", ".pkl", ".bin") for path in (tmp_path / "ckpt").iterdir())
    if precision:  # bf16 weights and moments, stochastically rounded: the same bits exactly
        assert all(torch.equal(value, params(resumed)[name])
                   for name, value in params(uninterrupted).items())
        assert {p.dtype for p in resumed.model.parameters()} == {torch.bfloat16}
        published = resumed.full_state_dict()  # for rollout workers: float32, exactly the bf16
        assert all(published[name].dtype == torch.float32
                   and torch.equal(published[name], value.float())
                   for name, value in params(resumed).items())
        saved = load_file(str(tmp_path / "ckpt" / "optimizer.safetensors"))
        assert {v.dtype for k, v in saved.items() if "exp_avg" in k} == {torch.bfloat16}


def test_lr_schedules_by_hand():
    warm = dict(warmup_steps=2, total_steps=6)
    assert [lr_factor(s, schedule="constant", **warm) for s in range(3)] == [0.5, 1.0, 1.0]
    assert [lr_factor(s, schedule="linear", **warm) for s in (2, 4, 6, 9)] == [1.0, 0.5, 0.0, 0.0]
    assert lr_factor(4, schedule="cosine", **warm) == pytest.approx(0.5)
    assert lr_factor(6, schedule="cosine", **warm) == pytest.approx(0.0)


def test_scheduler_drives_the_optimizer_lr_once_per_update(model_dir):
    # 4 optimizer steps per update; the schedule counts updates (RL steps), so the first
    # update runs all four at 1/4 of lr, the second at 2/4 (not 1/4..4/4, then 5/4 -> 1)
    learner = LearnerCore(model_dir, make_config(2, lr=1e-3, warmup_steps=4))
    rates = []
    for seed in (0, 1):
        metrics = train(learner, make_batch(seed=seed))
        assert metrics["n_steps"] == 4
        rates.append(metrics["lr"])
    assert rates == pytest.approx([0.25e-3, 0.5e-3])
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(0.75e-3)


# ------------------------------------------------------------------ validation

# What the configuration can check, it checks once (services.config); LearnerCore takes it as
# given. Each bad knob is an error of the configuration, naming the field.
@pytest.mark.parametrize(
    "data, message",
    [
        (config_data(lr=0.0), r"learner.lr: Input should be greater than 0"),
        (config_data(lr_schedule="step"), r"learner.lr_schedule: Input should be 'constant'"),
        (config_data(run={"steps": 2}, lr_schedule="cosine", warmup_steps=3),
         r"learner.warmup_steps \(3\) must be less than run.steps \(2\)"),
        (config_data(run={"steps": 5}, lr_schedule="linear", warmup_steps=5),
         r"learner.lr_schedule 'linear' .*learner.warmup_steps \(5\).*run.steps \(5\)"),
        (config_data(mini_batch_prompts=0), r"learner.mini_batch_prompts: Input should be"),
        (config_data(ppo_epochs=0), r"learner.ppo_epochs: Input should be greater than or"),
        (config_data(clip_low=1.0), r"learner.clip_low: Input should be less than 1"),
        (config_data(clip_high=-0.1), r"learner.clip_high: Input should be greater than or"),
        (config_data(betas=(0.9, 1.0)), r"learner.betas.1: Input should be less than 1"),
        (config_data(aggregation="sum"), r"learner.aggregation: .*'token-mean'"),
        (config_data(kl_estimator="k2"), r"learner.kl_estimator: Input should be 'k1' or 'k3'"),
        (config_data(kl_coef=-0.1), r"learner.kl_coef: Input should be greater than or"),
        (config_data(rollout={"temperature": 0.0}), r"rollout.temperature: .*greater than 0"),
        (config_data(micro_batch_size=0), r"learner.micro_batch_size: Input should be"),
        (config_data(micro_batch_tokens=0),
         r"learner.micro_batch_tokens: Input should be greater than or equal to 1 \(got 0\)"),
        (config_data(logprob_chunk_tokens=0),
         r"learner.logprob_chunk_tokens: Input should be greater than or equal to 1"),
        (config_data(tis_cap=0.5), r"learner.tis_cap: Input should be greater than or equal to 1"),
        (config_data(logprob_mismatch_tolerance=0.0),
         r"learner.logprob_mismatch_tolerance: Input should be greater than 0"),
        (config_data(strategy="fsdp"),
         r"learner.strategy: unknown learner strategy 'fsdp'; available: \['ddp', 'fsdp2'\]"),
        (config_data(master_weights="bfloat16_stochastic"),
         r"learner: learner.master_weights 'bfloat16_stochastic' holds the weights in bf16, so "
         r"it needs learner.dtype: bfloat16 \(got 'float32'\); or keep "
         r"learner.master_weights: float32"),
        (config_data(dtype="bfloat16", master_weights="bfloat16"),
         r"learner.master_weights: Input should be 'float32' or 'bfloat16_stochastic'"),
        ({**config_data(workers=2, mini_batch_prompts=1), "rollout": {"group_size": 3}},
         r"learner.workers \(2\) must divide the sequences of a mini-batch .* = 3\)"),
    ],
)
def test_bad_config_knobs_are_rejected(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_bf16_master_weights_name_the_strategies_they_support(monkeypatch):
    """A learner strategy other than ddp / fsdp2 (a plugin) is refused with bf16 state."""
    from services.learner_strategies import STRATEGIES, LearnerStrategy

    monkeypatch.setitem(STRATEGIES._classes, "toy", LearnerStrategy)
    data = config_data(strategy="toy", dtype="bfloat16", master_weights="bfloat16_stochastic")
    with pytest.raises(ConfigError, match=r"learner.master_weights 'bfloat16_stochastic' is "
                                          r"built for the strategies \['ddp', 'fsdp2'\], not "
                                          r"learner.strategy 'toy'"):
        parse_config(data)
    assert parse_config(config_data(strategy="toy")).learner.master_weights == "float32"


def test_the_loss_knobs_have_one_source_of_defaults_and_checks():
    assert LearnerSection().loss_config() == LossConfig()
    with pytest.raises(ValueError, match=r"aggregation='sum' is invalid: expected one of"):
        LossConfig(aggregation="sum")
    with pytest.raises(ValueError, match=r"clip_low=1\.0 is invalid: expected in \[0, 1\)"):
        LossConfig(clip_low=1.0)


# What only the running process knows stays a LearnerCore error.
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=1), r"rank=1.*\[0, 1\)"),
        (dict(world_size=0), r"world_size=0.*int >= 1"),
        (dict(world_size=3), r"world_size=3.*divisor of the 4 sequences of a mini-batch"),
        (dict(world_size=2), r"world_size=2.*process group"),
    ],
)
def test_bad_runtime_arguments_are_rejected(model_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LearnerCore(model_dir, make_config(), **kwargs)


def test_strategies_are_a_registry():
    assert available_strategies() == ["ddp", "fsdp2"]
    with pytest.raises(ValueError,
                       match=r"unknown learner strategy 'fsdp'; available: \['ddp', 'fsdp2'\]"):
        make_strategy("fsdp", rank=0, world_size=1, device=torch.device("cpu"))
    single = make_strategy("ddp", rank=0, world_size=1, device=torch.device("cpu"))
    model = torch.nn.Linear(2, 2)
    assert single.wrap(model) is model  # one rank: the plain model


def test_bad_batches_are_rejected(model_dir):
    learner = LearnerCore(model_dir, make_config())
    with pytest.raises(ValueError, match=r"global_batch_size=16.*world_size 1 = 8"):
        learner.update(make_batch(), global_batch_size=16)
    batch = make_batch()
    del batch["advantages"]
    with pytest.raises(ValueError, match=r"missing \['advantages'\]"):
        learner.update(batch, global_batch_size=BATCH)
    batch = make_batch()
    batch["old_logprobs"] = batch["old_logprobs"][:, :-1]
    with pytest.raises(ValueError, match=r"old_logprobs.shape=\(8, 11\)"):
        learner.update(batch, global_batch_size=BATCH)


# ------------------------------------------- chunked log-probs, micro-batches by token budget

def close(got, want, tol=1e-6):
    """Equal to ``tol`` relative to the largest entry (at least 1): fp32 rounding of sums."""
    return (got - want).abs().max().item() <= tol * max(1.0, want.abs().max().item())


def grads(learner):
    """The gradients of the last mini-batch (left in place after its optimizer step)."""
    return {name: p.grad.clone() for name, p in learner.model.named_parameters()}


@pytest.mark.parametrize("shared", [False, True])
def test_chunked_logprobs_make_the_same_update(model_dir, shared):
    # temperature 0.7 (the head divides by it), a reference model (its log-probs chunked too)
    knobs = dict(lr=1e-3, rollout={"temperature": 0.7}, shared_prompt_forward=shared,
                 kl_coef=0.1 if shared else 0.0)
    whole = LearnerCore(model_dir, make_config(BATCH, **knobs))
    chunked = LearnerCore(model_dir, make_config(BATCH, logprob_chunk_tokens=3, **knobs))
    assert chunked.policy.chunk_tokens == 3 and chunked.train_model is chunked.policy
    assert chunked.policy.state_dict().keys() == {f"model.{k}" for k in chunked.model.state_dict()}
    batch = make_batch(seed=4, grouped=shared)
    assert close(chunked.compute_logprobs(batch), whole.compute_logprobs(batch))
    got, want = train(chunked, batch), train(whole, batch)
    for name in ("loss", "grad_norm", "entropy", "clip_frac", "kl"):
        if name in want:
            assert got[name] == pytest.approx(want[name], rel=1e-6, abs=1e-7), name
    # (gradients, not weights: Adam's first step, ~lr * sign(g), turns rounding into lr
    # where a gradient is ~0)
    want_grads = grads(whole)
    for name, grad in grads(chunked).items():
        assert close(grad, want_grads[name]), name
    # the published weights keep the plain Hugging Face names
    assert chunked.full_state_dict().keys() == whole.model.state_dict().keys()


def test_chunking_needs_a_plain_linear_head():
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         final_logit_softcapping=30.0)
    with pytest.raises(ValueError, match=r"learner.logprob_chunk_tokens needs a model whose "
                       r"logits are a plain linear head .*\['final_logit_softcapping'\]: set "
                       r"learner.logprob_chunk_tokens: null"):
        PolicyLogprobs(Qwen2ForCausalLM(config), chunk_tokens=8)


def test_micro_batch_tokens_bound_every_pass_and_keep_the_update(model_dir):
    # row lengths of make_batch(): 3, 7, 11, 12, 7, 4, 11, 7 (padded to 12)
    whole = LearnerCore(model_dir, make_config(BATCH, **COMMON))
    metrics_whole = train(whole, make_batch())
    # padding waste of the passes, by hand: 62 tokens; one pass of 8 x 12 = 96 slots; the
    # 14-token plan (0,2,7) (2,3,11) (3,4,12) (4,6,7) (6,7,11) (7,8,7): 69; one row per pass: 62
    assert metrics_whole["padding_waste"] == pytest.approx(1 - 62 / 96)
    waste = {14: 1 - 62 / 69, 11: 0.0}
    for budget, rows in ((14, None), (11, 3)):
        learner = LearnerCore(model_dir, make_config(BATCH, micro_batch_tokens=budget,
                                                     micro_batch_size=rows, **COMMON))
        passes = []
        learner.policy.register_forward_hook(
            lambda module, args, out, passes=passes: passes.append(tuple(args[0].shape)))
        metrics = train(learner, make_batch())
        assert len(passes) == {14: 6, 11: BATCH}[budget] and sum(n for n, _ in passes) == BATCH
        # within the budget, or a row longer than it alone; each cut to its longest row
        assert all(n * width <= budget or n == 1 for n, width in passes), passes
        assert min(width for _, width in passes) < SEQ_LEN
        assert any(width > budget for _, width in passes) == (budget == 11)
        assert metrics["padding_waste"] == pytest.approx(waste[budget], abs=1e-12)
        whole_grads = grads(whole)
        for name, grad in grads(learner).items():
            assert close(grad, whole_grads[name]), (budget, name)
        for name in ("loss", "grad_norm", "entropy", "logprob_mismatch_p99"):
            assert metrics[name] == pytest.approx(metrics_whole[name], rel=1e-5), name
    # the log-prob passes keep the [B, T] layout (past a row's end: 0, as the row was cut)
    inside = make_batch()["attention_mask"].bool()
    got, want = learner.compute_logprobs(make_batch()), whole.compute_logprobs(make_batch())
    assert close(got[inside], want[inside]) and (got[~inside] == 0).all()


# ------------------------------------------------------ rollout/learner mismatch check

def served_logprobs(model, batch, dtype=torch.float32):
    """The log-probs a rollout backend serving ``model``'s weights in ``dtype`` reports."""
    served = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        logits = served(input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"]).logits.float()
    return token_logprobs(logits, batch["input_ids"])


def test_mismatch_reports_max_mean_and_p99_of_the_token_gaps(model_dir):
    learner = LearnerCore(model_dir, make_config(BATCH, **COMMON))
    batch = make_batch()
    mask = batch["response_mask"].bool()
    gaps = (learner.compute_logprobs(batch) - batch["old_logprobs"])[mask].abs().numpy()
    metrics = train(learner, batch)
    assert metrics["logprob_mismatch_p99"] == pytest.approx(np.quantile(gaps, 0.99), rel=1e-5)
    assert metrics["logprob_mismatch_max"] == pytest.approx(gaps.max(), rel=1e-5)
    assert metrics["logprob_mismatch_mean"] == pytest.approx(gaps.mean(), rel=1e-5)
    assert metrics["logprob_mismatch_p99"] < metrics["logprob_mismatch_max"]


BF16_ROLLOUT = {"backend": "vllm", "vllm": {"dtype": "bfloat16"}}


@pytest.fixture(scope="module")
def peaked_model_dir(tmp_path_factory):
    """A random Qwen2 whose next-token distributions are peaked like a trained model's (the
    default init gives near-uniform ones, where even random weights look alike)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("peaked_qwen2")
    Qwen2ForCausalLM(peaked_config()).save_pretrained(path)
    return str(path)


def peaked_config():
    return Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=128, initializer_range=0.2)


def test_broken_weight_sync_stops_the_update_in_float32_and_bf16(peaked_model_dir):
    batch = make_batch(seed=6)
    torch.manual_seed(1)
    random_model = Qwen2ForCausalLM(peaked_config()).eval()

    def check(learner, rollout_logprobs, stops: bool, match=""):
        before = params(learner)
        rows = {**batch, "old_logprobs": rollout_logprobs}
        if not stops:
            return learner.update(rows, global_batch_size=BATCH)
        with pytest.raises(LogprobMismatchError, match=match):
            learner.update(rows, global_batch_size=BATCH)
        assert all(torch.equal(before[k], v) for k, v in params(learner).items())  # no update

    fp32 = LearnerCore(peaked_model_dir, make_config(BATCH, lr=3e-2))
    bf16 = LearnerCore(peaked_model_dir, make_config(BATCH, lr=3e-2, rollout=BF16_ROLLOUT))
    assert (bf16.mismatch_rule.statistic, bf16.mismatch_rule.tolerance) == ("p99", 1.0)
    initial = copy.deepcopy(fp32.model)
    # the same weights served in bf16: the float32 rule (max 1e-3) would stop every run at
    # step 1 (the bug of issue 16); the bf16 rule lets it train and reports the gap
    genuine_bf16 = served_logprobs(initial, batch, torch.bfloat16)
    metrics = check(bf16, genuine_bf16, stops=False)
    assert 1e-3 < metrics["logprob_mismatch_max"] < 0.2
    assert metrics["logprob_mismatch_p99"] < 0.2
    check(LearnerCore(peaked_model_dir, make_config(BATCH)), genuine_bf16, stops=True,
          match=r"max gap .* breaks max <= 0.001 for rollout fp32 / learner fp32")
    # random weights on the rollout side stop both at once
    check(fp32, served_logprobs(random_model, batch), stops=True, match=r"max <= 0.001")
    check(bf16, served_logprobs(random_model, batch, torch.bfloat16), stops=True,
          match=r"p99 gap .* breaks p99 <= 1 for rollout bf16 / learner fp32")
    # rollout workers left on the initial weights while the learner took one update (a large
    # one, lr 3e-2: an update of lr 1e-6 is well inside bf16 noise and shows only as it adds up)
    train(fp32, make_batch(seed=10))
    check(fp32, served_logprobs(initial, batch), stops=True, match=r"max <= 0.001")
    check(bf16, served_logprobs(initial, batch, torch.bfloat16), stops=True,
          match=r"p99 gap [0-9.]+e\+00 .* breaks p99 <= 1 for rollout bf16")
    # a user's tolerance replaces the threshold, keeping the statistic; stale rollouts of the
    # asynchronous mode are measured, never stopped
    loose = LearnerCore(peaked_model_dir, make_config(BATCH, rollout=BF16_ROLLOUT,
                                                      logprob_mismatch_tolerance=20.0))
    assert (loose.mismatch_rule.statistic, loose.mismatch_rule.tolerance) == ("p99", 20.0)
    check(loose, served_logprobs(random_model, batch, torch.bfloat16), stops=False)
    metrics = fp32.update({**batch, "old_logprobs": served_logprobs(random_model, batch)},
                          global_batch_size=BATCH, check_mismatch=False)
    assert metrics["logprob_mismatch_p99"] > 1.0


# -------------------------------------------------------- truncated importance sampling

def test_tis_cap_weights_each_token_by_the_capped_learner_rollout_ratio(model_dir):
    batch = make_batch(seed=5)
    knobs = dict(COMMON, max_grad_norm=1e6)  # no clipping: the gradients compare as they are
    plain = LearnerCore(model_dir, make_config(BATCH, **knobs))
    batch["old_logprobs"] = plain.compute_logprobs(batch)  # rollouts on the learner's weights
    metrics_plain = train(plain, batch)
    assert "tis_weight_mean" not in metrics_plain
    # on-policy every weight is 1: the plain update
    on_policy = LearnerCore(model_dir, make_config(BATCH, tis_cap=2.0, **knobs))
    metrics = train(on_policy, batch)
    assert metrics["tis_weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["tis_truncated_frac"] == 0.0
    plain_grads = grads(plain)
    for name, grad in grads(on_policy).items():
        assert close(grad, plain_grads[name], 1e-5), name
    # the rollout engine found every token 3 times less likely than the learner: each weight
    # is min(3, 2) = 2, so the loss and the gradients double (PPO's ratio is around the
    # learner's own log-probs, 1 on the first step)
    capped = LearnerCore(model_dir, make_config(BATCH, tis_cap=2.0, **knobs))
    metrics = train(capped, {**batch, "old_logprobs": batch["old_logprobs"] - math.log(3.0)})
    assert metrics["tis_weight_mean"] == pytest.approx(2.0)
    assert metrics["tis_truncated_frac"] == 1.0
    assert metrics["loss"] == pytest.approx(2 * metrics_plain["loss"], rel=1e-5)
    assert metrics["grad_norm"] == pytest.approx(2 * metrics_plain["grad_norm"], rel=1e-5)
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    for name, grad in grads(capped).items():
        assert close(grad, 2 * plain_grads[name], 1e-5), name


def test_the_rollout_dtype_comes_from_the_backend_and_the_checkpoint(tmp_path):
    from services.learner_mismatch import learner_mismatch_rule

    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))

    def rule(**rollout):
        return learner_mismatch_rule(make_config(rollout=rollout), tmp_path)

    assert rule().dtypes == ("fp32", "fp32")  # hf serves float32 whatever the checkpoint
    assert rule(backend="vllm").dtypes == ("bf16", "fp32")  # auto: the checkpoint's dtype
    assert rule(backend="vllm", vllm={"dtype": "float32"}).dtypes == ("fp32", "fp32")
    assert rule(backend="vllm", vllm={"dtype": "float16"}).tolerance == 0.2
