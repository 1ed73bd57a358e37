"""The job's Prometheus endpoint: real rows in, a real HTTP scrape out, values compared exactly.

Rows come from the driver's own ``metrics_row`` of a ``StepRecord`` whose advantages went
through the real ``harpo`` estimator and modulator, so a key the driver adds or renames shows
up here.
"""

import math
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harpo_core import HarpoConfig, HarpoModulator, make_estimator
from services.advantages import step_advantages
from services.metrics import (
    RESTART_ROLES,
    SAMPLE_FACTOR_BUCKETS,
    MetricsExporter,
    MetricsPortError,
)
from services.step_record import StepRecord, WeightSyncReport, metrics_row

JOB = "unit-job"
TASKS = ("emotion", "sentiment", "qa")
# metrics.jsonl per-task field -> metric
TASK_FIELDS = {
    "task_factor": "harpo_task_factor",
    "task_log_factor": "harpo_task_log_factor",
    "task_signal": "harpo_task_signal",
    "task_signal_ema": "harpo_task_signal_ema",
    "reward": "harpo_task_reward",
    "accuracy": "harpo_task_accuracy",
    "format": "harpo_task_format_rate",
    "batch_share": "harpo_task_batch_share",
    "signal_share": "harpo_task_signal_share",
    "advantage_abs_mean": "harpo_task_advantage_abs_mean",
}
JOB_FIELDS = {
    "policy_version": "harpo_policy_version",
    "reward_mean": "harpo_reward_mean",
    "response_length": "harpo_response_length_tokens",
    "stop_fraction": "harpo_stop_fraction",
    "rollouts_per_s": "harpo_rollouts_per_second",
    "tokens_per_s": "harpo_tokens_per_second",
    "loss": "harpo_loss",
    "kl": "harpo_kl",
    "entropy": "harpo_entropy",
    "clip_frac": "harpo_clip_fraction",
    "approx_kl": "harpo_approx_kl",
    "grad_norm": "harpo_grad_norm",
    "lr": "harpo_learning_rate",
    "logprob_mismatch_max": "harpo_logprob_mismatch_max",
    "logprob_mismatch_mean": "harpo_logprob_mismatch_mean",
    "logprob_mismatch_p99": "harpo_logprob_mismatch_p99",
    "tis_weight_mean": "harpo_tis_weight_mean",
    "tis_truncated_frac": "harpo_tis_truncated_fraction",
    "padding_waste": "harpo_padding_waste",
    "signal_reference": "harpo_signal_reference",
    "rollout_workers": "harpo_rollout_workers",
    "sample_factor_mean": "harpo_sample_factor_mean",
}


