#!/usr/bin/env bash
# The "Does HARPO balance?" study (issue 20, item 5): every estimator, HARPO's zero-signal
# policies and a beta sweep, on the imbalance suite and on the demo's suite, several seeds each.
# Each suite is one `harpo compare` study directory; running this script again resumes it
# (finished runs are kept), so it can be stopped and restarted at will.
#
#   scripts/study.sh                     # the full study (days on 2 CPU cores; see RESULTS.md)
#   SEEDS=1 STEPS=12 SUITES=imbalance ESTIMATORS=grpo,harpo scripts/study.sh   # a slice
#
# Settings (environment variables):
#   SUITES       imbalance and/or default                       [imbalance default]
#   SEEDS        seeds per estimator  [8: RESULTS.md "Does HARPO balance?" says why]
#   STEPS        RL steps per run                               [40, the demo's budget]
#   ESTIMATORS   comma-separated `harpo compare` variants       [the list below]
#   OUT          where the assets, warm starts and studies go   [runs/study]
#   HARPO        the harpo command                              [harpo]
#   EXTRA        more `harpo compare` arguments, e.g. "--address auto --parallel 8"
set -euo pipefail
cd "$(dirname "$0")/.."

SUITES=${SUITES:-"imbalance default"}
SEEDS=${SEEDS:-8}
STEPS=${STEPS:-40}
OUT=${OUT:-runs/study}
HARPO=${HARPO:-harpo}
EXTRA=${EXTRA:-}
# the paper's six and HARPO; HARPO's zero-signal policies; a beta sweep (the EMA of the task
# signal and of the sample signal; defaults 0.95 / 0.95); the newer multi-task estimators
DEFAULT_ESTIMATORS="grpo,dr_grpo,rloo,reinforce_pp_baseline,gpg,ema_grpo,harpo"
DEFAULT_ESTIMATORS+=",harpo:zero_signal=floor"
DEFAULT_ESTIMATORS+=",harpo:beta_rho=0.8:beta_s=0.8,harpo:beta_rho=0.99:beta_s=0.99"
DEFAULT_ESTIMATORS+=",harpo:beta_rho=0.8:beta_s=0.99,harpo:beta_rho=0.99:beta_s=0.8"
DEFAULT_ESTIMATORS+=",g2rpo,mt_grpo,gdpo"
ESTIMATORS=${ESTIMATORS:-$DEFAULT_ESTIMATORS}

# Assets and the warm start: bounded by steps, so every run of a suite starts from one model.
warm_start() {  # SUITE DIR
  local suite=$1 dir=$2
  [ -f "$dir/assets/tiny_assets.json" ] || $HARPO init-tiny "$dir/assets" --suite "$suite"
  [ -f "$dir/sft/model.safetensors" ] || $HARPO sft --model "$dir/assets/model" \
      --data "$dir/assets/data" --out "$dir/sft" --steps 300 --lr 1e-2
}

for suite in $SUITES; do
  dir=$OUT/$suite
  warm_start "$suite" "$dir"
  sets=(--set "run.steps=$STEPS" --set "model.path=$PWD/$dir/sft"
        --set "data.path=$PWD/$dir/assets/data")
  case $suite in
    imbalance) config=examples/imbalance.yaml ;;
    default)   config=examples/tiny.yaml
               # the demo's RL settings (services/demo.py demo_config)
               sets+=(--set data.prompts_per_step=28 --set data.eval_prompts_per_task=100
                      --set rollout.max_new_tokens=32 --set learner.lr=3e-4
                      --set learner.mini_batch_prompts=14 --set run.checkpoint_every=10
                      --set observability.progress=never) ;;
    *) echo "unknown suite $suite (imbalance, default)" >&2; exit 2 ;;
  esac
  # shellcheck disable=SC2086  # EXTRA is split on purpose
  $HARPO compare "$config" --estimators "$ESTIMATORS" --seeds "$SEEDS" "${sets[@]}" \
      --out "$dir/compare" $EXTRA
done
