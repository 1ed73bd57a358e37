"""The parts of surviving a cluster that need no cluster: leftovers of a killed checkpoint
writer, the checkpoint store on a local-filesystem URI (upload, check, retention, download,
bad copies skipped), bounded uploads, the config fields' errors, $HARPO_CHECKPOINT_URI, and
the capacity wait on a real (embedded) Ray with a resource no node has."""

import json
import logging
import os
import time

import pytest

from services.checkpoint_store import CheckpointStore, Uploader, latest_checkpoint
from services.checkpoint_uri import ENV_VAR, stored_config, with_env_uri
from services.config import ConfigError
from services.run_dir import RunDir
from tests.services.conftest import tiny_config


def _checkpoint(run: RunDir, step: int, payload: bytes = b"weights") -> os.PathLike:
    def write(tmp):
        (tmp / "model").mkdir()
        (tmp / "model" / "model.safetensors").write_bytes(payload * 100)
        (tmp / "trainer.json").write_text(json.dumps({"completed_steps": step}))

    return run.save_checkpoint(step, write, keep=10)


def test_leftovers_of_a_killed_writer_go_and_nothing_else(tmp_path, caplog):
    run = RunDir(tmp_path / "run")
    good = _checkpoint(run, 1)
    (run.root / "notes.txt").write_text("mine")
    (run.root / ".tmp-step-000003-42").mkdir()  # not in checkpoints/: not harpo's
    left = run.checkpoints / ".tmp-step-000002-4242"
    (left / "model").mkdir(parents=True)
    (left / "model" / "half.bin").write_bytes(b"x")
    other = run.checkpoints / ".tmp-mine"
    other.mkdir()
    (run.checkpoints / ".tmp-step-file").write_text("a file, not a checkpoint directory")
    before = sorted(p.relative_to(run.root) for p in run.root.rglob("*"))
    with caplog.at_level(logging.WARNING, logger="services.run_dir"):
        removed = run.remove_leftovers()
    assert removed == [left]
    assert f"removed {left}" in caplog.text
    after = sorted(p.relative_to(run.root) for p in run.root.rglob("*"))
    gone = {p.relative_to(run.root) for p in (left, left / "model", left / "model/half.bin")}
    assert after == [p for p in before if p not in gone]
    assert run.verify(good) is None


def test_a_failed_write_leaves_no_temporary_checkpoint(tmp_path):
    run = RunDir(tmp_path / "run")

    def write(tmp):
        (tmp / "trainer.json").write_text("{}")
        raise RuntimeError("the learner died")

    with pytest.raises(RuntimeError, match="the learner died"):
        run.save_checkpoint(1, write, keep=2)
    assert list(run.checkpoints.iterdir()) == []


def test_store_uploads_checks_prunes_and_resumes_a_lost_run_dir(tmp_path, caplog):
    run = RunDir(tmp_path / "run")
    run.create()
    run.config_path.write_text("run: {}\n")
    store = CheckpointStore(str(tmp_path / "store"))
    for step in (1, 2, 3):
        uri = store.upload(_checkpoint(run, step, payload=bytes([step])), keep=2,
                           config_path=run.config_path)
        assert uri == f"{tmp_path / 'store'}/step-{step:06d}"
    assert store.checkpoints() == ["step-000002", "step-000003"]  # retention in the store
    assert store.config_text() == "run: {}\n"
    # the newest copy is damaged in the store, an upload of step 4 never finished
    (tmp_path / "store/step-000003/trainer.json").write_text('{"completed_steps": 99}')
    (tmp_path / "store/step-000004/model").mkdir(parents=True)
    assert store.latest_complete() == "step-000003"

    fresh = RunDir(tmp_path / "lost")  # the volume is gone: a new, empty run directory
    with caplog.at_level(logging.WARNING):
        got = latest_checkpoint(fresh, str(tmp_path / "store"))
    assert got == fresh.checkpoints / "step-000002"
    assert "skipping" in caplog.text and "step-000004: no MANIFEST.json" in caplog.text
    assert "step-000003: file trainer.json does not match its checksum" in caplog.text
    assert fresh.verify(got) is None
    assert (got / "model/model.safetensors").read_bytes() == bytes([2]) * 100
    assert [p.name for p in fresh.checkpoints.iterdir()] == ["step-000002"]  # no .tmp left
    # a run directory that has a valid checkpoint does not download
    assert latest_checkpoint(fresh, str(tmp_path / "nowhere")) == got


