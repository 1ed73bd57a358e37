"""Every estimator against small hand-computed cases, plus the registry's error messages."""

import math
import re

import numpy as np
import pytest

from harpo_core import (
    available_estimators,
    compute_advantages,
    estimator_parameters,
    make_estimator,
)
from harpo_core.estimators import register_estimator
from tests.core.naive import naive_grpo

# Two tasks: task "a" has a mixed group [1, 0, 1] and a constant group of 0.1s (whose float
# mean differs from 0.1 in the last bit); task "b" has a pair and a group of one.
R = np.array([1.0, 0.0, 1.0, 0.1, 0.1, 0.1, 0.5, 0.2, 1.0])
G = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3])
T = np.array(["a", "a", "a", "a", "a", "a", "b", "b", "b"])
S2 = math.sqrt(2)


def test_registry_lists_every_estimator_of_the_design():
    assert set(available_estimators()) >= {
        "grpo", "dr_grpo", "rloo", "reinforce_pp_baseline", "gpg", "ema_grpo", "harpo"}


def test_the_constant_group_really_has_an_inexact_mean():
    # Guards the exact-zero tests below: a naive (r - mean) is not 0 for these rewards.
    assert np.mean([0.1, 0.1, 0.1]) != 0.1


def test_grpo_population_std():
    adv = compute_advantages("grpo", R, G, T)
    np.testing.assert_allclose(adv[:3], [1 / S2, -S2, 1 / S2], rtol=1e-12)
    np.testing.assert_allclose(adv[6:8], [1.0, -1.0], rtol=1e-12)
    assert (adv[3:6] == 0.0).all()  # exactly zero, not rounding error / eps
    assert adv[8] == 0.0  # group of one


def test_grpo_sample_std():
    adv = compute_advantages("grpo", R, G, T, std_ddof=1)
    s = math.sqrt(1 / 3)
    np.testing.assert_allclose(adv[:3], [1 / 3 / s, -2 / 3 / s, 1 / 3 / s], rtol=1e-12)
    assert adv[8] == 0.0  # one rollout has no sample std: advantage 0, not NaN


def test_grpo_eps_bounds_tiny_std():
    adv = compute_advantages("grpo", [0.0, 1e-9], [0, 0], eps=1e-6)
    np.testing.assert_allclose(adv, [-0.5e-9 / 1e-6, 0.5e-9 / 1e-6])


def test_dr_grpo_removes_the_mean_only():
    adv = compute_advantages("dr_grpo", R, G, T)
    np.testing.assert_allclose(adv, [1 / 3, -2 / 3, 1 / 3, 0, 0, 0, 0.15, -0.15, 0], atol=1e-15)
    assert (adv[3:6] == 0.0).all()


def test_rloo_leave_one_out():
    adv = compute_advantages("rloo", R, G, T)
    # 1 - mean(0, 1) = 0.5; 0 - mean(1, 1) = -1; pair: 0.5 - 0.2 = 0.3
    np.testing.assert_allclose(adv, [0.5, -1.0, 0.5, 0, 0, 0, 0.3, -0.3, 0], atol=1e-15)


def test_reinforce_pp_baseline_whitens_over_the_batch():
    adv = compute_advantages("reinforce_pp_baseline", [1, 0, 1, 1], [0, 0, 1, 1])
    # centred [0.5, -0.5, 0, 0]: mean 0, std sqrt(0.125)
    np.testing.assert_allclose(adv, [S2, -S2, 0, 0], rtol=1e-12)
    assert (compute_advantages("reinforce_pp_baseline", [1, 1], [0, 0]) == 0).all()


def test_gpg_scales_by_batch_over_nonzero_rewards():
    adv = compute_advantages("gpg", [1, 0, 1, 1], [0, 0, 1, 1])
    np.testing.assert_allclose(adv, [2 / 3, -2 / 3, 0, 0], rtol=1e-12)  # alpha = 4 / 3
    assert (compute_advantages("gpg", [0, 0], [0, 0]) == 0).all()


def test_ema_grpo_tracks_per_task_moments():
    est = make_estimator("ema_grpo", decay=0.5)
    first = est.compute([1, 0, 1, 1], [0, 0, 1, 1], ["a"] * 4, step=0).advantages
    # m1 = m2 = 0.75, var 0.1875
    np.testing.assert_allclose(first, [0.5 / math.sqrt(0.1875), -0.5 / math.sqrt(0.1875), 0, 0])
    second = est.compute([1, 0, 0, 0], [0, 0, 1, 1], ["a"] * 4, step=1).advantages
    # batch moments 0.25 -> m1 = m2 = 0.5 -> var 0.25
    np.testing.assert_allclose(second, [1.0, -1.0, 0, 0])
    # a replayed step is a read, not a second update
    again = est.compute([1, 0, 0, 0], [0, 0, 1, 1], ["a"] * 4, step=1).advantages
    np.testing.assert_array_equal(again, second)
    assert est.state_dict()["moments"]["a"] == [0.5, 0.5]


