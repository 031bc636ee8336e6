"""HER replay buffer on real Fetch episodes: contiguous episodes with explicit resets at episode boundaries, 'future'
relabelling, rewards recomputed with the env's compute_reward, and its state saved and restored for resume."""

import gymnasium as gym
import numpy as np
import pytest
import torch

T = 50


def collect(m, env_id: str, num_envs: int, episodes_per_env: int, her_k: int, seed: int = 0):
    """Run random actions through the script's vector env and buffer exactly like its training loop does.

    Returns the buffer and, per env, the list of (obs, action, reward, next_obs) of real transitions in order."""
    envs = m.make_vector_env(env_id, num_envs, "sync")
    reward_env = gym.make(env_id)
    rb = m.HerReplayBuffer(envs.single_observation_space["observation"].shape[0], 3, 4, T, 100 * T, num_envs, her_k,
                           reward_env.unwrapped.compute_reward, "cpu", seed)  # fmt: skip
    rng = np.random.default_rng(seed)
    obs, _ = envs.reset(seed=seed)
    log = [[] for _ in range(num_envs)]
    for _ in range(episodes_per_env * T):
        actions = m.random_actions(num_envs, rng)
        next_obs, rewards, terminations, truncations, _ = envs.step(actions)
        rb.add(obs, next_obs, actions, terminations, truncations)
        for i in range(num_envs):
            log[i].append((obs["observation"][i].copy(), actions[i], rewards[i], next_obs["observation"][i].copy()))
        obs = next_obs
        if (terminations | truncations).all():
            obs, _ = envs.reset()
    envs.close()
    return rb, log, reward_env


def test_episodes_are_stored_contiguously_without_reset_observations(eq):
    rb, log, _ = collect(eq, "FetchPushDense-v4", num_envs=2, episodes_per_env=2, her_k=4)
    assert rb.num_episodes == 4
    assert [len(transitions) for transitions in log] == [2 * T, 2 * T]
    assert np.all(rb.t == 0)  # every episode was committed, none is half-written
    stored = rb.storage["obs"][: rb.num_episodes]
    # next observation of step t is the observation of step t + 1 (no reset observation inside an episode)
    for i, transitions in enumerate(log):
        for episode in range(2):
            slot = 2 * episode + i  # both envs finish each episode on the same vector step, env 0 first
            for t in range(T):
                obs, action, _, next_obs = transitions[episode * T + t]
                np.testing.assert_allclose(stored[slot, t], obs, rtol=1e-6, atol=1e-6)
                np.testing.assert_allclose(stored[slot, t + 1], next_obs, rtol=1e-6, atol=1e-6)
                np.testing.assert_allclose(rb.storage["actions"][slot, t], action)


@pytest.mark.parametrize("env_id", ["FetchReach-v4", "FetchPushDense-v4"])
def test_every_relabelled_reward_equals_compute_reward(eq, env_id):
    rb, _, reward_env = collect(eq, env_id, num_envs=1, episodes_per_env=3, her_k=4)
    rb.rng = np.random.default_rng(7)
    ep, t, goal_t = rb.sample_indices(4000)
    rb.rng = np.random.default_rng(7)
    batch = rb.sample(4000)
    relabelled = goal_t >= 0
    assert 0.77 < relabelled.mean() < 0.83  # her_k / (her_k + 1) = 0.8
    assert np.all(goal_t[relabelled] >= t[relabelled] + 1) and np.all(goal_t[relabelled] <= T)
    goals = batch.observations[:, -3:].numpy()
    np.testing.assert_array_equal(goals[relabelled], rb.storage["ag"][ep, goal_t][relabelled])
    np.testing.assert_array_equal(goals[~relabelled], rb.storage["g"][ep, t][~relabelled])
    expected = reward_env.unwrapped.compute_reward(rb.storage["ag"][ep, t + 1], goals, None)
    np.testing.assert_allclose(batch.rewards.squeeze(1).numpy(), expected, rtol=1e-6)
    if env_id == "FetchReach-v4":  # sparse: relabelling to the next achieved goal makes successes appear
        assert (batch.rewards[torch.as_tensor(relabelled & (goal_t == t + 1))] == 0).all()


