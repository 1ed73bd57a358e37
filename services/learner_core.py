"""Torch-only learner: PPO/GRPO policy updates of a Hugging Face causal LM.

``LearnerCore(model_dir, config)`` owns the policy, an optional frozen reference copy, AdamW
and the LR schedule; it reads its knobs from the validated run configuration
(:class:`services.config.TrainConfig`). It knows nothing about Ray; an actor wraps one instance
per rank.

Data parallelism: with ``world_size > 1`` the caller has already initialised
``torch.distributed`` and gives every rank its share of the batch: rows ``rank::world_size``
(:func:`shard_batch`; the learner actors fetch exactly those rows, see
:mod:`services.learner`). The distributed part — wrapping the model, skipping gradient sync
between micro-batches, publishing and checkpointing the weights — is a learner strategy
(``learner.strategy``, :mod:`services.learner_strategies`; ``ddp`` by default). Each rank
scales its loss so that the averaged gradient equals the gradient of the loss over the whole
global mini-batch, making N ranks take the same optimizer steps as one rank with the whole
batch (see ``_train_mini_batch``).

Forward passes: with ``learner.shared_prompt_forward`` (the default) the rows of a batch that
share a prompt — a GRPO group — go through the model as one packed row, so each prompt is
computed once per group instead of once per response (:mod:`harpo_core.packing`; same log-probs
to float rounding). Without it every row runs on its own, for attention backends that take no
4D mask.

Checkpoints hold only safetensors and JSON: nothing is ever unpickled.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F

from harpo_core.losses import policy_loss
from harpo_core.micro_batches import Padding, plan_micro_batches, split_to_count
from services.learner_forward import PolicyLogprobs
from services.learner_mismatch import MismatchGaps, learner_mismatch_rule
from services.learner_optim import cast_master_weights, make_optimizer
from services.learner_strategies import make_strategy
from services.model_loading import load_model

if TYPE_CHECKING:
    from services.config import TrainConfig

BATCH_KEYS = ("input_ids", "attention_mask", "response_mask", "old_logprobs", "advantages")
# Token-weighted statistics reported by policy_loss (plus entropy, added by the learner).
TOKEN_STATS = ("clip_frac", "approx_kl", "ratio_mean", "entropy", "kl")
TIS_STATS = ("tis_weight_mean", "tis_truncated_frac")  # with learner.tis_cap


def shard_batch(batch: dict[str, torch.Tensor], rank: int, world_size: int) -> dict:
    """Rows ``rank, rank + world_size, ...`` of every tensor in ``batch``.

    Striding (rather than contiguous halves) puts an equal share of every global mini-batch on
    every rank: local mini-batch ``j`` of each rank holds exactly the rows of global mini-batch
    ``j``, provided ``mini_batch_size`` and the batch size are multiples of ``world_size``.
    """
    return {key: value[rank::world_size] for key, value in batch.items()}


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: expected {allowed}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class LogprobMismatchError(RuntimeError):
    """Rollout log-probs and the learner's own disagree beyond tolerance."""


