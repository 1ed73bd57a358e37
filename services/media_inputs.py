"""Model inputs of media prompts, built the same way by the rollout worker and the learner.

Media travel by reference: the driver ``ray.put``s one :class:`MediaRows` per split (the
``PromptSet.media`` Arrow table with what error messages need, no prompt text) and requests,
rollout batches and learners carry prompt row indices into it. Where the tensors are needed,
:class:`MediaInputs` reads a row, decodes it through its own :class:`MediaCache` (a group's
``G`` samples, and later steps drawing the row again, decode once per process), runs the
processor's parts (:mod:`services.omni_inputs`) and expands each placeholder token of the
prompt ids to the number of tokens its item takes in the model.

The rollout worker puts the *expanded* prompt ids in the Arrow batch; the learner rebuilds only
the media tensors from ``prompt_index`` and checks that each kind's placeholder count in those
ids is what its tensors give (:meth:`MediaInputs.check_expanded`) — so the rollout and the
learner see the same tokens and the same tensors, and no pixel ever enters a rollout batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harpo_core.data import PromptSet
from harpo_core.media import MediaCache, MediaLimits
from harpo_core.media_check import row_media
from services.model_loading import architecture, media_kinds
from services.omni_inputs import MEDIA_TOKENS, QWEN2_VL_MEDIA_TOKENS, media_tensors

KINDS = ("image", "audio", "video")  # the order a prompt's media parts are rendered in


@dataclass
class MediaRows:
    """What a process needs to read and name a split's media: the Arrow table (aligned with the
    prompt rows), the directory references are relative to, and each row's task."""

    table: object  # pa.Table
    root: Path | None
    task_codes: np.ndarray
    task_names: tuple[str, ...]

    @classmethod
    def of(cls, prompts: PromptSet) -> MediaRows | None:
        if prompts.media is None:
            return None
        return cls(prompts.media, prompts.media_root, prompts.task_codes, prompts.task_names)

    def prompt_set(self) -> PromptSet:
        """A text-less prompt set over the table (what :func:`row_media` reads)."""
        n = self.table.num_rows
        blank = [""] * n
        return PromptSet(prompts=blank, answers=blank, task_codes=self.task_codes,
                         task_names=self.task_names, task_types=("",) * len(self.task_names),
                         datasets=blank, media=self.table, media_root=self.root)


@dataclass
class MediaPrompt:
    """One prompt for a backend's ``generate_media``: the chat-templated ids with one
    placeholder per item (``ids``), the same ids expanded as the model sees them with the
    model's keyword inputs for them (``inputs``: media tensors of a batch of one), and the
    decoded media (kind -> arrays) for an engine that runs its own processor (vLLM)."""

    ids: list[int]
    expanded: list[int]
    inputs: dict
    decoded: dict
    sample_rate: int = 16_000  # of the decoded audio


def media_counts(prompts: PromptSet) -> list[dict[str, int]]:
    """Items per kind of every row ({} for a row without media)."""
    if prompts.media is None:
        return [{} for _ in range(len(prompts))]
    import pyarrow.compute as pc

    # list lengths only: the media bytes are never converted to Python objects here
    columns = {k: pc.fill_null(pc.list_value_length(prompts.media.column(k)), 0).to_pylist()
               for k in prompts.media_kinds()}
    return [{k: columns[k][i] for k in KINDS if k in columns and columns[k][i]}
            for i in range(len(prompts))]


