"""Issue 16's scale benchmark in one run: the three measurements side by side, each against
its target.

* ``memory`` (:mod:`benchmarks.scale_memory`): per-rank learner bytes of a ~100M-parameter
  Qwen2-shaped model on 2 ranks over gloo — ``fsdp2`` against ``ddp``, ``bfloat16`` against
  ``float32``, bf16 learner state against float32 state (targets: fsdp2 <= 0.55x ddp, bf16
  <= 0.6x fp32);
* ``logprobs`` (:mod:`benchmarks.scale_logprobs`): peak memory of the log-prob + backward step
  with and without ``learner.logprob_chunk_tokens`` as the sequence grows (target: chunked
  flat, unchunked linear);
* ``sync`` (:mod:`benchmarks.scale_sync`): seconds per GB of a weight sync through
  ``collective`` and ``object_store`` against a raw in-memory copy of the same bytes
  (target: collective <= 2x the raw copy).

Each part keeps its own options (run ``python benchmarks/scale_X.py --help``); this driver runs
them with their defaults, prints each part's table, then one line per target with the measured
ratio and whether it was met. A benchmark, not a test: nothing here asserts.

    python benchmarks/scale.py [--parts memory logprobs sync] [--json rows.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import scale_logprobs, scale_memory, scale_sync  # noqa: E402

PARTS = ("memory", "logprobs", "sync")


def _defaults(add_arguments) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([])


def memory() -> tuple[list[dict], str, list[tuple[str, float, float]]]:
    rows = scale_memory.run(_defaults(scale_memory.add_arguments))
    by = {(r["strategy"], r["dtype"], r["master"]): r for r in rows}
    held = {key: r["held"] for key, r in by.items()}
    targets = [
        ("fsdp2 / ddp, state held between steps (fp32)",
         held[("fsdp2", "float32", "fp32")] / held[("ddp", "float32", "fp32")], 0.55),
        ("fsdp2 / ddp, peak with gathered copies (fp32)",
         by[("fsdp2", "float32", "fp32")]["vs_ddp"], 0.55),
        ("bf16 / fp32, state held between steps (fsdp2)",
         held[("fsdp2", "bfloat16", "fp32")] / held[("fsdp2", "float32", "fp32")], 0.6),
        ("bf16 / fp32, peak with gathered copies (fsdp2)",
         by[("fsdp2", "bfloat16", "fp32")]["vs_fp32"], 0.6),
    ]
    for strategy in ("ddp", "fsdp2"):  # bf16 state (learner.master_weights), when measured
        low = by.get((strategy, "bfloat16", "bf16sr"))
        if low is not None:
            targets += [
                (f"bf16 state (stochastic rounding) / fp32, held between steps ({strategy})",
                 low["held"] / held[(strategy, "float32", "fp32")], 0.6),
                (f"bf16 state (stochastic rounding) / fp32, peak with gathered copies "
                 f"({strategy})", low["vs_fp32"], 0.6),
            ]
    return rows, scale_memory.table(rows), targets


def logprobs() -> tuple[list[dict], str, list[tuple[str, float, float]]]:
    rows = scale_logprobs.run(_defaults(scale_logprobs.add_arguments))
    full = sorted((r["length"], r["step_peak_mb"]) for r in rows if not r["chunk"])
    chunked = sorted((r["length"], r["step_peak_mb"]) for r in rows if r["chunk"])
    length_ratio = full[-1][0] / full[0][0]
    targets = [  # growth of the peak from the shortest to the longest sequence
        (f"unchunked peak growth over {length_ratio:g}x the tokens (linear: ~{length_ratio:g})",
         full[-1][1] / full[0][1], float("inf")),
        (f"chunked peak growth over {length_ratio:g}x the tokens (flat: ~1)",
         chunked[-1][1] / chunked[0][1], 1.25),
    ]
    return rows, scale_logprobs.format_rows(rows), targets


def sync() -> tuple[list[dict], str, list[tuple[str, float, float]]]:
    rows = scale_sync.run(scale_sync.parse_args([]))
    lines = [f"{'receivers':>9}  {'transport':<13} {'s/GB':>8}  {'x raw copy':>10}"]
    lines += [f"{r['receivers']:>9}  {r['transport']:<13} {r['s_per_gb']:>8.3f}  "
              f"{r['x_raw']:>10.2f}" for r in rows]
    targets = [(f"collective / raw copy, {r['receivers']} receiver(s)", r["x_raw"], 2.0)
               for r in rows if r["transport"] == "collective"]
    # gloo over loopback TCP is this machine's floor for the collective transport
    targets += [(f"collective / bare gloo broadcast, {r['receivers']} receiver(s)",
                 r["x_gloo"], 2.0) for r in rows if r["transport"] == "collective"]
    targets += [(f"collective / object_store, {r['receivers']} receiver(s)",
                 r["s_per_gb"] / o["s_per_gb"], 1.0)
                for r in rows if r["transport"] == "collective"
                for o in rows if o["transport"] == "object_store"
                and o["receivers"] == r["receivers"]]
    return rows, "\n".join(lines), targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--json", help="also write every part's rows here")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f}")
    results, summary = {}, []
    for name in args.parts:
        t0 = time.perf_counter()
        rows, table, targets = globals()[name]()
        results[name] = rows
        summary += targets
        print(f"\n## {name} ({time.perf_counter() - t0:.0f} s)\n{table}")
    print("\n## targets")
    for label, value, limit in summary:
        verdict = "" if limit == float("inf") else ("  met" if value <= limit else "  NOT met")
        bound = "" if limit == float("inf") else f" (target <= {limit:g})"
        print(f"{label}: {value:.2f}{bound}{verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
