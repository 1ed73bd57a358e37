"""Baseline: Hugging Face TRL's ``GRPOTrainer`` on the tiny CPU workload, timed per optimizer step.

The point is a like-for-like throughput reference for harpo's own pipeline: same model, same
prompts, same batch shape, same machine (2 CPU cores, no GPU), nothing from the Hub.

Workload of one optimizer step (TRL 1.16, checked against ``trl/trainer/grpo_trainer.py``)
----------------------------------------------------------------------------------------
With ``per_device_train_batch_size = prompts_per_step * group_size``, ``num_generations =
group_size``, ``steps_per_generation = 1``, ``gradient_accumulation_steps = 1``,
``num_iterations = 1``, ``beta = 0`` and ``use_vllm = False``, every ``Trainer`` step does, in
order:

1. ``RepeatSampler`` yields ``prompts_per_step`` distinct prompts, each repeated ``group_size``
   times (fetched just *before* ``on_step_begin``; a dataloader read, negligible).
2. ``_prepare_inputs`` -> ``_generate_and_score_completions`` (inside the timed window):
   tokenize the prompts, left-pad, and call ``model.generate`` once on the whole
   ``prompts_per_step * group_size`` batch (HF generate, sampling with temperature 1, no top-k /
   top-p, dynamic KV cache, ``min_new_tokens = max_new_tokens`` so no completion stops early);
   decode the completions; call the reward function; compute group-normalised advantages.
   **No** separate no-grad log-prob pass: TRL skips ``old_per_token_logps`` when generation and
   optimisation are aligned (grad_accum % (steps_per_generation*num_iterations) == 0) and vLLM is
   off, and uses the detached training log-probs as the "old" ones. No reference model (beta=0).
3. ``compute_loss``: one forward pass with grad over prompt+completion (``logits_to_keep`` =
   completion length), per-token log-softmax, clipped-ratio loss (TRL's default ``loss_type`` =
   ``"dapo"``: token-level mean over the batch), ``backward``.
4. Gradient clipping (``max_grad_norm = 1.0``), ``torch.optim.AdamW`` step
   (``optim = "adamw_torch"``, constant LR), ``zero_grad``.

A ``TrainerCallback`` records ``time.perf_counter()`` at ``on_step_begin`` and ``on_step_end``,
which bracket exactly 2-4 (transformers ``Trainer._inner_training_loop``). Logging, evaluation and
saving are off, so nothing else runs between steps; the wall time between consecutive
``on_step_end`` calls is reported as well (``inclusive_step_time_s_median``) to show that.

Settings that differ from TRL's defaults, chosen for a fair CPU comparison: float32
(``bf16 = fp16 = False``; TRL defaults to bf16), ``gradient_checkpointing = False`` (TRL defaults to
True, which would add a recompute forward), ``use_cpu = True``, ``report_to = "none"``,
``logging_strategy = save_strategy = "no"``, ``disable_tqdm = True``, ``log_completions = False``,
``dataloader_num_workers = 0``. ``torch.set_num_threads(2)``.

TRL also computes per-token entropies from the training logits (logged metric; a small extra
cost inside step 3), and the whole batch is padded to its longest prompt for both generate and the
loss forward, so a step's time follows the longest prompt among its ``prompts_per_step`` (with the
tiny suite: 23-176 prompt tokens, ``topic_long`` being the long ones). Prompt order is fixed by
``seed``, so the per-step pattern repeats from run to run.

``steps`` counts *measured* optimizer steps; ``warmup_steps`` more are run first and discarded
(the first step pays one-time costs: optimizer state allocation, allocator warm-up).

The CPU machine is shared: other processes on its 2 cores inflate step times by up to 10-20x
(thread oversubscription). The result carries the 1-minute load average before and after; only
trust runs where it is low, and time harpo's pipeline back-to-back with this one.

Run as a script (builds the tiny model from ``services/tiny`` in a temp dir)::

    HF_HUB_OFFLINE=1 python -m benchmarks.trl_baseline --steps 6

Needs ``pip install trl`` (tested with trl 1.16.0, accelerate 1.15.0, datasets 5.2.0).
"""

from __future__ import annotations

import os

# Nothing may come from the Hub: set before transformers / huggingface_hub are imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

NUM_THREADS = 2


def _distinct_char_reward(completions, **_) -> list[float]:
    """Trivially cheap reward that still varies within a group (so advantages are non-zero)."""
    return [len(set(c)) / 32.0 for c in completions]


