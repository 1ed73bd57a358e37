"""Rewards: boxed-answer exact match, semantic similarity, format, over-length, user functions."""

from harpo_core.rewards.compose import (
    BUILTIN_TASK_TYPES,
    RewardComposer,
    RewardConfig,
    RewardResult,
)
from harpo_core.rewards.parsing import answer_text, extract_boxed, follows_format, normalize_answer
from harpo_core.rewards.scorers import exact_match, format_score, overlong_penalty
from harpo_core.rewards.similarity import SentenceSimilarity, bundled_model_path
from harpo_core.rewards.user import call_reward_function, load_reward_function

__all__ = [
    "BUILTIN_TASK_TYPES",
    "RewardComposer",
    "RewardConfig",
    "RewardResult",
    "SentenceSimilarity",
    "answer_text",
    "bundled_model_path",
    "call_reward_function",
    "exact_match",
    "extract_boxed",
    "follows_format",
    "format_score",
    "load_reward_function",
    "normalize_answer",
    "overlong_penalty",
]
