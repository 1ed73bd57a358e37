"""``benchmarks/pipeline.py --omni``: rollouts/s of the real HF backend with media.

One task-stratified mixed-modality batch of the omni suite (image, audio, video and text prompts)
goes through what a rollout worker does with media data: :func:`services.media_inputs.media_prompts`
(read, decode through the worker's cache, process, expand placeholders) then
``HFBackend.generate_media`` (one ``generate`` per prompt, its ``n`` samples together). Beside
it, a text-only batch of the same size (the suite's text tasks) through the text path
(``HFBackend.generate``: all prompts in one left-padded batch, shared prefill) — the ratio is
what media data cost a worker on this machine — and the same text batch through
``generate_media``, which separates the per-prompt loop from the media themselves.
Timed with a cold media cache (first pass, every item decoded) and a warm one (the next step
drawing the same rows), medians over the repeats.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

TEXT_TASKS = ("parity", "sentiment", "weather_qa")


def _text_rows(prompt_set, count: int, seed: int) -> list[int]:
    codes = [prompt_set.task_names.index(t) for t in TEXT_TASKS]
    rows = np.sort(np.concatenate([prompt_set.indices_of_task(c) for c in codes]))
    return [int(r) for r in np.random.default_rng(seed).choice(rows, count, replace=False)]


def run_rollouts(assets, prompt_set, rows: list[int], *, group_size: int = 4,
                 max_new_tokens: int = 32, repeats: int = 2, seed: int = 0) -> dict:
    """Rollouts/s (prompts x ``group_size`` over wall seconds) of the mixed batch ``rows`` and
    of a text-only batch as large."""
    from harpo_core.media import MediaLimits
    from services.chat import tokenize_prompts
    from services.media_inputs import MediaInputs, MediaRows, media_counts, media_prompts
    from services.rollout.backend import SamplingParams
    from services.rollout.hf_backend import HFBackend

    model = str(assets.model_dir)
    backend = HFBackend(model)
    media_rows = MediaRows.of(prompt_set)
    counts = media_counts(prompt_set)
    params = SamplingParams(n=group_size, max_new_tokens=max_new_tokens, temperature=1.0,
                            top_p=1.0)
    text_rows = _text_rows(prompt_set, len(rows), seed)

    def ids(batch):
        return tokenize_prompts(backend.tokenizer, [prompt_set.prompts[r] for r in batch],
                                [counts[r] for r in batch])

    def media_pass(batch, builder):
        t0 = time.perf_counter()
        prompts = media_prompts(builder, media_rows, np.asarray(batch), ids(batch))
        t1 = time.perf_counter()
        gen, _ = backend.generate_media(prompts, params, seed=seed,
                                        placeholders=tuple(builder.token_ids.values()))
        t2 = time.perf_counter()
        return {"inputs": t1 - t0, "generate": t2 - t1, "tokens": int(gen.lengths.sum())}

    def text_pass(batch):
        # the thinker keeps the M-RoPE offsets of its last media generate (``rope_deltas``, one
        # per row) and would add them to this batch of another size; text rows have none
        backend.model.rope_deltas = None
        t0 = time.perf_counter()
        gen = backend.generate(ids(batch), params, seed=seed)
        return {"inputs": 0.0, "generate": time.perf_counter() - t0,
                "tokens": int(gen.lengths.sum())}

    warmup = MediaInputs(model, MediaLimits(video_fps=4.0))
    media_pass(rows[:2], warmup)  # first kernels and imports are no one's cost
    text_pass(text_rows[:2])
    runs: dict[str, list[dict]] = {"mixed, cold cache": [], "mixed, warm cache": [],
                                   "text via generate_media": [], "text via generate": []}
    for _ in range(repeats):
        builder = MediaInputs(model, MediaLimits(video_fps=4.0))  # a fresh worker cache
        runs["mixed, cold cache"].append(media_pass(rows, builder))
        runs["mixed, warm cache"].append(media_pass(rows, builder))
        runs["text via generate_media"].append(media_pass(text_rows, builder))
        runs["text via generate"].append(text_pass(text_rows))
    rollouts = len(rows) * group_size
    out = {}
    for name, passes in runs.items():
        wall = statistics.median(p["inputs"] + p["generate"] for p in passes)
        out[name] = {"rollouts_per_s": rollouts / wall, "wall_s": wall,
                     "inputs_s": statistics.median(p["inputs"] for p in passes),
                     "tokens": passes[-1]["tokens"]}
    return {"rollouts": rollouts, "group_size": group_size, "max_new_tokens": max_new_tokens,
            "repeats": repeats, "passes": out}


def print_rollouts(result: dict) -> None:
    passes = result["passes"]
    print(f"\nrollouts/s through the HF backend ({result['rollouts']} rollouts: "
          f"{result['rollouts'] // result['group_size']} prompts x {result['group_size']}, up to "
          f"{result['max_new_tokens']} new tokens; medians over {result['repeats']} repeat(s))")
    print(f"{'batch':<26}{'rollouts/s':>11}{'wall s':>9}{'inputs s':>10}{'tokens':>8}")
    for name, p in passes.items():
        print(f"{name:<26}{p['rollouts_per_s']:>11.1f}{p['wall_s']:>9.2f}{p['inputs_s']:>10.2f}"
              f"{p['tokens']:>8}")
    text = passes["text via generate"]["rollouts_per_s"]
    for name in ("mixed, cold cache", "mixed, warm cache", "text via generate_media"):
        print(f"{name} / text via generate = {passes[name]['rollouts_per_s'] / text:.2f}x")


def main_rollouts(root: Path, prompts: int, repeats: int, threads: int, seed: int = 0) -> dict:
    import torch

    from benchmarks.omni_batching import load_batch

    torch.set_num_threads(threads)
    assets, prompt_set, rows = load_batch(root, prompts, seed)
    return run_rollouts(assets, prompt_set, rows, repeats=repeats, seed=seed)
