"""Bad input fails before training with one line naming the value and the allowed ones; a NaN loss stops the run,
names the step and keeps what was written; `--help` says what each script trains; the plumbing that every script
defines (signals, input checks, resume) is one text."""

import ast
import dataclasses
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, read_stderr_until

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
    ({"num_envs": 0}, "--num-envs must be in [1, --total-timesteps=1000000], got 0"),
    (  # issue 23: 23.5 GB, then the OOM killer
        {"num_envs": 100_000, "total_timesteps": 200, "learning_starts": 100},
        "--num-envs must be in [1, --total-timesteps=200], got 100000",
    ),
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


@pytest.mark.parametrize(("changes", "message"), [
    ({"dihedral_n": 0}, "--dihedral-n must be in [1, 64], got 0"),
    ({"dihedral_n": 1000},  # issue 23: 13 min and 17 GB of silent set-up
     "--dihedral-n must be in [1, 64] (escnn's first build of D_N grows as N^3: D_64 about 0:52:31, D_1000 about "
     "3333:20:05), got 1000"),
    ({"reg_rep_n": 0}, "--reg-rep-n must be >= 1, got 0"),
])  # fmt: skip
def test_bad_group_arguments_are_rejected(eq, changes, message):
    with pytest.raises(ValueError) as err:
        eq.validate_args(dataclasses.replace(eq.Args(), **changes))
    assert str(err.value) == message


def test_the_largest_group_passes_validation_and_its_first_build_is_announced_with_its_estimate(eq):
    """D_64 (issue 23: silent past 60 s) is allowed: once it has taken 5 s, set-up says that it builds it and how
    long that takes the first time (docs/BENCHMARKS.md, "Set-up cost")."""
    args = eq.Args(dihedral_n=64, env_id="FetchReachDense-v4")
    eq.validate_args(args)
    building, extra_bytes = eq.network_build_cost(args)
    assert building == "building the D_64 networks (escnn: up to 0:52:31 the first time, then cached)"
    assert extra_bytes == 8 * 4 * 128**3
    assert 9 < eq.first_build_seconds(8) < 14 and 40 < eq.first_build_seconds(16) < 65  # measured: 11 s, 48 s


@pytest.mark.parametrize("script", ["eq", "mlp"])
def test_the_memory_estimate_counts_the_envs_and_refuses_what_cannot_fit_in_one_line(script, request, monkeypatch):
    """Issue 23's 100000 Fetch envs filled 23.5 GB before the OOM killer came: with the envs' measured cost in the
    estimate, such a run is refused before anything is built, on a machine of that size, naming the envs' share."""
    m = request.getfixturevalue(script)
    monkeypatch.setattr(m, "memory_limit", lambda: 23 * 2**30)
    for num_envs, mode in ((100_000, "sync"), (5_000, "async")):
        args = dataclasses.replace(m.Args(), num_envs=num_envs, vector_env_mode=mode)
        with pytest.raises(ValueError) as err:
            m.validate_args(args)
        message = str(err.value)
        assert f", --buffer-size 1000000, --num-envs {num_envs} ({mode}) and --eval-episodes 10 need about " in message
        envs = float(re.search(r"envs (\d+\.\d)\)", message)[1])
        assert envs * 2**30 >= num_envs * m.ENV_COST[mode][0] - 2**29 and "\n" not in message
    m.validate_args(dataclasses.replace(m.Args(), num_envs=8, vector_env_mode="async"))  # a usual run fits


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


SHARED = ("StopRequest", "Interrupted", "check_finite_floats", "check_run_dir", "resume_state", "atomic_torch_save",
          "memory_limit", "clock", "setup_step", "Progress", "report_finished")  # fmt: skip


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