def test_upload_is_bounded_and_the_next_checkpoint_goes_up(tmp_path, caplog):
    """A checkpoint file that blocks its reader (a FIFO with no writer) stands for a store
    that does not answer: the driver waits ``timeout_s``, logs, and carries on."""
    run = RunDir(tmp_path / "run")
    blocked = _checkpoint(run, 1)
    fifo = blocked / "model" / "stuck.bin"
    os.mkfifo(fifo)
    manifest = json.loads((blocked / "MANIFEST.json").read_text())
    manifest["files"]["model/stuck.bin"] = "0" * 64
    (blocked / "MANIFEST.json").write_text(json.dumps(manifest))
    results = []
    uploader = Uploader(CheckpointStore(str(tmp_path / "store")), timeout_s=0.5,
                        on_result=results.append)
    t0 = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="services.checkpoint_store"):
        assert uploader.upload(blocked, keep=2, config_path=None) is False
        assert time.monotonic() - t0 < 5
        assert "did not finish in 0.5 s (run.checkpoint_upload_timeout_s)" in caplog.text
        second = _checkpoint(run, 2)
        assert uploader.upload(second, keep=2, config_path=None) is False  # still stuck
        assert "still running" in caplog.text and "step-000002 not uploaded" in caplog.text
    with open(fifo, "wb"):  # let the stuck upload finish
        pass
    uploader._thread.join(10)
    assert uploader.upload(_checkpoint(run, 3), keep=2, config_path=None) is True
    assert results == ["timeout", "skipped", "ok"]
    assert CheckpointStore(str(tmp_path / "store")).latest_complete() == "step-000003"


def test_config_errors_and_the_environment_variable(tiny_assets, tmp_path):
    with pytest.raises(ConfigError, match=r"run.checkpoint_uri.*scheme 'ftp' is not one "
                                          r"pyarrow.fs reads"):
        tiny_config(tiny_assets, tmp_path, run={"checkpoint_uri": "ftp://host/x"})
    with pytest.raises(ConfigError, match=r"run.checkpoint_uri.*'ckpts' is neither a URI"):
        tiny_config(tiny_assets, tmp_path, run={"checkpoint_uri": "ckpts"})
    with pytest.raises(ConfigError, match=r"run.capacity_timeout_s"):
        tiny_config(tiny_assets, tmp_path, run={"capacity_timeout_s": 0})
    with pytest.raises(ConfigError, match=r"run.checkpoint_upload_timeout_s"):
        tiny_config(tiny_assets, tmp_path, run={"checkpoint_upload_timeout_s": -1})
    unset = tiny_config(tiny_assets, tmp_path)
    assert with_env_uri(unset, {}).run.checkpoint_uri is None
    env = {ENV_VAR: "s3://bucket/runs/"}
    assert with_env_uri(unset, env).run.checkpoint_uri == "s3://bucket/runs"
    own = tiny_config(tiny_assets, tmp_path, run={"checkpoint_uri": "gs://mine/x"})
    assert with_env_uri(own, env).run.checkpoint_uri == "gs://mine/x"  # the config wins
    with pytest.raises(ConfigError, match=rf"\${ENV_VAR}: scheme 'http' is not one"):
        with_env_uri(unset, {ENV_VAR: "http://example/x"})


def test_resume_of_a_lost_run_directory_reads_its_config_from_the_store(tmp_path):
    store = CheckpointStore(str(tmp_path / "store"))
    run = RunDir(tmp_path / "run")
    run.create()
    run.config_path.write_text("run: {steps: 7}\n")
    store.upload(_checkpoint(run, 1), keep=2, config_path=run.config_path)
    assert stored_config({}, {}) is None
    text, source = stored_config({}, {ENV_VAR: str(tmp_path / "store")})
    assert text == "run: {steps: 7}\n" and source == f"{tmp_path / 'store'}/config.yaml"
    over = stored_config({"run.checkpoint_uri": str(tmp_path / "store")}, {})
    assert over[0] == text


