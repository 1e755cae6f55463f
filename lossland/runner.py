"""One training run: build, loop, track, record, checkpoint, resume.

Step semantics (what a row means):
  * the row with `step = t` (t < steps) describes θ_t and the update applied
    to it: loss, accuracy and gradient at θ_t, ‖θ_t‖ and ‖θ_{t+1} − θ_t‖;
  * tracked quantities in that row are also measured at θ_t;
  * the run ends with one status row, `step = steps` (or the step it stopped
    at), holding the status (`finished`, `diverged`, `interrupted`) and, when
    finite, the loss/accuracy/gradient of the final params;
  * a checkpoint "at step s" holds θ_s (and the optimizer state and warm-start
    eigenvectors that go with it), and the records of steps < s are complete.
    Resume drops every row with step ≥ s and recomputes them, so records of a
    resumed run equal those of an uninterrupted one (bitwise on CPU, except the
    timing keys).
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from lossland import checkpoints, config as config_lib, distributed, records
from lossland import data as data_lib
from lossland import losses, models, objective as objective_lib, sharding
from lossland import train as train_lib
from lossland import tracking as tracking_lib

STATUS_FINISHED, STATUS_DIVERGED, STATUS_INTERRUPTED = "finished", "diverged", "interrupted"
EXIT_CODES = {STATUS_FINISHED: 0, STATUS_DIVERGED: 3, STATUS_INTERRUPTED: 130}
TIMING_KEYS = ("wall_time", "track_time")
DENSITY_PROBES, DENSITY_ITERS = 4, 80  # SLQ snapshot: probes × Lanczos steps each


@dataclasses.dataclass
class Experiment:
    """Everything a run needs, built from a RunConfig (no files touched)."""
    cfg: config_lib.RunConfig
    x: np.ndarray
    y: np.ndarray
    model: models.Model
    objective: objective_lib.Objective
    optimizer: Any
    train_step: Any
    dtype: Any
    mesh: Any


@dataclasses.dataclass
class RunResult:
    status: str
    step: int
    workdir: Path
    last_row: dict
    message: str = ""
    action: str = "ran"   # what ensure_run did: ran, resumed, skipped (finished|diverged)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]


def set_matmul_precision(name: str) -> None:
    """Full float32 products ("highest") or the backend's fast mode ("default")."""
    jax.config.update("jax_default_matmul_precision", None if name == "default" else name)


def enable_dtype(dtype_name: str):
    """Switches JAX to 64-bit when asked; fails clearly where the backend cannot."""
    if dtype_name == "float64":
        if jax.default_backend() == "tpu":
            raise config_lib.ConfigError("--dtype=float64 is not supported on TPU backends; "
                                         "use --dtype=float32, or run on CPU or GPU.")
        jax.config.update("jax_enable_x64", True)
        return jnp.float64
    return jnp.float32


def build_experiment(cfg: config_lib.RunConfig) -> Experiment:
    """Loads data and builds model, objective, optimizer and the jitted step.

    Raises ConfigError / DataError before any file is written.
    """
    config_lib.validate(cfg)
    dtype = enable_dtype(cfg.dtype)
    set_matmul_precision(cfg.matmul_precision)
    mesh = sharding.make_mesh(cfg.num_devices)
    x, y = data_lib.load(cfg.dataset, cfg.n_train, seed=cfg.seed, data_dir=cfg.data_dir,
                         input_dim=cfg.input_dim, num_classes=cfg.num_classes)
    info = data_lib.dataset_info(cfg.dataset, cfg.input_dim, cfg.num_classes)
    init_key = jax.random.fold_in(jax.random.key(cfg.seed), 0)
    model = models.build_model(cfg.model, info.input_shape, info.num_classes, width=cfg.width,
                               depth=cfg.depth, activation=cfg.activation, key=init_key,
                               dtype=dtype)
    model = dataclasses.replace(model, params=sharding.replicate(model.params, mesh))
    # Built shard by shard from the unpadded host arrays: no padded host copy
    # stays resident, so memory grows with the data, not twice the data.
    full_data = sharding.shard_chunked(x, y, cfg.chunk_size, mesh, dtype=dtype)
    objective = objective_lib.Objective(model.apply, losses.per_example_loss(cfg.loss), full_data)
    optimizer = train_lib.make_optimizer(cfg.optimizer, cfg.lr, momentum=cfg.momentum,
                                         extra=_make_projection(cfg))
    train_step = train_lib.make_train_step(objective, optimizer)
    return Experiment(cfg=cfg, x=x, y=y, model=model, objective=objective, optimizer=optimizer,
                      train_step=train_step, dtype=dtype, mesh=mesh)


