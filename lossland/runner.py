"""One training run, the entry point: `run` and `ensure_run`.

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

Owns: the order of a run: check the workdir, build, resume or write the
config, train. The pieces live in experiment.py (the build), lifecycle.py
(statuses, resume, signals) and loop.py (the steps); their public names are
re-exported here, so `runner.X` keeps working. Must not grow logic of its own.
"""

from __future__ import annotations

from typing import Optional

from lossland import checkpoints, config as config_lib, distributed, records, sharding
from lossland import streaming
from lossland.experiment import (Experiment, build_experiment, enable_dtype,  # noqa: F401
                                 place_state, set_matmul_precision)
from lossland.lifecycle import (EXIT_CODES, RESUMABLE_CHANGES, STATUS_DIVERGED,  # noqa: F401
                                STATUS_FINISHED, STATUS_INTERRUPTED, RunResult, config_changes,
                                run_status)
from lossland import lifecycle, loop
from lossland.loop import DENSITY_ITERS, DENSITY_PROBES, TIMING_KEYS  # noqa: F401


def run(cfg: config_lib.RunConfig, *, progress: bool = True,
        experiment: Optional[Experiment] = None) -> RunResult:
    """Runs (or resumes) one training run into cfg.workdir. See the module docstring.

    In a multi-process run every process calls this with the same cfg; only
    process 0 writes records (config.json, metrics.jsonl, density.jsonl),
    while all of them take part in the (orbax) checkpoints. The workdir must
    then be on a filesystem every host sees.
    """
    workdir = records.check_workdir(cfg.workdir, overwrite=cfg.overwrite, resume=cfg.resume)
    if cfg.resume:
        lifecycle.check_resume(workdir, cfg)
    # Resume-or-start: --resume on a workdir a kill left before config.json starts afresh.
    resuming = cfg.resume and not records.is_partial_start(workdir)
    exp = experiment or build_experiment(cfg)
    config_lib.validate_for_model(cfg, exp.model.num_params)
    config_lib.validate_layers(cfg, exp.model.params)
    state = checkpoints.initial_state(exp.model.params, exp.optimizer.init(exp.model.params),
                                      cfg.track_k if cfg.track_every else 1,
                                      stream_block=streaming.block_rows(cfg),
                                      model_state=exp.model.state)
    # Every process has checked the workdir before the first one changes it.
    distributed.barrier("lossland:workdir-checked")
    if resuming:
        state = lifecycle.resume_state(workdir, cfg, state)
    elif distributed.is_main_process():
        records.prepare_workdir(workdir, overwrite=cfg.overwrite or cfg.resume)
        records.write_config(workdir, cfg.asdict(), {
            "num_params": exp.model.num_params, "n_train": int(exp.x.shape[0]),
            "num_devices": sharding.mesh_size(exp.mesh), **lifecycle.sources(exp)})
    distributed.barrier("lossland:workdir-ready")
    return loop.train(exp, workdir, place_state(state, exp.mesh), progress)


def ensure_run(cfg: config_lib.RunConfig, *, progress: bool = True) -> RunResult:
    """Runs cfg unless its workdir already holds an ended run; resumes a partial one.

    Finished and diverged runs are kept as they are (rerunning a diverged run
    would diverge again, bitwise), except that a run that finished at a
    smaller --steps is extended; interrupted or crashed ones resume. A workdir
    holding a run with other settings is refused unless cfg.overwrite.
    This is what sweeps use, so that a rerun skips completed grid points and
    continues interrupted ones. `RunResult.action` says which happened.
    """
    skipped, cfg_to_run = lifecycle.plan_ensure_run(cfg)
    if skipped is not None:
        return skipped
    result = run(cfg_to_run, progress=progress)
    result.action = "resumed" if cfg_to_run.resume else "ran"
    return result
