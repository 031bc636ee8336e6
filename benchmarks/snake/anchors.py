"""Reference scores on Snake-v0: a uniformly random policy and a greedy shortest-path heuristic.

Both play the held-out initial states of the DQN runs' final evaluations: for each run seed s, the episodes start from
`reset(seed=s + 2_000_000 + k)`, k = 0 .. episodes - 1, as `--final-eval-episodes` does in dqn_snake_*.py.

- random: a uniform move at every step (its own generator, seeded with the episode's seed).
- greedy: the first move of a shortest path from the head to the food (breadth-first search in the order UP, RIGHT,
  DOWN, LEFT) through the cells that are free now or freed by the tail's next move; without such a path, the move
  that does not die at once and leaves the most cells reachable (a flood fill); with none, UP. Deterministic.

Usage: python benchmarks/snake/anchors.py [--board-size 10] [--seeds 1 2 3] [--episodes 100]
Prints one JSON line per policy: mean score (food eaten), length (env steps) and return, per seed and over all, and
the standard deviation of the score over all episodes. Note that the held-out sets of consecutive seeds overlap
(seed s plays s + 2_000_000 .. s + 2_000_099): seeds 1-3 share 98 of their 100 initial states.
"""

import argparse
import collections
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import dqn_snake_cnn as snake  # noqa: E402  (the environment is byte-identical in both scripts; this one has no escnn)


def neighbours(cell, size: int):
    for action, (d_row, d_col) in enumerate(snake.MOVES):
        row, col = cell[0] + d_row, cell[1] + d_col
        if 0 <= row < size and 0 <= col < size:
            yield action, (row, col)


def first_move_to(state, size: int, blocked: set):
    """The first move of a shortest path from the head to the food avoiding `blocked`, or None."""
    parents, queue = {state.body[0]: None}, collections.deque([state.body[0]])
    while queue:
        cell = queue.popleft()
        if cell == state.food:
            while parents[cell][0] != state.body[0]:
                cell = parents[cell][0]
            return parents[cell][1]
        for action, nxt in neighbours(cell, size):
            if nxt not in blocked and nxt not in parents:
                parents[nxt] = (cell, action)
                queue.append(nxt)
    return None


def reachable(start, size: int, blocked: set) -> int:
    seen, queue = {start}, collections.deque([start])
    while queue:
        for _, nxt in neighbours(queue.popleft(), size):
            if nxt not in blocked and nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return len(seen)


def greedy_action(state, size: int) -> int:
    blocked = set(state.body[:-1])  # the tail's cell is free at the next step
    action = first_move_to(state, size, blocked)
    if action is not None:
        return action
    best, best_area = snake.UP, -1
    for action in range(4):
        moved, event = snake.snake_move(state, action, size, lambda: np.zeros((size, size)))
        if event != "die":
            area = reachable(moved.body[0], size, set(moved.body[:-1]) - {moved.body[0]})
            best, best_area = (action, area) if area > best_area else (best, best_area)
    return best


def play(policy: str, size: int, seed: int) -> tuple:
    env = snake.SnakeEnv(size=size)
    env.reset(seed=seed)
    rng, length, ret = np.random.default_rng(seed), 0, 0.0
    while True:
        action = int(rng.integers(4)) if policy == "random" else greedy_action(env.state, size)
        _, reward, terminated, truncated, info = env.step(action)
        length, ret = length + 1, ret + reward
        if terminated or truncated:
            return info["score"], length, ret


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--board-size", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--episodes", type=int, default=100)
    cli = parser.parse_args()
    for policy in ("random", "greedy"):
        per_seed, scores = {}, []
        for seed in cli.seeds:
            results = [play(policy, cli.board_size, seed + 2_000_000 + k) for k in range(cli.episodes)]
            per_seed[seed] = np.mean(results, axis=0).round(3).tolist()
            scores += [score for score, _, _ in results]
        overall = np.mean(list(per_seed.values()), axis=0).round(3).tolist()
        print(json.dumps({"policy": policy, "board_size": cli.board_size, "episodes_per_seed": cli.episodes,
                          "score": overall[0], "score_std": round(float(np.std(scores)), 3), "length": overall[1],
                          "return": overall[2], "per_seed_score_length_return": per_seed}))  # fmt: skip
