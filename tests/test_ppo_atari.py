"""ppo_atari.py: GAE against its definition, truncation bootstrapping where the right value is known, the two vector
env paths frame for frame, raw full-game scores, end-to-end runs on the real emulator, exact resume after SIGUSR1
(gymnasium path), restarted games on resume (ale-py path), Ctrl-C and bad input."""

import dataclasses
import glob
import json
import os
import signal
import subprocess
import sys
import time

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import ROOT, assert_finished_line, assert_progress_lines, read_stderr_until
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ppo_atari as m

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
    rng = np.random.default_rng(0)
    T, N = 37, 5
    rewards, values, next_value = rng.normal(size=(T, N)), rng.normal(size=(T, N)), rng.normal(size=N)
    dones = (rng.uniform(size=(T, N)) < 0.15).astype(np.float64)
    expected = reference_gae(rewards, values, dones, next_value, 0.97, 0.9)
    as_t = lambda x: torch.as_tensor(x, dtype=torch.float64)  # noqa: E731
    got = m.compute_gae(as_t(rewards), as_t(values), as_t(dones), as_t(next_value), 0.97, 0.9)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)


class CountingEnv(gym.Env):
    """Reward 1 every step; the observation is the step count; truncated (time limit) after 3 steps, never
    terminated. The discounted value of every state of this never-ending task is 1 / (1 - gamma)."""

    observation_space = gym.spaces.Box(0, 255, (1,), np.uint8)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([self.t], np.uint8), {}

    def step(self, action):
        self.t += 1
        return np.array([self.t], np.uint8), 1.0, False, self.t == 3, {}


class StubAgent(torch.nn.Module):
    """Uniform policy over 2 actions; value = bias + slope * observation."""

    def __init__(self, bias: float, slope: float = 0.0):
        super().__init__()
        self.bias, self.slope = bias, slope

    def forward(self, x):
        return torch.zeros(len(x), 2), self.bias + self.slope * x[:, 0].float()


