"""Steady-state environment steps per second of a training script, updates included, measured on a real run.

Runs the script as a subprocess with one torch thread, then divides the global steps between the first and the last
`losses/qf1_loss` TensorBoard points (all after learning_starts, so every step includes its update) by the wall time
between them. Prints one JSON line with the SPS and the parameter counts from config.json.

Usage: python benchmarks/sps.py sac_fetch_mlp.py [--env-id ID] [--steps 4000] [-- more script args]
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

parser = argparse.ArgumentParser()
parser.add_argument("script")
parser.add_argument("--env-id", default="FetchReachDense-v4")
parser.add_argument("--steps", type=int, default=4000, help="total env steps; updates start after 1000")
argv = sys.argv[1:]
extra = argv[argv.index("--") + 1 :] if "--" in argv else []
cli = parser.parse_args(argv[: len(argv) - len(extra) - (1 if extra else 0)])
cli.extra = extra

with tempfile.TemporaryDirectory() as run_dir:
    cmd = [sys.executable, cli.script, "--env-id", cli.env_id, "--total-timesteps", str(cli.steps),
           "--eval-frequency", str(cli.steps), "--run-dir", run_dir, "--exp-name", "sps", *cli.extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (run_path,) = glob.glob(os.path.join(run_dir, "*"))
    points = EventAccumulator(run_path).Reload().Scalars("losses/qf1_loss")
    first, last = points[0], points[-1]
    with open(os.path.join(run_path, "config.json")) as f:
        config = json.load(f)
record = {
    "script": os.path.basename(cli.script),
    "env_id": cli.env_id,
    "args": " ".join(cli.extra),
    "steady_sps": round((last.step - first.step) / (last.wall_time - first.wall_time), 1),
    "actor_params": config["actor_params"],
    "critic_params": config["critic_params"],
}
print(json.dumps(record))
