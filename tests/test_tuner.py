"""Specification of tuner.py: Optuna sweeps of a training script through subprocesses.

Everything runs for real: tuner workers are subprocesses, trials run `tests/fake_train.py` (or `sac_fetch_mlp.py`),
studies live in a journal file under tmp_path or on the PostgreSQL server that `.ci/start-postgres.sh` starts.
PostgreSQL tests skip when no server is reachable, and fail instead when CI=true.
"""

import json
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import uuid
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from conftest import wait_until  # noqa: E402

import tuner  # noqa: E402

TUNER = str(ROOT / "tuner.py")
FAKE = str(ROOT / "tests" / "fake_train.py")
LR = "lr=loguniform:1e-5,1e-2"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


# ---- helpers --------------------------------------------------------------------------------------------------
def tuner_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OPTUNA_STORAGE_URL"}
    return {**env, **extra}


def start_tuner(cwd: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, TUNER, *args],
        cwd=cwd,
        env=env or tuner_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_tuner(cwd: Path, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, TUNER, *args], cwd=cwd, env=env or tuner_env(), capture_output=True, text=True, timeout=timeout
    )


def journal_study(cwd: Path, name: str) -> optuna.Study:
    storage = JournalStorage(JournalFileBackend(str(cwd / tuner.DEFAULT_JOURNAL)))
    return optuna.load_study(study_name=name, storage=storage)


def alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (dead, not yet reaped by its new parent) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def pid_records(pid_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(pid_dir.glob("*.json"))]


def postgres_url() -> str:
    """The CI server's URL; skips the test without one, and fails it instead when CI=true."""
    url = os.environ.get("TUNER_TEST_POSTGRES_URL")
    reason = None
    if not url:
        reason = 'TUNER_TEST_POSTGRES_URL is not set; `eval "$(bash .ci/start-postgres.sh)"` starts a server'
    else:
        try:
            with sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool).connect() as conn:
                conn.execute(sqlalchemy.text("SELECT 1"))
        except sqlalchemy.exc.OperationalError as exc:
            reason = f"no PostgreSQL server at {tuner.mask_url(url)}: {tuner.first_line(exc, url)}"
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return url


# ---- search spaces --------------------------------------------------------------------------------------------
EQUIVARIANT_PRESETS = {"sac_fetch_equivariant": 8, "sac_fetch_equivariant_d4": 4}  # preset -> its pinned N of D_N


def searched_and_pinned(space: dict) -> tuple[set, dict]:
    """The dimensions with more than one value, and {name: value} of the one-value choices (the pinned settings)."""
    pinned = {name: dist.choices[0] for name, dist in space.items()
              if isinstance(dist, CategoricalDistribution) and len(dist.choices) == 1}  # fmt: skip
    return set(space) - set(pinned), pinned


@pytest.mark.parametrize("preset", sorted(EQUIVARIANT_PRESETS))
def test_every_preset_is_the_shared_dims_plus_one_capacity_dimension_with_as_many_choices(preset):
    """docs/tuning.md: the same shared dimensions, one capacity dimension each with the same number of choices; the
    group is pinned by the preset, not searched."""
    mlp = tuner.build_space("sac_fetch_mlp", [], "sac_fetch_mlp.py")
    eq = tuner.build_space(preset, [], "sac_fetch_equivariant.py")
    (mlp_dims, mlp_pinned), (eq_dims, eq_pinned) = searched_and_pinned(mlp), searched_and_pinned(eq)
    assert mlp_dims - set(tuner.SAC_FETCH_SHARED) == {"hidden_sizes"} and mlp_pinned == {}
    assert eq_dims - set(tuner.SAC_FETCH_SHARED) == {"reg_rep_n"}
    assert eq_pinned == {"dihedral_n": EQUIVARIANT_PRESETS[preset]}
    assert len(mlp_dims) == len(eq_dims) == len(tuner.SAC_FETCH_SHARED) + 1
    assert len(mlp["hidden_sizes"].choices) == len(eq["reg_rep_n"].choices) == 7
    assert all(mlp[name] == eq[name] for name in tuner.SAC_FETCH_SHARED)
    assert eq["policy_lr"] == FloatDistribution(1e-4, 1e-3, log=True)
    assert eq["q_lr"] == FloatDistribution(1e-4, 2e-3, log=True)
    assert eq["gamma"] == FloatDistribution(0.9, 0.999)
    assert eq["tau"] == FloatDistribution(1e-3, 1e-1, log=True)
    assert eq["batch_size"] == CategoricalDistribution([128, 256, 512])
    assert eq["update_ratio"] == CategoricalDistribution([0.25, 0.5, 1])


