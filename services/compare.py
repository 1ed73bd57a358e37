"""``harpo compare``: train one configuration with several estimators side by side, then report.

Order of work: every run's configuration is built and checked (``compare_plan``) and the data
and model pass preflight - a bad estimator, parameter or override is refused before anything
is written or started. Then the study directory gets its plan, finished runs are skipped, and
the rest run as separate processes (``services.compare_run``) on one Ray instance: the
cluster's (``--address``) or one embedded instance started here, which every run joins.

Concurrency (``--parallel`` overrides it): on a cluster, as many runs as its CPUs (and GPUs)
hold at once, counting what one run's actors ask for (rollout workers, reward scorers,
learners); on the embedded instance, one run per 2 cores of this machine - a run's stages
(generate, score, learn) take turns, so a run keeps about two cores busy whatever the actors'
logical CPUs say. On a 2-core machine runs go one after another.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

from services.compare_plan import Study, check_against_disk, plan_study, write_plan
from services.compare_run import is_finished

CORES_PER_LOCAL_RUN = 2


def run_resources(config) -> tuple[float, float]:
    """CPUs and GPUs one run's actors ask Ray for."""
    r, s, learner = config.rollout, config.reward, config.learner
    cpus = (r.workers * r.cpus_per_worker + s.scorers * s.cpus_per_scorer
            + learner.workers * learner.cpus_per_worker)
    gpus = r.workers * r.gpus_per_worker + learner.workers * learner.gpus_per_worker
    return cpus, gpus