def rollout_with(agent, num_steps=8, num_envs=2):
    args = m.Args(num_steps=num_steps, num_envs=num_envs, gamma=GAMMA, clip_rewards=False)
    envs = gym.vector.SyncVectorEnv([CountingEnv] * num_envs, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    obs, _ = envs.reset(seed=0)
    rollout = m.new_rollout(num_steps, num_envs, (1,), "cpu")
    next_value, _ = m.collect_rollout(agent, envs, m.EnvState(obs, None), rollout, args, "cpu")
    return rollout, next_value


def test_truncated_episode_bootstraps_from_the_value_of_its_true_final_observation():
    rollout, _ = rollout_with(StubAgent(bias=2.0, slope=0.5))
    # steps 3 and 6 end episodes by truncation: reward 1 + gamma V(final obs 3) = 1 + 0.9 * (2 + 0.5 * 3); the reset
    # observation (0) would give 1 + 0.9 * 2, and CleanRL's no bootstrap 1
    expected = np.ones((8, 2))
    expected[[2, 5]] = 1.0 + GAMMA * (2.0 + 0.5 * 3)
    np.testing.assert_allclose(rollout.rewards.numpy(), expected, rtol=1e-6)
    assert rollout.dones[:, 0].tolist() == [0, 0, 1, 0, 0, 1, 0, 0]


def test_with_the_true_value_function_every_advantage_is_zero_across_time_limits():
    true_value = 1.0 / (1.0 - GAMMA)  # the task never ends: the time limit is not part of the state
    rollout, next_value = rollout_with(StubAgent(bias=true_value))
    advantages = m.compute_gae(rollout.rewards, rollout.values, rollout.dones, next_value, GAMMA, 0.95)
    np.testing.assert_allclose(advantages.numpy(), 0.0, atol=1e-4)
    np.testing.assert_allclose((advantages + rollout.values).numpy(), true_value, rtol=1e-6)


def test_both_vector_env_paths_give_the_same_frames_rewards_and_ends_for_the_same_seed_and_actions():
    """noop_max=0: the no-op counts come from different generators; everything else is deterministic."""
    fast = m.make_vector_env("BreakoutNoFrameskip-v4", 2, "ale", noop_max=0)
    wrapped = m.make_vector_env("BreakoutNoFrameskip-v4", 2, "sync", noop_max=0)
    obs_fast, info_fast = fast.reset(seed=5)
    obs_wrapped, info_wrapped = wrapped.reset(seed=5)
    assert np.array_equal(obs_fast, obs_wrapped) and obs_fast.shape == (2, 4, 84, 84) and obs_fast.dtype == np.uint8
    assert (obs_fast[:, :3] == 0).all() and obs_fast[:, 3].any()  # zero padding before the first frame
    rng, game_ends, rewards = np.random.default_rng(0), 0, 0.0
    for _ in range(600):
        actions = rng.integers(0, 4, 2)
        step_fast, step_wrapped = fast.step(actions), wrapped.step(actions)
        for a, b in zip(step_fast[:4], step_wrapped[:4], strict=True):  # observations, rewards, terminated, truncated
            assert np.array_equal(a, b)
        assert np.array_equal(step_fast[4]["lives"], step_wrapped[4]["lives"])
        for i in np.flatnonzero(step_fast[2] | step_fast[3]):
            assert np.array_equal(step_fast[4]["final_obs"][i], step_wrapped[4]["final_obs"][i])
            game_ends += 1
        rewards += step_fast[1].sum()
    assert game_ends >= 2 and rewards > 0  # autoresets and scoring were compared too


class RecordingEnvs:
    """A vector env that keeps its last raw step, so a test sees both it and what env_step made of it."""

    def __init__(self, envs):
        self.envs, self.last = envs, None

    def step(self, actions):
        self.last = self.envs.step(actions)
        return self.last


def test_episodic_return_is_the_raw_whole_game_score_while_lost_lives_end_value_episodes():
    envs = RecordingEnvs(m.make_vector_env("BreakoutNoFrameskip-v4", 1, "ale"))
    obs, infos = envs.envs.reset(seed=3)
    state, rng, args = m.EnvState(obs, infos["lives"]), np.random.default_rng(1), m.Args(num_envs=1)
    raw_total, dones, games = 0.0, 0, []
    while not games:
        rewards, done, _, _, ended = m.env_step(envs, rng.integers(0, 4, 1), state, args)
        raw = envs.last[1][0]
        assert rewards[0] == np.sign(raw)  # clipped for training
        raw_total, dones, games = raw_total + raw, dones + int(done[0]), games + ended
    assert dones == 5  # Breakout: four lost lives and the game over, each ends an episode for the value targets
    assert games == [(raw_total, games[0][1])] and games[0][1] > 100


# ---------------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------------
UPDATE = 256  # env steps per update: 2 envs x 128 steps, so that some random-policy games end in 3 updates
SMALL = ["--num-envs", "2", "--num-steps", "128", "--num-minibatches", "2", "--update-epochs", "2"]


def script_args(run_dir, total=3 * UPDATE, extra=()):
    return ["--total-timesteps", str(total), "--eval-frequency", str(UPDATE), "--eval-episodes", "2",
            "--final-eval-episodes", "2", "--seed", "2", "--run-dir", str(run_dir), *SMALL, *extra]  # fmt: skip


def start(args, cwd) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, os.path.join(ROOT, "ppo_atari.py"), *args]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def run(args, cwd) -> subprocess.CompletedProcess:
    proc = start(args, cwd)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def scalars(run_path, tag):
    return [(e.step, e.value) for e in EventAccumulator(str(run_path)).Reload().Scalars(tag)]


TAGS = ("charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/learning_rate",
        "losses/value_loss", "losses/policy_loss", "losses/entropy", "losses/old_approx_kl", "losses/approx_kl",
        "losses/clipfrac", "losses/explained_variance", "eval/return", "eval/length", "heldout/return",
        "heldout/length")  # fmt: skip


