"""Multi-task prompt data: parquet shards in, a validated :class:`PromptSet` and a sampler out.

The layout follows the Human Behavior Atlas dataset on Hugging Face: a directory of parquet
shards named ``{split}-{index:05d}-of-{count:05d}.parquet``, one row per prompt.
:func:`find_shards` locates and checks a split's shards, :func:`load_prompts` reads and validates
them, and :class:`TaskStratifiedSampler` draws task-balanced, resumable batches of row indices.

Column names are set by :class:`DataColumns`. harpo's synthetic suite uses the defaults
``prompt, answer, task, dataset, task_type`` plus optional modality columns. The published Human
Behavior Atlas v2 parquet (``HumanBehaviorAtlas/human_behavior_atlas``; its dataset card lists
the features) names them differently:

- ``problem`` (the prompt text), ``answer``, ``task``, ``dataset``, ``class_label`` (strings);
- ``images``, ``videos``, ``audios`` (lists of raw media bytes), ``modality_signature`` (e.g.
  ``"text_video_audio"``), and ``ext_video_feats`` / ``ext_audio_feats`` (lists of pre-extracted
  feature bytes).

It has no task-type column, so pass ``default_task_type`` (one type, or a mapping from task name
to type) when loading it; :meth:`DataColumns.human_behavior_atlas` gives the column mapping.
Modality columns are read into memory in full, so choose them with the data's size in mind.

Media columns (``DataColumns.images`` / ``videos`` / ``audios``, set by :meth:`DataColumns.hba`)
are kept as Arrow arrays in :attr:`PromptSet.media`, never as Python objects: each entry is a
list of raw media bytes or of file references (paths relative to the data directory). A prompt
is a row index into that table, so the next stage can hand the table to the object store once
and pass row indices (see docs/omni.md).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

TASK_TYPES = ("classification", "qa")
MEDIA_KINDS = ("image", "video", "audio")
_MAX_LISTED = 10  # how many file names an error message lists
_STATE_VERSION = 1


@dataclass(frozen=True)
class DataColumns:
    """Names of the columns :func:`load_prompts` reads.

    ``dataset`` and ``task_type`` may be absent from a file (see :func:`load_prompts`); each name
    in ``modality`` is carried through into :attr:`PromptSet.extras` when present.
    """

    prompt: str = "prompt"
    answer: str = "answer"
    task: str = "task"
    dataset: str = "dataset"
    task_type: str = "task_type"
    modality: tuple[str, ...] = ()
    images: str | None = None  # media columns: lists of bytes or of relative paths
    videos: str | None = None
    audios: str | None = None

    def media_columns(self) -> dict[str, str]:
        """Media kind (``image``, ``video``, ``audio``) -> column name, for the columns set."""
        named = {"image": self.images, "video": self.videos, "audio": self.audios}
        return {kind: name for kind, name in named.items() if name}

    @classmethod
    def hba(cls) -> DataColumns:
        """The Human Behavior Atlas layout with its media as media columns (kept in Arrow) and
        ``modality_signature`` / ``class_label`` carried as extras."""
        return cls(prompt="problem", modality=("modality_signature", "class_label"),
                   images="images", videos="videos", audios="audios")

    @classmethod
    def human_behavior_atlas(cls) -> DataColumns:
        """Column names of the Human Behavior Atlas v2 parquet release (raw media, no features)."""
        return cls(prompt="problem", modality=("images", "videos", "audios", "modality_signature"))


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return shown + more


def _shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.parquet"


def find_shards(path: str | Path, split: str) -> list[Path]:
    """Return the shard files of ``split`` in index order.

    ``path`` is either a directory holding ``{split}-NNNNN-of-MMMMM.parquet`` shards, or a
    single ``.parquet`` file (then ``split`` is ignored). Raises FileNotFoundError when the path
    or a shard of an incomplete set is missing, ValueError when the shard set is inconsistent.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist")
    if path.is_file():
        if path.suffix != ".parquet":
            raise ValueError(f"data file {path} is not a .parquet file")
        return [path]

    pattern = re.compile(rf"{re.escape(split)}-(\d{{5}})-of-(\d{{5}})\.parquet")
    shards: dict[int, tuple[int, Path]] = {}
    for candidate in sorted(path.glob("*.parquet")):
        match = pattern.fullmatch(candidate.name)
        if match:
            shards[int(match.group(1))] = (int(match.group(2)), candidate)
    if not shards:
        present = sorted(p.name for p in path.glob("*.parquet"))
        found = (
            f"the parquet files there are: {_listing(present)}"
            if present
            else "the directory holds no parquet files"
        )
        raise FileNotFoundError(
            f"no shards for split {split!r} in {path} "
            f"(expected names like {_shard_name(split, 0, 1)}); {found}"
        )

    counts = sorted({count for count, _ in shards.values()})
    if len(counts) > 1:
        by_count = "; ".join(
            f"-of-{c:05d}: {_listing([p.name for n, p in shards.values() if n == c])}"
            for c in counts
        )
        raise ValueError(f"shards of split {split!r} in {path} disagree on the count: {by_count}")
    count = counts[0]
    beyond = sorted(p.name for index, (_, p) in shards.items() if index >= count)
    if beyond:
        raise ValueError(f"shard index out of range for a set of {count} in {path}: {beyond}")
    missing = [_shard_name(split, i, count) for i in range(count) if i not in shards]
    if missing:
        raise FileNotFoundError(
            f"incomplete shard set for split {split!r} in {path}: "
            f"{len(missing)} of {count} missing: {_listing(missing)}"
        )
    return [shards[i][1] for i in range(count)]


