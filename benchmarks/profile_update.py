"""Where one SAC update's time goes: torch.profiler's self CPU time per aten op, summed into categories, against the
matmul floor (the update's matmul FLOPs at this core's single-thread fp32 matmul peak). Issue 24's first step: the
main job's network (D_8, 64 regular fields: 2 x 1,024 channels) was never profiled.

    python benchmarks/profile_update.py                          # D_8 default and the MLP twin, FetchSlideDense-v4
    python benchmarks/profile_update.py --threads 2 --bf16       # 2 torch threads; bf16 autocast (SAC's --bf16)

Categories (self time of each aten op, so a composite op's time lands in the kernels it calls):
    matmul        mm, addmm, bmm, baddbmm (the hidden layers, the Fourier transforms, the heads; forward and backward)
    expansion     index_select, addcmul, index_add / embedding-like gathers: escnn's weight expansion, recomputed
                  for every pass that needs gradients (the fast path's `expand`)
    optimizer     the fused Adam step (_fused_adam) and its foreach ops
    elementwise   everything else: ReLU, tanh, the squash, copies, reductions, the group max and its mask
One torch thread unless --threads; the figures come from a random batch of 256 (`speed.random_batch`), so the replay
buffer and the environment are left out: what the update costs, not the whole env step.
"""

import argparse
import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed import flop_counter, load_script, make_args, matmul_peak_gflops, random_batch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
EXPANSION = {"aten::index_select", "aten::addcmul", "aten::index_add_", "aten::embedding_dense_backward"}


def category(op: str) -> str:
    if op in MATMUL:
        return "matmul"
    if op in EXPANSION:
        return "expansion"
    if "adam" in op or op.startswith("aten::_foreach"):
        return "optimizer"
    return "elementwise"


def profile(script: str, overrides: dict, env_id: str, updates: int, warmup: int) -> dict:
    """ms per update (mean over `updates` after `warmup`), FLOPs per update and self time per op and category."""
    mod = load_script(os.path.join(REPO, script), "profiled_" + script[:-3])
    getattr(mod, "retain_freed_memory", lambda: None)()
    args = make_args(mod, env_id, overrides)
    fields = (mod.REACH_FIELDS if "Reach" in env_id else mod.OBJECT_FIELDS) + mod.GOAL_FIELDS
    torch.manual_seed(0)
    nets, opts, alpha_state = mod.build_agent(fields, args, torch.device("cpu"))
    batch = random_batch(mod, mod.fields_dim(fields), args.batch_size)
    cycle = args.policy_frequency
    updates += -updates % cycle
    step = 0

    def run(n: int) -> None:
        nonlocal step
        for _ in range(n):
            mod.sac_update(batch, nets, opts, args, alpha_state, step, args.learning_starts + step)
            step += 1

    run(warmup + -warmup % cycle)
    with flop_counter() as counter:
        run(cycle)
    start = time.perf_counter()
    run(updates)
    plain_ms = 1e3 * (time.perf_counter() - start) / updates
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        run(updates)
    ops = {e.key: e.self_cpu_time_total / 1e3 / updates for e in prof.key_averages()}  # ms per update
    by_category, copies = defaultdict(float), defaultdict(float)
    for op, ms in ops.items():
        by_category[category(op)] += ms
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key == "aten::copy_":  # layout changes (reshape of a transposed view), casts: by destination shape
            copies[str(e.input_shapes[0])] += e.self_cpu_time_total / 1e3 / updates
    return {"ms": plain_ms, "flops": counter.flops / cycle, "ops": ops, "categories": dict(by_category),
            "copies": dict(copies)}  # fmt: skip


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--env-id", default="FetchSlideDense-v4")
    cli.add_argument("--threads", type=int, default=1)
    cli.add_argument("--updates", type=int, default=60)
    cli.add_argument("--warmup", type=int, default=20)
    cli.add_argument("--bf16", action="store_true", help="bf16 autocast of the update (SAC's --bf16)")
    cli.add_argument("--top", type=int, default=12, help="ops listed per row")
    opts = cli.parse_args()
    torch.set_num_threads(1)
    peak = matmul_peak_gflops("float32")
    torch.set_num_threads(opts.threads)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{opts.threads} thread(s); single-thread fp32 matmul peak {peak:.1f} GFLOP/s")  # fmt: skip
    rows = [("D_8 default (64 fields)", "sac_fetch_equivariant.py", {"dihedral_n": 8}),
            ("MLP 256x256", "sac_fetch_mlp.py", {})]  # fmt: skip
    for label, script, overrides in rows:
        overrides = {**overrides, "obs_norm": True, **({"bf16": True} if opts.bf16 else {})}
        r = profile(script, overrides, opts.env_id, opts.updates, opts.warmup)
        floor = 1e3 * r["flops"] / (peak * 1e9)
        profiled = sum(r["categories"].values())
        print(f"\n## {label}: {r['ms']:.2f} ms/update ({r['flops'] / 1e9:.3f} GFLOP, matmul floor {floor:.2f} ms "
              f"= {floor / r['ms']:.0%} of it); profiled {profiled:.2f} ms (profiler overhead included)")  # fmt: skip
        print("| category | ms/update | share |\n|---|---|---|")
        for name, ms in sorted(r["categories"].items(), key=lambda kv: -kv[1]):
            print(f"| {name} | {ms:.2f} | {ms / profiled:.0%} |")
        print("| op | ms/update | share |\n|---|---|---|")
        for op, ms in sorted(r["ops"].items(), key=lambda kv: -kv[1])[: opts.top]:
            print(f"| {op} | {ms:.3f} | {ms / profiled:.1%} |")
        print("| aten::copy_ by shape | ms/update | share |\n|---|---|---|")
        for shape, ms in sorted(r["copies"].items(), key=lambda kv: -kv[1])[:6]:
            print(f"| {shape} | {ms:.3f} | {ms / profiled:.1%} |")


if __name__ == "__main__":
    main()