def synthetic_step(modulator, step, rng, tasks=TASKS, groups_per_task=3, group_size=4,
                   loss=None):
    """One step's row, the modulation and each group's task, as the driver would have them."""
    names = TASKS
    codes, group_ids, rewards = [], [], []
    g = 0
    for task in tasks:
        for k in range(groups_per_task):
            if task == "qa" and k == 0:
                r = np.full(group_size, 0.1)  # all equal: a zero-signal group
            else:
                # tasks differ in reward spread, so their signals (and factors) differ
                r = rng.random(group_size) * (1 + 3 * names.index(task))
            codes += [names.index(task)] * group_size
            group_ids += [g] * group_size
            rewards.append(r)
            g += 1
    codes, group_ids = np.array(codes), np.array(group_ids)
    rewards = np.concatenate(rewards)
    n = rewards.size
    # the per-rollout summary the reward scorers return (services/reward_scorer.summarize)
    summary = {
        "prompt_index": group_ids * 7, "group_id": group_ids,
        "task_code": codes, "reward": rewards, "accuracy": (rewards > 0.5).astype(float),
        "reward_format": rng.random(n), "response_length": rng.integers(3, 12, n),
        "stopped": rng.random(n) > 0.3, "policy_version": np.full(n, step),
        "reward_error": rng.random(n) > 0.9, "rollout_id": np.arange(n),
    }
    learner = {"loss": rng.normal() if loss is None else loss, "kl": 0.01, "entropy": 2.5,
               "clip_frac": 0.1, "approx_kl": 1e-4, "grad_norm": 0.7, "lr": 1e-3,
               "logprob_mismatch_max": 3e-6, "logprob_mismatch_mean": 1e-7,
               "logprob_mismatch_p99": 2e-6, "tis_weight_mean": 0.98, "tis_truncated_frac": 0.01,
               "padding_waste": 0.25, "fetch_s": 0.01, "update_s": 0.2}
    times = {"generate_s": 1.5, "score_s": 0.25, "modulate_s": 0.003, "learn_s": 0.4,
             "sync_s": 0.05, "step_s": 2.25}
    # the driver's own path: the harpo estimator around this modulator, then the step record
    estimator = make_estimator("harpo", modulator=modulator)
    advantages = step_advantages(estimator, step, summary, names, drop_failed_groups=False)
    record = StepRecord(
        step=step, task_names=names, summary=summary, advantages=advantages, learner=learner,
        timings=times, sync=WeightSyncReport(True, 0.05, {"rollout-0": 0.04}),
        rollouts_per_worker={"rollout-0": n}, rollout_workers=2, restarts={"rollout": 1},
        weight_sync_failures=0)
    return metrics_row(record), advantages.modulation, list(advantages.group_tasks)


