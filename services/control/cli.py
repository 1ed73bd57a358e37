"""``harpo status | modulator | scale | checkpoint | pause | resume | stop``: talk to a running job.

Each command finds the job with ``--control HOST:PORT``, else ``--run RUN_DIR`` (its
``endpoints.json``), else 127.0.0.1:50051, and prints a short readable answer (``--json`` for
scripts). Errors are ValueErrors, which ``services.cli.main`` prints as ``harpo: error: ...``.

Through ``--run`` a command only ever acts on that run: the run id in endpoints.json goes with
every call and a server of another run refuses it. scale, pause, checkpoint and stop wait for the
step in flight (``--timeout``, default an hour) and say so on stderr while they wait.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from services.cli_args import positive_int  # one argument type for every harpo command

TOKEN_ENV = "HARPO_CONTROL_TOKEN"


def _connect_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("reaching the job")
    g.add_argument("--control", metavar="HOST:PORT",
                   help="the job's control address (default: from --run, else 127.0.0.1:50051)")
    g.add_argument("--run", metavar="RUN_DIR",
                   help="the job's run directory: its endpoints.json names the address")
    g.add_argument("--token-file", metavar="FILE",
                   help=f"file holding the job's control token (default: ${TOKEN_ENV})")
    g.add_argument("--tls-ca", metavar="PEM",
                   help="CA (or self-signed) certificate, when the job serves TLS")
    g.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="give up after this long (default: 10 s for status, modulator and "
                        "resume; 3600 s for scale, pause, checkpoint and stop, which wait for "
                        "the step in flight)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


# ---------------------------------------------------------------------------- plumbing


def _waiting(seconds: float) -> None:
    print(f"... still waiting for the step in flight ({seconds:.0f} s)", file=sys.stderr,
          flush=True)


def _call(args: argparse.Namespace, method: str, *call_args):
    """Connect as the arguments say, make one call, turn auth failures into advice."""
    # gRPC's C core logs failed TLS handshakes to stderr on top of the error we print
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    import grpc

    from services.control import client as control_client
    from services.control.server import resolve_token

    run_id = None
    if args.control:
        address = control_client.resolve_endpoint(args.control, None)
    elif args.run:
        address = control_client.resolve_endpoint(None, args.run)
        run_id = control_client.read_endpoints(args.run).get("run_id")
    else:
        address = control_client.DEFAULT_ADDRESS
    token = resolve_token(args.token_file, TOKEN_ENV)
    # read at each call, so a test can shorten them
    timeout = args.timeout if args.timeout is not None else control_client.DEFAULT_TIMEOUT
    wait = args.timeout if args.timeout is not None else control_client.DEFAULT_WAIT_TIMEOUT
    with control_client.ControlClient(
            address, token=token, tls_ca=args.tls_ca, timeout=timeout, wait_timeout=wait,
            run_id=run_id, run_dir=args.run, on_wait=_waiting,
            progress_every=control_client.PROGRESS_EVERY) as client:
        try:
            return getattr(client, method)(*call_args)
        except control_client.ControlError as exc:
            if exc.code == grpc.StatusCode.UNAUTHENTICATED:
                hint = ("give the job's token with --token-file FILE or $" + TOKEN_ENV
                        if token is None else "check the token given")
                raise control_client.ControlError(f"{exc} ({hint})", exc.code) from None
            raise


def _emit(args: argparse.Namespace, data, text: str) -> int:
    print(json.dumps(data, indent=1, sort_keys=True) if args.json else text)
    return 0


def format_status(s: dict) -> str:
    rows = [("job", s["job"]), ("state", s["state"]),
            ("step", f"{s['step']}/{s['total_steps']}"),
            ("policy version", s["policy_version"]),
            ("rollout workers", s["rollout_workers"]),
            ("rollouts/s", f"{s['rollouts_per_s']:.2f}"),
            ("tokens/s", f"{s['tokens_per_s']:.1f}"),
            ("last step", f"{s['last_step_s']:.2f} s"),
            ("run dir", s["run_dir"])]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def _num(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def format_modulator(m: dict) -> str:
    reference = _num(m["reference"], ".4g")
    head = f"modulator after step {m['step']} (reference signal {reference})"
    if not m["tasks"]:
        return (f"{head}\nno per-task state: the estimator is not harpo, or no step has run "
                "yet")
    columns = ("task", "factor", "unclamped", "signal", "signal ema", "batch share",
               "zero-signal groups")
    full = any("last_update_step" in t for t in m["tasks"].values())  # harpo's trainer says
    if full:
        columns += ("last update",)
    rows = []
    for name, t in sorted(m["tasks"].items()):
        here = t.get("in_batch", True)  # signal, share and zero groups are this batch's
        row = (name, _num(t["factor"]), _num(t["unclamped_factor"]),
               _num(t["signal"], ".4g") if here else "-", _num(t["signal_ema"], ".4g"),
               _num(t["batch_share"]) if here else "-",
               str(t["zero_signal_groups"]) if here else "-")
        if full:
            step = t.get("last_update_step")
            row += ("-" if step is None else f"step {step}",)
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [columns, *rows]) for i in range(len(columns))]

    def line(cells):
        return "  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
                         for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [head, line(columns), *(line(r) for r in rows)]
    if full:
        lines.append("(- in signal, batch share, zero-signal groups: not in this step's batch)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- commands


def cmd_status(args: argparse.Namespace) -> int:
    s = _call(args, "status")
    return _emit(args, s, format_status(s))


def cmd_modulator(args: argparse.Namespace) -> int:
    m = _call(args, "modulator_state")
    return _emit(args, m, format_modulator(m))


def _announce(what: str) -> None:
    print(what, file=sys.stderr, flush=True)


def cmd_scale(args: argparse.Namespace) -> int:
    _announce(f"asking for {args.rollout} rollout workers; waiting for the step in flight...")
    r = _call(args, "scale_rollouts", args.rollout)
    return _emit(args, r, f"rollout workers: {r['previous']} -> {r['target']}")


def cmd_checkpoint(args: argparse.Namespace) -> int:
    _announce("waiting for the step in flight, then for the checkpoint to be written...")
    r = _call(args, "checkpoint")
    return _emit(args, r, f"checkpoint written: {r['path']}")


def cmd_pause(args: argparse.Namespace) -> int:
    _announce("pausing: waiting for the step in flight...")
    _call(args, "pause")
    return _emit(args, {"state": "paused"}, "paused (continue with: harpo resume)")


def cmd_resume(args: argparse.Namespace) -> int:
    _call(args, "resume")
    return _emit(args, {"state": "running"}, "resumed")


def cmd_stop(args: argparse.Namespace) -> int:
    if args.job is not None:
        if args.control or args.run:
            raise ValueError("give either a JOB id (stops a submitted Ray job) or --control/--run "
                             "(stops a job through its control API), not both")
        from services.jobs import stop_job

        result = stop_job(args.address, args.job)
        text = result if isinstance(result, str) and result else f"stopped job {args.job}"
        return _emit(args, {"job": args.job, "result": result}, text)
    if args.address:
        raise ValueError("--address (a Ray dashboard) only goes with a JOB id; without one, stop "
                         "reaches the job through its control API (--control or --run)")
    _announce("waiting for the job to finish its step and write its last checkpoint...")
    r = _call(args, "stop")
    return _emit(args, r, f"stopped; final checkpoint: {r['checkpoint']}")


# ---------------------------------------------------------------------------- parsers


def add_parsers(subparsers) -> None:
    """Register the control commands on ``harpo``'s subparsers."""
    common = [_connect_args()]

    def add(name: str, help_text: str, fn, description: str | None = None):
        p = subparsers.add_parser(name, parents=common, help=help_text,
                                  description=description or help_text)
        p.set_defaults(fn=fn)
        return p

    add("status", "state, progress and throughput of a running job", cmd_status)
    add("modulator", "per-task HARPO factors and signals of a running job", cmd_modulator,
        "The modulator's state for every task it holds state for (factor, unclamped factor, "
        "signal EMA, the step of its last update), and this step's signal and batch share for "
        "the tasks in the last batch.")
    p = add("scale", "resize a running job's rollout worker pool", cmd_scale)
    p.add_argument("--rollout", type=positive_int, required=True, metavar="N",
                   help="rollout workers to run")
    add("checkpoint", "write a checkpoint of a running job now", cmd_checkpoint,
        "Write a checkpoint now; returns once it is on disk.")
    add("pause", "hold a running job before its next step", cmd_pause)
    add("resume", "continue a paused job", cmd_resume)
    p = add("stop", "stop a job gracefully (finish the step, checkpoint, exit)", cmd_stop,
            "Stop a job gracefully: it finishes its current step, writes a checkpoint and exits. "
            "Without JOB, through the job's control API; with JOB, a job submitted to a Ray "
            "cluster is stopped through the cluster's job API.")
    p.add_argument("job", nargs="?", help="id of a job submitted to a Ray cluster")
    p.add_argument("--address", metavar="URL",
                   help="Ray dashboard URL, with JOB (e.g. http://127.0.0.1:8265)")
