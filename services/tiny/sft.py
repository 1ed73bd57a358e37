"""Supervised warm start of the tiny model and a greedy-decoding evaluation.

``sft`` teaches the response format ``<think>…</think> \\boxed{answer}`` (followed by the
eos token) on the train split, with the loss on response tokens only. ``greedy_eval``
measures, per task, how often the boxed answer matches exactly and how often the response
is well formed, so the demo can show where RL still has room to improve.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from harpo_core.data import load_prompts
from harpo_core.rewards.parsing import extract_boxed, follows_format, normalize_answer
from services.chat import render_prompts, tokenize_prompts

from .suites import sft_response

IGNORE_INDEX = -100


def _encode_example(tokenizer, prompt: list[int], answer: str, task: str, max_length: int
                    ) -> tuple[list[int], list[int]]:
    target = sft_response(answer, task) + tokenizer.eos_token
    response = tokenizer(target, add_special_tokens=False)["input_ids"]
    prompt = prompt[-max(max_length - len(response), 0):]  # keep the end of long prompts
    ids = (prompt + response)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_length]
    return ids, labels


def _collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for k, (ids, lab) in enumerate(batch):  # right padding for training
        input_ids[k, : len(ids)] = torch.tensor(ids)
        labels[k, : len(lab)] = torch.tensor(lab)
        mask[k, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def _accumulate_grads(model, batch: list[tuple[list[int], list[int]]], pad_id: int,
                      micro_batch_size: int) -> float:
    """Backpropagate the mean response-token loss of ``batch``; return that loss.

    The batch mixes tasks of very different prompt lengths, so it is sorted by length and
    run as micro-batches: the gradient is that of the whole batch, with little padding.
    """
    batch = sorted(batch, key=lambda ex: len(ex[0]))
    n_targets = sum(sum(t != IGNORE_INDEX for t in labels[1:]) for _, labels in batch)
    total = 0.0
    for m in range(0, len(batch), micro_batch_size):
        enc = _collate(batch[m : m + micro_batch_size], pad_id)
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), enc["labels"][:, 1:].flatten(),
            ignore_index=IGNORE_INDEX, reduction="sum",
        ) / n_targets
        loss.backward()
        total += loss.item()
    return total


def _train_examples(tokenizer, data_dir, max_length: int) -> list:
    """Every train prompt with its answer, encoded for supervised fine-tuning."""
    # any task type: the warm start imitates answers, it never scores them (the imbalance
    # suite's custom types are scored by reward.custom during RL)
    data = load_prompts(data_dir, "train", task_types_allowed=None)
    prompt_ids = tokenize_prompts(tokenizer, data.prompts)
    tasks = [data.task_names[c] for c in data.task_codes]
    return [_encode_example(tokenizer, ids, answer, task, max_length)
            for ids, answer, task in zip(prompt_ids, data.answers, tasks)]


def _summary(losses: list[float], settings: dict, data_dir, wall: float, examples: int) -> dict:
    """``sft_metrics.json``: what the run was asked for and what it did."""
    window = max(1, min(10, len(losses) // 4))
    return {
        "steps": len(losses),
        "stopped_early": len(losses) < settings["steps"],  # hit max_seconds: not reproducible
        # what the run was asked for, so a caller can tell whether a saved model matches
        "settings": settings,
        # which version of the synthetic suite the data came from (None for other data)
        "suite_fingerprint": _suite_fingerprint_of(data_dir),
        "loss_first": float(np.mean(losses[:window])),
        "loss_last": float(np.mean(losses[-window:])),
        "train_seconds": round(wall, 2),
        "examples": examples,
    }


def sft(
    model_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    steps: int = 600,
    batch_size: int = 32,
    micro_batch_size: int = 8,
    lr: float = 3e-3,
    seed: int = 0,
    max_length: int = 256,
    max_seconds: float | None = None,
    warmup_steps: int = 30,
    num_threads: int = 2,
    progress: bool = False,
) -> dict:
    """Fine-tune on the train split and save model + tokenizer (safetensors) to ``out_dir``.

    AdamW with linear warmup and cosine decay to 10% of ``lr`` over ``steps``; each step draws
    ``batch_size`` random examples (all tasks mixed) from ``seed``. The schedule and the batches
    depend on the step count only, so two runs with the same arguments (``num_threads``
    included) on one machine give bitwise the same weights. ``max_seconds`` is an optional
    safety cap: a run that exceeds it stops after the step in flight, is marked
    ``stopped_early`` and is not reproducible. Returns the settings, loss and timing metrics,
    also written to ``out_dir/sft_metrics.json``.
    """
    torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    examples = _train_examples(tokenizer, data_dir, max_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01,
                                  betas=(0.9, 0.98))

    def lr_at(step: int, frac: float) -> float:  # warmup, then cosine decay to 10% of lr
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(frac, 1.0))))

    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, (step - warmup_steps) / max(steps - warmup_steps, 1))
        batch = [examples[i] for i in rng.integers(len(examples), size=batch_size)]
        optimizer.zero_grad(set_to_none=True)
        losses.append(_accumulate_grads(model, batch, tokenizer.pad_token_id, micro_batch_size))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if progress and (step % 50 == 0 or step == steps - 1):
            print(f"sft step {step:4d}  loss {losses[-1]:.4f}  "
                  f"{time.perf_counter() - start:6.1f}s", flush=True)
        # checked after the step, so a capped run still trains (and saves) at least one step
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    wall = time.perf_counter() - start

    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    settings = {"steps": steps, "batch_size": batch_size, "micro_batch_size": micro_batch_size,
                "lr": lr, "seed": seed, "warmup_steps": warmup_steps, "max_length": max_length,
                "num_threads": num_threads}
    metrics = _summary(losses, settings, data_dir, wall, len(examples))
    (out_dir / "sft_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _suite_fingerprint_of(data_dir: str | Path) -> str | None:
    manifest = Path(data_dir) / "suite.json"
    return json.loads(manifest.read_text()).get("fingerprint") if manifest.is_file() else None


@torch.no_grad()
def greedy_eval(
    model_dir: str | Path,
    data_dir: str | Path,
    split: str = "test",
    n_per_task: int | None = 100,
    max_new_tokens: int = 48,
    *,
    batch_size: int = 64,
    num_threads: int = 2,
) -> dict[str, dict[str, float]]:
    """Greedy-decode the first ``n_per_task`` rows of each task and score them.

    Returns ``{task: {"accuracy", "format", "n"}}``: accuracy is the exact match of the last
    boxed answer with the reference (case and whitespace normalised; for QA tasks this is a
    strict proxy for the similarity reward), format is the share of well-formed responses.
    """
    torch.set_num_threads(num_threads)
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    data = load_prompts(data_dir, split, task_types_allowed=None)
    report: dict[str, dict[str, float]] = {}
    for code, task in enumerate(data.task_names):
        rows = data.indices_of_task(code)[:n_per_task]
        correct = formatted = 0
        for b in range(0, len(rows), batch_size):
            chunk = rows[b : b + batch_size]
            texts = render_prompts(tokenizer, [data.prompts[i] for i in chunk])
            enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
            completions = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                                 skip_special_tokens=True)
            for i, text in zip(chunk, completions):
                formatted += follows_format(text)
                boxed = extract_boxed(text)
                expected = normalize_answer(data.answers[i])
                correct += boxed is not None and normalize_answer(boxed) == expected
        report[task] = {"accuracy": correct / len(rows), "format": formatted / len(rows),
                        "n": len(rows)}
    return report