@dataclass
class PromptSet:
    """Prompts of several tasks, one entry per row.

    ``task_codes[i]`` indexes ``task_names`` (sorted) and ``task_types`` (aligned with it).
    ``extras`` holds the modality columns, one list per column, aligned with the rows.
    ``media`` (when media columns were read) is an Arrow table aligned with the rows: a list
    column per media kind (``image``, ``video``, ``audio``; binary items or path strings) and
    ``source_file`` / ``source_row`` (where the row came from, for error messages);
    ``media_root`` is the directory path references are relative to.
    """

    prompts: list[str]
    answers: list[str]
    task_codes: np.ndarray
    task_names: tuple[str, ...]
    task_types: tuple[str, ...]
    datasets: list[str]
    extras: dict[str, list] = field(default_factory=dict)
    media: pa.Table | None = None
    media_root: Path | None = None

    def __post_init__(self) -> None:
        self.task_codes = np.asarray(self.task_codes, dtype=np.int32)
        self.task_names = tuple(self.task_names)
        self.task_types = tuple(self.task_types)
        n = len(self.prompts)
        lengths = {"answers": len(self.answers), "task_codes": self.task_codes.size,
                   "datasets": len(self.datasets)}
        lengths.update({f"extras[{k!r}]": len(v) for k, v in self.extras.items()})
        if self.media is not None:
            lengths["media"] = self.media.num_rows
        for name, length in lengths.items():
            if length != n:
                raise ValueError(f"{name} has {length} entries but there are {n} prompts")
        if len(self.task_types) != len(self.task_names):
            raise ValueError(
                f"{len(self.task_types)} task_types for {len(self.task_names)} task_names"
            )
        if n and not 0 <= self.task_codes.min() <= self.task_codes.max() < len(self.task_names):
            raise ValueError(f"task_codes must lie in 0..{len(self.task_names) - 1}")

    def __len__(self) -> int:
        return len(self.prompts)

    def indices_of_task(self, code: int) -> np.ndarray:
        """Row indices (ascending) of the task with this code."""
        if not 0 <= code < len(self.task_names):
            raise ValueError(f"task code {code} out of range 0..{len(self.task_names) - 1}")
        return np.flatnonzero(self.task_codes == code)

    def select(self, indices) -> PromptSet:
        """The rows at ``indices`` (in that order). Task names, types and codes are unchanged."""
        rows = np.asarray(indices)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64, copy=False).reshape(-1)
        return PromptSet(
            prompts=[self.prompts[i] for i in rows],
            answers=[self.answers[i] for i in rows],
            task_codes=self.task_codes[rows],
            task_names=self.task_names,
            task_types=self.task_types,
            datasets=[self.datasets[i] for i in rows],
            extras={k: [v[i] for i in rows] for k, v in self.extras.items()},
            media=None if self.media is None else self.media.take(pa.array(rows)),
            media_root=self.media_root,
        )

    def media_kinds(self) -> tuple[str, ...]:
        """The media kinds this set has columns for."""
        if self.media is None:
            return ()
        return tuple(k for k in MEDIA_KINDS if k in self.media.column_names)

    def media_items(self, row: int) -> dict[str, list]:
        """The media of one row: kind -> list of bytes or reference strings (only this row
        is converted to Python objects)."""
        if self.media is None:
            return {}
        return {k: self.media.column(k)[row].as_py() or [] for k in self.media_kinds()}

    def where(self, row: int) -> str:
        """``file, row N`` of a row when known (media sets), else ``row N``."""
        if self.media is None:
            return f"row {row}"
        return (f"{self.media.column('source_file')[row].as_py()}, "
                f"row {self.media.column('source_row')[row].as_py()}")

    def modalities(self) -> list[str]:
        """Each row's modality signature, e.g. ``text_image`` or ``text_video_audio``: the
        ``modality_signature`` extra where given, else from which media lists are non-empty."""
        n = len(self)
        derived = ["text"] * n
        if self.media is not None:
            counts = {k: pc.fill_null(pc.list_value_length(self.media.column(k)), 0).to_numpy()
                      for k in self.media_kinds()}
            parts = np.full(n, "text", dtype=object)
            for kind in ("image", "video", "audio"):
                if kind in counts:
                    parts = np.where(counts[kind] > 0, parts + "_" + kind, parts)
            derived = parts.tolist()
        given = self.extras.get("modality_signature")
        if given is None:
            return derived
        return [g if g else d for g, d in zip(given, derived)]

    def modality_counts(self) -> dict[str, dict[str, int]]:
        """Rows per task and modality signature (tasks with no rows are left out)."""
        counts: dict[str, dict[str, int]] = {}
        for code, modality in zip(self.task_codes.tolist(), self.modalities()):
            per_task = counts.setdefault(self.task_names[code], {})
            per_task[modality] = per_task.get(modality, 0) + 1
        return {t: dict(sorted(m.items())) for t, m in sorted(counts.items())}

    def task_counts(self) -> dict[str, int]:
        """Number of rows of each task (every task name, zero included)."""
        counts = np.bincount(self.task_codes, minlength=len(self.task_names))
        return {name: int(c) for name, c in zip(self.task_names, counts)}


