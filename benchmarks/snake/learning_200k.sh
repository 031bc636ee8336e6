#!/usr/bin/env bash
# Learning curves of both twins on Snake-v0 (10x10 board, script defaults), 200,000 env steps, seeds 1-3, one run at a
# time with one torch thread (nice'd: the machine may be shared). Each run has a fixed --run-name, so running this
# again resumes an interrupted run and skips the finished ones. Then the steps ratio (benchmarks/snake/ratio.py) and
# the figure and IQM table (compare_runs.py). About an hour of one idle core.
# Usage: bash benchmarks/snake/learning_200k.sh [OUT_DIR] [FIGURE_STEM]   (default figure: docs/figures/snake_200k)
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-runs/bench_snake_200k}"
figure="${2:-docs/figures/snake_200k}"
export OMP_NUM_THREADS=1
for seed in 1 2 3; do
  for script in dqn_snake_cnn dqn_snake_equivariant; do
    nice -n 19 python "$script.py" --total-timesteps 200000 --eval-frequency 10000 --eval-episodes 20 \
      --seed "$seed" --run-dir "$out" --run-name "Snake-v0__${script}__${seed}" > /dev/null
  done
done
python benchmarks/snake/ratio.py "$out"
python compare_runs.py "$out" --metric eval/score --env-id Snake-v0 --out "$figure" --baseline dqn_snake_cnn --crossing first
