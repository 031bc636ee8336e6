"""benchmarks/agent_gif.py, the README's video: a checkpoint of either Fetch SAC twin rendered into a GIF."""

import os
import subprocess
import sys

import torch
from conftest import ROOT
from PIL import Image

TOOL = os.path.join(ROOT, "benchmarks", "agent_gif.py")


def write_checkpoint(mod, path, **network_args) -> None:
    """An untrained agent of `mod` saved as its checkpoint.pt would hold it (the fields the tool reads)."""
    args = mod.Args(env_id="FetchReach-v4", cuda=False, **network_args)
    fields = mod.REACH_FIELDS + mod.GOAL_FIELDS  # what FetchBaseFrame gives for Reach
    nets, _, _ = mod.build_agent(fields, args, "cpu")
    state = mod.agent_state(args, (nets, {}, {"alpha": 0.2}))
    state.update(global_step=12_000, obs_norm=mod.observation_normalizer(fields, args).state_dict())
    torch.save(state, path)


def run_tool(*argv):
    env = {**os.environ, "MUJOCO_GL": "egl"}
    return subprocess.run([sys.executable, TOOL, *map(str, argv)], capture_output=True, text=True, env=env, timeout=300)


def test_both_twins_checkpoints_render_into_one_gif_of_every_kept_step(tmp_path, eq, mlp):
    for mod, network_args in ((eq, {"dihedral_n": 4, "reg_rep_n": 4}), (mlp, {"hidden_sizes": (16, 16)})):
        checkpoint, gif = tmp_path / f"{mod.__name__}.pt", tmp_path / f"{mod.__name__}.gif"
        write_checkpoint(mod, checkpoint, **network_args)
        result = run_tool(checkpoint, gif, "--episodes", 2, "--size", 64, "--frame-every", 5)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "episodes from seed 1000000: " in result.stdout
        with Image.open(gif) as image:
            assert image.n_frames == 2 * (1 + 50 // 5)  # per episode: the reset frame and every 5th of 50 steps
            assert image.size == (64, 64 + 14)  # the frame under its title bar


def test_a_checkpoint_of_another_script_is_refused_in_one_line(tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"script": "ppo_atari.py", "args": {}}, checkpoint)
    result = run_tool(checkpoint, tmp_path / "out.gif")
    assert result.returncode == 1 and not (tmp_path / "out.gif").exists()
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "written by 'ppo_atari.py'; this tool renders checkpoints of sac_fetch_equivariant.py, sac_fetch_mlp.py"
        )
    )
