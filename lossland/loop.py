"""The training loop of one built, placed run: steps, tracked steps, the end.

Owns: what happens at each step (the optimizer step, its metrics row, the
tracked and probed quantities when due, checkpoints every
--checkpoint_every), and the three ways a run ends: finished (at --steps or
after an edge-of-stability hold), diverged (NaN/inf), interrupted (a signal).
See runner.py for what a row and a checkpoint mean.

Must not: validate flags, build the experiment, or decide whether to resume;
it only appends rows to the records and saves checkpoints.
"""

from __future__ import annotations

import functools
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from lossland import checkpoints, config as config_lib, distributed, eos, lifecycle, records
from lossland import objective as objective_lib, sharding, streaming
from lossland import train as train_lib
from lossland import tracking as tracking_lib
from lossland import tracking_extras
from lossland import experiment as experiment_lib
from lossland.experiment import Experiment

# Keys that measure time, not the trajectory: resumed or resharded records equal the
# uninterrupted run's in every other key.
TIMING_KEYS = ("wall_time", "track_time", "tracker_time", "hvp_equivalents")
DENSITY_PROBES, DENSITY_ITERS = 4, 80  # SLQ snapshot: probes × Lanczos steps each


def train(exp: Experiment, workdir: Path, state, progress_enabled: bool) -> lifecycle.RunResult:
    """Runs exp from `state` until it ends; returns how it ended."""
    is_main = distributed.is_main_process()
    manager = checkpoints.CheckpointManager(workdir)
    with records.MetricsWriter(workdir / records.METRICS_FILE, enabled=is_main) as writer, \
            records.MetricsWriter(workdir / records.DENSITY_FILE, enabled=is_main) \
            as density_writer, lifecycle.SignalFlag() as signals:
        loop = _Loop(exp, workdir, manager, writer, density_writer,
                     _Progress(exp.cfg.steps, int(state.step), progress_enabled and is_main),
                     wall_time_before=float(state.wall_time),
                     rows_before=_rows_before(workdir, int(state.step)))
        result = loop.run(state, signals)
    manager.wait()
    manager.close()
    if result.message and is_main:
        print(result.message, file=sys.stderr)
    return result


