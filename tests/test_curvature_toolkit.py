"""The curvature toolkit against dense float64 oracles: layer blocks, λ_min, empirical
Fisher, Hutch++, the Hutchinson diagonal and tr(H²).

Networks are tiny (~150–450 parameters) on the first 23 MNIST-1D examples: the
registry's MLP and CNN, and a LayerNorm MLP defined here. Dense references are
`jax.hessian` of the flat mean loss, per-example gradients from `jax.jacrev`,
and `numpy.linalg.eigh`.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from lossland import curvature, data, losses, models, objective
from lossland.curvature import (frobenius_norm_sq, hutchinson_diagonal, hutchpp_trace,
                                lanczos_top_k, layer_segment_ids, layer_subsets,
                                select_params)

N, CHUNK = 23, 8   # 23 is not a multiple of the chunk: the padding is exercised


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


class LayerNormMLP(nn.Module):
    """Dense → LayerNorm → tanh → Dense: a normalization layer's curvature block."""

    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.LayerNorm()(nn.Dense(6)(x)))
        return nn.Dense(10)(x)


PROBLEMS = [("mlp", "mse"), ("cnn", "cross_entropy"), ("layernorm", "cross_entropy")]


@functools.lru_cache(maxsize=None)
def problem(arch, loss_name):
    """(params, apply, per_example_loss, chunked data, dense Hessian, flat loss) in float64."""
    x, y = data.load("mnist1d", N, seed=0)
    x = jnp.asarray(x, jnp.float64)
    if arch == "layernorm":
        module = LayerNormMLP()
        params = module.init(jax.random.key(0), x[:1])["params"]
        apply = lambda p, inputs: module.apply({"params": p}, inputs)
    else:
        width = 6 if arch == "mlp" else 2
        model = models.build_model(arch, (40,), 10, width=width, depth=1, activation="tanh",
                                   key=jax.random.key(0), dtype=jnp.float64)
        params, apply = model.params, model.apply
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), params)
    per_example = losses.per_example_loss(loss_name)
    flat, unravel = ravel_pytree(params)
    flat_loss = lambda theta: jnp.mean(per_example(apply(unravel(theta), x), y))
    dense = np.asarray(jax.jit(jax.hessian(flat_loss))(flat))
    chunked = objective.chunk_data(x, y, CHUNK, dtype=jnp.float64)
    obj = objective.Objective(apply, per_example, chunked)
    return params, obj, dense, (x, y)


def block_indices(params, subset):
    """Flat indices of a subset's entries in ravel_pytree order."""
    offsets, start = [], 0
    for leaf, keep in zip(jax.tree_util.tree_leaves(params), subset.mask):
        if keep:
            offsets.append(np.arange(start, start + leaf.size))
        start += leaf.size
    return np.concatenate(offsets)


def block_matvec(obj, params, subset, product="hvp"):
    """(P_S,) -> (P_S,) flat matvec of the chunked full-batch block product."""
    sub = subset.take(params)
    fn = obj.subset_hvp_fn if product == "hvp" else obj.subset_gnvp_fn
    return jax.jit(objective.flat_matvec(lambda _, v, d: fn(params, subset, v, d), sub, obj.data))


def as_matrix(matvec, size):
    return np.asarray(jax.vmap(matvec)(jnp.eye(size))).T


