"""The rollout pool's autoscaling policy: the pool size after a step, from its timings."""

import pytest

from services.autoscale import autoscale_target
from services.config import AutoscaleSection

POLICY = AutoscaleSection(enabled=True, min_workers=1, max_workers=3,
                          target_generate_share=0.6, tolerance=0.1)


def timing(generate_s, rollout_wait_s=0.0, step_s=1.0):
    return {"generate_s": generate_s, "rollout_wait_s": rollout_wait_s, "step_s": step_s}


@pytest.mark.parametrize(("generate_s", "workers", "expected"), [
    (0.9, 2, 3),   # generation dominates: one more worker
    (0.9, 3, 3),   # ... but never past max_workers
    (0.3, 2, 1),   # generation is a small share: one fewer
    (0.3, 1, 1),   # ... but never below min_workers
    (0.65, 2, 2),  # within the tolerance band: unchanged
    (0.55, 2, 2),
])
def test_synchronous_steps_scale_by_the_generation_share(generate_s, workers, expected):
    target, share = autoscale_target(POLICY, timing(generate_s), workers, asynchronous=False)
    assert (target, share) == (expected, pytest.approx(generate_s))


def test_asynchronous_steps_scale_by_the_wait_not_the_generation():
    # generation overlapped the update (0.9 of the step) but the step waited only 0.2 for it
    step = timing(generate_s=0.9, rollout_wait_s=0.2)
    assert autoscale_target(POLICY, step, 2, asynchronous=True) == (1, pytest.approx(0.2))
    assert autoscale_target(POLICY, step, 2, asynchronous=False) == (3, pytest.approx(0.9))


def test_a_zero_length_step_does_not_divide_by_zero():
    target, share = autoscale_target(POLICY, timing(0.0, step_s=0.0), 2, asynchronous=False)
    assert (target, share) == (1, 0.0)
