"""The ``fsdp2`` learner strategy, ``learner.dtype``, activation checkpointing and sharded
checkpoints: real torch.distributed over gloo (two spawned ranks), real tiny Qwen2 models.

One spawn runs everything that needs two ranks (its start-up is the expensive part); the
pytest process checks what they wrote against single-rank runs.
"""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from services.config import ConfigError, parse_config
from services.learner_core import LearnerCore, shard_batch
from services.learner_strategies import make_strategy
from services.learner_strategies._model_parts import decoder_layers, hf_model, hf_state_dict
from tests.services.test_learner_core import (
    COMMON,
    VOCAB,
    config_data,
    free_port,
    make_batch,
    make_config,
    params,
    train,
)

PLAIN = dict(shared_prompt_forward=False, **COMMON)  # same kernel shapes on 1 and 2 ranks
# (name, config): the updates both ranks make and save; compared with one rank below
RUNS = [
    ("ddp", dict(strategy="ddp", **PLAIN)),
    ("fsdp2", dict(strategy="fsdp2", **PLAIN)),
    ("fsdp2_kl_micro", dict(strategy="fsdp2", kl_coef=0.5, micro_batch_size=1, **PLAIN)),
    ("fsdp2_ac", dict(strategy="fsdp2", activation_checkpointing=True, **PLAIN)),
    ("fsdp2_untied", dict(strategy="fsdp2", **PLAIN)),  # on the untied model
    # chunked head: lm_head is a group of its own here, the reference model sharded too
    ("fsdp2_chunked_kl_untied", dict(strategy="fsdp2", logprob_chunk_tokens=3, kl_coef=0.5,
                                     micro_batch_size=1, **PLAIN)),
    # ddp's bf16 autocast wrapper with no_sync and checkpointed layers (one row per pass on
    # one rank and two alike, so bf16 rounds the same)
    ("ddp_bf16_micro_ac", dict(strategy="ddp", dtype="bfloat16", micro_batch_size=1,
                               activation_checkpointing=True, **PLAIN)),
]
BF16_UPDATES = 4
# bf16 weights, gradients and AdamW moments, the update rounded stochastically into them
LOW_PRECISION = dict(dtype="bfloat16", master_weights="bfloat16_stochastic")


def held_bytes(core) -> dict:
    """Bytes this rank holds in parameters, gradients and optimizer state (a DTensor: its local
    shard), and the dtypes they are in."""
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    params = [local(p) for p in core.model.parameters()]
    grads = [local(p.grad) for p in core.model.parameters() if p.grad is not None]
    state = [local(v) for s in core.optimizer.state.values() for v in s.values()
             if torch.is_tensor(v) and v.dim() > 0]  # moments (not the step counters)
    return {"bytes": sum(t.numel() * t.element_size() for t in params + grads + state),
            "dtypes": sorted({str(t.dtype) for t in params + grads + state})}


def tiny_qwen2(path, tied):
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    Qwen2ForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """test_learner_core's tiny Qwen2, with lm_head tied to embed_tokens (as harpo's tiny
    model and the small Qwen2.5 models are)."""
    return tiny_qwen2(tmp_path_factory.mktemp("tiny_tied_qwen2"), tied=True)


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
    """The same with a separate lm_head (as Qwen2.5-7B): fsdp2 shards both embeddings on
    their own."""
    return tiny_qwen2(tmp_path_factory.mktemp("tiny_untied_qwen2"), tied=False)


def objective(core, batch):
    """sum(advantage x log-prob) over response tokens: what the policy gradient increases."""
    logprobs = core.compute_logprobs(batch)
    return float((batch["advantages"][:, None] * logprobs * batch["response_mask"]).sum())


def bf16_learns(core, batch, shard):
    """The objective on the whole batch before and after a few updates on the rank's shard."""
    before = objective(core, batch)
    for _ in range(BF16_UPDATES):
        train(core, shard)
    return before, objective(core, batch)


