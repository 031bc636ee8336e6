"""compare_runs.py on synthetic run folders with known curves: table numbers against hand-computed values, the three
crossing rules of the steps to a threshold, one figure line per group, TensorBoard purge_step handling, the errors and
the single-seed warning."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import compare_runs as cr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = "FetchReachDense-v4"
FAST = ["--reps", "2000"]


def make_run(root, exp_name, seed, steps, values, env_id=ENV, metric="eval/success_rate", finished=True, heldout=None,
             **args):  # fmt: skip
    """A run folder as the scripts write it: config.json, evals.jsonl (one line per step) and final_eval.json."""
    run_name = f"{env_id}__{exp_name}__{seed}__{1000 + seed}"
    path = os.path.join(root, run_name)
    os.makedirs(path)
    config = {
        "run_name": run_name,
        "args": {"exp_name": exp_name, "seed": seed, "env_id": env_id, "total_timesteps": int(steps[-1]), **args},
        "actor_params": 10,
        "critic_params": 20,
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    records = [
        {"eval_idx": i, "global_step": int(s), metric: float(v), "eval/return": -1.0, "eval/extra": [1, 2]}
        for i, (s, v) in enumerate(zip(steps, values, strict=True))
    ]
    with open(os.path.join(path, "evals.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    if finished:
        extra = {} if heldout is None else {metric.replace("eval/", "heldout/"): heldout, "heldout/episodes": 100}
        with open(os.path.join(path, "final_eval.json"), "w") as f:
            json.dump({**config, **records[-1], **extra}, f)
    return path


def table_rows(markdown):
    """The cells of the table's body rows."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")][1:]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def run_main(argv, capsys):
    rc = cr.main([*argv, *FAST])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


STEPS = [250, 500, 750, 1000]


@pytest.fixture
def eight_and_three(tmp_path):
    """Group `big`: 8 seeds with final values whose IQM is the mean of the middle four; group `small`: 3 seeds."""
    finals = [1.0, 0.0, 0.7, 0.5, 1.0, 0.1, 0.8, 0.6]  # sorted: 0 .1 | .5 .6 .7 .8 | 1 1
    for seed, final in enumerate(finals):
        make_run(tmp_path, "big", seed, STEPS, [0.0, 0.0, final / 2, final])
    for seed, final in enumerate([0.2, 0.4, 0.9]):
        make_run(tmp_path, "small", seed, STEPS, [0.0, 0.1, 0.1, final])
    return tmp_path


def test_table_numbers_match_hand_computed(eight_and_three, tmp_path, capsys):
    comp = cr.compare(cr.Args(run_dirs=[str(eight_and_three)], reps=2000))
    big, small = comp.groups
    assert (big.label, big.n, small.label, small.n) == ("big", 8, "small", 3)
    assert big.iqm == pytest.approx((0.5 + 0.6 + 0.7 + 0.8) / 4)
    assert big.mean == pytest.approx(4.7 / 8)
    assert big.std == pytest.approx(np.std([1.0, 0.0, 0.7, 0.5, 1.0, 0.1, 0.8, 0.6], ddof=1))
    lo, hi = big.iqm_ci
    assert 0.0 <= lo < 0.65 < hi <= 1.0
    # 3 seeds: scipy's trim_mean cuts int(0.25 * 3) = 0 runs per side, so the IQM is the mean
    assert small.iqm == pytest.approx(0.5)
    np.testing.assert_allclose(big.mean_curve, [0.0, 0.0, 4.7 / 16, 4.7 / 8])
    assert big.band[0][-1] < big.mean_curve[-1] < big.band[1][-1]
    assert big.band[0][0] == big.band[1][0] == 0.0  # every seed at 0: a degenerate band

    rc, out, err = run_main([str(eight_and_three), "--out", str(tmp_path / "fig" / "cmp")], capsys)
    assert rc == 0
    cells = table_rows(out)[0]
    assert cells[:3] == ["big", "8", "1000"]
    assert cells[3].startswith("0.65 [")
    assert cells[4] == f"0.5875 ± {big.std:.4g}"
    assert cells[5] == "n/a"  # no TensorBoard events: no steps/s
    assert (tmp_path / "fig" / "cmp.md").read_text() == out
    assert (tmp_path / "fig" / "cmp.png").stat().st_size > 1000
    assert "warning" not in err


