"""Env steps the equivariant DQN needs to reach the CNN twin's final score, as a fraction of the CNN's budget.

Reads the run folders under RUN_DIR (evals.jsonl and final_eval.json of dqn_snake_cnn.py and dqn_snake_equivariant.py
runs, grouped by exp_name). The CNN's final score is the mean over its seeds of the last periodic evaluation's
`eval/score`; the equivariant group's step is the first evaluation step at which the mean over its seeds of
`eval/score` is >= that score (and, per seed, the first step at which that seed's score is). Ratio = step / the CNN's
final step. The same with the held-out final evaluation (`heldout/score`, 100 episodes) as the target score.

Usage: python benchmarks/snake/ratio.py RUN_DIR
(`compare_runs.py RUN_DIR --metric eval/score --baseline dqn_snake_cnn` gives the ratio to the CNN's own steps to that
score instead of its budget, with a bootstrap CI.)
"""

import glob
import json
import os
import sys

import numpy as np


def load_group(run_dir: str, exp_name: str) -> tuple[np.ndarray, np.ndarray, list]:
    """(steps, scores (seeds, steps), final records) of the finished runs of one exp_name."""
    curves, finals, steps = [], [], None
    for path in sorted(glob.glob(os.path.join(run_dir, "**", "final_eval.json"), recursive=True)):
        with open(path) as f:
            final = json.load(f)
        if final["args"]["exp_name"] != exp_name:
            continue
        with open(os.path.join(os.path.dirname(path), "evals.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
        run_steps = np.array([r["global_step"] for r in records])
        assert steps is None or np.array_equal(steps, run_steps), f"{path}: other evaluation steps"
        steps = run_steps
        curves.append([r["eval/score"] for r in records])
        finals.append(final)
    if not finals:
        raise SystemExit(f"error: no finished {exp_name} run under {run_dir}")
    return steps, np.array(curves), finals


def first_step(steps: np.ndarray, curve: np.ndarray, target: float) -> int | None:
    hit = np.flatnonzero(curve >= target)
    return int(steps[hit[0]]) if len(hit) else None


if __name__ == "__main__":
    run_dir = sys.argv[1]
    cnn_steps, cnn_curves, cnn_finals = load_group(run_dir, "dqn_snake_cnn")
    cnn_final = float(cnn_curves[:, -1].mean())
    eq_steps, eq_curves, eq_finals = load_group(run_dir, "dqn_snake_equivariant")
    budget = int(cnn_steps[-1])
    result = {"cnn_seeds": len(cnn_finals), "eq_seeds": len(eq_finals), "budget": budget}
    targets = {"eval": cnn_final, "heldout": float(np.mean([f["heldout/score"] for f in cnn_finals]))}
    for name, target in targets.items():
        mean_step = first_step(eq_steps, eq_curves.mean(0), target)
        per_seed = [first_step(eq_steps, curve, target) for curve in eq_curves]
        result[name] = {"cnn_final_score": round(target, 3), "eq_mean_curve_step": mean_step,
                        "ratio": None if mean_step is None else round(mean_step / budget, 3),
                        "eq_per_seed_steps": per_seed}  # fmt: skip
    result["eq_final_score"] = round(float(eq_curves[:, -1].mean()), 3)
    result["eq_heldout_score"] = round(float(np.mean([f["heldout/score"] for f in eq_finals])), 3)
    print(json.dumps(result))
