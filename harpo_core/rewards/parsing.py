"""Parsing of model responses: ``\\boxed{...}`` answers and the ``<think>`` format."""

from __future__ import annotations

BOX_OPEN = "\\boxed{"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def _box_end(text: str, start: int) -> int | None:
    """Index of the brace closing the box whose content starts at ``start``, or None.

    A backslash escapes the next character, so ``\\{`` and ``\\}`` are not counted.
    """
    depth = 1
    i = start
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last top-level ``\\boxed{...}`` in ``text``.

    Braces inside the box must balance (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``).
    A box nested inside another box is part of the outer box's content. Returns None
    when there is no box, or when the last box is never closed.
    """
    content = None
    pos = text.find(BOX_OPEN)
    while pos != -1:
        start = pos + len(BOX_OPEN)
        end = _box_end(text, start)
        if end is None:
            return None
        content = text[start:end]
        pos = text.find(BOX_OPEN, end + 1)
    return content


def normalize_answer(s: str) -> str:
    """Strip, casefold and collapse runs of whitespace to one space."""
    return " ".join(s.split()).casefold()


def follows_format(text: str) -> bool:
    """Whether ``text`` follows the ``<think>...</think> ... \\boxed{...}`` format.

    The rule, exactly:

    * after leading whitespace, the text starts with ``<think>``;
    * ``<think>`` and ``</think>`` each occur exactly once in the text;
    * the text after ``</think>`` contains a ``\\boxed{...}`` that :func:`extract_boxed`
      parses (its last box is closed). Anything else may surround the box.
    """
    body = text.lstrip()
    if not body.startswith(THINK_OPEN):
        return False
    if body.count(THINK_OPEN) != 1 or body.count(THINK_CLOSE) != 1:
        return False
    _, _, after = body.partition(THINK_CLOSE)
    return extract_boxed(after) is not None


def answer_text(response: str) -> str:
    """The answer part of a free-form response, stripped.

    The content of the last ``\\boxed{...}`` if there is one, else the text after the
    last ``</think>``, else the whole response.
    """
    boxed = extract_boxed(response)
    if boxed is not None:
        return boxed.strip()
    # rpartition gives ("", "", response) when there is no closing tag.
    return response.rpartition(THINK_CLOSE)[2].strip()
