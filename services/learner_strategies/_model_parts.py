"""What every learner strategy needs to know about the model it trains, found generically.

* :func:`hf_model` — the Hugging Face ``PreTrainedModel`` inside the module a strategy is given:
  the module itself, or the ``.model`` of a thin wrapper (e.g. one that computes log-probs
  inside its own forward), and the prefix its names carry in the wrapper's state dict.
* :func:`decoder_layers` — every submodule whose class is named in the ``_no_split_modules`` of
  a ``PreTrainedModel`` inside the module (Qwen2's ``Qwen2DecoderLayer``; the vision and audio
  blocks of a multimodal model): the units that are sharded and recomputed one at a time.
* :func:`untied_embeddings` — the input and output embeddings, when they are not tied.
* :func:`checkpoint_activations` — recompute each of those layers in the backward pass
  (non-reentrant ``torch.utils.checkpoint``) instead of keeping its activations.
* :func:`hf_state_dict` — a state dict of the wrapper, renamed to the plain HF names.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel


def hf_model(module: torch.nn.Module) -> tuple[str, PreTrainedModel]:
    """``(prefix, model)``: the HF model inside ``module`` and the prefix of its parameter
    names in ``module`` (``""`` when ``module`` is the HF model)."""
    if isinstance(module, PreTrainedModel):
        return "", module
    inner = getattr(module, "model", None)
    if isinstance(inner, PreTrainedModel):
        return "model.", inner
    for name, sub in module.named_modules():
        if isinstance(sub, PreTrainedModel):
            return f"{name}.", sub
    raise TypeError(f"{type(module).__name__} holds no transformers PreTrainedModel: a learner "
                    f"strategy trains a Hugging Face model or a wrapper whose .model is one")


def hf_state_dict(module: torch.nn.Module, state: dict) -> dict:
    """``state`` (a state dict of ``module``) restricted to the HF model, with its names."""
    prefix, _ = hf_model(module)
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def decoder_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules of ``module`` whose class name is in the ``_no_split_modules`` of any
    ``PreTrainedModel`` inside it, outermost first (none nested in another)."""
    names: set[str] = set()
    for sub in module.modules():
        if isinstance(sub, PreTrainedModel):
            names.update(getattr(sub, "_no_split_modules", None) or ())
    layers: list[torch.nn.Module] = []
    for sub in module.modules():
        classes = {cls.__name__ for cls in type(sub).__mro__}  # FSDP subclasses them
        if classes & names and not any(_contains(outer, sub) for outer in layers):
            layers.append(sub)
    if not layers:
        raise ValueError(f"found no decoder layers in {type(module).__name__}: no submodule's "
                         f"class is in a _no_split_modules ({sorted(names)})")
    return layers


def untied_embeddings(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The HF model's input and output embeddings when they do not share a weight (each can
    then be sharded on its own); ``[]`` when tied or absent."""
    _, model = hf_model(module)
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or outputs is None or inputs.weight is outputs.weight:
        return []
    return [inputs, outputs]


def _contains(outer: torch.nn.Module, inner: torch.nn.Module) -> bool:
    return any(sub is inner for sub in outer.modules())


def checkpoint_activations(module: torch.nn.Module) -> int:
    """Make every decoder layer of ``module`` recompute its forward pass during backward
    (non-reentrant checkpointing; parameter names are unchanged). Returns how many layers.

    Applied before any sharding, so a sharded layer all-gathers its parameters once for the
    forward pass and once for backward, which then also recomputes it."""
    layers = decoder_layers(module)
    for layer in layers:
        if not getattr(layer, "_harpo_checkpointed", False):
            layer.forward = functools.partial(_recomputed, layer.forward)
            layer._harpo_checkpointed = True
    return len(layers)


def _recomputed(forward, *args, **kwargs):
    """``forward`` checkpointed when gradients are on. No KV cache: the recomputation would
    append the layer's keys and values to it a second time."""
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    for name in ("past_key_values", "past_key_value"):
        if name in kwargs:
            kwargs[name] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)
