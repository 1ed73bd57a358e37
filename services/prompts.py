"""Prompts for the rollout pool: the data split, its tokens, and the requests cut from them.

A step's prompts are cut into requests of a fixed number of prompts, each with its own seed
derived from the run seed, the step and the request's position, so the same step always
produces the same rollouts however many workers serve it and whichever of them fail.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from harpo_core.data import DataColumns, PromptSet, load_prompts
from services.chat import tokenize_prompts
from services.config import TrainConfig

if TYPE_CHECKING:  # imported when requests are cut: loading data must not import Ray
    from services.rollout.worker import RolloutRequest


class DataError(ValueError):
    """Training data that cannot be used as configured."""


def derive_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from the run seed and a position (step, chunk, ...)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def check_prompt_lengths(token_ids: list[list[int]], limit: int, split: str) -> None:
    lengths = np.array([len(t) for t in token_ids])
    too_long = np.flatnonzero(lengths > limit)
    if too_long.size:
        shown = ", ".join(f"row {i} ({lengths[i]} tokens)" for i in too_long[:5])
        raise DataError(
            f"{too_long.size} {split} prompt(s) exceed data.max_prompt_tokens={limit}: {shown}; "
            f"raise the limit (within the model's context) or shorten the prompts"
        )


def load_split(config: TrainConfig, split: str) -> PromptSet:
    d = config.data
    if d.format == "hba":
        from services.media_data import load_media_split

        return load_media_split(config, split).prompts
    columns = DataColumns(prompt=d.prompt_column, answer=d.answer_column, task=d.task_column,
                          dataset=d.dataset_column, task_type=d.task_type_column)
    allowed = ("classification", "qa", *config.reward.custom)
    return load_prompts(d.path, split, columns=columns, tasks=d.tasks,
                        task_types_allowed=allowed)


@dataclass
class TokenizedPrompts:
    """A prompt set and the chat-templated token ids of (some of) its prompts."""

    prompts: PromptSet
    token_ids: list[list[int] | None]  # one entry per prompt; None where not tokenized
    rows: np.ndarray  # the tokenized rows, in task order
    # rows per media kind that carry it ({} for text-only data); and, once the driver has put
    # the split's media in the object store (Trainer), the ObjectRef of its MediaRows
    media_used: dict[str, int] = field(default_factory=dict)
    media_ref: object = None

    @classmethod
    def build(cls, config: TrainConfig, tokenizer, split: str,
              per_task: int | None = None, model_dir: str | None = None) -> TokenizedPrompts:
        """Load ``split`` and tokenize its prompts (only the first ``per_task`` of each task,
        when given); prompt lengths are checked against ``data.max_prompt_tokens``. Prompts
        with media get one placeholder per item from the chat template; ``model_dir``: the
        model, refused first when it cannot take the media."""
        prompts = load_split(config, split)
        rows = np.arange(len(prompts))
        if per_task is not None:
            rows = np.concatenate([prompts.indices_of_task(c)[:per_task]
                                   for c in range(len(prompts.task_names))])
        media = None
        used: dict[str, int] = {}
        if prompts.media is not None:  # placeholders for the media (expanded by the worker)
            from services.media_inputs import media_counts

            counts = media_counts(prompts)
            media = [counts[i] for i in rows]
            for kind in ("image", "audio", "video"):
                used[kind] = sum(1 for c in counts if c.get(kind))
            if model_dir is not None:
                from services.model_loading import check_media_supported

                check_media_supported(model_dir, used)
        ids = tokenize_prompts(tokenizer, [prompts.prompts[i] for i in rows], media)
        check_prompt_lengths(ids, config.data.max_prompt_tokens, split)
        token_ids: list[list[int] | None] = [None] * len(prompts)
        for i, t in zip(rows, ids):
            token_ids[i] = t
        return cls(prompts, token_ids, rows, {k: n for k, n in used.items() if n})

    def requests(self, indices: np.ndarray, *, step: int, version: int, seed: int,
                 seed_tag: str, chunk_prompts: int) -> list[RolloutRequest]:
        """Cut ``indices`` (rows of the prompt set) into requests of ``chunk_prompts``."""
        from services.rollout.worker import RolloutRequest

        positions = np.arange(indices.size)
        chunks = [positions[i:i + chunk_prompts] for i in range(0, indices.size, chunk_prompts)]
        p = self.prompts
        return [
            RolloutRequest(
                step=step,
                seed=derive_seed(seed, seed_tag, step, k),
                policy_version=version,
                prompt_indices=indices[c],
                group_ids=c,
                task_codes=p.task_codes[indices[c]],
                task_names=p.task_names,
                task_types=p.task_types,
                answers=[p.answers[i] for i in indices[c]],
                prompt_ids=[self.token_ids[i] for i in indices[c]],
                media=self.media_ref,
            )
            for k, c in enumerate(chunks)
        ]
