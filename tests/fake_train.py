"""A stand-in training script for the tuner tests: same CLI conventions as the real scripts, no training.

Prints one JSON line per evaluation on stdout (progress goes to stderr), exits 0 on success and 2 on bad
arguments. Options make it crash, never print the metric, report a bad metric, or spawn a grandchild, so the
tests can exercise every path of tuner.py in seconds. Imports nothing from the repo.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=1, help="seed of the run")
    parser.add_argument("--exp-name", type=str, default="fake_train", help="name of the experiment")
    parser.add_argument("--run-dir", type=str, default="runs", help="root folder of the runs")
    parser.add_argument("--lr", type=float, default=1e-3, help="tuned: best success near 1e-3")
    parser.add_argument("--width", type=int, default=64, help="tuned: ignored by the metric")
    parser.add_argument("--n-evals", type=int, default=6, help="number of evaluations")
    parser.add_argument("--eval-sleep", type=float, default=0.1, help="seconds between evaluations")
    parser.add_argument("--bad-metric", action="store_true", help="report success_rate 0 at every eval")
    parser.add_argument("--no-metric", action="store_true", help="exit 0 without printing the metric")
    parser.add_argument("--crash-once", type=str, default="", help="crash if this marker file is absent")
    parser.add_argument("--spawn-grandchild", action="store_true", help="start a long-lived grandchild")
    parser.add_argument("--pid-dir", type=str, default="", help="write pids, argv and env here")
    return parser.parse_args()


def record_process(args: argparse.Namespace, grandchild_pid: int | None) -> None:
    """Writes `<pid-dir>/<exp-name>.json` so the tests can find this process tree and what it was given."""
    if not args.pid_dir:
        return
    record = {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "grandchild_pid": grandchild_pid,
        "argv": sys.argv,
        "env": dict(os.environ),
    }
    path = os.path.join(args.pid_dir, f"{args.exp_name}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)


def success_rate(args: argparse.Namespace, eval_idx: int) -> float:
    if args.bad_metric:
        return 0.0
    closeness = max(0.0, 1.0 - abs(math.log10(args.lr) + 3.0) / 2.0)  # 1 at lr=1e-3, 0 two decades away
    progress = (eval_idx + 1) / args.n_evals
    return round(closeness * progress * (0.9 + 0.02 * (args.seed % 5)), 6)


if __name__ == "__main__":
    args = parse_args()
    if args.crash_once and not os.path.exists(args.crash_once):
        open(args.crash_once, "w").close()
        print("fake_train: importing the simulator", file=sys.stderr)
        import missing_simulator_module  # noqa: F401  (raises ModuleNotFoundError on purpose)

    grandchild = None
    if args.spawn_grandchild:
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    record_process(args, grandchild.pid if grandchild else None)

    for eval_idx in range(args.n_evals):
        time.sleep(args.eval_sleep)
        print(f"fake_train: seed {args.seed} eval {eval_idx}", file=sys.stderr)
        if args.no_metric:
            continue
        line = {"eval_idx": eval_idx, "global_step": 100 * (eval_idx + 1), "eval/return": -1.0}
        line["eval/success_rate"] = success_rate(args, eval_idx)
        print(json.dumps(line), flush=True)
        print("not json: stdout noise the tuner must ignore", flush=True)
    if grandchild is not None:
        grandchild.kill()
        grandchild.wait()
