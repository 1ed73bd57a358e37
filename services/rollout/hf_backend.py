"""Rollouts with Hugging Face ``generate``: the portable backend (CPU or GPU)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import (
    AutoTokenizer,
    DynamicCache,
    StoppingCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
)

from services.model_loading import load_model
from services.rollout.backend import Generation, SamplingParams, resolve_eos_ids
from services.rollout.registry import register_backend


class _FirstStop(StoppingCriteria):
    """Stop strings (``StopStringCriteria``) that also remember where each row stopped.

    ``generate`` pads a finished row with the pad token, which here is an end token too, so
    the padding alone cannot tell where a stop string ended a response; this records the
    response length at the step a row's first stop string completed (-1: never).
    """

    def __init__(self, tokenizer, stop: tuple[str, ...], prompt_width: int):
        self.inner = StopStringCriteria(tokenizer, list(stop))
        self.prompt_width = prompt_width
        self.ends: torch.Tensor | None = None  # [rows], set at the first call

    def __call__(self, input_ids, scores, **kwargs):
        done = self.inner(input_ids, scores, **kwargs)
        if self.ends is None:
            self.ends = torch.full(done.shape, -1, dtype=torch.long, device=done.device)
        first = done & (self.ends < 0)
        self.ends[first] = input_ids.shape[1] - self.prompt_width
        return done


@register_backend("hf")
class HFBackend:
    """Batched sampling with ``model.generate``; log-probs from the same forward passes.

    With ``shared_prefill`` (the default) the ``n`` samples of a prompt share one prompt
    pass: the prompts (but their last token) are run once, the KV cache is repeated ``n``
    times, and ``generate`` continues from it — the same tokens from the same seed as a
    plain ``generate`` over ``n`` copies of every prompt, for a fraction of the prefill work.
    """

    def __init__(self, model_dir: str, *, device: str = "cpu", dtype=torch.float32,
                 shared_prefill: bool = True):
        self.device = torch.device(device)
        self.shared_prefill = shared_prefill
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = load_model(model_dir, dtype=dtype)  # the multimodal class where needed
        self.model.to(self.device).eval()
        self.eos_ids = resolve_eos_ids(self.model.generation_config.eos_token_id, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_ids[0])

    @classmethod
    def from_options(cls, model_dir: str, options: dict) -> HFBackend:
        """``options``: optional ``device``; without it the GPU Ray assigned when ``gpus``
        (rollout.gpus_per_worker) > 0, else the CPU; other keys are ignored."""
        device = options.get("device")
        if device is None:
            from services.devices import actor_device

            device = actor_device("HF rollout worker", float(options.get("gpus", 0) or 0),
                                  "rollout.gpus_per_worker")
        return cls(model_dir, device=device)

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        # tied embeddings legitimately appear once; anything else is a real mismatch
        missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            raise ValueError(f"weights do not fit the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")

    def decode(self, token_ids: list[list[int]]) -> list[str]:
        return self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int
                 ) -> Generation:
        width = max(len(p) for p in prompts)
        ids = np.full((len(prompts), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(prompts), width), dtype=np.int64)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p):] = p
            mask[i, width - len(p):] = 1
        input_ids = torch.from_numpy(ids).repeat_interleave(params.n, dim=0).to(self.device)
        attention = torch.from_numpy(mask).repeat_interleave(params.n, dim=0).to(self.device)
        cache = None
        if self.shared_prefill and params.n > 1 and width > 1:
            cache = self._prompt_cache(torch.from_numpy(ids), torch.from_numpy(mask), params.n)
        torch.manual_seed(seed)
        return Generation(*self._sample(input_ids, attention, params, cache))

    def _sample(self, input_ids, attention, params: SamplingParams, cache, **media):
        """``generate`` from left-padded ``input_ids`` (the ``n`` copies of every prompt in
        turn); returns (token ids, log-probs, lengths, stopped) of the responses."""
        width = input_ids.shape[1]
        greedy = params.temperature == 0
        stops = None
        if params.stop:
            stops = _FirstStop(self.tokenizer, params.stop, width)
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            past_key_values=cache,
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p,
            top_k=None,
            max_new_tokens=params.max_new_tokens,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            stopping_criteria=StoppingCriteriaList([stops] if stops is not None else []),
            output_logits=True,
            return_dict_in_generate=True,
            **media,
        )
        new = out.sequences[:, width:]  # [B*n, T]
        logits = torch.stack(out.logits, dim=1).float()  # [B*n, T, V], before any processing
        if not greedy:
            logits = logits / params.temperature
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        new = new.cpu().numpy()
        is_eos = np.isin(new, self.eos_ids)
        # a response ends at (and includes) its first end token or the token completing a stop
        # string, whichever comes first
        lengths = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, new.shape[1])
        stopped = is_eos.any(axis=1)
        if stops is not None and stops.ends is not None:
            ends = stops.ends.cpu().numpy()
            lengths = np.where(ends > 0, np.minimum(lengths, ends), lengths)
            stopped |= ends > 0
        return new, logprobs.cpu().numpy().astype(np.float32), lengths, stopped

    @torch.no_grad()
    def generate_media(self, prompts: list, params: SamplingParams, seed: int,
                       placeholders: tuple[int, ...] = ()
                       ) -> tuple[Generation, list[list[int]]]:
        """Generate for prompts with media (``services.media_inputs.MediaPrompt``), one prompt
        at a time: its ``n`` copies share one ``generate`` call with the media tensors
        repeated per copy, and the model computes its own M-RoPE positions from the ids and
        the grids (no shared prefill: its cached positions would need the rope offsets).
        ``placeholders`` (the media placeholder ids) are never sampled: a response holding one
        would be a media slot without media to the learner's forward (a random tiny model
        does draw them). The log-probs stay those of the unsuppressed softmax, as the
        learner's; for a trained model the difference is nil. Returns the generation and the
        expanded prompt ids the model saw."""
        from services.media_inputs import repeat_media

        n = params.n
        parts: list[Generation] = []
        torch.manual_seed(seed)  # once: the prompts then draw in order, as a batch would
        for prompt in prompts:
            ids = torch.tensor([prompt.expanded], dtype=torch.long, device=self.device)
            media = {k: v.to(self.device) for k, v in prompt.inputs.items()}
            media = repeat_media(media, n)
            flat = Generation(*self._sample(ids.repeat(n, 1), torch.ones_like(ids).repeat(n, 1),
                                            params, None, suppress_tokens=list(placeholders),
                                            **media))
            parts.append(flat)
        return _concat_generations(parts, self.pad_id), [p.expanded for p in prompts]

    def _prompt_cache(self, ids: torch.Tensor, mask: torch.Tensor, n: int) -> DynamicCache:
        """KV cache of every left-padded prompt but its last token, repeated ``n`` times:
        ``generate`` then runs only the last prompt token before sampling, as it would have
        after its own prefill (positions from the attention mask, as ``generate`` sets them)."""
        cache = DynamicCache(config=self.model.config)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.model(input_ids=ids[:, :-1].to(self.device),
                   attention_mask=mask[:, :-1].to(self.device),
                   position_ids=positions[:, :-1].to(self.device),
                   past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(n)
        return cache

    def sleep(self) -> None:
        """Free the GPU for a colocated learner (``rollout.colocate``): the model moves to
        CPU memory. Nothing to free on CPU."""
        if self.device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()

    def wake_up(self) -> None:
        if self.device.type == "cuda":
            self.model.to(self.device)

    def shutdown(self) -> None:
        """Nothing to release: the model is ordinary process memory."""


def _concat_generations(parts: list[Generation], pad_id: int) -> Generation:
    """Generations of consecutive prompts as one, right-padded to the longest response."""
    width = max(p.token_ids.shape[1] for p in parts)
    pad = lambda a, value: np.pad(a, ((0, 0), (0, width - a.shape[1])),  # noqa: E731
                                  constant_values=value)
    return Generation(token_ids=np.concatenate([pad(p.token_ids, pad_id) for p in parts]),
                      logprobs=np.concatenate([pad(p.logprobs, 0.0) for p in parts]),
                      lengths=np.concatenate([p.lengths for p in parts]),
                      stopped=np.concatenate([p.stopped for p in parts]))
