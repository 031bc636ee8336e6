"""Side-by-side speed figures for "Fast SAC updates": steady env steps/s of real runs, per-update time, matmul floor.

Usage (from the repository root, in its venv; about 10 minutes on 2 cores at the defaults):

    python benchmarks/speed.py                      # everything
    python benchmarks/speed.py --only main          # one comparison: main|main64|eq-mlp|mlp-sb3|bf16-sb3|update
    python benchmarks/speed.py --only main --only update --steps 2500 --base-commit bc95cc4

What each figure means:

- Steady SPS (pairs `main`, `eq-mlp`, `mlp-sb3`, `bf16-sb3`): environment steps per second of a real training run,
  one SAC update of batch 256 per env step, measured as benchmarks/sps.py does (global steps between the first and the
  last `losses/qf1_loss` TensorBoard point, all after learning_starts = 1000, over the wall time between them). Every
  run has one torch thread (OMP_NUM_THREADS=1). The two runs of a pair start together as concurrent subprocesses (the
  machine has 2 cores), so both see the same machine conditions; a pair's ratio is the figure to quote.
    main      `sac_fetch_equivariant.py --env-id FetchSlideDense-v4 --dihedral-n 8 --reg-rep-n 32` (the main job at
              the network the speed issue measured: 32 fields, the base commit's default), working tree vs the base
              commit's copy (`git show BASE:sac_fetch_equivariant.py`). Ratio new / base, target >= 3.
    main64    `sac_fetch_equivariant.py --env-id FetchSlideDense-v4 --dihedral-n 8`: the main job at its default width
              (64 fields) and its defaults (observation normaliser on, none of the settings below), working tree vs
              the base commit's copy. Ratio new / base, target >= 1.5 (issue 24).
    eq-mlp    `sac_fetch_equivariant.py --reg-rep-n 32` (D_4, 256 channels: the MLP's width) vs `sac_fetch_mlp.py`
              (256x256) on FetchReachDense-v4, working tree. Ratio eq / mlp, target >= 0.9.
    mlp-sb3   `sac_fetch_mlp.py` vs Stable-Baselines3 2.9.2 SAC + HER (benchmarks/sb3_sac_her_sps.py, always 4000
              steps, window steps 1500-4000), FetchReachDense-v4. Ratio mlp / sb3, target >= 2. SB3 is not a project
              dependency: it is installed into /tmp/sb3site when missing and put on the run's PYTHONPATH.
    bf16-sb3  the same with `sac_fetch_mlp.py --bf16`, run only if the working tree's `--help` lists `--bf16`.
  Training runs get `--eval-frequency STEPS --eval-episodes 2` and `--final-eval-episodes 0` where `--help` lists it,
  so the one evaluation (at the last step, after the last loss point) costs little and lies outside the window, and
  `--update-ratio 1 --no-obs-norm` where `--help` lists them (every pair but main64): one update per env step and no
  observation normaliser, the settings of the base commit and of SB3, whatever the scripts' defaults are.

- Per update (`update`): in-process microbenchmark, one torch thread, of `sac_update` on a random batch of 256 (the
  replay buffer and the env are left out). After 20 warm-up updates, `--update-calls` calls are timed with
  `update_idx` counting up, so the actor (+ alpha) is updated `policy_frequency` times every `policy_frequency`-th
  call as in training; "ms/update" is their mean, "best block" the mean of the fastest of 4 equal blocks (less
  sensitive to other load on the machine). "GFLOP/update" is the FLOPs counted with the formulas of
  `torch.utils.flop_counter.FlopCounterMode` (matmuls and convolutions, forward and backward, escnn's weight expansion
  included) over one full `policy_frequency` cycle, divided by `policy_frequency`. "peak" is this core's
  single-thread fp32 matmul rate (best of several 2048^3 matmuls); "floor ms" = FLOPs / peak is the time of the
  matmuls alone at peak, and "floor/measured" says how close an update is to that floor (1.0 = nothing but matmuls at
  peak). Each row runs in its own subprocess. Rows: the main job and D_4 (both at 32 fields) and the MLP default
  (Reach), for the base commit and the working tree, and the MLP with `bf16=True` when the working tree's `Args` has
  that field.

The working tree's two scripts are copied when the benchmark starts, so editing them meanwhile changes nothing.
Output: readable tables, one JSON line per measurement (prefix `JSON `), and the ratios with their targets (pass /
miss). Exit status 0 whatever the ratios; non-zero if a subprocess fails (the tail of its stderr is printed).

Interface assumed of both scripts (present at bc95cc4 and kept by the rewrite):
- the CLI flags used above (`--help` is read for `--final-eval-episodes` and `--bf16`), the `losses/qf1_loss`
  TensorBoard scalar logged every 100 updates, and `config.json` in the run folder;
- importable as a module from its file path, with `Args` (a dataclass; fields env_id, batch_size, policy_frequency,
  learning_starts, dihedral_n or hidden_sizes, optionally bf16; `cuda` is set False when present),
  `build_agent(obs_fields, args, device) -> (nets, opts, alpha_state)` (opts: a dict of optimizers),
  `sac_update(batch, nets, opts, args, alpha_state, update_idx, global_step)`, `ReplayBatch` (a NamedTuple with the
  fields observations, next_observations, actions, rewards), `REACH_FIELDS`, `OBJECT_FIELDS`, `GOAL_FIELDS`,
  `fields_dim`; everything `sac_update` needs (bf16 autocast included) is set up by `build_agent` or inside it.
"""

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sps import RUN_ENV, steady_sps, training_command  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EQ, MLP = "sac_fetch_equivariant.py", "sac_fetch_mlp.py"
REACH, SLIDE = "FetchReachDense-v4", "FetchSlideDense-v4"
SB3_SCRIPT = os.path.join(REPO, "benchmarks", "sb3_sac_her_sps.py")
SB3_SITE, SB3_VERSION, SB3_STEPS = "/tmp/sb3site", "2.9.2", 4000  # SB3_STEPS: fixed in sb3_sac_her_sps.py
COMPARISONS = ("main", "main64", "eq-mlp", "mlp-sb3", "bf16-sb3", "update")
STDERR_TAIL = 3000  # characters of a failed subprocess's stderr to print
LOSS_LOG_EVERY = 100  # updates between two loss points in the training scripts
UPDATE_BLOCKS = 4  # the timed updates run in this many blocks; the best block's mean is reported too


