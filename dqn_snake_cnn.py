# docs and experiment results: docs/dqn_snake.md
"""DQN with Double-DQN targets and a plain CNN Q-network on a symmetric Snake board (the non-equivariant baseline).

DQN: Mnih et al. 2015, "Human-level control through deep reinforcement learning" (Nature 518), Algorithm 1, with the
Huber loss. Double DQN: van Hasselt, Guez and Silver 2016, "Deep Reinforcement Learning with Double Q-learning" (AAAI),
Eq. 4. The Q-network has the layers of the equivariant twin's, as plain convolutions of about the same parameter count.
Its twin `dqn_snake_equivariant.py` (an exactly D4-equivariant Q-network) differs only in the network section; this
file never imports escnn.
"""

import contextlib
import copy
import errno
import fcntl
import functools
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
from dataclasses import asdict, dataclass, field
from typing import Literal, NamedTuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
import torch.optim as optim
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    """Train DQN (Double-DQN targets) with a CNN Q-network on a Snake board (the equivariant twin's baseline)."""

    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment (torch, numpy, exploration, replay sampling, environments)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda is used when available"""
    track: bool = False
    """if toggled, the run is tracked with Weights and Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "equivariant-rl"
    """the wandb project name"""
    capture_video: bool = False
    """if toggled, every evaluation's first episode (the held-out one's too) is saved as a video in
    `<run_dir>/<run_name>/videos`"""
    save_model: bool = False
    """if toggled, the agent is saved to `<run_dir>/<run_name>/model.pt` at every evaluation"""
    checkpoint_frequency: int = 50_000
    """environment steps between training checkpoints (`<run_dir>/<run_name>/checkpoint.pt`, replay buffer and the
    environments' states included), written after the first vector step past each multiple, at the end, and on
    SIGUSR1/SIGTERM; 0: only the latter"""
    run_dir: str = "runs"
    """the folder that holds one sub-folder per run"""
    run_name: str | None = None
    """the run folder's name (default `{env_id}__{exp_name}__{seed}__{unix_time}`); if `<run_dir>/<run_name>/` holds a
    checkpoint, the run resumes from it"""

    # Algorithm specific arguments
    env_id: str = "Snake-v0"
    """the environment: Snake-v0 (this file's Snake, registered with gymnasium)"""
    board_size: int = 10
    """the side of the square board in cells"""
    step_cost: float = 0.0
    """a cost subtracted from the reward of every step (0: rewards +1 per food and -1 on death only)"""
    total_timesteps: int = 500_000
    """total environment steps (transitions, summed over the `num_envs` environments)"""
    num_envs: int = 4
    """the number of parallel training environments (one gradient update per vector step)"""
    vector_env_mode: Literal["sync", "async"] = "sync"
    """gymnasium vector env: `sync` steps the environments in this process, `async` in subprocesses"""
    buffer_size: int = 100_000
    """the replay memory size in transitions"""
    batch_size: int = 32
    """the batch size of sample from the replay memory"""
    learning_rate: float = 2.5e-4
    """the learning rate of the Adam optimizer (the start value of a schedule)"""
    lr_scheduler: Literal["none", "cosine", "step"] = "none"
    """learning-rate schedule over env steps: constant, cosine annealing to 0 at `total_timesteps`, or times
    `lr_gamma` every `lr_step_size` steps"""
    lr_step_size: int = 100_000
    """environment steps between two decays of the `step` schedule"""
    lr_gamma: float = 0.5
    """the factor of each decay of the `step` schedule"""
    amp: bool = False
    """if toggled, the update runs under float16 autocast with a GradScaler on CUDA (mixed precision); weights,
    optimizer states, losses and acting stay float32. Ignored on CPU"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 1.0
    """the target network update rate: 1 copies the Q-network (hard update), below 1 Polyak-averages (soft update)"""
    target_network_frequency: int = 250
    """the number of gradient updates between two target network updates"""
    start_e: float = 1.0
    """the starting epsilon of the epsilon-greedy exploration"""
    end_e: float = 0.05
    """the final epsilon of the epsilon-greedy exploration"""
    exploration_steps: int = 50_000
    """environment steps over which epsilon falls linearly from `start_e` to `end_e`"""
    learning_starts: int = 5_000
    """environment steps before the first gradient update"""
    eval_frequency: int = 10_000
    """environment steps between evaluations (a final evaluation always runs at the end)"""
    eval_episodes: int = 10
    """greedy evaluation episodes per evaluation (one evaluation environment each)"""
    final_eval_episodes: int = 100
    """episodes of the held-out final evaluation, from seeds no periodic evaluation uses, reported apart as
    `heldout/*` (the number to publish; tuners select on `eval/*`); 0 skips it"""

    # Network arguments
    channels: int = 18
    """channels of every hidden layer (18: about the parameter count of the equivariant twin's default network)"""


# ---------------------------------------------------------------------------------------------------------------------
# Environment: Snake on a square board; its rules commute with the board's rotations and mirrors (D4)
# ---------------------------------------------------------------------------------------------------------------------
ENV_ID = "Snake-v0"
SUPPORTED_ENV_IDS = (ENV_ID,)
UP, RIGHT, DOWN, LEFT = range(4)  # the actions: absolute moves
MOVES = ((-1, 0), (0, 1), (1, 0), (0, -1))  # (d row, d col) of each action; row 0 is the top row of the board
INITIAL_LENGTH = 3
STEPS_PER_LENGTH = 100  # truncation: an episode ends after this many steps per unit of length without food
EVENT_REWARDS = {"move": 0.0, "eat": 1.0, "win": 1.0, "die": -1.0}
OBS_CHANNELS = 3  # head, body, food
CELL_PIXELS = 16  # rendering: pixels per cell side (a multiple of 16, as video encoders want)


class SnakeState(NamedTuple):
    """Everything the rules depend on (the env adds its random generator)."""

    body: tuple  # ((row, col), ...): the snake's cells from head to tail
    food: tuple | None  # (row, col) of the food, never on the body; None once the snake fills the board
    steps_since_food: int


def place_food(body: tuple, size: int, priorities: np.ndarray) -> tuple:
    """The free cell (not on `body`) of highest priority, as (row, col).

    With i.i.d. uniform `priorities` (size, size) this is a uniform free cell; and it is equivariant: transforming the
    priorities and the body by a symmetry of the board transforms the chosen cell (no ties: float64 uniforms)."""
    free = np.ones((size, size), dtype=bool)
    rows, cols = zip(*body, strict=True)
    free[rows, cols] = False
    row, col = divmod(int(np.where(free, priorities, -1.0).argmax()), size)
    return row, col


@functools.lru_cache(maxsize=16)
def starting_placements(size: int) -> tuple:
    """Every (row, col, heading) of a straight snake of INITIAL_LENGTH cells, head at (row, col) facing MOVES[heading],
    that fits on the board; the symmetries of the board map this set onto itself."""
    reach = INITIAL_LENGTH - 1
    cells = [(row, col) for row in range(size) for col in range(size)]
    return tuple((row, col, heading) for row, col in cells for heading, (d_row, d_col) in enumerate(MOVES)
                 if 0 <= row - reach * d_row < size and 0 <= col - reach * d_col < size)  # fmt: skip


def initial_state(size: int, rng: np.random.Generator) -> SnakeState:
    """A straight snake, uniform over `starting_placements`, and food on a uniform free cell."""
    placements = starting_placements(size)
    row, col, heading = placements[rng.integers(len(placements))]
    d_row, d_col = MOVES[heading]
    body = tuple((row - k * d_row, col - k * d_col) for k in range(INITIAL_LENGTH))
    return SnakeState(body, place_food(body, size, rng.random((size, size))), 0)


def snake_move(state: SnakeState, action: int, size: int, draw_priorities) -> tuple[SnakeState, str]:
    """The rules of one step: the head moves one cell in the absolute direction MOVES[action].

    It dies on leaving the board or entering a cell of the body other than the tail's (the tail leaves its cell in the
    same step; when the snake eats, the new head is on the food, never on the body); reversing into the neck is such a
    collision. Eating grows the snake by one cell (the tail stays) and places new food with `place_food` on
    `draw_priorities()` (size, size), the step's only random draw; a full board is a win.

    Returns the next state (a dead snake's is unchanged) and the event: "move", "eat", "win" or "die".
    """
    (head_row, head_col), (d_row, d_col) = state.body[0], MOVES[action]
    head = (head_row + d_row, head_col + d_col)
    if not (0 <= head[0] < size and 0 <= head[1] < size) or head in state.body[:-1]:
        return state, "die"
    if head != state.food:
        return SnakeState((head, *state.body[:-1]), state.food, state.steps_since_food + 1), "move"
    body = (head, *state.body)
    if len(body) == size * size:
        return SnakeState(body, None, 0), "win"
    return SnakeState(body, place_food(body, size, draw_priorities()), 0), "eat"


def snake_observation(state: SnakeState, size: int) -> np.ndarray:
    """(3, size, size) float32: channel 0 the head (1), channel 1 the body with its order, (L - k) / L for the k-th
    cell from the head (head 1, tail 1 / L: the tail's cell is the next to be freed), channel 2 the food (1)."""
    obs = np.zeros((OBS_CHANNELS, size, size), dtype=np.float32)
    length = len(state.body)
    rows, cols = zip(*state.body, strict=True)
    obs[0, rows[0], cols[0]] = 1.0
    obs[1, rows, cols] = (length - np.arange(length)) / length
    if state.food is not None:
        obs[2, state.food[0], state.food[1]] = 1.0
    return obs


class SnakeEnv(gym.Env):
    """Snake on a `size` x `size` board with 4 absolute moves (UP, RIGHT, DOWN, LEFT).

    Rewards: +1 per food, -1 on death, minus `step_cost` on every step. Terminates on death or a win (a full board);
    truncates after STEPS_PER_LENGTH steps per unit of length without food. info["score"]: food eaten this episode.
    Seeded through `reset(seed=...)`; its whole state, random generator included, is the property `snake_state`.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, size: int = 10, step_cost: float = 0.0, render_mode: str | None = None):
        self.size, self.step_cost, self.render_mode = size, step_cost, render_mode
        self.observation_space = gym.spaces.Box(0.0, 1.0, (OBS_CHANNELS, size, size), np.float32)
        self.action_space = gym.spaces.Discrete(4)
        self.state = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.state = initial_state(self.size, self.np_random)
        return snake_observation(self.state, self.size), self._info()

    def step(self, action):
        self.state, event = snake_move(self.state, int(action), self.size, self._food_priorities)
        terminated = event in ("die", "win")
        budget = STEPS_PER_LENGTH * len(self.state.body)
        truncated = not terminated and self.state.steps_since_food >= budget
        reward = EVENT_REWARDS[event] - self.step_cost
        return snake_observation(self.state, self.size), reward, terminated, truncated, self._info()

    def _food_priorities(self) -> np.ndarray:
        return self.np_random.random((self.size, self.size))

    def _info(self) -> dict:
        return {"score": len(self.state.body) - INITIAL_LENGTH}

    @property
    def snake_state(self) -> dict:
        """The env's whole state in plain Python (body, food, step counter, random generator), for checkpoints; a
        property so that vector envs can `get_attr`/`set_attr` it."""
        return {"body": [list(cell) for cell in self.state.body],
                "food": None if self.state.food is None else list(self.state.food),
                "steps_since_food": self.state.steps_since_food, "rng": self.np_random.bit_generator.state}  # fmt: skip

    @snake_state.setter
    def snake_state(self, saved: dict) -> None:
        food = None if saved["food"] is None else tuple(saved["food"])
        self.state = SnakeState(tuple(map(tuple, saved["body"])), food, saved["steps_since_food"])
        self.np_random.bit_generator.state = saved["rng"]

    def render(self):
        """An RGB image (size * CELL_PIXELS, size * CELL_PIXELS, 3) uint8 of the board (render_mode "rgb_array")."""
        image = np.full((self.size, self.size, 3), 24, dtype=np.uint8)
        length = len(self.state.body)
        for k, (row, col) in enumerate(self.state.body):  # bright green at the head, darker toward the tail
            image[row, col] = (30, 220 - 120 * k // length, 60)
        image[self.state.body[0]] = (250, 240, 80)
        if self.state.food is not None:
            image[self.state.food] = (230, 50, 50)
        return image.repeat(CELL_PIXELS, 0).repeat(CELL_PIXELS, 1)


def register_env() -> None:
    """Register ENV_ID with this file's SnakeEnv (again if another file registered its own), so `gym.make` works."""
    spec = gym.registry.get(ENV_ID)
    if spec is None or spec.entry_point is not SnakeEnv:
        gym.registry.pop(ENV_ID, None)
        gym.register(ENV_ID, entry_point=SnakeEnv)


def make_env(args: Args, render_mode: str | None = None):
    def thunk():
        register_env()
        return gym.make(args.env_id, size=args.board_size, step_cost=args.step_cost, render_mode=render_mode)

    return thunk


# One env's memory in bytes and its creation time in seconds on one core (docs/BENCHMARKS.md, "Set-up cost"): `sync`
# in this process, `async` a worker process of its own (its private memory once a garbage
# collection in it has copied the pages it shared with this process)
ENV_COST = {"sync": (16 * 2**10, 0.0004), "async": (50 * 2**20, 0.03)}


def make_vector_env(args: Args):
    """`num_envs` Snake envs without autoreset: the training loop resets the envs whose episode ended (reset_mask), so
    that between two vector steps every env holds a state of an episode in progress (saved in checkpoints)."""
    thunks = [make_env(args) for _ in range(args.num_envs)]
    vector_cls = gym.vector.AsyncVectorEnv if args.vector_env_mode == "async" else gym.vector.SyncVectorEnv
    return vector_cls(thunks, autoreset_mode=gym.vector.AutoresetMode.DISABLED)


def make_eval_envs(args: Args, n: int, capture_video: bool = False, video_dir: str = "") -> list:
    """`n` evaluation envs; with `capture_video`, env 0 records every episode it plays (RecordVideo)."""
    envs = [make_env(args, "rgb_array" if capture_video and i == 0 else None)() for i in range(n)]
    if capture_video:
        envs[0] = gym.wrappers.RecordVideo(envs[0], video_dir, episode_trigger=lambda _: True, disable_logger=True)
    return envs


# ---------------------------------------------------------------------------------------------------------------------
# Networks: a plain CNN Q-network, the equivariant twin's layers without the symmetry constraint
# ---------------------------------------------------------------------------------------------------------------------
NETWORK_ARGS = ("channels",)


def exact_downsample(size: int) -> tuple[int, int]:
    """(kernel, padding) of the stride-2 max pool, as in the equivariant twin: kernel 2 on an even side, kernel 3 with
    padding 1 on an odd side (windows the board's symmetries map onto each other). Output side ceil(size / 2)."""
    return (2, 0) if size % 2 == 0 else (3, 1)


def with_board_channel(x: torch.Tensor) -> torch.Tensor:
    """(batch, 3, n, n) -> (batch, 4, n, n) in channels_last memory (faster convolutions and pooling on CPU): a constant
    1 channel, so that the first layer tells the board's cells from the zero padding around it (the walls)."""
    return torch.cat([x, torch.ones_like(x[:, :1])], 1).contiguous(memory_format=torch.channels_last)


class QNetwork(torch.nn.Module):
    """Q(s, .) for the 4 moves: the equivariant twin's layers as plain convolutions of `channels` channels (3x3 with
    stride 1 and padding 1, `exact_downsample`, a global spatial max, two linear layers), with no symmetry constraint.

    Input x: (batch, 3, n, n). Output: (batch, 4) Q-values in action order (UP, RIGHT, DOWN, LEFT).
    """

    def __init__(self, args: Args):
        super().__init__()
        c = args.channels
        kernel, padding = exact_downsample(args.board_size)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(OBS_CHANNELS + 1, c, 3, padding=1),  # (batch, 4, n, n) -> (batch, c, n, n)
            torch.nn.ReLU(inplace=True),
            torch.nn.MaxPool2d(kernel, 2, padding),  # -> (batch, c, m, m), m = ceil(n / 2)
            torch.nn.Conv2d(c, c, 3, padding=1),
            torch.nn.ReLU(inplace=True),
            torch.nn.Conv2d(c, c, 3, padding=1),
            torch.nn.ReLU(inplace=True),
            torch.nn.AdaptiveMaxPool2d(1),  # global spatial max -> (batch, c, 1, 1)
            torch.nn.Flatten(),  # -> (batch, c)
            torch.nn.Linear(c, c),
            torch.nn.ReLU(inplace=True),
            torch.nn.Linear(c, 4),  # -> (batch, 4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(with_board_channel(x))


class TargetQNetwork(torch.nn.Module):
    """The target network: a frozen copy of the Q-network, in eval mode (plain layers hold their weights directly,
    so there is no cache to refresh after an update).

    Input x: (batch, 3, n, n). Output: (batch, 4).
    """

    def __init__(self, q_network: QNetwork):
        super().__init__()
        self.net = copy.deepcopy(q_network).requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.no_grad()
    def update(self, q_network: QNetwork, tau: float) -> None:
        """Target parameters <- (1 - tau) target + tau online (tau = 1: a copy)."""
        target, online = list(self.net.parameters()), [p.detach() for p in q_network.parameters()]
        if tau == 1.0:
            torch._foreach_copy_(target, online)
        else:
            torch._foreach_lerp_(target, online, tau)


def validate_network_args(args: Args) -> None:
    if args.channels < 1:
        raise ValueError(f"--channels must be >= 1, got {args.channels}")


def network_memory_bytes(args: Args) -> int:
    """Estimated bytes of the Q-network and its target: parameters, gradients, Adam's moments and the target
    (5 floats per weight), and one update's activations (3 forward passes and a backward pass)."""
    width = args.channels
    dense_weights = 9 * width * (OBS_CHANNELS + 1) + 2 * 9 * width * width + width * width + 4 * width
    half = (args.board_size + 1) // 2
    activations = 4 * args.batch_size * width * (args.board_size**2 + 3 * half**2)
    return 4 * (5 * dense_weights + activations)


# ---------------------------------------------------------------------------------------------------------------------
# Replay buffer, exploration and learning-rate schedules
# ---------------------------------------------------------------------------------------------------------------------
class ReplayBatch(NamedTuple):
    observations: torch.Tensor  # (batch, 3, n, n)
    next_observations: torch.Tensor  # (batch, 3, n, n)
    actions: torch.Tensor  # (batch, 1) int64
    rewards: torch.Tensor  # (batch, 1)
    terminations: torch.Tensor  # (batch, 1): 1 for a terminal next state (death or win), 0 otherwise (truncation too)


class ReplayBuffer:
    """Uniform replay of single transitions (Mnih et al. 2015): a ring of `buffer_size` transitions in NumPy arrays,
    sampled with replacement from its own generator."""

    def __init__(self, obs_shape: tuple, buffer_size: int, device, seed):
        self.capacity, self.device, self.rng = buffer_size, device, np.random.default_rng(seed)
        self.storage = {"obs": np.zeros((buffer_size, *obs_shape), np.float32),
                        "next_obs": np.zeros((buffer_size, *obs_shape), np.float32),
                        "actions": np.zeros(buffer_size, np.int64), "rewards": np.zeros(buffer_size, np.float32),
                        "terminations": np.zeros(buffer_size, np.float32)}  # fmt: skip
        self.size, self.pos = 0, 0

    def add(self, obs, next_obs, actions, rewards, terminations) -> None:
        """Store one vector step: obs/next_obs (num_envs, 3, n, n) (next_obs: the final observation where an episode
        ended), actions, rewards, terminations (num_envs,)."""
        slots = (self.pos + np.arange(len(actions))) % self.capacity
        for key, value in zip(self.storage, (obs, next_obs, actions, rewards, terminations), strict=True):
            self.storage[key][slots] = value
        self.pos = int(slots[-1] + 1) % self.capacity
        self.size = min(self.size + len(actions), self.capacity)

    def sample(self, batch_size: int) -> ReplayBatch:
        idx = self.rng.integers(0, self.size, batch_size)
        s, as_tensor = self.storage, lambda a: torch.as_tensor(a, device=self.device)  # noqa: E731
        return ReplayBatch(as_tensor(s["obs"][idx]), as_tensor(s["next_obs"][idx]), as_tensor(s["actions"][idx, None]),
                           as_tensor(s["rewards"][idx, None]), as_tensor(s["terminations"][idx, None]))  # fmt: skip

    def state_dict(self) -> dict:
        """The filled slots (tensors sharing the arrays' memory), ring position and sampling generator."""
        return {"storage": {key: torch.from_numpy(array[: self.size]) for key, array in self.storage.items()},
                "size": self.size, "pos": self.pos, "rng": self.rng.bit_generator.state}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Inverse of `state_dict`. Raises ValueError if the saved transitions do not fit this buffer's shapes."""
        for key, saved in state["storage"].items():
            if saved.shape[0] > self.capacity or saved.shape[1:] != self.storage[key].shape[1:]:
                raise ValueError(f"saved replay buffer {key} {tuple(saved.shape)} does not fit "
                                 f"{(self.capacity, *self.storage[key].shape[1:])}")  # fmt: skip
            self.storage[key][: saved.shape[0]] = saved.numpy()
        self.size, self.pos = state["size"], state["pos"]
        self.rng.bit_generator.state = state["rng"]


def linear_schedule(start_e: float, end_e: float, duration: int, t: int) -> float:
    """Epsilon falling linearly from `start_e` at t = 0 to `end_e` at t = `duration` env steps, then constant."""
    if duration <= 0:
        return end_e
    return start_e + (end_e - start_e) * min(t / duration, 1.0)


def learning_rate_at(args: Args, global_step: int) -> float:
    """The learning rate of the update at `global_step` (a pure function of the step, so a resumed run continues the
    schedule exactly): constant, cosine from `learning_rate` to 0 at `total_timesteps`, or step decay."""
    if args.lr_scheduler == "cosine":
        return args.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(global_step / args.total_timesteps, 1.0)))
    if args.lr_scheduler == "step":
        return args.learning_rate * args.lr_gamma ** (global_step // args.lr_step_size)
    return args.learning_rate


def budget_schedules(args: Args) -> list[str]:
    """The schedules that run over `total_timesteps`, so that a resumed run may not change it: the cosine learning
    rate. Epsilon falls over `exploration_steps` and the step schedule decays every `lr_step_size` steps, whatever
    the budget, so runs with those may be extended."""
    return ["the learning rate's cosine annealing (--lr-scheduler cosine)"] if args.lr_scheduler == "cosine" else []


@torch.no_grad()
def epsilon_greedy(q_network, obs: np.ndarray, epsilon: float, rng: np.random.Generator, device) -> np.ndarray:
    """(num_envs,) actions: uniform with probability epsilon, else argmax Q. Draws the same numbers whatever Q is."""
    explore, random_moves = rng.random(len(obs)) < epsilon, rng.integers(0, 4, len(obs))
    if explore.all():
        return random_moves
    greedy = q_network(torch.as_tensor(obs, device=device)).argmax(1).cpu().numpy()
    return np.where(explore, random_moves, greedy)


# ---------------------------------------------------------------------------------------------------------------------
# Plumbing: arguments, evaluation, checkpoints
# ---------------------------------------------------------------------------------------------------------------------
def validate_args(args: Args) -> None:
    """Raise ValueError naming the bad value and the allowed ones; called before anything is written."""
    check_finite_floats(args)  # first: a NaN passes the range checks below
    check_run_dir(args.run_dir)
    if args.env_id not in SUPPORTED_ENV_IDS:
        raise ValueError(f"unknown --env-id {args.env_id!r}; supported: {', '.join(SUPPORTED_ENV_IDS)}")
    checks = [
        (args.seed >= 0, f"--seed must be >= 0, got {args.seed}"),
        (args.board_size >= 4, f"--board-size must be >= 4, got {args.board_size}"),
        (args.step_cost >= 0.0, f"--step-cost must be >= 0, got {args.step_cost}"),
        (args.total_timesteps >= 1, f"--total-timesteps must be >= 1, got {args.total_timesteps}"),
        (1 <= args.num_envs <= args.total_timesteps,
         f"--num-envs must be in [1, --total-timesteps={args.total_timesteps}], got {args.num_envs}"),
        (args.buffer_size >= args.num_envs,
         f"--buffer-size must be >= --num-envs={args.num_envs}, got {args.buffer_size}"),
        (1 <= args.batch_size <= args.buffer_size,
         f"--batch-size must be in [1, --buffer-size={args.buffer_size}], got {args.batch_size}"),
        (0 <= args.learning_starts < args.total_timesteps,
         f"--learning-starts must be in [0, --total-timesteps={args.total_timesteps}), got {args.learning_starts}"),
        (args.learning_rate > 0, f"--learning-rate must be > 0, got {args.learning_rate}"),
        (args.lr_step_size >= 1, f"--lr-step-size must be >= 1, got {args.lr_step_size}"),
        (0.0 < args.lr_gamma <= 1.0, f"--lr-gamma must be in (0, 1], got {args.lr_gamma}"),
        (0.0 <= args.gamma < 1.0, f"--gamma must be in [0, 1), got {args.gamma}"),
        (0.0 < args.tau <= 1.0, f"--tau must be in (0, 1], got {args.tau}"),
        (args.target_network_frequency >= 1,
         f"--target-network-frequency must be >= 1, got {args.target_network_frequency}"),
        (0.0 <= args.end_e <= args.start_e <= 1.0,
         f"--start-e and --end-e must satisfy 0 <= end_e <= start_e <= 1, got {args.start_e}, {args.end_e}"),
        (args.exploration_steps >= 0, f"--exploration-steps must be >= 0, got {args.exploration_steps}"),
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
    validate_network_args(args)
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
    """Raise ValueError if the run would need more memory than this process may use: the full replay buffer, the
    networks (`network_memory_bytes`) and the training and evaluation envs (ENV_COST)."""
    obs_floats = OBS_CHANNELS * args.board_size**2
    buffer_bytes = args.buffer_size * (2 * 4 * obs_floats + 8 + 4 + 4)  # obs, next obs, action, reward, termination
    network_bytes = network_memory_bytes(args)
    env_bytes = args.num_envs * ENV_COST[args.vector_env_mode][0] + args.eval_episodes * ENV_COST["sync"][0]
    needed, limit = buffer_bytes + network_bytes + env_bytes, memory_limit()
    if needed > limit:
        flags = " ".join(f"--{name.replace('_', '-')} {getattr(args, name)}" for name in NETWORK_ARGS)
        gib = lambda n: f"{n / 2**30:.1f}"  # noqa: E731
        raise ValueError(f"{flags}, --board-size {args.board_size}, --buffer-size {args.buffer_size}, --num-envs "
                         f"{args.num_envs} ({args.vector_env_mode}) and --eval-episodes {args.eval_episodes} need "
                         f"about {gib(needed)} GiB (networks {gib(network_bytes)}, replay buffer {gib(buffer_bytes)}, "
                         f"envs {gib(env_bytes)}), more than the {gib(limit)} GiB this process may use")  # fmt: skip


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


@torch.no_grad()
def evaluate(q_network, eval_envs: list, seed: int, device, episodes: int | None = None, prefix: str = "eval",
             report=None) -> dict:  # fmt: skip
    """`episodes` greedy episodes (argmax Q; no random number is drawn), default one per eval env, in batches of
    `len(eval_envs)`: env i of batch k starts from `reset(seed=seed + k * len(eval_envs) + i)`; `report(episodes done
    so far)`, if given, is called before each batch.

    Returns {f"{prefix}/score": mean food eaten, f"{prefix}/length": mean episode length in env steps,
    f"{prefix}/return": mean undiscounted return}.
    """
    episodes = episodes or len(eval_envs)
    results = []
    q_network.eval()  # layers that cache weights derived from their parameters (escnn's) derive them once, here
    for first in range(0, episodes, len(eval_envs)):
        if report is not None:
            report(first)
        batch = eval_envs[: min(len(eval_envs), episodes - first)]
        results += greedy_episodes(q_network, batch, seed + first, device)
    q_network.train()
    score, length, ret = np.mean(results, axis=0, dtype=np.float64)
    return {f"{prefix}/score": float(score), f"{prefix}/length": float(length), f"{prefix}/return": float(ret)}


def greedy_episodes(q_network, envs: list, seed: int, device) -> list:
    """One greedy episode in each env, stepped together: env i starts from `reset(seed=seed + i)`.
    Returns [(score, length, return)] per env."""
    obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])
    running, results = list(range(len(envs))), [None] * len(envs)
    length, returns = np.zeros(len(envs), np.int64), np.zeros(len(envs))
    while running:
        actions = q_network(torch.as_tensor(obs[running], device=device)).argmax(1).cpu().numpy()
        for i, action in zip(list(running), actions, strict=True):
            obs[i], reward, terminated, truncated, info = envs[i].step(action)
            length[i], returns[i] = length[i] + 1, returns[i] + reward
            if terminated or truncated:
                running.remove(i)
                results[i] = (info["score"], length[i], returns[i])
    return results


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


