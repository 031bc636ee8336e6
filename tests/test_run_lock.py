"""One process per run folder, and budgets that schedules run over (docs/conventions.md).

Every training script locks its run folder (`flock` on `<run folder>/.lock`) before it reads or writes anything there:
a second start on the folder exits 2 with one line naming the folder and the holder and touches nothing, and the
kernel drops the lock when the holder dies, kill -9 included. A resume may not change `--total-timesteps` where a
learning-rate schedule runs over it. The end-to-end runs use the cheapest script, dqn_snake_cnn.py, on a 6x6 board.
"""

import ast
import dataclasses
import errno
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, wait_until

import dqn_snake_cnn as cnn

SCRIPTS = ["sac_fetch_equivariant.py", "sac_fetch_mlp.py", "dqn_snake_equivariant.py", "dqn_snake_cnn.py",
           "ppo_atari.py", "rpo_mujoco.py"]  # fmt: skip
SHARED = ["LOCK_FILE", "NO_FILE_LOCKS", "RunFolderBusy", "lock_run_folder", "resume_state"]


def busy_line(run_path, pid: int) -> str:
    return (f"error: run folder '{run_path}' is in use by another process (host {socket.gethostname()} pid {pid}): "
            "wait for it to end or stop it, then rerun this command to resume the run")  # fmt: skip


def train_args(run_dir, run_name: str, total: int = 400, extra: tuple = ()) -> list:
    return [
        "--board-size", "6", "--total-timesteps", str(total), "--learning-starts", "100", "--eval-frequency", "200",
        "--eval-episodes", "1", "--final-eval-episodes", "1", "--batch-size", "16", "--buffer-size", "1000",
        "--exploration-steps", "200", "--checkpoint-frequency", "200", "--channels", "4", "--seed", "3",
        "--run-dir", str(run_dir), "--run-name", run_name, *extra,
    ]  # fmt: skip


