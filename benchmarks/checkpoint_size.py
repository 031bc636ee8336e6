"""Checkpoint size and write/load time with a full replay buffer, for either twin.

    python benchmarks/checkpoint_size.py --script sac_fetch_equivariant.py -- --env-id FetchSlideDense-v4 --dihedral-n 8

Builds the script's real agent, vector env and HER buffer from its Args (`--buffer-size`, default 1M transitions),
fills the buffer with random episodes, then writes `checkpoint.pt` with the script's own `training_checkpoint` and
`atomic_torch_save` (fsync included) into a temporary folder on the disk under test (`--folder`), and loads it back
with `torch.load(weights_only=True)` and `restore_checkpoint`. Prints one JSON line.
"""

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
import tyro


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", default="sac_fetch_equivariant.py")
    parser.add_argument("--folder", default=None, help="where to write (default: a temporary folder under runs/)")
    parser.add_argument("--repeats", type=int, default=3)
    ours, script_argv = parser.parse_known_args()
    script_argv = [a for a in script_argv if a != "--"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("script", os.path.join(root, ours.script))
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    args = tyro.cli(m.Args, args=script_argv)
    m.validate_args(args)
    torch.set_num_threads(1)

    envs = m.make_vector_env(args.env_id, args.num_envs, "sync")
    agent = m.build_agent(envs.get_attr("fields")[0], args, "cpu")
    obs_dim = envs.single_observation_space["observation"].shape[0]
    rb = m.HerReplayBuffer(obs_dim, 3, 4, 50, args.buffer_size, args.num_envs, args.her_k, None, "cpu", 0)
    rng = np.random.default_rng(0)
    for episodes in rb.storage.values():
        episodes[:] = rng.standard_normal(episodes.shape, dtype=np.float32)
    rb.num_episodes = rb.capacity
    loop = m.LoopState(global_step=args.buffer_size, next_eval=args.eval_frequency)
    action_rng = np.random.default_rng(0)

    os.makedirs(ours.folder or "runs", exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ours.folder or "runs") as folder:
        path = os.path.join(folder, m.CHECKPOINT_FILE)
        writes, loads = [], []
        for _ in range(ours.repeats):
            start = time.perf_counter()
            m.atomic_torch_save(m.training_checkpoint(args, agent, rb, envs, loop, action_rng), path)
            writes.append(time.perf_counter() - start)
            start = time.perf_counter()
            state = torch.load(path, map_location="cpu", weights_only=True)
            m.restore_checkpoint(state, agent, rb, envs, action_rng)
            loads.append(time.perf_counter() - start)
            del state
        size = os.path.getsize(path)
    buffer_bytes = sum(episodes.nbytes for episodes in rb.storage.values())
    print(json.dumps({
        "script": ours.script, "env_id": args.env_id, "buffer_transitions": rb.capacity * 50,
        "checkpoint_MB": round(size / 1e6, 1), "replay_buffer_MB": round(buffer_bytes / 1e6, 1),
        "write_s_median": round(sorted(writes)[len(writes) // 2], 2), "write_s_all": [round(w, 2) for w in writes],
        "load_s_median": round(sorted(loads)[len(loads) // 2], 2),
    }))  # fmt: skip
    envs.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