def test_threshold_steps(tmp_path, capsys):
    # group `a`: crosses 0.5 at 500, 750 and never (counted at 1000); mean curve 0 .2 .5 .63 -> reaches 0.5
    make_run(tmp_path, "a", 1, STEPS, [0.0, 0.6, 0.8, 0.9])
    make_run(tmp_path, "a", 2, STEPS, [0.0, 0.0, 0.5, 0.7])
    make_run(tmp_path, "a", 3, STEPS, [0.0, 0.0, 0.2, 0.3])
    # group `b`: one seed reaches it at 1000, the mean curve never does
    make_run(tmp_path, "b", 1, STEPS, [0.0, 0.0, 0.0, 0.6])
    make_run(tmp_path, "b", 2, STEPS, [0.0, 0.0, 0.0, 0.2])
    comp = cr.compare(cr.Args(run_dirs=[str(tmp_path)], threshold=0.5, crossing="first", reps=2000))
    a, b = comp.groups
    np.testing.assert_array_equal(a.threshold_steps, [500, 750, 1000])
    np.testing.assert_array_equal(a.threshold_reached, [True, True, False])
    assert a.threshold_mean == pytest.approx(750.0)
    assert 500 <= a.threshold_ci[0] < 750 < a.threshold_ci[1] <= 1000
    np.testing.assert_array_equal(b.threshold_reached, [True, False])

    rc, out, _ = run_main([str(tmp_path), "--threshold", "0.5", "--crossing", "first"], capsys)
    assert rc == 0
    assert "| steps to ≥ 0.5 (first) [95% CI] |" in out
    rows = {cells[0]: cells[5] for cells in table_rows(out)}
    assert rows["a"].startswith("≥ 750 [") and rows["a"].endswith("(2/3 reached)")  # censored: a lower bound
    assert rows["b"] == "≥ 1000 [1000, 1000] (1/2 reached)"


def test_threshold_steps_read_each_run_to_its_own_end(tmp_path):
    # a run stopped at 500 (crossed at 250) and one that goes on to 1000 and crosses at 750, after the other's end:
    # the aligned grid ends at 500, the long run's steps to 0.5 are still 750, not censored at 500
    make_run(tmp_path, "a", 1, [250, 500], [0.6, 0.9], finished=False)
    make_run(tmp_path, "a", 2, STEPS, [0.0, 0.1, 0.5, 0.8])
    make_run(tmp_path, "a", 3, STEPS, [0.0, 0.1, 0.2, 0.3])  # never: censored at its own last step, 1000
    (g,) = cr.compare(cr.Args(run_dirs=[str(tmp_path)], threshold=0.5, crossing="first", reps=2000)).groups
    assert g.grid[-1] == 500
    np.testing.assert_array_equal(g.threshold_steps, [250, 750, 1000])
    np.testing.assert_array_equal(g.threshold_reached, [True, True, False])


def test_equal_threshold_steps_give_a_degenerate_ci(tmp_path):
    for seed in range(4):
        make_run(tmp_path, "a", seed, STEPS, [0.0, 1.0, 1.0, 1.0 - seed / 10])
    (g,) = cr.compare(cr.Args(run_dirs=[str(tmp_path)], threshold=0.9, crossing="first", reps=2000)).groups
    assert g.threshold_mean == 500 and g.threshold_ci == (500, 500)


def baseline_and_two_groups(tmp_path) -> None:
    """Baseline `mlp`: final mean 0.8, so the threshold is 0.8, reached by both seeds at 1000."""
    make_run(tmp_path, "mlp", 1, STEPS, [0.0, 0.2, 0.5, 0.8])
    make_run(tmp_path, "mlp", 2, STEPS, [0.0, 0.1, 0.6, 0.8])
    # `eq`: reaches 0.8 at 500 and 750: mean 625, ratio 0.625; two-sample bootstrap ratios lie in {0.5, 0.625, 0.75}
    make_run(tmp_path, "eq", 1, STEPS, [0.0, 0.9, 0.9, 0.9])
    make_run(tmp_path, "eq", 2, STEPS, [0.0, 0.5, 0.8, 0.9])
    # `slow`: one seed never reaches 0.8 (counted at 1000): ratio >= (750 + 1000) / 2 / 1000
    make_run(tmp_path, "slow", 1, STEPS, [0.0, 0.0, 0.8, 0.8])
    make_run(tmp_path, "slow", 2, STEPS, [0.0, 0.0, 0.0, 0.1])