@pytest.mark.parametrize("preset", sorted(EQUIVARIANT_PRESETS))
def test_the_ith_capacity_choices_of_both_presets_have_critics_within_3_percent(preset, eq, mlp):
    """Built for real on the object tasks (escnn's D_8 networks take a while): the i-th `reg_rep_n` of the preset at
    its group and the i-th MLP width give critics within 3 % of each other, from about 9.5k to 530k parameters."""
    fields = eq.OBJECT_FIELDS + eq.GOAL_FIELDS
    count = lambda net: sum(p.numel() for p in net.parameters()) // 2  # noqa: E731  (one of the two critics)
    eq_space = tuner.build_space(preset, [], "sac_fetch_equivariant.py")
    (n,) = eq_space["dihedral_n"].choices
    eq_args = [eq.Args(dihedral_n=n, reg_rep_n=r) for r in eq_space["reg_rep_n"].choices]
    eq_counts = [count(eq.SoftQNetworks(fields, args)) for args in eq_args]
    widths = tuner.build_space("sac_fetch_mlp", [], "sac_fetch_mlp.py")["hidden_sizes"].choices
    mlp_counts = [count(mlp.SoftQNetworks(fields, mlp.Args(hidden_sizes=tuple(map(int, w.split()))))) for w in widths]
    assert eq_counts == sorted(eq_counts) and mlp_counts == sorted(mlp_counts)
    assert all(abs(a - b) / b < 0.03 for a, b in zip(eq_counts, mlp_counts, strict=True)), (eq_counts, mlp_counts)
    assert 9_000 < min(eq_counts) < 10_000 and 520_000 < max(eq_counts) < 540_000


def test_script_named_like_a_preset_gets_that_preset_by_default():
    assert set(tuner.build_space(None, [], "path/to/sac_fetch_mlp.py")) == set(tuner.PRESETS["sac_fetch_mlp"])
    with pytest.raises(tuner.UsageError, match="nothing to tune"):
        tuner.build_space(None, [], "other_script.py")


def test_param_alone_tunes_exactly_those_dimensions_and_space_plus_param_merges():
    alone = tuner.build_space(None, ["policy_lr=loguniform:1e-4,1e-3"], "sac_fetch_mlp.py")
    assert alone == {"policy_lr": FloatDistribution(1e-4, 1e-3, log=True)}
    merged = tuner.build_space("sac_fetch_mlp", ["her_k=int:2,8"], "sac_fetch_mlp.py")
    assert set(merged) == set(tuner.PRESETS["sac_fetch_mlp"]) | {"her_k"}


def test_child_env_drops_the_storage_variables_by_name_and_keeps_path(monkeypatch):
    password = "a1"  # short enough to occur in PATH or HOME by chance
    url = sqlalchemy.engine.URL.create("postgresql+psycopg", username="u", password=password, host="127.0.0.1")
    monkeypatch.setenv("OPTUNA_STORAGE_URL", url.render_as_string(hide_password=False))
    monkeypatch.setenv("PGPASSWORD", password)
    monkeypatch.setenv("PATH", f"/opt/{password}/bin:" + os.environ["PATH"])
    env = tuner.child_env()
    assert "OPTUNA_STORAGE_URL" not in env and "PGPASSWORD" not in env
    assert env["PATH"] == os.environ["PATH"] and env["PYTHONUNBUFFERED"] == "1"


def test_storage_calls_after_a_signal_are_retried_while_shutting_down():
    interrupt = tuner.Interrupt()
    interrupt.signum = signal.SIGTERM
    failures = iter([True, True, False])

    def flaky():
        if next(failures):
            raise sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))
        return "queued"

    with pytest.raises(sqlalchemy.exc.OperationalError):  # an ordinary call gives up at once after a signal
        tuner.with_retries(flaky, 4, "runs/optuna_journal.log", interrupt)
    failures = iter([True, True, False])
    start = time.monotonic()
    assert tuner.with_retries(flaky, 4, "runs/optuna_journal.log", interrupt, shutting_down=True) == "queued"
    assert time.monotonic() - start < 6.5  # two retries, each at most 2 s * 1.5


