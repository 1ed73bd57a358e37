"""The memory plan (harpo_core/memory.py, services/plan.py, ``harpo plan``): figures checked
against hand arithmetic for a Qwen2.5-7B-shaped model, refusals that name the knobs, and bad
values with their messages.

The 7B model is its published config.json dimensions only (no weights: the planner reads
config.json alone); the parameter formula is checked against real transformers models."""

import json
import math
from pathlib import Path

import pytest
import yaml

from harpo_core.memory import ModelShape
from services.cli import main
from services.config import ConfigError, load_config
from services.plan import PlanError, build_plan, plan_memory, read_shape

GIB = 2**30
# Qwen2.5-7B's published dimensions (its config.json on the Hugging Face Hub).
QWEN25_7B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
             "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
             "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
             "tie_word_embeddings": False, "max_position_embeddings": 131072,
             "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16"}
# By hand: embeddings and lm_head 152064 x 3584 each, final norm 3584; per layer q 3584x3584
# + bias, k and v 3584x512 + bias, o 3584x3584, MLP 3 x 3584x18944, two norms.
LAYER = (3584 * 3584 + 3584) + 2 * (3584 * 512 + 512) + 3584 * 3584 + 3 * 3584 * 18944 \
    + 2 * 3584
ROOT = 2 * 152064 * 3584 + 3584
P7B = 28 * LAYER + ROOT
TOKENS = 256 + 2048  # data.max_prompt_tokens + rollout.max_new_tokens
ACT = 4 * 3584 + 3 * 3584 + 3 * 512 + 4 * 18944  # values kept per token and layer


def gib(n: float) -> str:
    """As the plan prints sizes: GiB from 1 GiB up, MiB below."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


@pytest.fixture(scope="module")
def qwen7b(tmp_path_factory) -> Path:
    model = tmp_path_factory.mktemp("qwen2.5-7b-shape")
    (model / "config.json").write_text(json.dumps(QWEN25_7B))
    return model


def write_run(tmp_path: Path, model: Path, **sections) -> Path:
    config = {
        "model": {"path": str(model)},
        "data": {"path": str(tmp_path / "data"), "prompts_per_step": 32,
                 "max_prompt_tokens": 256},
        "rollout": {"backend": "vllm", "workers": 8, "group_size": 5, "max_new_tokens": 2048,
                    "gpus_per_worker": 1,
                    "vllm": {"dtype": "bfloat16", "device_memory_gib": 80}},
        "learner": {"workers": 8, "mini_batch_prompts": 8, "micro_batch_size": 1,
                    "gpus_per_worker": 1, "device_memory_gib": 80},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_parameter_count_is_the_real_models(tiny_assets, qwen7b):
    """The formula's count equals transformers' own: the tiny model's weights, and Qwen2.5-7B
    built on the meta device (no memory); 7.62 B is the published figure."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tiny, dtype = read_shape(tiny_assets.model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_assets.model_dir))
    assert tiny.parameters == sum(p.numel() for p in model.parameters()) and dtype == "float32"
    shape, dtype = read_shape(qwen7b)
    assert (shape.parameters, dtype) == (P7B, "bfloat16") and P7B == 7_615_616_512
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(qwen7b)))
    assert shape.parameters == sum(p.numel() for p in meta.parameters())


def test_refuses_7b_fp32_ddp_on_80_gib(qwen7b, tmp_path, capsys):
    """ddp keeps parameters, gradients, AdamW state and DDP's buckets whole on every rank:
    20 bytes per parameter, 142 GiB before activations."""
    status = main(["plan", str(write_run(tmp_path, qwen7b))])
    out, err = capsys.readouterr()
    assert status == 2
    activations = TOKENS * 28 * ACT * 4  # float32, no checkpointing
    logits = 3 * TOKENS * 152064 * 4  # logits, log-softmax, gradient; whole micro-batch
    total = 20 * P7B + activations + logits + 2 * GIB
    assert gib(total) == "172.4 GiB"
    assert err.startswith(f"harpo: error: the learner needs about {gib(total)} per rank, more "
                          f"than the 80.0 GiB it has (learner.device_memory_gib): parameters "
                          f"{gib(4 * P7B)} + gradients {gib(4 * P7B)} + optimizer state "
                          f"{gib(8 * P7B)} + DDP buckets {gib(4 * P7B)} + activations "
                          f"{gib(activations)} + logits {gib(logits)} + runtime 2.0 GiB "
                          f"(learner.strategy ddp, learner.dtype float32, learner.workers 8, "
                          f"micro-batch 1 x 2304 tokens)")
    # the knobs, each with the total it would give; fsdp2 over the same 8 ranks fits
    fsdp2 = 16 * P7B // 8 + 2 * 4 * ROOT + activations + logits + 2 * GIB
    assert f"learner.strategy: fsdp2 -> {gib(fsdp2)} (fits)" in err
    assert "learner.activation_checkpointing: true -> " in err
    assert "learner.logprob_chunk_tokens: 1024 -> " in err
    assert "learner.strategy: fsdp2 with learner.workers: 3 (the fewest ranks that fit)" in err
    assert "DOES NOT FIT" in out and f"{'total':<18}{gib(total):>12}" in out


