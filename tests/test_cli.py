"""Bad input fails before training with one line naming the value and the allowed ones; a NaN loss stops the run,
names the step and keeps what was written; `--help` says what each script trains; the plumbing that every script
defines (signals, input checks, resume) is one text."""

import ast
import dataclasses
import glob
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

BAD_ARGS = [
    ({"env_id": "FetchFoo-v4"}, "unknown --env-id 'FetchFoo-v4'; supported: FetchReach-v4, FetchReachDense-v4"),
    ({"env_id": "FetchPush-v1"}, "FetchPickAndPlaceDense-v4, FetchSlide-v4, FetchSlideDense-v4"),
    ({"batch_size": 2000, "buffer_size": 1000}, "--batch-size must be in [1, --buffer-size=1000], got 2000"),
    (
        {"learning_starts": 500, "total_timesteps": 500},
        "--learning-starts must be in [0, --total-timesteps=500), got 500",
    ),
    ({"eval_frequency": 0}, "--eval-frequency must be > 0, got 0"),
    ({"eval_episodes": 0}, "--eval-episodes must be >= 1, got 0"),
    ({"gamma": 1.0}, "--gamma must be in [0, 1), got 1.0"),
    ({"tau": 0.0}, "--tau must be in (0, 1], got 0.0"),
    ({"her_k": -1}, "--her-k must be >= 0, got -1"),
    ({"num_envs": 0}, "--num-envs must be >= 1, got 0"),
    ({"policy_frequency": 0}, "--policy-frequency must be >= 1, got 0"),
    ({"q_lr": -1.0}, "learning rates must be > 0"),
    ({"update_ratio": 0.0}, "--update-ratio must be in (0, 64], got 0.0"),
    ({"target_entropy": float("nan")}, "--target-entropy must be a finite number, got nan"),
    ({"q_lr": float("inf")}, "--q-lr must be a finite number, got inf"),
    ({"gamma": float("nan")}, "--gamma must be a finite number, got nan"),
    ({"alpha": float("-inf")}, "--alpha must be a finite number, got -inf"),
]


@pytest.mark.parametrize(("changes", "message"), BAD_ARGS)
@pytest.mark.parametrize("script", ["eq", "mlp"])
def test_bad_arguments_raise_one_line_naming_value_and_allowed(script, changes, message, request):
    m = request.getfixturevalue(script)
    with pytest.raises(ValueError) as err:
        m.validate_args(dataclasses.replace(m.Args(), **changes))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("changes", "message"), [({"dihedral_n": 0}, "--dihedral-n must be >= 1, got 0"),
                                                  ({"reg_rep_n": 0}, "--reg-rep-n must be >= 1, got 0")])  # fmt: skip
def test_bad_group_arguments_are_rejected(eq, changes, message):
    with pytest.raises(ValueError, match=message):
        eq.validate_args(dataclasses.replace(eq.Args(), **changes))


def test_bad_hidden_sizes_are_rejected(mlp):
    with pytest.raises(ValueError, match=r"--hidden-sizes must be one or more widths >= 1, got \[256, 0\]"):
        mlp.validate_args(dataclasses.replace(mlp.Args(), hidden_sizes=(256, 0)))


def test_defaults_are_valid(eq, mlp):
    eq.validate_args(eq.Args())
    mlp.validate_args(mlp.Args())


@pytest.mark.parametrize("n", [2, 3, 4, 8, 16])
def test_default_width_matches_the_mlp_twins_parameter_count(eq, mlp, n):
    """--reg-rep-n unset: the largest field count whose hidden-to-hidden layer (2N n^2 free parameters) has at most
    the MLP twin's 256^2 weights; validation writes the number into Args (config.json and checkpoints hold it), and
    the built networks on the object tasks then have 85-100 % of the MLP twin's parameters."""
    args = eq.Args(env_id="FetchPush-v4", dihedral_n=n)
    eq.validate_args(args)
    fields = args.reg_rep_n
    assert 2 * n * fields**2 <= 256**2 < 2 * n * (fields + 1) ** 2
    assert {2: 128, 4: 90, 8: 64, 16: 45}.get(n, fields) == fields
    obs_fields = eq.OBJECT_FIELDS + eq.GOAL_FIELDS
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    for build in ("Actor", "SoftQNetworks"):
        ratio = count(getattr(eq, build)(obs_fields, args)) / count(getattr(mlp, build)(obs_fields, mlp.Args()))
        assert 0.85 < ratio <= 1.0, (build, ratio)
    explicit = eq.Args(dihedral_n=n, reg_rep_n=32)
    eq.validate_args(explicit)
    assert explicit.reg_rep_n == 32


