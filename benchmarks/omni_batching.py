"""``benchmarks/pipeline.py --omni``: a mixed-modality batch of the synthetic omni suite, without
the Ray pipeline (media do not go through rollout and learner yet; rollouts/s on a mixed batch
belongs to that work).

Measured in one run, side by side:

* padding waste of the learner's micro-batches over the batch's prompt token counts (each
  prompt's media expanded to the tokens the tiny thinker's towers emit, by
  ``services.omni_inputs``), signature-blind (``plan_micro_batches``, rows in batch order) and
  modality-aware (``plan_modality_micro_batches``: by signature, in batch order or longest
  first), under row and token budgets, with the rows in the sampler's order (grouped by task,
  as the pipeline hands them over) and shuffled;
* where the time of preparing and running the batch goes: decoding media (``harpo_core.media``
  through a ``MediaCache``), building the model inputs (image processor, audio features, video
  patches, tokenizer) and a forward pass of the tiny Qwen2.5-Omni thinker (one prompt at a time,
  no gradient), with a cold cache (every item decoded) and a warm one (the same batch again:
  every item a cache hit), medians over ``--omni-repeats``.

Per-item decode costs are in ``benchmarks/media_decode.py``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

BUDGETS = ({}, {"max_rows": 4}, {"max_rows": 8}, {"max_tokens": 256}, {"max_tokens": 512})


def load_batch(root: Path, prompts: int, seed: int):
    """The tiny omni assets (``harpo init-tiny --omni``) and one task-stratified batch of the
    train split: ``(assets, prompt_set, rows)``."""
    from harpo_core.data import DataColumns, TaskStratifiedSampler, load_prompts
    from services.tiny.omni_model import init_tiny_omni

    assets = init_tiny_omni(root / "omni", n_train_per_task=max(8, prompts), n_test_per_task=2)
    prompt_set = load_prompts(assets.data_dir, "train", columns=DataColumns.hba(),
                              default_task_type="classification")
    rows = TaskStratifiedSampler(prompt_set, seed=seed).next_batch(prompts)
    return assets, prompt_set, [int(r) for r in rows]


class OmniParts:
    """The tiny thinker and its torchvision-free processor parts (docs/omni.md)."""

    def __init__(self, model_dir: Path, limits):
        from transformers import (
            AutoFeatureExtractor,
            AutoImageProcessor,
            AutoTokenizer,
            Qwen2_5OmniThinkerForConditionalGeneration,
        )

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.images = AutoImageProcessor.from_pretrained(model_dir)
        self.features = AutoFeatureExtractor.from_pretrained(model_dir)
        self.model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(model_dir).eval()
        self.limits = limits

    def text(self, prompt: str, media: dict[str, list]) -> str:
        """The user turn with one placeholder part per media item (images, audio, video)."""
        parts = [{"type": kind} for kind in ("image", "audio", "video")
                 for _ in media.get(kind, ())]
        messages = [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)

    def inputs(self, text: str, decoded: dict[str, list]) -> dict:
        from services.omni_inputs import omni_inputs

        return omni_inputs(self.tokenizer, self.images, self.features, text,
                           images=decoded.get("image", ()), audios=decoded.get("audio", ()),
                           videos=decoded.get("video", ()), video_fps=self.limits.video_fps)

    def forward(self, inputs: dict) -> None:
        import torch

        with torch.no_grad():
            self.model(**inputs)


def prepare(parts: OmniParts, prompt_set, rows: list[int], cache) -> tuple[dict, list[int]]:
    """Decode, build inputs and run the forward for every row: seconds per stage and each
    row's prompt token count."""
    seconds = {"decode": 0.0, "inputs": 0.0, "forward": 0.0}
    lengths = []
    for row in rows:
        media = prompt_set.media_items(row)
        t0 = time.perf_counter()
        decoded = {kind: [cache.get(kind, item) for item in items]
                   for kind, items in media.items() if items}
        t1 = time.perf_counter()
        inputs = parts.inputs(parts.text(prompt_set.prompts[row], media), decoded)
        t2 = time.perf_counter()
        parts.forward(inputs)
        t3 = time.perf_counter()
        seconds["decode"] += t1 - t0
        seconds["inputs"] += t2 - t1
        seconds["forward"] += t3 - t2
        lengths.append(int(inputs["input_ids"].shape[1]))
    return seconds, lengths