def _make_projection(cfg: config_lib.RunConfig):
    """The Dom/Bulk projection transformation for cfg.projection, or None."""
    if cfg.projection == "none":
        return None
    from lossland import projections  # imported only when projecting
    return projections.make_projection(cfg.projection, k=cfg.projection_k,
                                       refresh_every=cfg.refresh_every,
                                       switch_step=cfg.switch_step,
                                       num_iters=cfg.lanczos_iters, seed=cfg.seed,
                                       tol=cfg.lanczos_tol or None)


class _SignalFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks, so state is saved first."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not in the main thread: signals stay as they are
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class _Progress:
    """A throttled progress line on stderr: step, loss, steps/s, ETA."""

    def __init__(self, total: int, start: int, enabled: bool, every_s: float = 2.0):
        self.total, self.start, self.enabled, self.every_s = total, start, enabled, every_s
        self.t0 = time.time()
        self.last = 0.0

    def update(self, step: int, loss: float, extra: str = "", force: bool = False):
        now = time.time()
        if not self.enabled or (not force and now - self.last < self.every_s):
            return
        self.last = now
        done = step - self.start
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
        print(f"step {step}/{self.total}  loss {loss:.5g}  {rate:.1f} steps/s  ETA {eta_text}"
              f"{extra}", file=sys.stderr, flush=True)


def _scalars(metrics) -> dict:
    """The step's metrics as floats, fetched from the device in one transfer."""
    fetched = jax.device_get(metrics)._asdict()
    fetched.pop("params_finite")
    return {name: float(value) for name, value in fetched.items()}


def _tracked_row(row_arrays: dict, lr: float) -> dict:
    row = {key: np.asarray(value).tolist() for key, value in row_arrays.items()}
    row["num_matvecs"] = int(row["num_matvecs"])
    row["stability_ratio"] = row["eigenvalues"][0] * lr / 2.0
    return row


def run(cfg: config_lib.RunConfig, *, progress: bool = True,
        experiment: Optional[Experiment] = None) -> RunResult:
    """Runs (or resumes) one training run into cfg.workdir. See the module docstring.

    In a multi-process run every process calls this with the same cfg; only
    process 0 writes records (config.json, metrics.jsonl, density.jsonl),
    while all of them take part in the (orbax) checkpoints. The workdir must
    then be on a filesystem every host sees.
    """
    workdir = records.check_workdir(cfg.workdir, overwrite=cfg.overwrite, resume=cfg.resume)
    exp = experiment or build_experiment(cfg)
    state = checkpoints.initial_state(exp.model.params, exp.optimizer.init(exp.model.params),
                                      cfg.track_k if cfg.track_every else 1)
    # Every process has checked the workdir before the first one changes it.
    distributed.barrier("lossland:workdir-checked")
    if cfg.resume:
        state = _resume(workdir, cfg, state)
    elif distributed.is_main_process():
        records.prepare_workdir(workdir, overwrite=cfg.overwrite)
        records.write_config(workdir, cfg.asdict(), {
            "num_params": exp.model.num_params, "n_train": int(exp.x.shape[0]),
            "num_devices": sharding.mesh_size(exp.mesh)})
    distributed.barrier("lossland:workdir-ready")
    return _loop(exp, workdir, _place_state(state, exp.mesh), progress)


def _place_state(state, mesh):
    """The state's arrays replicated over the mesh (or committed to the one device).

    Fresh optimizer counters, the zero warm-start vectors and restored
    checkpoints start as host or uncommitted arrays. In a multi-process run
    every input of a jitted step must be a global array over the mesh; in any
    run, inputs placed like the step's own outputs keep it to one compilation.
    """
    return state.replace(**{name: sharding.replicate(getattr(state, name), mesh)
                            for name in ("params", "opt_state", "eigvecs", "displacement")})


