"""The interface every rollout backend implements (Hugging Face ``generate``, vLLM).

A backend lives in its own module ``services/rollout/<name>_backend.py`` and registers its class
with ``@register_backend("<name>")`` (:mod:`services.rollout.registry`); ``rollout.backend:
<name>`` then selects it, and a rollout worker imports only that module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # responses per prompt (the group size)
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # extra stop strings (the end token always stops)


@dataclass
class Generation:
    """Responses for a list of prompts, prompt-major: prompt k's ``n`` responses are rows
    ``k*n .. k*n+n-1``. Arrays are right-padded; ``lengths`` says how much of each row is real.
    """

    token_ids: np.ndarray  # [R, T] int
    logprobs: np.ndarray  # [R, T] float32, log-prob of each token under the sampling policy
    lengths: np.ndarray  # [R] int, tokens in each response (an end token included)
    stopped: np.ndarray  # [R] bool, True where an end token or a stop string ended it

    @property
    def finish_reasons(self) -> np.ndarray:
        return np.where(self.stopped, "stop", "length")

    def flat(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, log-probs) of every response concatenated, without padding."""
        keep = np.arange(self.token_ids.shape[1])[None, :] < self.lengths[:, None]
        return self.token_ids[keep], self.logprobs[keep]


class RolloutBackend(Protocol):
    """What a rollout worker needs from a backend. One instance lives in one worker actor
    and serves one policy at a time; calls never overlap."""

    @classmethod
    def from_options(cls, model_dir: str, options: dict) -> RolloutBackend:
        """Load the model in ``model_dir`` (Hugging Face format) for generation.

        ``options`` is the worker's backend options (a plain dict, possibly empty): the
        backend's own settings, e.g. ``device``; a backend documents the keys it reads.
        """
        ...

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int
                 ) -> Generation:
        """For each prompt (token ids), ``params.n`` responses; reproducible given ``seed``.

        The log-prob of a sampled token is ``log_softmax(logits / temperature)`` (plain
        ``log_softmax(logits)`` when greedy), what the learner recomputes; a response ends at
        its first end token (counted in its length), a stop string or ``max_new_tokens``.
        """
        ...

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Replace the policy's weights with a full state dict (Hugging Face names)."""
        ...

    def decode(self, token_ids: list[list[int]]) -> list[str]:
        """Response texts of unpadded token ids."""
        ...

    def shutdown(self) -> None:
        """Release what the backend holds (engine processes, GPU memory)."""
        ...


def resolve_eos_ids(generation_eos, tokenizer) -> list[int]:
    """End-of-sequence ids: the generation config's (an id or a list), else the tokenizer's."""
    eos = generation_eos if generation_eos is not None else tokenizer.eos_token_id
    ids = eos if isinstance(eos, list) else [eos]
    if not ids or ids[0] is None:
        raise ValueError("the model has no end-of-sequence token (generation_config or tokenizer)")
    return [int(i) for i in ids]
