"""dqn_snake_equivariant.py and its twin dqn_snake_cnn.py: the exact D4 (and C4) equivariance of the Q-network on real
boards, the map from its output channels to the moves, the escnn target network's filter cache, the Double-DQN
update, the schedules, and both scripts end to end: smoke runs past learning_starts, exact resume after SIGUSR1, Ctrl-C,
bad input. The symmetries are NumPy's (np.rot90, np.flip: tests/test_snake_env.py's BoardSymmetry), not escnn's."""

import dataclasses
import glob
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, assert_finished_line, assert_progress_lines, read_stderr_until
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_snake_env import D4_ELEMENTS, BoardSymmetry, rollout_policy

import dqn_snake_cnn as cnn
import dqn_snake_equivariant as eq

C4_ELEMENTS = [(k, False) for k in range(4)]
SMALL = {eq: {"reg_rep_n": 2}, cnn: {"channels": 8}}  # small networks of each script


def rollout_observations(size: int, n: int = 48, seed: int = 0) -> np.ndarray:
    """(n, 3, size, size) observations of snakes of many lengths from random rollouts."""
    env, rng, observations = eq.SnakeEnv(size=size), np.random.default_rng(seed), []
    obs, _ = env.reset(seed=seed)
    while len(observations) < n:
        if rng.random() < 0.25:
            observations.append(obs)
        obs, _, terminated, truncated, _ = env.step(rollout_policy(env.state, size, rng))
        if terminated or truncated:
            obs, _ = env.reset()
    return np.stack(observations)


def random_q_network(module, size: int, seed: int = 0, **network_args):
    """A Q-network with random parameters, biases included (escnn initialises them to zero)."""
    torch.manual_seed(seed)
    net = module.QNetwork(module.Args(board_size=size, **network_args))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.5)
    return net


def max_equivariance_error(q_fn, size: int, elements, obs: np.ndarray) -> tuple[float, float]:
    """max over elements g, states s and moves a of |Q(g s)[g a] - Q(s)[a]|, and max |Q|. Asserts that Q tells the
    moves apart (a Q-network that gave all moves one value would be trivially equivariant)."""
    with torch.no_grad():
        q = q_fn(torch.as_tensor(obs))
        errors = []
        for k, mirror in elements:
            g = BoardSymmetry(size, k, mirror)
            g_q = q_fn(torch.as_tensor(g.board(obs)))
            errors.append((g_q[:, g.moves] - q).abs().max().item())  # column a of g_q[:, g.moves]: Q(g s)[g a]
    assert (q.amax(1) - q.amin(1)).max() > 1e-2 * q.abs().max()
    return max(errors), q.abs().max().item()


@pytest.mark.parametrize("path", ["train", "eval", "target"])  # expanded at each call, escnn's cache, the target
@pytest.mark.parametrize("size", [6, 7, 10])  # even and odd sides: the two exact downsamplings
def test_q_network_is_equivariant_for_every_element_of_d4(size, path):
    net = random_q_network(eq, size, reg_rep_n=3)
    q_fn = eq.TargetQNetwork(net) if path == "target" else net.train(path == "train")
    error, q_max = max_equivariance_error(q_fn, size, D4_ELEMENTS, rollout_observations(size))
    assert error <= 1e-5 * (1 + q_max), f"max error {error:.3g}, max |Q| {q_max:.3g}"


@pytest.mark.parametrize("size", [6, 7])
def test_the_c4_variant_is_equivariant_to_rotations_and_not_to_mirrors(size):
    net = random_q_network(eq, size, group="c4", reg_rep_n=3)
    obs = rollout_observations(size)
    error, q_max = max_equivariance_error(net, size, C4_ELEMENTS, obs)
    assert error <= 1e-5 * (1 + q_max)
    mirror_error, _ = max_equivariance_error(net, size, [(0, True)], obs)
    assert mirror_error > 0.01 * q_max


def test_the_check_detects_that_the_cnn_twin_is_not_equivariant():
    net = random_q_network(cnn, 6, channels=8)
    obs = rollout_observations(6)
    for element in D4_ELEMENTS[1:]:
        error, q_max = max_equivariance_error(net, 6, [element], obs)
        assert error > 1e-3 * (1 + q_max), element


