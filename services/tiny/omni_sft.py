"""Supervised warm start of a media model (the tiny Omni thinker) on prompts with media.

The text warm start (:mod:`services.tiny.sft`) reads prompt strings only; a media task's answer
is in its image, clip or video, so a thinker warm-started on text alone scores chance at best.
:func:`omni_sft` trains on ``(prompt with media, answer)`` pairs of an HBA-format train split,
with the model inputs built by :class:`services.media_inputs.MediaInputs` — the builder the
rollout worker and the learner use — so the warm start sees exactly the tokens (placeholders
expanded) and tensors that RL will see. Loss on response tokens only, as in the text one.

Every train row's inputs are built once before the first step (each media item decoded and
processed once). A step draws ``batch_size`` rows from ``seed``, groups them by task (one task
has one modality and one media shape, so the rows' media tensors concatenate along their item
dimension into one batch for the model) and runs each group as right-padded micro-batches.
:func:`omni_greedy_eval` scores greedy answers per task on a held-out split, with the same
inputs.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from .sft import IGNORE_INDEX, _summary


@dataclass(eq=False)
class MediaExample:
    """One row ready for the model: expanded prompt ids, response ids (empty for evaluation),
    media tensors of a batch of one (``{}`` for a text row) and the row's task."""

    prompt: list[int]
    response: list[int]
    media: dict
    task: str


def media_examples(model_dir: str | Path, data_dir: str | Path, split: str = "train", *,
                   video_fps: float = 4.0, n_per_task: int | None = None,
                   with_responses: bool = True) -> tuple[list[MediaExample], object]:
    """Every row of ``split`` (the first ``n_per_task`` of each task when given) as a
    :class:`MediaExample`, and the prompt set. Responses are ``<think>…</think> \\boxed{answer}``
    plus eos (:func:`services.tiny.tasks.sft_response`)."""
    from transformers import AutoTokenizer

    from harpo_core.data import DataColumns, load_prompts
    from harpo_core.media import MediaLimits
    from services.chat import tokenize_prompts
    from services.media_inputs import MediaInputs, MediaRows, media_counts

    from .tasks import SUITE, sft_response

    prompts = load_prompts(data_dir, split, DataColumns.hba())
    rows = np.arange(len(prompts))
    if n_per_task is not None:
        rows = np.sort(np.concatenate([prompts.indices_of_task(c)[:n_per_task]
                                       for c in range(len(prompts.task_names))]))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    builder = MediaInputs(model_dir, MediaLimits(video_fps=video_fps))
    media_rows = MediaRows.of(prompts)
    counts = media_counts(prompts)
    ids = tokenize_prompts(tokenizer, [prompts.prompts[i] for i in rows],
                           [counts[i] for i in rows])
    out = []
    for i, prompt_ids in zip(rows.tolist(), ids):
        task = prompts.task_names[prompts.task_codes[i]]
        tensors, items = builder.tensors(media_rows, i) if media_rows else ({}, {})
        response = []
        if with_responses:
            target = sft_response(prompts.answers[i], SUITE.get(task)) + tokenizer.eos_token
            response = tokenizer(target, add_special_tokens=False)["input_ids"]
        expanded = builder.expand(prompt_ids, items) if items else list(prompt_ids)
        out.append(MediaExample(expanded, response, builder.model_kwargs(
            torch.tensor([expanded]), tensors) if tensors else {}, task))
    return out, prompts


def concat_media(examples: list[MediaExample]) -> dict[str, torch.Tensor]:
    """The media tensors of several rows as one batch: every tensor is per item along dim 0
    (patches, grids, audio features, seconds per grid), so rows concatenate there."""
    keys = examples[0].media.keys()
    if any(ex.media.keys() != keys for ex in examples):
        raise ValueError("rows of one micro-batch must carry the same kinds of media")
    return {k: torch.cat([ex.media[k] for ex in examples]) for k in keys}


def collate(examples: list[MediaExample], pad_id: int, left: bool = False) -> dict:
    """Padded ids, mask and labels (response tokens only) plus the rows' media tensors."""
    seqs = [ex.prompt + ex.response for ex in examples]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for k, (ex, seq) in enumerate(zip(examples, seqs)):
        at = slice(width - len(seq), width) if left else slice(0, len(seq))
        input_ids[k, at] = torch.tensor(seq)
        mask[k, at] = 1
        labels[k, at] = torch.tensor([IGNORE_INDEX] * len(ex.prompt) + ex.response)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
            **(concat_media(examples) if examples[0].media else {})}


def micro_batches(batch: list[MediaExample], size: int) -> list[list[MediaExample]]:
    """``batch`` grouped by task (tasks in name order, rows in draw order), each group cut
    into runs of at most ``size`` rows."""
    by_task: dict[str, list[MediaExample]] = {}
    for ex in batch:
        by_task.setdefault(ex.task, []).append(ex)
    return [group[m : m + size] for _, group in sorted(by_task.items())
            for m in range(0, len(group), size)]


