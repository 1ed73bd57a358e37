"""The Python half of scripts/gpu-smoke.sh: prepare a GPU smoke run, then report on it.

    python scripts/gpu_smoke.py prepare OUT --gpus N [--dry-run]
    python scripts/gpu_smoke.py report OUT

``prepare`` writes into OUT:

- ``data/``: a small copy of the project's synthetic task suite (services/tiny/tasks.py);
- ``model/``: a randomly initialised model with Qwen2.5-0.5B's shape (24 layers, hidden 896,
  14 query / 2 key-value heads, MLP 4864, vocabulary 151,936, tied embeddings, ≈ 494 M
  parameters), saved in bfloat16, with the project's tiny byte-level BPE tokenizer (its ids
  are the first few hundred of the 151,936 rows, as Qwen's tokenizer fills fewer rows than the
  embedding has). With ``--dry-run`` the model is built on the meta device (shape and parameter
  count, no memory) and only its config and tokenizer are written, no weights;
- ``smoke.yaml``: a 2-step run with vLLM (bf16) + fsdp2 (bf16, activation checkpointing,
  chunked log-probs, token-budget micro-batches) + collective weight sync, laid out on N GPUs,

and validates ``smoke.yaml`` with harpo's own config loader: an invalid one exits 2 with its
message (before the model is built; with ``--dry-run`` after, so the model is still checked).

``report`` prints, per step, the step time, tokens/s, weight-sync time and learner time from
``OUT/run/metrics.jsonl``, any memory figure the learners report there, and the peak memory
used on each GPU sampled by nvidia-smi during the run (``OUT/gpu-memory.csv``).

Not run on a GPU yet: no GPU was available where this was written.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import yaml

# Qwen2.5-0.5B's dimensions (its config.json on the hub); nothing is downloaded.
QWEN25_05B = dict(
    vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, intermediate_size=4864, max_position_embeddings=32768,
    rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
)
STEPS = 2
PROMPTS_PER_STEP = 8
GROUP_SIZE = 8


def layout(gpus: int) -> dict:
    """Rollout and learner placement for ``gpus`` GPUs on one node.

    One GPU: the engine and one learner share it (half a GPU each in Ray's accounting; vLLM
    keeps to ``gpu_memory_utilization`` of it). More: one engine on its own GPU and the largest
    power of two of learner ranks that fits the rest (it divides the 64 sequences of a step).
    """
    if gpus < 1:
        raise ValueError(f"--gpus must be at least 1 (got {gpus})")
    if gpus == 1:
        return {"rollout_gpus": 0.5, "learners": 1, "learner_gpus": 0.5, "vllm_memory": 0.3}
    learners = 1
    while learners * 2 <= gpus - 1 and (PROMPTS_PER_STEP * GROUP_SIZE) % (learners * 2) == 0:
        learners *= 2
    return {"rollout_gpus": 1.0, "learners": learners, "learner_gpus": 1.0, "vllm_memory": 0.6}


def smoke_config(gpus: int) -> dict:
    """The run configuration (paths relative to the file, i.e. to OUT)."""
    place = layout(gpus)
    return {
        "run": {"name": "gpu-smoke", "output_dir": "run", "steps": STEPS,
                "checkpoint_every": 0, "keep_checkpoints": 1, "max_restarts": 0},
        "model": {"path": "model"},
        "data": {"path": "data", "prompts_per_step": PROMPTS_PER_STEP, "max_prompt_tokens": 256,
                 "eval_prompts_per_task": 2},
        "rollout": {
            "backend": "vllm", "workers": 1, "group_size": GROUP_SIZE, "max_new_tokens": 128,
            "gpus_per_worker": place["rollout_gpus"], "weight_sync": "collective",
            "vllm": {"dtype": "bfloat16", "tensor_parallel_size": 1, "max_model_len": 512,
                     "gpu_memory_utilization": place["vllm_memory"], "enforce_eager": True},
        },
        "reward": {"scorers": 1},
        "learner": {
            "workers": place["learners"], "gpus_per_worker": place["learner_gpus"],
            "strategy": "fsdp2", "dtype": "bfloat16", "activation_checkpointing": True,
            "mini_batch_prompts": PROMPTS_PER_STEP, "micro_batch_tokens": 4096,
            "logprob_chunk_tokens": 1024, "tis_cap": 2.0, "lr": 1e-6,
        },
        "observability": {"progress": "never", "metrics_port": None},
        "control": {"port": None},
    }


def build_model(model_dir: Path, tokenizer, *, materialise: bool, shape: dict = QWEN25_05B
                ) -> int:
    """Save the Qwen2.5-0.5B-shaped model (weights only if ``materialise``); its size."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from services.tiny.model import EOS_TOKEN, IM_END

    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    config = Qwen2Config(**shape, bos_token_id=None, eos_token_id=eos_id,
                         pad_token_id=eos_id)
    generation = GenerationConfig(eos_token_id=[eos_id, im_end_id], pad_token_id=eos_id,
                                  bos_token_id=None)
    model_dir.mkdir(parents=True, exist_ok=True)
    if materialise:
        torch.manual_seed(0)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
        model = model.to(torch.bfloat16)
        model.generation_config = generation
        model.save_pretrained(model_dir)
        model = model.cpu()
        del model
    else:
        with torch.device("meta"):
            model = Qwen2ForCausalLM(config)
        config.dtype = torch.bfloat16
        config.architectures = [Qwen2ForCausalLM.__name__]  # what save_pretrained would write
        config.save_pretrained(model_dir)
        generation.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    with torch.device("meta"):
        return sum(p.numel() for p in Qwen2ForCausalLM(config).parameters())


