"""Subspace ablations (claim C4): GD, Dom-GD and Bulk-GD from one shared start.

MISSION.md, "Subspace ablations": Dom-GD projects each update onto span V_k
(the top-k Hessian eigenvectors, refreshed every R steps); Bulk-GD removes that
part. C4 says that near θ* the top-subspace part is most of the gradient but
drives little of the learning (compare Song, Ahn & Yun 2024: Dom-SGD stalls,
Bulk-SGD trains as well as SGD).

Protocol
  1. Start (--start=eos, default): full-batch GD on the preset's setting (the
     default run: MNIST-1D n=1000, MLP 2×256 ReLU, MSE, lr=0.05) until the
     run has held the edge of stability (`lossland.eos`: entered at the first
     upward crossing of --eos_threshold, then the trailing median of λ1·lr/2
     inside [0.9, 1.1]) for --eos_hold_steps steps
     (or --warmup_max_steps is hit), into WORKDIR/warmup. Its final checkpoint
     holds θ_T. --start=init skips this and starts every variant at the
     initialization.
  2. Every variant restores θ_T from that checkpoint (the same params, bitwise)
     and trains --steps steps with a fresh optimizer state (GD and SGD carry
     none) into WORKDIR/variants/NAME, through `lossland.runner.run`, so its
     step 0 is the switch point. (Restoring the one warm-up, rather than
     replaying it per variant with --switch_step, costs one warm-up in all.)
     Tracking every --track_every steps with track_k = k records χ_k and the
     attribution ΔL_top / ΔL_bulk / ΔL_full (tracking.py) along each variant's
     own trajectory. The presets use an odd --track_every: at the edge of
     stability GD oscillates with period 2, and an even interval would sample
     one phase of the oscillation only (it biased Σ ΔL_full to the wrong sign
     in a trial run).
  3. WORKDIR/summary.json (keyed by variant), WORKDIR/experiment.json (start,
     settings, timings, the C4 criteria), WORKDIR/loss_overlay.png and
     WORKDIR/verdict.md, generated from the numbers with criteria fixed below.

Variants: gd, dom, bulk (full batch), and sgd, dom_sgd, bulk_sgd (minibatches
of --batch_size; projections from the minibatch HVP).

    python -m experiments.subspace --workdir=runs/subspace --preset=quick
    python -m experiments.subspace --workdir=runs/subspace_sgd --variants=sgd,dom_sgd,bulk_sgd
    python -m experiments.subspace --workdir=/tmp/s --preset=smoke --start=init
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from absl import app, flags, logging

from lossland import checkpoints, config as config_lib, data as data_lib
from lossland import ablation, plots, records, runner, sharding
from lossland import experiment as experiment_lib
from lossland.ablation import BULK_AS_WELL, CHI_MOST, DOM_STALLS, TOP_SHARE_LITTLE, VARIANTS

# Each preset: the base RunConfig fields, then the experiment's own settings.
PRESETS = {
    "quick": {
        "run": dict(dataset="mnist1d", n_train=1000, model="mlp", width=256, depth=2,
                    activation="relu", loss="mse", lr=0.05, batch_size=128, lanczos_iters=60,
                    lanczos_tol=1e-3, log_every=10, checkpoint_every=0),
        "steps": 500, "k": 10, "refresh_every": 10, "track_every": 9,
        "warmup_max_steps": 3000, "warmup_track_every": 50, "eos_hold_steps": 200,
        "plots": True,
    },
    "smoke": {
        "run": dict(dataset="mnist1d", n_train=128, model="mlp", width=16, depth=1,
                    activation="relu", loss="mse", lr=0.2, batch_size=32, lanczos_iters=16,
                    lanczos_tol=1e-3, log_every=2, checkpoint_every=0),
        "steps": 20, "k": 3, "refresh_every": 5, "track_every": 5,
        "warmup_max_steps": 40, "warmup_track_every": 10, "eos_hold_steps": 10,
        "plots": False,
    },
}

flags.DEFINE_string("workdir", "runs/subspace", "Output folder (warmup/, variants/, "
                    "summary.json, verdict.md, loss_overlay.png).")
flags.DEFINE_enum("preset", "quick", sorted(PRESETS), "quick: the default run, ≤ 10 min on "
                  "2 CPU cores; smoke: a tiny run for tests.")
flags.DEFINE_boolean("overwrite", False, "Replace the records of an existing --workdir.")
flags.DEFINE_enum("start", "eos", ["eos", "init"], "Shared start: the edge-of-stability point "
                  "of a GD warm-up (eos) or the initialization (init).")
flags.DEFINE_list("variants", ["gd", "dom", "bulk"], f"Variants to train, from "
                  f"{list(VARIANTS)}.")
flags.DEFINE_integer("steps", None, "Steps per variant after the shared start (default: "
                     "the preset's).", lower_bound=1)
flags.DEFINE_integer("k", None, "Dimension of the top subspace V_k (default: the preset's).",
                     lower_bound=0)
flags.DEFINE_integer("refresh_every", None, "Recompute V_k every this many steps (default: "
                     "the preset's).", lower_bound=1)
flags.DEFINE_integer("track_every", None, "Track χ_k and the attribution every this many "
                     "steps (default: the preset's). Keep it odd: at the edge of stability GD "
                     "oscillates with period 2, and an even interval samples one phase only.",
                     lower_bound=1)
flags.DEFINE_float("lr", None, "Learning rate of the warm-up and every variant (default: the "
                   "preset's).", lower_bound=0)
flags.DEFINE_integer("seed", 0, "Seed of data, init, minibatches and Lanczos start vectors.")
flags.DEFINE_integer("warmup_max_steps", None, "Step cap of the --start=eos warm-up.",
                     lower_bound=1)
flags.DEFINE_integer("eos_hold_steps", None, "The warm-up stops once it has held the edge of "
                     "stability (lossland.eos) this many steps.", lower_bound=1)
flags.DEFINE_float("eos_threshold", 0.9, "Entry level of λ1·lr/2: the warm-up enters the edge "
                   "of stability at its first upward crossing.", lower_bound=0)
FLAGS = flags.FLAGS


def _setting(name):
    value = getattr(FLAGS, name)
    return PRESETS[FLAGS.preset][name] if value is None else value


class _Interrupted(Exception):
    """SIGINT/SIGTERM reached a run: stop the whole experiment, not just that run."""


def _warmup_config(root: Path, base: config_lib.RunConfig,
                   settings: dict) -> config_lib.RunConfig:
    """The RunConfig of the --start=eos warm-up."""
    return base.replace(workdir=str(root / "warmup"), optimizer="gd", projection="none",
                        steps=settings["warmup_max_steps"],
                        track_every=settings["warmup_track_every"], track_k=1,
                        eos_hold_steps=settings["eos_hold_steps"],
                        eos_threshold=FLAGS.eos_threshold, plots=False)


def _warmup(root: Path, base: config_lib.RunConfig, settings: dict):
    """GD to the edge of stability; returns (params at its end, its description)."""
    cfg = _warmup_config(root, base, settings)
    exp = runner.build_experiment(cfg)
    result = runner.run(cfg, experiment=exp)
    if result.status == runner.STATUS_INTERRUPTED:
        raise _Interrupted(result.message)
    if result.status != runner.STATUS_FINISHED:
        raise RuntimeError(f"the warm-up {result.status} at step {result.step}: {result.message}")
    manager = checkpoints.CheckpointManager(result.workdir)
    template = checkpoints.initial_state(exp.model.params, exp.optimizer.init(exp.model.params),
                                         cfg.track_k, model_state=exp.model.state)
    state = manager.restore_latest(template)
    manager.close()
    if state is None or int(state.step) != result.step:
        raise RuntimeError(f"the warm-up checkpoint in {result.workdir} is not at its last step "
                           f"{result.step}.")
    row = result.last_row
    ratio = row.get("stability_ratio")
    held = row.get("stop_reason") == "eos_hold"
    description = (f"GD warm-up checkpoint at step {result.step} (λ1·lr/2 = {ablation.fmt(ratio, '.3f')}, "
                   f"loss {ablation.fmt(row.get('loss'))}; "
                   + (f"entered the edge of stability at step {row.get('eos_entry_step')} and held "
                      f"it {row.get('held_steps')} steps)" if held else
                      f"step cap hit before the edge of stability held; state "
                      f"{row.get('eos_state')})"))
    info = {"kind": "eos", "step": result.step, "stop_reason": row.get("stop_reason"),
            "eos_entry_step": row.get("eos_entry_step"), "held_steps": row.get("held_steps"),
            "eos_state": row.get("eos_state"),
            "stability_ratio": ratio, "loss": row.get("loss"), "workdir": str(result.workdir)}
    return state.params, description, info


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    unknown = [v for v in FLAGS.variants if v not in VARIANTS]
    if unknown or not FLAGS.variants or len(set(FLAGS.variants)) != len(FLAGS.variants):
        print(f"error: --variants={','.join(FLAGS.variants)}: give distinct names from "
              f"{list(VARIANTS)}", file=sys.stderr)
        return 2
    preset = PRESETS[FLAGS.preset]
    settings = {name: _setting(name) for name in ("steps", "k", "refresh_every", "track_every",
                                                    "warmup_max_steps", "eos_hold_steps")}
    settings["warmup_track_every"] = min(preset["warmup_track_every"], settings["eos_hold_steps"])
    run_fields = dict(preset["run"], seed=FLAGS.seed, overwrite=False, plots=False)
    if FLAGS.lr is not None:
        run_fields["lr"] = FLAGS.lr
    k = settings["k"]
    root = Path(FLAGS.workdir)
    projecting = [name for name in FLAGS.variants if VARIANTS[name][1] != "none"]
    if projecting and k < 1:
        print(f"error: --k={k} is not allowed: the variants {projecting} project on the top-k "
              "Hessian subspace, so k must be >= 1. Set --k, or run only gd,sgd.",
              file=sys.stderr)
        return 2
    try:
        base = config_lib.RunConfig(**run_fields)
        if FLAGS.start == "eos":   # checked now, not after the workdir is made
            config_lib.validate(_warmup_config(root, base, settings))
        variant_cfgs = {}
        for name in FLAGS.variants:
            optimizer, projection, _ = VARIANTS[name]
            variant_cfgs[name] = base.replace(
                workdir=str(root / "variants" / name), optimizer=optimizer, projection=projection,
                steps=settings["steps"], projection_k=k, refresh_every=settings["refresh_every"],
                switch_step=0, track_every=settings["track_every"], track_k=max(k, 1),
                lanczos_iters=max(base.lanczos_iters, k),
                log_every=1)  # every step: the runner writes tracked rows only on log steps
            config_lib.validate(variant_cfgs[name])
            try:   # k <= P, from shapes alone
                experiment_lib.validate_model_bounds(variant_cfgs[name])
            except config_lib.ConfigError as e:
                raise config_lib.ConfigError(f"--k={k} sets each variant's --track_k and "
                                             f"--projection_k: {e}") from None
        if root.is_dir() and any(root.iterdir()) and not FLAGS.overwrite:   # (no --resume here)
            raise records.WorkdirError(f"--workdir={root} exists and is not empty. Pass "
                                       "--overwrite to replace its records, or choose a new "
                                       "--workdir.")
        records.check_workdir(root, overwrite=FLAGS.overwrite)
    except (config_lib.ConfigError, records.WorkdirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    records.prepare_workdir(root, overwrite=FLAGS.overwrite)

    t0 = time.time()
    timings = {}
    try:
        if FLAGS.start == "eos":
            start_params, start_description, start_info = _warmup(root, base, settings)
        else:
            start_params, start_description = None, "the initialization (seed %d)" % FLAGS.seed
            start_info = {"kind": "init", "step": 0}
        timings["warmup_s"] = time.time() - t0
        runs = {}
        for name, cfg in variant_cfgs.items():
            t = time.time()
            exp = runner.build_experiment(cfg)
            if start_params is not None:
                params = sharding.replicate(start_params, exp.mesh)
                exp = dataclasses.replace(exp, model=dataclasses.replace(exp.model, params=params))
            result = runner.run(cfg, experiment=exp)
            if result.status == runner.STATUS_INTERRUPTED:
                raise _Interrupted(result.message)
            records.write_json_atomic(result.workdir / "start.json",
                                      {**start_info, "description": start_description})
            if preset["plots"]:
                plots.plot_run(result.workdir)
            runs[name] = records.read_metrics(result.workdir)
            timings[f"{name}_s"] = time.time() - t
            print(f"{name}: {result.status} at step {result.step}", file=sys.stderr)
    except _Interrupted as e:
        print(f"interrupted; the experiment stops here ({e}). Rerun with --overwrite.",
              file=sys.stderr)
        return runner.EXIT_CODES[runner.STATUS_INTERRUPTED]
    except (config_lib.ConfigError, data_lib.DataError, records.WorkdirError,
            RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    summary = {name: ablation.summarize_variant(rows, name) for name, rows in runs.items()}
    ablation.add_baseline_ratios(summary)
    groups = []
    for baseline, dom, bulk in (("gd", "dom", "bulk"), ("sgd", "dom_sgd", "bulk_sgd")):
        if any(name in summary for name in (baseline, dom, bulk)):
            checks = ablation.c4_criteria(summary, baseline, dom, bulk)
            missing = [name for name in (baseline, dom, bulk) if name not in summary]
            verdict = (f"incomplete ({', '.join(missing)} not run)" if missing
                       else ablation.overall_verdict(checks))
            groups.append({"baseline": baseline, "dom": dom, "bulk": bulk, "checks": checks,
                           "verdict": verdict})
    setting = (f"{base.dataset} n={base.n_train}, {base.model} {base.depth}×{base.width} "
               f"{base.activation}, {base.loss}, lr={base.lr}")
    timings["total_s"] = time.time() - t0
    experiment = {"preset": FLAGS.preset, "setting": setting, "start": start_info,
                  "start_description": start_description, **settings, "seed": FLAGS.seed,
                  "variants": list(summary), "criteria": groups, "timings": timings,
                  "thresholds": {"chi_most": CHI_MOST, "top_share_little": TOP_SHARE_LITTLE,
                                 "dom_stalls": DOM_STALLS, "bulk_as_well": BULK_AS_WELL}}
    records.write_json_atomic(root / "summary.json", summary)
    records.write_json_atomic(root / "experiment.json", experiment)
    plots.plot_variant_overlay(runs, root / "loss_overlay.png",
                 f"{setting}; start: {start_info['kind']} (step {start_info['step']}); k={k}, "
                 f"R={settings['refresh_every']}")
    (root / "verdict.md").write_text(ablation.verdict_markdown(summary, experiment, groups))
    print(json.dumps({"verdicts": {g["baseline"]: g["verdict"] for g in groups},
                      "final_loss": {n: e["final_loss"] for n, e in summary.items()},
                      "total_s": round(timings["total_s"], 1)}), file=sys.stderr)
    print(f"records in {root}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    app.run(main)
