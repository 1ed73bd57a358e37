"""A run directory never loses data (#18): its lock, a new run into an old one, a read-only
``harpo eval``, ``--resume`` of a copied run, ``init-tiny`` into a foreign directory.

Refusals come before Ray starts, so they are run as a user runs them (a subprocess) and take
seconds. Commands that train or evaluate run in this process (``services.cli.main``) on the
session's embedded Ray. "Unchanged" means every file of the directory, byte for byte."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from services.cli import main
from services.run_lock import LOCK_FILE, RunLock
from tests.services.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]
HOST = socket.gethostname()


def harpo(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "services.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)


def harpo_here(capsys, *args) -> tuple[int, str, str]:
    """``harpo ARGS`` in this process (on the session's Ray); returns (status, stdout, stderr)."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        status = main([str(a) for a in args])
    finally:
        signal.signal(signal.SIGTERM, handler)
    out, err = capsys.readouterr()
    return status, out, err


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def write_config(path: Path, assets, run_dir: Path, **run) -> Path:
    path.write_text(tiny_config(assets, run_dir, run={"steps": 2, **run}).to_yaml())
    return path


@pytest.fixture(scope="module")
def finished_run(ray_cluster, tiny_assets, tmp_path_factory):
    """A 2-step run (checkpoints after steps 1 and 2), made by `harpo train`."""
    root = tmp_path_factory.mktemp("finished")
    config = write_config(root / "run.yaml", tiny_assets, root / "run")
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert main(["train", str(config)]) == 0
    finally:
        signal.signal(signal.SIGTERM, handler)
    run = root / "run"
    assert steps(run) == [0, 1] and not (run / LOCK_FILE).exists()
    (run / "endpoints.json").write_text('{"control": "127.0.0.1:7001"}')  # as a served run
    return run


@pytest.fixture
def old_run(tiny_assets, tmp_path_factory) -> Path:
    """What a finished run leaves (no Ray needed: refusals look at the files only)."""
    root = tmp_path_factory.mktemp("old")
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    write_config(run / "config.yaml", tiny_assets, run, steps=5)
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "reward_mean": 0.1 * s}) + "\n" for s in range(5)))
    for done in (4, 5):
        checkpoint = run / f"checkpoints/step-{done:06d}"
        (checkpoint / "model").mkdir(parents=True)
        (checkpoint / "model/model.safetensors").write_bytes(os.urandom(64))
        (checkpoint / "trainer.json").write_text(json.dumps({"completed_steps": done}))
        (checkpoint / "MANIFEST.json").write_text("{}")
    (run / "endpoints.json").write_text('{"control": "127.0.0.1:7001"}')
    (run / "modulator-live.json").write_text('{"step": 4}')
    return run


def copy_of(run: Path, where: Path) -> Path:
    shutil.copytree(run, where)
    return where


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("extra", [[], ["--set", "data.path=/no/such/data"],
                                   ["--set", "observability.metrics_port=1"]],
                         ids=["plain", "bad-data-path", "bad-port"])
def test_a_new_train_into_a_run_is_refused_and_changes_nothing(old_run, tiny_assets,
                                                               tmp_path, extra):
    run = copy_of(old_run, tmp_path / "run")
    before = files(run)
    config = write_config(tmp_path / "new.yaml", tiny_assets, tmp_path / "elsewhere")
    t0 = time.monotonic()
    result = harpo("train", config, "--set", f"run.output_dir={run}", *extra)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"harpo: error: {run} already holds a run (config.yaml, metrics.jsonl, checkpoints/); "
        f"nothing in it was changed. Continue it with `harpo train --resume {run}`, train into "
        f"another directory with `--set run.output_dir=DIR`, or move the old run aside with "
        f"`--overwrite`\n")
    assert result.stdout == ""  # before the resolved configuration is printed, before Ray
    assert time.monotonic() - t0 < 60
    assert files(run) == before
    assert not (tmp_path / "elsewhere").exists()


def test_overwrite_and_resume_together_are_refused(old_run, tmp_path):
    run = copy_of(old_run, tmp_path / "run")
    before = files(run)
    result = harpo("train", "--resume", run, "--overwrite")
    assert result.returncode == 2
    assert result.stderr == ("harpo: error: --overwrite starts a new run; it cannot be given "
                             "with --resume\n")
    assert files(run) == before