# ---------------------------------------------------------------------------------------------------------------------
# Set-up: a stop signal ends it at once; slow steps say what they build; progress lines
# ---------------------------------------------------------------------------------------------------------------------
def in_child(case) -> tuple[int, str]:
    """Run `case()` in a forked child of this process; returns its exit status and what it wrote on stderr."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its stderr into the pipe, and never back into pytest
        os.dup2(write, 2)
        sys.stderr = open(2, "w", closefd=False)  # not the capture of pytest, which the child inherited
        try:
            case()
        finally:
            os._exit(99)
    os.close(write)
    with os.fdopen(read) as f:
        stderr = f.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), stderr


@pytest.mark.parametrize("folder", ["made", "found"])
def test_a_stop_signal_during_set_up_ends_the_process_at_once_deleting_only_a_run_folder_it_made(mlp, tmp_path, folder):
    """A run folder this process made holds nothing of value during set-up and goes; one it found (a resumed run's,
    with its checkpoint) stays as it was."""
    path = tmp_path / "run"
    if folder == "found":
        path.mkdir()
        (path / "checkpoint.pt").write_text("the run so far")

    def case():
        stop = mlp.StopRequest("unit")
        if folder == "made":
            stop.make_run_folder(str(path))
            (path / "config.json").write_text("{}")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)  # not reached: the handler ends the process

    code, stderr = in_child(case)
    assert code == 3
    outcome = (f"run folder {path} deleted; the same command starts the run again" if folder == "made" else
               "the same command starts the run again, or resumes it from its last checkpoint")  # fmt: skip
    assert stderr == f"[unit] stopped by SIGTERM during set-up, before training: nothing to checkpoint; {outcome}\n"
    assert path.exists() == (folder == "found")
    if folder == "found":
        assert os.listdir(path) == ["checkpoint.pt"] and (path / "checkpoint.pt").read_text() == "the run so far"


def test_after_set_up_a_stop_signal_is_recorded_for_the_training_loop(mlp):
    def case():
        stop = mlp.StopRequest("unit")
        stop.training()
        os.kill(os.getpid(), signal.SIGUSR1)
        os._exit(0 if stop.signum == signal.SIGUSR1 else 1)

    code, stderr = in_child(case)
    assert code == 0 and re.fullmatch(r"\[unit\] set-up done in \d+:\d\d:\d\d: training\n", stderr)


def test_a_stop_signal_during_a_slow_set_up_ends_the_run_at_once_with_code_3_and_leaves_no_run_folder(tmp_path):
    """A real slow set-up: many evaluation envs, made after the run folder (issue 23's runaway inputs ran silently
    for minutes, SIGTERM recorded and ignored). SIGTERM as soon as the script says what it makes: the process ends at
    once with exit code 3 and one line, its async env workers with it, and the run folder it had made is gone."""
    runs, n = tmp_path / "runs", 300  # about 8 s to make on an idle core, 3 GB
    args = ["--env-id", "FetchReach-v4", "--num-envs", "2", "--vector-env-mode", "async", "--eval-episodes", str(n),
            "--hidden-sizes", "16", "--run-dir", str(runs), "--run-name", "slow"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "sac_fetch_mlp.py"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    lines = read_stderr_until(proc, f"[slow] making {n} evaluation envs, estimated ")  # at once: the estimate is long
    assert (runs / "slow" / "config.json").exists()
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stdout, rest = proc.communicate(timeout=300)  # returns once the env workers too have closed their end of stderr
    assert time.monotonic() - signalled < 60
    stderr = "".join(lines) + rest
    assert proc.returncode == 3, stderr[-3000:]
    assert stderr.splitlines()[-1] == (f"[slow] stopped by SIGTERM during set-up, before training: nothing to "
                                       f"checkpoint; run folder {runs / 'slow'} deleted; the same command starts the "
                                       "run again")  # fmt: skip
    assert os.listdir(runs) == [] and stdout == "" and "Traceback" not in stderr


def test_progress_lines_give_step_steady_rate_elapsed_eta_and_last_evaluation(mlp, capsys, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(mlp.time, "time", lambda: now[0])
    progress = mlp.Progress("r", 1000, "eval/success_rate")
    for seconds, step, last_eval in [(10, 100, None), (10, 300, None), (10, 400, None),
                                     (25, 900, {"eval/success_rate": 0.25})]:  # fmt: skip
        now[0] += seconds
        progress.maybe_print(step, last_eval)
    progress.evaluating(0, 100)
    now[0] += 10
    progress.evaluating(10, 100)  # within 30 s of the last line: nothing
    now[0] += 30
    progress.evaluating(40, 100)
    final = {"eval_idx": 9, "global_step": 1000, "eval/success_rate": 0.5, "heldout/success_rate": 0.62,
             "heldout/return": -18.4, "heldout/episodes": 100}  # fmt: skip
    mlp.report_finished("r", "runs/r", final)
    mlp.report_finished("r", "runs/r", {"eval_idx": 9, "global_step": 1000, "eval/success_rate": 0.5})
    assert capsys.readouterr().err.splitlines() == [
        # not at the first report: no steady rate yet; 200 steps in the 10 s since it, 700 to go
        "[r] step 300/1000 (30%), 20 steps/s, elapsed 0:00:20, ETA 0:00:35, last eval none yet",
        # step 400 came 10 s after that line; step 900 comes 35 s after it, 500 steps in the 25 s since step 400
        "[r] step 900/1000 (90%), 20 steps/s, elapsed 0:00:55, ETA 0:00:05, last eval success_rate 0.25",
        "[r] held-out evaluation: 100 episodes...",
        "[r] held-out evaluation: 40/100 episodes, elapsed 0:00:40, ETA 0:01:00",
        "[r] finished at global_step 1000: held-out success_rate 0.62, return -18.4 over 100 episodes; run folder "
        "runs/r",
        "[r] finished at global_step 1000: no held-out evaluation; last eval success_rate 0.5; run folder runs/r",
    ]


def test_a_slow_set_up_step_says_what_it_builds_at_once_or_once_it_takes_long_and_how_long_it_took(mlp, capfd):
    with mlp.setup_step("r", "making 9 envs", estimate_s=10.0):
        pass
    with mlp.setup_step("r", "quick"):
        pass
    with mlp.setup_step("r", "slower than said", quiet_s=0.2):
        time.sleep(1.0)  # the timer's signal interrupts the sleep, which then goes on
    lines = capfd.readouterr().err.splitlines()
    assert lines[:3] == ["[r] making 9 envs, estimated 0:00:10...", "[r] making 9 envs: done in 0:00:00",
                         "[r] slower than said..."]  # fmt: skip
    assert re.fullmatch(r"\[r\] slower than said: done in 0:00:0[1-9]", lines[3]) and len(lines) == 4
