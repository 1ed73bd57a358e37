"""Per-rank learner memory: ``fsdp2`` against ``ddp``, ``bfloat16`` against ``float32``, and
bf16 learner state (``learner.master_weights: bfloat16_stochastic``) against float32 state.

A random Qwen2-shaped model (Qwen2.5's vocabulary, tied embeddings unless ``--untied``,
~100M parameters by default, built locally from a ``Qwen2Config``: nothing is downloaded),
2 learner ranks over gloo (spawned processes), the real ``LearnerCore`` with each
``learner.strategy``, ``learner.dtype`` and ``learner.master_weights`` (a config
``strategy:dtype[:master_weights]``; ``:bf16sr`` is ``bfloat16_stochastic``). After one
update every rank adds up the bytes it holds between steps:

* parameters, gradients and AdamW state — the tensors themselves (a DTensor counts its local
  shard only), measured, not estimated;
* ``gathered``: the transient full copies a sharded strategy all-gathers during the step, in
  the compute dtype: the root group (the final norm, and tied embeddings; FSDP2 keeps the
  root unsharded from its forward to the end of its backward) plus the largest other group
  (a decoder layer or an untied embedding: the one running) and a decoder layer (its
  neighbour, prefetched).
  Computed from the module structure; 0 under ``ddp``, which keeps the full parameters.

DDP's gradient buckets (another 4 bytes per parameter) and activations are not counted.

    python benchmarks/scale_memory.py [--hidden 512 --layers 8 --vocab 151936 --seq 64]

``run(args) -> list[dict]`` is what a driver (``benchmarks/scale.py``) calls; ``add_arguments``
adds its options to the driver's parser.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from services.ports import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = ("ddp:float32", "fsdp2:float32", "ddp:bfloat16", "fsdp2:bfloat16",
           "ddp:bfloat16:bf16sr", "fsdp2:bfloat16:bf16sr")
MASTER = {"fp32": "float32", "bf16sr": "bfloat16_stochastic"}
MB = 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=151936)  # Qwen2.5's
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--untied", action="store_true",
                        help="separate lm_head (as Qwen2.5-7B); default tied (as 0.5B-3B)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS),
                        help="strategy:dtype[:fp32|bf16sr] (master weights, default fp32)")


def build_model(args, directory: Path) -> int:
    """Save a random Qwen2-shaped model; returns its parameter count (tied counted once)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64, num_key_value_heads=2,
                         max_position_embeddings=4 * args.seq,
                         tie_word_embeddings=not args.untied)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def _local_bytes(tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def _gathered_bytes(model, strategy: str, dtype) -> int:
    if strategy != "fsdp2":
        return 0
    from services.learner_strategies._model_parts import decoder_layers, untied_embeddings

    def size(group):
        return sum(p.numel() for p in group.parameters())

    layers = decoder_layers(model)
    groups = [*layers, *untied_embeddings(model)]
    in_groups = {id(p) for group in groups for p in group.parameters()}
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_groups)
    # the group running and its neighbour prefetched: a decoder layer next to any group
    return (root + max(map(size, groups)) + max(map(size, layers))) * dtype.itemsize


