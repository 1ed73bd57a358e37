"""Synthetic heterogeneous task suite for the embedded (CPU-only) demo.

The suite mimics the shape of the Human Behavior Atlas: several datasets, each with
classification tasks (binary up to 8-way, answer scored by exact match of the
``\\boxed{...}`` content) and free-text QA tasks (scored by similarity). Tasks differ in
difficulty and prompt length. Every answer is a simple, learnable function of the prompt
so that a ~1M-parameter transformer can pick them up after a short supervised warm start.

Everything is generated from ``numpy.random.default_rng(seed)``; no external data.
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

Example = tuple[str, str]  # (prompt, answer)
COLUMNS = ("prompt", "answer", "task", "dataset", "task_type", "modality")
SPLITS = ("train", "test")


@dataclass(frozen=True)
class TaskSpec:
    """One task: how to draw a (prompt, answer) pair and how it is scored."""

    name: str
    task_type: str  # "classification" (exact match) or "qa" (similarity)
    dataset: str
    generate: Callable[[np.random.Generator], Example] = field(repr=False)
    labels: tuple[str, ...] | None = None  # closed label set for classification
    difficulty: str = "easy"
    think: str = "find the cue"  # the short reasoning used in SFT targets

    def __post_init__(self) -> None:
        if self.task_type not in ("classification", "qa"):
            raise ValueError(f"{self.name}: unknown task_type {self.task_type!r}")
        if self.task_type == "classification" and not self.labels:
            raise ValueError(f"{self.name}: classification tasks need labels")


def _pick(rng: np.random.Generator, items: Iterable[str]) -> str:
    items = tuple(items)
    return items[int(rng.integers(len(items)))]


# --- word lists --------------------------------------------------------------------------

NOUNS = ("food", "movie", "hotel", "phone", "book", "concert", "trip", "service", "game", "car")
SENTIMENT_CUES = {
    "positive": ("great", "wonderful", "lovely", "excellent", "pleasant"),
    "negative": ("awful", "terrible", "boring", "broken", "dreadful"),
}
EMOTION_CUES = {
    "anger": ("furious", "enraged", "irritated"),
    "joy": ("delighted", "cheerful", "thrilled"),
    "sadness": ("gloomy", "heartbroken", "miserable"),
    "fear": ("terrified", "nervous", "frightened"),
    "surprise": ("astonished", "amazed", "startled"),
    "disgust": ("revolted", "sickened", "repulsed"),
    "calm": ("relaxed", "peaceful", "serene"),
    "love": ("adoring", "affectionate", "devoted"),
}
TOPIC_CUES = {
    "sports": ("football", "tennis", "marathon", "stadium"),
    "food": ("pasta", "bakery", "recipe", "soup"),
    "travel": ("airport", "passport", "luggage", "train"),
    "music": ("guitar", "melody", "concert", "drummer"),
}
FILLER_SENTENCES = (
    "The morning started slowly.",
    "Someone opened a window.",
    "A neighbour waved from across the street.",
    "The clock on the wall ticked on.",
    "It was an ordinary day in the town.",
    "Later, a few friends came by.",
    "Nobody was in a hurry.",
    "The lights in the hall were dim.",
    "A cat slept on the step.",
    "They talked about nothing in particular.",
    "The afternoon passed quietly.",
    "Then everyone went home.",
)
WEATHER_PHRASES = {
    "rainy": "wet and grey skies",
    "sunny": "bright and clear skies",
    "snowy": "cold white ground",
    "windy": "strong gusts of air",
    "foggy": "thick mist everywhere",
    "stormy": "thunder and heavy rain",
}
PLACE_ACTIVITIES = {
    "library": "reading a quiet book",
    "kitchen": "cooking a warm meal",
    "park": "walking in fresh air",
    "gym": "lifting heavy weights",
    "pool": "swimming a few laps",
    "office": "typing at a desk",
    "garden": "watering the plants",
    "beach": "resting on the sand",
}
OBJECTS = ("bag", "hat", "phone", "friend", "bottle", "jacket", "dog", "notebook")


# --- generators -------------------------------------------------------------------------


def _sentiment(rng: np.random.Generator) -> Example:
    label = _pick(rng, SENTIMENT_CUES)
    cue, noun = _pick(rng, SENTIMENT_CUES[label]), _pick(rng, NOUNS)
    prompt = (
        "What is the sentiment of the review? Options: positive, negative.\n"
        f"Review: The {noun} was {cue}."
    )
    return prompt, label


def _emotion(rng: np.random.Generator) -> Example:
    # Hard: 8 classes, and a distractor emotion word of another class follows the cue.
    label = _pick(rng, EMOTION_CUES)
    other = _pick(rng, [e for e in EMOTION_CUES if e != label])
    cue, distractor = _pick(rng, EMOTION_CUES[label]), _pick(rng, EMOTION_CUES[other])
    noun = _pick(rng, NOUNS)
    prompt = (
        "Which emotion does the speaker feel? Options: " + ", ".join(EMOTION_CUES) + ".\n"
        f"Speaker: I am {cue} about the {noun}, but my friend is {distractor}."
    )
    return prompt, label


def _compare(rng: np.random.Generator) -> Example:
    label = _pick(rng, ("greater", "less", "equal"))
    if label == "equal":
        a = b = int(rng.integers(10))
    else:
        a, b = (int(x) for x in rng.choice(10, size=2, replace=False))
        if (a > b) != (label == "greater"):
            a, b = b, a
    prompt = f"Is the first number greater than, less than, or equal to the second?\n{a} vs {b}"
    return prompt, label


def _parity(rng: np.random.Generator) -> Example:
    digit = int(rng.integers(10))
    return f"Is the digit {digit} even or odd?", "even" if digit % 2 == 0 else "odd"


def _topic_long(rng: np.random.Generator) -> Example:
    label = _pick(rng, TOPIC_CUES)
    n_filler = int(rng.integers(4, 9))
    idx = rng.choice(len(FILLER_SENTENCES), size=n_filler, replace=False)
    sentences = [FILLER_SENTENCES[i] for i in idx]
    cue = _pick(rng, TOPIC_CUES[label])
    sentences.insert(int(rng.integers(n_filler + 1)), f"There was talk of the {cue}.")
    prompt = (
        "Read the story and name its topic. Options: " + ", ".join(TOPIC_CUES) + ".\n"
        "Story: " + " ".join(sentences)
    )
    return prompt, label


def _weather_qa(rng: np.random.Generator) -> Example:
    word = _pick(rng, WEATHER_PHRASES)
    return f"Describe the weather word in a few words: {word}", WEATHER_PHRASES[word]


def _activity_qa(rng: np.random.Generator) -> Example:
    place, obj = _pick(rng, PLACE_ACTIVITIES), _pick(rng, OBJECTS)
    prompt = f"A person is at the {place} with a {obj}. What are they most likely doing?"
    return prompt, PLACE_ACTIVITIES[place]


_TASKS = (
    TaskSpec("sentiment", "classification", "synth_reviews", _sentiment,
             tuple(SENTIMENT_CUES), "easy", "the mood word decides"),
    TaskSpec("emotion", "classification", "synth_reviews", _emotion,
             tuple(EMOTION_CUES), "hard", "the speaker word decides"),
    TaskSpec("compare", "classification", "synth_numbers", _compare,
             ("greater", "less", "equal"), "hard", "compare the digits"),
    TaskSpec("parity", "classification", "synth_numbers", _parity,
             ("even", "odd"), "easy", "check the digit"),
    TaskSpec("topic_long", "classification", "synth_stories", _topic_long,
             tuple(TOPIC_CUES), "hard", "find the topic word"),
    TaskSpec("weather_qa", "qa", "synth_weather", _weather_qa, None, "easy", "recall the weather"),
    TaskSpec("activity_qa", "qa", "synth_places", _activity_qa, None, "easy", "the place decides"),
)
SUITE: dict[str, TaskSpec] = {t.name: t for t in _TASKS}


# --- public helpers ---------------------------------------------------------------------


def _resolve(tasks: Iterable[str | TaskSpec] | None) -> list[TaskSpec]:
    if tasks is None:
        return list(SUITE.values())
    return [t if isinstance(t, TaskSpec) else SUITE[t] for t in tasks]


def generate_examples(task: TaskSpec, n: int, seed: int) -> list[dict]:
    """Draw ``n`` examples of one task as row dicts with the parquet columns."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        prompt, answer = task.generate(rng)
        rows.append({
            "prompt": prompt, "answer": answer, "task": task.name, "dataset": task.dataset,
            "task_type": task.task_type, "modality": "text",
        })
    return rows


