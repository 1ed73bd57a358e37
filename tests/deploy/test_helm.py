"""The Helm chart deploy/helm/harpo, checked offline with the real helm binary.

Every example values file (and the defaults, and mode: cluster) passes `helm lint --strict`,
renders, and every rendered manifest validates: built-in kinds against the Kubernetes schema
(kubernetes-validate), KubeRay/prometheus-operator kinds against deploy/schemas/ (jsonschema).
Bad values are rejected with the message a user sees. The rendered PrometheusRule passes
`promtool check rules`; every container runs as non-root without privilege escalation; the
NetworkPolicy keeps the Ray and control ports inside the namespace.

helm and kubectl come from scripts/install-helm.sh (into .tools/bin/); promtool from
scripts/install-prometheus.sh. A missing tool fails these tests, it never skips them.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "harpo"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
BAD_VALUES = sorted((Path(__file__).parent / "bad_values").glob("*.yaml"))
RULES = ROOT / "deploy" / "prometheus" / "harpo-rules.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "harpo-dashboard.json"
RAY_INTERNAL_PORTS = {6379, 8265, 10001}
CONTROL_PORT = 50051
METRICS_PORTS = {9400, 8080}
ROLES = ("rollout", "learner", "reward")
SYNC_HINT = ("the chart's copy of the dashboard/rules differs from deploy/grafana or "
             "deploy/prometheus: run `python deploy/sync_assets.py`")


# ------------------------------------------------------------------------------ tools


def tool(name: str) -> str:
    """helm/kubectl from .tools/bin (scripts/install-helm.sh) or PATH; missing: the test fails."""
    local = ROOT / ".tools" / "bin" / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run scripts/install-helm.sh (puts helm and kubectl "
                    f"into .tools/bin/)", pytrace=False)
    return found


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is not on PATH: run scripts/install-prometheus.sh (as root)",
                    pytrace=False)
    return found


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, cwd=cwd)


@cache
def _load(name: str, path: Path):
    """A module from a file of deploy/ (not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def validator():
    """deploy/schemas/validate.py: kubernetes-validate for built-ins, jsonschema for CRDs."""
    try:
        import jsonschema  # noqa: F401
        import kubernetes_validate  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"{exc.name} is missing: pip install kubernetes-validate jsonschema "
                    f"(the dev extra of pyproject.toml)", pytrace=False)
    return _load("harpo_validate_manifests", ROOT / "deploy" / "schemas" / "validate.py")


def sync_assets():
    return _load("harpo_sync_assets", ROOT / "deploy" / "sync_assets.py")


# ------------------------------------------------------------------------------ rendering


def helm(command: str, *args: str, values_files=(), sets=()):
    """``helm COMMAND ARGS`` on the chart with ``-f`` values files and ``--set`` overrides."""
    for f in values_files:
        args += ("-f", str(f))
    for s in sets:
        args += ("--set", s)
    return run(tool("helm"), command, *args)


def helm_template(*values_files: Path, sets: tuple[str, ...] = (),
                  release: str = "harpo") -> list[dict]:
    result = helm("template", release, str(CHART), "--namespace", "ml",
                  values_files=values_files, sets=sets)
    assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
    return validator().load_documents(result.stdout)


def helm_error(*values_files: Path, sets: tuple[str, ...] = ()) -> str:
    result = helm("template", "harpo", str(CHART), values_files=values_files, sets=sets)
    assert result.returncode != 0, "helm template accepted values it should reject"
    return result.stderr


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def cluster_spec(docs: list[dict]) -> dict:
    """The RayCluster spec, from a RayCluster or a RayJob's rayClusterSpec."""
    clusters = by_kind(docs, "RayCluster")
    jobs = by_kind(docs, "RayJob")
    assert len(clusters) + len(jobs) == 1, "expected exactly one RayCluster or RayJob"
    return clusters[0]["spec"] if clusters else jobs[0]["spec"]["rayClusterSpec"]


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    """(where, PodSpec) of every pod the manifests create, CRD pod templates included."""
    found = []
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in ("RayCluster", "RayJob"):
            for path, template in validator().pod_templates(doc):
                found.append((f"{where} {path}", template["spec"]))
        elif doc["kind"] in ("Job", "Deployment", "StatefulSet", "DaemonSet"):
            found.append((where, doc["spec"]["template"]["spec"]))
        elif doc["kind"] == "Pod":
            found.append((where, doc["spec"]))
    return found


