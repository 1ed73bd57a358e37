"""Media of a prompt set: reading a row's items and screening every row for bad media.

:func:`row_media` turns one row of :attr:`PromptSet.media` into decoded arrays (raw bytes
decoded directly, references read from ``PromptSet.media_root`` first), naming the row and the
task in any error. :func:`screen_media` decodes every row's media once at load time and, by the
``on_bad_media`` policy, raises on the first bad item or drops the prompts that have one and
counts them per task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import PromptSet
from .media import MediaCache, MediaError, MediaLimits

ON_BAD_MEDIA = ("raise", "skip")


class BadMediaError(ValueError):
    """A prompt's media cannot be used; the message names the row, the task and the item."""


def _read_reference(root: Path | None, ref: str) -> bytes:
    path = Path(ref)
    if not path.is_absolute():
        if root is None:
            raise MediaError(f"media reference {ref!r} is relative but no data directory is known")
        path = root / path
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise MediaError(f"media file {path} does not exist") from None
    except OSError as exc:
        raise MediaError(f"media file {path} cannot be read: {exc}") from None


def row_media(prompts: PromptSet, row: int, cache: MediaCache) -> dict[str, list[np.ndarray]]:
    """Decoded media of ``row``: kind -> arrays, in column order. Raises :class:`BadMediaError`
    naming the row (file and row in file), the task and the item."""
    decoded: dict[str, list[np.ndarray]] = {}
    for kind, items in prompts.media_items(row).items():
        out = decoded.setdefault(kind, [])
        for i, item in enumerate(items):
            try:
                if item is None:
                    raise MediaError("item is null")
                data = _read_reference(prompts.media_root, item) if isinstance(item, str) else item
                out.append(cache.get(kind, data))
            except MediaError as exc:
                task = prompts.task_names[prompts.task_codes[row]]
                raise BadMediaError(f"{prompts.where(row)} (task {task!r}): {kind} {i}: "
                                    f"{exc}") from None
    return decoded


@dataclass
class MediaScreen:
    """What :func:`screen_media` found: the prompts kept, and per task how many were skipped
    (every task present, zero included) with the first reason seen for each task."""

    prompts: PromptSet
    skipped: dict[str, int] = field(default_factory=dict)
    first_error: dict[str, str] = field(default_factory=dict)
    decoded_items: int = 0

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())


def screen_media(prompts: PromptSet, limits: MediaLimits = MediaLimits(),  # noqa: B008
                 on_bad_media: str = "raise", cache: MediaCache | None = None) -> MediaScreen:
    """Decode every row's media once; raise :class:`BadMediaError` on the first bad row
    (``raise``) or keep only the good rows and count the others per task (``skip``)."""
    if on_bad_media not in ON_BAD_MEDIA:
        raise ValueError(f"on_bad_media must be one of {ON_BAD_MEDIA}, got {on_bad_media!r}")
    skipped = dict.fromkeys(prompts.task_names, 0)
    if prompts.media is None:
        return MediaScreen(prompts, skipped)
    cache = cache if cache is not None else MediaCache(limits)
    good = np.ones(len(prompts), dtype=bool)
    first_error: dict[str, str] = {}
    decoded = 0
    for row in range(len(prompts)):
        try:
            decoded += sum(len(v) for v in row_media(prompts, row, cache).values())
        except BadMediaError as exc:
            if on_bad_media == "raise":
                raise
            task = prompts.task_names[prompts.task_codes[row]]
            skipped[task] += 1
            first_error.setdefault(task, str(exc))
            good[row] = False
    if good.all():
        return MediaScreen(prompts, skipped, first_error, decoded)
    if not good.any():
        first = next(iter(first_error.values()))
        raise BadMediaError(f"every prompt has bad media; first: {first}")
    return MediaScreen(prompts.select(good), skipped, first_error, decoded)