@pytest.mark.parametrize("arch,loss_name", PROBLEMS[1:])   # conv and LayerNorm (MLP: below)
def test_layer_blocks_equal_dense_submatrices(arch, loss_name):
    """Each layer's H_SS (chunked, padded) is the dense submatrix, and the layer traces sum
    to tr(H); the first layer's top-3 and Hutch++ trace equal eigh's and trace's."""
    params, obj, dense, _ = problem(arch, loss_name)
    subsets = layer_subsets(params)
    assert len(subsets) >= 2
    blocks = {}
    for name, subset in subsets.items():
        idx = block_indices(params, subset)
        blocks[name] = as_matrix(block_matvec(obj, params, subset), subset.size)
        np.testing.assert_allclose(blocks[name], dense[np.ix_(idx, idx)],
                                   atol=1e-10 * np.abs(dense).max(), err_msg=name)
    np.testing.assert_allclose(sum(np.trace(b) for b in blocks.values()), np.trace(dense),
                               rtol=1e-10)
    # block_spectra on the chunked product: Lanczos to exhaustion and a Hutch++ sketch as
    # wide as the block give eigh's top-3 and the exact trace.
    name, subset = next(iter(subsets.items()))
    eigenvalues = np.linalg.eigvalsh(blocks[name])
    scale = np.abs(eigenvalues).max()
    spectra = jax.jit(lambda p, d, key: curvature.block_spectra(
        lambda S, v: obj.subset_hvp_fn(p, S, v, d), p, {name: subset}, key, k=3,
        num_iters=subset.size, trace_matvecs=3 * subset.size))(params, obj.data,
                                                               jax.random.key(2))[name]
    np.testing.assert_allclose(spectra.eigenvalues, eigenvalues[::-1][:3], atol=1e-9 * scale)
    assert np.all(np.asarray(spectra.residuals) < 1e-8 * scale)
    np.testing.assert_allclose(spectra.trace, np.trace(blocks[name]), atol=1e-9 * scale)
    assert float(spectra.trace_std_error) <= 1e-12 * scale


def test_gauss_newton_block_equals_dense_submatrix():
    """G_SS of a layer equals the submatrix of the dense Jᵀ H_out J."""
    params, obj, _, (x, y) = problem("cnn", "cross_entropy")
    flat, unravel = ravel_pytree(params)
    jac = jax.jacrev(lambda t: obj.apply_fn(unravel(t), x).reshape(-1))(flat)   # (n·C, P)
    h_out = jax.hessian(lambda z: jnp.mean(obj.per_example_loss(z.reshape(N, 10), y)))(
        obj.apply_fn(params, x).reshape(-1))
    G = np.asarray(jac.T @ h_out @ jac)
    subset = select_params(params, glob="Conv_0/*")
    idx = block_indices(params, subset)
    got = as_matrix(block_matvec(obj, params, subset, "gnvp"), subset.size)
    np.testing.assert_allclose(got, G[np.ix_(idx, idx)], atol=1e-10 * np.abs(G).max())


def test_smallest_eigenvalues_of_the_full_hessian():
    """λ_min (and λ_2 from the bottom) of the MLP's full Hessian by Lanczos which="smallest"
    equal eigh's; residuals small; per-layer traces (exact diagonal) sum to tr(H)."""
    params, obj, dense, _ = problem("mlp", "mse")
    names, ids = layer_segment_ids(params)
    layer_traces = [np.trace(dense[np.ix_(ids == i, ids == i)]) for i in range(len(names))]
    np.testing.assert_allclose(sum(layer_traces), np.trace(dense), rtol=1e-12)
    eigenvalues = np.linalg.eigvalsh(dense)
    assert eigenvalues[0] < 0 < eigenvalues[-1]
    P = dense.shape[0]
    matvec = jax.jit(objective.flat_matvec(obj.hvp_fn, params, obj.data))
    result = lanczos_top_k(matvec, jax.random.normal(jax.random.key(3), (P,), jnp.float64), 2, P,
                           which="smallest")
    scale = np.abs(eigenvalues).max()
    np.testing.assert_allclose(result.eigenvalues, eigenvalues[:2], atol=1e-9 * scale)
    assert np.all(np.asarray(result.residuals) < 1e-8 * scale)
    # The returned vectors are eigenvectors: H v = λ v.
    for value, vector in zip(result.eigenvalues, result.eigenvectors):
        np.testing.assert_allclose(dense @ vector, value * vector, atol=1e-8 * scale)


