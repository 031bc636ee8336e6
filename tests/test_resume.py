"""Checkpoints and resume on the real simulator with real signals: a run stopped by SIGUSR1 and resumed equals the
uninterrupted run bit for bit, a first Ctrl-C stops a run as SIGUSR1 does and a second one aborts at once, a kill -9
during a checkpoint write leaves the previous checkpoint loadable, and a resume with other arguments changes
nothing."""

import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, assert_finished_line, assert_progress_lines, read_stderr_until
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

SCRIPTS = {"eq": "sac_fetch_equivariant.py", "mlp": "sac_fetch_mlp.py"}
SMALL_NETS = {"eq": ["--dihedral-n", "4", "--reg-rep-n", "4"], "mlp": ["--hidden-sizes", "32", "32"]}
TOTAL = 400


def train_args(script: str, run_dir, run_name: str, nets=None) -> list:
    return [
        "--env-id", "FetchPushDense-v4", "--total-timesteps", str(TOTAL), "--learning-starts", "100",
        "--eval-frequency", "100", "--eval-episodes", "2", "--batch-size", "32", "--buffer-size", "2000",
        "--checkpoint-frequency", "100", "--seed", "4", "--run-dir", str(run_dir), "--run-name", run_name,
        "--final-eval-episodes", "4",
        *(nets or SMALL_NETS[script]),
    ]  # fmt: skip


