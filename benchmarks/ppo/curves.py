"""Learning curves of the runs of benchmarks/ppo/learning_runs.sh: one CSV per run (global_step, kind, value) with the
periodic evaluations (`eval/return`) and the training episodes (`charts/episodic_return`), and one PNG with a panel
per run (training episodes as dots, their running mean over 20 episodes, evaluations as a line).

Usage: python benchmarks/ppo/curves.py RUN_DIR OUT_PREFIX   (writes OUT_PREFIX_<run>.csv and OUT_PREFIX.png)
"""

import csv
import glob
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def load(run_path: str) -> dict:
    """tag -> (steps, values) for the two curves of one run."""
    accumulator = EventAccumulator(run_path, size_guidance={"scalars": 0}).Reload()
    tags = accumulator.Tags()["scalars"]
    curves = {}
    for tag in ("charts/episodic_return", "eval/return"):
        if tag in tags:
            events = accumulator.Scalars(tag)
            curves[tag] = (np.array([e.step for e in events]), np.array([e.value for e in events]))
    return curves


def main(run_dir: str, out_prefix: str) -> None:
    runs = sorted(p for p in glob.glob(os.path.join(run_dir, "*")) if glob.glob(os.path.join(p, "events.out.*")))
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), squeeze=False)
    for ax, run_path in zip(axes[0], runs, strict=True):
        name, curves = os.path.basename(run_path), load(run_path)
        with open(f"{out_prefix}_{name}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["global_step", "kind", "value"])
            for tag, (steps, values) in curves.items():
                writer.writerows((int(s), tag, float(v)) for s, v in zip(steps, values, strict=True))
        steps, values = curves.get("charts/episodic_return", (np.zeros(0), np.zeros(0)))
        ax.plot(steps, values, ".", ms=2, alpha=0.3, label="training episodes (raw score)")
        if len(values) >= 20:
            ax.plot(steps[19:], np.convolve(values, np.ones(20) / 20, "valid"), label="running mean of 20")
        if "eval/return" in curves:
            ax.plot(*curves["eval/return"], "o-", label="evaluation (10 episodes)")
        ax.set(title=name, xlabel="global_step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{out_prefix}.png", dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
