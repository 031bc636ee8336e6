"""The symmetric observation normaliser of both twins: statistics as numpy computes them, exact checkpoint round
trip, frozen during evaluation, off with --no-obs-norm. Its D_N equivariance is tested in test_equivariance.py."""

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


def test_statistics_and_output_match_numpy_on_known_data(script):
    fields = script.OBJECT_FIELDS + script.GOAL_FIELDS
    norm, rows = script.ObservationNormalizer(fields), known_rows(script)
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
    assert norm.count.item() == len(rows) and norm.scale.min().item() == pytest.approx(0.01)  # eps floors a scale

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
    assert torch.equal(norm(x), x) and norm.count.item() == 0
