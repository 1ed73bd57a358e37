"""The gRPC control API against a real running training job (real Ray, real tiny model).

One job serves every call while it trains: status, modulator state, pause/resume, scaling the
rollout pool up and down (the live worker count in the metrics follows), an on-demand
checkpoint, the token check (the job listens on 0.0.0.0, so a token is required), malformed
requests, and a graceful Stop that leaves a loadable checkpoint.
"""

import json
import os
import threading
import time

import grpc
import pytest

from services.control.client import ControlClient, ControlError, resolve_endpoint
from services.run_dir import RunDir
from tests.services.conftest import tiny_config

TOKEN = "s3cret-token-for-tests"


def _wait(predicate, timeout=120.0, every=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not reached in time")


@pytest.fixture(scope="module")
def running_job(tiny_assets, ray_cluster, tmp_path_factory):
    from services.controller import Trainer

    run_dir = tmp_path_factory.mktemp("control-job")
    token_file = run_dir / "token"
    token_file.write_text(TOKEN + "\n")
    config = tiny_config(
        tiny_assets, run_dir / "run",
        run={"steps": 40, "checkpoint_every": 0}, rollout={"workers": 2},
        control={"port": 0, "host": "0.0.0.0", "token_file": str(token_file)},
    )
    trainer = Trainer(config)
    outcome = {}

    def train():
        try:
            outcome["rows"] = trainer.run()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            outcome["error"] = exc

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    yield trainer, thread, outcome
    trainer.control.request_stop()
    thread.join(timeout=300)
    trainer.shutdown()


def test_control_api_drives_a_running_job(running_job):
    trainer, thread, outcome = running_job
    run_dir = trainer.run_dir.root
    endpoints = json.loads((run_dir / "endpoints.json").read_text())
    address = resolve_endpoint(None, str(run_dir))
    assert address == endpoints["control"]
    assert endpoints["run_id"] == trainer.endpoints.run_id and endpoints["pid"] == os.getpid()

    # Listening off loopback: calls without the token, or with a wrong one, are refused.
    for token in (None, "wrong"):
        with pytest.raises(ControlError) as err:
            ControlClient(address, token=token).status()
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED

    client = ControlClient(address, token=TOKEN, timeout=300, run_id=endpoints["run_id"])
    status = _wait(lambda: (s := client.status())["step"] >= 1 and s)
    assert status["job"] == "test" and status["state"] == "running"
    assert status["total_steps"] == 40 and status["rollout_workers"] == 2
    assert status["rollouts_per_s"] > 0 and status["run_dir"] == str(run_dir)
    assert client.server_run_id == endpoints["run_id"]
    with ControlClient(address, token=TOKEN, run_id="0" * 32) as other:  # meant for another run
        with pytest.raises(ControlError, match="belongs to run"):
            other.pause()
    assert client.status()["state"] == "running"

    modulator = client.modulator_state()
    assert modulator["tasks"], "per-task factors after the first step"
    last = json.loads(RunDir(run_dir).metrics_path.read_text().splitlines()[-1])
    for task in modulator["tasks"].values():
        assert task["factor"] > 0 and task["unclamped_factor"] > 0
    if modulator["step"] == last["step"]:
        for name, task in modulator["tasks"].items():
            assert task["factor"] == pytest.approx(last["task_factor"][name])

    # Pause: the step in flight ends, then nothing moves until Resume.
    client.pause()
    paused = _wait(lambda: (s := client.status())["state"] == "paused" and s)
    time.sleep(1.5)
    assert client.status()["step"] == paused["step"]
    with pytest.raises(ControlError) as err:
        client.pause()
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION

    # Scaling while paused takes effect at once and shows in status.
    assert client.scale_rollouts(3) == {"previous": 2, "target": 3}
    assert client.status()["rollout_workers"] == 3
    for bad in (0, -2):
        with pytest.raises(ControlError) as err:
            client.scale_rollouts(bad)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    checkpoint = client.checkpoint()["path"]
    assert RunDir(run_dir).latest_valid_checkpoint() is not None
    assert json.loads((RunDir(run_dir).checkpoints / checkpoint.rsplit("/", 1)[-1]
                       / "trainer.json").read_text())["completed_steps"] == paused["step"]
    client.resume()

    # The live worker count in the metrics follows the pool: 3 now, then 1.
    rows = lambda: [json.loads(line) for line in  # noqa: E731
                    RunDir(run_dir).metrics_path.read_text().splitlines()]
    _wait(lambda: any(r["step"] >= paused["step"] and r["rollout_workers"] == 3
                      for r in rows()))
    assert client.scale_rollouts(1)["target"] == 1
    _wait(lambda: rows()[-1]["rollout_workers"] == 1)

    # Graceful stop: the step in flight finishes, a checkpoint is written, the loop ends.
    stopped_at = client.stop()["checkpoint"]
    thread.join(timeout=300)
    assert not thread.is_alive() and "error" not in outcome
    final = trainer.completed_steps
    assert final < 40
    latest = RunDir(run_dir).latest_valid_checkpoint()
    assert str(latest) == stopped_at
    state = json.loads((latest / "trainer.json").read_text())
    assert state["completed_steps"] == final
    assert client.status()["state"] == "finished"
    with pytest.raises(ControlError):
        client.checkpoint()  # the job takes no more commands

    # The stop checkpoint loads: the model directory is a complete HF model.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(latest / "model")
