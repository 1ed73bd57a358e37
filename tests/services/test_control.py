"""The gRPC control API: a real server and client on loopback, a small in-test target.

``FakeTrainer`` is a test double for the training driver (``services.controller.Trainer``): a
little state machine with the ``ControlTarget`` methods, so these tests check the transport,
auth, TLS, error mapping and the commands without Ray or a model. End-to-end tests against a
real running job live with the driver's tests.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from services.control import cli as control_cli
from services.control import control_pb2 as pb
from services.control import control_pb2_grpc as pb_grpc
from services.control.client import (
    DEFAULT_ADDRESS,
    ControlClient,
    ControlError,
    JobUnreachable,
    resolve_endpoint,
)
from services.control.server import ControlConfigError, ControlServer, resolve_token
from services.control.target import ControlTarget
from services.ports import free_port

TOKEN = "s3cret-token"


class FakeTrainer:
    """Test double for the trainer: steps counter, worker list, paused flag, real checkpoints.

    ``stop`` blocks until ``release_stop`` is set (``stop_entered`` tells the test it is
    waiting), so a test can check that the server answers other calls meanwhile.
    """

    def __init__(self, run_dir: Path, *, total_steps: int = 10, max_workers: int = 8):
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.max_workers = max_workers
        self.step = 3
        self.workers = ["w0", "w1"]
        self.paused = False
        self.state = "running"
        self.fail_status = False
        self.stop_entered = threading.Event()
        self.release_stop = threading.Event()
        self.release_stop.set()
        self.checkpoint_gate = threading.Event()
        self.checkpoint_gate.set()
        self.checkpoints_waiting = 0
        self._lock = threading.Lock()

    def status(self) -> dict:
        if self.fail_status:
            raise RuntimeError("the status actor died")
        with self._lock:
            return {"job": "fake-job", "state": self.state, "step": self.step,
                    "total_steps": self.total_steps, "policy_version": self.step,
                    "rollout_workers": len(self.workers), "rollouts_per_s": 12.5,
                    "tokens_per_s": 640.25, "last_step_s": 1.75, "run_dir": str(self.run_dir)}

    def modulator_state(self) -> dict:
        if self.step == 0:
            return {"step": 0, "reference": None, "tasks": {}}
        return {"step": self.step, "reference": 0.25, "tasks": {
            "math": {"factor": 1.5, "unclamped_factor": 1.6, "signal": 0.1, "signal_ema": 0.12,
                     "batch_share": 0.5, "zero_signal_groups": 3},
            "code": {"factor": 0.8, "unclamped_factor": 0.8, "signal": 0.3, "signal_ema": None,
                     "batch_share": 0.5, "zero_signal_groups": 0}}}

    def scale_rollouts(self, workers: int) -> dict:
        if workers > self.max_workers:
            raise ValueError(f"at most {self.max_workers} rollout workers fit the cluster")
        with self._lock:
            previous = len(self.workers)
            self.workers = [f"w{i}" for i in range(workers)]
        return {"previous": previous, "target": workers}

    def checkpoint(self) -> str:
        with self._lock:
            self.checkpoints_waiting += 1
        self.checkpoint_gate.wait(10)
        with self._lock:
            self.checkpoints_waiting -= 1
        path = self.run_dir / "checkpoints" / f"step-{self.step:06d}"
        path.mkdir(parents=True, exist_ok=True)
        (path / "MANIFEST.json").write_text("{}")
        return str(path)

    def pause(self) -> None:
        with self._lock:
            if self.state != "running":
                raise ValueError(f"cannot pause a job that is {self.state}")
            self.state = "paused"

    def resume(self) -> None:
        with self._lock:
            if self.state != "paused":
                raise ValueError(f"cannot resume: the job is {self.state}, not paused")
            self.state = "running"

    def stop(self) -> str:
        with self._lock:
            self.state = "stopping"
        self.stop_entered.set()
        self.release_stop.wait(10)
        self.step += 1  # finishes its current step
        path = self.checkpoint()
        with self._lock:
            self.state = "finished"
        return path


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def trainer(tmp_path):
    return FakeTrainer(tmp_path / "run")


@pytest.fixture
def serve(trainer):
    """Start servers on free loopback ports (any options); all are stopped after the test."""
    servers = []

    def start(host="127.0.0.1", **options) -> ControlServer:
        server = ControlServer(trainer, host, 0, **options)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(0)


@pytest.fixture
def server(serve):
    return serve()


@pytest.fixture
def client(server):
    with ControlClient(f"127.0.0.1:{server.port}", timeout=5) as c:
        yield c



def harpo(argv: list[str]) -> int:
    """Run a control command in-process, the way ``services.cli.main`` does."""
    parser = argparse.ArgumentParser(prog="harpo")
    control_cli.add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.fn(args)


# ---------------------------------------------------------------------------- generated code


def test_generated_code_matches_the_proto():
    """The committed control_pb2 embeds exactly what control.proto compiles to."""
    from services.control import generate

    assert generate.proto_descriptor() == pb.DESCRIPTOR.serialized_pb, (
        "control.proto changed: run python -m services.control.generate")


def test_regenerating_gives_the_committed_files(tmp_path):
    """Byte for byte, with the grpcio-tools version that generated them."""
    import grpc_tools  # a pinned dev dependency (grpcio-tools==1.85.1)
    from grpc_tools.grpc_version import VERSION

    from services.control import generate

    assert VERSION == pb_grpc.GRPC_GENERATED_VERSION, (
        f"the committed files come from grpcio-tools {pb_grpc.GRPC_GENERATED_VERSION}, "
        f"{grpc_tools.__name__} {VERSION} is installed: keep pyproject's pin and the files in step")
    generate.generate(tmp_path)
    for name in generate.GENERATED:
        committed = (generate.HERE / name).read_text()
        assert (tmp_path / name).read_text() == committed, (
            f"{name} is stale: run python -m services.control.generate")


def test_generated_code_runs_on_the_installed_runtimes():
    """Importing pb/pb_grpc already ran their version checks (protobuf >= 7.35.1, grpcio >=
    1.85.1); this pins the service's shape, which clients of other languages rely on."""
    assert pb.DESCRIPTOR.package == "harpo.control.v1"
    assert [m.name for m in pb.DESCRIPTOR.services_by_name["HarpoControl"].methods] == [
        "GetStatus", "GetModulatorState", "ScaleRollouts", "Checkpoint", "Pause", "Resume",
        "Stop"]
    assert isinstance(FakeTrainer(Path(".")), ControlTarget)


