"""Reference: Stable-Baselines3 SAC + HER steady-state SPS on FetchReachDense-v4 at the settings of the SPS target
(256x256, batch 256, one gradient step per env step, 1 torch thread). Not a project dependency:

    pip install --target /tmp/sb3site --no-deps stable-baselines3==2.9.2 pandas matplotlib
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/sb3site python benchmarks/sb3_sac_her_sps.py
"""

import json
import time

import gymnasium as gym
import gymnasium_robotics
import torch
from stable_baselines3 import SAC, HerReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback

torch.set_num_threads(1)
gym.register_envs(gymnasium_robotics)


class StepTimer(BaseCallback):
    """Wall-clock time at every env step."""

    def __init__(self):
        super().__init__()
        self.times = {}

    def _on_step(self) -> bool:
        self.times[self.num_timesteps] = time.time()
        return True


model = SAC(
    "MultiInputPolicy",
    gym.make("FetchReachDense-v4"),
    replay_buffer_class=HerReplayBuffer,
    replay_buffer_kwargs={"n_sampled_goal": 4, "goal_selection_strategy": "future"},
    learning_starts=1000,
    batch_size=256,
    train_freq=1,
    gradient_steps=1,
    policy_kwargs={"net_arch": [256, 256]},
    device="cpu",
    seed=1,
)
timer = StepTimer()
model.learn(4000, callback=timer)
first, last = 1500, 4000
sps = (last - first) / (timer.times[last] - timer.times[first])
print(json.dumps({"script": "stable-baselines3 SAC+HER", "version": __import__("stable_baselines3").__version__,
                  "steady_sps": round(sps, 1)}))  # fmt: skip
