"""Prompts as the model sees them: one user turn in the model's chat template."""

from __future__ import annotations

MEDIA_ORDER = ("image", "audio", "video")  # a media prompt's parts: these first, then the text


def user_content(prompt: str, media: dict[str, int] | None = None):
    """The user turn's content: the prompt string, or (a prompt with media) one part per media
    item — ``{"type": "image" | "audio" | "video"}``, rendered by the template as that kind's
    placeholder — followed by the text."""
    if not media:
        return prompt
    parts = [{"type": kind} for kind in MEDIA_ORDER for _ in range(media.get(kind, 0))]
    return [*parts, {"type": "text", "text": prompt}]


def render_prompts(tokenizer, prompts: list[str],
                   media: list[dict[str, int]] | None = None) -> list[str]:
    """Each prompt as a user turn followed by the assistant's generation prompt; ``media``
    (items per kind of each prompt) adds the placeholders of its media."""
    media = media or [{}] * len(prompts)
    return [tokenizer.apply_chat_template([{"role": "user", "content": user_content(p, m)}],
                                          tokenize=False, add_generation_prompt=True)
            for p, m in zip(prompts, media)]


def tokenize_prompts(tokenizer, prompts: list[str],
                     media: list[dict[str, int]] | None = None) -> list[list[int]]:
    """Token ids of :func:`render_prompts` (the template already holds the special tokens)."""
    return tokenizer(render_prompts(tokenizer, prompts, media),
                     add_special_tokens=False)["input_ids"]