def run_status(workdir: str | Path) -> Optional[str]:
    """The final status of the run in `workdir`, or None if it never ended (or never began)."""
    path = Path(workdir) / records.METRICS_FILE
    if not path.exists():
        return None
    rows = records.read_metrics(path)
    return rows[-1].get("status") if rows else None


# Flags that may differ when a run is resumed: they change neither the
# trajectory nor its records.
RESUMABLE_CHANGES = frozenset({"resume", "overwrite", "steps", "workdir", "checkpoint_every",
                               "plots"})


def config_changes(workdir: Path, cfg: config_lib.RunConfig) -> dict:
    """{flag: (saved, now)} for the flags that differ from the run saved in workdir."""
    saved = records.read_config_flags(workdir)
    return {k: (saved.get(k), v) for k, v in cfg.asdict().items()
            if k not in RESUMABLE_CHANGES and saved.get(k, v) != v}


def _describe_changes(changes: dict) -> str:
    return ", ".join(f"--{k} was {a!r}, now {b!r}" for k, (a, b) in changes.items())


def ensure_run(cfg: config_lib.RunConfig, *, progress: bool = True) -> RunResult:
    """Runs cfg unless its workdir already holds an ended run; resumes a partial one.

    Finished and diverged runs are kept as they are (rerunning a diverged run
    would diverge again, bitwise), except that a run that finished at a
    smaller --steps is extended; interrupted or crashed ones resume. A workdir
    holding a run with other settings is refused unless cfg.overwrite.
    This is what sweeps use, so that a rerun skips completed grid points and
    continues interrupted ones. `RunResult.action` says which happened.
    """
    workdir = Path(cfg.workdir)
    status = None if cfg.overwrite else run_status(workdir)
    if not cfg.overwrite and (workdir / records.CONFIG_FILE).exists():
        changes = config_changes(workdir, cfg)
        if changes:
            raise config_lib.ConfigError(
                f"{workdir} holds a run with other settings ({_describe_changes(changes)}). "
                "Pass --overwrite to redo it, or use another --workdir.")
    if status in (STATUS_FINISHED, STATUS_DIVERGED):
        last = records.read_metrics(workdir)[-1]
        extend = (status == STATUS_FINISHED and last.get("stop_reason") == "max_steps"
                  and last["step"] < cfg.steps)
        if not extend:  # a longer --steps resumes from the final checkpoint instead
            return RunResult(status=status, step=last["step"], workdir=workdir,
                             last_row=last, message=f"already {status}; skipped",
                             action=f"skipped ({status})")
        status = STATUS_INTERRUPTED
    has_checkpoint = (workdir / records.CHECKPOINT_DIR).exists() and any(
        p.name.isdigit() for p in (workdir / records.CHECKPOINT_DIR).iterdir())
    resume = not cfg.overwrite and has_checkpoint and status in (None, STATUS_INTERRUPTED)
    overwrite = cfg.overwrite or (workdir.exists() and not resume)
    result = run(cfg.replace(resume=resume, overwrite=overwrite), progress=progress)
    result.action = "resumed" if resume else "ran"
    return result


def _resume(workdir: Path, cfg: config_lib.RunConfig, template):
    changes = config_changes(workdir, cfg)
    if changes:
        raise config_lib.ConfigError(
            f"--resume: flags differ from the run in {workdir}: {_describe_changes(changes)}. "
            "Resume with the original flags (only --steps, --checkpoint_every and --plots "
            "may change).")
    manager = checkpoints.CheckpointManager(workdir)
    state = manager.restore_latest(template)
    if state is None:
        raise records.WorkdirError(f"--resume: no checkpoint in {workdir / records.CHECKPOINT_DIR}; "
                                   "the run cannot be resumed. Start afresh with --overwrite.")
    if distributed.is_main_process():  # the others wait at the workdir-ready barrier
        for name in (records.METRICS_FILE, records.DENSITY_FILE):
            if (workdir / name).exists():
                records.truncate_rows_before(workdir / name, int(state.step))
        print(f"resuming {workdir} from step {int(state.step)}", file=sys.stderr)
    return state


