"""Subspace ablations (claim C4): GD, Dom-GD and Bulk-GD from one shared start.

MISSION.md, "Subspace ablations": Dom-GD projects each update onto span V_k
(the top-k Hessian eigenvectors, refreshed every R steps); Bulk-GD removes that
part. C4 says that near θ* the top-subspace part is most of the gradient but
drives little of the learning (compare Song, Ahn & Yun 2024: Dom-SGD stalls,
Bulk-SGD trains as well as SGD).

Protocol
  1. Start (--start=eos, default): full-batch GD on the preset's setting (the
     default run: MNIST-1D n=1000, MLP 2×256 ReLU, MSE, lr=0.05) until the
     stability ratio λ1·lr/2 ≥ --eos_threshold has held --eos_hold_steps steps
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
import math
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from lossland import checkpoints, config as config_lib, data as data_lib  # noqa: E402
from lossland import plots, records, runner, sharding  # noqa: E402

# name -> (optimizer, projection, baseline it is compared with)
VARIANTS = {
    "gd": ("gd", "none", "gd"),
    "dom": ("gd", "dom", "gd"),
    "bulk": ("gd", "bulk", "gd"),
    "sgd": ("sgd", "none", "sgd"),
    "dom_sgd": ("sgd", "dom", "sgd"),
    "bulk_sgd": ("sgd", "bulk", "sgd"),
}

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

# C4 criteria, fixed before any run (not tuned to the outcome).
CHI_MOST = 0.5          # "most of the gradient": mean χ_k along the baseline > this
TOP_SHARE_LITTLE = 0.2  # "little of the learning": Σ ΔL_top / Σ ΔL_bulk along the baseline < this
DOM_STALLS = 0.2        # Dom stalls: its loss decrease < this × the baseline's
BULK_AS_WELL = 0.8      # Bulk trains as well: its loss decrease ≥ this × the baseline's

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
flags.DEFINE_integer("eos_hold_steps", None, "The warm-up stops once λ1·lr/2 ≥ "
                     "--eos_threshold has held this many steps.", lower_bound=1)
flags.DEFINE_float("eos_threshold", 0.9, "Stability ratio that counts as the edge of "
                   "stability.", lower_bound=0)
FLAGS = flags.FLAGS


def _setting(name):
    value = getattr(FLAGS, name)
    return PRESETS[FLAGS.preset][name] if value is None else value


def _fmt(value, spec=".4g") -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) \
        else format(value, spec)


def summarize_variant(rows: list[dict], name: str) -> dict:
    """Per-variant numbers from its metrics.jsonl rows alone."""
    final = rows[-1] if rows else {}
    steps_rows = [r for r in rows if "status" not in r]
    start_loss = next((r["loss"] for r in steps_rows if r.get("step") == 0 and "loss" in r), None)
    final_loss = final.get("loss") if final.get("status") == runner.STATUS_FINISHED else None
    tracked = [r for r in steps_rows if "chi_k" in r]
    total = lambda key: float(np.sum([r[key] for r in tracked])) if tracked else None
    mean = lambda key: float(np.mean([r[key] for r in tracked])) if tracked else None
    sum_full, sum_top, sum_bulk = (total("delta_loss_full"), total("delta_loss_top"),
                                   total("delta_loss_bulk"))
    parts = sum_top + sum_bulk if tracked else None
    # Shares of the decrease the two parts make together; defined only when they lower it.
    share = lambda part: part / parts if parts is not None and parts < 0 else None
    decrease = (start_loss - final_loss if start_loss is not None and final_loss is not None
                else None)
    return {
        "optimizer": VARIANTS[name][0],
        "projection": VARIANTS[name][1],
        "status": final.get("status"),
        "steps": final.get("step"),
        "start_loss": start_loss,
        "final_loss": final_loss,
        "final_accuracy": final.get("accuracy") if final_loss is not None else None,
        "loss_decrease": decrease,
        "relative_loss_decrease": decrease / start_loss if decrease is not None and start_loss
        else None,
        "num_tracked_steps": len(tracked),
        "mean_chi_1": mean("chi_1"),
        "mean_chi_k": mean("chi_k"),
        "mean_stability_ratio": mean("stability_ratio"),
        "sum_delta_loss_full": sum_full,
        "sum_delta_loss_top": sum_top,
        "sum_delta_loss_bulk": sum_bulk,
        # Σ ΔL_part / (Σ ΔL_top + Σ ΔL_bulk) over the tracked steps: the shares sum
        # to 1; a negative share means that part raised the loss. On a quadratic
        # Σ ΔL_top + Σ ΔL_bulk = Σ ΔL_full exactly.
        "share_top": share(sum_top),
        "share_bulk": share(sum_bulk),
        # The top part's loss change per unit of the bulk part's (when the bulk part
        # lowers the loss): < 0 the top part raises the loss, 1 both lower it equally.
        "top_vs_bulk": sum_top / sum_bulk if tracked and sum_bulk < 0 else None,
        # Check of the sampling: the tracked mean one-step change × steps against the
        # actual change of the loss over the run.
        "tracked_mean_delta_full_x_steps": (sum_full / len(tracked) * final.get("step", 0)
                                            if tracked else None),
        "fraction_steps_top_decreases": (float(np.mean([r["delta_loss_top"] < 0 for r in tracked]))
                                         if tracked else None),
        "wall_time_s": final.get("wall_time"),
    }


def add_baseline_ratios(summary: dict) -> None:
    """decrease_vs_baseline: a variant's loss decrease over its baseline's (gd or sgd)."""
    for name, entry in summary.items():
        base = summary.get(VARIANTS[name][2])
        ratio = None
        if base and base["loss_decrease"] and base["loss_decrease"] > 0:
            if entry["loss_decrease"] is not None:
                ratio = entry["loss_decrease"] / base["loss_decrease"]
            elif entry["status"] == runner.STATUS_DIVERGED:
                ratio = float("-inf")  # the loss blew up: no decrease at all
        entry["decrease_vs_baseline"] = ratio


def c4_criteria(summary: dict, baseline: str, dom: str, bulk: str) -> list[dict]:
    """The four C4 checks; each holds (True), fails (False) or cannot be decided (None)."""
    base, d, b = summary.get(baseline), summary.get(dom), summary.get(bulk)
    checks = []

    def check(name, statement, value, threshold, op, detail):
        holds = None if value is None else bool(op(value, threshold))
        checks.append({"name": name, "statement": statement, "value": value,
                       "threshold": threshold, "holds": holds, "detail": detail})

    greater, less = (lambda v, t: v > t), (lambda v, t: v < t)
    check("top_is_most_of_gradient", f"mean χ_k along {baseline} > {CHI_MOST}",
          base and base["mean_chi_k"], CHI_MOST, greater,
          f"mean χ_k = {_fmt(base and base['mean_chi_k'], '.3f')} over "
          f"{base and base['num_tracked_steps']} tracked steps")
    check("top_drives_little", f"Σ ΔL_top / Σ ΔL_bulk along {baseline} < {TOP_SHARE_LITTLE} "
          "(the top part lowers the loss by less than a fifth of what the bulk part does; "
          "negative: it raises the loss)",
          base and base["top_vs_bulk"], TOP_SHARE_LITTLE, less,
          f"Σ ΔL_full = {_fmt(base and base['sum_delta_loss_full'])}, Σ ΔL_top = "
          f"{_fmt(base and base['sum_delta_loss_top'])}, Σ ΔL_bulk = "
          f"{_fmt(base and base['sum_delta_loss_bulk'])}")
    check("dom_stalls", f"{dom} loss decrease < {DOM_STALLS} × {baseline}'s",
          d and d["decrease_vs_baseline"], DOM_STALLS, less,
          f"{dom}: {_describe(d)}; {baseline}: {_describe(base)}")
    check("bulk_trains_as_well", f"{bulk} loss decrease ≥ {BULK_AS_WELL} × {baseline}'s",
          b and b["decrease_vs_baseline"], BULK_AS_WELL, lambda v, t: v >= t,
          f"{bulk}: {_describe(b)}; {baseline}: {_describe(base)}")
    return checks


def _describe(entry) -> str:
    if not entry:
        return "not run"
    if entry["status"] != runner.STATUS_FINISHED:
        return f"{entry['status']} at step {entry['steps']}"
    return (f"loss {_fmt(entry['start_loss'])} → {_fmt(entry['final_loss'])} "
            f"(decrease {_fmt(entry['loss_decrease'])})")


def _overall(checks: list[dict]) -> str:
    results = [c["holds"] for c in checks]
    if all(r is True for r in results):
        return "reproduced"
    if any(r is None for r in results) and not any(r is False for r in results):
        return "undetermined"
    if not any(results[1:]):  # none of the three learning checks holds
        return "not reproduced"
    return "partly reproduced"


def write_verdict(path: Path, summary: dict, experiment: dict, groups: list[dict]) -> None:
    """verdict.md, every sentence filled from the numbers."""
    lines = ["# C4 verdict: the top subspace is idle", "",
             "Claim (MISSION.md, C4): near θ* the top-subspace part of the gradient is most of "
             "the gradient but drives little of the learning; projected onto the dominant "
             "subspace, training stalls; with it removed, training goes as well as without "
             "projection (Song, Ahn & Yun 2024).", "",
             f"Setting: {experiment['setting']}. Start: {experiment['start_description']}. "
             f"Every variant then ran {experiment['steps']} steps with k = {experiment['k']}, "
             f"V_k refreshed every {experiment['refresh_every']} steps, attribution measured "
             f"every {experiment['track_every']} steps.", "",
             "Criteria (fixed before running): mean χ_k > "
             f"{CHI_MOST}; Σ ΔL_top / Σ ΔL_bulk < {TOP_SHARE_LITTLE}; Dom loss decrease < "
             f"{DOM_STALLS} × baseline; Bulk loss decrease ≥ {BULK_AS_WELL} × baseline.", ""]
    for group in groups:
        lines += [f"## {group['baseline']} vs {group['dom']} vs {group['bulk']}: "
                  f"**{group['verdict']}**", ""]
        for c in group["checks"]:
            mark = {True: "holds", False: "does not hold", None: "undetermined"}[c["holds"]]
            lines.append(f"- {c['statement']}: **{mark}** (value {_fmt(c['value'], '.3f')}; "
                         f"{c['detail']}).")
        lines.append("")
        base = summary.get(group["baseline"])
        if base and base["tracked_mean_delta_full_x_steps"] is not None and base["loss_decrease"]:
            estimate, actual = base["tracked_mean_delta_full_x_steps"], -base["loss_decrease"]
            representative = estimate * actual > 0 and 0.5 <= estimate / actual <= 2.0
            lines += [f"Sampling check ({group['baseline']}): the mean tracked ΔL_full × steps is "
                      f"{_fmt(estimate)}, the actual loss change over the run {_fmt(actual)}; "
                      + ("the tracked steps are a fair sample of the run." if representative else
                         "the tracked steps are NOT a fair sample of the run (the loss "
                         "oscillates step to step), so the attribution sums are noisy; read "
                         "the second check with care."), ""]
        d, b = summary.get(group["dom"]), summary.get(group["bulk"])
        dom_ratio = d and d["decrease_vs_baseline"]
        if dom_ratio is not None and dom_ratio >= BULK_AS_WELL:
            lines += [f"{group['dom']} trained as well as {group['baseline']} here "
                      f"(decrease ratio {_fmt(dom_ratio, '.3f')}): the top subspace was not "
                      "idle in this setting.", ""]
        bulk_ratio = b and b["decrease_vs_baseline"]
        if bulk_ratio is not None and bulk_ratio > 1:
            lines += [f"{group['bulk']} lowered the loss more than {group['baseline']} "
                      f"({_fmt(bulk_ratio, '.3f')} × its decrease).", ""]
        if bulk_ratio is not None and bulk_ratio < DOM_STALLS:
            lines += [f"{group['bulk']} barely trained (decrease ratio "
                      f"{_fmt(bulk_ratio, '.3f')}).", ""]
    lines += ["## Numbers", "", "| variant | status | start loss | final loss | decrease | "
              "vs baseline | mean χ_k | Σ ΔL_full | Σ ΔL_top | Σ ΔL_bulk | share top | "
              "share bulk |", "|" + "---|" * 12]
    for name, e in summary.items():
        lines.append(f"| {name} | {e['status']} | {_fmt(e['start_loss'])} | "
                     f"{_fmt(e['final_loss'])} | {_fmt(e['loss_decrease'])} | "
                     f"{_fmt(e['decrease_vs_baseline'], '.3f')} | {_fmt(e['mean_chi_k'], '.3f')} | "
                     f"{_fmt(e['sum_delta_loss_full'])} | {_fmt(e['sum_delta_loss_top'])} | "
                     f"{_fmt(e['sum_delta_loss_bulk'])} | "
                     f"{_fmt(e['share_top'], '.3f')} | {_fmt(e['share_bulk'], '.3f')} |")
    lines += ["", "Σ are over the tracked steps of each variant's own trajectory, with "
              "ΔL_full = L(θ − ηg) − L(θ), ΔL_top = L(θ − ηPg) − L(θ) and ΔL_bulk = "
              "L(θ − η(I − P)g) − L(θ), P from the tracked top-k eigenvectors (one-step "
              "changes, not the loss change of the projected runs). Shares are Σ ΔL_part / "
              "(Σ ΔL_top + Σ ΔL_bulk), shown only when that sum is a decrease; a negative "
              "share means that part raised the loss.", "",
              "Generated by `experiments/subspace.py` from summary.json; not edited by hand.", ""]
    path.write_text("\n".join(lines))


def plot_overlay(runs: dict[str, list[dict]], path: Path, title: str) -> Path:
    """Loss against step for every variant (log y), and χ_k where tracked."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, rows in runs.items():
        steps, loss = records.scalar_rows(rows, "loss")
        keep = loss > 0
        axes[0].plot(steps[keep], loss[keep], lw=1.2, label=name)
        steps, chi = records.scalar_rows([r for r in rows if "status" not in r], "chi_k")
        if steps.size:
            axes[1].plot(steps, chi, lw=1.0, label=name)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("full-batch training loss")
    axes[1].set_ylabel("χ_k = ‖V_kᵀg‖²/‖g‖²")
    axes[1].set_ylim(-0.02, 1.02)
    for ax in axes:
        ax.set_xlabel("step after the shared start")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class _Interrupted(Exception):
    """SIGINT/SIGTERM reached a run: stop the whole experiment, not just that run."""


