"""The Ray pipeline end to end on a real embedded Ray with the tiny model: rollout workers,
reward scorers, the modulator actor and 1 or 2 learners."""

import json
import math
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from services.controller import Trainer
from services.run_dir import RunDir
from tests.services.conftest import tiny_config

pytestmark = pytest.mark.slow

# Metrics that depend on timing, not on the computation.
TIMING_KEYS = {"timing", "rollouts_per_s", "tokens_per_s"}


def _comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


def _weights(checkpoint) -> dict[str, np.ndarray]:
    return load_file(str(checkpoint / "model" / "model.safetensors"))


def test_a_run_writes_its_directory_and_the_modulator_sees_groups_only(
        ray_cluster, tiny_assets, tmp_path, monkeypatch):
    from services.learner import LearnerGroup
    from services.rollout.pool import RolloutPool

    # when the learners' actors are started and when the rollout side is up (driver clock)
    moments = {}
    start, pool_init = LearnerGroup._start, RolloutPool.__init__

    def learners_start(self, *args, **kwargs):
        moments["learners started"] = time.monotonic()
        return start(self, *args, **kwargs)

    def pool_up(self, *args, **kwargs):
        pool_init(self, *args, **kwargs)
        moments["pool up"] = time.monotonic()

    monkeypatch.setattr(LearnerGroup, "_start", learners_start)
    monkeypatch.setattr(RolloutPool, "__init__", pool_up)
    config = tiny_config(tiny_assets, tmp_path / "run", rollout={"workers": 2},
                         reward={"scorers": 2})
    trainer = Trainer(config)
    try:
        # the learners load the model while the rollout workers and scorers load theirs
        assert moments["learners started"] < moments["pool up"], moments
        rows = trainer.run()
        stats = trainer.modulator_stats()
    finally:
        trainer.shutdown()
    run = tmp_path / "run"
    assert (run / "config.yaml").read_text() == config.to_yaml()
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [0, 1] and logged == json.loads(json.dumps(rows))
    first = logged[0]
    for key in ("policy_version", "reward", "accuracy", "task_factor", "task_signal",
                "task_signal_ema", "loss", "entropy", "clip_frac", "response_length",
                "rollouts_per_s", "tokens_per_s", "logprob_mismatch_max", "logprob_mismatch_p99",
                "timing", "padding_waste"):
        assert key in first, key
    assert 0 < first["padding_waste"] < 1  # prompts and responses of several lengths
    assert [r["policy_version"] for r in logged] == [0, 1]
    assert first["rollouts"] == 4 * 4
    assert set(first["timing"]) >= {"generate_s", "score_s", "modulate_s", "learn_s", "sync_s",
                                    "step_s"}
    # The rollout policy and the learner agree on the log-probs of the sampled tokens.
    assert first["logprob_mismatch_max"] < 1e-4
    # One statistics row per prompt (4 per step), never the 16 rollouts of a batch.
    assert stats == {"largest_message_rows": 4, "last_step": 1}
    for step in (1, 2):
        checkpoint = run / "checkpoints" / f"step-{step:06d}"
        names = {p.name for p in checkpoint.iterdir()}
        assert {"model", "estimator.json", "sampler.json", "trainer.json",
                "MANIFEST.json"} <= names
        assert {"model.safetensors", "config.json", "tokenizer.json", "optimizer.safetensors",
                "optimizer.json"} <= {p.name for p in (checkpoint / "model").iterdir()}
        assert not list(checkpoint.rglob("*.bin")) and not list(checkpoint.rglob("*.pt"))
    assert json.loads((run / "checkpoints/step-000002/trainer.json").read_text())[
        "completed_steps"] == 2


def test_two_learners_make_the_same_update_as_one(ray_cluster, tiny_assets, tmp_path):
    results = {}
    for workers in (1, 2):
        config = tiny_config(tiny_assets, tmp_path / f"l{workers}", run={"steps": 1},
                             learner={"workers": workers})
        trainer = Trainer(config)
        try:
            results[workers] = (trainer.run()[0], _weights(trainer.checkpoint()))
        finally:
            trainer.shutdown()
    (row1, w1), (row2, w2) = results[1], results[2]
    assert row1["loss"] == pytest.approx(row2["loss"], rel=1e-5, abs=1e-7)
    assert row1["reward"] == row2["reward"]  # identical rollouts
    initial = load_file(str(tiny_assets.model_dir / "model.safetensors"))
    moved = max(float(np.abs(w1[k] - initial[k]).max()) for k in w1)
    assert moved > 1e-4  # the update did something
    # The all-reduced gradient is the same gradient: its norm and the loss agree tightly.
    assert row1["grad_norm"] == pytest.approx(row2["grad_norm"], rel=1e-5)
    assert row1["padding_waste"] == pytest.approx(row2["padding_waste"])  # over both ranks
    # Weights: gradients summed in another order differ in the last bits, and Adam's first
    # step (about lr * g / (|g| + eps)) blows that up only where a gradient component is ~0.
    # So: all but a sliver of the weights agree to 1e-6 and the mean difference is tiny.
    total = sum(w.size for w in w1.values())
    off = sum(int((np.abs(w1[k] - w2[k]) > 1e-6).sum()) for k in w1)
    mean = sum(float(np.abs(w1[k] - w2[k]).sum()) for k in w1) / total
    assert off / total < 1e-3, (off, total)
    assert mean < 1e-8, mean


