"""Wall-clock cost per env step of a study's groups against its baseline, side by side: the figure that turns a steps
ratio into a wall-clock ratio (compare_runs.py `--step-cost`).

    python benchmarks/study_speed.py push_fresh              # print the pairs and the costs
    python benchmarks/study_speed.py push_fresh --write      # also write benchmarks/results/push_fresh/speed.json

Each group of the study's committed records (benchmarks/results/STUDY, one group per `exp_name`) is run with the
exact configuration its records hold (config.json's args: the script is the one whose `Args` has exactly those
fields), for `--steps` env steps with one evaluation at the end, outside the window. The baseline (the study's
`--baseline` in benchmarks/regenerate.py) and each other group run at the same time, one process per core, one torch
thread each (OMP_NUM_THREADS=1), `--repeats` times; steady steps/s is measured as benchmarks/sps.py does (global steps
between the first and the last `losses/qf1_loss` point, all after learning_starts, over the wall time between them,
so every step includes its SAC update). A group's cost is the baseline's steady steps/s divided by its own in the
same pair (its seconds per env step as a multiple of the baseline's); `step_cost` is the mean over repeats.

Run it on idle cores: another job on the machine slows the two runs unequally. speed.json records the machine (CPU
model, torch's CPU capability, torch version), the load average at the start, the date, the command and every pair.
Exit codes: 0 done, 2 bad input (one line `error: ...`), 1 a training run failed (the end of its stderr is printed).
"""

import argparse
import dataclasses
import datetime
import glob
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import regenerate  # noqa: E402
from sps import RUN_ENV, cpu_model, steady_sps  # noqa: E402

SCRIPTS = ("sac_fetch_mlp.py", "sac_fetch_equivariant.py")
OVERRIDES = {"eval_episodes": 2, "final_eval_episodes": 0, "save_model": False, "track": False,
             "capture_video": False}  # fmt: skip
DROPPED = {"run_dir", "run_name", "total_timesteps", "eval_frequency"}  # set per run below


def load_script(script: str, cache: dict = {}):  # noqa: B006 - deliberate per-process cache
    """A repo script as a module, imported from its file (the scripts import without side effects)."""
    if script not in cache:
        spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), os.path.join(ROOT, script))
        cache[script] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cache[script])
    return cache[script]


def script_fields(script: str) -> set[str]:
    """The `Args` field names of a repo script."""
    return {f.name for f in dataclasses.fields(load_script(script).Args)}


def group_configs(study: str) -> dict[str, dict]:
    """exp_name -> the config args of the group's first record (by run name) in benchmarks/results/STUDY."""
    configs = {}
    for path in sorted(glob.glob(os.path.join(ROOT, regenerate.RESULTS, study, "*", "config.json"))):
        with open(path) as f:
            args = json.load(f)["args"]
        configs.setdefault(args["exp_name"], args)
    return configs


def flag_args(args: dict) -> list[str]:
    """Config args -> the scripts' tyro flags: `--name value`, `--name v1 v2` for lists, `--name`/`--no-name`."""
    argv = []
    for name, value in args.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def training_command(script: str, args: dict, steps: int) -> list[str]:
    """The record's configuration for `steps` env steps with one cheap evaluation at the end; `--run-dir` to add."""
    kept = {k: v for k, v in args.items() if k not in DROPPED} | {k: v for k, v in OVERRIDES.items() if k in args}
    return [sys.executable, os.path.join(ROOT, script), *flag_args(kept), "--total-timesteps", str(steps),
            "--eval-frequency", str(steps)]  # fmt: skip


