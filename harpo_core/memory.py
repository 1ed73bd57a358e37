"""Memory arithmetic of a decoder-only transformer: what one learner rank and one vLLM
tensor-parallel rank hold, from the model's shape alone (no torch, no model loaded).

Every figure is a sum of named rows in bytes, so a table can show where the memory goes and a
refusal can name the row (and the knob) that is too big. The formulas are estimates of the
peak, chosen to err high rather than low; they are documented row by row below and in
docs/architecture.md ("Memory plan").

Learner, per rank (``P`` parameters, ``W`` ranks, ``c`` the compute dtype's bytes: 4 float32,
2 bfloat16):

- ``parameters``: float32 values (the master copy under bfloat16): ``4P``, ``/W`` under fsdp2.
- ``gradients``: float32 (the gradient of the float32 parameters): ``4P``, ``/W`` under fsdp2.
- ``optimizer state``: AdamW's two float32 moments: ``8P``, ``/W`` under fsdp2.
- With ``master_weights: bfloat16_stochastic`` the three rows above are bf16: ``2P``, ``2P``,
  ``4P`` (``/W`` under fsdp2), and ``optimizer chunk`` adds the float32 working set of one
  chunk of the stochastically rounded AdamW step (:mod:`harpo_core.stochastic_rounding`).
- ``bf16 working copy`` (ddp, bfloat16 with float32 master weights): the parameters cast for
  compute, ``2P``.
- ``DDP buckets`` (ddp, more than one rank): DDP's gradient buckets, a second copy of the
  gradients (``gradient_as_bucket_view`` off, torch's default): ``4P`` (``2P`` for bf16
  gradients).
- ``unsharded unit`` (fsdp2 only): the largest unit ``fully_shard`` gathers whole - a decoder
  layer, or the root (embeddings, final norm, untied ``lm_head``) - as parameters and their
  gradient before the reduce-scatter, in the compute dtype: ``2 c U``.
- ``reference model`` (``kl_coef > 0``): the frozen policy in the compute dtype, ``c P``
  (``/W`` under fsdp2).
- ``activations``: per token of the micro-batch and per layer, the tensors autograd keeps
  (:meth:`ModelShape.activation_elements`) in the compute dtype; with activation checkpointing
  only each layer's input (``hidden``) plus one layer's full set, recomputed in the backward.
- ``logits``: float32 logits, their log-softmax and its gradient (3 buffers) of ``vocab``
  columns, for every token of the micro-batch or, with chunked log-probs, ``chunk`` tokens.
- ``runtime``: a fixed reserve for the CUDA context, communication buffers and allocator
  slack (0 on CPU).

vLLM, per tensor-parallel rank: the weights in the serving dtype (``/TP``), and the KV cache:
``2 x layers x kv heads per rank x head_dim`` values per token.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
MASTER_WEIGHTS = ("float32", "bfloat16_stochastic")
# The stochastically rounded AdamW step (harpo_core.stochastic_rounding) works in float32 on
# chunks of this many elements of a tensor; its temporaries (float32 parameter, gradient, both
# moments, random and rounded bits) are about CHUNK_TEMPORARIES x 4 bytes per element.
CHUNK_ELEMENTS = 1 << 22
CHUNK_TEMPORARIES = 7
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LOGIT_BUFFERS = 3  # logits, log-softmax, gradient; float32
GPU_RUNTIME_RESERVE = 2 * GIB  # CUDA context, NCCL buffers, allocator fragmentation


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only transformer with gated (SwiGLU) MLPs (Qwen2, Llama,
    Mistral, ...), as in its ``config.json``."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool = True  # Qwen2: biases on q, k and v projections

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model {name} = {value!r} is invalid: expected a positive "
                                 f"integer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model num_key_value_heads = {self.num_kv_heads} is invalid: it "
                             f"must divide num_attention_heads ({self.num_heads})")

    # ------------------------------------------------------------------ parameters

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def layer_parameters(self) -> int:
        """One decoder layer: attention (q, k, v with optional bias, o), gated MLP (gate, up,
        down), two RMSNorm weights."""
        h = self.hidden_size
        attention = h * (self.q_dim + 2 * self.kv_dim) + self.q_dim * h
        if self.qkv_bias:
            attention += self.q_dim + 2 * self.kv_dim
        return attention + 3 * h * self.intermediate_size + 2 * h

    @property
    def root_parameters(self) -> int:
        """What is not in a decoder layer: embeddings, final norm, and an untied lm_head."""
        embedding = self.vocab_size * self.hidden_size
        return embedding * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    @property
    def parameters(self) -> int:
        return self.num_layers * self.layer_parameters + self.root_parameters

    # ------------------------------------------------------------------ per token

    @property
    def activation_elements(self) -> int:
        """Values autograd keeps per token and decoder layer (SDPA/flash attention: no score
        matrix): two RMSNorms' input and output (4h), q and k before and after rotary and v
        (2q + 3kv), the attention output (q), the MLP's gate, up, activation and product
        (4 intermediate)."""
        return (4 * self.hidden_size + 3 * self.q_dim + 3 * self.kv_dim
                + 4 * self.intermediate_size)

    def kv_heads_per_rank(self, tensor_parallel: int) -> int:
        """KV heads one tensor-parallel rank holds (replicated when there are fewer heads
        than ranks, as vLLM does)."""
        return max(1, self.num_kv_heads // tensor_parallel)

    def kv_bytes_per_token(self, dtype_bytes: int, tensor_parallel: int = 1) -> int:
        return (2 * self.num_layers * self.kv_heads_per_rank(tensor_parallel) * self.head_dim
                * dtype_bytes)


@dataclass(frozen=True)
class LearnerSetup:
    """How one learner rank trains: strategy, dtype, ranks, and one micro-batch's size."""

    strategy: str  # ddp | fsdp2
    dtype: str  # float32 | bfloat16
    world_size: int
    micro_batch_rows: int
    tokens_per_row: int
    activation_checkpointing: bool = False
    logprob_chunk_tokens: int | None = None
    reference_model: bool = False
    runtime_reserve: int = 0
    master_weights: str = "float32"  # or bfloat16_stochastic: bf16 state, 8 B/parameter

    def __post_init__(self):
        if self.master_weights not in MASTER_WEIGHTS:
            raise ValueError(f"learner.master_weights {self.master_weights!r} is invalid: "
                             f"expected one of {', '.join(MASTER_WEIGHTS)}")
        if self.master_weights != "float32" and self.dtype != "bfloat16":
            raise ValueError(f"learner.master_weights {self.master_weights!r} needs "
                             f"learner.dtype bfloat16, not {self.dtype!r}")
        if self.strategy not in ("ddp", "fsdp2"):
            raise ValueError(f"learner.strategy {self.strategy!r} has no memory model: "
                             f"expected ddp or fsdp2")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"learner.dtype {self.dtype!r} is invalid: expected float32 or "
                             f"bfloat16")
        for name in ("world_size", "micro_batch_rows", "tokens_per_row"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)!r} is invalid: expected >= 1")

    @property
    def micro_batch_tokens(self) -> int:
        return self.micro_batch_rows * self.tokens_per_row

    @property
    def logit_rows(self) -> int:
        """Tokens whose logits exist at once: a chunk, or the whole micro-batch."""
        if self.logprob_chunk_tokens is None:
            return self.micro_batch_tokens
        return min(self.logprob_chunk_tokens, self.micro_batch_tokens)


