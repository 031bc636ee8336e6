"""Steady-state environment steps per second of a training script, updates included, measured on a real run.

Runs the script as a subprocess with one torch thread, then divides the global steps between the first and the last
`losses/qf1_loss` TensorBoard points (all after learning_starts, so every step includes its update) by the wall time
between them. Prints one JSON line with the SPS and the parameter counts from config.json.

Usage: python benchmarks/sps.py sac_fetch_mlp.py [--env-id ID] [--steps 4000] [--threads 1] [-- more script args]

`--threads N` gives the run N torch threads (OMP_NUM_THREADS=N; default 1, what a sweep's array task gets).

`training_command`, `RUN_ENV` and `steady_sps` are shared with benchmarks/speed.py (and the last two with
benchmarks/snake/sps.py); `run_sampling_cpu` and `cpu_between` (the same window per CPU second, the figure that does
not depend on other jobs sharing the machine) with benchmarks/snake/sps.py and benchmarks/ppo/sps_vs_cleanrl.py, so
they all measure the same way.
"""

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

RUN_ENV = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}  # one torch thread (torch reads OMP_NUM_THREADS)


def training_command(script: str, env_id: str, steps: int, run_dir: str, extra=()) -> list[str]:
    """The training run: `steps` env steps, one evaluation at the end (outside the SPS window), runs in `run_dir`."""
    return [sys.executable, script, "--env-id", env_id, "--total-timesteps", str(steps),
            "--eval-frequency", str(steps), "--run-dir", run_dir, "--exp-name", "sps", *extra]  # fmt: skip


def steady_sps(run_dir: str, tag: str = "losses/qf1_loss") -> dict:
    """Steady SPS of the one run in `run_dir` (a folder holding one run folder) between the first and last points of
    the per-update loss `tag`, the window's steps, wall times and updates, and the run's config.json (empty for a run
    that writes none, such as CleanRL's)."""
    (run_path,) = glob.glob(os.path.join(run_dir, "*"))
    points = EventAccumulator(run_path).Reload().Scalars(tag)
    first, last = points[0], points[-1]
    config_path = os.path.join(run_path, "config.json")
    config = {}
    if os.path.exists(config_path):
        with open(config_path) as f:
            config = json.load(f)
    return {
        "steady_sps": round((last.step - first.step) / (last.wall_time - first.wall_time), 1),
        "window_steps": (first.step, last.step),
        "window_wall_time": (first.wall_time, last.wall_time),
        "updates_in_window": len(points) - 1,
        "actor_params": config.get("actor_params"),
        "critic_params": config.get("critic_params"),
        "config": config,
    }


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), for the machine line beside every speed figure."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time (seconds, all threads) of process `pid` from /proc/<pid>/stat; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):  # the process has exited or is exiting
        return None


def run_sampling_cpu(cmd: list[str], env: dict, cwd: str | None = None, interval: float = 0.1) -> np.ndarray:
    """Run `cmd` to its end (stdout discarded), sampling its CPU time every `interval` s: a (samples, 2) array of
    (wall time, CPU seconds). Raises RuntimeError with the end of its stderr if it exits non-zero."""
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        samples = []
        while proc.poll() is None:
            cpu = cpu_seconds(proc.pid)
            if cpu is not None:
                samples.append((time.time(), cpu))
            time.sleep(interval)
        if proc.returncode != 0:
            stderr.seek(0)
            raise RuntimeError(f"{' '.join(cmd[:3])} exited {proc.returncode}: {stderr.read()[-2000:]}")
    return np.array(samples)


def cpu_between(samples: np.ndarray, t0: float, t1: float) -> float:
    """CPU seconds the sampled process used between wall times t0 and t1 (linear interpolation of `samples`)."""
    cpu = np.interp([t0, t1], samples[:, 0], samples[:, 1])
    return float(cpu[1] - cpu[0])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("script")
    parser.add_argument("--env-id", default="FetchReachDense-v4")
    parser.add_argument("--steps", type=int, default=4000, help="total env steps; updates start after 1000")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the run (OMP_NUM_THREADS)")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    cli = parser.parse_args(argv[: len(argv) - len(extra) - (1 if extra else 0)])

    with tempfile.TemporaryDirectory() as run_dir:
        cmd = training_command(cli.script, cli.env_id, cli.steps, run_dir, extra)
        env = {**os.environ, **RUN_ENV, "OMP_NUM_THREADS": str(cli.threads)}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result = steady_sps(run_dir)
    record = {
        "script": os.path.basename(cli.script),
        "env_id": cli.env_id,
        "args": " ".join(extra),
        "threads": cli.threads,
        "steady_sps": result["steady_sps"],
        "actor_params": result["actor_params"],
        "critic_params": result["critic_params"],
    }
    print(json.dumps(record))
