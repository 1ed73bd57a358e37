"""Decoding of prompt media: images (Pillow), audio (soundfile + soxr), video frames (PyAV).

Every decoder takes the raw bytes of one media item and :class:`MediaLimits`, and returns a
numpy array bounded by those limits, or raises :class:`MediaError` saying what is wrong with the
bytes (the caller adds the row and task, see :mod:`harpo_core.media_check`).

- Images are converted to RGB and shrunk (aspect kept) to at most ``max_image_pixels``.
- Audio is mixed to mono and resampled to ``sample_rate`` with soxr (libsoxr's high-quality
  polyphase resampler: the one librosa and torchaudio-free pipelines use by default, a small
  wheel with no numba/scipy stack). A clip longer than ``max_audio_seconds`` or recorded below
  ``min_sample_rate`` (upsampling cannot restore what the recording lacks) is refused. soundfile
  (libsndfile) reads WAV, FLAC, OGG/Vorbis/Opus and MP3; other codecs (AAC in MP4, ...) are
  refused with that list.
- Video: the first video stream is decoded with PyAV (FFmpeg) and frames are taken at
  ``video_fps``, at most ``max_video_frames``, each shrunk to ``max_image_pixels``. A clip
  longer than ``max_video_seconds`` is refused before any frame is decoded.

:class:`MediaCache` keeps decoded items in an LRU keyed by a hash of the bytes, so a video
shared by a group (or a step) is decoded once.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

KINDS = ("image", "audio", "video")
AUDIO_FORMATS = "WAV, FLAC, OGG (Vorbis/Opus), MP3"


class MediaError(ValueError):
    """A media item that cannot be used: corrupt, unsupported or over a limit."""


@dataclass(frozen=True)
class MediaLimits:
    """Bounds on decoded media (``data.*`` in the run config)."""

    max_image_pixels: int = 64 * 28 * 28
    sample_rate: int = 16_000  # the audio feature extractor's rate: audio is resampled to it
    min_sample_rate: int = 8_000
    max_audio_seconds: float = 30.0
    max_video_seconds: float = 60.0
    max_video_frames: int = 16
    video_fps: float = 2.0

    def __post_init__(self) -> None:
        for name in ("max_image_pixels", "sample_rate", "min_sample_rate", "max_video_frames"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_audio_seconds", "max_video_seconds", "video_fps"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def _bounded_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, int(width * scale)), max(1, int(height * scale))


def decode_image(data: bytes, limits: MediaLimits = MediaLimits()) -> np.ndarray:  # noqa: B008
    """RGB ``uint8`` array ``(H, W, 3)``, at most ``max_image_pixels`` pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            rgb = image.convert("RGB")
    except UnidentifiedImageError:
        raise MediaError(f"corrupt or unreadable image ({len(data)} bytes): not a format "
                         "Pillow recognises") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise MediaError(f"corrupt or unreadable image ({len(data)} bytes): {exc}") from None
    except Image.DecompressionBombError as exc:
        raise MediaError(f"image too large to decode safely: {exc}") from None
    size = _bounded_size(rgb.width, rgb.height, limits.max_image_pixels)
    if size != rgb.size:
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)


