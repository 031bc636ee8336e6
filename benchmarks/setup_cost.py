"""What set-up costs: one env's memory and creation time for every script's vector env and mode (the scripts'
`ENV_COST`), and escnn's build of the D_N networks of sac_fetch_equivariant.py (`first_build_seconds`, the
`--dihedral-n` cap). docs/BENCHMARKS.md, "Set-up cost", has the numbers of one run and how to read them.

    python benchmarks/setup_cost.py envs                  # JSON line per script and mode
    python benchmarks/setup_cost.py escnn 2,1 4,1 8,64    # N,reg_rep_n: escnn's cache as it is (seconds once cached)
    python benchmarks/setup_cost.py escnn --cold 4,1 6,1  # a copy of escnn with an empty cache: its first build

Times are CPU seconds of one process (`time.process_time`), which is what an idle core's wall clock shows; run it on
an idle machine anyway, since a busy one also slows the CPU time a little (caches). One env: the memory that `n`
more envs add to this process (sync, ale), or a worker's private memory (USS) once it has reset and stepped 20 times
(async: the rest of the worker's memory is this process's, shared copy-on-write), and after a full garbage
collection in each worker, which copies the shared pages of the objects it visits.
"""

import argparse
import importlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENVS = [  # script, env id, mode, envs to make
    ("sac_fetch_equivariant", "FetchPushDense-v4", "sync", 32),
    ("sac_fetch_equivariant", "FetchPushDense-v4", "async", 8),
    ("dqn_snake_cnn", "Snake-v0", "sync", 200),
    ("dqn_snake_cnn", "Snake-v0", "async", 8),
    ("ppo_atari", "BreakoutNoFrameskip-v4", "ale", 32),
    ("ppo_atari", "BreakoutNoFrameskip-v4", "sync", 16),
    ("ppo_atari", "BreakoutNoFrameskip-v4", "async", 8),
    ("rpo_mujoco", "Humanoid-v5", "sync", 16),
    ("rpo_mujoco", "Humanoid-v5", "async", 8),
]


def rss(pid="self") -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def uss(pid) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return sum(int(line.split()[1]) * 1024 for line in f if line.startswith(("Private_Clean", "Private_Dirty")))


def cpu_seconds(pid) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_env(script: str, env_id: str, mode: str, n: int) -> dict:
    """Make `n` envs after a first one (imports, registration, first model load), reset and step them 20 times; async
    workers then run a full garbage collection, which copies the pages of the objects they share with this process
    (every long run gets there: a worker's heap grows until gc's oldest generation is collected)."""
    import gc
    import multiprocessing

    import gymnasium as gym

    m = importlib.import_module(script)
    if script.startswith("sac_fetch"):
        gym.register_envs(m.gymnasium_robotics)
    snake = script.startswith("dqn_snake")

    class Collect(gym.Wrapper):
        def collect(self) -> int:
            return gc.collect()

    def make(k, mode=mode):
        if mode == "async":  # the script's envs, in workers that can be told to collect their garbage
            thunk = m.make_env(m.Args(env_id=env_id)) if snake else m.make_env(env_id)
            autoreset = make(1, "sync").metadata["autoreset_mode"]
            return gym.vector.AsyncVectorEnv([lambda: Collect(thunk())] * k, autoreset_mode=autoreset)
        if snake:
            return m.make_vector_env(m.Args(env_id=env_id, num_envs=k, vector_env_mode=mode))
        return m.make_vector_env(env_id, k, mode)

    def exercise(envs):
        envs.reset(seed=0)
        for _ in range(20):
            _, _, terminated, truncated, _ = envs.step(envs.action_space.sample())
            done = terminated | truncated
            if done.any() and envs.metadata.get("autoreset_mode") == gym.vector.AutoresetMode.DISABLED:
                envs.reset(options={"reset_mask": done})

    first = make(1)
    exercise(first)
    before, children = rss(), {p.pid for p in multiprocessing.active_children()}
    start = time.process_time()
    envs = make(n)
    make_s = time.process_time() - start
    exercise(envs)
    workers = [p.pid for p in multiprocessing.active_children() if p.pid not in children]
    mb = lambda: (rss() - before + sum(uss(p) for p in workers)) / n / 2**20  # noqa: E731
    result = {"script": script, "env": env_id, "mode": mode, "n": n, "MB_per_env": round(mb(), 2),
              "make_ms_per_env": round(1000 * (make_s + sum(cpu_seconds(p) for p in workers)) / n, 1)}  # fmt: skip
    if workers:
        envs.call("collect")
        result["MB_per_env_after_gc"] = round(mb(), 2)
    envs.close()
    first.close()
    return result


def escnn_build(n: int, k: int) -> dict:
    """CPU seconds and peak memory beyond the start of building sac_fetch_equivariant.py's networks for D_n with k
    regular fields, in a forked child (the imports stay out of it)."""
    import torch

    import sac_fetch_equivariant as m

    torch.set_num_threads(1)
    read, write = os.pipe()
    if (pid := os.fork()) == 0:
        before, start = rss(), time.process_time()
        m.build_agent(m.OBJECT_FIELDS + m.GOAL_FIELDS, m.Args(dihedral_n=n, reg_rep_n=k), torch.device("cpu"))
        seconds, peak = time.process_time() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result = {"N": n, "reg_rep_n": k, "width": 2 * n * k, "cpu_s": round(seconds, 2),
                  "peak_MB": round((peak - before) / 2**20, 1)}  # fmt: skip
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        result = json.loads(f.read())
    os.waitpid(pid, 0)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["envs", "escnn", "_env"])
    parser.add_argument("specs", nargs="*", help="escnn: N,reg_rep_n pairs; _env: one ENVS row (internal)")
    parser.add_argument("--cold", action="store_true", help="escnn: a copy of escnn with an empty cache")
    args = parser.parse_intermixed_args()
    sys.path.insert(0, ROOT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if args.what == "envs":  # one process per row: each measures a process of its own
        for row in ENVS:
            cmd = [sys.executable, __file__, "_env", *map(str, row)]
            subprocess.run(cmd, check=True, env=env)
    elif args.what == "_env":
        script, env_id, mode, n = args.specs
        print(json.dumps(one_env(script, env_id, mode, int(n))), flush=True)
    elif args.cold and "SETUP_COST_COLD" not in os.environ:
        import escnn  # only its location

        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(os.path.dirname(escnn.__file__), os.path.join(tmp, "escnn"),
                            ignore=shutil.ignore_patterns("_cache"))  # fmt: skip
            cold = {**env, "PYTHONPATH": tmp, "SETUP_COST_COLD": "1"}
            subprocess.run([sys.executable, __file__, "escnn", "--cold", *args.specs], check=True, env=cold)
    else:
        for spec in args.specs:
            print(json.dumps(escnn_build(*map(int, spec.split(",")))), flush=True)


if __name__ == "__main__":
    main()
