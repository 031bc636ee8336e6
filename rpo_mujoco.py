# docs and experiment results: docs/ppo_rpo.md
"""RPO on gymnasium MuJoCo v5 (and any env with Box observations and actions): CleanRL's `rpo_continuous_action.py`
algorithm and defaults on gymnasium 1.x, with truncation bootstrapping, observation and reward normalisation whose
statistics are saved with the model and frozen at evaluation, held-out evaluation and exact resume.

RPO: Rahman and Xue 2022, "Robust Policy Optimization in Deep Reinforcement Learning" (arXiv:2212.07536), Algorithm 1:
PPO whose update evaluates log pi(a|s) under N(mu(s) + z, sigma), z ~ U(-alpha, alpha) per action dimension.
PPO: Schulman et al. 2017 (arXiv:1707.06347), Eq. 7, 9, 11-12; details as in Huang et al. 2022, "The 37
Implementation Details of Proximal Policy Optimization" (continuous-action details), i.e. CleanRL's PPO.
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
import shutil
import signal
import socket
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Literal, NamedTuple

import gymnasium as gym
import mujoco
import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    """Train RPO (CleanRL's algorithm and defaults) on a gymnasium MuJoCo v5 task or any Box-action env."""

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
    `<run_dir>/<run_name>/videos` (headless: MUJOCO_GL=egl)"""
    save_model: bool = False
    """if toggled, the agent and its normalisation statistics are saved to `<run_dir>/<run_name>/model.pt` at every
    evaluation"""
    checkpoint_frequency: int = 200_000
    """environment steps between training checkpoints (`<run_dir>/<run_name>/checkpoint.pt`), written at the first
    update boundary past each multiple, at the end, and on SIGUSR1/SIGTERM; 0: only the latter"""
    run_dir: str = "runs"
    """the folder that holds one sub-folder per run"""
    run_name: str | None = None
    """the run folder's name (default `{env_id}__{exp_name}__{seed}__{unix_time}`); if `<run_dir>/<run_name>/` holds a
    checkpoint, the run resumes from it"""

    # Algorithm specific arguments
    env_id: str = "HalfCheetah-v5"
    """a gymnasium env with Box observations and actions, e.g. the MuJoCo v5 tasks HalfCheetah, Hopper, Walker2d,
    Ant, Humanoid"""
    total_timesteps: int = 8_000_000
    """total environment steps (transitions, summed over the `num_envs` environments); the run stops at the last
    whole update, `(total_timesteps // (num_envs * num_steps)) * num_envs * num_steps`"""
    num_envs: int = 1
    """the number of parallel environments"""
    vector_env_mode: Literal["sync", "async"] = "sync"
    """gymnasium vector env: `sync` steps the environments in this process, `async` in subprocesses"""
    learning_rate: float = 3e-4
    """the learning rate of the optimizer"""
    num_steps: int = 2048
    """the number of steps to run in each environment per policy rollout"""
    anneal_lr: bool = True
    """if toggled, the learning rate falls linearly to 0 over the updates"""
    gamma: float = 0.99
    """the discount factor gamma (also of the reward normalisation's return)"""
    gae_lambda: float = 0.95
    """the lambda for the generalized advantage estimation"""
    num_minibatches: int = 32
    """the number of mini-batches per epoch (must divide num_envs * num_steps)"""
    update_epochs: int = 10
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """if toggled, advantages are normalised per minibatch"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient"""
    clip_vloss: bool = True
    """if toggled, the value loss is clipped as the surrogate (PPO2's value clipping)"""
    ent_coef: float = 0.0
    """coefficient of the entropy"""
    vf_coef: float = 0.5
    """coefficient of the value function"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping"""
    target_kl: float | None = None
    """the target KL divergence threshold: an update stops after the epoch whose last minibatch exceeds it"""
    rpo_alpha: float = 0.5
    """RPO's alpha: the update perturbs the action mean by z ~ U(-alpha, alpha) per dimension (0: plain PPO)"""
    torch_threads: int = 1
    """torch's intra-op threads (0: torch's default); these 64-unit networks run fastest on one"""
    eval_frequency: int = 200_000
    """environment steps between evaluations, at the first update boundary past each multiple (a final evaluation
    always runs at the end)"""
    eval_episodes: int = 10
    """deterministic evaluation episodes per evaluation (one evaluation environment each)"""
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
# Environment: gymnasium MuJoCo with a savable state; normalisation of observations and rewards
# ---------------------------------------------------------------------------------------------------------------------
class SavableMujoco(gym.Wrapper):
    """Outermost wrapper: the complete state of a MuJoCo env as `state`, a property so that vector envs can
    `get_attr`/`set_attr` it: the env's whole `MjData` (the solver's warm start too), its `np_random` (reset noise)
    and the time limit's step count (the v5 envs and gym.make's other wrappers hold no other episode state: their
    attributes are settings). A restored env continues its episode exactly. For a non-MuJoCo env only `np_random` and
    the step count are saved (its episodes restart on resume).

    Why the whole MjData: MuJoCo's state (`mj_getState`, even its largest, mjSTATE_INTEGRATION) holds what the next step
    integrates from, not what `mj_step` derived on its way (body positions `xpos`, `xipos`, inertias `cinert`, contact
    forces `cfrc_ext`, sensors, contacts), and the envs read those: Ant's reward takes the torso's `xpos` before the
    step, Humanoid's the centre of mass from `xipos`, both computed by the previous `mj_step` at the positions of its
    last substep. After `mj_setState` they are the reset's; `mj_forward` recomputes them at the current positions
    (close, not bit-exact). The whole MjData restores them all, with no list of arrays per env to keep: MuJoCo's own
    serialisation (the bytes `pickle` writes, read back without pickle) copied into the env's MjData with `mj_copyData`
    (the object the renderer holds stays). With a copy of the model, textures included, it takes 0.2 to 0.7 MB, so it is
    zlib-compressed: each env adds 2 KB (InvertedPendulum) to 34 KB (Humanoid) to checkpoint.pt, where the integration
    state added 0.2 to 1.6 KB. The format is MuJoCo's: a checkpoint resumes under the mujoco version that wrote it."""

    def _time_limit(self):
        env = self.env
        while isinstance(env, gym.Wrapper) and not isinstance(env, gym.wrappers.TimeLimit):
            env = env.env
        return env if isinstance(env, gym.wrappers.TimeLimit) else None

    @property
    def state(self) -> dict:
        base, time_limit = self.unwrapped, self._time_limit()
        state = {"np_random": base.np_random.bit_generator.state,
                 "elapsed_steps": time_limit._elapsed_steps if time_limit else None}  # fmt: skip
        if isinstance(getattr(base, "data", None), mujoco.MjData):
            mjdata = bytearray(zlib.compress(base.data.__getstate__()))
            state["mujoco"], state["mjdata"] = mujoco.__version__, torch.frombuffer(mjdata, dtype=torch.uint8)
        return state

    @state.setter
    def state(self, state: dict) -> None:
        base, time_limit = self.unwrapped, self._time_limit()
        base.np_random.bit_generator.state = state["np_random"]
        if time_limit is not None:
            time_limit._elapsed_steps = state["elapsed_steps"]
        if "mjdata" in state:
            if state["mujoco"] != mujoco.__version__:
                raise ValueError(f"the env states were saved by mujoco {state['mujoco']}, this is mujoco "
                                 f"{mujoco.__version__}: resume with mujoco {state['mujoco']}")  # fmt: skip
            saved = mujoco.MjData.__new__(mujoco.MjData)  # MjData's pickle protocol, without pickle
            saved.__setstate__(zlib.decompress(state["mjdata"].numpy().tobytes()))
            mujoco.mj_copyData(base.data, base.model, saved)
        elif "physics" in state:  # a checkpoint written before the whole MjData was: continues, not bit for bit
            mujoco.mj_setState(base.model, base.data, state["physics"].numpy(), mujoco.mjtState.mjSTATE_INTEGRATION)
            mujoco.mj_forward(base.model, base.data)


def make_env(env_id: str, capture_video: bool = False, video_dir: str = ""):
    def thunk():
        if capture_video:
            env = gym.make(env_id, render_mode="rgb_array")
            env = gym.wrappers.RecordVideo(env, video_dir, episode_trigger=lambda _: False, disable_logger=True)
        else:
            env = gym.make(env_id)
        return SavableMujoco(env)

    return thunk


# One env's memory in bytes and its creation time in seconds on one core, on Humanoid-v5, the largest of the MuJoCo v5
# tasks (docs/BENCHMARKS.md, "Set-up cost"): `sync` in this process, `async` a worker process of its own (its
# private memory once a garbage collection in it has copied the pages it shared with this process)
ENV_COST = {"sync": (1.5 * 2**20, 0.008), "async": (55 * 2**20, 0.055)}


def make_vector_env(env_id: str, num_envs: int, mode: str, capture_video: bool = False, video_dir: str = ""):
    """`num_envs` envs with raw observations and rewards (normalisation is the training loop's), autoreset in the same
    step: the final observation of an ended episode is in `infos["final_obs"]`."""
    thunks = [make_env(env_id, capture_video and i == 0, video_dir) for i in range(num_envs)]
    vector_cls = gym.vector.AsyncVectorEnv if mode == "async" else gym.vector.SyncVectorEnv
    return vector_cls(thunks, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


class RunningMeanStd:
    """Running mean and variance of batches (Chan et al. 1979's parallel update), float64, as gymnasium's
    `RunningMeanStd`; `state_dict` and `load_state_dict` save and restore it exactly."""

    def __init__(self, shape=(), epsilon: float = 1e-4):
        self.mean, self.var, self.count = np.zeros(shape), np.ones(shape), epsilon

    def update(self, x: np.ndarray) -> None:
        """Add a batch x of shape (batch, *shape)."""
        batch_count = x.shape[0]
        batch_mean, batch_var = (x[0], 0.0) if batch_count == 1 else (x.mean(0), x.var(0))  # one env: no NumPy calls
        delta, total = batch_mean - self.mean, self.count + batch_count
        self.mean = self.mean + delta * batch_count / total
        m2 = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total
        self.var, self.count = m2 / total, total

    def state_dict(self) -> dict:
        return {"mean": torch.tensor(np.asarray(self.mean)), "var": torch.tensor(np.asarray(self.var)),
                "count": float(self.count)}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"].numpy().copy(), state["var"].numpy().copy(), state["count"]


class Normalizer:
    """CleanRL's NormalizeObservation + clip(-10, 10) and NormalizeReward + clip(-10, 10), as state of the training
    loop rather than env wrappers, so that the final observations of truncated episodes are normalised the same way
    and the statistics are saved in model.pt and checkpoint.pt.

    Observations: (obs - mean) / sqrt(var + 1e-8) with the running statistics of every observation seen.
    Rewards: r / sqrt(Var[G] + 1e-8), G the running discounted return G <- gamma G (1 - terminated) + r per env.
    """

    def __init__(self, obs_shape, num_envs: int, gamma: float, clip: float = 10.0, epsilon: float = 1e-8):
        self.obs_rms, self.return_rms = RunningMeanStd(obs_shape), RunningMeanStd(())
        self.returns, self.gamma, self.clip, self.epsilon = np.zeros(num_envs), gamma, clip, epsilon

    def obs(self, obs: np.ndarray, update: bool = True) -> np.ndarray:
        """(batch, obs_dim) raw -> normalised float32; `update=False` freezes the statistics (evaluation)."""
        if update:
            self.obs_rms.update(obs)
        normalised = (obs - self.obs_rms.mean) / np.sqrt(self.obs_rms.var + self.epsilon)
        return np.clip(normalised, -self.clip, self.clip).astype(np.float32)

    def rewards(self, rewards: np.ndarray, terminated: np.ndarray) -> np.ndarray:
        """(num_envs,) raw rewards -> scaled and clipped float32, updating the return statistics."""
        self.returns = self.returns * self.gamma * (1 - terminated) + rewards
        self.return_rms.update(self.returns)
        scaled = rewards / np.sqrt(self.return_rms.var + self.epsilon)
        return np.clip(scaled, -self.clip, self.clip).astype(np.float32)

    def state_dict(self) -> dict:
        return {"obs_rms": self.obs_rms.state_dict(), "return_rms": self.return_rms.state_dict(),
                "returns": torch.from_numpy(self.returns.copy())}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.obs_rms.load_state_dict(state["obs_rms"])
        self.return_rms.load_state_dict(state["return_rms"])
        self.returns = state["returns"].numpy().copy()


# ---------------------------------------------------------------------------------------------------------------------
# Networks: 64-64 tanh MLPs for the action mean and the value, a state-independent log std (CleanRL's Agent)
# ---------------------------------------------------------------------------------------------------------------------
def layer_init(layer: nn.Module, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Module:
    """Orthogonal weights with gain `std`, constant bias (Huang et al. 2022, detail 2)."""
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


def mlp(in_dim: int, out_dim: int, out_std: float) -> nn.Sequential:
    return nn.Sequential(layer_init(nn.Linear(in_dim, 64)), nn.Tanh(), layer_init(nn.Linear(64, 64)), nn.Tanh(),
                         layer_init(nn.Linear(64, out_dim), std=out_std))  # fmt: skip


class Agent(nn.Module):
    """Gaussian policy N(actor_mean(x), exp(actor_logstd)) and value critic(x), CleanRL's parameter names.

    Input x: (batch, obs_dim) normalised observations. Output: mean (batch, act_dim), log std (batch, act_dim),
    value (batch,).
    """

    def __init__(self, obs_dim: int, act_dim: int):
        super().__init__()
        self.critic = mlp(obs_dim, 1, 1.0)
        self.actor_mean = mlp(obs_dim, act_dim, 0.01)
        self.actor_logstd = nn.Parameter(torch.zeros(1, act_dim))

    def forward(self, x: torch.Tensor):
        mean = self.actor_mean(x)
        return mean, self.actor_logstd.expand_as(mean), self.critic(x).squeeze(1)


class NumpyPolicy:
    """A float32 NumPy copy of the agent for acting, one (num_envs, obs_dim) batch per env step: at that size torch's
    per-operation dispatch costs more than the arithmetic (the rollout's network passes take about a fifth of their
    torch time). Made at the start of every rollout; `__call__` returns mean (N, act_dim) and value (N,)."""

    def __init__(self, agent: Agent):
        layers = lambda seq: [(m.weight.detach().cpu().numpy().T.copy(), m.bias.detach().cpu().numpy().copy())  # noqa: E731
                              for m in seq if isinstance(m, nn.Linear)]  # fmt: skip
        self.actor, self.critic = layers(agent.actor_mean), layers(agent.critic)
        self.log_std = agent.actor_logstd.detach().cpu().numpy()[0]  # (act_dim,)

    @staticmethod
    def _mlp(layers, x: np.ndarray) -> np.ndarray:
        for weight, bias in layers[:-1]:
            x = np.tanh(x @ weight + bias)
        return x @ layers[-1][0] + layers[-1][1]

    def __call__(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._mlp(self.actor, obs), self._mlp(self.critic, obs)[:, 0]


# ---------------------------------------------------------------------------------------------------------------------
# Algorithm: Gaussian policy, rollout storage, GAE, the RPO update
# ---------------------------------------------------------------------------------------------------------------------
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_log_prob(actions, mean, log_std) -> torch.Tensor:
    """log N(actions; mean, exp(log_std)) summed over action dimensions: (batch, act_dim) -> (batch,)."""
    return (-0.5 * ((actions - mean) / log_std.exp()) ** 2 - log_std - LOG_SQRT_2PI).sum(1)


def gaussian_entropy(log_std: torch.Tensor) -> torch.Tensor:
    """Entropy of N(., exp(log_std)) summed over action dimensions: (batch, act_dim) -> (batch,)."""
    return (0.5 + LOG_SQRT_2PI + log_std).sum(1)


class Rollout(NamedTuple):
    """One rollout of `num_steps` vector steps; every array is float32 (num_steps, num_envs, ...)."""

    obs: np.ndarray  # (T, N, obs_dim) normalised observation each action was taken in
    actions: np.ndarray  # (T, N, act_dim) sampled actions, before clipping to the action bounds
    logprobs: np.ndarray  # (T, N) log pi_old(a_t|s_t)
    rewards: np.ndarray  # (T, N) normalised reward, + gamma V(final obs) where the episode was truncated
    dones: np.ndarray  # (T, N) 1.0 where the episode ended after step t (termination or truncation)
    values: np.ndarray  # (T, N) V_old(s_t)


def new_rollout(num_steps: int, num_envs: int, obs_dim: int, act_dim: int) -> Rollout:
    zeros = lambda *shape: np.zeros((num_steps, num_envs, *shape), np.float32)  # noqa: E731
    return Rollout(zeros(obs_dim), zeros(act_dim), zeros(), zeros(), zeros(), zeros())


def compute_gae(rewards, values, dones, next_value, gamma: float, gae_lambda: float) -> np.ndarray:
    """Generalized advantage estimates (Schulman et al. 2016, Eq. 16; PPO paper Eq. 11-12), by the backward recursion
    A_t = delta_t + gamma lambda (1 - d_t) A_{t+1}, delta_t = r_t + gamma (1 - d_t) V_{t+1} - V_t.

    rewards, values, dones: (T, N), `dones[t]` = 1 where the episode ended after step t (a truncated episode's
    bootstrap value is already in its reward); next_value: (N,) V of the observation after the last step.
    Returns advantages (T, N); the value targets are advantages + values.
    """
    advantages = np.zeros_like(rewards)
    last_gae = np.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        next_values = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        not_done = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_values * not_done - values[t]
        advantages[t] = last_gae = delta + gamma * gae_lambda * not_done * last_gae
    return advantages


class EnvState:
    """What the training loop carries between vector steps: the normalised observations (N, obs_dim), the
    normalisation statistics, and the raw return and length of each env's episode in progress."""

    def __init__(self, obs: np.ndarray, normalizer: Normalizer):
        self.obs, self.normalizer = obs, normalizer
        self.returns, self.lengths = np.zeros(len(obs)), np.zeros(len(obs), np.int64)

    def snapshot(self, envs) -> dict:
        """Everything needed to continue the episodes in progress exactly."""
        return {"states": list(envs.get_attr("state")), "obs": torch.from_numpy(self.obs.copy()),
                "returns": torch.from_numpy(self.returns.copy()),
                "lengths": torch.from_numpy(self.lengths.copy())}  # fmt: skip

    def restore(self, envs, snapshot: dict) -> None:
        envs.set_attr("state", snapshot["states"])
        self.obs = snapshot["obs"].numpy().copy()
        self.returns, self.lengths = snapshot["returns"].numpy().copy(), snapshot["lengths"].numpy().copy()


def env_step(envs, actions: np.ndarray, state: EnvState):
    """One vector step with the actions clipped to the action bounds (CleanRL's ClipAction). Returns the normalised
    rewards (N,), dones (N,), the indices of the episodes cut by the time limit (to bootstrap), their normalised
    final observations, and the raw (return, length) of the episodes that ended."""
    space = envs.single_action_space
    obs, raw_rewards, terminated, truncated, infos = envs.step(np.clip(actions, space.low, space.high))
    done = terminated | truncated
    truncated_idx = np.flatnonzero(truncated & ~terminated)
    final_obs = None
    if len(truncated_idx):
        raw_final = np.stack([infos["final_obs"][i] for i in truncated_idx])
        final_obs = state.normalizer.obs(raw_final, update=False)
    rewards = state.normalizer.rewards(raw_rewards, terminated)
    state.obs = state.normalizer.obs(obs)
    state.returns += raw_rewards
    state.lengths += 1
    ended = [(float(state.returns[i]), int(state.lengths[i])) for i in np.flatnonzero(done)]
    state.returns[done], state.lengths[done] = 0.0, 0
    return rewards, done, truncated_idx, final_obs, ended


def collect_rollout(agent, envs, state: EnvState, rollout: Rollout, args: Args):
    """Fill `rollout` with `num_steps` vector steps of the current policy; the Gaussian noise, (T, N, act_dim), is
    drawn from torch's generator at the start.

    Crucial (CleanRL issue #198): an episode cut by the time limit is not terminal; its last reward gets
    gamma * V(true final observation), taken from `infos["final_obs"]` since autoreset already replaced it.
    Returns V(observation after the last step) (N,) and (step t, return, length) of every episode that ended.
    """
    policy, ended = NumpyPolicy(agent), []
    noise = torch.randn(*rollout.actions.shape).numpy()
    log_std = policy.log_std.astype(np.float64)
    for t in range(args.num_steps):
        mean, value = policy(state.obs)
        rollout.obs[t], rollout.values[t] = state.obs, value
        rollout.actions[t] = mean + np.exp(policy.log_std) * noise[t]
        rollout.logprobs[t] = (-0.5 * noise[t] ** 2 - log_std - LOG_SQRT_2PI).sum(1)  # log N(a; mean, std)
        rewards, done, truncated_idx, final_obs, episodes = env_step(envs, rollout.actions[t], state)
        if final_obs is not None:
            rewards[truncated_idx] += args.gamma * policy(final_obs)[1]
        rollout.rewards[t], rollout.dones[t] = rewards, done
        ended += [(t, *episode) for episode in episodes]
    return policy(state.obs)[1], ended


def rpo_loss(agent, mb: dict, args: Args):
    """RPO's loss on one minibatch: PPO's (Eq. 9 with the clipped surrogate, Eq. 7, and PPO2's clipped value loss)
    with log pi(a|s) under N(mean + z, std), z ~ U(-rpo_alpha, rpo_alpha) (Rahman and Xue 2022, Algorithm 1).
    Returns (loss, logs): logs are the detached approx-KL estimators (Schulman's k1 and k3) and clip fraction."""
    mean, log_std, new_value = agent(mb["obs"])
    z = torch.empty_like(mean).uniform_(-args.rpo_alpha, args.rpo_alpha)
    new_logprob, entropy = gaussian_log_prob(mb["actions"], mean + z, log_std), gaussian_entropy(log_std)
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


def rpo_update(agent, optimizer, batch: dict, args: Args, minibatch_rng: np.random.Generator, global_step: int):
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
            loss, logs = rpo_loss(agent, {key: value[mb_inds] for key, value in batch.items()}, args)
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


def flatten_batch(rollout: Rollout, advantages: np.ndarray, device) -> dict:
    """(T, N, ...) arrays -> (T*N, ...) tensors, the training batch with the value targets `returns` = advantages +
    values."""
    flat = lambda x: torch.as_tensor(x.reshape(-1, *x.shape[2:]), device=device)  # noqa: E731
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
def supported_env_ids() -> list[str]:
    """gymnasium's MuJoCo v5 tasks (any other registered env with Box observations and actions works too)."""
    return sorted(k for k, spec in gym.registry.items() if k.endswith("-v5") and "mujoco" in str(spec.entry_point))


def check_env(env_id: str) -> tuple[int, int]:
    """Raise ValueError if `env_id` is not registered or lacks 1-d Box observations or Box actions; else return the
    observation and action sizes."""
    if env_id not in gym.registry:
        raise ValueError(f"unknown --env-id {env_id!r}; supported: {', '.join(supported_env_ids())} (or any "
                         "registered env with Box observations and actions)")  # fmt: skip
    env = gym.make(env_id)
    obs_space, action_space = env.observation_space, env.action_space
    env.close()
    if not isinstance(action_space, gym.spaces.Box):
        raise ValueError(f"--env-id must have a Box action space, got {env_id} with {action_space}")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise ValueError(f"--env-id must have 1-d Box observations, got {env_id} with {obs_space}")
    return obs_space.shape[0], action_space.shape[0]


def check_memory(args: Args, obs_dim: int, act_dim: int) -> None:
    """Raise ValueError if the rollout (float32) and the training and evaluation envs (ENV_COST) would not fit in
    memory."""
    rollout_bytes = 4 * batch_size(args) * (obs_dim + act_dim + 4)  # observations, actions, log-probs, rewards, ...
    env_bytes = args.num_envs * ENV_COST[args.vector_env_mode][0] + args.eval_episodes * ENV_COST["sync"][0]
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


def validate_args(args: Args) -> None:
    """Raise ValueError naming the bad value and the allowed ones; called before anything is written."""
    check_finite_floats(args)  # first: a NaN passes the range checks below
    check_run_dir(args.run_dir)
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
        (args.rpo_alpha >= 0, f"--rpo-alpha must be >= 0, got {args.rpo_alpha}"),
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
    obs_dim, act_dim = check_env(args.env_id)
    check_memory(args, obs_dim, act_dim)
    if args.capture_video:
        check_rendering(args.env_id)


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


def check_rendering(env_id: str) -> None:
    """Raise ValueError if --capture-video cannot work: no moviepy, or no OpenGL context (headless: MUJOCO_GL=egl)."""
    if importlib.util.find_spec("moviepy") is None:
        raise ValueError("--capture-video needs moviepy: pip install moviepy")
    # crucial: import what torch's optimizers import (torch._dynamo, and with it triton on CUDA builds) before the first
    # OpenGL context. Mesa's EGL driver puts the system libLLVM in the global symbol scope, and a triton loaded later
    # binds its own LLVM symbols to it and segfaults in its static initializers.
    import torch._dynamo  # noqa: F401

    env = gym.make(env_id, render_mode="rgb_array")
    try:
        env.reset(seed=0)
        env.render()
    except Exception as err:  # MuJoCo raises several types when no OpenGL context can be made
        raise ValueError(
            f"--capture-video cannot render ({type(err).__name__}: {err}); headless: MUJOCO_GL=egl"
        ) from err
    finally:
        env.close()


def check_finite(name: str, value: torch.Tensor, global_step: int) -> None:
    """Raise FloatingPointError naming the loss and step if `value` is NaN or inf."""
    if not torch.isfinite(value).all():
        raise FloatingPointError(f"{name} is {value.item()} at global_step {global_step}")


def evaluate(agent, normalizer: Normalizer, eval_envs, seed: int, episodes: int, prefix: str = "eval",
             report=None) -> dict:  # fmt: skip
    """`episodes` deterministic episodes (the mean action clipped to the bounds; no random number is drawn) with the
    observation statistics frozen, in batches of `eval_envs.num_envs`: env i of batch k starts from
    `reset(seed=seed + k * num_envs + i)`; `report(episodes ended so far)`, if given, is called at every step.
    Returns {f"{prefix}/return": mean raw return, f"{prefix}/length"}."""
    returns, lengths, n = [], [], eval_envs.num_envs
    space, policy = eval_envs.single_action_space, NumpyPolicy(agent)
    for batch_seed in range(seed, seed + episodes, n):
        obs, _ = eval_envs.reset(seed=batch_seed)
        score, length, running = np.zeros(n), np.zeros(n, np.int64), np.ones(n, bool)
        while running.any():
            if report is not None:
                report(len(returns) + int((~running).sum()))
            mean = policy(normalizer.obs(obs, update=False))[0]
            obs, rewards, terminated, truncated, _ = eval_envs.step(np.clip(mean, space.low, space.high))
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


def agent_state(args: Args, agent, optimizer, normalizer: Normalizer) -> dict:
    """args, the agent's and the optimizer's state_dict and the normalisation statistics (`normalizer`)."""
    return {"script": SCRIPT, "args": asdict(args), "agent": agent.state_dict(),
            "agent_optimizer": optimizer.state_dict(), "normalizer": normalizer.state_dict()}  # fmt: skip


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


def training_checkpoint(args, agent, optimizer, loop: LoopState, minibatch_rng, envs, state: EnvState) -> dict:
    """Everything a resumed run needs to continue exactly at an update boundary: agent, optimizer, normalisation
    statistics, counters, every RNG state and the episodes in progress (MuJoCo states, see SavableMujoco)."""
    return {**agent_state(args, agent, optimizer, state.normalizer), **asdict(loop), "rng": rng_states(minibatch_rng),
            "envs": state.snapshot(envs)}  # fmt: skip


def restore_checkpoint(state: dict, agent, optimizer, minibatch_rng) -> LoopState:
    """Load the agent, optimizer and RNG states in place (the envs and normalizer: see `train`); return the counters."""
    agent.load_state_dict(state["agent"])
    optimizer.load_state_dict(state["agent_optimizer"])
    set_rng_states(state["rng"], minibatch_rng)
    return LoopState(**{key: state[key] for key in LoopState.__dataclass_fields__})


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


def load_agent(path: str):
    """(args, agent, normalizer) from a `model.pt` or `checkpoint.pt`, the statistics frozen at their saved values."""
    state = load_saved(path)
    args = Args(**state["args"])
    obs_dim = state["normalizer"]["obs_rms"]["mean"].shape[0]
    agent = Agent(obs_dim, state["agent"]["actor_logstd"].shape[1])
    agent.load_state_dict(state["agent"])
    normalizer = Normalizer((obs_dim,), 1, args.gamma)
    normalizer.load_state_dict(state["normalizer"])
    return state, args, agent, normalizer


def evaluate_checkpoint(path: str, eval_episodes: int = 10, seed: int = 0) -> dict:
    """Rebuild the agent and its observation statistics saved in `model.pt` (`--save-model`) or `checkpoint.pt` and
    evaluate it deterministically with the statistics frozen.

    Usage: python -c "import rpo_mujoco as m; print(m.evaluate_checkpoint('runs/<run_name>/checkpoint.pt'))"
    Returns {"global_step", "eval/return", "eval/length"}. Raises ValueError if another script saved `path`.
    """
    state, args, agent, normalizer = load_agent(path)
    eval_envs = make_vector_env(args.env_id, eval_episodes, "sync")
    result = evaluate(agent, normalizer, eval_envs, seed, eval_episodes)
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
def main(args: Args) -> int:
    args.run_name = args.run_name or f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_path = os.path.join(args.run_dir, args.run_name)
    stop = StopRequest(args.run_name)  # first: a signal during set-up ends the process at once, leaving nothing behind
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
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
    obs_dim, act_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    agent = Agent(obs_dim, act_dim).to(device)  # before the run folder: a failure here leaves nothing behind
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
    with setup_step(args.run_name, f"making {args.eval_episodes} evaluation envs",
                    args.eval_episodes * ENV_COST["sync"][1]):  # fmt: skip
        eval_envs = make_vector_env(args.env_id, args.eval_episodes, "sync", args.capture_video, f"{run_path}/videos")
    minibatch_rng = np.random.default_rng(np.random.SeedSequence(args.seed))
    normalizer = Normalizer((obs_dim,), args.num_envs, args.gamma)
    if saved is None:
        loop = LoopState(next_eval=args.eval_frequency, next_checkpoint=args.checkpoint_frequency)
    else:
        loop = restore_checkpoint(saved, agent, optimizer, minibatch_rng)
        normalizer.load_state_dict(saved["normalizer"])
        truncate_evals(run_path, loop.eval_idx)
        print(f"[{args.run_name}] resuming from global_step {loop.global_step} (eval_idx {loop.eval_idx})",
              file=sys.stderr, flush=True)  # fmt: skip
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
        final = train(args, envs, eval_envs, agent, optimizer, normalizer, writer, run_path, device, loop,
                      minibatch_rng, stop, None if saved is None else saved["envs"])  # fmt: skip
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


def train(args, envs, eval_envs, agent, optimizer, normalizer, writer, run_path, device, loop: LoopState,
          minibatch_rng, stop, saved_envs: dict | None = None) -> dict:  # fmt: skip
    """The RPO loop, from `loop`'s counters to the last update. Returns the final evaluation record (also printed as a
    JSON line). Raises Interrupted after the checkpoint that a SIGUSR1/SIGTERM asked for."""
    last_step = num_iterations(args) * batch_size(args)
    progress = Progress(args.run_name, last_step, "eval/return")
    start_time, start_step = time.time(), loop.global_step
    obs, _ = envs.reset(seed=args.seed)  # a resumed run then restores the episodes in progress
    state = EnvState(normalizer.obs(obs, update=saved_envs is None), normalizer)
    if saved_envs is not None:
        state.restore(envs, saved_envs)
    rollout = new_rollout(args.num_steps, args.num_envs, obs.shape[1], envs.single_action_space.shape[0])
    while loop.global_step < last_step:
        if args.anneal_lr:  # linear decay over the updates (Huang et al. 2022, detail 4)
            optimizer.param_groups[0]["lr"] = (1.0 - loop.update_idx / num_iterations(args)) * args.learning_rate
        next_value, episodes = collect_rollout(agent, envs, state, rollout, args)
        for t, episode_return, episode_length in episodes:  # at the global step the episode ended
            writer.add_scalar("charts/episodic_return", episode_return, loop.global_step + (t + 1) * args.num_envs)
            writer.add_scalar("charts/episodic_length", episode_length, loop.global_step + (t + 1) * args.num_envs)
        loop.global_step += batch_size(args)
        advantages = compute_gae(rollout.rewards, rollout.values, rollout.dones, next_value, args.gamma,
                                 args.gae_lambda)  # fmt: skip
        batch = flatten_batch(rollout, advantages, device)
        logs = rpo_update(agent, optimizer, batch, args, minibatch_rng, loop.global_step)
        loop.update_idx += 1
        logs["losses/explained_variance"] = explained_variance(batch["values"], batch["returns"])
        logs["charts/learning_rate"] = optimizer.param_groups[0]["lr"]
        sps = int((loop.global_step - start_step) / (time.time() - start_time))
        for key, value in {**logs, "charts/SPS": sps}.items():
            writer.add_scalar(key, value, loop.global_step)
        progress.maybe_print(loop.global_step, loop.last_eval)
        if loop.global_step >= loop.next_eval or loop.global_step >= last_step:
            loop.last_eval = run_evaluation(args, agent, optimizer, normalizer, eval_envs, loop, writer, run_path)
            loop.eval_idx += 1
            loop.next_eval = (loop.global_step // args.eval_frequency + 1) * args.eval_frequency
        maybe_checkpoint(args, agent, optimizer, loop, minibatch_rng, (envs, state), run_path, stop, last_step)
    return {
        **loop.last_eval,
        **heldout_evaluation(args, agent, normalizer, eval_envs, writer, loop.global_step, progress),
    }


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


def heldout_evaluation(args, agent, normalizer, eval_envs, writer, global_step: int, progress: Progress) -> dict:
    """The final evaluation on `final_eval_episodes` episodes whose seeds no periodic evaluation uses
    (seed + 2_000_000 + k): logged as `heldout/*` and printed as one JSON line without `eval_idx`."""
    if args.final_eval_episodes == 0:
        return {}
    if args.capture_video:
        set_video_trigger(eval_envs)
    report = lambda done: progress.evaluating(done, args.final_eval_episodes)  # noqa: E731
    result = evaluate(agent, normalizer, eval_envs, args.seed + 2_000_000, args.final_eval_episodes, "heldout", report)
    for key, value in result.items():
        writer.add_scalar(key, value, global_step)
    record = {"global_step": global_step, **result, "heldout/episodes": args.final_eval_episodes}
    print(json.dumps(record), flush=True)
    return record


def run_evaluation(args, agent, optimizer, normalizer, eval_envs, loop: LoopState, writer, run_path) -> dict:
    """Evaluate, log to TensorBoard, print the JSON line, append it to evals.jsonl, save the model if asked."""
    if args.capture_video:
        set_video_trigger(eval_envs)
    result = evaluate(agent, normalizer, eval_envs, args.seed + 1_000_000, args.eval_episodes)
    for key, value in result.items():
        writer.add_scalar(key, value, loop.global_step)
    record = {"eval_idx": loop.eval_idx, "global_step": loop.global_step, **result}
    line = json.dumps(record)
    print(line, flush=True)
    with open(os.path.join(run_path, "evals.jsonl"), "a") as f:
        f.write(line + "\n")
    if args.save_model:
        atomic_torch_save({**agent_state(args, agent, optimizer, normalizer), "global_step": loop.global_step},
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
