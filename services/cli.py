"""The ``harpo`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from services.cli_args import port_number, positive_int


def _suite_name(text: str) -> str:
    """``argparse`` type of ``init-tiny --suite``: a suite of ``services.tiny.suites``."""
    from services.tiny.suites import check_suite

    try:
        return check_suite(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _override(text: str) -> tuple[str, object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected SECTION.FIELD=VALUE, got {text!r}")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise argparse.ArgumentTypeError(
            f"{text!r}: the value {value!r} is not valid YAML ({problem}); quote a string, "
            f"e.g. --set '{key}=\"{value}\"'") from None


# ---------------------------------------------------------------------------- commands


def _cmd_simulate(args: argparse.Namespace) -> int:
    from harpo_core import HarpoConfig
    from services.simulate import format_table, simulate

    config = HarpoConfig(zero_signal=args.zero_signal)
    print(f"HARPO on synthetic rewards: {args.steps} steps, groups of {args.group_size}, "
          f"zero_signal={args.zero_signal}\n")
    rows = simulate(steps=args.steps, group_size=args.group_size, seed=args.seed, config=config)
    print(format_table(rows))
    print("\nTasks whose groups rarely carry signal (near-solved or hopeless) are scaled up; "
          "the rest down.\nThe overall step size is unchanged\n"
          "(the sum of log task factors stays near 0).")
    return 0


def _load_train_config(args: argparse.Namespace):
    from services.config import load_config, load_config_text

    overrides = dict(args.set or [])
    if getattr(args, "config_env", None):
        if args.config or args.resume:
            raise ValueError("--config-env replaces CONFIG and --resume; give only one")
        from services.jobs import config_from_env

        text = config_from_env(args.config_env)
        return load_config_text(text, f"${args.config_env}", Path.cwd(), overrides)
    if args.resume:
        run_config = Path(args.resume) / "config.yaml"
        if args.config:
            raise ValueError("give either CONFIG or --resume RUN_DIR, not both "
                             "(a resumed run keeps the configuration it was started with)")
        if run_config.is_file():
            return _resumed(args, load_config(run_config, overrides), overrides)
        from services.checkpoint_uri import stored_config

        stored = stored_config(overrides)  # the run directory lost: its checkpoint_uri's copy
        if stored is None:
            raise FileNotFoundError(f"{args.resume} is not a run directory (no config.yaml)")
        text, source = stored
        return _resumed(args, load_config_text(text, source, Path(args.resume), overrides),
                        overrides)
    if not args.config:
        raise ValueError("harpo train needs a CONFIG file (or --resume RUN_DIR)")
    return load_config(args.config, overrides)


# ---- run-directory ownership (services/run_owner.py): before Ray starts, nothing changes


def _resumed(args: argparse.Namespace, config, overrides: dict):
    """``--resume RUN_DIR`` trains RUN_DIR (a copied run names the original's directory)."""
    from services.run_owner import resumed_config

    config, args.resume_note = resumed_config(config, args.resume, overrides)
    return config


def _cmd_train(args: argparse.Namespace) -> int:
    from services.checkpoint_uri import with_env_uri

    config = with_env_uri(_load_train_config(args))  # $HARPO_CHECKPOINT_URI, unless set
    from services.run_owner import claim_and_check

    resume, lock = claim_and_check(config, resume=bool(args.resume), overwrite=args.overwrite,
                                   job=getattr(args, "config_env", None) is not None,
                                   note=getattr(args, "resume_note", None))
    with lock:
        return _train(args, config, resume)


def _train(args: argparse.Namespace, config, resume: bool) -> int:
    from services.cli_run import StopSignals, report_train

    print("# resolved configuration\n" + config.to_yaml(), flush=True)
    from services.cluster import connect

    args.started = True
    connect(args.address, survive_group_sigterm=True)
    from services.controller import Trainer
    from services.run_owner import record_config

    trainer = Trainer(config, resume=resume)
    record_config(trainer, resume=resume, overrides=dict(args.set or []),
                  note=getattr(args, "resume_note", None))
    # SIGINT (Ctrl-C) and SIGTERM (a Kubernetes pod eviction, `ray job stop`) stop
    # gracefully: the step in flight finishes and a checkpoint is written, as with
    # `harpo stop`; a second signal aborts.
    with StopSignals(trainer.control, trainer.run_dir.checkpoints) as signals:
        for name, address in trainer.endpoints.addresses.items():
            print(f"{name} endpoint: {address}", flush=True)
        try:
            rows = trainer.run()
        except KeyboardInterrupt:  # a second signal: abort now, Ray's exit hook ends the actors
            raise
        except BaseException:
            trainer.shutdown()
            raise
        trainer.shutdown()
    return report_train(config, trainer, rows, signals)


def _cmd_eval(args: argparse.Namespace) -> int:
    config = _load_train_config(args)
    from services.run_owner import lock_for_reading, warn

    lock = lock_for_reading(args.resume)  # None: a CONFIG's model, no run directory read
    warn(getattr(args, "resume_note", None), sys.stderr)  # stdout is the result
    try:
        return _eval(args, config)
    finally:
        if lock is not None:
            lock.release()


def _eval(args: argparse.Namespace, config) -> int:
    """Read-only: ``Trainer(mode="eval")`` writes nothing into the run directory; the result
    goes to stdout only."""
    import json

    from services.cli_run import check_before_start, format_eval

    config = config.model_copy(update={
        "observability": config.observability.model_copy(update={"metrics_port": None}),
        "control": config.control.model_copy(update={"port": None}),
    })
    plan = check_before_start(config, resume=bool(args.resume),
                              splits=(args.split or config.data.eval_split,), ports=False,
                              quiet=args.json)
    from services.cluster import connect

    args.started = True
    connect(args.address)
    from services.controller import Trainer

    trainer = Trainer(config, resume=bool(args.resume), mode="eval")
    try:
        result = trainer.evaluate(split=args.split, per_task=args.per_task)
    finally:
        trainer.shutdown()
    if args.json:
        print(json.dumps(result, indent=1, sort_keys=True))
        return 0
    evaluated = plan.checkpoint or f"{plan.model_dir} (model.path, untrained)"
    print(f"evaluated {evaluated} on split {args.split or config.data.eval_split!r}\n"
          + format_eval(result))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    """The memory plan of CONFIG (services/plan.py); nothing starts. Exit 2 when it cannot
    fit, as harpo train would refuse it."""
    from services.config import load_config
    from services.plan import plan_memory
    from services.preflight import _physical_memory

    config = load_config(args.config, dict(args.set or []))
    plan = plan_memory(config, host_memory=_physical_memory())
    print(plan.table(), flush=True)
    plan.check()
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from services import jobs

    config = _load_train_config(args)  # validated here, before the cluster spends anything
    job = jobs.submit(config, args.address, working_dir=args.working_dir, job_id=args.job_id)
    print(f"submitted job {job} to {jobs.dashboard_address(args.address)}", flush=True)
    if not args.follow:
        print(f"follow it with: harpo logs {job} --address {jobs.dashboard_address(args.address)}")
        return 0
    state = jobs.follow(job, args.address)
    print(f"job {job}: {state}")
    return 0 if state == "SUCCEEDED" else 1


def _cmd_logs(args: argparse.Namespace) -> int:
    from services import jobs

    if not args.follow:
        sys.stdout.write(jobs.logs(args.job, args.address))
        print(f"job {args.job}: {jobs.status(args.job, args.address)}")
        return 0
    state = jobs.follow(args.job, args.address)
    print(f"job {args.job}: {state}")
    return 0 if state == "SUCCEEDED" else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from services.run_lock import hold

    if args.omni:
        args.workdir = args.workdir or "runs/demo-omni"
        with hold(args.workdir, Path(args.workdir) / "run"):
            from services.demo_omni import EVAL_PROMPTS, RL_STEPS, SFT_STEPS, run_omni_demo

            run_omni_demo(args.workdir, steps=args.steps or RL_STEPS,
                          sft_steps=args.sft_steps or SFT_STEPS, sft_seconds=args.sft_seconds,
                          eval_prompts=args.eval_prompts or EVAL_PROMPTS, address=args.address,
                          endpoints={"metrics_host": args.metrics_host,
                                     "metrics_port": args.metrics_port,
                                     "control_host": args.control_host,
                                     "control_port": args.control_port})
        return 0
    args.workdir = args.workdir or "runs/demo"
    with hold(args.workdir, Path(args.workdir) / "run"):  # refused before the imports below
        from services.demo import EVAL_PROMPTS, RL_STEPS, SFT_STEPS, run_demo

        # the defaults live in services/demo.py, imported only when the command runs
        run_demo(args.workdir, steps=args.steps or RL_STEPS,
                 sft_steps=args.sft_steps or SFT_STEPS, sft_seconds=args.sft_seconds,
                 eval_prompts=args.eval_prompts or EVAL_PROMPTS, address=args.address,
                 endpoints={"metrics_host": args.metrics_host, "metrics_port": args.metrics_port,
                            "control_host": args.control_host,
                            "control_port": args.control_port})
    return 0


def _cmd_init_tiny(args: argparse.Namespace) -> int:
    from services.cli_run import check_init_tiny_out
    from services.tiny.model import init_tiny

    check_init_tiny_out(args.out)
    if args.omni and args.suite != "default":
        raise ValueError(f"init-tiny: --omni builds the image/audio/video suite; --suite "
                         f"{args.suite} is a text suite (leave out one of them)")
    if args.omni:
        from services.tiny.omni_model import init_tiny_omni

        assets = init_tiny_omni(args.out, seed=args.seed,
                                n_train_per_task=args.train_per_task or 200,
                                n_test_per_task=args.test_per_task or 50)
        print(f"model: {assets.model_dir} (Qwen2.5-Omni thinker)\n"
              f"data:  {assets.data_dir} (HBA format: data.format: hba)")
        return 0

    assets = init_tiny(args.out, seed=args.seed, n_train_per_task=args.train_per_task or 2000,
                       n_test_per_task=args.test_per_task or 100, suite=args.suite)
    print(f"model: {assets.model_dir}\ndata:  {assets.data_dir}")
    custom = json.loads((assets.data_dir / "suite.json").read_text()).get("reward_custom")
    if custom:
        print(f"its custom rewards: reward.custom: {json.dumps(custom)}")
    return 0


def _cmd_sft(args: argparse.Namespace) -> int:
    from services.cli_run import check_sft_args
    from services.run_lock import hold

    check_sft_args(args.model, args.data, args.out)  # before the model is loaded
    with hold(args.out):  # refused before torch is imported
        from services.tiny.sft import sft

        metrics = sft(args.model, args.data, args.out, steps=args.steps,
                      max_seconds=args.seconds, lr=args.lr, progress=True)
    print(f"sft: {metrics['steps']} steps in {metrics['train_seconds']:.1f} s on "
          f"{metrics['examples']} examples; loss {metrics['loss_first']:.4f} -> "
          f"{metrics['loss_last']:.4f}" + (" (stopped early by --seconds)"
                                           if metrics["stopped_early"] else "")
          + f"\nmodel saved to {args.out} (metrics: {Path(args.out) / 'sft_metrics.json'})")
    return 0


# ---------------------------------------------------------------------------- parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each default, except where there is none (None, False) or the help
    text already names it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """CONFIG, --resume, --address and --set: how train and eval name their run."""
    p.add_argument("config", nargs="?", help="YAML run configuration")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a run from its latest valid checkpoint")
    p.add_argument("--address", help="Ray cluster address (default: embedded local Ray)")
    p.add_argument("--set", action="append", type=_override, metavar="SECTION.FIELD=VALUE",
                   help="override a config field, e.g. --set run.steps=50 (repeatable)")
    p.add_argument("--config-env", metavar="VAR", help=argparse.SUPPRESS)  # harpo submit


def _add_local_commands(sub) -> None:
    """demo, init-tiny, sft and simulate: what runs on this machine without a config."""
    p = sub.add_parser("demo", help="the embedded default run: tiny model, SFT, HARPO RL",
                       description="Build a tiny model and task suite, warm-start it, train "
                                   "it with HARPO on local Ray, and report per-task results.")
    p.add_argument("--workdir", default=None,
                   help="where assets and the run go (default runs/demo; runs/demo-omni with "
                        "--omni)")
    p.add_argument("--omni", action="store_true",
                   help="the tiny Qwen2.5-Omni thinker on the text/image/audio/video suite, "
                        "with a media-aware warm start (services/demo_omni.py)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="RL steps (default 40, services/demo.py RL_STEPS; 30 with --omni)")
    p.add_argument("--sft-steps", type=positive_int, default=None,
                   help="steps of the supervised warm start (default 300, services/demo.py "
                        "SFT_STEPS; 80 with --omni); the same steps give the same model")
    p.add_argument("--sft-seconds", type=float, default=None,
                   help="optional safety cap on the warm start's time (a capped run is not "
                        "reproducible)")
    p.add_argument("--eval-prompts", type=positive_int, default=None, metavar="N",
                   help="held-out prompts per task in the before/after table (default 100, "
                        "services/demo.py EVAL_PROMPTS; 50 with --omni); fewer for a quick look")
    p.add_argument("--address", help="Ray cluster address (default: embedded local Ray)")
    for name, what in (("metrics", "the Prometheus endpoint"), ("control", "the control API")):
        p.add_argument(f"--{name}-port", type=port_number, default=None, metavar="PORT",
                       help=f"port of {what} (default 0: any free port, shown at start)")
        p.add_argument(f"--{name}-host", default=None, metavar="HOST",
                       help=f"address {what} binds to (default 127.0.0.1)")
    p.set_defaults(fn=_cmd_demo)

    p = sub.add_parser("init-tiny", help="build a tiny Qwen2 model and the synthetic task suite")
    p.add_argument("out", help="output directory (model/ and data/ go inside)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and the data")
    p.add_argument("--train-per-task", type=positive_int, default=None,
                   help="train prompts per task (default 2000; 200 with --omni)")
    p.add_argument("--test-per-task", type=positive_int, default=None,
                   help="test prompts per task (default 100; 50 with --omni)")
    p.add_argument("--omni", action="store_true",
                   help="a tiny Qwen2.5-Omni thinker and the image/audio/video suite (HBA "
                        "format) instead of the text model and suite")
    p.add_argument("--suite", type=_suite_name, default="default",
                   help="text task suite: default (the demo's) or imbalance (tasks built to "
                        "expose multi-task imbalance, docs/imbalance_suite.md)")
    p.set_defaults(fn=_cmd_init_tiny)

    p = sub.add_parser("sft", help="supervised warm start on a suite's train split")
    p.add_argument("--model", required=True, help="model directory (HF format)")
    p.add_argument("--data", required=True, help="data directory (parquet shards)")
    p.add_argument("--out", required=True, help="where the fine-tuned model goes")
    p.add_argument("--steps", type=positive_int, default=600, help="optimizer steps")
    p.add_argument("--seconds", type=float, default=None,
                   help="optional safety cap: stop after this many seconds (the lr schedule "
                        "follows --steps, so a capped run is not reproducible)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.set_defaults(fn=_cmd_sft)

    for name, help_text in [("simulate", "run the HARPO modulator on synthetic rewards")]:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--steps", type=positive_int, default=200,
                       help="steps to simulate")
        p.add_argument("--group-size", type=positive_int, default=5,
                       help="rollouts per prompt")
        p.add_argument("--seed", type=int, default=0, help="random seed")
        p.add_argument("--zero-signal", choices=["exclude", "floor"], default="exclude",
                       help="how groups without signal count")
        p.set_defaults(fn=_cmd_simulate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harpo",
        description="HARPO: heterogeneity-aware RL post-training for multi-task LLMs.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"harpo {_version()}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also after the command)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train with a YAML config",
                       description="Train with a YAML config on embedded Ray or a cluster.")
    _add_run_args(p)
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a directory that holds one: the old run is moved "
                        "to RUN_DIR.old-YYYYmmdd-HHMMSS (nothing is deleted)")
    p.set_defaults(fn=_cmd_train)

    p = sub.add_parser("submit", help="submit a training job to a Ray cluster (Jobs API)",
                       description="Validate CONFIG here, then run `harpo train` on a Ray "
                                   "cluster through its Job Submission API.")
    p.add_argument("config", help="YAML run configuration (paths in it are cluster paths)")
    p.add_argument("--address", help="Ray dashboard address (default $RAY_ADDRESS or "
                                     "http://127.0.0.1:8265)")
    p.add_argument("--working-dir", help="a local directory to ship with the job")
    p.add_argument("--job-id", help="submission id (default: Ray picks one)")
    p.add_argument("--follow", action="store_true", help="stream the logs until the job ends")
    p.add_argument("--set", action="append", type=_override, metavar="SECTION.FIELD=VALUE",
                   help="override a config field (repeatable)")
    p.set_defaults(fn=_cmd_submit, resume=None, config_env=None)

    p = sub.add_parser("logs", help="print (or --follow) a submitted job's logs")
    p.add_argument("job", help="job id printed by harpo submit")
    p.add_argument("--address", help="Ray dashboard address")
    p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    p.set_defaults(fn=_cmd_logs)

    p = sub.add_parser("eval", help="held-out reward per task of a config's model or a run",
                       description="Held-out evaluation per task: greedy by default; the "
                                   "policy's sampled reward with --set data.eval_temperature=T "
                                   "--set data.eval_samples=K.")
    _add_run_args(p)
    p.add_argument("--split", default=None, help="data split (default: data.eval_split)")
    p.add_argument("--per-task", type=positive_int, default=None, help="prompts per task")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(fn=_cmd_eval)

    p = sub.add_parser("plan", help="per-rank memory of a config's learners and rollout "
                                     "engines; refuses what cannot fit",
                       description="Estimate the memory of one learner rank and one rollout "
                                   "engine from the model's config.json and CONFIG, compare "
                                   "it with the device memory (learner.device_memory_gib, "
                                   "rollout.vllm.device_memory_gib) and say what to change; "
                                   "starts nothing.")
    p.add_argument("config", help="YAML run configuration")
    p.add_argument("--set", action="append", type=_override, metavar="SECTION.FIELD=VALUE",
                   help="override a config field, e.g. --set learner.strategy=fsdp2 "
                        "(repeatable)")
    p.set_defaults(fn=_cmd_plan)

    _add_local_commands(sub)
    from services.compare import add_parser as add_compare

    add_compare(sub, _override)

    from services.control.cli import add_parsers  # status, modulator, scale, ..., stop

    add_parsers(sub)
    for command in sub.choices.values():  # --debug after the command too; defaults in --help
        command.formatter_class = _HelpFormatter
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of an error")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("harpo")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    from services.cluster import apply_env_defaults

    apply_env_defaults()  # before torch is imported: some settings are read at import
    args = build_parser().parse_args(argv)
    args.started = False  # set by a command once Ray starts: failures after it exit 1
    try:
        return args.fn(args)
    except KeyboardInterrupt as exc:  # Ctrl-C before the run's handlers, or a second one
        name = str(exc) or "SIGINT"
        print(f"harpo: aborted by {name}; the checkpoints already written are intact",
              file=sys.stderr, flush=True)
        return 143 if name == "SIGTERM" else 130
    except Exception as exc:  # noqa: BLE001 - explain() re-raises what it cannot explain
        from services.cli_run import report_error

        return report_error(exc, started=args.started, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