class LearnerCore:
    """Policy + optimizer for clipped policy-gradient updates on one rank.

    Every knob comes from the validated run configuration ``config`` (a
    :class:`services.config.TrainConfig`); only what the configuration cannot know is checked
    here: ``rank`` / ``world_size`` (and, through the strategy, the process group) and the
    shapes of each batch.

    * ``learner.mini_batch_prompts × rollout.group_size`` sequences per optimizer step, over
      all ranks together; ``learner.micro_batch_size`` (per rank, default: the whole local
      mini-batch) only bounds memory through gradient accumulation and does not change the
      result; nor does ``learner.micro_batch_tokens`` (padded tokens per micro-batch).
    * The strategy wraps the forward module (:mod:`services.learner_forward`; chunked with
      ``learner.logprob_chunk_tokens``); ``learner.tis_cap``: see ``policy_loss``.
    * ``learner.strategy`` (:mod:`services.learner_strategies`) wraps the model for the ranks.
    * The loss knobs are ``learner.loss_config()``; ``kl_coef > 0`` loads a frozen reference
      copy of the initial model: ``reference_dir`` (a resumed run passes the model it started
      from, ``model.path``, while ``model_dir`` is the checkpoint), else ``model_dir``.
    * ``rollout.temperature`` is the rollouts' sampling temperature: every log-prob, ratio, KL
      and entropy is that of ``softmax(logits / temperature)``, the distribution the rollouts
      were drawn from.
    * The learning-rate schedule advances once per :meth:`update` (one RL step), however many
      optimizer steps its mini-batches and epochs take: ``learner.warmup_steps`` and
      ``run.steps`` (the end of a decaying schedule) count RL steps.

    Dropout stays off (the model is kept in eval mode) so that on-policy ratios are exactly 1.
    """

    def __init__(self, model_dir: str, config: TrainConfig, *, rank: int = 0,
                 world_size: int = 1, device: str = "cpu", reference_dir: str | None = None):
        learner = config.learner
        mini_batch_size = learner.mini_batch_prompts * config.rollout.group_size
        _check(_is_int(world_size) and world_size >= 1, "world_size", world_size, "an int >= 1")
        _check(_is_int(rank) and 0 <= rank < world_size, "rank", rank, f"in [0, {world_size})")
        _check(mini_batch_size % world_size == 0, "world_size", world_size,
               f"a divisor of the {mini_batch_size} sequences of a mini-batch "
               f"(learner.mini_batch_prompts × rollout.group_size)")

        self.mini_batch_size = mini_batch_size
        self.micro_batch_size = learner.micro_batch_size
        self.micro_batch_tokens = learner.micro_batch_tokens
        self.max_grad_norm = learner.max_grad_norm
        self.ppo_epochs = learner.ppo_epochs
        self.loss = learner.loss_config()
        self.mismatch_rule = learner_mismatch_rule(config, model_dir)
        self.shared_prompt = learner.shared_prompt_forward
        self.temperature = config.rollout.temperature
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.strategy = make_strategy(learner.strategy, rank=rank, world_size=world_size,
                                      device=self.device, dtype=learner.dtype,
                                      activation_checkpointing=learner.activation_checkpointing)

        torch.manual_seed(config.run.seed)
        self.model = self._load_model(model_dir)
        forward = dict(temperature=self.temperature, chunk_tokens=learner.logprob_chunk_tokens,
                       shared_prompt=self.shared_prompt)
        self.ref_model = self.ref_policy = None  # kl_coef = 0: no reference model at all
        if self.loss.kl_coef > 0:  # placed (sharded) like the policy, no optimizer
            self.ref_model = self._load_model(reference_dir or model_dir)
            self.ref_policy = self.strategy.wrap_reference(PolicyLogprobs(self.ref_model,
                                                                          **forward))
        attention = getattr(self.model.config, "_attn_implementation", None) or "eager"
        if self.shared_prompt and attention not in ("eager", "sdpa"):
            raise ValueError(
                f"shared-prompt forward passes need eager or sdpa attention (a 4D mask); this "
                f"model uses {attention!r}: set learner.shared_prompt_forward: false")
        # One module computes the log-probs from the ids: it is what the strategy wraps (a
        # sharded root gathers the head inside its forward); .model keeps the HF names.
        self.policy = PolicyLogprobs(self.model, **forward)
        self.token_stats = TOKEN_STATS + (TIS_STATS if self.loss.tis_cap is not None else ())
        self.bf16_state = learner.master_weights == "bfloat16_stochastic"
        cast_master_weights(self.model, config)  # bf16 master weights: before wrapping
        self.train_model = self.strategy.wrap(self.policy)
        stream = 0 if self.strategy.replicated else rank  # stochastic rounding's bits
        self.optimizer, self.scheduler = make_optimizer(self.model, config, stream=stream)
        # prompts with media (services.learner_media): the builder that adds what the model
        # derives from the ids, and the media tensors of this update's prompts by row index
        self.media_inputs = None
        self._media: dict[int, dict] = {}

    def _load_model(self, model_dir):
        """fp32 on CPU: the strategy moves (or shards) it onto the device."""
        return load_model(model_dir, dtype=torch.float32).eval()

    # ----------------------------------------------------------------- log-probs

    def _forward(self, policy, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Token log-probs ``[B, T]`` (valid on ``response_mask``) and the entropy ``[N]`` of
        each distribution that predicted a response token (rows in order, tokens in order)."""
        return policy(batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                      **batch.get("media", {}))

    def _micro_batches(self, batch, max_rows, *, ranks_agree: bool = False) -> list[dict]:
        """``batch`` cut into micro-batches of at most ``max_rows`` rows and, with
        ``learner.micro_batch_tokens``, of at most that many padded tokens, each cut to its
        longest row (rows stay in order; a longer row goes alone). ``ranks_agree`` (every
        rank calls it): as many micro-batches on every rank."""
        n = len(batch["input_ids"])
        if self._media and "prompt_index" in batch:  # prompts with media: by signature
            from services.learner_media import media_micro_batches

            return media_micro_batches(self, batch, max_rows, ranks_agree=ranks_agree)
        if self.micro_batch_tokens is None:
            size = max_rows or n
            return [{k: v[start:start + size] for k, v in batch.items()}
                    for start in range(0, n, size)]
        lengths = batch["attention_mask"].sum(-1).tolist()
        plan = plan_micro_batches(lengths, max_rows=max_rows, max_tokens=self.micro_batch_tokens)
        if ranks_agree and self.world_size > 1:  # every rank runs as many passes
            count = torch.tensor([len(plan)], dtype=torch.float64, device=self.device)
            plan = split_to_count(plan, lengths, int(self._global_sum(count, dist.ReduceOp.MAX)))
        return [{k: v[start:end, :width] if v.dim() == 2 else v[start:end]
                 for k, v in batch.items()} for start, end, width in plan]

    @torch.no_grad()
    def compute_logprobs(self, batch: dict, micro_batch_size: int | None = None) -> torch.Tensor:
        """Log-probs ``[B, T]`` of ``batch["input_ids"]`` under the current policy (on CPU),
        at every position (one plain forward pass per row)."""
        return self._logprobs(self.policy, batch, micro_batch_size).cpu()

    @torch.no_grad()
    def compute_ref_logprobs(
        self, batch: dict, micro_batch_size: int | None = None
    ) -> torch.Tensor:
        """Log-probs ``[B, T]`` under the frozen reference model (needs ``kl_coef > 0``)."""
        if self.ref_model is None:
            raise ValueError("compute_ref_logprobs needs a reference model: learner.kl_coef > 0")
        return self._logprobs(self.ref_policy, batch, micro_batch_size).cpu()

    def _logprobs(self, policy, batch, micro_batch_size, *, responses_only: bool = False):
        """Log-probs ``[B, T]`` in micro-batches: at every position, or (``responses_only``,
        within an update: every rank calls it) on ``response_mask`` only, through the
        update's own forward pass (:meth:`_forward`)."""
        width = batch["input_ids"].shape[1]
        batch = {k: v.to(self.device) for k, v in batch.items()}
        chunks, rows = [], []
        size = micro_batch_size or self.micro_batch_size
        for micro in self._micro_batches(batch, size, ranks_agree=responses_only):
            if responses_only:
                logprobs = self._forward(policy, micro)[0]
            else:
                logprobs = policy(micro["input_ids"], micro["attention_mask"],
                                  **micro.get("media", {}))[0]
            chunks.append(F.pad(logprobs, (0, width - logprobs.shape[1])))
            rows.append(micro.get("rows"))
        if rows and rows[0] is not None:  # planned by signature: rows back in batch order
            order = torch.cat(rows)
            return torch.empty_like(torch.cat(chunks)).index_copy_(0, order, torch.cat(chunks))
        return torch.cat(chunks)

    # -------------------------------------------------------------------- update

    def update(self, batch: dict[str, torch.Tensor], *, global_batch_size: int,
               check_mismatch: bool = True, media: dict[int, dict] | None = None
               ) -> dict[str, float]:
        """Run ``ppo_epochs`` passes of mini-batch steps over this rank's share of the batch.

        ``batch`` is this rank's slice (:func:`shard_batch`) of a global batch of
        ``global_batch_size`` sequences. Mini-batches are taken in order, without shuffling.
        Returns metrics that are identical on every rank: token-weighted means of the loss
        statistics, per-step means of ``loss``, ``grad_norm`` and ``lr``, the rollout/learner
        log-prob mismatch on the first mini-batch (measured before any optimizer step), and
        the global ``n_sequences`` / ``n_tokens`` of the batch.

        ``check_mismatch=False`` is for rollouts of an older policy version (asynchronous
        mode): their log-probs differ from the learner's by the updates since, so the gap is
        still measured but is not an error.

        ``media`` (prompts with media): the media tensors of each prompt row that has any,
        keyed by ``batch["prompt_index"]`` (:mod:`services.learner_media`).
        """
        batch = self._check_batch(batch, global_batch_size)
        self._media = media or {}
        try:
            return self._update(batch, check_mismatch)
        finally:
            self._media = {}

    def _update(self, batch, check_mismatch):
        with torch.no_grad():
            if self.ref_model is not None:
                batch["ref_logprobs"] = self._logprobs(self.ref_policy, batch, None,
                                                       responses_only=True)
            if self.loss.tis_cap is not None:  # the learner's own log-probs before the update
                batch["learner_logprobs"] = self._logprobs(self.train_model, batch, None,
                                                           responses_only=True)
        totals = {"steps": 0.0, "skipped_steps": 0.0, "loss": 0.0, "grad_norm": 0.0, "lr": 0.0,
                  "stat_tokens": 0.0, "mismatch": MismatchGaps(),
                  "padded_tokens": 0.0, "real_tokens": 0.0,  # of the passes: padding_waste
                  **{name: 0.0 for name in self.token_stats}}
        local_mini = self.mini_batch_size // self.world_size
        local_size = len(batch["input_ids"])
        for epoch in range(self.ppo_epochs):
            for start in range(0, local_size, local_mini):
                mini = {key: value[start:start + local_mini] for key, value in batch.items()}
                first = epoch == 0 and start == 0
                self._train_mini_batch(mini, totals, measure_mismatch=first,
                                       check_mismatch=first and check_mismatch)
        # The schedule counts updates (RL steps), not optimizer steps - also an update whose
        # every optimizer step was skipped (non-finite gradients), where torch would warn that
        # the scheduler ran before the optimizer: here that order is intended.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            self.scheduler.step()
        totals["n_sequences"] = float(local_size)
        totals["n_tokens"] = float(batch["response_mask"].sum())
        return self._finish_metrics(totals)

    def _check_batch(self, batch, global_batch_size):
        missing = [key for key in BATCH_KEYS if key not in batch]
        if missing:
            raise ValueError(f"batch is missing {missing}; expected keys {BATCH_KEYS}")
        shape = tuple(batch["input_ids"].shape)
        _check(len(shape) == 2 and shape[0] > 0, "input_ids.shape", shape, "[B, T] with B >= 1")
        for key in ("attention_mask", "response_mask", "old_logprobs"):
            got = tuple(batch[key].shape)
            _check(got == shape, f"{key}.shape", got, f"{shape} like input_ids")
        adv_shape = tuple(batch["advantages"].shape)
        allowed = f"{shape[:1]} or {shape}"
        _check(adv_shape in (shape[:1], shape), "advantages.shape", adv_shape, allowed)
        _check(
            global_batch_size == shape[0] * self.world_size,
            "global_batch_size", global_batch_size,
            f"local batch {shape[0]} x world_size {self.world_size} = {shape[0] * self.world_size}",
        )
        keys = BATCH_KEYS + (("prompt_index",) if "prompt_index" in batch else ())
        return {key: batch[key].to(self.device) for key in keys}

    def _global_sum(self, values: torch.Tensor, op=None) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(values, op=op or dist.ReduceOp.SUM)
        return values

    def _train_mini_batch(self, mini, totals, measure_mismatch, check_mismatch):
        """Accumulate gradients over micro-batches, then take one optimizer step.

        Exact data-parallel scaling: let ``N`` be the global normalizer of the mini-batch (the
        number of non-empty sequences for seq-mean-token-mean, of response tokens for
        token-mean), all-reduced across ranks. Each rank's loss is ``sum_local / N``, so the
        ranks' losses add up to the global loss. The strategy (DDP) *averages* gradients over
        ``W`` ranks, so each rank back-propagates ``W * sum_local / N``; the average is then
        exactly the gradient of the global loss. Micro-batches add their ``sum_micro / N``
        terms in the same way, so they change nothing either.
        """
        response_mask = mini["response_mask"].bool()
        counts = torch.stack([(response_mask.sum(-1) > 0).sum(), response_mask.sum()]).double()
        sequences, tokens = self._global_sum(counts).tolist()
        seq_mean = self.loss.aggregation == "seq-mean-token-mean"
        normalizer = max(sequences if seq_mean else tokens, 1.0)

        self.optimizer.zero_grad(set_to_none=True)
        micros = self._micro_batches(mini, self.micro_batch_size, ranks_agree=True)
        for index, micro in enumerate(micros):
            last = index == len(micros) - 1
            each = bool(self._media) and self.strategy.sync_every_pass_with_media
            sync = nullcontext() if last or each else self.strategy.no_sync(self.train_model)
            with sync:
                loss, stats, entropy, logprobs = self._micro_loss(micro, normalizer)
                (loss * self.world_size).backward()
            self._record_micro(micro, stats, entropy, logprobs, loss, totals, measure_mismatch)
        if measure_mismatch:  # every rank takes part: the statistics are global
            totals["mismatch"] = totals["mismatch"].gather(self.world_size, self.device)
        if check_mismatch:
            self._check_mismatch(totals["mismatch"].stats)

        grad_norm = self.strategy.clip_grad_norm(self.model, self.max_grad_norm)
        totals["steps"] += 1
        totals["grad_norm"] += grad_norm.item()
        totals["lr"] += self.optimizer.param_groups[0]["lr"]
        if torch.isfinite(grad_norm):
            self.optimizer.step()
        else:  # the same on every rank: gradients were all-reduced before the norm
            totals["skipped_steps"] += 1
            self.optimizer.zero_grad(set_to_none=True)

    def _check_mismatch(self, stats: dict[str, float]) -> None:
        """Refuse to step when the rollouts' log-probs are not the policy's (all ranks agree:
        the statistics are global).

        Measured on the first mini-batch, before any optimizer step, so the learner's weights
        are exactly those the rollout workers were given: a gap here means the sync or the
        rollout backend is wrong, and training on such rollouts would be silently off-policy.
        The statistic and its threshold fit the dtypes in use (:mod:`harpo_core.mismatch`).
        """
        rule = self.mismatch_rule
        if rule.exceeded(stats):
            self.optimizer.zero_grad(set_to_none=True)
            raise LogprobMismatchError(
                f"rollout log-probs differ from the learner's: {rule.statistic} gap "
                f"{stats[rule.statistic]:.3e} (max {stats['max']:.3e}, p99 {stats['p99']:.3e}, "
                f"mean {stats['mean']:.3e}) breaks {rule.describe()} "
                f"(learner.logprob_mismatch_tolerance): the rollout workers do not serve the "
                f"learner's weights; no update was made")

    def _micro_loss(self, micro, normalizer):
        logprobs, entropy = self._forward(self.train_model, micro)
        old, rollout = micro["old_logprobs"], None
        if self.loss.tis_cap is not None:  # PPO around the learner's own pre-update log-probs
            old, rollout = micro["learner_logprobs"], micro["old_logprobs"]
        loss, stats = policy_loss(
            logprobs, old, micro["advantages"], micro["response_mask"],
            ref_logprobs=micro.get("ref_logprobs"), normalizer=normalizer,
            rollout_logprobs=rollout, **self.loss.kwargs(),
        )
        return loss, stats, entropy, logprobs

    @torch.no_grad()
    def _record_micro(self, micro, stats, entropy, logprobs, loss, totals, measure_mismatch):
        mask = micro["response_mask"].bool()
        n_tokens = float(mask.sum())
        stats["entropy"] = entropy.mean().item() if n_tokens else 0.0
        for name, value in stats.items():
            totals[name] += value * n_tokens
        totals["stat_tokens"] += n_tokens
        totals["padded_tokens"] += micro["attention_mask"].numel()  # rows x width of the pass
        totals["real_tokens"] += float(micro["attention_mask"].sum())
        totals["loss"] += loss.item()  # this rank's share of the global mini-batch loss
        if measure_mismatch and n_tokens > 0:
            totals["mismatch"].add((logprobs.detach() - micro["old_logprobs"])[mask])

    def _finish_metrics(self, totals):
        summed = ["loss", "stat_tokens", "n_sequences", "n_tokens", *self.token_stats,
                  "padded_tokens", "real_tokens"]
        values = torch.tensor(
            [totals[name] for name in summed], dtype=torch.float64, device=self.device
        )
        totals.update(zip(summed, self._global_sum(values).tolist()))
        mismatch = totals["mismatch"].stats  # gathered over the ranks already
        padding = Padding(int(totals["padded_tokens"]), int(totals["real_tokens"]))

        steps = totals["steps"]
        stat_tokens = max(totals["stat_tokens"], 1.0)
        metrics = {name: totals[name] / stat_tokens for name in self.token_stats}
        if self.ref_model is None:
            del metrics["kl"]
        metrics.update(
            loss=totals["loss"] / steps,
            grad_norm=totals["grad_norm"] / steps,
            lr=totals["lr"] / steps,
            logprob_mismatch_max=mismatch["max"],
            logprob_mismatch_mean=mismatch["mean"],
            logprob_mismatch_p99=mismatch["p99"],
            n_sequences=totals["n_sequences"],
            n_tokens=totals["n_tokens"],
            n_steps=steps,
            skipped_steps=totals["skipped_steps"],
            padding_waste=padding.waste,
        )
        return metrics

    # ------------------------------------------------------------ checkpointing

    def full_state_dict(self, dtype: torch.dtype | None = None
                        ) -> dict[str, torch.Tensor] | None:
        """The policy weights as a CPU state dict (HF names) on rank 0, cast to ``dtype`` when
        given (the rollout dtype), e.g. for the rollout workers; call it on every rank (a
        sharded strategy gathers collectively), others get None. Without ``dtype``, bf16
        master weights are published as float32 (exactly: every bf16 value is one), so
        rollout backends and transports get what a float32-state run gives them."""
        if dtype is None and self.bf16_state:
            dtype = torch.float32
        return self.strategy.full_state_dict(self.model, dtype)

    def full_state_dict_view(self) -> dict[str, torch.Tensor] | None:
        """:meth:`full_state_dict` in the learner's dtype without a copy where the strategy
        holds the whole model (``ddp``: the parameters themselves, on the learner's device):
        read it before the next update. For a sender that copies anyway (the ``collective``
        weight sync fills its buckets from it)."""
        return self.strategy.full_state_dict(self.model, copy=False)

    def state_dict_cpu(self) -> dict[str, torch.Tensor]:
        """A CPU copy of this rank's policy weights (unwrapped names), all ranks alike under
        ``ddp`` (under ``fsdp2`` this rank's shards); :meth:`full_state_dict` is the
        strategy-neutral way to publish them."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def save(self, directory: str | Path) -> None:
        """Save the policy (``save_pretrained`` layout) and the optimizer + scheduler state,
        through the strategy: call it on every rank (under ``ddp`` rank 0 writes)."""
        self.strategy.save(self.model, self.optimizer, self.scheduler, directory)

    def load(self, directory: str | Path) -> None:
        """Restore policy weights, optimizer and scheduler written by :meth:`save` (all ranks)."""
        self.strategy.load(self.model, self.optimizer, self.scheduler, directory)
