"""GRPO + HARPO modulation: vectorised (harpo_core) against a per-rollout Python loop.

Workload: 10 tasks, groups of 8, binary-ish rewards (some groups all-equal), a fresh batch each
step so the EMA state evolves. Both sides compute the same thing from the same arrays: GRPO
advantages, then the HARPO update and the modulated advantages. Times are medians over steps.

    python benchmarks/modulation.py [--sizes 4096 65536 262144] [--repeats 15]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the oracle lives in tests/

from harpo_core import make_estimator  # noqa: E402
from tests.core.naive import NaiveHarpo, naive_grpo  # noqa: E402

TASKS = [f"task{i}" for i in range(10)]
GROUP_SIZE = 8


def make_batch(n_rollouts: int, rng: np.random.Generator):
    n_groups = n_rollouts // GROUP_SIZE
    group_ids = np.repeat(np.arange(n_groups), GROUP_SIZE)
    task_of_group = rng.integers(0, len(TASKS), n_groups)
    task_codes = task_of_group[group_ids]
    # per-task success rate, so tasks differ in how many groups carry signal
    p = (np.arange(len(TASKS)) + 1) / (len(TASKS) + 2)
    rewards = (rng.random(group_ids.size) < p[task_codes]).astype(np.float64)
    return rewards, group_ids, task_codes


def time_vectorised(batches) -> list[float]:
    est = make_estimator("harpo")
    times = []
    for step, (r, g, t) in enumerate(batches):
        t0 = time.perf_counter()
        out = est.compute(r, g, t, step=step, task_names=TASKS)
        times.append(time.perf_counter() - t0)
        assert np.isfinite(out.advantages).all()
    return times


def time_naive(batches) -> list[float]:
    mod = NaiveHarpo()
    times = []
    for r, g, t in batches:
        r, g, t = r.tolist(), g.tolist(), t.tolist()
        t0 = time.perf_counter()
        mod.update(t, g, naive_grpo(r, g))
        times.append(time.perf_counter() - t0)
    return times


def check_agreement(batches) -> float:
    est, naive = make_estimator("harpo"), NaiveHarpo()
    worst = 0.0
    for step, (r, g, t) in enumerate(batches):
        fast = est.compute(r, g, t, step=step, task_names=TASKS).advantages
        slow, _ = naive.update(t.tolist(), g.tolist(), naive_grpo(r.tolist(), g.tolist()))
        worst = max(worst, float(np.max(np.abs(fast - np.asarray(slow)))))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 65536, 262144])
    parser.add_argument("--repeats", type=int, default=15, help="vectorised steps per size")
    parser.add_argument("--naive-repeats", type=int, default=3, help="naive steps per size")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    print(f"# {platform.processor() or platform.machine()}, numpy {np.__version__}, "
          f"python {platform.python_version()}")
    print(f"max |vectorised - naive| over 3 steps of 4096 rollouts: "
          f"{check_agreement([make_batch(4096, rng) for _ in range(3)]):.2e}")
    print(f"{'rollouts':>9} {'vectorised ms':>14} {'naive ms':>10} {'speed-up':>9}")
    for n in args.sizes:
        batches = [make_batch(n, rng) for _ in range(max(args.repeats, args.naive_repeats))]
        fast = statistics.median(time_vectorised(batches[: args.repeats]))
        slow = statistics.median(time_naive(batches[: args.naive_repeats]))
        print(f"{n:>9} {fast * 1e3:>14.2f} {slow * 1e3:>10.1f} {slow / fast:>8.0f}x")


if __name__ == "__main__":
    main()
