"""Call a running job's control API; plain dicts in and out.

Every failure becomes a ``ControlError`` (a ValueError, so the ``harpo`` command prints it as
``harpo: error: ...``) carrying the server's message and the gRPC status ``code``. A job that
does not answer at all gets its own message naming the address, since that is by far the most
common mistake (wrong port, job not started, control API off).

The right job: ``RUN_DIR/endpoints.json`` names the run id of the job that wrote it, and the
file goes when the job ends. A client given that run id (``run_id``) sends it with every call;
the server refuses a call meant for another run before acting, and tags every reply with its own
run id, which the client checks too. So a command for a finished run never reaches the job that
took its port since.

Two kinds of call: the instant ones (status, modulator, resume) answer at once and get
``timeout``; the waiting ones (scale, pause, checkpoint, stop) run between steps, so they wait
for the step in flight and get ``wait_timeout``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import grpc

from services.control import control_pb2 as pb
from services.control import control_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
ENDPOINTS_FILE = "endpoints.json"
DEFAULT_TIMEOUT = 10.0  # seconds, for the calls that answer at once
DEFAULT_WAIT_TIMEOUT = 3600.0  # seconds, for those that wait for the step in flight
PROGRESS_EVERY = 5.0  # seconds between "still waiting" lines of the harpo commands
RUN_ID_HEADER = "harpo-run-id"  # as services.control.server (not imported: it loads the server)
EXPECT_RUN_ID_HEADER = "harpo-expect-run-id"


class ControlError(ValueError):
    """A control call failed; ``code`` is the gRPC status code (None before any call)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


class JobUnreachable(ControlError):
    """Nothing (or nothing speaking this protocol) answers at the address."""


class WrongRun(ControlError):
    """The server at the address belongs to another run than the one asked for."""


class RunNotRunning(ControlError):
    """The run directory names no running job (no endpoints.json, or its driver is gone)."""