def parameters_state(module: torch.nn.Module) -> dict:
    """The module's parameters by name: no buffers (escnn's sampled bases and eval-mode filter cache are rebuilt
    from the arguments)."""
    return {name: p.detach().clone() for name, p in module.named_parameters()}


@torch.no_grad()
def load_parameters(module: torch.nn.Module, state: dict) -> None:
    """Inverse of `parameters_state`, in place; the module then re-enters its mode, so that a module caching weights
    derived from its parameters in eval mode (escnn) rebuilds them. Raises ValueError on other parameter names."""
    params = dict(module.named_parameters())
    if set(params) != set(state):
        raise ValueError(f"saved parameters {sorted(set(state) ^ set(params))} do not match the network")
    training = module.training
    module.train()
    for name, value in state.items():
        params[name].copy_(value)
    module.train(training)


def agent_state(args: Args, agent) -> dict:
    """args, every network's parameters, the optimizer's and the GradScaler's state."""
    nets, opt, scaler = agent
    state = {"script": SCRIPT, "args": asdict(args), "q_optimizer": opt.state_dict(), "scaler": scaler.state_dict()}
    state.update({name: parameters_state(net) for name, net in nets.items()})
    return state


@dataclass
class LoopState:
    """The training loop's counters, saved in every checkpoint (`last_eval`: the latest evaluation record;
    `episode_returns` and `episode_lengths`: the running episode of each training env)."""

    global_step: int = 0
    update_idx: int = 0
    eval_idx: int = 0
    next_eval: int = 0
    next_checkpoint: int = 0
    last_eval: dict | None = None
    episode_returns: list = field(default_factory=list)
    episode_lengths: list = field(default_factory=list)


