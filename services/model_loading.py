"""Which model class a model directory needs, and which media it takes: one place for the HF
rollout backend, the learner, its KL reference and checkpoint reload.

``config.json``'s ``architectures`` names the class: the Qwen2.5-Omni thinker and Qwen2-VL /
Qwen2.5-VL load as themselves (``AutoModelForCausalLM`` does not map them to a class that
takes pixels and audio), everything else through ``AutoModelForCausalLM`` as before.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# architecture -> (transformers class name, media kinds its forward takes)
MULTIMODAL = {
    "Qwen2_5OmniThinkerForConditionalGeneration": (
        "Qwen2_5OmniThinkerForConditionalGeneration", ("image", "audio", "video")),
    "Qwen2VLForConditionalGeneration": ("Qwen2VLForConditionalGeneration", ("image", "video")),
    "Qwen2_5_VLForConditionalGeneration": (
        "Qwen2_5_VLForConditionalGeneration", ("image", "video")),
}
# files of the processor, saved next to the tokenizer in every checkpoint and export
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json",
                   "processor_config.json", "chat_template.jinja", "chat_template.json")


def architecture(model_dir: str | Path) -> str | None:
    """The first entry of ``config.json``'s ``architectures`` (None when absent)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    names = config.get("architectures") or [None]
    return names[0]


def media_kinds(model_dir: str | Path) -> tuple[str, ...]:
    """The media kinds the model's forward takes; () for a text-only model."""
    entry = MULTIMODAL.get(architecture(model_dir))
    return entry[1] if entry else ()


def model_class(model_dir: str | Path):
    """The transformers class to load ``model_dir`` with."""
    import transformers

    entry = MULTIMODAL.get(architecture(model_dir))
    return getattr(transformers, entry[0]) if entry else transformers.AutoModelForCausalLM


def load_model(model_dir: str | Path, dtype=torch.float32):
    """The model in ``model_dir`` through its class (:func:`model_class`)."""
    return model_class(model_dir).from_pretrained(str(model_dir), dtype=dtype)


def check_media_supported(model_dir: str | Path, used: dict[str, int]) -> None:
    """Refuse data whose prompts carry media the model cannot take. ``used``: prompts per
    media kind that carry at least one item of it."""
    used = {k: n for k, n in used.items() if n}
    missing = sorted(set(used) - set(media_kinds(model_dir)))
    if missing:
        arch = architecture(model_dir) or "unknown architecture"
        takes = ", ".join(media_kinds(model_dir)) or "text only"
        counts = ", ".join(f"{used[k]} with {k}" for k in missing)
        raise ValueError(
            f"the data has prompts with media ({counts}) but model {str(model_dir)!r} "
            f"({arch}) takes {takes}: use a multimodal model (Qwen2.5-Omni thinker, "
            f"Qwen2-VL, Qwen2.5-VL; `harpo init-tiny --omni DIR` builds a tiny one) or data "
            f"without those media")


def copy_processor_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the processor's files of ``src`` (those present) into ``dst``; returns their
    names. A checkpoint or export of a multimodal model is then loadable on its own."""
    copied = []
    for name in PROCESSOR_FILES:
        path = Path(src) / name
        if path.is_file() and Path(src).resolve() != Path(dst).resolve():
            (Path(dst) / name).write_bytes(path.read_bytes())
            copied.append(name)
    return copied
