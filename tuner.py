# docs and recipes: docs/tuning.md
"""Optuna sweeps of any training script through subprocesses.

Each trial runs `python <script> <fixed args> <sampled args> --seed S --exp-name <study>-t<trial>-s<S>` once per
seed, the seeds concurrently, every run in its own process group. The JSON evaluation lines the runs print on
stdout are followed live: the mean over seeds at evaluation `eval_idx` is reported as step `eval_idx`, and a
pruned trial has its process groups killed. The objective is the mean over seeds of each seed's last `--last-k`
evaluations of `--metric` (k=1: the final evaluation).

Workers are independent processes sharing one study through the storage: the embedded journal file by default
(several local workers), PostgreSQL across a cluster (heartbeats retry the trials of killed workers).

    python tuner.py --script sac_fetch_mlp.py --study-name fetch_reach_mlp --n-trials 16 \
        -- --env-id FetchReachDense-v4 --total-timesteps 20000
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import queue
import random
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import warnings
from pathlib import Path
from typing import Literal

import optuna
import sqlalchemy
import tyro
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import TrialState

DEFAULT_JOURNAL = "runs/optuna_journal.log"
STORAGE_ENV = "OPTUNA_STORAGE_URL"
STDERR_TAIL_LINES = 50
KILL_GRACE_S = 20.0  # SIGTERM to SIGKILL: a training run finishes its episode and checkpoints (inside Slurm's 30 s)
MAX_RETRY = 3  # times a trial of a killed or interrupted worker is queued again
HELP_TIMEOUT_S = 300.0
RUN_LOCK_FILE = ".lock"  # a run folder's lock file: flock-ed by the process that trains in it (docs/conventions.md)
RUN_FOLDER_BUSY = re.compile(r"^error: run folder .* is in use by another process \((.*)\)")  # a script's refusal
FOLDER_WAIT_S = 5.0  # seconds between two looks at a run folder that another process trains in


@dataclasses.dataclass
class Args:
    script: str
    """training script to sweep, e.g. `sac_fetch_mlp.py`; arguments after `--` are passed to every run"""
    study_name: str
    """Optuna study; workers with the same name and storage share it"""
    n_trials: int = 20
    """global cap: the study admits no new trial once it holds this many, counting every worker's trials"""
    storage: str | None = None
    """`postgresql+psycopg://...`, `sqlite:///...` or a journal file path; default: $OPTUNA_STORAGE_URL, else
    `runs/optuna_journal.log`. Prefer the environment variable for URLs with a password."""
    space: str | None = None
    """search space: a preset name or a TOML file; default: the preset named after the script, if any"""
    param: tyro.conf.UseAppendAction[list[str]] = dataclasses.field(default_factory=list)
    """one more dimension NAME=DIST:ARGS, overriding the space's (DIST: uniform, loguniform, int, choice)"""
    seeds: list[int] = dataclasses.field(default_factory=lambda: [1])
    """seeds run concurrently in every trial; the objective is their mean"""
    metric: str = "eval/success_rate"
    """key of the JSON evaluation lines to optimise"""
    direction: Literal["maximize", "minimize"] = "maximize"
    """optimisation direction of the metric"""
    last_k: int = 1
    """per seed, the objective averages the last K evaluations (1: the final evaluation)"""
    pruner: Literal["median", "hyperband", "none"] = "median"
    """prune on the live evaluations: median (5 startup trials, eval 0 never pruned), hyperband, none"""
    heartbeat_interval: int = 60
    """RDB storages: seconds between heartbeats; a trial silent for 3 intervals is failed and retried"""
    connect_retries: int = 8
    """attempts to reach the storage, with exponential backoff, before giving up"""


# ---- Errors and signals -------------------------------------------------------------------------------------
class UsageError(ValueError):
    """A bad command line, space or study setting, reported before any trial starts."""


class ScriptFailed(Exception):
    """A run of the script exited nonzero or never printed the metric; its trial is FAIL, the worker goes on."""


def run_folder_holder(folder: str) -> str | None:
    """Who trains in a run folder now: the host and pid its lock file names while a process holds the file's flock;
    None when none does, or where the filesystem cannot tell (no file locks). A shared lock taken and dropped at once
    is the look: the scripts' exclusive lock is refused only in that instant."""
    try:
        with open(os.path.join(folder, RUN_LOCK_FILE)) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return " ".join(f.read().split()) or "no holder written yet"
            except OSError:
                return None
    except OSError:  # no lock file: no run has started there
        return None
    return None


class Interrupted(Exception):
    """The tuner got SIGTERM, SIGINT or SIGUSR1 while a trial was running."""

    def __init__(self, signum: int, trial_number: int):
        super().__init__(f"{signal.Signals(signum).name} during trial {trial_number}")
        self.signum = signum
        self.trial_number = trial_number


