"""What clusters do, on a real multi-node Ray on this machine: a head (`ray start --head`)
and worker nodes (`ray start --address`) with a custom resource ``rollout_node`` that the
rollout workers ask for, each node with its own temp dir and ports. A node "dies hard" when
its raylet and every other process of it are SIGKILLed (a preempted spot instance, an
OOM-killed pod).

One cluster serves the module; the test process's driver joins it (the session's embedded Ray
is shut down for the module and started again after it). Runs are 3 steps of the tiny model;
"identical" means every metric row but timings and restart counters equals the fault-free
run's. The S3-compatible server is moto's ThreadedMotoServer: a stand-in for S3, not S3.
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time

import psutil
import pytest
import ray

from services.capacity import CapacityTimeout
from services.cluster import connect
from services.controller import Trainer
from services.ports import free_port
from services.run_dir import RunDir
from tests.services.conftest import tiny_config
from tests.services.ray_cli import BIN, subprocess_env

STEPS = 3
VOLATILE = {"timing", "rollouts_per_s", "tokens_per_s", "restarts", "weight_sync_failures"}
# One rollout worker that fills a rollout node (2 CPUs), so nothing else is placed there;
# one reward scorer (on the head): few actors to start on 2 shared cores.
ROLLOUT = {"workers": 1, "group_size": 4, "max_new_tokens": 12,
           "resources": {"rollout_node": 1}, "cpus_per_worker": 2}
REWARD = {"scorers": 1}




class Cluster:
    """A head and worker nodes, each a `ray start` with its own temp dir (a short path: Ray's
    socket paths must stay under 107 bytes); stopped by their processes, never `ray stop`."""

    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="hn-", dir="/tmp")
        self._nodes = 0

        def head():
            self.port = free_port()
            self.address = f"127.0.0.1:{self.port}"
            return ["--head", "--port", str(self.port), "--num-cpus", "6",
                    "--ray-client-server-port", str(free_port()), "--include-dashboard", "false"]

        self._start(head, "head")

    def _start(self, args, name: str) -> str:
        """`ray start`; ports picked free may be taken by another process before Ray binds
        them (the machine is shared), so a failed start is cleaned up and tried again."""
        # `ray start --address` on one machine
        env = subprocess_env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1")
        if name == "head":  # a node whose raylet is gone is declared dead in ~3 s, not ~30 s
            env.update(RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="1000",
                       RAY_health_check_failure_threshold="2")
        for attempt in range(3):
            temp_dir = os.path.join(self.root, f"{name}{'-' * attempt}")
            ports = ["--node-manager-port", "--object-manager-port",
                     "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                     "--runtime-env-agent-port", "--metrics-export-port"]
            cmd = [str(BIN / "ray"), "start", *args(), "--node-ip-address", "127.0.0.1",
                   "--temp-dir", temp_dir, "--disable-usage-stats",
                   *[x for flag in ports for x in (flag, str(free_port()))]]
            result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
            if result.returncode == 0:
                return temp_dir
            self._stop_processes(temp_dir)
        raise RuntimeError(f"`ray start` failed 3 times:\n{result.stdout[-2000:]}\n"
                           f"{result.stderr[-2000:]}")

    def add_rollout_node(self) -> str:
        self._nodes += 1
        return self._start(lambda: ["--address", self.address, "--num-cpus", "2",
                                    "--resources", json.dumps({"rollout_node": 2})],
                           f"n{self._nodes}")

    @staticmethod
    def processes(temp_dir: str) -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(temp_dir in part for part in proc.info["cmdline"] or []):
                    found.append(proc)
            except psutil.Error:
                pass
        return found

    def kill_node(self, temp_dir: str) -> None:
        """SIGKILL the node's raylet first, then the rest of its processes."""
        procs = self.processes(temp_dir)
        procs.sort(key=lambda p: "raylet" not in " ".join(p.info["cmdline"] or []))
        for proc in procs:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass

    def stop(self) -> None:
        self._stop_processes(self.root)
        shutil.rmtree(self.root, ignore_errors=True)

    def _stop_processes(self, temp_dir: str) -> None:
        victims = self.processes(temp_dir)
        for proc in victims:
            try:
                proc.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(victims, timeout=5)
        for proc in alive:
            proc.kill()


@pytest.fixture(scope="module")
def cluster():
    embedded = ray.is_initialized()
    if embedded:
        ray.shutdown()
    nodes = Cluster()
    try:
        nodes.first = nodes.add_rollout_node()
        connect(nodes.address)
        yield nodes
    finally:
        ray.shutdown()
        nodes.stop()
        if embedded:  # give the rest of the session its embedded Ray back
            connect(num_cpus=8)