def _check_address(address: str, where: str) -> str:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ControlError(f"{where}: expected HOST:PORT, got {address!r}")
    return address.strip()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def read_endpoints(run_dir: str | os.PathLike) -> dict:
    """``RUN_DIR/endpoints.json`` of a running job: ``control``, ``metrics`` (addresses),
    ``run_id``, ``pid``, ``host``. RunNotRunning when the file is absent (the job ended, or
    never started) or names a driver process of this machine that is gone (killed: the file
    outlived it)."""
    path = Path(run_dir) / ENDPOINTS_FILE
    try:
        endpoints = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunNotRunning(
            f"the run in {run_dir} is not running: {path} does not exist (a job writes it once "
            "its endpoints listen and removes it when it ends)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ControlError(f"cannot read {path}: {exc}") from None
    if not isinstance(endpoints, dict):
        raise ControlError(f"cannot read {path}: expected a JSON object")
    pid, host = endpoints.get("pid"), endpoints.get("host")
    if isinstance(pid, int) and host == socket.gethostname() and not _pid_alive(pid):
        raise RunNotRunning(
            f"the run in {run_dir} is not running: its driver (pid {pid}) is gone and left "
            f"{path} behind")
    return endpoints


def resolve_endpoint(control: str | None = None, run_dir: str | os.PathLike | None = None) -> str:
    """The address to dial: ``control`` if given, else the job's ``RUN_DIR/endpoints.json``
    (written by the driver once its control API listens), else ``127.0.0.1:50051``."""
    if control:
        return _check_address(control, "--control")
    if run_dir is not None:
        path = Path(run_dir) / ENDPOINTS_FILE
        address = read_endpoints(run_dir).get("control")
        if not address:
            raise ControlError(f"{path} names no control address: the job runs with its control "
                               "API off (control.port: null)")
        return _check_address(str(address), str(path))
    return DEFAULT_ADDRESS


class ControlClient:
    """One connection to one job. ``timeout`` bounds the instant calls; scale, pause, checkpoint
    and stop run between steps, so they get ``wait_timeout`` (None: no limit) and, while they
    wait, ``on_wait(seconds_waited)`` is called every ``progress_every`` seconds.

    ``run_id``: the run meant (from endpoints.json); a server of another run refuses the call
    before acting and the client raises WrongRun (``run_dir`` names the run in the message).
    ``server_run_id`` holds the run id of the last reply.
    """

    def __init__(self, address: str, *, token: str | None = None,
                 tls_ca: str | os.PathLike | None = None, timeout: float = DEFAULT_TIMEOUT,
                 wait_timeout: float | None = None, run_id: str | None = None,
                 run_dir: str | os.PathLike | None = None, on_wait=None,
                 progress_every: float = 5.0):
        self.address = address
        self.timeout = timeout
        self.wait_timeout = wait_timeout
        self.run_id = run_id
        self.run_dir = run_dir
        self.on_wait = on_wait
        self.progress_every = progress_every
        self.server_run_id: str | None = None
        metadata = [("authorization", f"Bearer {token}")] if token else []
        if run_id:
            metadata.append((EXPECT_RUN_ID_HEADER, run_id))
        self._metadata = tuple(metadata)
        self.tls = tls_ca is not None
        if tls_ca is not None:
            try:
                ca = Path(tls_ca).read_bytes()
            except OSError as exc:
                raise ControlError(f"cannot read the CA certificate {tls_ca}: "
                                   f"{exc.strerror or exc}") from None
            self._channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(ca))
        else:
            self._channel = grpc.insecure_channel(address)
        self._stub = pb_grpc.HarpoControlStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, rpc: str, request, timeout: float | None, *, waits: bool = False):
        method = getattr(self._stub, rpc)
        try:
            if waits and self.on_wait is not None:
                future = method.future(request, timeout=timeout, metadata=self._metadata)
                done, started = threading.Event(), time.monotonic()
                future.add_done_callback(lambda _f: done.set())
                while not done.wait(self.progress_every):
                    self.on_wait(time.monotonic() - started)
                response, call = future.result(), future
            else:
                response, call = method.with_call(request, timeout=timeout,
                                                  metadata=self._metadata)
        except grpc.RpcError as exc:
            self._check_run(exc)
            raise self._error(exc, timeout, waits) from None
        self._check_run(call)
        return response

    def _check_run(self, call) -> None:
        """Refuse an answer from another run's server (the server refuses first; this also
        covers one that ignored the run id asked for)."""
        try:
            trailing = dict(call.trailing_metadata() or ())
        except Exception:  # noqa: BLE001 - no metadata (the call never reached a server)
            return
        server = trailing.get(RUN_ID_HEADER)
        if server is None:
            return
        self.server_run_id = server
        if self.run_id and server != self.run_id:
            whose = f"{self.run_dir}'s run" if self.run_dir is not None else "run"
            raise WrongRun(f"the server at {self.address} belongs to run {server}, not to "
                           f"{whose} {self.run_id}; that run has ended",
                           grpc.StatusCode.FAILED_PRECONDITION)

    def _error(self, exc: grpc.RpcError, timeout: float | None, waits: bool = False
               ) -> ControlError:
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            message = (f"no harpo job answers at {self.address} (is it running? is control.port "
                       "set?)")
            if "handshake" in details.lower():
                message += ("; the TLS handshake failed (a job without TLS, or a certificate "
                            "the CA given does not sign?)")
            elif not self.tls and "socket closed" in details.lower():
                message += "; if the job serves TLS, give its CA certificate (--tls-ca)"
            return JobUnreachable(f"{message} [gRPC: {details}]", code)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            within = f"within {timeout:g} s" if timeout is not None else "in time"
            message = f"the harpo job at {self.address} did not answer {within}"
            if waits:
                message += ("; the command stays queued and runs once the step in flight ends "
                            "(check with harpo status; wait longer with --timeout SECONDS)")
            return ControlError(message, code)
        return ControlError(details or code.name, code)

    # ------------------------------------------------------------------ one method per RPC

    def status(self) -> dict:
        r = self._call("GetStatus", pb.GetStatusRequest(), self.timeout)
        state = pb.JobState.Name(r.state).removeprefix("JOB_STATE_").lower()
        return {"job": r.job, "state": state, "step": r.step, "total_steps": r.total_steps,
                "policy_version": r.policy_version, "rollout_workers": r.rollout_workers,
                "rollouts_per_s": r.rollouts_per_s, "tokens_per_s": r.tokens_per_s,
                "last_step_s": r.last_step_s, "run_dir": r.run_dir}

    def modulator_state(self) -> dict:
        r = self._call("GetModulatorState", pb.GetModulatorStateRequest(), self.timeout)
        tasks = {}
        for name, t in sorted(r.tasks.items()):
            task = {"factor": t.factor, "unclamped_factor": t.unclamped_factor,
                    "signal": t.signal,
                    "signal_ema": t.signal_ema if t.HasField("signal_ema") else None,
                    "batch_share": t.batch_share, "zero_signal_groups": t.zero_signal_groups}
            # reported by harpo's own trainer; absent (not None) from a job that does not
            if t.HasField("in_batch"):
                task["in_batch"] = t.in_batch
                task["last_update_step"] = (t.last_update_step
                                            if t.HasField("last_update_step") else None)
            tasks[name] = task
        return {"step": r.step, "reference": r.reference if r.HasField("reference") else None,
                "tasks": tasks}

    def scale_rollouts(self, workers: int) -> dict:
        r = self._call("ScaleRollouts", pb.ScaleRolloutsRequest(workers=workers),
                       self.wait_timeout, waits=True)
        return {"previous": r.previous, "target": r.target}

    def checkpoint(self) -> dict:
        r = self._call("Checkpoint", pb.CheckpointRequest(), self.wait_timeout, waits=True)
        return {"path": r.path}

    def pause(self) -> dict:
        self._call("Pause", pb.PauseRequest(), self.wait_timeout, waits=True)
        return {}

    def resume(self) -> dict:
        self._call("Resume", pb.ResumeRequest(), self.timeout)
        return {}

    def stop(self) -> dict:
        r = self._call("Stop", pb.StopRequest(), self.wait_timeout, waits=True)
        return {"checkpoint": r.checkpoint}
