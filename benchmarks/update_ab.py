"""CPU time of one SAC update, two variants alternating in one process: a fair A/B on a machine that other jobs share.

    python benchmarks/update_ab.py --base-commit 3e0b149   # that commit's sac_fetch_equivariant.py vs the working tree
    python benchmarks/update_ab.py --bf16                  # the working tree in float32 vs with --bf16 autocast
    python benchmarks/update_ab.py --compile               # the working tree eager vs torch.compile of regular_hidden
    python benchmarks/update_ab.py --base-commit HEAD --threads 2   # two torch threads: wall time per update

Both variants build the main job's agent (`--dihedral-n`, default 8, at its default width; FetchSlideDense-v4's inputs,
observation normaliser on) and run `sac_update` on one random batch of 256 (`speed.random_batch`: the replay buffer and
the environment are left out), `--threads` torch threads (default one). After 10 warm-up updates each (`--compile`'s
compilation falls there: about 2 minutes), `--blocks` blocks of `--updates` updates run alternately, A then B; each
block's time per update is printed, then each variant's median and minimum and the ratio of medians. With one thread
the time is this process's CPU time (`time.process_time`, so time the scheduler gives to other processes does not
count); with more it is wall time (CPU time would add the threads up), so run those on otherwise idle cores. The
actor updates every other call, twice, as in training. `--compile` wraps the script's `regular_hidden` (the hidden
layers of every network pass) in `torch.compile` (inductor, `dynamic=False`).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed import EQ, SubprocessFailed, load_script, make_args, random_batch, snapshot_scripts  # noqa: E402


class Variant:
    """One agent and its batch, updated `n` at a time."""

    def __init__(self, label: str, path: str, overrides: dict, compiled: bool = False):
        self.label, self.mod, self.step = label, load_script(path, f"ab_{label.replace(' ', '_')}"), 0
        getattr(self.mod, "retain_freed_memory", lambda: None)()
        if compiled:
            self.mod.regular_hidden = torch.compile(self.mod.regular_hidden, dynamic=False)
        self.args = make_args(self.mod, "FetchSlideDense-v4", {"obs_norm": True, **overrides})
        fields = self.mod.OBJECT_FIELDS + self.mod.GOAL_FIELDS
        torch.manual_seed(0)
        self.nets, self.opts, self.alpha = self.mod.build_agent(fields, self.args, torch.device("cpu"))
        self.batch = random_batch(self.mod, self.mod.fields_dim(fields), self.args.batch_size)

    def run(self, n: int, clock=time.process_time) -> float:
        """ms per update over `n` updates, by `clock`."""
        start = clock()
        for _ in range(n):
            self.mod.sac_update(self.batch, self.nets, self.opts, self.args, self.alpha, self.step,
                                self.args.learning_starts + self.step)  # fmt: skip
            self.step += 1
        return 1e3 * (clock() - start) / n


def main() -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = cli.add_mutually_exclusive_group(required=True)
    which.add_argument("--base-commit", help="compare this commit's script (A) with the working tree's (B)")
    which.add_argument("--bf16", action="store_true", help="compare the working tree in float32 (A) and --bf16 (B)")
    which.add_argument("--compile", action="store_true", help="compare the working tree eager (A) and compiled (B)")
    cli.add_argument("--dihedral-n", type=int, default=8)
    cli.add_argument("--blocks", type=int, default=8, help="blocks per variant")
    cli.add_argument("--updates", type=int, default=20, help="updates per block (even: whole actor cycles)")
    cli.add_argument("--threads", type=int, default=1, help="torch threads (more than one: wall time, not CPU time)")
    opts = cli.parse_args()
    if opts.threads < 1:
        cli.error(f"--threads {opts.threads}: must be at least 1")
    torch.set_num_threads(opts.threads)
    clock = time.process_time if opts.threads == 1 else time.perf_counter
    net = {"dihedral_n": opts.dihedral_n}
    with tempfile.TemporaryDirectory() as tmp:
        try:  # the working tree's scripts copied, and the base commit's (HEAD's when only --bf16 is given)
            new_dir, base_dir, base_rev = snapshot_scripts(tmp, opts.base_commit or "HEAD")
        except SubprocessFailed as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        here = os.path.join(new_dir, EQ)
        if opts.base_commit:
            variants = [Variant(f"@{base_rev}", os.path.join(base_dir, EQ), net), Variant("working tree", here, net)]
        elif opts.compile:
            variants = [Variant("eager", here, net), Variant("compiled", here, net, compiled=True)]
        else:
            variants = [Variant("float32", here, net), Variant("bf16", here, {**net, "bf16": True})]
    for v in variants:
        v.run(10)
    times = {v.label: [] for v in variants}
    for _ in range(opts.blocks):
        for v in variants:
            times[v.label].append(v.run(opts.updates, clock))
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, {opts.threads} "
          f"thread(s); D_{opts.dihedral_n} default width, batch 256; "
          f"{'CPU' if opts.threads == 1 else 'wall'} ms per update, "
          f"{opts.blocks} blocks of {opts.updates}")  # fmt: skip
    for label, ms in times.items():
        print(f"{label:>14}: {' '.join(f'{t:.1f}' for t in ms)}  median {statistics.median(ms):.1f} min {min(ms):.1f}")
    (a, ta), (b, tb) = times.items()
    print(f"median {a} / median {b}: {statistics.median(ta) / statistics.median(tb):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
