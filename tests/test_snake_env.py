"""The Snake environment of dqn_snake_equivariant.py and dqn_snake_cnn.py: its rules (growth, collisions, food,
truncation, win), seeding and state, the gymnasium API, and the symmetry the equivariant agent relies on: transforming
a state by any of the 8 rotations and mirrors of the board and permuting the move the same way gives the transformed
next state, observation and reward.

The symmetries are built here from NumPy alone (np.rot90, np.flip on the board arrays), independently of the scripts
and of escnn. Food placement is the rules' one random part: new food goes on the free cell of highest priority in a
(size, size) field of uniform draws. The commutation test gives the original state the env's own next draw (read from
a copy of its generator) and the transformed state the same draw transformed by the symmetry, and requires the
transformed next state exactly; the env itself is then checked to follow the rules with that draw.
"""

import copy
import re

import gymnasium as gym
import numpy as np
import pytest
from conftest import ROOT
from gymnasium.utils.env_checker import check_env

import dqn_snake_equivariant as snake

D4_ELEMENTS = [(k, mirror) for mirror in (False, True) for k in range(4)]


class BoardSymmetry:
    """One element of D4 acting on an n x n board: mirror the columns (np.flip along the last axis) if `mirror`, then
    rotate by k quarter turns (np.rot90). Acts on board arrays (..., n, n), cells, moves and Snake states."""

    def __init__(self, n: int, k: int, mirror: bool):
        self.n, self.k, self.mirror = n, k, mirror
        image = self.board(np.arange(n * n).reshape(n, n)).ravel()
        self.where = np.empty(n * n, np.int64)
        self.where[image] = np.arange(n * n)  # flat cell index -> its flat index after the symmetry
        centre = (n // 2, n // 2)
        self.moves = []
        for d_row, d_col in snake.MOVES:  # a move's image: the displacement between the images of two neighbours
            (r0, c0), (r1, c1) = self.cell(centre), self.cell((centre[0] + d_row, centre[1] + d_col))
            self.moves.append(snake.MOVES.index((r1 - r0, c1 - c0)))

    def board(self, a: np.ndarray) -> np.ndarray:
        a = np.flip(a, -1) if self.mirror else a
        return np.ascontiguousarray(np.rot90(a, self.k, axes=(-2, -1)))

    def cell(self, cell) -> tuple:
        return divmod(int(self.where[cell[0] * self.n + cell[1]]), self.n)

    def move(self, action: int) -> int:
        return self.moves[action]

    def state(self, s):
        food = None if s.food is None else self.cell(s.food)
        return snake.SnakeState(tuple(self.cell(c) for c in s.body), food, s.steps_since_food)


def make_env(size: int = 6, seed: int = 0, **kwargs):
    env = snake.SnakeEnv(size=size, **kwargs)
    env.reset(seed=seed)
    return env


def safe_moves(state, size: int) -> list:
    """The moves that do not die at once."""
    return [a for a in range(4) if snake.snake_move(state, a, size, lambda: np.zeros((size, size)))[1] != "die"]


def rollout_policy(state, size: int, rng: np.random.Generator) -> int:
    """Random moves that mostly survive and often head for the food (episodes that eat and grow), sometimes any move
    (deaths)."""
    safe = safe_moves(state, size)
    if not safe or rng.random() < 0.03:
        return int(rng.integers(4))
    (row, col), food = state.body[0], state.food or state.body[0]
    closer = [a for a in safe if abs(row + snake.MOVES[a][0] - food[0]) + abs(col + snake.MOVES[a][1] - food[1])
              < abs(row - food[0]) + abs(col - food[1])]  # fmt: skip
    return int(rng.choice(closer if closer and rng.random() < 0.8 else safe))


def test_a_move_shifts_the_snake_one_cell_and_keeps_its_length():
    state = snake.SnakeState(((2, 2), (2, 1), (2, 0)), (0, 5), 7)
    moved, event = snake.snake_move(state, snake.DOWN, 6, None)
    assert event == "move"
    assert moved == snake.SnakeState(((3, 2), (2, 2), (2, 1)), (0, 5), 8)


def test_eating_grows_the_snake_by_one_and_places_food_on_the_free_cell_of_highest_priority():
    state = snake.SnakeState(((2, 2), (2, 1), (2, 0)), (2, 3), 9)
    priorities = np.zeros((6, 6))
    priorities[2, 1] = 0.9  # on the body: skipped
    priorities[4, 4] = 0.5
    grown, event = snake.snake_move(state, snake.RIGHT, 6, lambda: priorities)
    assert event == "eat"
    assert grown == snake.SnakeState(((2, 3), (2, 2), (2, 1), (2, 0)), (4, 4), 0)
    env = make_env()
    env.state = state
    obs, reward, terminated, truncated, info = env.step(snake.RIGHT)
    assert (reward, terminated, truncated, info["score"]) == (1.0, False, False, 1)
    assert len(env.state.body) == 4 and env.state.food not in env.state.body


@pytest.mark.parametrize(("head", "action"), [((0, 3), snake.UP), ((3, 5), snake.RIGHT), ((5, 2), snake.DOWN),
                                              ((1, 0), snake.LEFT)])  # fmt: skip
def test_leaving_the_board_ends_the_episode_with_reward_minus_one(head, action):
    d_row, d_col = snake.MOVES[action]
    body = tuple((head[0] - k * d_row, head[1] - k * d_col) for k in range(3))
    env = make_env(step_cost=0.01)
    env.state = snake.SnakeState(body, (3, 3) if (3, 3) not in body else (4, 4), 0)
    _, reward, terminated, truncated, _ = env.step(action)
    assert (reward, terminated, truncated) == (-1.01, True, False)
    assert env.state.body == body  # a dead snake stays where it was


def test_entering_the_body_is_a_collision_but_the_cell_the_tail_leaves_is_free():
    loop = ((2, 2), (2, 3), (3, 3), (3, 2))  # head at (2, 2); the tail (3, 2) is just below the head
    state = snake.SnakeState(loop, (0, 0), 0)
    assert snake.snake_move(state, snake.DOWN, 6, None) == (snake.SnakeState(((3, 2), *loop[:-1]), (0, 0), 1), "move")
    longer = snake.SnakeState((*loop, (4, 2)), (0, 0), 0)  # now (3, 2) stays occupied
    assert snake.snake_move(longer, snake.DOWN, 6, None) == (longer, "die")
    assert snake.snake_move(longer, snake.RIGHT, 6, None) == (longer, "die")  # into (2, 3), the neck


def test_reversing_into_the_neck_is_a_collision():
    env = make_env()
    head, neck = env.state.body[:2]
    reverse = snake.MOVES.index((neck[0] - head[0], neck[1] - head[1]))
    _, reward, terminated, _, _ = env.step(reverse)
    assert (reward, terminated) == (-1.0, True)


def test_food_is_never_on_the_snake_over_random_rollouts():
    rng = np.random.default_rng(0)
    eaten = 0
    for seed in range(20):
        env = make_env(size=5, seed=seed)
        for _ in range(300):
            assert env.state.food not in env.state.body
            _, reward, terminated, truncated, info = env.step(rollout_policy(env.state, 5, rng))
            eaten += reward > 0
            if terminated or truncated:
                break
    assert eaten > 100  # the rollouts did place a lot of food


def test_food_is_uniform_over_the_free_cells():
    """A 4x4 board with 3 free cells: each gets about a third of 3000 placements (binomial sd 26)."""
    size, rng = 4, np.random.default_rng(1)
    body = tuple((r, c) for r in range(4) for c in (range(4) if r % 2 == 0 else range(3, -1, -1)))[:13]
    counts = {}
    for _ in range(3000):
        food = snake.place_food(body, size, rng.random((size, size)))
        counts[food] = counts.get(food, 0) + 1
    assert set(counts) == {(3, 2), (3, 1), (3, 0)}
    assert all(abs(count - 1000) < 120 for count in counts.values()), counts


def test_an_episode_without_food_truncates_after_100_steps_per_unit_of_length():
    env = make_env(size=6)
    env.state = snake.SnakeState(((1, 1), (1, 2), (2, 2), (2, 1)), (5, 5), 0)  # a length-4 snake on a 2x2 loop
    circle = [snake.DOWN, snake.RIGHT, snake.UP, snake.LEFT]
    for t in range(1, 401):
        _, reward, terminated, truncated, _ = env.step(circle[(t - 1) % 4])
        assert (reward, terminated) == (0.0, False)
        assert truncated == (t == 400), t  # 100 steps per unit of length 4
    assert env.state.steps_since_food == 400


def test_filling_the_board_is_a_win():
    """A 4x4 board, the snake on 15 cells along a Hamiltonian path, the food on the 16th next to its head."""
    path = [(r, c) for r in range(4) for c in (range(4) if r % 2 == 0 else range(3, -1, -1))]  # boustrophedon
    env = make_env(size=4)
    env.state = snake.SnakeState(tuple(reversed(path[:15])), path[15], 3)  # head (3, 1), food (3, 0)
    obs, reward, terminated, truncated, info = env.step(snake.LEFT)
    assert (reward, terminated, truncated, info["score"]) == (1.0, True, False, 13)
    assert env.state.food is None and len(env.state.body) == 16
    assert obs[1].min() > 0 and obs[2].sum() == 0  # every cell is body, no food left


def test_the_observation_holds_the_head_the_body_in_order_and_the_food():
    state = snake.SnakeState(((1, 1), (1, 2), (1, 3), (2, 3)), (4, 0), 0)
    obs = snake.snake_observation(state, 5)
    assert obs.shape == (3, 5, 5) and obs.dtype == np.float32
    assert list(zip(*np.nonzero(obs[0]), strict=True)) == [(1, 1)] and obs[0].sum() == 1
    assert [obs[1][cell] for cell in state.body] == [1.0, 0.75, 0.5, 0.25]  # (L - k) / L from head to tail
    assert np.count_nonzero(obs[1]) == 4
    assert obs[2][4, 0] == 1.0 and obs[2].sum() == 1


@pytest.mark.parametrize(("k", "mirror"), D4_ELEMENTS)
def test_the_rules_commute_with_every_element_of_d4_over_random_rollouts(k, mirror):
    size, rng, events = 6, np.random.default_rng(k + 4 * mirror), set()
    g = BoardSymmetry(size, k, mirror)
    for seed in range(6):
        env, g_env = make_env(size, seed), make_env(size, seed)
        for _ in range(250):
            state, action = env.state, rollout_policy(env.state, size, rng)
            draw = copy.deepcopy(env.np_random).random((size, size))  # what the env draws if it eats now
            next_state, event = snake.snake_move(state, action, size, lambda: draw)  # noqa: B023
            g_next, g_event = snake.snake_move(g.state(state), g.move(action), size, lambda: g.board(draw))  # noqa: B023
            assert (g_next, g_event) == (g.state(next_state), event)
            np.testing.assert_array_equal(snake.snake_observation(g.state(state), size),
                                          g.board(snake.snake_observation(state, size)))  # fmt: skip
            g_env.state = g.state(state)  # the real env on the transformed state: the same reward and ending
            g_result = g_env.step(g.move(action))[1:4]
            obs, *result = env.step(action)
            assert env.state == next_state and tuple(result[:3]) == g_result  # the env follows the rules
            events.add(event)
            if result[1] or result[2]:
                break
    assert events == {"move", "eat", "die"}


def test_the_commutation_check_fails_when_the_moves_are_not_permuted():
    """So the test above can fail: a quarter turn of the board with the moves left as they are breaks it."""
    size, g = 6, BoardSymmetry(6, 1, False)
    state = snake.SnakeState(((2, 2), (3, 2), (4, 2)), (0, 2), 0)
    assert g.move(snake.UP) == snake.LEFT  # np.rot90 turns counterclockwise
    moved = snake.snake_move(state, snake.UP, size, None)[0]
    assert snake.snake_move(g.state(state), snake.UP, size, None)[0] != g.state(moved)
    assert snake.snake_move(g.state(state), snake.LEFT, size, None)[0] == g.state(moved)


@pytest.mark.parametrize("size", [4, 5, 10])
def test_starting_placements_are_all_straight_snakes_on_the_board_and_closed_under_d4(size):
    placements = set(snake.starting_placements(size))
    assert len(placements) == 4 * size * (size - 2)
    for k, mirror in D4_ELEMENTS:
        g = BoardSymmetry(size, k, mirror)
        assert {(*g.cell((row, col)), g.move(heading)) for row, col, heading in placements} == placements


def test_seeded_episodes_are_deterministic_and_other_seeds_differ():
    def trajectory(seed):
        env, rng, states = make_env(seed=seed), np.random.default_rng(0), []
        for _ in range(100):
            states.append(env.state)
            _, _, terminated, truncated, _ = env.step(rollout_policy(env.state, 6, rng))
            if terminated or truncated:
                env.reset()
        return states

    assert trajectory(3) == trajectory(3)
    assert trajectory(3) != trajectory(4)


def test_a_restored_snake_state_continues_identically():
    env, rng = make_env(seed=5), np.random.default_rng(2)
    for _ in range(30):
        env.step(rollout_policy(env.state, 6, rng))
    restored = make_env(seed=99)
    restored.snake_state = copy.deepcopy(env.snake_state)
    eaten = 0
    for _ in range(60):  # eating draws from the restored random generator too
        action = rollout_policy(env.state, 6, rng)
        expected, got = env.step(action), restored.step(action)
        np.testing.assert_array_equal(got[0], expected[0])
        assert got[1:] == expected[1:] and restored.state == env.state
        eaten += expected[1] > 0
        if expected[2] or expected[3]:
            break
    assert eaten >= 1


def test_gym_make_builds_a_valid_env_that_renders_rgb_frames():
    snake.register_env()
    env = gym.make("Snake-v0", size=7, render_mode="rgb_array")
    check_env(env.unwrapped, skip_render_check=False)
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (7 * 16, 7 * 16, 3) and frame.dtype == np.uint8
    assert len({tuple(p) for p in frame.reshape(-1, 3)}) >= 4  # background, body, head, food


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_vector_env_resets_only_the_envs_whose_episode_ended(mode):
    envs = snake.make_vector_env(snake.Args(num_envs=3, board_size=5, vector_env_mode=mode))
    envs.reset(seed=0)
    states = list(envs.get_attr("snake_state"))
    for state in states:  # the same snake in every env (set_attr, as a resumed run restores its envs)
        state.update(body=[[2, 2], [2, 3], [2, 4]], food=[0, 0], steps_since_food=0)
    envs.set_attr("snake_state", states)
    next_obs, rewards, terminations, truncations, _ = envs.step(np.array([snake.UP, snake.RIGHT, snake.DOWN]))
    assert terminations.tolist() == [False, True, False] and rewards.tolist() == [0.0, -1.0, 0.0]  # RIGHT: the neck
    reset_obs = envs.reset(options={"reset_mask": terminations})[0]
    np.testing.assert_array_equal(reset_obs[[0, 2]], next_obs[[0, 2]])
    assert not np.array_equal(reset_obs[1], next_obs[1]) and reset_obs[1][0].sum() == 1
    assert [s["body"][0] for s in envs.get_attr("snake_state")][::2] == [[1, 2], [3, 2]]
    envs.close()


def environment_section(path: str) -> str:
    with open(path) as f:
        text = f.read()
    match = re.search(r"\n# -+\n# Environment:.*?\n(?=# -+\n# Networks:)", text, re.DOTALL)
    assert match, f"{path} has no environment section"
    return match.group(0)


def test_both_twins_carry_the_same_environment_byte_for_byte():
    eq = environment_section(f"{ROOT}/dqn_snake_equivariant.py")
    cnn = environment_section(f"{ROOT}/dqn_snake_cnn.py")
    assert eq == cnn and "class SnakeEnv(gym.Env)" in eq