def _loop(exp: Experiment, workdir: Path, state, progress_enabled: bool) -> RunResult:
    cfg = exp.cfg
    objective, data = exp.objective, exp.objective.data
    manager = checkpoints.CheckpointManager(workdir)
    tracker = (tracking_lib.make_tracker(objective, k=cfg.track_k, num_iters=cfg.lanczos_iters,
                                         tol=cfg.lanczos_tol, track_gn=cfg.track_gn, lr=cfg.lr)
               if cfg.track_every else None)
    prober = _make_prober(objective, cfg) if cfg.probe_every else None
    density = (tracking_lib.make_density(objective, num_probes=DENSITY_PROBES,
                                         num_iters=DENSITY_ITERS)
               if cfg.density_every else None)
    sgd_batches = (sharding.MinibatchSource(exp.x, exp.y, cfg, exp.dtype, exp.mesh)
                   if cfg.optimizer not in train_lib.FULL_BATCH_OPTIMIZERS else None)
    base_key = jax.random.fold_in(jax.random.key(cfg.seed), 1)
    is_main = distributed.is_main_process()
    progress = _Progress(cfg.steps, int(state.step), progress_enabled and is_main)
    t0 = time.time() - float(state.wall_time)

    def save(state):
        manager.save(state.replace(wall_time=time.time() - t0))

    def measure(state, step) -> tuple[dict, Any]:
        """Tracked (and probed) quantities at θ_step; returns the row part and the new state."""
        start = time.time()
        key = jax.random.fold_in(base_key, step)
        # Before the first tracked step eigvecs is all zeros, which lanczos_top_k
        # treats as a cold start; always passing an array keeps one compilation.
        row_arrays, vectors = tracker(state.params, data, key, state.eigvecs)
        row = _tracked_row(row_arrays, cfg.lr)
        state = state.replace(eigvecs=vectors, has_eigvecs=True, last_lambda1=row["eigenvalues"][0],
                              cum_delta_top=state.cum_delta_top + row["delta_loss_top"],
                              cum_delta_bulk=state.cum_delta_bulk + row["delta_loss_bulk"])
        row["cum_delta_top"] = float(state.cum_delta_top)
        row["cum_delta_bulk"] = float(state.cum_delta_bulk)
        ratio_ok = row["stability_ratio"] >= cfg.eos_threshold
        state = state.replace(eos_since=(state.eos_since if state.eos_since >= 0 else step)
                              if ratio_ok else -1)
        if density is not None and step % cfg.density_every == 0:
            snapshot = density(state.params, data, jax.random.fold_in(key, 2),
                               max(float(state.last_lambda1), 1e-3))
            density_writer.write({"step": step, **{name: np.asarray(value).tolist() for name, value
                                                    in snapshot._asdict().items()}})
        if prober is not None and step % cfg.probe_every == 0:
            row.update(prober(state.params, data, vectors[0], state.displacement,
                              jax.random.fold_in(key, 1)))
        row["track_time"] = time.time() - start
        return row, state

    def finish(status, step, row_extra, message=""):
        row = {"step": step, "status": status, "wall_time": time.time() - t0, **row_extra}
        writer.write(row)
        progress.update(step, row.get("loss", float("nan")), force=True)
        return RunResult(status=status, step=step, workdir=workdir, last_row=row, message=message)

    last_row: dict = {}
    with records.MetricsWriter(workdir / records.METRICS_FILE, enabled=is_main) as writer, \
            records.MetricsWriter(workdir / records.DENSITY_FILE, enabled=is_main) \
            as density_writer, _SignalFlag() as signals:
        first_step = step = int(state.step)
        while True:
            # Processes stop together: a signal seen by any one stops them all.
            if distributed.any_process(signals.signum is not None):
                save(state)
                manager.wait()
                name = (signal.Signals(signals.signum).name if signals.signum is not None
                        else "a signal to another process")
                result = finish(STATUS_INTERRUPTED, step, {},
                                f"interrupted by {name} at step {step}; checkpoint saved. "
                                f"Continue with --resume --workdir={workdir}.")
                break
            if step > first_step and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                save(state)
            held = (cfg.eos_hold_steps and state.eos_since >= 0
                    and step - state.eos_since >= cfg.eos_hold_steps)
            if step == cfg.steps or held:
                # Checkpoint before the final tracking, whose eigenvectors must not
                # become the warm start of a run that resumes with more --steps.
                save(state)
                loss, accuracy, grad = objective.loss_accuracy_grad(state.params)
                final = {"loss": float(loss), "accuracy": float(accuracy),
                         "grad_norm": float(train_lib.tree_norm(grad)),
                         "param_norm": float(train_lib.tree_norm(state.params)),
                         "stop_reason": "eos_hold" if held else "max_steps"}
                if tracker is not None:
                    final_tracked, final_state = measure(state, step)
                    final.update(final_tracked)
                    if prober is not None and "valley_distance" not in final:
                        # Probes also run at the very end, along the final v1.
                        final.update(prober(final_state.params, data, final_state.eigvecs[0],
                                            final_state.displacement,
                                            jax.random.fold_in(base_key, step + 1)))
                result = finish(STATUS_FINISHED, step, final)
                break

            batch = data if sgd_batches is None else sgd_batches.batch(step)
            new_params, new_opt_state, metrics = exp.train_step(state.params, state.opt_state,
                                                                batch)
            row = {"step": step, **_scalars(metrics), "lr": cfg.lr}
            if sgd_batches is not None and _should_log(step, cfg):
                row["batch_loss"], row["batch_accuracy"] = row["loss"], row["accuracy"]
                loss, accuracy, grad = objective.loss_accuracy_grad(state.params)
                row.update(loss=float(loss), accuracy=float(accuracy),
                           grad_norm=float(train_lib.tree_norm(grad)))
            diverged_at = None
            if not math.isfinite(row["loss"]) or not math.isfinite(row["grad_norm"]):
                diverged_at = step
            elif not bool(metrics.params_finite):
                diverged_at = step + 1
            if diverged_at is None and tracker is not None and step % cfg.track_every == 0:
                tracked, state = measure(state, step)
                row.update(tracked)
            if _should_log(step, cfg) or diverged_at is not None or "eigenvalues" in row:
                row["wall_time"] = time.time() - t0
                writer.write(row)
                last_row = row
            if diverged_at is not None:
                manager.wait()
                lambda1 = float(state.last_lambda1) if state.has_eigvecs else None
                message = _divergence_message(diverged_at, row, lambda1, cfg.lr,
                                              manager.latest_step())
                result = finish(STATUS_DIVERGED, diverged_at, {}, message)
                break
            displacement = (ravel_pytree(new_params)[0] - ravel_pytree(state.params)[0]
                            if prober is not None else state.displacement)
            state = state.replace(step=step + 1, params=new_params, opt_state=new_opt_state,
                                  displacement=displacement)
            step += 1
            progress.update(step, row["loss"], _progress_extra(last_row))
    manager.wait()
    manager.close()
    if result.message and is_main:
        print(result.message, file=sys.stderr)
    return result