def run_pair(commands: list[list[str]], tmp: str) -> list[float]:
    """Run the commands at the same time (each with its own `--run-dir` under `tmp`); their steady steps/s."""
    procs, dirs = [], []
    for i, cmd in enumerate(commands):
        run_dir = os.path.join(tmp, f"run{i}")
        os.makedirs(run_dir)
        stderr = open(os.path.join(tmp, f"run{i}.err"), "w")
        procs.append((subprocess.Popen([*cmd, "--run-dir", run_dir], stdout=subprocess.DEVNULL, stderr=stderr,
                                       env={**os.environ, **RUN_ENV}, cwd=ROOT), stderr))  # fmt: skip
        dirs.append(run_dir)
    for i, (proc, stderr) in enumerate(procs):
        proc.wait()
        stderr.close()
        if proc.returncode != 0:
            with open(os.path.join(tmp, f"run{i}.err")) as f:
                tail = f.read()[-2000:]
            raise RuntimeError(f"{' '.join(commands[i][1:3])} exited {proc.returncode}:\n{tail}")
    return [steady_sps(d)["steady_sps"] for d in dirs]


def machine() -> dict:
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_cpu_capability": capability,
            "torch": torch.__version__, "load_average_at_start": os.getloadavg()[0]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", help="a study of benchmarks/regenerate.py with a --baseline")
    parser.add_argument("--steps", type=int, default=3000, help="env steps per run (updates start at learning_starts)")
    parser.add_argument("--repeats", type=int, default=1, help="pairs per group")
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/STUDY/speed.json")
    cli = parser.parse_args(argv)
    study = regenerate.STUDIES.get(cli.study)
    compare = list(study.compare) if study else []
    if study is None or "--baseline" not in compare:
        with_baseline = [n for n, s in regenerate.STUDIES.items() if "--baseline" in s.compare]
        print(f"error: study {cli.study!r} unknown or without --baseline; studies with one: {with_baseline}",
              file=sys.stderr)  # fmt: skip
        return 2
    if cli.steps < 2000 or cli.repeats < 1:
        print(f"error: --steps {cli.steps} (>= 2000) and --repeats {cli.repeats} (>= 1) out of range", file=sys.stderr)
        return 2
    baseline = compare[compare.index("--baseline") + 1]
    configs = group_configs(cli.study)
    if baseline not in configs or len(configs) < 2:
        print(f"error: study {cli.study!r} needs records of {baseline!r} and another group, has {sorted(configs)}",
              file=sys.stderr)  # fmt: skip
        return 2
    fields = {script: script_fields(script) for script in SCRIPTS}
    scripts = {}
    for label, args in configs.items():
        matches = [s for s, f in fields.items() if f == set(args)]
        if len(matches) != 1:
            print(f"error: group {label!r}: no script's Args has exactly its config's fields ({SCRIPTS})",
                  file=sys.stderr)  # fmt: skip
            return 2
        scripts[label] = matches[0]
    record = {"study": cli.study, "made_by": "python benchmarks/study_speed.py " + " ".join(argv or sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": machine(), "steps": cli.steps, "baseline": baseline, "pairs": [], "step_cost": {}}  # fmt: skip
    base_cmd = training_command(scripts[baseline], configs[baseline], cli.steps)
    for label in (x for x in configs if x != baseline):
        cmd = training_command(scripts[label], configs[label], cli.steps)
        costs = []
        for repeat in range(cli.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    base_sps, group_sps = run_pair([base_cmd, cmd], tmp)
                except RuntimeError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    return 1
            cost = base_sps / group_sps
            costs.append(cost)
            pair = {"group": label, "repeat": repeat, "baseline_sps": base_sps, "group_sps": group_sps,
                    "cost": round(cost, 3)}  # fmt: skip
            record["pairs"].append(pair)
            print(json.dumps(pair), flush=True)
        record["step_cost"][label] = round(sum(costs) / len(costs), 2)
    print(json.dumps({"step_cost": record["step_cost"], "machine": record["machine"]}))
    if cli.write:
        path = os.path.join(ROOT, regenerate.RESULTS, cli.study, "speed.json")
        with open(path, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
        print(f"wrote {os.path.relpath(path, ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
