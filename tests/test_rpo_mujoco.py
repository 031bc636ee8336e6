"""rpo_mujoco.py: GAE against its definition, truncation bootstrapping where the right value is known, normalisation
statistics saved and restored exactly and frozen at evaluation, MuJoCo states restored exactly, the NumPy acting copy
against the torch agent, end-to-end runs on the real simulator, exact resume after SIGUSR1, Ctrl-C and bad input."""

import dataclasses
import glob
import io
import json
import os
import signal
import subprocess
import sys
import time

import gymnasium as gym
import mujoco
import numpy as np
import pytest
import torch
from conftest import ROOT, assert_finished_line, assert_progress_lines, read_stderr_until
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import rpo_mujoco as m

GAMMA = 0.9


def reference_gae(rewards, values, dones, next_value, gamma, lam):
    """A_t = sum_k (gamma lam)^k delta_{t+k}, summed directly up to the end of the episode or of the rollout."""
    T, N = rewards.shape
    values_next = np.concatenate([values[1:], next_value[None]], 0)
    delta = rewards + gamma * values_next * (1 - dones) - values
    advantages = np.zeros((T, N))
    for n in range(N):
        for t in range(T):
            for k in range(T - t):
                advantages[t, n] += (gamma * lam) ** k * delta[t + k, n]
                if dones[t + k, n]:
                    break
    return advantages


def test_gae_equals_the_discounted_sum_of_td_errors_up_to_each_episode_end():
    rng = np.random.default_rng(1)
    T, N = 41, 3
    rewards, values, next_value = rng.normal(size=(T, N)), rng.normal(size=(T, N)), rng.normal(size=N)
    dones = (rng.uniform(size=(T, N)) < 0.1).astype(np.float64)
    got = m.compute_gae(rewards, values, dones, next_value, 0.99, 0.95)
    np.testing.assert_allclose(got, reference_gae(rewards, values, dones, next_value, 0.99, 0.95), atol=1e-12)