def test_resume_of_a_copy_cannot_point_at_another_directory(old_run, tmp_path):
    run = copy_of(old_run, tmp_path / "run")
    before = files(run)
    result = harpo("train", "--resume", run, "--set", f"run.output_dir={tmp_path / 'x'}")
    assert result.returncode == 2
    assert result.stderr == (
        f"harpo: error: --resume {run} trains {run}; run.output_dir cannot be set with it "
        f"(copy the run directory to train a copy)\n")
    assert files(run) == before and not (tmp_path / "x").exists()


def test_init_tiny_refuses_a_directory_it_did_not_build(tmp_path):
    out = tmp_path / "mine"
    for rel, text in {"model/weights.txt": "precious", "data/rows.txt": "also precious",
                      "notes.md": "mine"}.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    before = files(out)
    result = harpo("init-tiny", out, "--train-per-task", "5", "--test-per-task", "2")
    assert result.returncode == 2
    assert result.stderr == (
        f"harpo: error: {out} is not empty (data, model, notes.md) and was not built by "
        f"init-tiny (no tiny_assets.json); nothing in it was changed: choose another "
        f"directory\n")
    assert files(out) == before


# ---------------------------------------------------------------------------- the lock


def _holder_message(directory: Path, pid: int, command: str) -> str:
    return (f"harpo: error: {directory} is in use by another harpo process (host {HOST}, "
            f"pid {pid}, since ")


@pytest.mark.parametrize("command", ["train", "eval", "sft", "demo"])
def test_a_locked_directory_is_refused_naming_its_holder(old_run, tiny_assets, tmp_path,
                                                         command):
    run = copy_of(old_run, tmp_path / "run")
    args = {"train": ["train", "--resume", run],
            "eval": ["eval", "--resume", run],
            "sft": ["sft", "--model", tiny_assets.model_dir, "--data", tiny_assets.data_dir,
                    "--out", run, "--steps", "1"],
            "demo": ["demo", "--workdir", run, "--steps", "1", "--sft-steps", "1"]}[command]
    with RunLock(run, "harpo train somewhere.yaml"):
        before = files(run)
        result = harpo(*args)
        assert files(run) == before
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(_holder_message(run, os.getpid(), ""))
    assert result.stderr.endswith(
        f" UTC, command `harpo train somewhere.yaml`); wait for it to finish or stop it "
        f"(lock: {run / LOCK_FILE})\n")
    assert not (run / LOCK_FILE).exists()  # the holder removed it on release


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_lock_left_by_a_dead_process_is_taken_over(old_run, tmp_path):
    run = copy_of(old_run, tmp_path / "run")
    pid = _dead_pid()
    left = {"host": HOST, "pid": pid, "since": "2026-01-02 03:04:05 UTC",
            "command": "harpo train old.yaml"}
    (run / LOCK_FILE).write_text(json.dumps(left))
    before = files(run)
    del before[LOCK_FILE]
    # taken over, then the command goes on: here to the refusal of a new run into a run
    result = harpo("train", run / "config.yaml", "--set", f"run.output_dir={run}")
    assert result.stderr.startswith(
        f"harpo: taking over the lock on {run} left by a process that is gone (host {HOST}, "
        f"pid {pid}, since 2026-01-02 03:04:05 UTC, command `harpo train old.yaml`)\n"
        f"harpo: error: {run} already holds a run")
    assert result.returncode == 2
    assert files(run) == before  # the stale lock file is gone with the lock released


def test_a_lock_left_on_another_host_is_not_taken(old_run, tmp_path):
    run = copy_of(old_run, tmp_path / "run")
    left = {"host": "node-7", "pid": 1234, "since": "2026-01-02 03:04:05 UTC",
            "command": "harpo train --resume run"}
    (run / LOCK_FILE).write_text(json.dumps(left))
    before = files(run)
    result = harpo("train", "--resume", run)
    assert result.returncode == 2
    assert result.stderr == (
        f"harpo: error: {run} has a lock left by host node-7, pid 1234, since 2026-01-02 "
        f"03:04:05 UTC, command `harpo train --resume run`, on another host: if that process "
        f"is gone, remove {run / LOCK_FILE} and try again\n")
    assert files(run) == before