def test_steps_ratio_to_a_baseline(tmp_path, capsys):
    baseline_and_two_groups(tmp_path)
    comp = cr.compare(cr.Args(run_dirs=[str(tmp_path)], baseline="mlp", crossing="first", reps=2000))
    assert comp.threshold == pytest.approx(0.8) and comp.threshold_from_baseline
    eq, mlp, slow = comp.groups
    assert comp.threshold == mlp.mean  # `first`: the baseline's final mean, exactly
    np.testing.assert_array_equal(mlp.threshold_steps, [1000, 1000])
    assert mlp.ratio is None
    assert eq.ratio == pytest.approx(0.625) and eq.ratio_ci == (0.5, 0.75)
    assert slow.ratio == pytest.approx(0.875)

    rc, out, _ = run_main([str(tmp_path), "--baseline", "mlp", "--crossing", "first"], capsys)
    assert rc == 0
    assert "| steps to ≥ 0.8 (first) [95% CI] | steps ratio to mlp [95% CI] |" in out
    rows = {cells[0]: cells[6] for cells in table_rows(out)}
    assert rows == {"eq": "0.62 [0.50, 0.75]", "mlp": "baseline", "slow": rows["slow"]}
    assert rows["slow"].startswith("≥ 0.88 [")
    assert "The threshold is the final mean of the baseline `mlp`." in out

    # an explicit threshold wins over the baseline's final mean: 0.5 is reached at 750 by both mlp seeds
    comp = cr.compare(cr.Args(run_dirs=[str(tmp_path)], baseline="mlp", threshold=0.5, crossing="first", reps=2000))
    assert comp.threshold == 0.5 and not comp.threshold_from_baseline
    assert comp.groups[0].ratio == pytest.approx(500 / 750)

    assert cr.ratio_estimate(np.array([10.0, 20.0]), np.array([0.0, 10.0]), 100, 0)[1] is None  # step 0: no ratio
    assert cr.ratio_estimate(np.array([15.0]), np.array([20.0, 40.0]), 100, 0) == (0.5, None)  # one seed: no CI

    rc, out, err = run_main([str(tmp_path), "--baseline", "MLP"], capsys)
    assert (rc, out) == (2, "")
    assert err == "error: --baseline 'MLP' is not a group; groups: 'eq', 'mlp', 'slow'\n"


def test_wall_clock_ratio_is_the_steps_ratio_times_the_measured_step_cost(tmp_path, capsys):
    # eq's steps ratio to mlp 0.625 [0.5, 0.75]; eq costs 2.4x the baseline's seconds per env step
    baseline_and_two_groups(tmp_path)
    argv = [str(tmp_path), "--baseline", "mlp", "--crossing", "first", "--step-cost", "eq=2.4"]
    comp = cr.compare(cr.tyro.cli(cr.Args, args=[*argv, *FAST]))
    assert comp.step_costs and comp.groups[0].step_cost == 2.4 and comp.groups[2].step_cost is None
    rc, out, _ = run_main(argv, capsys)
    assert rc == 0
    assert "| steps ratio to mlp [95% CI] | wall-clock ratio to mlp [95% CI] | steps/s |" in out
    rows = {cells[0]: cells[6:8] for cells in table_rows(out)}
    assert rows["eq"] == ["0.62 [0.50, 0.75]", "1.50 [1.20, 1.80]"]  # 0.625 x 2.4 = 1.5: slower to it on one core
    assert rows["mlp"] == ["baseline", "baseline"]
    assert rows["slow"][1] == "n/a (no --step-cost)"
    assert "(`--step-cost`: eq 2.4)" in out

    rc, out, _ = run_main([str(tmp_path), "--baseline", "mlp"], capsys)  # no cost given: no column
    assert rc == 0 and "wall-clock ratio" not in out


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--step-cost", "eq=2"], "error: --step-cost 'eq=2' needs --baseline (the cost is a multiple of the "
         "baseline's)"),
        (["--baseline", "mlp", "--step-cost", "mlp=2"], "error: --step-cost 'mlp=2': give LABEL=C with LABEL a "
         "group other than the baseline: 'eq'"),
        (["--baseline", "mlp", "--step-cost", "eq"], "error: --step-cost 'eq': give LABEL=C with LABEL a group "
         "other than the baseline: 'eq'"),
        (["--baseline", "mlp", "--step-cost", "eq=nan"], "error: --step-cost 'eq=nan': C must be a finite number "
         "> 0, got 'nan'"),
        (["--baseline", "mlp", "--step-cost", "eq=0"], "error: --step-cost 'eq=0': C must be a finite number > 0, "
         "got '0'"),
    ],
)  # fmt: skip
def test_bad_step_cost_is_one_line_naming_it(tmp_path, capsys, argv, error):
    make_run(tmp_path, "mlp", 1, STEPS, [0.0, 0.2, 0.5, 0.8])
    make_run(tmp_path, "eq", 1, STEPS, [0.0, 0.9, 0.9, 0.9])
    rc, out, err = run_main([str(tmp_path), *argv], capsys)
    assert (rc, out) == (2, "")
    assert err.splitlines()[-1] == error


