"""Line probes through θ, the valley floor along a line, and power-law fits (claims C1, C2).

Definitions (MISSION.md, "Line probe", "Candidate singular point"): along a unit
direction u, on a grid of s,

    loss(s)          = L(θ + s u)
    slope(s)         = ∇L(θ + s u) · u            (= d loss / ds)
    curvature(s)     = uᵀ H(θ + s u) u            (= d² loss / ds²)
    grad_norm(s)     = ‖∇L(θ + s u)‖
    grad_norm_perp(s)= ‖∇L − (∇L·u) u‖

The valley floor s* is the grid minimizer of the loss, refined by bisection on
the sign of the slope inside the grid cell that brackets it. Local behaviour
at s* is read from log–log fits of |slope| and |curvature| against |s − s*|,
separately on each side: exponent ≈ 1 for a smooth quadratic valley, ≈ 0 for a
kink, < 0 where the gradient diverges.

Public API:

    line_probe(loss_fn, params, direction, s_grid)            -> LineProbe
    find_valley_floor(loss_fn, params, direction, s_max)      -> ValleyFloor
    fit_power_law(r, y)                                       -> PowerLawFit
    make_prober(objective, *, s_max, num_points, num_random_directions)

At one point, the loss and gradient come from one reverse pass and the
curvature uᵀHu = d²/ds² L(θ + s u) from a forward-over-forward pass. This equals
uᵀ·`curvature.hvp(L, θ, u)` (tested) but skips the P-vector Hu: on the
MLP 40-256-256-10 it costs ~0.6× of the forward-over-reverse HVP.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

PyTree = Any
HIGHEST = jax.lax.Precision.HIGHEST


class LineProbe(NamedTuple):
    """Arrays over the grid, each of shape s.shape."""
    s: jax.Array
    loss: jax.Array
    slope: jax.Array
    curvature: jax.Array
    grad_norm: jax.Array
    grad_norm_perp: jax.Array


class ValleyFloor(NamedTuple):
    """The valley floor along a line.

    s_star: the refined minimizer. loss, slope: at s*. bracketed: a sign change
    of the slope was found next to the grid minimum and bisected. at_edge: the
    grid minimum sits at an end of the grid with the loss still falling
    outward, so the true floor lies beyond ±s_max and s* = that end.
    """
    s_star: jax.Array
    loss: jax.Array
    slope: jax.Array
    bracketed: jax.Array
    at_edge: jax.Array


class PowerLawFit(NamedTuple):
    """y ≈ C r^exponent by OLS of log y on log r, with a t-interval on the exponent."""
    exponent: float
    ci_low: float
    ci_high: float
    intercept: float      # log C
    r_min: float
    r_max: float
    num_points: int


# ----------------------------------------------------------------------------
# Kernels on the flat view θ ∈ R^P
# ----------------------------------------------------------------------------

def _unit(direction, theta):
    """Flat unit vector from a pytree or (P,) direction; a zero direction stays 0."""
    u = direction if isinstance(direction, jax.Array) and direction.ndim == 1 \
        else ravel_pytree(direction)[0]
    u = jnp.asarray(u, theta.dtype)
    if u.shape != theta.shape:
        raise ValueError(f"direction has {u.shape[0]} entries, params have {theta.shape[0]}.")
    norm = jnp.linalg.norm(u)
    return u / jnp.where(norm > 0, norm, 1.0)


def value_grad_curvature_fn(flat_loss: Callable) -> Callable:
    """(θ, u) -> (L(θ), ∇L(θ), uᵀH(θ)u) for a flat loss.

    One reverse pass for (L, ∇L); uᵀHu as the second directional derivative,
    jvp of jvp (forward over forward), without forming H u.
    """
    def kernel(theta, u):
        loss, grad = jax.value_and_grad(flat_loss)(theta)
        directional = lambda t: jax.jvp(flat_loss, (t,), (u,))[1]
        _, curv = jax.jvp(directional, (theta,), (u,))
        return loss, grad, curv
    return kernel


def _point(kernel, theta, u, s):
    """Every probe quantity at θ + s u, from kernel(θ, u) -> (L, ∇L, uᵀHu)."""
    loss, grad, curv = kernel(theta + s * u, u)
    slope = jnp.dot(grad, u, precision=HIGHEST)
    perp = jnp.linalg.norm(grad - slope * u)   # direct, not √(‖g‖² − slope²): no cancellation
    return loss, slope, curv, jnp.linalg.norm(grad), perp


def _map(fn, xs, batch_size: Optional[int]):
    """vmap when batch_size is None, else lax.map in batches of batch_size (bounded memory)."""
    if batch_size is None:
        return jax.vmap(fn)(xs)
    return jax.lax.map(fn, xs, batch_size=max(1, int(batch_size)))


def _slopes(flat_loss, theta, U, s):
    """Loss and slope at θ + s_i U_i for rows U_i of U; forward mode only (no gradient)."""
    def one(u, s_i):
        return jax.jvp(flat_loss, (theta + s_i * u,), (u,))
    return jax.vmap(one)(U, s)


def _valley_floors(flat_loss, theta, U, s_grid, losses, slopes, num_bisect: int) -> ValleyFloor:
    """Refines the grid minimum of each row of losses (D, S) by bisection on the slope sign.

    The bracket is the grid cell next to the minimum where the slope goes from ≤ 0
    to ≥ 0 (left cell first). All D directions bisect together, one vmapped
    forward-mode slope evaluation per iteration, inside one fori_loop.
    """
    last = s_grid.shape[0] - 1
    rows = jnp.arange(losses.shape[0])
    i = jnp.argmin(jnp.where(jnp.isfinite(losses), losses, jnp.inf), axis=1)
    slope_at = lambda j: slopes[rows, jnp.clip(j, 0, last)]
    left_ok = (i > 0) & (slope_at(i - 1) <= 0) & (slope_at(i) >= 0)
    right_ok = (i < last) & (slope_at(i) <= 0) & (slope_at(i + 1) >= 0)
    bracketed = left_ok | right_ok
    lo = jnp.where(left_ok, s_grid[jnp.clip(i - 1, 0, last)], s_grid[i])
    hi = jnp.where(left_ok, s_grid[i], s_grid[jnp.clip(i + 1, 0, last)])

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        _, slope_mid = _slopes(flat_loss, theta, U, mid)
        up = slope_mid > 0   # NaN (e.g. exactly at a cusp) counts as "not up": keeps moving
        return jnp.where(up, lo, mid), jnp.where(up, mid, hi)

    lo, hi = jax.lax.fori_loop(0, num_bisect, body, (lo, hi))
    s_star = jnp.where(bracketed, 0.5 * (lo + hi), s_grid[i])
    at_edge = ~bracketed & ((i == 0) & (slope_at(i) > 0) | (i == last) & (slope_at(i) < 0))
    loss_star, slope_star = _slopes(flat_loss, theta, U, s_star)
    return ValleyFloor(s_star, loss_star, slope_star, bracketed, at_edge)


def _default_bisections(dtype, num_points: int) -> int:
    # A grid cell is 2 s_max/(S − 1) wide; halve it until it is below eps·s_max,
    # the resolution of s in this dtype (finer steps no longer move θ + s u).
    eps = float(jnp.finfo(dtype).eps)
    return int(math.ceil(math.log2(2.0 / (max(num_points - 1, 1) * eps)))) + 1


# ----------------------------------------------------------------------------
# Public primitives: a loss function of a params pytree
# ----------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("loss_fn", "batch_size"))
def line_probe(loss_fn: Callable[[PyTree], jax.Array], params: PyTree, direction,
               s_grid: jax.Array, *, batch_size: Optional[int] = None) -> LineProbe:
    """Loss, slope, curvature, ‖∇L‖ and its part ⊥ u along θ + s u, u = direction/‖direction‖.

    Args:
      loss_fn: params pytree -> scalar. Must be hashable (a function, not a
        fresh lambda per call, if you want the compiled probe reused).
      params: the point θ (pytree).
      direction: a pytree like params, or a flat (P,) vector in ravel_pytree order.
      s_grid: (S,) offsets along the unit direction.
      batch_size: None evaluates all S points at once (vmap); an int evaluates
        them batch_size at a time (lax.map), bounding memory.
    Returns:
      LineProbe of (S,) arrays. Cost per point: about one gradient plus three forward passes.
    """
    theta, unravel = ravel_pytree(params)
    u = _unit(direction, theta)
    kernel = value_grad_curvature_fn(lambda t: loss_fn(unravel(t)))
    s_grid = jnp.asarray(s_grid, theta.dtype)
    out = _map(lambda s: _point(kernel, theta, u, s), s_grid, batch_size)
    return LineProbe(s_grid, *out)


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_points", "num_bisect"))
def find_valley_floor(loss_fn: Callable[[PyTree], jax.Array], params: PyTree, direction,
                      s_max: float, *, num_points: int = 41,
                      num_bisect: Optional[int] = None) -> ValleyFloor:
    """The minimizer s* of L(θ + s u) on [−s_max, s_max]: grid minimum, then bisection.

    The loss and slope on the grid come from forward-mode passes only. When no
    sign change of the slope brackets the grid minimum, s* is that grid point
    (`bracketed` False); when it sits at ±s_max with the loss still falling
    outward, `at_edge` is True: the floor is farther than s_max.

    Returns:
      ValleyFloor of scalars.
    """
    theta, unravel = ravel_pytree(params)
    u = _unit(direction, theta)[None]
    flat_loss = lambda t: loss_fn(unravel(t))
    s_grid = jnp.linspace(-s_max, s_max, num_points, dtype=theta.dtype)
    losses, slopes = jax.vmap(lambda s: _slopes(flat_loss, theta, u, s[None]))(s_grid)
    floor = _valley_floors(flat_loss, theta, u, s_grid, losses.T, slopes.T,
                           num_bisect or _default_bisections(theta.dtype, num_points))
    return jax.tree_util.tree_map(lambda a: a[0], floor)


def fit_power_law(r, y, *, confidence: float = 0.95) -> PowerLawFit:
    """Log–log OLS of y against r: log y = intercept + exponent · log r.

    Points with r ≤ 0, y ≤ 0 or non-finite values are dropped (pass |slope|,
    |curvature|). The interval is the two-sided Student-t interval of the OLS
    slope (n − 2 degrees of freedom); NaN with fewer than 3 points, and the
    exponent is NaN with fewer than 2 points or a single distinct r.
    """
    import scipy.stats

    r = np.asarray(r, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    keep = np.isfinite(r) & np.isfinite(y) & (r > 0) & (y > 0)
    r, y = r[keep], y[keep]
    n = int(r.size)
    nan = float("nan")
    if n < 2 or np.ptp(np.log(r)) == 0:
        return PowerLawFit(nan, nan, nan, nan, float(r.min()) if n else nan,
                           float(r.max()) if n else nan, n)
    x, z = np.log(r), np.log(y)
    x_mean = x.mean()
    sxx = np.sum((x - x_mean) ** 2)
    exponent = float(np.sum((x - x_mean) * (z - z.mean())) / sxx)
    intercept = float(z.mean() - exponent * x_mean)
    lo = hi = nan
    if n >= 3:
        residual = z - intercept - exponent * x
        stderr = math.sqrt(float(np.sum(residual ** 2)) / (n - 2) / sxx)
        half = float(scipy.stats.t.ppf(0.5 + confidence / 2, n - 2)) * stderr
        lo, hi = exponent - half, exponent + half
    return PowerLawFit(exponent, lo, hi, intercept, float(r.min()), float(r.max()), n)


def side_fits(s, values, s_star) -> tuple[PowerLawFit, PowerLawFit]:
    """fit_power_law of |values| against |s − s*|, for s < s* (left) and s > s* (right)."""
    s, values = np.asarray(s, np.float64), np.abs(np.asarray(values, np.float64))
    left, right = s < s_star, s > s_star
    return (fit_power_law(s_star - s[left], values[left]),
            fit_power_law(s[right] - s_star, values[right]))


# ----------------------------------------------------------------------------
# The prober the training runner calls at probed steps
# ----------------------------------------------------------------------------

def _objective_kernel(objective, unravel, data):
    """Chunked full-batch (θ, u) -> (L, ∇L, uᵀHu) on the flat view; a mean over examples."""
    from lossland import objective as objective_lib

    def kernel(theta, u):
        def chunk(x, y, mask):
            chunk_loss = lambda t: objective_lib.masked_loss_sum(
                objective.apply_fn, objective.per_example_loss, unravel(t), x, y, mask)[0]
            return value_grad_curvature_fn(chunk_loss)(theta, u)
        loss, grad, curv = objective_lib.reduce_chunks(chunk, data)
        return loss / data.n, grad / data.n, curv / data.n
    return kernel


def direction_names(num_random_directions: int) -> list[str]:
    """Probe directions, in order: top eigenvector, gradient, last displacement, the top
    eigenvector at the run's first tracked step (a control for C2), random."""
    return ["v1", "grad", "disp", "v1init"] + [f"rand{j}" for j in range(num_random_directions)]


