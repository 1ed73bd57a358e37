"""The kustomize manifests under k8s/, rendered with the real `kubectl kustomize` and checked
offline like the Helm chart's output (tests/deploy/test_helm.py): schema-valid, secure, the
NetworkPolicy in place, the training config valid; the overlays do what they say; the copied
dashboard and rules equal their sources; base and chart do not drift apart.

kubectl comes from scripts/install-helm.sh (into .tools/bin/); a missing one fails the tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.deploy.test_helm import (
    DASHBOARD,
    RULES,
    assert_deployable,
    by_kind,
    helm_template,
    one,
    promtool_check,
    run,
    sync_assets,
    tool,
    train_config,
    validator,
)

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KUSTOMIZATIONS = ["base", "overlays/rayjob", "overlays/monitoring", "overlays/cpu-smoke"]


def kustomize(path: str) -> list[dict]:
    result = run(tool("kubectl"), "kustomize", str(K8S / path))
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return validator().load_documents(result.stdout)


def test_every_kustomization_is_tested():
    found = {str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml")}
    assert found == set(KUSTOMIZATIONS)


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_renders_valid_secure_manifests(path):
    assert_deployable(kustomize(path), gpu=path != "overlays/cpu-smoke")


def test_base_is_a_long_lived_autoscaled_raycluster():
    docs = kustomize("base")
    cluster = one(docs, "RayCluster")
    assert not by_kind(docs, "RayJob")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert list(groups) == ["rollout", "learner", "reward"]
    assert groups["rollout"]["minReplicas"] < groups["rollout"]["maxReplicas"]
    assert groups["learner"]["minReplicas"] == groups["learner"]["maxReplicas"]
    config_map = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == "harpo-config"]
    assert config_map, "the RayCluster mounts ConfigMap harpo-config (no hash suffix)"
    assert {k for k in ("Service", "NetworkPolicy", "PersistentVolumeClaim")} <= \
        {d["kind"] for d in docs}


def test_rayjob_overlay_runs_the_base_cluster_as_a_rayjob():
    base = one(kustomize("base"), "RayCluster")
    docs = kustomize("overlays/rayjob")
    assert not by_kind(docs, "RayCluster"), "the RayJob brings its own cluster"
    job = one(docs, "RayJob")
    assert job["spec"]["entrypoint"] == "harpo train /etc/harpo/config.yaml --address auto"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["rayClusterSpec"] == base["spec"], "RayJob cluster drifted from the base"


def test_monitoring_overlay(tmp_path):
    docs = kustomize("overlays/monitoring")
    rule = one(docs, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES.read_text()), (
        "k8s/overlays/monitoring/prometheusrule.yaml is stale: run python deploy/sync_assets.py")
    alerts = sum(len(g["rules"]) for g in rule["spec"]["groups"])
    assert f"SUCCESS: {alerts} rules found" in promtool_check(rule["spec"], tmp_path)
    (dashboard,) = [d for d in by_kind(docs, "ConfigMap")
                    if d["metadata"]["name"] == "harpo-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["harpo-dashboard.json"]) == \
        json.loads(DASHBOARD.read_text())
    monitor = one(docs, "ServiceMonitor")
    service = [s for s in by_kind(docs, "Service") if s["metadata"]["name"] == "harpo-driver"][0]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True
    for doc in (rule, monitor):
        assert doc["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_cpu_smoke_overlay_is_a_cpu_only_rayjob():
    docs = kustomize("overlays/cpu-smoke")
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(docs)
    job = one(docs, "RayJob")
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (prepare,) = head["initContainers"]
    assert prepare["command"][:3] == ["harpo", "init-tiny", "/workspace/tiny"]
    images = {c["image"] for pod in [head] + [g["template"]["spec"] for g in
                                              job["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
              for c in pod.get("initContainers", []) + pod["containers"]}
    images.add(job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"])
    assert images == {"harpo:0.1.0-cpu"}
    config = train_config(docs)
    assert config["rollout"]["backend"] == "hf"
    assert config["model"]["path"] == "/workspace/tiny/model"
    assert one(docs, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_synced_copies_equal_their_sources():
    assert sync_assets().stale() == [], "run: python deploy/sync_assets.py"


def test_sync_assets_writes_what_check_expects(tmp_path, monkeypatch):
    """sync() into a scratch tree makes stale() empty (the copy logic, not just the repo state)."""
    module = sync_assets()
    for name in ("CHART_FILES", "MONITORING_OVERLAY"):
        monkeypatch.setattr(module, name, tmp_path / name)
    written = {str(p) for p in module.sync()}

    assert len(written) == 4 and module.stale() == []
    assert module.sync() == []  # idempotent
    rule = yaml.safe_load((tmp_path / "MONITORING_OVERLAY" / "prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"] == yaml.safe_load(RULES.read_text())


def _head_container(spec: dict) -> dict:
    return spec["headGroupSpec"]["template"]["spec"]["containers"][0]


def test_base_and_chart_agree():
    """k8s/base and the chart's default cluster (mode: cluster) have the same shape: groups,
    advertised resources, ports, mounts and environment, so neither drifts from the other."""
    base = one(kustomize("base"), "RayCluster")["spec"]
    chart = one(helm_template(sets=("mode=cluster",)), "RayCluster")["spec"]

    def shape(spec):
        groups = {g["groupName"]: (g["rayStartParams"].get("resources"),
                                   g["minReplicas"], g["maxReplicas"])
                  for g in spec["workerGroupSpecs"]}
        head = _head_container(spec)
        return {
            "groups": {k: (json.loads(json.loads(r)), lo, hi) for k, (r, lo, hi) in
                       groups.items()},
            "head_params": spec["headGroupSpec"]["rayStartParams"],
            "ports": sorted((p["name"], p["containerPort"]) for p in head["ports"]),
            "mounts": sorted(m["mountPath"] for m in head["volumeMounts"]),
            "env": sorted(e["name"] for e in head["env"]),
            "autoscaling": spec["enableInTreeAutoscaling"],
            "securityContext": head["securityContext"],
        }

    assert shape(base) == shape(chart)
    assert train_config(kustomize("base"))["observability"] == \
        train_config(helm_template(sets=("mode=cluster",)))["observability"]