def decode_audio(data: bytes, limits: MediaLimits = MediaLimits()) -> np.ndarray:  # noqa: B008
    """Mono ``float32`` waveform at ``limits.sample_rate``."""
    import soundfile as sf

    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, frames = f.samplerate, f.frames
            if rate < limits.min_sample_rate:
                raise MediaError(f"audio sample rate {rate} Hz is below the minimum "
                                 f"{limits.min_sample_rate} Hz (data.min_audio_sample_rate): "
                                 f"the processor takes {limits.sample_rate} Hz and upsampling "
                                 "cannot restore the missing band")
            seconds = frames / rate
            if seconds > limits.max_audio_seconds:
                raise MediaError(f"audio clip of {seconds:.2f} s exceeds "
                                 f"data.max_audio_seconds={limits.max_audio_seconds}")
            wave = f.read(dtype="float32", always_2d=True)
    except sf.LibsndfileError as exc:
        raise MediaError(f"corrupt audio or unsupported audio codec ({len(data)} bytes; "
                         f"soundfile reads {AUDIO_FORMATS}): "
                         f"{getattr(exc, 'error_string', exc)}") from None
    mono = wave.mean(axis=1)
    if rate != limits.sample_rate:
        import soxr

        mono = soxr.resample(mono, rate, limits.sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def decode_video(data: bytes, limits: MediaLimits = MediaLimits()) -> np.ndarray:  # noqa: B008
    """Frames ``uint8 (T, H, W, 3)`` sampled at ``video_fps`` (1 <= T <= ``max_video_frames``)."""
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise MediaError(f"corrupt or unreadable video ({len(data)} bytes): {exc}") from None
    with container:
        if not container.streams.video:
            raise MediaError("video has no video stream (streams: "
                             f"{[s.type for s in container.streams]})")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise MediaError("unsupported or unreadable video codec "
                             "(the stream's codec parameters cannot be read; truncated file?)")
        codec = stream.codec_context.name
        if stream.duration is not None and stream.time_base is not None:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            seconds = container.duration / 1e6
        else:
            seconds = None
        if seconds is not None and seconds > limits.max_video_seconds:
            raise MediaError(f"video clip of {seconds:.2f} s exceeds "
                             f"data.max_video_seconds={limits.max_video_seconds}")
        step = 1.0 / limits.video_fps
        frames, next_time = [], 0.0
        try:
            for frame in container.decode(stream):
                time = frame.time if frame.time is not None else next_time
                if time > limits.max_video_seconds:
                    raise MediaError(f"video runs past data.max_video_seconds="
                                     f"{limits.max_video_seconds} (frame at {time:.2f} s)")
                if time + 1e-6 < next_time:
                    continue
                width, height = _bounded_size(frame.width, frame.height,
                                              limits.max_image_pixels)
                frames.append(frame.to_ndarray(format="rgb24", width=width, height=height))
                next_time += step
                if len(frames) == limits.max_video_frames:
                    break
        except av.FFmpegError as exc:
            raise MediaError(f"corrupt video stream ({codec}): {exc}") from None
    if not frames:
        raise MediaError(f"video stream ({codec}) holds no decodable frame")
    return np.stack(frames)


_DECODERS = {"image": decode_image, "audio": decode_audio, "video": decode_video}


def decode(kind: str, data: bytes, limits: MediaLimits = MediaLimits()) -> np.ndarray:  # noqa: B008
    """Decode one item of ``kind`` (``image``, ``audio`` or ``video``)."""
    if kind not in _DECODERS:
        raise ValueError(f"unknown media kind {kind!r}; expected one of {KINDS}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MediaError(f"{kind} item is {type(data).__name__}, expected bytes")
    return _DECODERS[kind](bytes(data), limits)


def content_key(kind: str, data: bytes) -> str:
    """Cache key of one item: its kind and a 128-bit BLAKE2 hash of its bytes."""
    return f"{kind}:{hashlib.blake2b(data, digest_size=16).hexdigest()}"


class MediaCache:
    """LRU of decoded media keyed by content hash, bounded by the decoded arrays' bytes.

    A hit returns the same (read-only) array without decoding again; errors are cached too,
    so a bad item fails fast every time it is drawn.
    """

    def __init__(self, limits: MediaLimits = MediaLimits(), max_bytes: int = 256 * 2**20):  # noqa: B008
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.limits = limits
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, np.ndarray | MediaError] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, kind: str, data: bytes) -> np.ndarray:
        key = content_key(kind, bytes(data)) if isinstance(data, (bytes, bytearray,
                                                                   memoryview)) else None
        if key is not None and key in self._items:
            self.hits += 1
            self._items.move_to_end(key)
            found = self._items[key]
            if isinstance(found, MediaError):
                raise MediaError(str(found))
            return found
        self.misses += 1
        try:
            value = decode(kind, data, self.limits)
        except MediaError as exc:
            if key is not None:
                self._put(key, exc, 0)
            raise
        value.setflags(write=False)
        self._put(key, value, value.nbytes)
        return value

    def _put(self, key: str, value, size: int) -> None:
        if size > self.max_bytes:
            return  # larger than the whole cache: hand it out, do not keep it
        self._items[key] = value
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= 0 if isinstance(old, MediaError) else old.nbytes
