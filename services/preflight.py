"""Everything a run needs, checked before anything starts: no Ray, no actor, no file written.

:func:`preflight` takes a validated :class:`~services.config.TrainConfig` and checks, in the
order a user would fix them: the model directory (``config.json``, weight files, tokenizer),
the data (shards readable, columns, task names, prompt lengths with the model's tokenizer),
the output directory (a directory, writable, room for a checkpoint), fixed ports, and the
memory plan (:mod:`services.plan`: what cannot fit its GPUs or this machine). The first
problem raises :class:`PreflightError` naming the file, field or row and what to do; nothing
on disk is changed (the writability probe creates and removes one temporary file). The
:class:`~services.controller.Trainer` keeps its own checks, since it also runs without the
command line.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from services.config import TrainConfig

if TYPE_CHECKING:
    from services.plan import MemoryPlan

# A checkpoint holds the model, its optimizer state (AdamW: two moments) and small files.
CHECKPOINT_FACTOR = 3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


class PreflightError(ValueError):
    """The run cannot start as configured; the message names what and where."""


@dataclass
class Plan:
    """What preflight found: what the run will load, and how big it is."""

    model_dir: Path
    weights_bytes: int
    vocab_size: int
    tasks: dict[str, int] = field(default_factory=dict)  # train split: task -> prompts
    checkpoint: Path | None = None  # the checkpoint a resumed run starts from
    memory: MemoryPlan | None = None  # per-rank learner and rollout memory (services.plan)


# ---------------------------------------------------------------------------- model


def check_model_dir(model_dir: str | Path, what: str = "model.path") -> tuple[dict, int]:
    """``config.json`` valid, weight files complete; returns (the config dict, weight bytes)."""
    path = Path(model_dir)
    if not path.exists():
        raise PreflightError(f"{what} {str(path)!r} does not exist; build the tiny model with "
                             f"`harpo init-tiny DIR` or point {what} at a Hugging Face model "
                             f"directory")
    if not path.is_dir():
        raise PreflightError(f"{what} {str(path)!r} is a file, not a Hugging Face model "
                             f"directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise PreflightError(
            f"{what} {str(path)!r} is not a Hugging Face model directory (no config.json); "
            f"build the tiny one with `harpo init-tiny DIR`")
    try:
        model_config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PreflightError(f"{config_file} is not valid JSON ({exc}); restore the model's "
                             f"config.json") from None
    if not isinstance(model_config, dict):
        raise PreflightError(f"{config_file} must hold a JSON object, got "
                             f"{type(model_config).__name__}")
    return model_config, _check_weights(path)


def _check_weights(path: Path) -> int:
    safetensors = sorted(path.glob("*.safetensors"))
    others = sorted([*path.glob("pytorch_model*.bin"), *path.glob("*.pt")])
    if not safetensors and not others:
        raise PreflightError(f"no weight files (*.safetensors, pytorch_model*.bin) in {path}; "
                             f"the model directory is incomplete")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            wanted = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise PreflightError(f"{index} is not a valid weight index ({exc})") from None
        missing = sorted(w for w in wanted if not (path / w).is_file())
        if missing:
            raise PreflightError(f"{index} names weight file(s) missing from {path}: "
                                 f"{', '.join(missing)}")
    from safetensors import safe_open

    total = 0
    for file in safetensors:
        try:  # reads the header and checks that the tensors' bytes are all there
            with safe_open(str(file), framework="numpy") as handle:
                handle.keys()
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError: both mean unusable
            raise PreflightError(f"weight file {file} is unreadable or truncated ({exc}); "
                                 f"copy or download the model again") from None
        total += file.stat().st_size
    for file in others:
        if file.stat().st_size == 0:
            raise PreflightError(f"weight file {file} is empty; copy the model again")
        total += file.stat().st_size
    return total


def load_tokenizer(model_dir: str | Path, model_config: dict, trust_remote_code: bool = False):
    """The model's tokenizer, refused when it is empty or larger than the model's vocabulary."""
    from transformers import AutoTokenizer

    path = Path(model_dir)
    present = [name for name in TOKENIZER_FILES if (path / name).is_file()]
    if not present:
        raise PreflightError(
            f"no tokenizer files in {path} (expected one of {', '.join(TOKENIZER_FILES)}); "
            f"copy the tokenizer into the model directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path),
                                                  trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any failure to load is the same problem here
        raise PreflightError(f"the tokenizer in {path} does not load: "
                             f"{type(exc).__name__}: {exc}") from None
    size = len(tokenizer)
    if size <= len(set(tokenizer.all_special_tokens)) or not tokenizer(
            "a b c", add_special_tokens=False)["input_ids"]:
        raise PreflightError(f"the tokenizer in {path} is empty ({size} tokens; files there: "
                             f"{', '.join(present)}); copy the model's tokenizer files again")
    vocab = model_config.get("vocab_size")
    if isinstance(vocab, int) and size > vocab:
        raise PreflightError(
            f"the tokenizer in {path} has {size} tokens but the model's vocab_size is {vocab} "
            f"(config.json): token ids would fall outside the embedding; the tokenizer and the "
            f"weights belong to different models")
    return tokenizer


def _check_context(config: TrainConfig, model_config: dict) -> None:
    context = model_config.get("max_position_embeddings")
    need = config.data.max_prompt_tokens + config.rollout.max_new_tokens
    if isinstance(context, int) and need > context:
        raise PreflightError(
            f"data.max_prompt_tokens + rollout.max_new_tokens = {need} exceeds the model's "
            f"context of {context} tokens")


# ---------------------------------------------------------------------------- data


def load_data(config: TrainConfig, split: str):
    """Read and validate ``split`` as the trainer will; returns its PromptSet."""
    from services.prompts import load_split

    try:
        return load_split(config, split)
    except (ValueError, OSError) as exc:  # missing shards, unreadable parquet, bad rows
        raise PreflightError(str(exc)) from None


def check_prompt_lengths(config: TrainConfig, tokenizer, prompts, split: str,
                         model_dir: str | Path | None = None) -> None:
    """Tokenize every prompt with the chat template, as the trainer will, and check lengths;
    prompts with media (one placeholder per item) first need a model that takes them."""
    from services.chat import tokenize_prompts
    from services.prompts import check_prompt_lengths as check

    try:
        media = None
        if prompts.media is not None:
            from services.media_inputs import media_counts
            from services.model_loading import check_media_supported

            media = media_counts(prompts)
            if model_dir is not None:
                check_media_supported(model_dir, {k: sum(1 for m in media if m.get(k))
                                                  for k in ("image", "audio", "video")})
        check(tokenize_prompts(tokenizer, prompts.prompts, media), config.data.max_prompt_tokens,
              split)
    except ValueError as exc:  # DataError, or media the model cannot take
        raise PreflightError(str(exc)) from None


# ---------------------------------------------------------------------------- sizes


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_memory(config: TrainConfig, model_config: dict) -> dict[str, int]:
    """Rough peak bytes of one rollout request and one learner forward/backward pass.

    Superseded by the memory plan (:mod:`services.plan`, which preflight checks); kept for
    its test (tests/services/test_preflight.py) until that test moves to the plan."""
    r, d, lr = config.rollout, config.data, config.learner
    tokens = d.max_prompt_tokens + r.max_new_tokens
    vocab = int(model_config.get("vocab_size") or 32000)
    hidden = int(model_config.get("hidden_size") or 4096)
    layers = int(model_config.get("num_hidden_layers") or 32)
    chunk = r.prompts_per_request or -(-d.prompts_per_step // r.workers)
    rollout_seqs = chunk * r.group_size
    # KV cache of every sequence plus one row of logits per sequence, float32
    rollout = rollout_seqs * (tokens * 2 * layers * hidden + vocab) * 4
    micro = lr.micro_batch_size or lr.mini_batch_prompts * r.group_size // lr.workers
    # a token budget caps a pass's padded tokens, but a longer row still goes whole
    pass_tokens = micro * tokens
    if lr.micro_batch_tokens is not None:
        pass_tokens = min(pass_tokens, max(lr.micro_batch_tokens, tokens))
    # logits, their log-softmax and its gradient (of one chunk when chunked), plus
    # activations, float32
    logit_tokens = min(pass_tokens, lr.logprob_chunk_tokens or pass_tokens)
    learner = (logit_tokens * 3 * vocab + pass_tokens * 4 * layers * hidden) * 4
    return {"rollout_request": rollout, "learner_pass": learner,
            "rollout_sequences": rollout_seqs, "learner_sequences": micro,
            "learner_pass_tokens": pass_tokens}


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_memory(config: TrainConfig, model_dir: str | Path, memory: int | None = None,
                 gpu_probe=None):
    """The run's memory plan (:mod:`services.plan`), refused when it cannot fit: GPU actors
    against their device memory, CPU actors against this machine's (``memory``, default its
    physical memory). Returns the :class:`~services.plan.MemoryPlan`."""
    from services.plan import PlanError, local_gpu_memory, plan_memory

    memory = _physical_memory() if memory is None else memory
    try:
        plan = plan_memory(config, model_dir, gpu_probe=gpu_probe or local_gpu_memory,
                           host_memory=memory)
        plan.check()
    except PlanError as exc:
        raise PreflightError(str(exc)) from None
    return plan


# ---------------------------------------------------------------------------- output, ports


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def check_output_dir(path: str | Path, need_bytes: int = 0, what: str = "run.output_dir"
                     ) -> None:
    """A directory (or creatable), writable, with ``need_bytes`` free; changes nothing."""
    path = Path(path).absolute()
    base = _existing_ancestor(path)
    if not base.is_dir():
        where = "" if base == path else f" ({base} is a file)"
        raise PreflightError(f"{what} {str(path)!r} cannot be a directory{where}; choose "
                             f"another path or remove the file")
    try:  # the only way to know a file system takes writes (read-only mounts, ACLs, quotas)
        fd, probe = tempfile.mkstemp(prefix=".harpo-probe-", dir=base)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        reason = {errno.EROFS: "the file system is read-only",
                  errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                  errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is full",
                  }.get(exc.errno, exc.strerror or str(exc))
        raise PreflightError(f"{what} {str(path)!r} is not writable: {reason} (at {base}); "
                             f"choose another directory") from None
    free = shutil.disk_usage(base).free
    if free < need_bytes:
        raise PreflightError(
            f"{what} {str(path)!r} has {_gib(free)} free, less than one checkpoint needs "
            f"(about {_gib(need_bytes)}: {CHECKPOINT_FACTOR} × the model's weights); free some "
            f"space or choose another directory")


def check_port(host: str, port: int | None, field_name: str) -> None:
    """A fixed port (not None, not 0) must be free to bind on ``host``."""
    if not port:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise PreflightError(
                f"{field_name} {port} on {host} cannot be bound ({exc.strerror}): another "
                f"process (another harpo run?) uses it; set {field_name} to a free port, 0 "
                f"(any free port) or null (off)") from None


# ---------------------------------------------------------------------------- all of it


def preflight(config: TrainConfig, *, resume: bool = False, splits: tuple[str, ...] | None = None,
              ports: bool = True, output: bool = True) -> Plan:
    """Check everything ``config`` needs before the run starts; raise PreflightError.

    ``resume``: the model comes from the run directory's latest valid checkpoint (there must
    be one). ``splits``: the data splits to check (default: the train split, and the eval
    split too when ``run.eval_every`` evaluates during the run).
    """
    config = config.with_absolute_paths()
    checkpoint = None
    model_dir = config.model.path
    if resume:
        from services.checkpoint_store import latest_checkpoint
        from services.run_dir import RunDir

        run_dir = RunDir(config.run.output_dir)
        # the run directory's, or the newest in run.checkpoint_uri (downloaded into it)
        uri = config.run.checkpoint_uri if output else None
        checkpoint = latest_checkpoint(run_dir, uri)
        if checkpoint is None:
            where = f" or in {uri}" if uri else ""
            raise PreflightError(f"no valid checkpoint under {run_dir.checkpoints}{where} to "
                                 f"resume from; start the run without --resume")
        model_dir = checkpoint / "model"
    # cheap checks first (files, headers, data, disk, ports), then the memory plan and the
    # tokenizer: importing transformers and tokenizing every prompt is the slow part
    model_config, weights = check_model_dir(model_dir)
    _check_context(config, model_config)
    if splits is None:
        splits = (config.data.train_split,)
        if config.run.eval_every:
            splits += (config.data.eval_split,)
    data = {split: load_data(config, split) for split in dict.fromkeys(splits)}
    if output:
        check_output_dir(config.run.output_dir, CHECKPOINT_FACTOR * weights)
    if ports:
        check_port(config.observability.metrics_host, config.observability.metrics_port,
                   "observability.metrics_port")
        check_port(config.control.host, config.control.port, "control.port")
    # the memory plan reads config.json with transformers' AutoConfig: after the checks that
    # need no transformers, before the tokenizer (which imports it anyway)
    memory = check_memory(config, model_dir)
    tokenizer = load_tokenizer(model_dir, model_config, config.model.trust_remote_code)
    for split, prompts in data.items():
        check_prompt_lengths(config, tokenizer, prompts, split, model_dir)
    train = data.get(config.data.train_split)
    tasks = train.task_counts() if train is not None else {}
    return Plan(model_dir=Path(model_dir), weights_bytes=weights,
                vocab_size=int(model_config.get("vocab_size") or 0), tasks=tasks,
                checkpoint=checkpoint, memory=memory)