def scrape(url):
    """{(sample name, sorted labels): value} of one real HTTP scrape."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples, name, **labels):
    return samples[(name, tuple(sorted({"job": JOB, **labels}.items())))]


@pytest.fixture
def exporter():
    exp = MetricsExporter(JOB)
    exp.start("127.0.0.1", 0)
    yield exp
    exp.close()


def test_scraped_values_equal_the_rows(exporter):
    # a tight clamp and fast EMA, so that some task factor is pinned (applied != unclamped)
    modulator = HarpoModulator(HarpoConfig(beta_s=0.3, task_clamp=(0.8, 1.25)))
    rng = np.random.default_rng(0)
    steps = [synthetic_step(modulator, 0, rng), synthetic_step(modulator, 1, rng),
             synthetic_step(modulator, 2, rng, tasks=("emotion", "qa"))]  # sentiment absent
    observed = {t: [] for t in TASKS}
    zero_groups = dict.fromkeys(TASKS, 0)
    pinned = False
    for row, modulation, group_tasks in steps:
        before = time.time()
        exporter.record_step(row, modulation, group_tasks)
        got = scrape(exporter.url)
        for field, name in JOB_FIELDS.items():
            assert value(got, name) == row[field], field
        for field, name in TASK_FIELDS.items():
            for task, v in row[field].items():
                assert value(got, name, task=task) == v, (field, task)
        for task, log_factor in row["task_log_factor"].items():
            unclamped = value(got, "harpo_task_factor_unclamped", task=task)
            assert unclamped == math.exp(log_factor)
            pinned |= abs(unclamped / row["task_factor"][task] - 1) > 1e-6
        for key, seconds in row["timing"].items():
            assert value(got, "harpo_stage_seconds", stage=key.removesuffix("_s")) == seconds
        for task, n in row["zero_signal_groups"].items():
            zero_groups[task] += n
            assert value(got, "harpo_zero_signal_groups_total", task=task) == zero_groups[task]
        # the sample-factor histogram holds every group's factor so far, under its task
        for task, f in zip(group_tasks, modulation.sample_factors.tolist()):
            observed[task].append(f)
        for task, factors in observed.items():
            assert value(got, "harpo_sample_factor_count", task=task) == len(factors)
            assert value(got, "harpo_sample_factor_sum", task=task) == pytest.approx(
                sum(factors), rel=1e-12)
            for le in SAMPLE_FACTOR_BUCKETS:
                assert value(got, "harpo_sample_factor_bucket", task=task, le=str(le)) == sum(
                    f <= le for f in factors)
        assert value(got, "harpo_step") == row["step"]
        assert value(got, "harpo_steps_total") == row["step"] + 1
        assert before <= value(got, "harpo_last_step_timestamp_seconds") <= time.time()
    assert pinned, "the clamp never bound: the test does not tell applied from unclamped"
    assert value(got, "harpo_rollouts_total") == sum(r["rollouts"] for r, _, _ in steps)
    # a task absent from the last step keeps its state and its last measurements, share 0
    first, last = steps[1][0], steps[2][0]
    assert "sentiment" not in last["task_factor"]
    assert value(got, "harpo_task_factor", task="sentiment") == first["task_factor"]["sentiment"]
    assert value(got, "harpo_task_reward", task="sentiment") == first["reward"]["sentiment"]
    assert value(got, "harpo_task_batch_share", task="sentiment") == 0.0
    assert value(got, "harpo_task_last_step", task="sentiment") == 1
    assert value(got, "harpo_task_last_step", task="qa") == 2


def test_every_series_is_harpo_and_carries_the_job(exporter):
    modulator = HarpoModulator()
    row, modulation, group_tasks = synthetic_step(modulator, 0, np.random.default_rng(1))
    exporter.record_step(row, modulation, group_tasks)
    got = scrape(exporter.url)
    assert got
    for name, labels in got:
        assert name.startswith("harpo_"), name
        assert dict(labels)["job"] == JOB, name


def test_nan_loss_is_exported_as_nan(exporter):
    modulator = HarpoModulator()
    rng = np.random.default_rng(2)
    row, modulation, group_tasks = synthetic_step(modulator, 0, rng)
    exporter.record_step(row, modulation, group_tasks)
    row, modulation, group_tasks = synthetic_step(modulator, 1, rng, loss=math.nan)
    row["grad_norm"] = math.inf
    exporter.record_step(row, modulation, group_tasks)
    got = scrape(f"http://127.0.0.1:{exporter.port}/metrics")
    assert math.isnan(value(got, "harpo_loss"))
    assert value(got, "harpo_grad_norm") == math.inf


def test_no_reference_keeps_the_last_one(exporter):
    """A step without active tasks logs reference None: the exported reference is unchanged."""
    modulator = HarpoModulator()
    rng = np.random.default_rng(3)
    row, modulation, group_tasks = synthetic_step(modulator, 0, rng)
    exporter.record_step(row, modulation, group_tasks)
    reference = row["signal_reference"]
    exporter.record_step({**row, "step": 1, "signal_reference": None}, modulation, group_tasks)
    got = scrape(f"http://127.0.0.1:{exporter.port}/metrics")
    assert value(got, "harpo_signal_reference") == reference


def test_group_tasks_must_match_the_groups():
    exp = MetricsExporter(JOB)
    row, modulation, group_tasks = synthetic_step(HarpoModulator(), 0, np.random.default_rng(4))
    with pytest.raises(ValueError, match="group_tasks must name the task of each of the 9"):
        exp.record_step(row, modulation, group_tasks[:-1])
    with pytest.raises(ValueError, match="group_tasks"):
        exp.record_step(row, modulation)


def test_job_events(exporter):
    url = f"http://127.0.0.1:{exporter.port}/metrics"
    got = scrape(url)
    # counters alerts use with increase() exist at 0 before anything happened
    for role in RESTART_ROLES:
        assert value(got, "harpo_restarts_total", role=role) == 0
    assert value(got, "harpo_weight_sync_failures_total") == 0

    exporter.set_rollout_workers(3, desired=4)
    exporter.set_queue_depth(7)
    exporter.set_staleness(1)
    exporter.record_restart("rollout")
    exporter.record_restart("rollout")
    exporter.record_restart("learner")
    exporter.record_weight_sync(0.125, ok=True)
    exporter.record_weight_sync(2.5, ok=False)
    exporter.set_state("running")
    exporter.set_state("paused")
    exporter.record_worker("rollout-0", 16, 0.03)
    exporter.record_worker("rollout-0", 8, 0.02)
    exporter.record_worker("rollout-1", 12, 0.05)
    got = scrape(url)
    assert value(got, "harpo_rollout_workers") == 3
    assert value(got, "harpo_rollout_workers_desired") == 4
    assert value(got, "harpo_queue_depth") == 7
    assert value(got, "harpo_staleness_versions") == 1
    assert value(got, "harpo_restarts_total", role="rollout") == 2
    assert value(got, "harpo_restarts_total", role="learner") == 1
    assert value(got, "harpo_restarts_total", role="reward") == 0
    assert value(got, "harpo_weight_sync_seconds") == 2.5
    assert value(got, "harpo_weight_syncs_total") == 2
    assert value(got, "harpo_weight_sync_failures_total") == 1
    assert value(got, "harpo_job_state", state="paused") == 1
    assert value(got, "harpo_job_state", state="running") == 0
    assert value(got, "harpo_worker_rollouts_total", worker="rollout-0") == 24
    assert value(got, "harpo_worker_weight_load_seconds", worker="rollout-0") == 0.02
    assert value(got, "harpo_worker_weight_load_seconds", worker="rollout-1") == 0.05

    exporter.forget_worker("rollout-1")
    exporter.forget_worker("rollout-9")  # never seen: no error
    got = scrape(url)
    assert not any(dict(labels).get("worker") == "rollout-1" for _, labels in got)
    with pytest.raises(ValueError, match="restart role"):
        exporter.record_restart("scheduler")


def test_port_zero_picks_a_free_port_and_close_stops_serving():
    exp = MetricsExporter(JOB)
    port = exp.start("127.0.0.1", 0)
    assert port > 0 and exp.port == port
    assert exp.url == f"http://127.0.0.1:{port}/metrics"
    assert urllib.request.urlopen(exp.url, timeout=10).status == 200
    exp.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_a_port_in_use_names_the_setting():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        exp = MetricsExporter(JOB)
        with pytest.raises(MetricsPortError,
                           match=rf"observability.metrics_port {port} is already in use"):
            exp.start("127.0.0.1", port)
        # a wildcard bind conflicts with the loopback listener too
        with pytest.raises(MetricsPortError, match="observability.metrics_port"):
            exp.start("0.0.0.0", port)


def test_two_exporters_in_one_process_do_not_collide():
    a, b = MetricsExporter("a"), MetricsExporter("b")
    a.set_queue_depth(1)
    b.set_queue_depth(2)
    assert a.registry.get_sample_value("harpo_queue_depth", {"job": "a"}) == 1
    assert b.registry.get_sample_value("harpo_queue_depth", {"job": "a"}) is None


def test_the_docs_catalogue_lists_every_metric_and_no_other():
    exp = MetricsExporter(JOB)
    row, modulation, group_tasks = synthetic_step(HarpoModulator(), 0, np.random.default_rng(5))
    exp.record_step(row, modulation, group_tasks)
    exp.set_rollout_workers(2, desired=2)
    exp.set_queue_depth(0)
    exp.set_staleness(0)
    exp.record_weight_sync(0.1)
    exp.set_state("running")
    exp.record_worker("rollout-0", 8, 0.01)
    served = {f.name + "_total" if f.type == "counter" else f.name
              for f in exp.registry.collect()}
    docs = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
    listed = set(re.findall(r"^\| `(harpo_\w+)` \|", docs.read_text(), re.MULTILINE))
    assert served == listed, (f"served, not in docs/metrics.md: {served - listed}; "
                              f"in the docs, not served: {listed - served}")