def time_stages(parts: OmniParts, prompt_set, rows: list[int], repeats: int):
    """Median seconds per stage with a cold cache and with a warm one, and the token counts."""
    from harpo_core.media import MediaCache

    # one-time costs (library imports, first torch kernels) are not the cache's: pay them first
    prepare(parts, prompt_set, rows[:1], MediaCache(parts.limits))
    cold, warm, lengths = [], [], None
    for _ in range(repeats):
        cache = MediaCache(parts.limits)
        seconds, lengths = prepare(parts, prompt_set, rows, cache)
        cold.append(seconds)
        warm.append(prepare(parts, prompt_set, rows, cache)[0])
    median = lambda runs: {k: statistics.median(r[k] for r in runs) for k in runs[0]}  # noqa: E731
    return median(cold), median(warm), lengths


def waste_table(lengths: list[int], signatures: list[str], budgets=BUDGETS) -> list[dict]:
    """Padding waste of each planner under each budget: rows of ``{budget, planner: Padding}``."""
    from harpo_core.micro_batches import (
        plan_micro_batches,
        plan_modality_micro_batches,
        plan_padding,
    )

    table = []
    for budget in budgets:
        table.append({
            "budget": ", ".join(f"{k} {v}" for k, v in budget.items()) or "none",
            "blind": plan_padding(plan_micro_batches(lengths, **budget), lengths),
            "signature": plan_padding(plan_modality_micro_batches(
                lengths, signatures, **budget), lengths),
            "signature, longest first": plan_padding(plan_modality_micro_batches(
                lengths, signatures, by_length=True, **budget), lengths),
        })
    return table


def print_waste(title: str, table: list[dict]) -> None:
    planners = [k for k in table[0] if k != "budget"]
    print(f"\npadding waste, {title} (padded slots holding no token; padded tokens in brackets)")
    print(f"{'budget':<18}" + "".join(f"{p:>28}" for p in planners))
    for line in table:
        print(f"{line['budget']:<18}" + "".join(
            f"{line[p].waste:>19.3f} ({line[p].padded:>6})" for p in planners))


def run_omni(root: Path, prompts: int, repeats: int, threads: int, seed: int = 0) -> dict:
    import torch

    from harpo_core.media import MediaLimits

    torch.set_num_threads(threads)
    assets, prompt_set, rows = load_batch(root, prompts, seed)
    parts = OmniParts(assets.model_dir, MediaLimits(video_fps=4.0))  # the suite's clips: 4 fps
    cold, warm, lengths = time_stages(parts, prompt_set, rows, repeats)
    modality = prompt_set.modalities()
    signatures = [modality[r] for r in rows]
    shuffle = np.random.default_rng(seed).permutation(len(rows))
    return {
        "rows": rows, "lengths": lengths, "signatures": signatures, "cold": cold, "warm": warm,
        "tasks": [prompt_set.task_names[prompt_set.task_codes[r]] for r in rows],
        "sampler": waste_table(lengths, signatures),
        "shuffled": waste_table([lengths[i] for i in shuffle],
                                [signatures[i] for i in shuffle]),
    }


def print_omni(result: dict, repeats: int, threads: int) -> None:
    import os
    import platform

    lengths, signatures = result["lengths"], result["signatures"]
    print(f"\n# omni batch: {len(lengths)} prompts of the synthetic omni suite; "
          f"{platform.machine()}, {os.cpu_count()} cores, {threads} torch thread(s)")
    print(f"{'signature':<14}{'prompts':>8}{'tokens min':>11}{'median':>8}{'max':>6}")
    for signature in dict.fromkeys(signatures):
        own = [n for n, s in zip(lengths, signatures) if s == signature]
        print(f"{signature:<14}{len(own):>8}{min(own):>11}{int(np.median(own)):>8}"
              f"{max(own):>6}")
    print_waste("rows in the sampler's order (grouped by task)", result["sampler"])
    print_waste("rows shuffled", result["shuffled"])
    cold, warm = result["cold"], result["warm"]
    print(f"\ntime of the batch by stage, medians over {repeats} repeat(s) (s; share of the "
          f"three)")
    print(f"{'stage':<30}{'cold cache':>20}{'warm cache':>20}")
    for stage, name in (("decode", "decode media"), ("inputs", "build model inputs"),
                        ("forward", "thinker forward (no grad)")):
        print(f"{name:<30}" + "".join(
            f"{t[stage]:>12.4f} ({t[stage] / sum(t.values()):>5.1%})" for t in (cold, warm)))
    print(f"{'total':<30}" + "".join(f"{sum(t.values()):>12.4f} {'':>7}" for t in (cold, warm)))
    print(f"decode cold / warm = {cold['decode'] / max(warm['decode'], 1e-9):.0f}x; "
          f"decode share cold {cold['decode'] / sum(cold.values()):.1%} vs warm "
          f"{warm['decode'] / sum(warm.values()):.1%}")
