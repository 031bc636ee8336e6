"""Steady-state environment steps per second of dqn_snake_equivariant.py or dqn_snake_cnn.py, updates included.

Runs the script as a subprocess with one torch thread and divides the global steps between the first and the last
`losses/td_loss` TensorBoard points (all after learning_starts, so every vector step includes its gradient update) by
the wall time between them (`steady_sps`) and by the CPU time the training process used between them
(`steady_sps_cpu`: user + system time sampled from /proc every 0.2 s and interpolated at the two points). On an idle
core the two agree; on a shared machine the wall-time figure falls while the CPU-time one stays near the idle value.
One evaluation at the end (outside the window), no held-out evaluation. Prints one JSON line with both figures, the
load average over the run and the parameter count from config.json.

Usage: python benchmarks/snake/sps.py dqn_snake_cnn.py [--steps 14000] [--learning-starts 4000] [-- more script args]
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sps import RUN_ENV, steady_sps  # noqa: E402  (benchmarks/sps.py: the SAC scripts' SPS, measured the same way)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_and_sample(cmd: list) -> np.ndarray:
    """Run `cmd`; (samples, 2) array of (wall time, CPU seconds of the process)."""
    proc = subprocess.Popen(cmd, env={**os.environ, **RUN_ENV}, stdout=subprocess.DEVNULL)
    samples = []
    while proc.poll() is None:
        try:
            samples.append((time.time(), cpu_seconds(proc.pid)))
        except (OSError, IndexError, ValueError):  # the process is exiting
            break
        time.sleep(0.2)
    if proc.wait() != 0:
        raise SystemExit(f"error: {' '.join(cmd)} exited with {proc.returncode}")
    return np.array(samples)


def steady_sps_with_cpu(run_dir: str, samples: np.ndarray) -> dict:
    """`steady_sps` on `losses/td_loss` (per wall second), the same window per CPU second, and the parameter count."""
    result = steady_sps(run_dir, tag="losses/td_loss")
    (first, last), (t0, t1) = result["window_steps"], result["window_wall_time"]
    cpu = np.interp([t0, t1], samples[:, 0], samples[:, 1])
    (run_path,) = glob.glob(os.path.join(run_dir, "*"))
    with open(os.path.join(run_path, "config.json")) as f:
        config = json.load(f)
    return {
        "steady_sps": result["steady_sps"],
        "steady_sps_cpu": round((last - first) / (cpu[1] - cpu[0]), 1),
        "window_steps": [first, last],
        "q_network_params": config["q_network_params"],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("script")
    parser.add_argument("--steps", type=int, default=14_000, help="total env steps")
    parser.add_argument("--learning-starts", type=int, default=4_000, help="env steps before the first update")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    cli = parser.parse_args(argv[: len(argv) - len(extra) - (1 if extra else 0)])
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, cli.script, "--total-timesteps", str(cli.steps), "--learning-starts",
               str(cli.learning_starts), "--eval-frequency", str(cli.steps), "--final-eval-episodes", "0",
               "--run-dir", run_dir, "--exp-name", "sps", *extra]  # fmt: skip
        load_before = os.getloadavg()[0]
        samples = run_and_sample(cmd)
        result = steady_sps_with_cpu(run_dir, samples)
    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps({"script": os.path.basename(cli.script), "args": " ".join(extra), **result, "load_avg": load}))
