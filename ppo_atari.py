# docs and experiment results: docs/ppo_rpo.md
"""PPO on Atari (ale-py), CleanRL's `ppo_atari.py` algorithm and defaults on gymnasium 1.x, with truncation
bootstrapping, the raw full-game score as `charts/episodic_return`, held-out evaluation and exact-state resume.

PPO: Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (arXiv:1707.06347), Eq. 7 (clipped surrogate),
Eq. 9 (value and entropy terms), Eq. 11-12 (GAE, Schulman et al. 2016, arXiv:1506.02438). Network and
preprocessing: Mnih et al. 2015 (Nature CNN); implementation details as in Huang et al. 2022, "The 37 Implementation
Details of Proximal Policy Optimization" (ICLR blog track), i.e. CleanRL's `ppo_atari.py`.
"""

import contextlib
import errno
import fcntl
import importlib.util
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal, NamedTuple

import ale_py
import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    """Train PPO (CleanRL's Atari algorithm and defaults) on an Atari game (ale-py)."""

    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment (Python, NumPy, torch, minibatch shuffling, environments)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda is used when available"""
    track: bool = False
    """if toggled, the run is tracked with Weights and Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "equivariant-rl"
    """the wandb project name"""
    capture_video: bool = False
    """if toggled, the first episode of every evaluation (the held-out one's too) is saved as a video in
    `<run_dir>/<run_name>/videos` (evaluation then runs on the gymnasium-wrapper path, in one process: its no-op
    starts come from gymnasium's generator, so its scores differ slightly from the ale path's)"""
    save_model: bool = False
    """if toggled, the agent is saved to `<run_dir>/<run_name>/model.pt` at every evaluation"""
    checkpoint_frequency: int = 500_000
    """environment steps between training checkpoints (`<run_dir>/<run_name>/checkpoint.pt`), written at the first
    update boundary past each multiple, at the end, and on SIGUSR1/SIGTERM; 0: only the latter"""
    run_dir: str = "runs"
    """the folder that holds one sub-folder per run"""
    run_name: str | None = None
    """the run folder's name (default `{env_id}__{exp_name}__{seed}__{unix_time}`); if `<run_dir>/<run_name>/` holds a
    checkpoint, the run resumes from it"""

    # Algorithm specific arguments
    env_id: str = "BreakoutNoFrameskip-v4"
    """the game, as `{Game}NoFrameskip-v4` (no sticky actions, CleanRL's protocol) or `ALE/{Game}-v5` (sticky actions
    with probability 0.25, Machado et al. 2018); the preprocessing is the same for both (see `make_vector_env`)"""
    total_timesteps: int = 10_000_000
    """total environment steps (agent steps of 4 frames, summed over the `num_envs` environments); the run stops at the
    last whole update, `(total_timesteps // (num_envs * num_steps)) * num_envs * num_steps`"""
    num_envs: int = 8
    """the number of parallel game environments"""
    vector_env_mode: Literal["ale", "sync", "async"] = "ale"
    """`ale`: ale-py's AtariVectorEnv (C++ threads, preprocessing in C++); `sync`/`async`: gymnasium's vector envs of
    gymnasium-wrapped ALE envs (same observations for the same seeds and actions, see tests/test_ppo_atari.py)"""
    episodic_life: bool = True
    """if toggled, a lost life ends the episode for the value targets (the game goes on; episodic returns and
    evaluation always count whole games)"""
    clip_rewards: bool = True
    """if toggled, training rewards are clipped to their sign (logged returns and evaluation stay raw)"""
    learning_rate: float = 2.5e-4
    """the learning rate of the optimizer"""
    num_steps: int = 128
    """the number of steps to run in each environment per policy rollout"""
    anneal_lr: bool = True
    """if toggled, the learning rate falls linearly to 0 over the updates"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the generalized advantage estimation"""
    num_minibatches: int = 4
    """the number of mini-batches per epoch (must divide num_envs * num_steps)"""
    update_epochs: int = 4
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """if toggled, advantages are normalised per minibatch"""
    clip_coef: float = 0.1
    """the surrogate clipping coefficient"""
    clip_vloss: bool = True
    """if toggled, the value loss is clipped as the surrogate (PPO2's value clipping)"""
    ent_coef: float = 0.01
    """coefficient of the entropy"""
    vf_coef: float = 0.5
    """coefficient of the value function"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping"""
    target_kl: float | None = None
    """the target KL divergence threshold: an update stops after the epoch whose last minibatch exceeds it"""
    bf16: bool = False
    """if toggled, the update's network passes run under bfloat16 autocast (CPUs with AVX512-BF16 or AMX, GPUs; a
    CPU without them emulates it, about 8x slower, and the run says so in one line); weights,
    optimizer states, losses and acting stay float32 (off: the float32 algorithm)"""
    torch_threads: int = 0
    """torch's intra-op threads; 0: torch's default (OMP_NUM_THREADS if set, else one per core)"""
    eval_frequency: int = 500_000
    """environment steps between evaluations, at the first update boundary past each multiple (a final evaluation
    always runs at the end)"""
    eval_episodes: int = 10
    """whole-game evaluation episodes per evaluation (one evaluation environment each)"""
    eval_sampled: bool = True
    """if toggled, evaluation samples actions from the policy (CleanRL's `ppo_eval` protocol) with a generator of its
    own seeded from the evaluation seed, so training's random streams are untouched; off: greedy (argmax) actions"""
    final_eval_episodes: int = 100
    """episodes of the held-out final evaluation, from seeds no periodic evaluation uses, reported apart as
    `heldout/*` (the number to publish; tuners select on `eval/*`); 0 skips it"""


def batch_size(args: Args) -> int:
    """Transitions per update (CleanRL's `args.batch_size`)."""
    return args.num_envs * args.num_steps


def num_iterations(args: Args) -> int:
    """Updates of the whole run (CleanRL's `args.num_iterations`)."""
    return args.total_timesteps // batch_size(args)


def budget_schedules(args: Args) -> list[str]:
    """The schedules that run over `total_timesteps`, so that a resumed run may not change it: the learning rate's
    linear annealing over the updates. Runs with --no-anneal-lr may be extended."""
    return ["the learning rate's linear annealing (--anneal-lr)"] if args.anneal_lr else []


# ---------------------------------------------------------------------------------------------------------------------
# Environment: ale-py's vector env (default) or gymnasium wrappers, one preprocessing for both
# ---------------------------------------------------------------------------------------------------------------------
ENV_ID_PATTERN = re.compile(r"^(?:(?P<v4>[A-Za-z0-9]+)NoFrameskip-v4|ALE/(?P<v5>[A-Za-z0-9]+)-v5)$")
FRAMES_PER_EPISODE = 108_000  # 30 minutes of play at 60 Hz (Machado et al. 2018): truncation, not termination
STICKY_ACTIONS = {"v4": 0.0, "v5": 0.25}


def game_names() -> dict[str, str]:
    """CamelCase game name -> ale-py ROM id, named as ale-py's gymnasium registration names them (`ms_pacman` ->
    `MsPacman`, `tic_tac_toe_3d` -> `TicTacToe3D`)."""
    return {rom.title().replace("_", ""): rom for rom in ale_py.roms.get_all_rom_ids()}


def parse_env_id(env_id: str) -> tuple[str, float]:
    """`BreakoutNoFrameskip-v4` -> ("breakout", 0.0); `ALE/MsPacman-v5` -> ("ms_pacman", 0.25): ale-py's ROM id and
    the sticky-action probability of the protocol. Raises ValueError for an unknown game, listing the games."""
    match, names = ENV_ID_PATTERN.match(env_id), game_names()
    game = match and (match["v4"] or match["v5"])
    if game not in names:
        raise ValueError(f"unknown --env-id {env_id!r}; supported: {{Game}}NoFrameskip-v4 or ALE/{{Game}}-v5 with "
                         f"Game one of {', '.join(names)}")  # fmt: skip
    return names[game], STICKY_ACTIONS["v4" if match["v4"] else "v5"]


