"""How the trainer's step hands the newer estimators what they need (no Ray): GDPO gets the
reward's components with their weights, the metrics row carries each task's signal share, and
the config accepts and refuses the new estimators with the config's messages."""

import numpy as np
import pytest

from harpo_core import make_estimator
from services.advantages import step_advantages
from services.config import parse_config
from services.step_record import signal_share


def summary():
    # two groups of task 0 and one of task 1; total = 0.8 task + 0.2 format + overlong
    task = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    fmt = np.array([0.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    over = np.array([0.0, 0.0, 0.0, 0.0, 0.0, -0.5])
    return {"reward": 0.8 * task + 0.2 * fmt + over, "reward_task": task, "reward_format": fmt,
            "reward_overlong": over, "group_id": np.array([0, 0, 1, 1, 2, 2]),
            "task_code": np.array([0, 0, 0, 0, 1, 1]),
            "reward_error": np.zeros(6, dtype=bool)}


def test_gdpo_gets_the_rewards_components_from_the_step():
    s = summary()
    got = step_advantages(make_estimator("gdpo"), 0, s, ("a", "b"), drop_failed_groups=False,
                          format_weight=0.2).values
    # by hand: task per group [+1, -1 | 0, 0 | +1, -1]; format [0, 0 | +1, -1 | 0, 0];
    # overlong [0, 0 | 0, 0 | +1, -1]; weighted sum 0.8 task + 0.2 format + 1 overlong
    total = np.array([0.8, -0.8, 0.2, -0.2, 1.8, -1.8])
    np.testing.assert_allclose(got, (total - total.mean()) / total.std(), rtol=1e-12)
    # the weights are the config's: another format weight gives other advantages
    other = step_advantages(make_estimator("gdpo"), 0, s, ("a", "b"),
                            drop_failed_groups=False, format_weight=0.5).values
    assert not np.allclose(other, got)


def test_an_estimator_without_components_gets_none():
    s = summary()
    got = step_advantages(make_estimator("grpo"), 0, s, ("a", "b"),
                          drop_failed_groups=False).values
    np.testing.assert_allclose(got, make_estimator("grpo").compute(
        s["reward"], s["group_id"], s["task_code"]).advantages)


def test_signal_share_is_each_tasks_part_of_the_total_absolute_advantage():
    codes = np.array([0, 0, 1, 1, 1, 2])
    adv = np.array([1.0, -1.0, 0.5, -0.25, -0.25, 0.0])
    assert signal_share(codes, adv, ("a", "b", "c", "d")) == {"a": 2 / 3, "b": 1 / 3, "c": 0.0}
    assert signal_share(codes, np.zeros(6), ("a", "b", "c")) == {"a": 0.0, "b": 0.0, "c": 0.0}


def config(algorithm):
    return parse_config({"model": {"path": "m"}, "data": {"path": "d"},
                         "algorithm": algorithm})


@pytest.mark.parametrize("algorithm", [
    {"estimator": "g2rpo"}, {"estimator": "gdpo"},
    {"estimator": "mt_grpo", "params": {"lam": 0.5, "lr": 0.2}},
    {"estimator": "harpo_on", "params": {"base": "dr_grpo"}, "harpo": {"zero_signal": "floor"}},
])
def test_the_config_accepts_the_newer_estimators(algorithm):
    assert config(algorithm).algorithm.estimator == algorithm["estimator"]


@pytest.mark.parametrize("algorithm, message", [
    ({"estimator": "mt_grpo", "params": {"lam": -1}},
     "algorithm.params: mt_grpo: lam must be a number >= 0, got -1"),
    ({"estimator": "harpo_on", "params": {"base": "ema_grpo"}},
     "algorithm.params: harpo: base 'ema_grpo' cannot be modulated: its per-task std is state"),
    ({"estimator": "g2rpo", "params": {"eps": 1e-3}},
     "algorithm.params: unknown parameter(s) ['eps'] for estimator 'g2rpo'; allowed: []"),
])
def test_the_config_refuses_bad_settings_of_the_newer_estimators(algorithm, message):
    with pytest.raises(ValueError) as info:
        config(algorithm)
    assert message in str(info.value)


def test_mt_grpos_task_weights_reach_the_metrics_row():
    from services.step_record import StepRecord, WeightSyncReport, metrics_row

    s = summary()
    out = step_advantages(make_estimator("mt_grpo", lam=1.0, lr=0.1), 0, s, ("a", "b"),
                          drop_failed_groups=False)
    # by hand: mean rewards J_a = 0.25, J_b = 0.35 (no improvement yet), so u = J; from equal
    # logits xi <- -0.1 * 0.5 * (u - 0.3) = (+0.0025, -0.0025); w = 2 softmax(xi) = 1 ± tanh
    w = {"a": 1 + np.tanh(0.0025), "b": 1 - np.tanh(0.0025)}
    assert out.task_weights == pytest.approx(w, rel=1e-12)
    grpo = make_estimator("grpo").compute(s["reward"], s["group_id"], s["task_code"]).advantages
    np.testing.assert_allclose(out.values, grpo * np.array([w["a"]] * 4 + [w["b"]] * 2))
    n = s["reward"].size
    record = StepRecord(
        step=0, task_names=("a", "b"),
        summary={**s, "prompt_index": np.arange(n), "policy_version": np.zeros(n, int),
                 "accuracy": s["reward_task"], "response_length": np.full(n, 10),
                 "stopped": np.ones(n, bool)},
        advantages=out, learner={}, timings={"step_s": 1.0}, sync=WeightSyncReport(),
        rollouts_per_worker={}, rollout_workers=1, restarts={}, weight_sync_failures=0)
    row = metrics_row(record)
    assert row["task_weight"] == pytest.approx(w, rel=1e-12)
    assert "task_factor" not in row  # mt_grpo has no HARPO modulation
    from services.compare_report import _factors

    assert _factors(row) == row["task_weight"]  # the report plots them as HARPO's factors
    # an estimator without task weights leaves the field out
    plain = step_advantages(make_estimator("grpo"), 0, s, ("a", "b"), drop_failed_groups=False)
    assert plain.task_weights is None
    assert "task_weight" not in metrics_row(
        StepRecord(**{**record.__dict__, "advantages": plain}))
