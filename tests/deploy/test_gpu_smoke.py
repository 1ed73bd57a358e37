"""scripts/gpu-smoke.sh without a GPU: its --dry-run builds the Qwen2.5-0.5B-shaped model on
the meta device, writes its config and tokenizer, and validates the run configuration with
harpo's own loader. The GPU run itself has not happened (no GPU here); this checks that what
it would start is well-formed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-smoke.sh"


def _helper():
    spec = importlib.util.spec_from_file_location("harpo_gpu_smoke", ROOT / "scripts/gpu_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-smoke")
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out), "--gpus", "4"],
                          env=env, capture_output=True, text=True, timeout=300)
    return out, done


def test_dry_run_builds_a_qwen25_05b_shaped_model_without_weights(dry_run):
    out, done = dry_run
    assert "494.0 M parameters" in done.stdout, done.stdout + done.stderr
    config = json.loads((out / "model/config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    shape = {k: config[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                    "num_attention_heads", "num_key_value_heads",
                                    "intermediate_size", "tie_word_embeddings")}
    assert shape == {"vocab_size": 151936, "hidden_size": 896, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2,
                     "intermediate_size": 4864, "tie_word_embeddings": True}
    assert config["dtype"] == "bfloat16"
    assert not list(out.glob("model/*.safetensors")), "a dry run writes no weights"
    vocab = json.loads((out / "model/tokenizer.json").read_text())["model"]["vocab"]
    assert 256 < len(vocab) <= config["vocab_size"]  # the tiny byte-level BPE
    assert config["eos_token_id"] == vocab["<|endoftext|>"]
    assert sorted(p.name for p in (out / "data").iterdir())  # the task suite's shards


def test_materialised_model_is_tied_bf16_safetensors(tmp_path):
    """The GPU run's path of build_model (weights written), on a reduced shape here."""
    from safetensors import safe_open

    from services.tiny.model import train_tokenizer

    helper = _helper()
    tokenizer = train_tokenizer(["a small corpus for a small tokenizer"] * 4, vocab_size=300)
    shape = {**helper.QWEN25_05B, "vocab_size": 1024, "hidden_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
             "intermediate_size": 128}
    count = helper.build_model(tmp_path, tokenizer, materialise=True, shape=shape)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert {str(f.get_slice(n).get_dtype()) for n in names} == {"BF16"}
        assert sum(_numel(f.get_slice(n).get_shape()) for n in names) == count
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names  # tied
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"


def _numel(shape) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def test_dry_run_config_is_the_gpu_path_and_valid(dry_run):
    out, done = dry_run
    text = (out / "smoke.yaml").read_text()
    config = yaml.safe_load(text)
    assert config["run"]["steps"] == 2
    assert config["rollout"]["backend"] == "vllm" and config["rollout"]["vllm"]["dtype"] == \
        "bfloat16"
    assert config["rollout"]["weight_sync"] == "collective"
    learner = config["learner"]
    assert (learner["strategy"], learner["dtype"], learner["activation_checkpointing"]) == \
        ("fsdp2", "bfloat16", True)
    assert learner["logprob_chunk_tokens"] and learner["micro_batch_tokens"]
    assert (config["rollout"]["gpus_per_worker"], learner["workers"],
            learner["gpus_per_worker"]) == (1.0, 2, 1.0)  # 4 GPUs: 1 engine, 2 learner ranks
    assert done.returncode == 0, done.stdout + done.stderr
    assert "is valid" in done.stdout


@pytest.mark.parametrize("gpus, learners", [(1, 1), (2, 1), (3, 2), (8, 4), (16, 8)])
def test_layouts_for_any_gpu_count_validate(gpus, learners, tmp_path):
    from services.config import load_config_text

    helper = _helper()
    config = helper.smoke_config(gpus)
    assert config["learner"]["workers"] == learners
    used = config["rollout"]["gpus_per_worker"] + learners * config["learner"]["gpus_per_worker"]
    assert used <= gpus
    load_config_text(yaml.safe_dump(config), "smoke.yaml", tmp_path)


def test_refuses_to_train_without_a_gpu(tmp_path):
    # a stand-in nvidia-smi that fails as it does on a node without a usable driver, so the
    # test means the same on a machine that has a GPU
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {**os.environ, "PYTHON": sys.executable, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(SCRIPT), "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no NVIDIA GPU here" in done.stderr and "--dry-run" in done.stderr
    assert not out.exists()


def test_report_prints_step_time_tokens_sync_and_peak_memory(tmp_path, capsys):
    """The report's reading of a run's files (rows in metrics.jsonl's layout, nvidia-smi CSV)."""
    helper = _helper()
    (tmp_path / "run").mkdir()
    rows = [{"step": s, "tokens_per_s": 1000.0 * s, "learner_peak_memory_gb": 3.5,
             "timing": {"step_s": 10.0 / s, "sync_s": 0.25 * s, "weight_load_s": 0.1,
                        "rollout_wait_s": 4.0, "learn_s": 5.0}} for s in (1, 2)]
    (tmp_path / "run/metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "gpu-memory.csv").write_text("0, 1024\n1, 512\n0, 20480\n1, 30720\n0, 2048\n")
    assert helper.report(tmp_path) == 0
    printed = capsys.readouterr().out.splitlines()
    step2 = next(line.split() for line in printed if line.split()[:1] == ["2"])
    assert step2 == ["2", "5.00", "2000.0", "0.50", "0.10", "4.00", "5.00"]
    assert "reported by the run: learner_peak_memory_gb = 3.5" in printed
    assert any("GPU 0: 20.00 GiB" in line for line in printed)
    assert any("GPU 1: 30.00 GiB" in line for line in printed)
    assert helper.report(tmp_path / "nothing") == 1
