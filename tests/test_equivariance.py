"""D_N equivariance of the actor, the squashed policy distribution and the critic, for every group element.

Group actions are built here from the physics (rotation R(theta) about z, mirror y -> -y), independently of escnn, and
checked against escnn's representations, so the networks' field types and the wrapper's conventions must agree.
Tolerance (escnn's own tests, float32): max |error| <= 1e-6 + 1e-5 * max |output|.
"""

import math

import numpy as np
import pytest
import torch

N_VALUES = (2, 3, 4, 5, 8, 16)  # odd N: D_N without the rotation by pi


def kind_matrix(kind: str, flip: int, theta: float) -> np.ndarray:
    """How a group element (flip, theta) acts on one field: escnn's convention psi = R(theta) @ diag(1, -1)^flip."""
    if kind == "vector":
        c, s = math.cos(theta), math.sin(theta)
        return np.array([[c, -s], [s, c]]) @ np.diag([1.0, (-1.0) ** flip])
    if kind == "scalar":
        return np.eye(1)
    return np.array([[(-1.0) ** flip]])  # pseudoscalar


def action_matrix(fields, flip: int, theta: float, dtype=torch.float32) -> torch.Tensor:
    """Block-diagonal matrix of the group element on a field list."""
    blocks = [kind_matrix(kind, flip, theta) for _, kind in fields]
    size = sum(b.shape[0] for b in blocks)
    out, i = np.zeros((size, size)), 0
    for b in blocks:
        out[i : i + b.shape[0], i : i + b.shape[0]] = b
        i += b.shape[0]
    return torch.tensor(out, dtype=dtype)


def elements(n: int):
    """All 2N elements of D_N as (flip, theta)."""
    return [(flip, 2 * math.pi * k / n) for flip in (0, 1) for k in range(n)]


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    err = (actual - expected).abs().max().item()
    bound = 1e-6 + 1e-5 * expected.abs().max().item()
    assert err <= bound, f"max error {err:.3g} > {bound:.3g}"


def small_args(eq, n: int):
    return eq.Args(dihedral_n=n, reg_rep_n=4)


@pytest.fixture(scope="module")
def obs_fields(eq):
    return eq.OBJECT_FIELDS + eq.GOAL_FIELDS


@pytest.mark.parametrize("n", (1, 2, 3, 4, 8, 16))
def test_escnn_field_types_match_the_physical_group_action(eq, obs_fields, n):
    from escnn import gspaces
    from escnn.group import dihedral_group

    gspace = gspaces.no_base_space(dihedral_group(n))
    fields = obs_fields + eq.ACTION_FIELDS
    ftype = eq.field_type(gspace, fields)
    for g in gspace.fibergroup.elements:
        flip, theta = g.to("radians")
        np.testing.assert_allclose(ftype.representation(g), action_matrix(fields, flip, theta).numpy(), atol=1e-6)


@pytest.mark.parametrize("path", ("forward", "reference_forward"))  # the fast path and escnn's own layers
@pytest.mark.parametrize("n", N_VALUES)
def test_actor_mean_and_log_std_are_equivariant_for_every_element_of_dn(eq, obs_fields, n, path):
    torch.manual_seed(n)
    actor = getattr(eq.Actor(obs_fields, small_args(eq, n)), path)
    x = torch.randn(16, eq.fields_dim(obs_fields))
    with torch.no_grad():
        mean, log_std = actor(x)
        assert torch.equal(log_std[:, 0], log_std[:, 1])  # sigma_x = sigma_y
        for flip, theta in elements(n):
            g_mean, g_log_std = actor(x @ action_matrix(obs_fields, flip, theta).T)
            assert_close(g_mean, mean @ action_matrix(eq.ACTION_FIELDS, flip, theta).T)
            assert_close(g_log_std, log_std)