def test_alignment_of_different_grids(tmp_path, capsys):
    make_run(tmp_path, "a", 1, [100, 200, 300, 400], [0.0, 1.0, 2.0, 3.0])
    unfinished = make_run(tmp_path, "a", 2, [150, 250, 350], [10.0, 20.0, 30.0], finished=False)
    (g,) = cr.compare(cr.Args(run_dirs=[str(tmp_path)], reps=2000)).groups
    np.testing.assert_array_equal(g.grid, [150, 200, 250, 300, 350])
    np.testing.assert_allclose(g.values[0], [0.5, 1.0, 1.5, 2.0, 2.5])
    np.testing.assert_allclose(g.values[1], [10.0, 15.0, 20.0, 25.0, 30.0])
    np.testing.assert_allclose(g.finals, [2.5, 30.0])
    assert capsys.readouterr().err == (
        f"warning: group a: 1 run(s) without final_eval.json (unfinished): {os.path.normpath(unfinished)}\n"
        "warning: group a: runs end at different steps [350, 400]; final values taken at step 350\n"
    )
    with pytest.raises(cr.UsageError, match="^the runs of group a share no evaluation step \\(--align common\\): "):
        cr.compare(cr.Args(run_dirs=[str(tmp_path)], align="common", reps=2000))
    other = tmp_path / "other"
    make_run(other, "b", 1, [100, 200, 300, 400], [0.0, 1.0, 2.0, 3.0])
    make_run(other, "b", 2, [100, 300, 400], [0.0, 4.0, 6.0])
    (g,) = cr.compare(cr.Args(run_dirs=[str(other)], align="common", reps=2000)).groups
    assert (g.grid.tolist(), g.values.tolist()) == ([100, 300, 400], [[0.0, 2.0, 3.0], [0.0, 4.0, 6.0]])
    (g,) = cr.compare(cr.Args(run_dirs=[str(other)], reps=2000)).groups
    assert (g.grid.tolist(), g.values.tolist()) == ([100, 200, 300, 400], [[0, 1, 2, 3], [0, 2, 4, 6]])


def test_figure_has_one_line_per_group(eight_and_three, tmp_path):
    make_run(eight_and_three, "single", 0, STEPS, [0.0, 0.2, 0.4, 0.6])
    comp = cr.compare(cr.Args(run_dirs=[str(eight_and_three)], threshold=0.5, reps=2000))
    fig = cr.make_figure(comp)
    (ax,) = fig.axes
    lines = [line for line in ax.get_lines() if (line.get_gid() or "").startswith("group ")]
    assert [line.get_label() for line in lines] == ["big (n=8)", "single (n=1)", "small (n=3)"]
    assert len(ax.get_lines()) == 4  # and the threshold
    np.testing.assert_allclose(lines[0].get_ydata(), [0.0, 0.0, 4.7 / 16, 4.7 / 8])
    np.testing.assert_array_equal(lines[0].get_xdata(), STEPS)
    assert len(ax.collections) == 2  # bands for the groups with several seeds
    assert ax.get_title() == f"{ENV}: eval/success_rate"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["big (n=8)", "single (n=1)", "small (n=3)", "threshold 0.5"]
    paths = cr.write_outputs(comp, str(tmp_path / "out.svg"), "table\n")
    assert paths == [str(tmp_path / f"out.{ext}") for ext in ("png", "svg", "md")]
    svg = (tmp_path / "out.svg").read_text()
    assert [svg.count(f'id="group {label}"') for label in ("big", "single", "small")] == [1, 1, 1]


def test_group_by_several_keys_and_env_filter(tmp_path, capsys):
    for seed in range(2):
        make_run(tmp_path, "eq", seed, STEPS, [0, 0, 0, 0.5], dihedral_n=4)
        make_run(tmp_path, "eq", seed + 10, STEPS, [0, 0, 0, 0.7], dihedral_n=8)
        make_run(tmp_path, "mlp", seed, STEPS, [0, 0, 0, 0.1])
        make_run(tmp_path, "mlp", seed, STEPS, [0, 0, 0, 0.1], env_id="FetchPushDense-v4")
    rc, _, err = run_main([str(tmp_path)], capsys)
    assert rc == 2
    assert err == (
        "error: runs of several env ids found: FetchPushDense-v4 (2 runs), FetchReachDense-v4 (6 runs); "
        "choose one with --env-id\n"
    )
    comp = cr.compare(cr.Args(run_dirs=[str(tmp_path)], env_id=ENV, group_by=["exp_name", "dihedral-n"], reps=2000))
    assert [(g.label, g.n, g.mean) for g in comp.groups] == [
        ("exp_name=eq, dihedral_n=4", 2, 0.5),
        ("exp_name=eq, dihedral_n=8", 2, 0.7),
        ("exp_name=mlp, dihedral_n=-", 2, pytest.approx(0.1)),
    ]
    rc, _, err = run_main([str(tmp_path), "--env-id", "FetchSlideDense-v4"], capsys)
    assert rc == 2 and err.startswith("error: no runs of env id FetchSlideDense-v4 under ")