def two_rank_worker(rank, world_size, port, model_dir, untied_dir, out):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    results = {}
    try:
        batch = make_batch(seed=1)
        shard = shard_batch(batch, rank, world_size)
        for name, config in RUNS:
            directory = untied_dir if name.endswith("untied") else model_dir
            core = LearnerCore(directory, make_config(workers=2, **config), rank=rank,
                               world_size=world_size)
            results[name] = train(core, shard)
            weights = core.full_state_dict()  # every rank gathers; rank 0 gets the dict
            assert (weights is None) == (rank != 0)
            if rank == 0:
                save_file(weights, f"{out}/{name}.safetensors")
            del core

        # sharded checkpoint -> resume == uninterrupted (fp32 state; bf16 state with
        # stochastic rounding, whose bits must come out the same after the resume)
        for key, precision in (("", {}), ("_bf16_sr", LOW_PRECISION)):
            config = make_config(workers=2, run={"steps": 10}, lr_schedule="cosine",
                                 warmup_steps=1, weight_decay=0.1, strategy="fsdp2",
                                 **precision, **PLAIN)
            second = shard_batch(make_batch(seed=3), rank, world_size)
            uninterrupted = LearnerCore(model_dir, config, rank=rank, world_size=world_size)
            train(uninterrupted, shard_batch(make_batch(seed=2), rank, world_size))
            uninterrupted.save(f"{out}/ckpt{key}")
            expected = train(uninterrupted, second)
            resumed = LearnerCore(model_dir, config, rank=rank, world_size=world_size)
            resumed.load(f"{out}/ckpt{key}")
            got = train(resumed, second)
            for which, core in (("uninterrupted", uninterrupted), ("resumed", resumed)):
                weights = core.full_state_dict(torch.float64)
                if rank == 0:
                    save_file(weights, f"{out}/{which}{key}.safetensors")
            results[f"resume{key}"] = {"expected": expected, "got": got}
            # what this rank holds after two updates (every rank writes its own)
            with open(f"{out}/held{key or '_fp32'}-{rank}.json", "w") as f:
                json.dump(held_bytes(uninterrupted), f)
            del uninterrupted, resumed

        # ddp replicas with bf16 state round identically on both ranks (or they drift apart)
        core = LearnerCore(model_dir, make_config(workers=2, strategy="ddp", **LOW_PRECISION,
                                                  **PLAIN), rank=rank, world_size=world_size)
        for _ in range(2):
            train(core, shard)
        mine = torch.cat([p.detach().float().flatten() for p in core.model.parameters()])
        theirs = [torch.zeros_like(mine) for _ in range(world_size)]
        dist.all_gather(theirs, mine)
        results["ddp_bf16_sr_replicas_equal"] = all(torch.equal(t, mine) for t in theirs)
        results["ddp_bf16_sr_moved"] = not torch.equal(
            mine, torch.cat([p.detach().float().flatten() for p in
                             AutoModelForCausalLM.from_pretrained(model_dir).parameters()]))
        del core

        # bf16 compute: it runs, and learns
        core = LearnerCore(model_dir, make_config(workers=2, strategy="fsdp2", dtype="bfloat16",
                                                  **PLAIN), rank=rank, world_size=world_size)
        results["bf16"] = bf16_learns(core, batch, shard)
        del core
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(f"{out}/results.json", "w") as f:
            json.dump(results, f)


