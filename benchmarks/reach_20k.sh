#!/usr/bin/env bash
# Final evaluation of both twins at 20,000 env steps on FetchReachDense-v4, seeds 1-3, defaults otherwise.
# Two runs at a time (one torch thread each); about 25 minutes on 2 cores. Prints each run's final evaluation.
# Usage: bash benchmarks/reach_20k.sh [OUT_DIR] [more script args, e.g. --bf16]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/bench_reach_20k}"
shift || true
export OMP_NUM_THREADS=1
for seed in 1 2 3; do
  for script in sac_fetch_mlp sac_fetch_equivariant; do
    python "$script.py" --env-id FetchReachDense-v4 --total-timesteps 20000 --eval-frequency 2000 \
      --seed "$seed" --run-dir "$out" "$@" > /dev/null &
  done
  wait
done
python - "$out" <<'PY'
import glob, json, sys
for path in sorted(glob.glob(f"{sys.argv[1]}/*/final_eval.json")):
    r = json.load(open(path))
    curve = [json.loads(line)["eval/success_rate"] for line in open(path.replace("final_eval.json", "evals.jsonl"))]
    print(f'{r["args"]["exp_name"]:24s} seed {r["args"]["seed"]}: success {r["eval/success_rate"]:.2f} return {r["eval/return"]:.2f}'
          f' held-out success {r.get("heldout/success_rate", float("nan")):.2f} return {r.get("heldout/return", float("nan")):.2f}'
          f' curve {" ".join(f"{v:.1f}" for v in curve)}')
PY