def harpo_reward(max_response_length: int):
    """harpo's own reward (the pipeline's ``RewardComposer``: exact match or sentence
    similarity, format, overlong) as a TRL reward function reading the dataset's ``answer``
    and ``task_type`` columns, so both trainers pay for the same scoring."""
    from harpo_core.rewards import RewardComposer, RewardConfig

    composer = RewardComposer(RewardConfig(max_response_length=max_response_length))

    def reward(completions, completion_ids, answer, task_type, **_):
        result = composer.score(responses=completions, answers=answer, task_types=task_type,
                                response_lengths=[len(ids) for ids in completion_ids])
        return result.total.tolist()

    return reward


def run_trl_grpo(
    model_dir: str,
    prompts: list[str],
    *,
    answers: list[str] | None = None,
    task_types: list[str] | None = None,
    steps: int,
    prompts_per_step: int = 8,
    group_size: int = 8,
    max_new_tokens: int = 16,
    warmup_steps: int = 1,
    seed: int = 0,
) -> dict:
    """Train TRL ``GRPOTrainer`` on CPU for ``warmup_steps + steps`` optimizer steps and time them.

    ``prompts`` are used verbatim as plain-text prompts (apply a chat template beforehand if the
    comparison calls for one). With ``answers`` and ``task_types`` (one per prompt) the reward is
    harpo's own (:func:`harpo_reward`); without them, a trivially cheap stand-in. Each step
    uses ``prompts_per_step`` prompts x ``group_size`` completions of exactly
    ``max_new_tokens`` tokens (``min_new_tokens`` suppresses eos). See the module docstring for
    what one step does.

    Returns ``trl_version``, ``steps`` (measured), ``step_time_s_median`` (on_step_begin ->
    on_step_end), ``steps_per_s`` (1/median), ``rollouts_per_s`` (completions per step / median),
    ``tokens_per_s`` (mean generated completion tokens per step / median), ``step_times`` (the
    measured ones), plus diagnostics.
    """
    if steps < 1 or warmup_steps < 0:
        raise ValueError("steps must be >= 1 and warmup_steps >= 0")
    if group_size < 2:
        raise ValueError("GRPO needs group_size >= 2")
    if not prompts:
        raise ValueError("prompts must not be empty")

    import datasets
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(NUM_THREADS)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()

    total_steps = warmup_steps + steps
    rollouts_per_step = prompts_per_step * group_size
    # Enough rows for every step without wrapping an epoch (RepeatSampler draws without
    # replacement).
    needed = total_steps * prompts_per_step
    order = [i % len(prompts) for i in range(max(needed, len(prompts)))]
    columns = {"prompt": [prompts[i] for i in order]}
    score = _distinct_char_reward
    if answers is not None and task_types is not None:
        columns["answer"] = [answers[i] for i in order]
        columns["task_type"] = [task_types[i] for i in order]
        score = harpo_reward(max_new_tokens)
    train_dataset = datasets.Dataset.from_dict(columns)

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, local_files_only=True, dtype=torch.float32
    )

    # transformers 5.x (seen in 5.23) renamed gradient_checkpointing -> activation_checkpointing;
    # TRL's config still defaults the old name to True, so turn off whichever names exist.
    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    no_checkpointing = {k: False for k in ("activation_checkpointing", "gradient_checkpointing")
                        if k in fields}

    with tempfile.TemporaryDirectory(prefix="trl_grpo_") as out_dir:
        config = GRPOConfig(
            output_dir=out_dir,
            # batch shape: one generation batch == one optimizer step
            per_device_train_batch_size=rollouts_per_step,
            gradient_accumulation_steps=1,
            num_generations=group_size,
            steps_per_generation=1,  # -> generation_batch_size = rollouts_per_step
            num_iterations=1,
            max_steps=total_steps,
            max_completion_length=max_new_tokens,
            generation_kwargs={"min_new_tokens": max_new_tokens},  # no early stop on eos
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            # algorithm: no KL, no reference model, no vLLM
            beta=0.0,
            use_vllm=False,
            learning_rate=1e-5,
            lr_scheduler_type="constant",
            warmup_steps=0,
            optim="adamw_torch",
            max_grad_norm=1.0,
            # numerics / device
            use_cpu=True,
            bf16=False,
            fp16=False,
            **no_checkpointing,
            # no side work
            report_to="none",
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            log_completions=False,
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=seed,
            data_seed=seed,
        )
        assert config.generation_batch_size == rollouts_per_step, config.generation_batch_size
        assert config.steps_per_generation == 1
        assert not config.gradient_checkpointing and not config.bf16 and not config.fp16

        completion_tokens: list[int] = []  # per reward call == per optimizer step
        min_lens: list[int] = []

        def reward(completions, completion_ids, **kw):
            lengths = [len(ids) for ids in completion_ids]
            completion_tokens.append(sum(lengths))
            min_lens.append(min(lengths))
            return score(completions, completion_ids=completion_ids, **kw)

        reward.__name__ = "reward"

        class StepTimer(TrainerCallback):
            def __init__(self):
                self.begin: list[float] = []
                self.end: list[float] = []

            def on_step_begin(self, args, state, control, **kwargs):
                self.begin.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kwargs):
                self.end.append(time.perf_counter())

        timer = StepTimer()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = GRPOTrainer(
                model=model,
                reward_funcs=reward,
                args=config,
                train_dataset=train_dataset,
                processing_class=tokenizer,
                callbacks=[timer],
            )
            assert trainer.ref_model is None
            assert not getattr(trainer.model, "is_gradient_checkpointing", False)
            trainer.remove_callback(PrinterCallback)  # it prints the end-of-training summary
            # Phase split: time TRL's rollout phase (tokenize, generate, decode, reward,
            # advantages); the rest of the step is the loss forward, backward and optimizer step.
            generate_times: list[float] = []
            generate_and_score = trainer._generate_and_score_completions

            def timed_generate_and_score(*a, **kw):
                t = time.perf_counter()
                out = generate_and_score(*a, **kw)
                generate_times.append(time.perf_counter() - t)
                return out

            trainer._generate_and_score_completions = timed_generate_and_score
            load_before = os.getloadavg()[0]
            t0 = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - t0

    if not len(timer.end) == len(completion_tokens) == len(generate_times) == total_steps:
        raise RuntimeError(
            f"expected {total_steps} steps, timed {len(timer.end)}, "
            f"{len(completion_tokens)} generation rounds"
        )
    all_times = [e - b for b, e in zip(timer.begin, timer.end)]
    step_times = all_times[warmup_steps:]
    inclusive = [b - a for a, b in zip(timer.end[warmup_steps - 1:], timer.end[warmup_steps:])] \
        if warmup_steps >= 1 else []
    median = statistics.median(step_times)
    gen_times = generate_times[warmup_steps:]
    update_times = [s - g for s, g in zip(step_times, gen_times)]
    tokens_per_step = statistics.fmean(completion_tokens[warmup_steps:])
    return {
        "trl_version": trl.__version__,
        "steps": steps,
        "step_time_s_median": median,
        "steps_per_s": 1.0 / median,
        "rollouts_per_s": rollouts_per_step / median,
        "tokens_per_s": tokens_per_step / median,
        "step_times": step_times,
        # diagnostics
        "warmup_step_times": all_times[:warmup_steps],
        "step_time_s_min": min(step_times),
        "rollout_phase_s_median": statistics.median(gen_times),
        "update_phase_s_median": statistics.median(update_times),
        "inclusive_step_time_s_median": statistics.median(inclusive) if inclusive else None,
        "rollouts_per_step": rollouts_per_step,
        "completion_tokens_per_step": tokens_per_step,
        "all_completions_full_length": all(m == max_new_tokens for m in min_lens),
        "train_wall_s": wall,
        # 1-minute load average before/after: the CPU machine is shared, and other processes
        # on its 2 cores inflate step times (check these before trusting a number).
        "loadavg_1m_before_after": (load_before, os.getloadavg()[0]),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "n_parameters": sum(p.numel() for p in model.parameters()),
    }