def test_two_trains_into_one_directory_one_runs_one_is_refused(ray_cluster, tiny_assets,
                                                               tmp_path, capsys):
    run = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", tiny_assets, run)
    second: dict = {}

    def start_second_when_the_first_holds_the_lock():
        deadline = time.monotonic() + 120
        while not (run / LOCK_FILE).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        second["result"] = harpo("train", config)

    thread = threading.Thread(target=start_second_when_the_first_holds_the_lock)
    thread.start()
    try:
        status, out, err = harpo_here(capsys, "train", config)
    finally:
        thread.join()
    assert status == 0, err
    refused = second["result"]
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith(_holder_message(run, os.getpid(), ""))
    assert refused.stdout == ""
    assert steps(run) == [0, 1]  # one run's rows, once
    assert not (run / LOCK_FILE).exists()


# ---------------------------------------------------------------------------- what runs


def test_overwrite_moves_the_old_run_aside(ray_cluster, old_run, tiny_assets, tmp_path,
                                           capsys):
    run = copy_of(old_run, tmp_path / "run")  # 5 steps, checkpoints after 4 and 5
    before = files(run)
    config = write_config(tmp_path / "new.yaml", tiny_assets, run, steps=1)
    status, out, err = harpo_here(capsys, "train", config, "--overwrite")
    assert status == 0, err
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert f"moved the earlier run in {run} to {aside}\n" in out
    assert files(aside) == before  # all of it, byte for byte
    assert steps(run) == [0]  # no rows of the old run
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000001"]  # nor its steps
    assert "steps: 1\n" in (run / "config.yaml").read_text()
    (history,) = [json.loads(line) for line in
                  (run / "config-history.jsonl").read_text().splitlines()]
    assert history["note"] == "new run" and history["overrides"] == {}


def test_eval_of_a_run_changes_nothing_in_it(finished_run, tiny_assets, tmp_path, capsys):
    run = copy_of(finished_run, tmp_path / "run")
    # the newest checkpoint is corrupt: eval falls back to step 1 and truncates nothing
    sampler = run / "checkpoints/step-000002/sampler.json"
    sampler.write_text(sampler.read_text().replace("1", "7", 1))
    before = files(run)
    status, out, err = harpo_here(capsys, "eval", "--resume", run, "--json")
    assert status == 0, err
    assert set(json.loads(out)) == {"reward", "accuracy", "reward_format", "rollouts"}
    assert err == (f"note: {run}/config.yaml names run.output_dir {finished_run} (a copied run "
                   f"directory); using {run}\n")
    assert files(run) == before

    config = write_config(tmp_path / "base.yaml", tiny_assets, tmp_path / "elsewhere")
    status, out, err = harpo_here(capsys, "eval", config, "--set", f"run.output_dir={run}",
                                   "--json")
    assert status == 0, err
    assert set(json.loads(out)["reward"]) == set(json.loads(out)["accuracy"])
    assert files(run) == before


def test_resume_of_a_copied_run_trains_the_copy_and_records_overrides(finished_run, tmp_path,
                                                                      capsys):
    original = files(finished_run)
    run = copy_of(finished_run, tmp_path / "copy")
    status, out, err = harpo_here(capsys, "train", "--resume", run, "--set", "run.steps=3")
    assert status == 0, err
    assert (f"note: {run}/config.yaml names run.output_dir {finished_run} (a copied run "
            f"directory); using {run}\n") in out
    assert (f"recorded the changed configuration (run.steps=3) in {run / 'config.yaml'}; "
            f"history in {run / 'config-history.jsonl'}\n") in out
    assert "finished step 3/3: mean reward" in out and f"run directory {run}\n" in out
    assert steps(run) == [0, 1, 2]
    assert (run / "checkpoints/step-000003/MANIFEST.json").is_file()
    recorded = (run / "config.yaml").read_text()
    assert "steps: 3\n" in recorded and f"output_dir: {run}\n" in recorded
    started, history = [json.loads(line) for line in
                        (run / "config-history.jsonl").read_text().splitlines()]
    assert started["note"] == "new run"  # copied with the run
    assert history["overrides"] == {"run.steps": 3}
    assert "a copied run directory" in history["note"]
    assert history["command"]  # (in this process, pytest's command line)
    assert files(finished_run) == original  # the original did not move