class Interrupt:
    """Signal handler state: the first SIGTERM, SIGINT or SIGUSR1 received, and the runs to terminate."""

    def __init__(self):
        self.signum: int | None = None
        self.runs: SeedRuns | None = None

    def handle(self, signum: int, frame) -> None:
        """Records the signal and sends SIGTERM to the running trial's process groups; storage work is never cut."""
        self.signum = self.signum or signum
        if self.runs is not None:
            self.runs.signal_all(signal.SIGTERM)

    def install(self) -> None:
        """Makes `handle` the handler of SIGTERM, SIGINT and SIGUSR1."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(signum, self.handle)

    def sleep(self, seconds: float) -> None:
        """Sleeps `seconds`, returning early once a signal has arrived."""
        deadline = time.monotonic() + seconds
        while not self.signum and time.monotonic() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


# ---- Search spaces -------------------------------------------------------------------------------------------
# Fair comparison: every preset is the shared dimensions plus one capacity dimension, and the capacity dimensions of
# all presets have the same number of choices, matched by critic parameters (the i-th choices within 3 % of each other
# on the object tasks: 9.5k .. 530k; a test builds every network and checks). An equivariant preset pins its group,
# `dihedral_n` as a one-value choice (so it shows in every trial's parameters and rerun command, and a fixed
# `--dihedral-n` after `--` is refused): `sac_fetch_equivariant` D_8, the main job's group, `sac_fetch_equivariant_d4`
# D_4. Its critic has 2N n^2 + 41 n + 1 parameters at n = reg_rep_n, the MLP's h^2 + 41 h + 1 at width h. FLOPs are
# not matched: at equal parameters escnn's dense expansion would do 2N times the MLP's multiply-adds; the scripts'
# Fourier-block path does 1.5-3 times (blocks plus the group transforms).
SAC_FETCH_SHARED = {
    "policy_lr": "loguniform:1e-4,1e-3",
    "q_lr": "loguniform:1e-4,2e-3",
    "gamma": "uniform:0.9,0.999",
    "tau": "loguniform:1e-3,1e-1",
    "batch_size": "choice:128,256,512",
    "update_ratio": "choice:0.25,0.5,1",
}
SAC_FETCH_CAPACITY = {
    "sac_fetch_mlp": {"hidden_sizes": "choice:79 79,114 114,167 167,241 241,348 348,497 497,708 708"},
    "sac_fetch_equivariant": {"dihedral_n": "choice:8", "reg_rep_n": "choice:23,32,45,64,91,128,181"},
    "sac_fetch_equivariant_d4": {"dihedral_n": "choice:4", "reg_rep_n": "choice:32,45,63,90,128,180,255"},
}
PRESETS = {name: {**SAC_FETCH_SHARED, **capacity} for name, capacity in SAC_FETCH_CAPACITY.items()}


def parse_distribution(name: str, spec: str) -> BaseDistribution:
    """Parses `DIST:ARGS` into an Optuna distribution.

    uniform:LOW,HIGH  loguniform:LOW,HIGH  int:LOW,HIGH  choice:A,B,C (ints, floats or strings; a string with
    spaces becomes several argument tokens, e.g. `choice:256 256,400 300`).
    Raises UsageError naming the param, the bad spec and the allowed forms.
    """
    kind, _, body = spec.partition(":")
    values = [v.strip() for v in body.split(",")] if body.strip() else []
    try:
        if kind in ("uniform", "loguniform") and len(values) == 2:
            return FloatDistribution(float(values[0]), float(values[1]), log=kind == "loguniform")
        if kind == "int" and len(values) == 2:
            return IntDistribution(int(values[0]), int(values[1]))
        if kind == "choice" and values:
            return CategoricalDistribution([_literal(v) for v in values])
    except ValueError as exc:
        raise UsageError(f"param {name}: bad spec {spec!r} ({exc})") from None
    raise UsageError(
        f"param {name}: bad spec {spec!r}; allowed: uniform:LOW,HIGH, loguniform:LOW,HIGH, int:LOW,HIGH, choice:A,B,..."
    )


def spec_of(dist: BaseDistribution) -> str:
    """The canonical `DIST:ARGS` text of a distribution parsed by parse_distribution."""
    if isinstance(dist, FloatDistribution):
        return f"{'loguniform' if dist.log else 'uniform'}:{dist.low!r},{dist.high!r}"
    if isinstance(dist, IntDistribution):
        return f"int:{dist.low},{dist.high}"
    return "choice:" + ",".join(map(str, dist.choices))


def _literal(text: str) -> int | float | str:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def load_space_file(path: str) -> dict[str, str]:
    """Reads a TOML space file: a `[params]` table of `name = "DIST:ARGS"` strings.

    Raises UsageError when the file is not TOML, has other top-level keys or a value is not a string.
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"space file {path}: not TOML ({exc})") from None
    if set(data) != {"params"} or not isinstance(data["params"], dict):
        raise UsageError(f"space file {path}: top-level keys {sorted(data)}; allowed: a single [params] table")
    for name, spec in data["params"].items():
        if not isinstance(spec, str):
            raise UsageError(f'space file {path}: {name} = {spec!r}; allowed: a string like "loguniform:1e-4,1e-3"')
    return dict(data["params"])


def build_space(space: str | None, params: list[str], script: str) -> dict[str, BaseDistribution]:
    """Merges a preset or TOML file (`space`) with `--param` flags. Without `--space`, the `--param` flags alone are
    the space; with neither, the preset named after the script.

    Raises UsageError for an unknown preset or missing file, a malformed param, or an empty space.
    """
    if space is None and not params and Path(script).stem in PRESETS:
        space = Path(script).stem
    specs: dict[str, str] = {}
    if space in PRESETS:
        specs.update(PRESETS[space])
    elif space is not None:
        if not os.path.isfile(space):
            raise UsageError(f"--space {space!r}: neither a preset ({', '.join(PRESETS)}) nor a file")
        specs.update(load_space_file(space))
    for item in params:
        name, sep, spec = item.partition("=")
        if not sep:
            raise UsageError(f"--param {item!r}: expected NAME=DIST:ARGS, e.g. policy_lr=loguniform:1e-4,1e-3")
        specs[name] = spec
    if not specs:
        raise UsageError(f"nothing to tune: pass --space ({', '.join(PRESETS)} or a TOML file) or --param")
    for name in specs:
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise UsageError(f"param {name!r}: allowed names are snake_case Args fields, e.g. policy_lr")
    return {name: parse_distribution(name, spec) for name, spec in specs.items()}


