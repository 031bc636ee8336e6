"""SAC's entropy temperature early in a run against the env steps the run needs to reach a success threshold.

For every run folder under RUN_DIR (the FetchPush-v4 comparison of docs/BENCHMARKS.md): the temperature
(`losses/alpha`, the last logged value at or before each of STEPS) and the critic loss (`losses/qf_loss`, mean of
the points logged in (10k, 30k]), read from the TensorBoard events, and the first evaluation step whose
`eval/success_rate` is >= THRESHOLD (`compare_runs.steps_to_threshold`, the rule of the comparison's ratio). Prints
a Markdown table sorted by temperature at the second of STEPS and the Spearman rank correlation between that
temperature and the steps (a run that never reaches the threshold ranks last, at its last step).

Usage: python benchmarks/push_temperature.py RUN_DIR [--threshold 0.783] [--steps 10000 20000 40000]
"""

import argparse
import os
import sys

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import compare_runs as cr  # noqa: E402


def value_at(scalar: tuple[np.ndarray, np.ndarray], step: int) -> float:
    """The last value logged at or before `step` (NaN if none, or if nothing was logged at or after it yet)."""
    steps, values = scalar
    if steps.size == 0 or steps[-1] < step:
        return float("nan")
    before = np.flatnonzero(steps <= step)
    return float(values[before[-1]]) if before.size else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--threshold", type=float, default=0.783)
    parser.add_argument("--steps", type=int, nargs="+", default=[10_000, 20_000, 40_000])
    args = parser.parse_args()
    rows = []
    for run in cr.find_runs([args.run_dir]):
        scalars = cr.read_scalars(run.path, {"losses/alpha", "losses/qf_loss"})
        curve = cr.load_curve(run, "eval/success_rate")
        if "losses/alpha" not in scalars or curve is None:
            continue
        (steps,), (reached,) = cr.steps_to_threshold([curve], args.threshold)
        qf_steps, qf = scalars.get("losses/qf_loss", (np.zeros(0), np.zeros(0)))
        window = (qf_steps > 10_000) & (qf_steps <= 30_000)
        rows.append({
            "run": f"{run.args.get('exp_name')} seed {run.args.get('seed')}",
            "alpha": [value_at(scalars["losses/alpha"], s) for s in args.steps],
            "qf": float(qf[window].mean()) if window.any() else float("nan"),
            "steps": float(steps), "reached": bool(reached), "last": int(curve.steps[-1]),
        })  # fmt: skip
    if not rows:
        raise SystemExit(f"error: no run with losses/alpha and eval/success_rate under {args.run_dir}")
    key = min(1, len(args.steps) - 1)
    rows.sort(key=lambda r: -r["alpha"][key])
    head = " | ".join(f"temperature at {s // 1000}k" for s in args.steps)
    print(f"| run | {head} | critic loss, mean over 10k-30k | steps to >= {args.threshold} |")
    print("|---|" + "---|" * (len(args.steps) + 2))
    for r in rows:
        reach = f"{r['steps']:,.0f}" if r["reached"] else f"not reached (ran to {r['last']:,})"
        cells = " | ".join(f"{a:.1e}" for a in r["alpha"])
        print(f"| {r['run']} | {cells} | {r['qf']:.2f} | {reach} |")
    if len(rows) < 3:
        return  # no rank correlation of fewer than 3 runs
    alpha = np.array([r["alpha"][key] for r in rows])
    # a run that never reached it is slower than every run that did: rank it after them, at its own last step
    steps = np.array([r["steps"] if r["reached"] else 1e12 + r["steps"] for r in rows])
    rho = spearmanr(alpha, steps).statistic
    print(f"\nSpearman rank correlation, temperature at {args.steps[key] // 1000}k vs steps: {rho:.2f} "
          f"({len(rows)} runs)")  # fmt: skip


if __name__ == "__main__":
    main()
