"""A tiny random Qwen2.5-Omni thinker (and Qwen2-VL) with the project's byte-level tokenizer.

``harpo init-tiny --omni DIR`` calls :func:`build_tiny_omni`. It writes, with no download:

- ``config.json`` + ``model.safetensors``: a ``Qwen2_5OmniThinkerForConditionalGeneration`` with
  a 2-block vision tower, a 2-layer audio tower and a 2-layer text model (≈ 0.3 M parameters);
- the byte-level BPE tokenizer of :mod:`services.tiny.model`, with the seven multimodal special
  tokens the Omni processor looks up by name (``image_token``, ``audio_bos_token``, ...);
- the processor's parts: ``preprocessor_config.json`` (Qwen2-VL image processor and Whisper
  feature extractor, 16 kHz, 128 mel bins), ``video_preprocessor_config.json`` (Qwen2-VL video
  processor) and ``processor_config.json`` naming ``Qwen2_5OmniProcessor``.

On a machine with torchvision, ``AutoProcessor.from_pretrained(dir)`` returns the
``Qwen2_5OmniProcessor``. On this CPU machine it cannot: PyPI's torchvision is a CUDA build
that does not import against the CPU torch, and transformers 5.19 builds the Omni processor
only with its torchvision video processor. :func:`omni_inputs` in :mod:`services.omni_inputs`
produces the same tensors from the torchvision-free parts (see docs/omni.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    WhisperFeatureExtractor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.utils import logging as hf_logging

from .model import EOS_TOKEN, IM_END, IM_START, train_tokenizer
from .tasks import suite_corpus

# names the Omni processor reads from the tokenizer -> the tokens (as in the released model)
OMNI_TOKENS = {
    "audio_token": "<|AUDIO|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
    "image_token": "<|IMAGE|>",
    "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
}
SAMPLING_RATE = 16_000  # the Whisper feature extractor's (and Qwen2.5-Omni's) audio rate
PATCH, MERGE, TEMPORAL = 14, 2, 2  # vision patch size, spatial merge, temporal patch
# Image processor bounds: 4..64 merged tokens per image (28x28 px each), small for CPU tests.
MIN_PIXELS, MAX_PIXELS = 4 * 28 * 28, 64 * 28 * 28
OMNI_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<|vision_bos|><|IMAGE|><|vision_eos|>' }}"
    "{% elif part['type'] == 'video' %}{{ '<|vision_bos|><|VIDEO|><|vision_eos|>' }}"
    "{% elif part['type'] == 'audio' %}{{ '<|audio_bos|><|AUDIO|><|audio_eos|>' }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def omni_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 512,
                   tokens: dict[str, str] = OMNI_TOKENS, chat_template: str = OMNI_CHAT_TEMPLATE):
    """The byte-level tokenizer of the text model plus multimodal special tokens (the Omni ones
    by default), saved in ``out_dir`` and loaded back (the names become tokenizer attributes,
    as the processors need)."""
    base = train_tokenizer(texts, vocab_size=vocab_size)
    base.save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir, extra_special_tokens=dict(tokens))
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def _thinker_config(tokenizer, *, hidden: int, layers: int) -> Qwen2_5OmniThinkerConfig:
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in OMNI_TOKENS.items()}
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    heads = 4
    head_dim = hidden // heads
    half = head_dim // 2  # M-RoPE splits the rotary half-dimension into t, h, w sections
    section = [half - 2 * (half // 3), half // 3, half // 3]
    return Qwen2_5OmniThinkerConfig(
        audio_config={
            "num_mel_bins": 128, "encoder_layers": 2, "encoder_attention_heads": 2,
            "encoder_ffn_dim": 64, "d_model": 32, "output_dim": hidden,
            "max_source_positions": 1500, "n_window": 100,
        },
        vision_config={
            "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
            "patch_size": PATCH, "spatial_merge_size": MERGE, "temporal_patch_size": TEMPORAL,
            "window_size": 112, "out_hidden_size": hidden, "fullatt_block_indexes": [1],
        },
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0,
                                "mrope_section": section},
            "eos_token_id": eos_id, "pad_token_id": eos_id,
        },
        audio_token_index=ids["audio_token"],
        image_token_index=ids["image_token"],
        video_token_index=ids["video_token"],
        audio_start_token_id=ids["audio_bos_token"],
        audio_end_token_id=ids["audio_eos_token"],
        vision_start_token_id=ids["vision_bos_token"],
        vision_end_token_id=ids["vision_eos_token"],
        user_token_id=tokenizer.convert_tokens_to_ids(IM_START),
        tie_word_embeddings=False,
    )


def _write_processor(out_dir: Path) -> None:
    """The processor's parts and ``processor_config.json``, without torchvision."""
    image = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                                     patch_size=PATCH, merge_size=MERGE,
                                     temporal_patch_size=TEMPORAL)
    audio = WhisperFeatureExtractor(feature_size=128, sampling_rate=SAMPLING_RATE)
    pre = {**audio.to_dict(), **image.to_dict()}
    pre["image_processor_type"] = "Qwen2VLImageProcessor"
    pre["feature_extractor_type"] = "WhisperFeatureExtractor"
    pre["processor_class"] = "Qwen2_5OmniProcessor"
    (out_dir / "preprocessor_config.json").write_text(json.dumps(pre, indent=2, default=str))
    video = {
        "video_processor_type": "Qwen2VLVideoProcessor", "processor_class": "Qwen2_5OmniProcessor",
        "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        "patch_size": PATCH, "merge_size": MERGE, "temporal_patch_size": TEMPORAL,
        "image_mean": list(image.image_mean), "image_std": list(image.image_std),
        "do_sample_frames": False,
    }
    (out_dir / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    (out_dir / "processor_config.json").write_text(
        json.dumps({"processor_class": "Qwen2_5OmniProcessor"}, indent=2))
    (out_dir / "chat_template.jinja").write_text(OMNI_CHAT_TEMPLATE)


def build_tiny_omni(out_dir: str | Path, *, seed: int = 0, hidden: int = 64, layers: int = 2,
                    vocab_size: int = 512, texts: list[str] | None = None) -> Path:
    """Save a random tiny Qwen2.5-Omni thinker, its tokenizer and processor parts in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if texts is None:
        texts = suite_corpus(n_per_task=100, seed=seed)
    tokenizer = omni_tokenizer(texts, out_dir, vocab_size=vocab_size)
    config = _thinker_config(tokenizer, hidden=hidden, layers=layers)
    torch.manual_seed(seed)
    model = Qwen2_5OmniThinkerForConditionalGeneration(config)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    model.generation_config = GenerationConfig(
        eos_token_id=[eos_id, tokenizer.convert_tokens_to_ids(IM_END)], pad_token_id=eos_id,
        bos_token_id=None)
    hf_logging.disable_progress_bar()
    model.save_pretrained(out_dir)
    _write_processor(out_dir)
    return out_dir


QWEN2_VL_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
}
QWEN2_VL_CHAT_TEMPLATE = (OMNI_CHAT_TEMPLATE
                          .replace("<|vision_bos|><|IMAGE|><|vision_eos|>",
                                   "<|vision_start|><|image_pad|><|vision_end|>")
                          .replace("<|vision_bos|><|VIDEO|><|vision_eos|>",
                                   "<|vision_start|><|video_pad|><|vision_end|>"))


def build_tiny_qwen2_vl(out_dir: str | Path, *, seed: int = 0, hidden: int = 64,
                        layers: int = 2, vocab_size: int = 512,
                        texts: list[str] | None = None) -> Path:
    """Save a random tiny ``Qwen2VLForConditionalGeneration`` with the byte-level tokenizer
    (plus Qwen2-VL's vision tokens) and its image processor; no processor_config (its
    processor, like the Omni one, needs torchvision: see docs/omni.md)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = omni_tokenizer(texts or suite_corpus(n_per_task=100, seed=seed), out_dir,
                               vocab_size, QWEN2_VL_TOKENS, QWEN2_VL_CHAT_TEMPLATE)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in QWEN2_VL_TOKENS.items()}
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    half = hidden // 4 // 2  # 4 heads
    config = Qwen2VLConfig(
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": hidden, "mlp_ratio": 2,
                       "num_heads": 2, "patch_size": PATCH, "spatial_merge_size": MERGE,
                       "temporal_patch_size": TEMPORAL},
        text_config={"vocab_size": len(tokenizer), "hidden_size": hidden,
                     "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
                     "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 2048,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0,
                                         "mrope_section": [half - 2 * (half // 3), half // 3,
                                                           half // 3]},
                     "bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": eos_id},
        image_token_id=ids["image_token"], video_token_id=ids["video_token"],
        vision_start_token_id=ids["vision_bos_token"],
        vision_end_token_id=ids["vision_eos_token"],
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[eos_id, tokenizer.convert_tokens_to_ids(IM_END)], pad_token_id=eos_id,
        bos_token_id=None)
    hf_logging.disable_progress_bar()
    model.save_pretrained(out_dir)
    Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=PATCH,
                             merge_size=MERGE, temporal_patch_size=TEMPORAL
                             ).save_pretrained(out_dir)
    return out_dir


