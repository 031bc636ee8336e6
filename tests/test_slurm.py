"""Specification of slurm/train.sbatch and slurm/tune.sbatch, on a real Slurm cluster.

Jobs go through sbatch to the cluster that `.ci/start-slurm.sh` starts (one node called localhost, accounting on):
`eval "$(bash .ci/start-slurm.sh)"` exports SLURM_CONF. Each job runs in a folder under tmp_path (--chdir) and as
the user who runs pytest (root in CI: the CI cluster runs its daemons as SlurmUser=root and allows root jobs). Without
a reachable cluster the tests skip, and fail instead when CI=true. Jobs still queued when a test ends are cancelled.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import wait_until
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "slurm" / "train.sbatch")
TUNE = str(ROOT / "slurm" / "tune.sbatch")
MLP = str(ROOT / "sac_fetch_mlp.py")
FAKE = str(ROOT / "tests" / "fake_train.py")
# A real run of a few seconds: evaluations at 150 and 300 steps, a checkpoint every 50 steps (every episode).
FAST = ["--env-id", "FetchReachDense-v4", "--learning-starts", "150", "--eval-frequency", "150", "--eval-episodes", "2"]
FAST += ["--batch-size", "32", "--buffer-size", "1000", "--hidden-sizes", "32", "32", "--checkpoint-frequency", "50"]
FAST += ["--final-eval-episodes", "2"]
RUN_PREFIX = "FetchReachDense-v4__sac_fetch_mlp__1__slurm"
JOB_TIMEOUT_S = 240

pytestmark = pytest.mark.slurm


# ---- helpers --------------------------------------------------------------------------------------------------
def slurm_problem() -> str | None:
    """Why jobs cannot run here, or None when a Slurm controller answers and a node can take them."""
    if shutil.which("sbatch") is None:
        return 'no sbatch on PATH; `eval "$(bash .ci/start-slurm.sh)"` installs and starts a single-node Slurm'
    try:
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=30)
        config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo/scontrol timed out: no Slurm controller answers"
    if nodes.returncode != 0 or config.returncode != 0:
        detail = (nodes.stderr or config.stderr).strip().splitlines()
        return f"no Slurm controller answers ({detail[0] if detail else 'sinfo failed'}); " + (
            '`eval "$(bash .ci/start-slurm.sh)"` starts one'
        )
    if not {"idle", "mixed", "allocated", "completing"} & set(nodes.stdout.split()):
        return f"no Slurm node can run jobs (node states: {nodes.stdout.split()})"
    if os.geteuid() == 0 and re.search(r"DisableRootJobs\s*=\s*yes", config.stdout, re.IGNORECASE):
        return "the tests run as root and this cluster has DisableRootJobs=YES: run them as another user"
    return None


@pytest.fixture(scope="module")
def cluster():
    """Skips (fails under CI=true) the module's tests without a usable cluster."""
    problem = slurm_problem()
    if problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(problem)
        pytest.skip(problem)


@pytest.fixture
def jobs(cluster, tmp_path):
    """Submits jobs that run in tmp_path; cancels those still queued or running when the test ends."""

    class Jobs:
        def __init__(self):
            self.ids: list[str] = []
            # an enclosing job's SBATCH_*/SLURM_* variables would leak into the submissions; SLURM_CONF stays
            leaks = [k for k in os.environ if k.startswith(("SBATCH_", "SLURM_")) and k != "SLURM_CONF"]
            self.env = {k: v for k, v in os.environ.items() if k not in leaks}
            self.env.pop("OPTUNA_STORAGE_URL", None)
            if sys.prefix != sys.base_prefix:  # the jobs activate the venv that runs the tests (EQRL_VENV)
                self.env["EQRL_VENV"] = sys.prefix
            (tmp_path / "slurm-logs").mkdir()

        def submit(self, *args: str, env: dict | None = None) -> str:
            result = subprocess.run(
                ["sbatch", "--parsable", f"--chdir={tmp_path}", *args],
                env={**self.env, **(env or {})},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 0, result.stderr
            job_id = result.stdout.strip().split(";")[0]
            self.ids.append(job_id)
            return job_id

    submitted = Jobs()
    yield submitted
    for job_id in submitted.ids:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=60)


def job_records(job_id: str) -> list[dict[str, str]]:
    """`scontrol show job` as one dict per job (one per task for an array)."""
    out = subprocess.run(
        ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return [dict(re.findall(r"(\w[\w/:]*)=(\S*)", line)) for line in out.splitlines() if line.strip()]


def wait_for_jobs(job_id: str, timeout: float = JOB_TIMEOUT_S) -> list[dict[str, str]]:
    """Waits until every task of `job_id` has left the queue for good; returns their final records."""
    deadline = time.monotonic() + timeout
    while True:
        records = job_records(job_id)
        if records and all(r["JobState"] not in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED",
                                                   "SUSPENDED") for r in records):  # fmt: skip
            return records
        assert time.monotonic() < deadline, f"job {job_id} still queued after {timeout} s: {records}"
        time.sleep(0.5)


