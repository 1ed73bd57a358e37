"""The Grafana dashboard: the committed JSON is the generator's output, and its panels query
only metrics that ``services/metrics.py`` exports, so neither side can drift."""

import json
import re
import subprocess
import sys

import yaml

from tests.deploy.helpers import (
    DASHBOARD_BUILDER,
    DASHBOARD_JSON,
    dashboard_builder,
    exported_metric_names,
    metric_names_in,
    require_binary,
)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def _dashboard():
    return json.loads(DASHBOARD_JSON.read_text())


def test_committed_json_is_the_generator_output():
    assert DASHBOARD_JSON.read_text() == dashboard_builder().render(), (
        f"{DASHBOARD_JSON.name} is stale: run python deploy/grafana/{DASHBOARD_BUILDER.name}")
    check = subprocess.run([sys.executable, str(DASHBOARD_BUILDER), "--check"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr


def test_panels_query_only_exported_metrics():
    exported = exported_metric_names()
    queries = dashboard_builder().panel_queries(_dashboard())
    assert len(queries) >= 30
    for title, expr in queries:
        names = metric_names_in(expr)
        assert names, f"panel {title!r}: no metric in {expr!r}"
        missing = names - exported
        assert not missing, f"panel {title!r} queries metrics nobody exports: {missing}"


def test_every_query_is_scoped_to_the_selected_job():
    for title, expr in dashboard_builder().panel_queries(_dashboard()):
        for name, after in re.findall(r"(harpo_\w+)(.{0,13})", expr):
            assert after.startswith('{job="$job"'), f"panel {title!r}: {name} not scoped"


def test_queries_are_valid_promql(tmp_path):
    """promtool parses each query (variables filled in) as a recording rule."""
    builder = dashboard_builder()
    rules = [{"record": f"harpo_dashboard:query_{i}",
              "expr": builder.concrete_query(expr, job="some-job")}
             for i, (_, expr) in enumerate(builder.panel_queries(_dashboard()))]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([require_binary("promtool"), "check", "rules", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_datasource_and_job_variables():
    data = _dashboard()
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["job"]["datasource"] == DATASOURCE
    assert metric_names_in(variables["job"]["query"].removeprefix("label_values(")
                           .split(",")[0]) <= exported_metric_names()
    for panel in data["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert all(t["datasource"] == DATASOURCE for t in panel["targets"]), panel["title"]


def test_layout():
    panels = _dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        grid = p["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, p["title"]