def _task_seed(seed: int, task_index: int, split_index: int) -> int:
    # Independent, reproducible streams per (task, split); test never reuses train draws.
    return int(np.random.SeedSequence([seed, task_index, split_index]).generate_state(1)[0])


def write_suite(
    out_dir: str | Path,
    *,
    n_train_per_task: int = 2000,
    n_test_per_task: int = 100,
    seed: int = 0,
    tasks: Iterable[str | TaskSpec] | None = None,
) -> dict[str, list[Path]]:
    """Write shuffled train/test parquet shards plus ``suite.json``; return shard paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = _resolve(tasks)
    counts = {"train": n_train_per_task, "test": n_test_per_task}
    shards: dict[str, list[Path]] = {}
    for split_index, split in enumerate(SPLITS):
        rows = []
        for task_index, task in enumerate(specs):
            task_seed = _task_seed(seed, task_index, split_index)
            rows += generate_examples(task, counts[split], task_seed)
        order = np.random.default_rng([seed, split_index]).permutation(len(rows))
        table = pa.table({c: [rows[i][c] for i in order] for c in COLUMNS},
                         schema=pa.schema([(c, pa.string()) for c in COLUMNS]))
        path = out_dir / f"{split}-00000-of-00001.parquet"
        pq.write_table(table, path)
        shards[split] = [path]
    manifest = {
        "seed": seed,
        "fingerprint": suite_fingerprint(seed=seed, tasks=specs),
        "modality": "text",
        "splits": {s: [p.name for p in shards[s]] for s in SPLITS},
        "tasks": [
            {"name": t.name, "task_type": t.task_type, "dataset": t.dataset,
             "labels": list(t.labels) if t.labels else None, "difficulty": t.difficulty,
             "n_train": n_train_per_task, "n_test": n_test_per_task}
            for t in specs
        ],
    }
    (out_dir / "suite.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return shards


def suite_fingerprint(*, seed: int = 0, tasks: Iterable[str | TaskSpec] | None = None) -> str:
    """Short hash of what the suite's code produces: task names, types, labels, SFT reasoning
    and the first examples of every task. It changes when a generator or a task changes, so
    assets written by an older version of the suite can be told apart from current ones."""
    specs = _resolve(tasks)
    content = [
        [t.name, t.task_type, t.dataset, list(t.labels or ()), t.think,
         generate_examples(t, 16, _task_seed(seed, i, 0))]
        for i, t in enumerate(specs)
    ]
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def sft_response(answer: str, task: TaskSpec | str | None = None) -> str:
    """Target completion for the supervised warm start: ``<think>…</think> \\boxed{answer}``."""
    if isinstance(task, str):
        task = SUITE[task]
    think = task.think if task is not None else "find the cue"
    return f"<think>{think}</think> \\boxed{{{answer}}}"


def suite_corpus(
    *, n_per_task: int = 300, seed: int = 0, tasks: Iterable[str | TaskSpec] | None = None
) -> list[str]:
    """Texts for tokenizer training: prompts, target responses, labels and chat role names."""
    texts = ["system", "user", "assistant"]
    for i, task in enumerate(_resolve(tasks)):
        texts += list(task.labels or ())
        for row in generate_examples(task, n_per_task, _task_seed(seed, i, 99)):
            texts += [row["prompt"], sft_response(row["answer"], task)]
    return texts
