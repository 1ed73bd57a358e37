"""The imbalance suite: six synthetic tasks, each built to turn one knob of the multi-task
imbalance that GRPO's per-group normalisation leaves in the policy gradient
(docs/imbalance_suite.md has the maths and the expectations).

* ``hairline`` - a binary question whose reward (custom, ``hairline_judge_reward``) lies within
  ±5e-4 of 0.5 whatever the answer: half of that hair is right/wrong, half is judge noise (a
  hash of the response and its place in the batch). GRPO divides by the group's std, so it
  gets unit-scale advantages anyway. (``hairline_reward``, noise from the response alone, is
  silent once the policy repeats one response per group: measured in RESULTS.md.)
* ``rare`` - a binary question with a fifth of a task's train prompts (about 4 % of the train
  set): the uniform warm start sees it rarely. The RL sampler is task-stratified, so its *batch*
  share is that of any task (see the doc: the data share does not reach the RL batch).
* ``hard16`` - 16-way classification behind a long story: four animal sounds, and the loudest
  named only by its position (chance 1/16; 1/4 for a policy that has learnt the sound words but
  not the ordinal), so many groups get no success and no signal.
* ``solved`` - a short binary question the warm start solves: groups all right, silent.
* ``longans`` - QA (similarity reward) whose responses run to 30-36 tokens, near the
  response limit, so an over-length penalty (``reward.overlong_buffer``) makes length part
  of the reward.
* ``scaled`` - a sum whose custom reward (``scaled_reward``) is graded in [0, 10]: neutral for
  GRPO, which divides the scale out, dominant for ``dr_grpo``/``rloo``/``gpg``.

Everything is drawn from ``numpy.random.default_rng`` seeds as in ``services.tiny.tasks``; the
suite writes the same files (``{split}-00000-of-00001.parquet``, ``suite.json``) and has its
own :func:`suite_fingerprint`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .tasks import COLUMNS, FILLER_SENTENCES, SPLITS, Example, _pick, _task_seed

SUITE_NAME = "imbalance"
# The reward functions of the two custom task types, as ``reward.custom`` names them.
CUSTOM_REWARDS = {
    "hairline": "services.tiny.imbalance_rewards:hairline_judge_reward",
    "scaled": "services.tiny.imbalance_rewards:scaled_reward",
}


@dataclass(frozen=True)
class ImbalanceTask:
    """One task of the suite and the knob it turns."""

    name: str
    task_type: str  # classification, qa, or a custom type scored by CUSTOM_REWARDS
    dataset: str
    generate: Callable[[np.random.Generator], Example] = field(repr=False)
    labels: tuple[str, ...] | None = None
    knob: str = ""
    think: str = "find the cue"
    train_fraction: float = 1.0  # of n_train_per_task: the data share knob

    def __post_init__(self) -> None:
        if self.task_type not in ("classification", "qa", *CUSTOM_REWARDS):
            raise ValueError(f"{self.name}: unknown task_type {self.task_type!r}")
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"{self.name}: train_fraction must be in (0, 1]")


# --- generators -------------------------------------------------------------------------

LETTERS = "abcdefghijklmnopqrstuvwxyz"
VOWELS = set("aeiou")


def _hairline(rng: np.random.Generator) -> Example:
    # vowels are drawn as often as consonants so the label is balanced
    vowel = bool(rng.integers(2))
    letter = _pick(rng, [c for c in LETTERS if (c in VOWELS) == vowel])
    return f"Is the letter {letter} a vowel or a consonant?", "vowel" if vowel else "consonant"


def _rare(rng: np.random.Generator) -> Example:
    n = int(rng.integers(100))
    return f"Is {n} above fifty? Options: yes, no.", "yes" if n > 50 else "no"


# 16 labels, each announced in the story by its own sound word
SOUNDS = {
    "snake": "hissing", "lion": "roaring", "bee": "buzzing", "dog": "barking",
    "cat": "purring", "owl": "hooting", "horse": "neighing", "cow": "mooing",
    "duck": "quacking", "frog": "croaking", "wolf": "howling", "sheep": "bleating",
    "pig": "grunting", "mouse": "squeaking", "goose": "honking", "crow": "cawing",
}


ORDINALS = ("first", "second", "third", "fourth")


def _hard16(rng: np.random.Generator) -> Example:
    # four sounds, then which of them was the loudest by position: the label's cue word is in
    # the story with three distractors of other classes, and only the ordinal tells them apart
    heard = [str(x) for x in rng.choice(list(SOUNDS), size=len(ORDINALS), replace=False)]
    k = int(rng.integers(len(ORDINALS)))
    n_filler = int(rng.integers(4, 8))
    idx = rng.choice(len(FILLER_SENTENCES), size=n_filler, replace=False)
    sentences = [FILLER_SENTENCES[i] for i in idx]
    words = [SOUNDS[a] for a in heard]
    sentences.insert(int(rng.integers(n_filler + 1)),
                     f"From the barn came {', '.join(words[:-1])} and {words[-1]} sounds, "
                     "in that order.")
    sentences.append(f"The loudest was the {ORDINALS[k]} sound.")
    prompt = ("Which animal was the loudest? Options: " + ", ".join(SOUNDS) + ".\n"
              "Story: " + " ".join(sentences))
    return prompt, heard[k]


def _solved(rng: np.random.Generator) -> Example:
    label = _pick(rng, ("day", "night"))
    cue = _pick(rng, ("the sun is up", "it is noon") if label == "day"
                else ("the moon is up", "it is midnight"))
    return f"Day or night? {cue.capitalize()}.", label


RECIPES = {
    "soup": "wash the vegetables, cut them small, boil them with salt, serve it hot",
    "bread": "mix flour, water and yeast, knead the dough, let it rise, then bake it",
    "salad": "wash the leaves, cut the tomatoes, add oil and lemon, serve it cold",
    "tea": "boil the water, warm the pot, pour the water on the leaves, then wait",
    "rice": "rinse the rice, add two cups of water, boil it, then cook it slowly",
    "omelette": "break the eggs, beat them with salt, pour them in a hot pan, then fold",
}


def _longans(rng: np.random.Generator) -> Example:
    dish = _pick(rng, RECIPES)
    return f"How do you make {dish}? Give the steps.", RECIPES[dish]


def _scaled(rng: np.random.Generator) -> Example:
    a = int(rng.integers(10))
    b = int(rng.integers(10 - a))
    return f"What is {a} plus {b}?", str(a + b)


_TASKS = (
    ImbalanceTask("hairline", "hairline", "synth_letters", _hairline, ("vowel", "consonant"),
                  "reward scale: every answer within 1e-3 of the others", "check the letter"),
    ImbalanceTask("rare", "classification", "synth_numbers", _rare, ("yes", "no"),
                  "data share: a fifth of a task's train prompts", "compare with fifty",
                  train_fraction=0.2),
    ImbalanceTask("hard16", "classification", "synth_stories", _hard16, tuple(SOUNDS),
                  "difficulty and classes: 16 labels, long prompt, three distractors",
                  "count to the loudest sound"),
    ImbalanceTask("solved", "classification", "synth_sky", _solved, ("day", "night"),
                  "solved by the warm start: silent groups", "look at the sky"),
    ImbalanceTask("longans", "qa", "synth_recipes", _longans, None,
                  "answer length: near the response limit", "recall the steps"),
    ImbalanceTask("scaled", "scaled", "synth_sums", _scaled, None,
                  "reward scale: graded in [0, 10]", "add the numbers"),
)
SUITE: dict[str, ImbalanceTask] = {t.name: t for t in _TASKS}


# --- public helpers (the same shape as services.tiny.tasks) -------------------------------


def _resolve(tasks: Iterable[str | ImbalanceTask] | None) -> list[ImbalanceTask]:
    if tasks is None:
        return list(SUITE.values())
    return [t if isinstance(t, ImbalanceTask) else SUITE[t] for t in tasks]


def generate_examples(task: ImbalanceTask, n: int, seed: int) -> list[dict]:
    """Draw ``n`` examples of one task as row dicts with the parquet columns."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        prompt, answer = task.generate(rng)
        rows.append({"prompt": prompt, "answer": answer, "task": task.name,
                     "dataset": task.dataset, "task_type": task.task_type, "modality": "text"})
    return rows