def test_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_main([str(empty)], capsys)[1:] == ("", f"error: no run folders (folders holding config.json) found "
                                                    f"under {empty}\n")  # fmt: skip

    runs = tmp_path / "runs"
    make_run(runs, "a", 1, STEPS, [0, 0, 0, 1])
    missing = make_run(runs, "a", 2, STEPS, [0, 0, 0, 1], metric="eval/other")
    rc, out, err = run_main([str(runs)], capsys)
    assert rc == 2 and out == ""
    assert err == f"error: metric eval/success_rate missing in 1 of 2 runs: {os.path.normpath(missing)}\n"

    rc, _, err = run_main([str(runs), "--metric", "eval/other", "--group-by", "exp_name", "nope"], capsys)
    assert rc == 2
    assert err == "error: unknown --group-by key nope; allowed: env_id, exp_name, seed, total_timesteps\n"

    rc, _, err = run_main([str(tmp_path / "absent")], capsys)
    assert rc == 2 and err == f"error: {tmp_path / 'absent'} is not a folder\n"


def test_cli_exit_code_and_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "compare_runs.py"), str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == f"error: no run folders (folders holding config.json) found under {tmp_path}\n"


def test_single_seed_warning(tmp_path, capsys):
    make_run(tmp_path, "solo", 1, STEPS, [0.0, 0.1, 0.2, 0.4])
    make_run(tmp_path, "pair", 1, STEPS, [0.0, 0.1, 0.2, 0.4])
    make_run(tmp_path, "pair", 2, STEPS, [0.0, 0.1, 0.2, 0.6])
    rc, out, err = run_main([str(tmp_path)], capsys)
    assert rc == 0
    assert err == "warning: group solo has a single seed: no confidence interval (n/a)\n"
    assert "| solo | 1 | 1000 | 0.4 n/a | 0.4 ± n/a | n/a |" in out


def test_unknown_keys_and_partial_metrics(tmp_path):
    """Keys a run does not know are ignored; a key present in some lines only (e.g. a later held-out evaluation)
    gives a curve of those lines; a metric only in final_eval.json gives one point."""
    path = make_run(tmp_path, "a", 1, STEPS, [0.0, 0.1, 0.2, 0.4])
    with open(os.path.join(path, "evals.jsonl"), "a") as f:
        f.write(json.dumps({"eval_idx": 4, "global_step": 1000, "heldout/success_rate": 0.3, "note": "x"}) + "\n")
        f.write('{"eval_idx": 5, "global_st')  # a line torn by a crash
    with open(os.path.join(path, "final_eval.json")) as f:
        final = json.load(f)
    with open(os.path.join(path, "final_eval.json"), "w") as f:
        json.dump({**final, "final/only": 0.9}, f)
    run = cr.find_runs([str(tmp_path)])[0]
    curve = cr.load_curve(run, "eval/success_rate", scalars={})
    np.testing.assert_array_equal(curve.steps, STEPS)
    held = cr.load_curve(run, "heldout/success_rate", scalars={})
    assert (held.steps.tolist(), held.values.tolist(), held.source) == ([1000], [0.3], "evals.jsonl")
    only = cr.load_curve(run, "final/only", scalars={})
    assert (only.steps.tolist(), only.values.tolist(), only.source) == ([1000], [0.9], "final_eval.json")