def train_config(docs: list[dict]) -> dict:
    configs = [d for d in by_kind(docs, "ConfigMap") if "config.yaml" in (d.get("data") or {})]
    assert len(configs) == 1, "expected one ConfigMap with config.yaml"
    return yaml.safe_load(configs[0]["data"]["config.yaml"])


# ------------------------------------------------------------------------------ checks


def assert_valid(docs: list[dict]) -> None:
    errors = validator().validate_documents(docs)
    assert not errors, "invalid manifests:\n" + "\n".join(errors)


def assert_secure(docs: list[dict]) -> None:
    """Every container non-root, no privilege escalation, no capabilities, read-only root."""
    problems = []
    pods = pod_specs(docs)
    assert pods, "no pods rendered"
    for where, pod in pods:
        pod_sc = pod.get("securityContext") or {}
        if pod_sc.get("runAsUser") == 0:
            problems.append(f"{where}: pod runAsUser 0")
        if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
            problems.append(f"{where}: uses host namespaces")
        for c in pod.get("initContainers", []) + pod["containers"]:
            sc = c.get("securityContext") or {}
            name = f"{where} container {c['name']}"
            if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
                problems.append(f"{name}: runAsNonRoot is not set")
            if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
                problems.append(f"{name}: runs as uid 0")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{name}: allowPrivilegeEscalation is not false")
            if sc.get("privileged"):
                problems.append(f"{name}: privileged")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                problems.append(f"{name}: capabilities not dropped (drop: [ALL])")
            if (sc.get("capabilities") or {}).get("add"):
                problems.append(f"{name}: adds capabilities")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{name}: root file system is writable")
    for doc in docs:  # the autoscaler sidecar KubeRay injects into the head pod
        spec = doc.get("spec") or {}
        spec = spec.get("rayClusterSpec", spec) if doc["kind"] == "RayJob" else spec
        if doc["kind"] in ("RayCluster", "RayJob") and spec.get("enableInTreeAutoscaling"):
            sc = (spec.get("autoscalerOptions") or {}).get("securityContext") or {}
            if sc.get("allowPrivilegeEscalation") is not False or not sc.get("runAsNonRoot"):
                problems.append(f"{doc['kind']}: autoscaler sidecar securityContext is not locked "
                                f"down")
    assert not problems, "\n".join(problems)


def _ports(rule: dict) -> set | None:
    """The numeric ports a NetworkPolicy ingress rule opens; None: every port."""
    if not rule.get("ports"):
        return None
    return {p["port"] for p in rule["ports"]}