def test_accepts_7b_bf16_fsdp2_over_8_ranks_of_80_gib(qwen7b, tmp_path, capsys):
    path = write_run(tmp_path, qwen7b,
                     learner={"strategy": "fsdp2", "dtype": "bfloat16",
                              "activation_checkpointing": True, "logprob_chunk_tokens": 1024})
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    rows = {
        "parameters": 4 * P7B // 8,  # float32 master copy, sharded over 8
        "gradients": 4 * P7B // 8,
        "optimizer state": 8 * P7B // 8,
        "unsharded unit": 2 * 2 * ROOT,  # root (embeddings + lm_head) > a layer, bf16 + grad
        "activations": TOKENS * (28 * 3584 + ACT) * 2,  # layer inputs + one layer, bf16
        "logits": 3 * 1024 * 152064 * 4,
        "runtime": 2 * GIB,
    }
    for name, value in rows.items():
        assert f"    {name:<18}{gib(value):>12}" in out, name
    total = sum(rows.values())
    assert f"{'total':<18}{gib(total):>12}  of 80.0 GiB (learner.device_memory_gib)" in out
    assert gib(total) == "22.9 GiB"
    # vLLM, one GPU: bf16 weights, KV cache 2 x 28 layers x 4 heads x 128 x 2 bytes per token
    kv_token = 2 * 28 * 4 * 128 * 2
    assert f"    {'weights':<18}{gib(2 * P7B):>12}" in out
    assert f"    {'KV cache':<18}{gib(20 * TOKENS * kv_token):>12}" in out  # 4 prompts x 5
    assert "of 40.0 GiB (rollout.vllm.device_memory_gib x rollout.vllm." \
           "gpu_memory_utilization 0.5)" in out
    assert out.rstrip().endswith("  fits")


