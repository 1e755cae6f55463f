# docs/tracker_example.py: the README's Tracker example ("Your own model and data"); a test runs it.
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import lossland
from lossland import data

x, y = data.load("mnist1d", 512)                # MNIST-1D: 512 examples of 40 features
x, y = jnp.asarray(x), jnp.asarray(y)


class MLP(nnx.Module):                          # your own NNX model
    def __init__(self, rngs):
        self.l1 = nnx.Linear(40, 64, rngs=rngs)
        self.l2 = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


graphdef, params = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)


def loss_fn(params, x, y):                      # any scalar loss of (params, *args)
    logits = nnx.merge(graphdef, params)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


optimizer = optax.sgd(0.5)
opt_state = optimizer.init(params)
tracker = lossland.Tracker(loss_fn, k=5, num_iters=40, tol=1e-3)
state = tracker.init(params, jax.random.key(1))


@jax.jit
def train_step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss


for step in range(50):
    if step % 10 == 0:                          # warm-started from the last call's vectors
        result, state = tracker.update(params, state, x, y)
        print(f"step {step}: lambda_1 = {result.eigenvalues[0]:.4f}, "
              f"chi_5 = {result.chi_k:.4f}, residual_1 = {result.residuals[0]:.1e}, "
              f"{int(result.num_matvecs)} HVPs")
    params, opt_state, loss = train_step(params, opt_state)
print(f"final loss {loss:.4f}")
