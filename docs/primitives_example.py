# The README's "Using the primitives" example; tests/test_readme_example.py runs this file.
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from lossland.curvature import hvp, lanczos_top_k
from lossland.subspace import subspace_fraction

model = nn.Sequential([nn.Dense(64), nn.tanh, nn.Dense(3)])          # your own Flax model
x = jax.random.normal(jax.random.key(0), (256, 10))
y = jax.random.randint(jax.random.key(1), (256,), 0, 3)
params = model.init(jax.random.key(2), x)

def loss_fn(p):                                                     # mean cross-entropy
    logits = model.apply(p, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

flat, unravel = ravel_pytree(params)
matvec = jax.jit(lambda v: ravel_pytree(hvp(loss_fn, params, unravel(v)))[0])
top = lanczos_top_k(matvec, jax.random.normal(jax.random.key(3), flat.shape), k=5,
                    num_iters=40, tol=1e-4)
g = ravel_pytree(jax.grad(loss_fn)(params))[0]
print("top eigenvalues", top.eigenvalues, "residuals", top.residuals)
print("chi_5 =", subspace_fraction(g, top.eigenvectors))
