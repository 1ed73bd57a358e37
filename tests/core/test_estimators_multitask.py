"""G²RPO, MT-GRPO, GDPO and HARPO-on-any-base against small hand-computed cases."""

import math
from statistics import NormalDist

import numpy as np
import pytest

from harpo_core import (
    available_estimators,
    compute_advantages,
    estimator_parameters,
    make_estimator,
)

PHI_INV = NormalDist().inv_cdf  # an independent inverse normal CDF for the expected values


def test_the_registry_holds_the_newer_estimators():
    assert {"g2rpo", "mt_grpo", "gdpo", "harpo_on"} <= set(available_estimators())


# --------------------------------------------------------------------------- G²RPO


def test_g2rpo_maps_ranks_to_normal_quantiles_within_each_group():
    rewards = [3.0, 1.0, 2.0, 10.0, 0.5, 0.2]
    adv = compute_advantages("g2rpo", rewards, [0, 0, 0, 0, 1, 1])
    q = [PHI_INV((j + 0.5) / 4) for j in range(4)]  # -1.150, -0.319, 0.319, 1.150
    np.testing.assert_allclose(adv[:4], [q[2], q[0], q[1], q[3]], rtol=1e-12)
    np.testing.assert_allclose(adv[4:], [PHI_INV(0.75), -PHI_INV(0.75)], rtol=1e-12)


def test_g2rpo_ignores_the_rewards_scale_and_outliers():
    base = compute_advantages("g2rpo", [3.0, 1.0, 2.0, 10.0], [0, 0, 0, 0])
    np.testing.assert_array_equal(
        compute_advantages("g2rpo", [30.0, 10.0, 20.0, 1e6], [0, 0, 0, 0]), base)


def test_g2rpo_ties_share_their_scores_and_constant_groups_are_exactly_zero():
    adv = compute_advantages("g2rpo", [1.0, 0.0, 1.0, 0.1, 0.1, 0.1, 7.0],
                             [0, 0, 0, 1, 1, 1, 2], ["a", "a", "a", "a", "a", "a", "b"])
    low, high = PHI_INV(1 / 6), PHI_INV(5 / 6)  # positions 0 | 1, 2 of three
    np.testing.assert_allclose(adv[:3], [high / 2, low, high / 2], rtol=1e-12)
    assert adv[:3].sum() == pytest.approx(0.0, abs=1e-15)
    assert (adv[3:] == 0.0).all()  # all-equal group and a group of one: exactly 0


# --------------------------------------------------------------------------- MT-GRPO


def _softmax(x):
    e = [math.exp(v) for v in x]
    return [v / sum(e) for v in e]


def test_mt_grpo_moves_weight_to_the_worse_task_and_keeps_the_mean_weight_one():
    est = make_estimator("mt_grpo", lam=1.0, lr=1.0)
    groups, tasks = [0, 0, 1, 1, 2, 2], ["a", "a", "a", "a", "b", "b"]
    # step 0: J_a = 0.75, J_b = 0.5, no improvement yet -> u = (0.75, 0.5)
    out = est.compute([1, 0, 1, 1, 1, 0], groups, tasks, step=0)
    z = [0.5, 0.5]
    u = [0.75, 0.5]
    mean_u = z[0] * u[0] + z[1] * u[1]
    xi = [-1.0 * z[k] * (u[k] - mean_u) for k in range(2)]  # (-0.0625, 0.0625)
    w = [2 * v for v in _softmax(xi)]
    assert w[1] > 1 > w[0]  # the task with the lower reward gains weight
    np.testing.assert_allclose(out.advantages, [w[0], -w[0], 0, 0, w[1], -w[1]], rtol=1e-12)
    assert out.extras["task_weight"] == pytest.approx({"a": w[0], "b": w[1]}, rel=1e-12)

    w_b_before = w[1]
    # step 1: a solved (J_a = 1, I_a = 0.25), b unchanged (J_b = 0.5, I_b = 0)
    out = est.compute([1, 1, 1, 1, 1, 0], groups, tasks, step=1)
    z = _softmax(xi)
    u = [0.25 + 1.0, 0.0 + 0.5]
    mean_u = z[0] * u[0] + z[1] * u[1]
    xi = [xi[k] - 1.0 * z[k] * (u[k] - mean_u) for k in range(2)]
    w = [2 * v for v in _softmax(xi)]
    assert w[1] > w_b_before  # b still lags and improves less: its weight grows further
    # a's groups are all-equal (GRPO 0 whatever its weight); b's pair gives +-1
    np.testing.assert_allclose(out.advantages, [0, 0, 0, 0, w[1], -w[1]], rtol=1e-12)
    assert est.state_dict()["logits"] == pytest.approx({"a": xi[0], "b": xi[1]}, rel=1e-12)


def test_mt_grpo_replays_a_step_restores_its_state_and_lr_zero_is_grpo():
    est = make_estimator("mt_grpo")
    first = est.compute([1, 0, 1, 1], [0, 0, 1, 1], ["a", "a", "b", "b"], step=4).advantages
    again = est.compute([0, 0, 0, 0], [0, 0, 1, 1], ["a", "a", "b", "b"], step=4).advantages
    np.testing.assert_array_equal(first, again)
    copy = make_estimator("mt_grpo")
    copy.load_state_dict(est.state_dict())
    args = ([1, 0, 0, 1], [0, 0, 1, 1], ["a", "a", "b", "b"])
    np.testing.assert_array_equal(copy.compute(*args, step=5).advantages,
                                  est.compute(*args, step=5).advantages)
    plain = make_estimator("mt_grpo", lr=0.0).compute(*args, step=0).advantages
    np.testing.assert_array_equal(plain, compute_advantages("grpo", *args))


