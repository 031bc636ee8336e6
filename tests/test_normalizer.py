"""The observation normalisers: the symmetric form (both twins; the MLP's ablation) and the MLP's per-coordinate form
(its default) against numpy on known and on collected data, weighted and per-column statistics, the HER goal
distribution they are fed, exact checkpoint round trip, frozen during evaluation, off with --no-obs-norm. The
symmetric form's D_N equivariance is tested in test_equivariance.py."""

import io

import numpy as np
import pytest
import torch


@pytest.fixture(params=["eq", "mlp"])
def script(request):
    return request.getfixturevalue(request.param)


def known_rows(mod, n: int = 700, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dim = mod.fields_dim(mod.OBJECT_FIELDS + mod.GOAL_FIELDS)
    rows = rng.normal(rng.uniform(-1, 2, dim), rng.uniform(0.05, 2.0, dim), size=(n, dim))
    rows[:, 2] = 0.3  # grip_pos_z, a scalar, constant: its scale is the floor eps
    return rows


def symmetric(script, fields, **kwargs):
    return script.ObservationNormalizer(fields, form="symmetric", **kwargs)


def test_symmetric_statistics_and_output_match_numpy_on_known_data(script):
    fields = script.OBJECT_FIELDS + script.GOAL_FIELDS
    norm, rows = symmetric(script, fields), known_rows(script)
    for chunk in np.array_split(rows, 7):  # streamed in uneven chunks, as the training loop adds vector steps
        norm.update(chunk)
    dim = script.fields_dim(fields)
    shift, scale, i = np.zeros(dim), np.ones(dim), 0
    for _, kind in fields:
        if kind == "scalar":  # mean and (population) standard deviation
            shift[i], scale[i] = rows[:, i].mean(), rows[:, i].std()
        elif kind == "pseudoscalar":  # scale only: sqrt(E[x^2])
            scale[i] = np.sqrt(np.mean(rows[:, i] ** 2))
        else:  # planar vector: no shift, one isotropic scale sqrt(E[x^2 + y^2] / 2)
            scale[i : i + 2] = np.sqrt(np.mean(rows[:, i] ** 2 + rows[:, i + 1] ** 2) / 2)
        i += script.KIND_SIZE[kind]
    scale = np.maximum(scale, 0.01)
    np.testing.assert_allclose(norm.shift.numpy(), shift, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm.scale.numpy(), scale, rtol=1e-5, atol=1e-6)
    assert (norm.count == len(rows)).all() and norm.scale.min().item() == pytest.approx(0.01)  # eps floors a scale

    x = known_rows(script, n=50, seed=1) * 4.0
    expected = (x - shift) / scale
    clipped = np.clip(expected, -5.0, 5.0)
    i = 0
    for _, kind in fields:
        if kind == "vector":
            v = expected[:, i : i + 2]
            clipped[:, i : i + 2] = v * np.minimum(1.0, 5.0 / np.linalg.norm(v, axis=1, keepdims=True))
        i += script.KIND_SIZE[kind]
    np.testing.assert_allclose(norm(torch.tensor(x, dtype=torch.float32)).numpy(), clipped, rtol=1e-5, atol=1e-5)


def test_statistics_round_trip_through_a_checkpoint_exactly(script):
    fields = script.OBJECT_FIELDS + script.GOAL_FIELDS
    norm = script.ObservationNormalizer(fields)
    norm.update(known_rows(script))
    buffer = io.BytesIO()
    torch.save({"obs_norm": norm.state_dict()}, buffer)
    buffer.seek(0)
    restored = script.ObservationNormalizer(fields)
    restored.load_state_dict(torch.load(buffer, weights_only=True)["obs_norm"])
    assert set(norm.state_dict()) == {"count", "sum", "sum_sq"}  # derived tensors are rebuilt, not saved
    for name in ("count", "sum", "sum_sq", "shift", "scale"):
        assert torch.equal(getattr(restored, name), getattr(norm, name)), name
    x = torch.tensor(known_rows(script, n=20, seed=2), dtype=torch.float32)
    assert torch.equal(restored(x), norm(x))


def test_evaluation_leaves_the_statistics_frozen(script):
    import gymnasium as gym

    envs = script.make_vector_env("FetchPush-v4", 2, "sync")
    fields = envs.get_attr("fields")[0]
    args = script.Args(env_id="FetchPush-v4", **({"reg_rep_n": 2} if hasattr(script.Args, "reg_rep_n") else
                                                   {"hidden_sizes": (16,)}))  # fmt: skip
    actor, norm = script.Actor(fields, args), script.ObservationNormalizer(fields)
    norm.update(known_rows(script))
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    first = script.evaluate(actor, norm, envs, seed=3, device="cpu")
    assert all(torch.equal(before[k], v) for k, v in norm.state_dict().items())
    assert script.evaluate(actor, norm, envs, seed=3, device="cpu") == first
    envs.close()
    assert isinstance(envs, gym.vector.VectorEnv)


def test_disabled_normalizer_is_the_identity_and_collects_nothing(script):
    fields = script.OBJECT_FIELDS + script.GOAL_FIELDS
    norm = script.ObservationNormalizer(fields, enabled=False)
    norm.update(known_rows(script))
    x = torch.tensor(known_rows(script, n=10, seed=3) * 10, dtype=torch.float32)
    assert torch.equal(norm(x), x) and (norm.count == 0).all()


def test_the_equivariant_twin_offers_only_the_symmetric_form(eq):
    with pytest.raises(ValueError, match="must be one of \\('symmetric',\\), got 'coordinate'"):
        eq.ObservationNormalizer(eq.OBJECT_FIELDS + eq.GOAL_FIELDS, form="coordinate")
    args = eq.Args()
    assert eq.observation_normalizer(eq.OBJECT_FIELDS + eq.GOAL_FIELDS, args).form == "symmetric"


def test_the_mlp_defaults_to_the_selected_symmetric_form_and_keeps_the_per_coordinate_one_selectable(mlp):
    fields = mlp.OBJECT_FIELDS + mlp.GOAL_FIELDS
    assert mlp.observation_normalizer(fields, mlp.Args()).form == "symmetric"
    assert mlp.observation_normalizer(fields, mlp.Args(obs_norm_form="coordinate")).form == "coordinate"


def collect_push_observations(mod, steps: int = 1000) -> np.ndarray:
    """Observations of FetchPush-v4 (robot-base frame) under random actions, resets included: (n, obs_dim)."""
    envs = mod.make_vector_env("FetchPush-v4", 1, "sync")
    rng = np.random.default_rng(0)
    obs, _ = envs.reset(seed=0)
    rows = [obs["observation"]]
    for _ in range(steps):
        obs, _, _, truncations, _ = envs.step(mod.random_actions(1, rng))
        rows.append(obs["observation"])
        if truncations.all():
            obs, _ = envs.reset()
            rows.append(obs["observation"])
    envs.close()
    return np.concatenate(rows).astype(np.float64)


def test_per_coordinate_form_gives_mean_0_and_std_1_per_coordinate_on_collected_push_data(mlp):
    """HER baselines' normaliser: every coordinate whose spread exceeds eps comes out with mean 0 and std 1, the
    planar x coordinates included (the symmetric form leaves grip_pos_x at mean ~1.4: it never centres a vector)."""
    fields = mlp.OBJECT_FIELDS + mlp.GOAL_FIELDS
    rows = collect_push_observations(mlp)
    obs_dim = rows.shape[1]
    norm = mlp.ObservationNormalizer(fields)
    for chunk in np.array_split(rows, 9):
        norm.update(chunk)
    np.testing.assert_allclose(norm.shift[:obs_dim].numpy(), rows.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm.scale[:obs_dim].numpy(), np.maximum(rows.std(0), 0.01), rtol=1e-5, atol=1e-6)
    assert (norm.count[:obs_dim] == len(rows)).all() and (norm.count[obs_dim:] == 0).all()
    x = torch.tensor(np.concatenate([rows, np.zeros((len(rows), 3))], 1), dtype=torch.float32)
    y = ((x - norm.shift) / norm.scale)[:, :obs_dim].double().numpy()  # before the clip
    spread = rows.std(0) > 0.01
    assert spread.sum() >= 20  # most of Push's 31 coordinates move under random actions
    np.testing.assert_allclose(y[:, spread].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(y[:, spread].std(0), 1.0, rtol=1e-4)
    assert norm(x)[:, obs_dim:].eq(0).all()  # goal columns without rows yet: shift 0, scale 1
    sym = symmetric(mlp, fields)
    sym.update(rows)
    assert abs(((x - sym.shift) / sym.scale)[:, 0].mean().item()) > 1.0  # grip_pos_x: not centred by the vector form


def test_weighted_rows_count_as_their_weight_and_fill_only_their_columns(script):
    fields = script.OBJECT_FIELDS + script.GOAL_FIELDS
    dim = script.fields_dim(fields)
    goals = np.array([[1.0, 2.0, 3.0], [3.0, 6.0, 5.0]])
    weighted, repeated = symmetric(script, fields), symmetric(script, fields)
    weighted.update(goals, weights=np.array([1.0, 3.0]), start=dim - 3)
    repeated.update(goals[[0, 1, 1, 1]], start=dim - 3)
    for name in ("count", "sum", "sum_sq", "shift", "scale"):
        assert torch.allclose(getattr(weighted, name), getattr(repeated, name)), name
    assert weighted.count.tolist() == [0.0] * (dim - 3) + [4.0] * 3
    assert weighted.shift[-1].item() == pytest.approx(4.5)  # goal z, a scalar: (3 + 3 * 5) / 4
    with pytest.raises(ValueError, match="do not fit"):
        weighted.update(goals, start=dim - 2)


def test_goal_distribution_is_hers_sampling_distribution(script):
    """The weights the normaliser gets for an episode's goals are the expected counts of HER 'future' sampling:
    checked against the buffer's own sampler over 400k draws."""
    T, her_k = 5, 4
    rb = script.HerReplayBuffer(2, 3, 4, T, 10 * T, 1, her_k, None, "cpu", 0)
    rb.storage["g"][0] = np.arange(T)[:, None] + 100.0  # goal ids: desired 100 + t, achieved t'
    rb.storage["ag"][0] = np.arange(T + 1)[:, None]
    rb.num_episodes = 1
    goals, weights = rb.goal_distribution(0)
    assert goals.shape == (2 * T, 3) and weights.sum() == pytest.approx(T)
    np.testing.assert_allclose(weights[:T], 1 / (her_k + 1))
    np.testing.assert_allclose(weights[T:], her_k / (her_k + 1) * np.cumsum(1 / (T - np.arange(T))))
    _, t, goal_t = rb.sample_indices(400_000)
    drawn = np.where(goal_t >= 0, goal_t, 100 + t)
    frequency = {g: np.mean(drawn == g) * T for g in goals[:, 0]}
    np.testing.assert_allclose([frequency[g] for g in goals[:, 0]], weights, atol=0.01)
