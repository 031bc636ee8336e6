"""Regenerate the tables and figures of docs/BENCHMARKS.md that are made from committed run records.

Records: `benchmarks/results/<study>/<run_name>/` holds a finished run's small files (`config.json`, `evals.jsonl`,
`final_eval.json`; never checkpoints or events), copied from its run folder by `--collect` as soon as it ends. Each
study in STUDIES names the command that made its runs and the `compare_runs.py` arguments of its table; the docs
hold each table between `<!-- regenerated: NAME -->` and `<!-- /regenerated: NAME -->`.

    python benchmarks/regenerate.py                     # rewrite docs/figures/NAME.{png,svg,md}, the docs' tables
                                                        # and the README's figure (HEADLINE)
    python benchmarks/regenerate.py --check             # exit 1 naming every table that differs from its records
    python benchmarks/regenerate.py --collect runs/push_select --study push_select   # copy finished runs' records

A study's `speed.json` (benchmarks/study_speed.py: the wall-clock cost per env step of each group against the
baseline, measured side by side) adds `--step-cost` to its table: the wall-clock ratio column.

Exit codes: 0 done (or no difference), 1 a table differs (`--check`), 2 bad input (one line `error: ...`).
"""

import argparse
import json
import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import compare_runs  # noqa: E402

DOC = os.path.join(ROOT, "docs", "BENCHMARKS.md")
RESULTS = os.path.join("benchmarks", "results")
RECORD_FILES = ("config.json", "evals.jsonl", "final_eval.json")


@dataclass(frozen=True)
class Study:
    made_by: str  # the command that made the runs (script, flags, seeds, steps)
    compare: tuple[str, ...]  # compare_runs.py arguments after the records folder
    made_at: str = ""  # the commit to check out first, where today's defaults would make other runs


STUDIES = {
    "push_select": Study(
        made_by="bash benchmarks/push.sh runs/push_select 100000 1 mlp512 mlp400 mlp3x256 mlp mlp:symnorm "
        "mlp400:symnorm",
        made_at="commit 68d7da6, where the MLP's default normaliser was still the per-coordinate one",
        compare=("--env-id", "FetchPush-v4", "--threshold", "0.5"),
    ),
    "push_fresh": Study(
        made_by='bash benchmarks/push.sh runs/push_fresh 100000 "11 12 13 14 15" mlp d4p d8p mlp:coordnorm',
        compare=("--env-id", "FetchPush-v4", "--threshold", "0.5", "--baseline", "push-mlp"),
    ),
    "slide_fresh": Study(
        made_by='ENV_ID=FetchSlide-v4 bash benchmarks/push.sh runs/slide_fresh 100000 "11 12 13" mlp d8p',
        compare=("--env-id", "FetchSlide-v4", "--baseline", "push-mlp"),
    ),
}
HEADLINE = "fresh_seeds"  # docs/figures/fresh_seeds.{png,svg}: one panel per study below, the README's figure
HEADLINE_STUDIES = ("push_fresh", "slide_fresh")
LABELS = {"push-mlp": "MLP 256x256 (selected baseline)", "push-d8p": "D_8-equivariant, 64 fields",
          "push-d4p": "D_4-equivariant, 90 fields",
          "push-mlp-coordnorm": "MLP 256x256, per-coordinate normaliser (ablation)"}  # fmt: skip
COLORS = {"push-mlp": "C1", "push-d8p": "C0", "push-d4p": "C2", "push-mlp-coordnorm": "C3"}  # one colour per agent


def has_records(name: str) -> bool:
    folder = os.path.join(ROOT, RESULTS, name)
    return os.path.isdir(folder) and any(os.path.isdir(os.path.join(folder, e)) for e in os.listdir(folder))