def _warmup(root: Path, base: config_lib.RunConfig, settings: dict):
    """GD to the edge of stability; returns (params at its end, its description)."""
    cfg = base.replace(workdir=str(root / "warmup"), optimizer="gd", projection="none",
                       steps=settings["warmup_max_steps"], track_every=settings["warmup_track_every"],
                       track_k=1, eos_hold_steps=settings["eos_hold_steps"],
                       eos_threshold=FLAGS.eos_threshold, plots=False)
    exp = runner.build_experiment(cfg)
    result = runner.run(cfg, experiment=exp)
    if result.status == runner.STATUS_INTERRUPTED:
        raise _Interrupted(result.message)
    if result.status != runner.STATUS_FINISHED:
        raise RuntimeError(f"the warm-up {result.status} at step {result.step}: {result.message}")
    manager = checkpoints.CheckpointManager(result.workdir)
    template = checkpoints.initial_state(exp.model.params, exp.optimizer.init(exp.model.params),
                                         cfg.track_k)
    state = manager.restore_latest(template)
    manager.close()
    if state is None or int(state.step) != result.step:
        raise RuntimeError(f"the warm-up checkpoint in {result.workdir} is not at its last step "
                           f"{result.step}.")
    row = result.last_row
    ratio = row.get("stability_ratio")
    held = row.get("stop_reason") == "eos_hold"
    description = (f"GD warm-up checkpoint at step {result.step} (λ1·lr/2 = {_fmt(ratio, '.3f')}, "
                   f"loss {_fmt(row.get('loss'))}; "
                   + ("ratio ≥ %g held %d steps)" % (FLAGS.eos_threshold, settings["eos_hold_steps"])
                      if held else "step cap hit before the edge of stability held)"))
    info = {"kind": "eos", "step": result.step, "stop_reason": row.get("stop_reason"),
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
    try:
        base = config_lib.RunConfig(**run_fields)
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

    summary = {name: summarize_variant(rows, name) for name, rows in runs.items()}
    add_baseline_ratios(summary)
    groups = []
    for baseline, dom, bulk in (("gd", "dom", "bulk"), ("sgd", "dom_sgd", "bulk_sgd")):
        if any(name in summary for name in (baseline, dom, bulk)):
            checks = c4_criteria(summary, baseline, dom, bulk)
            missing = [name for name in (baseline, dom, bulk) if name not in summary]
            verdict = (f"incomplete ({', '.join(missing)} not run)" if missing
                       else _overall(checks))
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
    plot_overlay(runs, root / "loss_overlay.png",
                 f"{setting}; start: {start_info['kind']} (step {start_info['step']}); k={k}, "
                 f"R={settings['refresh_every']}")
    write_verdict(root / "verdict.md", summary, experiment, groups)
    print(json.dumps({"verdicts": {g["baseline"]: g["verdict"] for g in groups},
                      "final_loss": {n: e["final_loss"] for n, e in summary.items()},
                      "total_s": round(timings["total_s"], 1)}), file=sys.stderr)
    print(f"records in {root}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    app.run(main)
