# docs: docs/comparing.md
"""Compare groups of runs: learning curves with 95% bootstrap bands and a table of final IQMs with 95% stratified
bootstrap confidence intervals (rliable), steps to a threshold (read on a centred moving average of the evaluations
by default, `--crossing`) and wall-clock speed.

    python compare_runs.py runs/ --metric eval/success_rate --group-by exp_name --threshold 0.9 --out docs/figures/x

A run folder is any folder under the given folders that holds `config.json` (docs/conventions.md). A metric is read
from `evals.jsonl`, else from `final_eval.json`, else from the TensorBoard events (read with TensorBoard's own
EventAccumulator over the whole folder, which applies the `purge_step` of a resumed run's later event files).
Errors exit with code 2 and one line `error: ...` on stderr; warnings go to stderr too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import sys
import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import tyro

BAND_REPS = 2000  # bootstrap replications of the per-step band in the figure
BAND_CHUNK = 4_000_000  # max. elements of one (reps, seeds, steps) block of the band bootstrap


@dataclass
class Args:
    run_dirs: tyro.conf.Positional[list[str]]
    """folders searched recursively for run folders (folders holding `config.json`)"""
    metric: str = "eval/success_rate"
    """metric to compare: a key of the evaluation lines or a TensorBoard scalar tag (e.g. `charts/episodic_return`)"""
    group_by: list[str] = field(default_factory=lambda: ["exp_name"])
    """keys of the runs' config args whose values form the groups (e.g. `exp_name`, `dihedral_n`; several allowed)"""
    env_id: str | None = None
    """keep only the runs of this env id (required when the folders hold runs of several env ids)"""
    threshold: float | None = None
    """also report the env steps each group needs to reach metric >= threshold (by the `--crossing` rule)"""
    crossing: Literal["moving-average", "consecutive", "first"] = "moving-average"
    """when a run reaches the threshold: the first evaluation where the centred `moving-average` of its curve over
    `--crossing-window` evaluations (fewer at the run's two ends) is >= threshold; the first of `--crossing-window`
    `consecutive` evaluations all >= threshold (none past the run's end); or the `first` single evaluation >= it"""
    crossing_window: int = 3
    """evaluations in the `--crossing` window (odd for `moving-average`; ignored by `first`)"""
    baseline: str | None = None
    """label of a group (as the table shows it): every other group's mean steps to the threshold divided by this
    group's, with a 95% bootstrap CI; without `--threshold` the threshold is this group's final score on the
    `--crossing` rule's curve (`first`: its final mean)"""
    step_cost: list[str] = field(default_factory=list)
    """`LABEL=C` per group, all after one flag (`--step-cost eq4=2.0 eq8=2.4`: a repeated flag keeps only its last
    values): the group's wall-clock seconds per env step as a multiple of the `--baseline`'s, measured side by side on
    one machine (benchmarks/study_speed.py); the table then gives the wall-clock ratio, the steps ratio times C (C
    held fixed in the CI)"""
    out: str | None = None
    """write `<out>.png`, `<out>.svg` and `<out>.md`; None: print the table only"""
    align: Literal["interpolate", "common"] = "interpolate"
    """runs of a group with different steps: `interpolate` linearly onto their union, or keep the `common` ones"""
    reps: int = 50000
    """bootstrap replications of the confidence intervals in the table (rliable's default)"""
    seed: int = 0
    """seed of the bootstrap resampling"""


class UsageError(Exception):
    """A problem with the input: main prints `error: <message>` and exits with code 2."""


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------- reading
@dataclass
class Run:
    path: str
    config: dict

    @property
    def args(self) -> dict:
        return self.config.get("args", {})

    @property
    def env_id(self) -> str:
        return str(self.args.get("env_id", "?"))

    @property
    def finished(self) -> bool:
        return os.path.exists(os.path.join(self.path, "final_eval.json"))


@dataclass
class Curve:
    steps: np.ndarray  # sorted unique global_step values
    values: np.ndarray  # the metric at each step (mean of the values logged at the same step)
    source: str  # "evals.jsonl", "final_eval.json" or "events"


