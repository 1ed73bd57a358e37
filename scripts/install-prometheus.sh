#!/usr/bin/env bash
# Install the Prometheus server and promtool (Debian package `prometheus`).
#
# The alert-rule tests (`promtool check/test rules`) and the end-to-end test (a real Prometheus
# scraping a running job) need both binaries. Debian's package is the one source reachable from
# the build machines, so this script uses apt; it does nothing when promtool is already on PATH.
set -euo pipefail

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    echo "promtool already installed: $(command -v promtool)"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: promtool is not on PATH and apt-get is not available;" \
         "install Prometheus (which ships promtool) from https://prometheus.io/download/" >&2
    exit 1
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    echo "error: installing the 'prometheus' package needs root; run this script as root" \
         "or install sudo" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# A fresh container has no package lists; only fetch them when the package is unknown.
if ! apt-cache show prometheus >/dev/null 2>&1; then
    "${SUDO[@]}" apt-get update
fi
"${SUDO[@]}" apt-get install -y --no-install-recommends prometheus

# The package starts a service on systems with an init; the tests run their own server.
command -v promtool >/dev/null
echo "installed $(promtool --version 2>&1 | head -n1)"