def test_bf16_state_halves_the_learner_state_and_is_offered_as_a_knob(qwen7b, tmp_path,
                                                                     capsys):
    """learner.master_weights: bfloat16_stochastic: bf16 parameters, gradients and moments
    (2 + 2 + 4 bytes per parameter, sharded), one float32 chunk of the AdamW step, no separate
    bf16 working copy; ddp's buckets hold bf16 gradients. A refusal offers the knob."""
    from harpo_core.memory import CHUNK_ELEMENTS, LearnerSetup, learner_memory

    path = write_run(tmp_path, qwen7b,
                     learner={"strategy": "fsdp2", "dtype": "bfloat16",
                              "master_weights": "bfloat16_stochastic",
                              "activation_checkpointing": True, "logprob_chunk_tokens": 1024})
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "learner, per rank: fsdp2, bfloat16 (bfloat16_stochastic state), 8 rank(s)" in out
    rows = {"parameters": 2 * P7B // 8, "gradients": 2 * P7B // 8,
            "optimizer state": 4 * P7B // 8, "optimizer chunk": 7 * 4 * CHUNK_ELEMENTS}
    for name, value in rows.items():
        assert f"    {name:<18}{gib(value):>12}" in out, name
    assert gib(7 * 4 * CHUNK_ELEMENTS) == "112.0 MiB"
    # ddp, 8 ranks: 8 bytes of state + 2 of bf16 buckets instead of 16 + 4, no working copy
    setup = dict(strategy="ddp", dtype="bfloat16", world_size=8, micro_batch_rows=1,
                 tokens_per_row=TOKENS)
    shape = read_shape(qwen7b)[0]
    fp32 = learner_memory(shape, LearnerSetup(**setup))
    low = learner_memory(shape, LearnerSetup(**setup, master_weights="bfloat16_stochastic"))
    assert fp32["bf16 working copy"] == 2 * P7B and "bf16 working copy" not in low
    assert (low["DDP buckets"], fp32["DDP buckets"]) == (2 * P7B, 4 * P7B)
    state = ("parameters", "gradients", "optimizer state")
    assert sum(low[k] for k in state) / sum(fp32[k] for k in state) == 0.5
    with pytest.raises(ValueError, match=r"learner.master_weights 'bfloat16_stochastic' needs "
                                         r"learner.dtype bfloat16, not 'float32'"):
        LearnerSetup(**{**setup, "dtype": "float32"}, master_weights="bfloat16_stochastic")
    with pytest.raises(ValueError, match=r"learner.master_weights 'bf16' is invalid"):
        LearnerSetup(**setup, master_weights="bf16")
    # the 7B / fp32 / ddp refusal names it with the total it would give
    assert main(["plan", str(write_run(tmp_path, qwen7b))]) == 2
    err = capsys.readouterr().err
    assert ("learner.master_weights: bfloat16_stochastic with learner.dtype: bfloat16 -> "
            in err)


def test_vllm_that_cannot_hold_its_weights(qwen7b, tmp_path, capsys):
    path = write_run(tmp_path, qwen7b, learner={"strategy": "fsdp2"})
    status = main(["plan", str(path), "--set", "rollout.vllm.gpu_memory_utilization=0.2",
                   "--set", "rollout.vllm.dtype=float32"])
    err = capsys.readouterr().err
    assert status == 2
    assert (f"vLLM cannot start: per tensor-parallel rank the weights ({gib(4 * P7B)}, "
            f"float32) + runtime 2.0 GiB leave 0.0 MiB of its 16.0 GiB") in err
    assert ("raise rollout.vllm.gpu_memory_utilization or rollout.vllm.tensor_parallel_size "
            "(now 1, with rollout.gpus_per_worker), serve in rollout.vllm.dtype: bfloat16, or "
            "lower rollout.vllm.max_model_len") in err


def test_colocated_engine_must_leave_room_for_the_learner(qwen7b, tmp_path):
    """Colocated: vLLM takes gpu_memory_utilization of the GPU while the learner keeps its
    sharded master parameters and AdamW state there."""
    path = write_run(tmp_path, qwen7b, rollout={"colocate": True, "gpus_per_worker": 0.5},
                     learner={"strategy": "fsdp2", "dtype": "bfloat16",
                              "activation_checkpointing": True, "logprob_chunk_tokens": 1024,
                              "gpus_per_worker": 0.5})
    config = load_config(path, {"rollout.vllm.device_memory_gib": None,
                                "rollout.vllm.gpu_memory_utilization": 0.9})
    plan = plan_memory(config, gpu_probe=lambda: pytest.fail("the learner's GPU is declared"))
    resident = (4 + 8) * P7B // 8 + 2 * GIB  # master parameters + AdamW state + runtime
    most = math.floor(100 * (80 * GIB - resident) / (80 * GIB)) / 100
    assert most == 0.84
    with pytest.raises(PlanError, match=r"colocated: the learner keeps " + gib(resident)
                       + r" on the GPU .* \(72\.0 GiB\); lower it to at most 0\.84"):
        plan.check()


def test_gpu_memory_is_measured_when_not_declared(qwen7b, tmp_path):
    """No device_memory_gib: a GPU driver measures its GPU 0 (stand-in probe here: no GPU);
    none there: the learner is not checked and the table says how to declare it."""
    config = load_config(write_run(tmp_path, qwen7b), {"learner.device_memory_gib": None,
                                                       "rollout.vllm.device_memory_gib": None})
    measured = plan_memory(config, gpu_probe=lambda: 141 * GIB)
    assert measured.learner_device == 141 * GIB and measured.problems  # 172 GiB > 141
    unknown = plan_memory(config, gpu_probe=lambda: None)
    assert not unknown.problems
    assert "of ? (not checked: no GPU here to measure; set learner.device_memory_gib)" \
        in unknown.table()


def test_a_learner_on_an_undeclared_gpu_checks_itself(qwen7b, tmp_path):
    """What Learner.setup runs on a GPU when no memory was declared or measured before: the
    plan against the GPU's own total (141 GiB here, an H200's; a stand-in figure, no GPU)."""
    from services.plan import check_learner_device

    config = load_config(write_run(tmp_path, qwen7b), {"learner.device_memory_gib": None})
    with pytest.raises(PlanError, match=r"^learner rank 3: the learner needs about 172\.4 GiB "
                                        r"per rank, more than the 141\.0 GiB it has \(this "
                                        r"GPU, measured\)"):
        check_learner_device(config, qwen7b, 141 * GIB, "learner rank 3")
    check_learner_device(config.model_copy(update={"learner": config.learner.model_copy(
        update={"strategy": "fsdp2"})}), qwen7b, 141 * GIB, "learner rank 3")


def test_bad_values_are_named(qwen7b, tmp_path, capsys):
    path = write_run(tmp_path, qwen7b)
    cases = {
        "learner.device_memory_gib=0": "learner.device_memory_gib: Input should be greater "
                                       "than 0 (got 0)",
        "rollout.vllm.device_memory_gib=-80": "rollout.vllm.device_memory_gib: Input should "
                                              "be greater than 0 (got -80)",
        "rollout.vllm.tensor_parallel_size=2": "rollout: rollout.vllm.tensor_parallel_size 2 "
                                               "needs rollout.gpus_per_worker >= 2 (one GPU per"
                                               " tensor-parallel rank), got 1",
    }
    for override, message in cases.items():
        assert main(["plan", str(path), "--set", override]) == 2
        assert message in capsys.readouterr().err, override
    assert main(["plan", str(path), "--set", "rollout.colocate=true",
                 "--set", "rollout.max_staleness=1"]) == 2
    assert "rollout.colocate puts the engines to sleep during the learner update, so " \
           "generation cannot overlap it: rollout.max_staleness must be 0" \
           in capsys.readouterr().err
    assert main(["plan", str(path), "--set", "rollout.colocate=true",
                 "--set", "rollout.gpus_per_worker=0"]) == 2
    assert "vLLM's sleep mode is GPU only" in capsys.readouterr().err


def test_model_configs_that_cannot_be_planned(qwen7b, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({**QWEN25_7B, "num_key_value_heads": 5}))
    assert main(["plan", str(write_run(tmp_path, broken))]) == 2
    assert ("config.json: model num_key_value_heads = 5 is invalid: it must divide "
            "num_attention_heads (28)") in capsys.readouterr().err
    (broken / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 0}))
    assert main(["plan", str(write_run(tmp_path, broken))]) == 2
    assert "model hidden_size = 0 is invalid: expected a positive integer" \
        in capsys.readouterr().err
    with pytest.raises(ValueError, match="learner.strategy 'zero3' has no memory model"):
        build_plan(load_config(write_run(tmp_path, qwen7b)).model_copy(update={
            "learner": load_config(write_run(tmp_path, qwen7b)).learner.model_copy(
                update={"strategy": "zero3"})}), ModelShape(1, 1, 1, 1, 1, 1, 1, True))