def test_training_runs_three_updates_and_logs_cleanrl_metrics_and_json_lines(tmp_path):
    result = run(script_args(tmp_path / "runs", extra=["--save-model", "--exp-name", "smoke"]), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    *records, heldout = [json.loads(line) for line in result.stdout.splitlines()]  # stdout: JSON lines only
    assert [(r["eval_idx"], r["global_step"]) for r in records] == [(0, 256), (1, 512), (2, 768)]
    assert all(r["eval/return"] >= 0 and r["eval/length"] > 50 for r in records)
    assert set(heldout) == {"global_step", "heldout/return", "heldout/length", "heldout/episodes"}
    assert heldout["global_step"] == 768 and heldout["heldout/episodes"] == 2
    (run_path,) = glob.glob(str(tmp_path / "runs" / "BreakoutNoFrameskip-v4__smoke__2__*"))
    assert_progress_lines(result.stderr, os.path.basename(run_path), 768, "eval/return")  # reports at every update
    assert_finished_line(result.stderr, os.path.basename(run_path), run_path, heldout)
    assert {"config.json", "evals.jsonl", "final_eval.json", "model.pt", "checkpoint.pt"} <= set(os.listdir(run_path))
    tags = EventAccumulator(run_path).Reload().Tags()["scalars"]
    assert all(tag in tags for tag in TAGS), sorted(set(TAGS) - set(tags))
    assert [step for step, _ in scalars(run_path, "losses/value_loss")] == [256, 512, 768]
    lr = [value for _, value in scalars(run_path, "charts/learning_rate")]
    np.testing.assert_allclose(lr, [2.5e-4, 2.5e-4 * 2 / 3, 2.5e-4 / 3], rtol=1e-6)  # linear annealing to 0
    returns = scalars(run_path, "charts/episodic_return")  # whole games of a near-uniform policy, ~170+ steps each
    assert len(returns) >= 1 and all(value >= 0 and value == int(value) for _, value in returns)
    assert all(length >= 100 for _, length in scalars(run_path, "charts/episodic_length"))
    again = m.evaluate_checkpoint(os.path.join(run_path, "model.pt"), eval_episodes=2, seed=2 + 1_000_000)
    assert again["global_step"] == 768 and again["eval/return"] == records[-1]["eval/return"]
    checkpoint = os.path.join(run_path, "checkpoint.pt")  # the training checkpoint holds the same agent
    assert m.evaluate_checkpoint(checkpoint, eval_episodes=2, seed=2 + 1_000_000) == again


def assert_same_agent(a: dict, b: dict):
    for name, tensor in a["agent"].items():
        assert torch.equal(tensor, b["agent"][name]), name
    for param_id, moments in a["agent_optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, b["agent_optimizer"]["state"][param_id][name]), (param_id, name)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def stop_after_first_checkpoint(args, cwd, run_path):
    proc = start(args, cwd)
    checkpoint = run_path / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, "no checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr[-3000:]
    stopped_at = load(checkpoint)["global_step"]
    assert f"stopped by SIGUSR1 at global_step {stopped_at}: checkpoint written to" in stderr
    return stdout, stopped_at


def test_gymnasium_path_stopped_by_sigusr1_and_resumed_equals_the_uninterrupted_run(tmp_path):
    extra = ["--vector-env-mode", "sync", "--checkpoint-frequency", str(UPDATE)]
    reference = start(script_args(tmp_path / "runs", 4 * UPDATE, [*extra, "--run-name", "reference"]), tmp_path)
    args = script_args(tmp_path / "runs", 4 * UPDATE, [*extra, "--run-name", "resumed"])
    first_stdout, stopped_at = stop_after_first_checkpoint(args, tmp_path, tmp_path / "runs" / "resumed")
    assert UPDATE <= stopped_at < 4 * UPDATE and stopped_at % UPDATE == 0  # at an update boundary, before the end
    reference_stdout, reference_stderr = reference.communicate(timeout=300)
    assert reference.returncode == 0, reference_stderr[-3000:]
    resumed = run(args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    message = (
        f"resuming from global_step {stopped_at} (eval_idx {stopped_at // UPDATE}); the games in progress continue"
    )
    assert message in resumed.stderr
    assert (first_stdout + resumed.stdout).splitlines() == reference_stdout.splitlines()
    ref_path, run_path = tmp_path / "runs" / "reference", tmp_path / "runs" / "resumed"
    assert_same_agent(load(run_path / "checkpoint.pt"), load(ref_path / "checkpoint.pt"))
    for tag in ("charts/episodic_return", "losses/value_loss", "eval/return"):
        assert scalars(run_path, tag) == scalars(ref_path, tag), tag


def test_a_first_sigint_checkpoints_at_the_update_boundary_exits_3_and_the_same_run_name_resumes(tmp_path):
    """Ctrl-C acts as SIGUSR1: the update ends, a checkpoint is written, exit code 3 and one line that says how to
    resume; the same command resumes the run, which then ends normally."""
    args = script_args(tmp_path / "runs", 3 * UPDATE, ["--run-name", "ctrl-c"])
    proc = start(args, tmp_path)
    run_path = tmp_path / "runs" / "ctrl-c"
    lines = read_stderr_until(proc, "[ctrl-c] set-up done in ")  # before that, a signal stops set-up (test_cli.py)
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    stderr = "".join(lines) + rest
    assert proc.returncode == 3, stderr[-3000:]
    stopped_at = load(run_path / "checkpoint.pt")["global_step"]
    assert UPDATE <= stopped_at < 3 * UPDATE and stopped_at % UPDATE == 0
    assert (f"[ctrl-c] stopped by SIGINT at global_step {stopped_at}: checkpoint written to {run_path}/checkpoint.pt; "
            "to resume, rerun the same command with --run-name ctrl-c") in stderr.splitlines()  # fmt: skip
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    resumed = run(args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from global_step {stopped_at}" in resumed.stderr
    assert load(run_path / "checkpoint.pt")["global_step"] == 3 * UPDATE


def test_ale_path_resume_restarts_the_games_and_continues_counters_evaluations_and_curves(tmp_path):
    args = script_args(tmp_path / "runs", 3 * UPDATE, ["--run-name", "r", "--no-anneal-lr"])
    first = run(args[:1] + [str(2 * UPDATE)] + args[2:], tmp_path)  # a finished run of 2 updates, extended to 3
    assert first.returncode == 0, first.stderr[-3000:]
    before = load(tmp_path / "runs" / "r" / "checkpoint.pt")
    resumed = run(args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from global_step {2 * UPDATE} (eval_idx 2); the games in progress restart" in resumed.stderr
    assert [json.loads(line).get("eval_idx") for line in resumed.stdout.splitlines()] == [2, None]
    after = load(tmp_path / "runs" / "r" / "checkpoint.pt")
    assert after["global_step"] == 3 * UPDATE and after["update_idx"] == 3 and before["update_idx"] == 2
    assert [step for step, _ in scalars(tmp_path / "runs" / "r", "losses/value_loss")] == [256, 512, 768]


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------
BAD_ARGS = [
    ({"env_id": "Breakout-v9"}, "unknown --env-id 'Breakout-v9'; supported: {Game}NoFrameskip-v4 or ALE/{Game}-v5"),
    ({"env_id": "FooNoFrameskip-v4"}, "Game one of Adventure, AirRaid, Alien,"),
    ({"num_minibatches": 3}, "--num-minibatches must divide --num-envs * --num-steps = 1024, got 3"),
    ({"total_timesteps": 1000}, "--total-timesteps must be >= --num-envs * --num-steps = 1024 (one update), got 1000"),
    ({"gamma": 1.0}, "--gamma must be in [0, 1), got 1.0"),
    ({"clip_coef": 0.0}, "--clip-coef must be > 0, got 0.0"),
    ({"target_kl": -0.1}, "--target-kl must be > 0 (or None), got -0.1"),
    ({"eval_episodes": 0}, "--eval-episodes must be >= 1, got 0"),
    ({"num_envs": 0}, "--num-envs must be >= 1, got 0"),
    (
        {"num_envs": 400_000, "vector_env_mode": "async", "total_timesteps": 10**9},
        "--num-envs 400000 (async), --num-steps 128 and --eval-episodes 10 need about",
    ),
    ({"ent_coef": float("nan")}, "--ent-coef must be a finite number, got nan"),
    ({"max_grad_norm": float("inf")}, "--max-grad-norm must be a finite number, got inf"),
]


@pytest.mark.parametrize(("changes", "message"), BAD_ARGS)
def test_bad_arguments_raise_one_line_naming_value_and_allowed(changes, message):
    with pytest.raises(ValueError) as err:
        m.validate_args(dataclasses.replace(m.Args(), **changes))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_defaults_are_valid_and_v5_ids_select_sticky_actions():
    m.validate_args(m.Args())
    assert m.parse_env_id("BreakoutNoFrameskip-v4") == ("breakout", 0.0)
    assert m.parse_env_id("ALE/MsPacman-v5") == ("ms_pacman", 0.25)


def test_bad_env_id_exits_2_with_one_line_and_writes_nothing(tmp_path):
    result = run(["--env-id", "Pong-v4", "--run-dir", str(tmp_path / "runs")], tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: unknown --env-id 'Pong-v4'; supported:")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("run_dir", "extra", "message"),
    [
        ("runs", ["--ent-coef", "nan"], "error: --ent-coef must be a finite number, got nan"),
        ("runs", ["--max-grad-norm", "inf"], "error: --max-grad-norm must be a finite number, got inf"),
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


@pytest.mark.parametrize("mode", ["ale", "async"])
def test_capture_video_saves_one_video_per_evaluation(tmp_path, mode):
    """Evaluation then runs on the gymnasium path in this process, whichever path training uses."""
    result = run(script_args(tmp_path / "runs", 2 * UPDATE, ["--capture-video", "--vector-env-mode", mode]), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stdout.splitlines()) == 3  # stdout keeps only the JSON lines: 2 evaluations, 1 held-out
    videos = glob.glob(str(tmp_path / "runs" / "*" / "videos" / "*.mp4"))
    assert len(videos) == 3 and all(os.path.getsize(v) > 1000 for v in videos)