@dataclasses.dataclass
class Run:
    """One training run of a pair. `script` is a path; None means the SB3 reference. `regime`: run at the issue-7
    settings (`--update-ratio 1 --no-obs-norm`) rather than the script's defaults."""

    label: str
    script: str | None
    env_id: str = REACH
    extra: tuple = ()
    regime: bool = True


class SubprocessFailed(Exception):
    pass


# ---------------------------------------------------------------------------------------------------------------------
# Plumbing: subprocesses, the base commit's scripts, SB3
# ---------------------------------------------------------------------------------------------------------------------
def stderr_tail(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-STDERR_TAIL:]


def check_returncode(name: str, returncode: int, cmd: list, stderr_path: str) -> None:
    if returncode != 0:
        tail = stderr_tail(stderr_path)
        raise SubprocessFailed(f"{name} exited with {returncode}\ncommand: {' '.join(cmd)}\nstderr tail:\n{tail}")


def script_help(script: str, cache: dict = {}) -> str:  # noqa: B006 - deliberate per-process cache
    if script not in cache:
        env = {**os.environ, **RUN_ENV, "NO_COLOR": "1", "COLUMNS": "200"}
        out = subprocess.run([sys.executable, script, "--help"], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise SubprocessFailed(f"{script} --help exited with {out.returncode}\n{out.stderr[-STDERR_TAIL:]}")
        cache[script] = out.stdout
    return cache[script]


def has_flag(script: str, flag: str) -> bool:
    return re.search(re.escape(flag) + r"(?![\w-])", script_help(script)) is not None


def snapshot_scripts(tmp: str, base_commit: str) -> tuple[str, str, str]:
    """Copy the working tree's two scripts to `tmp/new/` (a file edited during the benchmark does not change it) and
    write the base commit's to `tmp/base/`. Returns (new folder, base folder, base short hash)."""
    rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", f"{base_commit}^{{commit}}"],
                         capture_output=True, text=True)  # fmt: skip
    if rev.returncode != 0:
        raise SubprocessFailed(f"--base-commit {base_commit!r} is not a commit of {REPO}: {rev.stderr.strip()}")
    new_dir, base_dir = os.path.join(tmp, "new"), os.path.join(tmp, "base")
    os.makedirs(new_dir)
    os.makedirs(base_dir)
    for script in (EQ, MLP):
        shutil.copy(os.path.join(REPO, script), new_dir)
        text = subprocess.run(["git", "-C", REPO, "show", f"{base_commit}:{script}"], capture_output=True,
                              text=True, check=True).stdout  # fmt: skip
        with open(os.path.join(base_dir, script), "w") as f:
            f.write(text)
    return new_dir, base_dir, rev.stdout.strip()