@pytest.fixture(scope="module")
def two_ranks(model_dir, untied_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2_two_ranks")
    mp.spawn(two_rank_worker, args=(2, free_port(), model_dir, untied_dir, str(out)), nprocs=2)
    return out, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def one_rank_group():
    """fsdp2 with one rank makes a process group of one in this process; gone afterwards."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def single_rank(model_dir, config):
    core = LearnerCore(model_dir, make_config(**config))
    metrics = train(core, make_batch(seed=1))
    return core, metrics


def assert_same_weights(expected: dict, got: dict, atol=1e-6):
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.allclose(value, got[name], atol=atol, rtol=0), name


def assert_same_update(expected: dict, got: dict):
    """The same AdamW step, from gradients all-reduced in another order: they differ in the
    last bits, and Adam's first step (about lr * g / (|g| + eps)) blows that up only where a
    gradient component is ~0. So every weight but a sliver agrees to 1e-6, and none is off by
    1 % of a step (lr 1e-3). (Seen: 1 weight of 2048 in one matrix off by 1.1e-6 on an AMD
    EPYC host whose kernels sum in another order than the hosts this test was written on.)"""
    assert expected.keys() == got.keys()
    total = sum(v.numel() for v in expected.values())
    off = sum(int(((v - got[k]).abs() > 1e-6).sum()) for k, v in expected.items())
    assert off / total < 1e-3, (off, total)
    worst = max(float((v - got[k]).abs().max()) for k, v in expected.items())
    assert worst < 1e-5, worst


@pytest.mark.parametrize("name", [name for name, _ in RUNS])
def test_two_ranks_make_the_update_of_one_rank(two_ranks, model_dir, untied_dir, name,
                                               one_rank_group):
    out, results = two_ranks
    config = dict(dict(RUNS)[name])
    directory = untied_dir if name.endswith("untied") else model_dir
    reference, metrics = single_rank(directory, {**config, "strategy": "ddp"})
    expected = reference.full_state_dict()
    assert "lm_head.weight" in expected  # tied or not, published under both names
    assert_same_update(expected, load_file(str(out / f"{name}.safetensors")))
    for key in ("loss", "grad_norm", "clip_frac", "entropy", "n_tokens"):
        assert results[name][key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-7), key
    if name == "fsdp2":  # and fsdp2 on one rank (a process group of one) too
        fsdp2_one, metrics_one = single_rank(model_dir, config)
        assert_same_weights(expected, fsdp2_one.full_state_dict())
        assert metrics_one["loss"] == pytest.approx(metrics["loss"], rel=1e-5, abs=1e-7)


def test_sharded_checkpoint_resumes_exactly_and_exports_the_hf_model(two_ranks):
    out, results = two_ranks
    expected = load_file(str(out / "uninterrupted.safetensors"))
    assert_same_weights(expected, load_file(str(out / "resumed.safetensors")), atol=0)
    assert results["resume"]["got"]["lr"] == results["resume"]["expected"]["lr"]
    assert results["resume"]["got"]["loss"] == results["resume"]["expected"]["loss"]
    ckpt = out / "ckpt"
    shards = sorted(p.name for p in (ckpt / "sharded_state").iterdir())
    assert shards == ["shard-00001-model-00001-of-00001.safetensors",
                      "shard-00002-model-00001-of-00001.safetensors", "state.json"]
    assert not any(p.suffix in (".pt", ".pkl", ".bin", ".metadata") for p in ckpt.rglob("*"))
    # the HF export is the model as it was saved: rank 0's gathered weights after one update
    exported = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    state = json.loads((ckpt / "sharded_state" / "state.json").read_text())
    assert (state["strategy"], state["world_size"]) == ("fsdp2", 2)
    half = load_file(str(ckpt / "sharded_state" / "shard-00001-model-00001-of-00001.safetensors"))
    embed = exported.model.embed_tokens.weight.detach()
    assert torch.equal(half["model.model.embed_tokens.weight"], embed[: len(embed) // 2])


def test_a_checkpoint_of_the_other_strategy_is_refused(two_ranks, model_dir, tmp_path,
                                                       one_rank_group):
    out, _ = two_ranks
    ddp = LearnerCore(model_dir, make_config(strategy="ddp"))
    with pytest.raises(ValueError, match=r"holds 'fsdp2' learner state, but learner.strategy "
                                         r"is 'ddp': resume with learner.strategy: fsdp2"):
        ddp.load(out / "ckpt")
    ddp.save(tmp_path / "ddp")
    fsdp2 = LearnerCore(model_dir, make_config(strategy="fsdp2"))
    with pytest.raises(ValueError, match=r"holds 'ddp' learner state, but learner.strategy "
                                         r"is 'fsdp2': resume with learner.strategy: ddp"):
        fsdp2.load(tmp_path / "ddp")
    with pytest.raises(FileNotFoundError, match=r"holds no learner training state"):
        fsdp2.load(model_dir)


def test_bf16_runs_and_learns(two_ranks, model_dir):
    _, results = two_ranks
    before, after = results["bf16"]
    assert after > before + 1.0, results["bf16"]  # fsdp2, two ranks, bf16 compute
    core = LearnerCore(model_dir, make_config(strategy="ddp", dtype="bfloat16", **PLAIN))
    assert all(p.dtype == torch.float32 for p in core.model.parameters())  # fp32 master
    batch = make_batch(seed=1)
    seen = []  # the HF model's logits inside the trained module (the log-prob wrapper)
    hook = core.model.register_forward_hook(lambda m, a, out: seen.append(out.logits.dtype))
    with torch.no_grad():
        core.train_model(batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    hook.remove()
    assert seen == [torch.bfloat16]  # bf16 compute
    before, after = bf16_learns(core, batch, batch)
    assert after > before + 1.0
    assert all(p.dtype == torch.float32 for p in core.model.parameters())


def test_activation_checkpointing_recomputes_layers_with_the_same_gradients(
        model_dir, monkeypatch):
    calls = []
    forward = Qwen2DecoderLayer.forward

    def counted(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Qwen2DecoderLayer, "forward", counted)
    runs = {}
    for checkpointing in (False, True):
        core = LearnerCore(model_dir, make_config(activation_checkpointing=checkpointing,
                                                  **PLAIN))
        calls.clear()
        metrics = train(core, make_batch(seed=1))
        runs[checkpointing] = (len(calls), metrics["grad_norm"], params(core))
    (plain_calls, plain_norm, plain), (ac_calls, ac_norm, ac) = runs[False], runs[True]
    assert plain_calls == 2 * 2  # two layers, two mini-batches
    assert ac_calls == 2 * plain_calls  # each layer recomputed in its backward pass
    assert ac_norm == pytest.approx(plain_norm, rel=1e-6)  # the same gradients ...
    assert_same_weights(plain, ac, atol=1e-7)  # ... hence the same update


class LogprobHead(torch.nn.Module):
    """A thin wrapper whose ``.model`` is the causal LM (as a chunked log-prob head is)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kwargs):
        return self.model(**kwargs)