@pytest.mark.parametrize(("group", "elements", "valid"), [("d4", D4_ELEMENTS, 2), ("c4", C4_ELEMENTS, 4)])
def test_only_the_scripts_channel_to_move_map_and_its_symmetric_variants_make_q_equivariant(group, elements, valid):
    """Of the 24 ways to read the 4 output channels as moves, D4 admits exactly 2 (the script's and the one turned by
    180 degrees: UP and DOWN have the same stabiliser), C4 exactly 4 (its rotations); the script's is one of them."""
    net, size = random_q_network(eq, 6, group=group, reg_rep_n=2), 6
    obs = rollout_observations(size, n=16)

    def channels(x):  # the output field's channels, before the script's map to moves
        return net.net(net.in_type(eq.with_board_channel(x))).tensor.reshape(len(x), 4)

    equivariant = []
    for order in itertools.permutations(range(4)):  # order[move] = channel
        error, q_max = max_equivariance_error(lambda x, o=order: channels(x)[:, list(o)], size, elements, obs)
        if error <= 1e-5 * (1 + q_max):
            equivariant.append(order)
    assert len(equivariant) == valid and eq.CHANNEL_OF_MOVE in equivariant
    assert [eq.MOVE_OF_CHANNEL[c] for c in eq.CHANNEL_OF_MOVE] == [eq.UP, eq.RIGHT, eq.DOWN, eq.LEFT]


def test_the_cnn_twin_has_the_parameter_count_of_the_equivariant_network_within_10_percent():
    eq_params, cnn_params = eq.num_params(eq.QNetwork(eq.Args())), cnn.num_params(cnn.QNetwork(cnn.Args()))
    assert (eq_params, cnn_params) == (6913, 6952)
    assert abs(cnn_params / eq_params - 1) <= 0.1


@pytest.mark.parametrize("module", [eq, cnn], ids=["eq", "cnn"])
def test_the_target_network_serves_the_updated_parameters_after_hard_and_soft_updates(module):
    """escnn's R2Conv caches its expanded filters in eval mode: the target must re-expand them at every update."""
    args = module.Args(board_size=6, **SMALL[module])
    torch.manual_seed(0)
    online, averaged = module.QNetwork(args), module.QNetwork(args)
    target = module.TargetQNetwork(averaged)
    x = torch.as_tensor(rollout_observations(6, n=8))
    with torch.no_grad():
        for _ in range(2):  # two soft updates toward a moving online network
            for p in online.parameters():
                p.add_(torch.randn_like(p))
            target.update(online, tau=0.3)
            for p_avg, p_online in zip(averaged.parameters(), online.parameters(), strict=True):
                p_avg.lerp_(p_online, 0.3)
            torch.testing.assert_close(target(x), averaged(x), rtol=1e-5, atol=1e-5)
        target.update(online, tau=1.0)
        assert torch.equal(target(x), online.eval()(x))
    assert not target.training and all(not p.requires_grad for p in target.parameters())


def test_an_escnn_target_would_be_stale_without_its_refresh():
    """Why `update` refreshes: changing the parameters of an eval-mode escnn network leaves its output unchanged."""
    torch.manual_seed(0)
    target = eq.TargetQNetwork(eq.QNetwork(eq.Args(board_size=6, reg_rep_n=2)))
    x = torch.as_tensor(rollout_observations(6, n=8))
    with torch.no_grad():
        before = target(x)
        for p in target.parameters():
            p.add_(1.0)
        assert torch.equal(target(x), before)  # the cached filters
        target.refresh()
        assert (target(x) - before).abs().max() > 0.1


@pytest.mark.parametrize("module", [eq, cnn], ids=["eq", "cnn"])
def test_saved_networks_hold_parameters_only_and_reload_into_a_fresh_target(module):
    args = module.Args(board_size=6, **SMALL[module])
    target = module.TargetQNetwork(random_q_network(module, 6, **SMALL[module]))
    saved = module.parameters_state(target)
    assert set(saved) == {name for name, _ in target.named_parameters()}
    assert not [key for key in saved if re.search("filter|expanded_bias|sampled_basis|bias_expansion", key)]
    fresh = module.TargetQNetwork(module.QNetwork(args))
    x = torch.as_tensor(rollout_observations(6, n=8))
    module.load_parameters(fresh, saved)
    assert not fresh.training
    with torch.no_grad():
        assert torch.equal(fresh(x), target(x))
    with pytest.raises(ValueError, match="do not match the network"):
        module.load_parameters(fresh, {"other": torch.zeros(1)})