def ensure_sb3() -> None:
    version_file = os.path.join(SB3_SITE, "stable_baselines3", "version.txt")
    if os.path.exists(version_file) and open(version_file).read().strip() == SB3_VERSION:
        return
    print(f"installing stable-baselines3=={SB3_VERSION} into {SB3_SITE}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", SB3_SITE, "--no-deps",
                    f"stable-baselines3=={SB3_VERSION}"], check=True)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Steady SPS of two concurrent training runs
# ---------------------------------------------------------------------------------------------------------------------
def start_run(run: Run, steps: int, work_dir: str) -> tuple[subprocess.Popen, list, dict]:
    os.makedirs(work_dir)
    files = {name: os.path.join(work_dir, name) for name in ("stdout", "stderr", "runs")}
    env = {**os.environ, **RUN_ENV}
    if run.script is None:
        cmd = [sys.executable, SB3_SCRIPT]
        env["PYTHONPATH"] = os.pathsep.join(p for p in (SB3_SITE, os.environ.get("PYTHONPATH")) if p)
    else:
        final_eval = ["--final-eval-episodes", "0"] if has_flag(run.script, "--final-eval-episodes") else []
        # Run.regime: the issue-7 settings on every script version (one update per env step, no normaliser)
        regime = [*(["--update-ratio", "1"] if has_flag(run.script, "--update-ratio") else []),
                  *(["--no-obs-norm"] if has_flag(run.script, "--obs-norm") else [])] if run.regime else []  # fmt: skip
        extra = ["--eval-episodes", "2", *final_eval, *regime]
        cmd = training_command(run.script, run.env_id, steps, files["runs"], [*extra, *run.extra])
    with open(files["stdout"], "w") as out, open(files["stderr"], "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=REPO)
    return proc, cmd, files


def run_result(run: Run, files: dict, t0: float) -> dict:
    if run.script is None:
        with open(files["stdout"]) as f:
            result = json.loads(f.read().strip().splitlines()[-1])
        return {"steady_sps": result["steady_sps"], "window_steps": [1500, SB3_STEPS], "sb3": result["version"]}
    result = steady_sps(files["runs"])
    start, end = (t - t0 for t in result.pop("window_wall_time"))
    return {**result, "window_s": [round(start, 1), round(end, 1)]}


def run_pair(name: str, runs: tuple[Run, Run], steps: int, tmp: str) -> list[dict]:
    """Start both runs at once, wait for both; one record per run. Kills the other run if one fails."""
    t0 = time.time()
    started = [start_run(run, steps, os.path.join(tmp, f"{name}-{i}")) for i, run in enumerate(runs)]
    try:
        for run, (proc, cmd, files) in zip(runs, started, strict=True):
            check_returncode(run.label, proc.wait(), cmd, files["stderr"])
    finally:
        for proc, _, _ in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    records = []
    for run, (_, cmd, files) in zip(runs, started, strict=True):
        shown = [os.path.basename(cmd[1]), *cmd[2:]]  # the script's folder and the run folder are temporary
        if "--run-dir" in shown:
            del shown[shown.index("--run-dir") : shown.index("--run-dir") + 2]
        command = " ".join(shown)
        records.append({"kind": "sps", "pair": name, "run": run.label, "command": command,
                        **run_result(run, files, t0)})  # fmt: skip
    return records


# ---------------------------------------------------------------------------------------------------------------------
# Per-update time and matmul floor (each row in a child process: python speed.py --child-update SPEC)
# ---------------------------------------------------------------------------------------------------------------------
def load_script(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


def matmul_peak_gflops(dtype_name: str, n: int = 2048, repeats: int = 5) -> float:
    """Best single-thread rate of an n x n @ n x n matmul."""
    import torch

    torch.set_num_threads(1)
    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def flop_counter():
    """A dispatch mode that adds up FLOPs with the formulas of `torch.utils.flop_counter.FlopCounterMode` (its
    `flop_registry`: matmuls and convolutions, forward and backward) and counts matmul calls by dtype (shows whether
    bf16 autocast took effect). FlopCounterMode itself is not used: its module tracker fails on escnn's basis expansion
    ("Expected gradient function to be set", torch 2.13); without module tracking the totals are the same."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    matmuls = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm}

    class FlopCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.flops, self.matmul_dtypes = 0, Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            packet = func._overloadpacket
            if packet in flop_registry:
                self.flops += flop_registry[packet](*args, **kwargs, out_val=out)
            if packet in matmuls:
                self.matmul_dtypes[str(args[-1].dtype).removeprefix("torch.")] += 1
            return out

    return FlopCounter()


def random_batch(mod, obs_dim: int, batch_size: int):
    import torch

    g = torch.Generator().manual_seed(0)
    tensors = {
        "observations": torch.randn(batch_size, obs_dim, generator=g),
        "next_observations": torch.randn(batch_size, obs_dim, generator=g),
        "actions": torch.rand(batch_size, 4, generator=g) * 2 - 1,  # in the unit box
        "rewards": -torch.rand(batch_size, 1, generator=g),  # dense Fetch reward: minus a distance
    }
    if set(mod.ReplayBatch._fields) != set(tensors):
        raise ValueError(f"ReplayBatch fields {mod.ReplayBatch._fields}, expected {sorted(tensors)}")
    return mod.ReplayBatch(**{name: tensors[name] for name in mod.ReplayBatch._fields})


def make_args(mod, env_id: str, overrides: dict):
    fields = {f.name for f in dataclasses.fields(mod.Args)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"Args has no field {sorted(unknown)}; fields: {sorted(fields)}")
    fixed = {"cuda": False, "obs_norm": False}  # CPU; the update itself, without the observation normaliser
    return mod.Args(
        env_id=env_id, **{k: v for k, v in fixed.items() if k in fields and k not in overrides}, **overrides
    )


def measure_update(spec: dict) -> dict:
    """Mean time of one `sac_update` and its counted FLOPs (see the module docstring)."""
    import torch

    torch.set_num_threads(1)
    mod = load_script(spec["path"], "speed_" + spec["label"].replace(" ", "_").replace("-", "_"))
    getattr(mod, "retain_freed_memory", lambda: None)()  # as the script's main() does, where it has it
    args = make_args(mod, spec["env_id"], spec["args"])
    obs_fields = (mod.REACH_FIELDS if "Reach" in args.env_id else mod.OBJECT_FIELDS) + mod.GOAL_FIELDS
    torch.manual_seed(0)
    nets, opts, alpha_state = mod.build_agent(obs_fields, args, torch.device("cpu"))
    batch = random_batch(mod, mod.fields_dim(obs_fields), args.batch_size)
    cycle, update_idx = args.policy_frequency, 0

    def updates(n: int) -> None:
        nonlocal update_idx
        for _ in range(n):
            mod.sac_update(batch, nets, opts, args, alpha_state, update_idx, args.learning_starts + update_idx)
            update_idx += 1

    updates(spec["warmup"] + (-spec["warmup"]) % cycle)  # ends at a policy-update index: cycles start there
    with flop_counter() as counter:
        updates(cycle)
    block = max(cycle, spec["calls"] // UPDATE_BLOCKS // cycle * cycle)  # whole cycles only
    seconds = []
    for _ in range(UPDATE_BLOCKS):
        start = time.perf_counter()
        updates(block)
        seconds.append(time.perf_counter() - start)
    calls = block * UPDATE_BLOCKS
    return {
        "update_ms": 1e3 * sum(seconds) / calls,
        "update_ms_best_block": 1e3 * min(seconds) / block,
        "flops_per_update": counter.flops / cycle,
        "calls": calls,
        "matmul_dtypes": dict(counter.matmul_dtypes),
        "optimized_params": sum(p.numel() for opt in opts.values() for g in opt.param_groups for p in g["params"]),
    }


def run_update_rows(rows: list[dict], warmup: int, calls: int, tmp: str) -> list[dict]:
    peak = {"float32": matmul_peak_gflops("float32"), "bfloat16": matmul_peak_gflops("bfloat16")}
    print(f"single-thread matmul peak: fp32 {peak['float32']:.1f} GFLOP/s, bf16 {peak['bfloat16']:.1f} GFLOP/s",
          flush=True)  # fmt: skip
    records = []
    for row in rows:
        spec = {**row, "warmup": warmup, "calls": calls}
        cmd = [sys.executable, os.path.abspath(__file__), "--child-update", json.dumps(spec)]
        stderr_path = os.path.join(tmp, f"update-{len(records)}.stderr")
        with open(stderr_path, "w") as err:
            out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, **RUN_ENV})
        check_returncode(f"update microbenchmark {row['label']}", out.returncode, cmd[:3], stderr_path)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        floor_ms = 1e3 * result["flops_per_update"] / (peak["float32"] * 1e9)
        record = {"kind": "update", "row": row["label"], "script": row["script"], "env_id": row["env_id"],
                  "args": row["args"], **result, "peak_fp32_gflops": round(peak["float32"], 1),
                  "floor_ms": floor_ms, "floor_over_measured": floor_ms / result["update_ms"]}  # fmt: skip
        if row["args"].get("bf16"):
            record["peak_bf16_gflops"] = round(peak["bfloat16"], 1)
            record["floor_ms_at_bf16_peak"] = 1e3 * result["flops_per_update"] / (peak["bfloat16"] * 1e9)
        records.append(record)
        print(f"  {row['label']}: {result['update_ms']:.2f} ms/update", flush=True)
    return records


# ---------------------------------------------------------------------------------------------------------------------
# The comparisons, tables, ratios
# ---------------------------------------------------------------------------------------------------------------------
# on runs[1] SPS / runs[0] SPS
PAIR_TARGETS = {"main": 3.0, "main64": 1.5, "eq-mlp": 0.9, "mlp-sb3": 2.0, "bf16-sb3": 2.0}


def sps_pairs(new_dir: str, base_dir: str, base_rev: str, bf16: bool) -> dict:
    """Name -> (reference run, candidate run); the ratio is candidate SPS / reference SPS."""
    main_job = ("--dihedral-n", "8", "--reg-rep-n", "32")
    default_main_job = ("--dihedral-n", "8")  # its default width, 64 fields
    eq_width = ("--reg-rep-n", "32")
    mlp = os.path.join(new_dir, MLP)
    pairs = {
        "main": (Run(f"main job @{base_rev}", os.path.join(base_dir, EQ), SLIDE, main_job),
                 Run("main job new", os.path.join(new_dir, EQ), SLIDE, main_job)),
        "main64": (Run(f"main job 64 @{base_rev}", os.path.join(base_dir, EQ), SLIDE, default_main_job, regime=False),
                   Run("main job 64 new", os.path.join(new_dir, EQ), SLIDE, default_main_job, regime=False)),
        "eq-mlp": (Run("mlp 256x256", mlp), Run("eq D4 32 fields", os.path.join(new_dir, EQ), extra=eq_width)),
        "mlp-sb3": (Run("sb3 SAC+HER", None), Run("mlp 256x256", mlp)),
    }  # fmt: skip
    if bf16:
        pairs["bf16-sb3"] = (Run("sb3 SAC+HER", None), Run("mlp 256x256 --bf16", mlp, extra=("--bf16",)))
    return pairs


def update_rows(new_dir: str, base_dir: str, base_rev: str, bf16: bool) -> list[dict]:
    def row(label, script, folder, env_id, args):
        return {"label": label, "script": script, "path": os.path.join(folder, script), "env_id": env_id, "args": args}

    rows = []
    for where, folder in ((f"@{base_rev}", base_dir), ("new", new_dir)):
        rows += [
            row(f"main job {where}", EQ, folder, SLIDE, {"dihedral_n": 8, "reg_rep_n": 32}),
            row(f"eq D4 32 fields {where}", EQ, folder, REACH, {"reg_rep_n": 32}),
            row(f"mlp default {where}", MLP, folder, REACH, {}),
        ]
    if bf16:
        rows.append(row("mlp bf16 new", MLP, new_dir, REACH, {"bf16": True}))
    return rows


def print_sps_table(records: list[dict]) -> None:
    print(f"\n{'pair':<9} {'run':<28} {'steady SPS':>10}  {'window steps':>13}  {'window s (from pair start)':>26}")
    for r in records:
        window_s = "{:.0f}-{:.0f}".format(*r["window_s"]) if "window_s" in r else "(SB3 callback)"
        steps = "{}-{}".format(*r["window_steps"])
        print(f"{r['pair']:<9} {r['run']:<28} {r['steady_sps']:>10.1f}  {steps:>13}  {window_s:>26}")


def print_update_table(records: list[dict]) -> None:
    print(f"\n{'row':<24} {'env':<19} {'ms/update':>9} {'best block':>10} {'GFLOP/update':>12} {'floor ms':>8} "
          f"{'floor/measured':>14}  matmul dtypes")  # fmt: skip
    for r in records:
        print(f"{r['row']:<24} {r['env_id']:<19} {r['update_ms']:>9.2f} {r['update_ms_best_block']:>10.2f} "
              f"{r['flops_per_update'] / 1e9:>12.3f} {r['floor_ms']:>8.2f} {r['floor_over_measured']:>14.2f}  "
              f"{r['matmul_dtypes']}")  # fmt: skip


def ratios(records: list[dict]) -> list[tuple]:
    """(name, value, target or None) for every comparison that ran: candidate speed / reference speed."""
    out = []
    for pair, target in PAIR_TARGETS.items():
        runs = [r for r in records if r["kind"] == "sps" and r["pair"] == pair]  # (reference, candidate)
        if runs:
            ref, cand = runs
            out.append((f"SPS {pair}: {cand['run']} / {ref['run']}", cand["steady_sps"] / ref["steady_sps"], target))
    upd = {r["row"]: r["update_ms"] for r in records if r["kind"] == "update"}
    base = next((k.removeprefix("main job ") for k in upd if k.startswith("main job @")), "")
    for ref, cand in ((f"main job {base}", "main job new"), (f"eq D4 32 fields {base}", "eq D4 32 fields new"),
                      (f"mlp default {base}", "mlp default new"), ("mlp default new", "eq D4 32 fields new"),
                      ("mlp default new", "mlp bf16 new")):  # fmt: skip
        if ref in upd and cand in upd:
            out.append((f"update speed {cand} vs {ref} (ms ratio)", upd[ref] / upd[cand], None))
    return out


def print_ratios(rows: list[tuple]) -> None:
    print("\nratios")
    for name, value, target in rows:
        verdict = f"target >= {target:g}: {'pass' if value >= target else 'MISS'}" if target else "(no target)"
        print(f"  {value:6.2f}  {name}  {verdict}")


def parse_cli() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", choices=COMPARISONS, help="run only this comparison (repeatable)")
    parser.add_argument("--steps", type=int, default=4000, help="env steps per training run; updates start after 1000")
    parser.add_argument("--base-commit", default="bc95cc4", help="the commit the main job is compared with")
    parser.add_argument("--update-calls", type=int, default=200, help="timed sac_update calls per row")
    parser.add_argument("--update-warmup", type=int, default=20, help="untimed sac_update calls per row first")
    parser.add_argument("--child-update", help=argparse.SUPPRESS)  # internal: one microbenchmark row, JSON spec
    cli = parser.parse_args()
    min_steps = 1000 + 2 * LOSS_LOG_EVERY  # learning_starts, then at least two loss points
    if cli.steps < min_steps:
        parser.error(f"--steps must be >= {min_steps} (two loss points after learning_starts 1000), got {cli.steps}")
    return cli


def run_all(cli: argparse.Namespace, tmp: str) -> list[dict]:
    only = cli.only or list(COMPARISONS)
    new_dir, base_dir, base_rev = snapshot_scripts(tmp, cli.base_commit)
    bf16 = has_flag(os.path.join(new_dir, MLP), "--bf16")  # the working tree's Args has a `bf16` field
    pairs = sps_pairs(new_dir, base_dir, base_rev, bf16)
    if "bf16-sb3" in only and not bf16:
        print("bf16-sb3: skipped (the working tree's sac_fetch_mlp.py --help lists no --bf16)")
    if any(name in only for name in ("mlp-sb3", "bf16-sb3")):
        ensure_sb3()
        if cli.steps != SB3_STEPS:
            print(f"note: the SB3 run always takes {SB3_STEPS} steps (sb3_sac_her_sps.py), --steps is {cli.steps}")
    records = []
    for name in (n for n in only if n in pairs):
        print(f"{name}: {' vs '.join(run.label for run in pairs[name])}, {cli.steps} steps, side by side", flush=True)
        records += run_pair(name, pairs[name], cli.steps, tmp)
    if "update" in only:
        print("update: per-update time, one torch thread, batch 256", flush=True)
        records += run_update_rows(
            update_rows(new_dir, base_dir, base_rev, bf16), cli.update_warmup, cli.update_calls, tmp
        )
    return records


def main() -> int:
    cli = parse_cli()
    if cli.child_update:
        print(json.dumps(measure_update(json.loads(cli.child_update))))
        return 0
    with tempfile.TemporaryDirectory(prefix="speed-") as tmp:
        try:
            records = run_all(cli, tmp)
        except (SubprocessFailed, subprocess.CalledProcessError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    if any(r["kind"] == "sps" for r in records):
        print_sps_table([r for r in records if r["kind"] == "sps"])
    if any(r["kind"] == "update" for r in records):
        print_update_table([r for r in records if r["kind"] == "update"])
    print()
    for record in records:
        print("JSON " + json.dumps(record))
    print_ratios(ratios(records))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