def test_tensorboard_metric_honours_purge_step(tmp_path, capsys):
    """A resumed run: the second event file's purge_step drops the first file's events at steps >= 6."""
    from torch.utils.tensorboard import SummaryWriter

    paths = [make_run(tmp_path, "a", seed, STEPS, [0, 0, 0, 1]) for seed in (1, 2)]
    for k, path in enumerate(paths):
        writer = SummaryWriter(path)
        for step in range(1, 11):
            writer.add_scalar("charts/episodic_return", float(step + k), step)
            writer.add_scalar("charts/SPS", 50.0, step)
        writer.close()
        writer = SummaryWriter(path, purge_step=6, filename_suffix=".resumed")
        for step in range(6, 13):
            writer.add_scalar("charts/episodic_return", float(100 + step + k), step)
            writer.add_scalar("charts/SPS", 100.0 + 10 * k, step)
        writer.close()
    scalars = cr.read_scalars(paths[0], {"charts/episodic_return", "charts/SPS"})
    steps, values = scalars["charts/episodic_return"]
    assert steps.tolist() == list(range(1, 13))
    assert values.tolist() == [1, 2, 3, 4, 5, 106, 107, 108, 109, 110, 111, 112]

    comp = cr.compare(cr.Args(run_dirs=[str(tmp_path)], metric="charts/episodic_return", threshold=108, reps=2000))
    (g,) = comp.groups
    assert comp.sources == {"events": 2}
    np.testing.assert_allclose(g.finals, [112, 113])
    np.testing.assert_array_equal(g.threshold_steps, [8, 7])
    assert g.sps == pytest.approx(105.0)  # last charts/SPS of each run: 100 and 110
    rc, out, _ = run_main([str(tmp_path), "--metric", "charts/episodic_return"], capsys)
    assert rc == 0 and out.splitlines()[6].endswith("| 105 |")


def test_repeated_seed_and_overlapping_folders(tmp_path, capsys):
    make_run(tmp_path / "first", "a", 1, STEPS, [0.0, 0.1, 0.2, 0.4])
    make_run(tmp_path / "second", "a", 1, STEPS, [0.0, 0.1, 0.2, 0.6])
    comp = cr.compare(cr.Args(run_dirs=[str(tmp_path), str(tmp_path / "first")], reps=2000))
    assert comp.groups[0].n == 2  # the run under both folders counts once
    assert capsys.readouterr().err == "warning: group a: several runs with seed 1 (each counts as one seed)\n"


def test_heldout_final_evaluation_gets_its_own_iqm_column_apart_from_the_periodic_one(tmp_path, capsys):
    heldout = [0.9, 0.1, 0.5, 0.6, 0.7, 0.3, 0.8, 0.2]  # sorted: .1 .2 | .3 .5 .6 .7 | .8 .9
    for seed, value in enumerate(heldout):
        make_run(tmp_path, "tuned", seed, STEPS, [0.0, 0.2, 0.6, 1.0], heldout=value)
    make_run(tmp_path, "old", 0, STEPS, [0.0, 0.1, 0.2, 0.3])  # written before held-out evaluations existed
    make_run(tmp_path, "old", 1, STEPS, [0.0, 0.1, 0.2, 0.5])
    comp = cr.compare(cr.Args(run_dirs=[str(tmp_path)], reps=2000))
    old, tuned = comp.groups
    assert tuned.iqm == pytest.approx(1.0) and tuned.heldout_iqm == pytest.approx((0.3 + 0.5 + 0.6 + 0.7) / 4)
    assert old.heldout is None
    rc, out, _ = run_main([str(tmp_path)], capsys)
    assert rc == 0 and "| held-out IQM [95% CI] |" in out
    rows = {row[0]: row for row in table_rows(out)}
    assert rows["tuned"][5].startswith("0.525 [") and rows["old"][5] == "n/a"


NOISY_STEPS = [100, 200, 300, 400, 500, 600]
NOISY = [0.1, 0.9, 0.1, 0.8, 0.85, 0.9]  # one lucky evaluation at 200 before the curve gets to 0.8 for good