# ---------------------------------------------------------------------------- every RPC


def test_every_rpc_through_the_client(client, trainer):
    assert client.status() == {
        "job": "fake-job", "state": "running", "step": 3, "total_steps": 10,
        "policy_version": 3, "rollout_workers": 2, "rollouts_per_s": 12.5,
        "tokens_per_s": 640.25, "last_step_s": 1.75, "run_dir": str(trainer.run_dir)}

    m = client.modulator_state()
    assert m["step"] == 3 and m["reference"] == 0.25
    assert list(m["tasks"]) == ["code", "math"]
    assert m["tasks"]["math"] == {"factor": 1.5, "unclamped_factor": 1.6, "signal": 0.1,
                                  "signal_ema": 0.12, "batch_share": 0.5,
                                  "zero_signal_groups": 3}
    assert m["tasks"]["code"]["signal_ema"] is None  # unset optional stays None, not 0.0

    assert client.scale_rollouts(5) == {"previous": 2, "target": 5}
    assert client.status()["rollout_workers"] == 5

    path = Path(client.checkpoint()["path"])
    assert path.is_dir() and (path / "MANIFEST.json").is_file()

    assert client.pause() == {} and client.status()["state"] == "paused"
    assert client.resume() == {} and client.status()["state"] == "running"

    final = Path(client.stop()["checkpoint"])
    assert final.name == "step-000004" and final.is_dir()
    assert client.status()["state"] == "finished"


def test_modulator_before_the_first_step(client, trainer):
    trainer.step = 0
    assert client.modulator_state() == {"step": 0, "reference": None, "tasks": {}}