class _Loop:
    """The run's tools (tracker, prober, writers, checkpoints) and one method per kind of step."""

    def __init__(self, exp: Experiment, workdir: Path, manager, writer, density_writer,
                 progress, wall_time_before: float, rows_before: list[dict]):
        cfg = self.cfg = exp.cfg
        self.exp, self.workdir, self.manager = exp, workdir, manager
        self.writer, self.density_writer, self.progress = writer, density_writer, progress
        self.objective, self.data = exp.objective, exp.objective.data
        self.tracker = (tracking_lib.make_tracker(self.objective, k=cfg.track_k,
                                                  num_iters=cfg.lanczos_iters,
                                                  tol=cfg.lanczos_tol, track_gn=cfg.track_gn,
                                                  lr=cfg.lr, tracker=cfg.tracker,
                                                  block_size=config_lib.block_size(cfg))
                        if cfg.track_every else None)
        self.extras = tracking_extras.make_extras(self.objective, exp.model.params, cfg)
        # --tracker=stream: every step is the fused step; self.tracker is then the audit's Lanczos.
        self.stream = (streaming.StreamDriver(self.objective, exp.optimizer, cfg)
                       if cfg.track_every and cfg.tracker == "stream" else None)
        self.plain_step_seconds = None   # one untracked step, the stream's cost baseline
        self.model_state_step = (jax.jit(functools.partial(objective_lib.full_batch_model_state,
                                                           exp.model.update_state))
                                 if self.stream is not None and exp.model.has_state else None)
        self.prober = _make_prober(self.objective, cfg) if cfg.probe_every else None
        self.evaluator = experiment_lib.make_evaluator(exp)
        self.density = (tracking_lib.make_density(self.objective, num_probes=DENSITY_PROBES,
                                                  num_iters=DENSITY_ITERS)
                        if cfg.density_every else None)
        self.sgd_batches = (sharding.MinibatchSource(exp.x, exp.y, cfg, exp.dtype, exp.mesh)
                            if cfg.optimizer not in train_lib.FULL_BATCH_OPTIMIZERS else None)
        self.base_key = jax.random.fold_in(jax.random.key(cfg.seed), 1)
        self.t0 = time.time() - wall_time_before
        self.hvp_seconds = None    # one full-batch HVP, timed at the first tracked step
        self.last_row: dict = {}   # the last row written (for the progress line)
        self.last_tracked: dict = {}   # the tracked part of the last tracked row
        # Where the run stands at the edge of stability (lossland.eos). A function of the
        # tracked ratios alone, so a resumed run rebuilds it from the records it keeps.
        self.eos_rule = eos.EosRule(cfg.eos_threshold, tuple(cfg.eos_band), cfg.eos_window)
        self.eos_monitor = eos.replay(rows_before, self.eos_rule)

    def run(self, state, signals) -> lifecycle.RunResult:
        cfg = self.cfg
        first_step = step = int(state.step)
        while True:
            # Processes stop together: a signal seen by any one stops them all.
            if distributed.any_process(signals.signum is not None):
                return self.interrupted(state, step, signals.signum)
            if step > first_step and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                self.save(state)
            if step == cfg.steps:
                return self.final_step(state, step)
            before = state
            row, updated, state, diverged_at = self.train_step(state, step)
            if diverged_at is not None:
                return self.diverged(state, row, diverged_at)
            if "eigenvalues" in row and self.hold_met():
                # The hold is judged at a measured step, and the run stops there, at
                # θ_step: its tracked row is the final one (a second measurement could
                # leave the band the hold was just met in).
                return self.final_step(state, step, tracked=self.last_tracked,
                                       checkpoint=before)
            # The last step: a probe direction, and the stream's step curvature.
            displacement = (ravel_pytree(updated["params"])[0] - ravel_pytree(state.params)[0]
                            if self.prober is not None or self.stream is not None
                            else state.displacement)
            state = state.replace(step=step + 1, displacement=displacement, **updated)
            step += 1
            self.progress.update(step, row["loss"], _progress_extra(self.last_row))

    def save(self, state) -> None:
        self.manager.save(state.replace(wall_time=time.time() - self.t0))

    def train_step(self, state, step):
        """The optimizer step at θ_step and its row, written when due.

        Returns (row, updated, state, diverged_at): `updated` holds the new
        params, optimizer state and model state (running statistics); the
        state carries the tracking bookkeeping of a tracked step; diverged_at
        is the first step whose loss or params are not finite, or None.
        """
        cfg = self.cfg
        batch = self.data if self.sgd_batches is None else self.sgd_batches.batch(step)
        if self.stream is not None:
            new_params, new_opt_state, metrics, stream = self.stream.step(
                step, state.params, state.opt_state, batch, state.stream, state.displacement,
                jax.random.fold_in(self.base_key, 3))
            state = state.replace(stream=stream)
            # The fused step carries no model state: its running statistics in a pass of
            # their own, from the same chunks (a side output; H is not affected).
            new_model_state = (self.model_state_step(state.params, state.model_state, batch)
                               if self.model_state_step is not None else state.model_state)
        else:
            new_params, new_opt_state, metrics, new_model_state = self.optimizer_step(state,
                                                                                      batch)
        updated = {"params": new_params, "opt_state": new_opt_state,
                   "model_state": new_model_state}
        row = {"step": step, **_scalars(metrics), "lr": cfg.lr}
        if self.sgd_batches is not None and _should_log(step, cfg):
            # Minibatch metrics are noisy: logged rows also hold the full-batch ones.
            row["batch_loss"], row["batch_accuracy"] = row["loss"], row["accuracy"]
            loss, accuracy, grad = self.objective.loss_accuracy_grad(state.params)
            row.update(loss=float(loss), accuracy=float(accuracy),
                       grad_norm=float(train_lib.tree_norm(grad)))
        diverged_at = None
        if not math.isfinite(row["loss"]) or not math.isfinite(row["grad_norm"]):
            diverged_at = step
        elif not bool(metrics.params_finite):
            diverged_at = step + 1
        if diverged_at is None and self.tracker is not None and step % cfg.track_every == 0:
            tracked, state = self.measure(state, step)
            row.update(tracked)
            self.last_tracked = tracked
        if _should_log(step, cfg) or diverged_at is not None or "eigenvalues" in row:
            if (diverged_at is None and self.evaluator is not None and cfg.eval_every
                    and step % cfg.eval_every == 0):
                row.update(self.test_metrics(state))
            row["wall_time"] = time.time() - self.t0
            self.writer.write(row)
            self.last_row = row
        return row, updated, state, diverged_at

    def test_metrics(self, state) -> dict:
        """Test loss and accuracy at θ_step in eval mode (running statistics at θ_step)."""
        loss, accuracy = self.evaluator(state.params, state.model_state)
        return {"test_loss": float(loss), "test_accuracy": float(accuracy)}

    def optimizer_step(self, state, batch):
        """The plain (untracked) step at state: (params', opt_state', metrics, model_state').

        A model with batch statistics (BatchNorm) updates them in the same step,
        from the same ghost batches as the loss (`train.make_train_step`). They are
        a side output, read only by evaluation: the loss GD minimizes, and the
        Hessian every tracker measures, are the training-mode loss, in which each
        chunk is normalized by its own statistics, so the running ones change
        neither.
        """
        if not self.exp.model.has_state:
            return (*self.exp.train_step(state.params, state.opt_state, batch),
                    state.model_state)
        return self.exp.train_step(state.params, state.opt_state, batch, state.model_state)

    def measure(self, state, step) -> tuple[dict, Any]:
        """Tracked (and probed) quantities at θ_step; returns the row part and the new state."""
        cfg, data = self.cfg, self.data
        start = time.time()
        key = jax.random.fold_in(self.base_key, step)
        if self.stream is not None:
            row, vectors = self.stream_row(state, step, key)
        else:
            # Before the first tracked step eigvecs is all zeros, which lanczos_top_k
            # treats as a cold start; always passing an array keeps one compilation.
            row_arrays, vectors = self.tracker(state.params, data, key, state.eigvecs)
            row = _tracked_row(row_arrays, cfg.lr)           # waits for the tracker's result
            # The tracker's cost in seconds and in single full-batch HVPs (timed once per run).
            row["tracker_time"] = time.time() - start
        if self.hvp_seconds is None:
            self.hvp_seconds = _median_seconds(self.objective.hvp, state.params, state.params)
        row["hvp_equivalents"] = row["tracker_time"] / self.hvp_seconds
        if self.extras is not None:   # per-layer λ, λ_min, tr(H) (lossland.tracking_extras)
            row.update(self.extras(state.params, data, jax.random.fold_in(key, 3), step))
        if not state.has_eigvecs:   # the first tracked step: keep v1 as the probes' control
            state = state.replace(init_v1=vectors[0])
        state = state.replace(eigvecs=vectors, has_eigvecs=True, last_lambda1=row["eigenvalues"][0])
        if "delta_loss_top" in row:     # not in stream rows: three more losses a step
            state = state.replace(cum_delta_top=state.cum_delta_top + row["delta_loss_top"],
                                  cum_delta_bulk=state.cum_delta_bulk + row["delta_loss_bulk"])
            row["cum_delta_top"] = float(state.cum_delta_top)
            row["cum_delta_bulk"] = float(state.cum_delta_bulk)
        self.eos_monitor = eos.update(self.eos_monitor, step, row["stability_ratio"],
                                      self.eos_rule)
        row["eos_state"] = self.eos_monitor.state
        if self.density is not None and step % cfg.density_every == 0:
            snapshot = self.density(state.params, data, jax.random.fold_in(key, 2),
                                    max(float(state.last_lambda1), 1e-3))
            self.density_writer.write({"step": step, **{name: np.asarray(value).tolist()
                                                        for name, value
                                                        in snapshot._asdict().items()}})
        if self.prober is not None and step % cfg.probe_every == 0 and (
                step == 0 or not cfg.probe_from_eos or self.eos_monitor.entry_step is not None):
            row.update(self.prober(state.params, data, vectors[0], state.displacement,
                                   jax.random.fold_in(key, 1), state.init_v1))
        row["track_time"] = time.time() - start
        return row, state

    def stream_row(self, state, step: int, key) -> tuple[dict, Any]:
        """The stream tracker's row at θ_step, and its top-k vectors.

        The fused step at θ_step made it; at the final step, which takes no
        optimizer step, the fused step runs once more for it (the update is
        dropped; the checkpoint was saved before). Every --stream_check_every
        steps a cold Lanczos at the same θ audits it. The cost is the fused
        step's time beyond an untracked step's (timed once per run).
        """
        if self.stream.last is None or self.stream.last[0] != step:
            self.stream.step(step, state.params, state.opt_state, self.data, state.stream,
                             state.displacement, jax.random.fold_in(self.base_key, 3))
        _, row_arrays, vectors, seconds = self.stream.last
        row = _tracked_row(streaming.shortest_floats(jax.device_get(row_arrays)), self.cfg.lr)
        if self.plain_step_seconds is None:
            self.plain_step_seconds = _median_seconds(self.optimizer_step, state, self.data)
        row["tracker_time"] = max(seconds - self.plain_step_seconds, 0.0)
        every = self.cfg.stream_check_every
        if every and step % every == 0:
            check, _ = self.tracker(state.params, self.data, jax.random.fold_in(key, 4),
                                    jnp.zeros_like(state.eigvecs))
            row.update(streaming.audit_row(row["eigenvalues"], check["eigenvalues"]))
        return row, vectors

    def hold_met(self) -> bool:
        """The run has held the edge of stability --eos_hold_steps up to its last tracked step."""
        hold = self.cfg.eos_hold_steps
        return bool(hold and eos.held_steps(self.eos_monitor) >= hold)

    def final_step(self, state, step: int, tracked: dict | None = None,
                   checkpoint=None) -> lifecycle.RunResult:
        """The status row at θ_step: final loss, accuracy, gradient, and tracking when on.

        `tracked` is the row part already measured at θ_step (the step the hold was
        met at), reused rather than measured twice; `checkpoint` is the state saved
        for a resume, the one before that measurement.
        """
        # Checkpoint before the final tracking, whose eigenvectors must not
        # become the warm start of a run that resumes with more --steps.
        self.save(state if checkpoint is None else checkpoint)
        loss, accuracy, grad = self.objective.loss_accuracy_grad(state.params)
        final = {"loss": float(loss), "accuracy": float(accuracy),
                 "grad_norm": float(train_lib.tree_norm(grad)),
                 "param_norm": float(train_lib.tree_norm(state.params))}
        if self.evaluator is not None:
            final.update(self.test_metrics(state))
        if self.tracker is not None:
            if tracked is None:
                tracked, state = self.measure(state, step)
            final.update(tracked)
            if self.prober is not None and "valley_distance" not in final:
                # Probes also run at the very end, along the final v1.
                final.update(self.prober(state.params, self.data, state.eigvecs[0],
                                         state.displacement,
                                         jax.random.fold_in(self.base_key, step + 1),
                                         state.init_v1))
            final["eos_entry_step"] = self.eos_monitor.entry_step
            final["held_steps"] = eos.held_steps(self.eos_monitor)
        final["stop_reason"] = "eos_hold" if self.hold_met() else "max_steps"
        return self.finish(lifecycle.STATUS_FINISHED, step, final)

    def diverged(self, state, row: dict, diverged_at: int) -> lifecycle.RunResult:
        self.manager.wait()
        lambda1 = float(state.last_lambda1) if state.has_eigvecs else None
        message = _divergence_message(diverged_at, row, lambda1, self.cfg.lr,
                                      self.manager.latest_step())
        return self.finish(lifecycle.STATUS_DIVERGED, diverged_at, {}, message)

    def interrupted(self, state, step: int, signum) -> lifecycle.RunResult:
        self.save(state)
        self.manager.wait()
        name = (signal.Signals(signum).name if signum is not None
                else "a signal to another process")
        return self.finish(lifecycle.STATUS_INTERRUPTED, step, {},
                           f"interrupted by {name} at step {step}; checkpoint saved. "
                           f"Continue with --resume --workdir={self.workdir}.")

    def finish(self, status: str, step: int, row_extra: dict,
               message: str = "") -> lifecycle.RunResult:
        row = {"step": step, "status": status, "wall_time": time.time() - self.t0, **row_extra}
        self.writer.write(row)
        self.progress.update(step, row.get("loss", float("nan")), force=True)
        return lifecycle.RunResult(status=status, step=step, workdir=self.workdir, last_row=row,
                                   message=message)


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


