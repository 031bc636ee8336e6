"""docs/BENCHMARKS.md's regenerated tables against the committed run records (benchmarks/results), and the record
collection that feeds them: a table that drifts from its records fails here."""

import json
import os
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import regenerate  # noqa: E402


def test_every_regenerated_table_in_the_docs_matches_its_committed_records():
    assert regenerate.STUDIES, "no study is regenerated from records"
    assert regenerate.check() == []


def test_the_drift_check_fails_when_a_docs_table_differs_from_its_records(tmp_path, monkeypatch):
    name = next(iter(regenerate.STUDIES))
    doc = tmp_path / "BENCHMARKS.md"
    with open(regenerate.DOC) as f:
        text = f.read()
    block = regenerate.doc_block(text, name)
    assert block is not None and "| 1 |" in block  # the table's seeds column
    doc.write_text(text.replace(block, block.replace("| 1 |", "| 2 |", 1)))
    monkeypatch.setattr(regenerate, "DOC", str(doc))
    assert regenerate.check() == [name]


def write_run(folder, finished: bool) -> None:
    os.makedirs(folder)
    (folder / "config.json").write_text(json.dumps({"run_name": folder.name, "args": {"seed": 1}}))
    (folder / "evals.jsonl").write_text('{"eval_idx": 0, "global_step": 10, "eval/success_rate": 0.5}\n')
    (folder / "checkpoint.pt").write_bytes(b"\0" * 64)
    (folder / "events.out.tfevents.1.host").write_bytes(b"\0" * 16)
    if finished:
        (folder / "final_eval.json").write_text(json.dumps({"heldout/success_rate": 0.4}))


def test_collect_copies_only_the_small_files_of_finished_runs(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    write_run(runs / "done", finished=True)
    write_run(runs / "running", finished=False)
    monkeypatch.setattr(regenerate, "ROOT", str(tmp_path / "repo"))
    assert regenerate.collect(str(runs), "study") == 1
    dst = tmp_path / "repo" / "benchmarks" / "results" / "study"
    assert sorted(os.listdir(dst)) == ["done"]
    assert sorted(os.listdir(dst / "done")) == ["config.json", "evals.jsonl", "final_eval.json"]
    assert (dst / "done" / "evals.jsonl").read_text() == (runs / "done" / "evals.jsonl").read_text()


@pytest.mark.parametrize("study", ["", "..", "a/b", None])
def test_collect_refuses_a_study_that_is_not_a_folder_name(study, tmp_path, capsys):
    argv = ["--collect", str(tmp_path)] + ([] if study is None else ["--study", study])
    assert regenerate.main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: --collect needs --study NAME")
    assert not os.path.exists(os.path.join(ROOT, "benchmarks", "results", "b"))


def test_a_study_without_records_yet_has_a_one_line_block(tmp_path, monkeypatch):
    monkeypatch.setitem(regenerate.STUDIES, "later", regenerate.Study(made_by="bash later.sh", compare=()))
    assert not regenerate.has_records("later")
    assert regenerate.regenerate("later", write_figure=False) == (
        "Runs made by `bash later.sh`; no records yet in `benchmarks/results/later/`.\n"
    )


def test_the_readme_figure_has_one_panel_per_study_with_records_and_one_colour_per_agent():
    fig = regenerate.headline_figure()
    studies = [n for n in regenerate.HEADLINE_STUDIES if regenerate.has_records(n)]
    assert len(fig.axes) == len(studies) >= 1
    for ax, name in zip(fig.axes, studies, strict=True):
        lines = {line.get_gid(): line.get_color() for line in ax.get_lines() if line.get_gid()}
        assert "group push-mlp" in lines, name  # the baseline, in every study
        for gid, color in lines.items():
            assert color == regenerate.COLORS[gid.removeprefix("group ")], (name, gid)


def test_a_speed_record_adds_the_step_costs_to_the_studys_table(tmp_path, monkeypatch):
    name = "push_fresh"
    monkeypatch.setattr(regenerate, "speed_record", lambda n: {
        "step_cost": {"push-d4p": 1.9, "push-d8p": 2.4},
        "made_by": "python benchmarks/study_speed.py push_fresh --write", "date": "2026-12-03 12:00 UTC", "steps": 3000,
        "machine": {"cpu": "a CPU", "torch_cpu_capability": "AVX512", "load_average_at_start": 0.1}})  # fmt: skip
    assert regenerate.study_command(name)[-5:-2] == ["--step-cost", "push-d4p=1.9", "push-d8p=2.4"]
    block = regenerate.regenerate(name, write_figure=False)
    assert (
        "Costs per env step (`--step-cost`) measured by `python benchmarks/study_speed.py push_fresh --write` "
        "(2026-12-03 12:00 UTC; a CPU, torch CPU capability AVX512, 3000 env steps per run" in block
    )
    assert "| wall-clock ratio to push-mlp [95% CI] |" in block
    assert "(`--step-cost`: push-d4p 1.9, push-d8p 2.4)" in block  # every group's cost, not only the last flag's
