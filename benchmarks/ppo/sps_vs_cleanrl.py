"""Steady-state env steps per second of ppo_atari.py / rpo_mujoco.py against CleanRL's ppo_atari.py /
rpo_continuous_action.py, run alternately on the same machine, and their ratio.

Each run is a subprocess with the same number of torch threads (OMP_NUM_THREADS); steady SPS = global steps between
the first and the last `losses/value_loss` TensorBoard point (one per update, so the window holds whole updates: env
steps, network passes and optimisation, and neither start-up nor evaluation) divided by the wall time between them.
`cpu_sps` divides the same steps by the CPU time (user + system, all threads) the process used in that window, read
from /proc every 0.1 s (`steady_sps`, `run_sampling_cpu` and `cpu_between` of benchmarks/sps.py, shared with the SAC and
Snake benchmarks): on a machine shared with other jobs it is the contention-free figure (with one torch thread
both scripts keep about one core busy, so uncontended wall-clock SPS is close to it).

CleanRL runs in its own virtual environment (its pins: gymnasium 0.29, so HalfCheetah-v4 and BreakoutNoFrameskip-v4
through ale-py 0.9's gym registration; see docs/BENCHMARKS.md for the set-up commands):

    python benchmarks/ppo/sps_vs_cleanrl.py atari --cleanrl-python /tmp/cleanrl-venv/bin/python \
        --cleanrl-src /tmp/cleanrl-src --iterations 6 --repeats 3 --threads 1 [-- more args of ours, e.g. --bf16]

Prints one JSON line per run and a last line with the medians and the ratios ours / CleanRL (wall-clock and CPU).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sps import cpu_between, run_sampling_cpu, steady_sps  # noqa: E402  (benchmarks/sps.py: measured alike)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASKS = {  # ours (script, env id), CleanRL's (script, env id), CleanRL's default batch (num_envs * num_steps)
    "atari": (("ppo_atari.py", "BreakoutNoFrameskip-v4"), ("cleanrl/ppo_atari.py", "BreakoutNoFrameskip-v4"), 1024),
    "rpo": (("rpo_mujoco.py", "HalfCheetah-v5"), ("cleanrl/rpo_continuous_action.py", "HalfCheetah-v4"), 2048),
}
# ale-py 0.9 registers the Atari ids with gymnasium 0.29 when imported, and CleanRL's HEAD does not import it
IMPORT_ALE_THEN_RUN = (
    "import ale_py, runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def steady_sps_with_cpu(cwd: str, samples) -> dict:
    """Steady SPS (wall and CPU time) and updates in the window of the one run under `cwd`/runs."""
    result = steady_sps(os.path.join(cwd, "runs"), tag="losses/value_loss")
    (first, last), (t0, t1) = result["window_steps"], result["window_wall_time"]
    cpu = cpu_between(samples, t0, t1)
    return {"steady_sps": result["steady_sps"], "cpu_sps": round((last - first) / cpu, 1),
            "updates_in_window": result["updates_in_window"], "cpu_per_wall": round(cpu / (t1 - t0), 2)}  # fmt: skip


def command(task: str, which: str, cli, extra) -> tuple[list[str], dict]:
    """The command line and extra environment of one run of `iterations` updates at the defaults."""
    (ours, our_env), (theirs, their_env), batch = TASKS[task]
    steps = str(cli.iterations * batch)
    if which == "ours":
        args = ["--env-id", our_env, "--total-timesteps", steps, "--eval-frequency", str(10 * int(steps)),
                "--final-eval-episodes", "0", "--checkpoint-frequency", "0", "--no-cuda", *extra]  # fmt: skip
        return [sys.executable, os.path.join(ROOT, ours), *args], {}
    args = ["--env-id", their_env, "--total-timesteps", steps, "--no-cuda"]
    return [cli.cleanrl_python, "-c", IMPORT_ALE_THEN_RUN, os.path.join(cli.cleanrl_src, theirs), *args], {
        "PYTHONPATH": cli.cleanrl_src
    }


def measure(task: str, which: str, cli, extra) -> dict:
    cmd, env = command(task, which, cli, extra)
    env = {**os.environ, **env, "OMP_NUM_THREADS": str(cli.threads), "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory() as cwd:
        if which == "ours":
            cmd += ["--run-dir", os.path.join(cwd, "runs")]
        samples = run_sampling_cpu(cmd, env, cwd=cwd)
        return {"task": task, "which": which, **steady_sps_with_cpu(cwd, samples), "threads": cli.threads}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--cleanrl-python", required=True, help="the python of CleanRL's own virtual environment")
    parser.add_argument("--cleanrl-src", required=True, help="a checkout of vwxyzjn/cleanrl")
    parser.add_argument("--iterations", type=int, default=6, help="updates per run (the window holds all but one)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each script, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both (OMP_NUM_THREADS)")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    cli = parser.parse_args(argv[: len(argv) - len(extra) - (1 if extra else 0)])

    results = {(which, key): [] for which in ("ours", "cleanrl") for key in ("steady_sps", "cpu_sps")}
    for _ in range(cli.repeats):
        for which in ("ours", "cleanrl"):
            record = measure(cli.task, which, cli, extra)
            for key in ("steady_sps", "cpu_sps"):
                results[which, key].append(record[key])
            print(json.dumps({**record, "our_extra_args": extra if which == "ours" else []}), flush=True)
    summary = {"task": cli.task, "threads": cli.threads, "our_extra_args": extra}
    for key in ("steady_sps", "cpu_sps"):
        ours, theirs = statistics.median(results["ours", key]), statistics.median(results["cleanrl", key])
        summary.update(
            {f"median_{key}_ours": ours, f"median_{key}_cleanrl": theirs, f"ratio_{key}": round(ours / theirs, 2)}
        )
    print(json.dumps(summary))
