"""tools/check_lockstep.py: the twins differ only in their network section, Args and module docstring, and the plumbing
the six scripts share has one text (docs/conventions.md, "Shape of a script"). The checker runs as a user runs it, on
this repository and on copies of the scripts in tmp_path with one line changed."""

import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

CHECKER = os.path.join(ROOT, "tools", "check_lockstep.py")
SCRIPTS = ("sac_fetch_equivariant.py", "sac_fetch_mlp.py", "dqn_snake_equivariant.py", "dqn_snake_cnn.py",
           "ppo_atari.py", "rpo_mujoco.py")  # fmt: skip


def run_checker(root: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, CHECKER, root], capture_output=True, text=True, timeout=300)


@pytest.fixture
def copies(tmp_path):
    """The six scripts copied into tmp_path."""
    for script in SCRIPTS:
        shutil.copy(os.path.join(ROOT, script), tmp_path / script)
    return tmp_path


def replace_once(path, old: str, new: str) -> int:
    """Replace the one occurrence of the line `old` (without its indentation) in `path`; return its line number."""
    lines = path.read_text().splitlines(keepends=True)
    (index,) = [i for i, line in enumerate(lines) if line.strip() == old]
    lines[index] = lines[index].replace(old, new)
    path.write_text("".join(lines))
    return index + 1


def test_the_scripts_of_this_repository_are_in_lockstep():
    result = run_checker(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "agree" in result.stdout


def test_a_plumbing_line_changed_in_one_twin_is_reported_with_its_name_and_line(copies):
    """One line of `atomic_torch_save` in the MLP twin: both checks report it, the twin diff with its line number."""
    line = replace_once(copies / "sac_fetch_mlp.py", "os.fsync(f.fileno())", "pass  # os.fsync(f.fileno())")
    result = run_checker(str(copies))
    assert result.returncode == 1, result.stdout + result.stderr
    report = result.stdout
    assert "== twins sac_fetch_equivariant.py and sac_fetch_mlp.py differ outside" in report
    assert "\n-        os.fsync(f.fileno())\n+        pass  # os.fsync(f.fileno())\n" in report
    hunk = next(row for row in report.splitlines() if row.startswith("@@ "))
    first, last = hunk.split("sac_fetch_mlp.py:")[1].split(" ")[0].split("-")
    assert int(first) <= line <= int(last)
    (summary,) = [row for row in report.splitlines() if row.startswith("atomic_torch_save: ")]
    lines = (copies / "sac_fetch_mlp.py").read_text().splitlines()
    defined = lines.index("def atomic_torch_save(state: dict, path: str) -> None:") + 1
    assert summary.startswith("atomic_torch_save: 2 different texts:") and f"sac_fetch_mlp.py:{defined}" in summary
    assert "dqn_snake_equivariant.py" not in report.split("atomic_torch_save: ")[0]  # the Snake pair is still in step


def test_a_plumbing_line_changed_in_a_script_without_twin_is_reported(copies):
    """rpo_mujoco.py has no twin: the shared-definition check alone catches a drifted copy."""
    replace_once(copies / "rpo_mujoco.py", "if not torch.isfinite(value).all():", "if torch.isnan(value).any():")
    result = run_checker(str(copies))
    assert result.returncode == 1 and "== twins" not in result.stdout, result.stdout + result.stderr
    assert "check_finite: 2 different texts: " in result.stdout
    assert "\n-    if not torch.isfinite(value).all():\n+    if torch.isnan(value).any():\n" in result.stdout


def test_a_changed_default_of_an_args_field_both_twins_declare_is_reported(copies):
    replace_once(copies / "dqn_snake_cnn.py", "gamma: float = 0.99", "gamma: float = 0.98")
    result = run_checker(str(copies))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Args.gamma: dqn_snake_equivariant.py `float = 0.99`, dqn_snake_cnn.py `float = 0.98`" in result.stdout


def test_a_change_inside_the_network_section_is_allowed(copies):
    replace_once(copies / "sac_fetch_mlp.py", "layers, width = [], in_dim", "layers, width = list(), in_dim")
    result = run_checker(str(copies))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_script_without_a_network_section_is_an_error(copies):
    text = (copies / "ppo_atari.py").read_text()
    (copies / "ppo_atari.py").write_text(text.replace("\n# Networks:", "\n# Nets:"))
    result = run_checker(str(copies))
    assert result.returncode == 2 and result.stderr == "error: ppo_atari.py has 0 network sections ('# Networks...' " \
        "banners), not one\n"  # fmt: skip
