"""The Prometheus alert rules: valid, unit-tested with the real promtool, every alert covered
firing and not firing, and only naming metrics the exporter really exports."""

import subprocess

import pytest
import yaml

from tests.deploy.helpers import (
    RULES,
    RULES_TESTS,
    exported_metric_names,
    metric_names_in,
    require_binary,
)


def _alerts():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _promtool(*args):
    return subprocess.run([require_binary("promtool"), *args], capture_output=True, text=True,
                          timeout=120, cwd=RULES.parent)


def test_promtool_check_rules():
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in result.stdout


def test_promtool_unit_tests_pass():
    result = _promtool("test", "rules", str(RULES_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_not_firing():
    cases = [case for test in yaml.safe_load(RULES_TESTS.read_text())["tests"]
             for case in test.get("alert_rule_test", [])]
    for alert in _alerts():
        name = alert["alert"]
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name}: no test where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{name}: no test where it stays quiet"


@pytest.mark.parametrize("alert", _alerts(), ids=lambda a: a["alert"])
def test_alert_is_labelled_and_explained(alert):
    assert alert["alert"].startswith("Harpo")
    assert alert["labels"]["severity"] in ("warning", "critical")
    assert alert["annotations"]["summary"] and alert["annotations"]["description"]
    assert "for" in alert


@pytest.mark.parametrize("alert", _alerts(), ids=lambda a: a["alert"])
def test_alert_uses_exported_metrics_only(alert):
    names = metric_names_in(alert["expr"])
    assert names, alert["expr"]
    missing = names - exported_metric_names()
    assert not missing, f"{alert['alert']} uses metrics the exporter does not serve: {missing}"