def suggest(trial: optuna.Trial, space: dict[str, BaseDistribution]) -> dict:
    """Samples every dimension of `space` through the trial's suggest API; returns {name: value}."""
    for name, dist in space.items():
        if isinstance(dist, FloatDistribution):
            trial.suggest_float(name, dist.low, dist.high, log=dist.log)
        elif isinstance(dist, IntDistribution):
            trial.suggest_int(name, dist.low, dist.high, log=dist.log)
        else:
            trial.suggest_categorical(name, dist.choices)
    return {name: trial.params[name] for name in space}


def flag_of(name: str) -> str:
    """Maps an Args field name to its tyro flag: `policy_lr` -> `--policy-lr`."""
    return "--" + name.replace("_", "-")


def param_argv(params: dict) -> list[str]:
    """Turns {name: value} into script arguments; string values split on whitespace (lists like `256 256`)."""
    argv = []
    for name, value in params.items():
        argv += [flag_of(name), *(value.split() if isinstance(value, str) else [str(value)])]
    return argv


# ---- Checks before any trial ----------------------------------------------------------------------------------
def script_flags(script: str, env: dict[str, str]) -> set[str]:
    """Runs `python <script> --help` and returns the flags it lists, e.g. {"--seed", "--policy-lr"}.

    Raises UsageError if the script is missing or `--help` fails (an import error shows here, before any trial).
    """
    if not os.path.isfile(script):
        raise UsageError(f"--script {script!r}: no such file")
    try:
        proc = subprocess.run(
            [sys.executable, script, "--help"],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=HELP_TIMEOUT_S,
            env={**env, "COLUMNS": "200"},
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise UsageError(f"`{script} --help` did not finish in {HELP_TIMEOUT_S:.0f} s") from None
    if proc.returncode != 0:
        tail = "".join(proc.stderr.splitlines(keepends=True)[-STDERR_TAIL_LINES:])
        raise UsageError(f"`{script} --help` exited {proc.returncode}; its stderr ends with:\n{tail}")
    return set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", proc.stdout))


def check_arguments(script: str, space: dict, fixed_args: list[str], flags: set[str]) -> None:
    """Checks that every tuned param is a flag of the script and that no fixed argument sets a tuner-owned flag.

    Raises UsageError naming the bad param or argument and the allowed flags.
    """
    for owned in ("--seed", "--exp-name"):
        if owned not in flags:
            raise UsageError(f"{script} has no {owned} flag; the tuner sets --seed and --exp-name of every run")
    for name in space:
        if flag_of(name) not in flags:
            known = ", ".join(sorted(f[2:].replace("-", "_") for f in flags if f not in ("--help",)))
            raise UsageError(f"param {name!r}: {script} has no flag {flag_of(name)}; its params: {known}")
    owned_flags = {"--seed", "--exp-name", "--run-name", *(flag_of(name) for name in space)}
    for arg in fixed_args:
        if arg.split("=", 1)[0] in owned_flags:
            raise UsageError(
                f"fixed argument {arg!r} is set by the tuner; tuned and tuner-owned: {sorted(owned_flags)}"
            )


def study_config(args: Args, fixed_args: list[str], space: dict[str, BaseDistribution]) -> dict:
    """What every worker of a study must agree on; stored as the study's user attr `tuner_config`."""
    return {
        "script": os.path.basename(args.script),
        "fixed_args": list(fixed_args),
        "space": {name: spec_of(dist) for name, dist in space.items()},
        "seeds": list(args.seeds),
        "metric": args.metric,
        "direction": args.direction,
        "last_k": args.last_k,
    }


# ---- Storage --------------------------------------------------------------------------------------------------
def resolve_storage(cli_value: str | None, environ: dict[str, str]) -> str:
    """Returns `--storage`, else $OPTUNA_STORAGE_URL, else the embedded journal file `runs/optuna_journal.log`."""
    url = cli_value or environ.get(STORAGE_ENV) or DEFAULT_JOURNAL
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]  # psycopg 3, the driver this project installs
    return url


def _is_url(storage: str) -> bool:
    return "://" in storage


def _secrets(storage: str) -> list[str]:
    if not _is_url(storage):
        return []
    url = sqlalchemy.engine.make_url(storage)
    found = [url.password, url.query.get("password")]
    found = [s for s in found if isinstance(s, str) and s]
    encoded = [urllib.parse.quote(s, safe="") for s in found] + [urllib.parse.quote_plus(s) for s in found]
    for secret in found:  # as SQLAlchemy writes it inside a URL
        rendered = sqlalchemy.engine.URL.create("x", username="u", password=secret, host="h")
        encoded.append(rendered.render_as_string(hide_password=False)[len("x://u:") : -len("@h")])
    return sorted(set(found + encoded), key=len, reverse=True)


def redact(text: str, storage: str) -> str:
    """Replaces the storage password (raw or URL-encoded) in `text` with ***."""
    for secret in _secrets(storage):
        text = text.replace(secret, "***")
    return text


def mask_url(storage: str) -> str:
    """The storage URL with its password shown as ***; a journal path unchanged."""
    if not _is_url(storage):
        return storage
    return redact(sqlalchemy.engine.make_url(storage).render_as_string(hide_password=True), storage)


