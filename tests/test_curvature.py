"""Curvature kernels against dense references: hvp, gnvp, Lanczos, SLQ, Hutchinson.

References are built in float64 (jax.enable_x64, scoped to this module's
tests by a fixture) on tiny networks (~100–150 parameters): dense Hessians
from `jax.hessian` on the flat view, Gauss–Newton matrices from explicit
Jacobians, eigenpairs from `numpy.linalg.eigh`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from lossland import losses, models, objective
from lossland.curvature import gnvp, hutchinson_trace, hvp, lanczos_top_k, slq_density

PROBLEMS = [("mlp", "tanh", "mse"), ("mlp", "relu", "cross_entropy"),
            ("cnn", "relu", "mse"), ("cnn", "tanh", "cross_entropy")]
DTYPES = ["float64", "float32"]
N = 23  # examples; deliberately not a multiple of the chunk sizes below


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


@functools.lru_cache(maxsize=None)
def get_problem(arch, activation, loss_name, dtype):
    return Problem(arch, activation, loss_name, dtype)


class Problem:
    """A tiny network, data and its full-batch mean loss, in one dtype.

    Params and data are the same numbers in both dtypes (drawn in float32), so a
    float32 problem is checked against its float64 twin's dense matrices.
    """

    def __init__(self, arch, activation, loss_name, dtype, seed=0):
        self.key = (arch, activation, loss_name)
        dtype = jnp.dtype(dtype)
        input_shape = (6,) if arch == "mlp" else (12,)
        width, depth = (8, 2) if arch == "mlp" else (4, 1)
        self.model = models.build_model(arch, input_shape, 3, width=width, depth=depth,
                                        activation=activation, key=jax.random.key(seed),
                                        dtype=dtype)
        rng = np.random.default_rng(seed)
        self.x = jnp.asarray(rng.normal(size=(N,) + input_shape).astype(np.float32), dtype)
        self.y = jnp.asarray(rng.integers(0, 3, size=N), jnp.int32)
        self.per_example = losses.per_example_loss(loss_name)
        self.params = self.model.params
        self.flat, self.unravel = ravel_pytree(self.params)
        self.P = self.flat.shape[0]
        self.dtype = dtype
        self._hessian = None

    def loss(self, params):
        return jnp.mean(self.per_example(self.model.apply(params, self.x), self.y))

    def flat_loss(self, theta):
        return self.loss(self.unravel(theta))

    def dense_hessian(self, theta=None):
        """The float64 Hessian (of the float64 twin) at theta (default: the params)."""
        twin = self if self.dtype == jnp.float64 else get_problem(*self.key, "float64")
        theta = self.flat if theta is None else theta
        if twin._hessian is None:
            twin._hessian = jax.jit(jax.hessian(twin.flat_loss))
        return np.asarray(twin._hessian(jnp.asarray(theta, jnp.float64)), np.float64)

    def matvec(self, theta=None):
        """Flat (P,) -> (P,) HVP at theta via `curvature.hvp`."""
        params = self.params if theta is None else self.unravel(theta)
        return lambda v: ravel_pytree(hvp(self.loss, params, self.unravel(v)))[0]


def problem64(index=0):
    return get_problem(*PROBLEMS[index], "float64")


def dense_matvec(H, dtype=jnp.float64):
    Hj = jnp.asarray(H, dtype)
    return lambda v: jnp.matmul(Hj, v, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames=("k", "num_iters", "tol", "which"))
def _dense_lanczos(H, v0, init_vectors, *, k, num_iters, tol, which):
    return lanczos_top_k(lambda v: jnp.matmul(H, v, precision=jax.lax.Precision.HIGHEST), v0,
                         k, num_iters, tol=tol, init_vectors=init_vectors, which=which)


def dense_lanczos(H, v0, k, num_iters, tol=None, init_vectors=None, which="largest"):
    """lanczos_top_k on a dense matrix, compiled once per (shape, k, num_iters, tol, which):
    the matrix is an argument and a cold start passes zero init vectors (which
    `lanczos_top_k` ignores), so tests share compiled programs."""
    H = jnp.asarray(H, v0.dtype)
    if init_vectors is None:
        init_vectors = jnp.zeros((k, H.shape[0]), v0.dtype)
    return _dense_lanczos(H, v0, init_vectors, k=k, num_iters=num_iters, tol=tol, which=which)


def tol_for(dtype):
    return 1e-10 if jnp.dtype(dtype) == jnp.float64 else 1e-4


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


def top_eigh(H, k, which="largest"):
    lam, U = np.linalg.eigh(H)
    order = np.argsort(-lam) if which == "largest" else np.argsort(-np.abs(lam))
    return lam[order], U[:, order]


def assert_same_eigenspaces(vectors, lam, U, k, tol):
    """Each cluster of (numerically) equal reference eigenvalues fully inside the top k
    has the same projector as the matching returned vectors (signs and rotations within
    a repeated eigenvalue do not matter)."""
    vectors = np.asarray(vectors, np.float64)
    scale = np.abs(lam).max()
    start = 0
    while start < k:
        end = start + 1
        while end < len(lam) and abs(lam[end] - lam[start]) <= 1e-6 * scale:
            end += 1
        if end <= k:
            P_ref = U[:, start:end] @ U[:, start:end].T
            P_got = vectors[start:end].T @ vectors[start:end]
            assert np.linalg.norm(P_ref - P_got, 2) <= tol, (start, end)
        start = end


def check_lanczos(result, H, k, tol, which="largest"):
    """Eigenvalues, eigenspaces, orthonormality and honest residuals against eigh."""
    lam, U = top_eigh(H, k, which)
    scale = np.abs(lam).max()
    theta = np.asarray(result.eigenvalues, np.float64)
    V = np.asarray(result.eigenvectors, np.float64)
    assert theta.shape == (k,) and V.shape == (k, H.shape[0])
    assert np.all(np.diff(theta) <= 0), "eigenvalues must be descending"
    expected = np.sort(lam[:k])[::-1]
    np.testing.assert_allclose(theta, expected, rtol=0, atol=tol * scale)
    np.testing.assert_allclose(V @ V.T, np.eye(k), atol=10 * tol)
    # The reported residuals are the true ‖Hv − λv‖.
    true_res = np.linalg.norm(V @ H - theta[:, None] * V, axis=1)
    np.testing.assert_allclose(np.asarray(result.residuals), true_res, rtol=0,
                               atol=10 * tol * scale)
    if which == "largest":
        assert_same_eigenspaces(V, lam, U, k, tol=100 * tol * scale / gap_floor(lam, k))


def gap_floor(lam, k):
    """Smallest gap between distinct eigenvalues around the top k (for eigenvector bounds)."""
    scale = np.abs(lam).max()
    gaps = np.abs(np.diff(lam[:k + 1]))
    gaps = gaps[gaps > 1e-6 * scale]
    return max(gaps.min() if gaps.size else scale, 1e-3 * scale)


# ----------------------------------------------------------------------------
# hvp and gnvp
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("problem", PROBLEMS, ids="-".join)
def test_hvp_equals_dense_hessian_times_v(problem, dtype):
    pb = get_problem(*problem, dtype)
    v = jax.random.normal(jax.random.key(1), (pb.P,), pb.dtype)
    got = ravel_pytree(jax.jit(hvp, static_argnums=0)(pb.loss, pb.params, pb.unravel(v)))[0]
    assert got.dtype == pb.dtype
    expected = pb.dense_hessian() @ np.asarray(v, np.float64)
    assert rel_err(got, expected) <= tol_for(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("problem", PROBLEMS, ids="-".join)
def test_gnvp_equals_explicit_jt_hout_j(problem, dtype):
    pb = get_problem(*problem, dtype)
    v = jax.random.normal(jax.random.key(2), (pb.P,), pb.dtype)
    model_fn = lambda p: pb.model.apply(p, pb.x)
    output_loss = lambda z: jnp.mean(pb.per_example(z, pb.y))
    got = ravel_pytree(jax.jit(gnvp, static_argnums=(0, 1))(model_fn, output_loss, pb.params,
                                                            pb.unravel(v)))[0]

    tw = get_problem(*problem, "float64")
    flat_model = lambda t: tw.model.apply(tw.unravel(t), tw.x).ravel()
    J = np.asarray(jax.jit(jax.jacobian(flat_model))(tw.flat))            # (n·C, P)
    z = flat_model(tw.flat)
    H_out = np.asarray(jax.jit(jax.hessian(
        lambda zz: jnp.mean(tw.per_example(zz.reshape(N, 3), tw.y))))(z))  # (n·C, n·C)
    expected = J.T @ (H_out @ (J @ np.asarray(v, np.float64)))
    assert rel_err(got, expected) <= tol_for(dtype)
    # The Gauss–Newton part is a genuine piece of the Hessian: the residual is nonzero
    # for these nonlinear networks, so this test would notice gnvp returning hvp.
    assert rel_err(got, pb.dense_hessian() @ np.asarray(v, np.float64)) > 1e3 * tol_for(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_name", ["mse", "cross_entropy"])
def test_chunked_equals_unchunked_hvp_and_gnvp(loss_name, dtype):
    pb = get_problem("mlp", "tanh", loss_name, dtype)
    per_example = losses.per_example_loss(loss_name)
    chunked = objective.Objective(pb.model.apply, per_example,
                                  objective.chunk_data(pb.x, pb.y, 5, dtype=pb.dtype))
    whole = objective.Objective(pb.model.apply, per_example,
                                objective.chunk_data(pb.x, pb.y, 64, dtype=pb.dtype))
    assert chunked.data.num_chunks == 5 and whole.data.num_chunks == 1   # 23 = 4·5 + 3
    v = pb.unravel(jax.random.normal(jax.random.key(3), (pb.P,), pb.dtype))
    flat = lambda tree: ravel_pytree(tree)[0]
    tol = tol_for(dtype)
    assert rel_err(flat(chunked.hvp(pb.params, v)), flat(whole.hvp(pb.params, v))) <= tol
    assert rel_err(flat(chunked.gnvp(pb.params, v)), flat(whole.gnvp(pb.params, v))) <= tol
    # And both equal the unchunked kernel on the plain mean loss.
    assert rel_err(flat(whole.hvp(pb.params, v)), flat(hvp(pb.loss, pb.params, v))) <= tol


# ----------------------------------------------------------------------------
# Lanczos
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hessian64():
    """Dense float64 Hessian of the tanh-MLP-MSE problem (indefinite), P = 155."""
    with jax.enable_x64(True):
        return problem64(0).dense_hessian()


def test_lanczos_matches_eigh_on_indefinite_hessian(hessian64):
    H = hessian64
    P = H.shape[0]
    lam = np.linalg.eigvalsh(H)
    assert lam[0] < -1e-3 * lam[-1], "test needs an indefinite Hessian"
    v0 = jax.random.normal(jax.random.key(0), (P,), jnp.float64)
    result = dense_lanczos(H, v0, 5, P)
    check_lanczos(result, H, 5, 1e-8)
    assert int(result.num_matvecs) <= P


def test_lanczos_magnitude_and_negative_spectra(hessian64):
    H = hessian64
    P = H.shape[0]
    v0 = jax.random.normal(jax.random.key(1), (P,), jnp.float64)
    # Largest |λ|: the selected pairs are the top-|λ| ones, returned in descending order.
    result = dense_lanczos(H, v0, 5, 80, tol=1e-9, which="magnitude")
    assert int(result.num_matvecs) < 80
    check_lanczos(result, H, 5, 1e-8, which="magnitude")
    # A negative definite operator: "largest" is the least negative.
    A = H - (np.linalg.eigvalsh(H)[-1] + 1.0) * np.eye(P)
    result = dense_lanczos(A, v0, 5, P)
    assert np.all(np.asarray(result.eigenvalues) < 0)
    check_lanczos(result, A, 5, 1e-8)


def test_lanczos_repeated_top_eigenvalue_spans_the_eigenspace(hessian64):
    lam, U = np.linalg.eigh(hessian64)
    lam = lam.copy()
    lam[-2] = lam[-1]                        # λ1 = λ2 exactly
    H = (U * lam) @ U.T
    H = 0.5 * (H + H.T)
    P = H.shape[0]
    v0 = jax.random.normal(jax.random.key(2), (P,), jnp.float64)
    result = dense_lanczos(H, v0, 5, P)
    theta = np.asarray(result.eigenvalues)
    np.testing.assert_allclose(theta[:2], lam[-1], rtol=1e-10)
    V = np.asarray(result.eigenvectors)
    P_top = U[:, -2:] @ U[:, -2:].T
    assert np.linalg.norm(V[:2].T @ V[:2] - P_top, 2) <= 1e-8
    check_lanczos(result, H, 5, 1e-8)


def test_lanczos_k_equals_p_minus_one_on_relu_cnn():
    # A ReLU CNN's Hessian has repeated eigenvalues (e.g. zero-curvature directions);
    # every copy must be found.
    pb = get_problem("cnn", "relu", "cross_entropy", "float64")
    H = pb.dense_hessian()
    P = pb.P
    v0 = jax.random.normal(jax.random.key(3), (P,), jnp.float64)
    result = dense_lanczos(H, v0, P - 1, P)
    lam = np.linalg.eigvalsh(H)
    assert np.sum(np.abs(lam) <= 1e-10 * np.abs(lam).max()) >= 2, "needs a repeated eigenvalue"
    check_lanczos(result, H, P - 1, 1e-8)


def test_lanczos_tol_stops_early_with_small_residuals(hessian64):
    H = hessian64
    P = H.shape[0]
    v0 = jax.random.normal(jax.random.key(4), (P,), jnp.float64)
    result = dense_lanczos(H, v0, 5, 60, tol=1e-8)
    n = int(result.num_matvecs)
    assert 5 <= n < 60
    theta = np.asarray(result.eigenvalues)
    assert np.all(np.asarray(result.residuals) <= 1e-8 * np.abs(theta))
    lam = np.sort(np.linalg.eigvalsh(H))[::-1][:5]
    # A residual r bounds the eigenvalue error by r.
    np.testing.assert_allclose(theta, lam, rtol=1e-8)


def test_warm_start_same_answer_fewer_matvecs():
    pb = problem64(0)
    H0 = pb.dense_hessian()
    lam0, U0 = top_eigh(H0, 5)
    # One GD step at the edge of stability (η = 2/λ1).
    g = jax.grad(pb.flat_loss)(pb.flat)
    theta1 = pb.flat - (2.0 / lam0[0]) * g
    H1 = pb.dense_hessian(theta1)
    k, tol = 5, 1e-8
    v0 = jax.random.normal(jax.random.key(5), (pb.P,), jnp.float64)
    cold = dense_lanczos(H1, v0, k, 60, tol=tol)
    warm = dense_lanczos(H1, v0, k, 60, tol=tol, init_vectors=jnp.asarray(U0[:, :k].T))
    assert int(warm.num_matvecs) < int(cold.num_matvecs), (warm.num_matvecs, cold.num_matvecs)
    for result in (cold, warm):
        check_lanczos(result, H1, k, 1e-7)
    np.testing.assert_allclose(warm.eigenvalues, cold.eigenvalues, rtol=1e-7)
    # Warm-starting from the exact eigenvectors of the same matrix: k + 1 matvecs at most
    # (the start vector lies in the invariant subspace up to the small v0 share).
    lam1, U1 = top_eigh(H1, k)
    exact = dense_lanczos(H1, v0, k, 60, tol=tol, init_vectors=jnp.asarray(U1[:, :k].T))
    assert int(exact.num_matvecs) < int(warm.num_matvecs)


def test_lanczos_inside_outer_jit_with_traced_params():
    pb = get_problem("cnn", "tanh", "mse", "float64")
    obj = objective.Objective(pb.model.apply, pb.per_example,
                              objective.chunk_data(pb.x, pb.y, 8, dtype=pb.dtype))

    @jax.jit
    def track(params, data, v0, init_vectors):
        matvec = objective.flat_matvec(lambda p, v: obj.hvp_fn(p, v, data), params)
        return lanczos_top_k(matvec, v0, 3, 60, tol=1e-9, init_vectors=init_vectors)

    v0 = jax.random.normal(jax.random.key(6), (pb.P,), jnp.float64)
    first = track(pb.params, obj.data, v0, jnp.zeros((3, pb.P)))
    check_lanczos(first, pb.dense_hessian(), 3, 1e-7)
    # Same compiled function, other params: the matvec really closes over the traced
    # params (not constants baked in at the first trace); warm-started from `first`.
    theta2 = pb.flat * 1.3
    second = track(pb.unravel(theta2), obj.data, v0, first.eigenvectors)
    check_lanczos(second, pb.dense_hessian(theta2), 3, 1e-7)
    assert np.abs(np.asarray(second.eigenvalues) - np.asarray(first.eigenvalues)).max() > 1e-3


def test_breakdown_restarts_and_produces_no_nans():
    # 4 distinct eigenvalues, each repeated: a single Krylov space is invariant after
    # 4 steps; the copies are found only through the restart.
    P = 24
    diag = np.repeat([5.0, 2.0, -1.0, 0.0], 6)
    Q = np.linalg.qr(np.random.default_rng(0).normal(size=(P, P)))[0]
    H = (Q * diag) @ Q.T
    v0 = jax.random.normal(jax.random.key(7), (P,), jnp.float64)
    expected = [5.0] * 6 + [2.0] * 2
    result = dense_lanczos(H, v0, 8, P)
    assert np.all(np.isfinite(np.asarray(result.eigenvectors)))
    np.testing.assert_allclose(result.eigenvalues, expected, atol=1e-10)
    assert int(result.num_matvecs) <= P
    check_lanczos(result, H, 8, 1e-8)
    # A zero start vector with zero warm-start rows is handled too.
    result = dense_lanczos(H, jnp.zeros(P), 8, P, init_vectors=jnp.zeros((8, P)))
    assert np.all(np.isfinite(np.asarray(result.eigenvectors)))
    np.testing.assert_allclose(result.eigenvalues, expected, atol=1e-10)
    # Eagerly, without an outer jit, and with a plain zero v0 (no init vectors).
    result = lanczos_top_k(dense_matvec(H), jnp.zeros(P), 2, 8)
    assert np.all(np.isfinite(np.asarray(result.eigenvectors)))
    assert np.all(np.asarray(result.eigenvalues) <= 5.0 + 1e-10)


def test_lanczos_float32(hessian64):
    H = hessian64
    P = H.shape[0]
    v0 = jax.random.normal(jax.random.key(8), (P,), jnp.float32)
    result = dense_lanczos(H, v0, 5, 60, tol=1e-5)
    assert result.eigenvectors.dtype == jnp.float32
    assert int(result.num_matvecs) < 60
    theta = np.asarray(result.eigenvalues)
    assert np.all(np.asarray(result.residuals) <= 1e-5 * np.abs(theta))
    check_lanczos(result, H, 5, 1e-5)


def test_lanczos_rejects_bad_arguments():
    v0 = jnp.ones(10)
    with pytest.raises(ValueError):
        lanczos_top_k(lambda v: v, v0, 11, 20)
    with pytest.raises(ValueError):
        lanczos_top_k(lambda v: v, v0, 2, 5, which="bogus")
    with pytest.raises(TypeError):
        lanczos_top_k(lambda v: v, v0, 2.0, 5)


# ----------------------------------------------------------------------------
# Stochastic estimators
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_slq_density_integrates_to_one_and_has_mean_trace_over_p(hessian64, dtype):
    H = hessian64
    P = H.shape[0]
    lam = np.linalg.eigvalsh(H)
    sigma = (lam[-1] - lam[0]) / 40
    grid = jnp.linspace(lam[0] - 8 * sigma, lam[-1] + 8 * sigma, 2001, dtype=dtype)
    num_probes, num_iters = 40, 25
    result = slq_density(dense_matvec(H, dtype), jnp.zeros(P, dtype), jax.random.key(9),
                         num_probes, num_iters, grid, sigma)
    nodes, weights = np.asarray(result.nodes, np.float64), np.asarray(result.weights, np.float64)
    assert nodes.shape == weights.shape == (num_probes, num_iters)
    density = np.asarray(result.density, np.float64)
    assert np.all(density >= 0)
    g = np.asarray(grid, np.float64)
    assert abs(np.trapezoid(density, g) - 1.0) <= 1e-5
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-5)
    # Nodes lie inside the spectrum (Ritz values interlace).
    span = lam[-1] - lam[0]
    assert nodes.min() >= lam[0] - 1e-4 * span and nodes.max() <= lam[-1] + 1e-4 * span
    per_probe = (weights * nodes).sum(axis=1)            # z_pᵀ H z_p / P
    mean, se = per_probe.mean(), per_probe.std(ddof=1) / np.sqrt(num_probes)
    assert abs(mean - np.trace(H) / P) <= 4 * se
    # The density's own mean agrees with the quadrature (broadening is symmetric).
    assert abs(np.trapezoid(g * density, g) - mean) <= 1e-3 * span


def test_slq_exact_on_few_distinct_eigenvalues():
    P = 30
    values, counts = np.array([4.0, 1.0, -2.0]), np.array([3, 12, 15])
    Q = np.linalg.qr(np.random.default_rng(1).normal(size=(P, P)))[0]
    H = (Q * np.repeat(values, counts)) @ Q.T
    grid = jnp.linspace(-4, 6, 1001)
    result = slq_density(dense_matvec(H), jnp.zeros(P), jax.random.key(10), 60, 10, grid, 0.1)
    nodes, weights = np.asarray(result.nodes), np.asarray(result.weights)
    assert np.all(np.isfinite(nodes)) and np.all(np.isfinite(np.asarray(result.density)))
    # The Krylov space of each probe is invariant after 3 steps: the quadrature is exact,
    # with weight only on the 3 eigenvalues.
    heavy = weights > 1e-10
    assert np.all(np.min(np.abs(nodes[heavy][:, None] - values[None]), axis=1) <= 1e-8)
    mass = np.stack([(weights * (np.abs(nodes - v) <= 1e-8)).sum(axis=1) for v in values], 1)
    se = mass.std(axis=0, ddof=1) / np.sqrt(mass.shape[0])
    assert np.all(np.abs(mass.mean(axis=0) - counts / P) <= 4 * se + 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hutchinson_within_four_standard_errors(hessian64, dtype):
    H = hessian64
    P = H.shape[0]
    result = hutchinson_trace(dense_matvec(H, dtype), jnp.zeros(P, dtype), jax.random.key(11),
                              200)
    assert result.samples.shape == (200,)
    se = float(result.std_error)
    assert 0 < se < np.abs(H).sum()
    assert abs(float(result.estimate) - np.trace(H)) <= 4 * se
    # The standard error is the honest one: the sample spread of zᵀHz, whose variance for
    # Rademacher z is 2 Σ_{i≠j} H_ij².
    expected_se = np.sqrt(2 * (np.sum(H ** 2) - np.sum(np.diag(H) ** 2)) / 200)
    assert 0.7 * expected_se <= se <= 1.3 * expected_se
