"""Ctrl-C on ``harpo train``: the step in flight finishes, a checkpoint is written, exit 130;
``--resume`` then continues to the same metric rows as a run that was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time

import yaml

TIMING_KEYS = {"timing", "rollouts_per_s", "tokens_per_s"}
STEPS = 5


def _config(tiny_assets, tmp_path, name: str):
    config = {
        "run": {"name": name, "output_dir": str(tmp_path / name), "steps": STEPS,
                "checkpoint_every": 0, "seed": 0},
        "model": {"path": str(tiny_assets.model_dir)},
        "data": {"path": str(tiny_assets.data_dir), "prompts_per_step": 4},
        "rollout": {"workers": 1, "group_size": 4, "max_new_tokens": 12},
        "reward": {"scorers": 1},
        "learner": {"workers": 1, "mini_batch_prompts": 2, "lr": 1e-3},
        "observability": {"progress": "never", "metrics_port": None},
        "control": {"port": None},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, tmp_path / name


def _harpo(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "services.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _rows(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in lines]


def _train_until_first_row(config, run_dir):
    """``harpo train CONFIG`` in a session of its own (so a signal goes to the whole group, as
    Ctrl-C in a terminal does), returned once its first metrics row is written."""
    proc = _harpo("train", str(config), start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no metrics row in 300 s"
        time.sleep(0.2)
    return proc


def test_ctrl_c_checkpoints_and_resume_matches(tiny_assets, tmp_path):
    # the uninterrupted run to compare with trains meanwhile (a run keeps about one of the two
    # cores busy); its output goes to files, which never fill up as a pipe can
    whole_config, whole_dir = _config(tiny_assets, tmp_path, "whole")
    with open(tmp_path / "whole.out", "w") as out, open(tmp_path / "whole.err", "w") as err:
        whole = subprocess.Popen([sys.executable, "-m", "services.cli", "train",
                                  str(whole_config)], stdout=out, stderr=err, text=True,
                                 start_new_session=True)
    try:
        config, run_dir = _config(tiny_assets, tmp_path, "interrupted")
        proc = _train_until_first_row(config, run_dir)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 130, err
        assert "Traceback" not in err
        assert ("harpo: SIGINT received: finishing the step in flight, then writing a "
                "checkpoint") in err
        stop_line = [line for line in out.splitlines() if line.startswith("stopped at step")]
        assert stop_line, out
        done = int(stop_line[0].split()[3])
        assert 1 <= done < STEPS
        checkpoint = run_dir / "checkpoints" / f"step-{done:06d}"
        assert stop_line[0] == (f"stopped at step {done} of {STEPS} by SIGINT; checkpoint "
                                f"{checkpoint}; resume with: harpo train --resume {run_dir}")
        assert checkpoint.is_dir()
        assert not list((run_dir / "checkpoints").glob(".tmp-*"))
        assert "finished step" not in out

        resumed = _harpo("train", "--resume", str(run_dir))
        out, err = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, err
        assert f"finished step {STEPS}/{STEPS}" in out
        assert whole.wait(timeout=300) == 0, (tmp_path / "whole.err").read_text()[-3000:]
        interrupted, uninterrupted = _rows(run_dir), _rows(whole_dir)
        assert [r["step"] for r in interrupted] == list(range(STEPS))
        assert interrupted == uninterrupted
    finally:  # a failed assertion leaves no run training behind
        if whole.poll() is None:
            os.killpg(whole.pid, signal.SIGKILL)


def test_sigterm_to_the_group_checkpoints_without_hanging(tiny_assets, tmp_path):
    """SIGTERM to the whole process group (embedded Ray's processes included): the GCS and
    the workers outlive it (SIGTERM is blocked in them), so the checkpoint is written and the
    driver exits promptly, with no wait for a GCS that is gone."""
    config, run_dir = _config(tiny_assets, tmp_path, "terminated")
    proc = _train_until_first_row(config, run_dir)
    os.killpg(proc.pid, signal.SIGTERM)
    sent = time.monotonic()
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, err
    assert "Failed to connect to GCS" not in err
    stop_line = [line for line in out.splitlines() if line.startswith("stopped at step")]
    assert stop_line and " by SIGTERM; checkpoint " in stop_line[0], out
    done = int(stop_line[0].split()[3])
    assert (run_dir / "checkpoints" / f"step-{done:06d}").is_dir()
    assert time.monotonic() - sent < 60  # a step, a checkpoint and the shutdown; no GCS wait


def test_second_ctrl_c_aborts_without_leaving_a_partial_checkpoint(tiny_assets, tmp_path):
    from services.run_dir import RunDir

    config, run_dir = _config(tiny_assets, tmp_path, "aborted")
    proc = _train_until_first_row(config, run_dir)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    # the second signal lands mid-step (abort) or, if the stop was quicker, during shut-down
    assert ("harpo: aborted by SIGINT; the checkpoints already written are intact" in err
            or "harpo: SIGINT while shutting down: exiting now" in err), err
    checkpoints = run_dir / "checkpoints"
    assert not list(checkpoints.glob(".tmp-*"))
    run = RunDir(run_dir)
    assert all(run.verify(path) is None for path in run.list_checkpoints())
