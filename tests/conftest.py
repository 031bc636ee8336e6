"""Shared test set-up: the repo root on sys.path (scripts are imported as modules) and the Fetch envs registered."""

import os
import re
import sys
import time
import warnings

import gymnasium as gym
import gymnasium_robotics
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore", message=".*py3nj.*")
gym.register_envs(gymnasium_robotics)

TASKS = ("Reach", "Push", "PickAndPlace", "Slide")


@pytest.fixture(scope="session")
def eq():
    """The equivariant script as a module."""
    import sac_fetch_equivariant

    return sac_fetch_equivariant


@pytest.fixture(scope="session")
def mlp():
    """The MLP twin as a module."""
    import sac_fetch_mlp

    return sac_fetch_mlp


def wait_until(condition, timeout: float, what: str, poll: float = 0.05) -> None:
    """Poll `condition()` every `poll` s; fail the test naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(poll)


def read_stderr_until(proc, text: str) -> list:
    """The lines of `proc`'s stderr up to the first one that holds `text` (blocks until the process prints it)."""
    lines = []
    while not lines or text not in lines[-1]:
        line = proc.stderr.readline()
        assert line, f"stderr ended before {text!r}: {''.join(lines)[-3000:]}"
        lines.append(line)
    return lines


CLOCK = r"\d+:\d\d:\d\d"


def assert_progress_lines(stderr: str, run_name: str, total: int, metric: str) -> list:
    """At least one training progress line (docs/conventions.md, "Evaluation and stdout"), each with its step,
    percent, steady steps/s, elapsed time, ETA and last evaluation; returns their (step, steps/s) pairs."""
    pattern = (rf"\[{re.escape(run_name)}\] step (\d+)/{total} \((\d+)%\), (\d+(?:\.\d)?) steps/s, elapsed {CLOCK}, "
               rf"ETA {CLOCK}, last eval (none yet|{metric.split('/')[-1]} -?[\d.e+-]+)")  # fmt: skip
    found = [re.fullmatch(pattern, line) for line in stderr.splitlines() if line.startswith(f"[{run_name}] step ")]
    assert found and all(found), stderr[-3000:]
    for match in found:
        assert int(match[2]) == round(100 * int(match[1]) / total) and float(match[3]) > 0, match[0]
    return [(int(match[1]), float(match[3])) for match in found]


def assert_finished_line(stderr: str, run_name: str, run_path, heldout: dict) -> None:
    """The run's last stderr line names its held-out result (the JSON line's `heldout/*` values) and its folder."""
    values = ", ".join(f"{key[8:]} {value:.4g}" for key, value in heldout.items()
                       if key.startswith("heldout/") and key != "heldout/episodes")  # fmt: skip
    finished = f"finished at global_step {heldout['global_step']}: held-out {values} over {heldout['heldout/episodes']}"
    assert stderr.splitlines()[-1] == f"[{run_name}] {finished} episodes; run folder {run_path}"
    assert f"[{run_name}] held-out evaluation: {heldout['heldout/episodes']} episodes..." in stderr.splitlines()