class CountingEnv(gym.Env):
    """Reward 1 every step; the observation is the step count; after 3 steps the episode is truncated (time limit)
    or, with `terminate`, terminated. Without termination every state's discounted value is 1 / (1 - gamma)."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float64)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    terminate = False

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0]), {}

    def step(self, action):
        self.t += 1
        end = self.t == 3
        return np.array([float(self.t)]), 1.0, end and self.terminate, end and not self.terminate, {}


class TerminatingEnv(CountingEnv):
    terminate = True


class IdentityNormalizer:
    """Leaves observations and rewards as they are, so that the expected numbers are known."""

    def obs(self, obs, update=True):
        return obs.astype(np.float32)

    def rewards(self, rewards, terminated):
        return rewards.astype(np.float32)


class StubPolicy:
    """Mean 0, std 1; value = bias + slope * observation."""

    def __init__(self, bias, slope=0.0):
        self.bias, self.slope, self.log_std = bias, slope, np.zeros(1, np.float32)

    def __call__(self, obs):
        return np.zeros((len(obs), 1), np.float32), (self.bias + self.slope * obs[:, 0]).astype(np.float32)


def rollout_with(policy, monkeypatch, env_cls=CountingEnv, num_steps=8, num_envs=2):
    monkeypatch.setattr(m, "NumpyPolicy", lambda agent: policy)
    envs = gym.vector.SyncVectorEnv([env_cls] * num_envs, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    obs, _ = envs.reset(seed=0)
    rollout = m.new_rollout(num_steps, num_envs, 1, 1)
    state = m.EnvState(obs.astype(np.float32), IdentityNormalizer())
    next_value, _ = m.collect_rollout(None, envs, state, rollout, m.Args(num_steps=num_steps, gamma=GAMMA))
    return rollout, next_value


def test_truncated_episode_bootstraps_from_the_value_of_its_true_final_observation(monkeypatch):
    rollout, _ = rollout_with(StubPolicy(bias=2.0, slope=0.5), monkeypatch)
    # steps 3 and 6 end episodes by truncation: 1 + gamma V(final obs 3); the reset observation 0 would give
    # 1 + 0.9 * 2, CleanRL's no bootstrap 1
    expected = np.ones((8, 2))
    expected[[2, 5]] = 1.0 + GAMMA * (2.0 + 0.5 * 3)
    np.testing.assert_allclose(rollout.rewards, expected, rtol=1e-6)
    assert rollout.dones[:, 0].tolist() == [0, 0, 1, 0, 0, 1, 0, 0]


def test_terminated_episode_is_not_bootstrapped(monkeypatch):
    rollout, _ = rollout_with(StubPolicy(bias=2.0, slope=0.5), monkeypatch, env_cls=TerminatingEnv)
    np.testing.assert_array_equal(rollout.rewards, np.ones((8, 2)))
    assert rollout.dones[:, 1].tolist() == [0, 0, 1, 0, 0, 1, 0, 0]


def test_with_the_true_value_function_every_advantage_is_zero_across_time_limits(monkeypatch):
    true_value = 1.0 / (1.0 - GAMMA)
    rollout, next_value = rollout_with(StubPolicy(bias=true_value), monkeypatch)
    advantages = m.compute_gae(rollout.rewards, rollout.values, rollout.dones, next_value, GAMMA, 0.95)
    np.testing.assert_allclose(advantages, 0.0, atol=1e-4)


def test_running_statistics_equal_those_of_all_data_at_once():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=(n, 5)) for n in (1, 1, 7, 1, 30)]
    rms = m.RunningMeanStd((5,), epsilon=1e-12)
    for batch in batches:
        rms.update(batch)
    everything = np.concatenate(batches)
    np.testing.assert_allclose(rms.mean, everything.mean(0), rtol=1e-9)
    np.testing.assert_allclose(rms.var, everything.var(0), rtol=1e-9)


def test_normalisation_statistics_are_saved_and_restored_exactly(tmp_path):
    rng = np.random.default_rng(2)
    normalizer = m.Normalizer((4,), 2, 0.99)
    for _ in range(50):
        normalizer.obs(rng.normal(size=(2, 4)) * 5)
        normalizer.rewards(rng.normal(size=2), rng.uniform(size=2) < 0.1)
    torch.save(normalizer.state_dict(), tmp_path / "n.pt")
    restored = m.Normalizer((4,), 2, 0.99)
    restored.load_state_dict(torch.load(tmp_path / "n.pt", weights_only=True))
    for a, b in ((normalizer.obs_rms, restored.obs_rms), (normalizer.return_rms, restored.return_rms)):
        assert np.array_equal(a.mean, b.mean) and np.array_equal(a.var, b.var) and a.count == b.count
    assert np.array_equal(normalizer.returns, restored.returns)
    x = rng.normal(size=(3, 4))
    assert np.array_equal(normalizer.obs(x, update=False), restored.obs(x, update=False))
    r, term = rng.normal(size=2), np.array([False, True])
    assert np.array_equal(normalizer.rewards(r, term), restored.rewards(r, term))


def test_evaluation_uses_the_statistics_frozen():
    normalizer = m.Normalizer((17,), 1, 0.99)
    normalizer.obs(np.random.default_rng(0).normal(size=(100, 17)))
    before = {key: value.clone() for key, value in normalizer.state_dict()["obs_rms"].items() if key != "count"}
    envs = m.make_vector_env("HalfCheetah-v5", 2, "sync")
    result = m.evaluate(m.Agent(17, 6), normalizer, envs, seed=0, episodes=2)
    after = normalizer.state_dict()["obs_rms"]
    assert all(torch.equal(before[key], after[key]) for key in before) and after["count"] == pytest.approx(100, 1e-3)
    assert result["eval/length"] == 1000.0  # HalfCheetah never terminates: every episode runs to its time limit


def test_numpy_acting_copy_matches_the_torch_agent():
    agent = m.Agent(11, 3)
    torch.nn.init.normal_(agent.actor_mean[4].weight)  # not the near-zero initial output layer
    obs = np.random.default_rng(0).normal(size=(5, 11)).astype(np.float32)
    mean, log_std, value = agent(torch.as_tensor(obs))
    policy_mean, policy_value = m.NumpyPolicy(agent)(obs)
    np.testing.assert_allclose(policy_mean, mean.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(policy_value, value.detach().numpy(), rtol=1e-5, atol=1e-6)


def through_a_checkpoint(state):
    """`state` written with torch.save and read back as a resumed run reads it (weights_only); and its size in bytes."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return torch.load(io.BytesIO(buffer.getvalue()), weights_only=True), len(buffer.getvalue())