def training_checkpoint(args: Args, agent, rb, envs, obs, loop: LoopState, rngs: dict) -> dict:
    """Everything a resumed run needs to continue exactly: agent, replay buffer, counters, the training envs' states
    and current observations, and every RNG state (Python, NumPy's legacy global and Generators, torch)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    saved_rngs = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        **{key: rng.bit_generator.state for key, rng in rngs.items()},
    }
    return {**agent_state(args, agent), **asdict(loop), "replay_buffer": rb.state_dict(), "rng": saved_rngs,
            "envs": list(envs.get_attr("snake_state")), "obs": torch.from_numpy(obs.copy())}  # fmt: skip


def restore_checkpoint(state: dict, agent, rb, envs, rngs: dict) -> tuple[LoopState, np.ndarray]:
    """Inverse of `training_checkpoint`: load every state in place (the envs must have been reset once); returns the
    loop's counters and the training envs' current observations."""
    nets, opt, scaler = agent
    for name, net in nets.items():
        load_parameters(net, state[name])
    opt.load_state_dict(state["q_optimizer"])
    if state["scaler"]:  # empty when saved by a disabled GradScaler (CPU, or no --amp)
        scaler.load_state_dict(state["scaler"])
    rb.load_state_dict(state["replay_buffer"])
    saved = state["rng"]
    random.setstate(saved["python"])
    name, keys, pos, has_gauss, cached_gaussian = saved["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(saved["torch"])
    if saved["cuda"] and torch.cuda.is_available():  # a run moved between CPU and GPU continues, though not exactly
        torch.cuda.set_rng_state_all(saved["cuda"])
    for key, rng in rngs.items():
        rng.bit_generator.state = saved[key]
    envs.set_attr("snake_state", state["envs"])
    loop = LoopState(**{key: state[key] for key in LoopState.__dataclass_fields__})
    return loop, state["obs"].numpy()


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


def evaluate_checkpoint(path: str, eval_episodes: int = 10, seed: int = 0) -> dict:
    """Rebuild the Q-network saved in `model.pt` (`--save-model`) or `checkpoint.pt` and evaluate it greedily.

    Usage: python -c "import dqn_snake_equivariant as m; print(m.evaluate_checkpoint('runs/<run_name>/checkpoint.pt'))"
    Returns {"global_step", "eval/score", "eval/length", "eval/return"}. Raises ValueError if another script saved
    `path`.
    """
    state = load_saved(path)
    args = Args(**state["args"])
    q_network = QNetwork(args)
    load_parameters(q_network, state["q_network"])
    eval_envs = make_eval_envs(args, eval_episodes)
    result = evaluate(q_network, eval_envs, seed, "cpu")
    for env in eval_envs:
        env.close()
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
def autocast(args: Args, device: torch.device):
    """float16 autocast of the update's network passes with --amp on CUDA (disabled on CPU)."""
    return torch.autocast(device.type, dtype=torch.float16, enabled=args.amp and device.type == "cuda")