def accumulate_grads(model, batch: list[MediaExample], pad_id: int, micro_batch_size: int
                     ) -> float:
    """Backpropagate the mean response-token loss of ``batch``; return that loss."""
    n_targets = sum(len(ex.response) for ex in batch)
    total = 0.0
    for micro in micro_batches(batch, micro_batch_size):
        enc = collate(micro, pad_id)
        labels = enc.pop("labels")
        logits = model(**enc).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
            ignore_index=IGNORE_INDEX, reduction="sum") / n_targets
        loss.backward()
        total += loss.item()
    return total


def omni_sft(
    model_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    steps: int = 150,
    batch_size: int = 28,
    micro_batch_size: int = 8,
    lr: float = 1e-2,
    seed: int = 0,
    warmup_steps: int = 10,
    video_fps: float = 4.0,
    num_threads: int = 2,
    max_seconds: float | None = None,
    progress: bool = False,
    examples: list[MediaExample] | None = None,
) -> dict:
    """Fine-tune a media model on the HBA-format train split in ``data_dir``; save the model,
    its tokenizer and processor files to ``out_dir``.

    AdamW, linear warmup then cosine decay to 10% of ``lr`` over ``steps`` (as the text warm
    start); each step draws ``batch_size`` rows from ``seed``. Bounded by steps: two runs with
    the same arguments (``num_threads`` included) on one machine give bitwise the same weights.
    ``max_seconds`` is an optional cap that makes a run ``stopped_early`` and irreproducible.
    ``examples``: prebuilt train rows (:func:`media_examples`) to skip building them again.
    Returns the settings, loss and timing, also written to ``out_dir/sft_metrics.json``.
    """
    import shutil

    from transformers import AutoTokenizer

    from services.model_loading import PROCESSOR_FILES, load_model

    torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if examples is None:
        examples, _ = media_examples(model_dir, data_dir, "train", video_fps=video_fps)
    model = load_model(model_dir)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01,
                                  betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        frac = min((step - warmup_steps) / max(steps - warmup_steps, 1), 1.0)
        return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))

    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        batch = [examples[i] for i in rng.integers(len(examples), size=batch_size)]
        optimizer.zero_grad(set_to_none=True)
        losses.append(accumulate_grads(model, batch, tokenizer.pad_token_id, micro_batch_size))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if progress and (step % 25 == 0 or step == steps - 1):
            print(f"omni sft step {step:4d}  loss {losses[-1]:.4f}  "
                  f"{time.perf_counter() - start:6.1f}s", flush=True)
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    wall = time.perf_counter() - start

    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    for name in PROCESSOR_FILES:  # the processor's parts, as every checkpoint carries them
        if (Path(model_dir) / name).is_file():
            shutil.copyfile(Path(model_dir) / name, out_dir / name)
    settings = {"steps": steps, "batch_size": batch_size, "micro_batch_size": micro_batch_size,
                "lr": lr, "seed": seed, "warmup_steps": warmup_steps, "video_fps": video_fps,
                "num_threads": num_threads}
    metrics = _summary(losses, settings, data_dir, wall, len(examples))
    (out_dir / "sft_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


@torch.no_grad()
def omni_greedy_eval(model_dir: str | Path, data_dir: str | Path, split: str = "test",
                     n_per_task: int | None = None, max_new_tokens: int = 32, *,
                     batch_size: int = 16, video_fps: float = 4.0, num_threads: int = 2
                     ) -> dict[str, dict[str, float]]:
    """Greedy answers to the first ``n_per_task`` rows of each task: ``{task: {"accuracy",
    "format", "n"}}`` (exact boxed match, well-formed share), as
    :func:`services.tiny.sft.greedy_eval` for text."""
    from transformers import AutoTokenizer

    from harpo_core.rewards.parsing import extract_boxed, follows_format, normalize_answer
    from services.model_loading import load_model

    torch.set_num_threads(num_threads)
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = load_model(model_dir).eval()
    examples, prompts = media_examples(model_dir, data_dir, split, video_fps=video_fps,
                                       n_per_task=n_per_task, with_responses=False)
    rows = np.sort(np.concatenate([prompts.indices_of_task(c)[:n_per_task]
                                   for c in range(len(prompts.task_names))]))
    answers = [prompts.answers[i] for i in rows.tolist()]
    score: dict[str, list[int]] = {}
    by_task: dict[str, list[int]] = {}
    for k, ex in enumerate(examples):
        by_task.setdefault(ex.task, []).append(k)
    for task, ks in sorted(by_task.items()):
        for b in range(0, len(ks), batch_size):
            chunk = ks[b : b + batch_size]
            enc = collate([examples[k] for k in chunk], tokenizer.pad_token_id, left=True)
            enc.pop("labels")
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                           skip_special_tokens=True)
            for k, text in zip(chunk, texts):
                boxed = extract_boxed(text)
                hit = boxed is not None and normalize_answer(boxed) == normalize_answer(
                    answers[k])
                score.setdefault(task, []).extend([int(hit), follows_format(text)])
    return {task: {"accuracy": float(np.mean(v[0::2])), "format": float(np.mean(v[1::2])),
                   "n": len(v) // 2} for task, v in sorted(score.items())}
