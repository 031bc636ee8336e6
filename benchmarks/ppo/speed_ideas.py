"""What each speed idea of ppo_atari.py and rpo_mujoco.py is worth, measured one at a time on this machine.

Prints one JSON line per measurement (median of `--repeats` timings, the variants of one idea interleaved):
  atari_env      8 Breakout envs, random actions: ale-py's AtariVectorEnv (C++ threads) against the gymnasium
                 wrapper path (SyncVectorEnv of AtariPreprocessing + FrameStackObservation), env steps/s
  atari_update   Nature CNN forward + backward on a 256-sample minibatch (the update's unit of work, 16 per update):
                 contiguous (CleanRL's) against channels_last, and channels_last under bf16 autocast, ms
  atari_act      the rollout's forward pass on 8 observations: torch.no_grad against torch.inference_mode, ms
  rpo_act        one HalfCheetah action: the torch agent against NumpyPolicy, us
  rpo_update     one RPO update (320 minibatches of 64): Adam foreach against fused, s

Usage: OMP_NUM_THREADS=1 python benchmarks/ppo/speed_ideas.py [--repeats 5]
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import ppo_atari  # noqa: E402
import rpo_mujoco  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(idea: str, variants: dict, unit: str, convert, repeats: int) -> None:
    """Time every variant (interleaved, `repeats` rounds) and print `convert(median seconds)` in `unit`."""
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn, 1))
    medians = {name: round(convert(statistics.median(values)), 3) for name, values in times.items()}
    print(json.dumps({"idea": idea, "unit": unit, **medians}), flush=True)


def atari_env(repeats: int) -> None:
    steps, rng = 250, np.random.default_rng(0)
    envs = {mode: ppo_atari.make_vector_env("BreakoutNoFrameskip-v4", 8, mode) for mode in ("ale", "sync")}
    for env in envs.values():
        env.reset(seed=0)

    def run(env):
        return lambda: [env.step(rng.integers(0, 4, 8)) for _ in range(steps)]

    report("atari_env", {mode: run(env) for mode, env in envs.items()}, "env steps/s", lambda s: 8 * steps / s, repeats)


def atari_update(repeats: int) -> None:
    x = torch.randint(0, 256, (256, 4, 84, 84), dtype=torch.uint8)
    actions = torch.randint(0, 4, (256,))
    channels_last = ppo_atari.Agent(4)
    contiguous = ppo_atari.Agent(4)
    contiguous.network.to(memory_format=torch.contiguous_format)

    def contiguous_forward(x):  # CleanRL's: float NCHW input scaled by 1/255
        hidden = contiguous.network(x.float() / 255.0)
        return contiguous.actor(hidden), contiguous.critic(hidden).squeeze(1)

    def step(forward, bf16=False):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits, value = forward(x)
            logprob, entropy = ppo_atari.log_prob_entropy(logits, actions)
            (logprob.mean() + value.float().mean() + entropy.mean()).backward()

        return run

    variants = {"contiguous": step(contiguous_forward), "channels_last": step(channels_last),
                "channels_last_bf16": step(channels_last, bf16=True)}  # fmt: skip
    report("atari_update", variants, "ms per 256-sample forward+backward", lambda s: 1000 * s, repeats)


def atari_act(repeats: int) -> None:
    agent, x = ppo_atari.Agent(4), torch.randint(0, 256, (8, 4, 84, 84), dtype=torch.uint8)

    def run(context):
        def forward():
            for _ in range(32):
                with context():
                    ppo_atari.sample_actions(agent(x)[0])

        return forward

    variants = {"no_grad": run(torch.no_grad), "inference_mode": run(torch.inference_mode)}
    report("atari_act", variants, "ms per 8-observation forward", lambda s: 1000 * s / 32, repeats)


def rpo_act(repeats: int) -> None:
    agent, obs = rpo_mujoco.Agent(17, 6), np.random.default_rng(0).normal(size=(1, 17)).astype(np.float32)
    policy = rpo_mujoco.NumpyPolicy(agent)

    def torch_act():
        for _ in range(1000):
            with torch.inference_mode():
                mean, log_std, value = agent(torch.as_tensor(obs))
                (mean + log_std.exp() * torch.randn_like(mean)).numpy()

    def numpy_act():
        for _ in range(1000):
            mean, value = policy(obs)
            mean + np.exp(policy.log_std) * 0.5

    report("rpo_act", {"torch": torch_act, "numpy": numpy_act}, "us per action and value", lambda s: 1000 * s, repeats)


def rpo_update(repeats: int) -> None:
    args, size = rpo_mujoco.Args(), 2048
    batch = {key: torch.randn(size, *shape) for key, shape in
             (("obs", (17,)), ("actions", (6,)), ("logprobs", ()), ("advantages", ()), ("returns", ()),
              ("values", ()))}  # fmt: skip

    def run(kind):
        agent = rpo_mujoco.Agent(17, 6)
        optimizer = torch.optim.Adam(agent.parameters(), lr=3e-4, eps=1e-5, **{kind: True})
        rng = np.random.default_rng(0)
        return lambda: rpo_mujoco.rpo_update(agent, optimizer, batch, args, rng, 0)

    report("rpo_update", {"foreach": run("foreach"), "fused": run("fused")}, "s per update", lambda s: s, repeats)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    cli = parser.parse_args()
    print(json.dumps({"torch_threads": torch.get_num_threads(), "torch": torch.__version__}), flush=True)
    for measure in (atari_env, atari_update, atari_act, rpo_act, rpo_update):
        measure(cli.repeats)