def find_runs(roots: list[str]) -> list[Run]:
    """Every folder under `roots` (or a root itself) holding `config.json`, sorted by path; not searched further."""
    runs = []
    for root in roots:
        if not os.path.isdir(root):
            raise UsageError(f"{root} is not a folder")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            if "config.json" in filenames:
                dirnames[:] = []  # a run folder's subfolders (videos) hold no runs
                config_path = os.path.join(dirpath, "config.json")
                try:
                    with open(config_path) as f:
                        config = json.load(f)
                except (OSError, ValueError) as exc:
                    raise UsageError(f"cannot read {config_path}: {exc}") from None
                if not isinstance(config, dict) or not isinstance(config.get("args"), dict):
                    raise UsageError(f"{config_path} has no `args` object")
                runs.append(Run(os.path.normpath(dirpath), config))
    unique = {run.path: run for run in runs}  # overlapping roots find a run twice
    return sorted(unique.values(), key=lambda r: r.path)


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def read_heldout(run: Run, metric: str) -> float | None:
    """The run's held-out final evaluation of `metric` (`eval/x` -> `heldout/x` in final_eval.json), if it has one."""
    if not metric.startswith("eval/"):
        return None
    try:
        with open(os.path.join(run.path, "final_eval.json")) as f:
            return _number(json.load(f).get("heldout/" + metric[len("eval/") :]))
    except (OSError, json.JSONDecodeError):
        return None


def read_evals(run_path: str) -> list[dict]:
    """The evaluation records of `evals.jsonl` (a torn or unreadable line is skipped with a warning)."""
    path = os.path.join(run_path, "evals.jsonl")
    records = []
    if not os.path.exists(path):
        return records
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                warn(f"{path}:{lineno} is not a JSON line; skipped")
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def read_scalars(run_path: str, tags: set[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """TensorBoard scalars `tags` of the run folder as (steps, values), every event file of the folder read in order
    by TensorBoard's EventAccumulator, which honours `purge_step` (the SessionLog START event of a resumed run drops
    the earlier files' events at steps >= the purge step). tbparse 0.0.9 reads each file on its own and keeps them."""
    if not any("tfevents" in name for name in os.listdir(run_path)):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    tb_logger = logging.getLogger("tensorboard")
    level = tb_logger.level
    tb_logger.setLevel(logging.ERROR)  # its notice of every purge is expected here
    try:
        accumulator = EventAccumulator(run_path, size_guidance={SCALARS: 0})  # 0: keep every event
        accumulator.Reload()
    finally:
        tb_logger.setLevel(level)
    available = set(accumulator.Tags().get(SCALARS, []))
    out = {}
    for tag in tags & available:
        events = accumulator.Scalars(tag)
        out[tag] = (np.array([e.step for e in events], dtype=np.int64), np.array([e.value for e in events], float))
    return out


def make_curve(steps, values, source: str) -> Curve | None:
    """Sorted unique steps, values at the same step averaged, non-finite values dropped; None if nothing is left."""
    steps, values = np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=float)
    keep = np.isfinite(values)
    steps, values = steps[keep], values[keep]
    if steps.size == 0:
        return None
    unique, inverse = np.unique(steps, return_inverse=True)
    sums = np.bincount(inverse, weights=values, minlength=unique.size)
    counts = np.bincount(inverse, minlength=unique.size)
    return Curve(unique, sums / counts, source)


def load_curve(run: Run, metric: str, scalars: dict | None = None) -> Curve | None:
    """The run's curve of `metric`: from evals.jsonl, else final_eval.json, else the TensorBoard events."""
    points = []
    for record in read_evals(run.path):
        step, value = _number(record.get("global_step")), _number(record.get(metric))
        if step is not None and value is not None:
            points.append((step, value))
    if points:
        return make_curve(*zip(*points, strict=True), source="evals.jsonl")
    final_path = os.path.join(run.path, "final_eval.json")
    if os.path.exists(final_path):
        try:
            with open(final_path) as f:
                final = json.load(f)
        except (OSError, ValueError):
            final = {}
        step, value = _number(final.get("global_step")), _number(final.get(metric))
        if step is not None and value is not None:
            return make_curve([step], [value], source="final_eval.json")
    if scalars is None:
        scalars = read_scalars(run.path, {metric})
    if metric in scalars:
        return make_curve(*scalars[metric], source="events")
    return None


# --------------------------------------------------------------------------------------------------------- grouping
def normalise_key(key: str) -> str:
    return key.replace("-", "_")


def select_env(runs: list[Run], env_id: str | None, roots: list[str]) -> tuple[str, list[Run]]:
    """The runs of `env_id`, or of the only env id present; mixing env ids is an error."""
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.env_id] = counts.get(run.env_id, 0) + 1
    found = ", ".join(f"{env} ({n} runs)" for env, n in sorted(counts.items()))
    if env_id is None:
        if len(counts) > 1:
            raise UsageError(f"runs of several env ids found: {found}; choose one with --env-id")
        return next(iter(counts)), runs
    selected = [run for run in runs if run.env_id == env_id]
    if not selected:
        raise UsageError(f"no runs of env id {env_id} under {', '.join(roots)} (found: {found})")
    return env_id, selected


