"""Shared test set-up: the repo root on sys.path (scripts are imported as modules) and the Fetch envs registered."""

import os
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