def assert_bit_identical(a, b, where="") -> None:
    """Equal bit for bit, through dicts (infos), tuples (a step's results) and object arrays (final observations)."""
    if isinstance(a, dict | tuple | list) or (isinstance(a, np.ndarray) and a.dtype.hasobject):
        items = a.items() if isinstance(a, dict) else enumerate(a)
        assert len(a) == len(b) and (not isinstance(a, dict) or a.keys() == b.keys()), where
        for key, value in items:
            assert_bit_identical(value, b[key], f"{where}[{key!r}]")
    else:
        assert np.array_equal(a, b) and np.asarray(a).dtype == np.asarray(b).dtype, f"{where}: {a} != {b}"


@pytest.mark.parametrize("env_id", m.supported_env_ids())
def test_a_restored_env_steps_bit_for_bit_as_the_uninterrupted_one_on_every_mujoco_v5_task(env_id):
    """The restored env is a fresh one reset from another seed, as a resumed run's are: whatever the simulator derived
    before the checkpoint must come from it, not from that reset (Ant's reward reads the torso position before the
    step, Humanoid's the centre of mass, both computed from the positions of the step before)."""
    envs, fresh = m.make_vector_env(env_id, 1, "sync"), m.make_vector_env(env_id, 1, "sync")
    space = envs.single_action_space
    actions = np.random.default_rng(0).uniform(space.low, space.high, (25, 1, *space.shape)).astype(np.float32)
    envs.reset(seed=0)
    fresh.reset(seed=1)
    for a in actions[:20]:
        envs.step(a)
    saved, size = through_a_checkpoint(list(envs.get_attr("state")))
    fresh.set_attr("state", saved)
    for t, a in enumerate(actions[20:]):
        assert_bit_identical(envs.step(a), fresh.step(a), f"step {t} after the restore")
    assert size < 64_000  # bytes per env in checkpoint.pt


def test_an_env_state_saved_by_another_mujoco_version_is_refused():
    env = m.make_env("Hopper-v5")()
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"saved by mujoco 0\.0\.0, this is mujoco .*: resume with mujoco 0\.0\.0"):
        env.state = {**env.state, "mujoco": "0.0.0"}


def test_a_checkpoint_from_before_the_whole_mjdata_still_restores_the_integration_state():
    """Files written before the whole MjData was saved hold `physics`, mj_getState(mjSTATE_INTEGRATION)."""
    env, resumed = m.make_env("Hopper-v5")(), m.make_env("Hopper-v5")()
    env.reset(seed=0)
    resumed.reset(seed=1)
    for _ in range(10):
        env.step(np.full(3, 0.5, np.float32))
    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    physics = np.empty(mujoco.mj_stateSize(env.unwrapped.model, spec))
    mujoco.mj_getState(env.unwrapped.model, env.unwrapped.data, physics, spec)
    state = env.state
    resumed.state = {"np_random": state["np_random"], "elapsed_steps": 10, "physics": torch.from_numpy(physics)}
    for name in ("time", "qpos", "qvel", "qacc_warmstart", "ctrl"):
        assert np.array_equal(getattr(resumed.unwrapped.data, name), getattr(env.unwrapped.data, name)), name


