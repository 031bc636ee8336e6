"""benchmarks/study_speed.py: the training command it builds from a committed record runs exactly the record's
configuration (round trip through the script's own CLI), and its bad input is one line."""

import dataclasses
import os
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import study_speed  # noqa: E402


@pytest.mark.parametrize("study", ["push_fresh"])
def test_the_command_built_from_a_record_parses_back_to_the_records_args(study):
    configs = study_speed.group_configs(study)
    assert {"push-mlp", "push-d8p"} <= set(configs)
    for label, args in configs.items():
        (script,) = [s for s in study_speed.SCRIPTS if study_speed.script_fields(s) == set(args)]
        assert script == ("sac_fetch_mlp.py" if "hidden_sizes" in args else "sac_fetch_equivariant.py"), label
        cmd = study_speed.training_command(script, args, 3000)
        assert cmd[1] == os.path.join(ROOT, script)
        module = study_speed.load_script(script)
        parsed = dataclasses.asdict(module.tyro.cli(module.Args, args=[*cmd[2:], "--run-dir", "/tmp/x"]))
        expected = {**args, **{k: v for k, v in study_speed.OVERRIDES.items() if k in args}}
        expected |= {"total_timesteps": 3000, "eval_frequency": 3000, "run_dir": "/tmp/x"}
        parsed = {k: list(v) if isinstance(v, tuple) else v for k, v in parsed.items()}
        differ = {k: (parsed[k], expected[k]) for k in expected if k != "run_name" and parsed[k] != expected[k]}
        assert differ == {}, label
        assert parsed["eval_episodes"] == 2 and parsed["final_eval_episodes"] == 0


def test_flags_of_booleans_lists_and_none():
    assert study_speed.flag_args({"obs_norm": False, "cuda": True, "hidden_sizes": [256, 256], "x": None}) == [
        "--no-obs-norm", "--cuda", "--hidden-sizes", "256", "256"]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["nope"], "error: study 'nope' unknown or without --baseline; studies with one: "),
        (["push_fresh", "--steps", "500"], "error: --steps 500 (>= 2000) and --repeats 1 (>= 1) out of range"),
    ],
)
def test_bad_input_is_one_line(argv, error, capsys):
    assert study_speed.main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(error)