def test_crossing_rules_on_a_noisy_curve_give_hand_computed_steps(tmp_path, capsys):
    # centred means of 3: .5 (ends: 2 points) .367 .6 .583 .85 .875 (2 points) -> first >= 0.8 at 500
    np.testing.assert_allclose(
        cr.crossing_curve(NOISY, "moving-average", 3), [0.5, 1.1 / 3, 0.6, 1.75 / 3, 0.85, 0.875]
    )
    # lowest of 3 consecutive: .1 .1 .1 .8, and no full window from 500 on -> first >= 0.8 at 400
    np.testing.assert_allclose(cr.crossing_curve(NOISY, "consecutive", 3), [0.1, 0.1, 0.1, 0.8, np.nan, np.nan])
    np.testing.assert_array_equal(cr.crossing_curve(NOISY, "first", 3), NOISY)
    curve = cr.Curve(np.array(NOISY_STEPS), np.array(NOISY), "evals.jsonl")
    for rule, step in [("first", 200), ("moving-average", 500), ("consecutive", 400)]:
        steps, reached = cr.steps_to_threshold([curve], 0.8, rule, 3)
        assert (steps.tolist(), reached.tolist()) == ([step], [True]), rule

    for seed, heldout in [(1, 0.6), (2, 0.7)]:
        make_run(tmp_path, "noisy", seed, NOISY_STEPS, NOISY, heldout=heldout)
    expected = [
        ((), "moving-average, window 3", "500"),  # the default
        (("--crossing", "consecutive"), "consecutive, window 3", "400"),
        (("--crossing", "first"), "first", "200"),
    ]
    for flags, name, step in expected:
        rc, out, _ = run_main([str(tmp_path), "--threshold", "0.8", *flags], capsys)
        header = [cell.strip() for cell in out.splitlines()[4].strip("|").split("|")]
        assert rc == 0 and header == [
            "group", "seeds", "final step", "final IQM [95% CI]", "final mean ± std", "held-out IQM [95% CI]",
            f"steps to ≥ 0.8 ({name}) [95% CI]", "steps/s",
        ]  # fmt: skip
        (cells,) = table_rows(out)
        # the curve's last value, then the held-out final evaluation (final_eval.json), then the crossing
        assert cells[3:7] == ["0.9 [0.9, 0.9]", "0.9 ± 0", "0.65 [0.6, 0.7]", f"{step} [{step}, {step}] (2/2 reached)"]


def test_moving_average_window_shrinks_at_both_ends_of_a_run():
    late = [0.0, 0.0, 0.0, 0.75, 0.95]  # reaches 0.8 only on its last point, the mean of its last 2 evaluations
    np.testing.assert_allclose(cr.crossing_curve(late, "moving-average", 3), [0.0, 0.0, 0.25, 1.7 / 3, 0.85])
    np.testing.assert_allclose(cr.crossing_curve(late, "moving-average", 5), [0.0, 0.1875, 0.34, 0.425, 1.7 / 3])
    early = [0.95, 0.75, 0.0, 0.0, 0.0]  # its first point is the mean of its first 2 evaluations
    np.testing.assert_allclose(cr.crossing_curve(early, "moving-average", 3), [0.85, 1.7 / 3, 0.25, 0.0, 0.0])
    np.testing.assert_array_equal(cr.crossing_curve(late, "moving-average", 1), late)
    curves = [cr.Curve(np.array(STEPS + [1250]), np.array(v), "evals.jsonl") for v in (late, early)]
    steps, reached = cr.steps_to_threshold(curves, 0.8, "moving-average", 3)
    assert (steps.tolist(), reached.tolist()) == ([1250, 250], [True, True])
    steps, reached = cr.steps_to_threshold(curves, 0.8, "moving-average", 5)
    assert (steps.tolist(), reached.tolist()) == ([1250, 1250], [False, False])  # censored at the last step


def test_consecutive_window_past_the_end_of_a_run_is_censored(tmp_path, capsys):
    # seed 1: 0.9 at its last 2 evaluations only, not 3 in a row: censored, counted at its last step 1250
    make_run(tmp_path, "a", 1, STEPS + [1250], [0.0, 0.0, 0.0, 0.9, 0.9])
    make_run(tmp_path, "a", 2, STEPS + [1250], [0.0, 0.9, 0.9, 0.9, 0.9])  # 3 in a row from 500
    make_run(tmp_path, "b", 1, STEPS + [1250], [0.0, 0.0, 0.0, 0.0, 0.9])  # never
    comp = cr.compare(cr.Args(run_dirs=[str(tmp_path)], threshold=0.8, crossing="consecutive", reps=2000))
    a, b = comp.groups
    assert (a.threshold_steps.tolist(), a.threshold_reached.tolist()) == ([1250, 500], [False, True])
    assert (b.threshold_steps.tolist(), b.threshold_reached.tolist()) == ([1250], [False])
    rc, out, _ = run_main([str(tmp_path), "--threshold", "0.8", "--crossing", "consecutive"], capsys)
    rows = {cells[0]: cells[5] for cells in table_rows(out)}
    assert rc == 0 and rows == {"a": "≥ 875 [500, 1250] (1/2 reached)", "b": "not reached (0/1 reached)"}
    # 2 in a row fit before the end: seed 1 crosses at 1000
    comp = cr.compare(
        cr.Args(run_dirs=[str(tmp_path)], threshold=0.8, crossing="consecutive", crossing_window=2, reps=2000)
    )
    assert comp.groups[0].threshold_steps.tolist() == [1000, 500]