OMNI_MARKER = "tiny_omni_assets.json"  # written last: its presence means "complete"


def omni_corpus(seed: int = 0) -> list[str]:
    """Tokenizer texts: the text suite's corpus plus the omni tasks' prompts and labels."""
    from .omni_tasks import OMNI_SUITE, generate_omni_examples
    from .tasks import sft_response

    texts = suite_corpus(n_per_task=100, seed=seed)
    for task in OMNI_SUITE.values():
        texts += list(task.labels or ())
        for ex in generate_omni_examples(task, 20, seed):
            texts += [ex.prompt, sft_response(ex.answer)]
    return texts


def init_tiny_omni(out_dir: str | Path, *, seed: int = 0, n_train_per_task: int = 200,
                   n_test_per_task: int = 50):
    """Write the omni suite to ``out_dir/data`` (HBA layout) and a tiny Omni thinker with its
    tokenizer and processor parts to ``out_dir/model``. A complete set made with the same
    arguments and suite version is reused; anything else in a non-empty directory is refused."""
    from .model import TinyAssets
    from .omni_tasks import omni_suite_fingerprint, write_omni_suite

    out_dir = Path(out_dir)
    assets = TinyAssets(model_dir=out_dir / "model", data_dir=out_dir / "data")
    record = {"params": {"seed": seed, "n_train_per_task": n_train_per_task,
                         "n_test_per_task": n_test_per_task},
              "suite_fingerprint": omni_suite_fingerprint(seed=seed)}
    marker = out_dir / OMNI_MARKER
    if marker.exists():
        if json.loads(marker.read_text()) == record:
            return assets
        raise ValueError(f"{out_dir} holds tiny omni assets made with other arguments or another "
                         f"suite version ({marker}); remove it or choose another directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not empty and was not built by init-tiny --omni (no "
                         f"{OMNI_MARKER}); nothing in it was changed: choose another directory")
    write_omni_suite(assets.data_dir, n_train_per_task=n_train_per_task,
                     n_test_per_task=n_test_per_task, seed=seed)
    build_tiny_omni(assets.model_dir, seed=seed, texts=omni_corpus(seed))
    marker.write_text(json.dumps(record, indent=2) + "\n")
    return assets