def start(script: str, args: list, cwd) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.join(ROOT, SCRIPTS[script]), *args]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def run(script: str, args: list, cwd) -> subprocess.CompletedProcess:
    proc = start(script, args, cwd)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0, poll: float = 0.01) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"run ended early: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(poll)


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training_state(a: dict, b: dict) -> None:
    """Networks, target networks, normaliser statistics, optimizers and counters identical, bit for bit."""
    for key in ("actor", "qf", "qf_target", "obs_norm"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs"
    for key in ("q_optimizer", "actor_optimizer", "alpha_optimizer"):
        for param_id, moments in a[key]["state"].items():
            for name, value in moments.items():
                assert torch.equal(value, b[key]["state"][param_id][name]), f"{key} {param_id} {name} differs"
    for key in ("global_step", "update_idx", "eval_idx", "alpha"):
        assert a[key] == b[key], key


def scalar_steps(run_path: str, tag: str) -> list[int]:
    return [event.step for event in EventAccumulator(run_path).Reload().Scalars(tag)]


def snapshot(folder) -> dict:
    """name -> (sha256, mtime_ns) of every file in `folder`."""
    result = {}
    for path in sorted(glob.glob(os.path.join(folder, "**"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                result[path] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
    return result


@pytest.mark.parametrize("script", ["eq", "mlp"])
def test_run_stopped_by_sigusr1_and_resumed_equals_the_uninterrupted_run(script, tmp_path):
    reference_proc = start(script, train_args(script, tmp_path / "runs", "reference"), tmp_path)  # on the other core
    args = train_args(script, tmp_path / "runs", "interrupted")
    proc = start(script, args, tmp_path)
    checkpoint = tmp_path / "runs" / "interrupted" / "checkpoint.pt"
    wait_for(checkpoint.exists, proc)
    proc.send_signal(signal.SIGUSR1)
    first_stdout, first_stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, first_stderr[-3000:]
    stopped_at = load(checkpoint)["global_step"]
    assert 100 <= stopped_at < TOTAL and stopped_at % 50 == 0  # at an episode boundary, before the end
    assert f"stopped by SIGUSR1 at global_step {stopped_at}: checkpoint written to" in first_stderr
    assert "AdroitHand" not in first_stderr and "py3nj" not in first_stderr  # known noise silenced
    reference_stdout, reference_stderr = reference_proc.communicate(timeout=300)
    assert reference_proc.returncode == 0, reference_stderr[-3000:]
    assert_progress_lines(reference_stderr, "reference", TOTAL, "eval/success_rate")  # 300 updates: reports at 100, 200
    assert_finished_line(reference_stderr, "reference", os.path.join(tmp_path / "runs", "reference"),
                         json.loads(reference_stdout.splitlines()[-1]))  # fmt: skip

    resumed = run(script, args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from global_step {stopped_at}" in resumed.stderr
    lines = (first_stdout + resumed.stdout).splitlines()
    assert lines == reference_stdout.splitlines()  # the same evaluations, eval_idx continued, nothing repeated
    assert [json.loads(line).get("eval_idx") for line in lines] == [0, 1, 2, 3, None]  # None: the held-out line
    ref_path, run_path = tmp_path / "runs" / "reference", tmp_path / "runs" / "interrupted"
    with open(run_path / "evals.jsonl") as f:
        assert f.read().splitlines() == lines[:-1]
    assert_same_training_state(load(run_path / "checkpoint.pt"), load(ref_path / "checkpoint.pt"))
    assert load(run_path / "checkpoint.pt")["global_step"] == TOTAL
    for tag in ("charts/episodic_return", "losses/qf1_loss", "eval/return", "charts/SPS"):
        assert scalar_steps(str(run_path), tag) == scalar_steps(str(ref_path), tag), tag
    with open(run_path / "final_eval.json") as f:
        final = json.load(f)
    assert final["global_step"] == TOTAL and final["eval_idx"] == 3


def test_a_first_sigint_checkpoints_at_the_episode_end_exits_3_and_the_same_run_name_resumes(tmp_path):
    """Ctrl-C acts as SIGUSR1: the episode ends, a checkpoint is written, exit code 3 and one line that says how to
    resume; the same command resumes the run (before, a KeyboardInterrupt left a folder without a checkpoint)."""
    args = train_args("mlp", tmp_path / "runs", "ctrl-c")
    proc = start("mlp", args, tmp_path)
    run_path = tmp_path / "runs" / "ctrl-c"
    lines = read_stderr_until(proc, "[ctrl-c] set-up done in ")  # before that, a signal stops set-up (test_cli.py)
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    stderr = "".join(lines) + rest
    assert proc.returncode == 3, stderr[-3000:]
    stopped_at = load(run_path / "checkpoint.pt")["global_step"]
    assert 0 < stopped_at < TOTAL and stopped_at % 50 == 0  # at an episode boundary, before the end
    assert (f"[ctrl-c] stopped by SIGINT at global_step {stopped_at}: checkpoint written to {run_path}/checkpoint.pt; "
            "to resume, rerun the same command with --run-name ctrl-c") in stderr.splitlines()  # fmt: skip
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    resumed = run("mlp", args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from global_step {stopped_at}" in resumed.stderr
    assert load(run_path / "checkpoint.pt")["global_step"] == TOTAL


def test_a_second_sigint_aborts_at_once_by_sigint_with_its_env_workers_and_without_a_traceback(tmp_path):
    """Slow updates (wide networks, large batches, from step 100 on) make the episode after the step-100 checkpoint
    take seconds, so that the second Ctrl-C comes before its end; the async env workers die with the run instead of
    reporting their pipes closed."""
    args = train_args("mlp", tmp_path / "runs", "aborted", nets=["--hidden-sizes", "1024", "1024"])
    args = replace_arg(replace_arg(args, "--checkpoint-frequency", "50"), "--batch-size", "256")
    proc = start("mlp", [*args, "--vector-env-mode", "async", "--num-envs", "2"], tmp_path)
    checkpoint = tmp_path / "runs" / "aborted" / "checkpoint.pt"
    wait_for(checkpoint.exists, proc)  # at step 100: both envs end their first episode together
    proc.send_signal(signal.SIGINT)
    lines = [proc.stderr.readline()]
    while "Ctrl-C again aborts at once" not in lines[-1]:
        assert lines[-1], f"no notice of the first SIGINT: {lines}"
        lines.append(proc.stderr.readline())
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=60)  # returns once the workers too have closed their end of stderr
    stderr = "".join(lines) + rest
    assert proc.returncode == -signal.SIGINT, stderr[-3000:]  # the shell's exit status 130
    assert stderr.splitlines()[-1] == "SIGINT again: aborted without a new checkpoint"
    assert "Traceback" not in stderr and "stopped by" not in stderr
    assert load(checkpoint)["global_step"] == 100  # the last checkpoint is kept: the same command resumes from it


def test_kill_9_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    """Wide networks make each checkpoint large enough (about 90 MB) to be caught in the middle of its write."""
    wide = ["--hidden-sizes", "1024", "1024"]
    args = train_args("mlp", tmp_path / "runs", "killed", nets=wide)
    run_path = tmp_path / "runs" / "killed"
    checkpoint, partial = run_path / "checkpoint.pt", run_path / "checkpoint.pt.tmp"
    proc = start("mlp", args, tmp_path)
    wait_for(checkpoint.exists, proc)
    previous = load(checkpoint)["global_step"]
    wait_for(lambda: partial.exists() and partial.stat().st_size > 0, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert partial.exists()  # killed in the middle of a write
    state = load(checkpoint)  # the previous checkpoint is intact
    assert state["global_step"] >= previous and state["global_step"] % 50 == 0
    logged_before = scalar_steps(str(run_path), "charts/episodic_return")
    assert max(logged_before) > state["global_step"]  # the killed process logged past its last checkpoint

    resumed = run("mlp", args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from global_step {state['global_step']}" in resumed.stderr
    assert not partial.exists() and load(checkpoint)["global_step"] == TOTAL
    with open(run_path / "evals.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [(r["eval_idx"], r["global_step"]) for r in records] == [(0, 100), (1, 200), (2, 300), (3, 400)]
    # TensorBoard: the events logged after the checkpoint by the killed process are purged, none is doubled
    assert scalar_steps(str(run_path), "charts/episodic_return") == list(range(50, TOTAL + 1, 50))
    assert scalar_steps(str(run_path), "eval/return") == [100, 200, 300, 400]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A completed MLP run: (its working folder, its arguments, its run folder)."""
    cwd = tmp_path_factory.mktemp("finished")
    args = train_args("mlp", cwd / "runs", "done")
    result = run("mlp", args, cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, args, cwd / "runs" / "done"


def replace_arg(args: list, flag: str, value: str) -> list:
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--seed", "5", "error: cannot resume '{path}' with other arguments: --seed 5 (checkpoint: 4); only "
                        "--total-timesteps, --run-dir and --cuda may change"),
        ("--batch-size", "64", "--batch-size 64 (checkpoint: 32)"),
        ("--total-timesteps", "350", "error: --total-timesteps must be >= the checkpoint's global_step 400"),
    ],
)  # fmt: skip
def test_resume_with_other_arguments_exits_2_and_changes_nothing(finished_run, flag, value, message):
    cwd, args, run_path = finished_run
    before = snapshot(run_path)
    result = run("mlp", replace_arg(args, flag, value), cwd)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert message.format(path=run_path) in line
    assert result.stdout == "" and snapshot(run_path) == before


def test_a_finished_run_is_not_run_again(finished_run):
    cwd, args, run_path = finished_run
    before = snapshot(run_path)
    result = run("mlp", args, cwd)
    assert result.returncode == 0 and result.stdout == ""
    assert f"already ended at global_step {TOTAL}; nothing to do" in result.stderr
    assert snapshot(run_path) == before


def test_a_run_folder_without_checkpoint_exits_2(tmp_path):
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "notes.txt").write_text("mine")
    result = run("mlp", train_args("mlp", tmp_path / "runs", "taken"), tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: run folder '{tmp_path / 'runs' / 'taken'}' exists and holds no checkpoint.pt to resume from (its "
        "run ended before its first checkpoint, or it is not a run folder): delete it or choose another --run-name "
        "to start afresh"
    ]
    assert os.listdir(tmp_path / "runs" / "taken") == ["notes.txt"]


def test_eval_frequency_does_not_change_the_training_trajectory(finished_run, tmp_path):
    """Evaluation draws no random number, so evaluating at another frequency leaves the same losses and weights."""
    cwd, args, run_path = finished_run
    other = run("mlp", replace_arg(replace_arg(args, "--eval-frequency", "200"), "--run-name", "often"), cwd)
    assert other.returncode == 0, other.stderr[-3000:]
    assert_same_training_state(load(cwd / "runs" / "often" / "checkpoint.pt") | {"eval_idx": 4},
                               load(run_path / "checkpoint.pt"))  # fmt: skip
    steps = lambda path: [(e.step, e.value) for e in EventAccumulator(str(path)).Reload().Scalars("losses/qf1_loss")]  # noqa: E731
    assert steps(cwd / "runs" / "often") == steps(run_path)


def test_evaluate_checkpoint_names_the_twin_that_saved_the_file(finished_run, eq, mlp):
    _, _, run_path = finished_run
    with pytest.raises(ValueError, match=r"checkpoint.pt was saved by sac_fetch_mlp.py, not sac_fetch_equivariant.py"):
        eq.evaluate_checkpoint(str(run_path / "checkpoint.pt"))
    result = mlp.evaluate_checkpoint(str(run_path / "checkpoint.pt"), eval_episodes=2, seed=4 + 1_000_000)
    with open(run_path / "final_eval.json") as f:
        assert result["eval/return"] == pytest.approx(json.load(f)["eval/return"], rel=1e-6)


@pytest.mark.parametrize(
    ("script", "extra", "message"),
    [
        ("mlp", ["--seed", "-1"], "error: --seed must be >= 0, got -1"),
        ("eq", ["--reg-rep-n", "100000"], "error: --dihedral-n 4 --reg-rep-n 100000, --buffer-size 2000, --num-envs 1 "
                                          "(sync) and --eval-episodes 2 need about"),
        ("eq", ["--dihedral-n", "1000"], "error: --dihedral-n must be in [1, 64] (escnn's first build of D_N grows"),
        ("mlp", ["--hidden-sizes", "100000", "100000"], "error: --hidden-sizes 100000 100000, --buffer-size 2000,"),
        ("mlp", ["--num-envs", "100000"], "error: --num-envs must be in [1, --total-timesteps=400], got 100000"),
        ("mlp", ["--num-envs", "400000", "--total-timesteps", "1000000", "--vector-env-mode", "async"],
         "error: --hidden-sizes 32 32, --buffer-size 2000, --num-envs 400000 (async) and --eval-episodes 2 need about"),
        ("mlp", ["--run-name", ".."], "error: --run-name must be a folder name (not empty, '.' or '..', no '/'), got"),
    ],
)  # fmt: skip
def test_bad_values_exit_2_with_one_line_before_any_folder_is_made(script, extra, message, tmp_path):
    result = run(script, train_args(script, tmp_path / "runs", "bad") + extra, tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(message)
    assert not (tmp_path / "runs").exists()