def pids_with(text: str) -> list[int]:
    """The processes whose NUL-separated command line contains `text`."""
    pids = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in path.read_bytes():
                pids.append(int(path.parent.name))
        except OSError:  # the process ended meanwhile
            pass
    return pids


def eval_lines(log: str) -> list[dict]:
    return [json.loads(line) for line in log.splitlines() if line.startswith('{"eval_idx"')]


# ---- no cluster needed ------------------------------------------------------------------------------------------
def test_the_sbatch_scripts_parse_and_share_one_environment_block():
    blocks = []
    for path in (TRAIN, TUNE):
        assert subprocess.run(["bash", "-n", path]).returncode == 0
        text = Path(path).read_text()
        start, end = text.index("# ---- environment: identical"), text.index("# ---- end of the shared part")
        blocks.append(text[start:end])
    assert blocks[0] == blocks[1]


def test_a_restarted_train_job_moves_aside_a_folder_without_checkpoint_only_while_no_process_trains_in_it(tmp_path):
    """train.sbatch run by bash as restart 1 of job 77. A run folder without checkpoint.pt, locked by a process that
    trains in it (here: this one), stays where it is and the script refuses to start, naming that process; once the
    lock is free the folder is moved aside and the run starts again."""
    import dqn_snake_cnn

    run = tmp_path / "runs" / "Snake-v0__dqn_snake_cnn__1__slurm77"
    lock = dqn_snake_cnn.lock_run_folder(str(run), new=True)
    (run / "config.json").write_text("{}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SBATCH_", "SLURM_", "EQRL_"))}
    env |= {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1", "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}
    tiny = ["--board-size", "6", "--total-timesteps", "200", "--learning-starts", "100", "--eval-frequency", "200",
            "--eval-episodes", "1", "--final-eval-episodes", "1", "--batch-size", "16", "--buffer-size", "1000",
            "--channels", "4"]  # fmt: skip
    cmd = ["bash", TRAIN, str(ROOT / "dqn_snake_cnn.py"), *tiny]
    held = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert held.returncode == 2, held.stderr
    assert f"runs/{run.name} holds no checkpoint.pt but a process trains in it: not moved" in held.stderr
    holder = f"host {socket.gethostname()} pid {os.getpid()}"
    assert f"error: run folder 'runs/{run.name}' is in use by another process ({holder})" in held.stderr
    assert "python exited 2 (refused: bad arguments, or its run folder is in use by another process" in held.stderr
    assert os.listdir(tmp_path / "runs") == [run.name] and (run / "config.json").read_text() == "{}"
    lock.close()
    freed = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert freed.returncode == 0, freed.stderr
    aside = run.parent / f"{run.name}__no-checkpoint-restart1"
    assert f"holds no checkpoint.pt; moved to runs/{aside.name}, starting over" in freed.stderr
    assert (aside / "config.json").read_text() == "{}"
    assert json.loads((run / "final_eval.json").read_text())["global_step"] == 200


# ---- real jobs ----------------------------------------------------------------------------------------------------
def test_train_job_runs_a_short_real_training_to_completion(jobs, tmp_path):
    job = jobs.submit(TRAIN, MLP, *FAST, "--total-timesteps", "300")
    (record,) = wait_for_jobs(job)
    log = (tmp_path / "slurm-logs" / f"eqrl-train-{job}.log").read_text()
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert [(e["eval_idx"], e["global_step"]) for e in eval_lines(log)] == [(0, 150), (1, 300)], log
    run = tmp_path / "runs" / f"{RUN_PREFIX}{job}"
    assert json.loads((run / "final_eval.json").read_text())["global_step"] == 300
    assert f"train.sbatch: job {job} restart 0 on localhost (1 CPUs, GPUs: none): run runs/{RUN_PREFIX}{job}" in log
    assert f"--no-cuda --run-name {RUN_PREFIX}{job}" in log
    assert log.rstrip().endswith("python exited 0 (done)"), log


