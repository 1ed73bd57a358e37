#!/usr/bin/env python3
"""Validate Kubernetes manifests offline: built-in kinds and the CRDs harpo uses.

Built-in kinds (ConfigMap, Service, Job, NetworkPolicy, ...) are checked with
`kubernetes-validate` against the Kubernetes OpenAPI schema of KUBERNETES_VERSION, strictly
(unknown fields are errors). The custom resources are checked with `jsonschema` against the
schemas in this directory: KubeRay RayCluster/RayJob (ray.io/v1) and prometheus-operator
ServiceMonitor/PodMonitor/PrometheusRule (monitoring.coreos.com/v1); the pod templates inside
RayCluster/RayJob are checked as Kubernetes PodTemplateSpecs as well.

    helm template harpo deploy/helm/harpo | python deploy/schemas/validate.py -
    kubectl kustomize k8s/overlays/rayjob | python deploy/schemas/validate.py -

Exit status 0 when every document is valid, 1 otherwise (each problem printed on a line).
Needs: pip install kubernetes-validate jsonschema pyyaml
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import cache
from pathlib import Path

import yaml

SCHEMA_DIR = Path(__file__).resolve().parent
# The Kubernetes version manifests are validated against (the kubectl that
# scripts/install-helm.sh installs is 1.32).
KUBERNETES_VERSION = "1.32"

CRD_SCHEMAS = {
    ("ray.io/v1", "RayCluster"): "raycluster.schema.json",
    ("ray.io/v1", "RayJob"): "rayjob.schema.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.schema.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor.schema.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.schema.json",
}


def load_documents(text: str) -> list[dict]:
    """The non-empty YAML documents of a multi-document stream."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def describe(doc: dict) -> str:
    name = (doc.get("metadata") or {}).get("name", "?")
    return f"{doc.get('kind', '?')}/{name}"


@cache
def _crd_validator(filename: str):
    import jsonschema

    schema = json.loads((SCHEMA_DIR / filename).read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(where, PodTemplateSpec) of every pod template inside a RayCluster or RayJob."""
    spec = doc.get("spec") or {}
    found = []
    if doc.get("kind") == "RayJob":
        if isinstance(spec.get("submitterPodTemplate"), dict):
            found.append(("spec.submitterPodTemplate", spec["submitterPodTemplate"]))
        cluster, prefix = spec.get("rayClusterSpec") or {}, "spec.rayClusterSpec"
    elif doc.get("kind") == "RayCluster":
        cluster, prefix = spec, "spec"
    else:
        return found
    head = cluster.get("headGroupSpec") or {}
    if isinstance(head.get("template"), dict):
        found.append((f"{prefix}.headGroupSpec.template", head["template"]))
    for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
        if isinstance(group, dict) and isinstance(group.get("template"), dict):
            found.append((f"{prefix}.workerGroupSpecs[{i}].template", group["template"]))
    return found


def _builtin_errors(doc: dict, version: str) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path) or "(top level)"
        return [f"{path}: {exc.message}"]
    except kubernetes_validate.utils.SchemaNotFoundError as exc:
        return [exc.message]
    return []


def validate_document(doc: dict, version: str = KUBERNETES_VERSION) -> list[str]:
    """Problems of one manifest, each prefixed with KIND/NAME; empty when it is valid."""
    where = describe(doc)
    if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
        return [f"{where}: not a Kubernetes object (apiVersion and kind are required)"]
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        validator = _crd_validator(CRD_SCHEMAS[key])
        errors = [
            f"{where}: {'.'.join(str(p) for p in e.absolute_path) or '(top level)'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        ]
        for path, template in pod_templates(doc):
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate",
                       "metadata": {"name": "pod-template"}, "template": template}
            errors += [f"{where}: {path}: {message.removeprefix('template.')}"
                       for message in _builtin_errors(wrapped, version)]
        return errors
    return [f"{where}: {message}" for message in _builtin_errors(doc, version)]


def validate_documents(docs: list[dict], version: str = KUBERNETES_VERSION) -> list[str]:
    errors = []
    for doc in docs:
        errors += validate_document(doc, version)
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="manifest files ('-' for standard input)")
    parser.add_argument("--kubernetes-version", default=KUBERNETES_VERSION,
                        help=f"Kubernetes version of the schemas (default {KUBERNETES_VERSION})")
    args = parser.parse_args(argv)
    errors, count = [], 0
    for name in args.files:
        text = sys.stdin.read() if name == "-" else Path(name).read_text()
        docs = load_documents(text)
        count += len(docs)
        errors += validate_documents(docs, args.kubernetes_version)
    for error in errors:
        print(f"ERROR {error}")
    print(f"{count} documents, {len(errors)} problems")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