def small_agent(module, size: int = 6, **changes):
    args = module.Args(board_size=size, batch_size=16, **SMALL[module], **changes)
    torch.manual_seed(0)
    return args, module.build_agent(args, torch.device("cpu"))


def random_batch(module, size: int = 6, batch: int = 16):
    rng = np.random.default_rng(0)
    obs = torch.as_tensor(rollout_observations(size, n=2 * batch))
    return module.ReplayBatch(obs[:batch], obs[batch:], torch.as_tensor(rng.integers(0, 4, (batch, 1))),
                              torch.as_tensor(rng.choice([-1.0, 0.0, 1.0], (batch, 1)), dtype=torch.float32),
                              torch.as_tensor(rng.random((batch, 1)) < 0.3, dtype=torch.float32))  # fmt: skip


@pytest.mark.parametrize("module", [eq, cnn], ids=["eq", "cnn"])
def test_the_update_minimises_the_huber_loss_of_the_double_dqn_target(module):
    args, agent = small_agent(module, gamma=0.9)
    nets = agent[0]
    batch = random_batch(module)
    with torch.no_grad():
        for p in nets["q_network"].parameters():  # online and target differ, so that Double DQN matters
            p.add_(0.5 * torch.randn_like(p))
        nets["target_network"].update(random_q_network(module, 6, seed=1, **SMALL[module]), tau=1.0)
        chosen = nets["q_network"](batch.next_observations).argmax(1)  # the online network selects ...
        next_q = nets["target_network"](batch.next_observations)[torch.arange(16), chosen]  # ... the target evaluates
        y = batch.rewards[:, 0] + 0.9 * (1 - batch.terminations[:, 0]) * next_q
        q = nets["q_network"](batch.observations)[torch.arange(16), batch.actions[:, 0]]
        expected = F.huber_loss(q, y, delta=1.0)
        assert not torch.equal(chosen, nets["target_network"](batch.next_observations).argmax(1))
    before = [p.clone() for p in nets["q_network"].parameters()]
    logs = module.dqn_update(batch, agent, args, 20_000, torch.device("cpu"))
    torch.testing.assert_close(logs["losses/td_loss"], expected)
    assert all(not torch.equal(a, b) for a, b in zip(before, nets["q_network"].parameters(), strict=True))


def test_allocating_adam_state_up_front_changes_no_update():
    torch.manual_seed(0)
    nets = [eq.QNetwork(eq.Args(board_size=6, reg_rep_n=2)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [torch.optim.Adam(net.parameters(), lr=1e-3, fused=True) for net in nets]
    eq.allocate_optimizer_state(opts[1])
    state = opts[1].state[next(nets[1].parameters())]
    assert state["step"].item() == 0 and state["exp_avg"].abs().max() == 0 and state["exp_avg_sq"].abs().max() == 0
    x = torch.as_tensor(rollout_observations(6, n=8))
    for _ in range(3):
        for net, opt in zip(nets, opts, strict=True):
            opt.zero_grad()
            net(x).pow(2).sum().backward()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True))


def test_learning_rate_schedules_are_functions_of_the_env_step():
    args = eq.Args(learning_rate=1e-3, total_timesteps=1000, lr_step_size=300, lr_gamma=0.5)
    lr = lambda scheduler, step: eq.learning_rate_at(dataclasses.replace(args, lr_scheduler=scheduler), step)  # noqa: E731
    assert [lr("none", s) for s in (0, 500, 1000)] == [1e-3] * 3
    assert [round(lr("cosine", s), 12) for s in (0, 500, 1000)] == [1e-3, 5e-4, 0.0]
    assert [lr("step", s) for s in (0, 299, 300, 899, 900)] == [1e-3, 1e-3, 5e-4, 2.5e-4, 1.25e-4]


def test_epsilon_falls_linearly_then_stays_and_exploration_draws_the_same_numbers_whatever_q():
    assert [eq.linear_schedule(1.0, 0.05, 100, t) for t in (0, 50, 100, 1000)] == pytest.approx(
        [1.0, 0.525, 0.05, 0.05]
    )
    assert eq.linear_schedule(1.0, 0.05, 0, 0) == 0.05
    obs = rollout_observations(6, n=4)
    rngs = [np.random.default_rng(0), np.random.default_rng(0)]
    nets = [random_q_network(eq, 6, seed=s, reg_rep_n=2) for s in (0, 1)]
    for epsilon in (1.0, 0.5, 0.0):
        actions = [eq.epsilon_greedy(net, obs, epsilon, rng, "cpu") for net, rng in zip(nets, rngs, strict=True)]
        assert rngs[0].bit_generator.state == rngs[1].bit_generator.state
    assert np.array_equal(actions[0], nets[0](torch.as_tensor(obs)).argmax(1).numpy())  # epsilon 0: greedy