def _string_values(table: pa.Table, name: str, file: Path) -> pa.ChunkedArray:
    column = table.column(name)
    value_type = column.type
    if pa.types.is_dictionary(value_type):
        value_type = value_type.value_type
    is_text = pa.types.is_string(value_type) or pa.types.is_large_string(value_type)
    if not (is_text or pa.types.is_null(value_type)):  # an all-null column has type null
        raise ValueError(f"{file}: column {name!r} has type {column.type}, expected strings")
    return pc.cast(column, pa.string())


def _check_filled(values: pa.ChunkedArray, name: str, file: Path) -> None:
    blank = pc.or_kleene(pc.is_null(values), pc.equal(pc.utf8_trim_whitespace(values), ""))
    bad = np.flatnonzero(blank.to_numpy())
    if bad.size:
        rows = ", ".join(str(r) for r in bad[:_MAX_LISTED])
        more = f" and {bad.size - _MAX_LISTED} more" if bad.size > _MAX_LISTED else ""
        raise ValueError(f"{file}: column {name!r} is null or empty at row {rows}{more}")


@dataclass
class _Rows:
    """Columns read from the shards, concatenated, with each row's file and row-in-file."""

    prompts: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    task_types: list[str] = field(default_factory=list)
    extras: dict[str, list] = field(default_factory=dict)
    sources: list[tuple[Path, int]] = field(default_factory=list)
    media: list[pa.Table] = field(default_factory=list)

    def where(self, i: int) -> str:
        file, row = self.sources[i]
        return f"{file}, row {row}"


