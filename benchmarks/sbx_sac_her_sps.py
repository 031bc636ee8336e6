"""Reference: Stable Baselines Jax (SBX) SAC + SB3's HerReplayBuffer, steady-state env steps/s on FetchReachDense-v4,
JAX on the CPU with one thread. Not a project dependency: it runs in a venv of its own (the one-time set-up command is
in benchmarks/sbx_peer.py, which runs this script alternately with sac_fetch_mlp.py):

    /tmp/sbx-venv/bin/python benchmarks/sbx_sac_her_sps.py --steps 5000 [--points points.csv] [--result result.json]

What is measured: a real training run of `--steps` env steps. After every 100th gradient update (one per env step
after learning_starts = 1000, so at global steps 1100, 1200, ...) the run records a loss point: (global step, updates,
wall time, critic loss), as sac_fetch_mlp.py writes `losses/qf1_loss` every 100 updates. Steady SPS = global steps
between the first and the last loss point / wall seconds between them, as benchmarks/sps.py's `steady_sps` computes
it for our scripts. The first point comes 100 updates after the first update, so JAX's JIT compilation of the update
(at the first update) and of the actor (at the first policy action, step 1000) falls outside the window; the first
update's wall time, compilation included, is reported as `first_update_s`. One JSON line on stdout (and in `--result`
when given): the SPS in steps/s, the window, the first update's seconds, versions, the parameter counts.

One thread: JAX_PLATFORMS=cpu, XLA_FLAGS with Eigen's multi-threading off and OMP/MKL/OpenBLAS threads 1 are set
here, before jax (and torch, which SB3 imports and whose tensors its replay buffer returns) is imported; torch is also
told `set_num_threads(1)`. XLA_FLAGS is `--xla_cpu_multi_thread_eigen=false` alone: the usual recipe's
`intra_op_parallelism_threads=1` is a TensorFlow option that XLA (jax 0.10.2) rejects as a `--` flag and ignores
otherwise. benchmarks/sbx_peer.py samples the process's CPU time over the window to check that it uses one core.

Settings, matched to sac_fetch_mlp.py's defaults (`Args`) where SBX 0.28 allows:
- matched: actor and both critics 256x256 ReLU MLPs, Adam, batch 256, replay buffer 1e6 transitions, learning_starts
  1000 (uniform random actions before), one gradient step per env step (train_freq 1, gradient_steps 1), gamma 0.95,
  tau 0.05 (target update every critic update), policy lr 3e-4, critic lr 1e-3, entropy coefficient tuned from 0.2
  toward target entropy -4 (= -dim(A)), HER with 4 relabelled goals per transition, "future" strategy (80 % of a
  batch relabelled in both), seed 1, one training env, float32.
- policy_delay 1 (default; `--policy-delay` changes it): SBX updates the actor and the entropy coefficient once per
  critic update with policy_delay 1, and once every `policy_delay` critic updates otherwise; sac_fetch_mlp.py's
  policy_frequency 2 runs 2 actor (and alpha) updates every 2nd critic update (CleanRL's delayed update). Both give
  one actor update per critic update on average, so policy_delay 1 is the equal-work setting; only the order differs.
- not matched: the observation normaliser (SBX has none for HER replay; sac_fetch_mlp.py's default normalises inputs
  by running statistics, extra work on our side); the entropy coefficient's learning rate (SBX uses the policy lr,
  3e-4; sac_fetch_mlp.py the critic lr, 1e-3: no effect on speed); the network input (SBX flattens the whole dict
  observation, achieved_goal included: 16 inputs; sac_fetch_mlp.py gives observation + desired goal in the robot-base
  frame: 13 inputs, 1.5 % fewer first-layer weights); Adam's implementation (optax inside one jitted update against
  torch's fused Adam); SBX's log-std clip [-20, 2] against CleanRL's tanh-rescaled [-5, 2].
"""

import os

