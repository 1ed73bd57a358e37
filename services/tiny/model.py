"""Tiny Qwen2-architecture model and byte-level BPE tokenizer for the CPU demo.

Platform fact this module is built around: transformers 5.x loads the tokenizer of any
``qwen2`` model directory as ``Qwen2Tokenizer``, which rebuilds the backend from the
vocab and merges in ``tokenizer.json`` with its own fixed normalizer (NFC), pre-tokenizer
(Qwen2 split regex + byte-level) and decoder. Anything else in ``tokenizer.json`` (e.g. a
word-level model) is silently replaced. So we train a byte-level BPE with exactly that
pipeline and return a ``Qwen2Tokenizer`` built from it: the in-memory tokenizer and the
one ``AutoTokenizer.from_pretrained(dir)`` returns encode identically.

End-of-sequence convention: ``<|endoftext|>`` is the tokenizer's eos and pad token, and the
supervised warm start ends every response with it. ``<|im_end|>`` closes chat turns in the
template, so the saved generation config lists both ids as eos: generation stops on either.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer
from transformers.utils import logging as hf_logging

from .suites import DEFAULT_SUITE, suite_module

EOS_TOKEN = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MARKER = "tiny_assets.json"  # written last by init_tiny; its presence means "complete"
BUILDING = ".init-tiny-building"  # written first, removed last: an interrupted build is ours


def train_tokenizer(
    texts: list[str], vocab_size: int = 512, *, model_max_length: int = 512
) -> Qwen2Tokenizer:
    """Train a byte-level BPE on ``texts`` and wrap it as a ChatML ``Qwen2Tokenizer``.

    The vocab holds the 3 special tokens (ids 0-2), all 256 byte symbols and learned merges,
    so any text round-trips. The result may be smaller than ``vocab_size`` on a tiny corpus.
    """
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    state = json.loads(backend.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=state["vocab"],
        merges=[tuple(m) for m in state["merges"]],
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        extra_special_tokens=[IM_START, IM_END],
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    out_dir: str | Path,
    tokenizer: Qwen2Tokenizer,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 384,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised, tied-embedding ``Qwen2ForCausalLM`` with its tokenizer."""
    out_dir = Path(out_dir)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[eos_id, im_end_id], pad_token_id=eos_id, bos_token_id=None
    )
    hf_logging.disable_progress_bar()
    model.save_pretrained(out_dir)  # transformers 5 writes model.safetensors only
    tokenizer.save_pretrained(out_dir)
    return out_dir


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters, tied embeddings counted once."""
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class TinyAssets:
    """Where ``init_tiny`` put the model (HF format) and the task suite (parquet shards)."""

    model_dir: Path
    data_dir: Path


def init_tiny(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_train_per_task: int = 2000,
    n_test_per_task: int = 100,
    vocab_size: int = 512,
    tasks: list[str] | None = None,
    replace_stale: bool = False,
    suite: str = DEFAULT_SUITE,
    **model_kwargs,
) -> TinyAssets:
    """Write the task suite to ``out_dir/data`` and a fresh tiny model to ``out_dir/model``.

    Deterministic given the arguments. If ``out_dir`` already holds a complete set made
    with the same arguments by the same version of the task suite (marker file written last,
    suite fingerprint inside), it is reused as is; an incomplete one is rebuilt. A complete set
    made with different arguments raises ``ValueError``; so does one made by another version of
    the suite, unless ``replace_stale`` (then it is rebuilt). ``suite`` names the task suite
    (``services.tiny.suites``: ``default``, the demo's, or ``imbalance``).
    """
    tasks_module = suite_module(suite)
    out_dir = Path(out_dir)
    assets = TinyAssets(model_dir=out_dir / "model", data_dir=out_dir / "data")
    params = {
        "seed": seed, "n_train_per_task": n_train_per_task, "n_test_per_task": n_test_per_task,
        "vocab_size": vocab_size, "tasks": None if tasks is None else list(tasks), **model_kwargs,
    }
    if suite != DEFAULT_SUITE:  # absent for the default suite: its old markers stay valid
        params["suite"] = suite
    fingerprint = tasks_module.suite_fingerprint(seed=seed, tasks=tasks)
    marker = out_dir / MARKER
    if marker.exists():
        recorded = json.loads(marker.read_text())
        if recorded["params"] != params:
            raise ValueError(f"{out_dir} holds tiny assets built with {recorded['params']}, "
                             f"not {params}; remove it or choose another directory")
        if recorded.get("suite_fingerprint") == fingerprint:
            return assets
        if not replace_stale:
            raise ValueError(f"{out_dir} holds tiny assets from another version of the task "
                             "suite (its examples differ from what this version generates); "
                             "remove it or choose another directory")
        (out_dir / BUILDING).touch()
        marker.unlink()
    elif out_dir.is_dir() and not (out_dir / BUILDING).exists():
        others = sorted(p.name for p in out_dir.iterdir())
        if others:
            raise ValueError(
                f"{out_dir} is not empty ({', '.join(others[:5])}"
                f"{', ...' if len(others) > 5 else ''}) and was not built by init-tiny "
                f"(no {MARKER}); nothing in it was changed: choose another directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / BUILDING).touch()
    for d in (assets.model_dir, assets.data_dir):
        shutil.rmtree(d, ignore_errors=True)

    tasks_module.write_suite(assets.data_dir, n_train_per_task=n_train_per_task,
                             n_test_per_task=n_test_per_task, seed=seed, tasks=tasks)
    tokenizer = train_tokenizer(tasks_module.suite_corpus(seed=seed, tasks=tasks),
                                vocab_size=vocab_size)
    build_tiny_model(assets.model_dir, tokenizer, seed=seed, **model_kwargs)
    marker.write_text(json.dumps({"params": params, "suite_fingerprint": fingerprint},
                                 indent=2) + "\n")
    (out_dir / BUILDING).unlink(missing_ok=True)
    return assets