def _read_file(
    file: Path,
    columns: DataColumns,
    default_task_type: str | Mapping[str, str] | None,
    rows: _Rows,
) -> None:
    try:
        available = pq.ParquetFile(file).schema_arrow.names
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{file}: not a readable parquet file ({exc}); the file is truncated "
                         f"or corrupt: copy or regenerate it") from None
    required = [columns.prompt, columns.answer, columns.task]
    if default_task_type is None:
        required.append(columns.task_type)
    missing = [c for c in required if c not in available]
    if missing:
        hint = " (or pass default_task_type=)" if missing == [columns.task_type] else ""
        raise ValueError(
            f"{file}: missing required column(s) {missing}{hint}; available columns: {available}"
        )
    media_columns = columns.media_columns()
    optional = [columns.dataset, columns.task_type, *columns.modality, *media_columns.values()]
    wanted = list(dict.fromkeys(required + [c for c in optional if c in available]))
    try:
        table = pq.read_table(file, columns=wanted)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{file}: not a readable parquet file ({exc}); the file is truncated "
                         f"or corrupt: copy or regenerate it") from None

    text = {c: _string_values(table, c, file) for c in (columns.prompt, columns.answer,
                                                        columns.task)}
    for name, values in text.items():
        _check_filled(values, name, file)
    tasks = text[columns.task].to_pylist()
    n = len(tasks)

    if columns.dataset in available:
        given = _string_values(table, columns.dataset, file).to_pylist()
        datasets = [d if d else t for d, t in zip(given, tasks)]
    else:
        datasets = list(tasks)

    if columns.task_type in available:
        types = _string_values(table, columns.task_type, file)
        _check_filled(types, columns.task_type, file)
        task_types = types.to_pylist()
    elif isinstance(default_task_type, str):
        task_types = [default_task_type] * n
    else:
        unmapped = sorted(set(tasks) - set(default_task_type))
        if unmapped:
            raise ValueError(
                f"{file}: no {columns.task_type!r} column and default_task_type has no entry "
                f"for task(s) {unmapped}"
            )
        task_types = [default_task_type[t] for t in tasks]

    start = len(rows.prompts)
    for name in columns.modality:
        carried = rows.extras.setdefault(name, [None] * start)
        carried.extend(table.column(name).to_pylist() if name in available else [None] * n)
    rows.prompts.extend(text[columns.prompt].to_pylist())
    rows.answers.extend(text[columns.answer].to_pylist())
    rows.tasks.extend(tasks)
    rows.datasets.extend(datasets)
    rows.task_types.extend(task_types)
    rows.sources.extend((file, r) for r in range(n))
    if media_columns:
        rows.media.append(_media_table(table, media_columns, file, n))


