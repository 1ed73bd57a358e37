"""The rollout worker: a Ray actor that owns a backend and turns prompts into rollout batches."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import torch

from harpo_core.schema import GENERATION_SCHEMA
from services.devices import cpu_only
from services.rollout.backend import Generation, SamplingParams
from services.rollout.registry import make_backend
from services.weight_sync import WeightHandle, make_weight_sync

TORN = -1  # the version of a worker whose weights a failed streaming load left half-updated


class StalePolicyError(RuntimeError):
    """A worker was asked to serve a policy version it does not hold."""


@dataclass
class RolloutRequest:
    """A slice of one step's prompts; every per-prompt field has one entry per prompt."""

    step: int
    seed: int
    policy_version: int
    prompt_indices: np.ndarray  # [P] rows in the prompt set
    group_ids: np.ndarray  # [P]
    task_codes: np.ndarray  # [P]
    task_names: tuple[str, ...]  # names of all task codes
    task_types: tuple[str, ...]  # type of each task code
    answers: list[str]  # [P]
    prompt_ids: list[list[int]]  # [P] chat-templated prompt tokens
    # ObjectRef of the split's MediaRows (services.media_inputs) when its prompts have media:
    # the worker reads rows prompt_indices from it; None for text-only data
    media: object = None


def _list_array(flat: np.ndarray, lengths: np.ndarray, value_type) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=value_type))


def token_columns(prompt_ids: list[list[int]], gen: Generation, n: int) -> dict[str, pa.Array]:
    """The token columns of a generation, one row per rollout (each prompt's ``n`` samples in
    turn): ``prompt_ids``, ``response_ids`` and ``response_logprobs`` - what
    ``harpo_core.schema.to_learner_tensors`` needs."""
    prompt_lengths = np.array([len(p) for p in prompt_ids])
    prompt_flat = np.concatenate([np.tile(np.asarray(p, dtype=np.int32), n)
                                  for p in prompt_ids])
    tokens, logprobs = gen.flat()
    return {
        "prompt_ids": _list_array(prompt_flat, np.repeat(prompt_lengths, n), pa.int32()),
        "response_ids": _list_array(tokens.astype(np.int32), gen.lengths, pa.int32()),
        "response_logprobs": _list_array(logprobs, gen.lengths, pa.float32()),
    }


