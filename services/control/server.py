"""Serve a job's ``ControlTarget`` over gRPC.

Security rules, checked at ``start``: a job listening on anything but loopback must have a token
(anyone who reaches the port could otherwise stop or rescale it); with a token every call must
carry ``authorization: Bearer <token>``; with a certificate and key the port speaks TLS only.

Threads: a pool of 4 serves all calls. ``checkpoint`` and ``stop`` hold their thread until the
checkpoint is on disk, so at most two such calls wait at once (more are refused with
RESOURCE_EXHAUSTED) and two threads stay free for status and the other quick calls.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import uuid
from concurrent import futures
from pathlib import Path

import grpc

from services.config_base import is_loopback
from services.control import control_pb2 as pb
from services.control import control_pb2_grpc as pb_grpc
from services.control.target import JOB_STATES, ControlTarget

log = logging.getLogger(__name__)

# Every reply carries the server's run id in this trailing metadata key; a client that knows which
# run it means (``--run RUN_DIR``) sends it in EXPECT_RUN_ID_HEADER and the server refuses the call
# before acting when it is another run's (a stale endpoints.json whose port a new job now holds).
RUN_ID_HEADER = "harpo-run-id"
EXPECT_RUN_ID_HEADER = "harpo-expect-run-id"

MAX_WORKERS = 4
BLOCKING_SLOTS = 2  # checkpoint/stop calls allowed to wait at once; the other threads stay free

_STATE_TO_PB = {name: pb.JobState.Value(f"JOB_STATE_{name.upper()}") for name in JOB_STATES}


class ControlConfigError(ValueError):
    """The control API cannot start as configured (the message says what to change)."""


def resolve_token(token_file: str | os.PathLike | None, token_env: str | None) -> str | None:
    """The control token: the stripped contents of ``token_file`` if given, else ``$token_env``.

    None when neither is set. An empty or unreadable token file is an error rather than "no
    token": the user asked for authentication and must not silently get none.
    """
    if token_file is not None:
        path = Path(token_file)
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ControlConfigError(f"cannot read the control token file {path}: "
                                     f"{exc.strerror or exc}") from None
        if not token:
            raise ControlConfigError(f"the control token file {path} is empty")
        return token
    if token_env:
        return os.environ.get(token_env, "").strip() or None
    return None


def join_host_port(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6
    return f"{host}:{port}"


class _TokenAuth(grpc.ServerInterceptor):
    """Refuses every call that lacks ``authorization: Bearer <token>``."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization")
        if given is None:
            return self._deny(handler_call_details.method,
                              "this job's control API requires a token: send metadata "
                              "'authorization: Bearer <token>'")
        if isinstance(given, str):
            given = given.encode()
        if not hmac.compare_digest(given, self._expected):
            return self._deny(handler_call_details.method, "invalid control token")
        return continuation(handler_call_details)

    @staticmethod
    def _deny(method: str, message: str):
        def deny(_request, context):
            log.warning("control: refused %s from %s: %s", method, context.peer(), message)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return grpc.unary_unary_rpc_method_handler(deny)


class _RunIdentity(grpc.ServerInterceptor):
    """Tags every reply with the run id and refuses calls meant for another run (checked before
    the token: the refusal names this server's run, which is no secret, so that the caller
    learns that its run has ended rather than that its token is wrong)."""

    def __init__(self, run_id: str):
        self._run_id = run_id
        self._tag = ((RUN_ID_HEADER, run_id),)

    def intercept_service(self, continuation, handler_call_details):
        metadata = dict(handler_call_details.invocation_metadata or ())
        expected = metadata.get(EXPECT_RUN_ID_HEADER)
        if expected is not None and expected != self._run_id:
            message = f"this control API belongs to run {self._run_id}, not to run {expected}"

            def refuse(_request, context):
                log.warning("control: refused %s from %s: %s", handler_call_details.method,
                            context.peer(), message)
                context.set_trailing_metadata(self._tag)
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, message)

            return grpc.unary_unary_rpc_method_handler(refuse)
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        def tagged(request, context):
            context.set_trailing_metadata(self._tag)
            return inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            tagged, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