def check_storage(storage: str) -> None:
    """Raises UsageError unless `storage` is a PostgreSQL or SQLite URL or a journal file path."""
    if _is_url(storage) and not storage.startswith(("postgresql+psycopg://", "sqlite:///")):
        scheme = storage.split("://", 1)[0]
        raise UsageError(f"storage scheme {scheme!r}; allowed: postgresql+psycopg://, sqlite:///, a journal file path")


def _engine_kwargs(storage: str) -> dict:
    # NullPool: a worker holds a connection only while it talks to the server, so 64 workers plus their
    # heartbeat threads stay far below max_connections, and no pooled connection goes stale between trials.
    kwargs: dict = {"poolclass": sqlalchemy.pool.NullPool}
    if storage.startswith("postgresql"):
        kwargs["connect_args"] = {"connect_timeout": 10}
    return kwargs


def open_storage(storage: str, heartbeat_interval: int) -> optuna.storages.BaseStorage:
    """Opens the journal file (creating its folder) or the RDB; RDB storages get heartbeats and retries."""
    if not _is_url(storage):
        os.makedirs(os.path.dirname(os.path.abspath(storage)), exist_ok=True)
        return JournalStorage(JournalFileBackend(storage))
    return RDBStorage(
        storage,
        engine_kwargs=_engine_kwargs(storage),
        heartbeat_interval=heartbeat_interval,
        grace_period=3 * heartbeat_interval,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
    )


class StudyLock:
    """A lock shared by all workers of a storage, held for milliseconds around study creation and each ask.

    File storages use Optuna's JournalFileSymlinkLock on `<file>.tuner.lock`; PostgreSQL uses a session-level
    advisory lock, which the server releases when the holder's connection dies.
    """

    def __init__(self, storage: str, key: str):
        self._storage = storage
        self._key = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
        self._engine = None
        self._held = None

    def acquire(self) -> None:
        """Blocks until the lock is held (a no-op if this object holds it already)."""
        if self._held is not None:
            return
        if not self._storage.startswith("postgresql"):
            path = self._storage.removeprefix("sqlite:///")
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            lock = JournalFileSymlinkLock(path + ".tuner")
            lock.acquire()
            self._held = lock
            return
        if self._engine is None:
            self._engine = sqlalchemy.create_engine(self._storage, **_engine_kwargs(self._storage))
        conn = self._engine.connect()
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": self._key})
        conn.commit()
        self._held = conn

    def release(self) -> None:
        """Releases the lock if held; safe to call twice."""
        held, self._held = self._held, None
        if held is not None:
            held.close() if isinstance(held, sqlalchemy.Connection) else held.release()


def with_retries(call, attempts: int, storage: str, interrupt: Interrupt, shutting_down: bool = False):
    """Calls `call()`, retrying transient connection errors with jittered exponential backoff (1 s .. 30 s).

    With `shutting_down` (the last storage calls after a signal) the retries go on despite the signal, with delays
    capped at 2 s so that a few attempts end well inside Slurm's 30 s between SIGTERM and SIGKILL.
    Raises the last sqlalchemy OperationalError when `attempts` are spent or, unless shutting down, a signal arrived.
    """
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except sqlalchemy.exc.OperationalError as exc:
            if attempt == attempts or (interrupt.signum and not shutting_down):
                raise
            delay = min(2.0 ** (attempt - 1), 2.0 if shutting_down else 30.0) * random.uniform(0.5, 1.5)
            print(f"tuner: storage unreachable ({first_line(exc, storage)}); retry {attempt} in {delay:.1f} s")
            time.sleep(delay) if shutting_down else interrupt.sleep(delay)


def first_line(exc: Exception, storage: str) -> str:
    """The first line of a (database) error message, password redacted."""
    text = str(getattr(exc, "orig", None) or exc) or type(exc).__name__
    return redact(text, storage).splitlines()[0]


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """median: MedianPruner(5 startup trials, eval 0 never pruned); hyperband; none. Steps are eval_idx."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(args: Args, storage: str, config: dict, interrupt: Interrupt) -> optuna.Study:
    """Creates or loads the study under the storage-wide lock (64 workers may start at once), then checks that
    the study was created with the same `config`. Raises UsageError on a mismatch, naming the differing keys."""
    lock = StudyLock(storage, "tuner.py:create")

    def attempt() -> optuna.Study:
        lock.acquire()
        try:
            study = optuna.create_study(
                storage=open_storage(storage, args.heartbeat_interval),
                study_name=args.study_name,
                direction=args.direction,
                sampler=optuna.samplers.TPESampler(multivariate=True, constant_liar=True),
                pruner=make_pruner(args.pruner),
                load_if_exists=True,
            )
            existing = study.user_attrs.get("tuner_config")
            if existing is None:
                study.set_user_attr("tuner_config", config)
            elif existing != config:
                key = next(k for k in config if existing.get(k) != config[k])
                raise UsageError(
                    f"study {args.study_name!r} was created with {key}={existing.get(key)!r}; this worker has "
                    f"{config[key]!r} (every worker of a study needs the same script, arguments, space and seeds)"
                )
            return study
        finally:
            lock.release()

    return with_retries(attempt, args.connect_retries, storage, interrupt)


# ---- One trial: the seeds as subprocesses ---------------------------------------------------------------------
class SeedRuns:
    """The runs of one trial, one per seed, each started in its own process group (its own session).

    Reader threads put `(seed_idx, record)` on `events` for every JSON object printed on stdout, then
    `(seed_idx, None)` at end of stream; the last STDERR_TAIL_LINES lines of each stderr are kept.
    """

    def __init__(self, commands: list[list[str]], env: dict[str, str]):
        self.events: queue.Queue = queue.Queue()
        self.tails = [collections.deque(maxlen=STDERR_TAIL_LINES) for _ in commands]
        self.procs = []
        self.failed_idx: int | None = None  # the first run seen exiting nonzero
        self._threads = []
        for idx, cmd in enumerate(commands):
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",
                env=env,
                start_new_session=True,
            )
            self.procs.append(proc)
            for target in (self._read_stdout, self._read_stderr):
                thread = threading.Thread(target=target, args=(idx, proc), daemon=True)
                thread.start()
                self._threads.append(thread)

    def _read_stdout(self, idx: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # stdout should carry only JSON lines; anything else is ignored
            if isinstance(record, dict):
                self.events.put((idx, record))
        self.events.put((idx, None))

    def _read_stderr(self, idx: int, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            self.tails[idx].append(line[:1000])

    def signal_all(self, signum: int) -> None:
        """Sends `signum` to every run's process group that may still exist."""
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass

    def stop(self) -> None:
        """SIGTERM to every group, SIGKILL after KILL_GRACE_S, then SIGKILL again for any straggler in the groups
        (e.g. a vector-env worker) once the leaders are reaped; joins the reader threads."""
        if any(proc.poll() is None for proc in self.procs):
            self.signal_all(signal.SIGTERM)
            deadline = time.monotonic() + KILL_GRACE_S
            for proc in self.procs:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        self.signal_all(signal.SIGKILL)
        for proc in self.procs:
            proc.wait()
        for thread in self._threads:
            thread.join(timeout=5.0)


