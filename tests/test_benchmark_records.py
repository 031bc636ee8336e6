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