@pytest.mark.parametrize("params, message", [
    ({"lam": -1}, "mt_grpo: lam must be a number >= 0, got -1"),
    ({"lr": float("nan")}, "mt_grpo: lr must be a number >= 0, got nan"),
    ({"gamma": 1}, "unknown parameter(s) ['gamma'] for estimator 'mt_grpo'; allowed: "
                   "['lam', 'lr', 'eps', 'std_ddof']"),
])
def test_mt_grpo_bad_parameters_say_what_is_wrong(params, message):
    with pytest.raises(ValueError) as info:
        make_estimator("mt_grpo", **params)
    assert str(info.value) == message


# --------------------------------------------------------------------------- GDPO


def test_gdpo_normalises_each_component_in_its_group_then_whitens_the_sum():
    task = np.array([1.0, 0.0, 1.0, 1.0])
    fmt = np.array([1.0, 1.0, 0.0, 1.0])
    total = 0.8 * task + 0.2 * fmt
    est = make_estimator("gdpo")
    adv = est.compute(total, [0, 0, 1, 1],
                      components={"task": (task, 0.8), "format": (fmt, 0.2)}).advantages
    # task in its groups: [+1, -1 | 0, 0]; format: [0, 0 | -1, +1] -> sum [.8, -.8, -.2, .2]
    s = math.sqrt((2 * 0.64 + 2 * 0.04) / 4)
    np.testing.assert_allclose(adv, [0.8 / s, -0.8 / s, -0.2 / s, 0.2 / s], rtol=1e-12)


def test_gdpo_keeps_apart_what_grpo_collapses():
    # Two groups whose totals are both (1, 0) but from different parts: GRPO gives both the
    # same advantages; GDPO tells a correct answer from a well-formatted one.
    task = np.array([1.0, 0.0, 0.0, 0.0])
    fmt = np.array([0.0, 0.0, 1.0, 0.0])
    total = task + fmt
    groups = [0, 0, 1, 1]
    grpo = compute_advantages("grpo", total, groups)
    assert grpo[0] == grpo[2]
    adv = make_estimator("gdpo").compute(total, groups, components={
        "task": (task, 0.8), "format": (fmt, 0.2)}).advantages
    assert adv[0] == pytest.approx(4 * adv[2], rel=1e-12)


def test_gdpo_without_components_or_with_misaligned_ones_is_an_error():
    est = make_estimator("gdpo")
    with pytest.raises(ValueError, match="gdpo normalises each reward component separately and "
                                         "needs them"):
        est.compute([1.0, 0.0], [0, 0])
    with pytest.raises(ValueError, match="gdpo: component 'task' has 3 values for 2 rollouts"):
        est.compute([1.0, 0.0], [0, 0], components={"task": (np.ones(3), 1.0)})
    assert estimator_parameters("gdpo") == ["eps", "std_ddof"]  # components come per batch


# --------------------------------------------------------------------------- HARPO on a base


def test_harpo_on_grpo_is_harpo():
    rng = np.random.default_rng(3)
    a, b = make_estimator("harpo"), make_estimator("harpo_on", base="grpo")
    groups, tasks = np.repeat(np.arange(6), 4), np.repeat(["x", "y", "z"], 8)
    for step in range(3):
        rewards = rng.integers(0, 2, 24).astype(float) * np.repeat([1.0, 3.0, 0.2], 8)
        np.testing.assert_array_equal(a.compute(rewards, groups, tasks, step=step).advantages,
                                      b.compute(rewards, groups, tasks, step=step).advantages)


def test_harpo_on_dr_grpo_rebalances_reward_scales():
    # dr_grpo keeps task a's 10x reward scale: |Â| 5 vs 0.5. One group per task: sample
    # factor 1; step 0: ρ = p, log ρ_ref = mean log ρ, L_m = 0.05 (log ρ_ref - log ρ_m).
    est = make_estimator("harpo_on", base="dr_grpo")
    adv = est.compute([10.0, 0.0, 1.0, 0.0], [0, 0, 1, 1], ["a", "a", "b", "b"], step=0)
    half_log10 = 0.5 * math.log(10.0)
    s_a, s_b = math.exp(-0.05 * half_log10), math.exp(0.05 * half_log10)
    np.testing.assert_allclose(adv.advantages, [5 * s_a, -5 * s_a, 0.5 * s_b, -0.5 * s_b],
                               rtol=1e-12)


@pytest.mark.parametrize("base, why", [
    ("mt_grpo", "HARPO's task factor would undo MT-GRPO's task weights"),
    ("ema_grpo", "its per-task std is state across steps"),
    ("gdpo", "it needs the reward's components"),
    ("harpo", "HARPO on HARPO modulates twice"),
    ("ppo", None),
])
def test_harpo_on_refuses_bases_it_cannot_modulate(base, why):
    with pytest.raises(ValueError) as info:
        make_estimator("harpo_on", base=base)
    text = str(info.value)
    assert text.startswith(f"harpo: base {base!r} cannot be modulated")
    assert text.endswith("a base is one of ['dr_grpo', 'g2rpo', 'gpg', 'grpo', "
                         "'reinforce_pp_baseline', 'rloo']")
    if why:
        assert why in text


def test_the_registry_and_the_modulator_import_without_torch():
    """The modulator actor holds only numpy statistics: importing harpo_core (the estimator
    registry, g2rpo included, and the modulator) must not pull in torch, which would add
    seconds of start-up to every modulator actor."""
    import subprocess
    import sys

    code = ("import sys, harpo_core, harpo_core.estimators_multitask, harpo_core.modulator; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"
