#!/usr/bin/env bash
# The first equivariant-vs-MLP comparison of docs/BENCHMARKS.md: FetchPush-v4 (sparse), every agent at the scripts'
# defaults, 20 evaluation episodes every 10k env steps, the held-out evaluation (100 episodes) at the end; one torch
# thread per run, two runs at a time (2 cores). Seeds 2-4: seed 1 selected the defaults (benchmarks/push_regime.sh),
# so it is not reported here. AGENT is mlp (256x256), d4 (the equivariant default) or d8 (--dihedral-n 8).
# Usage: bash benchmarks/push_compare.sh OUT_DIR STEPS "SEEDS" AGENT [AGENT ...]
#   e.g. bash benchmarks/push_compare.sh runs/push_cmp 300000 "2 3 4" mlp d4 d8
#   then python compare_runs.py runs/push_cmp --env-id FetchPush-v4 --out docs/figures/push_cmp
set -euo pipefail
cd "$(dirname "$0")/.."
out="$1" steps="$2" seeds="$3"
shift 3
declare -A SCRIPT=([mlp]=sac_fetch_mlp.py [d4]=sac_fetch_equivariant.py [d8]=sac_fetch_equivariant.py)
declare -A FLAGS=([mlp]="" [d4]="" [d8]="--dihedral-n 8")
export OMP_NUM_THREADS=1
mkdir -p "$out"
running=0
for seed in $seeds; do
  for agent in "$@"; do
    [ -n "${SCRIPT[$agent]+x}" ] || { echo "unknown agent $agent; known: ${!SCRIPT[*]}" >&2; exit 2; }
    # shellcheck disable=SC2086
    python "${SCRIPT[$agent]}" --env-id FetchPush-v4 --total-timesteps "$steps" --eval-frequency 10000 \
      --eval-episodes 20 --seed "$seed" --run-dir "$out" --exp-name "push-$agent" \
      --run-name "FetchPush-v4__push-${agent}__${seed}" ${FLAGS[$agent]} > "$out/$agent.$seed.log" 2>&1 &
    running=$((running + 1))
    if [ "$running" -ge 2 ]; then wait -n; running=$((running - 1)); fi
  done
done
wait