def test_ema_grpo_state_round_trip():
    a = make_estimator("ema_grpo")
    a.compute([1, 0, 1, 1], [0, 0, 1, 1], ["a"] * 4, step=0)
    b = make_estimator("ema_grpo")
    b.load_state_dict(a.state_dict())
    batch = ([0, 1, 1, 0], [0, 0, 1, 1], ["a"] * 4)
    np.testing.assert_array_equal(a.compute(*batch, step=1).advantages,
                                  b.compute(*batch, step=1).advantages)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline", "gpg"])
def test_stateless_estimators_match_on_relabelled_ids(name):
    # String ids, sparse ids and dense ids describe the same partition.
    dense = compute_advantages(name, R, G, T)
    sparse = compute_advantages(name, R, G * 1_000_003 - 7, T)
    strings = compute_advantages(name, R, [f"g{g}" for g in G], T)
    np.testing.assert_array_equal(dense, sparse)
    np.testing.assert_array_equal(dense, strings)


def test_grpo_matches_the_naive_loop_on_random_batches():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n_groups = int(rng.integers(1, 30))
        sizes = rng.integers(1, 9, n_groups)
        g = np.repeat(np.arange(n_groups), sizes)
        rng.shuffle(g)
        r = rng.choice([0.0, 0.1, 0.3, 0.7, 1.0], size=g.size)
        for ddof in (0, 1):
            np.testing.assert_allclose(compute_advantages("grpo", r, g, std_ddof=ddof),
                                       naive_grpo(r.tolist(), g.tolist(), ddof=ddof),
                                       rtol=1e-12, atol=1e-12)


def test_unknown_estimator_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown estimator 'ppo'; available: \[.*'grpo'"):
        make_estimator("ppo")


def test_unknown_parameter_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['std'\] for estimator "
                                         r"'grpo'; allowed: \['eps', 'std_ddof'\]"):
        make_estimator("grpo", std=1)
    with pytest.raises(ValueError, match=r"\['beta'\] for estimator 'harpo'"):
        make_estimator("harpo", beta=0.9)


def test_bad_parameter_values():
    with pytest.raises(ValueError, match="std_ddof must be 0 or 1, got 2"):
        compute_advantages("grpo", [1, 0], [0, 0], std_ddof=2)
    with pytest.raises(ValueError, match="eps must be > 0, got 0"):
        compute_advantages("grpo", [1, 0], [0, 0], eps=0)
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\), got 1.5"):
        make_estimator("ema_grpo", decay=1.5)


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="estimator 'grpo' is already registered"):
        register_estimator("grpo")(lambda batch: batch.values)


def test_stateless_estimator_refuses_state():
    with pytest.raises(ValueError, match="'rloo' is stateless"):
        make_estimator("rloo").load_state_dict({"x": 1})


def test_harpo_estimator_needs_a_step():
    with pytest.raises(ValueError, match="pass step=<training step>"):
        make_estimator("harpo").compute(R, G, T)


@pytest.mark.parametrize("name", sorted(["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline",
                                         "gpg", "ema_grpo", "harpo"]))
def test_bad_batches_are_rejected_with_the_culprit(name):
    est = make_estimator(name)
    with pytest.raises(ValueError, match="rewards is empty"):
        est.compute([], [], [], step=0)
    with pytest.raises(ValueError, match=r"NaN/inf at rollout 2 \(nan\), rollout 3 \(inf\)"):
        est.compute([0, 1, np.nan, np.inf], [0, 0, 1, 1], step=0)
    with pytest.raises(ValueError, match="group_ids has 3 entries but the batch has 2"):
        est.compute([0, 1], [0, 0, 1], step=0)
    with pytest.raises(ValueError,
                       match=r"group 7 spans several tasks \(rollout \d is task '[ab]'"):
        est.compute([0, 1], [7, 7], ["a", "b"], step=0)


def test_task_codes_with_names():
    adv = compute_advantages("grpo", R, G, np.array([0] * 6 + [1] * 3))
    est = make_estimator("harpo")
    out = est.compute(R, G, np.array([0] * 6 + [1] * 3), step=0, task_names=["cls", "qa"])
    assert set(out.extras["modulation"].task_factors) == {"cls", "qa"}
    assert np.isfinite(out.advantages).all() and adv.shape == out.advantages.shape
    with pytest.raises(ValueError, match=r"integer codes in \[0, 2\)"):
        est.compute(R, G, np.array([0] * 6 + [5] * 3), step=1, task_names=["cls", "qa"])


# ---------------------------------------------------------------------- user estimators by spec

USER = "tests.core.user_estimator"


