"""Model inputs of a Qwen2.5-Omni thinker from text and decoded media, without torchvision.

transformers 5.19 builds ``Qwen2_5OmniProcessor`` only with its torchvision video processor, and
PyPI's torchvision is a CUDA build that does not import against the CPU torch (docs/omni.md).
:func:`omni_inputs` does the processor's work from its torchvision-free parts: the Qwen2-VL
image processor (PIL backend) for images, the Whisper feature extractor for audio, and
:func:`video_patches` (numpy, same layout as the Qwen2-VL video processor) for video frames; it
then expands each ``<|IMAGE|>`` / ``<|AUDIO|>`` / ``<|VIDEO|>`` placeholder of the text to the
number of tokens the towers emit, as the processor does (``use_audio_in_video`` off).

On a machine with torchvision, ``AutoProcessor`` gives the real processor; the next step should
prefer it there. Only the video path is harpo's own code, and its layout is tested against the
image processor (a still video equals its frame as an image).
"""

from __future__ import annotations

import numpy as np
import torch

MEDIA_TOKENS = {"image": "<|IMAGE|>", "audio": "<|AUDIO|>", "video": "<|VIDEO|>"}


def _resized_frames(frames: np.ndarray, image_processor) -> np.ndarray:
    """Frames (T, H, W, 3) uint8 -> (T, 3, H', W') float32, resized, rescaled, normalised as
    the image processor does for one image."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    factor = image_processor.patch_size * image_processor.merge_size
    size = image_processor.size
    height, width = smart_resize(frames.shape[1], frames.shape[2], factor=factor,
                                 min_pixels=size["shortest_edge"],
                                 max_pixels=size["longest_edge"])
    out = np.empty((frames.shape[0], 3, height, width), np.float32)
    mean = np.asarray(image_processor.image_mean, np.float32)[:, None, None]
    std = np.asarray(image_processor.image_std, np.float32)[:, None, None]
    for k, frame in enumerate(frames):
        resized = np.asarray(Image.fromarray(frame).resize((width, height),
                                                           Image.Resampling.BICUBIC))
        pixels = resized.astype(np.float32).transpose(2, 0, 1) * image_processor.rescale_factor
        out[k] = (pixels - mean) / std
    return out


def video_patches(frames: np.ndarray, image_processor) -> tuple[np.ndarray, np.ndarray]:
    """Flattened patches ``(t*h*w, 3*tp*p*p)`` and the grid ``[t, h, w]`` of one video."""
    p, m = image_processor.patch_size, image_processor.merge_size
    tp = image_processor.temporal_patch_size
    video = _resized_frames(np.asarray(frames, np.uint8), image_processor)
    if video.shape[0] % tp:  # pad by repeating the last frame, as the video processor does
        pad = tp - video.shape[0] % tp
        video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
    t, c, h, w = video.shape
    gt, gh, gw = t // tp, h // p, w // p
    patches = video.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # gt, gh/m, gw/m, m, m, c, tp, p, p
    return (np.ascontiguousarray(patches.reshape(gt * gh * gw, c * tp * p * p)),
            np.array([gt, gh, gw], np.int64))


QWEN2_VL_MEDIA_TOKENS = {"image": "<|image_pad|>", "video": "<|video_pad|>"}


def media_tensors(image_processor, feature_extractor, *, images=(), audios=(), videos=(),
                  video_fps: float = 2.0) -> tuple[dict, dict[str, list[int]]]:
    """The media tensors of one prompt (what the thinker's forward takes besides the ids) and
    the number of placeholder tokens each item expands to: ``counts[kind][i]``."""
    out: dict = {}
    merge = image_processor.merge_size ** 2 if image_processor is not None else 4
    counts: dict[str, list[int]] = {"image": [], "audio": [], "video": []}
    if len(images):
        pix = image_processor(images=list(images), return_tensors="pt")
        out["pixel_values"], out["image_grid_thw"] = pix["pixel_values"], pix["image_grid_thw"]
        counts["image"] = (pix["image_grid_thw"].prod(-1) // merge).tolist()
    if len(audios):
        feats = feature_extractor(list(audios), sampling_rate=feature_extractor.sampling_rate,
                                  padding="max_length", return_attention_mask=True,
                                  return_tensors="pt")
        out["input_features"] = feats["input_features"]
        out["feature_attention_mask"] = feats["attention_mask"]
        lengths = (feats["attention_mask"].sum(-1) - 1) // 2 + 1
        counts["audio"] = ((lengths - 2) // 2 + 1).tolist()
    if len(videos):
        parts = [video_patches(v, image_processor) for v in videos]
        out["pixel_values_videos"] = torch.from_numpy(np.concatenate([p for p, _ in parts]))
        out["video_grid_thw"] = torch.from_numpy(np.stack([g for _, g in parts]))
        out["video_second_per_grid"] = torch.full(
            (len(parts),), image_processor.temporal_patch_size / video_fps)
        counts["video"] = [int(g.prod()) // merge for _, g in parts]
    return out, counts


def omni_inputs(tokenizer, image_processor, feature_extractor, text: str, *,
                images=(), audios=(), videos=(), video_fps: float = 2.0,
                tokens: dict[str, str] = MEDIA_TOKENS, mm_token_type_ids: bool = False) -> dict:
    """Batch-of-one model inputs (``input_ids``, ``attention_mask`` and the media tensors the
    thinker's forward takes) for ``text`` holding one placeholder per media item, in order.
    ``tokens`` names the placeholders (Qwen2-VL: :data:`QWEN2_VL_MEDIA_TOKENS`, no audio;
    its forward takes no ``video_second_per_grid``: drop it, and it needs
    ``mm_token_type_ids=True``: 1 image, 2 video, 3 audio, 0 text per token, for its M-RoPE)."""
    out, counts = media_tensors(image_processor, feature_extractor, images=images,
                                audios=audios, videos=videos, video_fps=video_fps)
    for kind, token in tokens.items():
        found = text.count(token)
        if found != len(counts[kind]):
            raise ValueError(f"text has {found} {token} placeholder(s) for "
                             f"{len(counts[kind])} {kind} item(s)")
        pieces = text.split(token)
        text = pieces[0] + "".join(token * n + rest for n, rest in zip(counts[kind], pieces[1:]))
    for kind in set(counts) - set(tokens):
        if counts[kind]:
            raise ValueError(f"{kind} items given but the model has no {kind} placeholder")
    enc = tokenizer(text, return_tensors="pt")
    out["input_ids"], out["attention_mask"] = enc["input_ids"], enc["attention_mask"]
    if mm_token_type_ids:
        types = torch.zeros_like(out["input_ids"])
        for code, kind in enumerate(("image", "video", "audio"), start=1):
            if kind in tokens:
                types[out["input_ids"] == tokenizer.convert_tokens_to_ids(tokens[kind])] = code
        out["mm_token_type_ids"] = types
    return out
