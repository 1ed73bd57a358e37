"""The ``harpo`` command line."""

from __future__ import annotations

import argparse
import sys


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _cmd_simulate(args: argparse.Namespace) -> int:
    from harpo_core import HarpoConfig
    from services.simulate import format_table, simulate

    config = HarpoConfig(zero_signal=args.zero_signal)
    print(f"HARPO on synthetic rewards: {args.steps} steps, groups of {args.group_size}, "
          f"zero_signal={args.zero_signal}\n")
    rows = simulate(steps=args.steps, group_size=args.group_size, seed=args.seed, config=config)
    print(format_table(rows))
    print("\nTasks whose groups rarely carry signal (near-solved or hopeless) are scaled up; "
          "the rest down.\nThe overall step size is "
          "unchanged\n(the sum of log task factors stays near 0).")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    # The full pipeline demo arrives with the Ray pipeline; until then it is the simulation.
    return _cmd_simulate(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harpo",
        description="HARPO: heterogeneity-aware RL post-training for multi-task LLMs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, fn, help_text in [
        ("simulate", _cmd_simulate, "run the HARPO modulator on synthetic rewards"),
        ("demo", _cmd_demo, "the embedded default run (no GPU, no network)"),
    ]:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--steps", type=_positive_int, default=200, help="steps to simulate (default 200)")
        p.add_argument("--group-size", type=_positive_int, default=5, help="rollouts per prompt")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--zero-signal", choices=["exclude", "floor"], default="exclude")
        p.set_defaults(fn=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ValueError as exc:
        print(f"harpo: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