def speed_record(name: str) -> dict | None:
    """The study's speed.json (benchmarks/study_speed.py --write), None without one."""
    path = os.path.join(ROOT, RESULTS, name, "speed.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def study_command(name: str) -> list[str]:
    """compare_runs.py's arguments for the study, its records folder first (a path relative to the repo root)."""
    speed = speed_record(name)
    # one --step-cost flag with every LABEL=C after it: tyro keeps only the last of a repeated list flag
    costs = [] if speed is None else ["--step-cost", *(f"{g}={c}" for g, c in speed["step_cost"].items())]
    return [os.path.join(RESULTS, name), *STUDIES[name].compare, *costs, "--out", os.path.join("docs", "figures", name)]


def regenerate(name: str, write_figure: bool, comps: dict | None = None) -> str:
    """The study's docs block: the command that made the runs, then compare_runs' table of the committed records
    (a line saying there are none yet for a study whose runs have not finished). The comparison is also put in
    `comps[name]` when `comps` is given, for `headline_figure` to draw without computing it again."""
    if not has_records(name):
        return f"Runs made by `{STUDIES[name].made_by}`; no records yet in `{RESULTS}/{name}/`.\n"
    argv = study_command(name)
    args = compare_runs.tyro.cli(compare_runs.Args, args=argv)
    cwd = os.getcwd()
    os.chdir(ROOT)  # relative paths: the table reads the same from any working directory
    try:
        comp = compare_runs.compare(args)
        if comps is not None:
            comps[name] = comp
        table = compare_runs.format_table(comp, "python compare_runs.py " + shlex.join(argv))
        if write_figure:
            compare_runs.write_outputs(comp, args.out, table)
    finally:
        os.chdir(cwd)
    study, speed = STUDIES[name], speed_record(name)
    at = f" at {study.made_at}" if study.made_at else ""
    cost = ""
    if speed is not None:
        m = speed["machine"]
        cost = (
            f" Costs per env step (`--step-cost`) measured by `{speed['made_by']}` ({speed['date']}; {m['cpu']}, "
            f"torch CPU capability {m['torch_cpu_capability']}, {speed['steps']} env steps per run, load average "
            f"{m['load_average_at_start']:.2f} at the start), records in `{RESULTS}/{name}/speed.json`."
        )
    return f"Runs made by `{study.made_by}`{at}; records in `{RESULTS}/{name}/`.{cost}\n\n{table}"


def headline_figure(comps: dict | None = None):
    """The README's figure: one panel per study of HEADLINE_STUDIES that has records (None if none has), each
    agent in its COLORS colour in every panel; a study's comparison is taken from `comps` where it is there."""
    from matplotlib.figure import Figure

    names = [n for n in HEADLINE_STUDIES if has_records(n)]
    if not names:
        return None
    fig = Figure(figsize=(5.2 * len(names), 5.0), layout="constrained")
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        for i, name in enumerate(names):
            comp = (comps or {}).get(name)
            if comp is None:
                comp = compare_runs.compare(compare_runs.tyro.cli(compare_runs.Args, args=study_command(name)))
            ax = fig.add_subplot(1, len(names), i + 1)
            compare_runs.plot_groups(ax, comp, LABELS, COLORS)
            legend = ax.get_legend()  # below the panel, where no curve runs
            legend.set_loc("upper center")
            legend.set_bbox_to_anchor((0.5, -0.16), transform=ax.transAxes)
            ax.set_title(f"{comp.env_id}, fresh seeds")
            ax.set_ylim(-0.02, 1.02)
    finally:
        os.chdir(cwd)
    return fig


def write_headline(comps: dict | None = None) -> str | None:
    """docs/figures/HEADLINE.{png,svg} from `headline_figure`; the path stem, None when no study has records."""
    import matplotlib

    fig = headline_figure(comps)
    if fig is None:
        return None
    stem = os.path.join(ROOT, "docs", "figures", HEADLINE)
    with matplotlib.rc_context({"svg.hashsalt": "compare_runs"}):  # reproducible SVG ids
        fig.savefig(stem + ".png", dpi=130, metadata={"Software": None})
        fig.savefig(stem + ".svg", metadata={"Date": None, "Creator": None})
    return stem


def block_pattern(name: str) -> re.Pattern:
    name = re.escape(name)
    return re.compile(rf"(<!-- regenerated: {name} -->\n)(.*?)(<!-- /regenerated: {name} -->)", re.S)


def doc_block(text: str, name: str) -> str | None:
    match = block_pattern(name).search(text)
    return None if match is None else match.group(2)


def check() -> list[str]:
    """Names of the studies whose docs block (or docs/figures/NAME.md) is missing or differs from its regeneration."""
    with open(DOC) as f:
        text = f.read()
    stale = []
    for name in STUDIES:
        block = regenerate(name, write_figure=False)
        figure_md = os.path.join(ROOT, "docs", "figures", f"{name}.md")
        table = block.split("\n\n", 1)[1] if has_records(name) else None
        on_disk = open(figure_md).read() if os.path.exists(figure_md) else None
        if doc_block(text, name) != block or on_disk != table:
            stale.append(name)
    return stale


def write_all() -> None:
    with open(DOC) as f:
        text = f.read()
    comps = {}  # each study's comparison (a bootstrap of its records), made once for its table and the figure
    for name in STUDIES:
        block = regenerate(name, write_figure=True, comps=comps)
        if doc_block(text, name) is None:
            raise SystemExit(f"error: {DOC} lacks <!-- regenerated: {name} --> ... <!-- /regenerated: {name} -->")
        text = block_pattern(name).sub(lambda m, b=block: m.group(1) + b + m.group(3), text)
        print(f"regenerated {name}", file=sys.stderr)
    with open(DOC, "w") as f:
        f.write(text)
    stem = write_headline(comps)
    if stem:
        print(f"wrote {os.path.relpath(stem, ROOT)}.png and .svg", file=sys.stderr)


def collect(runs_dir: str, study: str) -> int:
    """Copy the records of every finished run under `runs_dir` (a folder with final_eval.json) into the study's
    records folder; unfinished runs are skipped with a line. Returns the number of runs copied."""
    copied = 0
    for entry in sorted(os.listdir(runs_dir)):
        src = os.path.join(runs_dir, entry)
        if not os.path.isfile(os.path.join(src, "config.json")):
            continue
        if not os.path.isfile(os.path.join(src, "final_eval.json")):
            print(f"skipped {src}: unfinished (no final_eval.json)", file=sys.stderr)
            continue
        with open(os.path.join(src, "final_eval.json")) as f:
            json.load(f)  # a torn file is not a record
        dst = os.path.join(ROOT, RESULTS, study, entry)
        os.makedirs(dst, exist_ok=True)
        for name in RECORD_FILES:
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
        copied += 1
        print(f"collected {dst}", file=sys.stderr)
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare the docs' tables with their regeneration")
    parser.add_argument("--collect", metavar="RUNS_DIR", help="copy the finished runs' records of RUNS_DIR")
    parser.add_argument("--study", help="the study --collect copies into (a folder name under benchmarks/results)")
    args = parser.parse_args(argv)
    if args.collect:
        if not args.study or "/" in args.study or args.study.strip(".") == "":
            print(f"error: --collect needs --study NAME (a folder name), got {args.study!r}", file=sys.stderr)
            return 2
        if not os.path.isdir(args.collect):
            print(f"error: --collect {args.collect!r} is not a folder", file=sys.stderr)
            return 2
        collect(args.collect, args.study)
        return 0
    if args.check:
        stale = check()
        for name in stale:
            print(f"{name}: the table in docs differs from its records; run python benchmarks/regenerate.py",
                  file=sys.stderr)  # fmt: skip
        return 1 if stale else 0
    write_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
