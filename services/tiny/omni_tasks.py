"""Synthetic omni-modal task suite in the Human Behavior Atlas layout (parquet + raw media).

Each media task's answer can only be read from its media: the prompt text is the same for every
row of the task. Tasks differ in modality, label count, difficulty and reward type:

- ``image_colour`` (image, 4-way, easy): a square of one colour on grey; which colour?
- ``image_shape`` (image, 3-way, hard): a small white square, disc or triangle; which shape?
- ``audio_pitch`` (audio, 3-way): a pure tone, low / mid / high, recorded at one of several
  sample rates (8, 16 or 22.05 kHz) so decoding must resample;
- ``video_motion`` (video, 4-way): a square moving left, right, up or down over 8 frames;
- ``sentiment`` and ``parity`` (text, classification) and ``weather_qa`` (text, QA) from the
  text suite.

Rows follow the HBA columns (``problem, answer, task, dataset, class_label, images, videos,
audios, modality_signature``) plus ``task_type`` (HBA has none; harpo reads it when present).
Media are raw bytes: PNG images, FLAC audio, MPEG-4 Part 2 video in MP4. Generation is
deterministic given the seed; :func:`omni_suite_fingerprint` hashes the generated pixels and
samples (not the encoded bytes, which carry encoder version tags).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .tasks import SUITE as TEXT_SUITE

HBA_COLUMNS = ("problem", "answer", "task", "dataset", "class_label", "images", "videos",
               "audios", "modality_signature", "task_type")
SPLITS = ("train", "test")
IMAGE_SIZE = 56  # 2x2 merged vision tokens of 28 px
VIDEO_SIZE, VIDEO_FRAMES, VIDEO_FPS = 28, 8, 4
TONE_SECONDS = 0.5
SAMPLE_RATES = (8_000, 16_000, 22_050)

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220),
           "yellow": (230, 210, 30)}
SHAPES = ("square", "disc", "triangle")
PITCHES = {"low": 220.0, "mid": 660.0, "high": 1760.0}
DIRECTIONS = ("left", "right", "up", "down")


@dataclass
class OmniExample:
    """One row before encoding: media as arrays (images HxWx3 uint8, audio (rate, float32
    samples), video TxHxWx3 uint8)."""

    prompt: str
    answer: str
    images: list[np.ndarray] = field(default_factory=list)
    audios: list[tuple[int, np.ndarray]] = field(default_factory=list)
    videos: list[np.ndarray] = field(default_factory=list)


@dataclass(frozen=True)
class OmniTaskSpec:
    name: str
    task_type: str
    dataset: str
    generate: Callable[[np.random.Generator], OmniExample] = field(repr=False)
    labels: tuple[str, ...] | None
    difficulty: str
    modality: str  # modality signature of every row


def _image_colour(rng: np.random.Generator) -> OmniExample:
    label = str(rng.choice(list(COLOURS)))
    img = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 128, np.uint8)
    side = int(rng.integers(20, 36))
    y, x = (int(v) for v in rng.integers(0, IMAGE_SIZE - side, size=2))
    img[y:y + side, x:x + side] = COLOURS[label]
    return OmniExample("What colour is the square in the image? Options: "
                       + ", ".join(COLOURS) + ".", label, images=[img])


def _shape_mask(shape: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    c = (size - 1) / 2
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "disc":
        return (yy - c) ** 2 + (xx - c) ** 2 <= (size / 2) ** 2
    return np.abs(xx - c) <= yy / 2  # triangle, apex up


def _image_shape(rng: np.random.Generator) -> OmniExample:
    label = str(rng.choice(SHAPES))
    img = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    size = int(rng.integers(18, 30))
    y, x = (int(v) for v in rng.integers(0, IMAGE_SIZE - size, size=2))
    img[y:y + size, x:x + size][_shape_mask(label, size)] = 255
    return OmniExample("Which shape is in the image? Options: " + ", ".join(SHAPES) + ".",
                       label, images=[img])


def _audio_pitch(rng: np.random.Generator) -> OmniExample:
    label = str(rng.choice(list(PITCHES)))
    rate = int(rng.choice(SAMPLE_RATES))
    t = np.arange(int(rate * TONE_SECONDS)) / rate
    freq = PITCHES[label] * float(rng.uniform(0.95, 1.05))
    wave = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return OmniExample("Is the tone in the audio low, mid or high?", label, audios=[(rate, wave)])


def _video_motion(rng: np.random.Generator) -> OmniExample:
    label = str(rng.choice(DIRECTIONS))
    frames = np.zeros((VIDEO_FRAMES, VIDEO_SIZE, VIDEO_SIZE, 3), np.uint8)
    side, speed = 6, 2
    travel = speed * (VIDEO_FRAMES - 1)
    fixed = int(rng.integers(0, VIDEO_SIZE - side))
    start = int(rng.integers(0, VIDEO_SIZE - side - travel))
    for k in range(VIDEO_FRAMES):
        pos = start + speed * k if label in ("right", "down") else start + travel - speed * k
        y, x = (fixed, pos) if label in ("left", "right") else (pos, fixed)
        frames[k, y:y + side, x:x + side] = 255
    return OmniExample("Which way does the square in the video move? Options: "
                       + ", ".join(DIRECTIONS) + ".", label, videos=[frames])


def _text(name: str) -> Callable[[np.random.Generator], OmniExample]:
    generate = TEXT_SUITE[name].generate

    def draw(rng: np.random.Generator) -> OmniExample:
        return OmniExample(*generate(rng))
    return draw


_TASKS = (
    OmniTaskSpec("image_colour", "classification", "synth_pictures", _image_colour,
                 tuple(COLOURS), "easy", "text_image"),
    OmniTaskSpec("image_shape", "classification", "synth_pictures", _image_shape, SHAPES,
                 "hard", "text_image"),
    OmniTaskSpec("audio_pitch", "classification", "synth_tones", _audio_pitch,
                 tuple(PITCHES), "easy", "text_audio"),
    OmniTaskSpec("video_motion", "classification", "synth_clips", _video_motion, DIRECTIONS,
                 "hard", "text_video"),
    *(OmniTaskSpec(t.name, t.task_type, t.dataset, _text(t.name), t.labels, t.difficulty, "text")
      for t in (TEXT_SUITE[n] for n in ("sentiment", "parity", "weather_qa"))),
)
OMNI_SUITE: dict[str, OmniTaskSpec] = {t.name: t for t in _TASKS}


# --- encoding ------------------------------------------------------------------------------


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def encode_flac(rate: int, wave: np.ndarray) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave, rate, format="FLAC")
    return buf.getvalue()


def encode_mp4(frames: np.ndarray, fps: int = VIDEO_FPS, codec: str = "mpeg4") -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        stream.codec_context.options = {"qscale": "2"}  # keep the motion visible in tiny frames
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _row(task: OmniTaskSpec, ex: OmniExample) -> dict:
    return {
        "problem": ex.prompt, "answer": ex.answer, "task": task.name, "dataset": task.dataset,
        "class_label": ex.answer if task.task_type == "classification" else None,
        "images": [encode_png(i) for i in ex.images],
        "videos": [encode_mp4(v) for v in ex.videos],
        "audios": [encode_flac(r, w) for r, w in ex.audios],
        "modality_signature": task.modality, "task_type": task.task_type,
    }


def _resolve(tasks: Iterable[str] | None) -> list[OmniTaskSpec]:
    return list(OMNI_SUITE.values()) if tasks is None else [OMNI_SUITE[t] for t in tasks]


def _task_seed(seed: int, task_index: int, split_index: int) -> int:
    # Independent streams per (task, split), distinct from the text suite's (tag 17).
    return int(np.random.SeedSequence([seed, 17, task_index, split_index]).generate_state(1)[0])


def generate_omni_examples(task: OmniTaskSpec, n: int, seed: int) -> list[OmniExample]:
    rng = np.random.default_rng(seed)
    return [task.generate(rng) for _ in range(n)]


SCHEMA = pa.schema([
    ("problem", pa.string()), ("answer", pa.string()), ("task", pa.string()),
    ("dataset", pa.string()), ("class_label", pa.string()),
    ("images", pa.list_(pa.binary())), ("videos", pa.list_(pa.binary())),
    ("audios", pa.list_(pa.binary())), ("modality_signature", pa.string()),
    ("task_type", pa.string()),
])


def write_omni_suite(out_dir: str | Path, *, n_train_per_task: int = 200,
                     n_test_per_task: int = 50, seed: int = 0,
                     tasks: Iterable[str] | None = None) -> dict[str, list[Path]]:
    """Write shuffled HBA-layout train/test shards plus ``suite.json``; return shard paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = _resolve(tasks)
    counts = {"train": n_train_per_task, "test": n_test_per_task}
    shards: dict[str, list[Path]] = {}
    for split_index, split in enumerate(SPLITS):
        rows = []
        for task_index, task in enumerate(specs):
            examples = generate_omni_examples(task, counts[split],
                                              _task_seed(seed, task_index, split_index))
            rows += [_row(task, ex) for ex in examples]
        order = np.random.default_rng([seed, 17, split_index]).permutation(len(rows))
        table = pa.table({c: [rows[i][c] for i in order] for c in HBA_COLUMNS}, schema=SCHEMA)
        path = out_dir / f"{split}-00000-of-00001.parquet"
        pq.write_table(table, path, row_group_size=256)
        shards[split] = [path]
    manifest = {
        "seed": seed, "format": "hba",
        "fingerprint": omni_suite_fingerprint(seed=seed, tasks=[t.name for t in specs]),
        "splits": {s: [p.name for p in shards[s]] for s in SPLITS},
        "tasks": [{"name": t.name, "task_type": t.task_type, "dataset": t.dataset,
                   "labels": list(t.labels) if t.labels else None, "difficulty": t.difficulty,
                   "modality": t.modality, "n_train": n_train_per_task,
                   "n_test": n_test_per_task} for t in specs],
    }
    (out_dir / "suite.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return shards


def omni_suite_fingerprint(*, seed: int = 0, tasks: Iterable[str] | None = None) -> str:
    """Short hash of the tasks and the first generated examples (text, labels, and the raw
    pixels and samples of their media)."""
    digest = hashlib.sha256()
    for i, task in enumerate(_resolve(tasks)):
        digest.update(json.dumps([task.name, task.task_type, task.dataset,
                                  list(task.labels or ()), task.modality]).encode())
        for ex in generate_omni_examples(task, 8, _task_seed(seed, i, 0)):
            digest.update(json.dumps([ex.prompt, ex.answer]).encode())
            for array in [*ex.images, *ex.videos, *(w for _, w in ex.audios)]:
                digest.update(np.ascontiguousarray(array).tobytes())
            digest.update(json.dumps([r for r, _ in ex.audios]).encode())
    return digest.hexdigest()[:16]