def test_param_specs_parse_into_optuna_distributions_and_bad_ones_name_the_allowed_forms():
    assert tuner.parse_distribution("a", "uniform:0.9,0.99") == FloatDistribution(0.9, 0.99)
    assert tuner.parse_distribution("a", "int:1,4") == IntDistribution(1, 4)
    assert tuner.parse_distribution("a", "choice:relu,tanh").choices == ("relu", "tanh")
    assert tuner.param_argv({"hidden_sizes": "256 256", "tau": 0.005}) == [
        "--hidden-sizes",
        "256",
        "256",
        "--tau",
        "0.005",
    ]
    for bad in ["normal:0,1", "uniform:1", "loguniform:0,1", "int:1.5,3", "choice:"]:
        with pytest.raises(tuner.UsageError, match="param a: bad spec"):
            tuner.parse_distribution("a", bad)


def test_space_file_is_toml_and_param_flags_override_it(tmp_path):
    path = tmp_path / "space.toml"
    path.write_text('[params]\nlr = "loguniform:1e-5,1e-2"\nwidth = "choice:32,64"\n')
    space = tuner.build_space(str(path), ["width=int:16,128"], "fake_train.py")
    assert space == {"lr": FloatDistribution(1e-5, 1e-2, log=True), "width": IntDistribution(16, 128)}
    path.write_text('lr = "loguniform:1e-5,1e-2"\n')
    with pytest.raises(tuner.UsageError, match=r"allowed: a single \[params\] table"):
        tuner.build_space(str(path), [], "fake_train.py")
    with pytest.raises(tuner.UsageError, match="neither a preset"):
        tuner.build_space("no_such_preset", [], "fake_train.py")


# ---- storage ----------------------------------------------------------------------------------------------------
def test_storage_comes_from_the_flag_then_the_environment_then_the_embedded_journal():
    env = {"OPTUNA_STORAGE_URL": "postgresql:///db"}
    assert tuner.resolve_storage("sqlite:///a.db", env) == "sqlite:///a.db"
    assert tuner.resolve_storage(None, env) == "postgresql+psycopg:///db"
    assert tuner.resolve_storage(None, {}) == "runs/optuna_journal.log"
    with pytest.raises(tuner.UsageError, match="allowed: postgresql"):
        tuner.check_storage("mysql:///db")


def test_masked_url_and_redacted_text_hide_the_password_in_every_encoding():
    password = "p@ss word/" + secrets.token_hex(4)
    url = sqlalchemy.engine.URL.create(
        "postgresql+psycopg", username="tuner", password=password, host="127.0.0.1", database="db"
    ).render_as_string(hide_password=False)
    assert tuner.mask_url(url) == "postgresql+psycopg://tuner:***@127.0.0.1/db"
    text = (
        f"raw {password} quoted {urllib.parse.quote(password, safe='')} plus {urllib.parse.quote_plus(password)} {url}"
    )
    assert "p@ss" not in tuner.redact(text, url) and "p%40ss" not in tuner.redact(text, url)