def repeat_media(tensors: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """The media tensors of one prompt for ``rows`` copies of it: every tensor is per item
    along dim 0 (patches, grids, audio features), so the copies are concatenated there."""
    return {k: v.repeat(rows, *([1] * (v.dim() - 1))) for k, v in tensors.items()}


class MediaInputs:
    """Reads, decodes and processes the media of prompt rows for the model in ``model_dir``."""

    def __init__(self, model_dir: str | Path, limits: MediaLimits = MediaLimits(),  # noqa: B008
                 cache_bytes: int = 256 * 2**20):
        from transformers import AutoTokenizer

        self.kinds = media_kinds(model_dir)
        if not self.kinds:
            raise ValueError(f"model {str(model_dir)!r} ({architecture(model_dir)}) takes no "
                             f"media")
        arch = architecture(model_dir) or ""
        self.qwen2_vl = arch.startswith(("Qwen2VL", "Qwen2_5_VL"))
        self.tokens = QWEN2_VL_MEDIA_TOKENS if self.qwen2_vl else MEDIA_TOKENS
        self.second_per_grid = {"Qwen2VLForConditionalGeneration": None,
                                "Qwen2_5_VLForConditionalGeneration": "second_per_grid_ts"
                                }.get(arch, "video_second_per_grid")
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.token_ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in self.tokens.items()}
        self.image_processor = self.feature_extractor = None
        if {"image", "video"} & set(self.kinds):
            from transformers import AutoImageProcessor

            self.image_processor = AutoImageProcessor.from_pretrained(str(model_dir))
        if "audio" in self.kinds:
            from transformers import AutoFeatureExtractor

            self.feature_extractor = AutoFeatureExtractor.from_pretrained(str(model_dir))
        self.limits = limits
        self.cache = MediaCache(limits, cache_bytes)
        self._views: dict[int, PromptSet] = {}
        self.decode_s = 0.0  # seconds spent reading, decoding and processing media

    def _view(self, rows: MediaRows) -> PromptSet:
        view = self._views.get(id(rows))
        if view is None:
            self._views = {id(rows): (view := rows.prompt_set())}  # one split at a time
        return view

    def decoded(self, rows: MediaRows, row: int) -> dict[str, list[np.ndarray]]:
        """The decoded media of ``row`` (kind -> arrays; from the cache once decoded)."""
        return {k: v for k, v in row_media(self._view(rows), row, self.cache).items() if v}

    def tensors(self, rows: MediaRows, row: int) -> tuple[dict, dict[str, list[int]]]:
        """The media tensors of prompt row ``row`` (batch of one prompt) and the token count of
        each item; ``({}, {})`` for a row without media."""
        import time

        t0 = time.perf_counter()
        decoded = row_media(self._view(rows), row, self.cache)
        if not any(decoded.values()):
            return {}, {}
        unsupported = [k for k, v in decoded.items() if v and k not in self.kinds]
        if unsupported:
            raise ValueError(f"{self._view(rows).where(row)}: {', '.join(unsupported)} given "
                             f"but the model takes only {', '.join(self.kinds)}")
        out, counts = media_tensors(self.image_processor, self.feature_extractor,
                                    images=decoded.get("image", ()),
                                    audios=decoded.get("audio", ()),
                                    videos=decoded.get("video", ()),
                                    video_fps=self.limits.video_fps)
        seconds = out.pop("video_second_per_grid", None)
        if seconds is not None and self.second_per_grid:
            out[self.second_per_grid] = seconds
        self.decode_s += time.perf_counter() - t0
        return out, {k: v for k, v in counts.items() if v}

    def expand(self, prompt_ids: list[int], counts: dict[str, list[int]]) -> list[int]:
        """``prompt_ids`` with the ``i``-th placeholder of each kind repeated ``counts[kind][i]``
        times (the chat template writes one placeholder per item)."""
        seen = {k: 0 for k in counts}
        by_id = {self.token_ids[k]: k for k in counts}
        out: list[int] = []
        for token in prompt_ids:
            kind = by_id.get(token)
            if kind is None:
                out.append(token)
                continue
            if seen[kind] >= len(counts[kind]):
                raise ValueError(f"the prompt has more {self.tokens[kind]} placeholders than "
                                 f"its {len(counts[kind])} {kind} item(s)")
            out.extend([token] * counts[kind][seen[kind]])
            seen[kind] += 1
        short = [f"{seen[k]} {self.tokens[k]} placeholder(s) for {len(v)} {k} item(s)"
                 for k, v in counts.items() if seen[k] != len(v)]
        if short:
            raise ValueError(f"prompt placeholders do not match its media: {'; '.join(short)}")
        return out

    def check_expanded(self, ids: torch.Tensor | np.ndarray, counts: dict[str, list[int]],
                       where: str) -> None:
        """Each kind's placeholder tokens in the (expanded) ids equal its items' token count:
        the learner's media tensors are those the rollout used."""
        ids = torch.as_tensor(np.array(ids))
        for kind, token in self.token_ids.items():
            found, want = int((ids == token).sum()), sum(counts.get(kind, []))
            if found != want:
                raise ValueError(f"{where}: {found} {self.tokens[kind]} token(s) in the rollout's "
                                 f"prompt but its media give {want}: the rollout and the learner "
                                 f"did not build the same inputs")

    def model_kwargs(self, input_ids: torch.Tensor, media: dict) -> dict:
        """Media tensors plus what the model derives from the ids (Qwen2-VL's
        ``mm_token_type_ids``: 1 image, 2 video per token, for its M-RoPE)."""
        if not self.qwen2_vl:
            return dict(media)
        types = torch.zeros_like(input_ids)
        types[input_ids == self.token_ids["image"]] = 1
        types[input_ids == self.token_ids["video"]] = 2
        return {**media, "mm_token_type_ids": types}


def media_prompts(builder: MediaInputs, rows: MediaRows, indices, prompt_ids: list[list[int]]
                  ) -> list[MediaPrompt]:
    """The rollout side: one :class:`MediaPrompt` per prompt row (a row without media keeps its
    ids and gets no tensors)."""
    out = []
    for index, ids in zip(np.asarray(indices).tolist(), prompt_ids):
        tensors, counts = builder.tensors(rows, index)
        expanded = builder.expand(ids, counts) if counts else list(ids)
        out.append(MediaPrompt(
            ids=list(ids), expanded=expanded,
            inputs=builder.model_kwargs(torch.tensor([expanded]), tensors),
            decoded=builder.decoded(rows, index) if counts else {},
            sample_rate=builder.limits.sample_rate))
    return out