@pytest.mark.parametrize("env_id", ["Hopper-v5", "Walker2d-v5", "Ant-v5", "Humanoid-v5"])
def test_other_mujoco_tasks_collect_a_rollout_and_update(env_id):
    args = m.Args(env_id=env_id, num_steps=64, num_minibatches=2, update_epochs=1)
    m.validate_args(args)
    envs = m.make_vector_env(env_id, 1, "sync")
    obs, _ = envs.reset(seed=0)
    obs_dim, act_dim = obs.shape[1], envs.single_action_space.shape[0]
    agent = m.Agent(obs_dim, act_dim)
    optimizer = torch.optim.Adam(agent.parameters(), lr=3e-4, eps=1e-5)
    normalizer = m.Normalizer((obs_dim,), 1, args.gamma)
    state, rollout = m.EnvState(normalizer.obs(obs), normalizer), m.new_rollout(64, 1, obs_dim, act_dim)
    next_value, _ = m.collect_rollout(agent, envs, state, rollout, args)
    advantages = m.compute_gae(rollout.rewards, rollout.values, rollout.dones, next_value, args.gamma, 0.95)
    logs = m.rpo_update(
        agent, optimizer, m.flatten_batch(rollout, advantages, "cpu"), args, np.random.default_rng(0), 64
    )
    assert all(np.isfinite(value) for value in logs.values()) and np.abs(rollout.obs).max() <= 10.0


# ---------------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------------
UPDATE = 256  # env steps per update
SMALL = ["--num-steps", str(UPDATE), "--num-minibatches", "4", "--update-epochs", "2"]


def script_args(run_dir, env_id="Hopper-v5", total=2 * UPDATE, extra=()):
    return ["--env-id", env_id, "--total-timesteps", str(total), "--eval-frequency", str(UPDATE),
            "--eval-episodes", "2", "--final-eval-episodes", "2", "--seed", "3", "--run-dir", str(run_dir), *SMALL,
            *extra]  # fmt: skip


def start(args, cwd) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, os.path.join(ROOT, "rpo_mujoco.py"), *args]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def run(args, cwd) -> subprocess.CompletedProcess:
    proc = start(args, cwd)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def scalars(run_path, tag):
    return [(e.step, e.value) for e in EventAccumulator(str(run_path)).Reload().Scalars(tag)]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


TAGS = ("charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/learning_rate",
        "losses/value_loss", "losses/policy_loss", "losses/entropy", "losses/old_approx_kl", "losses/approx_kl",
        "losses/clipfrac", "losses/explained_variance", "eval/return", "eval/length", "heldout/return",
        "heldout/length")  # fmt: skip