def test_a_user_function_given_as_module_function_is_an_estimator():
    est = make_estimator(f"{USER}:scaled_centered", scale=2.0)
    assert est.name == f"{USER}:scaled_centered"
    adv = est.compute(R, G, T, step=0).advantages
    np.testing.assert_allclose(adv, [2 / 3, -4 / 3, 2 / 3, 0, 0, 0, 0.3, -0.3, 0], atol=1e-15)
    assert est.state_dict() == {}
    # the same checks as a registered estimator: parameter names, then bad batches
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['scal'\] for estimator "
                                         rf"'{USER}:scaled_centered'; allowed: \['scale'\]"):
        make_estimator(f"{USER}:scaled_centered", scal=2.0)
    with pytest.raises(ValueError, match="group_ids has 3 entries but the batch has 2"):
        est.compute([0, 1], [0, 0, 1])
    # spaces around the parts are tolerated, as for reward functions
    spaced = compute_advantages(f" {USER} : scaled_centered ", R, G, T, scale=2.0)
    np.testing.assert_array_equal(spaced, adv)


def test_a_user_function_taking_any_keyword():
    adv = compute_advantages(f"{USER}:any_keywords", [1.0, 0.0], [0, 0], shift=0.5, other=1)
    np.testing.assert_array_equal(adv, [1.5, 0.5])
    assert estimator_parameters(f"{USER}:any_keywords") == []


def test_a_user_class_given_as_module_class_is_a_stateful_estimator():
    est = make_estimator(f"{USER}:RunningBaseline", decay=0.5)
    np.testing.assert_array_equal(est.compute([1, 0, 1, 1], [0, 0, 1, 1]).advantages,
                                  [0.25, -0.75, 0.25, 0.25])  # baseline 0.75
    resumed = make_estimator(f"{USER}:RunningBaseline", decay=0.5)
    resumed.load_state_dict(est.state_dict())
    batch = ([0, 0, 1, 0], [0, 0, 1, 1])
    # baseline 0.5 * 0.75 + 0.5 * 0.25 = 0.5
    np.testing.assert_array_equal(est.compute(*batch).advantages, [-0.5, -0.5, 0.5, -0.5])
    np.testing.assert_array_equal(resumed.compute(*batch).advantages, [-0.5, -0.5, 0.5, -0.5])
    assert est.name == f"{USER}:RunningBaseline"  # set on an instance that has no name


def test_estimator_parameters_lists_what_make_estimator_accepts():
    assert estimator_parameters("grpo") == ["eps", "std_ddof"]
    assert estimator_parameters("ema_grpo") == ["decay", "eps"]
    assert estimator_parameters("rloo") == []
    assert estimator_parameters("harpo") == [
        "eps", "std_ddof", "modulator", "beta_rho", "beta_s", "task_clamp", "sample_clamp",
        "zero_signal", "signal_floor", "history"]
    assert estimator_parameters(f"{USER}:scaled_centered") == ["scale"]
    assert estimator_parameters(f"{USER}:RunningBaseline") == ["decay"]
    with pytest.raises(ValueError, match="unknown estimator 'ppo'"):
        estimator_parameters("ppo")


@pytest.mark.parametrize("spec, message", [
    ("tests.core.no_such_module:f",
     "cannot import module 'tests.core.no_such_module' for estimator "
     "'tests.core.no_such_module:f': ModuleNotFoundError: No module named "
     "'tests.core.no_such_module'"),
    (f"{USER}:missing",
     f"estimator '{USER}:missing': no attribute 'missing' (looked up in module '{USER}')"),
    (f"{USER}:NOT_CALLABLE", f"estimator '{USER}:NOT_CALLABLE' is not callable: it is a int"),
    (f"{USER}:NoCompute",
     f"estimator '{USER}:NoCompute' is a class without compute, load_state_dict; an estimator "
     "class needs compute, state_dict, load_state_dict"),
    (":scaled_centered",
     "estimator spec ':scaled_centered' has an empty module part; expected "
     "'package.module:function'"),
    (f"{USER}:",
     f"estimator spec '{USER}:' has an empty function part; expected "
     "'package.module:function'"),
    ("ppo", "unknown estimator 'ppo'; available: ['dr_grpo', 'ema_grpo', 'g2rpo', 'gdpo', "
            "'gpg', 'grpo', 'harpo', 'harpo_on', 'mt_grpo', 'reinforce_pp_baseline', 'rloo'] "
            "(or a user estimator as "
            "'package.module:function')"),
])
def test_bad_estimator_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError) as info:
        make_estimator(spec)
    assert str(info.value) == message
    with pytest.raises(ValueError, match=re.escape(message)):
        estimator_parameters(spec)


def test_a_user_function_must_return_one_finite_advantage_per_rollout():
    with pytest.raises(ValueError, match=rf"estimator '{USER}:one_too_many' returned advantages "
                                         r"of shape \(3,\) for 2 rollouts"):
        compute_advantages(f"{USER}:one_too_many", [1, 0], [0, 0])
    with pytest.raises(ValueError, match=rf"advantages of estimator '{USER}:not_finite' must be "
                                         r"finite; got NaN/inf at rollout 0"):
        compute_advantages(f"{USER}:not_finite", [1, 0], [0, 0])
