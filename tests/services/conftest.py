"""Shared fixtures for the services tests: tiny assets built once, one embedded Ray."""

import os

import pytest

from services.cluster import apply_env_defaults

apply_env_defaults()


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    from services.tiny.model import init_tiny

    return init_tiny(tmp_path_factory.mktemp("tiny"), n_train_per_task=60, n_test_per_task=8)


@pytest.fixture(scope="session")
def omni_assets(tmp_path_factory):
    """``harpo init-tiny --omni``: the tiny Qwen2.5-Omni thinker and the omni suite (6 train,
    3 test rows per task), built once for the omni tests."""
    from services.cli import main
    from services.tiny.model import TinyAssets

    out = tmp_path_factory.mktemp("omni") / "assets"
    assert main(["init-tiny", "--omni", str(out), "--train-per-task", "6",
                 "--test-per-task", "3"]) == 0
    return TinyAssets(model_dir=out / "model", data_dir=out / "data")


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from services.cluster import connect

    connect(num_cpus=8)
    yield ray
    ray.shutdown()


def tiny_config(assets, run_dir, **sections):
    """A small, fast run on the tiny assets; ``sections`` override per section."""
    from services.config import parse_config

    base = {
        "run": {"name": "test", "output_dir": str(run_dir), "steps": 2, "checkpoint_every": 1,
                "seed": 0, "keep_checkpoints": 5},
        "model": {"path": str(assets.model_dir)},
        "data": {"path": str(assets.data_dir), "prompts_per_step": 4, "max_prompt_tokens": 256,
                 "eval_prompts_per_task": 2},
        # one rollout worker and one scorer: each more costs every Trainer a process start
        # (~9 s of CPU); the tests of a pool's spread, scaling and faults ask for two
        "rollout": {"workers": 1, "group_size": 4, "max_new_tokens": 12},
        "reward": {"scorers": 1},
        "learner": {"workers": 1, "mini_batch_prompts": 2, "lr": 1e-3},
        # endpoints off unless a test asks for them (0 would pick free ports)
        "observability": {"progress": "never", "metrics_port": None},
        "control": {"port": None},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return parse_config(base)


os.environ.setdefault("OMP_NUM_THREADS", "1")
