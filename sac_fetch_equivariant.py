# docs and experiment results: docs/sac_fetch.md
"""SAC + HER with a D_N-equivariant actor and critic (escnn) on the gymnasium-robotics Fetch tasks.

SAC: Haarnoja et al. 2018, "Soft Actor-Critic Algorithms and Applications" (arXiv:1812.05905), Eqs. 5-7, 17-18.
HER: Andrychowicz et al. 2017, "Hindsight Experience Replay", 'future' strategy (Sec. 4.5).
Equivariant SAC: Wang et al. 2022, "SO(2)-Equivariant Reinforcement Learning" (ICLR), with D_N instead of C_N.
Its twin `sac_fetch_mlp.py` differs only in the network section.
"""

import contextlib
import ctypes
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
from dataclasses import asdict, dataclass
from typing import Literal, NamedTuple

import farama_notifications
import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
import torch.optim as optim
import tyro
from torch.utils.tensorboard import SummaryWriter

# Known-harmless import-time noise, silenced exactly: gymnasium-robotics' notice about the AdroitHand v1 rewards (this
# script uses only Fetch).
_robotics_notices = farama_notifications.notifications.get("gymnasium_robotics", {})
for _version in [v for v, text in _robotics_notices.items() if text.startswith("AdroitHand")]:
    del _robotics_notices[_version]
import gymnasium_robotics  # noqa: E402
from gymnasium_robotics.utils import rotations  # noqa: E402


