"""The fast SAC update (stacked critics, dense target weights, the equivariant Fourier-block path) is the same algorithm
as the reference update: each network evaluated by its reference forward (escnn's own layers for the equivariant twin,
one critic at a time for the MLP), target critics as parameters averaged by Polyak. Same batch, same initial weights,
same random draws: losses, gradients, updated weights, targets and alpha agree to float32 tolerance.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

STEPS = 4  # update_idx 0..3: the actor and alpha update at 0 and 2 (policy_frequency 2), the critics every time


class Reference(torch.nn.Module):
    """A network evaluated by its `reference_forward` (modules without one are their own reference)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, *inputs):
        return getattr(self.net, "reference_forward", self.net.forward)(*inputs)


def reference_update(mod, batch, ref: dict, opts: dict, args, alpha_state: dict, update_idx: int) -> dict:
    """SAC (Haarnoja et al. 2018) written plainly: Q1 and Q2 one at a time, targets as averaged parameters."""
    actor, qf, qf_target = Reference(ref["actor"]), Reference(ref["qf"]), Reference(ref["qf_target"])
    norm = ref["obs_norm"]
    batch = batch._replace(observations=norm(batch.observations), next_observations=norm(batch.next_observations))
    with torch.no_grad():
        next_actions, next_log_pi, _ = mod.get_action(actor, batch.next_observations)
        q_next = qf_target(batch.next_observations, next_actions)
        next_q = batch.rewards + args.gamma * (torch.min(q_next[0], q_next[1]) - alpha_state["alpha"] * next_log_pi)
    q = qf(batch.observations, batch.actions)
    qf1_loss, qf2_loss = F.mse_loss(q[0], next_q), F.mse_loss(q[1], next_q)
    opts["q"].zero_grad()
    (qf1_loss + qf2_loss).backward()
    opts["q"].step()
    logs = {"losses/qf1_loss": qf1_loss, "losses/qf2_loss": qf2_loss}
    if update_idx % args.policy_frequency == 0:
        for _ in range(args.policy_frequency):
            ref["qf"].requires_grad_(False)
            pi, log_pi, _ = mod.get_action(actor, batch.observations)
            q_pi = qf(batch.observations, pi)
            actor_loss = (alpha_state["alpha"] * log_pi - torch.min(q_pi[0], q_pi[1])).mean()
            opts["actor"].zero_grad()
            actor_loss.backward()
            opts["actor"].step()
            ref["qf"].requires_grad_(True)
            alpha_loss = (-alpha_state["log_alpha"].exp() * (log_pi.detach() + alpha_state["target_entropy"])).mean()
            opts["alpha"].zero_grad()
            alpha_loss.backward()
            opts["alpha"].step()
            alpha_state["alpha"] = alpha_state["log_alpha"].exp().item()
            logs.update({"losses/actor_loss": actor_loss, "losses/alpha_loss": alpha_loss})
    with torch.no_grad():
        for target, online in zip(ref["qf_target"].parameters(), ref["qf"].parameters(), strict=True):
            target.lerp_(online, args.tau)
    return logs


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    err = (actual - expected).abs().max().item()
    bound = 1e-6 + rtol * expected.abs().max().item()
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("script,network_args", [
    ("eq", {"dihedral_n": 8, "reg_rep_n": 4}), ("eq", {"dihedral_n": 3, "reg_rep_n": 4}),
    ("eq", {"dihedral_n": 4, "reg_rep_n": 8}), ("mlp", {"hidden_sizes": (64, 64)}),
])  # fmt: skip
def test_fast_update_equals_the_reference_update(script, network_args, request):
    mod = request.getfixturevalue(script)
    args = mod.Args(env_id="FetchPush-v4", batch_size=64, **network_args)
    fields = mod.OBJECT_FIELDS + mod.GOAL_FIELDS
    torch.manual_seed(0)
    nets, opts, alpha_state = mod.build_agent(fields, args, torch.device("cpu"))
    nets["obs_norm"].update(torch.randn(500, mod.fields_dim(fields)).mul(3).add(1).numpy())  # statistics in use
    ref = {"actor": copy.deepcopy(nets["actor"]), "qf": copy.deepcopy(nets["qf"]),
           "qf_target": copy.deepcopy(nets["qf"]), "obs_norm": copy.deepcopy(nets["obs_norm"])}  # fmt: skip
    ref_alpha = {**alpha_state, "log_alpha": alpha_state["log_alpha"].detach().clone().requires_grad_(True)}
    ref_opts = {"q": torch.optim.Adam(ref["qf"].parameters(), lr=args.q_lr, fused=True),
                "actor": torch.optim.Adam(ref["actor"].parameters(), lr=args.policy_lr, fused=True),
                "alpha": torch.optim.Adam([ref_alpha["log_alpha"]], lr=args.q_lr)}  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    dim = mod.fields_dim(fields)
    for update_idx in range(STEPS):
        obs, next_obs = torch.randn(2, args.batch_size, dim, generator=generator)
        actions = torch.rand(args.batch_size, 4, generator=generator) * 2 - 1
        batch = mod.ReplayBatch(obs, next_obs, actions, -torch.rand(args.batch_size, 1, generator=generator))
        torch.manual_seed(100 + update_idx)
        logs = mod.sac_update(batch, nets, opts, args, alpha_state, update_idx, global_step=1000 + update_idx)
        torch.manual_seed(100 + update_idx)
        ref_logs = reference_update(mod, batch, ref, ref_opts, args, ref_alpha, update_idx)
        for key, value in ref_logs.items():
            assert_close(f"{key} at update {update_idx}", logs[key], value)
    for name in ("actor", "qf"):
        fast_params = dict(nets[name].named_parameters())
        for key, p in ref[name].named_parameters():
            assert_close(f"{name}.{key}.grad", fast_params[key].grad, p.grad)
            assert_close(f"{name}.{key}", fast_params[key], p)
    x, a = torch.randn(32, dim), torch.rand(32, 4) * 2 - 1
    with torch.no_grad():
        assert_close("target Q", nets["qf_target"](x, a), Reference(ref["qf_target"])(x, a))
    assert alpha_state["alpha"] == pytest.approx(ref_alpha["alpha"], rel=1e-5)