def dqn_update(batch: ReplayBatch, agent, args: Args, global_step: int, device) -> dict:
    """One gradient step on the Huber loss of the Double-DQN target (van Hasselt et al. 2016, Eq. 4):
    y = r + gamma * (1 - terminated) * Q_target(s', argmax_a Q(s', a))."""
    nets, opt, scaler = agent
    q_network, target_network = nets["q_network"], nets["target_network"]
    with torch.no_grad(), autocast(args, device):
        next_actions = q_network(batch.next_observations).argmax(1, keepdim=True)  # the online network selects
        next_q = target_network(batch.next_observations).gather(1, next_actions).float()  # the target evaluates
        # crucial: only death and a win end the return; a truncated episode's next state bootstraps
        td_target = batch.rewards + args.gamma * (1.0 - batch.terminations) * next_q
    with autocast(args, device):
        q_values = q_network(batch.observations).gather(1, batch.actions).float()
    loss = F.smooth_l1_loss(q_values, td_target)  # Huber loss, delta = 1
    check_finite("td_loss", loss, global_step)
    for group in opt.param_groups:
        group["lr"] = learning_rate_at(args, global_step)
    opt.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return {"losses/td_loss": loss.detach(), "losses/q_values": q_values.detach().mean()}


@torch.no_grad()
def allocate_optimizer_state(opt: optim.Optimizer) -> None:
    """Make Adam allocate its moments now, as its first step would (zeros, step 0), so that on a GPU an out-of-memory
    error comes at start-up, not hours in: one step on zero gradients with learning rate 0, then step counts reset."""
    lrs = [group["lr"] for group in opt.param_groups]
    for group in opt.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    for group, lr in zip(opt.param_groups, lrs, strict=True):
        group["lr"] = lr
        for p in group["params"]:
            p.grad = None
    for state in opt.state.values():
        state["step"].zero_()