@pytest.mark.parametrize("n", N_VALUES)
def test_squashed_policy_gives_g_a_the_same_log_prob_under_g_s(eq, obs_fields, n):
    """pi(g a | g s) = pi(a | s): the sample drawn with rotated noise is the rotated action, with the same log-prob."""
    torch.manual_seed(n)
    actor = eq.Actor(obs_fields, small_args(eq, n))
    x = torch.randn(16, eq.fields_dim(obs_fields))
    noise = 3.0 * torch.randn(16, 4)  # large noise: the squash is far from linear
    with torch.no_grad():
        action, log_prob, deterministic = eq.get_action(actor, x, noise)
        for flip, theta in elements(n):
            g_act = action_matrix(eq.ACTION_FIELDS, flip, theta)
            g_action, g_log_prob, g_det = eq.get_action(
                actor, x @ action_matrix(obs_fields, flip, theta).T, noise @ g_act.T
            )
            assert_close(g_action, action @ g_act.T)
            assert_close(g_det, deterministic @ g_act.T)
            assert_close(g_log_prob, log_prob)


@pytest.mark.parametrize("path", ("forward", "reference_forward", "target"))  # fast, escnn, target critics
@pytest.mark.parametrize("n", N_VALUES)
def test_critic_is_invariant_for_every_element_of_dn(eq, obs_fields, n, path):
    torch.manual_seed(n)
    critics = eq.SoftQNetworks(obs_fields, small_args(eq, n))
    qf = eq.TargetQNetworks(critics) if path == "target" else getattr(critics, path)
    x, a = torch.randn(16, eq.fields_dim(obs_fields)), torch.randn(16, 4)
    with torch.no_grad():
        q = qf(x, a)
        assert q.shape == (2, 16, 1)
        for flip, theta in elements(n):
            g_q = qf(x @ action_matrix(obs_fields, flip, theta).T, a @ action_matrix(eq.ACTION_FIELDS, flip, theta).T)
            assert_close(g_q, q)


def test_the_check_detects_a_non_equivariant_network(mlp, obs_fields):
    """The same check fails for the MLP twin's critic (so the tests above can fail)."""
    torch.manual_seed(0)
    qf = mlp.SoftQNetworks(obs_fields, mlp.Args(hidden_sizes=(64, 64)))
    x, a = torch.randn(16, mlp.fields_dim(obs_fields)), torch.randn(16, 4)
    with torch.no_grad():
        g_q = qf(x @ action_matrix(obs_fields, 1, 0.0).T, a @ action_matrix(mlp.ACTION_FIELDS, 1, 0.0).T)
        with pytest.raises(AssertionError):
            assert_close(g_q, qf(x, a))


def test_elementwise_tanh_squash_would_break_d8_equivariance(eq):
    """Why the squash is radial: a box (elementwise tanh) commutes with D_4 but not with a rotation by pi/4."""
    u = torch.tensor([[2.0, 0.5, 0.0, 0.0]])
    g = action_matrix(eq.ACTION_FIELDS, 0, math.pi / 4)
    assert (torch.tanh(u @ g.T) - torch.tanh(u) @ g.T).abs().max() > 0.1
    assert_close(eq.squash(u @ g.T), eq.squash(u) @ g.T)


@pytest.mark.parametrize("n", (1, 2, 3, 4, 5, 8, 16))
def test_fast_path_equals_escnn_on_the_same_parameters(eq, obs_fields, n):
    """The Fourier-block fast path computes escnn's networks: same outputs and same parameter gradients."""
    torch.manual_seed(n)
    args = eq.Args(dihedral_n=n, reg_rep_n=3)
    actor, qf = eq.Actor(obs_fields, args), eq.SoftQNetworks(obs_fields, args)
    params = list(actor.parameters()) + list(qf.parameters())
    for p in params:  # escnn initialises biases to zero: random values test their expansion too
        torch.nn.init.normal_(p, std=0.5)
    x, a = torch.randn(32, eq.fields_dim(obs_fields)), torch.randn(32, 4)
    outputs = {}
    for path in ("forward", "reference_forward"):
        mean, log_std = getattr(actor, path)(x)
        q = getattr(qf, path)(x, a)
        grads = torch.autograd.grad((mean.sin().sum() + log_std.sum() + q.pow(2).sum()), params)
        outputs[path] = (mean, log_std, q, *grads)
    for fast, reference in zip(outputs["forward"], outputs["reference_forward"], strict=True):
        assert_close(fast, reference)