@pytest.mark.parametrize("loss_name", ["mse", "cross_entropy"])
def test_empirical_fisher_equals_dense_outer_products(loss_name):
    """F (chunked, padded) = (1/n) Σ g_i g_iᵀ from explicit per-example gradients."""
    arch = "mlp" if loss_name == "mse" else "layernorm"
    params, obj, _, (x, y) = problem(arch, loss_name)
    flat, unravel = ravel_pytree(params)
    per_example_grads = jax.jacrev(
        lambda t: obj.per_example_loss(obj.apply_fn(unravel(t), x), y))(flat)     # (n, P)
    F = np.asarray(per_example_grads.T @ per_example_grads) / N
    assert np.linalg.matrix_rank(F) <= N
    V = jax.random.normal(jax.random.key(4), (6, flat.shape[0]), jnp.float64)
    matvec = objective.flat_matvec(obj.empirical_fisher_vp_fn, params, obj.data)
    got = np.asarray(jax.jit(jax.vmap(matvec))(V))
    np.testing.assert_allclose(got, np.asarray(V) @ F, atol=1e-11 * np.abs(F).max() * flat.size)
    # The jitted method agrees.
    np.testing.assert_allclose(ravel_pytree(obj.empirical_fisher_vp(params, unravel(V[0])))[0],
                               got[0], rtol=1e-12, atol=1e-14)


# --- estimators: unbiased, with honest standard errors --------------------------------------

SEEDS = 300


def _dense_operator():
    """The MLP's dense Hessian as a matvec, and the matrix."""
    params, _, dense, _ = problem("mlp", "mse")
    H = jnp.asarray(dense)
    return params, H, (lambda v: H @ v)


def _over_seeds(estimator):
    keys = jax.random.split(jax.random.key(7), SEEDS)
    return jax.jit(jax.vmap(estimator))(keys)


def _assert_unbiased(estimates, truth, name):
    estimates = np.asarray(estimates, np.float64)
    standard_error = estimates.std(ddof=1, axis=0) / np.sqrt(SEEDS)
    z = np.abs(estimates.mean(axis=0) - truth) / standard_error
    assert np.all(z < 4), f"{name}: mean off by {np.max(z):.2f} standard errors"


def test_hutchpp_is_unbiased_with_an_honest_standard_error():
    _, H, matvec = _dense_operator()
    v0 = jnp.zeros(H.shape[0])
    result = _over_seeds(lambda key: hutchpp_trace(matvec, v0, key, 30))
    truth = float(jnp.trace(H))
    _assert_unbiased(result.estimate, truth, "hutchpp")
    assert np.all(result.num_matvecs == 30) and result.residual_samples.shape == (SEEDS, 10)
    # E[std_error²] = Var(estimate) (see hutchpp_trace): equal within sampling noise.
    ratio = np.mean(np.asarray(result.std_error) ** 2) / np.var(np.asarray(result.estimate))
    assert 0.6 < ratio < 1.6, ratio


def test_hutchinson_diagonal_and_layer_sums_are_unbiased():
    params, H, matvec = _dense_operator()
    names, ids = layer_segment_ids(params)
    assert names == ("Dense_0", "Dense_1") and ids.shape == (H.shape[0],)
    result = _over_seeds(lambda key: hutchinson_diagonal(
        matvec, jnp.zeros(H.shape[0]), key, 8, segment_ids=ids, num_segments=len(names)))
    diagonal = np.diag(np.asarray(H))
    _assert_unbiased(result.estimate, diagonal, "diagonal")
    layer_traces = np.array([diagonal[ids == i].sum() for i in range(len(names))])
    _assert_unbiased(result.segment_sums, layer_traces, "layer sums")
    ratio = (np.mean(np.asarray(result.segment_sums_std_error) ** 2, axis=0)
             / np.var(np.asarray(result.segment_sums), axis=0))
    assert np.all((0.6 < ratio) & (ratio < 1.6)), ratio
    # Per-entry standard errors: the per-probe variance is Σ_{j≠i} H_ij².
    expected = (np.sum(np.asarray(H) ** 2, axis=1) - diagonal ** 2) / 8
    got = np.mean(np.asarray(result.std_error) ** 2, axis=0)
    assert np.all(np.abs(got - expected) <= 0.35 * expected + 1e-30)


def test_frobenius_norm_sq_is_unbiased():
    _, H, matvec = _dense_operator()
    result = _over_seeds(lambda key: frobenius_norm_sq(matvec, jnp.zeros(H.shape[0]), key, 4))
    _assert_unbiased(result.estimate, float(jnp.sum(H * H)), "tr(H²)")


# --- selecting parameters -------------------------------------------------------------------

