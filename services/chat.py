"""Prompts as the model sees them: one user turn in the model's chat template."""

from __future__ import annotations


def render_prompts(tokenizer, prompts: list[str]) -> list[str]:
    """Each prompt as a user turn followed by the assistant's generation prompt."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True) for p in prompts]


def tokenize_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of :func:`render_prompts` (the template already holds the special tokens)."""
    return tokenizer(render_prompts(tokenizer, prompts), add_special_tokens=False)["input_ids"]