def build_tiny(out_dir: str, *, n_prompts: int = 256, seed: int = 0) -> tuple[str, list[str]]:
    """Build the project's tiny Qwen2 model + tokenizer in ``out_dir``; return it and chat prompts.

    Prompts are drawn round-robin from every task of the synthetic suite and formatted with the
    model's ChatML template (user turn + assistant generation prompt), as harpo's pipeline does.
    """
    from transformers import AutoTokenizer

    from harpo_core.data import load_prompts
    from services.chat import render_prompts
    from services.tiny.model import init_tiny

    data = load_prompts(init_tiny(out_dir, seed=seed).data_dir, "train")
    per_task = -(-n_prompts // len(data.task_names))
    by_task = [data.indices_of_task(c)[:per_task] for c in range(len(data.task_names))]
    raw = [data.prompts[rows[j]] for j in range(per_task) for rows in by_task][:n_prompts]
    model_dir = str(Path(out_dir) / "model")
    return model_dir, render_prompts(AutoTokenizer.from_pretrained(model_dir), raw)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(NUM_THREADS)
    with tempfile.TemporaryDirectory(prefix="tiny_trl_") as tmp:
        model_dir, prompts = build_tiny(tmp, seed=args.seed)
        result = run_trl_grpo(
            model_dir, prompts, steps=args.steps, prompts_per_step=args.prompts_per_step,
            group_size=args.group_size, max_new_tokens=args.max_new_tokens,
            warmup_steps=args.warmup_steps, seed=args.seed,
        )
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
