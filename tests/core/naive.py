"""A plain-Python, loop-per-rollout implementation of GRPO + HARPO.

Written to be obviously right rather than fast: dictionaries and for-loops that follow the
maths of ``harpo_core/modulator.py``'s docstring line by line. It is the oracle the
vectorised code is tested against and the baseline ``benchmarks/modulation.py`` measures it
against. Do not use it for training.
"""

from __future__ import annotations

import math
from collections import defaultdict


def naive_grpo(rewards, group_ids, eps=1e-6, ddof=0):
    members = defaultdict(list)
    for i, g in enumerate(group_ids):
        members[g].append(i)
    adv = [0.0] * len(rewards)
    for idx in members.values():
        values = [rewards[i] for i in idx]
        if all(v == values[0] for v in values) or len(idx) <= ddof:
            continue  # exactly zero
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / (len(values) - ddof)
        std = max(math.sqrt(var), eps)
        for i in idx:
            adv[i] = (rewards[i] - mean) / std
    return adv


def _clamp(x, bounds):
    return x if bounds is None else min(max(x, bounds[0]), bounds[1])


class NaiveHarpo:
    """Same state and maths as ``HarpoModulator``, one rollout at a time."""

    def __init__(self, beta_rho=0.95, beta_s=0.95, task_clamp=(0.5, 4.0),
                 sample_clamp=(0.5, 3.0), zero_signal="exclude", signal_floor=1e-6):
        self.beta_rho, self.beta_s = beta_rho, beta_s
        self.task_clamp, self.sample_clamp = task_clamp, sample_clamp
        self.floor = zero_signal == "floor"
        self.signal_floor = signal_floor
        self.rho: dict = {}
        self.log_factor: dict = {}

    def update(self, task_ids, group_ids, advantages):
        group_abs, group_task = defaultdict(list), {}
        task_abs = defaultdict(list)
        for t, g, a in zip(task_ids, group_ids, advantages):
            group_abs[g].append(abs(a))
            group_task[g] = t
            task_abs[t].append(abs(a))
        group_signal = {g: sum(v) / len(v) for g, v in group_abs.items()}
        task_signal = {t: sum(v) / len(v) for t, v in task_abs.items()}
        if self.floor:
            group_signal = {g: max(p, self.signal_floor) for g, p in group_signal.items()}
            task_signal = {t: max(p, self.signal_floor) for t, p in task_signal.items()}

        active = [t for t, p in task_signal.items() if p > 0]
        for t in active:
            p = task_signal[t]
            self.rho[t] = p if t not in self.rho else self.beta_rho * self.rho[t] + (
                1 - self.beta_rho) * p
        if active:
            log_ref = sum(math.log(self.rho[t]) for t in active) / len(active)
            for t in active:
                inst = log_ref - math.log(self.rho[t])
                self.log_factor[t] = self.beta_s * self.log_factor.get(t, 0.0) + (
                    1 - self.beta_s) * inst
        task_factor = {t: _clamp(math.exp(self.log_factor.get(t, 0.0)), self.task_clamp)
                       for t in task_signal}

        sample_factor = {}
        for t in task_signal:
            groups = [g for g, gt in group_task.items() if gt == t and group_signal[g] > 0]
            if len(groups) < 2:
                continue
            mean_log = sum(math.log(group_signal[g]) for g in groups) / len(groups)
            for g in groups:
                sample_factor[g] = _clamp(math.exp(mean_log - math.log(group_signal[g])),
                                          self.sample_clamp)

        out = []
        for t, g, a in zip(task_ids, group_ids, advantages):
            out.append(a * sample_factor.get(g, 1.0) * task_factor[t])
        return out, task_factor