def format_value(value) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else json.dumps(value)


def group_runs(runs: list[Run], keys: list[str]) -> dict[str, list[Run]]:
    """Groups keyed by a label: the value for one key (`mlp`), `k1=v1, k2=v2` for several; sorted by label. A run
    lacking a key (e.g. `dihedral_n` for an MLP run) has `-` for it."""
    keys = [normalise_key(k) for k in keys]
    allowed = sorted(set().union(*(run.args.keys() for run in runs)))
    unknown = [k for k in keys if k not in allowed]
    if unknown:
        raise UsageError(f"unknown --group-by key {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    groups: dict[str, list[Run]] = {}
    for run in runs:
        values = [format_value(run.args.get(k)) for k in keys]
        label = values[0] if len(keys) == 1 else ", ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
        groups.setdefault(label, []).append(run)
    return dict(sorted(groups.items()))


def align(curves: list[Curve], mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values of shape (runs, steps)) on a shared grid. `interpolate`: the union of the runs' steps within
    [latest first step, earliest last step], each run linearly interpolated; `common`: the steps every run has."""
    if mode == "common":
        grid = curves[0].steps
        for curve in curves[1:]:
            grid = np.intersect1d(grid, curve.steps)
    else:
        lo, hi = max(c.steps[0] for c in curves), min(c.steps[-1] for c in curves)
        grid = np.unique(np.concatenate([c.steps for c in curves]))
        grid = grid[(grid >= lo) & (grid <= hi)]
    if grid.size == 0:
        return grid, np.empty((len(curves), 0))
    return grid, np.stack([np.interp(grid, c.steps, c.values) for c in curves])


# -------------------------------------------------------------------------------------------------------- statistics
def interval_estimate(scores: np.ndarray, func, reps: int, seed: int) -> tuple[float, tuple[float, float] | None]:
    """Point estimate and 95% stratified-bootstrap CI (rliable) of `func` over runs (one task, so the strata are the
    runs of that task); no CI for a single run."""
    from rliable import library

    scores = np.asarray(scores, dtype=float).reshape(-1, 1)  # (runs, tasks=1)
    if scores.shape[0] < 2:
        return float(func(scores)[0]), None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # arch's notice about `random_state`, which rliable passes
        points, intervals = library.get_interval_estimates(
            {"x": scores}, func, reps=reps, random_state=np.random.RandomState(seed)
        )
    lo, hi = intervals["x"][:, 0]
    return float(points["x"][0]), (float(lo), float(hi))


def iqm_func(scores: np.ndarray) -> np.ndarray:
    from rliable import metrics

    return np.array([metrics.aggregate_iqm(scores)])


def mean_func(scores: np.ndarray) -> np.ndarray:
    return np.array([np.mean(scores)])


def bootstrap_band(values: np.ndarray, reps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-step 95% percentile bootstrap band of the mean over runs (rows of `values`, shape (runs, steps))."""
    n, t = values.shape
    if n < 2:
        return values[0].copy(), values[0].copy()
    idx = np.random.default_rng(seed).integers(0, n, size=(reps, n))
    lo, hi = np.empty(t), np.empty(t)
    chunk = max(1, BAND_CHUNK // (reps * n))
    for start in range(0, t, chunk):
        means = values[:, start : start + chunk][idx].mean(axis=1)  # (reps, chunk)
        lo[start : start + chunk], hi[start : start + chunk] = np.percentile(means, [2.5, 97.5], axis=0)
    return lo, hi


def crossing_curve(values: np.ndarray, rule: str, window: int) -> np.ndarray:
    """The curve a crossing rule reads, one value per evaluation of a run, shape (evals,) -> (evals,): `first` the
    values themselves; `moving-average` the centred mean of values[i - window // 2 : i + window // 2 + 1], the
    window cut to the evaluations that exist at the run's two ends (window 3: the last point is the mean of the last
    2); `consecutive` the minimum of values[i : i + window], NaN where that window runs past the run's end (censored).
    A run crosses a threshold at the first evaluation where this curve is >= the threshold."""
    values = np.asarray(values, dtype=float)
    if rule == "first":
        return values.copy()
    if rule == "moving-average":
        half = window // 2
        return np.array([values[max(i - half, 0) : i + half + 1].mean() for i in range(values.size)])
    if rule == "consecutive":
        out = np.full(values.size, np.nan)
        if values.size >= window:
            out[: values.size - window + 1] = np.lib.stride_tricks.sliding_window_view(values, window).min(axis=1)
        return out
    raise ValueError(f"crossing rule must be one of moving-average, consecutive, first, got {rule!r}")


def crossing_final(curves: list[Curve], step: float, rule: str, window: int) -> float:
    """Mean over runs of each run's crossing curve at `step` (the group's final aligned step), interpolated linearly
    as the aligned values are and held at the curve's last defined point past it: for runs that end at `step`, the
    mean of each run's last crossing-curve value (`moving-average`, window 3: of its last 2 evaluations;
    `consecutive`: the lowest of its last `window` evaluations). NaN when a run has no defined point."""
    scores = []
    for curve in curves:
        values = crossing_curve(curve.values, rule, window)
        defined = np.isfinite(values)
        if not defined.any():
            return math.nan
        scores.append(np.interp(step, curve.steps[defined], values[defined]))
    return float(np.mean(scores))


def steps_to_threshold(curves: list[Curve], threshold: float, rule: str, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Per run, on its own recorded steps (not the group's aligned grid, so a run longer than the others is not cut
    at their end): the first step at which its crossing curve (crossing_curve) is >= threshold, and whether it got
    there at all; a run that never does is counted at its own last step (censored: a mean over such runs is a lower
    bound). Shapes (runs,)."""
    steps, reached = np.empty(len(curves)), np.zeros(len(curves), dtype=bool)
    for i, curve in enumerate(curves):
        hit = np.flatnonzero(crossing_curve(curve.values, rule, window) >= threshold)
        reached[i] = hit.size > 0
        steps[i] = curve.steps[hit[0]] if reached[i] else curve.steps[-1]
    return steps, reached


def ratio_estimate(
    steps: np.ndarray, baseline_steps: np.ndarray, reps: int, seed: int
) -> tuple[float, tuple[float, float] | None]:
    """mean(steps) / mean(baseline_steps) (per-seed env steps to the threshold, shapes (seeds,) and
    (baseline seeds,)) and its 95% percentile bootstrap CI, the seeds of each group resampled
    with replacement independently (two-sample bootstrap); no CI when either group has a single seed; NaN when a
    baseline seed reaches the threshold at step 0."""
    steps, baseline_steps = np.asarray(steps, dtype=float), np.asarray(baseline_steps, dtype=float)
    if baseline_steps.min() <= 0:
        return math.nan, None  # a baseline seed is there at step 0: resampled means of 0 give no ratio
    point = float(steps.mean() / baseline_steps.mean())
    if steps.size < 2 or baseline_steps.size < 2:
        return point, None
    rng = np.random.default_rng(seed)
    num = steps[rng.integers(0, steps.size, size=(reps, steps.size))].mean(axis=1)
    den = baseline_steps[rng.integers(0, baseline_steps.size, size=(reps, baseline_steps.size))].mean(axis=1)
    lo, hi = np.percentile(num / den, [2.5, 97.5])
    return point, (float(lo), float(hi))


@dataclass
class GroupResult:
    label: str
    runs: list[str]
    grid: np.ndarray
    values: np.ndarray  # (runs, steps)
    curves: list[Curve]  # each run's own recorded curve, in the order of `runs`
    band: tuple[np.ndarray, np.ndarray]
    finals: np.ndarray
    iqm: float
    iqm_ci: tuple[float, float] | None
    mean: float
    std: float | None  # sample std (ddof=1); None for one run
    sps: float | None  # mean over runs of the last `charts/SPS` value; None if no run logged it
    sps_runs: int = 0
    heldout: np.ndarray | None = None  # per run, when every run of the group has a held-out final evaluation
    heldout_iqm: float | None = None
    heldout_ci: tuple[float, float] | None = None
    threshold_steps: np.ndarray | None = None
    threshold_reached: np.ndarray | None = None
    threshold_mean: float | None = None
    threshold_ci: tuple[float, float] | None = None
    ratio: float | None = None  # mean steps to the threshold / the baseline's (None for the baseline itself)
    ratio_ci: tuple[float, float] | None = None
    step_cost: float | None = None  # seconds per env step / the baseline's (--step-cost)

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def mean_curve(self) -> np.ndarray:
        return self.values.mean(axis=0)


@dataclass
class Comparison:
    env_id: str
    metric: str
    group_by: list[str]
    threshold: float | None
    crossing: str  # the crossing rule of the steps to the threshold (Args.crossing)
    crossing_window: int
    align: str
    reps: int
    groups: list[GroupResult]
    sources: dict[str, int]  # where the metric was read: source -> number of runs
    baseline: str | None = None
    threshold_from_baseline: bool = False  # the threshold is the baseline's final score (no --threshold given)
    step_costs: bool = False  # some group has a --step-cost: the table has a wall-clock ratio column


def parse_step_costs(items: list[str], labels: list[str], baseline: str | None) -> dict[str, float]:
    """`--step-cost LABEL=C` items -> {label: C}; UsageError naming the bad item and the allowed labels."""
    costs = {}
    for item in items:
        label, sep, value = item.rpartition("=")
        others = ", ".join(repr(x) for x in labels if x != baseline)
        if baseline is None:
            raise UsageError(f"--step-cost {item!r} needs --baseline (the cost is a multiple of the baseline's)")
        if not sep or label not in labels or label == baseline:
            raise UsageError(f"--step-cost {item!r}: give LABEL=C with LABEL a group other than the baseline: {others}")
        try:
            cost = float(value)
        except ValueError:
            cost = math.nan
        if not (math.isfinite(cost) and cost > 0):
            raise UsageError(f"--step-cost {item!r}: C must be a finite number > 0, got {value!r}")
        costs[label] = cost
    return costs


def baseline_threshold(base: GroupResult, rule: str, window: int) -> float:
    """The threshold when only `--baseline` is given: the baseline's final score on the curve the crossing rule
    reads. `first`: its final mean (the metric at the group's last aligned step, mean over seeds); otherwise the
    mean over its seeds of each seed's crossing curve at that step (crossing_final)."""
    if rule == "first":
        return base.mean
    threshold = crossing_final(base.curves, base.grid[-1], rule, window)
    if math.isnan(threshold):
        raise UsageError(
            f"a seed of the baseline {base.label} has fewer than {window} evaluations, so no final score over "
            f"{window} consecutive ones; give --threshold or a smaller --crossing-window"
        )
    return threshold


def compare(args: Args) -> Comparison:
    """Everything but the output: find, filter, group and align the runs, and compute the statistics."""
    if not args.run_dirs:
        raise UsageError("give at least one folder of runs")
    if args.reps < 1:
        raise UsageError(f"--reps must be >= 1, got {args.reps}")
    if args.threshold is not None and not math.isfinite(args.threshold):
        raise UsageError(f"--threshold must be a finite number, got {args.threshold}")
    if args.crossing_window < 1:
        raise UsageError(f"--crossing-window must be >= 1, got {args.crossing_window}")
    if args.crossing == "moving-average" and args.crossing_window % 2 == 0:
        raise UsageError(f"--crossing-window must be odd with --crossing moving-average, got {args.crossing_window}")
    runs = find_runs(args.run_dirs)
    if not runs:
        raise UsageError(f"no run folders (folders holding config.json) found under {', '.join(args.run_dirs)}")
    env_id, runs = select_env(runs, args.env_id, args.run_dirs)
    groups = group_runs(runs, args.group_by)
    if args.baseline is not None and args.baseline not in groups:
        known = ", ".join(repr(label) for label in groups)
        raise UsageError(f"--baseline {args.baseline!r} is not a group; groups: {known}")
    step_costs = parse_step_costs(args.step_cost, list(groups), args.baseline)

    curves, sps, missing, sources = {}, {}, [], {}
    for run in runs:
        scalars = read_scalars(run.path, {args.metric, "charts/SPS"})
        curve = load_curve(run, args.metric, scalars)
        if curve is None:
            missing.append(run.path)
            continue
        curves[run.path] = curve
        sources[curve.source] = sources.get(curve.source, 0) + 1
        if "charts/SPS" in scalars:
            sps[run.path] = float(scalars["charts/SPS"][1][np.argmax(scalars["charts/SPS"][0])])
    if missing:
        raise UsageError(f"metric {args.metric} missing in {len(missing)} of {len(runs)} runs: {', '.join(missing)}")

    results = []
    for label, members in groups.items():
        paths = [run.path for run in members]
        unfinished = [run.path for run in members if not run.finished]
        if unfinished:
            warn(
                f"group {label}: {len(unfinished)} run(s) without final_eval.json (unfinished): {', '.join(unfinished)}"
            )
        if len(members) == 1:
            warn(f"group {label} has a single seed: no confidence interval (n/a)")
        seeds = [run.args.get("seed") for run in members]
        repeated = sorted({format_value(x) for x in seeds if seeds.count(x) > 1})
        if repeated:
            warn(f"group {label}: several runs with seed {', '.join(repeated)} (each counts as one seed)")
        group_curves = [curves[p] for p in paths]
        grid, values = align(group_curves, args.align)
        if grid.size == 0:
            what = "evaluation step (--align common)" if args.align == "common" else "range of steps"
            raise UsageError(f"the runs of group {label} share no {what}: {', '.join(paths)}")
        last_steps = sorted({int(c.steps[-1]) for c in group_curves})
        if len(last_steps) > 1:
            warn(f"group {label}: runs end at different steps {last_steps}; final values taken at step {grid[-1]}")
        finals = values[:, -1]
        iqm, iqm_ci = interval_estimate(finals, iqm_func, args.reps, args.seed)
        sps_values = [sps[p] for p in paths if p in sps]
        result = GroupResult(
            label=label,
            runs=paths,
            grid=grid,
            values=values,
            curves=group_curves,
            band=bootstrap_band(values, BAND_REPS, args.seed),
            finals=finals,
            iqm=iqm,
            iqm_ci=iqm_ci,
            mean=float(finals.mean()),
            std=float(finals.std(ddof=1)) if len(finals) > 1 else None,
            sps=float(np.mean(sps_values)) if sps_values else None,
            sps_runs=len(sps_values),
        )
        heldout = [read_heldout(run, args.metric) for run in members]
        if all(value is not None for value in heldout):
            result.heldout = np.array(heldout)
            result.heldout_iqm, result.heldout_ci = interval_estimate(result.heldout, iqm_func, args.reps, args.seed)
        results.append(result)
    base = next((r for r in results if r.label == args.baseline), None)
    threshold = args.threshold
    if threshold is None and base is not None:
        threshold = baseline_threshold(base, args.crossing, args.crossing_window)
    if threshold is not None:
        for result in results:
            steps, reached = steps_to_threshold(result.curves, threshold, args.crossing, args.crossing_window)
            result.threshold_steps, result.threshold_reached = steps, reached
            result.threshold_mean, result.threshold_ci = interval_estimate(steps, mean_func, args.reps, args.seed)
    if base is not None:
        for result in results:
            if result is not base:
                result.ratio, result.ratio_ci = ratio_estimate(
                    result.threshold_steps, base.threshold_steps, args.reps, args.seed
                )
                result.step_cost = step_costs.get(result.label)
    keys = [normalise_key(k) for k in args.group_by]
    from_baseline = args.threshold is None and args.baseline is not None
    return Comparison(
        env_id=env_id,
        metric=args.metric,
        group_by=keys,
        threshold=threshold,
        crossing=args.crossing,
        crossing_window=args.crossing_window,
        align=args.align,
        reps=args.reps,
        groups=results,
        sources=sources,
        baseline=args.baseline,
        threshold_from_baseline=from_baseline,
        step_costs=bool(step_costs),
    )


# ----------------------------------------------------------------------------------------------------------- output
def fmt(x: float) -> str:
    return f"{x:.4g}"


def fmt_ci(ci: tuple[float, float] | None, fmt_one=fmt) -> str:
    return "n/a" if ci is None else f"[{fmt_one(ci[0])}, {fmt_one(ci[1])}]"


def fmt_steps(x: float) -> str:
    return f"{round(x):d}"


def escape_cell(text: str) -> str:
    """`text` as a Markdown table cell (a `|` would end the cell)."""
    return text.replace("|", "\\|")


def format_ratio(g: GroupResult, base: GroupResult, cost: float = 1.0) -> str:
    """The ratio cell (the steps ratio times `cost`): `baseline` for the baseline; a bound (≥, ≤) when censored seeds
    make the point a bound."""
    if g is base:
        return "baseline"
    if math.isnan(g.ratio):
        return "n/a (baseline at step 0)"
    censored, base_censored = not g.threshold_reached.all(), not base.threshold_reached.all()
    if censored and base_censored:
        return "n/a (both censored)"
    bound = "≥ " if censored else "≤ " if base_censored else ""
    ci = None if g.ratio_ci is None else (g.ratio_ci[0] * cost, g.ratio_ci[1] * cost)
    return f"{bound}{g.ratio * cost:.2f} {fmt_ci(ci, lambda x: f'{x:.2f}')}"


def format_wall_ratio(g: GroupResult, base: GroupResult) -> str:
    """The wall-clock ratio cell: the steps ratio times the group's `--step-cost`, `n/a` without one."""
    if g is not base and g.step_cost is None:
        return "n/a (no --step-cost)"
    return format_ratio(g, base, 1.0 if g is base else g.step_cost)


def crossing_name(comp: Comparison) -> str:
    """The crossing rule as the steps column's header names it: `first`, `moving-average, window 3`, ..."""
    return comp.crossing if comp.crossing == "first" else f"{comp.crossing}, window {comp.crossing_window}"


def crossing_note(comp: Comparison) -> str:
    """The table's note on the steps to the threshold: the crossing rule, censoring, where the threshold comes from."""
    t, w, base = fmt(comp.threshold), comp.crossing_window, comp.baseline
    rule = {
        "first": f"the first of its own evaluation steps with metric ≥ {t}",
        "moving-average": f"the first of its own evaluation steps where the centred moving average of the metric over "
        f"{w} evaluations (fewer at the seed's two ends: its last point averages its last {w // 2 + 1}) is ≥ {t}",
        "consecutive": f"the first of {w} consecutive evaluations all with metric ≥ {t} (fewer than {w} left before "
        "the seed's end do not count)",
    }[comp.crossing]
    source = {
        "first": f" The threshold is the final mean of the baseline `{base}`.",
        "moving-average": f" The threshold is the final score of the baseline `{base}` on the same moving average "
        "(not its `final mean` column): the mean over its seeds of each seed's moving average at the group's final "
        "step.",
        "consecutive": f" The threshold is the final score of the baseline `{base}` on the same rule: the mean over "
        f"its seeds of the lowest of each seed's last {w} evaluations up to the group's final step.",
    }[comp.crossing]
    return (
        f"steps to ≥ {t} ({crossing_name(comp)}): per seed {rule} (a run longer than the rest of its group is read to "
        "its end), mean over seeds with a 95% bootstrap CI; a seed that never reaches it counts as its last step "
        "(censored, so the mean is then a lower bound, marked `≥`); `not reached`: no seed reaches it."
        + (source if comp.threshold_from_baseline else "")
    )


def format_table(comp: Comparison, command: str | None = None) -> str:
    """The markdown table with its explanatory notes."""
    header = ["group", "seeds", "final step", "final IQM [95% CI]", "final mean ± std"]
    heldout = any(g.heldout is not None for g in comp.groups)
    if heldout:
        header.append("held-out IQM [95% CI]")
    if comp.threshold is not None:
        header.append(f"steps to ≥ {fmt(comp.threshold)} ({crossing_name(comp)}) [95% CI]")
    base = next((g for g in comp.groups if g.label == comp.baseline), None)
    if base is not None:
        header.append(f"steps ratio to {escape_cell(base.label)} [95% CI]")
    if base is not None and comp.step_costs:
        header.append(f"wall-clock ratio to {escape_cell(base.label)} [95% CI]")
    header.append("steps/s")
    rows = []
    for g in comp.groups:
        std = "n/a" if g.std is None else fmt(g.std)
        row = [escape_cell(g.label), str(g.n), str(int(g.grid[-1])), f"{fmt(g.iqm)} {fmt_ci(g.iqm_ci)}"]
        row.append(f"{fmt(g.mean)} ± {std}")
        if heldout:
            row.append("n/a" if g.heldout is None else f"{fmt(g.heldout_iqm)} {fmt_ci(g.heldout_ci)}")
        if comp.threshold is not None:
            if not g.threshold_reached.any():
                cell = "not reached"
            else:
                bound = "" if g.threshold_reached.all() else "≥ "
                cell = f"{bound}{fmt_steps(g.threshold_mean)} {fmt_ci(g.threshold_ci, fmt_steps)}"
            row.append(f"{cell} ({int(g.threshold_reached.sum())}/{g.n} reached)")
        if base is not None:
            row.append(format_ratio(g, base))
        if base is not None and comp.step_costs:
            row.append(format_wall_ratio(g, base))
        row.append("n/a" if g.sps is None else f"{g.sps:.0f}")
        rows.append(row)
    lines = [f"## {comp.metric} on {comp.env_id}", ""]
    if command:
        lines += [f"Made by `{command}`.", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    sources = ", ".join(f"{src} ({n} run{'s' if n > 1 else ''})" for src, n in sorted(comp.sources.items()))
    notes = [
        f"groups: runs with equal `{'`, `'.join(comp.group_by)}`; seeds: runs per group; metric read from {sources}.",
        "final: the metric at the group's last aligned step (the last step every run of the group reached); "
        + (
            "runs' steps aligned by linear interpolation onto the union of their steps within the range all cover."
            if comp.align == "interpolate"
            else "runs' steps aligned on the steps they all have."
        ),
        "IQM: interquartile mean (25% trimmed mean) over seeds; 95% CI: percentile stratified bootstrap over seeds "
        f"(rliable, {comp.reps} replications); n/a for a single seed. std: sample standard deviation (ddof=1).",
    ]
    if heldout:
        notes.append(
            f"held-out: the runs' held-out final evaluation (`heldout/{comp.metric.split('/', 1)[-1]}` in "
            "final_eval.json: `--final-eval-episodes` episodes from initial states no periodic evaluation uses), IQM "
            "over seeds with its CI; the number to report when hyperparameters were selected on the periodic ones."
        )
    if comp.threshold is not None:
        notes.append(crossing_note(comp))
    if comp.baseline is not None:
        notes.append(
            f"steps ratio: the group's mean steps to ≥ {fmt(comp.threshold)} divided by the baseline's (<1: the "
            "group gets there in fewer env steps), with a 95% percentile bootstrap CI that resamples the seeds of "
            "both groups independently; n/a when either has a single seed. Censored seeds enter at their last step, "
            "as in the steps column, so the ratio is then a bound: `≥` when some seeds of the group never reach the "
            "threshold, `≤` when some of the baseline's never do."
        )
    if comp.step_costs:
        costs = ", ".join(f"{g.label} {g.step_cost:g}" for g in comp.groups if g.step_cost is not None)
        notes.append(
            f"wall-clock ratio: the steps ratio times the group's wall-clock seconds per env step as a multiple of the "
            f"baseline's, measured side by side on one machine (`--step-cost`: {costs}): the ratio of the times to "
            "the threshold on one core, training steps only (evaluations left out); the cost is held fixed, so the "
            "CI is the steps ratio's, scaled."
        )
    notes.append(
        "steps/s: mean over seeds of each run's last `charts/SPS` (env steps per second since the process started, "
        "updates included; since the resume for a resumed run); n/a without TensorBoard events."
    )
    lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def plot_groups(ax, comp: Comparison, labels: dict[str, str] | None = None, colors: dict[str, str] | None = None):
    """Draw one line per group (mean over seeds) with its 95% bootstrap band over seeds on the matplotlib `ax`; x in
    env steps. `labels` renames groups in the legend and `colors` fixes their colours (group label -> text, colour);
    other groups get matplotlib's cycle by their position."""
    from matplotlib.ticker import EngFormatter

    labels, colors = labels or {}, colors or {}
    for i, g in enumerate(comp.groups):
        color = colors.get(g.label, f"C{i % 10}")
        marker = "o" if g.grid.size == 1 else None
        label = f"{labels.get(g.label, g.label)} (n={g.n})"
        ax.plot(g.grid, g.mean_curve, color=color, marker=marker, label=label, gid=f"group {g.label}")
        if g.n > 1:
            ax.fill_between(g.grid, g.band[0], g.band[1], color=color, alpha=0.2, linewidth=0)
    if comp.threshold is not None:
        ax.axhline(comp.threshold, color="0.5", linestyle=":", linewidth=1, label=f"threshold {fmt(comp.threshold)}")
    ax.set_xlabel("env steps")
    ax.set_ylabel(comp.metric)
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.grid(alpha=0.3)
    ax.legend(title="mean, 95% bootstrap CI over seeds", fontsize="small", title_fontsize="small")


def make_figure(comp: Comparison):
    """One line per group (mean over seeds) with its 95% bootstrap band over seeds; x in env steps."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    plot_groups(ax, comp)
    ax.set_title(f"{comp.env_id}: {comp.metric}")
    return fig


def output_stem(out: str) -> str:
    stem, ext = os.path.splitext(out)
    return stem if ext in (".png", ".svg", ".md") else out


def write_outputs(comp: Comparison, out: str, table: str) -> list[str]:
    """`<out>.png`, `<out>.svg`, `<out>.md`; returns their paths."""
    import matplotlib

    stem = output_stem(out)
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    fig = make_figure(comp)
    paths = [stem + ".png", stem + ".svg", stem + ".md"]
    with matplotlib.rc_context({"svg.hashsalt": "compare_runs"}):  # reproducible SVG ids
        fig.savefig(paths[0], dpi=150, metadata={"Software": None})
        fig.savefig(paths[1], metadata={"Date": None, "Creator": None})
    with open(paths[2], "w") as f:
        f.write(table)
    return paths


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 bad input (one line `error: ...` on stderr)."""
    args = tyro.cli(Args, args=argv)
    try:
        comp = compare(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = "python compare_runs.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    table = format_table(comp, command)
    print(table, end="")
    if args.out:
        paths = write_outputs(comp, args.out, table)
        print(f"wrote {', '.join(paths)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
