"""The learner's forward pass as one module: token log-probs (and entropies) of a causal LM.

:class:`PolicyLogprobs` wraps a Hugging Face causal LM (``.model``) and returns, from one
``forward`` call, the log-probs the loss needs instead of logits. ``LearnerCore`` hands this
wrapper to the learner strategy (``strategy.wrap``), so that everything that touches the
output head runs inside the wrapped module's forward: under a sharded strategy (FSDP2) the root
module's parameters — embeddings, final norm, ``lm_head`` — are gathered only for that call, and
the chunked head (:mod:`harpo_core.logprobs`) reads ``lm_head.weight`` inside it. The wrapper
holds no parameters of its own: ``wrapper.model.state_dict()`` has the plain HF names that the
rollout workers load and checkpoints store.

Two ways to get there, same numbers to float rounding:

* ``chunk_tokens`` None (the default): the model's own ``forward`` makes every logit at once
  (``[rows, T, V]``), exactly the computation harpo always did.
* ``chunk_tokens`` set (``learner.logprob_chunk_tokens``): the decoder gives final hidden
  states, only those that predict a scored token are kept, and the head's log-softmax is taken
  ``chunk_tokens`` of them at a time, recomputed in the backward pass: peak memory
  O(chunk x vocab) instead of O(tokens x vocab). Needs a plain linear head
  (``logits = lm_head(hidden)``, as in Qwen2 and Llama).

Either way rows of a GRPO group can share their prompt's pass (``shared_prompt``,
:mod:`harpo_core.packing`).
"""

from __future__ import annotations

import logging

import torch

from harpo_core.logprobs import chunked_logprobs
from harpo_core.losses import token_entropy, token_logprobs
from harpo_core.packing import shared_prompt_forward, shared_prompt_hidden

log = logging.getLogger(__name__)
_MEDIA_UNPACKED_LOGGED = False  # the packing-off notice for media rows: once per process