class _Servicer(pb_grpc.HarpoControlServicer):
    """Translates RPCs into target calls, and target errors into status codes."""

    def __init__(self, target: ControlTarget):
        self._target = target
        self._blocking = threading.BoundedSemaphore(BLOCKING_SLOTS)

    def _run(self, context, rpc: str, fn, user_code=grpc.StatusCode.FAILED_PRECONDITION):
        # context.abort raises; it stays outside the try so its exception is not caught here
        try:
            return fn()
        except ValueError as exc:
            code, message = user_code, str(exc) or f"{rpc} is not possible now"
            log.info("control: %s refused: %s", rpc, message)
        except Exception as exc:  # a bug or a failure of the job: report it, keep serving
            log.exception("control: %s failed", rpc)
            code, message = grpc.StatusCode.INTERNAL, f"{rpc} failed: {type(exc).__name__}: {exc}"
        context.abort(code, message)

    def _run_blocking(self, context, rpc: str, fn):
        if not self._blocking.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{BLOCKING_SLOTS} checkpoint/stop calls are already waiting on this "
                          "job; retry when one of them returns")
        try:
            log.info("control: %s from %s", rpc, context.peer())
            return self._run(context, rpc, fn)
        finally:
            self._blocking.release()

    # ------------------------------------------------------------------ reads

    def GetStatus(self, request, context):
        def call():
            s = self._target.status()
            if s["state"] not in _STATE_TO_PB:
                raise RuntimeError(f"unknown job state {s['state']!r}; expected one of "
                                   f"{list(JOB_STATES)}")
            return pb.GetStatusResponse(
                job=str(s["job"]), state=_STATE_TO_PB[s["state"]], step=int(s["step"]),
                total_steps=int(s["total_steps"]), policy_version=int(s["policy_version"]),
                rollout_workers=int(s["rollout_workers"]),
                rollouts_per_s=float(s["rollouts_per_s"]), tokens_per_s=float(s["tokens_per_s"]),
                last_step_s=float(s["last_step_s"]), run_dir=str(s["run_dir"]))

        return self._run(context, "GetStatus", call)

    def GetModulatorState(self, request, context):
        def call():
            m = self._target.modulator_state()
            reply = pb.GetModulatorStateResponse(step=int(m["step"]))
            if m.get("reference") is not None:
                reply.reference = float(m["reference"])
            for name, t in (m.get("tasks") or {}).items():
                task = reply.tasks[str(name)]
                task.factor = float(t["factor"])
                task.unclamped_factor = float(t["unclamped_factor"])
                task.signal = float(t["signal"])
                if t.get("signal_ema") is not None:
                    task.signal_ema = float(t["signal_ema"])
                task.batch_share = float(t["batch_share"])
                task.zero_signal_groups = int(t["zero_signal_groups"])
                if t.get("last_update_step") is not None:
                    task.last_update_step = int(t["last_update_step"])
                if t.get("in_batch") is not None:
                    task.in_batch = bool(t["in_batch"])
            return reply

        return self._run(context, "GetModulatorState", call)

    # ------------------------------------------------------------------ actions

    def ScaleRollouts(self, request, context):
        if not request.HasField("workers"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "ScaleRollouts needs 'workers' (the number of rollout workers, >= 1)")
        if request.workers < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"rollout workers must be at least 1, got {request.workers}")
        log.info("control: ScaleRollouts to %d from %s", request.workers, context.peer())

        def call():
            r = self._target.scale_rollouts(int(request.workers))
            return pb.ScaleRolloutsResponse(previous=int(r["previous"]), target=int(r["target"]))

        return self._run(context, "ScaleRollouts", call, grpc.StatusCode.INVALID_ARGUMENT)

    def Checkpoint(self, request, context):
        return self._run_blocking(
            context, "Checkpoint",
            lambda: pb.CheckpointResponse(path=str(self._target.checkpoint())))

    def Pause(self, request, context):
        log.info("control: Pause from %s", context.peer())

        def call():
            self._target.pause()
            return pb.PauseResponse()

        return self._run(context, "Pause", call)

    def Resume(self, request, context):
        log.info("control: Resume from %s", context.peer())

        def call():
            self._target.resume()
            return pb.ResumeResponse()

        return self._run(context, "Resume", call)

    def Stop(self, request, context):
        return self._run_blocking(
            context, "Stop", lambda: pb.StopResponse(checkpoint=str(self._target.stop())))


