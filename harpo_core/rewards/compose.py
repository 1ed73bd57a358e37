"""Per-sample rewards for a mixed-task batch: task reward, format reward, over-length penalty."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Real

import numpy as np

from harpo_core.rewards.parsing import answer_text
from harpo_core.rewards.scorers import exact_match, format_score, overlong_penalty
from harpo_core.rewards.similarity import SentenceSimilarity
from harpo_core.rewards.user import call_reward_function, load_reward_function

CLASSIFICATION = "classification"
QA = "qa"
BUILTIN_TASK_TYPES = (CLASSIFICATION, QA)


def _check_real(name: str, value: object, low: float, high: float = math.inf) -> None:
    allowed = f"a number in [{low}, {high}]" if high != math.inf else f"a number >= {low}"
    if isinstance(value, bool) or not isinstance(value, Real) or not low <= value <= high:
        raise ValueError(f"RewardConfig.{name} must be {allowed}, got {value!r}")


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"RewardConfig.{name} must be a positive int, got {value!r}")


ON_ERROR = ("zero", "drop_group", "raise")


@dataclass(frozen=True)
class RewardConfig:
    """How the per-sample reward is put together.

    ``total = (1 - format_weight) * task + format_weight * format + overlong``.

    * ``overlong_buffer``: length of the soft over-length zone before
      ``max_response_length``; None turns the over-length penalty off.
    * ``custom``: extra task types, mapping a task type name to a batched user reward
      function given as ``"package.module:function"``.
    * ``qa_accuracy_threshold``: a qa sample counts as accurate when its similarity
      score ``(1 + cos) / 2`` reaches this (0.75 is cosine 0.5). Metric only.
    """

    format_weight: float = 0.2
    max_response_length: int = 2048
    overlong_buffer: int | None = None
    overlong_factor: float = 0.75
    custom: dict[str, str] = field(default_factory=dict)
    qa_accuracy_threshold: float = 0.75
    # A user reward function that raises or returns a non-finite value for some samples:
    # "zero" scores those samples' task reward 0, "drop_group" marks them so the trainer drops
    # their groups from the step, "raise" stops with the error.
    on_error: str = "zero"

    def __post_init__(self) -> None:
        _check_real("format_weight", self.format_weight, 0.0, 1.0)
        _check_positive_int("max_response_length", self.max_response_length)
        if self.overlong_buffer is not None:
            _check_positive_int("overlong_buffer", self.overlong_buffer)
            if self.overlong_buffer > self.max_response_length:
                raise ValueError(
                    f"RewardConfig.overlong_buffer must be at most max_response_length "
                    f"({self.max_response_length}), got {self.overlong_buffer}"
                )
        _check_real("overlong_factor", self.overlong_factor, 0.0)
        _check_real("qa_accuracy_threshold", self.qa_accuracy_threshold, 0.0, 1.0)
        if self.on_error not in ON_ERROR:
            raise ValueError(f"RewardConfig.on_error must be one of {ON_ERROR}, "
                             f"got {self.on_error!r}")
        if not isinstance(self.custom, dict):
            raise TypeError(
                f"RewardConfig.custom must be a dict of task type -> 'module:function', "
                f"got {type(self.custom).__name__}"
            )
        for name, spec in self.custom.items():
            if not isinstance(name, str) or not name or name in BUILTIN_TASK_TYPES:
                raise ValueError(
                    f"RewardConfig.custom keys must be non-empty task type names other than "
                    f"the built-in {list(BUILTIN_TASK_TYPES)}, got {name!r}"
                )
            if not isinstance(spec, str):
                raise TypeError(
                    f"RewardConfig.custom[{name!r}] must be a 'module:function' string, "
                    f"got {spec!r}"
                )
        object.__setattr__(self, "custom", dict(self.custom))  # decouple from the caller's dict


@dataclass
class RewardResult:
    """Rewards of one batch, one value per sample in every array.

    * ``total``: the reward used for training.
    * ``components``: unweighted ``"task"`` (exact match, similarity or user reward),
      ``"format"`` (1/0) and ``"overlong"`` (penalty <= 0, zeros when disabled).
    * ``accuracy``: metric only. 1/0 exact match for classification rows; for qa rows
      1/0 whether similarity >= ``qa_accuracy_threshold``; NaN for custom task rows.
    """

    total: np.ndarray
    components: dict[str, np.ndarray]
    accuracy: np.ndarray
    # samples whose user reward failed (scored 0), and why: (sample index, message)
    errors: np.ndarray | None = None
    error_messages: list[tuple[int, str]] = field(default_factory=list)


class RewardComposer:
    """Scores mixed-task batches as set out by a :class:`RewardConfig`.

    Custom reward functions are imported when the composer is built, so a bad spec fails
    at start-up. The similarity model is only loaded once a batch has a qa row.
    """

    def __init__(self, config: RewardConfig, similarity: SentenceSimilarity | None = None):
        self.config = config
        self._similarity = similarity
        self._custom = {name: load_reward_function(spec) for name, spec in config.custom.items()}

    @property
    def task_types(self) -> tuple[str, ...]:
        """Task type names this composer can score."""
        return BUILTIN_TASK_TYPES + tuple(self._custom)

    @property
    def similarity(self) -> SentenceSimilarity:
        """Similarity scorer for qa rows (its model loads on first use)."""
        if self._similarity is None:
            self._similarity = SentenceSimilarity()
        return self._similarity

    def score(
        self,
        responses: Sequence[str],
        answers: Sequence[str],
        task_types: Sequence[str],
        response_lengths: np.ndarray,
    ) -> RewardResult:
        """Rewards for a batch; each task type's rows are scored in one batched call."""
        n = len(responses)
        if len(answers) != n or len(task_types) != n:
            raise ValueError(
                f"score needs one answer and one task type per response: got {n} responses, "
                f"{len(answers)} answers and {len(task_types)} task types"
            )
        lengths = np.asarray(response_lengths)
        if lengths.shape != (n,):
            raise ValueError(f"response_lengths must have shape ({n},), got {lengths.shape}")
        types = np.asarray(list(task_types), dtype=np.str_)
        present = np.unique(types).tolist()
        unknown = sorted(set(present) - set(self.task_types))
        if unknown:
            raise ValueError(
                f"unknown task type(s) {unknown}; known task types are {list(self.task_types)}"
            )

        response_arr = np.array(responses, dtype=object)
        answer_arr = np.array(answers, dtype=object)
        task = np.zeros(n, dtype=np.float64)
        accuracy = np.full(n, np.nan, dtype=np.float64)
        errors = np.zeros(n, dtype=bool)
        messages: list[tuple[int, str]] = []
        for task_type in present:
            rows = np.flatnonzero(types == task_type)
            rows_responses = response_arr[rows].tolist()
            rows_answers = answer_arr[rows].tolist()
            if task_type == CLASSIFICATION:
                task[rows] = exact_match(rows_responses, rows_answers)
                accuracy[rows] = task[rows]
            elif task_type == QA:
                predictions = [answer_text(r) for r in rows_responses]
                task[rows] = self.similarity.score(predictions, rows_answers)
                accuracy[rows] = task[rows] >= self.config.qa_accuracy_threshold
            else:
                task[rows] = self._user_rewards(task_type, rows, rows_responses, rows_answers,
                                                errors, messages)

        fmt = format_score(responses)
        if self.config.overlong_buffer is None:
            overlong = np.zeros(n, dtype=np.float64)
        else:
            overlong = overlong_penalty(
                lengths,
                self.config.max_response_length,
                self.config.overlong_buffer,
                self.config.overlong_factor,
            )
        w = self.config.format_weight
        total = (1.0 - w) * task + w * fmt + overlong
        return RewardResult(
            total=total,
            components={"task": task, "format": fmt, "overlong": overlong},
            accuracy=accuracy,
            errors=errors,
            error_messages=messages,
        )

    def _user_rewards(self, task_type, rows, responses, answers, errors, messages) -> np.ndarray:
        """One batched call; if it fails, one call per sample to find the culprits.

        Failing samples (an exception or a non-finite value) score 0 and are flagged in
        ``errors`` with their message, unless ``on_error`` is "raise".
        """
        fn = self._custom[task_type]
        try:
            return call_reward_function(fn, responses=responses, answers=answers,
                                        tasks=[task_type] * len(responses))
        except Exception:
            if self.config.on_error == "raise":
                raise
        values = np.zeros(len(responses), dtype=np.float64)
        for k, (response, answer) in enumerate(zip(responses, answers)):
            try:
                values[k] = call_reward_function(fn, responses=[response], answers=[answer],
                                                 tasks=[task_type])[0]
            except Exception as exc:  # noqa: BLE001 - recorded, scored by on_error
                errors[rows[k]] = True
                messages.append((int(rows[k]), f"{type(exc).__name__}: {exc}"))
        return values