# one CPU thread, set before jax, torch or numpy are imported
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false"
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import gymnasium as gym  # noqa: E402
import gymnasium_robotics  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import sbx  # noqa: E402
import stable_baselines3  # noqa: E402
import torch  # noqa: E402
from sbx import SAC  # noqa: E402
from stable_baselines3 import HerReplayBuffer  # noqa: E402

torch.set_num_threads(1)
gym.register_envs(gymnasium_robotics)

ENV_ID = "FetchReachDense-v4"
LEARNING_STARTS = 1000
LOG_EVERY = 100  # updates between two loss points, as sac_fetch_mlp.py logs losses/qf1_loss


class TimedSAC(SAC):
    """SBX's SAC that records a loss point (global step, updates, wall time, critic loss) after every LOG_EVERY-th
    update and the wall seconds of the first update (JIT compilation included)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.points: list[tuple[int, int, float, float]] = []
        self.first_update_s: float | None = None

    def train(self, gradient_steps: int, batch_size: int) -> None:
        start = time.time()
        super().train(gradient_steps, batch_size)  # ends with .item() on the losses: the update has run
        end = time.time()
        if self.first_update_s is None:
            self.first_update_s = end - start
        if self._n_updates % LOG_EVERY == 0:
            loss = self.logger.name_to_value.get("train/critic_loss", float("nan"))
            self.points.append((self.num_timesteps, self._n_updates, end, float(loss)))


def num_params(params) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4000, help="total env steps; updates start after 1000")
    parser.add_argument("--policy-delay", type=int, default=1, help="critic updates per actor update (see above)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--points", help="write the loss points here (CSV: global_step,updates,wall_time,qf_loss)")
    parser.add_argument("--result", help="write the JSON result here too")
    cli = parser.parse_args()
    min_steps = LEARNING_STARTS + 2 * LOG_EVERY
    if cli.steps < min_steps:
        parser.error(f"--steps must be >= {min_steps} (two loss points after learning_starts), got {cli.steps}")

    model = TimedSAC(
        "MultiInputPolicy",
        gym.make(ENV_ID),
        learning_rate=3e-4,
        qf_learning_rate=1e-3,
        buffer_size=1_000_000,
        learning_starts=LEARNING_STARTS,
        batch_size=256,
        tau=0.05,
        gamma=0.95,
        train_freq=1,
        gradient_steps=1,
        policy_delay=cli.policy_delay,
        ent_coef="auto_0.2",
        target_entropy=-4.0,
        replay_buffer_class=HerReplayBuffer,
        replay_buffer_kwargs={"n_sampled_goal": 4, "goal_selection_strategy": "future"},
        policy_kwargs={"net_arch": [256, 256]},
        device="cpu",
        seed=cli.seed,
    )
    model.learn(cli.steps)

    if cli.points:
        with open(cli.points, "w") as f:
            f.write("global_step,updates,wall_time,qf_loss\n")
            f.writelines(f"{s},{u},{t:.6f},{q:.6g}\n" for s, u, t, q in model.points)
    first_step, first_updates, first_time, _ = model.points[0]
    last_step, last_updates, last_time, _ = model.points[-1]
    record = {
        "script": "sbx SAC+HER",
        "env_id": ENV_ID,
        "steps": cli.steps,
        "policy_delay": cli.policy_delay,
        "steady_sps": round((last_step - first_step) / (last_time - first_time), 1),
        "window_steps": [first_step, last_step],
        "window_wall_time": [first_time, last_time],
        "updates_in_window": last_updates - first_updates,
        "first_update_s": round(model.first_update_s, 3),
        "actor_params": num_params(model.policy.actor_state.params),
        "critic_params": num_params(model.policy.qf_state.params) // 2,  # per critic (two, vmapped), as our config
        "sbx": sbx.__version__,
        "stable_baselines3": stable_baselines3.__version__,
        "jax": jax.__version__,
        "jax_devices": [str(d) for d in jax.devices()],
    }
    if cli.result:
        with open(cli.result, "w") as f:
            json.dump(record, f)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
