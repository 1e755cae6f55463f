"""The curvature of one trained model: `python -m experiments.analyze`.

What PyHessian is mostly used for, on lossland's kernels: at one point θ of a
run (its last checkpoint, or --step), or of a params file, the top-k Hessian
eigenpairs with their residuals, λ_min, an SLQ spectral density and the
Hutchinson trace with its standard error, of the full-batch training loss
exactly as the driver trains it (BatchNorm: training mode, ghost batches).

    python -m experiments.analyze --run_dir=runs/demo --workdir=runs/demo_analysis
    python -m experiments.analyze --run_dir=runs/demo --step=1000 --k=20 --workdir=...
    python -m experiments.analyze --params=theta.npz --model=mlp --width=256 --workdir=...
    python -m experiments.analyze --params=runs/demo --model=mlp --width=256 --workdir=...

With --run_dir the model and data settings come from RUN/config.json (the
flags of this command then set only the solver: --k, --lanczos_iters,
--lanczos_tol, --num_probes, --slq_iters, --seed_probes). With --params the
driver's model and data flags describe the model; the params are an .npz with
one array per params leaf, named by its path ("Dense_0/kernel"), as
`save_params_npz` writes it, or a driver checkpoint (orbax): a run directory or
its checkpoints/ folder (the newest committed checkpoint) or one checkpoint's
folder. Only the params are read from a checkpoint (not the optimizer state),
so the optimizer flags need not match the run's.

Writes into --workdir: analysis.json (keys step, eigenvalues, residuals,
min_eigenvalue, min_residual, trace, trace_stderr, density, settings) and
density.png. Every setting is checked before any compute; nothing is written
on a refusal.
"""

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax.flatten_util import ravel_pytree

from lossland import checkpoints, cli, config as config_lib, curvature, data as data_lib
from lossland import experiment as experiment_lib, models, plots, records, sharding
from lossland.objective import flat_matvec

cli.define_run_flags(workdir="runs/analysis")
flags.DEFINE_string("run_dir", None, "A driver run: analyze its last checkpoint (or --step); "
                    "model and data settings from its config.json.")
flags.DEFINE_integer("step", None, "With --run_dir: the checkpoint step (default: the last).",
                     lower_bound=0)
flags.DEFINE_string("params", None, "Params for the model the driver's flags describe: an "
                    ".npz (one array per leaf, named by its path, e.g. Dense_0/kernel), or a "
                    "driver checkpoint: a run directory or its checkpoints/ folder (the newest "
                    "committed checkpoint) or one checkpoint's folder (RUN/checkpoints/<step>).")
flags.DEFINE_integer("k", 10, "Top eigenpairs.", lower_bound=1)
flags.DEFINE_integer("num_probes", 30, "Probes of the Hutchinson trace and of the SLQ density.",
                     lower_bound=2)
flags.DEFINE_integer("slq_iters", 40, "Lanczos steps per SLQ probe.", lower_bound=2)
flags.DEFINE_integer("seed_probes", 0, "Seed of the start vectors and probes.", lower_bound=0)

SOLVER_FLAGS = ("lanczos_iters", "lanczos_tol")
ANALYSIS_FILE = "analysis.json"


class AnalyzeError(ValueError):
    """A bad --run_dir, --step or --params; the message names the flag."""


# ----------------------------------------------------------------------------
# Params files: one array per leaf, named by its path
# ----------------------------------------------------------------------------

def leaf_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def named_leaves(params) -> dict:
    return {leaf_name(path): leaf for path, leaf in
            jax.tree_util.tree_flatten_with_path(params)[0]}


def save_params_npz(path, params) -> None:
    """Writes params as analyze's --params reads them."""
    np.savez(path, **{name: np.asarray(leaf) for name, leaf in named_leaves(params).items()})