class ControlServer:
    """The control API of one job: ``start()`` to listen, ``stop(grace)`` when the job ends.

    ``port`` 0 picks a free port; ``start`` returns the bound one and ``address`` is what a client
    should dial (write it to ``RUN_DIR/endpoints.json``). ``token``: see ``resolve_token``.
    ``tls_cert``/``tls_key``: PEM files; given together or not at all. ``run_id``: the run this
    server belongs to, sent with every reply (a fresh one when not given).
    """

    def __init__(self, target: ControlTarget, host: str = "127.0.0.1", port: int = 50051, *,
                 token: str | None = None, tls_cert: str | os.PathLike | None = None,
                 tls_key: str | os.PathLike | None = None, run_id: str | None = None):
        if (tls_cert is None) != (tls_key is None):
            raise ControlConfigError("control.tls_cert and control.tls_key must be given together")
        self.target = target
        self.run_id = run_id or uuid.uuid4().hex
        self.host = host
        self.port = port
        self._token = token or None
        self._tls = (Path(tls_cert), Path(tls_key)) if tls_cert is not None else None
        self._server: grpc.Server | None = None

    @property
    def address(self) -> str:
        return join_host_port(self.host, self.port)

    @property
    def tls(self) -> bool:
        return self._tls is not None

    def start(self) -> int:
        if self._server is not None:
            raise RuntimeError("the control server is already started")
        if not self._token and not is_loopback(self.host):
            raise ControlConfigError(
                f"refusing to serve the control API on {self.host} without a token: anyone who "
                "reaches the port could stop or rescale the job. Set control.token_file (or the "
                "variable named by control.token_env, HARPO_CONTROL_TOKEN by default), or use "
                "control.host: 127.0.0.1")
        credentials = self._credentials()
        interceptors = [_RunIdentity(self.run_id)]
        if self._token:
            interceptors.append(_TokenAuth(self._token))
        server = grpc.server(
            futures.ThreadPoolExecutor(MAX_WORKERS, thread_name_prefix="harpo-control"),
            interceptors=interceptors,
            # without this, a second job on the same port would share it silently (SO_REUSEPORT)
            options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_HarpoControlServicer_to_server(_Servicer(self.target), server)
        wanted = join_host_port(self.host, self.port)
        try:
            if credentials is None:
                port = server.add_insecure_port(wanted)
            else:
                port = server.add_secure_port(wanted, credentials)
        except RuntimeError:  # recent grpc raises where older versions returned 0
            port = 0
        if not port:
            server.stop(None)
            raise ControlConfigError(
                f"cannot listen on {wanted} for the control API (port in use, or not an address "
                "of this machine?); set control.port: 0 for any free port, or null to turn the "
                "control API off")
        server.start()
        self._server, self.port = server, port
        if self._token and not self._tls and not is_loopback(self.host):
            log.warning("control API on %s without TLS: the token travels in clear text "
                        "(set control.tls_cert and control.tls_key)", self.address)
        log.info("control API listening on %s (%s, %s)", self.address,
                 "TLS" if self._tls else "plaintext", "token" if self._token else "no token")
        return port

    def _credentials(self) -> grpc.ServerCredentials | None:
        if self._tls is None:
            return None
        pems = []
        for what, path in zip(("tls_cert", "tls_key"), self._tls):
            try:
                pems.append(path.read_bytes())
            except OSError as exc:
                raise ControlConfigError(f"cannot read control.{what} {path}: "
                                         f"{exc.strerror or exc}") from None
        cert, key = pems
        return grpc.ssl_server_credentials([(key, cert)])

    def stop(self, grace: float | None = 5.0) -> None:
        """Stop listening; calls under way get ``grace`` seconds to answer (a Stop's reply)."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace).wait()
            log.info("control API on %s stopped", self.address)

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