class PolicyLogprobs(torch.nn.Module):
    """``forward(input_ids, attention_mask, response_mask=None) -> (logprobs, entropy)``.

    With ``response_mask``: ``logprobs`` ``[B, T]`` float32, valid on ``response_mask`` (what
    lies outside it is not defined), and ``entropy`` ``[N]``: the entropy of the distribution
    that predicted each response token (rows in order, tokens in order), without gradient.
    Without it: log-probs at every position (one plain pass per row; 0 at position 0) and
    ``None``. Every distribution is ``softmax(logits / temperature)``.
    """

    def __init__(self, model: torch.nn.Module, *, temperature: float = 1.0,
                 chunk_tokens: int | None = None, shared_prompt: bool = True):
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.chunk_tokens = chunk_tokens
        self.shared_prompt = shared_prompt
        if chunk_tokens is not None:
            self._check_linear_head()

    def _check_linear_head(self):
        head = self.model.get_output_embeddings()
        config = self.model.config
        post = [name for name in ("final_logit_softcapping", "logit_scale")
                if getattr(config, name, None) not in (None, 1.0)]
        if not isinstance(head, torch.nn.Linear) or post:
            raise ValueError(
                f"learner.logprob_chunk_tokens needs a model whose logits are a plain linear "
                f"head of the hidden states; {type(self.model).__name__} has "
                f"{post or type(head).__name__}: set learner.logprob_chunk_tokens: null")

    def forward(self, input_ids, attention_mask, response_mask=None, **media):
        """``media``: the model's media inputs for these rows (pixel values, grids, audio
        features and masks); the model then computes its own M-RoPE positions, so these rows
        run unpacked and through the full head (see :meth:`_media`)."""
        if media:
            return self._media(input_ids, attention_mask, response_mask, media)
        if response_mask is None:
            return self._every_position(input_ids, attention_mask), None
        if self.chunk_tokens is None:
            return self._full(input_ids, attention_mask, response_mask)
        return self._chunked(input_ids, attention_mask, response_mask)

    def _media(self, input_ids, attention_mask, response_mask, media):
        """Rows whose prompt has media: one plain forward pass with the media tensors and no
        position ids of ours. Shared-prompt packing restarts 1-D positions per response, but
        a multimodal model's M-RoPE positions (time, height, width per token, with text after
        the media offset by the grids) come from its own ``get_rope_index`` over the whole
        row; packing is therefore off for these rows (said once per process)."""
        global _MEDIA_UNPACKED_LOGGED
        if self.chunk_tokens is not None:
            raise ValueError("learner.logprob_chunk_tokens does not support prompts with media "
                             "(the chunked head runs the text decoder alone, without the "
                             "media towers): set learner.logprob_chunk_tokens: null")
        if self.shared_prompt and not _MEDIA_UNPACKED_LOGGED:
            _MEDIA_UNPACKED_LOGGED = True
            log.warning("learner.shared_prompt_forward is off for prompts with media: packed "
                        "rows would need M-RoPE positions per response, which the model "
                        "computes only for a whole row; those rows run unpacked")
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **media).logits
        if self.temperature != 1.0:
            logits = logits / self.temperature
        logprobs = token_logprobs(logits, input_ids)
        if response_mask is None:
            return logprobs, None
        predicting = logits[:, :-1][response_mask[:, 1:].bool()]
        with torch.no_grad():
            entropy = token_entropy(predicting.detach()[None])[0]
        return logprobs, entropy

    # ---------------------------------------------------------- all logits at once

    def _logits(self, input_ids, attention_mask):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits / self.temperature if self.temperature != 1.0 else logits

    def _full(self, input_ids, attention_mask, response_mask):
        if self.shared_prompt:
            logprobs, predicting = shared_prompt_forward(
                self.model, input_ids, attention_mask, response_mask, self.temperature)
        else:
            logits = self._logits(input_ids, attention_mask)
            logprobs = token_logprobs(logits, input_ids)
            predicting = logits[:, :-1][response_mask[:, 1:].bool()]
        with torch.no_grad():
            entropy = token_entropy(predicting.detach()[None])[0]
        return logprobs, entropy

    # ------------------------------------------------------------- chunked head

    def _head(self, hidden, targets):
        """The chunked head, run as ``lm_head``'s own forward: a head sharded as a group of its
        own (FSDP2, untied embeddings) is gathered around that call and again before its
        backward, and its gradient reduce-scattered after, exactly as for ``lm_head(hidden)``."""
        head = self.model.get_output_embeddings()

        def chunked(hidden, targets):
            return chunked_logprobs(hidden, head.weight, head.bias, targets,
                                    temperature=self.temperature, chunk_tokens=self.chunk_tokens)

        head.forward = chunked  # this instance only, for this call
        try:
            return head(hidden, targets)
        finally:
            del head.forward  # back to the class's forward

    def _hidden(self, input_ids, attention_mask):
        return self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                     use_cache=False).last_hidden_state

    def _chunked(self, input_ids, attention_mask, response_mask):
        if self.shared_prompt:
            hidden, targets, (rows, columns) = shared_prompt_hidden(
                self.model.base_model, input_ids, attention_mask, response_mask)
        else:
            scored = response_mask[:, 1:].bool()  # token t is predicted at position t - 1
            hidden = self._hidden(input_ids, attention_mask)[:, :-1][scored]
            targets = input_ids[:, 1:][scored]
            rows, columns = scored.nonzero(as_tuple=True)
            columns = columns + 1
        picked, entropy = self._head(hidden, targets)
        logprobs = torch.zeros(input_ids.shape, dtype=picked.dtype, device=input_ids.device)
        return logprobs.index_put((rows, columns), picked), entropy

    def _every_position(self, input_ids, attention_mask):
        if self.chunk_tokens is None:
            return token_logprobs(self._logits(input_ids, attention_mask), input_ids)
        hidden = self._hidden(input_ids, attention_mask)[:, :-1]
        picked, _ = self._head(hidden.reshape(-1, hidden.shape[-1]),
                               input_ids[:, 1:].reshape(-1))
        return torch.nn.functional.pad(picked.view(hidden.shape[:2]), (1, 0), value=0.0)
