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
  3. WORKDIR/summary.json (keyed by variant), WORKDIR/loss_overlay.png,
     WORKDIR/verdict.md, generated from the numbers with criteria fixed in
     lossland.ablation, and last WORKDIR/experiment.json (start, settings,
     timings, the C4 criteria), whose presence marks the experiment complete.

--seeds=0,1,2 runs that whole experiment once per seed (its own data,
initialization and warm-up point) into WORKDIR/seed_<s>/, then judges C4 across
the seeds (`ablation.c4_summary`, rule `ablation.SEEDS_RULE`): WORKDIR/c4_summary.json,
WORKDIR/verdict.md and WORKDIR/loss_seeds.png. Rerun the same command after a kill:
finished seeds are kept (refused if their settings differ), an unfinished one
starts over.

Variants: gd, dom, bulk (full batch), and sgd, dom_sgd, bulk_sgd (minibatches
of --batch_size; projections from the minibatch HVP).

    python -m experiments.subspace --workdir=runs/subspace --preset=quick
    python -m experiments.subspace --workdir=runs/subspace_sgd --variants=sgd,dom_sgd,bulk_sgd
    python -m experiments.subspace --workdir=/tmp/s --preset=smoke --start=init
    python -m experiments.subspace --workdir=runs/c4_seeds --preset=decade --seeds=0,1,2
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from absl import app, flags, logging

from experiments import subspace_seeds
from lossland import checkpoints, config as config_lib, data as data_lib
from lossland import ablation, plots, records, runner, sharding
from lossland import experiment as experiment_lib
from lossland.ablation import BULK_AS_WELL, CHI_MOST, DOM_STALLS, TOP_SHARE_LITTLE, VARIANTS

# Each preset: the base RunConfig fields, then the experiment's own settings.
QUICK = {
    "run": dict(dataset="mnist1d", n_train=1000, model="mlp", width=256, depth=2,
                activation="relu", loss="mse", lr=0.05, batch_size=128, lanczos_iters=60,
                lanczos_tol=1e-3, log_every=10, checkpoint_every=0),
    "steps": 500, "k": 10, "refresh_every": 10, "track_every": 9,
    "warmup_max_steps": 3000, "warmup_track_every": 50, "eos_hold_steps": 200,
    "plots": True,
}
PRESETS = {
    "quick": QUICK,
    # "quick" on the decade sweep's network (issue 25) at its η = 0.1 scan arm's setting:
    # MNIST-1D n=1024, MLP 2×64 ReLU, MSE, lr=0.1 entered the edge of stability at step
    # 2150, 3350 and 2900 for seeds 0, 1 and 2 (BUILD_NOTES), hence the cap of 6000.
    "decade": {**QUICK, "run": dict(QUICK["run"], n_train=1024, width=64, lr=0.1),
               "warmup_max_steps": 6000},
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
                  "2 CPU cores; decade: the decade sweep's network at its η = 0.1 scan arm "
                  "(MNIST-1D n=1024, MLP 2×64, lr=0.1), about 3 min a seed; smoke: a tiny run "
                  "for tests.")
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
flags.DEFINE_list("seeds", [], "Run the whole experiment once per seed, each from its own "
                  "warm-up point, into WORKDIR/seed_<s>/, and judge C4 across them "
                  "(WORKDIR/c4_summary.json, verdict.md, loss_seeds.png). A rerun keeps the "
                  "finished seeds. Replaces --seed.")
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


def _settings() -> dict:
    preset = PRESETS[FLAGS.preset]
    settings = {name: _setting(name) for name in ("steps", "k", "refresh_every", "track_every",
                                                    "warmup_max_steps", "eos_hold_steps")}
    settings["warmup_track_every"] = min(preset["warmup_track_every"], settings["eos_hold_steps"])
    return settings


def _configs(root: Path, seed: int, settings: dict):
    """The validated base RunConfig (warm-up setting) and the variants' RunConfigs."""
    run_fields = dict(PRESETS[FLAGS.preset]["run"], seed=seed, overwrite=False, plots=False)
    if FLAGS.lr is not None:
        run_fields["lr"] = FLAGS.lr
    k = settings["k"]
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
    return base, variant_cfgs


def _setting_text(base: config_lib.RunConfig) -> str:
    return (f"{base.dataset} n={base.n_train}, {base.model} {base.depth}×{base.width} "
            f"{base.activation}, {base.loss}, lr={base.lr}")


def _identity(base: config_lib.RunConfig, settings: dict, seed: int) -> dict:
    """What a finished seed's experiment.json must match for a rerun to keep it."""
    return {"preset": FLAGS.preset, "setting": _setting_text(base), **settings, "seed": seed,
            "eos_threshold": FLAGS.eos_threshold, "variants": list(FLAGS.variants)}


