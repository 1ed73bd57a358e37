"""One advantage path: the harpo estimator with its modulator in-process or in a Ray actor
gives the same advantages, factors and state, bit for bit."""

import numpy as np
import pytest

from harpo_core import HarpoConfig, HarpoModulator, make_estimator

TASKS = ["math", "code", "qa", "cls"]


def _random_batches(n, seed):
    """Multi-task batches of groups of 4; some groups all-equal, tasks vary per step."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n):
        n_groups = int(rng.integers(5, 14))
        group_ids = np.repeat(rng.permutation(1000)[:n_groups], 4)
        task_codes = np.repeat(rng.integers(0, len(TASKS), n_groups), 4)
        rewards = rng.choice([0.0, 0.3, 1.0], size=group_ids.size, p=[0.5, 0.1, 0.4])
        batches.append((rewards, group_ids, task_codes))
    return batches


@pytest.fixture
def remote_modulator(ray_cluster, tmp_path):
    from services.modulator_actor import ModulatorService, RemoteModulator

    restarts = []
    handle = ModulatorService.options(max_restarts=-1, max_task_retries=-1).remote(
        HarpoConfig(), None, str(tmp_path / "mod.json"))
    yield RemoteModulator(handle, on_restart=restarts.append), restarts, handle
    ray_cluster.kill(handle, no_restart=True)


def _compute(est, batch, step):
    return est.compute(*batch, step=step, task_names=TASKS).extras["modulation"]


def test_remote_and_in_process_modulators_agree_bit_for_bit(remote_modulator):
    remote, restarts, _ = remote_modulator
    local = make_estimator("harpo")
    distant = make_estimator("harpo", modulator=remote)
    for step, batch in enumerate(_random_batches(4, seed=1)):
        a, b = _compute(local, batch, step), _compute(distant, batch, step)
        np.testing.assert_array_equal(b.advantages, a.advantages)
        np.testing.assert_array_equal(b.sample_factors, a.sample_factors)
        np.testing.assert_array_equal(b.task_factor_per_rollout, a.task_factor_per_rollout)
        assert b.groups.to_dict() == a.groups.to_dict()
        assert b.group_tasks == a.group_tasks
    assert len(set(a.task_factors.values())) > 1  # the factors are not all 1
    assert distant.state_dict() == local.state_dict()
    assert distant.task_factors() == local.task_factors()
    assert remote.stats() == {"largest_message_rows": max(
        np.unique(g).size for _, g, _ in _random_batches(4, seed=1)), "last_step": 3}
    # a replayed step is answered from the actor's cache, the state untouched
    again = _compute(distant, _random_batches(4, seed=1)[3], 3)
    np.testing.assert_array_equal(again.advantages, a.advantages)
    assert distant.state_dict() == local.state_dict()
    assert restarts == []


def test_loaded_state_survives_a_restart_and_the_restart_is_reported(remote_modulator):
    remote, restarts, handle = remote_modulator
    import ray

    batches = _random_batches(6, seed=2)
    local = make_estimator("harpo", modulator=HarpoModulator(HarpoConfig()))
    for step in range(4):
        _compute(local, batches[step], step)
    distant = make_estimator("harpo", modulator=remote)
    _compute(distant, batches[0], 0)  # state that the load below must replace
    distant.load_state_dict(local.state_dict())
    assert distant.state_dict() == local.state_dict()

    ray.kill(handle, no_restart=False)  # Ray restarts it; it reloads its live state file
    for step in (4, 5):
        a, b = _compute(local, batches[step], step), _compute(distant, batches[step], step)
        np.testing.assert_array_equal(b.advantages, a.advantages)
        assert b.groups.to_dict() == a.groups.to_dict()
    assert restarts == ["modulator"]  # once, not once per update
    assert ray.get(handle.ready.remote())["restarts"] == 1
    assert distant.state_dict() == local.state_dict()