@pytest.fixture(scope="module")
def s3_stand_in():
    """moto's S3-compatible server in a thread: a stand-in for S3."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    import boto3

    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1"
                 ).create_bucket(Bucket="harpo")
    try:
        yield (f"s3://harpo/run?endpoint_override=127.0.0.1:{port}&scheme=http"
               f"&region=us-east-1")
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _config(assets, run_dir, **run):
    return tiny_config(assets, run_dir, run={"steps": STEPS, "checkpoint_every": 1, **run},
                       rollout=ROLLOUT, reward=REWARD)


def _comparable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def _train(config, *, resume=False, during=None):
    """Run a trainer to its end; ``during(trainer)`` runs in a thread (the fault)."""
    trainer = Trainer(config, resume=resume)
    thread = None
    if during is not None:
        thread = threading.Thread(target=during, args=(trainer,), daemon=True)
        thread.start()
    try:
        trainer.run()
        return trainer.run_dir.read_metrics(), trainer
    finally:
        trainer.shutdown()
        if thread is not None:
            thread.join(timeout=120)


def _when_generating(trainer, step: int, deadline_s: float = 300) -> None:
    deadline = time.monotonic() + deadline_s
    while not (trainer.completed_steps == step and trainer.actors.pool.inflight() > 0):
        assert time.monotonic() < deadline, "step never started generating"
        time.sleep(0.002)


@pytest.fixture(scope="module")
def fault_free(cluster, tiny_assets, tmp_path_factory):
    """A fault-free run; its checkpoints also go to a local-filesystem checkpoint_uri."""
    base = tmp_path_factory.mktemp("fault-free")
    config = _config(tiny_assets, base / "run", keep_checkpoints=5,
                     checkpoint_uri=str(base / "store"))
    rows, _ = _train(config)
    assert [r["step"] for r in rows] == list(range(STEPS))
    return rows, base


def test_rollout_node_dies_hard_and_a_new_one_comes(cluster, fault_free, tiny_assets, tmp_path,
                                                    s3_stand_in):
    """The rollout node's raylet is SIGKILLed mid-step; a replacement node starts 3 s later:
    the run finishes with every step once and rows identical to the fault-free run's. Its
    checkpoints go to the S3 stand-in, where retention keeps the newest two."""
    events = {}

    def fault(trainer):
        _when_generating(trainer, 1)
        cluster.kill_node(cluster.first)
        events["killed"] = time.monotonic()
        time.sleep(3)
        cluster.current = cluster.add_rollout_node()
        events["replaced"] = time.monotonic()

    config = _config(tiny_assets, tmp_path / "run", capacity_timeout_s=120,
                     keep_checkpoints=2, checkpoint_uri=s3_stand_in)
    rows, trainer = _train(config, during=fault)
    assert "replaced" in events, events
    assert [r["step"] for r in rows] == list(range(STEPS))
    assert _comparable(rows) == _comparable(fault_free[0])
    assert rows[-1]["restarts"].get("rollout", 0) >= 1, rows[-1]["restarts"]
    assert "job" not in rows[-1]["restarts"]  # survived without a restart
    from services.checkpoint_store import CheckpointStore

    assert CheckpointStore(s3_stand_in).checkpoints() == ["step-000002", "step-000003"]


def test_no_node_comes_back_stops_cleanly_with_a_checkpoint(cluster, fault_free, tiny_assets,
                                                            tmp_path):
    """The rollout node dies and none replaces it within run.capacity_timeout_s: the job
    stops with a checkpoint of the steps it completed and names the missing resources."""
    seen = []

    def fault(trainer):
        _when_generating(trainer, 1)
        cluster.kill_node(cluster.current)
        deadline = time.monotonic() + 120
        while (not seen or seen[-1] != 1.0) and time.monotonic() < deadline:
            value = trainer.endpoints.metrics.registry.get_sample_value(
                "harpo_waiting_for_capacity", {"job": "test", "role": "rollout"})
            seen.append(value)
            time.sleep(0.1)

    config = tiny_config(tiny_assets, tmp_path / "run",
                         run={"steps": STEPS, "checkpoint_every": 0, "capacity_timeout_s": 10},
                         rollout=ROLLOUT, reward=REWARD, observability={"metrics_port": 0})
    with pytest.raises(CapacityTimeout) as info:
        _train(config, during=fault)
    run = RunDir(tmp_path / "run")
    message = str(info.value)
    assert message.startswith("no node with CPU=2, rollout_node=1 for rollout ")
    assert "(run.capacity_timeout_s = 10)" in message
    # step 1 was generating when the node died; its workers' processes may still finish it
    # before they notice their raylet is gone, so the stop comes in step 1 or step 2
    done = int(message.split("Stopped at step ")[1].split()[0])
    assert done in (1, 2), message
    checkpoint = run.checkpoints / f"step-{done:06d}"
    assert message.endswith(f"Stopped at step {done} of {STEPS}; checkpoint {checkpoint}; "
                            f"resume with: harpo train --resume {run.root}")
    assert run.latest_valid_checkpoint() == checkpoint
    assert seen[-1] == 1.0  # harpo_waiting_for_capacity said so while it waited
    # the step in flight gave its prompts back: the same state as the fault-free run's
    reference = fault_free[1] / "run" / "checkpoints" / checkpoint.name
    for name in ("sampler.json", "trainer.json", "estimator.json"):
        assert (checkpoint / name).read_text() == (reference / name).read_text(), name
    assert _comparable(run.read_metrics()) == _comparable(fault_free[0][:done])


def test_learner_killed_during_save_restarts_identically(cluster, fault_free, tiny_assets,
                                                         tmp_path):
    """The learner process is SIGKILLed while it writes the last checkpoint (after step 3):
    the job restarts from step 2's checkpoint, the half-written one is gone, step 3 runs again
    and the rows are identical."""
    cluster.add_rollout_node()  # the last test left no rollout node
    killed = []

    def fault(trainer):
        group = trainer.actors.learners
        real = group._all_ranks

        def save_and_die(what, call):  # the checkpoint after the last step, once
            if what != "save" or killed or trainer.completed_steps != STEPS:
                return real(what, call)
            refs = call()  # the save is under way ...
            os.kill(group.pids[0], signal.SIGKILL)  # ... and its writer dies
            killed.append(what)
            return real(what, lambda: refs)

        group._all_ranks = save_and_die

    config = _config(tiny_assets, tmp_path / "run")
    rows, trainer = _train(config, during=fault)
    assert killed == ["save"]
    assert [r["step"] for r in rows] == list(range(STEPS))
    assert _comparable(rows) == _comparable(fault_free[0])
    assert rows[-1]["restarts"]["job"] == 1
    run = RunDir(tmp_path / "run")
    assert not list(run.checkpoints.glob(".tmp-*"))
    assert [p.name for p in run.list_checkpoints()] == [f"step-{s:06d}" for s in (1, 2, 3)]


def test_resume_from_a_local_uri_after_the_run_directory_is_lost(cluster, fault_free,
                                                                 tiny_assets, tmp_path):
    """The run directory is gone; the local-filesystem checkpoint_uri holds the checkpoints
    (the newest damaged, so the one before is used): the run continues identically."""
    rows, base = fault_free
    store = base / "store"
    assert sorted(p.name for p in store.iterdir()) == [
        "config.yaml", "step-000001", "step-000002", "step-000003"]
    shutil.rmtree(store / "step-000003")
    (store / "step-000002" / "sampler.json").write_text("{}")  # fails its checksum
    config = _config(tiny_assets, tmp_path / "lost", checkpoint_uri=str(store))
    resumed, _ = _train(config, resume=True)
    assert [r["step"] for r in resumed] == [1, 2]
    assert _comparable(resumed) == _comparable(rows[1:])


def test_resume_from_the_s3_stand_in_into_an_emptied_run_directory(cluster, fault_free,
                                                                   tiny_assets, tmp_path,
                                                                   s3_stand_in):
    """From the S3 stand-in (written by the node-loss run): the run directory lost its
    checkpoints but holds a user's file and a killed writer's leftover; the leftover goes,
    the user's file stays, and the run continues identically."""
    from services.checkpoint_store import CheckpointStore

    store = CheckpointStore(s3_stand_in)
    store.fs.delete_dir(store._path("step-000003"))  # the run died before uploading step 3
    run = RunDir(tmp_path / "run")
    leftover = run.checkpoints / ".tmp-step-000003-12345"
    (leftover / "model").mkdir(parents=True)
    (run.root / "notes.md").write_text("my notes")
    config = _config(tiny_assets, run.root, checkpoint_uri=s3_stand_in, keep_checkpoints=2)
    resumed, _ = _train(config, resume=True)
    assert [r["step"] for r in resumed] == [2]
    assert _comparable(resumed) == _comparable(fault_free[0][2:])
    assert not leftover.exists()
    assert (run.root / "notes.md").read_text() == "my notes"
    assert store.checkpoints() == ["step-000002", "step-000003"]