def test_passes_without_gradients_reuse_the_weights_until_a_step_or_a_load(eq):
    """The equivariant networks cache their fast-path weights for passes that build no graph: reused while the
    parameters are unchanged, recomputed after an optimizer step (fused Adam bumps no version counter), after
    `load_state_dict` and after an in-place change."""
    args = eq.Args(env_id="FetchPush-v4", dihedral_n=4, reg_rep_n=4)
    fields = eq.OBJECT_FIELDS + eq.GOAL_FIELDS
    torch.manual_seed(0)
    nets, opts, _ = eq.build_agent(fields, args, torch.device("cpu"))
    actor, qf = nets["actor"], nets["qf"]
    x, a = torch.randn(16, eq.fields_dim(fields)), torch.rand(16, 4) * 2 - 1
    critic, policy_mean = (lambda: qf(x, a)), (lambda: actor(x)[0])
    with torch.no_grad():
        cached = qf.dense_weights()
        assert qf.dense_weights() is cached
    for net, opt, output, reference in (
        (qf, opts["q"], critic, lambda: qf.reference_forward(x, a)),
        (actor, opts["actor"], policy_mean, lambda: actor.reference_forward(x)[0]),
    ):
        with torch.no_grad():
            before = output()
        opt.zero_grad()
        output().pow(2).sum().backward()
        opt.step()
        with torch.no_grad():
            assert_close(f"{type(net).__name__} after an optimizer step", output(), reference())
            assert (output() - before).abs().max() > 1e-6  # the step changed the function, and the cache followed
    other = eq.SoftQNetworks(fields, args)
    qf.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert_close("after load_state_dict", qf(x, a), other.reference_forward(x, a))
        torch.nn.init.normal_(qf.qf1[0].weights, std=0.5)
        assert_close("after an in-place change", qf(x, a), qf.reference_forward(x, a))