def test_select_params_by_layer_glob_regex_and_predicate():
    params, _, _, _ = problem("layernorm", "cross_entropy")
    assert curvature.layer_names(params) == ("Dense_0", "Dense_1", "LayerNorm_0")
    by_layer = select_params(params, layer="LayerNorm_0")
    assert by_layer.names == ("LayerNorm_0/bias", "LayerNorm_0/scale") and by_layer.size == 12
    assert select_params(params, glob="Dense_*/kernel").names == ("Dense_0/kernel",
                                                                    "Dense_1/kernel")
    assert select_params(params, regex=r"bias$").size == 6 + 10 + 6
    kernels = select_params(params, predicate=lambda path: path.endswith("kernel"))
    assert kernels.size == 40 * 6 + 6 * 10
    # take / put / embed round-trip on the flat view.
    embedded = ravel_pytree(kernels.embed(params, kernels.take(params)))[0]
    flat = ravel_pytree(params)[0]
    idx = block_indices(params, kernels)
    np.testing.assert_array_equal(embedded[idx], flat[idx])
    assert float(jnp.sum(jnp.abs(embedded))) == pytest.approx(float(jnp.sum(jnp.abs(flat[idx]))))


def test_select_params_that_matches_nothing_names_the_filter_and_the_choices():
    params, _, _, _ = problem("mlp", "mse")
    with pytest.raises(ValueError, match=re.escape("glob='Conv_*'") + ".*Dense_0/kernel"):
        select_params(params, glob="Conv_*")
    with pytest.raises(ValueError, match=r"layer='Dense_9'.*\['Dense_0', 'Dense_1'\]"):
        select_params(params, layer="Dense_9")
    with pytest.raises(ValueError, match="exactly one"):
        select_params(params, layer="Dense_0", regex="kernel")
    with pytest.raises(curvature.NoLayerStructure, match="bare arrays"):
        curvature.layer_names({"w": jnp.zeros(3), "Dense_0": {"kernel": jnp.zeros(2)}})


# --- the driver -----------------------------------------------------------------------------

@pytest.mark.slow
def test_driver_tracks_layers_min_and_trace(tmp_path):
    """--track_layers/--track_min/--trace_every rows: interlacing holds, plot drawn.

    Slow (~28 s of CPU on the 2-core machine, 2026-12-06): five Lanczos/Hutch++
    programs compile in the driver subprocess.
    """
    from conftest import run_module
    from lossland import records

    workdir = tmp_path / "run"
    result = run_module("experiments.train", "--n_train=64", "--width=16", "--depth=1",
                        "--steps=2", "--track_every=1", "--track_k=2", "--lanczos_iters=50",
                        "--lanczos_tol=1e-7", "--dtype=float64", "--track_layers",
                        "--track_layers_k=2", "--track_min", "--trace_every=2",
                        f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr
    tracked = [r for r in records.read_metrics(workdir) if "eigenvalues" in r]
    assert [r["step"] for r in tracked] == [0, 1, 2]
    for row in tracked:
        layers = row["layer_eigenvalues"]
        assert sorted(layers) == ["Dense_0", "Dense_1"]
        lambda1, lambda_min = row["eigenvalues"][0], row["min_eigenvalue"]
        for name, values in layers.items():
            assert len(values) == 2 and values[0] >= values[1]
            # Cauchy interlacing: a principal submatrix's spectrum lies inside H's.
            assert lambda_min - 1e-6 * lambda1 <= values[1] <= values[0] <= lambda1 * (1 + 1e-6)
            assert max(row["layer_residuals"][name]) <= 1e-5 * lambda1
        # The bottom of the spectrum is a dense bulk: Lanczos converges there slowly.
        assert lambda_min < 0 and row["min_eigenvalue_residual"] <= 1e-3 * lambda1
        has_trace = row["step"] % 2 == 0
        assert ("hessian_trace" in row) == has_trace
        if has_trace:
            assert np.isfinite(row["hessian_trace"]) and row["hessian_trace_stderr"] >= 0
            assert row["hessian_trace"] > lambda1 + lambda_min * 10   # the trace is dominated
    assert (workdir / "plots" / "layer_sharpness.png").stat().st_size > 1000
