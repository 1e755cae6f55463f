"""resnet and vit: the full-batch loss exactly as trained, in float64 against dense oracles.

The oracle is `jax.hessian` of the definition written out chunk by chunk,

    L(θ) = (1/n) Σ_c Σ_{i ∈ c} ℓ(f(θ; x_c)_i, y_i),

each chunk c one call of the training-mode forward (for BatchNorm: one ghost
batch, normalized with its own statistics). The kernels' HVPs (chunked scans,
masks) must give that Hessian, and Lanczos on them its top eigenvalues.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from conftest import requires_fashion_mnist

from lossland import curvature, data as data_lib, losses, models
from lossland.objective import Objective, chunk_data, flat_matvec

N = 8   # two ghost batches of 4 (the oracle unrolls one forward per batch: compile time)


def _perturbed(params, scale=0.2):
    """A generic point away from init (BatchNorm/LayerNorm scale 1, bias 0; cls token 0)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [
        p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])


def _oracle_loss(apply, x, y, chunk):
    per_example = losses.per_example_loss("mse")

    def loss(params):
        total = sum(jnp.sum(per_example(apply(params, x[lo:lo + chunk]), y[lo:lo + chunk]))
                    for lo in range(0, x.shape[0], chunk))
        return total / x.shape[0]
    return loss


def _setup(name, chunk, **family):
    """A 1-D instance on MNIST-1D-like inputs of length 16 (gaussian_mixture: generated in
    no time; the convolutions and patches are those of MNIST-1D's 40)."""
    x, y = data_lib.load("gaussian_mixture", N, seed=0, input_dim=16, num_classes=10)
    model = models.build_model(name, (16,), 10, key=jax.random.key(1), dtype=jnp.float64,
                               **family)
    params = _perturbed(model.params)
    objective = Objective(model.apply, losses.per_example_loss("mse"),
                          chunk_data(x, y, chunk, dtype=jnp.float64))
    return model, params, objective, jnp.asarray(x, jnp.float64), jnp.asarray(y)


def _check_against_oracle(model, params, objective, x, y, chunk):
    flat, unravel = ravel_pytree(params)
    oracle = _oracle_loss(model.apply, x, y, chunk)
    np.testing.assert_allclose(objective.loss(params), oracle(params), rtol=1e-12)
    H_oracle = jax.jit(jax.hessian(lambda f: oracle(unravel(f))))(flat)
    matvec = jax.jit(flat_matvec(objective.hvp_fn, params, objective.data))
    H = jax.vmap(matvec)(jnp.eye(flat.shape[0], dtype=flat.dtype))
    scale = float(jnp.max(jnp.abs(H_oracle)))
    assert float(jnp.max(jnp.abs(H - H_oracle))) < 1e-9 * scale
    top = curvature.lanczos_top_k(matvec, jnp.ones_like(flat), 3, 60)
    np.testing.assert_allclose(top.eigenvalues, jnp.linalg.eigh(H_oracle)[0][::-1][:3],
                               rtol=1e-7)
    return H, H_oracle, oracle


# Each oracle test compiles jax.hessian of a conv or attention net (~25 s on 2 loaded cores):
# the several-ghost-batch BatchNorm and the ViT run by default, the rest in make test-slow.
@pytest.mark.parametrize("chunk", [pytest.param(N, marks=pytest.mark.slow), 4])
def test_resnet_batchnorm_train_mode_matches_dense_oracle(chunk):
    with jax.enable_x64(True):
        model, params, objective, x, y = _setup("resnet", chunk, width=1, depth=8,
                                                norm="batch")
        assert model.has_state and set(model.state) == {"batch_stats"}
        assert model.num_params < 400
        H, H_oracle, _ = _check_against_oracle(model, params, objective, x, y, chunk)
        # Ghost batches are part of the definition: another chunking is another function.
        flat, unravel = ravel_pytree(params)
        other = _oracle_loss(model.apply, x, y, 4 if chunk == N else N)
        H_other = jax.jit(jax.hessian(lambda f: other(unravel(f))))(flat)
        assert float(jnp.max(jnp.abs(H - H_other))) > 1e-4 * float(jnp.max(jnp.abs(H)))
        # Training mode normalizes with the batch's statistics: an example's output
        # depends on the rest of its batch (evaluation mode's would not).
        out_alone = model.apply(params, x[:4])[0]
        out_with_others = model.apply(params, x)[0]
        assert float(jnp.max(jnp.abs(out_alone - out_with_others))) > 1e-6