def _media_table(table: pa.Table, media_columns: dict[str, str], file: Path, n: int) -> pa.Table:
    """The media columns of one file as ``list<binary>`` (bytes) or ``list<string>``
    (references) columns named by kind, plus where each row came from."""
    out = {}
    for kind, name in media_columns.items():
        if name not in table.column_names:
            out[kind] = pa.nulls(n, pa.list_(pa.binary()))
            continue
        column = table.column(name)
        value_type = column.type
        if pa.types.is_null(value_type):
            out[kind] = pa.nulls(n, pa.list_(pa.binary()))
            continue
        if not (pa.types.is_list(value_type) or pa.types.is_large_list(value_type)):
            raise ValueError(f"{file}: media column {name!r} has type {value_type}, expected a "
                             "list of bytes (raw media) or of strings (paths)")
        item = value_type.value_type
        if pa.types.is_binary(item) or pa.types.is_large_binary(item):
            target = pa.list_(pa.binary())
        elif pa.types.is_string(item) or pa.types.is_large_string(item):
            target = pa.list_(pa.string())
        elif pa.types.is_null(item):
            target = pa.list_(pa.binary())
        else:
            raise ValueError(f"{file}: media column {name!r} holds {item} items, expected bytes "
                             "(raw media) or strings (paths relative to the data directory)")
        out[kind] = pc.cast(column, target).combine_chunks()
    out["source_file"] = pa.array([file.name] * n, pa.string()).dictionary_encode()
    out["source_row"] = pa.array(np.arange(n, dtype=np.int64))
    return pa.table(out)


def _concat_media(tables: list[pa.Table], path: Path) -> pa.Table:
    """One table from the files' media tables; a kind's items are bytes or references in
    every file that has any (files with none take the others' type)."""
    for kind in MEDIA_KINDS:
        if kind not in tables[0].column_names:
            continue
        used = {str(t.schema.field(kind).type) for t in tables
                if pc.sum(pc.list_value_length(t.column(kind))).as_py()}
        if len(used) > 1:
            raise ValueError(f"media column for {kind}s in {path} holds raw bytes in some files "
                             "and path references in others; use one kind throughout")
        target = pa.list_(pa.string()) if used == {"list<item: string>"} else pa.list_(
            pa.binary())
        tables = [t.set_column(t.schema.get_field_index(kind), kind,
                               pc.cast(t.column(kind), target)) for t in tables]
    return pa.concat_tables(tables)


def load_prompts(
    path: str | Path,
    split: str = "train",
    columns: DataColumns = DataColumns(),  # noqa: B008 - frozen dataclass, safe as a default
    tasks: Sequence[str] | None = None,
    task_types_allowed: Sequence[str] | None = TASK_TYPES,
    *,
    default_task_type: str | Mapping[str, str] | None = None,
) -> PromptSet:
    """Read and validate the prompts of ``split`` under ``path`` (see :func:`find_shards`).

    Only the needed columns are read. Every row needs a non-empty prompt, answer and task; a
    missing or empty ``dataset`` becomes the task name. Without a ``task_type`` column, a file
    takes ``default_task_type`` (one type for all rows, or a task -> type mapping) and is an error
    when that is None. ``tasks`` keeps only the named tasks; the task-type checks (all rows of a
    task share one type, and it is in ``task_types_allowed`` unless that is None) apply to the
    rows kept. Errors raise ValueError naming the file and row where known.
    """
    if isinstance(tasks, str):
        raise TypeError(f"tasks must be a sequence of task names, not the string {tasks!r}")
    rows = _Rows()
    for file in find_shards(path, split):
        _read_file(file, columns, default_task_type, rows)

    available = sorted(set(rows.tasks))
    keep = range(len(rows.tasks))
    if tasks is not None:
        unknown = sorted(set(tasks) - set(available))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown} in {path}; available tasks: {available}")
        wanted = set(tasks)
        keep = [i for i in keep if rows.tasks[i] in wanted]
    if not keep:
        raise ValueError(f"no prompts to load from {path} (split {split!r}, tasks {tasks})")

    type_of: dict[str, tuple[str, int]] = {}  # task -> (its type, first row that set it)
    for i in keep:
        task, task_type = rows.tasks[i], rows.task_types[i]
        if task_types_allowed is not None and task_type not in task_types_allowed:
            raise ValueError(
                f"{rows.where(i)}: task_type {task_type!r} of task {task!r} is not allowed; "
                f"allowed: {list(task_types_allowed)}"
            )
        first = type_of.setdefault(task, (task_type, i))
        if first[0] != task_type:
            raise ValueError(
                f"task {task!r} has rows of task_type {first[0]!r} ({rows.where(first[1])}) "
                f"and {task_type!r} ({rows.where(i)}); a task must have one type"
            )

    names = tuple(sorted(type_of))
    code_of = {name: code for code, name in enumerate(names)}
    media = None
    if rows.media:
        media = _concat_media(rows.media, Path(path)).take(pa.array(np.asarray(keep, np.int64)))
    return PromptSet(
        prompts=[rows.prompts[i] for i in keep],
        answers=[rows.answers[i] for i in keep],
        task_codes=np.array([code_of[rows.tasks[i]] for i in keep], dtype=np.int32),
        task_names=names,
        task_types=tuple(type_of[name][0] for name in names),
        datasets=[rows.datasets[i] for i in keep],
        extras={k: [v[i] for i in keep] for k, v in rows.extras.items()},
        media=media,
        media_root=None if media is None else (Path(path) if Path(path).is_dir()
                                               else Path(path).parent),
    )


