"""``harpo compare``: a 2-estimator, 2-step, 1-seed study on the tiny assets and real Ray (the
session's instance, joined by each run's own process), its report, resuming it, and the
refusals that come before anything runs."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from services.cli import main
from services.compare import concurrency

ESTIMATORS = "grpo,harpo"
# two classification tasks and a QA task, whose similarity reward gives every step a signal
TASKS = ("emotion", "parity", "weather_qa")


def write_config(assets, path: Path, **sections) -> Path:
    config = {
        "run": {"name": "cmp", "output_dir": str(path.parent / "unused"), "steps": 2,
                "checkpoint_every": 1, "seed": 0},
        "model": {"path": str(assets.model_dir)},
        "data": {"path": str(assets.data_dir), "prompts_per_step": 4, "max_prompt_tokens": 256,
                 "eval_prompts_per_task": 1, "tasks": list(TASKS)},
        "rollout": {"workers": 1, "group_size": 4, "max_new_tokens": 8},
        "reward": {"scorers": 1},
        "learner": {"workers": 1, "mini_batch_prompts": 2, "lr": 1e-3},
        "observability": {"progress": "never", "metrics_port": None},
        "control": {"port": None},
    }
    for section, values in sections.items():
        config[section].update(values)
    path.write_text(yaml.safe_dump(config))
    return path


def compare_args(config: Path, out: Path, estimators: str = ESTIMATORS) -> list[str]:
    import ray

    return ["compare", str(config), "--estimators", estimators, "--out", str(out),
            "--address", ray.get_runtime_context().gcs_address, "--eval-samples", "2"]


@pytest.fixture(scope="module")
def study(tiny_assets, ray_cluster, tmp_path_factory):
    """The study grpo,harpo, interrupted after its grpo run (the state a study stopped
    between its runs leaves: grpo's result written, harpo never started), then run again with
    the same command: two trainings in all, shared by the tests below."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("compare")
    config = write_config(tiny_assets, root / "tiny.yaml")
    out = root / "study"
    assert main(compare_args(config, out, "grpo")) == 0
    results = out / "results"
    kept = {"result": (results / "grpo-seed0.json").stat().st_mtime_ns,
            "log": (results / "grpo-seed0.log").stat().st_size,
            "metrics": (out / "runs" / "grpo-seed0" / "metrics.jsonl").read_text()}
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        assert main(compare_args(config, out)) == 0
    return config, out, kept, said.getvalue()


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with path.open() as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def test_a_study_writes_the_report_with_the_expected_columns(study):
    _, out, _, _ = study
    report = out / "report"
    text = (out / "REPORT.md").read_text()
    for heading in ("Table 1 form", "Share of the policy-gradient signal", "Before and after"):
        assert heading in text
    columns, rows = read_csv(report / "summary.csv")
    assert columns == ["estimator", "seeds", "primary_metric", "mean_score", "worst_task",
                       "worst_score", "average_rank", "max_min_share_ratio"]
    assert [r["estimator"] for r in rows] == ["grpo", "harpo"]
    assert {r["primary_metric"] for r in rows} == {"sampled reward"}
    # two estimators: ranks per task are 1 and 2 or a shared 1.5; their mean is 1.5
    assert sum(float(r["average_rank"]) for r in rows) == pytest.approx(3.0)
    columns, rows = read_csv(report / "per_task.csv")
    assert columns == ["estimator", "task", "evaluation", "metric", "seeds", "before_mean",
                       "before_std", "after_mean", "after_std", "change_mean"]
    tasks = sorted({r["task"] for r in rows})
    assert tasks == list(TASKS)
    assert len(rows) == 2 * 2 * 2 * len(tasks)  # estimators x greedy/sampled x reward/accuracy
    # the same seed and model: both estimators start from the same held-out numbers
    before = {(r["task"], r["evaluation"], r["metric"], r["estimator"]): r["before_mean"]
              for r in rows}
    for task, evaluation, metric, _ in before:
        assert before[(task, evaluation, metric, "grpo")] == before[(task, evaluation, metric,
                                                                     "harpo")]
    columns, rows = read_csv(report / "signal_share.csv")
    assert columns == ["estimator", "task", "seeds", "share_mean", "share_first_step",
                       "share_last_step"]
    assert {r["estimator"] for r in rows} == {"grpo", "harpo"}
    columns, rows = read_csv(report / "curves.csv")
    assert columns == ["estimator", "seed", "step", "task", "reward", "signal_share",
                       "task_factor"]
    for label in ("grpo", "harpo"):  # a step's shares add up to 1 (the QA task has signal)
        for step in ("0", "1"):
            total = sum(float(r["signal_share"]) for r in rows
                        if r["estimator"] == label and r["step"] == step)
            assert total == pytest.approx(1.0)
    assert {r["task_factor"] != "" for r in rows if r["estimator"] == "harpo"} >= {True}
    assert all(r["task_factor"] == "" for r in rows if r["estimator"] == "grpo")
    for name in ("reward_curves.png", "signal_shares.png", "factors.png", "before_after.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"report/{name}" in text
    summary = json.loads((report / "summary.json").read_text(), parse_constant=pytest.fail)
    assert summary["tasks"] == tasks and summary["missing"] == []
    # each run is a normal run directory
    for run in ("grpo-seed0", "harpo-seed0"):
        run_dir = out / "runs" / run
        assert (run_dir / "config.yaml").is_file()
        assert [json.loads(x)["step"] for x in
                (run_dir / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert yaml.safe_load((out / "runs" / "harpo-seed0" / "config.yaml").read_text())[
        "algorithm"]["estimator"] == "harpo"


def test_an_interrupted_study_resumes_without_rerunning_finished_runs(study):
    _, out, kept, said = study
    results = out / "results"
    assert "grpo-seed0: finished earlier, kept" in said
    assert "1 run(s) to train" in said and "harpo-seed0: started" in said
    assert "grpo-seed0: started" not in said
    assert (results / "grpo-seed0.json").stat().st_mtime_ns == kept["result"]
    assert (results / "grpo-seed0.log").stat().st_size == kept["log"]  # never launched again
    assert (out / "runs" / "grpo-seed0" / "metrics.jsonl").read_text() == kept["metrics"]
    assert json.loads((results / "harpo-seed0.json").read_text())["finished"]
    manifest = json.loads((out / "study.json").read_text())
    assert [r["run_id"] for r in manifest["runs"]] == ["grpo-seed0", "harpo-seed0"]


@pytest.mark.parametrize("args, message", [
    (["--estimators", "grpo,nope"],
     "--estimators entry 'nope': .*tiny.yaml is not valid:\n  - algorithm.estimator: "
     "unknown estimator 'nope'; available: \\['dr_grpo'"),
    (["--estimators", "grpo,harpo:beta_rho=2"],
     "--estimators entry 'harpo:beta_rho=2': .*beta_rho must be a number in \\[0, 1\\), got 2"),
    (["--estimators", "grpo:zero_signal=floor"],
     "--estimators entry 'grpo:zero_signal=floor': .*unknown parameter\\(s\\) "
     "\\['zero_signal'\\] for estimator 'grpo'"),
    (["--estimators", "harpo_on:base=mt_grpo"],
     "harpo: base 'mt_grpo' cannot be modulated"),
    (["--estimators", "grpo,,harpo"], "an entry is empty"),
    (["--estimators", "grpo,grpo"], "--estimators lists \\['grpo'\\] more than once"),
    (["--estimators", "harpo:=1"], "'' is not a parameter name"),
    (["--estimators", "zero_signal=floor:harpo"], "write the estimator first"),
    (["--estimators", "grpo", "--set", "learner.nope=1"], "learner.nope: unknown field"),
    (["--estimators", "grpo", "--set", "algorithm.estimator=rloo"],
     "the study sets the estimator of each run from --estimators"),
])
def test_bad_estimators_and_overrides_are_refused_before_anything_runs(
        tiny_assets, tmp_path, capsys, args, message):
    import re

    config = write_config(tiny_assets, tmp_path / "tiny.yaml")
    out = tmp_path / "study"
    assert main(["compare", str(config), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err, re.DOTALL), err
    assert not out.exists()  # nothing written, nothing started


def test_a_study_directory_is_not_reused_for_another_setup(tiny_assets, tmp_path, capsys):
    from services.compare_plan import plan_study, write_plan

    config = write_config(tiny_assets, tmp_path / "tiny.yaml")
    out = tmp_path / "study"
    write_plan(plan_study(config, "grpo", 1, {}, out))
    planned = (out / "plans" / "grpo-seed0.yaml").read_text()
    assert main(["compare", str(config), "--out", str(out), "--estimators", "grpo",
                 "--set", "run.steps=3"]) == 2
    assert "already holds run grpo-seed0 planned with a different configuration" in \
        capsys.readouterr().err
    assert (out / "plans" / "grpo-seed0.yaml").read_text() == planned
    assert not (out / "runs" / "grpo-seed0").exists()


def test_concurrency_follows_the_cluster_or_the_cores(tiny_assets, tmp_path):
    from services.config import load_config

    config = load_config(write_config(tiny_assets, tmp_path / "tiny.yaml"))  # 2.5 CPUs a run
    assert concurrency(config, embedded=True, cluster=None, cores=2) == 1
    assert concurrency(config, embedded=True, cluster=None, cores=16) == 8
    assert concurrency(config, embedded=False, cluster={"CPU": 8.0}) == 3
    assert concurrency(config, embedded=False, cluster={"CPU": 1.0}) == 1
    gpu = load_config(write_config(tiny_assets, tmp_path / "gpu.yaml",
                                   learner={"gpus_per_worker": 1.0}))
    assert concurrency(gpu, embedded=False, cluster={"CPU": 64.0, "GPU": 2.0}) == 2


def test_the_report_tables_by_hand():
    """Ranks, worst task, mean ± std over seeds and signal shares from made-up run results."""
    from types import SimpleNamespace

    from services.compare_report import tables

    def run(seed, x, y, shares):
        ev = {"greedy": {"reward": {"x": x, "y": y}, "accuracy": {"x": x, "y": y}}}
        before = {"greedy": {"reward": {"x": 0.1, "y": 0.1}, "accuracy": {"x": 0, "y": 0}}}
        rows = [{"step": k, "reward": {"x": 0.5, "y": 0.5}, "signal_share": s}
                for k, s in enumerate(shares)]
        return {"seed": seed, "before": before, "after": ev, "rows": rows}

    study = SimpleNamespace(variants=[SimpleNamespace(label="a"), SimpleNamespace(label="b")])
    data = {"runs": {
        "a": [run(0, 0.8, 0.2, [{"x": 0.9, "y": 0.1}, {"x": 0.7, "y": 0.3}]),
              run(1, 0.6, 0.2, [{"x": 0.8, "y": 0.2}, {"x": 0.8, "y": 0.2}])],
        "b": [run(0, 0.5, 0.4, [{"x": 0.5, "y": 0.5}]), run(1, 0.5, 0.4, [{"x": 1.0}])]},
        "missing": []}
    t = tables(study, data)
    assert t["primary"] == ("greedy", "reward")
    a, b = t["summary"]
    # a: x 0.7 ± 0.141, y 0.2 -> ranks x 1, y 2; b: x 0.5, y 0.4 -> ranks x 2, y 1
    assert t["scores"]["a"]["x"] == pytest.approx((0.7, 0.1 * 2 ** 0.5))
    assert (a["average_rank"], b["average_rank"]) == (1.5, 1.5)
    assert (a["worst_task"], a["worst_score"]) == ("y", pytest.approx(0.2))
    assert (b["worst_task"], b["worst_score"]) == ("y", pytest.approx(0.4))
    assert a["mean_score"] == pytest.approx(0.45)
    # shares: a's x averages (0.8 + 0.8) / 2 over seeds, y 0.2 -> ratio 4; b's y is 0 in the
    # second seed's only step (absent task): (0.5 + 0) / 2
    share = {(r["estimator"], r["task"]): r["share_mean"] for r in t["shares"]}
    assert share[("a", "x")] == pytest.approx(0.8) and share[("a", "y")] == pytest.approx(0.2)
    assert a["max_min_share_ratio"] == pytest.approx(4.0)
    assert share[("b", "y")] == pytest.approx(0.25)
    assert b["max_min_share_ratio"] == pytest.approx(0.75 / 0.25)


def test_float_noise_neither_splits_a_tie_nor_makes_a_share_ratio():
    """Two estimators whose held-out means differ in the last bits tie; a task whose share is
    float dust (advantages that cancel) makes the ratio unbounded, not 1e16."""
    from services.compare_report import _ranks, _ratio, _share_ratio

    assert _ranks({"a": 0.5, "b": 0.5 + 1e-16, "c": 0.25}) == {"a": 1.5, "b": 1.5, "c": 3.0}
    assert _ranks({"a": 0.5, "b": 0.5 + 1e-6}) == {"a": 2.0, "b": 1.0}  # a real difference
    assert _share_ratio([0.75, 0.25]) == pytest.approx(3.0)
    assert _share_ratio([1.0, 3e-17]) == float("inf")
    assert _share_ratio([0.0, 0.0]) == float("inf")
    assert _ratio(float("inf")) == "∞ (a task got no signal)" and _ratio(3.0) == "3.00"