def concurrency(config, *, embedded: bool, cluster: dict | None, cores: int | None = None
                ) -> int:
    """How many runs go side by side (see the module docstring)."""
    if embedded:
        return max(1, (cores or os.cpu_count() or 1) // CORES_PER_LOCAL_RUN)
    cpus, gpus = run_resources(config)
    fits = [math.floor((cluster or {}).get("CPU", 0.0) / cpus)] if cpus else []
    if gpus:
        fits.append(math.floor((cluster or {}).get("GPU", 0.0) / gpus))
    return max(1, min(fits) if fits else 1)


def _launch(study: Study, run_id: str, address: str, eval_samples: int) -> subprocess.Popen:
    log = open(study.root / "results" / f"{run_id}.log", "a")  # noqa: SIM115 - kept by Popen
    cmd = [sys.executable, "-m", "services.compare_run", str(study.plan_path(run_id)),
           "--result", str(study.result_path(run_id)),
           "--before", str(study.before_path(run_id)),
           "--address", address, "--eval-samples", str(eval_samples)]
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    finally:
        log.close()


def run_study(study: Study, *, address: str | None = None, parallel: int | None = None,
              eval_samples: int = 4, say=print) -> list[str]:
    """Run every unfinished run of ``study``; returns the ids of runs that failed."""
    steps = {run.run_id: study.configs[run.run_id].run.steps for run in study.runs}
    done = [r.run_id for r in study.runs if is_finished(study.result_path(r.run_id),
                                                        steps[r.run_id])]
    pending = [r.run_id for r in study.runs if r.run_id not in done]
    for run_id in done:
        say(f"  {run_id}: finished earlier, kept ({study.result_path(run_id)})")
    if not pending:
        return []
    import ray

    from services.cluster import connect

    embedded = address is None and not ray.is_initialized()
    connect(address)
    gcs = ray.get_runtime_context().gcs_address
    first = study.configs[pending[0]]
    width = parallel or concurrency(first, embedded=embedded, cluster=ray.cluster_resources())
    width = min(width, len(pending))
    say(f"{len(pending)} run(s) to train, {width} at a time (Ray at {gcs}); logs in "
        f"{study.root / 'results'}/RUN.log")
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    failed = []
    try:
        while pending or running:
            while pending and len(running) < width:
                run_id = pending.pop(0)
                running[run_id] = (_launch(study, run_id, gcs, eval_samples), time.time())
                say(f"  {run_id}: started")
            time.sleep(0.5)
            for run_id, (proc, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[run_id]
                ok = proc.returncode == 0 and is_finished(study.result_path(run_id),
                                                          steps[run_id])
                say(f"  {run_id}: {'finished' if ok else 'FAILED'} in {time.time() - t0:.0f} s"
                    + ("" if ok else f" (exit {proc.returncode}; see "
                       f"{study.root / 'results' / run_id}.log)"))
                if not ok:
                    failed.append(run_id)
    except BaseException:
        # Ctrl-C reaches the runs' processes too (one process group): give each a minute to
        # shut its actors down, then stop it. An interrupted run resumes from its checkpoint.
        for proc, _ in running.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait()
        raise
    return failed


def compare(config: str | Path, estimators: str, *, seeds: int = 1, overrides: dict | None = None,
            out: str | Path | None = None, address: str | None = None,
            parallel: int | None = None, eval_samples: int = 4, say=print) -> int:
    """``harpo compare``: plan and check, run what is not finished, write the report."""
    from services.cli_run import check_before_start

    out = out or Path("runs") / f"compare-{Path(config).stem}"
    study = plan_study(config, estimators, seeds, overrides or {}, out)
    check_against_disk(study)
    first = study.configs[study.runs[0].run_id]
    check_before_start(first, resume=False, ports=False, output=False)
    write_plan(study)
    say(f"study {study.root}: {len(study.variants)} estimator(s) x {seeds} seed(s) = "
        f"{len(study.runs)} run(s)")
    failed = run_study(study, address=address, parallel=parallel, eval_samples=eval_samples,
                       say=say)
    from services.compare_report import write_report

    report = write_report(study)
    say(f"report: {report}")
    if failed:
        say(f"{len(failed)} run(s) failed: {', '.join(failed)}; run the same command again to "
            f"retry them (finished runs are kept)")
        return 1
    return 0


def add_parser(sub, override) -> None:
    """``harpo compare``'s arguments (``override``: the CLI's --set parser)."""
    from services.cli_args import positive_int

    p = sub.add_parser(
        "compare", help="train one config with several estimators side by side and report",
        description="Train CONFIG once per estimator (and seed) with the same data, warm start, "
                    "budget and settings, each run a normal run directory under --out; resume "
                    "an interrupted study by running the same command again; write REPORT.md, "
                    "figures and CSV/JSON numbers.")
    p.add_argument("config", help="YAML run configuration shared by every run")
    p.add_argument("--estimators", required=True, metavar="LIST",
                   help="comma-separated estimators, each NAME or NAME:KEY=VALUE[:KEY=VALUE], "
                        "e.g. grpo,harpo,harpo:zero_signal=floor,harpo_on:base=dr_grpo")
    p.add_argument("--seeds", type=positive_int, default=1,
                   help="seeds per estimator (run.seed, run.seed+1, ...)")
    p.add_argument("--set", action="append", type=override, metavar="SECTION.FIELD=VALUE",
                   help="override a config field for every run (repeatable)")
    p.add_argument("--out", default=None,
                   help="study directory (default runs/compare-CONFIG_NAME)")
    p.add_argument("--address", help="Ray cluster address (default: one embedded local Ray)")
    p.add_argument("--parallel", type=positive_int, default=None,
                   help="runs side by side (default: as the cluster's CPUs/GPUs hold them; "
                        "embedded: one per 2 cores)")
    p.add_argument("--eval-samples", type=int, default=4,
                   help="sampled responses per held-out prompt for the sampled reward "
                        "(0: greedy only)")
    p.set_defaults(fn=_cmd_compare)


def _cmd_compare(args) -> int:
    # a refusal before anything runs exits 2 (args.started stays False); a run that fails
    # inside its own process is reported by name and makes the command exit 1
    return compare(args.config, args.estimators, seeds=args.seeds,
                   overrides=dict(args.set or []), out=args.out, address=args.address,
                   parallel=args.parallel, eval_samples=args.eval_samples)
