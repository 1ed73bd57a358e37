"""HARPO modulator: a hand-computed case, the design's invariants as properties, zero-signal
policies, step-keyed replay and exact resume from ``state_dict``."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harpo_core import (
    GroupStats,
    HarpoConfig,
    HarpoModulator,
    compute_advantages,
    make_estimator,
)
from tests.core.naive import NaiveHarpo

UNCLAMPED = dict(task_clamp=None, sample_clamp=None)

# task a: group 0 with |Â| = 1, group 1 with |Â| = 2 (4 rollouts); task b: one group, |Â| = 0.5
TASKS = ["a", "a", "a", "a", "a", "a", "b", "b"]
GROUPS = [0, 0, 1, 1, 1, 1, 2, 2]
ADV = np.array([1.0, -1.0, 2.0, -2.0, 2.0, -2.0, 0.5, -0.5])


def test_hand_computed_first_and_second_step():
    mod = HarpoModulator(HarpoConfig())
    out = mod.update(0, TASKS, GROUPS, ADV)
    p_a, p_b = (2 * 1 + 4 * 2) / 6, 0.5  # rollout-weighted mean |Â| per task
    inst_a = 0.5 * (math.log(p_b) - math.log(p_a))  # log ρ_ref - log ρ_a
    assert out.task_signals == pytest.approx({"a": p_a, "b": p_b}, rel=1e-14)
    assert out.groups.reference == pytest.approx(math.sqrt(p_a * p_b), rel=1e-14)
    assert out.task_factors["a"] == pytest.approx(math.exp(0.05 * inst_a), rel=1e-14)
    assert out.task_factors["b"] == pytest.approx(math.exp(-0.05 * inst_a), rel=1e-14)
    # sample factors in task a: geometric mean of (1, 2) is sqrt 2; task b has one group
    expected_sample = [math.sqrt(2)] * 2 + [1 / math.sqrt(2)] * 4 + [1.0] * 2
    np.testing.assert_allclose(out.sample_factors, expected_sample, rtol=1e-14)
    np.testing.assert_allclose(out.advantages,
                               ADV * expected_sample * out.task_factor_per_rollout, rtol=1e-14)
    # same signals again: ρ unchanged, L_1 = (1 - 0.95^2) * inst
    out = mod.update(1, TASKS, GROUPS, ADV)
    assert mod.tasks["a"].rho == pytest.approx(p_a, rel=1e-14)
    assert mod.tasks["a"].log_factor == pytest.approx((1 - 0.95**2) * inst_a, rel=1e-12)


def test_clamps_bound_the_applied_factor_but_not_the_state():
    cfg = HarpoConfig(beta_s=0.0, task_clamp=(0.9, 1.1), sample_clamp=(0.8, 1.2))
    out = HarpoModulator(cfg).update(0, TASKS, GROUPS, ADV)
    assert out.task_factors == {"a": 0.9, "b": 1.1}
    # with beta_s = 0 the state is the instantaneous log ratio, well outside log(1.1)
    assert out.groups.task_log_factors["b"] == pytest.approx(0.5 * math.log((10 / 6) / 0.5))
    np.testing.assert_allclose(out.sample_factors[:6], [1.2] * 2 + [0.8] * 4)


# ---------------------------------------------------------------------- properties

@st.composite
def batches(draw, min_tasks=1, max_tasks=5, mixed=False):
    """Random multi-task batches; rewards on a grid so distinct values stay distinct."""
    n_tasks = draw(st.integers(min_tasks, max_tasks))
    tasks, groups, rewards = [], [], []
    gid = 0
    for t in range(n_tasks):
        for _ in range(draw(st.integers(1, 5))):
            size = draw(st.integers(2 if mixed else 1, 6))
            values = draw(st.lists(st.sampled_from([0.0, 0.1, 0.2, 0.5, 0.7, 1.0]),
                                   min_size=size, max_size=size))
            if mixed and len(set(values)) == 1:
                values[0] = 0.3 if values[0] != 0.3 else 0.9
            tasks += [f"t{t}"] * size
            groups += [gid] * size
            rewards += values
            gid += 1
    return np.array(rewards), np.array(groups), np.array(tasks)


@given(batches(mixed=True), st.floats(0.0, 0.99), st.floats(0.0, 0.99))
@settings(max_examples=150, deadline=None)
def test_unclamped_sample_factors_multiply_to_one_per_task(batch, beta_rho, beta_s):
    r, g, t = batch
    adv = compute_advantages("grpo", r, g, t)
    out = HarpoModulator(HarpoConfig(beta_rho=beta_rho, beta_s=beta_s, **UNCLAMPED)).update(
        0, t, g, adv)
    for task in np.unique(t):
        groups_of_task = np.unique(g[t == task])
        log_sum = sum(math.log(out.groups.sample_factors[q]) for q in groups_of_task)
        assert abs(log_sum) < 1e-9


@given(batches(min_tasks=2, mixed=True))
@settings(max_examples=150, deadline=None)
def test_instantaneous_task_factors_multiply_to_one(batch):
    r, g, t = batch
    adv = compute_advantages("grpo", r, g, t)
    # beta_s = 0: L_m is exactly log s_m^inst
    out = HarpoModulator(HarpoConfig(beta_s=0.0, **UNCLAMPED)).update(0, t, g, adv)
    assert abs(sum(out.groups.task_log_factors.values())) < 1e-9


@given(st.lists(batches(min_tasks=3, max_tasks=3, mixed=True), min_size=2, max_size=6),
       st.floats(0.0, 0.99), st.floats(0.0, 0.99))
@settings(max_examples=60, deadline=None)
def test_sum_of_log_task_factors_stays_zero_with_a_fixed_task_set(steps, beta_rho, beta_s):
    mod = HarpoModulator(HarpoConfig(beta_rho=beta_rho, beta_s=beta_s))
    for k, (r, g, t) in enumerate(steps):
        mod.update(k, t, g, compute_advantages("grpo", r, g, t))
        assert abs(sum(s.log_factor for s in mod.tasks.values())) < 1e-9


@given(st.lists(batches(min_tasks=2, max_tasks=4), min_size=1, max_size=4),
       st.floats(0.5, 10.0), st.floats(-5.0, 5.0), st.sampled_from(["exclude", "floor"]))
@settings(max_examples=80, deadline=None)
def test_invariant_to_a_positive_affine_change_of_one_task(steps, scale, shift, zero_signal):
    cfg = HarpoConfig(zero_signal=zero_signal)
    plain, changed = make_estimator("harpo", **vars(cfg)), make_estimator("harpo", **vars(cfg))
    for k, (r, g, t) in enumerate(steps):
        r2 = np.where(t == "t0", scale * r + shift, r)
        a = plain.compute(r, g, t, step=k).advantages
        b = changed.compute(r2, g, t, step=k).advantages
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-9)


@given(st.lists(batches(), min_size=1, max_size=4), st.sampled_from(["exclude", "floor"]),
       st.booleans())
@settings(max_examples=150, deadline=None)
def test_output_is_finite_for_every_input(steps, zero_signal, clamped):
    kw = {} if clamped else UNCLAMPED
    est = make_estimator("harpo", zero_signal=zero_signal, **kw)
    for k, (r, g, t) in enumerate(steps):
        out = est.compute(r, g, t, step=k)
        mod = out.extras["modulation"]
        assert np.isfinite(out.advantages).all()
        assert np.isfinite(mod.sample_factors).all() and (mod.sample_factors > 0).all()
        assert all(math.isfinite(v) and v > 0 for v in mod.task_factors.values())


@given(st.lists(batches(), min_size=1, max_size=5), st.sampled_from(["exclude", "floor"]),
       st.booleans())
@settings(max_examples=100, deadline=None)
def test_matches_the_naive_per_rollout_implementation(steps, zero_signal, clamped):
    kw = {} if clamped else UNCLAMPED
    mod = HarpoModulator(HarpoConfig(zero_signal=zero_signal, **kw))
    naive = NaiveHarpo(zero_signal=zero_signal, **kw)
    for k, (r, g, t) in enumerate(steps):
        adv = compute_advantages("grpo", r, g, t)
        out = mod.update(k, t, g, adv)
        expected, task_factor = naive.update(t.tolist(), g.tolist(), adv.tolist())
        np.testing.assert_allclose(out.advantages, expected, rtol=1e-12, atol=1e-15)
        assert out.task_factors == pytest.approx(task_factor, rel=1e-12)


# ---------------------------------------------------------------------- zero signal

def _zero_signal_batch():
    # task a: a live group and an all-equal group; task z: nothing but all-equal groups
    r = np.array([1.0, 0.0, 0.1, 0.1, 1.0, 1.0, 0.3, 0.3])
    g = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    t = np.array(["a", "a", "a", "a", "b", "b", "z", "z"])
    r_b_live = r.copy()
    r_b_live[5] = 0.0
    return r_b_live, g, t


def test_exclude_gives_zero_groups_factor_one_and_leaves_silent_tasks_alone():
    r, g, t = _zero_signal_batch()
    mod = HarpoModulator(HarpoConfig(zero_signal="exclude"))
    out = mod.update(0, t, g, compute_advantages("grpo", r, g, t))
    np.testing.assert_array_equal(out.groups.sample_factors, [1.0, 1.0, 1.0, 1.0])
    assert "z" not in mod.tasks and out.task_factors["z"] == 1.0
    assert out.groups.active_tasks == ("a", "b")
    assert out.groups.zero_signal_groups == {"a": 1, "b": 0, "z": 1}
    # give z signal once, then silence it again: its factor and state stay where they were
    r2 = r.copy()
    r2[6] = 1.0
    mod.update(1, t, g, compute_advantages("grpo", r2, g, t))
    before = (mod.tasks["z"].rho, mod.tasks["z"].log_factor)
    factor_before = mod.task_factors()["z"]
    out = mod.update(2, t, g, compute_advantages("grpo", r, g, t))
    assert (mod.tasks["z"].rho, mod.tasks["z"].log_factor) == before
    assert out.task_factors["z"] == factor_before


def test_floor_reproduces_the_reference_pinning():
    r, g, t = _zero_signal_batch()
    out = HarpoModulator(HarpoConfig(zero_signal="floor")).update(
        0, t, g, compute_advantages("grpo", r, g, t))
    # log(1e-6) enters task a's geometric mean: its live group is pinned at the lower clamp
    assert out.groups.sample_factors[0] == 0.5
    assert out.groups.active_tasks == ("a", "b", "z")
    assert out.task_signals["z"] == 1e-6


def test_a_batch_with_no_signal_at_all():
    out = HarpoModulator().update(0, ["a", "a"], [0, 0], [0.0, 0.0])
    assert math.isnan(out.groups.reference)
    assert (out.advantages == 0).all() and out.task_factors == {"a": 1.0}


# ---------------------------------------------------------------------- steps, replay, state

def _random_steps(n, seed=0):
    rng = np.random.default_rng(seed)
    steps = []
    for _ in range(n):
        n_groups = int(rng.integers(6, 20))
        g = np.repeat(np.arange(n_groups), 4)
        t = np.array([f"task{i % 4}" for i in range(n_groups)])[g]
        r = rng.choice([0.0, 0.2, 1.0], size=g.size, p=[0.5, 0.1, 0.4])
        steps.append((r, g, t))
    return steps


def test_replaying_a_step_returns_the_same_result_without_touching_state():
    mod = HarpoModulator()
    (r, g, t), (r1, g1, t1) = _random_steps(2)
    adv = compute_advantages("grpo", r, g, t)
    first = mod.update(0, t, g, adv)
    state = json.dumps(mod.state_dict())
    again = mod.update(0, t, g, adv)
    np.testing.assert_array_equal(first.advantages, again.advantages)
    assert json.dumps(mod.state_dict()) == state
    with pytest.raises(ValueError, match="step 0 was already applied with different group"):
        mod.update(0, t, g, adv * 2)
    mod.update(1, t1, g1, compute_advantages("grpo", r1, g1, t1))
    # step 0 is still in the replay history and still answers from the cache
    np.testing.assert_array_equal(mod.update(0, t, g, adv).advantages, first.advantages)


def test_steps_must_move_forward():
    mod = HarpoModulator(HarpoConfig(history=1))
    for k in (0, 1):
        mod.update(k, TASKS, GROUPS, ADV)
    with pytest.raises(ValueError, match="step 0 is not after the last applied step 1"):
        mod.update(0, TASKS, GROUPS, ADV)
    with pytest.raises(ValueError, match="step must be a non-negative integer, got -1"):
        mod.update(-1, TASKS, GROUPS, ADV)


@pytest.mark.parametrize("zero_signal", ["exclude", "floor"])
def test_resume_from_state_dict_matches_an_uninterrupted_run(zero_signal):
    steps = _random_steps(12, seed=3)
    cfg = HarpoConfig(zero_signal=zero_signal)

    def run(mod, ks):
        return [mod.update(k, steps[k][2], steps[k][1],
                           compute_advantages("grpo", *steps[k])) for k in ks]

    whole = run(HarpoModulator(cfg), range(12))
    first = HarpoModulator(cfg)
    run(first, range(6))
    resumed = HarpoModulator(cfg)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    # the last step before the interruption replays from the restored cache
    replay = run(resumed, [5])[0]
    np.testing.assert_array_equal(replay.advantages, whole[5].advantages)
    for a, b in zip(run(resumed, range(6, 12)), whole[6:]):
        np.testing.assert_array_equal(a.advantages, b.advantages)
        assert a.task_factors == b.task_factors
        assert a.groups.task_ema == b.groups.task_ema


def test_group_level_surface_is_what_a_remote_modulator_needs():
    stats = GroupStats.from_task_labels(["a", "a", "b"], size=[2, 4, 2], signal=[1.0, 2.0, 0.5])
    via_groups = HarpoModulator().update_groups(0, stats)
    via_rollouts = HarpoModulator().update(0, TASKS, GROUPS, ADV).groups
    assert via_groups.to_dict() == via_rollouts.to_dict()


@pytest.mark.parametrize("kwargs, message", [
    (dict(beta_rho=1.0), r"beta_rho must be a number in \[0, 1\), got 1.0"),
    (dict(beta_s=-0.1), r"beta_s must be a number in \[0, 1\), got -0.1"),
    (dict(task_clamp=(2.0, 4.0)), r"task_clamp must satisfy 0 < low <= 1 <= high < inf"),
    (dict(sample_clamp="wide"), r"sample_clamp must be a pair \(low, high\) or None"),
    (dict(zero_signal="drop"), r"zero_signal must be 'exclude' or 'floor', got 'drop'"),
    (dict(signal_floor=0.0), r"signal_floor must be > 0, got 0.0"),
    (dict(history=0), r"history must be an integer >= 1, got 0"),
])
def test_bad_config_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HarpoConfig(**kwargs)


def test_bad_inputs_are_rejected():
    mod = HarpoModulator()
    with pytest.raises(ValueError, match="advantages is empty"):
        mod.update(0, [], [], [])
    with pytest.raises(ValueError, match=r"advantages must be finite; got NaN/inf at rollout 1"):
        mod.update(0, ["a", "a"], [0, 0], [1.0, np.nan])
    with pytest.raises(ValueError, match="group signal is a mean |advantage| and cannot be neg"):
        GroupStats(task_names=["a"], group_task=[0], size=[1], signal=[-1.0])
    with pytest.raises(ValueError, match="group stats must be 1-D with equal lengths"):
        GroupStats(task_names=["a"], group_task=[0], size=[1, 2], signal=[1.0])
    with pytest.raises(ValueError, match=r"group_task codes must lie in \[0, 1\)"):
        GroupStats(task_names=["a"], group_task=[3], size=[1], signal=[1.0])
    with pytest.raises(ValueError, match="not a HARPO modulator state of version 1"):
        mod.load_state_dict({"tasks": {}})
    with pytest.raises(ValueError, match="malformed HARPO modulator state"):
        mod.load_state_dict({"version": 1, "tasks": {"a": {}}, "history": [], "last_step": 0})


# ---------------------------------------------------------------------- an injected modulator


class _CountingModulator:
    """A modulator the estimator cannot have built itself: HARPO behind a call counter."""

    def __init__(self, config):
        self.inner, self.calls = HarpoModulator(config), []

    def update_groups(self, step, stats):
        self.calls.append((step, stats.size.size))
        return self.inner.update_groups(step, stats)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def test_harpo_with_an_injected_modulator_equals_its_default():
    kw = dict(beta_rho=0.8, beta_s=0.7, sample_clamp=None)
    plain = make_estimator("harpo", **kw)
    injected = make_estimator("harpo", modulator=HarpoModulator(HarpoConfig(**kw)))
    counting = make_estimator("harpo", modulator=_CountingModulator(HarpoConfig(**kw)))
    steps = _random_steps(6, seed=5)
    for k, (r, g, t) in enumerate(steps):
        a, b, c = (e.compute(r, g, t, step=k).extras["modulation"]
                   for e in (plain, injected, counting))
        for other in (b, c):
            np.testing.assert_array_equal(other.advantages, a.advantages)
            np.testing.assert_array_equal(other.sample_factors, a.sample_factors)
            assert other.groups.to_dict() == a.groups.to_dict()
            assert other.group_tasks == a.group_tasks
    # the factors really did something, and every step went through the injected modulator
    assert len({round(f, 12) for f in a.sample_factors}) > 1
    assert counting.modulator.calls == [(k, len(np.unique(g))) for k, (_, g, _) in
                                        enumerate(steps)]
    assert injected.state_dict() == plain.state_dict() == counting.state_dict()
    assert injected.task_factors() == plain.task_factors() == plain.modulator.task_factors()
    assert counting.task_factors() == {}  # this modulator does not report them


def test_harpo_state_round_trips_through_an_injected_modulator():
    steps = _random_steps(8, seed=6)
    whole = make_estimator("harpo")
    outs = [whole.compute(*s, step=k).advantages for k, s in enumerate(steps)]
    first = make_estimator("harpo", modulator=HarpoModulator())
    for k in range(4):
        first.compute(*steps[k], step=k)
    resumed = make_estimator("harpo", modulator=_CountingModulator(HarpoConfig()))
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for k in range(4, 8):
        np.testing.assert_array_equal(resumed.compute(*steps[k], step=k).advantages, outs[k])
    assert resumed.state_dict() == whole.state_dict()


def test_group_tasks_name_each_group_in_the_modulations_order():
    out = HarpoModulator().update(0, TASKS, GROUPS, ADV)
    assert out.group_tasks == ("a", "a", "b")
    codes = make_estimator("harpo").compute(
        [1, 0, 1, 0, 0.5, 0.5], [9, 9, 3, 3, 5, 5], [1, 1, 0, 0, 1, 1], step=0,
        task_names=["cls", "qa"]).extras["modulation"]
    assert len(codes.group_tasks) == codes.groups.sample_factors.size == 3
    assert sorted(codes.group_tasks) == ["cls", "qa", "qa"]
    # group g of the modulation is the group of the rollouts that carry its factor
    per_rollout = np.asarray(codes.group_tasks)[codes._batch.groups.index]
    assert per_rollout.tolist() == ["qa", "qa", "cls", "cls", "qa", "qa"]


def test_harpo_modulator_argument_errors():
    with pytest.raises(ValueError, match=r"harpo: got both a modulator and HarpoConfig fields "
                                         r"\['beta_rho'\]; an injected modulator carries its own"):
        make_estimator("harpo", modulator=HarpoModulator(), beta_rho=0.5)
    with pytest.raises(TypeError, match=r"harpo: the modulator \(dict\) has no update_groups, "
                                        r"state_dict, load_state_dict"):
        make_estimator("harpo", modulator={})
    with pytest.raises(ValueError, match=r"\['modulater'\] for estimator 'harpo'"):
        make_estimator("harpo", modulater=HarpoModulator())


def test_a_modulator_answer_for_another_batch_is_refused():
    class Stale(_CountingModulator):
        def update_groups(self, step, stats):  # answers with another batch's factors
            other = GroupStats.from_task_labels(["a"], size=[2], signal=[1.0])
            return self.inner.update_groups(step, other)

    with pytest.raises(ValueError, match=r"answered step 0 with \(1,\) sample factors and "
                                         r"\(1,\) task factors for a batch of 3 groups"):
        make_estimator("harpo", modulator=Stale(HarpoConfig())).compute(
            ADV, GROUPS, TASKS, step=0)
