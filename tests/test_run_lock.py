"""One process per run folder (docs/conventions.md).

Every training script locks its run folder (`flock` on `<run folder>/.lock`) before it reads or writes anything there:
a second start on the folder exits 2 with one line naming the folder and the holder and touches nothing, and the
kernel drops the lock when the holder dies, kill -9 included. The end-to-end runs use the cheapest script,
dqn_snake_cnn.py, on a 6x6 board.
"""

import ast
import errno
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
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