class TaskStratifiedSampler:
    """Task-balanced batches of row indices, deterministic and resumable.

    A batch of ``n`` prompts gives each task with rows ``n // M`` of them (``M`` such tasks); the
    ``n % M`` left over go to the next tasks in a rotation that carries on across batches, so
    cumulative per-task counts never differ by more than one. Each task walks a random
    permutation of its rows seeded by ``(seed, task code, epoch)`` and reshuffles when it runs
    out, so no row repeats within a task's epoch (a task asked for more than its size in one
    batch starts its next epoch inside that batch). Indices come out grouped by task.

    ``mix="proportional"`` gives each task its share of the data instead: a task with 5 % of
    the rows gets 5 % of the prompts, so a task that is rare in the data is rare in the
    batches too. The prompts are dealt one at a time by smooth weighted round-robin (every
    task earns its data share of credit per prompt; the task with the most credit gets the
    prompt and pays 1), so a task's cumulative count never strays a whole prompt from its
    share, and it resumes exactly from the saved credits.
    """

    MIXES = ("balanced", "proportional")

    def __init__(self, prompt_set: PromptSet, seed: int, *, mix: str = "balanced"):
        seed = operator.index(seed)
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if mix not in self.MIXES:
            raise ValueError(f"mix must be one of {self.MIXES}, got {mix!r}")
        self._mix = mix
        self._seed = seed
        self._task_names = prompt_set.task_names
        self._rows = [prompt_set.indices_of_task(c) for c in range(len(self._task_names))]
        self._active = [c for c, rows in enumerate(self._rows) if rows.size]
        if not self._active:
            raise ValueError("cannot sample from an empty prompt set")
        self._epochs = [0] * len(self._rows)
        self._cursors = [0] * len(self._rows)
        self._offset = 0  # position in self._active of the next task to get a leftover prompt
        self._orders = [self._permutation(c) for c in range(len(self._rows))]
        sizes = np.array([rows.size for rows in self._rows], dtype=np.float64)
        self._weights = sizes / sizes.sum()  # proportional: each task's share of the data
        self._credit = np.zeros(len(self._rows))  # proportional: what each task is owed

    def _permutation(self, code: int) -> np.ndarray:
        rng = np.random.default_rng([self._seed, code, self._epochs[code]])
        return self._rows[code][rng.permutation(self._rows[code].size)]

    def _take(self, code: int, k: int) -> np.ndarray:
        taken = []
        while k:
            if self._cursors[code] == self._rows[code].size:
                self._epochs[code] += 1
                self._cursors[code] = 0
                self._orders[code] = self._permutation(code)
            start = self._cursors[code]
            chunk = self._orders[code][start:start + k]
            self._cursors[code] += chunk.size
            taken.append(chunk)
            k -= chunk.size
        return np.concatenate(taken) if taken else np.empty(0, dtype=np.int64)

    def next_batch(self, n_prompts: int) -> np.ndarray:
        """Row indices of the next ``n_prompts`` prompts, grouped by task."""
        n_prompts = operator.index(n_prompts)
        if n_prompts <= 0:
            raise ValueError(f"n_prompts must be positive, got {n_prompts}")
        if self._mix == "proportional":
            counts = self._deal(n_prompts)
        else:
            m = len(self._active)
            share, leftover = divmod(n_prompts, m)
            extra = {self._active[(self._offset + j) % m] for j in range(leftover)}
            self._offset = (self._offset + leftover) % m
            counts = {c: share + (c in extra) for c in self._active}
        parts = [self._take(c, counts[c]) for c in self._active]
        return np.concatenate(parts).astype(np.int64, copy=False)

    def _deal(self, n_prompts: int) -> dict[int, int]:
        """Proportional mix: how many of ``n_prompts`` each task gets (smooth weighted
        round-robin over the prompts; ties go to the lower task code)."""
        counts = dict.fromkeys(self._active, 0)
        for _ in range(n_prompts):  # per prompt, not per rollout: a few hundred at most
            self._credit += self._weights
            code = int(np.argmax(self._credit))
            self._credit[code] -= 1.0
            counts[code] += 1
        return counts

    def _fingerprint(self) -> dict:
        return {"task_names": list(self._task_names),
                "rows_per_task": [int(r.size) for r in self._rows]}

    def state_dict(self) -> dict:
        """Plain JSON-serialisable state: seed, rotation, per-task epoch and cursor, data shape
        (and, for the proportional mix, the mix and each task's credit)."""
        state = {
            "version": _STATE_VERSION,
            "seed": self._seed,
            "rotation_offset": self._offset,
            "epochs": list(self._epochs),
            "cursors": list(self._cursors),
            "fingerprint": self._fingerprint(),
        }
        if self._mix == "proportional":
            state |= {"mix": self._mix, "credit": self._credit.tolist()}
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Resume from :meth:`state_dict` output (its seed replaces this sampler's seed)."""
        mix = state.get("mix", "balanced")
        if mix != self._mix:
            raise ValueError(f"sampler state was saved with the {mix} task mix, this sampler "
                             f"has the {self._mix} one (data.task_mix)")
        missing = sorted(set(self.state_dict()) - set(state))
        if missing:
            raise ValueError(f"sampler state lacks {missing}")
        if state["version"] != _STATE_VERSION:
            raise ValueError(
                f"sampler state version {state['version']!r} is not {_STATE_VERSION}"
            )
        saved, current = state["fingerprint"], self._fingerprint()
        if saved != current:
            raise ValueError(
                "sampler state was saved for a different prompt set: "
                f"saved tasks {dict(zip(saved['task_names'], saved['rows_per_task']))}, "
                f"current tasks {dict(zip(current['task_names'], current['rows_per_task']))} "
                "(task name -> rows)"
            )
        epochs, cursors = [int(e) for e in state["epochs"]], [int(c) for c in state["cursors"]]
        sizes = current["rows_per_task"]
        if len(epochs) != len(sizes) or len(cursors) != len(sizes):
            raise ValueError(f"sampler state needs {len(sizes)} epochs and cursors")
        if any(e < 0 for e in epochs) or any(not 0 <= c <= s for c, s in zip(cursors, sizes)):
            raise ValueError(f"sampler state has invalid epochs {epochs} or cursors {cursors}")
        offset = int(state["rotation_offset"])
        if not 0 <= offset < len(self._active):
            raise ValueError(f"rotation_offset {offset} out of range 0..{len(self._active) - 1}")
        seed = int(state["seed"])
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if self._mix == "proportional":
            credit = np.asarray(state["credit"], dtype=np.float64)
            if credit.shape != self._credit.shape or not np.isfinite(credit).all():
                raise ValueError(f"sampler state needs {self._credit.size} finite credits, "
                                 f"got {state['credit']!r}")
            self._credit = credit
        self._seed, self._offset = seed, offset
        self._epochs, self._cursors = epochs, cursors
        self._orders = [self._permutation(c) for c in range(len(self._rows))]
