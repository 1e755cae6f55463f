"""Block products and the block eigensolver against dense oracles (issue 13).

`full_batch_block_hvp` must equal b single HVPs and the dense `jax.hessian`
product, chunked or not; `block_top_k` must match `jnp.linalg.eigh` on the
tiny oracle networks of test_curvature, in float64 and float32, including
indefinite spectra whose negative end is larger in magnitude than the top.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from lossland import objective
from lossland.curvature import block_hvp, block_top_k
from test_curvature import PROBLEMS, get_problem


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _objective(problem, chunk_size):
    data = objective.chunk_data(np.asarray(problem.x), np.asarray(problem.y), chunk_size,
                                dtype=problem.dtype)
    return objective.Objective(problem.model.apply, problem.per_example, data)


def _flat_block(obj, params):
    return jax.jit(objective.flat_block_matvec(obj.block_hvp_fn, params, obj.data))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("problem_key", PROBLEMS, ids=["-".join(p) for p in PROBLEMS])
def test_block_hvp_equals_single_hvps_and_dense_hessian(problem_key, dtype):
    problem = get_problem(*problem_key, dtype)
    H = problem.dense_hessian()
    V = np.random.default_rng(1).normal(size=(5, problem.P))
    want = V @ H.T
    rtol = 1e-10 if dtype == "float64" else 2e-4
    for chunk_size in (1000, 5):          # one chunk, and 5 chunks with padding (N = 23)
        obj = _objective(problem, chunk_size)
        got = np.asarray(_flat_block(obj, problem.params)(jnp.asarray(V, problem.dtype)))
        singles = np.stack([ravel_pytree(obj.hvp(problem.params, problem.unravel(
            jnp.asarray(v, problem.dtype))))[0] for v in V])
        scale = np.max(np.abs(want))
        assert np.max(np.abs(got - want)) <= rtol * scale, chunk_size
        assert np.max(np.abs(got - singles)) <= rtol * scale, chunk_size


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("loss_name", ["mse", "cross_entropy"])
def test_block_gnvp_equals_single_gnvps(loss_name, dtype):
    problem = get_problem("mlp", "tanh", loss_name, dtype)
    V = np.random.default_rng(2).normal(size=(4, problem.P))
    rtol = 1e-10 if dtype == "float64" else 2e-4
    for chunk_size in (1000, 5):
        obj = _objective(problem, chunk_size)
        block = jax.jit(objective.flat_block_matvec(obj.block_gnvp_fn, problem.params, obj.data))
        got = np.asarray(block(jnp.asarray(V, problem.dtype)))
        singles = np.stack([ravel_pytree(obj.gnvp(problem.params, problem.unravel(
            jnp.asarray(v, problem.dtype))))[0] for v in V])
        assert np.max(np.abs(got - singles)) <= rtol * np.max(np.abs(singles)), chunk_size
    # G is a genuine part of H: the block GNVP is not the block HVP.
    hessian_block = np.asarray(_flat_block(obj, problem.params)(jnp.asarray(V, problem.dtype)))
    assert np.max(np.abs(got - hessian_block)) > 1e2 * rtol * np.max(np.abs(singles))


@pytest.mark.parametrize("batching", ["vmap", "map"])
def test_block_hvp_batchings_agree(batching):
    problem = get_problem("mlp", "relu", "cross_entropy", "float64")
    V = jax.vmap(problem.unravel)(jnp.asarray(np.random.default_rng(3).normal(
        size=(3, problem.P))))
    got = jax.vmap(lambda t: ravel_pytree(t)[0])(
        block_hvp(problem.loss, problem.params, V, batching=batching))
    want = problem.dense_hessian() @ np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(V)).T
    np.testing.assert_allclose(np.asarray(got), want.T, rtol=0, atol=1e-10 * np.max(np.abs(want)))
    with pytest.raises(ValueError, match="batching='scan'"):
        block_hvp(problem.loss, problem.params, V, batching="scan")


def _dense_block(H, dtype):
    Hj = jnp.asarray(H, dtype)
    return lambda V: jnp.matmul(V, Hj.T, precision=jax.lax.Precision.HIGHEST)


def _solve(H, start, k, num_blocks, tol):
    run = jax.jit(lambda Hm, s: block_top_k(_dense_block(Hm, s.dtype), s, k, num_blocks, tol=tol))
    return run(jnp.asarray(H, start.dtype), start)


def _assert_pairs_match(result, H, k, rtol):
    lam, U = np.linalg.eigh(H)
    lam, U = lam[::-1][:k], U[:, ::-1][:, :k]
    got = np.asarray(result.eigenvalues, np.float64)
    scale = np.max(np.abs(np.linalg.eigvalsh(H)))
    np.testing.assert_allclose(got, lam, rtol=0, atol=rtol * scale)
    V = np.asarray(result.eigenvectors, np.float64)
    np.testing.assert_allclose(V @ V.T, np.eye(k), atol=100 * rtol)
    residuals = np.linalg.norm(V @ H - got[:, None] * V, axis=1)
    np.testing.assert_allclose(np.asarray(result.residuals), residuals, atol=10 * rtol * scale)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("problem_key", PROBLEMS, ids=["-".join(p) for p in PROBLEMS])
def test_block_top_k_matches_eigh_on_oracle_networks(problem_key, dtype):
    problem = get_problem(*problem_key, "float64")
    H = problem.dense_hessian()
    k, b = 4, 6
    start = jnp.asarray(np.random.default_rng(0).normal(size=(b, problem.P)), dtype)
    tol = 1e-10 if dtype == "float64" else 1e-4
    result = _solve(H, start, k, num_blocks=problem.P // b, tol=tol)
    _assert_pairs_match(result, H, k, 1e-8 if dtype == "float64" else 2e-4)
    assert int(result.num_matvecs) % b == 0 and int(result.num_matvecs) <= problem.P


def _spectrum_matrix(eigenvalues, seed=0):
    P = len(eigenvalues)
    Q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(P, P)))
    return (Q * np.asarray(eigenvalues)) @ Q.T


def test_block_top_k_is_algebraic_under_a_larger_negative_end():
    # Top eigenvalues 3, 2.9, 2.8, …; the negative end reaches −10. A
    # magnitude-driven method (power / subspace iteration) would return −10.
    eigenvalues = np.concatenate([np.linspace(-10.0, -4.0, 30), np.linspace(-1, 1, 60),
                                  3.0 - 0.1 * np.arange(6)])
    H = _spectrum_matrix(eigenvalues)
    start = jnp.asarray(np.random.default_rng(2).normal(size=(5, H.shape[0])))
    result = _solve(H, start, 3, num_blocks=19, tol=1e-10)
    _assert_pairs_match(result, H, 3, 1e-8)


def test_block_top_k_warm_start_from_exact_vectors_takes_one_block():
    eigenvalues = np.concatenate([np.linspace(0.0, 1.0, 70), [5.0, 4.0, 3.0]])
    H = _spectrum_matrix(eigenvalues, seed=3)
    lam, U = np.linalg.eigh(H)
    k, b = 3, 5
    warm = np.concatenate([U[:, ::-1][:, :k].T,
                           np.random.default_rng(4).normal(size=(b - k, H.shape[0]))])
    result = _solve(H, jnp.asarray(warm), k, num_blocks=10, tol=1e-8)
    assert int(result.num_matvecs) == b
    _assert_pairs_match(result, H, k, 1e-10)
    cold = _solve(H, jnp.asarray(np.random.default_rng(5).normal(size=(b, H.shape[0]))), k,
                  num_blocks=10, tol=1e-8)
    assert int(cold.num_matvecs) > b


def test_block_top_k_finds_repeated_eigenvalues():
    # A triple top eigenvalue: one Krylov vector sees one copy; a block of 4 sees all three.
    eigenvalues = np.concatenate([np.linspace(-1.0, 1.0, 60), [4.0, 4.0, 4.0]])
    H = _spectrum_matrix(eigenvalues, seed=6)
    start = jnp.asarray(np.random.default_rng(7).normal(size=(4, H.shape[0])))
    result = _solve(H, start, 3, num_blocks=15, tol=1e-10)
    _assert_pairs_match(result, H, 3, 1e-8)


def test_block_top_k_rejects_a_block_smaller_than_k():
    with pytest.raises(ValueError, match="block size 2 must be >= k=3"):
        block_top_k(lambda V: V, jnp.ones((2, 10)), 3, 4)
