"""Steady-state environment steps per second of a training script, updates included, measured on a real run.

Runs the script as a subprocess with one torch thread, then divides the global steps between the first and the last
`losses/qf1_loss` TensorBoard points (all after learning_starts, so every step includes its update) by the wall time
between them. Prints one JSON line with the SPS and the parameter counts from config.json.

Usage: python benchmarks/sps.py sac_fetch_mlp.py [--env-id ID] [--steps 4000] [-- more script args]

`training_command`, `RUN_ENV` and `steady_sps` are shared with benchmarks/speed.py (and the last two with
benchmarks/snake/sps.py), so they all measure the same way.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

RUN_ENV = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}  # one torch thread (torch reads OMP_NUM_THREADS)


def training_command(script: str, env_id: str, steps: int, run_dir: str, extra=()) -> list[str]:
    """The training run: `steps` env steps, one evaluation at the end (outside the SPS window), runs in `run_dir`."""
    return [sys.executable, script, "--env-id", env_id, "--total-timesteps", str(steps),
            "--eval-frequency", str(steps), "--run-dir", run_dir, "--exp-name", "sps", *extra]  # fmt: skip


def steady_sps(run_dir: str, tag: str = "losses/qf1_loss") -> dict:
    """Steady SPS of the one run in `run_dir` between the first and last points of the per-update loss `tag`, the
    wall times of that window, and its parameter counts."""
    (run_path,) = glob.glob(os.path.join(run_dir, "*"))
    points = EventAccumulator(run_path).Reload().Scalars(tag)
    first, last = points[0], points[-1]
    with open(os.path.join(run_path, "config.json")) as f:
        config = json.load(f)
    return {
        "steady_sps": round((last.step - first.step) / (last.wall_time - first.wall_time), 1),
        "window_steps": (first.step, last.step),
        "window_wall_time": (first.wall_time, last.wall_time),
        "actor_params": config.get("actor_params"),
        "critic_params": config.get("critic_params"),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("script")
    parser.add_argument("--env-id", default="FetchReachDense-v4")
    parser.add_argument("--steps", type=int, default=4000, help="total env steps; updates start after 1000")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    cli = parser.parse_args(argv[: len(argv) - len(extra) - (1 if extra else 0)])

    with tempfile.TemporaryDirectory() as run_dir:
        cmd = training_command(cli.script, cli.env_id, cli.steps, run_dir, extra)
        env = {**os.environ, **RUN_ENV}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result = steady_sps(run_dir)
    record = {
        "script": os.path.basename(cli.script),
        "env_id": cli.env_id,
        "args": " ".join(extra),
        "steady_sps": result["steady_sps"],
        "actor_params": result["actor_params"],
        "critic_params": result["critic_params"],
    }
    print(json.dumps(record))