def prepare(out: Path, gpus: int, dry_run: bool) -> int:
    from services.config import ConfigError, load_config
    from services.tiny.model import train_tokenizer
    from services.tiny.tasks import suite_corpus, write_suite

    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "smoke.yaml"
    config_path.write_text(
        "# scripts/gpu-smoke.sh: 2 steps, vLLM + fsdp2 + collective sync, bf16, on a random\n"
        "# Qwen2.5-0.5B-shaped model. Paths are relative to this file.\n"
        + yaml.safe_dump(smoke_config(gpus), sort_keys=False))
    try:
        load_config(config_path)
        invalid = None
    except ConfigError as exc:
        invalid = str(exc)
        print(f"gpu-smoke: {invalid}", file=sys.stderr)
        if not dry_run:
            return 2
    if not (out / "data").is_dir():
        write_suite(out / "data", n_train_per_task=16, n_test_per_task=4, seed=0)
    tokenizer = train_tokenizer(suite_corpus(seed=0), vocab_size=512)
    weights = out / "model" / "model.safetensors"
    parameters = build_model(out / "model", tokenizer,
                             materialise=not dry_run and not weights.exists())
    print(f"model: Qwen2.5-0.5B shape, {parameters / 1e6:.1f} M parameters, random init, "
          f"tokenizer of {len(tokenizer)} tokens"
          + (" (dry run: config only, no weights)" if dry_run else f" -> {out / 'model'}"))
    if invalid:
        return 2
    print(f"config: {config_path} is valid ({gpus} GPU(s): {layout(gpus)})")
    return 0


def _peak_gpu_memory(path: Path) -> dict[str, float]:
    """GPU index -> peak MiB used, from `nvidia-smi --query-gpu=index,memory.used` samples."""
    peaks: dict[str, float] = {}
    if not path.exists():
        return peaks
    with path.open() as f:
        for row in csv.reader(f):
            if len(row) != 2:
                continue
            try:
                index, used = row[0].strip(), float(row[1])
            except ValueError:
                continue
            peaks[index] = max(peaks.get(index, 0.0), used)
    return peaks


def _memory_fields(row: dict, prefix: str = "") -> dict:
    """Any numeric field whose name mentions memory (e.g. a learner's peak allocated)."""
    found = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            found.update(_memory_fields(value, f"{name}."))
        elif isinstance(value, (int, float)) and "mem" in key.lower():
            found[name] = value
    return found


def report(out: Path) -> int:
    metrics = out / "run" / "metrics.jsonl"
    if not metrics.exists():
        print(f"gpu-smoke: no {metrics}: the run wrote no step", file=sys.stderr)
        return 1
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    print(f"{'step':>4} {'step_s':>8} {'tokens/s':>9} {'sync_s':>7} {'load_s':>7} "
          f"{'generate_s':>10} {'learn_s':>8}")
    for row in rows:
        timing = row.get("timing", {})
        print(f"{row['step']:>4} {timing.get('step_s', float('nan')):>8.2f} "
              f"{row.get('tokens_per_s', float('nan')):>9.1f} "
              f"{timing.get('sync_s', float('nan')):>7.2f} "
              f"{timing.get('weight_load_s', float('nan')):>7.2f} "
              f"{timing.get('rollout_wait_s', float('nan')):>10.2f} "
              f"{timing.get('learn_s', float('nan')):>8.2f}")
    print("step 1 includes start-up costs (CUDA context, NCCL group, first kernels); "
          "step 2 is the steadier figure.")
    for key, value in _memory_fields(rows[-1]).items():
        print(f"reported by the run: {key} = {value}")
    peaks = _peak_gpu_memory(out / "gpu-memory.csv")
    for index, mib in sorted(peaks.items()):
        print(f"peak memory used on GPU {index}: {mib / 1024:.2f} GiB (nvidia-smi; vLLM reserves "
              "gpu_memory_utilization of its GPU up front)")
    if not peaks:
        print("no nvidia-smi samples: peak GPU memory unknown")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("out", type=Path)
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--dry-run", action="store_true")
    p = sub.add_parser("report")
    p.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        return prepare(args.out, args.gpus, args.dry_run)
    return report(args.out)


if __name__ == "__main__":
    sys.exit(main())