def test_every_command_through_the_cli(server, trainer, capsys):
    at = ["--control", f"127.0.0.1:{server.port}"]

    assert harpo(["status", *at]) == 0
    out = capsys.readouterr().out
    assert "fake-job" in out and "running" in out and "3/10" in out and "640.2" in out

    assert harpo(["status", *at, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rollout_workers"] == 2

    assert harpo(["modulator", *at]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "modulator after step 3 (reference signal 0.25)"
    assert lines[1].split()[:3] == ["task", "factor", "unclamped"]
    assert lines[2].split() == ["code", "0.800", "0.800", "0.3", "-", "0.500", "0"]
    assert lines[3].split() == ["math", "1.500", "1.600", "0.1", "0.12", "0.500", "3"]

    assert harpo(["modulator", *at, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"]["math"]["zero_signal_groups"] == 3

    assert harpo(["scale", "--rollout", "4", *at]) == 0
    assert capsys.readouterr().out.strip() == "rollout workers: 2 -> 4"

    assert harpo(["checkpoint", *at, "--json"]) == 0
    assert Path(json.loads(capsys.readouterr().out)["path"]).is_dir()

    assert harpo(["pause", *at]) == 0
    assert capsys.readouterr().out.startswith("paused")
    assert trainer.state == "paused"
    assert harpo(["resume", *at]) == 0
    assert capsys.readouterr().out.strip() == "resumed"

    assert harpo(["stop", *at]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("stopped; final checkpoint: ") and "waiting" in out.err
    assert trainer.state == "finished"


def test_modulator_command_without_tasks(server, trainer, capsys):
    trainer.step = 0
    assert harpo(["modulator", "--control", f"127.0.0.1:{server.port}"]) == 0
    assert "no per-task state" in capsys.readouterr().out


def test_cli_user_errors_are_value_errors(server, trainer):
    at = ["--control", f"127.0.0.1:{server.port}"]
    with pytest.raises(ValueError, match="cannot resume: the job is running, not paused"):
        harpo(["resume", *at])
    with pytest.raises(ValueError, match="at most 8 rollout workers"):
        harpo(["scale", "--rollout", "9", *at])
    with pytest.raises(SystemExit):  # argparse: exit 2 with "expected a positive integer"
        harpo(["scale", "--rollout", "0", *at])
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        harpo(["status", "--control", "nohost"])


def test_stop_with_a_job_id_uses_the_ray_job_api(monkeypatch, capsys, server, trainer):
    calls = []
    fake_jobs = type(sys)("services.jobs")
    fake_jobs.stop_job = lambda address, job: calls.append((address, job)) or None
    monkeypatch.setitem(sys.modules, "services.jobs", fake_jobs)

    assert harpo(["stop", "raysubmit_123", "--address", "http://127.0.0.1:8265"]) == 0
    assert calls == [("http://127.0.0.1:8265", "raysubmit_123")]
    assert "raysubmit_123" in capsys.readouterr().out
    assert trainer.state == "running"  # the control API was not called

    with pytest.raises(ValueError, match="not both"):
        harpo(["stop", "raysubmit_123", "--control", f"127.0.0.1:{server.port}"])
    with pytest.raises(ValueError, match="only goes with a JOB"):
        harpo(["stop", "--address", "http://127.0.0.1:8265"])


# ---------------------------------------------------------------------------- auth


def test_token_is_required_and_checked(serve, trainer):
    server = serve(token=TOKEN)
    address = f"127.0.0.1:{server.port}"
    for token, message in [(None, "requires a token"), ("wrong", "invalid control token")]:
        with ControlClient(address, token=token, timeout=5) as c:
            with pytest.raises(ControlError, match=message) as err:
                c.status()
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(ControlError):
                c.stop()  # refused before reaching the target
    assert trainer.state == "running"
    with ControlClient(address, token=TOKEN, timeout=5) as c:
        assert c.status()["state"] == "running"
        assert c.scale_rollouts(3)["target"] == 3


def test_cli_token_from_file_or_environment(serve, tmp_path, monkeypatch, capsys):
    server = serve(token=TOKEN)
    at = ["--control", f"127.0.0.1:{server.port}"]
    monkeypatch.delenv("HARPO_CONTROL_TOKEN", raising=False)
    with pytest.raises(ValueError, match="requires a token.*--token-file"):
        harpo(["status", *at])

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")  # a trailing newline is not part of the token
    assert harpo(["status", *at, "--token-file", str(token_file)]) == 0
    monkeypatch.setenv("HARPO_CONTROL_TOKEN", TOKEN)
    assert harpo(["status", *at]) == 0
    monkeypatch.setenv("HARPO_CONTROL_TOKEN", "nope")
    with pytest.raises(ValueError, match="invalid control token"):
        harpo(["status", *at])
    capsys.readouterr()


def test_resolve_token(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_TOKEN", "  from-env \n")
    assert resolve_token(None, "MY_TOKEN") == "from-env"
    monkeypatch.setenv("MY_TOKEN", "")
    assert resolve_token(None, "MY_TOKEN") is None
    path = tmp_path / "t"
    path.write_text("from-file\n")
    assert resolve_token(path, "MY_TOKEN") == "from-file"  # the file wins
    path.write_text("\n")
    with pytest.raises(ControlConfigError, match="is empty"):
        resolve_token(path, "MY_TOKEN")
    with pytest.raises(ControlConfigError, match="cannot read the control token file"):
        resolve_token(tmp_path / "missing", "MY_TOKEN")


def test_non_loopback_bind_needs_a_token(serve, trainer):
    with pytest.raises(ControlConfigError, match="refusing to serve the control API on 0.0.0.0"):
        ControlServer(trainer, "0.0.0.0", 0).start()
    server = serve("0.0.0.0", token=TOKEN)
    with ControlClient(f"127.0.0.1:{server.port}", token=TOKEN, timeout=5) as c:
        assert c.status()["job"] == "fake-job"


def test_port_in_use_is_a_clear_error(server, trainer):
    with pytest.raises(ControlConfigError, match=f"cannot listen on 127.0.0.1:{server.port}"):
        ControlServer(trainer, "127.0.0.1", server.port).start()


# ---------------------------------------------------------------------------- TLS


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1, and its key (PEM)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        if subprocess.run(["which", "openssl"], capture_output=True).returncode:
            pytest.skip("neither the cryptography package nor openssl is available")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                        "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                        "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(private.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert, key


def test_tls(serve, tmp_path, capsys):
    cert, key = self_signed(tmp_path)
    server = serve(token=TOKEN, tls_cert=cert, tls_key=key)
    address = f"127.0.0.1:{server.port}"
    with ControlClient(address, token=TOKEN, tls_ca=cert, timeout=5) as c:
        assert c.status()["state"] == "running"
    with ControlClient(address, token=TOKEN, timeout=5) as c, pytest.raises(JobUnreachable,
                                                                            match="--tls-ca"):
        c.status()  # plaintext against a TLS port: no answer
    other_ca, _ = self_signed(tmp_path / "other")
    with ControlClient(address, token=TOKEN, tls_ca=other_ca, timeout=5) as c:
        with pytest.raises(JobUnreachable, match="TLS handshake failed"):
            c.status()  # a certificate the CA does not sign

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    assert harpo(["status", "--control", address, "--tls-ca", str(cert), "--token-file",
                  str(token_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["job"] == "fake-job"


def test_tls_config_errors(trainer, tmp_path):
    cert, _ = self_signed(tmp_path)
    with pytest.raises(ControlConfigError, match="given together"):
        ControlServer(trainer, "127.0.0.1", 0, tls_cert=cert)
    with pytest.raises(ControlConfigError, match="cannot read control.tls_key"):
        ControlServer(trainer, "127.0.0.1", 0, tls_cert=cert, tls_key=tmp_path / "no.pem").start()


# ---------------------------------------------------------------------------- bad requests


def test_malformed_requests_are_invalid_argument_and_the_server_keeps_serving(server, client,
                                                                            trainer):
    for workers, message in [(0, "at least 1, got 0"), (-3, "at least 1, got -3"),
                             (99, "at most 8 rollout workers")]:
        with pytest.raises(ControlError, match=message) as err:
            client.scale_rollouts(workers)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.HarpoControlStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ScaleRollouts(pb.ScaleRolloutsRequest(), timeout=5)  # workers unset
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "needs 'workers'" in err.value.details()

        garbage = channel.unary_unary("/harpo.control.v1.HarpoControl/ScaleRollouts")
        with pytest.raises(grpc.RpcError):
            garbage(b"\xff\xff\xff", timeout=5)  # not a protobuf message at all

    assert trainer.workers == ["w0", "w1"]
    assert client.status()["rollout_workers"] == 2


def test_state_errors_are_failed_precondition(client):
    with pytest.raises(ControlError, match="cannot resume: the job is running") as err:
        client.resume()
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    client.pause()
    with pytest.raises(ControlError, match="cannot pause a job that is paused"):
        client.pause()


def test_unexpected_target_errors_are_internal(client, trainer):
    trainer.fail_status = True
    with pytest.raises(ControlError, match="GetStatus failed: RuntimeError: the status actor "
                                           "died") as err:
        client.status()
    assert err.value.code == grpc.StatusCode.INTERNAL
    trainer.fail_status = False
    assert client.status()["state"] == "running"


def test_a_bad_status_from_the_target_is_internal(client, trainer):
    trainer.state = "dancing"
    with pytest.raises(ControlError, match="unknown job state 'dancing'") as err:
        client.status()
    assert err.value.code == grpc.StatusCode.INTERNAL


# ---------------------------------------------------------------------------- blocking calls


def test_status_answers_while_stop_waits(server, trainer):
    trainer.release_stop.clear()
    address = f"127.0.0.1:{server.port}"
    result = {}
    stopper = threading.Thread(
        target=lambda: result.update(ControlClient(address).stop()), daemon=True)
    stopper.start()
    assert trainer.stop_entered.wait(5)
    with ControlClient(address, timeout=2) as c:
        started = time.monotonic()
        assert c.status()["state"] == "stopping"
        assert c.modulator_state()["step"] == 3
        assert time.monotonic() - started < 2
    trainer.release_stop.set()
    stopper.join(10)
    assert Path(result["checkpoint"]).is_dir()


def test_waiting_calls_cannot_take_every_thread(server, trainer):
    """Two checkpoint/stop calls may wait at once; a third is refused, quick calls still answer."""
    trainer.checkpoint_gate.clear()
    address = f"127.0.0.1:{server.port}"
    paths = []
    waiting = [threading.Thread(target=lambda: paths.append(ControlClient(address).checkpoint()),
                                daemon=True) for _ in range(2)]
    for t in waiting:
        t.start()
    deadline = time.monotonic() + 5
    while trainer.checkpoints_waiting < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with ControlClient(address, timeout=5) as c:
        with pytest.raises(ControlError, match="already waiting") as err:
            c.stop()
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert c.status()["state"] == "running"  # neither stopped nor blocked
        assert c.scale_rollouts(3)["target"] == 3
    trainer.checkpoint_gate.set()
    for t in waiting:
        t.join(10)
    assert len(paths) == 2


def test_a_deadline_is_a_clear_error(server, trainer):
    trainer.checkpoint_gate.clear()
    with ControlClient(server.address, wait_timeout=0.2) as c:
        with pytest.raises(ControlError, match=r"did not answer within 0.2 s") as err:
            c.checkpoint()
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    trainer.checkpoint_gate.set()


# ---------------------------------------------------------------------------- finding the job


def test_unreachable_endpoint_is_a_clear_error(capsys):
    address = f"127.0.0.1:{free_port()}"
    with ControlClient(address, timeout=5) as c, pytest.raises(JobUnreachable) as err:
        c.status()
    assert str(err.value).startswith(
        f"no harpo job answers at {address} (is it running? is control.port set?)")
    with pytest.raises(ValueError, match=f"no harpo job answers at {address}"):
        harpo(["stop", "--control", address])


def test_resolve_endpoint(tmp_path):
    assert resolve_endpoint(None, None) == DEFAULT_ADDRESS == "127.0.0.1:50051"
    assert resolve_endpoint("10.0.0.5:6000", tmp_path) == "10.0.0.5:6000"  # explicit wins
    (tmp_path / "endpoints.json").write_text(json.dumps(
        {"control": "127.0.0.1:50099", "metrics": "http://0.0.0.0:9400/metrics"}))
    assert resolve_endpoint(None, tmp_path) == "127.0.0.1:50099"

    with pytest.raises(ControlError, match="does not exist"):
        resolve_endpoint(None, tmp_path / "elsewhere")
    (tmp_path / "endpoints.json").write_text(json.dumps({"metrics": "http://x:1/metrics"}))
    with pytest.raises(ControlError, match="names no control address"):
        resolve_endpoint(None, tmp_path)
    (tmp_path / "endpoints.json").write_text("{not json")
    with pytest.raises(ControlError, match="cannot read"):
        resolve_endpoint(None, tmp_path)
    for bad in ["localhost", "host:port", ":50051", "h:70000"]:
        with pytest.raises(ControlError, match="expected HOST:PORT"):
            resolve_endpoint(bad, None)


def test_cli_finds_the_job_through_its_run_dir(server, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "endpoints.json").write_text(json.dumps({"control": server.address}))
    assert harpo(["status", "--run", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["job"] == "fake-job"


def test_wired_into_the_harpo_command(server, capsys):
    from services import cli

    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    control = {"status", "modulator", "scale", "checkpoint", "pause", "resume", "stop"}
    assert control <= set(commands)
    assert cli.main(["status", "--control", server.address, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["job"] == "fake-job"
    assert cli.main(["resume", "--control", server.address]) == 2
    assert "harpo: error: cannot resume" in capsys.readouterr().err