def params_source(path: str) -> tuple[Path, int | None]:
    """Where --params points: (an .npz file, None), or (a checkpoints folder, its step).

    A folder is an orbax checkpoint of the driver: one checkpoint's folder
    (`RUN/checkpoints/<step>`), a checkpoints folder, or a run directory; the
    last two give their newest committed checkpoint. Anything else is refused.
    """
    where = Path(path)
    if where.is_file() or not where.exists():
        return where, None          # an .npz (check_params_file says what is wrong with it)
    if checkpoints.is_committed_checkpoint(where):
        return where.parent, int(where.name)
    for folder in (where, where / records.CHECKPOINT_DIR):
        steps = checkpoints.committed_steps_in(folder)
        if steps:
            return folder, steps[-1]
    if (where / records.CHECKPOINT_DIR).is_dir() or (where / records.CONFIG_FILE).is_file():
        raise AnalyzeError(f"--params={path} is a driver run directory that holds no "
                           f"committed checkpoint (in {where / records.CHECKPOINT_DIR}); there "
                           "is no θ to analyze. Run or resume it until it saves one.")
    raise AnalyzeError(f"--params={path} is neither an .npz file nor an orbax checkpoint of "
                       "the driver. Give a params .npz (save_params_npz), a run directory or "
                       "its checkpoints/ folder (the newest committed checkpoint is used), or "
                       "one checkpoint's folder (RUN/checkpoints/<step>).")


def check_params_file(path: str, template) -> None:
    """Refuses a params file or checkpoint that is missing, unreadable, or does not fit the
    model's leaves (names and shapes, from `template`'s shapes), naming the first leaf that
    differs."""
    folder, step = params_source(path)
    if step is not None:
        shapes = {name: leaf.shape for name, leaf in
                  named_leaves(checkpoints.params_shapes(folder, step)).items()}
        return _check_leaf_shapes(f"--params={path} (checkpoint of step {step})", shapes,
                                  template)
    if not Path(path).is_file():
        raise AnalyzeError(f"--params={path}: no such file or directory.")
    try:
        with np.load(path) as f:
            shapes = {name: f[name].shape for name in f.files}
    except Exception as e:
        raise AnalyzeError(f"--params={path} is not a readable .npz ({type(e).__name__}: {e})."
                           ) from None
    _check_leaf_shapes(f"--params={path}", shapes, template)


def _check_leaf_shapes(what: str, shapes: dict, template) -> None:
    expected = {name: tuple(leaf.shape) for name, leaf in named_leaves(template).items()}
    for name, shape in expected.items():
        if name not in shapes:
            raise AnalyzeError(f"{what} has no array for the model's leaf {name!r} "
                               f"(shape {shape}); it holds {sorted(shapes)[:8]}. Check the "
                               "model flags (--model, --width, --depth, ...).")
        if tuple(shapes[name]) != shape:
            raise AnalyzeError(f"{what}: leaf {name!r} has shape "
                               f"{tuple(shapes[name])}, the model's has shape {shape}. Check "
                               "the model flags (--model, --width, --depth, ...).")
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise AnalyzeError(f"{what} holds arrays the model has no leaf for: "
                           f"{extra[:8]}. Check the model flags.")


def params_arrays(path: str) -> dict:
    """{leaf name: NumPy array} of --params, an .npz or a driver checkpoint (params_source)."""
    folder, step = params_source(path)
    if step is not None:
        return {name: np.asarray(leaf) for name, leaf in
                named_leaves(checkpoints.read_params(folder, step)).items()}
    with np.load(path) as f:
        return {name: f[name] for name in f.files}


def load_params(path: str, template):
    """The params of --params (an .npz or a driver checkpoint) in template's tree and dtypes."""
    arrays = params_arrays(path)
    names = list(named_leaves(template))
    leaves, treedef = jax.tree_util.tree_flatten(template)
    return jax.tree_util.tree_unflatten(treedef, [
        jnp.asarray(arrays[name], leaf.dtype) for name, leaf in zip(names, leaves)])


def load_params_npz(path: str, template):
    """`load_params` of an .npz (kept for callers of the .npz-only name)."""
    return load_params(path, template)


# ----------------------------------------------------------------------------
# Start-up: the config and the point to analyze, checked before any compute
# ----------------------------------------------------------------------------

