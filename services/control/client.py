"""Call a running job's control API; plain dicts in and out.

Every failure becomes a ``ControlError`` (a ValueError, so the ``harpo`` command prints it as
``harpo: error: ...``) carrying the server's message and the gRPC status ``code``. A job that
does not answer at all gets its own message naming the address, since that is by far the most
common mistake (wrong port, job not started, control API off).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import grpc

from services.control import control_pb2 as pb
from services.control import control_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
ENDPOINTS_FILE = "endpoints.json"
DEFAULT_TIMEOUT = 10.0  # seconds, for the calls that answer at once


class ControlError(ValueError):
    """A control call failed; ``code`` is the gRPC status code (None before any call)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


class JobUnreachable(ControlError):
    """Nothing (or nothing speaking this protocol) answers at the address."""


def _check_address(address: str, where: str) -> str:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ControlError(f"{where}: expected HOST:PORT, got {address!r}")
    return address.strip()


def resolve_endpoint(control: str | None = None, run_dir: str | os.PathLike | None = None) -> str:
    """The address to dial: ``control`` if given, else the job's ``RUN_DIR/endpoints.json``
    (written by the driver once its control API listens), else ``127.0.0.1:50051``."""
    if control:
        return _check_address(control, "--control")
    if run_dir is not None:
        path = Path(run_dir) / ENDPOINTS_FILE
        try:
            endpoints = json.loads(path.read_text())
        except FileNotFoundError:
            raise ControlError(f"{path} does not exist: is {run_dir} the run directory of a "
                               "started job? (a job writes it once its control API listens)"
                               ) from None
        except (OSError, json.JSONDecodeError) as exc:
            raise ControlError(f"cannot read {path}: {exc}") from None
        address = endpoints.get("control") if isinstance(endpoints, dict) else None
        if not address:
            raise ControlError(f"{path} names no control address: the job runs with its control "
                               "API off (control.port: null)")
        return _check_address(str(address), str(path))
    return DEFAULT_ADDRESS


class ControlClient:
    """One connection to one job. ``timeout`` bounds the quick calls; ``checkpoint`` and ``stop``
    wait as long as the job needs (``wait_timeout``, default no limit) since they answer only once
    the checkpoint is written."""

    def __init__(self, address: str, *, token: str | None = None,
                 tls_ca: str | os.PathLike | None = None, timeout: float = DEFAULT_TIMEOUT,
                 wait_timeout: float | None = None):
        self.address = address
        self.timeout = timeout
        self.wait_timeout = wait_timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
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

    def _call(self, rpc: str, request, timeout: float | None):
        try:
            return getattr(self._stub, rpc)(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._error(exc, timeout) from None

    def _error(self, exc: grpc.RpcError, timeout: float | None) -> ControlError:
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
            return ControlError(f"the harpo job at {self.address} did not answer {within}", code)
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
        tasks = {
            name: {"factor": t.factor, "unclamped_factor": t.unclamped_factor,
                   "signal": t.signal,
                   "signal_ema": t.signal_ema if t.HasField("signal_ema") else None,
                   "batch_share": t.batch_share, "zero_signal_groups": t.zero_signal_groups}
            for name, t in sorted(r.tasks.items())}
        return {"step": r.step, "reference": r.reference if r.HasField("reference") else None,
                "tasks": tasks}

    def scale_rollouts(self, workers: int) -> dict:
        r = self._call("ScaleRollouts", pb.ScaleRolloutsRequest(workers=workers), self.timeout)
        return {"previous": r.previous, "target": r.target}

    def checkpoint(self) -> dict:
        r = self._call("Checkpoint", pb.CheckpointRequest(), self.wait_timeout)
        return {"path": r.path}

    def pause(self) -> dict:
        self._call("Pause", pb.PauseRequest(), self.timeout)
        return {}

    def resume(self) -> dict:
        self._call("Resume", pb.ResumeRequest(), self.timeout)
        return {}

    def stop(self) -> dict:
        r = self._call("Stop", pb.StopRequest(), self.wait_timeout)
        return {"checkpoint": r.checkpoint}
