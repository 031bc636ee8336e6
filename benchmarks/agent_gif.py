"""Render a trained Fetch agent's deterministic episodes (the squashed mean action, as in its evaluations) into an
animated GIF: the README's video. The checkpoint (`checkpoint.pt`, which every run writes, or `model.pt`) may come from
`sac_fetch_equivariant.py` or `sac_fetch_mlp.py`; its own script rebuilds the actor and the normaliser.

The episodes are the first `--episodes` from `reset(seed=--seed)`, `seed + 1`, ...: none is picked for looking good,
and each one's success is printed and drawn in its last frames' title bar (green: success, red: failure).

    MUJOCO_GL=egl python benchmarks/agent_gif.py runs/push_fresh/FetchPush-v4__push-d8p__11/checkpoint.pt \\
        docs/figures/push_d8p_seed11.gif
"""

import importlib
import os
import sys
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import tyro
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("sac_fetch_equivariant.py", "sac_fetch_mlp.py")


@dataclass
class Args:
    checkpoint: tyro.conf.Positional[str]
    """checkpoint.pt or model.pt of a Fetch SAC run"""
    out: tyro.conf.Positional[str]
    """the GIF to write"""
    episodes: int = 3
    """episodes, one after another"""
    seed: int = 1_000_000
    """reset seed of the first episode (the next ones: seed + 1, ...); far from the evaluation seeds of a run"""
    size: int = 200
    """frame width and height, pixels"""
    frame_every: int = 2
    """keep every n-th env step (Fetch episodes are 50 steps at 25 steps/s of simulated time)"""
    frame_ms: int = 80
    """display time of one frame, milliseconds (80 with frame_every 2: real time)"""


def load_script(checkpoint: str):
    """The training script module that wrote `checkpoint` (its `script` field), imported from the repo root."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    script = state.get("script")
    if script not in SCRIPTS:
        raise SystemExit(f"{checkpoint}: written by {script!r}; this tool renders checkpoints of {', '.join(SCRIPTS)}")
    sys.path.insert(0, ROOT)
    return importlib.import_module(script[: -len(".py")])


def render_episodes(args: Args) -> tuple[list[Image.Image], list[bool]]:
    """Frames of `args.episodes` deterministic episodes and each episode's final `is_success`."""
    mod = load_script(args.checkpoint)
    state = mod.load_saved(args.checkpoint)
    run_args = mod.Args(**state["args"])
    env = mod.FetchBaseFrame(gym.make(run_args.env_id, render_mode="rgb_array", width=args.size, height=args.size))
    envs = gym.vector.SyncVectorEnv([lambda: env], autoreset_mode=gym.vector.AutoresetMode.DISABLED)
    fields = envs.get_attr("fields")[0]
    actor, obs_norm = mod.Actor(fields, run_args), mod.observation_normalizer(fields, run_args)
    actor.load_state_dict(state["actor"])
    obs_norm.load_state_dict(state["obs_norm"])
    actor.eval()
    frames, successes = [], []
    agent = f"D_{run_args.dihedral_n}" if hasattr(run_args, "dihedral_n") else "MLP"
    title = f"{run_args.env_id}, {agent}, {state['global_step'] // 1000}k steps"
    with torch.no_grad():
        for episode in range(args.episodes):
            obs, _ = envs.reset(seed=args.seed + episode)
            episode_frames = [env.render()]
            for step in range(env.spec.max_episode_steps):
                mean, _ = actor(obs_norm(mod.obs_tensor(obs, "cpu")))
                obs, _, _, _, infos = envs.step(mod.squash(mean).numpy())
                if (step + 1) % args.frame_every == 0:
                    episode_frames.append(env.render())
            success = bool(infos["is_success"][0])
            successes.append(success)
            for i, frame in enumerate(episode_frames):
                last = i >= len(episode_frames) - 5
                colour = ((0, 140, 0) if success else (190, 0, 0)) if last else (40, 40, 40)
                text = f"episode {episode + 1}: " + ("success" if success else "failure") if last else title
                frames.append(captioned(frame, text, colour))
    envs.close()
    return frames, successes


def captioned(frame: np.ndarray, text: str, colour: tuple[int, int, int]) -> Image.Image:
    """The frame under a 14-pixel title bar of `colour` with `text` in white."""
    image = Image.new("RGB", (frame.shape[1], frame.shape[0] + 14), colour)
    image.paste(Image.fromarray(frame), (0, 14))
    ImageDraw.Draw(image).text((3, 1), text, fill=(255, 255, 255))
    return image


def main() -> None:
    args = tyro.cli(Args)
    torch.set_num_threads(1)
    frames, successes = render_episodes(args)
    frames = [frame.quantize(colors=128, method=Image.Quantize.MEDIANCUT) for frame in frames]
    frames[0].save(args.out, save_all=True, append_images=frames[1:], duration=args.frame_ms, loop=0, optimize=True)
    print(f"{args.out}: {len(frames)} frames, {os.path.getsize(args.out) / 1024:.0f} KiB; episodes from seed "
          f"{args.seed}: {', '.join('success' if s else 'failure' for s in successes)}")  # fmt: skip


if __name__ == "__main__":
    main()
