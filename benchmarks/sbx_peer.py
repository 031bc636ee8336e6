"""Side-by-side speed against Stable Baselines Jax (SBX): steady env steps/s of `sac_fetch_mlp.py` and of SBX 0.28 SAC
+ SB3's HerReplayBuffer (benchmarks/sbx_sac_her_sps.py) on FetchReachDense-v4, one thread each, run alternately.

SBX is not a project dependency: it runs from a venv of its own. One-time set-up (jaxlib from PyPI is the CPU build;
torch is SB3's dependency, its CPU wheel is enough: add `--extra-index-url https://download.pytorch.org/whl/cpu`
where PyPI would otherwise bring the CUDA build):

    python3 -m venv /tmp/sbx-venv && /tmp/sbx-venv/bin/pip install "sbx-rl==0.28.0" "stable-baselines3==2.9.2" \
        "jax==0.10.2" "jaxlib==0.10.2" "flax==0.12.8" "optax==0.2.8" "tfp-nightly==0.26.0.dev20261027" \
        "numpy==2.4.6" "torch==2.13.0" "gymnasium==1.2.2" "gymnasium-robotics==1.4.2" "mujoco==3.11.0"

(gymnasium, gymnasium-robotics and mujoco at the project venv's versions, so both runs step the same simulator; jax
0.10.2 is the newest that sbx-rl 0.28.0 accepts with these, numpy 2 the one it brings.)

Usage (from the repository root, in the project venv):

    python benchmarks/sbx_peer.py --sbx-python /tmp/sbx-venv/bin/python --steps 5000 --repeats 2 [--core 0]

What it does: `--repeats` times, SBX then `sac_fetch_mlp.py`, one run at a time (never two at once), each for
`--steps` env steps with one thread. The same repeat's two runs are neighbours in time, so their ratio is the figure
to quote; a machine running other jobs slows both, which the CPU-time columns show.

- sac_fetch_mlp.py: the project venv's python, `--env-id FetchReachDense-v4 --update-ratio 1`, its defaults otherwise
  (256x256, batch 256, gamma 0.95, tau 0.05, policy_frequency 2, HER k=4 future, learning_starts 1000), plus
  `--eval-episodes 2 --final-eval-episodes 0` and one evaluation at the last step (after the last loss point, outside
  the window), OMP_NUM_THREADS=1 (one torch thread). The observation normaliser stays ON: it is part of the default
  algorithm a user runs, and SBX has none for HER replay, so sac_fetch_mlp.py does strictly more work per step than
  SBX (the running statistics per step, normalising every batch): the ratio is conservative for sac_fetch_mlp.py.
  `--mlp-args=--no-obs-norm` gives the equal-work figure, the setting of benchmarks/speed.py's SB3 pair.
- SBX: benchmarks/sbx_sac_her_sps.py with `--sbx-python`; its docstring lists the matched and unmatched settings
  (policy_delay 1: one actor update per critic update on average, as policy_frequency 2 does; no normaliser). It
  forces JAX onto the CPU with one thread itself.

Measured: steady SPS (env steps/s, updates included) = global steps between the first and the last loss point (every
100 updates, all after learning_starts, so JIT compilation and the random-action phase fall before the window) / wall
seconds between them; for sac_fetch_mlp.py `losses/qf1_loss` read by benchmarks/sps.py's `steady_sps`, for SBX the
points its script records the same way. Each run's CPU time (user + system, all threads) is sampled every 0.1 s
(benchmarks/sps.py's `run_sampling_cpu`), giving over the same window: "CPU/wall", the cores the run used (about 1.0
for one thread; below 1 when other jobs took the core), and "steps/CPU s", the window's steps per CPU second, the
figure that depends least on other jobs on the machine. `--core N` pins both runs (and this script) to core N.

Output: the CPU model, `torch.backends.cpu.get_cpu_capability()`, the load average before the first run, a table, one
JSON line per run and per repeat's ratio (prefix `JSON `), and the ratios mlp / sbx. Exit status 1 if a run fails.
"""