@pytest.mark.slow
def test_resnet_layernorm_matches_dense_oracle_and_ignores_chunks():
    with jax.enable_x64(True):
        model, params, objective, x, y = _setup("resnet", 4, width=1, depth=8,
                                                norm="layer")
        assert not model.has_state
        H, _, _ = _check_against_oracle(model, params, objective, x, y, 4)
        flat, unravel = ravel_pytree(params)
        whole = _oracle_loss(model.apply, x, y, N)   # per example: chunks do not matter
        H_whole = jax.jit(jax.hessian(lambda f: whole(unravel(f))))(flat)
        assert float(jnp.max(jnp.abs(H - H_whole))) < 1e-9 * float(jnp.max(jnp.abs(H)))


@pytest.mark.parametrize("pool", ["cls", pytest.param("mean", marks=pytest.mark.slow)])
def test_vit_on_1d_patches_matches_dense_oracle(pool):
    with jax.enable_x64(True):
        x, y = data_lib.load("gaussian_mixture", N, seed=0, input_dim=16, num_classes=10)
        module = models.make_vit((16,), 10, width=4, depth=1, patch_size=4, pool=pool)
        model = models.plugin.from_module(module, "vit", (16,), key=jax.random.key(1),
                                          dtype=jnp.float64)
        params = _perturbed(model.params)
        assert model.num_params < 400 and ("cls" in params) == (pool == "cls")
        objective = Objective(model.apply, losses.per_example_loss("mse"),
                              chunk_data(x, y, 4, dtype=jnp.float64))
        _check_against_oracle(model, params, objective, jnp.asarray(x, jnp.float64),
                              jnp.asarray(y), 4)


def test_patches_tile_the_input_in_order():
    x = jnp.arange(2 * 4 * 6, dtype=jnp.float32).reshape(2, 4, 6)
    patches = models.vit.patchify(x, 2)
    assert patches.shape == (2, 6, 4)
    np.testing.assert_array_equal(patches[0, 1], [2, 3, 8, 9])     # row 0, column-block 1
    np.testing.assert_array_equal(models.vit.patchify(x[:, 0], 3)[1], [[24, 25, 26],
                                                                       [27, 28, 29]])


@pytest.mark.slow
@requires_fashion_mnist
def test_two_dimensional_families_on_fashion_mnist():
    x, _ = data_lib.load("fashion_mnist", 4, seed=0)
    for name, family in (("resnet", dict(width=2, depth=8, norm="batch")),
                         ("vit", dict(width=8, depth=1, patch_size=7))):
        P, has_state = models.describe(name, (28, 28), 10, activation="relu", **family)
        model = models.build_model(name, (28, 28), 10, key=jax.random.key(0), **family)
        assert P == model.num_params and has_state == model.has_state
        assert model.apply(model.params, jnp.asarray(x)).shape == (4, 10)
    # resnet convolves in 2-D: 3×3 kernels on images, length-3 on MNIST-1D.
    image = models.build_model("resnet", (28, 28), 10, width=2, depth=8, key=jax.random.key(0))
    sequence = models.build_model("resnet", (40,), 10, width=2, depth=8, key=jax.random.key(0))
    assert image.params["Conv_0"]["kernel"].shape == (3, 3, 1, 2)
    assert sequence.params["Conv_0"]["kernel"].shape == (3, 1, 2)


@pytest.mark.parametrize("name, settings, flag", [
    ("resnet", dict(width=4, depth=9, norm="none"), "--depth=9"),
    ("resnet", dict(width=4, depth=200, norm="none"), "--depth=200"),
    ("resnet", dict(width=1000, depth=8, norm="none"), "--width=1000"),
    ("resnet", dict(width=4, depth=8, norm="group"), "--norm='group'"),
    ("vit", dict(width=6, depth=1), "--width=6"),
    ("vit", dict(width=8, depth=30), "--depth=30"),
    ("vit", dict(width=8, depth=1, patch_size=3), "--patch_size=3"),
    ("mlp", dict(width=8, depth=1, norm="batch"), "--norm='batch'"),
])
def test_family_settings_refused_naming_the_flag(name, settings, flag):
    with pytest.raises(models.ModelError, match=re.escape(flag)):
        models.describe(name, (40,), 10, activation="relu", **settings)
