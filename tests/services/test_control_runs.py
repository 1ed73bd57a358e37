"""The right job on the line (issue #18): run ids, stale endpoints, free ports, waiting calls,
the modulator's full state, and unsafe binds refused at config time.

Real gRPC servers on loopback and the ``FakeTrainer`` double of ``test_control``; no Ray.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from harpo_core import GroupStats, HarpoConfig, HarpoModulator
from services.config import ConfigError, parse_config
from services.control import client as control_client
from services.control.client import ControlClient, ControlError, RunNotRunning, WrongRun
from services.control.server import ControlConfigError, ControlServer
from services.endpoints import Endpoints
from services.trainer_control import TrainerControl
from tests.services.test_control import FakeTrainer, harpo

LIVE, ENDED = "a" * 32, "b" * 32


@pytest.fixture
def live(tmp_path):
    """A live job (run id LIVE) holding the port a finished run (ENDED) used to have."""
    trainer = FakeTrainer(tmp_path / "live")
    server = ControlServer(trainer, "127.0.0.1", 0, run_id=LIVE)
    server.start()
    yield trainer, server
    server.stop(0)


def write_endpoints(run_dir: Path, address: str, run_id: str, pid: int | None = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "endpoints.json").write_text(json.dumps(
        {"control": address, "run_id": run_id, "pid": pid or os.getpid(),
         "host": socket.gethostname()}))
    return run_dir


# ---------------------------------------------------------------------------- run ids


def test_a_command_for_a_finished_run_never_reaches_the_live_one(live, tmp_path, capsys):
    trainer, server = live
    stale = write_endpoints(tmp_path / "ended", server.address, ENDED)
    expected = (f"the server at {server.address} belongs to run {LIVE}, not to {stale}'s run "
                f"{ENDED}; that run has ended")
    for argv in (["stop"], ["pause"], ["scale", "--rollout", "5"], ["checkpoint"], ["status"],
                 ["modulator"], ["resume"]):
        with pytest.raises(WrongRun) as err:
            harpo([*argv, "--run", str(stale)])
        assert str(err.value) == expected, argv
    # the live job was not touched: still running, same pool, no checkpoint, not stopping
    assert trainer.state == "running" and trainer.workers == ["w0", "w1"]
    assert not trainer.stop_entered.is_set()
    assert not (trainer.run_dir / "checkpoints").exists()
    # through the cli entry point it is a plain `harpo: error:`
    from services import cli

    assert cli.main(["stop", "--run", str(stale)]) == 2
    assert f"harpo: error: {expected}" in capsys.readouterr().err


def test_the_server_refuses_before_acting_even_without_a_run_dir(live):
    trainer, server = live
    with ControlClient(server.address, run_id=ENDED, timeout=5) as c:
        with pytest.raises(WrongRun, match=rf"belongs to run {LIVE}, not to run {ENDED}; that "
                                           "run has ended") as err:
            c.stop()
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert trainer.state == "running"
    # every reply names the server's run, for any client
    from services.control import control_pb2 as pb
    from services.control import control_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.address) as channel:
        _, call = pb_grpc.HarpoControlStub(channel).GetStatus.with_call(pb.GetStatusRequest(),
                                                                        timeout=5)
    assert dict(call.trailing_metadata())["harpo-run-id"] == LIVE


def test_run_id_round_trip(live, tmp_path, capsys):
    trainer, server = live
    with ControlClient(server.address, timeout=5) as c:
        c.status()
        assert c.server_run_id == LIVE
    with ControlClient(server.address, run_id=LIVE, timeout=5) as c:
        assert c.scale_rollouts(3) == {"previous": 2, "target": 3}
        assert c.server_run_id == LIVE
    run = write_endpoints(tmp_path / "live-run", server.address, LIVE)
    assert harpo(["status", "--run", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["job"] == "fake-job"
    # errors carry it too: the token refusal of a job with a token
    token_server = ControlServer(trainer, "127.0.0.1", 0, token="t", run_id=LIVE)
    token_server.start()
    try:
        with ControlClient(token_server.address, run_id=ENDED, timeout=5) as c:
            with pytest.raises(WrongRun):  # the other run is named before the token is checked
                c.status()
        with ControlClient(token_server.address, timeout=5) as c:
            with pytest.raises(ControlError) as err:
                c.status()
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert c.server_run_id == LIVE
    finally:
        token_server.stop(0)


def test_a_run_without_endpoints_json_is_not_running(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(RunNotRunning) as err:
        harpo(["stop", "--run", str(run)])
    assert str(err.value) == (
        f"the run in {run} is not running: {run / 'endpoints.json'} does not exist (a job "
        "writes it once its endpoints listen and removes it when it ends)")


def test_endpoints_json_of_a_killed_driver_is_not_running(live, tmp_path):
    _, server = live
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(gone.stdout)
    run = write_endpoints(tmp_path / "killed", server.address, ENDED, pid=pid)
    with pytest.raises(RunNotRunning) as err:
        harpo(["status", "--run", str(run)])
    assert str(err.value) == (f"the run in {run} is not running: its driver (pid {pid}) is "
                              f"gone and left {run / 'endpoints.json'} behind")


# ---------------------------------------------------------------------------- Endpoints


def fake_config(tmp_path, **sections):
    """A valid config whose endpoints are the defaults unless ``sections`` say otherwise
    (nothing here reads the model or data)."""
    base = {
        "run": {"name": "test", "output_dir": str(tmp_path / "run"), "steps": 2},
        "model": {"path": str(tmp_path / "model")},
        "data": {"path": str(tmp_path / "data"), "prompts_per_step": 4},
        "learner": {"mini_batch_prompts": 2},
        "observability": {"progress": "never"},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return parse_config(base)


def test_endpoints_free_ports_by_default_and_removed_at_close(tmp_path):
    config = fake_config(tmp_path)
    assert config.observability.metrics_port == 0 and config.control.port == 0
    assert config.observability.metrics_host == "127.0.0.1" == config.control.host
    root = tmp_path / "run"
    root.mkdir()
    a, b = Endpoints(config), Endpoints(config)
    assert a.run_id != b.run_id and len(a.run_id) == 32
    target = FakeTrainer(root)
    try:
        addresses = a.start(target, root, rollout_workers=2)
        written = json.loads((root / "endpoints.json").read_text())
        assert written == {**addresses, "run_id": a.run_id, "pid": os.getpid(),
                           "host": socket.gethostname()}
        port = int(addresses["control"].rsplit(":", 1)[1])
        assert port not in (0, 50051) and addresses["control"] == f"127.0.0.1:{port}"
        metrics = addresses["metrics"]
        assert metrics.startswith("http://127.0.0.1:") and not metrics.endswith(":9400/metrics")
        with urllib.request.urlopen(metrics, timeout=5) as r:
            assert b"harpo_" in r.read()
        # a second job on the same machine gets its own ports
        other = tmp_path / "other"
        other.mkdir()
        b.start(FakeTrainer(other), other, rollout_workers=1)
        assert b.addresses["control"] != addresses["control"]
        assert b.addresses["metrics"] != metrics
        with ControlClient(addresses["control"], run_id=a.run_id, timeout=5) as c:
            assert c.status()["job"] == "fake-job"
    finally:
        a.close()
        b.close()
    assert not (root / "endpoints.json").exists()
    with pytest.raises(RunNotRunning, match="is not running"):
        harpo(["status", "--run", str(root)])


def test_close_keeps_a_later_runs_endpoints_json(tmp_path):
    config = fake_config(tmp_path, observability={"progress": "never", "metrics_port": None})
    root = tmp_path / "run"
    root.mkdir()
    first = Endpoints(config)
    first.start(FakeTrainer(root), root, rollout_workers=1)
    later = {"control": "127.0.0.1:1", "run_id": "c" * 32}
    (root / "endpoints.json").write_text(json.dumps(later))  # e.g. a resume in the same dir
    first.close()
    assert json.loads((root / "endpoints.json").read_text()) == later


# ---------------------------------------------------------------------------- waiting calls


class SlowStep(FakeTrainer):
    """Commands that wait for a step in flight of ``step_s`` seconds."""

    step_s = 1.0

    def scale_rollouts(self, workers: int) -> dict:
        time.sleep(self.step_s)
        return super().scale_rollouts(workers)

    def pause(self) -> None:
        time.sleep(self.step_s)
        super().pause()


@pytest.fixture
def slow(tmp_path, monkeypatch):
    # the instant timeout and the progress interval made short so that a 1 s step stands for
    # a step longer than the real 10 s
    monkeypatch.setattr(control_client, "DEFAULT_TIMEOUT", 0.3)
    monkeypatch.setattr(control_client, "PROGRESS_EVERY", 0.2)
    trainer = SlowStep(tmp_path / "slow")
    server = ControlServer(trainer, "127.0.0.1", 0)
    server.start()
    yield trainer, server
    server.stop(0)


def test_waiting_calls_outlast_the_instant_timeout(slow, capsys):
    trainer, server = slow
    at = ["--control", server.address]
    assert harpo(["scale", "--rollout", "3", *at]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == "rollout workers: 2 -> 3" and len(trainer.workers) == 3
    assert "asking for 3 rollout workers; waiting for the step in flight..." in out.err
    assert "... still waiting for the step in flight (0 s)" in out.err
    assert harpo(["pause", *at]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("paused") and "pausing: waiting for the step in flight" in out.err
    assert trainer.state == "paused"


def test_instant_calls_keep_the_short_timeout_and_a_waiting_one_says_what_happens(slow):
    trainer, server = slow
    trainer.fail_status = False
    slow_status = threading.Event()
    original = trainer.status

    def status():
        slow_status.wait(1.0)
        return original()

    trainer.status = status
    with pytest.raises(ControlError, match=rf"^the harpo job at {server.address} did not "
                                           r"answer within 0.3 s$"):
        harpo(["status", "--control", server.address])
    with pytest.raises(ControlError) as err:
        harpo(["scale", "--rollout", "4", "--control", server.address, "--timeout", "0.3"])
    assert str(err.value) == (
        f"the harpo job at {server.address} did not answer within 0.3 s; the command stays "
        "queued and runs once the step in flight ends (check with harpo status; wait longer "
        "with --timeout SECONDS)")
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    slow_status.set()


# ---------------------------------------------------------------------------- the modulator


class ModulatorDriver:
    """What TrainerControl reads: ``actors.estimator`` (an in-process HARPO modulator)."""

    def __init__(self, run_dir: Path, modulator: HarpoModulator):
        self.run_dir = SimpleNamespace(root=run_dir)
        self.actors = SimpleNamespace(estimator=modulator)

    def progress(self) -> dict:
        return {"step": 0, "policy_version": 0, "rollout_workers": 1}


def step_of(modulator: HarpoModulator, step: int, signals: dict[str, float]):
    names = sorted(signals)
    stats = GroupStats(task_names=tuple(names), group_task=np.arange(len(names)),
                       size=np.full(len(names), 4), signal=np.array([signals[n] for n in names]))
    modulation = modulator.update_groups(step, stats)
    row = {"step": step, "batch_share": {n: 1 / len(names) for n in names}}
    return row, modulation


def test_modulator_shows_every_task_with_its_last_update(tmp_path, capsys):
    modulator = HarpoModulator(HarpoConfig())
    config = fake_config(tmp_path)
    control = TrainerControl(ModulatorDriver(tmp_path, modulator), config)
    steps = [{"math": 0.4, "code": 0.1, "poem": 0.2, "qa": 0.3},  # 0: all four
             {"math": 0.5, "code": 0.2},  # 1
             {"math": 0.3, "qa": 0.0},  # 2: qa in the batch without signal: no update
             {"code": 0.1, "poem": 0.4, "chess": 0.0}]  # 3: chess never carried signal
    for step, signals in enumerate(steps):
        control.after_step(*step_of(modulator, step, signals))
    state = control.modulator_state()
    assert state["step"] == 3
    tasks = state["tasks"]
    assert sorted(tasks) == ["chess", "code", "math", "poem", "qa"]
    assert {n: t["last_update_step"] for n, t in tasks.items()} == {
        "chess": None, "code": 3, "math": 2, "poem": 3, "qa": 0}
    assert {n for n, t in tasks.items() if t["in_batch"]} == {"code", "poem", "chess"}
    saved = modulator.state_dict()["tasks"]
    for name in ("code", "math", "poem", "qa"):
        assert tasks[name]["signal_ema"] == saved[name]["rho"]
        assert tasks[name]["unclamped_factor"] == pytest.approx(np.exp(saved[name]["log_factor"]))
    assert tasks["math"]["factor"] == pytest.approx(modulator.task_factors()["math"])
    assert tasks["math"]["signal"] == 0.0 and tasks["math"]["batch_share"] == 0.0
    assert tasks["poem"]["signal"] == pytest.approx(0.4)
    assert tasks["poem"]["batch_share"] == pytest.approx(1 / 3)

    # a control API started later (a resume) reads the tasks it has not seen from the modulator
    later = TrainerControl(ModulatorDriver(tmp_path, modulator), config)
    later.after_step(*step_of(modulator, 4, {"math": 0.2}))
    resumed = later.modulator_state()["tasks"]
    # chess never carried signal: the modulator holds no state for it, only the first control
    # API saw it in a batch
    assert sorted(resumed) == ["code", "math", "poem", "qa"]
    assert resumed["math"]["last_update_step"] == 4 and resumed["poem"]["last_update_step"] == 3
    assert resumed["code"]["factor"] == pytest.approx(modulator.task_factors()["code"])

    server = ControlServer(control, "127.0.0.1", 0)
    server.start()
    try:
        at = ["--control", server.address]
        assert harpo(["modulator", *at, "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)["tasks"]
        assert sorted(shown) == ["chess", "code", "math", "poem", "qa"]
        assert shown["qa"]["last_update_step"] == 0 and shown["qa"]["in_batch"] is False
        assert shown["chess"]["last_update_step"] is None and shown["chess"]["in_batch"] is True
        assert harpo(["modulator", *at]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[1].split()[-2:] == ["last", "update"]
        rows = {line.split()[0]: line.split() for line in lines[2:7]}
        assert rows["qa"][3] == "-" and rows["qa"][-2:] == ["step", "0"]
        assert rows["chess"][-1] == "-" and rows["poem"][-2:] == ["step", "3"]
        assert lines[-1] == ("(- in signal, batch share, zero-signal groups: not in this "
                             "step's batch)")
    finally:
        server.stop(0)


# ---------------------------------------------------------------------------- unsafe binds


def test_control_off_loopback_without_a_token_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("HARPO_CONTROL_TOKEN", raising=False)
    with pytest.raises(ConfigError) as err:
        fake_config(tmp_path, control={"host": "0.0.0.0"})
    assert str(err.value) == (
        "config is not valid:\n  - control: control.host '0.0.0.0' is not loopback, so the "
        "control API needs a token (anyone who reaches the port could stop or rescale the "
        "job): set control.token_file, or export $HARPO_CONTROL_TOKEN (control.token_env), or "
        "use control.host: 127.0.0.1 (got {'host': '0.0.0.0'})")
    # configured: a token file, the variable present, or a variable the config names itself
    token = tmp_path / "token"
    token.write_text("t\n")
    fake_config(tmp_path, control={"host": "0.0.0.0", "token_file": str(token)})
    fake_config(tmp_path, control={"host": "0.0.0.0", "port": None})  # off: nothing to guard
    fake_config(tmp_path, control={"host": "localhost"})
    named = fake_config(tmp_path, control={"host": "0.0.0.0", "token_env": "MY_TOKEN"})
    monkeypatch.setenv("HARPO_CONTROL_TOKEN", "t")
    fake_config(tmp_path, control={"host": "0.0.0.0"})
    # a named variable missing where the driver runs: refused before any actor is built
    monkeypatch.delenv("MY_TOKEN", raising=False)
    with pytest.raises(ControlConfigError) as err:
        Endpoints(named)
    assert str(err.value) == (
        "control.host '0.0.0.0' is not loopback, so the control API needs a token, and "
        "$MY_TOKEN (control.token_env) is not set in the driver's environment: set it, or "
        "control.token_file, or use control.host: 127.0.0.1")
    monkeypatch.setenv("MY_TOKEN", "t")
    Endpoints(named)


def test_metrics_bind_loopback_unless_configured(tmp_path):
    config = fake_config(tmp_path)
    assert config.observability.metrics_host == "127.0.0.1"
    explicit = fake_config(tmp_path, observability={"metrics_host": "0.0.0.0",
                                                    "metrics_port": 9400})
    assert explicit.observability.metrics_host == "0.0.0.0"
    assert explicit.observability.metrics_port == 9400


def test_demo_takes_ports(tmp_path):
    from services.cli import build_parser
    from services.demo import demo_config

    args = build_parser().parse_args(["demo", "--metrics-port", "9555", "--control-port", "0",
                                      "--control-host", "127.0.0.1"])
    config = demo_config(tmp_path / "m", tmp_path / "d", tmp_path / "r", 2, {
        "metrics_host": args.metrics_host, "metrics_port": args.metrics_port,
        "control_host": args.control_host, "control_port": args.control_port})
    assert config.observability.metrics_port == 9555
    assert config.observability.metrics_host == "127.0.0.1"
    assert (config.control.host, config.control.port) == ("127.0.0.1", 0)
    defaults = demo_config(tmp_path / "m", tmp_path / "d", tmp_path / "r", 2)
    assert defaults.observability.metrics_port == 0 == defaults.control.port
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--control-port", "70000"])
    assert defaults.data.eval_prompts_per_task == 100
    assert demo_config(tmp_path / "m", tmp_path / "d", tmp_path / "r", 2,
                       eval_prompts=10).data.eval_prompts_per_task == 10
