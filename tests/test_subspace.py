"""χ_k and the projections onto / out of a subspace with orthonormal rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lossland.subspace import project_onto, project_out, subspace_fraction

DTYPES = ["float64", "float32"]


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def orthonormal_rows(k, P, dtype, seed=0):
    Q = np.linalg.qr(np.random.default_rng(seed).normal(size=(P, k)))[0]
    return jnp.asarray(Q.T, dtype)


def tol_for(dtype):
    return 1e-12 if jnp.dtype(dtype) == jnp.float64 else 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_fraction_in_unit_interval_and_matches_definition(dtype):
    P, k = 50, 4
    V = orthonormal_rows(k, P, dtype)
    rng = np.random.default_rng(1)
    for _ in range(5):
        g = jnp.asarray(rng.normal(size=P), dtype)
        chi = float(subspace_fraction(g, V))
        assert 0.0 <= chi <= 1.0
        Vn, gn = np.asarray(V, np.float64), np.asarray(g, np.float64)
        expected = np.sum((Vn @ gn) ** 2) / np.sum(gn ** 2)
        assert abs(chi - expected) <= tol_for(dtype)
    # A random g in P = 50 dimensions has χ near k/P, well away from 0 and 1.
    assert 0.0 < chi < 0.6


@pytest.mark.parametrize("dtype", DTYPES)
def test_fraction_one_inside_span_zero_orthogonal_and_zero_gradient(dtype):
    P, k = 40, 3
    V = orthonormal_rows(k, P, dtype)
    g_in = jnp.asarray([1.5, -2.0, 0.25], dtype) @ V
    assert abs(float(subspace_fraction(g_in, V)) - 1.0) <= tol_for(dtype)
    g_out = project_out(jnp.asarray(np.random.default_rng(2).normal(size=P), dtype), V)
    assert abs(float(subspace_fraction(g_out, V))) <= tol_for(dtype)
    chi0 = subspace_fraction(jnp.zeros(P, dtype), V)
    assert float(chi0) == 0.0 and np.isfinite(float(chi0))
    # Its gradient at a nonzero g is finite too (usable inside a jitted, differentiated step).
    assert np.all(np.isfinite(np.asarray(jax.grad(subspace_fraction)(g_in, V))))


@pytest.mark.parametrize("dtype", DTYPES)
def test_projections_idempotent_and_complementary(dtype):
    P, k = 60, 5
    V = orthonormal_rows(k, P, dtype)
    g = jnp.asarray(np.random.default_rng(3).normal(size=P), dtype)
    top, bulk = project_onto(g, V), project_out(g, V)
    tol = tol_for(dtype) * 10
    np.testing.assert_allclose(top + bulk, g, atol=tol)                       # complementary
    np.testing.assert_allclose(project_onto(top, V), top, atol=tol)           # idempotent
    np.testing.assert_allclose(project_out(bulk, V), bulk, atol=tol)
    np.testing.assert_allclose(project_onto(bulk, V), 0.0, atol=tol)          # orthogonal parts
    np.testing.assert_allclose(project_out(top, V), 0.0, atol=tol)
    assert abs(float(jnp.vdot(top, bulk))) <= tol * float(jnp.vdot(g, g))
    # χ is the share of ‖g‖² in the projection.
    chi = float(subspace_fraction(g, V))
    assert abs(chi - float(jnp.vdot(top, top) / jnp.vdot(g, g))) <= tol
    assert top.dtype == bulk.dtype == jnp.dtype(dtype)


def test_single_vector_pytrees_and_jit():
    P = 12
    V = orthonormal_rows(2, P, jnp.float64)
    g = jnp.asarray(np.random.default_rng(4).normal(size=P))
    # A (P,) vector is one row.
    np.testing.assert_allclose(project_onto(g, V[0]), jnp.vdot(V[0], g) * V[0], atol=1e-12)
    # Pytrees are flattened (ravel_pytree order) and returned as pytrees.
    tree = {"a": g[:5], "b": g[5:].reshape(7, 1)}
    top = project_onto(tree, V)
    assert set(top) == {"a", "b"} and top["b"].shape == (7, 1)
    np.testing.assert_allclose(jnp.concatenate([top["a"], top["b"].ravel()]),
                               project_onto(g, V), atol=1e-12)
    assert abs(float(subspace_fraction(tree, V)) - float(subspace_fraction(g, V))) <= 1e-12
    # Jitted forms agree with eager ones.
    np.testing.assert_allclose(jax.jit(project_out)(g, V), project_out(g, V), atol=1e-12)
    with pytest.raises(ValueError):
        subspace_fraction(g, jnp.zeros((2, P + 1)))
