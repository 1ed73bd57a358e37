"""Peak memory of the learner's log-prob step, with and without chunked log-probs.

Model: a random Qwen2 built locally (no download) with Qwen's real vocabulary (151,936) and a
small body (hidden 64, 2 layers), so the output head dominates as it does for long sequences of
a real model. Step: one row of ``L`` tokens (16 prompt + ``L - 16`` response) through the
learner's own forward module (:class:`services.learner_forward.PolicyLogprobs`, the plain
path), the sum of the response log-probs backward. ``chunk`` null: all logits at once (harpo's
default); a number: ``learner.logprob_chunk_tokens``.

How memory is measured: torch's CPU allocator keeps no statistics and tracemalloc does not see
its allocations, so every configuration runs in a fresh Python process (Linux): it builds the
model and the inputs, runs the step once to warm up and drops the gradients (as the learner's
``zero_grad(set_to_none=True)`` does), reads the resident set (``VmRSS``), resets the kernel's
high-water mark (``echo 5 > /proc/self/clear_refs``), runs the step again and reads the
high-water mark (``VmHWM``). The difference is the peak the step adds above the model and the
inputs, gradients included (large tensors are mmapped and returned to the system when freed, so
the resident set follows the live tensors). Time is the second step's wall time.

    python benchmarks/scale_logprobs.py [--lengths 256 512 1024 2048] [--chunk 256]

``run(args) -> list[dict]`` (one row per configuration) is what ``benchmarks/scale.py`` calls.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QWEN_VOCAB = 151936
PROMPT = 16


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048],
                        help="sequence lengths (tokens per row)")
    parser.add_argument("--chunk", type=int, default=256,
                        help="learner.logprob_chunk_tokens of the chunked runs")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=QWEN_VOCAB)
    parser.add_argument("--threads", type=int, default=1)
    return parser


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} is not in /proc/self/status")


def _measure(length: int, chunk: int | None, hidden: int, layers: int, vocab: int,
             threads: int) -> dict:
    """One configuration, in this (fresh) process."""
    import time

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from services.learner_forward import PolicyLogprobs

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max(length, 128), tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).eval()
    policy = PolicyLogprobs(model, chunk_tokens=chunk, shared_prompt=False)
    ids = torch.randint(0, vocab, (1, length))
    attention = torch.ones_like(ids)
    response = torch.zeros_like(ids)
    response[:, PROMPT:] = 1

    def step():
        logprobs, _ = policy(ids, attention, response)
        logprobs[response.bool()].sum().backward()

    step()  # warm-up (lazy initialisation), then no gradients: as after zero_grad(None)
    model.zero_grad(set_to_none=True)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark (VmHWM)
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    added = max(_status_kib("VmHWM") - before, 0) * 1024
    return {"length": length, "chunk": chunk, "step_peak_mb": round(added / 2**20, 1),
            "seconds": round(seconds, 3),
            "logits_mb": round(length * vocab * 4 / 2**20, 1),
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}


def run(args: argparse.Namespace | None = None) -> list[dict]:
    """Every (length, chunked or not) configuration, each in its own process."""
    args = args or add_arguments(argparse.ArgumentParser()).parse_args([])
    rows = []
    for length in args.lengths:
        for chunk in (None, args.chunk):
            spec = json.dumps(dict(length=length, chunk=chunk, hidden=args.hidden,
                                   layers=args.layers, vocab=args.vocab, threads=args.threads))
            out = subprocess.run(
                [sys.executable, __file__, "--one", spec], cwd=ROOT, capture_output=True,
                text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT),
                                            "HF_HUB_OFFLINE": "1",
                                            "OMP_NUM_THREADS": str(args.threads)})
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = ["| tokens | logits [T, V] fp32 | unchunked step peak | chunked step peak | "
             "unchunked s | chunked s |", "|---:|---:|---:|---:|---:|---:|"]
    by_length: dict[int, dict] = {}
    for row in rows:
        by_length.setdefault(row["length"], {})["chunked" if row["chunk"] else "full"] = row
    for length, pair in sorted(by_length.items()):
        full, chunked = pair.get("full", {}), pair.get("chunked", {})
        lines.append(f"| {length} | {full.get('logits_mb', chunked.get('logits_mb'))} MB | "
                     f"{full.get('step_peak_mb', '-')} MB | {chunked.get('step_peak_mb', '-')} MB"
                     f" | {full.get('seconds', '-')} | {chunked.get('seconds', '-')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process's configuration
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(_measure(**json.loads(args.one))))
        return 0
    rows = run(args)
    print(f"# {platform.processor() or platform.machine()}, torch threads {args.threads}, "
          f"hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, chunk {args.chunk}")
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
