"""The radial squash and its log-determinant, against autograd's Jacobian (both twins share this code)."""

import math

import pytest
import torch


@pytest.mark.parametrize("script", ["eq", "mlp"])
def test_squash_log_det_equals_the_log_abs_det_of_the_jacobian(script, request):
    m = request.getfixturevalue(script)
    torch.manual_seed(0)
    points = torch.cat([3 * torch.randn(20, 4), torch.tensor([[1e-7, -2e-7, 0.3, -0.2], [0.0, 0.0, 0.0, 0.0]])])
    for u in points.double():
        jacobian = torch.autograd.functional.jacobian(lambda v: m.squash(v[None])[0], u)
        expected = torch.linalg.slogdet(jacobian).logabsdet
        assert abs(m.squash_log_det(u[None])[0].item() - expected.item()) < 1e-6


@pytest.mark.parametrize("script", ["eq", "mlp"])
def test_actions_lie_in_the_unit_disk_times_the_box(script, request):
    m = request.getfixturevalue(script)
    u = 10 * torch.randn(1000, 4)
    a = m.squash(u)
    assert (a[:, :2].norm(dim=1) < 1 + 1e-6).all() and (a[:, 2:].abs() <= 1).all()
    # the direction of (dx, dy) is kept: the squash is radial
    cos = (a[:, :2] * u[:, :2]).sum(1) / (a[:, :2].norm(dim=1) * u[:, :2].norm(dim=1))
    assert (cos > 1 - 1e-5).all()


def test_log_prob_matches_the_change_of_variables_density(eq):
    """get_action's log-prob equals the Gaussian density of the pre-squash sample minus log |det J|."""
    torch.manual_seed(1)
    fields = eq.REACH_FIELDS + eq.GOAL_FIELDS
    actor = eq.Actor(fields, eq.Args(dihedral_n=4, reg_rep_n=2))
    x, noise = torch.randn(32, eq.fields_dim(fields)), torch.randn(32, 4)
    with torch.no_grad():
        _, log_prob, _ = eq.get_action(actor, x, noise)
        mean, log_std = actor(x)
        log_std = eq.LOG_STD_MIN + 0.5 * (eq.LOG_STD_MAX - eq.LOG_STD_MIN) * (torch.tanh(log_std) + 1)
        u = mean + log_std.exp() * noise
        gaussian = torch.distributions.Normal(mean, log_std.exp()).log_prob(u).sum(1)
        torch.testing.assert_close(log_prob.squeeze(1), gaussian - eq.squash_log_det(u))
    assert math.isfinite(log_prob.sum().item())


def test_random_warmup_actions_are_uniform_on_the_policy_action_set(eq):
    import numpy as np

    a = eq.random_actions(20000, np.random.default_rng(0))
    radius = np.linalg.norm(a[:, :2], axis=1)
    assert radius.max() <= 1.0
    assert abs(np.mean(radius < 0.5) - 0.25) < 0.02  # uniform on the disk: P(r < 1/2) = 1/4
    assert abs(np.mean(a[:, 1] > 0) - 0.5) < 0.02  # mirror-symmetric