def test_training_runs_two_updates_logs_and_saves_the_statistics_with_the_model(tmp_path):
    result = run(script_args(tmp_path / "runs", extra=["--save-model", "--exp-name", "smoke"]), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    *records, heldout = [json.loads(line) for line in result.stdout.splitlines()]  # stdout: JSON lines only
    assert [(r["eval_idx"], r["global_step"]) for r in records] == [(0, 256), (1, 512)]
    assert set(heldout) == {"global_step", "heldout/return", "heldout/length", "heldout/episodes"}
    (run_path,) = glob.glob(str(tmp_path / "runs" / "Hopper-v5__smoke__3__*"))
    assert_progress_lines(result.stderr, os.path.basename(run_path), 512, "eval/return")  # reports at every update
    assert_finished_line(result.stderr, os.path.basename(run_path), run_path, heldout)
    assert {"config.json", "evals.jsonl", "final_eval.json", "model.pt", "checkpoint.pt"} <= set(os.listdir(run_path))
    tags = EventAccumulator(run_path).Reload().Tags()["scalars"]
    assert all(tag in tags for tag in TAGS), sorted(set(TAGS) - set(tags))
    assert [step for step, _ in scalars(run_path, "losses/value_loss")] == [256, 512]
    lengths = [value for _, value in scalars(run_path, "charts/episodic_length")]
    assert len(lengths) >= 5 and all(1 <= n < 1000 for n in lengths)  # a random Hopper falls within tens of steps
    model, checkpoint = load(os.path.join(run_path, "model.pt")), load(os.path.join(run_path, "checkpoint.pt"))
    stats = model["normalizer"]["obs_rms"]
    assert stats["count"] == pytest.approx(512 + 1, abs=1e-3)  # every training observation, the first reset's too
    assert torch.equal(stats["mean"], checkpoint["normalizer"]["obs_rms"]["mean"]) and stats["var"].min() > 0
    again = m.evaluate_checkpoint(os.path.join(run_path, "model.pt"), eval_episodes=2, seed=3 + 1_000_000)
    assert again["global_step"] == 512 and again["eval/return"] == pytest.approx(records[-1]["eval/return"])
    checkpoint = os.path.join(run_path, "checkpoint.pt")  # the training checkpoint holds the same agent and statistics
    assert m.evaluate_checkpoint(checkpoint, eval_episodes=2, seed=3 + 1_000_000) == again


@pytest.mark.parametrize(("env_id", "updates"), [("HalfCheetah-v5", 5), ("Ant-v5", 3), ("Humanoid-v5", 3)])
def test_run_stopped_by_sigusr1_and_resumed_equals_the_uninterrupted_run(tmp_path, env_id, updates):
    """The checkpoint falls in the middle of an episode and the resumed run must restore the simulator, the time limit
    and the normalisation statistics to continue it. HalfCheetah: 1000-step episodes, truncated at 1000 after the
    resume; Ant and Humanoid: rewards computed from what the simulator derived in the step before (positions, centre
    of mass), which MuJoCo's integration state does not hold (issue 22)."""
    total, extra = updates * UPDATE, ["--checkpoint-frequency", str(UPDATE)]
    reference = start(script_args(tmp_path / "runs", env_id, total, [*extra, "--run-name", "ref"]), tmp_path)
    args = script_args(tmp_path / "runs", env_id, total, [*extra, "--run-name", "resumed"])
    proc = start(args, tmp_path)
    checkpoint = tmp_path / "runs" / "resumed" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:] if proc.poll() else "slow"
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    first_stdout, first_stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, first_stderr[-3000:]
    stopped_at = load(checkpoint)["global_step"]
    assert UPDATE <= stopped_at < total and f"stopped by SIGUSR1 at global_step {stopped_at}" in first_stderr
    assert load(checkpoint)["envs"]["lengths"].min() > 0  # in the middle of an episode
    reference_stdout, reference_stderr = reference.communicate(timeout=300)
    assert reference.returncode == 0, reference_stderr[-3000:]
    resumed = run(args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from global_step {stopped_at}" in resumed.stderr
    assert (first_stdout + resumed.stdout).splitlines() == reference_stdout.splitlines()
    a, b = load(checkpoint), load(tmp_path / "runs" / "ref" / "checkpoint.pt")
    for name, tensor in a["agent"].items():
        assert torch.equal(tensor, b["agent"][name]), name
    for key in ("mean", "var"):
        assert torch.equal(a["normalizer"]["obs_rms"][key], b["normalizer"]["obs_rms"][key])
    assert torch.equal(a["normalizer"]["returns"], b["normalizer"]["returns"])
    ref_path, run_path = tmp_path / "runs" / "ref", tmp_path / "runs" / "resumed"
    for tag in ("charts/episodic_return", "charts/episodic_length", "losses/value_loss", "eval/return"):
        assert scalars(run_path, tag) == scalars(ref_path, tag), tag
    if env_id == "HalfCheetah-v5":
        assert scalars(run_path, "charts/episodic_length") == [(1000, 1000.0)]  # truncated at the time limit


def test_a_first_sigint_checkpoints_at_the_update_boundary_exits_3_and_the_same_run_name_resumes(tmp_path):
    """Ctrl-C acts as SIGUSR1: the update ends, a checkpoint is written, exit code 3 and one line that says how to
    resume; the same command resumes the run, which then ends normally."""
    args = script_args(tmp_path / "runs", "Hopper-v5", 2 * UPDATE, ["--run-name", "ctrl-c"])
    proc = start(args, tmp_path)
    run_path = tmp_path / "runs" / "ctrl-c"
    lines = read_stderr_until(proc, "[ctrl-c] set-up done in ")  # before that, a signal stops set-up (test_cli.py)
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    stderr = "".join(lines) + rest
    assert proc.returncode == 3, stderr[-3000:]
    stopped_at = load(run_path / "checkpoint.pt")["global_step"]
    assert UPDATE <= stopped_at < 2 * UPDATE and stopped_at % UPDATE == 0
    assert (f"[ctrl-c] stopped by SIGINT at global_step {stopped_at}: checkpoint written to {run_path}/checkpoint.pt; "
            "to resume, rerun the same command with --run-name ctrl-c") in stderr.splitlines()  # fmt: skip
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    resumed = run(args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from global_step {stopped_at}" in resumed.stderr
    assert load(run_path / "checkpoint.pt")["global_step"] == 2 * UPDATE


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------
BAD_ARGS = [
    ({"env_id": "HalfCheetah-v9"}, "unknown --env-id 'HalfCheetah-v9'; supported: Ant-v5, HalfCheetah-v5, Hopper-v5"),
    ({"env_id": "CartPole-v1"}, "--env-id must have a Box action space, got CartPole-v1 with Discrete(2)"),
    ({"num_minibatches": 3}, "--num-minibatches must divide --num-envs * --num-steps = 2048, got 3"),
    ({"total_timesteps": 100}, "--total-timesteps must be >= --num-envs * --num-steps = 2048 (one update), got 100"),
    ({"rpo_alpha": -0.5}, "--rpo-alpha must be >= 0, got -0.5"),
    ({"gamma": 1.5}, "--gamma must be in [0, 1), got 1.5"),
    ({"gae_lambda": 1.5}, "--gae-lambda must be in [0, 1], got 1.5"),
    ({"update_epochs": 0}, "--update-epochs must be >= 1, got 0"),
    ({"vf_coef": float("nan")}, "--vf-coef must be a finite number, got nan"),
    ({"rpo_alpha": float("inf")}, "--rpo-alpha must be a finite number, got inf"),
    (
        {"num_envs": 400_000, "vector_env_mode": "async", "total_timesteps": 10**9},
        "--num-envs 400000 (async), --num-steps 2048 and --eval-episodes 10 need about",
    ),
]


@pytest.mark.parametrize(("changes", "message"), BAD_ARGS)
def test_bad_arguments_raise_one_line_naming_value_and_allowed(changes, message):
    with pytest.raises(ValueError) as err:
        m.validate_args(dataclasses.replace(m.Args(), **changes))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_defaults_are_valid():
    m.validate_args(m.Args())


def test_bad_env_id_exits_2_with_one_line_and_writes_nothing(tmp_path):
    result = run(["--env-id", "CartPole-v1", "--run-dir", str(tmp_path / "runs")], tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == ["error: --env-id must have a Box action space, got CartPole-v1 with "
                                          "Discrete(2)"]  # fmt: skip
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("run_dir", "extra", "message"),
    [
        ("runs", ["--vf-coef", "nan"], "error: --vf-coef must be a finite number, got nan"),
        ("runs", ["--rpo-alpha", "inf"], "error: --rpo-alpha must be a finite number, got inf"),
        ("{file}/runs", [], "error: --run-dir must be a folder or a path where one can be made, got '{file}/runs' "
                            "('{file}' is not a folder)"),
        ("{file}", [], "error: --run-dir must be a folder or a path where one can be made, got '{file}' ('{file}' is "
                       "not a folder)"),
    ],
)  # fmt: skip
def test_nan_or_inf_and_a_file_in_the_run_dir_exit_2_with_one_line_and_write_nothing(run_dir, extra, message, tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    result = run(script_args(tmp_path / run_dir.format(file=file), extra=["--run-name", "bad", *extra]), tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [message.format(file=file)]
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"] and file.read_text() == "mine"


def test_capture_video_saves_one_video_per_evaluation(tmp_path, monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "egl")
    result = run(script_args(tmp_path / "runs", extra=["--capture-video"]), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stdout.splitlines()) == 3  # stdout keeps only the JSON lines: 2 evaluations, 1 held-out
    videos = glob.glob(str(tmp_path / "runs" / "*" / "videos" / "*.mp4"))
    assert len(videos) == 3 and all(os.path.getsize(v) > 1000 for v in videos)


def test_capture_video_without_a_renderer_fails_before_writing(tmp_path, monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "glfw")  # no display here: GLFW cannot make a context
    monkeypatch.delenv("DISPLAY", raising=False)
    result = run(script_args(tmp_path / "runs", extra=["--capture-video"]), tmp_path)
    assert result.returncode == 2
    assert "error: --capture-video cannot render" in result.stderr and "MUJOCO_GL=egl" in result.stderr
    assert not (tmp_path / "runs").exists()
