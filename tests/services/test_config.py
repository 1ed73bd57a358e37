"""Every way a run config can be wrong gets a message naming the field, value and the rule."""

import pytest
import yaml

from services.config import ConfigError, load_config, parse_config

MINIMAL = {"model": {"path": "m"}, "data": {"path": "d"}}


def _with(section: str, **values) -> dict:
    data = {k: dict(v) for k, v in MINIMAL.items()}
    data.setdefault(section, {}).update(values)
    return data


def test_defaults_are_the_papers():
    config = parse_config(MINIMAL)
    assert config.algorithm.estimator == "harpo"
    assert config.algorithm.harpo.beta_rho == 0.95 and config.algorithm.harpo.beta_s == 0.95
    assert config.algorithm.harpo.task_clamp == (0.5, 4.0)
    assert config.algorithm.harpo.sample_clamp == (0.5, 3.0)
    assert config.algorithm.harpo.zero_signal == "exclude"
    assert config.reward.format_weight == 0.2 and config.reward.overlong_factor == 0.75
    assert config.learner.kl_coef == 0.0 and config.learner.lr == 1e-6
    assert config.learner.aggregation == "seq-mean-token-mean"


@pytest.mark.parametrize("data, message", [
    (_with("rollout", group_size=1),
     r"rollout.group_size: Input should be greater than or equal to 2 \(got 1\)"),
    (_with("rollout", backend="tgi"),
     r"rollout.backend: unknown rollout backend 'tgi'; available: \['hf', 'vllm'.*\] "
     r"\(got 'tgi'\)"),
    (_with("rollout", max_staleness=2),
     r"rollout.max_staleness: Input should be less than or equal to 1 \(got 2\)"),
    (_with("rollout", grup_size=4), r"rollout.grup_size: unknown field"),
    (_with("algorithm", estimator="ppo"),
     r"algorithm.estimator: unknown estimator 'ppo'; available: \[.*'harpo'"),
    (_with("algorithm", harpo={"zero_signal": "drop"}),
     r"algorithm.harpo.zero_signal: Input should be 'exclude' or 'floor' \(got 'drop'\)"),
    (_with("algorithm", harpo={"task_clamp": [2.0, 4.0]}),
     r"algorithm.harpo: task_clamp must satisfy 0 < low <= 1 <= high"),
    (_with("algorithm", harpo={"beta_rho": 1.0}),
     r"algorithm.harpo.beta_rho: Input should be less than 1"),
    (_with("learner", aggregation="sum"),
     r"learner.aggregation: Input should be 'seq-mean-token-mean' or 'token-mean'"),
    (_with("learner", lr=-1), r"learner.lr: Input should be greater than 0 \(got -1\)"),
    (_with("learner", mini_batch_prompts=3),
     r"learner.mini_batch_prompts \(3\) must divide data.prompts_per_step \(8\)"),
    (_with("learner", workers=3), r"learner.workers \(3\) must divide the sequences"),
    (_with("reward", format_weight=1.5),
     r"reward.format_weight: Input should be less than or equal to 1"),
    ({"data": {"path": "d"}}, r"model: required field is missing"),
    (_with("data", eval_samples=4),
     r"data: eval_samples \(4\) > 1 needs eval_temperature > 0: greedy decoding"),
    (_with("data", eval_temperature=-1.0),
     r"data.eval_temperature: Input should be greater than or equal to 0"),
])
def test_bad_fields_are_named(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_all_errors_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        parse_config(_with("rollout", group_size=0, temperature=0))
    assert "rollout.group_size" in str(info.value) and "rollout.temperature" in str(info.value)


def test_files_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    config = load_config(path, {"run.steps": 7, "algorithm.harpo.beta_s": 0.5})
    assert config.run.steps == 7 and config.algorithm.harpo.beta_s == 0.5
    assert config.model.path == tmp_path / "m"  # relative to the config file
    # the resolved config round-trips through its own YAML
    assert parse_config(yaml.safe_load(config.to_yaml())) == config


def test_unusable_files(tmp_path):
    with pytest.raises(ConfigError, match="config file '.*nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections, got list"):
        load_config(bad)


def test_shipped_examples_are_valid():
    from pathlib import Path

    examples = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        config = load_config(path)
        assert config.model.path.is_absolute() and config.run.output_dir.is_absolute()