@dataclass
class Args:
    """Train SAC + HER with D_N-equivariant networks (escnn) on a gymnasium-robotics Fetch task."""

    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment (torch, numpy, replay sampling, environments)"""
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
    checkpoint_frequency: int = 25_000
    """environment steps between training checkpoints (`<run_dir>/<run_name>/checkpoint.pt`, replay buffer included),
    written at the first episode boundary past each multiple, at the end, and on SIGUSR1/SIGTERM; 0: only the latter"""
    run_dir: str = "runs"
    """the folder that holds one sub-folder per run"""
    run_name: str | None = None
    """the run folder's name (default `{env_id}__{exp_name}__{seed}__{unix_time}`); if `<run_dir>/<run_name>/` holds a
    checkpoint, the run resumes from it"""

    # Algorithm specific arguments
    env_id: str = "FetchPushDense-v4"
    """the Fetch task: Fetch{Reach,Push,PickAndPlace,Slide}[Dense]-v4"""
    total_timesteps: int = 1_000_000
    """total environment steps (transitions, summed over the `num_envs` environments)"""
    num_envs: int = 1
    """the number of parallel training environments"""
    vector_env_mode: Literal["sync", "async"] = "sync"
    """gymnasium vector env: `sync` steps the environments in this process, `async` in subprocesses"""
    buffer_size: int = 1_000_000
    """the replay memory size in transitions (stored as whole episodes)"""
    batch_size: int = 256
    """the batch size of sample from the replay memory"""
    update_ratio: float = 1.0
    """gradient updates (critic updates) per environment transition after `learning_starts`: 0.25 is one update
    every 4 transitions; a vector step of `num_envs` transitions runs `num_envs * update_ratio` on average"""
    bf16: bool = False
    """if toggled, the update's network passes run under bfloat16 autocast (CPUs with AVX512-BF16 or AMX, GPUs; a
    CPU without them emulates it, about 8x slower, and the run says so in one line); weights,
    optimizer states and losses stay float32 (off: the float32 algorithm)"""
    gamma: float = 0.95
    """the discount factor gamma"""
    tau: float = 0.05
    """target smoothing coefficient (Polyak averaging)"""
    policy_lr: float = 3e-4
    """the learning rate of the policy network optimizer"""
    q_lr: float = 1e-3
    """the learning rate of the Q network optimizer"""
    learning_starts: int = 1000
    """environment steps of uniformly random actions before the first update"""
    policy_frequency: int = 2
    """the frequency of policy updates in critic updates (delayed, as in TD3; run that many times to compensate)"""
    target_network_frequency: int = 1
    """the frequency of target network updates in critic updates"""
    alpha: float = 0.2
    """entropy regularization coefficient (initial value when `autotune`)"""
    autotune: bool = True
    """automatic tuning of the entropy coefficient toward `target_entropy`"""
    target_entropy: float = -4.0
    """the policy entropy (nats) the coefficient is tuned toward (Haarnoja et al. 2018's heuristic: -dim(A) = -4)"""
    her_k: int = 4
    """HER relabelled goals per real transition ('future' strategy); 0 disables HER"""
    obs_norm: bool = True
    """if toggled, network inputs are normalised by running statistics of every observation and goal the networks
    are given, in a form that keeps the D_N symmetry (`ObservationNormalizer`); frozen during evaluation"""
    eval_frequency: int = 10_000
    """environment steps between evaluations (a final evaluation always runs at the end)"""
    eval_episodes: int = 10
    """deterministic evaluation episodes per evaluation (one evaluation environment each)"""
    final_eval_episodes: int = 100
    """episodes of the held-out final evaluation, from seeds no periodic evaluation uses, reported apart as
    `heldout/*` (the number to publish; tuners select on `eval/*`); 0 skips it"""

    # Network arguments
    dihedral_n: int = 4
    """N of the symmetry group D_N (rotations by 2*pi/N about the base's z axis and the mirror y -> -y)"""
    reg_rep_n: int | None = None
    """regular-representation fields per hidden layer (width 2 * N * reg_rep_n channels); None: the MLP twin's
    parameter count, the largest n with 2N n^2 <= 256^2 (D_4: 90, D_8: 64, D_16: 45; see `hidden_fields`); 32 gives
    D_4 the MLP's width (256 channels) at a seventh of its parameters"""


# ---------------------------------------------------------------------------------------------------------------------
# Environment: Fetch observations in the robot-base frame, every quantity typed by how D_N acts on it
# ---------------------------------------------------------------------------------------------------------------------
FETCH_TASKS = ("Reach", "Push", "PickAndPlace", "Slide")
SUPPORTED_ENV_IDS = tuple(f"Fetch{task}{reward}-v4" for task in FETCH_TASKS for reward in ("", "Dense"))

# A field is (name, kind). Kinds and their group action (rotation R(theta) about z, mirror F: y -> -y):
#   "vector"       planar xy vector, 2 channels:        v -> R v,   v -> diag(1, -1) v
#   "scalar"       invariant, 1 channel:                 s -> s,     s -> s
#   "pseudoscalar" sign irrep, 1 channel:                s -> s,     s -> -s
POSITION = (("xy", "vector"), ("z", "scalar"))  # [x, y, z]: proper 3-vector
PSEUDOVECTOR = (("yx", "vector"), ("z", "pseudoscalar"))  # [w_y, -w_x, w_z]: axial 3-vector (see to_base_frame)
FINGERS = (("width", "scalar"), ("asymmetry", "pseudoscalar"))  # [r + l, r - l]: the mirror swaps the fingers


def _fields(*groups):
    return tuple((f"{prefix}_{name}", kind) for prefix, parts in groups for name, kind in parts)


REACH_FIELDS = _fields(
    ("grip_pos", POSITION), ("gripper_state", FINGERS), ("grip_velp", POSITION), ("gripper_vel", FINGERS)
)
OBJECT_FIELDS = _fields(
    ("grip_pos", POSITION),
    ("object_pos", POSITION),
    ("object_rel_pos", POSITION),
    ("gripper_state", FINGERS),
    ("object_rot_col0", POSITION),
    ("object_rot_col1", PSEUDOVECTOR),
    ("object_rot_col2", POSITION),
    ("object_velp", POSITION),
    ("object_velr", PSEUDOVECTOR),
    ("grip_velp", POSITION),
    ("gripper_vel", FINGERS),
)
GOAL_FIELDS = _fields(("desired_goal", POSITION))
ACTION_FIELDS = (("action_xy", "vector"), ("action_z", "scalar"), ("action_gripper", "scalar"))
KIND_SIZE = {"vector": 2, "scalar": 1, "pseudoscalar": 1}


def fields_dim(fields) -> int:
    """Number of channels of a field list."""
    return sum(KIND_SIZE[kind] for _, kind in fields)


def _axial(w: np.ndarray) -> np.ndarray:
    """Axial (pseudo) 3-vector [w_x, w_y, w_z] -> [w_y, -w_x, w_z]: xy then transforms as a proper planar vector."""
    return np.array([w[1], -w[0], w[2]])


def to_base_frame(observation: np.ndarray, base_pos: np.ndarray) -> np.ndarray:
    """Raw Fetch observation (world frame) -> typed features in the robot-base frame (x forward, y left).

    Raw layout (gymnasium-robotics `MujocoFetchEnv._get_obs`), 25-d: grip_pos 3, object_pos 3, object_rel_pos 3,
    gripper_state 2, object_rot 3 (Euler angles), object_velp 3, object_velr 3, grip_velp 3, gripper_vel 2;
    Reach, 10-d: grip_pos 3, gripper_state 2, grip_velp 3, gripper_vel 2. Velocities are per control step (m, rad).

    Output: `REACH_FIELDS` (10-d) or `OBJECT_FIELDS` (31-d), in order. Positions are relative to the base; linear
    velocities are unchanged (the base frame is axis-aligned with the world). Euler angles do not transform linearly
    under D_N, so the object's orientation is given as its rotation matrix: under a rotation Q about z it becomes
    Q R, and under the mirror M = diag(1, -1, 1) it becomes M R M, so columns 0 and 2 are proper vectors and column 1
    an axial vector. Axial vectors (angular velocity, column 1) are stored as [w_y, -w_x, w_z]: rotations act on the
    xy part as on a planar vector, the mirror flips w_z. The two finger joints (right, left) swap under the mirror, so
    they are stored as width r + l (scalar) and asymmetry r - l (pseudoscalar).

    Raises:
        ValueError: if `observation` is neither 10-d nor 25-d.
    """
    if observation.shape == (10,):
        grip_pos, fingers, grip_velp, fingers_vel = np.split(observation, [3, 5, 8])
        return np.concatenate([grip_pos - base_pos, _fingers(fingers), grip_velp, _fingers(fingers_vel)])
    if observation.shape != (25,):
        raise ValueError(f"expected a 10-d (Reach) or 25-d Fetch observation, got shape {observation.shape}")
    parts = np.split(observation, [3, 6, 9, 11, 14, 17, 20, 23])
    grip_pos, object_pos, object_rel_pos, fingers, euler, object_velp, object_velr, grip_velp, fingers_vel = parts
    rot = rotations.euler2mat(euler)
    return np.concatenate(
        [
            grip_pos - base_pos,
            object_pos - base_pos,
            object_rel_pos,
            _fingers(fingers),
            rot[:, 0],
            _axial(rot[:, 1]),
            rot[:, 2],
            object_velp,
            _axial(object_velr),
            grip_velp,
            _fingers(fingers_vel),
        ]
    )


def _fingers(q: np.ndarray) -> np.ndarray:
    return np.array([q[0] + q[1], q[0] - q[1]])


class FetchBaseFrame(gym.ObservationWrapper):
    """Fetch observations and goals in the robot-base frame, typed for D_N (see `to_base_frame`).

    `desired_goal` and `achieved_goal` become base-relative positions (GOAL_FIELDS). Rewards are unchanged:
    Fetch's `compute_reward` depends only on goal distances, which the translation keeps.

    Symmetry is extrinsic, not exact: the closest symmetry is the mirror y -> -y through the base's x-z plane, but the
    gripper's start (around which objects and goals are sampled) and the table centre lie 5-6 mm off that plane
    (base y 0.7441, gripper start y 0.7491, table y 0.750) and the arm itself is not mirror-symmetric; rotations about
    z are further off (table edges, reach, Slide's goal offset). The wrapper itself is exactly consistent: transforming
    the raw simulator quantities commutes with this map up to float precision (tests/test_fetch_wrapper.py).
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self._base_body = env.unwrapped.model.body("robot0:base_link").id
        fields = REACH_FIELDS if env.observation_space["observation"].shape == (10,) else OBJECT_FIELDS
        self.fields = fields + GOAL_FIELDS
        box = lambda n: gym.spaces.Box(-np.inf, np.inf, (n,), np.float64)  # noqa: E731
        self.observation_space = gym.spaces.Dict(
            {"observation": box(fields_dim(fields)), "achieved_goal": box(3), "desired_goal": box(3)}
        )

    @property
    def rng_state(self) -> dict:
        """The state of the env's `np_random` (object and goal sampling); with it a Fetch reset is reproducible, since
        `_reset_sim` starts with `mj_resetData`. A property so that vector envs can `get_attr`/`set_attr` it."""
        return self.unwrapped.np_random.bit_generator.state

    @rng_state.setter
    def rng_state(self, state: dict) -> None:
        self.unwrapped.np_random.bit_generator.state = state

    def base_pos(self) -> np.ndarray:
        """The robot base position in the world frame, read from the simulator, (3,) in m."""
        return self.env.unwrapped.data.xpos[self._base_body].copy()

    def observation(self, observation: dict) -> dict:
        base = self.base_pos()
        return {
            "observation": to_base_frame(observation["observation"], base),
            "achieved_goal": observation["achieved_goal"] - base,
            "desired_goal": observation["desired_goal"] - base,
        }


def make_env(env_id: str, capture_video: bool = False, video_dir: str = ""):
    def thunk():
        if capture_video:
            env = gym.make(env_id, render_mode="rgb_array")
            env = gym.wrappers.RecordVideo(env, video_dir, episode_trigger=lambda _: True, disable_logger=True)
        else:
            env = gym.make(env_id)
        return FetchBaseFrame(env)

    return thunk


# One env's memory in bytes and its creation time in seconds on one core (docs/BENCHMARKS.md, "Set-up cost"): `sync`
# in this process, `async` a worker process of its own (its private memory once a garbage
# collection in it has copied the pages it shared with this process)
ENV_COST = {"sync": (10 * 2**20, 0.04), "async": (100 * 2**20, 0.16)}


def make_vector_env(env_id: str, num_envs: int, mode: str, capture_video: bool = False, video_dir: str = ""):
    """Vector env of `num_envs` wrapped Fetch envs without autoreset: Fetch episodes all last `max_episode_steps` and
    start together, so the training loop resets every env at each episode boundary (where checkpoints are taken)."""
    thunks = [make_env(env_id, capture_video and i == 0, video_dir) for i in range(num_envs)]
    vector_cls = gym.vector.AsyncVectorEnv if mode == "async" else gym.vector.SyncVectorEnv
    return vector_cls(thunks, autoreset_mode=gym.vector.AutoresetMode.DISABLED)


# ---------------------------------------------------------------------------------------------------------------------
# Networks: D_N-equivariant actor, D_N-invariant critic (escnn)
# ---------------------------------------------------------------------------------------------------------------------
# escnn is imported here, in the one section that uses it, so that the twins differ only in this section. Its warning
# that py3nj is missing is known and harmless: only SO(3) needs py3nj, D_N never does.
import warnings  # noqa: E402

warnings.filterwarnings("ignore", message="`py3nj` package not found", category=UserWarning)
from escnn import group, gspaces  # noqa: E402
from escnn import nn as enn  # noqa: E402


def planar_vector_rep(G: group.DihedralGroup) -> group.Representation:
    """The "vector" kind: O(2)'s standard representation restricted to D_N (rotation by 2*pi*k/N, flip y -> -y).

    For N >= 3 this is irrep (1, 1); for N = 2 and N = 1 it splits into two 1-d irreps.
    """
    if G.rotation_order == 1:
        return group.directsum([G.irrep(0, 0), G.irrep(1, 0)], name="planar_vector")
    o2 = group.o2_group()
    return o2.restrict_representation((0.0, G.rotation_order), o2.standard_representation())


def field_type(gspace: gspaces.GSpace, fields) -> enn.FieldType:
    """escnn FieldType of a field list: vector -> `planar_vector_rep`, scalar -> trivial, pseudoscalar -> sign irrep."""
    G = gspace.fibergroup
    reps = {"vector": planar_vector_rep(G), "scalar": G.trivial_representation, "pseudoscalar": G.irrep(1, 0)}
    return enn.FieldType(gspace, [reps[kind] for _, kind in fields])


def regular_mlp(in_type: enn.FieldType, hidden_type: enn.FieldType) -> list:
    """Two hidden equivariant layers of regular fields with pointwise ReLU (equivariant for regular fields)."""
    return [
        enn.Linear(in_type, hidden_type),
        enn.ReLU(hidden_type, inplace=True),
        enn.Linear(hidden_type, hidden_type),
        enn.ReLU(hidden_type, inplace=True),
    ]


MLP_TWIN_WIDTH = 256  # sac_fetch_mlp.py's default hidden width (its --hidden-sizes 256 256)


def hidden_fields(args: Args) -> int:
    """Regular fields per hidden layer: `reg_rep_n`, or where it is None the parameter-matched default, the largest n
    with 2N n^2 <= 256^2. The MLP twin's hidden-to-hidden layer has 256^2 weights; a D_N-equivariant linear map
    between n regular fields has |D_N| n^2 = 2N n^2 free parameters (one per group element and pair of fields), so
    the two match at n = 256 / sqrt(2N), rounded down: D_4 90 (68.7k parameters per network on Push against the
    MLP's 76.8k), D_8 64 (68.3k), D_16 45. On FetchPush-v4 this width learns and D_4 at the MLP's width (32 fields,
    9.6k parameters) does not (docs/BENCHMARKS.md, "FetchPush-v4")."""
    if args.reg_rep_n is not None:
        return args.reg_rep_n
    return max(1, math.isqrt(MLP_TWIN_WIDTH**2 // (2 * args.dihedral_n)))


def network_setup(args: Args):
    """The gspace of D_N acting on the base frame (no base space: the inputs are vectors, not images)."""
    G = group.dihedral_group(args.dihedral_n)
    gspace = gspaces.no_base_space(G)
    return gspace, enn.FieldType(gspace, hidden_fields(args) * [G.regular_representation])


NETWORK_ARGS = ("dihedral_n", "reg_rep_n")


def dense_widths(in_dim: int, out_dim: int, args: Args) -> list[int]:
    """Widths of one network's layers as dense matrices (escnn expands every equivariant weight to one)."""
    width = 2 * args.dihedral_n * hidden_fields(args)  # |D_N| = 2N channels per regular field
    return [in_dim, width, width, out_dim]


# escnn's first build of D_N solves about 6 N^2 Clebsch-Gordan problems, each in a time that grows with N: about
# 0.012 N^3 s in all on one core (docs/BENCHMARKS.md, "Set-up cost": D_8 11 s, D_16 48 s, D_24 163 s measured, D_64
# about 53 min); it caches them on disk (in its package folder), so that a later build of D_N takes seconds. Its
# regular-to-regular basis, sampled and normalised, and the fast path's probe of it (`RegularFourier.block_basis`)
# hold a few (2N)^3 float32 arrays at once.
MAX_DIHEDRAL_N = 64


def first_build_seconds(n: int) -> float:
    """Estimated seconds of escnn's first build of the D_n networks (MAX_DIHEDRAL_N's comment)."""
    return 5.0 + 0.012 * n**3


def network_build_cost(args: Args) -> tuple[str, int]:
    """What building the networks is, for the set-up line (said once it has taken 5 s: a D_N escnn has cached builds in
    about 3 s), and the bytes it needs beyond the dense weights that `check_memory` counts: escnn's (2N)^3 arrays, 8
    of them (an upper bound)."""
    n = args.dihedral_n
    building = f"building the D_{n} networks (escnn: up to {clock(first_build_seconds(n))} the first time, then cached)"
    return building, 8 * 4 * (2 * n) ** 3


def validate_network_args(args: Args) -> None:
    """Raise ValueError on a bad network argument; a None `reg_rep_n` becomes its number (`hidden_fields`), so that
    config.json, checkpoints and a resume's comparison of arguments hold the width the run used."""
    n, top = args.dihedral_n, MAX_DIHEDRAL_N
    if n > top:  # one line: the range, and why (docs/BENCHMARKS.md, "Set-up cost")
        raise ValueError(f"--dihedral-n must be in [1, {top}] (escnn's first build of D_N grows as N^3: D_{top} about "
                         f"{clock(first_build_seconds(top))}, D_{n} about {clock(first_build_seconds(n))}), "
                         f"got {n}")  # fmt: skip
    if n < 1:
        raise ValueError(f"--dihedral-n must be in [1, {top}], got {n}")
    if args.reg_rep_n is not None and args.reg_rep_n < 1:
        raise ValueError(f"--reg-rep-n must be >= 1, got {args.reg_rep_n}")
    args.reg_rep_n = hidden_fields(args)


def exact_zeros(t: torch.Tensor) -> torch.Tensor:
    """Zero the entries below 1e-9 in magnitude: rounding noise of exact zeros (cos(pi / 2) = 6e-17), which would
    otherwise make denormal numbers in the products and slow the CPU down by up to 10x."""
    return torch.where(t.abs() < 1e-9, 0.0, t)


class RegularFourier(torch.nn.Module):
    """The fast path's constants: D_N's regular representation in its irreducible (Fourier) basis.

    escnn writes rho_reg(g) = Q (direct sum of irreps psi(g)) Q^-1. Every irrep of D_N is 1-d or 2-d and absolutely
    irreducible, and rho_reg holds each irrep psi d_psi times, so by Schur's lemma an equivariant linear map between k
    regular fields is, in this basis, one (k d_psi) x (k d_psi) matrix per irrep acting on the irrep's copies, times the
    identity on the irrep's space: (n1 + 8 n2) k^2 multiply-adds per sample instead of (2N k)^2 for the dense matrix
    (D_8: 28 k^2 against 256 k^2), plus two transforms of 2 (2N)^2 k. Coordinates are reordered so that every irrep
    block acts on a contiguous slice, a view for the batched products: the n1 1-d irreps first (row r), then the 2-d
    irreps' component 0 as (irrep r, copy b) pairs (row n1 + 2 r + b), then their component 1 (row n1 + 2 n2 + 2 r + b).

    Buffers (not in state_dict: they follow from N): `to_fourier` (|G|, |G|) = Q^-1 with permuted rows,
    `from_fourier` its inverse. See Cohen and
    Welling 2016, "Group Equivariant Convolutional Networks"; escnn (Cesa, Lang and Weiler 2022) stays the definition
    of every layer and the reference in tests.
    """

    def __init__(self, G: group.DihedralGroup):
        super().__init__()
        reg = G.regular_representation
        copies, position = {}, 0  # irrep id -> its copies' coordinate indices, in escnn's order
        for irrep_id in reg.irreps:
            size = G.irrep(*irrep_id).size
            copies.setdefault(irrep_id, []).append(list(range(position, position + size)))
            position += size
        one_d = [c[0][0] for c in copies.values() if len(c[0]) == 1]
        two_d = [c[b][i] for i in range(2) for c in copies.values() if len(c[0]) == 2 for b in range(2)]
        self.order, self.n1, self.n2 = G.order(), len(one_d), len(two_d) // 4
        to_fourier = exact_zeros(torch.as_tensor(reg.change_of_basis_inv[one_d + two_d], dtype=torch.float64))
        from_fourier = exact_zeros(torch.linalg.inv(to_fourier))
        for name, value in {"to_fourier": to_fourier, "from_fourier": from_fourier}.items():
            self.register_buffer(name, value.float().contiguous(), persistent=False)

    def block_basis(self, layer: enn.Linear) -> torch.Tensor:
        """(|G|, |G|) matrix T such that a k -> k regular `layer`'s Fourier blocks are weights.view(k, k, |G|) @ T:
        column r < n1 holds 1-d irrep r's entry, column n1 + 4 r + 2 a + b the (copy a, copy b) entry of 2-d irrep r
        (read on its component 0; Schur's lemma makes it the same on component 1).

        escnn orders a layer's weights as (out field, in field, basis element), with one basis for every pair of
        regular fields: it is probed here on a one-field layer, one unit weight vector at a time."""
        one_field = enn.FieldType(layer.in_type.gspace, layer.in_type.representations[:1])
        probe = enn.Linear(one_field, one_field, bias=False)
        size = probe.basisexpansion.dimension()
        with torch.no_grad():
            basis = torch.stack([probe.basisexpansion(e).reshape(self.order, self.order) for e in torch.eye(size)])
            basis = exact_zeros(self.to_fourier @ basis @ self.from_fourier)  # (basis, F, F)
        n1 = self.n1
        two_d = [basis[:, n1 + 2 * r + a, n1 + 2 * r + b] for r in range(self.n2) for a in range(2) for b in range(2)]
        return torch.cat([basis[:, range(n1), range(n1)], *[t.unsqueeze(1) for t in two_d]], 1)


def expansion_map(layer: enn.Linear, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """escnn's weight expansion of `layer` as a sparse linear map, with the matrix's rows and columns permuted by
    `rows` and `cols`: matrix.flatten() = sum_t layer.weights[index[t]] * coef[t], index and coef (K, out * in), K the
    most parameters one matrix entry depends on.

    Probed from escnn's own expansion: the parameters that differ only in their output field touch disjoint rows, so
    each probe sets one such group to 1 and attributes every nonzero entry by its row's field."""
    size, shape = layer.basisexpansion.dimension(), (layer.out_type.size, layer.in_type.size)
    groups = {}
    for info in layer.basisexpansion.get_basis_info():
        key = (info["in_field_position"], info["block_id"], info["in_repr"], info["out_repr"])
        groups.setdefault(key, {})[info["out_field_position"]] = info["id"]
    field_of_row = torch.repeat_interleave(torch.tensor([r.size for r in layer.out_type.representations]))[rows]
    entries, params, values = [], [], []
    with torch.no_grad():
        for by_field in groups.values():
            weights, param_of_field = torch.zeros(size), torch.zeros(len(layer.out_type), dtype=torch.long)
            weights[list(by_field.values())] = 1.0
            param_of_field[list(by_field)] = torch.tensor(list(by_field.values()))
            matrix = exact_zeros(layer.basisexpansion(weights).reshape(shape)[rows][:, cols])
            row, col = matrix.nonzero(as_tuple=True)
            entries.append(row * shape[1] + col), params.append(param_of_field[field_of_row[row]])
            values.append(matrix[row, col])
    entries, params, values = torch.cat(entries), torch.cat(params), torch.cat(values)
    counts = torch.bincount(entries, minlength=shape[0] * shape[1])
    order = torch.argsort(entries, stable=True)
    entries, params, values = entries[order], params[order], values[order]
    slot = torch.arange(len(entries)) - (torch.cumsum(counts, 0) - counts)[entries]
    index = torch.zeros(int(counts.max()), shape[0] * shape[1], dtype=torch.long)
    coef = torch.zeros(index.shape)
    index[slot, entries], coef[slot, entries] = params, values
    return index, coef


def expand(weights: torch.Tensor, index: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """The sparse linear map of `expansion_map`: (P,) parameters -> (out * in,) matrix entries."""
    out = weights.index_select(0, index[0]) * coef[0]
    for t in range(1, len(index)):
        out = torch.addcmul(out, weights.index_select(0, index[t]), coef[t])
    return out


class RegularMLPWeights(torch.nn.Module):
    """A `regular_mlp` network's weights in the fast path's form, computed from escnn's parameters at each call,
    differentiably (gradients reach escnn's `weights` and `bias`); no escnn code runs on this hot path.

    Hidden channels are ordered (group element, field): escnn's (field, group element) transposed. Calling it returns
    [W1 (|G|, k, in + 1) (the first layer's bias as its last column), M1 (n1, k, k), c1 (n1, k, 1), M2 (n2, 2k, 2k),
    W3 (out, |G| k or k), b3 (out, 1)]; `stack_weights` stacks E networks' lists for `regular_hidden`.
    """

    def __init__(self, first: enn.Linear, hidden: enn.Linear, head: enn.Linear, fourier: RegularFourier):
        super().__init__()
        self.escnn_layers = (first, hidden, head)  # a tuple: their owner registers them
        order, n1, n2 = fourier.order, fourier.n1, fourier.n2
        self.k = k = hidden.in_type.size // order
        group_major = torch.arange(order * k).view(k, order).T.flatten()  # position (g, j) <- escnn's j * |G| + g
        head_cols = group_major if head.in_type.size == order * k else torch.arange(head.in_type.size)
        index1, coef1 = expansion_map(first, group_major, torch.arange(first.in_type.size))
        index3, coef3 = expansion_map(head, torch.arange(head.out_type.size), head_cols)
        hidden_bias = fourier.to_fourier[:n1] @ hidden.bias_expansion.view(k, order, -1).transpose(0, 1).flatten(1)
        constants = {"index1": index1, "coef1": coef1, "bias1": first.bias_expansion[group_major],
                     "blocks": fourier.block_basis(hidden), "bias2": hidden_bias.view(n1, k, -1),
                     "index3": index3, "coef3": coef3, "bias3": head.bias_expansion}  # fmt: skip
        for name, value in constants.items():
            self.register_buffer(name, value, persistent=False)
        self.order, self.n1, self.n2 = order, n1, n2

    def forward(self) -> list:
        (first, hidden, head), k, n1, n2 = self.escnn_layers, self.k, self.n1, self.n2
        w1 = expand(first.weights, self.index1, self.coef1).view(self.order, k, -1)
        w1 = torch.cat([w1, (self.bias1 @ first.bias).view(self.order, k, 1)], 2)
        blocks = hidden.weights.view(k, k, -1) @ self.blocks  # (out field i, in field j, Fourier coordinate)
        m1 = blocks[..., :n1].permute(2, 0, 1)
        m2 = blocks[..., n1:].reshape(k, k, n2, 2, 2).permute(2, 3, 0, 4, 1).reshape(n2, 2 * k, 2 * k)
        w3 = expand(head.weights, self.index3, self.coef3).view(len(self.bias3), -1)
        return [w1, m1, (self.bias2 @ hidden.bias).unsqueeze(2), m2, w3, (self.bias3 @ head.bias).unsqueeze(1)]


def stack_weights(per_network: list) -> list:
    """E networks' `RegularMLPWeights` -> the layout of `regular_hidden`: each weight with the ensemble dimension E
    first, W1 (E, |G|, k, in + 1), M1 (E, n1, k, k), c1 (E, n1, k, 1), M2 (E, n2, 2k, 2k), W3 (E, out, .),
    b3 (E, out, 1), so that one network's activations are contiguous and every block product reads views."""
    return [torch.stack(w) for w in zip(*per_network, strict=True)]


class NoGradCache:
    """The fast path's weights of one module, computed once and reused by every pass that builds no graph (acting,
    the targets' next actions, the actor loss's critics, Polyak averaging) until a parameter changes.

    The key is each parameter's storage and version counter, which in-place changes (`load_state_dict`,
    `torch.nn.init`, a for-loop optimizer) increment; fused Adam does not, so its steps call `clear` (`build_agent`
    registers the hook). A pass that needs parameter gradients recomputes the weights."""

    def __init__(self, params: list):
        self.params, self.key, self.value = params, None, None

    def clear(self) -> None:
        self.key, self.value = None, None

    def get(self, compute):
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.params):
            return compute()
        key = [(p.data_ptr(), p._version) for p in self.params]
        if key != self.key:  # float32 also under --bf16 autocast: the weights' consumers cast them
            with torch.no_grad(), torch.autocast(self.params[0].device.type, enabled=False):
                self.value = compute()
            self.key = key
        return self.value


def regular_hidden(weights: list, fourier: RegularFourier, x: torch.Tensor, relu_output: bool = True) -> tuple:
    """Both hidden layers of E networks (`stack_weights`) on one input: x (batch, in) -> E tensors of ReLU activations
    (|G|, k, batch), or of the second layer's pre-activations if not `relu_output`.

    Layer 1 is one dense product for all E networks (its bias a column of W1 against a row of ones). Layer 2
    transforms every field to the Fourier basis (one product over the group dimension, which comes first), applies
    each irrep's block to the copies of that irrep (batched products on views: the 1-d irreps, then each component of
    the 2-d irreps), and transforms back, so that ReLU acts pointwise on the group elements, as escnn's does. Each
    network's slices come from `unbind` and `split`, whose gradients are concatenations, not zero-filled copies.
    """
    w1, m1, c1, m2 = weights[:4]
    order, k, batch, n1, n2 = w1.shape[1], w1.shape[2], x.shape[0], fourier.n1, fourier.n2
    x1 = torch.cat([x, x.new_ones(batch, 1)], 1)
    h = torch.relu_(w1.view(-1, w1.shape[-1]) @ x1.T).view(w1.shape[0], order, k * batch)
    parts, outputs = [n1] + [2 * n2] * (2 if n2 else 0), []
    for h_e, m1_e, c1_e, m2_e in zip(h.unbind(0), m1.unbind(0), c1.unbind(0), m2.unbind(0), strict=True):
        f1, *f2 = (fourier.to_fourier @ h_e).split(parts)  # per field, group -> Fourier
        y = [torch.baddbmm(c1_e, m1_e, f1.view(n1, k, batch)).view(n1, -1)]
        y += [torch.bmm(m2_e, f.view(n2, 2 * k, batch)).view(2 * n2, -1) for f in f2]  # (copy a, field i)
        y = fourier.from_fourier @ (torch.cat(y) if n2 else y[0])
        outputs.append((torch.relu_(y) if relu_output else y).view(order, k, batch))
    return tuple(outputs)


def upgrade_target_weights(state_dict: dict, prefix: str) -> None:
    """Convert, in place, target critics' weights (`TargetQNetworks`) saved in the earlier 7-tensor layout, which
    checkpoints up to commit 3e0b149 hold, to `stack_weights`' layout: W1 (|G|, E, k, in) and its bias
    b1 (|G|, E, k, 1) become one W1 (E, |G|, k, in + 1); M1, c1 and M2 move E first. The numbers are the same, so a
    run checkpointed by that code resumes exactly."""
    keys = [f"{prefix}weight{i}" for i in range(7)]
    if all(key in state_dict for key in keys):
        w1, b1, m1, c1, m2, w3, b3 = (state_dict.pop(key) for key in keys)
        layout = [torch.cat([w1, b1], -1).transpose(0, 1), m1.transpose(0, 1), c1.transpose(0, 1), m2.transpose(0, 1),
                  w3, b3]  # fmt: skip
        state_dict.update({key: w.contiguous() for key, w in zip(keys[:6], layout, strict=True)})


class GroupMaxPool(torch.autograd.Function):
    """Group pooling (escnn's `GroupPooling`): (|G|, ...) -> (...), the max over the group elements.

    The gradient goes to the first maximal element, as with torch.max (escnn); computed with a mask, not with
    `amax`'s backward, several times slower on CPU. Ties of maxima <= 0 need no tie-break: the critic's ReLU after
    the pooling passes them no gradient."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        pooled = h.amax(0)
        ctx.save_for_backward(h, pooled)
        return pooled

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        h, pooled = ctx.saved_tensors
        mask = h >= pooled
        ties = mask.view(torch.uint8).sum(0, dtype=torch.int16) > 1  # (uint8 arithmetic: 4x faster than bool's)
        if (ties & (pooled > 0)).any():  # a positive tie: keep the first maximal element only
            mask &= mask.cumsum(0) == 1
        return mask.view(torch.uint8) * grad


class SoftQNetworks(torch.nn.Module):
    """The two invariant critics Q1, Q2, evaluated together: typed observation and action fields -> regular hidden
    layers -> group pooling -> Q. escnn modules `qf1`, `qf2` define them and hold the parameters; `forward` is the
    fast path (`RegularMLPWeights`, `regular_hidden`), `reference_forward` escnn's own evaluation, the tests' reference.

    Input x: (batch, fields_dim(obs_fields)), a: (batch, 4). Output: (2, batch, 1), invariant under D_N.
    """

    def __init__(self, obs_fields, args: Args):
        super().__init__()
        gspace, hidden_type = network_setup(args)
        self.in_type = field_type(gspace, tuple(obs_fields) + ACTION_FIELDS)
        for name in ("qf1", "qf2"):
            pool = enn.GroupPooling(hidden_type)  # (batch, |G| * reg_rep_n) -> (batch, reg_rep_n) invariant
            head = enn.Linear(pool.out_type, enn.FieldType(gspace, [gspace.trivial_repr]))
            setattr(self, name, enn.SequentialModule(*regular_mlp(self.in_type, hidden_type), pool, head))
        self.train()  # escnn builds an expanded-weight cache at construction; train() drops it: state_dict = parameters
        self.fourier = RegularFourier(gspace.fibergroup)
        self.weights1 = RegularMLPWeights(self.qf1[0], self.qf1[2], self.qf1[5], self.fourier)
        self.weights2 = RegularMLPWeights(self.qf2[0], self.qf2[2], self.qf2[5], self.fourier)
        self.cache = NoGradCache([*self.qf1.parameters(), *self.qf2.parameters()])

    def dense_weights(self) -> list:
        """Both critics' `RegularMLPWeights`, stacked (`stack_weights`); cached for passes without gradients."""
        return self.cache.get(lambda: stack_weights([self.weights1(), self.weights2()]))

    def parameters_changed(self) -> None:
        """Drop the cached weights (called after every optimizer step)."""
        self.cache.clear()

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.forward_with(self.dense_weights(), x, a)

    def forward_with(self, weights: list, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Q-values (2, batch, 1) from `dense_weights()`-shaped weights (the target critics' too).

        ReLU is monotone, so it commutes with the max over the group: pooling the pre-activations and applying ReLU
        to the |G| times smaller result is escnn's ReLU then GroupPooling, value and gradient."""
        ys = regular_hidden(weights, self.fourier, torch.cat([x, a], 1), relu_output=False)  # 2 x (|G|, k, batch)
        pooled = torch.relu(torch.stack([GroupMaxPool.apply(y) for y in ys]))  # (2, k, batch), invariant
        return torch.baddbmm(weights[5], weights[4], pooled).transpose(1, 2)  # (2, batch, 1)

    def reference_forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        inputs = self.in_type(torch.cat([x, a], 1))
        return torch.stack([self.qf1(inputs).tensor, self.qf2(inputs).tensor])


class Actor(torch.nn.Module):
    """Equivariant Gaussian policy head: (dx, dy) mean as a planar vector, dz and gripper means invariant, log-std
    invariant with sigma_x = sigma_y (an isotropic xy Gaussian commutes with rotations and the mirror). escnn's
    `net` defines it and holds the parameters; `forward` is the fast path, `reference_forward` the reference.

    Input x: (batch, fields_dim(obs_fields)). Output: mean (batch, 4), unbounded log_std (batch, 4).
    """

    def __init__(self, obs_fields, args: Args):
        super().__init__()
        gspace, hidden_type = network_setup(args)
        self.in_type = field_type(gspace, obs_fields)
        out_fields = ACTION_FIELDS + (("log_std_xy", "scalar"), ("log_std_z", "scalar"), ("log_std_gripper", "scalar"))
        out_type = field_type(gspace, out_fields)
        self.net = enn.SequentialModule(*regular_mlp(self.in_type, hidden_type), enn.Linear(hidden_type, out_type))
        self.train()  # drop escnn's construction-time weight cache: state_dict holds parameters only
        self.fourier = RegularFourier(gspace.fibergroup)
        self.weights = RegularMLPWeights(self.net[0], self.net[2], self.net[4], self.fourier)
        self.cache = NoGradCache(list(self.net.parameters()))

    def parameters_changed(self) -> None:
        """Drop the cached weights (called after every optimizer step)."""
        self.cache.clear()

    def forward(self, x: torch.Tensor):
        weights = self.cache.get(lambda: stack_weights([self.weights()]))
        (h,) = regular_hidden(weights, self.fourier, x)
        out = torch.addmm(weights[5].squeeze(0), weights[4].squeeze(0), h.view(-1, x.shape[0])).T.contiguous()
        return self._split(out)  # (batch, 7): mean_xy 2, mean_z, mean_gripper, log_std xy, z, gripper

    def reference_forward(self, x: torch.Tensor):
        return self._split(self.net(self.in_type(x)).tensor)

    @staticmethod
    def _split(out: torch.Tensor):
        return out[:, :4], out[:, [4, 4, 5, 6]]


class ObservationNormalizer(torch.nn.Module):
    """Running normalisation of the network inputs (observation fields, then the goal) that commutes with D_N for
    every N. Per field kind (see `to_base_frame`):

        scalar        (x - mean) / std
        pseudoscalar  x / sqrt(E[x^2])                     no shift: the mirror negates it
        vector        v / sqrt(E[|v|^2] / 2), one scale    no shift: a planar vector has no invariant part for N >= 2

    with every scale at least `eps`, then clipped to `clip`: scalars and pseudoscalars elementwise, vectors by their
    norm (an elementwise clip would break the rotations). After Plappert et al. 2018 (HER baselines: running
    mean/std, eps 0.01, clip 5), restricted to the D_N-equivariant form.

    Statistics are float64 weighted sums per input coordinate (each coordinate counts its own rows: observations and
    goals are gathered from different places, see `train`), kept as buffers (saved in checkpoints and model.pt);
    nothing updates them during evaluation.

    Input and output: (batch, fields_dim(fields)) float32. With `enabled=False`, or before any `update`, the identity
    (up to the clip).

    Raises:
        ValueError: on an unknown `form`, or in `update` if the rows do not fit the columns from `start`.
    """

    FORMS = ("symmetric",)

    def __init__(self, fields, enabled: bool = True, form: str = "symmetric", clip: float = 5.0, eps: float = 0.01):
        super().__init__()
        if form not in self.FORMS:
            raise ValueError(f"normaliser form must be one of {self.FORMS}, got {form!r}")
        self.enabled, self.form, self.clip, self.eps = enabled, form, clip, eps
        kinds = [kind for _, kind in fields for _ in range(KIND_SIZE[kind])]
        index = lambda kind: torch.tensor([i for i, k in enumerate(kinds) if k == kind], dtype=torch.long)  # noqa: E731
        self.register_buffer("scalar_idx", index("scalar"), persistent=False)
        self.register_buffer("pseudo_idx", index("pseudoscalar"), persistent=False)
        self.register_buffer("vector_idx", index("vector").view(-1, 2), persistent=False)  # (x, y) channel pairs
        dim = len(kinds)
        self.register_buffer("count", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("sum", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("sum_sq", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("shift", torch.zeros(dim), persistent=False)
        self.register_buffer("scale", torch.ones(dim), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _: module.refresh())

    @torch.no_grad()
    def update(self, rows, weights=None, start: int = 0) -> None:
        """Add (n, k) collected inputs of columns start .. start + k - 1 to the statistics, each row with its weight
        (`weights` (n,), default 1: a weight is a row's expected count)."""
        if not self.enabled:
            return
        x = torch.as_tensor(rows, dtype=torch.float64, device=self.sum.device)
        if x.ndim != 2 or start < 0 or start + x.shape[1] > self.sum.shape[0]:
            raise ValueError(f"rows {tuple(x.shape)} from column {start} do not fit {self.sum.shape[0]} columns")
        w = torch.ones(x.shape[0], dtype=torch.float64, device=x.device) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64, device=x.device)  # fmt: skip
        cols = slice(start, start + x.shape[1])
        self.count[cols] += w.sum()
        self.sum[cols] += w @ x
        self.sum_sq[cols] += w @ x.square()
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute `shift` and `scale` from the sums (also after `load_state_dict`); columns with no rows yet keep
        shift 0 and scale 1."""
        seen = self.count > 0
        count = self.count.clamp_min(1.0)
        mean, second = self.sum / count, self.sum_sq / count
        shift, scale = mean.clone(), (second - mean.square()).clamp_min(0.0).sqrt()
        p, v = self.pseudo_idx, self.vector_idx
        shift[p], scale[p] = 0.0, second[p].sqrt()
        shift[v], scale[v] = 0.0, (second[v].sum(1, keepdim=True) / 2).sqrt()  # (pairs, 1) -> both channels
        shift, scale = torch.where(seen, shift, 0.0), torch.where(seen, scale.clamp_min(self.eps), 1.0)
        self.shift.copy_(shift), self.scale.copy_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        y = (x - self.shift) / self.scale
        out = y.clamp(-self.clip, self.clip)
        v = y[:, self.vector_idx]  # (batch, pairs, 2)
        norm = torch.linalg.vector_norm(v, dim=2, keepdim=True)
        out[:, self.vector_idx] = v * (self.clip / norm.clamp_min(self.clip))  # radial clip: |v| <= clip
        return out


def observation_normalizer(fields, args: Args) -> ObservationNormalizer:
    """The normaliser this network gets: the D_N-symmetric form (off with `--no-obs-norm`)."""
    return ObservationNormalizer(fields, enabled=args.obs_norm)


# ---------------------------------------------------------------------------------------------------------------------
# Policy distribution: Gaussian squashed radially into the unit disk (xy) and by tanh (z, gripper)
# ---------------------------------------------------------------------------------------------------------------------
LOG_STD_MAX = 2
LOG_STD_MIN = -5


def _log1m_tanh2(x: torch.Tensor) -> torch.Tensor:
    """log(1 - tanh(x)^2), numerically stable (Spinning Up's SAC)."""
    return 2.0 * (math.log(2.0) - x - F.softplus(-2.0 * x))


def squash(u: torch.Tensor) -> torch.Tensor:
    """(batch, 4) -> actions: xy = tanh(|u_xy|) u_xy / |u_xy| (open unit disk), z and gripper = tanh(u).

    Elementwise tanh into the box is only D_4-symmetric; the radial squash commutes with every rotation and mirror of
    the plane, so the whole stochastic policy stays D_N-equivariant for every N.
    """
    r = u[:, :2].norm(dim=1, keepdim=True)
    return torch.cat([u[:, :2] * _tanh_ratio(r), torch.tanh(u[:, 2:])], 1)


def _tanh_ratio(r: torch.Tensor) -> torch.Tensor:
    """tanh(r) / r for r >= 0, with its Taylor series 1 - r^2/3 near 0."""
    return torch.where(r > 1e-4, torch.tanh(r) / r.clamp_min(1e-4), 1.0 - r * r / 3.0)


def squash_log_det(u: torch.Tensor) -> torch.Tensor:
    """log |det d squash(u) / du|, (batch, 4) -> (batch,).

    For the radial map f(u) = g(r) u / r in the plane, det Df = g'(r) g(r) / r; with g = tanh this gives
    log(1 - tanh(r)^2) + log(tanh(r) / r). The z and gripper terms are SAC's tanh correction (Haarnoja 2018, Eq. 21).
    """
    r = u[:, :2].norm(dim=1)
    return _log1m_tanh2(r) + torch.log(_tanh_ratio(r)) + _log1m_tanh2(u[:, 2:]).sum(1)


def get_action(actor: torch.nn.Module, x: torch.Tensor, noise: torch.Tensor | None = None):
    """Sample a ~ pi(.|x) with the reparameterisation trick.

    Args:
        x: (batch, obs_dim) observations with the goal appended.
        noise: optional (batch, 4) standard normal noise (default: fresh samples).
    Returns:
        action (batch, 4), log_prob (batch, 1) in nats, deterministic action squash(mean) (batch, 4).
    """
    mean, log_std = (out.float() for out in actor(x))  # float32 under --bf16 autocast too
    log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(log_std) + 1)
    std = log_std.exp()
    if noise is None:
        noise = torch.randn_like(mean)
    u = mean + std * noise
    gaussian_log_prob = (-0.5 * noise.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(1)
    log_prob = gaussian_log_prob - squash_log_det(u)
    return squash(u), log_prob.unsqueeze(1), squash(mean)


def random_actions(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 4) actions uniform on the policy's action set: the unit disk (xy) times [-1, 1]^2 (mirror-symmetric)."""
    radius, angle = np.sqrt(rng.uniform(size=n)), rng.uniform(0, 2 * np.pi, size=n)
    xy = np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1)
    return np.concatenate([xy, rng.uniform(-1, 1, size=(n, 2))], 1).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Replay buffer with hindsight experience replay
# ---------------------------------------------------------------------------------------------------------------------
class ReplayBatch(NamedTuple):
    observations: torch.Tensor  # (batch, obs_dim + goal_dim): observation with the (relabelled) goal
    next_observations: torch.Tensor  # (batch, obs_dim + goal_dim)
    actions: torch.Tensor  # (batch, 4)
    rewards: torch.Tensor  # (batch, 1), from compute_reward(next achieved goal, goal)


class HerReplayBuffer:
    """Whole-episode replay memory with HER's 'future' relabelling (Andrychowicz et al. 2017, Sec. 4.5).

    Fetch episodes have a fixed length T (truncation, never termination), so episodes are stored as (T + 1)-step
    arrays and a transition becomes sampleable once its episode is complete. With probability her_k / (her_k + 1) a
    sampled transition's goal is replaced by the achieved goal at a uniform future step in [t + 1, T] of the same
    episode; every reward is recomputed with the env's `compute_reward(achieved_goal, goal, info)`.

    Raises:
        RuntimeError: in `add`, if an episode terminates or ends after a number of steps other than T.
    """

    def __init__(self, obs_dim, goal_dim, action_dim, episode_length, buffer_size, num_envs, her_k, compute_reward,
                 device, seed):  # fmt: skip
        self.T, self.her_k, self.compute_reward, self.device = episode_length, her_k, compute_reward, device
        self.capacity = max(buffer_size // episode_length, 1)  # episodes
        self.rng = np.random.default_rng(seed)
        shapes = {"obs": (episode_length + 1, obs_dim), "ag": (episode_length + 1, goal_dim),
                  "g": (episode_length, goal_dim), "actions": (episode_length, action_dim)}  # fmt: skip
        self.storage = {k: np.zeros((self.capacity, *s), np.float32) for k, s in shapes.items()}
        self.staging = {k: np.zeros((num_envs, *s), np.float32) for k, s in shapes.items()}
        self.t = np.zeros(num_envs, np.int64)  # step index inside each env's current episode
        self.num_episodes, self.next_slot = 0, 0

    def add(self, obs, next_obs, actions, terminations, truncations) -> list[int]:
        """Store one vector step. obs/next_obs: dicts of (num_envs, dim); actions (num_envs, 4); flags (num_envs,).
        Returns the storage slots of the episodes this step completed."""
        slots = []
        for i in range(len(actions)):
            t = self.t[i]
            for key, src in (("obs", obs["observation"]), ("ag", obs["achieved_goal"]), ("g", obs["desired_goal"]),
                             ("actions", actions)):  # fmt: skip
                self.staging[key][i, t] = src[i]
            self.t[i] += 1
            if terminations[i] or truncations[i] or t + 1 == self.T:
                if terminations[i] or not truncations[i] or t + 1 != self.T:
                    raise RuntimeError(f"HER buffer expects {self.T}-step truncated episodes, env {i} ended at step "
                                       f"{t + 1} with terminated={bool(terminations[i])}")  # fmt: skip
                self.staging["obs"][i, self.T] = next_obs["observation"][i]
                self.staging["ag"][i, self.T] = next_obs["achieved_goal"][i]
                slots.append(self.next_slot)
                self._commit(i)
        return slots

    def _commit(self, i: int) -> None:
        for key, episodes in self.storage.items():
            episodes[self.next_slot] = self.staging[key][i]
        self.next_slot = (self.next_slot + 1) % self.capacity
        self.num_episodes = min(self.num_episodes + 1, self.capacity)
        self.t[i] = 0

    def sample_indices(self, batch_size: int):
        """Episode index, step t, goal step (t + 1 .. T in 'future', -1 = the episode's own goal), each (batch,)."""
        ep = self.rng.integers(0, self.num_episodes, batch_size)
        t = self.rng.integers(0, self.T, batch_size)
        future_t = t + 1 + (self.rng.uniform(size=batch_size) * (self.T - t)).astype(np.int64)
        relabel = self.rng.uniform(size=batch_size) < self.her_k / (self.her_k + 1)
        return ep, t, np.where(relabel, future_t, -1)

    def goal_distribution(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """The goals a sampled transition of the episode in `slot` can carry, with their expected counts per T sampled
        transitions (the weights sum to T): its desired goals g[t], t < T, each 1 / (her_k + 1), and its achieved
        goals ag[t'], t' = 1 .. T, each her_k / (her_k + 1) * sum_{t < t'} 1 / (T - t) ('future': t uniform in
        [0, T), t' uniform in [t + 1, T]). Returns goals (2T, goal_dim) and weights (2T,), for the normaliser."""
        T, p_relabel = self.T, self.her_k / (self.her_k + 1)
        future = np.cumsum(1.0 / (T - np.arange(T)))  # entry t' - 1: sum over t < t' of 1 / (T - t)
        goals = np.concatenate([self.storage["g"][slot], self.storage["ag"][slot, 1:]])
        return goals, np.concatenate([np.full(T, 1.0 - p_relabel), p_relabel * future])

    def sample(self, batch_size: int) -> ReplayBatch:
        ep, t, goal_t = self.sample_indices(batch_size)
        s = self.storage
        goals = np.where((goal_t >= 0)[:, None], s["ag"][ep, goal_t], s["g"][ep, t])
        rewards = self.compute_reward(s["ag"][ep, t + 1], goals, None).astype(np.float32)
        as_tensor = lambda a: torch.as_tensor(a, device=self.device)  # noqa: E731
        return ReplayBatch(
            as_tensor(np.concatenate([s["obs"][ep, t], goals], 1)),
            as_tensor(np.concatenate([s["obs"][ep, t + 1], goals], 1)),
            as_tensor(s["actions"][ep, t]),
            as_tensor(rewards[:, None]),
        )

    def state_dict(self) -> dict:
        """The stored episodes (filled slots only, as tensors sharing the arrays' memory), ring position and sampling
        RNG. Only valid at an episode boundary: episodes in progress are not saved."""
        if self.t.any():
            raise RuntimeError(f"HER buffer state saved mid-episode (steps {self.t.tolist()}); save at a boundary")
        filled = {key: torch.from_numpy(episodes[: self.num_episodes]) for key, episodes in self.storage.items()}
        return {"storage": filled, "num_episodes": self.num_episodes, "next_slot": self.next_slot,
                "rng": self.rng.bit_generator.state}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Inverse of `state_dict`. Raises ValueError if the saved episodes do not fit this buffer's shapes."""
        for key, episodes in state["storage"].items():
            if episodes.shape[0] > self.capacity or episodes.shape[1:] != self.storage[key].shape[1:]:
                raise ValueError(f"saved replay buffer {key} {tuple(episodes.shape)} does not fit "
                                 f"{(self.capacity, *self.storage[key].shape[1:])}")  # fmt: skip
            self.storage[key][: episodes.shape[0]] = episodes.numpy()
        self.num_episodes, self.next_slot = state["num_episodes"], state["next_slot"]
        self.rng.bit_generator.state = state["rng"]


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
        (args.total_timesteps >= 1, f"--total-timesteps must be >= 1, got {args.total_timesteps}"),
        (1 <= args.num_envs <= args.total_timesteps,
         f"--num-envs must be in [1, --total-timesteps={args.total_timesteps}], got {args.num_envs}"),
        (args.buffer_size >= 50, f"--buffer-size must be >= 50 (one episode), got {args.buffer_size}"),
        (1 <= args.batch_size <= args.buffer_size,
         f"--batch-size must be in [1, --buffer-size={args.buffer_size}], got {args.batch_size}"),
        (0 <= args.learning_starts < args.total_timesteps,
         f"--learning-starts must be in [0, --total-timesteps={args.total_timesteps}), got {args.learning_starts}"),
        (args.eval_frequency > 0, f"--eval-frequency must be > 0, got {args.eval_frequency}"),
        (args.eval_episodes >= 1, f"--eval-episodes must be >= 1, got {args.eval_episodes}"),
        (args.final_eval_episodes >= 0, f"--final-eval-episodes must be >= 0, got {args.final_eval_episodes}"),
        (0.0 <= args.gamma < 1.0, f"--gamma must be in [0, 1), got {args.gamma}"),
        (0.0 < args.tau <= 1.0, f"--tau must be in (0, 1], got {args.tau}"),
        (args.policy_lr > 0 and args.q_lr > 0, f"learning rates must be > 0, got {args.policy_lr}, {args.q_lr}"),
        (args.policy_frequency >= 1, f"--policy-frequency must be >= 1, got {args.policy_frequency}"),
        (args.target_network_frequency >= 1,
         f"--target-network-frequency must be >= 1, got {args.target_network_frequency}"),
        (args.alpha >= 0, f"--alpha must be >= 0, got {args.alpha}"),
        (args.her_k >= 0, f"--her-k must be >= 0, got {args.her_k}"),
        (0.0 < args.update_ratio <= 64.0, f"--update-ratio must be in (0, 64], got {args.update_ratio}"),
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
    """Raise ValueError if the run would need more memory than this process may use: the full replay buffer, the five
    networks (dense weights, gradients, Adam moments and escnn's expanded copy: 5 floats per dense weight) with what
    building them takes beyond that (`network_build_cost`), and the training and evaluation envs (ENV_COST)."""
    obs_dim = fields_dim(REACH_FIELDS if "Reach" in args.env_id else OBJECT_FIELDS) + fields_dim(GOAL_FIELDS)
    buffer_bytes = 4 * args.buffer_size * (obs_dim + 7)  # per transition: observation, goals, action (float32)
    weights = lambda widths: sum(a * b for a, b in zip(widths[:-1], widths[1:], strict=True))  # noqa: E731
    actor, critic = dense_widths(obs_dim, 8, args), dense_widths(obs_dim + fields_dim(ACTION_FIELDS), 1, args)
    network_bytes = 4 * 5 * (weights(actor) + 4 * weights(critic)) + network_build_cost(args)[1]
    env_bytes = args.num_envs * ENV_COST[args.vector_env_mode][0] + args.eval_episodes * ENV_COST["sync"][0]
    needed, limit = buffer_bytes + network_bytes + env_bytes, memory_limit()
    if needed > limit:
        flags = " ".join(f"--{name.replace('_', '-')} {flag_value(getattr(args, name))}" for name in NETWORK_ARGS)
        gib = lambda n: f"{n / 2**30:.1f}"  # noqa: E731
        raise ValueError(f"{flags}, --buffer-size {args.buffer_size}, --num-envs {args.num_envs} "
                         f"({args.vector_env_mode}) and --eval-episodes {args.eval_episodes} need about {gib(needed)} "
                         f"GiB (networks {gib(network_bytes)}, replay buffer {gib(buffer_bytes)}, envs "
                         f"{gib(env_bytes)}), more than the {gib(limit)} GiB this process may use")  # fmt: skip


def flag_value(value) -> str:
    """An argument's value as typed on the command line: tuples space-separated."""
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


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


def retain_freed_memory() -> None:
    """Make glibc's malloc keep freed memory in the process instead of returning it to the OS: the update's larger
    tensors (about 1 MB each in the main job) would otherwise be mapped afresh and page-faulted on every update,
    about 5 % of the main job's update time on CPU. Changes no result; a no-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    libc.mallopt(m_mmap_threshold, 32 * 2**20)  # glibc's maximum: blocks below 32 MiB come from the heap
    libc.mallopt(m_trim_threshold, 2**30)  # return free heap to the OS only beyond 1 GiB


def check_finite(name: str, value: torch.Tensor, global_step: int) -> None:
    """Raise FloatingPointError naming the loss and step if `value` is NaN or inf."""
    if not torch.isfinite(value).all():
        raise FloatingPointError(f"{name} is {value.item()} at global_step {global_step}")


def obs_tensor(obs: dict, device) -> torch.Tensor:
    """Vector-env dict observation -> (num_envs, obs_dim + goal_dim) float32 network input."""
    return torch.as_tensor(np.concatenate([obs["observation"], obs["desired_goal"]], 1), dtype=torch.float32,
                           device=device)  # fmt: skip


@torch.no_grad()
def evaluate(actor, obs_norm, eval_envs, seed: int, device, episodes: int | None = None, prefix: str = "eval",
             report=None) -> dict:  # fmt: skip
    """`episodes` deterministic episodes (the squashed mean action; no random number is drawn), default one per eval
    env, run in batches of `eval_envs.num_envs`: env i of batch k starts from `reset(seed=seed + k * num_envs + i)`;
    `report(episodes done so far)`, if given, is called before each batch.

    Returns {f"{prefix}/success_rate": fraction of episodes whose last step has is_success, f"{prefix}/return": mean
    undiscounted return}.
    """
    episodes = episodes or eval_envs.num_envs
    episode_length = eval_envs.get_attr("spec")[0].max_episode_steps
    successes, returns = [], []
    for batch_seed in range(seed, seed + episodes, eval_envs.num_envs):
        if report is not None:
            report(min(len(returns), episodes))
        obs, _ = eval_envs.reset(seed=batch_seed)
        batch_returns = np.zeros(eval_envs.num_envs)
        for _ in range(episode_length):
            mean, _ = actor(obs_norm(obs_tensor(obs, device)))
            obs, rewards, _, _, infos = eval_envs.step(squash(mean).cpu().numpy())
            batch_returns += rewards
        successes.extend(infos["is_success"])
        returns.extend(batch_returns)
    return {
        f"{prefix}/success_rate": float(np.mean(successes[:episodes], dtype=np.float64)),
        f"{prefix}/return": float(np.mean(returns[:episodes])),
    }


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


def agent_state(args: Args, agent) -> dict:
    """args and the state_dict of every network (in train mode: no escnn cache) and optimizer, and alpha."""
    nets, opts, alpha_state = agent
    state = {"script": SCRIPT, "args": asdict(args), "alpha": alpha_state["alpha"]}
    state.update({name: net.state_dict() for name, net in nets.items()})
    state.update({f"{name}_optimizer": opt.state_dict() for name, opt in opts.items()})
    if "log_alpha" in alpha_state:
        state["log_alpha"] = alpha_state["log_alpha"].detach().clone()
    return state


@dataclass
class LoopState:
    """The training loop's counters, saved in every checkpoint (`last_eval`: the latest evaluation record)."""

    global_step: int = 0
    update_idx: int = 0
    eval_idx: int = 0
    next_eval: int = 0
    next_checkpoint: int = 0
    last_eval: dict | None = None


def training_checkpoint(args: Args, agent, rb, envs, loop: LoopState, action_rng: np.random.Generator) -> dict:
    """Everything a resumed run needs to continue exactly: agent, replay buffer, counters and every RNG state
    (Python, NumPy's legacy global and Generators, torch, each training env's `np_random`)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    rngs = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "actions": action_rng.bit_generator.state,
        "envs": list(envs.unwrapped.get_attr("rng_state")),
    }
    return {**agent_state(args, agent), **asdict(loop), "replay_buffer": rb.state_dict(), "rng": rngs}


def restore_checkpoint(state: dict, agent, rb, envs, action_rng: np.random.Generator) -> LoopState:
    """Inverse of `training_checkpoint`: load every state in place and return the loop's counters."""
    nets, opts, alpha_state = agent
    for name, net in nets.items():
        net.load_state_dict(state[name])
    if "log_alpha" in alpha_state:
        with torch.no_grad():
            alpha_state["log_alpha"].copy_(state["log_alpha"])
    for name, opt in opts.items():
        opt.load_state_dict(state[f"{name}_optimizer"])
    alpha_state["alpha"] = state["alpha"]
    rb.load_state_dict(state["replay_buffer"])
    rngs = state["rng"]
    random.setstate(rngs["python"])
    name, keys, pos, has_gauss, cached_gaussian = rngs["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(rngs["torch"])
    if rngs["cuda"] and torch.cuda.is_available():  # a run moved between CPU and GPU continues, though not exactly
        torch.cuda.set_rng_state_all(rngs["cuda"])
    action_rng.bit_generator.state = rngs["actions"]
    envs.unwrapped.set_attr("rng_state", rngs["envs"])
    return LoopState(**{key: state[key] for key in LoopState.__dataclass_fields__})


def budget_schedules(args: Args) -> list[str]:
    """The schedules that run over `total_timesteps`, so that a resumed run may not change it: none (the learning
    rates, alpha's target entropy and the update ratio are constants), so a run may be extended."""
    return []


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
    """Rebuild the actor saved in `model.pt` (`--save-model`) or `checkpoint.pt` and evaluate it deterministically.

    Usage: python -c "import sac_fetch_equivariant as m; print(m.evaluate_checkpoint('runs/<run_name>/checkpoint.pt'))"
    Returns {"global_step", "eval/success_rate", "eval/return"}. Raises ValueError if another script saved `path`.
    """
    state = load_saved(path)
    args = Args(**state["args"])
    eval_envs = make_vector_env(args.env_id, eval_episodes, "sync")
    fields = eval_envs.get_attr("fields")[0]
    actor, obs_norm = Actor(fields, args), observation_normalizer(fields, args)
    actor.load_state_dict(state["actor"])
    obs_norm.load_state_dict(state["obs_norm"])
    result = evaluate(actor, obs_norm, eval_envs, seed, "cpu")
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
def sac_update(batch: ReplayBatch, nets: dict, opts: dict, args: Args, alpha_state: dict, update_idx: int,
               global_step: int) -> dict:  # fmt: skip
    """One SAC critic update, and `policy_frequency` actor (+ alpha) updates every `policy_frequency` calls.
    `batch` holds raw network inputs; they are normalised here (`ObservationNormalizer`)."""
    norm = nets["obs_norm"]
    batch = batch._replace(observations=norm(batch.observations), next_observations=norm(batch.next_observations))
    actor, qf, qf_target = nets["actor"], nets["qf"], nets["qf_target"]
    alpha = alpha_state["alpha"]
    with torch.no_grad(), autocast(args, batch):
        next_actions, next_log_pi, _ = get_action(actor, batch.next_observations)
        min_qf_next = qf_target(batch.next_observations, next_actions).float().min(0).values - alpha * next_log_pi
        # crucial: Fetch episodes only truncate (time limit), so every target bootstraps; no (1 - done) factor
        next_q_value = batch.rewards + args.gamma * min_qf_next
    with autocast(args, batch):
        qf1_values, qf2_values = qf(batch.observations, batch.actions).float()
    qf1_loss = F.mse_loss(qf1_values, next_q_value)
    qf2_loss = F.mse_loss(qf2_values, next_q_value)
    qf_loss = qf1_loss + qf2_loss
    check_finite("qf_loss", qf_loss, global_step)
    opts["q"].zero_grad()
    qf_loss.backward()
    opts["q"].step()
    logs = {"losses/qf1_loss": qf1_loss, "losses/qf2_loss": qf2_loss, "losses/qf_loss": qf_loss / 2.0}

    if update_idx % args.policy_frequency == 0:  # delayed policy updates, compensated by repetition
        for _ in range(args.policy_frequency):
            logs.update(actor_update(batch, nets, opts, args, alpha_state, global_step))

    if update_idx % args.target_network_frequency == 0:
        qf_target.update(qf, args.tau)
    return logs


def actor_update(batch: ReplayBatch, nets: dict, opts: dict, args: Args, alpha_state: dict, global_step: int) -> dict:
    q_params = opts["q"].param_groups[0]["params"]  # (Module.parameters() walks escnn's slow module equality)
    for p in q_params:  # the actor loss needs dQ/da only: skip the critics' weight gradients (Spinning Up does too)
        p.requires_grad_(False)
    with autocast(args, batch):
        pi, log_pi, _ = get_action(nets["actor"], batch.observations)
        min_qf_pi = nets["qf"](batch.observations, pi).float().min(0).values
    actor_loss = (alpha_state["alpha"] * log_pi - min_qf_pi).mean()
    check_finite("actor_loss", actor_loss, global_step)
    opts["actor"].zero_grad()
    actor_loss.backward()
    opts["actor"].step()
    for p in q_params:
        p.requires_grad_(True)
    logs = {"losses/actor_loss": actor_loss, "losses/alpha": torch.tensor(alpha_state["alpha"])}
    if args.autotune:
        alpha_loss = (-alpha_state["log_alpha"].exp() * (log_pi.detach() + alpha_state["target_entropy"])).mean()
        check_finite("alpha_loss", alpha_loss, global_step)
        opts["alpha"].zero_grad()
        alpha_loss.backward()
        opts["alpha"].step()
        alpha_state["alpha"] = alpha_state["log_alpha"].exp().item()
        logs["losses/alpha_loss"] = alpha_loss
    return logs


def autocast(args: Args, batch: ReplayBatch):
    """bfloat16 autocast of the update's network passes when --bf16 (losses, optimizers and weights stay float32)."""
    return torch.autocast(batch.observations.device.type, dtype=torch.bfloat16, enabled=args.bf16)


class TargetQNetworks(torch.nn.Module):
    """The target critics, held as the critics' `dense_weights()` and Polyak-averaged in place (Haarnoja et al. 2018,
    Sec. 4.2): weights <- (1 - tau) weights + tau online weights. The dense weights are linear in the parameters,
    so this equals averaging the parameters and expanding them.

    Input x: (batch, obs_dim), a: (batch, 4). Output: (2, batch, 1).
    """

    def __init__(self, qf: torch.nn.Module):
        super().__init__()
        self._forward_with = qf.forward_with  # the online critics' constants, not their parameters
        with torch.no_grad():
            for i, weight in enumerate(qf.dense_weights()):
                self.register_buffer(f"weight{i}", weight.detach().clone())

    def weights(self) -> list:
        return list(self.buffers())

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self._forward_with(self.weights(), x, a)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        upgrade_target_weights(state_dict, prefix)  # a checkpoint of an earlier layout resumes
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def update(self, qf: torch.nn.Module, tau: float) -> None:
        torch._foreach_lerp_(self.weights(), [w.detach() for w in qf.dense_weights()], tau)


def build_agent(obs_fields, args: Args, device):
    actor, qf = Actor(obs_fields, args).to(device), SoftQNetworks(obs_fields, args).to(device)
    nets = {"actor": actor, "qf": qf, "qf_target": TargetQNetworks(qf),
            "obs_norm": observation_normalizer(obs_fields, args).to(device)}  # fmt: skip
    # fused Adam: about 1 ms less per update on CPU than the for-loop default; importing it costs about 1.5 s once
    opts = {"q": optim.Adam(qf.parameters(), lr=args.q_lr, fused=True),
            "actor": optim.Adam(actor.parameters(), lr=args.policy_lr, fused=True)}  # fmt: skip
    for name, net in (("q", qf), ("actor", actor)):  # fused Adam changes parameters without bumping their versions
        opts[name].register_step_post_hook(lambda *_, net=net: net.parameters_changed())
    alpha_state = {"alpha": args.alpha, "target_entropy": args.target_entropy}
    if args.autotune:
        alpha_state["log_alpha"] = torch.tensor(math.log(max(args.alpha, 1e-8)), requires_grad=True, device=device)
        opts["alpha"] = optim.Adam([alpha_state["log_alpha"]], lr=args.q_lr)
    return nets, opts, alpha_state


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
    retain_freed_memory()
    args.run_name = args.run_name or f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_path = os.path.join(args.run_dir, args.run_name)
    stop = StopRequest(args.run_name)  # first: a signal during set-up ends the process at once, leaving nothing behind
    gym.register_envs(gymnasium_robotics)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    warn_emulated_bf16(args.bf16, device)

    try:
        if args.capture_video:
            check_rendering(args.env_id)
        lock = lock_run_folder(run_path)  # a run's folder: locked before its checkpoint is read (None: none yet)
        with setup_step(args.run_name, f"reading {run_path}/{CHECKPOINT_FILE}"):
            saved = resume_state(args, run_path)  # read and checked before anything is written
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if saved is not None and is_complete(run_path, args.total_timesteps):
        print(f"run {run_path} already ended at global_step {args.total_timesteps}; nothing to do", file=sys.stderr)
        return 0
    with setup_step(args.run_name, f"making {args.num_envs} {args.env_id} envs ({args.vector_env_mode})",
                    args.num_envs * ENV_COST[args.vector_env_mode][1]):  # fmt: skip
        envs = gym.wrappers.vector.RecordEpisodeStatistics(
            make_vector_env(args.env_id, args.num_envs, args.vector_env_mode)
        )
    obs_fields = envs.unwrapped.get_attr("fields")[0]
    with setup_step(args.run_name, network_build_cost(args)[0]):
        agent = build_agent(obs_fields, args, device)  # before the run folder: a failure here leaves nothing behind
    params = {"actor_params": num_params(agent[0]["actor"]), "critic_params": num_params(agent[0]["qf"]) // 2}
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
    obs_dim = envs.single_observation_space["observation"].shape[0]
    action_seed, replay_seed = np.random.SeedSequence(args.seed).spawn(2)  # independent streams from one seed
    rb = HerReplayBuffer(obs_dim, 3, 4, gym.spec(args.env_id).max_episode_steps, args.buffer_size, args.num_envs,
                         args.her_k, eval_envs.envs[0].unwrapped.compute_reward, device, replay_seed)  # fmt: skip
    action_rng = np.random.default_rng(action_seed)
    if saved is None:
        loop = LoopState(next_eval=args.eval_frequency, next_checkpoint=args.checkpoint_frequency)
    else:
        loop = restore_checkpoint(saved, agent, rb, envs, action_rng)
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
        final = train(args, envs, eval_envs, agent, rb, writer, run_path, device, loop, action_rng, stop)
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


def train(args, envs, eval_envs, agent, rb, writer, run_path, device, loop: LoopState, action_rng, stop) -> dict:
    """The SAC + HER loop, from `loop`'s counters to `total_timesteps`. Returns the final evaluation record (also
    printed as a JSON line). Raises Interrupted after the checkpoint that a SIGUSR1/SIGTERM asked for."""
    nets, opts, alpha_state = agent
    progress = Progress(args.run_name, args.total_timesteps, "eval/success_rate")
    start_time, start_step = time.time(), loop.global_step
    # a new run seeds the envs; a resumed one continues their restored np_random, like every reset below
    obs, _ = envs.reset(seed=None if loop.global_step else args.seed)
    nets["obs_norm"].update(obs["observation"])
    logs = {}  # the latest value of every loss (actor losses come every policy_frequency updates)
    log = lambda: log_losses(logs, writer, loop, progress, (loop.global_step - start_step) / (time.time() - start_time))
    while loop.global_step < args.total_timesteps:
        if loop.global_step < args.learning_starts:
            actions = random_actions(args.num_envs, action_rng)
        else:
            with torch.no_grad():
                actions = get_action(nets["actor"], nets["obs_norm"](obs_tensor(obs, device)))[0].cpu().numpy()

        next_obs, rewards, terminations, truncations, infos = envs.step(actions)
        # the normaliser sees every input the networks are given: each observation (resets included, below) and,
        # per finished episode, its goals as HER samples them (desired and relabelled, by expected count)
        nets["obs_norm"].update(next_obs["observation"])
        for slot in rb.add(obs, next_obs, actions, terminations, truncations):
            nets["obs_norm"].update(*rb.goal_distribution(slot), start=next_obs["observation"].shape[1])
        loop.global_step += args.num_envs
        obs = next_obs
        episode_end = terminations | truncations  # Fetch: all envs at once, every max_episode_steps steps
        log_episodes(infos, episode_end, writer, loop.global_step)

        if loop.global_step > args.learning_starts and rb.num_episodes > 0:
            run_updates(args, rb, agent, loop, logs, log)

        if loop.global_step >= loop.next_eval or loop.global_step >= args.total_timesteps:
            loop.last_eval = run_evaluation(args, agent, eval_envs, loop, writer, run_path, device)
            loop.eval_idx, loop.next_eval = loop.eval_idx + 1, loop.next_eval + args.eval_frequency

        if episode_end.all():  # crucial: checkpoints only here, so that a resumed run continues exactly
            maybe_checkpoint(args, agent, rb, envs, loop, action_rng, run_path, stop)
            obs, _ = envs.reset()
            nets["obs_norm"].update(obs["observation"])
    return {**loop.last_eval, **heldout_evaluation(args, nets, eval_envs, writer, loop.global_step, device, progress)}


def run_updates(args, rb, agent, loop: LoopState, logs: dict, log) -> None:
    """The updates due at this step (`updates_due`), each on a fresh replay batch; `logs` keeps the latest value of
    every loss (actor losses come every `policy_frequency` updates) and `log()` runs after every 100th update."""
    nets, opts, alpha_state = agent
    for _ in range(updates_due(args, loop)):
        batch = rb.sample(args.batch_size)
        logs.update(sac_update(batch, nets, opts, args, alpha_state, loop.update_idx, loop.global_step))
        loop.update_idx += 1
        if loop.update_idx % 100 == 0:
            log()


def updates_due(args, loop: LoopState) -> int:
    """Critic updates to run now: `update_ratio` per transition after `learning_starts`, minus those already run
    (a function of the counters, so a resumed run keeps the schedule)."""
    steps = loop.global_step - args.learning_starts
    return max(0, math.floor(steps * args.update_ratio + 1e-9) - loop.update_idx)


def log_losses(logs: dict, writer, loop: LoopState, progress, sps: float) -> None:
    """The latest value of every loss, charts/SPS and a progress line (every 100 updates)."""
    for key, value in logs.items():
        writer.add_scalar(key, value.item(), loop.global_step)
    writer.add_scalar("charts/SPS", int(sps), loop.global_step)
    progress.maybe_print(loop.global_step, loop.last_eval)


def maybe_checkpoint(args, agent, rb, envs, loop: LoopState, action_rng, run_path: str, stop: StopRequest) -> None:
    """At an episode boundary: write checkpoint.pt when one is due (every `checkpoint_frequency` steps, at the end,
    or on a signal). Raises Interrupted after writing it for a signal."""
    periodic = args.checkpoint_frequency > 0 and loop.global_step >= loop.next_checkpoint
    if not (periodic or stop.signum or loop.global_step >= args.total_timesteps):
        return
    if args.checkpoint_frequency > 0:
        loop.next_checkpoint = (loop.global_step // args.checkpoint_frequency + 1) * args.checkpoint_frequency
    path = os.path.join(run_path, CHECKPOINT_FILE)
    atomic_torch_save(training_checkpoint(args, agent, rb, envs, loop, action_rng), path)
    if stop.signum:
        raise Interrupted(f"stopped by {signal.Signals(stop.signum).name} at global_step {loop.global_step}: "
                          f"checkpoint written to {path}; to resume, rerun the same command with --run-name "
                          f"{args.run_name}")  # fmt: skip


def log_episodes(infos: dict, done: np.ndarray, writer, global_step: int) -> None:
    """Episodic return/length (RecordEpisodeStatistics) and success of the training episodes that just ended."""
    if "episode" not in infos:
        return
    for i in np.flatnonzero(infos["_episode"]):
        writer.add_scalar("charts/episodic_return", infos["episode"]["r"][i], global_step)
        writer.add_scalar("charts/episodic_length", infos["episode"]["l"][i], global_step)
    if done.any() and "is_success" in infos:
        writer.add_scalar("charts/success_rate", float(np.mean(infos["is_success"][done])), global_step)


def heldout_evaluation(args, nets, eval_envs, writer, global_step: int, device, progress: Progress) -> dict:
    """The final evaluation on `final_eval_episodes` episodes whose initial states no periodic evaluation sees
    (seeds from seed + 2_000_000): logged as `heldout/*` and printed as one JSON line without `eval_idx`."""
    if args.final_eval_episodes == 0:
        return {}
    if args.capture_video:  # one video of the held-out evaluation too: its first episode
        first = iter([True])
        eval_envs.envs[0].set_wrapper_attr("episode_trigger", lambda _: next(first, False))
    result = evaluate(
        nets["actor"],
        nets["obs_norm"],
        eval_envs,
        args.seed + 2_000_000,
        device,
        args.final_eval_episodes,
        prefix="heldout",
        report=lambda done: progress.evaluating(done, args.final_eval_episodes),
    )
    for key, value in result.items():
        writer.add_scalar(key, value, global_step)
    record = {"global_step": global_step, **result, "heldout/episodes": args.final_eval_episodes}
    print(json.dumps(record), flush=True)
    return record


def run_evaluation(args, agent, eval_envs, loop: LoopState, writer, run_path, device) -> dict:
    """Evaluate, log to TensorBoard, print the JSON line, append it to evals.jsonl, save the model if asked."""
    result = evaluate(agent[0]["actor"], agent[0]["obs_norm"], eval_envs, args.seed + 1_000_000, device)
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
