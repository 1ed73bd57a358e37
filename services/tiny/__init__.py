"""Tiny CPU-only model, tokenizer and synthetic multi-task suite for the embedded demo."""

from .model import TinyAssets, build_tiny_model, count_parameters, init_tiny, train_tokenizer
from .sft import greedy_eval, sft
from .tasks import (
    SUITE,
    TaskSpec,
    generate_examples,
    sft_response,
    suite_corpus,
    suite_fingerprint,
    write_suite,
)

__all__ = [
    "SUITE",
    "TaskSpec",
    "TinyAssets",
    "build_tiny_model",
    "count_parameters",
    "generate_examples",
    "greedy_eval",
    "init_tiny",
    "sft",
    "sft_response",
    "suite_corpus",
    "suite_fingerprint",
    "train_tokenizer",
    "write_suite",
]