def split_counts(task: ImbalanceTask, n_train_per_task: int, n_test_per_task: int
                 ) -> dict[str, int]:
    """Rows of ``task`` per split: the train split scaled by its ``train_fraction``, the test
    split whole (every task is measured on as many prompts)."""
    return {"train": max(1, round(n_train_per_task * task.train_fraction)),
            "test": n_test_per_task}


def write_suite(out_dir: str | Path, *, n_train_per_task: int = 2000,
                n_test_per_task: int = 100, seed: int = 0,
                tasks: Iterable[str | ImbalanceTask] | None = None) -> dict[str, list[Path]]:
    """Write shuffled train/test parquet shards plus ``suite.json``; return shard paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = _resolve(tasks)
    shards: dict[str, list[Path]] = {}
    for split_index, split in enumerate(SPLITS):
        rows = []
        for task_index, task in enumerate(specs):
            n = split_counts(task, n_train_per_task, n_test_per_task)[split]
            rows += generate_examples(task, n, _task_seed(seed, task_index, split_index))
        order = np.random.default_rng([seed, split_index]).permutation(len(rows))
        table = pa.table({c: [rows[i][c] for i in order] for c in COLUMNS},
                         schema=pa.schema([(c, pa.string()) for c in COLUMNS]))
        path = out_dir / f"{split}-00000-of-00001.parquet"
        pq.write_table(table, path)
        shards[split] = [path]
    manifest = {
        "suite": SUITE_NAME,
        "seed": seed,
        "fingerprint": suite_fingerprint(seed=seed, tasks=specs),
        "modality": "text",
        "splits": {s: [p.name for p in shards[s]] for s in SPLITS},
        "reward_custom": {t: CUSTOM_REWARDS[t] for t in sorted({s.task_type for s in specs})
                          if t in CUSTOM_REWARDS},
        "tasks": [
            {"name": t.name, "task_type": t.task_type, "dataset": t.dataset,
             "labels": list(t.labels) if t.labels else None, "knob": t.knob,
             **{f"n_{k}": v for k, v in
                split_counts(t, n_train_per_task, n_test_per_task).items()}}
            for t in specs
        ],
    }
    (out_dir / "suite.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return shards


def suite_fingerprint(*, seed: int = 0,
                      tasks: Iterable[str | ImbalanceTask] | None = None) -> str:
    """Short hash of what the suite's code produces (names, types, labels, data share, SFT
    reasoning, the first examples of every task); it differs from the default suite's."""
    specs = _resolve(tasks)
    content = [SUITE_NAME] + [
        [t.name, t.task_type, t.dataset, list(t.labels or ()), t.think, t.train_fraction,
         generate_examples(t, 16, _task_seed(seed, i, 0))]
        for i, t in enumerate(specs)
    ]
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def suite_corpus(*, n_per_task: int = 300, seed: int = 0,
                 tasks: Iterable[str | ImbalanceTask] | None = None) -> list[str]:
    """Texts for tokenizer training: prompts, target responses, labels and chat role names."""
    texts = ["system", "user", "assistant"]
    for i, task in enumerate(_resolve(tasks)):
        texts += list(task.labels or ())
        for row in generate_examples(task, n_per_task, _task_seed(seed, i, 99)):
            texts += [row["prompt"], f"<think>{task.think}</think> \\boxed{{{row['answer']}}}"]
    return texts
