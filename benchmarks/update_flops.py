"""Floating-point operations per SAC update of each Fetch agent, as torch's FlopCounterMode counts them (matrix
products: mm, addmm, bmm, ...; elementwise work is not counted), averaged over a critic-only and a critic + actor
update (policy_frequency 2). The MLP selection's "matched compute" candidate is the 2-layer MLP whose count is
closest to the D_8 default's (docs/BENCHMARKS.md, "Selecting the MLP").

    python benchmarks/update_flops.py                 # FetchPush-v4 inputs (31 + 3), batch 256
"""

import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sac_fetch_equivariant as eq  # noqa: E402
import sac_fetch_mlp as mlp  # noqa: E402


def update_flops(mod, **network_args) -> float:
    """Mean FLOPs of one `sac_update` (batch 256, Push's inputs) over update indices 1 (critic) and 2 (+ actor)."""
    args = mod.Args(env_id="FetchPush-v4", cuda=False, **network_args)
    mod.validate_network_args(args)
    fields = mod.OBJECT_FIELDS + mod.GOAL_FIELDS
    nets, opts, alpha_state = mod.build_agent(fields, args, "cpu")
    dim = mod.fields_dim(fields)
    batch = mod.ReplayBatch(torch.randn(256, dim), torch.randn(256, dim), torch.rand(256, 4) * 2 - 1,
                            -torch.ones(256, 1))  # fmt: skip
    mod.sac_update(batch, nets, opts, args, alpha_state, 2, 2000)  # builds the caches once
    total = 0
    for update_idx in (1, 2):
        with FlopCounterMode(display=False) as counter:
            mod.sac_update(batch, nets, opts, args, alpha_state, update_idx, 2000)
        total += counter.get_total_flops()
    return total / 2


def main() -> None:
    torch.set_num_threads(1)
    rows = [("D_4 default (reg_rep_n 90)", update_flops(eq, dihedral_n=4)),
            ("D_8 default (reg_rep_n 64)", update_flops(eq, dihedral_n=8))]  # fmt: skip
    for sizes in ((256, 256), (256, 256, 256), (400, 400), (512, 512)):
        rows.append((f"MLP {'x'.join(map(str, sizes))}", update_flops(mlp, hidden_sizes=sizes)))
    base = rows[2][1]
    print("| agent | MFLOPs per update | x MLP 256x256 |\n|---|---|---|")
    for name, flops in rows:
        print(f"| {name} | {flops / 1e6:,.0f} | {flops / base:.2f} |")


if __name__ == "__main__":
    main()