def test_baseline_threshold_is_its_final_score_on_the_crossing_rules_curve(tmp_path, capsys):
    # baseline `mlp`: last centred means (last 2 evaluations) 0.8 and 0.5: threshold 0.65 (the `first` one is 0.8);
    # its smoothed curves .1 .267 .6 .8 (crosses at 1000) and .1 .2 .4 .5 (never: censored at 1000)
    make_run(tmp_path, "mlp", 1, STEPS, [0.0, 0.2, 0.6, 1.0])
    make_run(tmp_path, "mlp", 2, STEPS, [0.0, 0.2, 0.4, 0.6])
    # `eq`: smoothed .45 .6 .9 .9 and .25 .433 .733 .85: both at 750 (`first` would give 500 to the first seed)
    make_run(tmp_path, "eq", 1, STEPS, [0.0, 0.9, 0.9, 0.9])
    make_run(tmp_path, "eq", 2, STEPS, [0.0, 0.5, 0.8, 0.9])
    # `slow`: smoothed 0 .2 .5 .75 (at 1000) and 0 0 .033 .05 (never): both groups censored, no ratio
    make_run(tmp_path, "slow", 1, STEPS, [0.0, 0.0, 0.6, 0.9])
    make_run(tmp_path, "slow", 2, STEPS, [0.0, 0.0, 0.0, 0.1])
    comp = cr.compare(cr.Args(run_dirs=[str(tmp_path)], baseline="mlp", reps=2000))
    eq, mlp, slow = comp.groups
    assert comp.threshold == pytest.approx(0.65) and mlp.mean == pytest.approx(0.8)
    assert (mlp.threshold_steps.tolist(), mlp.threshold_reached.tolist()) == ([1000, 1000], [True, False])
    assert eq.threshold_steps.tolist() == [750, 750] and eq.ratio == pytest.approx(0.75)
    rc, out, _ = run_main([str(tmp_path), "--baseline", "mlp"], capsys)
    assert rc == 0 and "| steps to ≥ 0.65 (moving-average, window 3) [95% CI] | steps ratio to mlp [95% CI] |" in out
    rows = {cells[0]: cells[5:7] for cells in table_rows(out)}
    assert rows == {
        "eq": ["750 [750, 750] (2/2 reached)", "≤ 0.75 [0.75, 0.75]"],  # the baseline censored: an upper bound
        "mlp": ["≥ 1000 [1000, 1000] (1/2 reached)", "baseline"],
        "slow": ["≥ 1000 [1000, 1000] (1/2 reached)", "n/a (both censored)"],
    }
    assert "The threshold is the final score of the baseline `mlp` on the same moving average" in out
    # a seed longer than the group is read at the group's final step 1000: its centred mean (0 + .3 + .6) / 3 there
    short = cr.Curve(np.array(STEPS), np.array([0.0, 0.2, 0.6, 1.0]), "evals.jsonl")
    long = cr.Curve(np.array(STEPS + [1250]), np.array([0.0, 0.0, 0.0, 0.3, 0.6]), "evals.jsonl")
    assert cr.crossing_final([short, long], 1000, "moving-average", 3) == pytest.approx((0.8 + 0.3) / 2)
    assert cr.crossing_final([short, long], 1000, "consecutive", 2) == pytest.approx((0.6 + 0.3) / 2)
    assert cr.crossing_final([short, long], 1000, "first", 3) == pytest.approx((1.0 + 0.3) / 2)

    # consecutive, 2 in a row: the mean over seeds of the lowest of each one's last 2 evaluations, (0.6 + 0.4) / 2
    comp = cr.compare(
        cr.Args(run_dirs=[str(tmp_path)], baseline="mlp", crossing="consecutive", crossing_window=2, reps=2000)
    )
    assert comp.threshold == pytest.approx(0.5)
    with pytest.raises(cr.UsageError, match="^a seed of the baseline mlp has fewer than 5 evaluations, so no final"):
        cr.compare(
            cr.Args(run_dirs=[str(tmp_path)], baseline="mlp", crossing="consecutive", crossing_window=5, reps=2000)
        )


def test_crossing_window_must_be_positive_and_odd_for_a_centred_mean(tmp_path, capsys):
    make_run(tmp_path, "a", 1, STEPS, [0.0, 0.1, 0.2, 0.4])
    rc, out, err = run_main([str(tmp_path), "--crossing-window", "0"], capsys)
    assert (rc, out, err) == (2, "", "error: --crossing-window must be >= 1, got 0\n")
    rc, out, err = run_main([str(tmp_path), "--crossing-window", "4"], capsys)
    assert (rc, out, err) == (2, "", "error: --crossing-window must be odd with --crossing moving-average, got 4\n")
    rc, _, _ = run_main([str(tmp_path), "--crossing", "consecutive", "--crossing-window", "4"], capsys)
    assert rc == 0
