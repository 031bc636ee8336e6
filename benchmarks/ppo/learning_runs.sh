#!/usr/bin/env bash
# The learning runs of docs/BENCHMARKS.md ("ppo_atari.py and rpo_mujoco.py: learning"), one after the other, each for
# a wall-clock budget: a run that reaches its budget is stopped with SIGTERM, writes checkpoint.pt at its next update
# boundary and exits with code 3; the same command (same --run-dir and --run-name) resumes it later.
#   bash benchmarks/ppo/learning_runs.sh RUN_DIR [HALFCHEETAH_MINUTES] [HOPPER_MINUTES] [BREAKOUT_MINUTES]
# A budget of 0 skips that run, so the runs can share the cores, e.g. one core each:
#   bash benchmarks/ppo/learning_runs.sh runs/learning 12 12 0 & bash benchmarks/ppo/learning_runs.sh runs/learning 0 0 120
# CleanRL's defaults throughout (10M / 8M / 8M total steps, so the learning-rate schedule is CleanRL's); one seed each.
# KILL_AFTER (seconds, default 600): how long a stopped run may take to reach its update boundary before SIGKILL.
set -uo pipefail
cd "$(dirname "$0")/../.."
run_dir="${1:?usage: learning_runs.sh RUN_DIR [HALFCHEETAH_MIN] [HOPPER_MIN] [BREAKOUT_MIN]}"
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore

budgeted() {  # budgeted MINUTES NAME COMMAND...: run COMMAND, SIGTERM after MINUTES (it checkpoints and exits 3)
    local minutes="$1" name="$2"
    shift 2
    [ "$minutes" = 0 ] && return
    echo "+ $* (budget $minutes min)" >&2
    timeout --signal=TERM --kill-after="${KILL_AFTER:-600}" "${minutes}m" "$@" >"$run_dir/$name.jsonl" 2>"$run_dir/$name.log"
    echo "$name exit code $?" >&2
}

mkdir -p "$run_dir"
budgeted "${2:-30}" halfcheetah python rpo_mujoco.py --env-id HalfCheetah-v5 --seed 1 --eval-frequency 40960 \
    --eval-episodes 10 --final-eval-episodes 10 --run-dir "$run_dir" --run-name halfcheetah_s1
budgeted "${3:-30}" hopper python rpo_mujoco.py --env-id Hopper-v5 --seed 1 --eval-frequency 40960 \
    --eval-episodes 10 --final-eval-episodes 10 --run-dir "$run_dir" --run-name hopper_s1
budgeted "${4:-120}" breakout python ppo_atari.py --env-id BreakoutNoFrameskip-v4 --seed 1 --eval-frequency 100000 \
    --eval-episodes 10 --final-eval-episodes 10 --checkpoint-frequency 100000 --run-dir "$run_dir" --run-name breakout_s1