def start(args: list, cwd) -> subprocess.Popen:
    cmd = [sys.executable, os.path.join(ROOT, "dqn_snake_cnn.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def run(args: list, cwd) -> subprocess.CompletedProcess:
    proc = start(args, cwd)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def files(folder) -> dict:
    """path -> (bytes, mtime_ns) of every file in `folder`, dot files included."""
    result = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                result[path] = (f.read(), os.stat(path).st_mtime_ns)
    return result


def holds_lock(run_path, pid: int) -> bool:
    path = os.path.join(run_path, ".lock")
    return os.path.exists(path) and open(path).read() == f"host {socket.gethostname()} pid {pid}\n"


# ---- the plumbing ---------------------------------------------------------------------------------------------
def test_the_lock_and_resume_plumbing_is_the_same_text_in_every_script():
    texts = {name: set() for name in SHARED}
    for script in SCRIPTS:
        with open(os.path.join(ROOT, script)) as f:
            source = f.read()
        for node in ast.parse(source).body:
            names = [t.id for t in node.targets if isinstance(t, ast.Name)] if isinstance(node, ast.Assign) else []
            for name in [getattr(node, "name", None), *names]:
                if name in texts:
                    texts[name].add(ast.get_source_segment(source, node))
    assert {name: len(found) for name, found in texts.items()} == dict.fromkeys(SHARED, 1)


def test_the_lock_file_names_its_holder_and_a_second_lock_is_refused_until_the_first_is_closed(tmp_path):
    run_path = str(tmp_path / "run")
    lock = cnn.lock_run_folder(run_path, new=True)
    assert os.listdir(run_path) == [".lock"]
    assert holds_lock(run_path, os.getpid())
    with pytest.raises(cnn.RunFolderBusy) as refused:  # another open file of the same process conflicts too
        cnn.lock_run_folder(run_path)
    assert str(refused.value) == busy_line(run_path, os.getpid())[len("error: ") :]
    lock.close()
    again = cnn.lock_run_folder(run_path)
    assert again is not None
    again.close()


def test_a_folder_that_holds_no_run_is_not_locked_and_stays_untouched(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert cnn.lock_run_folder(str(tmp_path / "taken")) is None
    assert cnn.lock_run_folder(str(tmp_path / "absent")) is None
    assert os.listdir(tmp_path / "taken") == ["notes.txt"] and not (tmp_path / "absent").exists()


def test_where_the_filesystem_has_no_locks_the_script_warns_once_and_runs_unlocked(tmp_path, monkeypatch, capsys):
    def no_locks(fd, operation):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(cnn.fcntl, "flock", no_locks)  # Lustre mounted without -o flock
    assert cnn.lock_run_folder(str(tmp_path / "run"), new=True) is None
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"warning: run folder '{tmp_path / 'run'}' cannot be locked (Function not implemented)")


# ---- two processes, one run folder ------------------------------------------------------------------------------
def test_a_second_start_of_a_run_exits_2_naming_the_holder_touches_nothing_and_the_first_run_ends_normally(tmp_path):
    args = train_args(tmp_path / "runs", "twice")
    run_path = tmp_path / "runs" / "twice"
    first = start(args, tmp_path)
    wait_until(lambda: holds_lock(run_path, first.pid) or first.poll() is not None, 120, "the first start's lock")
    first.send_signal(signal.SIGSTOP)  # it holds the lock and writes nothing while the second start runs
    try:
        before = files(run_path)
        second = run(args, tmp_path)
        assert second.returncode == 2 and second.stdout == ""
        assert second.stderr.splitlines() == [busy_line(run_path, first.pid)]
        assert files(run_path) == before  # its lock file, evaluations and checkpoint untouched
    finally:
        first.send_signal(signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    *evals, heldout = [json.loads(line) for line in stdout.splitlines()]
    assert [(e["eval_idx"], e["global_step"]) for e in evals] == [(0, 200), (1, 400)] and "heldout/score" in heldout
    assert [json.loads(line) for line in (run_path / "evals.jsonl").read_text().splitlines()] == evals


def test_after_kill_9_of_the_holder_the_next_start_gets_the_lock_and_resumes_the_run(tmp_path):
    args = train_args(tmp_path / "runs", "killed")
    run_path = tmp_path / "runs" / "killed"
    first = start(args, tmp_path)
    wait_until(lambda: (run_path / "checkpoint.pt").exists() or first.poll() is not None, 120, "the first checkpoint")
    first.kill()
    first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL and holds_lock(run_path, first.pid)  # a dead holder's lock file
    second = start(args, tmp_path)
    stdout, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr[-3000:]
    assert "resuming from global_step 200" in stderr
    assert json.loads((run_path / "final_eval.json").read_text())["global_step"] == 400
    assert holds_lock(run_path, second.pid)


# ---- budgets that a schedule runs over ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("script", "changes", "schedule"),
    [
        ("dqn_snake_cnn", {"lr_scheduler": "cosine"}, "the learning rate's cosine annealing (--lr-scheduler cosine)"),
        ("dqn_snake_equivariant", {"lr_scheduler": "cosine"},
         "the learning rate's cosine annealing (--lr-scheduler cosine)"),
        ("dqn_snake_cnn", {"lr_scheduler": "step"}, None),  # decays every --lr-step-size steps, whatever the budget
        ("dqn_snake_cnn", {"lr_scheduler": "none"}, None),  # epsilon falls over --exploration-steps
        ("ppo_atari", {}, "the learning rate's linear annealing (--anneal-lr)"),
        ("ppo_atari", {"anneal_lr": False}, None),
        ("rpo_mujoco", {}, "the learning rate's linear annealing (--anneal-lr)"),
        ("rpo_mujoco", {"anneal_lr": False}, None),
        ("sac_fetch_mlp", {}, None),  # no schedule: SAC runs may be extended
        ("sac_fetch_equivariant", {}, None),
    ],
)  # fmt: skip
def test_a_resume_may_change_the_budget_only_where_no_schedule_runs_over_it(script, changes, schedule, tmp_path):
    m = __import__(script)
    saved = dataclasses.replace(m.Args(), total_timesteps=100_000, run_name="r", **changes)
    (tmp_path / "r").mkdir()
    torch.save({"script": m.SCRIPT, "args": dataclasses.asdict(saved), "global_step": 100_000},
               tmp_path / "r" / "checkpoint.pt")  # fmt: skip
    extended = dataclasses.replace(saved, total_timesteps=200_000)
    assert m.resume_state(saved, str(tmp_path / "r"))["global_step"] == 100_000
    if schedule is None:
        assert m.resume_state(extended, str(tmp_path / "r"))["global_step"] == 100_000
        return
    with pytest.raises(ValueError) as refused:
        m.resume_state(extended, str(tmp_path / "r"))
    assert str(refused.value) == (
        f"cannot resume '{tmp_path / 'r'}' with --total-timesteps 200000 (checkpoint: 100000): "
        f"{schedule} runs over --total-timesteps, so the rate would jump where the run resumes; "
        "rerun with --total-timesteps 100000, or start a new run with the new budget"
    )


def test_extending_a_run_whose_learning_rate_anneals_over_its_budget_exits_2_and_changes_no_result(tmp_path):
    cosine = ("--lr-scheduler", "cosine")
    done = run(train_args(tmp_path / "runs", "cos", total=200, extra=cosine), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run_path = tmp_path / "runs" / "cos"
    before = files(run_path)
    extended = start(train_args(tmp_path / "runs", "cos", total=400, extra=cosine), tmp_path)
    stdout, stderr = extended.communicate(timeout=300)
    assert extended.returncode == 2 and stdout == ""
    assert stderr.splitlines() == [
        f"error: cannot resume '{run_path}' with --total-timesteps 400 (checkpoint: 200): the learning rate's cosine "
        "annealing (--lr-scheduler cosine) runs over --total-timesteps, so the rate would jump where the run resumes; "
        "rerun with --total-timesteps 200, or start a new run with the new budget"
    ]
    after = files(run_path)
    lock = str(run_path / ".lock")
    assert {k: v for k, v in after.items() if k != lock} == {k: v for k, v in before.items() if k != lock}
    assert holds_lock(run_path, extended.pid)  # the lock file names the last process that held it
