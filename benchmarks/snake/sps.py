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
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sps import RUN_ENV, cpu_between, run_sampling_cpu, steady_sps  # noqa: E402  (benchmarks/sps.py: measured alike)


def steady_sps_with_cpu(run_dir: str, samples: np.ndarray) -> dict:
    """`steady_sps` on `losses/td_loss` (per wall second), the same window per CPU second, and the parameter count."""
    result = steady_sps(run_dir, tag="losses/td_loss")
    (first, last), (t0, t1) = result["window_steps"], result["window_wall_time"]
    return {
        "steady_sps": result["steady_sps"],
        "steady_sps_cpu": round((last - first) / cpu_between(samples, t0, t1), 1),
        "window_steps": [first, last],
        "q_network_params": result["config"]["q_network_params"],
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
        samples = run_sampling_cpu(cmd, env={**os.environ, **RUN_ENV}, interval=0.2)
        result = steady_sps_with_cpu(run_dir, samples)
    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps({"script": os.path.basename(cli.script), "args": " ".join(extra), **result, "load_avg": load}))
