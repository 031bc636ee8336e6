#!/usr/bin/env bash
# FetchPush-v4 (sparse reward) runs of docs/BENCHMARKS.md, "Making Push learn": 20 evaluation episodes every 10k env
# steps and the held-out evaluation (100 episodes) at the end; one torch thread per run, MAX_PARALLEL (default 2) at a
# time.
# Usage: bash benchmarks/push.sh OUT_DIR STEPS "SEEDS" RUN [RUN ...]
#   RUN is AGENT[:CONFIG][@SEED] (@SEED: that seed only, instead of SEEDS). AGENT: mlp (sac_fetch_mlp.py,
#   256x256, symmetric normaliser: its defaults), d4 (sac_fetch_equivariant.py --reg-rep-n 32: D_4 at the MLP's width, 2 x 256 channels), d8
#   (--dihedral-n 8 --reg-rep-n 32, 2 x 512 channels), d4p (D_4 with --reg-rep-n 90: the MLP's parameter count, the
#   script's default), d8p (D_8 with --reg-rep-n 64: the same parameter count, 2 x 1024 channels, the default for
#   --dihedral-n 8); mlp512, mlp3x256 and mlp400 are the MLP selection's candidates (--hidden-sizes 512 512,
#   256 256 256, and 400 400: the FLOPs per update of d8p, "matched compute"). CONFIG: a row of CONFIG below, flags
#   on top of the scripts' defaults.
#   Run folder OUT_DIR/FetchPush-v4__push-AGENT[-CONFIG]__SEED (exp_name push-AGENT[-CONFIG]); a stopped run resumes.
#   ENV_ID (default FetchPush-v4) runs another Fetch task the same way (one OUT_DIR per task: the logs are named
#   OUT_DIR/push-AGENT.SEED.log), e.g. ENV_ID=FetchSlide-v4: folders
#   OUT_DIR/FetchSlide-v4__push-AGENT__SEED.
# The comparison (seeds 2-4; seed 1 chose the defaults, so it is not reported there):
#   bash benchmarks/push.sh runs/push_cmp 150000 "2 3 4" mlp d4p d8p d4 d8
#   python compare_runs.py runs/push_cmp --env-id FetchPush-v4 --baseline push-mlp --out docs/figures/push_cmp
# The update-regime ablation (seed 1):
#   bash benchmarks/push.sh runs/push_ablation 150000 1 mlp mlp:no_obs_norm mlp:gamma98_tau005 mlp:old_defaults
# The MLP selection (seed 1 only, FetchPush-v4, 100k env steps; docs/BENCHMARKS.md, "Selecting the MLP"):
#   bash benchmarks/push.sh runs/push_select 100000 1 mlp512 mlp400 mlp3x256 mlp mlp:symnorm mlp400:symnorm
# The fixed-temperature ablation (alpha held at the fast seeds' 5e-3; seeds that were slow with the learned one):
#   bash benchmarks/push.sh runs/push_alpha 100000 2 d4:alpha5e3 d4p:alpha5e3@4
set -euo pipefail
cd "$(dirname "$0")/.."
out="$1" steps="$2" seeds="$3" env_id="${ENV_ID:-FetchPush-v4}"
shift 3
declare -A SCRIPT=([mlp]=sac_fetch_mlp.py [mlp512]=sac_fetch_mlp.py [mlp3x256]=sac_fetch_mlp.py
                  [mlp400]=sac_fetch_mlp.py [d4]=sac_fetch_equivariant.py [d8]=sac_fetch_equivariant.py
                  [d4p]=sac_fetch_equivariant.py [d8p]=sac_fetch_equivariant.py)
declare -A AGENT_FLAGS=([mlp]="" [mlp512]="--hidden-sizes 512 512" [mlp3x256]="--hidden-sizes 256 256 256"
                      [mlp400]="--hidden-sizes 400 400" [d4]="--reg-rep-n 32" [d8]="--dihedral-n 8 --reg-rep-n 32"
                      [d4p]="--reg-rep-n 90" [d8p]="--dihedral-n 8 --reg-rep-n 64")
declare -A CONFIG=(
  [no_obs_norm]="--no-obs-norm"
  [gamma98_tau005]="--gamma 0.98 --tau 0.005"
  [gamma98]="--gamma 0.98"
  [tau005]="--tau 0.005"
  [old_defaults]="--no-obs-norm --gamma 0.98 --tau 0.005"
  [ratio05]="--update-ratio 0.5"
  [ratio025]="--update-ratio 0.25"
  [ratio025_gamma98_tau005]="--update-ratio 0.25 --gamma 0.98 --tau 0.005"
  [ratio025_entropy0]="--update-ratio 0.25 --target-entropy 0"
  [alpha5e3]="--no-autotune --alpha 0.005"
  [symnorm]="--obs-norm-form symmetric"
  [coordnorm]="--obs-norm-form coordinate"
)
export OMP_NUM_THREADS=1
mkdir -p "$out"
running=0
for seed in $seeds; do
  for item in "$@"; do
    run="${item%@*}" run_seed="$seed"
    if [ "$run" != "$item" ]; then
      [ "$seed" = "${seeds%% *}" ] || continue  # an item with its own seed runs once, in the first round
      run_seed="${item##*@}"
    fi
    agent="${run%%:*}" config="${run#*:}"
    [ "$config" = "$run" ] && config=""
    [ -n "${SCRIPT[$agent]+x}" ] || { echo "unknown agent $agent; known: ${!SCRIPT[*]}" >&2; exit 2; }
    [ -z "$config" ] || [ -n "${CONFIG[$config]+x}" ] || { echo "unknown config $config; known: ${!CONFIG[*]}" >&2; exit 2; }
    name="push-$agent${config:+-$config}" flags=""
    [ -z "$config" ] || flags="${CONFIG[$config]}"
    # shellcheck disable=SC2086
    python "${SCRIPT[$agent]}" --env-id "$env_id" --total-timesteps "$steps" --eval-frequency 10000 \
      --eval-episodes 20 --seed "$run_seed" --run-dir "$out" --exp-name "$name" \
      --run-name "${env_id}__${name}__$run_seed" ${AGENT_FLAGS[$agent]} $flags > "$out/$name.$run_seed.log" 2>&1 &
    running=$((running + 1))
    if [ "$running" -ge "${MAX_PARALLEL:-2}" ]; then wait -n; running=$((running - 1)); fi
  done
done
wait