@pytest.mark.parametrize("script,network_args", [("eq", {"dihedral_n": 8, "reg_rep_n": 4}),
                                                 ("mlp", {"hidden_sizes": (64, 64)})])  # fmt: skip
def test_bf16_runs_the_products_in_bfloat16_and_keeps_float32_state(script, network_args, request):
    """--bf16: the update's matrix products run in bfloat16, every weight, target, optimizer state and loss stays
    float32, and the losses stay within bfloat16 rounding of the float32 update on the same batches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm,
                                        torch.ops.aten.baddbmm):  # fmt: skip
                self.dtypes.add(args[-1].dtype)
            return func(*args, **(kwargs or {}))

    mod = request.getfixturevalue(script)
    fields = mod.OBJECT_FIELDS + mod.GOAL_FIELDS
    logs = {False: {}, True: {}}
    for bf16 in (False, True):
        args = mod.Args(env_id="FetchPush-v4", batch_size=64, bf16=bf16, **network_args)
        torch.manual_seed(0)
        nets, opts, alpha_state = mod.build_agent(fields, args, torch.device("cpu"))
        generator = torch.Generator().manual_seed(1)
        with MatmulDtypes() as seen:
            for update_idx in range(STEPS):
                obs, next_obs = torch.randn(2, 64, mod.fields_dim(fields), generator=generator)
                batch = mod.ReplayBatch(obs, next_obs, torch.rand(64, 4, generator=generator) * 2 - 1,
                                        -torch.rand(64, 1, generator=generator))  # fmt: skip
                torch.manual_seed(100 + update_idx)
                logs[bf16].update(mod.sac_update(batch, nets, opts, args, alpha_state, update_idx, 1000 + update_idx))
        assert torch.bfloat16 in seen.dtypes if bf16 else seen.dtypes == {torch.float32}
        for name, net in nets.items():  # (the observation normaliser's statistics are float64 sums)
            assert {t.dtype for t in net.state_dict().values() if t.is_floating_point()} == {
                torch.float32
            } or name == "obs_norm"
        for name, opt in opts.items():
            assert {t.dtype for s in opt.state.values() for t in s.values() if t.dim() > 0} <= {torch.float32}, name
    for key in ("losses/qf1_loss", "losses/qf2_loss", "losses/actor_loss"):
        assert logs[True][key].dtype == torch.float32
        assert_close(key, logs[True][key], logs[False][key], rtol=0.05)


def test_target_critics_saved_in_the_earlier_layout_load_as_the_same_function(eq):
    """Checkpoints up to commit 3e0b149 hold the target critics as 7 tensors: each network's first-layer weights and
    bias apart, stacked with the ensemble dimension after the group dimension (W1, b1) or the irrep dimension (M1,
    c1, M2). A checkpoint of that layout loads into today's `TargetQNetworks` as the same critics, so that a run
    checkpointed by that code resumes."""
    args = eq.Args(env_id="FetchPush-v4", dihedral_n=8, reg_rep_n=3)
    fields = eq.OBJECT_FIELDS + eq.GOAL_FIELDS
    torch.manual_seed(0)
    qf = eq.build_agent(fields, args, torch.device("cpu"))[0]["qf"]
    with torch.no_grad():
        per_network = [[w[0][..., :-1], w[0][..., -1:], *w[1:]] for w in (qf.weights1(), qf.weights2())]
        layers = zip(*per_network, strict=True)
        earlier = [torch.stack(w, dim) for w, dim in zip(layers, (1, 1, 1, 1, 1, 0, 0), strict=True)]
    torch.manual_seed(1)
    target = eq.build_agent(fields, args, torch.device("cpu"))[0]["qf_target"]
    x, a = torch.randn(32, eq.fields_dim(fields)), torch.rand(32, 4) * 2 - 1
    with torch.no_grad():
        assert (target(x, a) - qf.reference_forward(x, a)).abs().max() > 1e-3  # another agent's critics at first
        target.load_state_dict({f"weight{i}": w for i, w in enumerate(earlier)})
        assert_close("target Q from the earlier layout", target(x, a), qf.reference_forward(x, a))