def test_the_replay_buffer_wraps_around_and_restores_its_state():
    rb = eq.ReplayBuffer((3, 4, 4), 5, "cpu", seed=0)
    for step in range(3):  # 3 vector steps of 2 envs: 6 transitions into 5 slots
        obs = np.full((2, 3, 4, 4), step, np.float32)
        rb.add(obs, obs + 1, np.array([step, step]), np.array([1.0, -1.0]), np.array([0.0, 1.0]))
    assert (rb.size, rb.pos) == (5, 1)
    assert rb.storage["obs"][:, 0, 0, 0].tolist() == [2.0, 0.0, 1.0, 1.0, 2.0]
    copy_ = eq.ReplayBuffer((3, 4, 4), 5, "cpu", seed=1)
    copy_.load_state_dict(rb.state_dict())
    a, b = rb.sample(8), copy_.sample(8)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) and a.actions.shape == (8, 1)
    assert torch.equal(a.next_observations, a.observations + 1)
    with pytest.raises(ValueError, match="does not fit"):
        eq.ReplayBuffer((3, 5, 5), 5, "cpu", seed=0).load_state_dict(rb.state_dict())


BAD_ARGS = [
    ({"env_id": "Snake-v9"}, "unknown --env-id 'Snake-v9'; supported: Snake-v0"),
    ({"board_size": 3}, "--board-size must be >= 4, got 3"),
    ({"batch_size": 2000, "buffer_size": 1000}, "--batch-size must be in [1, --buffer-size=1000], got 2000"),
    ({"learning_starts": 500, "total_timesteps": 500}, "--learning-starts must be in [0, --total-timesteps=500)"),
    ({"tau": 0.0}, "--tau must be in (0, 1], got 0.0"),
    ({"start_e": 0.1, "end_e": 0.5}, "--start-e and --end-e must satisfy 0 <= end_e <= start_e <= 1, got 0.1, 0.5"),
    ({"lr_gamma": 0.0}, "--lr-gamma must be in (0, 1], got 0.0"),
    ({"target_network_frequency": 0}, "--target-network-frequency must be >= 1, got 0"),
    ({"step_cost": -0.1}, "--step-cost must be >= 0, got -0.1"),
    ({"gamma": 1.0}, "--gamma must be in [0, 1), got 1.0"),
    ({"step_cost": float("inf")}, "--step-cost must be a finite number, got inf"),
    ({"learning_rate": float("nan")}, "--learning-rate must be a finite number, got nan"),
]


@pytest.mark.parametrize(("changes", "message"), BAD_ARGS)
@pytest.mark.parametrize("module", [eq, cnn], ids=["eq", "cnn"])
def test_bad_arguments_raise_one_line_naming_value_and_allowed(module, changes, message):
    with pytest.raises(ValueError) as err:
        module.validate_args(dataclasses.replace(module.Args(), **changes))
    assert message in str(err.value) and "\n" not in str(err.value)
    module.validate_args(module.Args())  # the defaults are valid