# ---- local workers on the embedded journal ------------------------------------------------------------------------
def test_four_local_workers_on_the_embedded_journal_stop_at_exactly_the_global_cap(tmp_path):
    (tmp_path / "pids").mkdir()
    args = ["--script", FAKE, "--study-name", "cap", "--n-trials", "12", "--param", LR, "--pruner", "none"]
    args += ["--", "--n-evals", "3", "--eval-sleep", "0.05", "--pid-dir", str(tmp_path / "pids")]
    workers = [start_tuner(tmp_path, *args) for _ in range(4)]
    outputs = [w.communicate(timeout=180) for w in workers]
    for worker, (out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err
        assert "lock" not in (out + err).lower() and "Traceback" not in err, err
    trials = journal_study(tmp_path, "cap").get_trials()
    assert len(trials) == 12
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 12
    exp_names = {Path(p).stem for p in os.listdir(tmp_path / "pids")}
    assert exp_names == {f"cap-t{n}-s1" for n in range(12)}


def test_a_trial_with_a_bad_metric_is_pruned_and_its_process_tree_is_gone(tmp_path):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    (tmp_path / tuner.DEFAULT_JOURNAL).parent.mkdir()
    storage = JournalStorage(JournalFileBackend(str(tmp_path / tuner.DEFAULT_JOURNAL)))
    study = optuna.create_study(study_name="prune", storage=storage, direction="maximize")
    for _ in range(5):  # the median pruner's startup trials: success 0.9 at every evaluation
        study.add_trial(
            optuna.trial.create_trial(
                params={"lr": 1e-3},
                distributions={"lr": FloatDistribution(1e-5, 1e-2, log=True)},
                value=0.9,
                intermediate_values={step: 0.9 for step in range(300)},
            )
        )
    start = time.monotonic()
    result = run_tuner(
        tmp_path, "--script", FAKE, "--study-name", "prune", "--n-trials", "6", "--param", LR, "--pruner", "median",
        "--", "--bad-metric", "--n-evals", "300", "--eval-sleep", "0.1", "--spawn-grandchild",
        "--pid-dir", str(pid_dir),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - start < 20, "the 30 s run should have been killed at eval 1"
    trial = journal_study(tmp_path, "prune").trials[5]
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs["pruned_at_eval"] == 1  # eval 0 is never pruned (warm-up)
    assert "trial 5 pruned at eval 1" in result.stdout
    (record,) = pid_records(pid_dir)
    assert not alive(record["pid"]) and not alive(record["grandchild_pid"])


def test_a_crashing_script_fails_its_trial_with_the_stderr_tail_and_the_next_trial_runs(tmp_path):
    result = run_tuner(
        tmp_path, "--script", FAKE, "--study-name", "crash", "--n-trials", "2", "--param", LR,
        "--", "--crash-once", str(tmp_path / "crashed"), "--n-evals", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    failed, completed = journal_study(tmp_path, "crash").trials
    assert (failed.state, completed.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert failed.user_attrs["failure"] == "seed 1 exited 1"
    tail = failed.user_attrs["stderr_tail"]
    assert tail.splitlines()[0] == "fake_train: importing the simulator"
    assert tail.rstrip().endswith("ModuleNotFoundError: No module named 'missing_simulator_module'")
    assert "No module named 'missing_simulator_module'" in result.stderr
    assert completed.value > 0


def test_a_run_that_never_prints_the_metric_fails_its_trial(tmp_path):
    result = run_tuner(
        tmp_path, "--script", FAKE, "--study-name", "silent", "--n-trials", "1", "--param", LR, "--", "--no-metric"
    )
    assert result.returncode == 1  # nothing completed
    (trial,) = journal_study(tmp_path, "silent").trials
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["failure"] == "seed 1 exited 0 without printing 'eval/success_rate'"
    assert "fake_train: seed 1 eval 5" in trial.user_attrs["stderr_tail"]


def test_seeds_run_concurrently_and_the_objective_is_their_mean_of_the_last_k_evaluations(tmp_path):
    result = run_tuner(
        tmp_path, "--script", FAKE, "--study-name", "seeds", "--n-trials", "1", "--param", LR,
        "--seeds", "1", "2", "3", "--last-k", "2", "--", "--n-evals", "4", "--eval-sleep", "0.3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (trial,) = journal_study(tmp_path, "seeds").trials
    lr = trial.params["lr"]
    closeness = max(0.0, 1.0 - abs(math.log10(lr) + 3.0) / 2.0)
    per_seed = {s: closeness * (0.9 + 0.02 * s) * (3 / 4 + 4 / 4) / 2 for s in (1, 2, 3)}
    assert trial.user_attrs["seed_values"] == pytest.approx({str(s): v for s, v in per_seed.items()}, abs=1e-5)
    assert trial.value == pytest.approx(sum(per_seed.values()) / 3, abs=1e-5)
    assert sorted(trial.intermediate_values) == [0, 1, 2, 3]  # steps are eval_idx, one report per evaluation
    assert "for seed in 1 2 3; do python" in result.stdout


def test_unknown_param_is_an_error_before_any_trial_and_writes_nothing(tmp_path):
    result = run_tuner(tmp_path, "--script", FAKE, "--study-name", "typo", "--param", "lr_rate=uniform:0,1")
    assert result.returncode == 2
    assert result.stderr.startswith("error: param 'lr_rate': ")
    assert "has no flag --lr-rate; its params: " in result.stderr and ", lr, " in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / tuner.DEFAULT_JOURNAL).exists()


def test_a_worker_with_other_settings_cannot_join_a_study(tmp_path):
    first = run_tuner(tmp_path, "--script", FAKE, "--study-name", "same", "--n-trials", "1", "--param", LR)
    assert first.returncode == 0, first.stderr
    second = run_tuner(
        tmp_path, "--script", FAKE, "--study-name", "same", "--n-trials", "2", "--param", "lr=uniform:1e-5,1e-2"
    )
    assert second.returncode == 2
    assert "was created with space={'lr': 'loguniform:1e-05,0.01'}" in second.stderr
    assert len(journal_study(tmp_path, "same").trials) == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_signal_stops_the_worker_quickly_and_its_trial_is_failed_then_queued_again(tmp_path, signum):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    worker = start_tuner(
        tmp_path, "--script", FAKE, "--study-name", "sig", "--n-trials", "3", "--param", LR,
        "--", "--n-evals", "100", "--eval-sleep", "0.1", "--spawn-grandchild", "--pid-dir", str(pid_dir),
    )  # fmt: skip
    wait_until(lambda: len(pid_records(pid_dir)) == 1, 30, "the first run to start")
    time.sleep(0.5)
    sent = time.monotonic()
    worker.send_signal(signum)
    out, err = worker.communicate(timeout=30)
    assert time.monotonic() - sent < 5
    assert worker.returncode == 128 + signum, err
    (record,) = pid_records(pid_dir)
    assert not alive(record["pid"]) and not alive(record["grandchild_pid"])
    interrupted, queued = journal_study(tmp_path, "sig").trials
    assert interrupted.state == TrialState.FAIL
    assert queued.state == TrialState.WAITING and queued.params == interrupted.params
    assert queued.system_attrs["failed_trial"] == interrupted.number


# ---- PostgreSQL -----------------------------------------------------------------------------------------------
def test_postgres_trial_of_a_killed_worker_is_retried_by_another_and_every_trial_ends_final(tmp_path):
    url = postgres_url()
    name = f"killed-{uuid.uuid4().hex[:8]}"
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    args = ["--script", FAKE, "--study-name", name, "--n-trials", "8", "--param", LR, "--pruner", "none"]
    args += ["--heartbeat-interval", "2"]
    args += ["--", "--n-evals", "10", "--eval-sleep", "0.3", "--pid-dir", str(pid_dir)]
    env = tuner_env(OPTUNA_STORAGE_URL=url)
    workers = [start_tuner(tmp_path, *args, env=env) for _ in range(4)]
    victim = workers[0]
    wait_until(lambda: any(r["ppid"] == victim.pid for r in pid_records(pid_dir)), 60, "the victim's first run")
    (orphan,) = [r for r in pid_records(pid_dir) if r["ppid"] == victim.pid]
    time.sleep(0.5)
    victim.kill()
    victim.wait()
    outputs = [w.communicate(timeout=180) for w in workers[1:]]
    for worker, (_, err) in zip(workers[1:], outputs, strict=True):
        assert worker.returncode == 0, err
    wait_until(lambda: not alive(orphan["pid"]), 10, "the killed worker's run to die on its closed pipe")

    killed_number = int(orphan["argv"][orphan["argv"].index("--exp-name") + 1].split("-t")[1].split("-")[0])
    trials = optuna.load_study(study_name=name, storage=url).get_trials()
    assert all(t.state in FINISHED for t in trials), [t.state for t in trials]
    assert trials[killed_number].state == TrialState.FAIL
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == killed_number]
    assert retry.state == TrialState.COMPLETE and retry.params == trials[killed_number].params
    assert 8 <= len(trials) <= 9  # the retry is a new trial, within the cap if admitted before it was reached
    assert [t.state for t in trials].count(TrialState.COMPLETE) == len(trials) - 1


def test_postgres_worker_paused_past_the_grace_period_goes_on_after_its_trial_is_retried(tmp_path):
    url = postgres_url()
    name = f"paused-{uuid.uuid4().hex[:8]}"
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    args = ["--script", FAKE, "--study-name", name, "--n-trials", "2", "--param", LR, "--pruner", "none"]
    args += ["--heartbeat-interval", "1", "--", "--n-evals", "15", "--eval-sleep", "0.2", "--pid-dir", str(pid_dir)]
    env = tuner_env(OPTUNA_STORAGE_URL=url)
    paused = start_tuner(tmp_path, *args, env=env)
    wait_until(lambda: len(pid_records(pid_dir)) == 1, 60, "trial 0 to start")
    paused.send_signal(signal.SIGSTOP)  # no heartbeats from now on: trial 0 goes stale after 3 s
    other = start_tuner(tmp_path, *args, env=env)
    argv_0 = pid_records(pid_dir)[0]["argv"]
    lr_0 = argv_0[argv_0.index("--lr") + 1]
    wait_until(
        lambda: [r["argv"][r["argv"].index("--lr") + 1] for r in pid_records(pid_dir)].count(lr_0) == 2,
        60,
        "the other worker to run trial 0 again",
    )
    paused.send_signal(signal.SIGCONT)
    (out, err), (_, other_err) = paused.communicate(timeout=60), other.communicate(timeout=60)
    assert (paused.returncode, other.returncode) == (0, 0), err + other_err
    assert "tuner: trial 0 went stale (late heartbeats) and was queued again" in out
    trials = optuna.load_study(study_name=name, storage=url).get_trials()
    assert trials[0].state == TrialState.FAIL
    (retry,) = [t for t in trials if t.system_attrs.get("retry_history") == [0]]
    assert retry.params == trials[0].params
    assert [t.state for t in trials[1:]] == [TrialState.COMPLETE] * (len(trials) - 1)


def test_password_in_the_storage_url_appears_in_no_output_attribute_or_run(tmp_path):
    url = postgres_url()
    password = sqlalchemy.engine.make_url(url).password
    name = f"secret-{uuid.uuid4().hex[:8]}"
    (tmp_path / "pids").mkdir()
    # the storage variables hold the password: the tuner removes them, by name, from the runs' environment
    env = {k: v for k, v in tuner_env(OPTUNA_STORAGE_URL=url, PGPASSWORD=password).items()
           if k != "TUNER_TEST_POSTGRES_URL"}  # fmt: skip
    result = run_tuner(
        tmp_path, "--script", FAKE, "--study-name", name, "--n-trials", "2", "--param", LR,
        "--heartbeat-interval", "2", "--", "--crash-once", str(tmp_path / "crashed"), "--n-evals", "2",
        "--pid-dir", str(tmp_path / "pids"), env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert password not in result.stdout + result.stderr
    assert tuner.mask_url(url) in result.stdout and ":***@" in result.stdout
    study = optuna.load_study(study_name=name, storage=url)
    stored = json.dumps([study.user_attrs] + [[t.user_attrs, t.system_attrs, t.params] for t in study.trials])
    assert "stderr_tail" in stored and password not in stored
    runs = pid_records(tmp_path / "pids")
    assert len(runs) == 1 and password not in json.dumps(runs)  # the crashed run wrote no record
    assert "OPTUNA_STORAGE_URL" not in runs[0]["env"] and "PGPASSWORD" not in runs[0]["env"]


def test_password_of_an_unreachable_server_appears_in_no_error_message(tmp_path):
    password = secrets.token_hex(12)
    url = f"postgresql+psycopg://tuner:{password}@127.0.0.1:9/nowhere"  # port 9: nothing listens, refused at once
    result = run_tuner(
        tmp_path,
        "--script",
        FAKE,
        "--study-name",
        "x",
        "--param",
        LR,
        "--connect-retries",
        "2",
        env=tuner_env(OPTUNA_STORAGE_URL=url),
    )
    assert result.returncode == 1
    assert password not in result.stdout + result.stderr
    assert "postgresql+psycopg://tuner:***@127.0.0.1:9/nowhere" in result.stderr
    assert "retry 1 in" in result.stdout


# ---- a real training script ---------------------------------------------------------------------------------------
def test_sweep_of_the_real_mlp_script_completes_and_prints_a_rerun_command(tmp_path):
    script = ROOT / "sac_fetch_mlp.py"
    if not script.exists():
        pytest.skip("sac_fetch_mlp.py is not in the repository yet")
    fixed = ["--env-id", "FetchReachDense-v4", "--total-timesteps", "600", "--learning-starts", "200"]
    fixed += ["--eval-frequency", "300", "--eval-episodes", "2", "--buffer-size", "2000", "--no-cuda"]
    fixed += ["--final-eval-episodes", "4"]
    result = run_tuner(
        tmp_path, "--script", str(script), "--study-name", "mlp", "--n-trials", "2", "--metric", "eval/return",
        "--space", "sac_fetch_mlp", "--param", "hidden_sizes=choice:64 64", "--", *fixed, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    trials = journal_study(tmp_path, "mlp").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert set(trials[0].params) == set(tuner.PRESETS["sac_fetch_mlp"]) and trials[0].params["hidden_sizes"] == "64 64"
    assert all(sorted(t.intermediate_values) == [0, 1] and t.value < 0 for t in trials)
    # the held-out final evaluation is kept apart from the selected-on metric, per seed and as a mean
    assert all(set(t.user_attrs["heldout_values"]) == {"1"} and t.user_attrs["heldout_value"] < 0 for t in trials)
    assert all(t.user_attrs["heldout_value"] != t.value for t in trials)
    assert "held-out: heldout/return=" in result.stdout
    run_dirs = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir())
    assert run_dirs == ["mlp-t0-s1", "mlp-t1-s1"]  # --run-name: the study, trial and seed
    assert "tuner: rerun: python " in result.stdout and " --policy-lr " in result.stdout


def test_an_interrupted_trial_is_retried_and_its_runs_resume_from_their_checkpoints(tmp_path):
    """A worker stopped by SIGTERM (Slurm's time limit) leaves its runs checkpointed; the retry of its trial, in the
    next worker, resumes them under the same run names, so a trial longer than one job still ends."""
    fixed = ["--env-id", "FetchReachDense-v4", "--total-timesteps", "400", "--learning-starts", "100"]
    fixed += ["--eval-frequency", "100", "--eval-episodes", "2", "--buffer-size", "2000", "--batch-size", "32"]
    fixed += ["--hidden-sizes", "32", "32", "--checkpoint-frequency", "50", "--final-eval-episodes", "2", "--no-cuda"]
    args = ["--script", str(ROOT / "sac_fetch_mlp.py"), "--study-name", "res", "--n-trials", "1"]
    args += ["--param", "policy_lr=loguniform:1e-4,1e-3"]
    args += ["--pruner", "none", "--", *fixed]
    run_path = tmp_path / "runs" / "res-t0-s1"
    worker = start_tuner(tmp_path, *args)
    wait_until(lambda: len((run_path / "evals.jsonl").read_text().splitlines()) >= 2 if run_path.exists() and
               (run_path / "evals.jsonl").exists() else False, 180, "two evaluations")  # fmt: skip
    worker.send_signal(signal.SIGTERM)
    out, err = worker.communicate(timeout=60)
    assert worker.returncode == 128 + signal.SIGTERM, err
    checkpointed = torch.load(run_path / "checkpoint.pt", weights_only=True)["global_step"]
    assert 200 <= checkpointed < 400

    second = run_tuner(tmp_path, *args, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "tuner: trial 1 started: " in second.stdout and "(retries trial 0: its runs resume" in second.stdout
    interrupted, retried = journal_study(tmp_path, "res").trials
    assert (interrupted.state, retried.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert sorted(retried.intermediate_values) == [0, 1, 2, 3]  # the evaluations before the checkpoint included
    assert set(retried.user_attrs["heldout_values"]) == {"1"}
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir()) == ["res-t0-s1"]  # one run, resumed
    assert len(list(run_path.glob("events.out.tfevents.*"))) == 2  # two processes wrote it
    evals = [json.loads(line) for line in (run_path / "evals.jsonl").read_text().splitlines()]
    assert [(r["eval_idx"], r["global_step"]) for r in evals] == [(0, 100), (1, 200), (2, 300), (3, 400)]
    assert retried.value == evals[-1]["eval/success_rate"]
    assert not (run_path / "checkpoint.pt").exists()  # an ended trial keeps no checkpoint


# ---- run folders in use ------------------------------------------------------------------------------------------
BUSY_TRAIN = """import argparse, sys
parser = argparse.ArgumentParser()
for flag in ("--seed", "--exp-name", "--run-name", "--lr"):
    parser.add_argument(flag)
name = parser.parse_args().run_name
print(f"error: run folder 'runs/{name}' is in use by another process (host node12 pid 4242): wait for it to end or "
      "stop it, then rerun this command to resume the run", file=sys.stderr)
sys.exit(2)
"""
DQN_FIXED = ["--board-size", "6", "--total-timesteps", "400", "--learning-starts", "100", "--eval-frequency", "200",
             "--eval-episodes", "1", "--final-eval-episodes", "1", "--batch-size", "16", "--buffer-size", "1000",
             "--exploration-steps", "200", "--checkpoint-frequency", "200", "--channels", "4", "--no-cuda"]  # fmt: skip


def test_a_run_refused_its_folder_fails_its_trial_as_in_use_keeps_its_checkpoint_and_queues_the_trial(tmp_path):
    """A script that exits 2 because another process trains in its run folder has not crashed: the trial is FAIL with
    the holder as its `failure`, no stderr dump, its checkpoints kept for the retry, and it is queued again."""
    script = tmp_path / "busy_train.py"
    script.write_text(BUSY_TRAIN)
    checkpoint = tmp_path / "runs" / "busy-t0-s1" / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"the earlier run's")
    result = run_tuner(tmp_path, "--script", str(script), "--study-name", "busy", "--n-trials", "1", "--param", LR)
    assert result.returncode == 1, result.stderr  # no trial completed
    trials = journal_study(tmp_path, "busy").trials
    assert [t.state for t in trials] == [TrialState.FAIL] * (1 + tuner.MAX_RETRY)  # the trial and its retries
    assert [t.system_attrs.get("failed_trial") for t in trials] == [None] + [0] * tuner.MAX_RETRY
    reason = "seed 1: its run folder is in use by another process (host node12 pid 4242)"
    assert all(t.user_attrs == {"failure": reason} for t in trials)  # no stderr_tail: not a crash
    assert f"tuner: trial 0 not run: {reason}; the trial is queued again: its runs resume once" in result.stderr
    assert f"tuner: trial {tuner.MAX_RETRY} not run: {reason}; the trial is retried 3 times" in result.stderr
    assert "FAILED" not in result.stderr and "last lines of its stderr" not in result.stderr
    assert checkpoint.read_bytes() == b"the earlier run's"


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_retried_trial_waits_while_its_earlier_run_still_trains_in_its_folder_then_resumes_it(tmp_path):
    """The retry of a trial whose worker died without its runs (or whose node was lost) finds the earlier run alive
    in the folder it resumes: it waits for that process to end, then resumes the run instead of training beside it."""
    script = str(ROOT / "dqn_snake_cnn.py")
    (tmp_path / "runs").mkdir()
    storage = JournalStorage(JournalFileBackend(str(tmp_path / tuner.DEFAULT_JOURNAL)))
    study = optuna.create_study(study_name="wait", storage=storage, direction="maximize")
    lr = FloatDistribution(1e-4, 1e-3, log=True)
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, params={"learning_rate": 3e-4},
                                              distributions={"learning_rate": lr}))  # fmt: skip
    assert tuner.requeue(study, 0)  # trial 1: its retry, WAITING
    run_path = tmp_path / "runs" / "wait-t0-s1"
    earlier = subprocess.Popen(
        [sys.executable, script, *DQN_FIXED, "--learning-rate", "0.0003", "--seed", "1", "--exp-name", "wait-t0-s1",
         "--run-name", "wait-t0-s1"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: (run_path / "checkpoint.pt").exists() or earlier.poll() is not None, 300, "a checkpoint")
        earlier.send_signal(signal.SIGSTOP)  # alive, holding the folder's lock
        checkpointed = (run_path / "checkpoint.pt").read_bytes()
        out = tmp_path / "worker.out"
        with open(out, "w") as stdout:
            worker = subprocess.Popen(
                [sys.executable, TUNER, "--script", script, "--study-name", "wait", "--n-trials", "1", "--metric",
                 "eval/return", "--param", "learning_rate=loguniform:1e-4,1e-3", "--pruner", "none", "--", *DQN_FIXED],
                cwd=tmp_path, env=tuner_env(), stdout=stdout, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
        holder = f"host {socket.gethostname()} pid {earlier.pid}"
        waits = f"tuner: trial 1 waits: run folder runs/wait-t0-s1 is in use by another process ({holder})"
        wait_until(lambda: waits in out.read_text() or worker.poll() is not None, 300, "the worker to wait")
        time.sleep(1.0)
        assert worker.poll() is None and (run_path / "checkpoint.pt").read_bytes() == checkpointed
    finally:
        earlier.kill()  # like the OOM killer: the kernel drops its lock
        earlier.wait()
    _, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err
    assert waits in out.read_text() and "tuner: trial 1 started: " in out.read_text()
    earlier_trial, retried = journal_study(tmp_path, "wait").trials
    assert (earlier_trial.state, retried.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert sorted(retried.intermediate_values) == [0, 1]
    evals = [json.loads(line) for line in (run_path / "evals.jsonl").read_text().splitlines()]
    assert [(r["eval_idx"], r["global_step"]) for r in evals] == [(0, 200), (1, 400)]
    assert len(list(run_path.glob("events.out.tfevents.*"))) == 2  # the earlier process, then the resumed run