def test_capacity_wait_names_what_no_node_has(ray_cluster):
    import ray

    from services.capacity import CapacityTimeout, CapacityWait

    @ray.remote(num_cpus=0.1, resources={"gpu_node_that_never_comes": 1})
    class Nowhere:
        def ready(self):
            return True

    seen = []
    wait = CapacityWait(2.0, on_waiting=lambda role, waiting: seen.append((role, waiting)),
                        log_every_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(CapacityTimeout) as info:
        wait.ready("rollout", "rollout-7", Nowhere.remote,
                   {"CPU": 0.1, "gpu_node_that_never_comes": 1})
    assert 2.0 <= time.monotonic() - t0 < 30
    assert str(info.value).startswith(
        "no node with CPU=0.1, gpu_node_that_never_comes=1 for rollout rollout-7 after "
        "waiting 2 s (run.capacity_timeout_s = 2)")
    assert seen == [("rollout", True), ("rollout", False)]
    # an actor that was placed is returned, however long its start takes (the deadline
    # counts until a worker process is leased for it, which takes seconds on a loaded host)
    @ray.remote(num_cpus=0.1)
    class Slow:
        def __init__(self):
            time.sleep(9)

        def ready(self):
            return True

    actor = CapacityWait(8.0).ready("reward", "reward-0", Slow.remote, {"CPU": 0.1})
    assert ray.get(actor.ready.remote())
    ray.kill(actor)

    # an actor whose own start-up fails is not started again: its error is the job's
    @ray.remote(num_cpus=0.1)
    class Broken:
        def __init__(self):
            raise ValueError("no such model")

        def ready(self):
            return True

    made = []

    def make():
        made.append(Broken.remote())
        return made[-1]

    # (a generous deadline: on a loaded host leasing its worker process alone took over 2 s)
    with pytest.raises(ray.exceptions.RayActorError, match="no such model"):
        CapacityWait(60.0).ready("rollout", "rollout-1", make, {"CPU": 0.1})
    assert len(made) == 1


def test_metrics_say_what_waits_and_how_uploads_went():
    from services.metrics import MetricsExporter

    m = MetricsExporter(job="j")
    value = m.registry.get_sample_value
    assert value("harpo_waiting_for_capacity", {"job": "j", "role": "rollout"}) == 0
    m.set_waiting_for_capacity("rollout", True)
    assert value("harpo_waiting_for_capacity", {"job": "j", "role": "rollout"}) == 1
    assert value("harpo_checkpoint_uploads_total", {"job": "j", "result": "failed"}) == 0
    m.record_checkpoint_upload("failed")
    assert value("harpo_checkpoint_uploads_total", {"job": "j", "result": "failed"}) == 1


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def test_harpo_train_resume_of_a_lost_run_directory_gets_config_and_checkpoint(
        tiny_assets, tmp_path, monkeypatch, capsys):
    """`harpo train --resume RUN_DIR` with RUN_DIR gone and $HARPO_CHECKPOINT_URI set: the
    config comes from the store, and the checks before Ray download its newest checkpoint."""
    import shutil

    from services.cli import _load_train_config, build_parser
    from services.run_owner import claim_and_check

    run = RunDir(tmp_path / "run")
    config = tiny_config(tiny_assets, run.root)
    run.create()
    run.config_path.write_text(config.to_yaml())

    def write(tmp):
        shutil.copytree(tiny_assets.model_dir, tmp / "model")
        (tmp / "trainer.json").write_text(json.dumps({"completed_steps": 1, "version": 1}))

    CheckpointStore(str(tmp_path / "store")).upload(
        run.save_checkpoint(1, write, keep=2), keep=2, config_path=run.config_path)
    shutil.rmtree(run.root)
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "store"))
    args = build_parser().parse_args(["train", "--resume", str(run.root)])
    loaded = with_env_uri(_load_train_config(args))
    assert loaded.run.output_dir == run.root
    assert loaded.run.checkpoint_uri == str(tmp_path / "store")
    resume, lock = claim_and_check(loaded, resume=True, overwrite=False, job=False, note=None)
    lock.release()
    assert resume
    assert run.latest_valid_checkpoint() == run.checkpoints / "step-000001"
    with pytest.raises(FileNotFoundError, match="is not a run directory"):
        monkeypatch.delenv(ENV_VAR)
        _load_train_config(build_parser().parse_args(["train", "--resume",
                                                      str(tmp_path / "other")]))