import argparse
import json
import os
import shlex
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sps import RUN_ENV, cpu_between, cpu_model, run_sampling_cpu, steady_sps, training_command  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MLP = os.path.join(REPO, "sac_fetch_mlp.py")
SBX_SCRIPT = os.path.join(REPO, "benchmarks", "sbx_sac_her_sps.py")
ENV_ID = "FetchReachDense-v4"
LOSS_LOG_EVERY = 100  # updates between two loss points, in both scripts
MIN_STEPS = 1000 + 2 * LOSS_LOG_EVERY  # learning_starts, then at least two loss points
THREAD_ENV = {**RUN_ENV, "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def window_cpu(samples, window_wall_time, window_steps) -> dict:
    """CPU seconds per wall second and steps per CPU second over the window (see the module docstring)."""
    t0, t1 = window_wall_time
    cpu = cpu_between(samples, t0, t1)
    steps = window_steps[1] - window_steps[0]
    return {"window_s": round(t1 - t0, 2), "window_cpu_s": round(cpu, 2), "cpu_per_wall": round(cpu / (t1 - t0), 3),
            "steps_per_cpu_s": round(steps / cpu, 1) if cpu > 0 else None}  # fmt: skip


def run_sbx(sbx_python: str, steps: int, extra: list[str], work: str) -> dict:
    result_path = os.path.join(work, "sbx.json")
    cmd = [sbx_python, SBX_SCRIPT, "--steps", str(steps), "--result", result_path,
           "--points", os.path.join(work, "sbx_points.csv"), *extra]  # fmt: skip
    samples = run_sampling_cpu(cmd, {**os.environ, **THREAD_ENV}, cwd=REPO)
    with open(result_path) as f:
        result = json.load(f)
    return {"run": "sbx", "command": " ".join(["sbx_sac_her_sps.py", "--steps", str(steps), *extra]),
            "steady_sps": result["steady_sps"], "window_steps": result["window_steps"],
            "updates_in_window": result["updates_in_window"],
            **window_cpu(samples, result["window_wall_time"], result["window_steps"]),
            "first_update_s": result["first_update_s"], "actor_params": result["actor_params"],
            "critic_params": result["critic_params"], "versions": {k: result[k] for k in ("sbx", "jax")},
            "jax_devices": result["jax_devices"]}  # fmt: skip


def run_mlp(steps: int, extra: list[str], work: str) -> dict:
    run_dir = os.path.join(work, "runs")
    args = ["--update-ratio", "1", "--eval-episodes", "2", "--final-eval-episodes", "0", *extra]
    cmd = training_command(MLP, ENV_ID, steps, run_dir, args)
    samples = run_sampling_cpu(cmd, {**os.environ, **THREAD_ENV}, cwd=REPO)
    result = steady_sps(run_dir)
    shown = [os.path.basename(MLP), *cmd[2:]]
    del shown[shown.index("--run-dir") : shown.index("--run-dir") + 2]  # a temporary folder
    return {"run": "mlp", "command": " ".join(shown), "steady_sps": result["steady_sps"],
            "window_steps": list(result["window_steps"]),
            "updates_in_window": result["updates_in_window"] * LOSS_LOG_EVERY,  # steady_sps counts loss points
            **window_cpu(samples, result["window_wall_time"], result["window_steps"]),
            "actor_params": result["actor_params"], "critic_params": result["critic_params"]}  # fmt: skip


def print_table(records: list[dict]) -> None:
    print(f"\n{'repeat':>6} {'run':<4} {'steady SPS':>10} {'window steps':>13} {'window s':>8} {'CPU/wall':>8} "
          f"{'steps/CPU s':>11} {'first update s':>14}")  # fmt: skip
    for r in records:
        first = f"{r['first_update_s']:.2f}" if "first_update_s" in r else "-"
        print(f"{r['repeat']:>6} {r['run']:<4} {r['steady_sps']:>10.1f} {'{}-{}'.format(*r['window_steps']):>13} "
              f"{r['window_s']:>8.1f} {r['cpu_per_wall']:>8.2f} {r['steps_per_cpu_s'] or float('nan'):>11.1f} "
              f"{first:>14}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sbx-python", default="/tmp/sbx-venv/bin/python", help="python of the SBX venv")
    parser.add_argument("--steps", type=int, default=5000, help="env steps per run; updates start after 1000")
    parser.add_argument("--repeats", type=int, default=2, help="pairs of runs (sbx, then mlp)")
    parser.add_argument("--core", type=int, help="pin both runs to this CPU core (default: not pinned)")
    parser.add_argument("--mlp-args", default="", help="more sac_fetch_mlp.py flags, e.g. --mlp-args=--no-obs-norm")
    parser.add_argument("--sbx-args", default="", help="more sbx_sac_her_sps.py flags, e.g. '--policy-delay 2'")
    cli = parser.parse_args()
    if cli.steps < MIN_STEPS:
        parser.error(f"--steps must be >= {MIN_STEPS} (two loss points after learning_starts 1000), got {cli.steps}")
    if not os.access(cli.sbx_python, os.X_OK):
        parser.error(f"--sbx-python {cli.sbx_python} is not an executable (set-up: see this script's docstring)")
    if cli.core is not None:
        os.sched_setaffinity(0, {cli.core})  # inherited by every run

    import torch

    header = {"kind": "machine", "cpu_model": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "torch": torch.__version__, "cpus": os.cpu_count(), "pinned_core": cli.core,
              "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]}  # fmt: skip
    print(f"CPU: {header['cpu_model']}; torch {header['torch']} cpu capability {header['cpu_capability']}; "
          f"{header['cpus']} cpus, load average {header['loadavg_1_5_15']}", flush=True)  # fmt: skip
    records, ratios = [], []
    with tempfile.TemporaryDirectory(prefix="sbx-peer-") as tmp:
        try:
            for repeat in range(cli.repeats):
                pair = {}
                for name in ("sbx", "mlp"):
                    print(f"repeat {repeat}: {name}, {cli.steps} steps", flush=True)
                    work = os.path.join(tmp, f"{repeat}-{name}")
                    os.makedirs(work)
                    if name == "sbx":
                        pair[name] = run_sbx(cli.sbx_python, cli.steps, shlex.split(cli.sbx_args), work)
                    else:
                        pair[name] = run_mlp(cli.steps, shlex.split(cli.mlp_args), work)
                    records.append({"kind": "sps", "repeat": repeat, **pair[name]})
                cpu_ratio = None
                if pair["mlp"]["steps_per_cpu_s"] and pair["sbx"]["steps_per_cpu_s"]:
                    cpu_ratio = round(pair["mlp"]["steps_per_cpu_s"] / pair["sbx"]["steps_per_cpu_s"], 3)
                ratios.append({"kind": "ratio", "repeat": repeat,
                               "mlp_over_sbx_sps": round(pair["mlp"]["steady_sps"] / pair["sbx"]["steady_sps"], 3),
                               "mlp_over_sbx_steps_per_cpu_s": cpu_ratio})  # fmt: skip
        except RuntimeError as err:  # a run exited non-zero (run_sampling_cpu: with the end of its stderr)
            print(f"error: {err}", file=sys.stderr)
            return 1
    print_table(records)
    print()
    for record in [header, *records, *ratios]:
        print("JSON " + json.dumps(record))
    print("\nratios mlp / sbx (steady SPS; steps per CPU second)")
    for r in ratios:
        print(f"  repeat {r['repeat']}: {r['mlp_over_sbx_sps']:.2f}x; {r['mlp_over_sbx_steps_per_cpu_s']}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
