"""Micro-benchmark: seconds per SAC update (batch from a filled HER buffer) and per env step, 1 torch thread.

Usage: OMP_NUM_THREADS=1 python benchmarks/update_speed.py [--script sac_fetch_mlp] [--updates 300] [--extra-args ...]
"""

import argparse
import importlib
import time

import gymnasium as gym
import gymnasium_robotics
import numpy as np
import torch
import tyro

parser = argparse.ArgumentParser()
parser.add_argument("--script", default="sac_fetch_mlp")
parser.add_argument("--env-id", default="FetchReachDense-v4")
parser.add_argument("--updates", type=int, default=300)
parser.add_argument("script_args", nargs="*")
cli = parser.parse_args()

torch.set_num_threads(1)
import os
if os.environ.get("FLUSH_DENORMAL"): torch.set_flush_denormal(True)
m = importlib.import_module(cli.script)
args = tyro.cli(m.Args, args=["--env-id", cli.env_id, *cli.script_args])
gym.register_envs(gymnasium_robotics)
envs = m.make_vector_env(args.env_id, 1, "sync")
fields = envs.get_attr("fields")[0]
nets, opts, alpha_state = m.build_agent(fields, args, "cpu")
rb = m.HerReplayBuffer(envs.single_observation_space["observation"].shape[0], 3, 4, 50, 100_000, 1, args.her_k,
                       envs.envs[0].unwrapped.compute_reward, "cpu", 0)  # fmt: skip
obs, _ = envs.reset(seed=0)
rng = np.random.default_rng(0)
autoreset = np.zeros(1, bool)
t0 = time.perf_counter()
for _ in range(510):
    actions = m.random_actions(1, rng)
    nobs, r, te, tr, _ = envs.step(actions)
    rb.add(obs, nobs, actions, te, tr, ~autoreset)
    autoreset, obs = te | tr, nobs
env_s = (time.perf_counter() - t0) / 510
with torch.no_grad():
    x = m.obs_tensor(obs, "cpu")
    t0 = time.perf_counter()
    for _ in range(200):
        m.get_action(nets["actor"], x)
    act_s = (time.perf_counter() - t0) / 200
for i in range(20):
    m.sac_update(rb.sample(args.batch_size), nets, opts, args, alpha_state, i, 0)
t0 = time.perf_counter()
for i in range(cli.updates):
    m.sac_update(rb.sample(args.batch_size), nets, opts, args, alpha_state, i, 0)
upd_s = (time.perf_counter() - t0) / cli.updates
n_params = sum(p.numel() for k in ("actor", "qf1", "qf2") for p in nets[k].parameters())
print(f"{cli.script} {' '.join(cli.script_args)}: update {1e3 * upd_s:.2f} ms, act {1e3 * act_s:.2f} ms, "
      f"env step {1e3 * env_s:.2f} ms -> predicted SPS {1 / (upd_s + act_s + env_s):.0f}; params {n_params}")  # fmt: skip
