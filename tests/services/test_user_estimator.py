"""A user's estimator, named in the config as ``"package.module:function"``, trains through the
whole pipeline (real Ray, tiny model) exactly like a registered one, and its state is
checkpointed in ``estimator.json`` like any estimator's."""

import json

import pytest

from services.controller import Trainer
from tests.services.conftest import tiny_config

pytestmark = pytest.mark.slow

ESTIMATORS = {
    "builtin": {"estimator": "dr_grpo"},
    # 2 × dr_grpo's advantages
    "user": {"estimator": "tests.core.user_estimator:scaled_centered", "params": {"scale": 2.0}},
    "stateful": {"estimator": "tests.core.user_estimator:RunningBaseline",
                 "params": {"decay": 0.5}},
}


@pytest.fixture(scope="module")
def runs(ray_cluster, tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("user-estimator")
    out = {}
    for name, algorithm in ESTIMATORS.items():
        # one mini-batch per step: the update's loss is taken at ratio 1, linear in A. Two
        # rollout workers: with one, both policies sample the same step-1 rollouts (AdamW's
        # update hardly changes when every gradient doubles), whose loss is float dust.
        config = tiny_config(tiny_assets, root / name, algorithm=algorithm,
                             rollout={"workers": 2}, learner={"mini_batch_prompts": 4})
        trainer = Trainer(config)
        try:
            out[name] = trainer.run()
        finally:
            trainer.shutdown()
    return root, out


def test_a_user_estimator_drives_the_update(runs):
    _, rows = runs
    builtin, user = rows["builtin"], rows["user"]
    assert [r["step"] for r in user] == [0, 1]
    # Step 0: the same prompts, sampled by the same initial policy with the same seeds ...
    assert user[0]["prompt_digest"] == builtin[0]["prompt_digest"]
    assert user[0]["reward"] == builtin[0]["reward"]
    # ... so the user's advantages are exactly twice dr_grpo's, and so is the loss.
    assert set(user[0]["advantage_abs_mean"]) == set(builtin[0]["advantage_abs_mean"])
    for task, value in builtin[0]["advantage_abs_mean"].items():
        assert user[0]["advantage_abs_mean"][task] == pytest.approx(2 * value, rel=1e-12)
    assert builtin[0]["loss"] != 0.0
    assert user[0]["loss"] == pytest.approx(2 * builtin[0]["loss"], rel=1e-5)
    assert user[0]["grad_norm"] == pytest.approx(2 * builtin[0]["grad_norm"], rel=1e-4)
    # the two policies took different updates
    assert user[1]["loss"] != pytest.approx(2 * builtin[1]["loss"], rel=1e-5)


def test_a_stateful_user_estimator_is_checkpointed(runs):
    root, rows = runs
    assert [r["step"] for r in rows["stateful"]] == [0, 1]
    for step in (1, 2):
        state = json.loads((root / "stateful" / f"checkpoints/step-{step:06d}"
                            / "estimator.json").read_text())
        assert set(state) == {"baseline"} and isinstance(state["baseline"], float)
    first = json.loads((root / "stateful/checkpoints/step-000001/estimator.json").read_text())
    second = json.loads((root / "stateful/checkpoints/step-000002/estimator.json").read_text())
    assert first != second  # the baseline moved with the second batch
    # a stateless estimator's file is there too, and empty
    assert json.loads((root / "user/checkpoints/step-000002/estimator.json").read_text()) == {}
