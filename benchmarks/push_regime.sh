#!/usr/bin/env bash
# The "make Push learn" experiments of docs/BENCHMARKS.md: one script on FetchPush-v4 (sparse reward), 300k env steps,
# 20 evaluation episodes every 10k steps, the held-out evaluation (100 episodes) at the end; one torch thread per run,
# two runs at a time (2 cores). Each NAME is a row of CONFIG below (flags on top of the script's defaults).
# Usage: bash benchmarks/push_regime.sh OUT_DIR SCRIPT SEED NAME [NAME ...]
#   e.g. bash benchmarks/push_regime.sh runs/push_regime sac_fetch_mlp.py 1 old norm_r025
set -euo pipefail
cd "$(dirname "$0")/.."
out="$1" script="$2" seed="$3"
shift 3
declare -A CONFIG=(
  [old]="--no-obs-norm --update-ratio 1"
  [r025]="--no-obs-norm --update-ratio 0.25"
  [norm]="--update-ratio 1"
  [norm_r025]="--update-ratio 0.25"
  [norm_r025_g95_t05]="--update-ratio 0.25 --gamma 0.95 --tau 0.05"
  [norm_r05_g95_t05]="--update-ratio 0.5 --gamma 0.95 --tau 0.05"
  [norm_r025_g95]="--update-ratio 0.25 --gamma 0.95"
  [norm_r025_t05]="--update-ratio 0.25 --tau 0.05"
  [norm_r025_g95_t05_te0]="--update-ratio 0.25 --gamma 0.95 --tau 0.05 --target-entropy 0"
  [norm_r025_g95_t05_ls20k]="--update-ratio 0.25 --gamma 0.95 --tau 0.05 --learning-starts 20000"
  [norm_r05_g95_t05_te0]="--update-ratio 0.5 --gamma 0.95 --tau 0.05 --target-entropy 0"
  [norm_r1_g95_t05]="--update-ratio 1 --gamma 0.95 --tau 0.05"
  [r05_g95_t05]="--no-obs-norm --update-ratio 0.5 --gamma 0.95 --tau 0.05"
  [norm_r05]="--update-ratio 0.5"
  [defaults]=""
)
export OMP_NUM_THREADS=1
running=0
for name in "$@"; do
  [ -n "${CONFIG[$name]+x}" ] || { echo "unknown config $name; known: ${!CONFIG[*]}" >&2; exit 2; }
  # shellcheck disable=SC2086
  python "$script" --env-id FetchPush-v4 --total-timesteps 300000 --eval-frequency 10000 --eval-episodes 20 \
    --seed "$seed" --run-dir "$out" --exp-name "$(basename "$script" .py)-$name" ${CONFIG[$name]} \
    > "$out.$name.$seed.log" 2>&1 &
  running=$((running + 1))
  if [ "$running" -ge 2 ]; then wait -n; running=$((running - 1)); fi
done
wait