def test_three_tune_workers_in_an_array_complete_one_shared_study(jobs, tmp_path):
    journal = tmp_path / "study.journal"
    job = jobs.submit(
        "--array=1-3", TUNE, "--script", FAKE, "--study-name", "slurm", "--n-trials", "6",
        "--storage", str(journal), "--param", "lr=loguniform:1e-5,1e-2", "--pruner", "none",
        "--", "--n-evals", "4", "--eval-sleep", "0.4",
    )  # fmt: skip
    records = wait_for_jobs(job)
    logs = {t: (tmp_path / "slurm-logs" / f"eqrl-tune-{job}_{t}.log").read_text() for t in (1, 2, 3)}
    assert sorted((r["ArrayTaskId"], r["JobState"], r["ExitCode"]) for r in records) == [
        (str(t), "COMPLETED", "0:0") for t in (1, 2, 3)
    ], logs
    study = optuna.load_study(study_name="slurm", storage=JournalStorage(JournalFileBackend(str(journal))))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 6
    ran = {t: {int(n) for n in re.findall(r"^tuner: trial (\d+) started", log, re.M)} for t, log in logs.items()}
    assert set().union(*ran.values()) == set(range(6))
    assert sum(1 for trials in ran.values() if trials) >= 2, ran  # the study was shared, not run by one worker
    for log in logs.values():  # a worker that ends while another's last trial runs counts it RUNNING
        assert re.search(r"^tuner: study 'slurm': \d COMPLETE", log, re.M), log
        assert log.rstrip().endswith("tuner exited 0 (done: the study is full)"), log


def test_a_signalled_tune_worker_fails_its_trial_requeues_itself_and_runs_the_queued_copy(jobs, tmp_path):
    journal = tmp_path / "study.journal"
    job = jobs.submit(
        "--array=1", TUNE, "--script", FAKE, "--study-name", "requeue", "--n-trials", "2", "--storage", str(journal),
        "--param", "lr=loguniform:1e-5,1e-2", "--", "--n-evals", "20", "--eval-sleep", "0.2",
    )  # fmt: skip
    log_path = tmp_path / "slurm-logs" / f"eqrl-tune-{job}_1.log"
    wait_until(lambda: log_path.exists() and "tuner: trial 0 eval 1:" in log_path.read_text(), JOB_TIMEOUT_S,
               "trial 0 to report")  # fmt: skip
    subprocess.run(["scancel", "--signal=USR1", "--batch", f"{job}_1"], check=True, timeout=60)
    (record,) = wait_for_jobs(job)
    log = log_path.read_text()
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert f"job {job}_1 restart 0: tuner exited 138 (stopped by SIGUSR1; its trial is queued again)" in log
    assert f"tune.sbatch: job {job}_1: requeueing it (its next start is restart 1)" in log
    assert f"tune.sbatch: job {job}_1 restart 1 on localhost" in log
    study = optuna.load_study(study_name="requeue", storage=JournalStorage(JournalFileBackend(str(journal))))
    interrupted, retry = study.trials
    assert (interrupted.state, retry.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert retry.params == interrupted.params and retry.system_attrs["failed_trial"] == 0


def test_a_signalled_train_job_checkpoints_requeues_itself_and_resumes_to_the_end(jobs, tmp_path):
    total = 600
    job = jobs.submit(TRAIN, MLP, *FAST, "--total-timesteps", str(total))
    run = tmp_path / "runs" / f"{RUN_PREFIX}{job}"
    wait_until(lambda: (run / "checkpoint.pt").exists(), JOB_TIMEOUT_S, "the first checkpoint")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=60)
    (record,) = wait_for_jobs(job)
    log = (tmp_path / "slurm-logs" / f"eqrl-train-{job}.log").read_text()
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert int(record["Restarts"]) >= 1
    restarts = [int(n) for n in re.findall(rf"^train\.sbatch: job {job} restart (\d+) on ", log, re.M)]
    assert restarts[0] == 0 and max(restarts) >= 1, log  # SLURM_RESTART_COUNT of each start
    assert f"train.sbatch: job {job} got SIGUSR1: forwarding it to python" in log
    assert f"[{RUN_PREFIX}{job}] stopped by SIGUSR1 at global_step" in log
    assert f"train.sbatch: job {job} restart 0 run runs/{RUN_PREFIX}{job}: python exited 3 (checkpointed)" in log
    assert re.search(r"resuming from global_step \d+", log), log
    assert json.loads((run / "final_eval.json").read_text())["global_step"] == total
    evals = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]
    assert [(e["eval_idx"], e["global_step"]) for e in evals] == [(i, 150 * (i + 1)) for i in range(4)]
    assert {e["eval_idx"] for e in eval_lines(log)} == {0, 1, 2, 3}