def _median_seconds(fn, *args, repeats: int = 3) -> float:
    """Median wall time of fn(*args) after a first (compiling) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _scalars(metrics) -> dict:
    """The step's metrics as floats, fetched from the device in one transfer."""
    fetched = jax.device_get(metrics)._asdict()
    fetched.pop("params_finite")
    return {name: float(value) for name, value in fetched.items()}


def _tracked_row(row_arrays: dict, lr: float) -> dict:
    row = {key: np.asarray(value).tolist() for key, value in row_arrays.items()}
    row["num_matvecs"] = int(row["num_matvecs"])
    if "num_block_products" in row:
        row["num_block_products"] = int(row["num_block_products"])
    row["stability_ratio"] = row["eigenvalues"][0] * lr / 2.0
    return row


def _rows_before(workdir: Path, step: int) -> list[dict]:
    """The records of the steps before `step` (a resumed run's kept rows; [] when fresh)."""
    path = workdir / records.METRICS_FILE
    if step == 0 or not path.exists():
        return []
    return [r for r in records.read_metrics(path) if r.get("step", -1) < step
            and "status" not in r]


def _make_prober(objective, cfg):
    from lossland import probes  # imported only when probing is on
    return probes.make_prober(objective, s_max=cfg.probe_s_max, num_points=cfg.probe_points,
                              lr=cfg.lr, s_max_steps=cfg.probe_s_max_steps,
                              s_max_theta=cfg.probe_s_max_theta,
                              num_random_directions=cfg.num_random_directions)


def _should_log(step: int, cfg: config_lib.RunConfig) -> bool:
    return step % cfg.log_every == 0 or step == cfg.steps - 1


def _progress_extra(row: dict) -> str:
    if "stability_ratio" in row:
        return (f"  λ1·lr/2 {row['stability_ratio']:.3f}  χ1 {row['chi_1']:.2f}  "
                f"{row.get('eos_state', '')}")
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