STORAGE_VARIABLES = (STORAGE_ENV, "PGPASSWORD")  # what a run must not see: the storage URL, libpq's password


def child_env() -> dict[str, str]:
    """The runs' environment: ours, unbuffered, minus the storage variables (by name: a value test would also strip
    PATH or HOME whenever they happen to contain a short password)."""
    env = {k: v for k, v in os.environ.items() if k not in STORAGE_VARIABLES}
    env["PYTHONUNBUFFERED"] = "1"  # evaluation lines arrive as they are printed
    return env


class Objective:
    """Runs one trial: samples the space, starts one run per seed, reports and prunes live, returns the mean."""

    def __init__(self, args: Args, fixed_args: list[str], space: dict, gate: Gate, interrupt: Interrupt, env: dict,
                 resumable: bool = False):  # fmt: skip
        self.args, self.fixed_args, self.space = args, fixed_args, space
        self.gate, self.interrupt, self.env = gate, interrupt, env
        self.resumable = resumable  # the script has --run-name: runs of an interrupted trial resume in its retry
        self.run_dir = fixed_value(fixed_args, "--run-dir", "runs")
        self.number: int | None = None  # the running (or last) trial
        self.root: int | None = None  # the trial whose run names it uses: itself or (resumable) the first it retries
        self.heldout: dict[int, float] = {}  # seed -> the held-out final evaluation's metric, of the running trial

    def commands(self, number: int, params: dict) -> list[list[str]]:
        """One command per seed; `--exp-name` (and `--run-name`, for a resumable script) is unique per trial and seed.
        For a resumable script `number` is the trial's root: a retry reuses the names of the trial it retries."""
        base = [sys.executable, self.args.script, *self.fixed_args, *param_argv(params)]
        commands = []
        for seed, name in zip(self.args.seeds, self.run_names(number), strict=True):
            commands.append(base + ["--seed", str(seed), "--exp-name", name])
            if self.resumable:
                commands[-1] += ["--run-name", name]
        return commands

    def run_names(self, number: int) -> list[str]:
        return [f"{self.args.study_name}-t{number}-s{seed}" for seed in self.args.seeds]

    def backfill(self, idx: int, first_eval_idx: int | None) -> list[dict]:
        """The records a resumed run printed in its previous process, before its checkpoint: its evals.jsonl lines
        with eval_idx below the first one it prints now (the script trims the file on resume), or, for a run that
        had already ended (`first_eval_idx` None), all of them and its held-out record from final_eval.json."""
        folder = os.path.join(self.run_dir, self.run_names(self.root)[idx])
        if not self.resumable or first_eval_idx == 0 or not os.path.exists(os.path.join(folder, "evals.jsonl")):
            return []
        with open(os.path.join(folder, "evals.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
        if first_eval_idx is not None:
            return [r for r in records if isinstance(r.get("eval_idx"), int) and r["eval_idx"] < first_eval_idx]
        if os.path.exists(os.path.join(folder, "final_eval.json")):
            with open(os.path.join(folder, "final_eval.json")) as f:
                records.append({k: v for k, v in json.load(f).items() if k.startswith("heldout/")})
        return records

    def remove_checkpoints(self) -> None:
        """A trial that ended (complete, pruned or failed) is never resumed: free the disk its checkpoints hold."""
        for name in self.run_names(self.root) if self.resumable else []:
            for file in ("checkpoint.pt", "checkpoint.pt.tmp"):
                Path(self.run_dir, name, file).unlink(missing_ok=True)

    def __call__(self, trial: optuna.Trial) -> float:
        self.gate.release()  # the trial exists: other workers may ask now
        self.number = trial.number
        params = suggest(trial, self.space)
        if self.interrupt.signum:
            raise Interrupted(self.interrupt.signum, trial.number)
        self.root = root_trial(trial) if self.resumable else trial.number
        resumes = f" (retries trial {self.root}: its runs resume from their checkpoints)" * (self.root != trial.number)
        print(f"tuner: trial {trial.number} started: {_fmt(params)} seeds {self.args.seeds}{resumes}")
        self.wait_for_run_folders(trial.number)
        if self.interrupt.signum:
            raise Interrupted(self.interrupt.signum, trial.number)
        runs = SeedRuns(self.commands(self.root, params), self.env)
        self.interrupt.runs = runs
        try:
            values = self.follow(trial, runs)
        finally:
            self.interrupt.runs = None
            runs.stop()
            busy = self.refused_seeds(runs)
            if not self.interrupt.signum and not busy:  # an interrupted or refused trial is queued again: keep them
                self.remove_checkpoints()
        if self.interrupt.signum:  # the runs died of our SIGTERM: not the script's failure
            raise Interrupted(self.interrupt.signum, trial.number)
        if busy:
            self.queue_again(trial, busy)
        self.check_runs(trial, runs, values)
        per_seed = [sum(v[-self.args.last_k :]) / len(v[-self.args.last_k :]) for v in values]
        trial.set_user_attr("seed_values", dict(zip(map(str, self.args.seeds), per_seed, strict=True)))
        if len(self.heldout) == len(self.args.seeds):  # reported apart: the number to publish, never selected on
            trial.set_user_attr("heldout_values", {str(seed): value for seed, value in self.heldout.items()})
            trial.set_user_attr("heldout_value", sum(self.heldout.values()) / len(self.heldout))
        return sum(per_seed) / len(per_seed)

    def follow(self, trial: optuna.Trial, runs: SeedRuns) -> list[list[float]]:
        """Collects each seed's metric values in order; reports the mean over seeds of eval `eval_idx` as step
        `eval_idx` once every seed has printed it. Raises TrialPruned; returns early if a run fails or a signal came."""
        values: list[list[float]] = [[] for _ in runs.procs]
        pending: dict[int, dict[int, float]] = collections.defaultdict(dict)
        self.heldout = {}
        open_streams = len(runs.procs)
        while open_streams:
            if self.interrupt.signum:
                break  # the caller raises Interrupted after stopping the runs
            try:
                idx, record = runs.events.get(timeout=0.5)
            except queue.Empty:
                continue
            if record is None:
                open_streams -= 1
                if runs.procs[idx].wait() != 0:
                    runs.failed_idx = idx
                    break  # a failed seed fails the trial: stop the others now
                records = [] if values[idx] else self.backfill(idx, None)  # a resumed run that had already ended
            elif isinstance(record.get(self.args.metric), (int, float)) and not values[idx]:
                records = [*self.backfill(idx, record.get("eval_idx", 0)), record]  # a resumed run's earlier evals
            else:
                records = [record]
            for item in records:
                self.take(trial, idx, item, values, pending)
        return values

    def take(self, trial: optuna.Trial, idx: int, record: dict, values: list, pending: dict) -> None:
        """One record of seed `idx`: a held-out value is kept apart; a metric value is appended and, once every seed
        has it at this `eval_idx`, their mean is reported."""
        heldout_key = heldout_metric(self.args.metric)
        if isinstance(record.get(heldout_key), (int, float)):
            self.heldout[self.args.seeds[idx]] = float(record[heldout_key])
        if not isinstance(record.get(self.args.metric), (int, float)):
            return
        values[idx].append(float(record[self.args.metric]))
        step = record.get("eval_idx")
        step = step if isinstance(step, int) else len(values[idx]) - 1
        pending[step][idx] = values[idx][-1]
        if len(pending[step]) == len(values):
            self.report(trial, step, sum(pending.pop(step).values()) / len(values))

    def report(self, trial: optuna.Trial, step: int, value: float) -> None:
        """Reports `value` at `step`; raises TrialPruned (the caller kills the runs) if the pruner says so."""
        trial.report(value, step=step)
        print(f"tuner: trial {trial.number} eval {step}: {self.args.metric}={value:.4g}")
        if trial.should_prune():
            trial.set_user_attr("pruned_at_eval", step)
            print(f"tuner: trial {trial.number} pruned at eval {step}")
            raise optuna.TrialPruned(f"pruned at eval {step}")

    def wait_for_run_folders(self, number: int) -> None:
        """Waits while another process trains in one of the trial's run folders (the runs of a retried trial whose
        worker was killed without them, or that a lost node still runs): the retry's runs resume there once it ended.
        Returns early on a signal."""
        told = set()
        while self.resumable and not self.interrupt.signum:
            folders = [os.path.join(self.run_dir, name) for name in self.run_names(self.root)]
            busy = {folder: holder for folder in folders if (holder := run_folder_holder(folder))}
            for folder in busy.keys() - told:
                print(f"tuner: trial {number} waits: run folder {folder} is in use by another process "
                      f"({busy[folder]}); its runs start once that process has ended")  # fmt: skip
            if not busy:
                return
            told |= busy.keys()
            self.interrupt.sleep(FOLDER_WAIT_S)

    def refused_seeds(self, runs: SeedRuns) -> dict[int, str]:
        """{seed: holder} of the runs that refused to start because another process trains in their run folder
        (exit 2 and the script's one-line refusal, which names the holder)."""
        refused = {}
        for seed, proc, tail in zip(self.args.seeds, runs.procs, runs.tails, strict=True):
            found = [m.group(1) for line in tail if (m := RUN_FOLDER_BUSY.match(line))]
            if proc.returncode == 2 and found:
                refused[seed] = found[-1]
        return refused

    def queue_again(self, trial: optuna.Trial, refused: dict[int, str]) -> None:
        """A trial whose runs were refused their folders: queued again (MAX_RETRY times at most), its checkpoints
        kept, and FAIL with the reason, not as a crash of the script. Raises ScriptFailed."""
        queued = requeue(trial.study, trial.number)  # before the failure attr, which the copy would inherit
        reason = "; ".join(f"seed {seed}: its run folder is in use by another process ({holder})"
                           for seed, holder in refused.items())  # fmt: skip
        trial.set_user_attr("failure", reason)
        then = "queued again: its runs resume once that process has ended" if queued else f"retried {MAX_RETRY} times"
        print(f"tuner: trial {trial.number} not run: {reason}; the trial is {then}", file=sys.stderr)
        raise ScriptFailed(reason)

    def check_runs(self, trial: optuna.Trial, runs: SeedRuns, values: list[list[float]]) -> None:
        """Raises ScriptFailed, keeping the stderr tail as user attr `stderr_tail`, if a run exited nonzero or
        never printed the metric."""
        order = sorted(range(len(runs.procs)), key=lambda i: i != runs.failed_idx)
        for i in order:
            seed, proc, seed_values, tail = self.args.seeds[i], runs.procs[i], values[i], runs.tails[i]
            if proc.returncode != 0:
                reason = f"seed {seed} exited {proc.returncode}"
            elif not seed_values:
                reason = f"seed {seed} exited 0 without printing {self.args.metric!r}"
            else:
                continue
            text = redact("".join(tail), self.args.storage)
            trial.set_user_attr("failure", reason)
            trial.set_user_attr("stderr_tail", text)
            print(f"tuner: trial {trial.number} FAILED: {reason}; last lines of its stderr:\n{text}", file=sys.stderr)
            raise ScriptFailed(reason)


def root_trial(trial: optuna.Trial) -> int:
    """The number of the first trial of a retry chain (Optuna's `failed_trial` system attr), else the trial's own."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    return frozen.system_attrs.get("failed_trial", trial.number)


def fixed_value(fixed_args: list[str], flag: str, default: str) -> str:
    """The value of `flag` in the fixed script arguments (`--flag V` or `--flag=V`, the last wins), else `default`."""
    value = default
    for i, arg in enumerate(fixed_args):
        if arg == flag and i + 1 < len(fixed_args):
            value = fixed_args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def heldout_metric(metric: str) -> str:
    """The held-out final evaluation's key for `metric`: `eval/success_rate` -> `heldout/success_rate`."""
    return "heldout/" + metric.split("/", 1)[-1]


def _fmt(params: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


# ---- Worker loop ----------------------------------------------------------------------------------------------
class Gate:
    """Admits a new trial only while the study holds fewer than `cap` trials, counting all workers' trials.

    Optuna's MaxTrialsCallback counts after a trial ends, so k workers overshoot its cap by up to k-1. Here the
    count and the `study.ask()` that follows run under one StudyLock: `admit` returns holding the lock and the
    objective releases it once its trial exists. Queued (WAITING) retries are always admitted. With heartbeats,
    a worker with nothing left to start waits while other trials run, so a trial whose worker dies is retried.
    """

    def __init__(self, lock: StudyLock, cap: int, interrupt: Interrupt, heartbeat_s: float | None):
        self.lock, self.cap, self.interrupt, self.heartbeat_s = lock, cap, interrupt, heartbeat_s

    def admit(self, study: optuna.Study) -> bool:
        """True: the lock is held and the next ask may create or pop a trial. False: the lock is released."""
        self.lock.acquire()
        while not self.interrupt.signum:
            fail_stale_trials(study)  # heartbeat storages: fail and requeue trials of dead workers
            states = [t.state for t in study.get_trials(deepcopy=False)]
            if len(states) < self.cap or TrialState.WAITING in states:
                return True
            if self.heartbeat_s is None or TrialState.RUNNING not in states:
                break
            self.lock.release()
            self.interrupt.sleep(self.heartbeat_s)
            self.lock.acquire()
        self.lock.release()
        return False

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if not self.admit(study):
            study.stop()

    def release(self) -> None:
        """Releases the lock if held."""
        self.lock.release()


def run_worker(study: optuna.Study, objective: Objective, gate: Gate, args: Args) -> None:
    """Runs trials until the gate admits no more; transient storage errors restart the loop with backoff.

    Raises Interrupted when a signal stopped a running trial (the trial is FAIL by then).
    """

    def loop() -> None:
        try:
            while gate.admit(study):
                try:
                    study.optimize(objective, callbacks=[gate], catch=(ScriptFailed,))
                    return
                except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                    if not retried_elsewhere(study, objective.number):
                        raise
                    print(f"tuner: trial {objective.number} went stale (late heartbeats) and was queued again")
        finally:
            gate.release()

    with_retries(loop, args.connect_retries, args.storage, gate.interrupt)


def retried_elsewhere(study: optuna.Study, number: int | None) -> bool:
    """True if trial `number` was failed as stale by another worker and queued again: its own report or tell
    then fails with UpdateFinishedTrialError or "Cannot tell a FAIL trial"."""
    trials = study.get_trials(deepcopy=False)
    return number is not None and any(number in t.system_attrs.get("retry_history", []) for t in trials)


def requeue(study: optuna.Study, number: int) -> bool:
    """Queues a WAITING copy of trial `number` (same params) with Optuna's retry callback, up to MAX_RETRY times;
    returns whether it did."""
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, frozen)
    return len(frozen.system_attrs.get("retry_history", [])) < MAX_RETRY


# ---- Summary --------------------------------------------------------------------------------------------------
def rerun_command(script: str, fixed_args: list[str], params: dict, seeds: list[int], exp_name: str) -> str:
    """A shell command rerunning `params` for every seed."""
    base = shlex.join(["python", script, *fixed_args, *param_argv(params)])
    if len(seeds) == 1:
        return f"{base} --seed {seeds[0]} --exp-name {shlex.quote(exp_name)}"
    return f'for seed in {" ".join(map(str, seeds))}; do {base} --seed "$seed" --exp-name {shlex.quote(exp_name)}; done'


def print_summary(study: optuna.Study, args: Args, fixed_args: list[str]) -> int:
    """Prints the state counts, the best value, its params and a rerun command; returns 1 if nothing completed."""
    counts = collections.Counter(t.state.name for t in study.get_trials(deepcopy=False))
    print(f"tuner: study {args.study_name!r}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    if not counts.get("COMPLETE"):
        print("tuner: no trial completed", file=sys.stderr)
        return 1
    best = study.best_trial
    print(f"tuner: best trial {best.number}: {args.metric}={best.value:.6g} ({args.direction})")
    print(f"tuner: best params: {json.dumps(best.params)}")
    if "heldout_value" in best.user_attrs:  # the best trial was chosen on args.metric: this is the number to report
        heldout = best.user_attrs["heldout_value"]
        print(f"tuner: best trial {best.number} held-out: {heldout_metric(args.metric)}={heldout:.6g}")
    print(f"tuner: rerun: {rerun_command(args.script, fixed_args, best.params, args.seeds, args.study_name + '-best')}")
    return 0


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Splits the command line at the first `--`: tuner arguments, fixed script arguments."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def prepare(args: Args, fixed_args: list[str], interrupt: Interrupt) -> tuple[optuna.Study, Objective, Gate]:
    """Everything before the first trial: validates the arguments and the space, checks the script's flags,
    opens the study. Raises UsageError, or OperationalError if the storage stays unreachable."""
    check_storage(args.storage)
    counts = {"n-trials": args.n_trials, "last-k": args.last_k}
    counts |= {"heartbeat-interval": args.heartbeat_interval, "connect-retries": args.connect_retries}
    for flag, value in counts.items():
        if value < 1:
            raise UsageError(f"--{flag} {value}; allowed: an integer >= 1")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        raise UsageError(f"--seeds {args.seeds}; allowed: one or more distinct integers")
    space = build_space(args.space, args.param, args.script)
    env = child_env()
    flags = script_flags(args.script, env)
    check_arguments(args.script, space, fixed_args, flags)
    print(f"tuner: storage {mask_url(args.storage)}, study {args.study_name!r}")
    print("tuner: space " + " ".join(f"{name}={spec_of(dist)}" for name, dist in space.items()))
    study = open_study(args, args.storage, study_config(args, fixed_args, space), interrupt)
    lock = StudyLock(args.storage, f"tuner.py:{args.study_name}")
    gate = Gate(lock, args.n_trials, interrupt, args.heartbeat_interval if _is_url(args.storage) else None)
    return study, Objective(args, fixed_args, space, gate, interrupt, env, "--run-name" in flags), gate


def main(argv: list[str]) -> int:
    """One tuner worker. Exit codes: 0 done, 1 nothing completed or storage unreachable, 2 usage error,
    128+N stopped by signal N."""
    tuner_argv, fixed_args = split_argv(argv)
    args = tyro.cli(Args, args=tuner_argv)
    args.storage = resolve_storage(args.storage, os.environ)
    interrupt = Interrupt()
    interrupt.install()
    try:
        study, objective, gate = prepare(args, fixed_args, interrupt)
        run_worker(study, objective, gate, args)
    except UsageError as exc:
        print(f"error: {redact(str(exc), args.storage)}", file=sys.stderr)
        return 2
    except sqlalchemy.exc.OperationalError as exc:
        print(f"error: storage {mask_url(args.storage)}: {first_line(exc, args.storage)}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        number, reason = exc.trial_number, str(exc)
        try:
            with_retries(lambda: requeue(study, number), 4, args.storage, interrupt, shutting_down=True)
            print(f"tuner: {reason}; the trial is FAIL and queued again", file=sys.stderr)
        except sqlalchemy.exc.OperationalError as err:
            print(f"tuner: {reason}; could not queue it again ({first_line(err, args.storage)}): a worker's heartbeat "
                  "check retries it once the trial goes stale", file=sys.stderr)  # fmt: skip
    if interrupt.signum:
        return 128 + interrupt.signum
    return print_summary(study, args, fixed_args)


def configure_logging() -> None:
    """Optuna logs warnings only, without the tracebacks of the failures our own lines explain."""

    def drop_known_traceback(record: logging.LogRecord) -> bool:
        known = (ScriptFailed, Interrupted, optuna.exceptions.UpdateFinishedTrialError)
        if record.exc_info and isinstance(record.exc_info[1], known):
            record.exc_info = None
        return True

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.logging.disable_default_handler()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[%(levelname)s %(asctime)s] %(message)s"))
    handler.addFilter(drop_known_traceback)
    logging.getLogger("optuna").addHandler(handler)


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # progress lines reach a log file (e.g. Slurm's) as they happen
    configure_logging()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    sys.exit(main(sys.argv[1:]))
