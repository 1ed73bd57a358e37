"""The memory plan of a run: what one learner rank and one rollout engine will hold, before
anything starts (``harpo plan CONFIG``, and ``harpo train`` / ``eval`` at start).

The arithmetic is :mod:`harpo_core.memory`'s; this module reads the model's shape from its
``config.json`` (``transformers.AutoConfig``: no weights, no download), turns the run
configuration into the core's setups, compares the totals with the device memory, and says
what to change when something does not fit.

Device memory, for actors that ask for GPUs: ``learner.device_memory_gib`` /
``rollout.vllm.device_memory_gib`` when declared; otherwise the memory of this machine's first
GPU when it has one (the driver usually runs on a node like the workers'); otherwise nothing is
refused here, and a learner on a GPU checks itself against its GPU before loading weights
(:func:`check_learner_device`). Learners and rollout workers on CPU (``gpus_per_worker: 0``)
are checked against ``host_memory`` (preflight and ``harpo plan``: this machine's physical
memory).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from harpo_core.memory import (
    DTYPE_BYTES,
    GIB,
    GPU_RUNTIME_RESERVE,
    LearnerSetup,
    ModelShape,
    RolloutSetup,
    learner_memory,
    rollout_memory,
)
from services.config import TrainConfig

SUGGESTED_CHUNK = 1024  # learner.logprob_chunk_tokens offered when logits do not fit
MAX_SUGGESTED_WORKERS = 4096


class PlanError(ValueError):
    """The configuration cannot fit its devices; the message names the figures and knobs."""


# ---------------------------------------------------------------------------- model


def read_shape(model_dir: str | Path, trust_remote_code: bool = False
               ) -> tuple[ModelShape, str]:
    """The model's decoder shape and checkpoint dtype from ``model_dir/config.json``.

    Read with ``AutoConfig`` (local files only), so architecture-specific names resolve; a
    multimodal model's text decoder (``get_text_config``) is what is planned.
    """
    from transformers import AutoConfig

    path = Path(model_dir)
    if not (path / "config.json").is_file():  # else transformers reads the path as a hub id
        raise PlanError(f"cannot read the model's shape: {path / 'config.json'} does not exist "
                        f"(model.path, or a checkpoint's model/ directory)")
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code,
                                            local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - unknown model_type, bad JSON, remote code
        raise PlanError(f"cannot read the model's shape from {path / 'config.json'} "
                        f"({type(exc).__name__}: {exc})") from None
    text = config.get_text_config()
    missing = [name for name in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                 "intermediate_size", "vocab_size")
               if getattr(text, name, None) is None]
    if missing:
        raise PlanError(f"{path / 'config.json'} has no {', '.join(missing)}: cannot plan "
                        f"memory for this model")
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    bias = getattr(text, "attention_bias", None)
    if bias is None:  # Qwen2-family configs have no flag: q, k and v always carry a bias
        bias = str(getattr(text, "model_type", "")).startswith("qwen2")
    tied = getattr(text, "tie_word_embeddings", None)
    if tied is None:
        tied = bool(getattr(config, "tie_word_embeddings", False))
    try:
        shape = ModelShape(hidden_size=text.hidden_size, num_layers=text.num_hidden_layers,
                           num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                           intermediate_size=text.intermediate_size,
                           vocab_size=text.vocab_size, tie_word_embeddings=bool(tied),
                           qkv_bias=bool(bias))
    except ValueError as exc:
        raise PlanError(f"{path / 'config.json'}: {exc}") from None
    raw = json.loads((path / "config.json").read_text())
    dtype = str(raw.get("dtype") or raw.get("torch_dtype") or "float32")
    return shape, dtype


# ---------------------------------------------------------------------------- setups


def tokens_per_row(config: TrainConfig) -> int:
    return config.data.max_prompt_tokens + config.rollout.max_new_tokens


def learner_setup(config: TrainConfig, on_gpu: bool) -> LearnerSetup:
    """One rank's micro-batch: ``micro_batch_size`` sequences (default: the rank's share of a
    mini-batch), fewer when ``micro_batch_tokens`` bounds their padded tokens."""
    lr, r = config.learner, config.rollout
    share = max(1, lr.mini_batch_prompts * r.group_size // lr.workers)
    rows = min(lr.micro_batch_size or share, share)
    tokens = tokens_per_row(config)
    if lr.micro_batch_tokens is not None:
        rows = max(1, min(rows, lr.micro_batch_tokens // tokens))
    return LearnerSetup(strategy=lr.strategy, dtype=lr.dtype, world_size=lr.workers,
                        micro_batch_rows=rows, tokens_per_row=tokens,
                        activation_checkpointing=lr.activation_checkpointing,
                        logprob_chunk_tokens=lr.logprob_chunk_tokens,
                        reference_model=lr.kl_coef > 0,
                        runtime_reserve=GPU_RUNTIME_RESERVE if on_gpu else 0,
                        master_weights=lr.master_weights)


def request_sequences(config: TrainConfig) -> int:
    """Sequences one rollout worker generates at once: a request's prompts x group size."""
    r, d = config.rollout, config.data
    prompts = r.prompts_per_request or -(-d.prompts_per_step // r.workers)
    return prompts * r.group_size


def rollout_setup(config: TrainConfig, checkpoint_dtype: str) -> RolloutSetup:
    r = config.rollout
    if r.backend == "vllm":
        dtype = checkpoint_dtype if r.vllm.dtype == "auto" else r.vllm.dtype
        return RolloutSetup(dtype=dtype, tensor_parallel_size=r.vllm.tensor_parallel_size,
                            sequences=request_sequences(config),
                            max_model_len=r.vllm.max_model_len or tokens_per_row(config))
    # hf (and any other backend): float32 weights and a KV cache for every sequence
    return RolloutSetup(dtype="float32", tensor_parallel_size=1,
                        sequences=request_sequences(config), max_model_len=tokens_per_row(config))


# ---------------------------------------------------------------------------- device memory


def local_gpu_memory() -> int | None:
    """Total memory of this machine's first GPU, or None without a usable one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(0).total_memory)


def _device(declared_gib: float | None, gpus: float, field_name: str, probe,
            host_memory: int | None) -> tuple[int | None, str]:
    """(bytes, where the figure comes from) of the memory an actor must fit in."""
    if gpus > 0:
        if declared_gib is not None:
            return int(declared_gib * GIB), field_name
        found = probe()
        if found is not None:
            return found, "this machine's GPU 0"
        return None, f"not checked: no GPU here to measure; set {field_name}"
    if host_memory is not None:
        return host_memory, "CPU: this machine's memory"
    return None, "CPU"


# ---------------------------------------------------------------------------- the plan


def _size(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


@dataclass
class MemoryPlan:
    """Per-rank figures, the devices they must fit, and what does not fit."""

    shape: ModelShape
    learner_setup: LearnerSetup
    learner: dict[str, int]
    learner_device: int | None
    learner_device_source: str
    rollout_backend: str
    rollout_setup: RolloutSetup
    rollout: dict[str, int]
    rollout_budget: int | None  # what the engine may use (vLLM: gpu_memory_utilization x)
    rollout_device_source: str
    colocate: bool = False
    problems: list[str] = field(default_factory=list)
    learner_problems: list[str] = field(default_factory=list)  # also in problems
    notes: list[str] = field(default_factory=list)

    @property
    def learner_total(self) -> int:
        return sum(self.learner.values())

    @property
    def learner_resident(self) -> int:
        """What a learner keeps between updates (while a colocated engine generates)."""
        keep = ("parameters", "optimizer state", "bf16 working copy", "DDP buckets",
                "reference model", "runtime")
        return sum(v for k, v in self.learner.items() if k in keep)

    @property
    def rollout_total(self) -> int:
        return self.rollout["weights"] + self.rollout["KV cache"]

    def table(self) -> str:
        s, ls, rs = self.shape, self.learner_setup, self.rollout_setup
        master = "" if ls.master_weights == "float32" else f" ({ls.master_weights} state)"
        lines = [
            f"memory plan: {s.parameters / 1e9:.2f} B parameters ({s.num_layers} layers, "
            f"hidden {s.hidden_size}, vocab {s.vocab_size}"
            f"{', tied embeddings' if s.tie_word_embeddings else ''})",
            f"  learner, per rank: {ls.strategy}, {ls.dtype}{master}, {ls.world_size} rank(s); "
            f"micro-batch {ls.micro_batch_rows} x {ls.tokens_per_row} tokens; activation "
            f"checkpointing {'on' if ls.activation_checkpointing else 'off'}; logits "
            f"{ls.logit_rows} tokens at once",
        ]
        lines += [f"    {name:<18}{_size(value):>12}" for name, value in self.learner.items()]
        lines.append(f"    {'total':<18}{_size(self.learner_total):>12}  of "
                     + self._device_text(self.learner_device, self.learner_device_source))
        tp = f", tensor-parallel {rs.tensor_parallel_size}" if rs.tensor_parallel_size > 1 \
            else ""
        lines.append(f"  rollout ({self.rollout_backend}), per engine rank: {rs.dtype}{tp}; "
                     f"{rs.sequences} sequences x {rs.max_model_len} tokens"
                     + ("; colocated with the learner (sleeps during updates)"
                        if self.colocate else ""))
        lines += [f"    {name:<18}{_size(value):>12}" for name, value in self.rollout.items()]
        budget = self._device_text(self.rollout_budget, self.rollout_device_source)
        lines.append(f"    {'weights + KV':<18}{_size(self.rollout_total):>12}  of {budget}")
        lines += [f"  note: {n}" for n in self.notes]
        lines.append("  fits" if not self.problems else "  DOES NOT FIT: see the error below")
        return "\n".join(lines)

    @staticmethod
    def _device_text(device: int | None, source: str) -> str:
        return f"{_size(device)} ({source})" if device is not None else f"? ({source})"

    def check(self) -> None:
        if self.problems:
            raise PlanError("\n".join(self.problems))


def plan_memory(config: TrainConfig, model_dir: str | Path | None = None, *,
                gpu_probe=local_gpu_memory, host_memory: int | None = None) -> MemoryPlan:
    """The run's :class:`MemoryPlan` (``model_dir``: default ``model.path``).

    ``gpu_probe()``: this machine's GPU memory in bytes, or None (asked only for GPU actors
    without a declared ``device_memory_gib``). ``host_memory``: the memory CPU actors must fit
    in (None: CPU actors are not checked)."""
    shape, checkpoint_dtype = read_shape(model_dir or config.model.path,
                                         config.model.trust_remote_code)
    return build_plan(config, shape, checkpoint_dtype, gpu_probe=gpu_probe,
                      host_memory=host_memory)


def build_plan(config: TrainConfig, shape: ModelShape, checkpoint_dtype: str = "float32", *,
               gpu_probe=local_gpu_memory, host_memory: int | None = None) -> MemoryPlan:
    lr, r = config.learner, config.rollout
    learner_device, learner_source = _device(lr.device_memory_gib, lr.gpus_per_worker,
                                             "learner.device_memory_gib", gpu_probe,
                                             host_memory)
    setup = learner_setup(config, on_gpu=lr.gpus_per_worker > 0)
    try:
        rsetup = rollout_setup(config, checkpoint_dtype)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    vllm = r.backend == "vllm"
    declared = r.vllm.device_memory_gib if vllm else None
    if r.colocate and declared is None and learner_device is not None:
        declared_bytes, rollout_source = learner_device, learner_source  # the same GPU
    else:
        declared_bytes, rollout_source = _device(
            declared, r.gpus_per_worker, "rollout.vllm.device_memory_gib", gpu_probe,
            host_memory)
    budget = declared_bytes
    if vllm and declared_bytes is not None and r.gpus_per_worker > 0:
        budget = int(r.vllm.gpu_memory_utilization * declared_bytes)
        rollout_source += f" x rollout.vllm.gpu_memory_utilization {r.vllm.gpu_memory_utilization}"
    plan = MemoryPlan(shape=shape, learner_setup=setup, learner=learner_memory(shape, setup),
                      learner_device=learner_device, learner_device_source=learner_source,
                      rollout_backend=r.backend, rollout_setup=rsetup,
                      rollout=rollout_memory(shape, rsetup), rollout_budget=budget,
                      rollout_device_source=rollout_source, colocate=r.colocate)
    _check_rollout(plan, config)
    _check_learner(plan)
    return plan


# ---------------------------------------------------------------------------- checks


def _rows_text(rows: dict[str, int]) -> str:
    return " + ".join(f"{name} {_size(value)}" for name, value in rows.items())


def _min_fsdp2_workers(plan: MemoryPlan) -> int | None:
    """The fewest fsdp2 ranks whose per-rank total fits, the micro-batch unchanged."""
    setup = replace(plan.learner_setup, strategy="fsdp2")
    for workers in range(1, MAX_SUGGESTED_WORKERS + 1):
        total = sum(learner_memory(plan.shape, replace(setup, world_size=workers)).values())
        if total <= plan.learner_device:
            return workers
    return None


def _learner_changes(plan: MemoryPlan) -> list[str]:
    """Single changes of a knob and the per-rank total each gives."""
    setup, shape = plan.learner_setup, plan.shape
    candidates = []
    if setup.strategy == "ddp":
        candidates.append(("learner.strategy: fsdp2", replace(setup, strategy="fsdp2")))
    if not setup.activation_checkpointing:
        candidates.append(("learner.activation_checkpointing: true",
                           replace(setup, activation_checkpointing=True)))
    if setup.logit_rows > SUGGESTED_CHUNK:
        candidates.append((f"learner.logprob_chunk_tokens: {SUGGESTED_CHUNK}",
                           replace(setup, logprob_chunk_tokens=SUGGESTED_CHUNK)))
    if setup.micro_batch_rows > 1:
        candidates.append(("learner.micro_batch_size: 1", replace(setup, micro_batch_rows=1)))
    if setup.master_weights == "float32":  # bf16 state: 8 instead of 16 bytes per parameter
        knob = "learner.master_weights: bfloat16_stochastic" + (
            "" if setup.dtype == "bfloat16" else " with learner.dtype: bfloat16")
        candidates.append((knob, replace(setup, dtype="bfloat16",
                                         master_weights="bfloat16_stochastic")))
    device = plan.learner_device

    def result(total: int) -> str:
        return f"{_size(total)}{' (fits)' if total <= device else ''}"

    changes = [f"{knob} -> {result(sum(learner_memory(shape, s).values()))}"
               for knob, s in candidates]
    workers = _min_fsdp2_workers(plan)
    if workers is not None and (workers != setup.world_size or setup.strategy != "fsdp2"):
        fits = sum(learner_memory(shape, replace(setup, strategy="fsdp2",
                                                 world_size=workers)).values())
        changes.append(f"learner.strategy: fsdp2 with learner.workers: {workers} (the fewest "
                       f"ranks that fit) -> {result(fits)}")
    elif workers is None:
        changes.append(f"no number of fsdp2 ranks up to {MAX_SUGGESTED_WORKERS} fits this "
                       f"micro-batch: lower the micro-batch or the sequence length "
                       f"(data.max_prompt_tokens + rollout.max_new_tokens)")
    return changes


def _check_learner(plan: MemoryPlan) -> None:
    if plan.learner_device is None or plan.learner_total <= plan.learner_device:
        return
    s = plan.learner_setup
    plan.learner_problems.append(
        f"the learner needs about {_size(plan.learner_total)} per rank, more than the "
        f"{_size(plan.learner_device)} it has ({plan.learner_device_source}): "
        f"{_rows_text(plan.learner)} (learner.strategy {s.strategy}, learner.dtype {s.dtype}, "
        f"learner.workers {s.world_size}, micro-batch {s.micro_batch_rows} x "
        f"{s.tokens_per_row} tokens). Per-rank total after one change: "
        + "; ".join(_learner_changes(plan)))
    plan.problems.extend(plan.learner_problems)


def check_learner_device(config: TrainConfig, model_dir: str | Path, total_bytes: int,
                         role: str) -> None:
    """In a learner on a GPU whose memory no one declared (``learner.device_memory_gib``
    null, and no GPU on the driver to measure): the learner's plan against this GPU's
    ``total_bytes``, a :class:`PlanError` before any weight is loaded."""
    learner = config.learner.model_copy(update={"device_memory_gib": total_bytes / GIB})
    plan = plan_memory(config.model_copy(update={"learner": learner}), model_dir,
                       gpu_probe=lambda: None)
    if plan.learner_problems:
        raise PlanError(f"{role}: " + " ".join(plan.learner_problems).replace(
            "(learner.device_memory_gib)", "(this GPU, measured)"))


def _check_rollout(plan: MemoryPlan, config: TrainConfig) -> None:
    r, rows, budget = config.rollout, plan.rollout, plan.rollout_budget
    if budget is None:
        return
    if r.gpus_per_worker == 0:  # a request's buffers on this machine
        request, d = cpu_rollout_request_bytes(config, plan.shape), config.data
        if request > budget:
            plan.problems.append(
                f"one rollout request would need about {_size(request)}, more than this "
                f"machine's {_size(budget)}: rollout.group_size {r.group_size} × "
                f"{request_sequences(config) // r.group_size} prompts per request "
                f"(rollout.prompts_per_request, or data.prompts_per_step / rollout.workers) × "
                f"(data.max_prompt_tokens {d.max_prompt_tokens} + rollout.max_new_tokens "
                f"{r.max_new_tokens}) tokens; lower rollout.group_size or "
                f"rollout.prompts_per_request")
        return
    runtime = GPU_RUNTIME_RESERVE
    if r.backend != "vllm":
        if plan.rollout_total + runtime > budget:
            plan.problems.append(
                f"a {r.backend} rollout worker needs about {_size(plan.rollout_total + runtime)}"
                f" ({_rows_text(rows)} + runtime {_size(runtime)}), more than the "
                f"{_size(budget)} it has ({plan.rollout_device_source}); lower "
                f"rollout.group_size or rollout.prompts_per_request, or use rollout.backend: vllm")
        return
    tp = r.vllm.tensor_parallel_size
    kv_pool = budget - rows["weights"] - runtime
    if kv_pool < rows["KV one sequence"]:
        plan.problems.append(
            f"vLLM cannot start: per tensor-parallel rank the weights ({_size(rows['weights'])},"
            f" {plan.rollout_setup.dtype}) + runtime {_size(runtime)} leave "
            f"{_size(max(kv_pool, 0))} of its {_size(budget)} ({plan.rollout_device_source}) "
            f"for the KV cache, less than one sequence of {plan.rollout_setup.max_model_len} "
            f"tokens needs ({_size(rows['KV one sequence'])}); raise "
            f"rollout.vllm.gpu_memory_utilization or rollout.vllm.tensor_parallel_size "
            f"(now {tp}, with rollout.gpus_per_worker), serve in rollout.vllm.dtype: bfloat16, "
            f"or lower rollout.vllm.max_model_len")
    elif kv_pool < rows["KV cache"]:
        at_once = kv_pool // rows["KV one sequence"]
        plan.notes.append(
            f"vLLM's KV cache ({_size(kv_pool)}) holds about {at_once} of a request's "
            f"{plan.rollout_setup.sequences} full-length sequences at once: generation runs "
            f"in waves (raise rollout.vllm.gpu_memory_utilization or lower "
            f"rollout.prompts_per_request for one wave)")
    if plan.colocate and plan.learner_device is not None:
        free = plan.learner_device - plan.learner_resident
        if free < budget:
            most = math.floor(100 * free / plan.learner_device) / 100
            plan.problems.append(
                f"colocated: the learner keeps {_size(plan.learner_resident)} on the GPU "
                f"between updates (parameters, optimizer state ...), so vLLM cannot take "
                f"rollout.vllm.gpu_memory_utilization {r.vllm.gpu_memory_utilization} of "
                f"{_size(plan.learner_device)} ({_size(budget)}); lower it to at most "
                f"{max(most, 0.0):.2f}, or shard the learner (learner.strategy: fsdp2)")


def cpu_rollout_request_bytes(config: TrainConfig, shape: ModelShape) -> int:
    """One CPU rollout request's buffers: a float32 KV cache for every sequence at full
    length and one float32 row of logits per sequence (what preflight checks on CPU)."""
    seqs = request_sequences(config)
    return seqs * (tokens_per_row(config) * shape.kv_bytes_per_token(DTYPE_BYTES["float32"])
                   + shape.vocab_size * 4)