# ---------------------------------------------------------------------------------------------------------------------
# The scripts end to end, as subprocesses
# ---------------------------------------------------------------------------------------------------------------------
SCRIPTS = {"eq": "dqn_snake_equivariant.py", "cnn": "dqn_snake_cnn.py"}
SMALL_NETS = {"eq": ["--reg-rep-n", "2"], "cnn": ["--channels", "8"]}
BLOCK_ESCNN = (  # run a script with `import escnn` raising ImportError
    "import runpy, sys; sys.modules['escnn'] = None; sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)
TOTAL = 1200


def train_args(script: str, run_dir, run_name: str | None = None, total: int = TOTAL) -> list:
    return [
        "--board-size", "6", "--total-timesteps", str(total), "--learning-starts", "400", "--eval-frequency", "400",
        "--eval-episodes", "2", "--final-eval-episodes", "3", "--batch-size", "16", "--buffer-size", "1000",
        "--exploration-steps", "800", "--target-network-frequency", "20", "--checkpoint-frequency", "400",
        "--seed", "3", "--exp-name", f"test_{script}", "--run-dir", str(run_dir), *SMALL_NETS[script],
        *(["--run-name", run_name] if run_name else []),
    ]  # fmt: skip


def start(script: str, args: list, cwd) -> subprocess.Popen:
    path = os.path.join(ROOT, SCRIPTS[script])
    prefix = [sys.executable, path] if script == "eq" else [sys.executable, "-c", BLOCK_ESCNN, path]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(prefix + args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def run(script: str, args: list, cwd) -> subprocess.CompletedProcess:
    proc = start(script, args, cwd)
    stdout, stderr = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def scalars(run_path, tag: str) -> list:
    return [(e.step, e.value) for e in EventAccumulator(str(run_path)).Reload().Scalars(tag)]


@pytest.mark.parametrize("script", ["eq", "cnn"])
def test_training_runs_past_learning_starts_logs_and_saves_a_model_that_evaluates_the_same(script, tmp_path):
    result = run(script, train_args(script, tmp_path / "runs") + ["--save-model"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "py3nj" not in result.stderr
    *records, heldout = [json.loads(line) for line in result.stdout.splitlines()]  # stdout: JSON lines only
    assert [(r["eval_idx"], r["global_step"]) for r in records] == [(0, 400), (1, 800), (2, 1200)]
    assert all(set(r) == {"eval_idx", "global_step", "eval/score", "eval/length", "eval/return"} for r in records)
    assert all(r["eval/score"] >= 0 and r["eval/length"] >= 1 for r in records)
    assert set(heldout) == {"global_step", "heldout/score", "heldout/length", "heldout/return", "heldout/episodes"}
    assert heldout["global_step"] == TOTAL and heldout["heldout/episodes"] == 3

    (run_path,) = glob.glob(str(tmp_path / "runs" / f"Snake-v0__test_{script}__3__*"))
    assert_progress_lines(result.stderr, os.path.basename(run_path), TOTAL, "eval/score")  # reports at updates 100, 200
    assert_finished_line(result.stderr, os.path.basename(run_path), run_path, heldout)
    assert {"config.json", "evals.jsonl", "final_eval.json", "model.pt", "checkpoint.pt"} <= set(os.listdir(run_path))
    with open(os.path.join(run_path, "final_eval.json")) as f:
        final = json.load(f)
    assert final["eval_idx"] == 2 and final["heldout/score"] == heldout["heldout/score"]
    assert final["q_network_params"] == (481 if script == "eq" else 1572)
    tags = EventAccumulator(run_path).Reload().Tags()["scalars"]
    for tag in ("charts/episodic_return", "charts/episodic_length", "charts/episodic_score", "charts/SPS",
                "charts/epsilon", "charts/learning_rate", "losses/td_loss", "losses/q_values", "eval/score",
                "eval/length", "eval/return", "heldout/score", "heldout/length", "heldout/return"):  # fmt: skip
        assert tag in tags, tag
    losses = scalars(run_path, "losses/td_loss")
    assert [step for step, _ in losses] == [800, 1200]  # 800 updates after learning_starts, logged every 100 ...
    assert all(np.isfinite(value) for _, value in losses)  # ... of 4 env steps each
    m = eq if script == "eq" else cnn
    again = m.evaluate_checkpoint(os.path.join(run_path, "model.pt"), eval_episodes=2, seed=3 + 1_000_000)
    for key in ("eval/score", "eval/length", "eval/return"):  # the saved agent replays the last evaluation
        assert again[key] == pytest.approx(records[-1][key]), key
    checkpoint = os.path.join(run_path, "checkpoint.pt")  # the training checkpoint holds the same agent
    assert m.evaluate_checkpoint(checkpoint, eval_episodes=2, seed=3 + 1_000_000) == again


def assert_same_training_state(a: dict, b: dict) -> None:
    """Networks, optimizer, buffer, env states and counters identical, bit for bit."""
    for key in ("q_network", "target_network"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs"
    for param_id, moments in a["q_optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, b["q_optimizer"]["state"][param_id][name]), f"Adam {param_id} {name} differs"
    for key, value in a["replay_buffer"]["storage"].items():
        assert torch.equal(value, b["replay_buffer"]["storage"][key]), key
    assert a["envs"] == b["envs"] and torch.equal(a["obs"], b["obs"])
    for key in ("global_step", "update_idx", "eval_idx", "episode_returns", "episode_lengths"):
        assert a[key] == b[key], key


@pytest.mark.parametrize("script", ["eq", "cnn"])
def test_a_run_stopped_by_sigusr1_and_resumed_equals_the_uninterrupted_run(script, tmp_path):
    reference = start(script, train_args(script, tmp_path / "runs", "reference"), tmp_path)  # on the other core
    args = train_args(script, tmp_path / "runs", "interrupted")
    proc = start(script, args, tmp_path)
    run_path, ref_path = tmp_path / "runs" / "interrupted", tmp_path / "runs" / "reference"
    deadline = time.time() + 300
    while not (run_path / "checkpoint.pt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    first_stdout, first_stderr = proc.communicate(timeout=600)
    assert proc.returncode == 3, first_stderr[-3000:]
    stopped_at = load(run_path / "checkpoint.pt")["global_step"]
    assert 400 <= stopped_at < TOTAL and stopped_at % 4 == 0  # between two vector steps, mid-episode allowed
    assert f"stopped by SIGUSR1 at global_step {stopped_at}: checkpoint written to" in first_stderr
    reference_stdout, reference_stderr = reference.communicate(timeout=600)
    assert reference.returncode == 0, reference_stderr[-3000:]

    resumed = run(script, args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from global_step {stopped_at}" in resumed.stderr
    lines = (first_stdout + resumed.stdout).splitlines()
    assert lines == reference_stdout.splitlines()  # the same evaluations, eval_idx continued, nothing repeated
    with open(run_path / "evals.jsonl") as f:
        assert f.read().splitlines() == lines[:-1]
    assert_same_training_state(load(run_path / "checkpoint.pt"), load(ref_path / "checkpoint.pt"))
    for tag in ("charts/episodic_return", "charts/episodic_score", "losses/td_loss", "eval/score"):
        assert scalars(run_path, tag) == scalars(ref_path, tag), tag  # purged and continued: no gap, no duplicate


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A completed CNN run: (its working folder, its arguments, its run folder)."""
    cwd = tmp_path_factory.mktemp("finished")
    args = train_args("cnn", cwd / "runs", "done", total=800)
    result = run("cnn", args, cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, args, cwd / "runs" / "done"


def snapshot(folder) -> dict:
    return {path: (os.stat(path).st_mtime_ns, os.path.getsize(path))
            for path in glob.glob(os.path.join(folder, "**"), recursive=True) if os.path.isfile(path)}  # fmt: skip


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--seed", "5", "error: cannot resume '{path}' with other arguments: --seed 5 (checkpoint: 3); only "
                        "--total-timesteps, --run-dir and --cuda may change"),
        ("--channels", "9", "--channels 9 (checkpoint: 8)"),
        ("--total-timesteps", "700", "error: --total-timesteps must be >= the checkpoint's global_step 800"),
    ],
)  # fmt: skip
def test_a_resume_with_other_arguments_exits_2_and_changes_nothing(finished_run, flag, value, message):
    cwd, args, run_path = finished_run
    before = snapshot(run_path)
    changed = list(args)
    changed[changed.index(flag) + 1] = value
    result = run("cnn", changed, cwd)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert message.format(path=run_path) in line
    assert snapshot(run_path) == before


def test_a_finished_run_is_not_run_again_and_its_checkpoint_names_its_script(finished_run):
    cwd, args, run_path = finished_run
    before = snapshot(run_path)
    result = run("cnn", args, cwd)
    assert result.returncode == 0 and result.stdout == ""
    assert "already ended at global_step 800; nothing to do" in result.stderr
    assert snapshot(run_path) == before
    with pytest.raises(ValueError, match=r"checkpoint.pt was saved by dqn_snake_cnn.py, not dqn_snake_equivariant.py"):
        eq.evaluate_checkpoint(str(run_path / "checkpoint.pt"))


@pytest.mark.parametrize(
    ("script", "extra", "message"),
    [
        ("eq", ["--board-size", "2"], "error: --board-size must be >= 4, got 2"),
        ("eq", ["--reg-rep-n", "100000"], "error: --group d4 --reg-rep-n 100000, --board-size 6, --buffer-size 1000,"),
        ("cnn", ["--buffer-size", "10000000000"], "error: --channels 8, --board-size 6, --buffer-size 10000000000, "
                                                  "--num-envs 4 (sync) and --eval-episodes 2 need about"),
        ("cnn", ["--num-envs", "100000"], "error: --num-envs must be in [1, --total-timesteps=1200], got 100000"),
        ("cnn", ["--num-envs", "400000", "--total-timesteps", "1000000", "--buffer-size", "400000",
                 "--vector-env-mode", "async"], "error: --channels 8, --board-size 6, --buffer-size 400000, "
                                                "--num-envs 400000 (async) and --eval-episodes 2 need about"),
        ("cnn", ["--run-name", ".."], "error: --run-name must be a folder name (not empty, '.' or '..', no '/'), got"),
    ],
)  # fmt: skip
def test_bad_values_exit_2_with_one_line_before_any_folder_is_made(script, extra, message, tmp_path):
    result = run(script, train_args(script, tmp_path / "runs") + extra, tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(message)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("run_dir", "extra", "message"),
    [
        ("runs", ["--step-cost", "inf"], "error: --step-cost must be a finite number, got inf"),
        ("runs", ["--learning-rate", "nan"], "error: --learning-rate must be a finite number, got nan"),
        ("{file}/runs", [], "error: --run-dir must be a folder or a path where one can be made, got '{file}/runs' "
                            "('{file}' is not a folder)"),
        ("{file}", [], "error: --run-dir must be a folder or a path where one can be made, got '{file}' ('{file}' is "
                       "not a folder)"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("script", ["eq", "cnn"])
def test_nan_or_inf_and_a_file_in_the_run_dir_exit_2_with_one_line_and_write_nothing(
    script, run_dir, extra, message, tmp_path
):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    result = run(script, train_args(script, tmp_path / run_dir.format(file=file), "bad") + extra, tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [message.format(file=file)]
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"] and file.read_text() == "mine"


def test_a_first_sigint_checkpoints_after_the_vector_step_exits_3_and_the_same_run_name_resumes(tmp_path):
    """Ctrl-C acts as SIGUSR1: a checkpoint after the current vector step, exit code 3 and one line that says how to
    resume; the same command resumes the run, which then ends normally."""
    args = train_args("cnn", tmp_path / "runs", "ctrl-c")
    proc = start("cnn", args, tmp_path)
    run_path = tmp_path / "runs" / "ctrl-c"
    lines = read_stderr_until(proc, "[ctrl-c] set-up done in ")  # before that, a signal stops set-up (test_cli.py)
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=600)
    stderr = "".join(lines) + rest
    assert proc.returncode == 3, stderr[-3000:]
    stopped_at = load(run_path / "checkpoint.pt")["global_step"]
    assert stopped_at < TOTAL and stopped_at % 4 == 0
    assert (f"[ctrl-c] stopped by SIGINT at global_step {stopped_at}: checkpoint written to {run_path}/checkpoint.pt; "
            "to resume, rerun the same command with --run-name ctrl-c") in stderr.splitlines()  # fmt: skip
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    resumed = run("cnn", args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from global_step {stopped_at}" in resumed.stderr
    assert load(run_path / "checkpoint.pt")["global_step"] == TOTAL


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_run_folder(tmp_path):
    """A learning rate of 1e30 throws the weights to 1e30 in one Adam step: the next losses overflow float32."""
    args = train_args("cnn", tmp_path / "runs") + ["--learning-rate", "1e30"]
    result = run("cnn", args, tmp_path)
    assert result.returncode == 1
    assert re.search(r"^error: non-finite loss: td_loss is (nan|inf) at global_step \d+; run folder kept",
                     result.stderr, re.MULTILINE)  # fmt: skip
    (run_path,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert "config.json" in os.listdir(run_path) and "final_eval.json" not in os.listdir(run_path)


def test_capture_video_saves_one_video_per_evaluation(tmp_path):
    args = train_args("cnn", tmp_path / "runs", total=800) + ["--capture-video"]
    result = run("cnn", args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stdout.splitlines()) == 3  # stdout keeps only the JSON lines: 2 evaluations, 1 held-out
    videos = glob.glob(str(tmp_path / "runs" / "*" / "videos" / "*.mp4"))
    assert len(videos) == 3 and all(os.path.getsize(v) > 1000 for v in videos)
