"""Loading a Human Behavior Atlas-format split (``data.format: hba``) with its media checked.

:func:`load_media_split` reads the split (media kept in Arrow, see :mod:`harpo_core.data`),
decodes every media item once under the configured bounds, applies ``data.on_bad_media``,
and reports the rows per task and modality (logged, and returned with the per-task counts of
skipped prompts so a metric can export them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from harpo_core.data import DataColumns, PromptSet, load_prompts
from harpo_core.media import MediaCache, MediaLimits
from harpo_core.media_check import screen_media
from services.config import DataSection, TrainConfig

log = logging.getLogger(__name__)

_COLUMN_FIELDS = {"prompt_column": "prompt", "answer_column": "answer", "task_column": "task",
                  "dataset_column": "dataset", "task_type_column": "task_type"}


def data_columns(d: DataSection) -> DataColumns:
    """The HBA column names, with any ``data.*_column`` the config sets explicitly."""
    hba = DataColumns.hba()
    explicit = {attr: getattr(d, name) for name, attr in _COLUMN_FIELDS.items()
                if name in d.model_fields_set}
    return DataColumns(**{**{a: getattr(hba, a) for a in ("prompt", "answer", "task", "dataset",
                                                          "task_type", "modality", "images",
                                                          "videos", "audios")}, **explicit})


def media_limits(d: DataSection) -> MediaLimits:
    return MediaLimits(max_image_pixels=d.max_image_pixels, sample_rate=d.audio_sample_rate,
                       min_sample_rate=d.min_audio_sample_rate,
                       max_audio_seconds=d.max_audio_seconds,
                       max_video_seconds=d.max_video_seconds,
                       max_video_frames=d.max_video_frames, video_fps=d.video_fps)


@dataclass
class MediaSplit:
    """A loaded split: its prompts (bad-media rows dropped under ``skip``), rows per task and
    modality, and prompts skipped per task (zero included)."""

    prompts: PromptSet
    modality_counts: dict[str, dict[str, int]]
    skipped: dict[str, int]
    first_error: dict[str, str]


def format_modality_counts(counts: dict[str, dict[str, int]]) -> str:
    modalities = sorted({m for per_task in counts.values() for m in per_task})
    width = max([len(t) for t in counts] + [4])
    lines = ["task".ljust(width) + "".join(f"  {m:>16}" for m in modalities)]
    for task, per_task in counts.items():
        lines.append(task.ljust(width)
                     + "".join(f"  {per_task.get(m, 0):>16}" for m in modalities))
    return "\n".join(lines)


def load_media_split(config: TrainConfig, split: str,
                     cache: MediaCache | None = None) -> MediaSplit:
    d = config.data
    allowed = ("classification", "qa", *config.reward.custom)
    default_type = d.task_types if d.task_types is not None else "classification"
    prompts = load_prompts(d.path, split, columns=data_columns(d), tasks=d.tasks,
                           task_types_allowed=allowed, default_task_type=default_type)
    limits = media_limits(d)
    cache = cache if cache is not None else MediaCache(limits, d.media_cache_mb * 2**20)
    screen = screen_media(prompts, limits, d.on_bad_media, cache)
    counts = screen.prompts.modality_counts()
    log.info("%s split %r: prompts per task and modality\n%s", d.path, split,
             format_modality_counts(counts))
    if screen.total_skipped:
        log.warning("%s split %r: skipped %d prompt(s) with bad media (data.on_bad_media: skip):"
                    " %s; first error per task: %s", d.path, split, screen.total_skipped,
                    {t: n for t, n in screen.skipped.items() if n}, screen.first_error)
    return MediaSplit(screen.prompts, counts, screen.skipped, screen.first_error)