def make_ale_vector_env(env_id: str, num_envs: int, noop_max: int = 30) -> gym.vector.VectorEnv:
    """ale-py's C++ vector env: per env, on reset FIRE (games that have it) then 0 to `noop_max` - 1 no-op frames
    (0 to `noop_max` - 2 after a FIRE); per step the action repeated 4 frames, the max of the last two frames, 84x84
    grayscale (OpenCV INTER_AREA), a stack of 4 (zeros before the first frame). Rewards raw, episodes whole games
    (life loss and reward clipping are applied by the training loop), truncated after FRAMES_PER_EPISODE frames;
    autoreset in the same step, the final observation in `infos["final_obs"]`.
    Observations (num_envs, 4, 84, 84) uint8; `infos["lives"]` (num_envs,)."""
    rom, sticky = parse_env_id(env_id)
    return ale_py.AtariVectorEnv(
        rom, num_envs, repeat_action_probability=sticky, noop_max=noop_max, frameskip=4, maxpool=True, stack_num=4,
        img_height=84, img_width=84, grayscale=True, use_fire_reset=True, episodic_life=False, life_loss_info=False,
        reward_clipping=False, max_num_frames_per_episode=FRAMES_PER_EPISODE, autoreset_mode="SameStep",
    )  # fmt: skip