def learner_memory(shape: ModelShape, setup: LearnerSetup) -> dict[str, int]:
    """Peak bytes on one learner rank, by row (see the module doc); rows that are 0 for this
    setup are left out."""
    p, w, c = shape.parameters, setup.world_size, DTYPE_BYTES[setup.dtype]
    fsdp = setup.strategy == "fsdp2"
    shard = w if fsdp else 1
    low = setup.master_weights == "bfloat16_stochastic"
    state = 2 if low else 4  # bytes of a parameter, its gradient, each moment
    rows = {
        "parameters": state * p // shard,
        "gradients": state * p // shard,
        "optimizer state": 2 * state * p // shard,
    }
    if low:
        rows["optimizer chunk"] = CHUNK_TEMPORARIES * 4 * min(CHUNK_ELEMENTS, p)
    if not fsdp and setup.dtype == "bfloat16" and not low:
        rows["bf16 working copy"] = 2 * p
    if not fsdp and w > 1:
        rows["DDP buckets"] = state * p
    if fsdp:
        unit = max(shape.layer_parameters, shape.root_parameters)
        rows["unsharded unit"] = 2 * c * unit
    if setup.reference_model:
        rows["reference model"] = c * p // shard
    tokens = setup.micro_batch_tokens
    per_token = (shape.num_layers * shape.hidden_size + shape.activation_elements
                 if setup.activation_checkpointing
                 else shape.num_layers * shape.activation_elements)
    rows["activations"] = tokens * per_token * c
    rows["logits"] = LOGIT_BUFFERS * setup.logit_rows * shape.vocab_size * 4
    if setup.runtime_reserve:
        rows["runtime"] = setup.runtime_reserve
    return rows


@dataclass(frozen=True)
class RolloutSetup:
    """One vLLM engine: serving dtype, tensor-parallel ranks, and the sequences of a request."""

    dtype: str  # float32 | bfloat16 | float16
    tensor_parallel_size: int
    sequences: int  # generated at once by one engine (prompts per request x group size)
    max_model_len: int  # tokens per sequence (prompt + response)

    def __post_init__(self):
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"rollout dtype {self.dtype!r} has no memory model: expected "
                             f"one of {', '.join(DTYPE_BYTES)}")
        for name in ("tensor_parallel_size", "sequences", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)!r} is invalid: expected >= 1")


def rollout_memory(shape: ModelShape, setup: RolloutSetup) -> dict[str, int]:
    """Bytes on one vLLM tensor-parallel rank: ``weights``, ``KV cache`` for every sequence of
    a request at its full length, and ``KV one sequence`` (the least the engine must hold)."""
    b, tp = DTYPE_BYTES[setup.dtype], setup.tensor_parallel_size
    per_sequence = setup.max_model_len * shape.kv_bytes_per_token(b, tp)
    return {
        "weights": shape.parameters * b // tp,
        "KV cache": setup.sequences * per_sequence,
        "KV one sequence": per_sequence,
    }