def assert_network_policy(docs: list[dict], *, operator_allowed: bool = True) -> None:
    """Ray (8265, 6379, 10001) and control (50051) ports only from inside the namespace."""
    policies = by_kind(docs, "NetworkPolicy")
    assert len(policies) == 1, "expected one NetworkPolicy"
    spec = policies[0]["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    assert spec["podSelector"]["matchLabels"], "the policy must select the release's pods"
    in_namespace = False
    for rule in spec["ingress"]:
        sources = rule.get("from")
        assert sources, f"an ingress rule without `from` admits everyone: {rule}"
        ports = _ports(rule)
        for source in sources:
            assert "ipBlock" not in source, f"ipBlock admits traffic from outside: {rule}"
            if "namespaceSelector" in source:
                # other namespaces: metrics scraping, and the KubeRay operator on 8265 only
                assert ports is not None, f"a rule opens every port to other namespaces: {rule}"
                assert CONTROL_PORT not in ports, f"control API open to other namespaces: {rule}"
                assert not ports & {6379, 10001}, f"GCS/client open to other namespaces: {rule}"
                if 8265 in ports:
                    assert operator_allowed and ports == {8265}, rule
                    assert source.get("podSelector", {}).get("matchLabels"), (
                        f"8265 open to a whole namespace rather than the operator's pods: {rule}")
                else:
                    assert ports <= METRICS_PORTS, f"non-metrics port open outside: {rule}"
            else:
                assert source == {"podSelector": {}} or "podSelector" in source, rule
                in_namespace = True
    assert in_namespace, "pods of the namespace must reach the Ray ports (no same-namespace rule)"


def assert_driver_service(docs: list[dict], config: dict) -> None:
    """The Service selects the head pod (where the driver runs) and its ports match config."""
    services = [s for s in by_kind(docs, "Service")
                if s["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "driver"]
    assert len(services) == 1, "expected one driver Service"
    service = services[0]
    head = cluster_spec(docs)["headGroupSpec"]["template"]
    labels = head["metadata"]["labels"]
    selector = service["spec"]["selector"]
    assert selector.items() <= labels.items(), f"Service selector {selector} misses the head pod"
    container = head["spec"]["containers"][0]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    metrics_port = config["observability"]["metrics_port"]
    assert named[ports["metrics"]["targetPort"]] == metrics_port == ports["metrics"]["port"]
    assert config["observability"]["metrics_host"] == "0.0.0.0"
    if "control" in ports:
        control = config["control"]
        assert named[ports["control"]["targetPort"]] == control["port"] == ports["control"]["port"]
        assert control["host"] == "0.0.0.0" and control["token_env"] == "HARPO_CONTROL_TOKEN"
        env = {e["name"]: e for e in container["env"]}
        assert "secretKeyRef" in env["HARPO_CONTROL_TOKEN"]["valueFrom"], "token not from Secret"


def assert_config_valid(config: dict) -> None:
    """The rendered training config is one `harpo train` accepts (services/config.py)."""
    from services.config import parse_config

    parse_config(config, source="rendered config.yaml")


def assert_deployable(docs: list[dict], *, gpu: bool) -> None:
    """What every rendering (chart case or kustomization) must satisfy."""
    assert_valid(docs)
    assert_secure(docs)
    assert_network_policy(docs)
    config = train_config(docs)
    assert_config_valid(config)
    assert_driver_service(docs, config)
    assert_worker_groups(docs, config, gpu=gpu)


def assert_worker_groups(docs: list[dict], config: dict, *, gpu: bool) -> None:
    spec = cluster_spec(docs)
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) <= set(ROLES) and "rollout" in groups
    offered: dict[str, float] = {}
    for name, group in groups.items():
        params = group["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), "rayStartParams must be strings"
        resources = json.loads(json.loads(params["resources"]))  # '"{\"rollout\": 1}"'
        assert name in resources, f"group {name} does not advertise its role resource"
        pods = group["maxReplicas"]
        for key, amount in resources.items():
            offered[key] = offered.get(key, 0) + amount * pods
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= pods
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        if name == "reward" or not gpu:
            assert "nvidia.com/gpu" not in limits, f"{name} asks for a GPU"
    if gpu:
        limits = groups["rollout"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
    for role in ROLES:  # every pinned actor fits
        section = config.get(role, {})
        count = section.get("scorers" if role == "reward" else "workers", 1)
        for key, amount in (section.get("resources") or {}).items():
            assert offered.get(key, 0) >= count * amount, f"{role} actors need more {key}"


def promtool_check(spec: dict, tmp_path: Path) -> str:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = run(promtool(), "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


# ------------------------------------------------------------------------------ tests

CASES = {
    "defaults": ((), ()),
    "defaults-cluster-mode": ((), ("mode=cluster",)),
    **{f.stem: ((f,), ()) for f in EXAMPLES},
}


def test_examples_exist():
    assert {f.stem for f in EXAMPLES} >= {"cpu-smoke", "one-gpu-node", "multi-node"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lint_strict(case):
    files, sets = CASES[case]
    result = helm("lint", "--strict", str(CHART), values_files=files, sets=sets)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("case", sorted(CASES))
def test_renders_valid_secure_manifests(case):
    files, sets = CASES[case]
    docs = helm_template(*files, sets=sets)
    assert_deployable(docs, gpu=case != "cpu-smoke")
    kinds = {d["kind"] for d in docs}
    values = yaml.safe_load(files[0].read_text()) if files else {}
    if values.get("mode", "job") == "cluster" or "mode=cluster" in sets:
        assert {"RayCluster", "Job"} <= kinds and "RayJob" not in kinds
        assert cluster_spec(docs)["enableInTreeAutoscaling"] is True
    else:
        assert "RayJob" in kinds and "RayCluster" not in kinds


def test_default_is_a_rayjob_with_autoscaled_gpu_rollout():
    docs = helm_template()
    job = one(docs, "RayJob")
    assert job["spec"]["entrypoint"] == "harpo train /etc/harpo/config.yaml --address auto"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    spec = job["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert list(groups) == ["rollout", "learner", "reward"]
    assert groups["rollout"]["minReplicas"] < groups["rollout"]["maxReplicas"]
    assert groups["learner"]["minReplicas"] == groups["learner"]["maxReplicas"]
    for name in ("rollout", "learner"):
        limits = groups[name]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == 1
    # the config is mounted where the entrypoint reads it, on every Ray pod
    for _, pod in pod_specs([job])[1:]:
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert mounts["config"] == "/etc/harpo"
        assert volumes["config"]["configMap"]["name"] == "harpo-config"
        assert mounts["tmp"] == "/tmp" and mounts["ray-tmp"] == "/tmp/ray"
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    # KubeRay's autoscaler sidecar shares the head's /tmp/ray (Ray's session and logs)
    head = spec["headGroupSpec"]["template"]["spec"]
    head_mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    sidecar = {m["mountPath"]: m["name"] for m in spec["autoscalerOptions"]["volumeMounts"]}
    assert sidecar["/tmp/ray"] == head_mounts["/tmp/ray"] and sidecar["/tmp"] == head_mounts["/tmp"]
    assert train_config(docs)["run"]["output_dir"] == "/workspace/runs/harpo"
    assert one(docs, "PersistentVolumeClaim")["metadata"]["name"] == "harpo-workspace"


def test_cluster_mode_submits_with_ray_job_submit(tmp_path):
    docs = helm_template(sets=("mode=cluster", "extraArgs={--set,run.steps=7}"))
    cluster = one(docs, "RayCluster")
    job = one(docs, "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RAY_ADDRESS"] == f"http://{cluster['metadata']['name']}-head-svc.ml.svc:8265"
    script = container["args"][0]
    assert "ray job submit" in script and '--submission-id "$SUBMISSION_ID"' in script
    assert '-- "$ENTRYPOINT"' in script
    assert job["metadata"]["name"].endswith("-submit-1")  # one Job per release revision
    # The entrypoint waits until the head's mounted config is this revision's, then trains.
    data = [d for d in by_kind(docs, "ConfigMap")
            if "config.yaml" in d["data"]][0]["data"]["config.yaml"]
    config = tmp_path / "config.yaml"
    config.write_text(data)
    entry = env["ENTRYPOINT"].replace("/etc/harpo/config.yaml", str(config))
    assert entry.endswith(f"exec harpo train {config} --address auto '--set' 'run.steps=7'")
    result = subprocess.run(["sh", "-c", entry.replace("exec harpo", "exec echo harpo")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"harpo train {config} --address auto --set run.steps=7\n"


def test_extra_args_are_shell_quoted():
    docs = helm_template(sets=("extraArgs={--set,run.steps=7}",))
    entry = one(docs, "RayJob")["spec"]["entrypoint"]
    assert entry == "harpo train /etc/harpo/config.yaml --address auto '--set' 'run.steps=7'"


def test_control_token_secret_value_and_existing_secret():
    docs = helm_template(sets=("control.token.value=s3cr3t",))
    secret = one(docs, "Secret")
    assert base64.b64decode(secret["data"]["token"]).decode() == "s3cr3t"
    docs = helm_template(sets=("control.token.existingSecret=mine", "control.token.secretKey=k"))
    assert not by_kind(docs, "Secret")
    head = cluster_spec(docs)["headGroupSpec"]["template"]["spec"]["containers"][0]
    ref = {e["name"]: e for e in head["env"]}["HARPO_CONTROL_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "mine", "key": "k"}
    # only the head (the driver) gets the token
    for group in cluster_spec(docs)["workerGroupSpecs"]:
        names = {e["name"] for e in group["template"]["spec"]["containers"][0]["env"]}
        assert "HARPO_CONTROL_TOKEN" not in names


def test_control_tls_and_checkpoint_uri():
    docs = helm_template(sets=("control.tls.secretName=harpo-tls",
                               "checkpointUri=s3://bucket/harpo", "persistence.enabled=false"))
    config = train_config(docs)
    assert config["control"]["tls_cert"] == "/etc/harpo-tls/tls.crt"
    assert config["control"]["tls_key"] == "/etc/harpo-tls/tls.key"
    head = cluster_spec(docs)["headGroupSpec"]["template"]["spec"]
    assert {"name": "control-tls", "mountPath": "/etc/harpo-tls", "readOnly": True} in \
        head["containers"][0]["volumeMounts"]
    env = {e["name"]: e.get("value") for e in head["containers"][0]["env"]}
    assert env["HARPO_CHECKPOINT_URI"] == "s3://bucket/harpo"
    assert not by_kind(docs, "PersistentVolumeClaim")
    assert_valid(docs)


def test_gcs_fault_tolerance_renders_kuberays_options():
    """Off by default; on, the RayCluster spec carries KubeRay's gcsFaultToleranceOptions
    (external Redis, password from a Secret) and still validates."""
    assert "gcsFaultToleranceOptions" not in cluster_spec(helm_template())
    docs = helm_template(sets=("gcsFaultTolerance.enabled=true",
                               "gcsFaultTolerance.redisAddress=redis.ray:6379",
                               "gcsFaultTolerance.redisPasswordSecret=redis-auth"))
    assert cluster_spec(docs)["gcsFaultToleranceOptions"] == {
        "redisAddress": "redis.ray:6379",
        "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "redis-auth",
                                                         "key": "password"}}}}
    assert_valid(docs)


def test_one_gpu_node_colocates_learner_on_the_rollout_pod():
    docs = helm_template(CHART / "examples" / "one-gpu-node.yaml")
    groups = {g["groupName"]: g for g in cluster_spec(docs)["workerGroupSpecs"]}
    assert set(groups) == {"rollout", "reward"}  # learner.replicas 0: no learner group
    resources = json.loads(json.loads(groups["rollout"]["rayStartParams"]["resources"]))
    assert resources == {"rollout": 1, "learner": 1}


def test_cpu_smoke_needs_no_gpu_and_builds_the_tiny_assets():
    docs = helm_template(CHART / "examples" / "cpu-smoke.yaml")
    text = yaml.safe_dump_all(docs)
    assert "nvidia.com/gpu" not in text
    head = cluster_spec(docs)["headGroupSpec"]["template"]["spec"]
    (prepare,) = head["initContainers"]
    assert prepare["command"][:3] == ["harpo", "init-tiny", "/workspace/tiny"]
    config = train_config(docs)
    assert config["model"]["path"].startswith("/workspace/tiny/")
    assert config["rollout"]["backend"] == "hf"
    for _, pod in pod_specs(docs):
        for c in pod.get("initContainers", []) + pod["containers"]:
            assert c["image"].endswith("-cpu"), c["image"]


def test_prometheus_rule_is_the_projects_rules_and_passes_promtool(tmp_path):
    docs = helm_template(CHART / "examples" / "multi-node.yaml")
    rule = one(docs, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES.read_text()), SYNC_HINT
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    alerts = sum(len(g["rules"]) for g in rule["spec"]["groups"])
    assert f"SUCCESS: {alerts} rules found" in promtool_check(rule["spec"], tmp_path)


def test_dashboard_configmap_and_monitors():
    docs = helm_template(CHART / "examples" / "multi-node.yaml")
    (dashboard,) = [d for d in by_kind(docs, "ConfigMap")
                    if d["metadata"]["name"].endswith("-dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "monitoring"
    shipped = json.loads(dashboard["data"]["harpo-dashboard.json"])
    assert shipped == json.loads(DASHBOARD.read_text()), SYNC_HINT
    monitor = one(docs, "ServiceMonitor")
    service = [s for s in by_kind(docs, "Service") if s["metadata"]["name"].endswith("-driver")][0]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["honorLabels"] is True  # the series' own `job` label is the training run
    pod_monitor = one(docs, "PodMonitor")
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_monitoring_objects_can_be_turned_off():
    docs = helm_template(sets=("serviceMonitor.enabled=false", "prometheusRule.enabled=false",
                               "dashboard.enabled=false", "podMonitor.enabled=false",
                               "networkPolicy.enabled=false"))
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"ServiceMonitor", "PrometheusRule", "PodMonitor", "NetworkPolicy"}


def test_chart_files_are_copies_of_the_sources():
    assert (CHART / "files" / "harpo-rules.yaml").read_text() == RULES.read_text(), SYNC_HINT
    assert (CHART / "files" / "harpo-dashboard.json").read_text() == DASHBOARD.read_text(), \
        SYNC_HINT


def _expected_message(path: Path) -> list[str]:
    lines = [line.removeprefix("# expect:").strip() for line in path.read_text().splitlines()
             if line.startswith("# expect:")]
    assert lines, f"{path.name} names no expected message (# expect: ...)"
    return lines


@pytest.mark.parametrize("bad", BAD_VALUES, ids=[p.stem for p in BAD_VALUES])
def test_bad_values_are_rejected_with_a_clear_message(bad):
    message = helm_error(bad)
    for expected in _expected_message(bad):
        assert expected in message, f"expected {expected!r} in:\n{message}"


def test_bad_values_are_reported_by_lint():
    """`helm lint --strict` fails on schema violations; the template checks (`fail`), which
    helm lint only logs, still show their message there (install/template fail on them)."""
    for bad in BAD_VALUES:
        result = run(tool("helm"), "lint", "--strict", str(CHART), "-f", str(bad))
        output = result.stdout + result.stderr
        for expected in _expected_message(bad):
            assert expected in output, f"lint of {bad.name} does not say {expected!r}:\n{output}"
        if "values don't meet the specifications of the schema" in output:
            assert result.returncode != 0, f"helm lint accepted {bad.name}"


def test_values_are_documented():
    """Every key of values.yaml down to the second level has a comment line right above it
    (the sections of `config` are documented by services/config.py)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented, parents = [], []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")):
            continue
        indent = len(line) - len(line.lstrip())
        parents = [p for p in parents if p[0] < indent] + [(indent, stripped.split(":")[0])]
        path = [key for _, key in parents]
        if len(path) > 2 or (path[0] == "config" and len(path) > 1):
            continue
        if i == 0 or not lines[i - 1].strip().startswith("#"):
            undocumented.append(".".join(path))
    assert not undocumented, f"values.yaml keys without a comment right above: {undocumented}"


def test_values_schema_rejects_unknown_config_sections():
    """The schema's config sections are exactly the training config's (services/config.py)."""
    from services.config import TrainConfig

    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(schema["properties"]["config"]["properties"]) == set(TrainConfig.model_fields)
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False


def test_notes_tell_how_to_reach_the_job(tmp_path):
    """NOTES.txt (helm shows it after install; `helm template` does not render it): rendered
    through a copy of the chart in which it is wrapped as a template."""
    chart = tmp_path / "harpo"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    wrapped = "notes: |\n" + "".join(f"  {line}\n" for line in notes.splitlines())
    (chart / "templates" / "zz-notes.yaml").write_text(wrapped)
    result = run(tool("helm"), "template", "harpo", str(chart), "-n", "ml",
                 "-s", "templates/zz-notes.yaml")
    assert result.returncode == 0, result.stderr
    text = yaml.safe_load(result.stdout)["notes"]
    assert "kubectl -n ml get rayjob harpo -w" in text
    assert "port-forward svc/harpo-driver 50051:50051" in text
    assert "get secret harpo-control-token" in text
    assert "harpo status --control localhost:50051" in text
