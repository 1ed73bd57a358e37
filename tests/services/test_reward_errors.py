"""A user reward function that fails on some samples: recorded, scored by reward.on_error, and
the job goes on (or stops, when asked to)."""

import pyarrow.parquet as pq
import pytest

from services.controller import Trainer
from tests.services.conftest import tiny_config


@pytest.fixture(scope="module")
def flaky_data(tiny_assets, tmp_path_factory):
    """The tiny suite with its first task re-typed as "flaky" (scored by flaky_reward)."""
    out = tmp_path_factory.mktemp("flaky-data")
    shards = sorted(tiny_assets.data_dir.glob("*.parquet"))
    first = pq.read_table(shards[0]).column("task")[0].as_py()
    for shard in shards:
        table = pq.read_table(shard)
        types = ["flaky" if t == first else k for t, k in
                 zip(table.column("task").to_pylist(), table.column("task_type").to_pylist())]
        index = table.schema.get_field_index("task_type")
        pq.write_table(table.set_column(index, "task_type", [types]), out / shard.name)
    return out, first


def _config(tiny_assets, data, run_dir, on_error):
    return tiny_config(tiny_assets, run_dir, run={"steps": 2},
                       data={"path": str(data), "prompts_per_step": 8},
                       learner={"mini_batch_prompts": 4},
                       reward={"custom": {"flaky": "tests.services.flaky_reward:score"},
                               "on_error": on_error})


@pytest.mark.parametrize("on_error", ["zero", "drop_group"])
def test_failing_samples_are_recorded_and_the_job_goes_on(on_error, flaky_data, tiny_assets,
                                                          ray_cluster, tmp_path):
    data, flaky_task = flaky_data
    trainer = Trainer(_config(tiny_assets, data, tmp_path / on_error, on_error))
    try:
        rows = trainer.run()
    finally:
        trainer.shutdown()
    assert [r["step"] for r in rows] == [0, 1]
    errors = sum(r["reward_errors"].get(flaky_task, 0) for r in rows)
    assert errors > 0, rows[0]["reward_errors"]
    assert set().union(*(r["reward_errors"] for r in rows)) == {flaky_task}
    dropped = sum(r["dropped_groups"] for r in rows)
    if on_error == "drop_group":  # every group with a failed sample sits the step out
        assert 1 <= dropped <= errors
    else:
        assert dropped == 0


def test_on_error_raise_stops_the_job_with_the_functions_error(flaky_data, tiny_assets,
                                                                ray_cluster, tmp_path):
    data, _ = flaky_data
    trainer = Trainer(_config(tiny_assets, data, tmp_path / "raise", "raise"))
    try:
        with pytest.raises(Exception, match="cannot score a response of"):
            trainer.run()
    finally:
        trainer.shutdown()