def test_a_model_directory_without_config_json_is_named(tmp_path, capsys):
    empty = tmp_path / "no-model"
    empty.mkdir()
    with pytest.raises(PlanError, match=r"cannot read the model's shape: .*no-model/config\.json "
                                        r"does not exist \(model\.path"):
        read_shape(empty)


def test_train_prints_the_plan_and_cpu_runs_are_checked_against_this_machine(
        tiny_assets, tmp_path, capsys):
    """A CPU configuration: no GPU figure, each actor against this machine's memory."""
    from services.cli_run import check_before_start
    from tests.services.conftest import tiny_config

    config = tiny_config(tiny_assets, tmp_path / "run")
    check_before_start(config, resume=False, ports=False, output=False)
    out = capsys.readouterr().out
    assert "memory plan: 0.00 B parameters (4 layers, hidden 128, vocab 512, tied " \
           "embeddings)" in out and out.rstrip().endswith("  fits")
    plan = plan_memory(config, host_memory=64 * GIB)
    assert not plan.problems and "runtime" not in plan.learner
    assert "of 64.0 GiB (CPU: this machine's memory)" in plan.table()
    tight = plan_memory(config, host_memory=2**20)
    assert tight.problems[0].startswith("one rollout request would need about ")
    assert tight.problems[1].startswith("the learner needs about ")
    with pytest.raises(ConfigError):  # --set goes through the same validation as the file
        load_config(write_run(tmp_path, tiny_assets.model_dir), {"learner.dtype": "fp8"})