class FireOnReset(gym.Wrapper):
    """Presses FIRE for one frame after every reset, in games whose minimal action set has it (ale-py's vector env
    does the same before its no-ops); Breakout's ball is served by FIRE."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        meanings = env.unwrapped.get_action_meanings()
        self.fire = meanings.index("FIRE") if "FIRE" in meanings else None

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        if self.fire is not None:
            obs, _, terminated, truncated, info = self.env.step(self.fire)
            if terminated or truncated:
                obs, info = self.env.reset()
        return obs, info


class SavableAtari(gym.Wrapper):
    """Outermost wrapper of the gymnasium path: the complete state of the env below as `state`, a property so that
    vector envs can `get_attr`/`set_attr` it. It holds ALE's emulator with its RNG (`cloneState(include_rng=True)`),
    the no-op generator, AtariPreprocessing's two frame buffers, lives and game-over flag, the frame stack and the time
    limit's step count: a restored env continues its episode exactly (ale-py's vector env has no such access)."""

    def _wrappers(self) -> dict:
        found, env = {}, self.env
        while isinstance(env, gym.Wrapper):
            found[type(env).__name__], env = env, env.env
        return found

    @property
    def state(self) -> dict:
        w = self._wrappers()
        pre, stack = w["AtariPreprocessing"], w["FrameStackObservation"]
        ale_state = self.unwrapped.ale.cloneState(include_rng=True).serialize()
        return {"ale": torch.frombuffer(bytearray(ale_state), dtype=torch.uint8),
                "np_random": self.unwrapped.np_random.bit_generator.state,
                "frame_buffers": torch.from_numpy(np.stack(pre.obs_buffer)), "lives": pre.lives,
                "game_over": pre.game_over, "stack": torch.from_numpy(np.stack(stack.obs_queue)),
                "elapsed_steps": w["TimeLimit"]._elapsed_steps}  # fmt: skip

    @state.setter
    def state(self, state: dict) -> None:
        w = self._wrappers()
        pre, stack = w["AtariPreprocessing"], w["FrameStackObservation"]
        self.unwrapped.ale.restoreState(ale_py.ALEState(state["ale"].numpy().tobytes()))
        self.unwrapped.np_random.bit_generator.state = state["np_random"]
        for buffer, saved in zip(pre.obs_buffer, state["frame_buffers"].numpy(), strict=True):
            buffer[...] = saved
        pre.lives, pre.game_over = state["lives"], state["game_over"]
        stack.obs_queue.clear()
        stack.obs_queue.extend(frame.copy() for frame in state["stack"].numpy())
        w["TimeLimit"]._elapsed_steps = state["elapsed_steps"]


def make_env(env_id: str, noop_max: int = 30, capture_video: bool = False, video_dir: str = ""):
    """The gymnasium-wrapper path, step for step the preprocessing of `make_ale_vector_env`: ALE at frameskip 1,
    FireOnReset, AtariPreprocessing (no-ops, frame skip 4 with max-pooling, 84x84 grayscale), FrameStackObservation
    (4, zero padding), TimeLimit of FRAMES_PER_EPISODE / 4 steps, SavableAtari. Its no-op counts come from another
    generator than the C++ env's, so the two paths agree exactly only with noop_max=0."""

    def thunk():
        _, sticky = parse_env_id(env_id)
        game = ENV_ID_PATTERN.match(env_id)["v4"] or ENV_ID_PATTERN.match(env_id)["v5"]
        env = gym.make(f"ALE/{game}-v5", frameskip=1, repeat_action_probability=sticky, full_action_space=False,
                       max_num_frames_per_episode=0, render_mode="rgb_array" if capture_video else None)  # fmt: skip
        if capture_video:
            env = gym.wrappers.RecordVideo(env, video_dir, episode_trigger=lambda _: False, disable_logger=True)
        env = FireOnReset(env)
        env = gym.wrappers.AtariPreprocessing(env, noop_max=noop_max, frame_skip=4, screen_size=84)
        env = gym.wrappers.FrameStackObservation(env, 4, padding_type="zero")
        return SavableAtari(gym.wrappers.TimeLimit(env, FRAMES_PER_EPISODE // 4))

    return thunk


# One env's memory in bytes and its creation time in seconds on one core (docs/BENCHMARKS.md, "Set-up cost"): `ale`
# in ale-py's C++ vector env, `sync` in this process, `async` a worker process of its own (its private
# memory once a garbage collection in it has copied the pages it shared with this process)
ENV_COST = {"ale": (2 * 2**20, 0.14), "sync": (2 * 2**20, 0.2), "async": (55 * 2**20, 0.43)}


def make_vector_env(env_id: str, num_envs: int, mode: str, noop_max: int = 30, capture_video: bool = False,
                    video_dir: str = "") -> gym.vector.VectorEnv:  # fmt: skip
    """`num_envs` preprocessed Atari envs (see `make_ale_vector_env`), autoreset in the same step. With
    `capture_video`, env 0 records and the envs run in this process (gymnasium path, SyncVectorEnv), whatever `mode`
    is, so that `set_video_trigger` reaches its recorder."""
    if mode == "ale" and not capture_video:
        return make_ale_vector_env(env_id, num_envs, noop_max)
    thunks = [make_env(env_id, noop_max, capture_video and i == 0, video_dir) for i in range(num_envs)]
    vector_cls = gym.vector.AsyncVectorEnv if mode == "async" and not capture_video else gym.vector.SyncVectorEnv
    return vector_cls(thunks, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def final_observations(infos: dict, indices: np.ndarray) -> np.ndarray:
    """The true last observations of the envs `indices` whose episode ended this step (autoreset already replaced
    them in the step's observations): (len(indices), *obs_shape)."""
    return np.stack([infos["final_obs"][i] for i in indices])


# ---------------------------------------------------------------------------------------------------------------------
# Networks: Nature CNN with a policy and a value head (CleanRL's Agent, same parameter names)
# ---------------------------------------------------------------------------------------------------------------------
def layer_init(layer: nn.Module, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Module:
    """Orthogonal weights with gain `std`, constant bias (Huang et al. 2022, detail 2)."""
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """Nature CNN trunk (Mnih et al. 2015), policy logits head (gain 0.01) and value head (gain 1).

    Input x: (batch, 4, 84, 84) uint8 frames. Output: logits (batch, num_actions), value (batch,).
    The trunk runs in channels_last memory format (faster oneDNN convolutions on CPU).
    """

    def __init__(self, num_actions: int):
        super().__init__()
        self.network = nn.Sequential(
            layer_init(nn.Conv2d(4, 32, 8, stride=4)),  # (batch, 4, 84, 84) -> (batch, 32, 20, 20)
            nn.ReLU(),
            layer_init(nn.Conv2d(32, 64, 4, stride=2)),  # -> (batch, 64, 9, 9)
            nn.ReLU(),
            layer_init(nn.Conv2d(64, 64, 3, stride=1)),  # -> (batch, 64, 7, 7)
            nn.ReLU(),
            nn.Flatten(),  # -> (batch, 3136)
            layer_init(nn.Linear(64 * 7 * 7, 512)),
            nn.ReLU(),
        )
        self.actor = layer_init(nn.Linear(512, num_actions), std=0.01)
        self.critic = layer_init(nn.Linear(512, 1), std=1)
        self.network.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(memory_format=torch.channels_last, dtype=torch.float32) * (1.0 / 255.0)
        hidden = self.network(x)  # (batch, 512)
        return self.actor(hidden), self.critic(hidden).squeeze(1)


# ---------------------------------------------------------------------------------------------------------------------
# Algorithm: categorical policy, rollout storage, GAE, the clipped PPO update
# ---------------------------------------------------------------------------------------------------------------------
def log_prob_entropy(logits: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(a|s) (batch,) and the policy's entropy (batch,) from logits (batch, num_actions), actions (batch,)."""
    logp = F.log_softmax(logits.float(), dim=1)
    return logp.gather(1, actions.unsqueeze(1)).squeeze(1), -(logp.exp() * logp).sum(1)


def sample_actions(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """a ~ Categorical(softmax(logits)): (batch, num_actions) -> (batch,) int64, from `generator` (default torch's)."""
    return torch.multinomial(F.softmax(logits.float(), dim=1), 1, generator=generator).squeeze(1)


class Rollout(NamedTuple):
    """One rollout of `num_steps` vector steps; every tensor is (num_steps, num_envs, ...)."""

    obs: torch.Tensor  # (T, N, 4, 84, 84) uint8: the observation each action was taken in
    actions: torch.Tensor  # (T, N) int64
    logprobs: torch.Tensor  # (T, N) log pi_old(a_t|s_t)
    rewards: torch.Tensor  # (T, N) training reward, + gamma V(final obs) where the episode was truncated
    dones: torch.Tensor  # (T, N) 1.0 where the episode ended after step t (termination, truncation, life loss)
    values: torch.Tensor  # (T, N) V_old(s_t)


def new_rollout(num_steps: int, num_envs: int, obs_shape, device) -> Rollout:
    zeros = lambda *shape, dtype=torch.float32: torch.zeros(num_steps, num_envs, *shape, dtype=dtype, device=device)  # noqa: E731
    return Rollout(zeros(*obs_shape, dtype=torch.uint8), zeros(dtype=torch.int64), zeros(), zeros(), zeros(), zeros())


def compute_gae(rewards, values, dones, next_value, gamma: float, gae_lambda: float) -> torch.Tensor:
    """Generalized advantage estimates (Schulman et al. 2016, Eq. 16; PPO paper Eq. 11-12), by the backward recursion
    A_t = delta_t + gamma lambda (1 - d_t) A_{t+1}, delta_t = r_t + gamma (1 - d_t) V_{t+1} - V_t.

    rewards, values, dones: (T, N), `dones[t]` = 1 where the episode ended after step t (a truncated episode's
    bootstrap value is already in its reward); next_value: (N,) V of the observation after the last step.
    Returns advantages (T, N); the value targets are advantages + values.
    """
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        next_values = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        not_done = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_values * not_done - values[t]
        advantages[t] = last_gae = delta + gamma * gae_lambda * not_done * last_gae
    return advantages


class EpisodeStats:
    """Raw (unclipped) return and length of each env's current whole game, all lives, in agent steps."""

    def __init__(self, num_envs: int):
        self.returns, self.lengths = np.zeros(num_envs), np.zeros(num_envs, np.int64)

    def step(self, raw_rewards: np.ndarray, game_over: np.ndarray) -> list[tuple[float, int]]:
        """Add one step; return (return, length) of the games that ended with it."""
        self.returns += raw_rewards
        self.lengths += 1
        ended = [(float(self.returns[i]), int(self.lengths[i])) for i in np.flatnonzero(game_over)]
        self.returns[game_over], self.lengths[game_over] = 0.0, 0
        return ended


class EnvState:
    """What the training loop carries between vector steps: the current observations (N, 4, 84, 84), lives (N,)
    (None for envs without lives) and the statistics of the games in progress."""

    def __init__(self, obs: np.ndarray, lives: np.ndarray | None):
        self.obs, self.lives, self.stats = obs, lives, EpisodeStats(len(obs))

    def snapshot(self, envs) -> dict | None:
        """Everything needed to continue the games in progress exactly (gymnasium path only; ale-py: None)."""
        if isinstance(envs, ale_py.AtariVectorEnv):
            return None
        return {"states": list(envs.get_attr("state")), "obs": torch.from_numpy(self.obs.copy()),
                "lives": torch.from_numpy(self.lives.copy()), "returns": torch.from_numpy(self.stats.returns.copy()),
                "lengths": torch.from_numpy(self.stats.lengths.copy())}  # fmt: skip

    def restore(self, envs, snapshot: dict) -> None:
        """Inverse of `snapshot`: the envs and this state continue where the snapshot was taken."""
        envs.set_attr("state", snapshot["states"])
        self.obs, self.lives = snapshot["obs"].numpy().copy(), snapshot["lives"].numpy().copy()
        self.stats.returns[:], self.stats.lengths[:] = snapshot["returns"].numpy(), snapshot["lengths"].numpy()


def env_step(envs, actions: np.ndarray, state: EnvState, args: Args):
    """One vector step. Returns training rewards (N,), dones for the value targets (N,), the indices of the episodes
    cut by the time limit (to bootstrap), their final observations, and the (return, length) of the ended games."""
    obs, raw_rewards, terminated, truncated, infos = envs.step(actions)
    game_over = terminated | truncated
    life_lost = np.zeros_like(game_over)
    if args.episodic_life and state.lives is not None:  # a lost life ends the episode for the value targets only
        life_lost = (infos["lives"] < state.lives) & ~game_over
    truncated_idx = np.flatnonzero(truncated & ~terminated)
    final_obs = final_observations(infos, truncated_idx) if len(truncated_idx) else None
    rewards = np.sign(raw_rewards) if args.clip_rewards else raw_rewards
    state.obs, state.lives = obs, infos.get("lives")
    return rewards, game_over | life_lost, truncated_idx, final_obs, state.stats.step(raw_rewards, game_over)


def collect_rollout(agent, envs, state: EnvState, rollout: Rollout, args: Args, device):
    """Fill `rollout` with `num_steps` vector steps of the current policy (actions from torch's generator).

    Crucial (CleanRL issue #198): an episode cut by the time limit is not terminal; its last reward gets
    gamma * V(true final observation), taken from `infos["final_obs"]` since autoreset already replaced it.
    Returns V(observation after the last step) (N,) and (step t, return, length) of every game that ended.
    """
    ended = []
    for t in range(args.num_steps):
        obs = torch.as_tensor(state.obs, device=device)
        with torch.inference_mode():
            logits, value = agent(obs)
            action = sample_actions(logits)
            logprob, _ = log_prob_entropy(logits, action)
        rewards, done, truncated_idx, final_obs, games = env_step(envs, action.cpu().numpy(), state, args)
        rewards = torch.as_tensor(rewards, dtype=torch.float32, device=device)
        if final_obs is not None:
            with torch.inference_mode():
                final_value = agent(torch.as_tensor(final_obs, device=device))[1]
            rewards[truncated_idx] += args.gamma * final_value
        rollout.obs[t], rollout.actions[t], rollout.logprobs[t], rollout.values[t] = obs, action, logprob, value
        rollout.rewards[t], rollout.dones[t] = rewards, torch.as_tensor(done, dtype=torch.float32, device=device)
        ended += [(t, *game) for game in games]
    with torch.inference_mode():
        next_value = agent(torch.as_tensor(state.obs, device=device))[1]
    return next_value.clone(), ended


def ppo_loss(agent, mb: dict, args: Args):
    """PPO's loss on one minibatch (PPO paper Eq. 9 with the clipped surrogate, Eq. 7, and PPO2's clipped value
    loss). Returns (loss, logs): logs are the detached approx-KL estimators (Schulman's k1 and k3) and clip fraction."""
    with torch.autocast(mb["obs"].device.type, dtype=torch.bfloat16, enabled=args.bf16):
        logits, new_value = agent(mb["obs"])
    new_logprob, entropy = log_prob_entropy(logits, mb["actions"])
    new_value = new_value.float()
    logratio = new_logprob - mb["logprobs"]
    ratio = logratio.exp()
    advantages = mb["advantages"]
    if args.norm_adv:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    pg_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
    v_loss_unclipped = (new_value - mb["returns"]) ** 2
    if args.clip_vloss:
        v_clipped = mb["values"] + (new_value - mb["values"]).clamp(-args.clip_coef, args.clip_coef)
        v_loss = 0.5 * torch.max(v_loss_unclipped, (v_clipped - mb["returns"]) ** 2).mean()
    else:
        v_loss = 0.5 * v_loss_unclipped.mean()
    entropy_loss = entropy.mean()
    loss = pg_loss - args.ent_coef * entropy_loss + args.vf_coef * v_loss
    with torch.no_grad():
        logs = {"losses/policy_loss": pg_loss, "losses/value_loss": v_loss, "losses/entropy": entropy_loss,
                "losses/old_approx_kl": (-logratio).mean(), "losses/approx_kl": ((ratio - 1) - logratio).mean(),
                "clipfrac": ((ratio - 1.0).abs() > args.clip_coef).float().mean()}  # fmt: skip
    return loss, logs


def ppo_update(agent, optimizer, batch: dict, args: Args, minibatch_rng: np.random.Generator, global_step: int):
    """`update_epochs` epochs over `batch` (flat (T*N, ...) tensors) in `num_minibatches` shuffled minibatches, with
    gradient-norm clipping; stops after an epoch whose last minibatch's approx KL exceeds `target_kl`.
    Returns the last minibatch's losses and the mean clip fraction. Raises FloatingPointError on a non-finite loss."""
    size = batch["actions"].shape[0]
    minibatch_size = size // args.num_minibatches
    clipfracs = []
    for _ in range(args.update_epochs):
        order = torch.as_tensor(minibatch_rng.permutation(size), device=batch["actions"].device)
        for start in range(0, size, minibatch_size):
            mb_inds = order[start : start + minibatch_size]
            loss, logs = ppo_loss(agent, {key: value[mb_inds] for key, value in batch.items()}, args)
            check_finite("loss", loss, global_step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm, foreach=True)
            optimizer.step()
            clipfracs.append(logs.pop("clipfrac"))
        if args.target_kl is not None and logs["losses/approx_kl"] > args.target_kl:
            break
    logs = {key: value.item() for key, value in logs.items()}
    logs["losses/clipfrac"] = torch.stack(clipfracs).mean().item()
    return logs


def flatten_batch(rollout: Rollout, advantages: torch.Tensor) -> dict:
    """(T, N, ...) -> (T*N, ...) training batch with the value targets `returns` = advantages + values."""
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
    return {"obs": flat(rollout.obs), "actions": flat(rollout.actions), "logprobs": flat(rollout.logprobs),
            "advantages": flat(advantages), "returns": flat(advantages + rollout.values),
            "values": flat(rollout.values)}  # fmt: skip


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """1 - Var[returns - values] / Var[returns] (nan when the returns are constant)."""
    var_y = returns.var(unbiased=False).item()
    return float("nan") if var_y == 0 else 1.0 - (returns - values).var(unbiased=False).item() / var_y


# ---------------------------------------------------------------------------------------------------------------------
# Plumbing: arguments, evaluation, checkpoints
# ---------------------------------------------------------------------------------------------------------------------
def validate_args(args: Args) -> None:
    """Raise ValueError naming the bad value and the allowed ones; called before anything is written."""
    check_finite_floats(args)  # first: a NaN passes the range checks below
    check_run_dir(args.run_dir)
    parse_env_id(args.env_id)
    checks = [
        (args.seed >= 0, f"--seed must be >= 0, got {args.seed}"),
        (args.num_envs >= 1, f"--num-envs must be >= 1, got {args.num_envs}"),
        (args.num_steps >= 1, f"--num-steps must be >= 1, got {args.num_steps}"),
        (args.total_timesteps >= batch_size(args),
         f"--total-timesteps must be >= --num-envs * --num-steps = {batch_size(args)} (one update), "
         f"got {args.total_timesteps}"),
        (1 <= args.num_minibatches <= batch_size(args) and batch_size(args) % args.num_minibatches == 0,
         f"--num-minibatches must divide --num-envs * --num-steps = {batch_size(args)}, got {args.num_minibatches}"),
        (args.update_epochs >= 1, f"--update-epochs must be >= 1, got {args.update_epochs}"),
        (args.learning_rate > 0, f"--learning-rate must be > 0, got {args.learning_rate}"),
        (0.0 <= args.gamma < 1.0, f"--gamma must be in [0, 1), got {args.gamma}"),
        (0.0 <= args.gae_lambda <= 1.0, f"--gae-lambda must be in [0, 1], got {args.gae_lambda}"),
        (args.clip_coef > 0, f"--clip-coef must be > 0, got {args.clip_coef}"),
        (args.ent_coef >= 0 and args.vf_coef >= 0,
         f"--ent-coef and --vf-coef must be >= 0, got {args.ent_coef}, {args.vf_coef}"),
        (args.max_grad_norm > 0, f"--max-grad-norm must be > 0, got {args.max_grad_norm}"),
        (args.target_kl is None or args.target_kl > 0, f"--target-kl must be > 0 (or None), got {args.target_kl}"),
        (args.torch_threads >= 0, f"--torch-threads must be >= 0 (0: torch's default), got {args.torch_threads}"),
        (args.eval_frequency > 0, f"--eval-frequency must be > 0, got {args.eval_frequency}"),
        (args.eval_episodes >= 1, f"--eval-episodes must be >= 1, got {args.eval_episodes}"),
        (args.final_eval_episodes >= 0, f"--final-eval-episodes must be >= 0, got {args.final_eval_episodes}"),
        (args.checkpoint_frequency >= 0,
         f"--checkpoint-frequency must be >= 0 (0: checkpoints only at the end and on a signal), "
         f"got {args.checkpoint_frequency}"),
        (args.run_name is None or (args.run_name.strip(".") != "" and "/" not in args.run_name),
         f"--run-name must be a folder name (not empty, '.' or '..', no '/'), got {args.run_name!r}"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    if args.track and importlib.util.find_spec("wandb") is None:
        raise ValueError("--track needs Weights and Biases: pip install wandb")
    if args.capture_video and importlib.util.find_spec("moviepy") is None:
        raise ValueError("--capture-video needs moviepy: pip install moviepy")
    check_memory(args)


def check_finite_floats(args) -> None:
    """Raise ValueError naming the first float argument that is NaN or infinite (range checks let NaN through, as
    every comparison with it is False, and inf through one-sided ones)."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {value}")


def check_run_dir(run_dir: str) -> None:
    """Raise ValueError unless `run_dir` is a folder or can be made one: the nearest part of it that exists must be a
    folder (not a file), so that the run folder can be made under it."""
    path = os.path.abspath(run_dir)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise ValueError(f"--run-dir must be a folder or a path where one can be made, got {run_dir!r} "
                         f"({path!r} is not a folder)")  # fmt: skip


def check_memory(args: Args) -> None:
    """Raise ValueError if the rollout (uint8 frames and its float32 minibatch copies) and the training and evaluation
    envs (ENV_COST; evaluation envs with --capture-video run in this process) would not fit in memory."""
    frames = batch_size(args) * 4 * 84 * 84
    rollout_bytes = frames + 4 * frames // args.num_minibatches * 3  # storage, one float minibatch, its activations
    eval_mode = "sync" if args.capture_video else args.vector_env_mode  # make_vector_env's rule
    env_bytes = args.num_envs * ENV_COST[args.vector_env_mode][0] + args.eval_episodes * ENV_COST[eval_mode][0]
    needed, limit = rollout_bytes + env_bytes, memory_limit()
    if needed > limit:
        gib = lambda n: f"{n / 2**30:.1f}"  # noqa: E731
        raise ValueError(f"--num-envs {args.num_envs} ({args.vector_env_mode}), --num-steps {args.num_steps} and "
                         f"--eval-episodes {args.eval_episodes} need about {gib(needed)} GiB (rollout "
                         f"{gib(rollout_bytes)}, envs {gib(env_bytes)}), more than the {gib(limit)} GiB this process "
                         "may use")  # fmt: skip


def memory_limit() -> int:
    """Bytes this process may use: physical memory, or its cgroup v2 limit (e.g. a Slurm job's --mem) if lower."""
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/self/cgroup") as f:
            group_path = next(line[3:].strip() for line in f if line.startswith("0::"))
        with open(f"/sys/fs/cgroup{group_path}/memory.max") as f:
            value = f.read().strip()
    except (OSError, StopIteration):
        return limit
    return min(limit, int(value)) if value.isdigit() else limit


def check_finite(name: str, value: torch.Tensor, global_step: int) -> None:
    """Raise FloatingPointError naming the loss and step if `value` is NaN or inf."""
    if not torch.isfinite(value).all():
        raise FloatingPointError(f"{name} is {value.item()} at global_step {global_step}")


@torch.inference_mode()
def evaluate(agent, eval_envs, seed: int, device, episodes: int, sampled: bool, prefix: str = "eval",
             report=None) -> dict:  # fmt: skip
    """`episodes` whole games (all lives, raw score, no-op starts, sticky actions as in training) in batches of
    `eval_envs.num_envs`: env i of batch k starts from `reset(seed=seed + k * num_envs + i)`. Actions: sampled from
    the policy with a generator seeded `seed + k * num_envs` (training's streams untouched) or greedy (argmax).
    `report(games ended so far)`, if given, is called at every step.

    Returns {f"{prefix}/return": mean score, f"{prefix}/length": mean length in agent steps}.
    """
    returns, lengths = [], []
    n = eval_envs.num_envs
    for batch_seed in range(seed, seed + episodes, n):
        generator = torch.Generator(device=device).manual_seed(batch_seed)
        obs, _ = eval_envs.reset(seed=batch_seed)
        score, length, running = np.zeros(n), np.zeros(n, np.int64), np.ones(n, bool)
        while running.any():
            if report is not None:
                report(len(returns) + int((~running).sum()))
            logits, _ = agent(torch.as_tensor(obs, device=device))
            actions = sample_actions(logits, generator) if sampled else logits.argmax(1)
            obs, rewards, terminated, truncated, _ = eval_envs.step(actions.cpu().numpy())
            score += rewards * running
            length += running
            running &= ~(terminated | truncated)
        returns.extend(score)
        lengths.extend(length)
    return {f"{prefix}/return": float(np.mean(returns[:episodes])),
            f"{prefix}/length": float(np.mean(lengths[:episodes]))}  # fmt: skip


SCRIPT = os.path.basename(__file__)
CHECKPOINT_FILE = "checkpoint.pt"
RESUMABLE_CHANGES = ("total_timesteps", "run_dir", "cuda")  # the only arguments a resumed run may change
EXIT_INTERRUPTED = 3  # stopped by SIGUSR1/SIGTERM after writing a checkpoint: the same command resumes the run
LOCK_FILE = ".lock"  # in the run folder: flock-ed by the process that trains in it, naming its host and pid
NO_FILE_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)  # flock where locks do not work


def atomic_torch_save(state: dict, path: str) -> None:
    """Write `state` so that a crash at any moment leaves the previous file or the new one, complete: temporary file,
    fsync, rename over the previous file, fsync of the folder."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def load_saved(path: str) -> dict:
    """Load a `model.pt` or `checkpoint.pt` written by this script (tensors and plain Python only).

    Raises:
        ValueError: if the file was saved by another script (a twin, say), naming that script.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    foreign = sorted(set(state["args"]) - set(Args.__dataclass_fields__))
    if state.get("script", SCRIPT) != SCRIPT or foreign:
        saved_by = state.get("script", f"another script (arguments {', '.join(foreign)})")
        raise ValueError(f"{path} was saved by {saved_by}, not {SCRIPT}: load it with that script")
    return state


def agent_state(args: Args, agent, optimizer) -> dict:
    """args, the agent's and the optimizer's state_dict."""
    return {"script": SCRIPT, "args": asdict(args), "agent": agent.state_dict(),
            "agent_optimizer": optimizer.state_dict()}  # fmt: skip


@dataclass
class LoopState:
    """The training loop's counters, saved in every checkpoint (`last_eval`: the latest evaluation record)."""

    global_step: int = 0
    update_idx: int = 0
    eval_idx: int = 0
    next_eval: int = 0
    next_checkpoint: int = 0
    last_eval: dict | None = None


def rng_states(minibatch_rng: np.random.Generator) -> dict:
    """Every random state the training draws from: Python, NumPy's legacy global and Generator, torch CPU and CUDA."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "minibatch": minibatch_rng.bit_generator.state,
    }


def set_rng_states(rngs: dict, minibatch_rng: np.random.Generator) -> None:
    """Inverse of `rng_states`."""
    random.setstate(rngs["python"])
    name, keys, pos, has_gauss, cached_gaussian = rngs["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(rngs["torch"])
    if rngs["cuda"] and torch.cuda.is_available():  # a run moved between CPU and GPU continues, though not exactly
        torch.cuda.set_rng_state_all(rngs["cuda"])
    minibatch_rng.bit_generator.state = rngs["minibatch"]


def training_checkpoint(args: Args, agent, optimizer, loop: LoopState, minibatch_rng, envs, state: EnvState) -> dict:
    """Everything a resumed run needs at an update boundary: agent, optimizer, counters, every RNG state and, on the
    gymnasium path, the games in progress (ale-py's vector env cannot save them: its games restart on resume, see
    `restart_seeds`)."""
    return {**agent_state(args, agent, optimizer), **asdict(loop), "rng": rng_states(minibatch_rng),
            "envs": state.snapshot(envs)}  # fmt: skip


def restore_checkpoint(state: dict, agent, optimizer, minibatch_rng) -> LoopState:
    """Inverse of `training_checkpoint`: load every state in place and return the loop's counters."""
    agent.load_state_dict(state["agent"])
    optimizer.load_state_dict(state["agent_optimizer"])
    set_rng_states(state["rng"], minibatch_rng)
    return LoopState(**{key: state[key] for key in LoopState.__dataclass_fields__})


def restart_seeds(seed: int, global_step: int, num_envs: int) -> list[int]:
    """Reset seeds of the training envs of a run resumed at `global_step`: distinct from every other run's and
    resume's, and the same for every resume at the same step."""
    return [int(s) % 2**31 for s in np.random.SeedSequence([seed, global_step]).generate_state(num_envs)]


def resume_state(args: Args, run_path: str) -> dict | None:
    """None for a new run (no folder yet), else the checkpoint to resume from, checked against `args`.

    Raises:
        ValueError: if the folder holds no checkpoint, or the checkpoint was saved by another script, with arguments
            that differ in anything but RESUMABLE_CHANGES, or past --total-timesteps.
    """
    if not os.path.exists(run_path):
        return None
    path = os.path.join(run_path, CHECKPOINT_FILE)
    if not os.path.isdir(run_path):
        raise ValueError(f"run folder {run_path!r} is not a folder: delete it or choose another --run-name")
    if not os.path.isfile(path):
        raise ValueError(f"run folder {run_path!r} exists and holds no {CHECKPOINT_FILE} to resume from (its run "
                         "ended before its first checkpoint, or it is not a run folder): delete it or choose another "
                         "--run-name to start afresh")  # fmt: skip
    state = load_saved(path)
    given = asdict(args)
    changed = [key for key in given if key not in RESUMABLE_CHANGES and state["args"].get(key) != given[key]]
    if changed:
        diffs = ", ".join(f"--{key.replace('_', '-')} {given[key]!r} (checkpoint: {state['args'].get(key)!r})"
                          for key in changed)  # fmt: skip
        raise ValueError(f"cannot resume {run_path!r} with other arguments: {diffs}; "
                         "only --total-timesteps, --run-dir and --cuda may change")  # fmt: skip
    if args.total_timesteps < state["global_step"]:
        raise ValueError(f"--total-timesteps must be >= the checkpoint's global_step {state['global_step']} to "
                         f"resume {run_path!r}, got {args.total_timesteps}")  # fmt: skip
    budget, schedules = state["args"]["total_timesteps"], budget_schedules(args)
    if schedules and args.total_timesteps != budget:
        raise ValueError(f"cannot resume {run_path!r} with --total-timesteps {args.total_timesteps} (checkpoint: "
                         f"{budget}): {' and '.join(schedules)} runs over --total-timesteps, so the rate would jump "
                         f"where the run resumes; rerun with --total-timesteps {budget}, or start a new run with the "
                         "new budget")  # fmt: skip
    return state


def is_complete(run_path: str, last_step: int) -> bool:
    """Whether the run already ended at `last_step`, its last global_step (its final_eval.json says so)."""
    try:
        with open(os.path.join(run_path, "final_eval.json")) as f:
            return json.load(f)["global_step"] >= last_step
    except FileNotFoundError:
        return False


def truncate_evals(run_path: str, eval_idx: int) -> None:
    """Drop the evaluation lines written after the checkpoint (eval_idx >= `eval_idx`): the resumed run redoes them."""
    path = os.path.join(run_path, "evals.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["eval_idx"] < eval_idx]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


class RunFolderBusy(ValueError):
    """Another process holds the run folder's lock: it trains in the folder now (exit 2, nothing touched)."""


def lock_run_folder(run_path: str, new: bool = False):
    """Lock the run folder for this process: `fcntl.flock(LOCK_EX | LOCK_NB)` on `<run_path>/.lock`, then this host
    and pid written into that file, the only place that names them. `new`: make the folder first. Returns the open
    lock file: keep it open while the run writes; the kernel drops the lock once no process holds that file open,
    however the holder ends (kill -9 too). Returns None, touching nothing, for a folder holding neither a lock file
    nor a checkpoint (no folder, or not a run's: resume_state says which). On a filesystem without working file locks
    (ENOLCK, ENOSYS, EOPNOTSUPP, EINVAL: Lustre without `-o flock`, NFS without lockd) it warns and returns None.

    Raises:
        RunFolderBusy: another process holds the lock (one line naming the folder and the holder).
        ValueError: with `new`, another process made the folder while this one started.
    """
    path = os.path.join(run_path, LOCK_FILE)
    if new:
        os.makedirs(run_path, exist_ok=True)
    elif not (os.path.isfile(path) or os.path.isfile(os.path.join(run_path, CHECKPOINT_FILE))):
        return None
    lock = open(path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = " ".join(lock.read().split()) or "no holder written yet"
        lock.close()
        raise RunFolderBusy(f"run folder {run_path!r} is in use by another process ({holder}): wait for it to end "
                            "or stop it, then rerun this command to resume the run") from None  # fmt: skip
    except OSError as err:
        lock.close()
        if err.errno not in NO_FILE_LOCKS:
            raise
        print(f"warning: run folder {run_path!r} cannot be locked ({err.strerror}): nothing stops a second process "
              "from writing into it (docs/cluster.md)", file=sys.stderr)  # fmt: skip
        return None
    if new and os.listdir(run_path) != [LOCK_FILE]:
        lock.close()
        raise ValueError(f"run folder {run_path!r} was made by another process while this one started; rerun this "
                         "command to resume it, or choose another --run-name")  # fmt: skip
    lock.truncate(0)
    lock.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
    lock.flush()
    os.fsync(lock.fileno())  # on NFS: visible to a process on another node that opens the file
    return lock


class StopRequest:
    """SIGUSR1, SIGTERM (Slurm's warning signal, preemption, time limit) and SIGINT (Ctrl-C), from the start of `main`.

    During set-up (until `training()`) there is nothing to checkpoint: a signal ends the process at once with
    EXIT_INTERRUPTED, after killing its child processes (async env workers) and deleting the run folder if this
    process made it (`make_run_folder`; a resumed run's folder and its checkpoint stay). From `training()` on, a
    SIGUSR1, a SIGTERM or a first SIGINT is recorded: the training loop stops at its next checkpoint boundary (the end
    of the episode, vector step or update), writes a checkpoint and exits with EXIT_INTERRUPTED. A second SIGINT
    aborts at once: it kills the child processes and ends the process by SIGINT, as an uncaught Ctrl-C does but
    without the traceback (the shell's exit status 130); the run folder keeps its last checkpoint. Forked children
    inherit the handler and ignore these signals (a Ctrl-C at a terminal reaches them too)."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __init__(self, run_name: str):
        self.run_name, self.signum, self.sigints, self.pid = run_name, None, 0, os.getpid()
        self.in_setup, self.new_folder, self.started = True, None, time.monotonic()
        for signum in self.SIGNALS:
            signal.signal(signum, self._handle)

    def make_run_folder(self, run_path: str):
        """`lock_run_folder(run_path, new=True)`, the signals held back until the folder is known to be this process's
        (made by it, not found), so that a signal during set-up deletes this folder and never another."""
        existed = os.path.lexists(run_path)
        signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        try:
            lock = lock_run_folder(run_path, new=True)
            self.new_folder = None if existed else run_path
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)
        return lock

    def training(self) -> None:
        """Set-up is over: from now on a signal is recorded, and the training loop checkpoints before it stops. Says
        so on stderr, with the time set-up took."""
        self.in_setup = False
        print(f"[{self.run_name}] set-up done in {clock(time.monotonic() - self.started)}: training",
              file=sys.stderr, flush=True)  # fmt: skip

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self.pid:  # an async env worker: its parent stops it
            return
        if self.in_setup:
            self._end_setup(signum)
        self.signum = signum
        if signum != signal.SIGINT:
            return
        self.sigints += 1
        if self.sigints == 1:
            os.write(2, b"SIGINT: the run stops at its next checkpoint boundary and writes a checkpoint; "
                        b"Ctrl-C again aborts at once without one\n")  # fmt: skip
            return
        os.write(2, b"SIGINT again: aborted without a new checkpoint\n")
        for child in multiprocessing.active_children():  # before they see their pipes close and print tracebacks
            child.kill()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)  # ends the process by SIGINT, as Python does after a KeyboardInterrupt
        os._exit(128 + signal.SIGINT)  # not reached

    def _end_setup(self, signum) -> None:
        """A signal during set-up: the process ends now with EXIT_INTERRUPTED, leaving no folder that it made."""
        for child in multiprocessing.active_children():  # async env workers
            child.kill()
        if self.new_folder is not None:
            shutil.rmtree(self.new_folder, ignore_errors=True)
            outcome = f"run folder {self.new_folder} deleted; the same command starts the run again"
        else:
            outcome = "the same command starts the run again, or resumes it from its last checkpoint"
        os.write(2, f"[{self.run_name}] stopped by {signal.Signals(signum).name} during set-up, before training: "
                    f"nothing to checkpoint; {outcome}\n".encode())  # fmt: skip
        os._exit(EXIT_INTERRUPTED)


class Interrupted(Exception):
    """Raised by the training loop once the checkpoint a StopRequest asked for is written."""


def evaluate_checkpoint(path: str, eval_episodes: int = 10, seed: int = 0, sampled: bool | None = None) -> dict:
    """Rebuild the agent saved in `model.pt` (`--save-model`) or `checkpoint.pt` and evaluate it on `eval_episodes`
    whole games (sampled actions unless the run used `--no-eval-sampled` or `sampled=False`).

    Usage: python -c "import ppo_atari as m; print(m.evaluate_checkpoint('runs/<run_name>/checkpoint.pt'))"
    Returns {"global_step", "eval/return", "eval/length"}. Raises ValueError if another script saved `path`.
    """
    state = load_saved(path)
    args = Args(**state["args"])
    eval_envs = make_vector_env(args.env_id, eval_episodes, args.vector_env_mode)
    agent = Agent(eval_envs.single_action_space.n)
    agent.load_state_dict(state["agent"])
    sampled = args.eval_sampled if sampled is None else sampled
    result = evaluate(agent, eval_envs, seed, "cpu", eval_episodes, sampled)
    eval_envs.close()
    return {"global_step": state["global_step"], **result}


def hparams_text(args: Args) -> str:
    return "|param|value|\n|-|-|\n" + "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def clock(seconds: float) -> str:
    """A duration as H:MM:SS."""
    s = max(0, round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


@contextlib.contextmanager
def setup_step(run_name: str, doing: str, estimate_s: float = 0.0, quiet_s: float = 5.0):
    """Say on stderr what set-up is doing while it takes more than `quiet_s` seconds: at once (with `estimate_s`)
    when the estimate says it will, else once it has; then every 30 s the time so far, and at the end the time it
    took. A SIGALRM timer rather than a thread: async env workers are forked during set-up, and a fork must not copy
    a lock that another thread holds."""
    start, said = time.monotonic(), []

    def say(*_) -> None:
        if said:
            text = f"{doing}: {clock(time.monotonic() - start)} so far"
        else:
            text = doing + (f", estimated {clock(estimate_s)}" if estimate_s else "") + "..."
        said.append(text)
        os.write(2, f"[{run_name}] {text}\n".encode())  # not print: this may interrupt a print of the main thread

    signal.signal(signal.SIGALRM, say)
    if estimate_s > quiet_s:
        say()
    signal.setitimer(signal.ITIMER_REAL, 30.0 if said else quiet_s, 30.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, lambda *_: None)  # a tick already on its way lands here (SIG_DFL would end us)
        if said:
            os.write(2, f"[{run_name}] {doing}: done in {clock(time.monotonic() - start)}\n".encode())


def report_finished(run_name: str, run_path: str, final: dict) -> None:
    """The last line of a run that ended: on stderr, its folder and its held-out result (without a held-out
    evaluation, `--final-eval-episodes 0`, the last periodic one)."""
    values = lambda prefix: ", ".join(f"{key[len(prefix) :]} {value:.4g}" for key, value in final.items()
                                      if key.startswith(prefix) and key != "heldout/episodes")  # noqa: E731  # fmt: skip
    if "heldout/episodes" in final:
        result = f"held-out {values('heldout/')} over {final['heldout/episodes']} episodes"
    else:
        result = f"no held-out evaluation; last eval {values('eval/')}"
    print(f"[{run_name}] finished at global_step {final['global_step']}: {result}; run folder {run_path}",
          file=sys.stderr, flush=True)  # fmt: skip


class Progress:
    """Progress lines on stderr (stdout carries only the JSON eval lines): the training's (`maybe_print`) and the
    held-out evaluation's (`evaluating`), each at most one per `interval_s` seconds. `metric` is the evaluation result
    that the training line shows (e.g. "eval/return")."""

    def __init__(self, run_name: str, total: int, metric: str, interval_s: float = 30.0):
        self.run_name, self.total, self.metric, self.interval_s = run_name, total, metric, interval_s
        self.start = time.time()
        self.previous, self.printed = None, None  # (time, global_step) of the last call; time of the last line
        self.eval_start = self.eval_printed = None

    def say(self, text: str) -> None:
        print(f"[{self.run_name}] {text}", file=sys.stderr, flush=True)

    def maybe_print(self, global_step: int, last_eval: dict | None) -> None:
        """Called at regular points of the loop (every update, or every 100 updates): from the second call on, at most
        one line per interval with the step, percent, steps/s since the previous call (the steady rate, without the
        set-up and the warm-up), the time since training started in this process, the ETA of the last step at the
        steady rate, and the last evaluation's `metric`."""
        now, previous = time.time(), self.previous
        self.previous = (now, global_step)
        if previous is None or (self.printed is not None and now - self.printed < self.interval_s):
            return
        self.printed, rate = now, (global_step - previous[1]) / max(now - previous[0], 1e-9)
        eta = clock((self.total - global_step) / rate) if rate > 0 else "unknown"
        last = "none yet" if last_eval is None else f"{self.metric[5:]} {last_eval[self.metric]:.4g}"
        speed = f"{rate:.{int(rate < 10)}f} steps/s"  # a decimal below 10
        self.say(f"step {global_step}/{self.total} ({100 * global_step / self.total:.0f}%), {speed}, "
                 f"elapsed {clock(now - self.start)}, ETA {eta}, last eval {last}")  # fmt: skip

    def evaluating(self, done: int, episodes: int) -> None:
        """The held-out evaluation's progress (`done` of its `episodes` have ended): a line at the first call, then at
        most one per interval with the episodes done, the time since it started and the ETA of its last episode at
        its rate so far."""
        now = time.time()
        if self.eval_start is None:
            self.eval_start = self.eval_printed = now
            self.say(f"held-out evaluation: {episodes} episodes...")
        elif 0 < done < episodes and now - self.eval_printed >= self.interval_s:
            self.eval_printed, elapsed = now, now - self.eval_start
            eta = clock(elapsed * (episodes - done) / done)
            self.say(f"held-out evaluation: {done}/{episodes} episodes, elapsed {clock(elapsed)}, ETA {eta}")


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------
def native_bf16_cpu(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether this machine's CPU multiplies bfloat16 in hardware: an x86 `flags` line with avx512_bf16 or amx_bf16,
    or an ARM `Features` line with bf16 (Linux's /proc/cpuinfo). None where that cannot be told (no such file)."""
    try:
        with open(cpuinfo) as f:
            lines = [line.split(":", 1) for line in f if line.startswith(("flags", "Features"))]
    except OSError:
        return None
    flags = {flag for _, value in (line for line in lines if len(line) == 2) for flag in value.split()}
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"}) if lines else None


def warn_emulated_bf16(bf16: bool, device: torch.device, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """One stderr line when --bf16 would run on a CPU without native bfloat16, where torch emulates it (measured 8x
    slower than float32 on an AVX2-only CPU, docs/BENCHMARKS.md). Returns whether it warned."""
    if not bf16 or device.type != "cpu" or native_bf16_cpu(cpuinfo) is not False:
        return False
    print(f"warning: --bf16 on a CPU without native bfloat16 (torch CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, no avx512_bf16/amx_bf16 flag): its products are emulated, "
          "measured 8x slower than float32 on such a CPU; drop --bf16 unless you test bfloat16 numerics",
          file=sys.stderr)  # fmt: skip
    return True


def main(args: Args) -> int:
    env_name = args.env_id.replace("/", "_")  # ALE/Breakout-v5 -> ALE_Breakout-v5
    args.run_name = args.run_name or f"{env_name}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_path = os.path.join(args.run_dir, args.run_name)
    stop = StopRequest(args.run_name)  # first: a signal during set-up ends the process at once, leaving nothing behind
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    warn_emulated_bf16(args.bf16, device)
    try:
        lock = lock_run_folder(run_path)  # a run's folder: locked before its checkpoint is read (None: none yet)
        with setup_step(args.run_name, f"reading {run_path}/{CHECKPOINT_FILE}"):
            saved = resume_state(args, run_path)  # read and checked before anything is written
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if saved is not None and is_complete(run_path, num_iterations(args) * batch_size(args)):
        print(f"run {run_path} already ended at global_step {saved['global_step']}; nothing to do", file=sys.stderr)
        return 0
    with setup_step(args.run_name, f"making {args.num_envs} {args.env_id} envs ({args.vector_env_mode})",
                    args.num_envs * ENV_COST[args.vector_env_mode][1]):  # fmt: skip
        envs = make_vector_env(args.env_id, args.num_envs, args.vector_env_mode)
    agent = Agent(envs.single_action_space.n).to(device)  # before the run folder: a failure here leaves nothing
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    params = {"agent_params": num_params(agent)}
    if saved is None:
        try:
            lock = stop.make_run_folder(run_path)  # made and locked before anything is written in it
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        with open(os.path.join(run_path, "config.json"), "w") as f:
            json.dump({"run_name": args.run_name, "args": asdict(args), **params}, f, indent=2)
    eval_mode = "sync" if args.capture_video else args.vector_env_mode  # make_vector_env's rule
    with setup_step(args.run_name, f"making {args.eval_episodes} evaluation envs ({eval_mode})",
                    args.eval_episodes * ENV_COST[eval_mode][1]):  # fmt: skip
        eval_envs = make_vector_env(args.env_id, args.eval_episodes, args.vector_env_mode,
                                    capture_video=args.capture_video, video_dir=f"{run_path}/videos")  # fmt: skip
    minibatch_rng = np.random.default_rng(np.random.SeedSequence(args.seed))
    if saved is None:
        loop = LoopState(next_eval=args.eval_frequency, next_checkpoint=args.checkpoint_frequency)
    else:
        loop = restore_checkpoint(saved, agent, optimizer, minibatch_rng)
        truncate_evals(run_path, loop.eval_idx)
        games = "restart (ale-py's vector env)" if saved["envs"] is None else "continue"
        print(f"[{args.run_name}] resuming from global_step {loop.global_step} (eval_idx {loop.eval_idx}); the games "
              f"in progress {games}", file=sys.stderr, flush=True)  # fmt: skip
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, sync_tensorboard=True, config=vars(args), name=args.run_name,
                   save_code=True, dir=run_path)  # fmt: skip
    # a resumed run purges the events its previous process logged after the checkpoint (TensorBoard's purge_step)
    writer = SummaryWriter(run_path, purge_step=loop.global_step + 1 if loop.global_step else None)
    if loop.global_step == 0:
        writer.add_text("hyperparameters", hparams_text(args))
    stop.training()  # set-up is over: from here on a signal is answered with a checkpoint
    try:
        final = train(args, envs, eval_envs, agent, optimizer, writer, run_path, device, loop, minibatch_rng, stop,
                      None if saved is None else saved["envs"])  # fmt: skip
    except FloatingPointError as err:
        print(f"error: non-finite loss: {err}; run folder kept at {run_path}", file=sys.stderr)
        return 1
    except Interrupted as err:
        print(f"[{args.run_name}] {err}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        writer.close()
        envs.close()
        eval_envs.close()
    with open(os.path.join(run_path, "final_eval.json"), "w") as f:
        json.dump({"run_name": args.run_name, "args": asdict(args), **params, **final}, f, indent=2)
    report_finished(args.run_name, run_path, final)
    if lock is not None:
        lock.close()  # the folder is free for the next process (on any other return, the process's end frees it)
    return 0


def train(args, envs, eval_envs, agent, optimizer, writer, run_path, device, loop: LoopState, minibatch_rng, stop,
          saved_envs: dict | None = None):  # fmt: skip
    """The PPO loop, from `loop`'s counters to the last update. Returns the final evaluation record (also printed as a
    JSON line). Raises Interrupted after the checkpoint that a SIGUSR1/SIGTERM asked for."""
    last_step = num_iterations(args) * batch_size(args)
    progress = Progress(args.run_name, last_step, "eval/return")
    start_time, start_step = time.time(), loop.global_step
    # a new run seeds env i with seed + i; a resumed one resets from fresh seeds (see restart_seeds), then restores its
    # games on the gymnasium path
    seeds = args.seed if loop.global_step == 0 else restart_seeds(args.seed, loop.global_step, args.num_envs)
    if isinstance(seeds, list) and args.vector_env_mode == "ale":
        seeds = np.asarray(seeds)  # ale-py takes an int or an array, gymnasium an int or a list
    obs, infos = envs.reset(seed=seeds)
    state = EnvState(obs, infos.get("lives"))
    if saved_envs is not None:  # gymnasium path: the games in progress continue exactly
        state.restore(envs, saved_envs)
    rollout = new_rollout(args.num_steps, args.num_envs, envs.single_observation_space.shape, device)
    while loop.global_step < last_step:
        if args.anneal_lr:  # linear decay over the updates (Huang et al. 2022, detail 4)
            optimizer.param_groups[0]["lr"] = (1.0 - loop.update_idx / num_iterations(args)) * args.learning_rate
        next_value, games = collect_rollout(agent, envs, state, rollout, args, device)
        for t, episode_return, episode_length in games:  # at the global step the game ended
            writer.add_scalar("charts/episodic_return", episode_return, loop.global_step + (t + 1) * args.num_envs)
            writer.add_scalar("charts/episodic_length", episode_length, loop.global_step + (t + 1) * args.num_envs)
        loop.global_step += batch_size(args)
        advantages = compute_gae(rollout.rewards, rollout.values, rollout.dones, next_value, args.gamma,
                                 args.gae_lambda)  # fmt: skip
        batch = flatten_batch(rollout, advantages)
        logs = ppo_update(agent, optimizer, batch, args, minibatch_rng, loop.global_step)
        loop.update_idx += 1
        logs["losses/explained_variance"] = explained_variance(batch["values"], batch["returns"])
        logs["charts/learning_rate"] = optimizer.param_groups[0]["lr"]
        sps = int((loop.global_step - start_step) / (time.time() - start_time))
        for key, value in {**logs, "charts/SPS": sps}.items():
            writer.add_scalar(key, value, loop.global_step)
        progress.maybe_print(loop.global_step, loop.last_eval)
        if loop.global_step >= loop.next_eval or loop.global_step >= last_step:
            loop.last_eval = run_evaluation(args, agent, optimizer, eval_envs, loop, writer, run_path, device)
            loop.eval_idx += 1
            loop.next_eval = (loop.global_step // args.eval_frequency + 1) * args.eval_frequency
        maybe_checkpoint(args, agent, optimizer, loop, minibatch_rng, (envs, state), run_path, stop, last_step)
    heldout = heldout_evaluation(args, agent, eval_envs, writer, loop.global_step, device, progress)
    return {**loop.last_eval, **heldout}


def maybe_checkpoint(args, agent, optimizer, loop: LoopState, minibatch_rng, env_state, run_path, stop, last_step):
    """At an update boundary: write checkpoint.pt when one is due (every `checkpoint_frequency` steps, at the end, or
    on a signal). Raises Interrupted after writing it for a signal."""
    periodic = args.checkpoint_frequency > 0 and loop.global_step >= loop.next_checkpoint
    if not (periodic or stop.signum or loop.global_step >= last_step):
        return
    if args.checkpoint_frequency > 0:
        loop.next_checkpoint = (loop.global_step // args.checkpoint_frequency + 1) * args.checkpoint_frequency
    path = os.path.join(run_path, CHECKPOINT_FILE)
    atomic_torch_save(training_checkpoint(args, agent, optimizer, loop, minibatch_rng, *env_state), path)
    if stop.signum:
        raise Interrupted(f"stopped by {signal.Signals(stop.signum).name} at global_step {loop.global_step}: "
                          f"checkpoint written to {path}; to resume, rerun the same command with --run-name "
                          f"{args.run_name}")  # fmt: skip


def set_video_trigger(eval_envs) -> None:
    """With --capture-video: record the first episode of the next evaluation (env 0 of its first batch)."""
    first = iter([True])
    eval_envs.envs[0].set_wrapper_attr("episode_trigger", lambda _: next(first, False))


def heldout_evaluation(args, agent, eval_envs, writer, global_step: int, device, progress: Progress) -> dict:
    """The final evaluation on `final_eval_episodes` games whose seeds no periodic evaluation uses
    (seed + 2_000_000 + k): logged as `heldout/*` and printed as one JSON line without `eval_idx`."""
    if args.final_eval_episodes == 0:
        return {}
    if args.capture_video:
        set_video_trigger(eval_envs)
    result = evaluate(agent, eval_envs, args.seed + 2_000_000, device, args.final_eval_episodes, args.eval_sampled,
                      "heldout", lambda done: progress.evaluating(done, args.final_eval_episodes))  # fmt: skip
    for key, value in result.items():
        writer.add_scalar(key, value, global_step)
    record = {"global_step": global_step, **result, "heldout/episodes": args.final_eval_episodes}
    print(json.dumps(record), flush=True)
    return record


def run_evaluation(args, agent, optimizer, eval_envs, loop: LoopState, writer, run_path, device) -> dict:
    """Evaluate, log to TensorBoard, print the JSON line, append it to evals.jsonl, save the model if asked."""
    if args.capture_video:
        set_video_trigger(eval_envs)
    result = evaluate(agent, eval_envs, args.seed + 1_000_000, device, args.eval_episodes, args.eval_sampled)
    for key, value in result.items():
        writer.add_scalar(key, value, loop.global_step)
    record = {"eval_idx": loop.eval_idx, "global_step": loop.global_step, **result}
    line = json.dumps(record)
    print(line, flush=True)
    with open(os.path.join(run_path, "evals.jsonl"), "a") as f:
        f.write(line + "\n")
    if args.save_model:
        atomic_torch_save({**agent_state(args, agent, optimizer), "global_step": loop.global_step},
                          os.path.join(run_path, "model.pt"))  # fmt: skip
    return record


if __name__ == "__main__":
    args = tyro.cli(Args)
    try:
        validate_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(args))
