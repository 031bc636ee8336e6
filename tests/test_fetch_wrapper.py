"""The base-frame wrapper on real MuJoCo Fetch observations: mirroring or rotating the raw simulator quantities about
the base commutes with the wrapper, i.e. wrapper(g . raw) = rho(g) wrapper(raw), to float precision, on all tasks."""

import math

import gymnasium as gym
import mujoco
import numpy as np
import pytest
import torch
from conftest import TASKS
from gymnasium_robotics.utils import rotations
from test_equivariance import action_matrix


def rich_raw_observation(env: gym.Env, seed: int) -> dict:
    """A real simulator observation with nonzero velocities and, where there is an object, a random orientation."""
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    for _ in range(5):
        env.step(env.action_space.sample())
    unwrapped = env.unwrapped
    model, data = unwrapped.model, unwrapped.data
    data.qvel[:] = rng.normal(scale=0.3, size=model.nv)
    if "object0:joint" in unwrapped._model_names.joint_names:
        address = model.jnt_qposadr[model.joint("object0:joint").id]
        quat = rng.normal(size=4)
        data.qpos[address + 3 : address + 7] = quat / np.linalg.norm(quat)
    mujoco.mj_forward(model, data)
    return unwrapped._get_obs()


def mirror_raw(obs: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Mirror y -> 2 base_y - y of every raw quantity with its parity (positions, velocities, axial vectors, angles)."""
    out = obs.copy()
    pos_slices = [slice(0, 3)] if obs.size == 10 else [slice(0, 3), slice(3, 6)]
    for s in pos_slices:
        out[s][1] = 2 * base[1] - obs[s][1]
    if obs.size == 10:
        vec_slices, axial_slices, euler, finger_slices = [slice(5, 8)], [], None, [slice(3, 5), slice(8, 10)]
    else:
        vec_slices, axial_slices = [slice(6, 9), slice(14, 17), slice(20, 23)], [slice(17, 20)]
        euler, finger_slices = slice(11, 14), [slice(9, 11), slice(23, 25)]
    for s in vec_slices:
        out[s][1] = -obs[s][1]
    for s in axial_slices:  # an axial vector w -> -M w for M = diag(1, -1, 1)
        out[s] = obs[s] * np.array([-1.0, 1.0, -1.0])
    if euler is not None:  # M R M for R = euler2mat(a, b, c) is euler2mat(-a, b, -c)
        out[euler] = obs[euler] * np.array([-1.0, 1.0, -1.0])
    for s in finger_slices:  # the right and left fingers swap
        out[s] = obs[s][::-1]
    return out


def rotate_raw(obs: np.ndarray, base: np.ndarray, theta: float) -> np.ndarray:
    """Rotate every raw quantity by theta about the base's vertical axis."""
    c, s = math.cos(theta), math.sin(theta)
    rz = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    out = obs.copy()
    if obs.size == 10:
        points, vectors, euler = [slice(0, 3)], [slice(5, 8)], None
    else:
        points, euler = [slice(0, 3), slice(3, 6)], slice(11, 14)
        vectors = [slice(6, 9), slice(14, 17), slice(17, 20), slice(20, 23)]
    for sl in points:
        out[sl] = base + rz @ (obs[sl] - base)
    for sl in vectors:
        out[sl] = rz @ obs[sl]
    if euler is not None:
        out[euler] = rotations.mat2euler(rz @ rotations.euler2mat(obs[euler]))
    return out


def transform_goal(goal: np.ndarray, base: np.ndarray, flip: int, theta: float) -> np.ndarray:
    if flip:
        return goal * np.array([1.0, -1.0, 1.0]) + np.array([0.0, 2 * base[1], 0.0])
    c, s = math.cos(theta), math.sin(theta)
    return base + np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ (goal - base)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("script", ["eq", "mlp"])
def test_wrapper_commutes_with_the_mirror_and_rotations_on_real_observations(task, script, request):
    m = request.getfixturevalue(script)
    env = m.FetchBaseFrame(gym.make(f"Fetch{task}-v4"))
    raw = rich_raw_observation(env, seed=3)
    base = env.base_pos()
    wrapped = env.observation(raw)
    assert wrapped["observation"].shape == ((10,) if task == "Reach" else (31,))
    cases = [(1, 0.0, mirror_raw(raw["observation"], base))]
    cases += [(0, 2 * math.pi / n, rotate_raw(raw["observation"], base, 2 * math.pi / n)) for n in (2, 4, 8, 16)]
    for flip, theta, g_raw_obs in cases:
        g_raw = {k: transform_goal(raw[k], base, flip, theta) for k in ("achieved_goal", "desired_goal")}
        g_wrapped = env.observation({"observation": g_raw_obs, **g_raw})
        rho = action_matrix(env.fields[:-2], flip, theta, torch.float64).numpy()
        np.testing.assert_allclose(g_wrapped["observation"], rho @ wrapped["observation"], atol=1e-9)
        rho_goal = action_matrix(m.GOAL_FIELDS, flip, theta, torch.float64).numpy()
        for key in ("achieved_goal", "desired_goal"):
            np.testing.assert_allclose(g_wrapped[key], rho_goal @ wrapped[key], atol=1e-9)
    env.close()


@pytest.mark.parametrize(
    ("task", "base_x"), [("Reach", 0.692), ("Push", 0.692), ("PickAndPlace", 0.692), ("Slide", 0.337)]
)
def test_base_position_is_read_from_the_simulator(eq, task, base_x):
    env = eq.FetchBaseFrame(gym.make(f"Fetch{task}Dense-v4"))
    obs, _ = env.reset(seed=0)
    np.testing.assert_allclose(env.base_pos()[:2], [base_x, 0.7441], atol=1e-3)
    # the gripper starts about 5 mm left of the mirror plane: the symmetry is extrinsic, not exact
    assert 0.004 < obs["observation"][1] < 0.006
    env.close()


def test_wrapper_rejects_an_unknown_observation_size(eq):
    with pytest.raises(ValueError, match="got shape"):
        eq.to_base_frame(np.zeros(7), np.zeros(3))