def build_batch(request: RolloutRequest, gen: Generation, texts: list[str], n: int,
                worker: str) -> pa.RecordBatch:
    """Arrow rollout batch (GENERATION_SCHEMA) for a request and its generation, vectorised.

    ``rollout_id`` = group id × ``n`` + sample index: with group ids the prompts' positions in
    the step, a step's rollout ids are 0..N-1 in request order.
    """
    per_row = lambda a: np.repeat(np.asarray(a), n)  # noqa: E731 - prompt field -> rollout rows
    task_codes = per_row(request.task_codes).astype(np.int32)
    rows = task_codes.size
    group_ids = per_row(request.group_ids).astype(np.int64)
    arrays = {
        "prompt_index": pa.array(per_row(request.prompt_indices), pa.int64()),
        "group_id": pa.array(group_ids, pa.int64()),
        "rollout_id": pa.array(group_ids * n + np.tile(np.arange(n), rows // n), pa.int64()),
        "task_code": pa.array(task_codes, pa.int32()),
        "task": pa.array(np.asarray(request.task_names, dtype=object)[task_codes], pa.string()),
        "task_type": pa.array(np.asarray(request.task_types, dtype=object)[task_codes],
                              pa.string()),
        "answer": pa.array(per_row(np.asarray(request.answers, dtype=object)), pa.string()),
        **token_columns(request.prompt_ids, gen, n),
        "response_text": pa.array(texts, pa.string()),
        "finish_reason": pa.array(gen.finish_reasons, pa.string()),
        "policy_version": pa.array(np.full(rows, request.policy_version), pa.int64()),
        "worker": pa.array([worker] * rows, pa.string()),
    }
    return pa.RecordBatch.from_arrays([arrays[f.name] for f in GENERATION_SCHEMA],
                                      schema=GENERATION_SCHEMA)


@ray.remote
class RolloutWorker:
    """Generates groups of responses with the policy version it was last given."""

    def __init__(self, name: str, backend: str, model_dir: str, params: SamplingParams,
                 torch_threads: int = 1, options: dict | None = None,
                 initial_version: int = 0, weight_sync: str = "object_store"):
        options = dict(options or {})
        self._media_options = options.pop("media", None)  # data.format hba: decode bounds
        self._media = None  # MediaInputs, built at the first request with media
        self._media_rows: tuple = (None, None)  # (ObjectRef, MediaRows) of the last split
        if not options.get("gpus"):
            cpu_only()  # rollout.gpus_per_worker 0: no GPU, even where one is visible
        torch.set_num_threads(torch_threads)
        self.name = name
        self.model_dir = model_dir
        self.params = params
        self.backend = make_backend(backend, model_dir, options)
        if options.get("colocate") and not all(hasattr(self.backend, m)
                                               for m in ("sleep", "wake_up")):
            raise ValueError(f"rollout.colocate needs a backend that can sleep; rollout "
                             f"backend {backend!r} has no sleep() / wake_up()")
        self._weight_sync = make_weight_sync(weight_sync)  # rollout.weight_sync
        self.version = initial_version
        self.loads = 0  # weight versions loaded
        self.asleep = False
        self.sleeps = 0  # times put to sleep (rollout.colocate)

    def ready(self) -> dict:
        return {"name": self.name, "version": self.version, "pid": os.getpid(),
                "loads": self.loads, "asleep": self.asleep, "sleeps": self.sleeps}

    def sleep(self) -> None:
        """Release the accelerator while a colocated learner updates (``rollout.colocate``).
        The next weight load or generation wakes the backend first."""
        if not self.asleep:
            self.backend.sleep()
            self.asleep, self.sleeps = True, self.sleeps + 1

    def _wake(self) -> None:
        if self.asleep:
            self.backend.wake_up()
            self.asleep = False

    def set_weights(self, version: int, handle: WeightHandle) -> float:
        """Receive a policy version through the weight sync and load it; returns the seconds
        it took (receiving and waking included)."""
        t0 = time.perf_counter()
        self._wake()
        load_stream = getattr(self.backend, "load_weight_stream", None)
        stream = self._weight_sync.receive_stream(handle) if load_stream else None
        if stream is not None:
            # a stream broken part-way leaves some layers new: serve nothing until a full load
            self.version = TORN
            load_stream(*stream)
        else:
            self.backend.load_weights(self._weight_sync.receive(handle))
        self.version = version
        self.loads += 1
        return time.perf_counter() - t0

    def generate(self, request: RolloutRequest, params: SamplingParams | None = None
                 ) -> pa.RecordBatch:
        if request.policy_version != self.version:
            raise StalePolicyError(
                f"worker {self.name} holds policy version {self.version} but the request is "
                f"for version {request.policy_version}; sync weights before serving"
            )
        params = params or self.params
        self._wake()
        if request.media is not None:
            gen, prompt_ids = self._generate_media(request, params)
            request = dataclasses.replace(request, prompt_ids=prompt_ids)
        else:
            gen = self.backend.generate(request.prompt_ids, params, seed=request.seed)
        keep = np.arange(gen.token_ids.shape[1])[None, :] < gen.lengths[:, None]
        texts = self.backend.decode([row[m].tolist() for row, m in zip(gen.token_ids, keep)])
        return build_batch(request, gen, texts, params.n, self.name)

    def _generate_media(self, request: RolloutRequest, params: SamplingParams
                        ) -> tuple[Generation, list[list[int]]]:
        """Generate for prompts with media: each row's media are read from the split's shared
        table, decoded (cached) and processed here; returns the generation and the prompt ids
        the model saw (placeholders expanded), which go into the rollout batch."""
        from harpo_core.media import MediaLimits
        from services.media_inputs import MediaInputs, media_prompts

        generate = getattr(self.backend, "generate_media", None)
        if generate is None:
            raise ValueError(f"rollout backend {type(self.backend).__name__} cannot generate "
                             f"for prompts with media; use rollout.backend: hf")
        if self._media is None:
            opts = self._media_options or {}
            self._media = MediaInputs(self.model_dir, MediaLimits(**opts.get("limits", {})),
                                      opts.get("cache_bytes", 256 * 2**20))
        if self._media_rows[0] != request.media.hex():  # once per split, not per request
            self._media_rows = (request.media.hex(), ray.get(request.media))
        prompts = media_prompts(self._media, self._media_rows[1], request.prompt_indices,
                                request.prompt_ids)
        gen, seen = generate(prompts, params, seed=request.seed,
                             placeholders=tuple(self._media.token_ids.values()))
        return gen, seen

    def shutdown(self) -> None:
        self.backend.shutdown()
