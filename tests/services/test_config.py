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
    (_with("data", task_mix="uniform"),
     r"data.task_mix: Input should be 'balanced' or 'proportional' \(got 'uniform'\)"),
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


# ---------------------------------------------------------------------- the algorithm section

USER = "tests.core.user_estimator"


def test_harpo_section_is_harpo_config_with_its_defaults():
    import dataclasses

    from harpo_core import HarpoConfig
    from services.config_algorithm import HarpoSection

    core = {f.name: f.default for f in dataclasses.fields(HarpoConfig)}
    section = HarpoSection().model_dump()
    assert set(section) == set(core) - {"history"}
    assert section == {k: core[k] for k in section}
    assert HarpoSection().to_config() == HarpoConfig()
    assert HarpoSection(beta_s=0.5).to_config() == HarpoConfig(beta_s=0.5)


@pytest.mark.parametrize("estimator, expected", [
    ("harpo", {"eps": 1e-5, "std_ddof": 1, "beta_rho": 0.95, "beta_s": 0.5,
               "task_clamp": (0.5, 4.0), "sample_clamp": (0.5, 3.0), "zero_signal": "exclude",
               "signal_floor": 1e-6}),
    ("grpo", {"eps": 1e-5, "std_ddof": 1}),
    ("reinforce_pp_baseline", {"eps": 1e-5}),
    ("ema_grpo", {"eps": 1e-5, "decay": 0.9}),
    ("rloo", {}), ("dr_grpo", {}), ("gpg", {}),
    (f"{USER}:scaled_centered", {}),
])
def test_estimator_params_are_the_fields_each_estimator_takes(estimator, expected):
    config = parse_config(_with("algorithm", estimator=estimator, eps=1e-5, std_ddof=1,
                                ema_decay=0.9, harpo={"beta_s": 0.5}))
    assert config.algorithm.estimator_params() == expected


def test_algorithm_params_reach_a_user_estimator_and_override_the_fields():
    config = parse_config(_with("algorithm", estimator=f"{USER}:scaled_centered",
                                params={"scale": 2.0}))
    assert config.algorithm.estimator_params() == {"scale": 2.0}
    config = parse_config(_with("algorithm", estimator="grpo", eps=1e-5, params={"eps": 1e-3}))
    assert config.algorithm.estimator_params() == {"eps": 1e-3, "std_ddof": 0}
    # the resolved config, params included, round-trips through its own YAML
    assert parse_config(yaml.safe_load(config.to_yaml())) == config


def test_a_remote_modulator_replaces_the_harpo_fields():
    sentinel = object()
    config = parse_config(_with("algorithm", harpo={"beta_rho": 0.5}, params={"history": 3}))
    alg = config.algorithm
    assert alg.estimator_params(modulator=sentinel) == {
        "eps": 1e-6, "std_ddof": 0, "modulator": sentinel}
    assert alg.modulator_config().beta_rho == 0.5 and alg.modulator_config().history == 3
    assert alg.estimator_params()["history"] == 3
    with pytest.raises(ValueError, match="estimator 'grpo' takes no modulator"):
        parse_config(_with("algorithm", estimator="grpo")).algorithm.estimator_params(
            modulator=sentinel)


@pytest.mark.parametrize("algorithm, message", [
    ({"params": {"beta": 0.9}},
     "algorithm.params: unknown parameter(s) ['beta'] for estimator 'harpo'; allowed: ['eps', "
     "'std_ddof', 'modulator', 'beta_rho', 'beta_s', 'task_clamp', 'sample_clamp', "
     "'zero_signal', 'signal_floor', 'history'] (got {'beta': 0.9})"),
    ({"estimator": "grpo", "params": {"beta_rho": 0.5}},
     "algorithm.params: unknown parameter(s) ['beta_rho'] for estimator 'grpo'; allowed: "
     "['eps', 'std_ddof'] (got {'beta_rho': 0.5})"),
    ({"estimator": f"{USER}:scaled_centered", "params": {"scal": 2}},
     f"algorithm.params: unknown parameter(s) ['scal'] for estimator '{USER}:scaled_centered'; "
     "allowed: ['scale'] (got {'scal': 2})"),
    ({"params": {"history": 0}},
     "algorithm.params: history must be an integer >= 1, got 0 (got {'history': 0})"),
    ({"params": {"modulator": "remote"}},
     "algorithm.params: 'modulator' is not a config value: the driver gives the estimator the "
     "run's HARPO modulator, configured under algorithm.harpo (got {'modulator': 'remote'})"),
    ({"estimator": "no_such_pkg.mod:advantages"},
     "algorithm.estimator: cannot import module 'no_such_pkg.mod' for estimator "
     "'no_such_pkg.mod:advantages': ModuleNotFoundError: No module named 'no_such_pkg' "
     "(got 'no_such_pkg.mod:advantages')"),
    ({"estimator": f"{USER}:no_such_function"},
     f"algorithm.estimator: estimator '{USER}:no_such_function': no attribute "
     f"'no_such_function' (looked up in module '{USER}') (got '{USER}:no_such_function')"),
    ({"estimator": f"{USER}:NOT_CALLABLE"},
     f"algorithm.estimator: estimator '{USER}:NOT_CALLABLE' is not callable: it is a int "
     f"(got '{USER}:NOT_CALLABLE')"),
])
def test_bad_estimators_and_params_are_named_exactly(algorithm, message):
    with pytest.raises(ConfigError) as info:
        parse_config(_with("algorithm", **algorithm))
    assert str(info.value) == f"config is not valid:\n  - {message}"


def test_a_user_estimator_that_fails_to_build_is_a_config_error():
    with pytest.raises(ConfigError, match=r"algorithm.params: estimator "
                                          rf"'{USER}:RunningBaseline' cannot be built with "
                                          r"\{'decay': 1\}: TypeError: decay must be a "
                                          r"float, got int \(got \{'decay': 1\}\)"):
        parse_config(_with("algorithm", estimator=f"{USER}:RunningBaseline",
                           params={"decay": 1}))
