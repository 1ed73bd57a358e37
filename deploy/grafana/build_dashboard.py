"""Build the harpo Grafana dashboard (``harpo-dashboard.json``) from code with grafanalib.

Why generated: the panels' PromQL must only name metrics that ``services/metrics.py`` exports,
and a test (``tests/deploy/test_dashboard.py``) checks that, and that the committed JSON is this
script's output. Edit the panels here, then run::

    python deploy/grafana/build_dashboard.py          # rewrites harpo-dashboard.json
    python deploy/grafana/build_dashboard.py --check  # exit 1 if the committed file is stale

The data source is the ``${datasource}`` template variable (any Prometheus), and ``$job``
selects the training run (the ``job`` label the exporter puts on every series; scrape it with
``honor_labels: true``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from grafanalib import core as g
from grafanalib._gen import DashboardEncoder

OUTPUT = Path(__file__).with_name("harpo-dashboard.json")
UID = "harpo-training"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
WIDTH = 24  # Grafana's grid
HEIGHT = 8


def sel(metric: str, extra: str = "") -> str:
    """``metric{job="$job"[, extra]}``: every query is scoped to the selected run."""
    return f'{metric}{{job="$job"{", " + extra if extra else ""}}}'


def rate(metric: str, extra: str = "") -> str:
    return f"rate({sel(metric, extra)}[$__rate_interval])"


def increase(metric: str, extra: str = "") -> str:
    return f"increase({sel(metric, extra)}[$__rate_interval])"


def quantile(q: float) -> str:
    return (f"histogram_quantile({q}, sum by (task, le) "
            f"({rate('harpo_sample_factor_bucket')}))")


@dataclass
class P:
    """One panel: its queries as (PromQL, legend) pairs and a few display options."""

    title: str
    targets: list[tuple[str, str]]
    description: str = ""
    unit: str = ""
    width: int = 12
    kind: str = "timeseries"  # or "stat"
    log2: bool = False
    stack: bool = False
    bars: bool = False
    dashed: str | None = None  # legend regex of series drawn dashed
    options: dict = field(default_factory=dict)


SECTIONS: list[tuple[str, list[P]]] = [
    ("Overview", [
        P("Job state", [(f"{sel('harpo_job_state')} == 1", "{{state}}")],
          "starting, running, paused, stopping, finished or failed.", kind="stat", width=4,
          options={"textMode": "name"}),
        P("Last completed step", [(sel("harpo_step"), "step")], kind="stat", width=5),
        P("Seconds since last step", [(f"time() - {sel('harpo_last_step_timestamp_seconds')}",
                                       "since last step")],
          "Grows without bound when training is stuck (see the HarpoNoTrainingStep alert).",
          unit="s", kind="stat", width=5),
        P("Policy version", [(sel("harpo_policy_version"), "version")], kind="stat", width=5),
        P("Live rollout workers", [(sel("harpo_rollout_workers"), "workers")], kind="stat",
          width=5),
    ]),
    ("HARPO modulation", [
        P("Task factor s_m: applied (solid) and unclamped exp(L_m) (dashed)",
          [(sel("harpo_task_factor"), "{{task}} applied"),
           (sel("harpo_task_factor_unclamped"), "{{task}} unclamped")],
          "Where a dashed line leaves its solid one, the clamp binds: the task wants more (or "
          "less) weight than task_clamp allows.", log2=True, dashed=".* unclamped"),
        P("Task signal EMA ρ_m and reference ρ_ref",
          [(sel("harpo_task_signal_ema"), "ρ {{task}}"),
           (sel("harpo_signal_reference"), "ρ_ref"),
           (sel("harpo_task_signal"), "p {{task}} (batch)")],
          "A task above the reference gets a factor below 1, and the other way round.",
          log2=True, dashed=r"p .*"),
        P("Sample factor quantiles per task",
          [(quantile(0.1), "p10 {{task}}"), (quantile(0.5), "p50 {{task}}"),
           (quantile(0.9), "p90 {{task}}")],
          "Spread of the per-group factors s_(m,q) within each task (sample_clamp bounds).",
          log2=True),
        P("Zero-signal groups",
          [(increase("harpo_zero_signal_groups_total"), "{{task}}")],
          "Groups whose rollouts all got the same reward: no gradient from them.", bars=True),
        P("Log task factor L_m", [(sel("harpo_task_log_factor"), "{{task}}")],
          "Unclamped state of the task factor EMA; with a fixed task set the sum stays 0."),
        P("Mean sample factor", [(sel("harpo_sample_factor_mean"), "mean s_(m,q)")]),
    ]),
    ("Rewards", [
        P("Reward per task", [(sel("harpo_task_reward"), "{{task}}"),
                              (sel("harpo_reward_mean"), "all tasks")]),
        P("Accuracy per task", [(sel("harpo_task_accuracy"), "{{task}}")], unit="percentunit"),
        P("Format rate per task", [(sel("harpo_task_format_rate"), "{{task}}")]),
        P("Batch share per task", [(sel("harpo_task_batch_share"), "{{task}}")],
          unit="percentunit", stack=True),
    ]),
    ("Learner", [
        P("Loss", [(sel("harpo_loss"), "loss")],
          "NaN here fires HarpoLossNotFinite.", width=8),
        P("KL", [(sel("harpo_kl"), "KL to reference"), (sel("harpo_approx_kl"), "approx KL")],
          width=8),
        P("Entropy", [(sel("harpo_entropy"), "entropy")], width=8),
        P("Clip fraction", [(sel("harpo_clip_fraction"), "clipped tokens")],
          unit="percentunit", width=8),
        P("Gradient norm", [(sel("harpo_grad_norm"), "grad norm")], width=8),
        P("Learning rate", [(sel("harpo_learning_rate"), "lr")], width=8),
        P("Rollout / learner log-prob mismatch",
          [(sel("harpo_logprob_mismatch_max"), "max"),
           (sel("harpo_logprob_mismatch_p99"), "p99"),
           (sel("harpo_logprob_mismatch_mean"), "mean")], width=12),
        P("Advantage |A^H| per task", [(sel("harpo_task_advantage_abs_mean"), "{{task}}")],
          width=12),
    ]),
    ("Throughput", [
        P("Rollouts per second", [(sel("harpo_rollouts_per_second"), "rollouts/s"),
                                  (f"{rate('harpo_rollouts_total')}", "rollouts/s (counter)")],
          width=8),
        P("Tokens per second", [(sel("harpo_tokens_per_second"), "tokens/s")], width=8),
        P("Response length", [(sel("harpo_response_length_tokens"), "mean tokens"),
                              (sel("harpo_stop_fraction"), "stopped fraction")], width=8),
        P("Stage timings of the last step", [(sel("harpo_stage_seconds"), "{{stage}}")],
          "generate / score / modulate / learn / sync add up to step.", unit="s"),
        P("Steps per minute", [(f"60 * {rate('harpo_steps_total')}", "steps/min")]),
    ]),
    ("Workers", [
        P("Rollout workers and staleness", [(sel("harpo_rollout_workers"), "live workers"),
                                            (sel("harpo_staleness_versions"), "staleness"),
                                            (sel("harpo_queue_depth"), "queued requests")],
          width=8),
        P("Weight sync", [(sel("harpo_weight_sync_seconds"), "broadcast seconds"),
                          (sel("harpo_stage_seconds", 'stage="weight_load"'),
                           "slowest worker load")],
          unit="s", width=8),
        P("Weight-sync failures and restarts",
          [(increase("harpo_weight_sync_failures_total"), "weight-sync failures"),
           (increase("harpo_restarts_total"), "restarts {{role}}")],
          "Any bar here also shows up in the alerts.", bars=True, width=8),
        P("Rollouts per worker", [(rate("harpo_worker_rollouts_total"), "{{worker}}")],
          width=12),
        P("Weight load per worker", [(sel("harpo_worker_weight_load_seconds"), "{{worker}}")],
          unit="s", width=12),
    ]),
]


def _panel(spec: P, grid: g.GridPos, ref_ids: str = "ABCDEFGH") -> g.Panel:
    targets = [g.Target(expr=expr, legendFormat=legend, refId=ref, datasource=DATASOURCE)
               for (expr, legend), ref in zip(spec.targets, ref_ids)]
    common = dict(title=spec.title, description=spec.description or None, targets=targets,
                  dataSource=DATASOURCE, gridPos=grid)
    if spec.kind == "stat":
        return g.Stat(**common, format=spec.unit or "none", reduceCalc="lastNotNull",
                      graphMode="none", thresholds=[], **spec.options)
    overrides = []
    if spec.dashed:
        overrides.append({
            "matcher": {"id": "byRegexp", "options": spec.dashed},
            "properties": [{"id": "custom.lineStyle",
                            "value": {"fill": "dash", "dash": [10, 10]}}],
        })
    return g.TimeSeries(
        **common, unit=spec.unit, overrides=overrides,
        scaleDistributionType="log" if spec.log2 else "linear",
        stacking={"mode": "normal", "group": "A"} if spec.stack else {},
        drawStyle="bars" if spec.bars else "line", fillOpacity=60 if spec.bars else 0,
        showPoints="never" if not spec.bars else "auto", spanNulls=True,
        legendDisplayMode="table", legendPlacement="right", legendCalcs=["lastNotNull"],
        tooltipMode="multi")


def _layout(sections) -> list[g.Panel]:
    """Rows of panels left to right, wrapping at the grid width."""
    panels, y = [], 0
    for title, specs in sections:
        panels.append(g.RowPanel(title=title, gridPos=g.GridPos(h=1, w=WIDTH, x=0, y=y)))
        y += 1
        x = 0
        for spec in specs:
            height = 4 if spec.kind == "stat" else HEIGHT
            if x + spec.width > WIDTH:
                x, y = 0, y + HEIGHT
            panels.append(_panel(spec, g.GridPos(h=height, w=spec.width, x=x, y=y)))
            x += spec.width
        y += 4 if all(s.kind == "stat" for s in specs) else HEIGHT
    return panels


def dashboard() -> g.Dashboard:
    templating = g.Templating(list=[
        g.Template(name="datasource", label="Data source", query="prometheus",
                   type="datasource", default="Prometheus"),
        g.Template(name="job", label="Job", dataSource=DATASOURCE,
                   query="label_values(harpo_steps_total, job)",
                   refresh=g.REFRESH_ON_TIME_RANGE_CHANGE),
    ])
    return g.Dashboard(
        title="harpo training", uid=UID, tags=["harpo", "rl"],
        description="HARPO modulation factors, per-task rewards, learner statistics, "
                    "throughput and worker health of one harpo training job.",
        panels=_layout(SECTIONS), templating=templating, refresh="30s",
        time=g.Time("now-3h", "now"), timezone="browser", schemaVersion=39,
        graphTooltip=g.GRAPH_TOOLTIP_MODE_SHARED_CROSSHAIR,
    ).auto_panel_ids()


def render() -> str:
    data = dashboard().to_json_data()
    return json.dumps(data, cls=DashboardEncoder, sort_keys=True, indent=2,
                      ensure_ascii=False) + "\n"


def panel_queries(data: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target in a dashboard's JSON model."""
    out = []
    for panel in data["panels"]:
        for target in panel.get("targets") or []:
            out.append((panel["title"], target["expr"]))
    return out


def concrete_query(expr: str, job: str, interval: str = "1m") -> str:
    """A panel query with Grafana's variables filled in, to run it against Prometheus directly
    (no Grafana server runs in CI: the end-to-end test checks every panel this way)."""
    values = {"job": job, "__rate_interval": interval, "__interval": interval,
              "__range": interval}
    for name, value in values.items():
        expr = expr.replace("${" + name + "}", value)
    return re.sub(r"\$(__rate_interval|__interval|__range|job)\b",
                  lambda m: values[m.group(1)], expr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if the committed JSON is out of date")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date; run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