def test_strategies_take_the_hf_model_or_a_wrapper_of_it(model_dir, one_rank_group):
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    names = set(reference.state_dict())
    for name in ("ddp", "fsdp2"):
        wrapper = LogprobHead(AutoModelForCausalLM.from_pretrained(model_dir))
        assert hf_model(wrapper) == ("model.", wrapper.model)
        assert [type(m).__name__ for m in decoder_layers(wrapper)] == ["Qwen2DecoderLayer"] * 2
        strategy = make_strategy(name, rank=0, world_size=1, device=torch.device("cpu"))
        strategy.wrap(wrapper)
        assert len(decoder_layers(wrapper)) == 2  # still found once fully_shard subclassed them
        weights = strategy.full_state_dict(wrapper, torch.bfloat16)
        assert set(weights) == names
        assert all(v.dtype == torch.bfloat16 and v.device.type == "cpu" for v in weights.values())
        assert torch.equal(weights["model.norm.weight"],
                           reference.model.norm.weight.detach().bfloat16())
    assert hf_state_dict(wrapper, {"model.x": 1, "other": 2}) == {"x": 1}
    with pytest.raises(TypeError, match=r"Linear holds no transformers PreTrainedModel"):
        hf_model(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "learner, message",
    [
        (dict(strategy="fsdp3"),
         r"learner.strategy: unknown learner strategy 'fsdp3'; available: \['ddp', 'fsdp2'\]"),
        (dict(dtype="float16"), r"learner.dtype: Input should be 'float32' or 'bfloat16'"),
        (dict(activation_checkpointing="sometimes"),
         r"learner.activation_checkpointing: Input should be a valid boolean"),
    ],
)
def test_bad_strategy_knobs_are_config_errors(learner, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(config_data(**learner))


def test_bf16_state_with_stochastic_rounding_resumes_exactly_and_holds_half(two_ranks):
    """learner.master_weights: bfloat16_stochastic under fsdp2 over two ranks: a resumed run
    rounds with exactly the bits of an uninterrupted one (atol 0), every rank holds bf16
    parameters, gradients and moments, <= 0.6x (here 0.5x) of the fp32 scheme's bytes; under
    ddp the two replicas round identically and the update moved them."""
    out, results = two_ranks
    expected = load_file(str(out / "uninterrupted_bf16_sr.safetensors"))
    got = load_file(str(out / "resumed_bf16_sr.safetensors"))
    assert_same_weights(expected, got, atol=0)
    fp32_run = load_file(str(out / "uninterrupted.safetensors"))  # same updates, fp32 state
    assert not all(torch.equal(expected[k], fp32_run[k]) for k in expected)
    assert results["resume_bf16_sr"]["got"]["loss"] == results["resume_bf16_sr"]["expected"]["loss"]
    for rank in (0, 1):
        low, fp32 = (json.loads((out / f"held_{key}-{rank}.json").read_text())
                     for key in ("bf16_sr", "fp32"))
        assert low["dtypes"] == ["torch.bfloat16"] and fp32["dtypes"] == ["torch.float32"]
        assert low["bytes"] <= 0.6 * fp32["bytes"]
        assert low["bytes"] == fp32["bytes"] // 2
    state = json.loads((out / "ckpt_bf16_sr" / "sharded_state" / "state.json").read_text())
    assert state["param_groups"][0]["rounding_seed"] == 0  # run.seed, restored on resume
    shard = load_file(str(out / "ckpt_bf16_sr" / "sharded_state"
                          / "shard-00001-model-00001-of-00001.safetensors"))
    assert {v.dtype for k, v in shard.items() if "exp_avg" in k} == {torch.bfloat16}
    assert results["ddp_bf16_sr_replicas_equal"] and results["ddp_bf16_sr_moved"]