def _rank(rank, world_size, port, model_dir, strategy, dtype, master, seq, out):
    import torch
    import torch.distributed as dist

    from services.config import parse_config
    from services.learner_core import LearnerCore

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        config = parse_config({
            "model": {"path": model_dir}, "data": {"path": "unused", "prompts_per_step": 2},
            "rollout": {"group_size": world_size},
            "learner": {"workers": world_size, "mini_batch_prompts": 2, "strategy": strategy,
                        "dtype": dtype, "master_weights": MASTER[master],
                        "shared_prompt_forward": False, "lr": 1e-5},
        })
        core = LearnerCore(model_dir, config, rank=rank, world_size=world_size)
        rows = 2  # this rank's share of a 4-sequence mini-batch
        gen = torch.Generator().manual_seed(rank)
        vocab = core.model.config.vocab_size
        response = torch.zeros(rows, seq, dtype=torch.long)
        response[:, seq // 4:] = 1
        batch = {"input_ids": torch.randint(0, vocab, (rows, seq), generator=gen),
                 "attention_mask": torch.ones(rows, seq, dtype=torch.long),
                 "response_mask": response,
                 "old_logprobs": torch.full((rows, seq), -12.0),
                 "advantages": torch.randn(rows, generator=gen)}
        start = time.perf_counter()
        metrics = core.update(batch, global_batch_size=rows * world_size, check_mismatch=False)
        step_s = time.perf_counter() - start
        params = list(core.model.parameters())
        held = {
            "params": sum(_local_bytes(p) for p in params),
            "grads": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(_local_bytes(v) for state in core.optimizer.state.values()
                             for v in state.values() if torch.is_tensor(v)),
            "gathered": _gathered_bytes(core.model, strategy, getattr(torch, dtype)),
        }
        result = {"rank": rank, "step_s": step_s, "loss": metrics["loss"], **held}
        Path(out, f"{rank}.json").write_text(json.dumps(result))
        del core
        dist.barrier()
    finally:
        dist.destroy_process_group()



def run(args) -> list[dict]:
    """One row per ``strategy:dtype``: the largest per-rank bytes of each kind (MiB)."""
    import torch.multiprocessing as mp

    rows = []
    with tempfile.TemporaryDirectory(prefix="harpo-scale-memory-") as tmp:
        model_dir = Path(tmp) / "model"
        n_params = build_model(args, model_dir)
        for pair in args.configs:
            strategy, dtype, master = (pair + ":fp32").split(":")[:3]
            out = Path(tmp) / pair.replace(":", "-")
            out.mkdir()
            mp.spawn(_rank, args=(args.ranks, free_port(), str(model_dir), strategy, dtype,
                                  master, args.seq, str(out)), nprocs=args.ranks)
            ranks = [json.loads((out / f"{r}.json").read_text()) for r in range(args.ranks)]
            row = {"strategy": strategy, "dtype": dtype, "master": master, "ranks": args.ranks,
                   "parameters": n_params,
                   **{k: max(r[k] for r in ranks) / MB
                      for k in ("params", "grads", "optimizer", "gathered")},
                   "step_s": max(r["step_s"] for r in ranks)}
            row["held"] = row["params"] + row["grads"] + row["optimizer"]
            row["peak"] = row["held"] + row["gathered"]
            rows.append(row)
    by = {(r["strategy"], r["dtype"], r["master"]): r for r in rows}
    for row in rows:
        ddp = by.get(("ddp", row["dtype"], row["master"]))
        fp32 = by.get((row["strategy"], "float32", "fp32"))
        row["vs_ddp"] = row["peak"] / ddp["peak"] if ddp else None
        row["vs_fp32"] = row["peak"] / fp32["peak"] if fp32 else None
    return rows


def table(rows: list[dict]) -> str:
    head = (f"{'strategy':8} {'dtype':9} {'master':6} {'params':>8} {'grads':>8} "
            f"{'adamw':>8} {'held':>8} {'gathered':>9} {'peak':>8} {'vs ddp':>7} "
            f"{'vs fp32':>8} {'step s':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = {k: "-" if r[k] is None else f"{r[k]:.2f}x" for k in ("vs_ddp", "vs_fp32")}
        lines.append(f"{r['strategy']:8} {r['dtype']:9} {r['master']:6} {r['params']:8.1f} "
                     f"{r['grads']:8.1f} {r['optimizer']:8.1f} {r['held']:8.1f} "
                     f"{r['gathered']:9.1f} "
                     f"{r['peak']:8.1f} {ratio['vs_ddp']:>7} {ratio['vs_fp32']:>8} "
                     f"{r['step_s']:7.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    rows = run(args)
    tied = "untied" if args.untied else "tied"
    print(f"{rows[0]['parameters'] / 1e6:.1f}M parameters ({tied} embeddings), {args.ranks} "
          f"ranks over gloo, "
          f"per-rank MiB ({platform.machine()}, {os.cpu_count()} CPUs)")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