def test_without_her_rewards_equal_the_rewards_the_env_returned(eq):
    rb, log, _ = collect(eq, "FetchPushDense-v4", num_envs=1, episodes_per_env=2, her_k=0)
    ep, t, goal_t = rb.sample_indices(500)
    assert np.all(goal_t == -1)
    rb.rng = np.random.default_rng(0)
    ep, t, _ = rb.sample_indices(500)
    rb.rng = np.random.default_rng(0)
    batch = rb.sample(500)
    env_rewards = np.array([log[0][e * T + s][2] for e, s in zip(ep, t, strict=True)])
    np.testing.assert_allclose(batch.rewards.squeeze(1).numpy(), env_rewards, rtol=1e-5, atol=1e-6)


def test_buffer_rejects_episodes_of_another_length(eq):
    rb = eq.HerReplayBuffer(10, 3, 4, T, 10 * T, 1, 4, None, "cpu", 0)
    obs = {"observation": np.zeros((1, 10)), "achieved_goal": np.zeros((1, 3)), "desired_goal": np.zeros((1, 3))}
    with pytest.raises(RuntimeError, match="ended at step 1"):
        rb.add(obs, obs, np.zeros((1, 4)), np.array([False]), np.array([True]))


def test_buffer_rejects_an_episode_that_does_not_end_after_t_steps(eq):
    rb = eq.HerReplayBuffer(10, 3, 4, T, 10 * T, 1, 4, None, "cpu", 0)
    obs = {"observation": np.zeros((1, 10)), "achieved_goal": np.zeros((1, 3)), "desired_goal": np.zeros((1, 3))}
    for _ in range(T - 1):
        rb.add(obs, obs, np.zeros((1, 4)), np.array([False]), np.array([False]))
    with pytest.raises(RuntimeError, match=f"ended at step {T} with terminated=False"):
        rb.add(obs, obs, np.zeros((1, 4)), np.array([False]), np.array([False]))


@pytest.mark.parametrize("script", ["eq", "mlp"])
def test_state_dict_round_trip_restores_episodes_ring_position_and_sampling(script, request):
    m = request.getfixturevalue(script)
    rb, _, reward_env = collect(m, "FetchPushDense-v4", num_envs=2, episodes_per_env=2, her_k=4)
    state = rb.state_dict()
    assert state["storage"]["obs"].shape == (4, T + 1, 31)  # filled episodes only
    fresh = m.HerReplayBuffer(31, 3, 4, T, 100 * T, 2, 4, reward_env.unwrapped.compute_reward, "cpu", 99)
    fresh.load_state_dict(state)
    assert (fresh.num_episodes, fresh.next_slot) == (4, 4)
    expected, restored = rb.sample(64), fresh.sample(64)  # same RNG state: the same indices and relabelling
    for a, b in zip(expected, restored, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_state_dict_refuses_a_buffer_in_the_middle_of_an_episode(eq):
    rb = eq.HerReplayBuffer(10, 3, 4, T, 10 * T, 1, 4, None, "cpu", 0)
    obs = {"observation": np.zeros((1, 10)), "achieved_goal": np.zeros((1, 3)), "desired_goal": np.zeros((1, 3))}
    rb.add(obs, obs, np.zeros((1, 4)), np.array([False]), np.array([False]))
    with pytest.raises(RuntimeError, match=r"mid-episode \(steps \[1\]\)"):
        rb.state_dict()


def test_ring_buffer_overwrites_the_oldest_episode(eq):
    rb, _, _ = collect(eq, "FetchReachDense-v4", num_envs=1, episodes_per_env=3, her_k=4)
    small = eq.HerReplayBuffer(10, 3, 4, T, 2 * T, 1, 4, None, "cpu", 0)
    for k in range(3):
        for key in small.staging:
            small.staging[key][0] = rb.storage[key][k]
        small._commit(0)
    assert small.num_episodes == 2
    np.testing.assert_array_equal(small.storage["obs"][0], rb.storage["obs"][2])  # episode 2 replaced episode 0
    np.testing.assert_array_equal(small.storage["obs"][1], rb.storage["obs"][1])
