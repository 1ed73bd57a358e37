"""Tiny user reward functions that the reward tests load by "module:function" spec."""

from harpo_core.rewards import normalize_answer

NOT_A_FUNCTION = 42


def contains_answer(responses, answers, tasks, **extras):
    """1.0 where the normalized answer occurs in the normalized response, else 0.0."""
    return [
        1.0 if normalize_answer(a) in normalize_answer(r) else 0.0
        for r, a in zip(responses, answers)
    ]


class Rewards:
    @staticmethod
    def constant(responses, answers, tasks, **extras):
        return [0.5] * len(responses)


BATCHES: list[list[str]] = []


def record_batches(responses, answers, tasks, **extras):
    """Records each call's task list in BATCHES and returns zeros."""
    BATCHES.append(list(tasks))
    return [0.0] * len(responses)
