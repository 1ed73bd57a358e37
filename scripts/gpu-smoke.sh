#!/usr/bin/env bash
# GPU smoke test: a 2-step harpo run with vLLM + FSDP2 + collective weight sync in bf16 on a
# randomly initialised Qwen2.5-0.5B-shaped model (built here, nothing downloaded), then prints
# tokens/s, step time, weight-sync time and peak GPU memory.
#
#   scripts/gpu-smoke.sh [--out DIR] [--gpus N] [--dry-run]
#
#   --out DIR   where the model, data, config (smoke.yaml) and run go (default runs/gpu-smoke)
#   --gpus N    GPUs on this node to use (default: all that nvidia-smi lists)
#   --dry-run   no GPU needed: build the model on the meta device (shape, parameter count),
#               write and validate the config, and print `harpo plan` for it if that command
#               exists; nothing is trained
#
# Needs harpo installed with the gpu extra (pip install '.[gpu]', or the image of
# deploy/docker/Dockerfile.gpu). PYTHON picks the interpreter (default python3).
#
# STATUS: this script has not run on a GPU. Only --dry-run has run (on CPU, in
# tests/deploy/test_gpu_smoke.py). Its first GPU run is where its figures come from.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
OUT="runs/gpu-smoke"
GPUS=""
DRY_RUN=0

while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --gpus) GPUS="$2"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu-smoke: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}" RAY_USAGE_STATS_ENABLED=0
harpo() { "$PYTHON" -m services.cli "$@"; }
has_plan() { harpo plan --help >/dev/null 2>&1; }

if [[ $DRY_RUN -eq 0 ]]; then
    if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
        echo "gpu-smoke: no NVIDIA GPU here (nvidia-smi fails); use --dry-run on a CPU machine" >&2
        exit 2
    fi
    GPUS="${GPUS:-$(nvidia-smi -L | wc -l)}"
fi
GPUS="${GPUS:-1}"

mkdir -p "$OUT"
DRY=()
[[ $DRY_RUN -eq 1 ]] && DRY=(--dry-run)
"$PYTHON" "$ROOT/scripts/gpu_smoke.py" prepare "$OUT" --gpus "$GPUS" "${DRY[@]}"

if has_plan; then
    harpo plan "$OUT/smoke.yaml"
else
    echo "gpu-smoke: this harpo has no 'plan' command; memory plan skipped"
fi
[[ $DRY_RUN -eq 1 ]] && { echo "gpu-smoke: dry run done, nothing trained"; exit 0; }

# Peak memory per GPU: sample every 200 ms while the run lasts.
nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 200 \
    > "$OUT/gpu-memory.csv" &
SAMPLER=$!
trap 'kill "$SAMPLER" 2>/dev/null || true' EXIT

START=$(date +%s)
harpo train "$OUT/smoke.yaml" --overwrite
echo "gpu-smoke: harpo train took $(( $(date +%s) - START )) s (start-up included)"
kill "$SAMPLER" 2>/dev/null || true
"$PYTHON" "$ROOT/scripts/gpu_smoke.py" report "$OUT"
