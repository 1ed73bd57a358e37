"""``harpo compare``'s report: REPORT.md, PNG figures and the numbers as CSV/JSON.

Everything is read back from the study directory (each run's ``results/RUN.json`` and its run
directory's ``metrics.jsonl``), so the report can be rewritten at any time from what is on
disk. Numbers, per estimator (variant) over its finished seeds:

* ``per_task.csv``: per task x estimator x evaluation (greedy / sampled) x metric (reward /
  accuracy), the held-out value before and after training, mean and sample std over seeds;
* ``summary.csv``: the paper's Table 1 form - the score per task after training (the primary
  metric: sampled reward when the study sampled, else greedy reward), the mean over tasks, the
  worst task's score, the average rank over tasks (1 = best; ties share ranks), and the
  max/min ratio of the tasks' signal shares;
* ``signal_share.csv``: each task's share of the policy-gradient signal (``Σ|A|`` of its
  rollouts ÷ ``Σ|A|`` of the batch), averaged over steps and seeds, first and last step too;
* ``curves.csv``: per step, task, estimator and seed the training reward, signal share and
  (for estimators that report one) task factor: HARPO's ``s_m``, or mt_grpo's weight ``w_m``.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from services.compare_plan import Study
from services.compare_run import is_finished

REPORT = "REPORT.md"
FIGURES = ("reward_curves.png", "signal_shares.png", "factors.png", "before_after.png")
PER_TASK_COLUMNS = ("estimator", "task", "evaluation", "metric", "seeds", "before_mean",
                    "before_std", "after_mean", "after_std", "change_mean")
SUMMARY_COLUMNS = ("estimator", "seeds", "primary_metric", "mean_score", "worst_task",
                   "worst_score", "average_rank", "max_min_share_ratio")
SHARE_COLUMNS = ("estimator", "task", "seeds", "share_mean", "share_first_step",
                 "share_last_step")
CURVE_COLUMNS = ("estimator", "seed", "step", "task", "reward", "signal_share", "task_factor")


def _stats(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (NaN with one value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1 else math.nan)


def _shares(row: dict) -> dict[str, float]:
    """A metrics row's signal shares (older rows: from mean |A| and batch share)."""
    if "signal_share" in row:
        return row["signal_share"]
    mass = {t: row["advantage_abs_mean"].get(t, 0.0) * share
            for t, share in row.get("batch_share", {}).items()}
    total = sum(mass.values())
    return {t: (m / total if total > 0 else 0.0) for t, m in mass.items()}


def _factors(row: dict) -> dict[str, float]:
    """A metrics row's per-task factors: HARPO's ``task_factor``, or the task weights another
    estimator applied (``task_weight``: mt_grpo's ``w_m``); empty for neither."""
    return row.get("task_factor") or row.get("task_weight") or {}


# Scores this close are one score: two estimators that reach the same held-out answers can
# differ in the last bits of a mean (the similarity reward's embeddings vary with the batch),
# and a rank must not split them.
TIE_TOLERANCE = 1e-9
# A share below this fraction of the largest is no signal at all (float dust of a sum of
# advantages that cancel): the max/min ratio is then reported as unbounded, not as 1e16.
NO_SIGNAL = 1e-9


def _ranks(scores: dict[str, float]) -> dict[str, float]:
    """Rank 1 = highest score; tied scores (within ``TIE_TOLERANCE``) share the mean of their
    ranks."""
    ordered = sorted(scores.values(), reverse=True)
    return {k: float(np.mean([i + 1 for i, s in enumerate(ordered)
                              if math.isclose(s, v, rel_tol=TIE_TOLERANCE,
                                              abs_tol=TIE_TOLERANCE)]))
            for k, v in scores.items()}


def _share_ratio(shares: list[float]) -> float:
    """Largest ÷ smallest share; unbounded when a task's share is no signal (``NO_SIGNAL``)."""
    hi, lo = max(shares, default=0.0), min(shares, default=0.0)
    return hi / lo if lo > NO_SIGNAL * hi else math.inf