def test_a_train_job_killed_before_its_first_checkpoint_and_requeued_starts_its_run_again(jobs, tmp_path):
    job = jobs.submit(TRAIN, MLP, *FAST, "--total-timesteps", "300", "--checkpoint-frequency", "0")
    run = tmp_path / "runs" / f"{RUN_PREFIX}{job}"
    wait_until(lambda: (run / "config.json").exists(), JOB_TIMEOUT_S, "the run folder")
    (pid,) = pids_with(f"--run-name\0{RUN_PREFIX}{job}\0")  # the python of the job (the shell lacks --run-name)
    os.kill(pid, signal.SIGKILL)  # like a node failure or the OOM killer: no checkpoint
    assert wait_for_jobs(job)[0]["JobState"] == "FAILED"
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)  # as Slurm does after a node failure
    (record,) = wait_for_jobs(job)
    log = (tmp_path / "slurm-logs" / f"eqrl-train-{job}.log").read_text()
    assert (record["JobState"], record["Restarts"]) == ("COMPLETED", "1"), log
    aside = run.parent / f"{run.name}__no-checkpoint-restart1"
    assert f"{run.name} holds no checkpoint.pt; moved to runs/{aside.name}, starting over" in log
    assert (aside / "config.json").exists() and not (aside / "checkpoint.pt").exists()
    assert json.loads((run / "final_eval.json").read_text())["global_step"] == 300


def test_a_preempted_train_job_checkpoints_and_resumes_after_slurm_requeues_it(jobs, tmp_path):
    partitions = subprocess.run(["sinfo", "-h", "-o", "%R %m"], capture_output=True, text=True, timeout=60).stdout
    memory_mb = dict(line.split() for line in partitions.splitlines())
    if "urgent" not in memory_mb:
        reason = "no partition 'urgent' that preempts 'ci' (.ci/start-slurm.sh makes one)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    total = 600
    # the victim holds all the node's memory, so the urgent job can only start by preempting it
    job = jobs.submit("--partition=ci", f"--mem={memory_mb['ci']}", TRAIN, MLP, *FAST, "--total-timesteps", str(total),
                      "--checkpoint-frequency", "0")  # fmt: skip
    run = tmp_path / "runs" / f"{RUN_PREFIX}{job}"
    wait_until(lambda: (run / "config.json").exists(), JOB_TIMEOUT_S, "the run to start")  # its handler is set
    urgent = jobs.submit("--partition=urgent", "--output=slurm-logs/urgent-%j.log", "--wrap", "sleep 1")
    (record,) = wait_for_jobs(job)
    log = (tmp_path / "slurm-logs" / f"eqrl-train-{job}.log").read_text()
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert wait_for_jobs(urgent)[0]["JobState"] == "COMPLETED"
    assert int(record["Restarts"]) >= 1
    assert f"*** JOB {job} ON localhost CANCELLED AT " in log and " DUE TO PREEMPTION ***" in log
    assert f"[{RUN_PREFIX}{job}] stopped by SIGTERM at global_step" in log
    assert f"train.sbatch: job {job}: not requeued by train.sbatch: SIGTERM before the time limit" in log
    assert f"train.sbatch: job {job} restart 1 on localhost (1 CPUs" in log
    assert re.search(r"resuming from global_step \d+", log), log
    assert json.loads((run / "final_eval.json").read_text())["global_step"] == total


def test_the_docs_one_liner_reports_every_task_of_a_failed_array_with_its_first_error(jobs, tmp_path):
    if "accounting storage is disabled" in subprocess.run(["sacct", "-n"], capture_output=True, text=True).stderr:
        reason = "sacct: Slurm accounting is disabled on this cluster (.ci/start-slurm.sh enables it)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    (one_liner,) = [line for line in (ROOT / "docs" / "cluster.md").read_text().splitlines() if line.startswith("J=")]
    (tmp_path / "crash.py").write_text("import missing_simulator_module  # noqa\n")
    bad_args = jobs.submit("--array=1-2", "--output=slurm-logs/%x-%A_%a.log", TRAIN, MLP, "--env-id", "FetchNope-v4")
    crash = jobs.submit("--array=1-2", TRAIN, "crash.py")  # default log names: slurm-logs/%x-%j.log
    for job in (bad_args, crash):
        wait_for_jobs(job)
        command = re.sub(r"^J=\S+;", f"J={job};", one_liner)
        deadline = time.monotonic() + 60
        while True:  # accounting records arrive shortly after the jobs end
            out = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=60)
            if out.stdout.count("FAILED") == 2 or time.monotonic() > deadline:
                break
            time.sleep(1)
        lines = out.stdout.strip().splitlines()
        assert len(lines) == 3, out.stdout + out.stderr
        expected = "error: unknown --env-id 'FetchNope-v4'" if job == bad_args else "ModuleNotFoundError: No module"
        exit_code = "2:0" if job == bad_args else "1:0"
        for task, line in zip((1, 2), lines[:2], strict=True):
            assert line.startswith(f"{job}_{task} FAILED exit={exit_code} after 00:00:"), out.stdout
            assert expected in line, out.stdout
        assert lines[2] == "2 of 2 tasks did not complete"