def _run_seed(root: Path, base, variant_cfgs: dict, settings: dict, seed: int):
    """One complete experiment into `root` (warm-up, variants, summary, verdict); returns
    (experiment.json's dict, each variant's metrics rows). experiment.json is written last,
    so its presence marks the experiment complete."""
    t0 = time.time()
    timings = {}
    if FLAGS.start == "eos":
        start_params, start_description, start_info = _warmup(root, base, settings)
    else:
        start_params, start_description = None, "the initialization (seed %d)" % seed
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
        if PRESETS[FLAGS.preset]["plots"]:
            plots.plot_run(result.workdir)
        runs[name] = records.read_metrics(result.workdir)
        timings[f"{name}_s"] = time.time() - t
        print(f"{name}: {result.status} at step {result.step}", file=sys.stderr)

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
    setting = _setting_text(base)
    timings["total_s"] = time.time() - t0
    experiment = {**_identity(base, settings, seed), "start": start_info,
                  "start_description": start_description, "variants": list(summary),
                  "criteria": groups, "timings": timings,
                  "thresholds": {"chi_most": CHI_MOST, "top_share_little": TOP_SHARE_LITTLE,
                                 "dom_stalls": DOM_STALLS, "bulk_as_well": BULK_AS_WELL}}
    records.write_json_atomic(root / "summary.json", summary)
    plots.plot_variant_overlay(runs, root / "loss_overlay.png",
                 f"{setting}; start: {start_info['kind']} (step {start_info['step']}); "
                 f"k={settings['k']}, R={settings['refresh_every']}")
    (root / "verdict.md").write_text(ablation.verdict_markdown(summary, experiment, groups))
    records.write_json_atomic(root / "experiment.json", experiment)   # last: marks it complete
    print(json.dumps({"seed": seed, "verdicts": {g["baseline"]: g["verdict"] for g in groups},
                      "final_loss": {n: e["final_loss"] for n, e in summary.items()},
                      "total_s": round(timings["total_s"], 1)}), file=sys.stderr)
    return experiment, runs


def _main_seeds(root: Path, settings: dict) -> int:
    """--seeds: one complete experiment per seed, then C4 across them."""
    try:
        seeds = subspace_seeds.parse_seeds(FLAGS.seeds,
                                           FLAGS.seed if FLAGS["seed"].present else None)
        configs, identities = {}, {}
        for seed in seeds:
            try:
                configs[seed] = _configs(root / f"seed_{seed}", seed, settings)
            except config_lib.ConfigError as e:
                raise config_lib.ConfigError(f"--seeds={','.join(FLAGS.seeds)} sets each "
                                             f"run's --seed: {e}") from None
            identities[seed] = {**_identity(configs[seed][0], settings, seed),
                                "start": FLAGS.start}
        finished = (set() if FLAGS.overwrite else
                    subspace_seeds.finished_seeds(root, identities))
    except (config_lib.ConfigError, records.WorkdirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    records.prepare_workdir(root, overwrite=FLAGS.overwrite)
    experiments, runs_by_seed = [], {}
    for seed in seeds:
        folder = root / f"seed_{seed}"
        if seed in finished:
            print(f"seed {seed}: finished before, kept", file=sys.stderr)
            experiment, runs = subspace_seeds.read_finished(folder)
        else:
            records.prepare_workdir(folder, overwrite=True)   # an unfinished seed starts over
            try:
                experiment, runs = _run_seed(folder, *configs[seed], settings, seed)
            except _Interrupted as e:
                print(f"interrupted in seed {seed} ({e}); rerun the same command to go on "
                      "from this seed.", file=sys.stderr)
                return runner.EXIT_CODES[runner.STATUS_INTERRUPTED]
            except (config_lib.ConfigError, data_lib.DataError, records.WorkdirError,
                    RuntimeError) as e:
                print(f"error in seed {seed}: {e}", file=sys.stderr)
                return 2
        experiments.append(experiment)
        runs_by_seed[seed] = runs
    summary = subspace_seeds.write_outputs(root, seeds, experiments, runs_by_seed,
                                           f"k={settings['k']}, R={settings['refresh_every']}")
    print(json.dumps({"seeds": seeds, "verdicts": summary["verdicts"],
                      "smallest_margins": {c["name"]: c["smallest_margin"]
                                           for c in summary["groups"][0]["criteria"]}}),
          file=sys.stderr)
    print(f"records in {root}", file=sys.stderr)
    return 0


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
    settings = _settings()
    k = settings["k"]
    root = Path(FLAGS.workdir)
    projecting = [name for name in FLAGS.variants if VARIANTS[name][1] != "none"]
    if projecting and k < 1:
        print(f"error: --k={k} is not allowed: the variants {projecting} project on the top-k "
              "Hessian subspace, so k must be >= 1. Set --k, or run only gd,sgd.",
              file=sys.stderr)
        return 2
    if FLAGS.seeds:
        return _main_seeds(root, settings)
    try:
        base, variant_cfgs = _configs(root, FLAGS.seed, settings)
        if root.is_dir() and any(root.iterdir()) and not FLAGS.overwrite:   # (no --resume here)
            raise records.WorkdirError(f"--workdir={root} exists and is not empty. Pass "
                                       "--overwrite to replace its records, or choose a new "
                                       "--workdir.")
        records.check_workdir(root, overwrite=FLAGS.overwrite)
    except (config_lib.ConfigError, records.WorkdirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    records.prepare_workdir(root, overwrite=FLAGS.overwrite)
    try:
        _run_seed(root, base, variant_cfgs, settings, FLAGS.seed)
    except _Interrupted as e:
        print(f"interrupted; the experiment stops here ({e}). Rerun with --overwrite.",
              file=sys.stderr)
        return runner.EXIT_CODES[runner.STATUS_INTERRUPTED]
    except (config_lib.ConfigError, data_lib.DataError, records.WorkdirError,
            RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"records in {root}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    app.run(main)