def collect(study: Study) -> dict:
    """Every finished run's results and metric rows, grouped by estimator label."""
    runs: dict[str, list[dict]] = defaultdict(list)
    missing = []
    for run in study.runs:
        steps = study.configs[run.run_id].run.steps
        path = study.result_path(run.run_id)
        if not is_finished(path, steps):
            missing.append(run.run_id)
            continue
        from services.run_dir import RunDir

        rows = RunDir(study.run_dir(run.run_id)).read_metrics()
        result = json.loads(path.read_text())
        runs[run.variant].append({"run_id": run.run_id, "seed": run.seed, "rows": rows,
                                  **result})
    return {"runs": runs, "missing": missing}


def tables(study: Study, data: dict) -> dict:
    runs = data["runs"]
    labels = [v.label for v in study.variants if v.label in runs]
    evaluations = sorted({e for rs in runs.values() for r in rs for e in r["after"]})
    primary = ("sampled" if "sampled" in evaluations else "greedy", "reward")
    per_task, scores = [], {}
    for label in labels:
        seeds = runs[label]
        for evaluation in evaluations:
            for metric in ("reward", "accuracy"):
                tasks = sorted(seeds[0]["after"][evaluation][metric])
                for task in tasks:
                    before = [r["before"][evaluation][metric][task] for r in seeds]
                    after = [r["after"][evaluation][metric][task] for r in seeds]
                    (bm, bs), (am, as_) = _stats(before), _stats(after)
                    per_task.append({"estimator": label, "task": task,
                                     "evaluation": evaluation, "metric": metric,
                                     "seeds": len(seeds), "before_mean": bm, "before_std": bs,
                                     "after_mean": am, "after_std": as_,
                                     "change_mean": am - bm})
                    if (evaluation, metric) == primary:
                        scores.setdefault(label, {})[task] = (am, as_)
    tasks = sorted({t for s in scores.values() for t in s})
    ranks = {label: {} for label in labels}
    for task in tasks:
        for label, rank in _ranks({lab: scores[lab][task][0] for lab in labels}).items():
            ranks[label][task] = rank
    share_rows, curves, summary = [], [], []
    for label in labels:
        seeds = runs[label]
        per_seed = defaultdict(list)  # task -> one mean share per seed
        first, last = defaultdict(list), defaultdict(list)
        for r in seeds:
            steps_shares = [_shares(row) for row in r["rows"]]
            for task in tasks:
                values = [s.get(task, 0.0) for s in steps_shares]
                if values:
                    per_seed[task].append(float(np.mean(values)))
                    first[task].append(values[0])
                    last[task].append(values[-1])
            for row, shares in zip(r["rows"], steps_shares, strict=True):
                for task in tasks:
                    curves.append({"estimator": label, "seed": r["seed"], "step": row["step"],
                                   "task": task, "reward": row["reward"].get(task),
                                   "signal_share": shares.get(task, 0.0),
                                   "task_factor": _factors(row).get(task)})
        mean_share = {t: float(np.mean(per_seed[t])) for t in tasks if per_seed[t]}
        for task in tasks:
            if per_seed[task]:
                share_rows.append({"estimator": label, "task": task, "seeds": len(seeds),
                                   "share_mean": mean_share[task],
                                   "share_first_step": float(np.mean(first[task])),
                                   "share_last_step": float(np.mean(last[task]))})
        worst = min(tasks, key=lambda t: scores[label][t][0])
        summary.append({"estimator": label, "seeds": len(seeds),
                        "primary_metric": " ".join(primary),
                        "mean_score": float(np.mean([scores[label][t][0] for t in tasks])),
                        "worst_task": worst, "worst_score": scores[label][worst][0],
                        "average_rank": float(np.mean([ranks[label][t] for t in tasks])),
                        "max_min_share_ratio": _share_ratio(list(mean_share.values()))})
    return {"primary": primary, "tasks": tasks, "labels": labels, "scores": scores,
            "ranks": ranks, "per_task": per_task, "summary": summary, "shares": share_rows,
            "curves": curves}


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def figures(out: Path, t: dict) -> list[str]:
    """The report's PNGs; returns the names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, labels, curves = t["tasks"], t["labels"], t["curves"]
    by = defaultdict(lambda: defaultdict(list))  # (label, task) -> step -> values

    def series(field):
        by.clear()
        for c in curves:
            if c[field] is not None:
                by[(c["estimator"], c["task"])][c["step"]].append(c[field])
        return {k: (sorted(v), [float(np.mean(v[s])) for s in sorted(v)]) for k, v in by.items()}

    written = []
    n = len(tasks)
    reward = series("reward")
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for label in labels:
            if (label, task) in reward:
                ax.plot(*reward[(label, task)], label=label, marker=".")
        ax.set_title(task)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("training reward (mean over seeds)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "reward_curves.png", dpi=90)
    plt.close(fig)
    written.append("reward_curves.png")

    share = series("signal_share")
    fig, axes = plt.subplots(1, len(labels), figsize=(3.6 * len(labels), 3.2), squeeze=False)
    for ax, label in zip(axes[0], labels, strict=True):
        steps = reward.get((label, tasks[0]), ([], []))[0]
        stack = [share.get((label, task), (steps, [0.0] * len(steps)))[1] for task in tasks]
        if steps:
            ax.stackplot(steps, stack, labels=tasks)
        ax.set_ylim(0, 1)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("share of Σ|A|")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(out / "signal_shares.png", dpi=90)
    plt.close(fig)
    written.append("signal_shares.png")

    factor = series("task_factor")
    with_factors = [label for label in labels if any((label, t) in factor for t in tasks)]
    if with_factors:
        fig, axes = plt.subplots(1, len(with_factors), figsize=(3.8 * len(with_factors), 3.2),
                                 squeeze=False)
        for ax, label in zip(axes[0], with_factors, strict=True):
            for task in tasks:
                if (label, task) in factor:
                    ax.plot(*factor[(label, task)], label=task)
            ax.axhline(1.0, color="grey", lw=0.5)
            ax.set_title(label, fontsize=9)
            ax.set_xlabel("step")
        axes[0][0].set_ylabel("task factor s_m (mt_grpo: weight w_m)")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "factors.png", dpi=90)
        plt.close(fig)
        written.append("factors.png")

    evaluation, metric = t["primary"]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * n * max(1, len(labels)) / 2), 3.2))
    width = 0.8 / max(1, len(labels))
    for k, label in enumerate(labels):
        change = [next(r["change_mean"] for r in t["per_task"] if r["estimator"] == label
                       and r["task"] == task and r["evaluation"] == evaluation
                       and r["metric"] == metric) for task in tasks]
        ax.bar(np.arange(n) + k * width, change, width, label=label)
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_xticks(np.arange(n) + width * (len(labels) - 1) / 2, tasks)
    ax.set_ylabel(f"held-out {evaluation} {metric}: after - before")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "before_after.png", dpi=90)
    plt.close(fig)
    written.append("before_after.png")
    return written


def _ratio(value: float) -> str:
    return "∞ (a task got no signal)" if math.isinf(value) else f"{value:.2f}"


def _pm(mean: float, std: float) -> str:
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def markdown(study: Study, t: dict, data: dict, written: list[str]) -> str:
    tasks, labels = t["tasks"], t["labels"]
    evaluation, metric = t["primary"]
    summary = {s["estimator"]: s for s in t["summary"]}
    seeds = sorted({s["seeds"] for s in t["summary"]})
    lines = [f"# harpo compare: {study.config_path.name}", "",
             f"Study directory `{study.root}`; every run trains `{study.config_path}` "
             f"(overrides: {study.overrides or 'none'}) with the same data, warm start "
             f"(`model.path`), steps and settings; only the estimator differs. Seeds per "
             f"estimator: {', '.join(map(str, seeds)) or '-'} (± is the sample std over "
             f"seeds; none with one seed).", ""]
    if data["missing"]:
        lines += [f"**Not finished, left out:** {', '.join(data['missing'])}.", ""]
    lines += [f"## Held-out {evaluation} {metric} after training (Table 1 form)", "",
              "Worst task and average rank (1 = best over the estimators, per task) decide "
              "whether an estimator lets a task fall behind.", "",
              "| estimator | " + " | ".join(tasks) + " | mean | worst task | avg rank |",
              "|---" * (len(tasks) + 4) + "|"]
    for label in labels:
        s = summary[label]
        cells = [_pm(*t["scores"][label][task]) for task in tasks]
        lines.append(f"| {label} | " + " | ".join(cells)
                     + f" | {s['mean_score']:.3f} | {s['worst_task']} {s['worst_score']:.3f} "
                       f"| {s['average_rank']:.2f} |")
    lines += ["", "## Share of the policy-gradient signal per task", "",
              "Σ|A| of a task's rollouts ÷ Σ|A| of the batch, averaged over steps and seeds: "
              "the quantity HARPO is meant to balance. A ratio far above 1 means one task "
              "dominates the update.", "",
              "| estimator | " + " | ".join(tasks) + " | max/min |",
              "|---" * (len(tasks) + 2) + "|"]
    shares = {(r["estimator"], r["task"]): r["share_mean"] for r in t["shares"]}
    for label in labels:
        cells = [f"{shares.get((label, task), float('nan')):.3f}" for task in tasks]
        lines.append(f"| {label} | " + " | ".join(cells)
                     + f" | {_ratio(summary[label]['max_min_share_ratio'])} |")
    lines += ["", "## Before and after, every evaluation", "",
              "| estimator | task | evaluation | metric | before | after | change |",
              "|---|---|---|---|---|---|---|"]
    for r in t["per_task"]:
        lines.append(f"| {r['estimator']} | {r['task']} | {r['evaluation']} | {r['metric']} | "
                     f"{_pm(r['before_mean'], r['before_std'])} | "
                     f"{_pm(r['after_mean'], r['after_std'])} | {r['change_mean']:+.3f} |")
    lines += ["", "## Figures", ""]
    captions = {"reward_curves.png": "training reward per task, one line per estimator",
                "signal_shares.png": "each task's share of Σ|A| over training, per estimator",
                "factors.png": "task factors s_m over training (estimators that have them)",
                "before_after.png": f"held-out {evaluation} {metric}, after - before"}
    for name in written:
        lines += [f"![{captions[name]}](report/{name})", f"*{captions[name]}*", ""]
    lines += ["## Files", "",
              "`report/per_task.csv`, `report/summary.csv`, `report/signal_share.csv`, "
              "`report/curves.csv`, `report/summary.json`; each run's directory is "
              "`runs/RUN/` (config.yaml, metrics.jsonl, checkpoints/) and its held-out "
              "results `results/RUN.json`.", ""]
    return "\n".join(lines)


def write_report(study: Study) -> Path:
    """Write REPORT.md and report/ for ``study``; returns REPORT.md's path."""
    data = collect(study)
    out = study.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    path = study.root / REPORT
    if not data["runs"]:
        path.write_text(f"# harpo compare: {study.config_path.name}\n\nNo run has finished "
                        f"yet: {', '.join(data['missing'])}.\n")
        return path
    t = tables(study, data)
    _write_csv(out / "per_task.csv", PER_TASK_COLUMNS, t["per_task"])
    _write_csv(out / "summary.csv", SUMMARY_COLUMNS, t["summary"])
    _write_csv(out / "signal_share.csv", SHARE_COLUMNS, t["shares"])
    _write_csv(out / "curves.csv", CURVE_COLUMNS, t["curves"])
    (out / "summary.json").write_text(json.dumps(_strict(
        {"primary_metric": list(t["primary"]), "tasks": t["tasks"], "summary": t["summary"],
         "per_task": t["per_task"], "signal_share": t["shares"], "ranks": t["ranks"],
         "missing": data["missing"]}), indent=1, allow_nan=False) + "\n")
    written = figures(out, t)
    path.write_text(markdown(study, t, data, written))
    return path


def _strict(value):
    """JSON has no NaN or infinity: a std of one seed or an unbounded share ratio is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return value