def _make_prober(objective, cfg):
    from lossland import probes  # imported only when probing is on
    return probes.make_prober(objective, s_max=cfg.probe_s_max, num_points=cfg.probe_points,
                              num_random_directions=cfg.num_random_directions)


def _should_log(step: int, cfg: config_lib.RunConfig) -> bool:
    return step % cfg.log_every == 0 or step == cfg.steps - 1


def _progress_extra(row: dict) -> str:
    if "stability_ratio" in row:
        return f"  λ1·lr/2 {row['stability_ratio']:.3f}  χ1 {row['chi_1']:.2f}"
    return ""


def _divergence_message(step, row, lambda1, lr, checkpoint_step) -> str:
    text = (f"diverged at step {step}: the loss or the params became NaN/inf "
            f"(loss={row.get('loss')}).")
    text += (f" The last good checkpoint is at step {checkpoint_step}."
             if checkpoint_step is not None else " No checkpoint had been saved yet.")
    if lambda1 and lambda1 > 0:
        text += (f" The last tracked sharpness was λ1={lambda1:.4g}; GD is stable for "
                 f"lr < 2/λ1 = {2.0 / lambda1:.4g} (now --lr={lr}).")
    else:
        text += " Try a smaller --lr, or --track_every to see the sharpness."
    return text