def _default_batch_size(data) -> int:
    # On CPU one point at a time is fastest (measured: the per-point matmuls already
    # use every core, and batching only adds memory traffic). On accelerators, about
    # 16k example evaluations in flight: enough work per batch, bounded memory.
    if jax.default_backend() == "cpu":
        return 1
    return max(1, 16384 // max(1, data.chunk_size))


class ProbeScale(NamedTuple):
    """The probed iterate's own length scales, and the half-range they give (scalars).

    step_length: ℓ = η‖∇L(θ)‖, the length of the GD step from θ.
    param_norm: ‖θ‖.
    s_max: the half-range probed: max(steps·ℓ, theta_fraction·‖θ‖) when either is
      set (`probe_half_range`), else the fixed s_max.
    disp_v1_alignment: cos²(d, v1) of the last displacement d and v1 (0 when d = 0):
      near 1 when the last step moved along v1, as in a period-2 oscillation.
    """
    step_length: jax.Array
    param_norm: jax.Array
    s_max: jax.Array
    disp_v1_alignment: jax.Array


def probe_half_range(fixed: float, *, lr: float, steps: float, theta_fraction: float,
                     grad_norm, param_norm):
    """The probe half-range tied to the run: max(steps·η‖∇L‖, theta_fraction·‖θ‖) in the
    units of the iterate (GD step lengths, and ‖θ‖); `fixed` when both factors are 0."""
    if not steps and not theta_fraction:
        return jnp.asarray(fixed, jnp.result_type(grad_norm))
    return jnp.maximum(steps * lr * grad_norm, theta_fraction * param_norm)


def make_probe_grids(objective, *, s_max: float, num_points: int, num_random_directions: int,
                     batch_size: Optional[int] = None, lr: float = 0.0,
                     s_max_steps: float = 0.0, s_max_theta: float = 0.0):
    """Jitted `probe(params, data, v1_flat, displacement_flat, key, v1_init_flat) -> (grids,
    floors, scale)`.

    grids: LineProbe of (D, S) arrays over the directions of `direction_names`;
    floors: ValleyFloor of (D,) arrays; scale: ProbeScale. A zero displacement or
    v1_init gives a zero direction (its entries are meaningless; `make_prober`
    drops them). The half-range is `s_max`, or tied to the iterate when
    `s_max_steps` or `s_max_theta` is set (`probe_half_range`; `lr` is η).
    """
    names = direction_names(num_random_directions)

    def probe(params, data, v1, displacement, key, v1_init):
        theta, unravel = ravel_pytree(params)
        flat_loss = lambda t: objective.loss_fn(unravel(t), data)
        _, _, grad = objective.loss_accuracy_grad_fn(params, data)
        g = ravel_pytree(grad)[0]
        rand = jax.random.normal(key, (num_random_directions,) + theta.shape, theta.dtype)
        U = jnp.stack([_unit(d, theta) for d in [v1, g, displacement, v1_init, *rand]])
        grad_norm, param_norm = jnp.linalg.norm(g), jnp.linalg.norm(theta)
        half = probe_half_range(s_max, lr=lr, steps=s_max_steps, theta_fraction=s_max_theta,
                                grad_norm=grad_norm, param_norm=param_norm)
        scale = ProbeScale(lr * grad_norm, param_norm, half,
                           jnp.dot(U[0], U[2], precision=HIGHEST) ** 2)
        s_grid = jnp.linspace(-1.0, 1.0, num_points, dtype=theta.dtype) * half
        kernel = _objective_kernel(objective, unravel, data)
        d_idx, s_idx = jnp.divmod(jnp.arange(len(names) * num_points), num_points)
        point = lambda ij: _point(kernel, theta, U[ij[0]], s_grid[ij[1]])
        size = batch_size or _default_batch_size(data)
        out = _map(point, (d_idx, s_idx), size)
        grids = LineProbe(jnp.broadcast_to(s_grid, (len(names), num_points)),
                          *(a.reshape(len(names), num_points) for a in out))
        floors = _valley_floors(flat_loss, theta, U, s_grid, grids.loss, grids.slope,
                                _default_bisections(theta.dtype, num_points))
        return grids, floors, scale

    return jax.jit(probe)


def summarize_probe(name: str, grids: LineProbe, floor: ValleyFloor) -> dict:
    """Compact JSON-able summary of one direction's probe (host-side numpy)."""
    s = np.asarray(grids.s, np.float64)
    s_star = float(floor.s_star)
    slope_l, slope_r = side_fits(s, grids.slope, s_star)
    curv_l, curv_r = side_fits(s, grids.curvature, s_star)
    center = int(np.argmin(np.abs(s)))
    finite_max = lambda a: float(np.nanmax(np.where(np.isfinite(a), a, np.nan))) \
        if np.any(np.isfinite(a)) else float("nan")
    p = f"probe_{name}_"
    slope0 = float(np.asarray(grids.slope)[center])
    grad0 = float(np.asarray(grids.grad_norm)[center])
    return {
        p + "s_star": s_star,
        p + "at_edge": bool(floor.at_edge),
        p + "bracketed": bool(floor.bracketed),
        p + "loss_drop": float(np.asarray(grids.loss)[center] - floor.loss),
        p + "max_grad_norm": finite_max(np.asarray(grids.grad_norm)),
        p + "max_grad_norm_perp": finite_max(np.asarray(grids.grad_norm_perp)),
        p + "max_curvature": finite_max(np.asarray(grids.curvature)),
        p + "curvature_at_0": float(np.asarray(grids.curvature)[center]),
        # cos² of the angle between ∇L(θ) and the direction: χ_1 for v1 (a C2 alignment).
        p + "grad_alignment": slope0 ** 2 / grad0 ** 2 if grad0 > 0 else float("nan"),
        p + "slope_exponent_left": slope_l.exponent,
        p + "slope_exponent_right": slope_r.exponent,
        p + "curvature_exponent_left": curv_l.exponent,
        p + "curvature_exponent_right": curv_r.exponent,
    }


def make_prober(objective, *, s_max: float, num_points: int, num_random_directions: int,
                batch_size: Optional[int] = None, lr: float = 0.0, s_max_steps: float = 0.0,
                s_max_theta: float = 0.0):
    """The runner's prober: `prober(params, data, v1_flat, displacement_flat, key,
    v1_init_flat=None) -> dict`.

    Probes along v1, the normalized gradient, the last GD displacement (its keys
    are None when the displacement is 0, e.g. at step 0), the top eigenvector at
    the run's first tracked step (`v1init`, a control: None when not given) and
    `num_random_directions` random unit directions drawn from `key`, on
    `num_points` points of [−s_max, s_max]. The dict holds plain floats/bools:

      valley_distance            |s*| along v1 (claim C2)
      valley_distance_steps      |s*| in GD step lengths ℓ = η‖∇L(θ)‖ (None without η)
      valley_at_edge             s* along v1 hit ±s_max (the floor is farther)
      probe_s_max                the probe half-range (fixed, or tied to the iterate)
      probe_step_length          ℓ = η‖∇L(θ)‖ (None without η)
      probe_param_norm           ‖θ‖
      probe_s_max_steps          the half-range in step lengths, s_max / ℓ
      probe_s_max_theta          the half-range as a fraction of ‖θ‖
      disp_v1_alignment          cos²(last displacement, v1); None at step 0
      probe_<dir>_<quantity>     see `summarize_probe`, for dir in direction_names

    With `s_max_steps` or `s_max_theta` set, the half-range is
    max(s_max_steps·ℓ, s_max_theta·‖θ‖) at each probed iterate (`probe_half_range`).
    """
    names = direction_names(num_random_directions)
    probe = make_probe_grids(objective, s_max=s_max, num_points=num_points,
                             num_random_directions=num_random_directions, batch_size=batch_size,
                             lr=lr, s_max_steps=s_max_steps, s_max_theta=s_max_theta)

    def prober(params, data, v1_flat, displacement_flat, key, v1_init_flat=None) -> dict:
        if v1_init_flat is None:
            v1_init_flat = jnp.zeros_like(v1_flat)
        grids, floors, scale = jax.device_get(probe(params, data, v1_flat, displacement_flat,
                                                    key, v1_init_flat))
        has = {"disp": float(jnp.linalg.norm(displacement_flat)) > 0,
               "v1init": float(jnp.linalg.norm(v1_init_flat)) > 0}
        ell, norm, half = (float(x) for x in (scale.step_length, scale.param_norm,
                                                scale.s_max))
        row = {"probe_s_max": half, "probe_param_norm": norm,
               "probe_step_length": ell if lr > 0 else None,
               "probe_s_max_steps": half / ell if lr > 0 and ell > 0 else None,
               "probe_s_max_theta": half / norm if norm > 0 else None,
               "disp_v1_alignment": float(scale.disp_v1_alignment) if has["disp"] else None}
        for index, name in enumerate(names):
            summary = summarize_probe(name, jax.tree_util.tree_map(lambda a: a[index], grids),
                                      jax.tree_util.tree_map(lambda a: a[index], floors))
            if not has.get(name, True):
                summary = dict.fromkeys(summary)
            row.update(summary)
        row["valley_distance"] = abs(row["probe_v1_s_star"])
        row["valley_distance_steps"] = (row["valley_distance"] / ell if lr > 0 and ell > 0
                                        else None)
        row["valley_at_edge"] = row["probe_v1_at_edge"]
        return row

    return prober
