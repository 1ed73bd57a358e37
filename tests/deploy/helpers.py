"""Shared by the deploy tests and the Prometheus end-to-end test: the dashboard generator, the
metric names the exporter really exports, and the metric names a PromQL expression uses."""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_BUILDER = ROOT / "deploy" / "grafana" / "build_dashboard.py"
DASHBOARD_JSON = ROOT / "deploy" / "grafana" / "harpo-dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "harpo-rules.yaml"
RULES_TESTS = ROOT / "deploy" / "prometheus" / "harpo-rules.test.yaml"
INSTALL_HINT = "promtool is not on PATH: run scripts/install-prometheus.sh (as root)"


def require_binary(name: str) -> str:
    """The path of a Prometheus binary; a missing one fails the test (it is not optional)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(INSTALL_HINT.replace("promtool", name), pytrace=False)
    return path


@cache
def dashboard_builder():
    """``deploy/grafana/build_dashboard.py`` as a module (deploy/ is not a package)."""
    spec = importlib.util.spec_from_file_location("harpo_build_dashboard", DASHBOARD_BUILDER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


@cache
def exported_metric_names() -> frozenset[str]:
    """Every sample name an exporter serves after a real step and every job event."""
    from harpo_core import HarpoModulator
    from services.metrics import MetricsExporter
    from tests.services.test_metrics import synthetic_step

    exporter = MetricsExporter("names")
    row, modulation, group_tasks = synthetic_step(HarpoModulator(), 0,
                                                  np.random.default_rng(0))
    exporter.record_step(row, modulation, group_tasks)
    exporter.set_rollout_workers(2, desired=2)
    exporter.set_queue_depth(0)
    exporter.set_staleness(0)
    exporter.record_restart("rollout")
    exporter.record_weight_sync(0.1, ok=False)
    exporter.set_state("running")
    exporter.record_worker("rollout-0", 8, 0.01)
    return frozenset(s.name for family in exporter.registry.collect() for s in family.samples)


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "Inf", "NaN", "inf", "nan"}


def metric_names_in(promql: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, labels and keywords left out)."""
    text = _STRINGS.sub('""', promql)
    for pattern in (_MATCHERS, _RANGES, _GROUPING):
        text = pattern.sub(" ", text)
    return {m for m in _IDENT.findall(text) if m not in _KEYWORDS}