def run(script: str, args: list, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, os.path.join(ROOT, script), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("script", ["sac_fetch_equivariant.py", "sac_fetch_mlp.py"])
def test_bad_env_id_exits_2_with_one_line_and_writes_nothing(script, tmp_path):
    result = run(script, ["--env-id", "FetchReach-v9", "--run-dir", str(tmp_path / "runs")], tmp_path)
    assert result.returncode == 2
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: unknown --env-id 'FetchReach-v9'; supported: FetchReach-v4,")
    assert result.stdout == "" and not (tmp_path / "runs").exists()


def test_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_run_folder(tmp_path):
    """alpha = 1e39 overflows float32 to inf, so the first critic loss is not finite."""
    args = ["--env-id", "FetchReachDense-v4", "--total-timesteps", "400", "--learning-starts", "100",
            "--eval-frequency", "50", "--eval-episodes", "1", "--batch-size", "16", "--buffer-size", "1000",
            "--hidden-sizes", "16", "--alpha", "1e39", "--run-dir", str(tmp_path / "runs")]  # fmt: skip
    result = run("sac_fetch_mlp.py", args, tmp_path)
    assert result.returncode == 1
    expected = r"^error: non-finite loss: qf_loss is (nan|inf) at global_step 101; run folder kept"
    assert re.search(expected, result.stderr, re.MULTILINE)
    (run_path,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert {"config.json", "evals.jsonl"} <= set(os.listdir(run_path))
    with open(os.path.join(run_path, "evals.jsonl")) as f:
        assert [json.loads(line)["global_step"] for line in f] == [50, 100]  # evaluations before the NaN are kept
    assert not os.path.exists(os.path.join(run_path, "final_eval.json"))


@pytest.mark.parametrize(
    ("run_dir", "extra", "message"),
    [
        ("runs", ["--target-entropy", "nan"], "error: --target-entropy must be a finite number, got nan"),
        ("runs", ["--q-lr", "inf"], "error: --q-lr must be a finite number, got inf"),
        ("{file}/runs", [], "error: --run-dir must be a folder or a path where one can be made, got '{file}/runs' "
                            "('{file}' is not a folder)"),
        ("{file}", [], "error: --run-dir must be a folder or a path where one can be made, got '{file}' ('{file}' is "
                       "not a folder)"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("script", ["sac_fetch_equivariant.py", "sac_fetch_mlp.py"])
def test_nan_or_inf_and_a_file_in_the_run_dir_exit_2_with_one_line_and_write_nothing(
    script, run_dir, extra, message, tmp_path
):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    args = ["--env-id", "FetchReach-v4", "--run-dir", str(tmp_path / run_dir.format(file=file)), "--run-name", "bad"]
    result = run(script, args + extra, tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [message.format(file=file)]
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"] and file.read_text() == "mine"


TRAINS = {  # script -> how its --help opens, and the task family it names
    "sac_fetch_equivariant.py": ("Train SAC + HER with D_N-equivariant networks", "Fetch"),
    "sac_fetch_mlp.py": ("Train SAC + HER with MLP networks", "Fetch"),
    "dqn_snake_equivariant.py": ("Train DQN (Double-DQN targets) with a D4- or C4-equivariant Q-network", "Snake"),
    "dqn_snake_cnn.py": ("Train DQN (Double-DQN targets) with a CNN Q-network", "Snake"),
    "ppo_atari.py": ("Train PPO", "Atari"),
    "rpo_mujoco.py": ("Train RPO", "MuJoCo"),
}


@pytest.mark.parametrize("script", sorted(TRAINS))
def test_help_opens_with_one_line_saying_what_the_script_trains(script, tmp_path):
    env = {**os.environ, "COLUMNS": "200"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    usage, blank, first, after, *_ = result.stdout.splitlines()
    opening, task = TRAINS[script]
    assert usage.startswith("usage: ") and script in usage and blank == "" and after == ""  # one line, then blank
    assert first.startswith(opening) and task in first and first.endswith(".") and len(first) <= 120


SHARED = ("StopRequest", "Interrupted", "check_finite_floats", "check_run_dir", "resume_state", "atomic_torch_save")


def top_level_sources(path: str) -> dict:
    """name -> source text of every top-level function and class of a script, and "__main__" -> its main block."""
    with open(path) as f:
        text = f.read()
    tree = ast.parse(text)
    sources = {node.name: ast.get_source_segment(text, node) for node in tree.body
               if isinstance(node, (ast.FunctionDef, ast.ClassDef))}  # fmt: skip
    sources["__main__"] = ast.get_source_segment(text, tree.body[-1])
    return sources


def test_the_signal_input_and_resume_plumbing_is_one_text_in_every_script():
    """So that Ctrl-C, SIGUSR1/SIGTERM, bad input and resume behave alike in every script (docs/conventions.md)."""
    sources = {script: top_level_sources(os.path.join(ROOT, script)) for script in TRAINS}
    for name in (*SHARED, "__main__"):
        texts = {script: found[name] for script, found in sources.items()}
        assert len(set(texts.values())) == 1, f"{name} differs between {sorted(texts)}"


def test_the_readme_offers_a_cpu_only_install_line_after_the_default_one_with_the_same_torch():
    """.ci/run runs the first README line that starts with `pip install -r requirements.txt`: the default line must
    stay first and the CPU-only lines (README, docs/cluster.md) must not start so; they are a manual check."""
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        (torch_pin,) = [line.split("#")[0].strip() for line in f if line.startswith("torch==")]
    for doc in ("README.md", "docs/cluster.md"):
        with open(os.path.join(ROOT, doc)) as f:
            lines = f.read().splitlines()
        default = next(i for i, line in enumerate(lines) if line.startswith("pip install -r requirements.txt"))
        cpu = next(i for i, line in enumerate(lines) if "download.pytorch.org/whl/cpu" in line)
        assert default < cpu and "--index-url" not in lines[default], doc
        assert lines[cpu].startswith(f"pip install {torch_pin} --index-url https://download.pytorch.org/whl/cpu && ")
        assert "&& pip install -r requirements.txt && pip install --no-deps escnn==1.0.11" in lines[cpu], doc