def build_agent(args: Args, device):
    """The Q-network, its target, Adam (fused: faster on CPU and GPU) with its state allocated, and a GradScaler
    (enabled with --amp on CUDA)."""
    q_network = QNetwork(args).to(device)
    nets = {"q_network": q_network, "target_network": TargetQNetwork(q_network)}
    opt = optim.Adam(q_network.parameters(), lr=args.learning_rate, fused=True)
    allocate_optimizer_state(opt)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    return nets, opt, scaler


def main(args: Args) -> int:
    args.run_name = args.run_name or f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_path = os.path.join(args.run_dir, args.run_name)
    stop = StopRequest(args.run_name)  # first: a signal during set-up ends the process at once, leaving nothing behind
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    try:
        lock = lock_run_folder(run_path)  # a run's folder: locked before its checkpoint is read (None: none yet)
        with setup_step(args.run_name, f"reading {run_path}/{CHECKPOINT_FILE}"):
            saved = resume_state(args, run_path)  # read and checked before anything is written
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if saved is not None and is_complete(run_path, args.total_timesteps):
        print(f"run {run_path} already ended at global_step {args.total_timesteps}; nothing to do", file=sys.stderr)
        return 0
    with setup_step(args.run_name, f"making {args.num_envs} {args.vector_env_mode} envs",
                    args.num_envs * ENV_COST[args.vector_env_mode][1]):  # fmt: skip
        envs = make_vector_env(args)
    with setup_step(args.run_name, "building the networks"):
        agent = build_agent(args, device)  # before the run folder: a failure here leaves nothing behind
    params = {"q_network_params": num_params(agent[0]["q_network"])}
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
        eval_envs = make_eval_envs(args, args.eval_episodes, args.capture_video, f"{run_path}/videos")
    action_seed, replay_seed = np.random.SeedSequence(args.seed).spawn(2)  # independent streams from one seed
    rb = ReplayBuffer(envs.single_observation_space.shape, args.buffer_size, device, replay_seed)
    rngs = {"actions": np.random.default_rng(action_seed), "replay": rb.rng}
    obs, _ = envs.reset(seed=args.seed)  # a resumed run then restores each env's state, random generator included
    if saved is None:
        loop = LoopState(next_eval=args.eval_frequency, next_checkpoint=args.checkpoint_frequency,
                         episode_returns=[0.0] * args.num_envs, episode_lengths=[0] * args.num_envs)  # fmt: skip
    else:
        loop, obs = restore_checkpoint(saved, agent, rb, envs, rngs)
        truncate_evals(run_path, loop.eval_idx)
        print(f"[{args.run_name}] resuming from global_step {loop.global_step} (eval_idx {loop.eval_idx})",
              file=sys.stderr, flush=True)  # fmt: skip
    del saved  # the checkpoint's copy of the replay buffer
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
        final = train(args, envs, eval_envs, agent, rb, writer, run_path, device, loop, rngs, stop, obs)
    except FloatingPointError as err:
        print(f"error: non-finite loss: {err}; run folder kept at {run_path}", file=sys.stderr)
        return 1
    except Interrupted as err:
        print(f"[{args.run_name}] {err}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        writer.close()
        envs.close()
        for env in eval_envs:
            env.close()
    with open(os.path.join(run_path, "final_eval.json"), "w") as f:
        json.dump({"run_name": args.run_name, "args": asdict(args), **params, **final}, f, indent=2)
    report_finished(args.run_name, run_path, final)
    if lock is not None:
        lock.close()  # the folder is free for the next process (on any other return, the process's end frees it)
    return 0


def train(args, envs, eval_envs, agent, rb, writer, run_path, device, loop: LoopState, rngs, stop, obs) -> dict:
    """The DQN loop, from `loop`'s counters to `total_timesteps`. Returns the final evaluation record (also printed
    as a JSON line). Raises Interrupted after the checkpoint that a SIGUSR1/SIGTERM asked for."""
    nets = agent[0]
    progress = Progress(args.run_name, args.total_timesteps, "eval/score")
    start_time, start_step = time.time(), loop.global_step
    while loop.global_step < args.total_timesteps:
        epsilon = linear_schedule(args.start_e, args.end_e, args.exploration_steps, loop.global_step)
        actions = epsilon_greedy(nets["q_network"], obs, epsilon, rngs["actions"], device)
        next_obs, rewards, terminations, truncations, infos = envs.step(actions)
        rb.add(obs, next_obs, actions, rewards, terminations)  # next_obs: the final observation where an episode ended
        loop.global_step += args.num_envs
        done = terminations | truncations
        log_episodes(loop, rewards, done, infos, writer)
        obs = envs.reset(options={"reset_mask": done})[0] if done.any() else next_obs

        if loop.global_step > args.learning_starts:
            logs = dqn_update(rb.sample(args.batch_size), agent, args, loop.global_step, device)
            loop.update_idx += 1
            if loop.update_idx % args.target_network_frequency == 0:
                nets["target_network"].update(nets["q_network"], args.tau)
            if loop.update_idx % 100 == 0:
                sps = int((loop.global_step - start_step) / (time.time() - start_time))
                log_training(writer, logs, epsilon, args, loop.global_step, sps)
                progress.maybe_print(loop.global_step, loop.last_eval)

        if loop.global_step >= loop.next_eval or loop.global_step >= args.total_timesteps:
            loop.last_eval = run_evaluation(args, agent, eval_envs, loop, writer, run_path, device)
            loop.eval_idx, loop.next_eval = loop.eval_idx + 1, loop.next_eval + args.eval_frequency
        maybe_checkpoint(args, agent, rb, envs, obs, loop, rngs, run_path, stop)
    return {**loop.last_eval, **heldout_evaluation(args, nets["q_network"], eval_envs, writer, loop.global_step,
                                                   device, progress)}  # fmt: skip


def log_episodes(loop: LoopState, rewards, done, infos: dict, writer) -> None:
    """Accumulate each training env's episode return and length; log and restart those whose episode ended."""
    for i in range(len(rewards)):
        loop.episode_returns[i] += float(rewards[i])
        loop.episode_lengths[i] += 1
        if done[i]:
            writer.add_scalar("charts/episodic_return", loop.episode_returns[i], loop.global_step)
            writer.add_scalar("charts/episodic_length", loop.episode_lengths[i], loop.global_step)
            writer.add_scalar("charts/episodic_score", infos["score"][i], loop.global_step)
            loop.episode_returns[i], loop.episode_lengths[i] = 0.0, 0


def log_training(writer, logs: dict, epsilon: float, args: Args, global_step: int, sps: int) -> None:
    for key, value in logs.items():
        writer.add_scalar(key, value.item(), global_step)
    writer.add_scalar("charts/epsilon", epsilon, global_step)
    writer.add_scalar("charts/learning_rate", learning_rate_at(args, global_step), global_step)
    writer.add_scalar("charts/SPS", sps, global_step)


def maybe_checkpoint(args, agent, rb, envs, obs, loop: LoopState, rngs, run_path: str, stop: StopRequest) -> None:
    """Between two vector steps: write checkpoint.pt when one is due (every `checkpoint_frequency` steps, at the end,
    or on a signal). Raises Interrupted after writing it for a signal."""
    periodic = args.checkpoint_frequency > 0 and loop.global_step >= loop.next_checkpoint
    if not (periodic or stop.signum or loop.global_step >= args.total_timesteps):
        return
    if args.checkpoint_frequency > 0:
        loop.next_checkpoint = (loop.global_step // args.checkpoint_frequency + 1) * args.checkpoint_frequency
    path = os.path.join(run_path, CHECKPOINT_FILE)
    atomic_torch_save(training_checkpoint(args, agent, rb, envs, obs, loop, rngs), path)
    if stop.signum:
        raise Interrupted(f"stopped by {signal.Signals(stop.signum).name} at global_step {loop.global_step}: "
                          f"checkpoint written to {path}; to resume, rerun the same command with --run-name "
                          f"{args.run_name}")  # fmt: skip


def heldout_evaluation(args, q_network, eval_envs, writer, global_step: int, device, progress: Progress) -> dict:
    """The final evaluation on `final_eval_episodes` episodes whose initial states no periodic evaluation sees
    (seeds from seed + 2_000_000): logged as `heldout/*` and printed as one JSON line without `eval_idx`."""
    if args.final_eval_episodes == 0:
        return {}
    if args.capture_video:  # one video of the held-out evaluation too: its first episode
        first = iter([True])
        eval_envs[0].episode_trigger = lambda _: next(first, False)
    report = lambda done: progress.evaluating(done, args.final_eval_episodes)  # noqa: E731
    result = evaluate(q_network, eval_envs, args.seed + 2_000_000, device, args.final_eval_episodes, "heldout", report)
    for key, value in result.items():
        writer.add_scalar(key, value, global_step)
    record = {"global_step": global_step, **result, "heldout/episodes": args.final_eval_episodes}
    print(json.dumps(record), flush=True)
    return record


def run_evaluation(args, agent, eval_envs, loop: LoopState, writer, run_path, device) -> dict:
    """Evaluate, log to TensorBoard, print the JSON line, append it to evals.jsonl, save the model if asked."""
    result = evaluate(agent[0]["q_network"], eval_envs, args.seed + 1_000_000, device)
    for key, value in result.items():
        writer.add_scalar(key, value, loop.global_step)
    record = {"eval_idx": loop.eval_idx, "global_step": loop.global_step, **result}
    line = json.dumps(record)
    print(line, flush=True)
    with open(os.path.join(run_path, "evals.jsonl"), "a") as f:
        f.write(line + "\n")
    if args.save_model:
        atomic_torch_save({**agent_state(args, agent), "global_step": loop.global_step},
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