def run_dir_config(run_dir: str, step, overrides: dict) -> tuple[config_lib.RunConfig, int]:
    """The saved run's RunConfig (solver and record flags from this command) and the step."""
    path = Path(run_dir)
    if not (path / records.CONFIG_FILE).is_file():
        raise AnalyzeError(f"--run_dir={run_dir} holds no {records.CONFIG_FILE}: it is not a "
                           "lossland run. Pass the --workdir of a driver run.")
    steps = checkpoints.committed_steps(path)
    if not steps:
        raise AnalyzeError(f"--run_dir={run_dir} holds no committed checkpoint (in "
                           f"{path / records.CHECKPOINT_DIR}); there is no θ to analyze. Run "
                           "or resume it until it saves one.")
    if step is not None and step not in steps:
        raise AnalyzeError(f"--step={step} is not allowed: --run_dir={run_dir} has "
                           f"checkpoints at steps {steps}.")
    saved = records.read_config_flags(path)
    fields = config_lib.RunConfig.__dataclass_fields__
    values = {k: v for k, v in saved.items() if k in fields}
    values["eos_band"] = tuple(values.get("eos_band", config_lib.RunConfig.eos_band))
    cfg = config_lib.RunConfig(**{**values, **overrides})
    return cfg, steps[-1] if step is None else step


def settings_from_flags(f) -> tuple[config_lib.RunConfig, int | None]:
    if bool(f.run_dir) == bool(f.params):
        raise AnalyzeError("give exactly one of --run_dir=RUN (a driver run) and --params=FILE "
                           f"(.npz or a driver checkpoint); got --run_dir={f.run_dir!r}, --params={f.params!r}.")
    if f.step is not None and not f.run_dir:
        raise AnalyzeError(f"--step={f.step} is for --run_dir; a --params file is one θ.")
    record = {"workdir": f.workdir, "overwrite": f.overwrite, "resume": False, "plots": f.plots,
              **{k: f[k].value for k in SOLVER_FLAGS}}
    if f.run_dir:
        cfg, step = run_dir_config(f.run_dir, f.step, record)
    else:
        cfg, step = cli.config_from_flags(**record), None
    config_lib.validate(cfg)
    return cfg, step


def check_solver(k: int, num_params: int, lanczos_iters: int) -> None:
    if k > min(num_params, lanczos_iters):
        raise AnalyzeError(f"--k={k} is not allowed: at most min(P={num_params}, "
                           f"--lanczos_iters={lanczos_iters}) eigenpairs can be found. Lower "
                           "--k or raise --lanczos_iters.")


# ----------------------------------------------------------------------------
# The analysis
# ----------------------------------------------------------------------------

def _progress(message: str, start: float) -> None:
    print(f"analyze: {message} ({time.time() - start:.1f} s)", file=sys.stderr, flush=True)