def test_target_networks_follow_polyak_averaging_of_the_parameters(eq, obs_fields):
    """Averaging the dense weights (what the targets hold) equals expanding the averaged parameters, and the
    critics' state_dict holds escnn's parameters only."""
    torch.manual_seed(0)
    args = small_args(eq, 8)
    source, averaged = eq.SoftQNetworks(obs_fields, args), eq.SoftQNetworks(obs_fields, args)
    target = eq.TargetQNetworks(averaged)
    x, a = torch.randn(8, eq.fields_dim(obs_fields)), torch.randn(8, 4)
    target.update(source, tau=0.3)
    with torch.no_grad():
        for p_avg, p_src in zip(averaged.parameters(), source.parameters(), strict=True):
            p_avg.lerp_(p_src, 0.3)
        assert_close(target(x, a), averaged(x, a))
        target.update(source, tau=1.0)
        assert_close(target(x, a), source(x, a))
    assert {key.split(".")[0] for key in source.state_dict()} == {"qf1", "qf2"}  # escnn parameters only


def skewed_statistics(norm, dim: int, seed: int = 0) -> None:
    """Fill an ObservationNormalizer with data far from symmetric: nonzero means, unequal spreads, the observation
    and the goal columns from different, weighted rows (as the training loop feeds them)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(1000, dim, generator=g) * torch.linspace(0.05, 3.0, dim) + torch.linspace(-2.0, 4.0, dim)
    norm.update(rows[:, :-3].numpy())
    norm.update(rows[:300, -3:].numpy(), weights=torch.rand(300, generator=g).numpy(), start=dim - 3)


@pytest.mark.parametrize("n", N_VALUES)
def test_observation_normalizer_commutes_with_every_element_of_dn(eq, obs_fields, n):
    """Whatever the statistics, the normaliser's form (no shift for vectors and pseudoscalars, one scale per vector,
    radial clip) commutes with D_N, clipping included (inputs up to 30 standard deviations)."""
    norm = eq.ObservationNormalizer(obs_fields)
    dim = eq.fields_dim(obs_fields)
    skewed_statistics(norm, dim)
    x = torch.randn(64, dim, generator=torch.Generator().manual_seed(n)) * 10.0
    assert (norm(x).abs() == norm.clip).any()  # the clip is exercised
    for flip, theta in elements(n):
        g = action_matrix(obs_fields, flip, theta)
        assert_close(norm(x @ g.T), norm(x) @ g.T)


@pytest.mark.parametrize("n", (3, 8))
def test_actor_on_normalised_inputs_is_equivariant(eq, obs_fields, n):
    torch.manual_seed(n)
    actor, norm = eq.Actor(obs_fields, small_args(eq, n)), eq.ObservationNormalizer(obs_fields)
    skewed_statistics(norm, eq.fields_dim(obs_fields), seed=n)
    x = torch.randn(16, eq.fields_dim(obs_fields)) * 3.0
    with torch.no_grad():
        mean, _ = actor(norm(x))
        for flip, theta in elements(n):
            g_mean, _ = actor(norm(x @ action_matrix(obs_fields, flip, theta).T))
            assert_close(g_mean, mean @ action_matrix(eq.ACTION_FIELDS, flip, theta).T)


def test_the_mlps_per_coordinate_normalizer_would_break_the_symmetry(mlp, obs_fields):
    """The check above can fail: the MLP twin's per-coordinate mean/std (HER baselines' normaliser, right for an MLP)
    does not commute with a rotation, which is why the equivariant twin never offers it."""
    norm = mlp.ObservationNormalizer(obs_fields, form="coordinate")
    dim = mlp.fields_dim(obs_fields)
    skewed_statistics(norm, dim)
    x, g = torch.randn(8, dim), action_matrix(obs_fields, 0, math.pi / 2)
    assert (norm(x @ g.T) - norm(x) @ g.T).abs().max() > 0.1