def test_resumed_run_matches_an_uninterrupted_one(ray_cluster, tiny_assets, tmp_path):
    # with an evaluation every 2 steps (run.eval_every), kept in eval.jsonl
    # and a learning-rate schedule, which must pick up where it was (it counts RL steps)
    schedule = {"lr_schedule": "linear", "warmup_steps": 1, "lr": 1e-3}
    whole_cfg = tiny_config(tiny_assets, tmp_path / "whole", run={"steps": 4, "eval_every": 2},
                            learner=schedule)
    trainer = Trainer(whole_cfg)
    try:
        whole = trainer.run()
    finally:
        trainer.shutdown()

    cut_cfg = tiny_config(tiny_assets, tmp_path / "cut", run={"steps": 4, "eval_every": 2},
                          learner=schedule)
    trainer = Trainer(cut_cfg)
    try:
        trainer.run(steps=2)  # stopped after step 2
    finally:
        trainer.shutdown()
    # as if the run had gone on past its last checkpoint and evaluated before it died
    RunDir(tmp_path / "cut").append_eval({"step": 3, "reward": {}})
    resumed = Trainer(cut_cfg, resume=True)
    try:
        assert resumed.completed_steps == 2 and resumed.version == 2
        tail = resumed.run()
    finally:
        resumed.shutdown()
    assert [r["step"] for r in tail] == [2, 3]
    # linear decay from step 1 to 0 at step 4; two optimizer steps per RL step share one rate
    assert [r["lr"] for r in whole] == pytest.approx([1e-3, 1e-3, 2e-3 / 3, 1e-3 / 3])
    for a, b in zip(tail, whole[2:]):
        assert _comparable(a) == _comparable(b)
    logged = [json.loads(line)["step"] for line in
              (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [0, 1, 2, 3]  # nothing lost, nothing counted twice
    whole_evals = RunDir(tmp_path / "whole").read_evals()
    cut_evals = RunDir(tmp_path / "cut").read_evals()  # the step-3 row is gone
    assert [e["step"] for e in cut_evals] == [e["step"] for e in whole_evals] == [2, 4]
    for a, b in zip(cut_evals, whole_evals):
        assert a["policy_version"] == a["step"] and a["rollouts"] == {t: 2 for t in a["reward"]}
        assert a["accuracy"] == b["accuracy"]
        # the similarity reward's embeddings vary in the last bits with the batch they share
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6)


def test_a_corrupt_checkpoint_is_skipped(ray_cluster, tiny_assets, tmp_path, caplog):
    config = tiny_config(tiny_assets, tmp_path / "run", run={"steps": 2})
    trainer = Trainer(config)
    try:
        trainer.run()
    finally:
        trainer.shutdown()
    latest = tmp_path / "run/checkpoints/step-000002/sampler.json"
    latest.write_text(latest.read_text().replace("1", "7", 1))
    resumed = Trainer(config, resume=True)
    try:
        assert resumed.completed_steps == 1  # fell back to the previous, intact checkpoint
    finally:
        resumed.shutdown()
    assert "sampler.json does not match its checksum" in caplog.text


def test_evaluation_reports_every_task_greedy_or_sampled(ray_cluster, tiny_assets, tmp_path):
    trainer = Trainer(tiny_config(tiny_assets, tmp_path / "run", rollout={"workers": 1},
                                  data={"eval_prompts_per_task": 3}))
    try:
        greedy = trainer.evaluate()
        sampled = trainer.evaluate(temperature=1.0, samples=4)
        again = trainer.evaluate(temperature=1.0, samples=4)
        fewer = trainer.evaluate(per_task=1)
    finally:
        trainer.shutdown()
    tasks = set(trainer.train_set.task_names)
    assert set(greedy["reward"]) == tasks == set(greedy["accuracy"]) == set(sampled["reward"])
    assert all(math.isfinite(v) for v in greedy["reward"].values())
    assert greedy["rollouts"] == {task: 3 for task in tasks}
    assert sampled["rollouts"] == {task: 12 for task in tasks}
    assert sampled["reward"] != greedy["reward"]  # sampling really happened
    assert again == sampled  # seeded: the same evaluation gives the same numbers
    assert fewer["rollouts"] == {task: 1 for task in tasks}