def analyze(objective, params, *, k: int, num_iters: int, tol: float | None, key,
            num_probes: int, slq_iters: int, start: float | None = None) -> dict:
    """Top-k, λ_min, Hutchinson trace and SLQ density of the Hessian of `objective` at params."""
    start = time.time() if start is None else start
    matvec = flat_matvec(objective.hvp_fn, params, objective.data)
    flat = ravel_pytree(params)[0]
    keys = jax.random.split(key, 4)
    v0 = jax.random.normal(keys[0], flat.shape, flat.dtype)
    _progress(f"top-{k} eigenpairs of H (P={flat.size}, ≤ {num_iters} HVPs)", start)
    top = curvature.lanczos_top_k(matvec, v0, k, num_iters, tol=tol)
    _progress(f"λ1 = {float(top.eigenvalues[0]):.6g} after {int(top.num_matvecs)} HVPs", start)
    # λ_min: the same Lanczos keeping the smallest Ritz pair (the Krylov space of H is
    # that of −H, so this is the old −(top eigenvalue of −H) without the negated matvec).
    bottom = curvature.lanczos_top_k(matvec, jax.random.normal(keys[1], flat.shape, flat.dtype),
                                     1, num_iters, tol=tol, which="smallest")
    min_eigenvalue = float(bottom.eigenvalues[0])
    _progress(f"λ_min = {min_eigenvalue:.6g} after {int(bottom.num_matvecs)} HVPs", start)
    trace = curvature.hutchinson_trace(matvec, flat, keys[2], num_probes)
    _progress(f"trace = {float(trace.estimate):.6g} ± {float(trace.std_error):.2g} "
              f"({num_probes} probes)", start)
    lam1 = float(top.eigenvalues[0])
    scale = max(abs(lam1), abs(min_eigenvalue), 1e-12)
    lo = min(min_eigenvalue, 0.0) - 0.05 * scale
    grid = jnp.linspace(lo, max(lam1, 0.0) + 0.05 * scale, 400, dtype=flat.dtype)
    density = curvature.slq_density(matvec, flat, keys[3], num_probes, slq_iters, grid,
                                    scale / 100.0)
    _progress("SLQ density done", start)
    return {"eigenvalues": np.asarray(top.eigenvalues).tolist(),
            "residuals": np.asarray(top.residuals).tolist(),
            "num_matvecs": int(top.num_matvecs),
            "min_eigenvalue": min_eigenvalue,
            "min_residual": float(bottom.residuals[0]),
            "trace": float(trace.estimate), "trace_stderr": float(trace.std_error),
            "density": {"grid": np.asarray(grid).tolist(),
                        "density": np.asarray(density.density).tolist()},
            "num_params": int(flat.size)}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    start = time.time()
    try:
        cfg, step = settings_from_flags(f)
        workdir = records.check_workdir(cfg.workdir, overwrite=cfg.overwrite)
        experiment_lib.enable_dtype(cfg.dtype)
        info = experiment_lib.validate_model_bounds(cfg)
        num_params = models.count_params(
            cfg.model, info.input_shape, info.num_classes, width=cfg.width, depth=cfg.depth,
            activation=cfg.activation, model_kwargs=cfg.model_kwargs, norm=cfg.norm,
            patch_size=cfg.patch_size)
        check_solver(f.k, num_params, cfg.lanczos_iters)
        if f.params:
            template = jax.eval_shape(lambda: models.build_model(
                cfg.model, info.input_shape, info.num_classes, width=cfg.width,
                depth=cfg.depth, activation=cfg.activation, key=jax.random.key(0),
                model_kwargs=cfg.model_kwargs, norm=cfg.norm, patch_size=cfg.patch_size
            ).params)
            check_params_file(f.params, template)
        exp = experiment_lib.build_experiment(cfg)
    except (AnalyzeError, config_lib.ConfigError, data_lib.DataError, records.WorkdirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if f.params:
        params = load_params(f.params, exp.model.params)
        step = params_source(f.params)[1]    # a checkpoint's step; None for an .npz
    else:
        template = checkpoints.initial_state(exp.model.params,
                                             exp.optimizer.init(exp.model.params),
                                             cfg.track_k if cfg.track_every else 1,
                                             model_state=exp.model.state)
        params = checkpoints.CheckpointManager(f.run_dir).restore(template, step).params
    params = sharding.replicate(params, exp.mesh)
    result = analyze(exp.objective, params, k=f.k, num_iters=cfg.lanczos_iters,
                     tol=cfg.lanczos_tol or None, key=jax.random.key(f.seed_probes),
                     num_probes=f.num_probes, slq_iters=f.slq_iters, start=start)
    records.prepare_workdir(workdir, overwrite=cfg.overwrite)
    source = {"run_dir": str(Path(f.run_dir).resolve())} if f.run_dir else {
        "params": str(Path(f.params).resolve())}
    analysis = {"step": step, **result, "source": source,
                "settings": {"k": f.k, "lanczos_iters": cfg.lanczos_iters,
                             "lanczos_tol": cfg.lanczos_tol, "num_probes": f.num_probes,
                             "slq_iters": f.slq_iters, "seed_probes": f.seed_probes,
                             "run": records.to_jsonable(cfg.asdict())}}
    records.write_json_atomic(workdir / ANALYSIS_FILE, analysis)
    if cfg.plots:
        plots.plot_density([{"step": step if step is not None else "params",
                             **result["density"]}], workdir / "density.png")
    print(json.dumps({k: analysis[k] for k in ("step", "eigenvalues", "min_eigenvalue",
                                                "trace", "trace_stderr")}))
    print(f"analysis in {workdir / ANALYSIS_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    app.run(main)
