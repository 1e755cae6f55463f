"""Edge-of-stability learning-rate sweep on the default setting (claim C3).

For each lr, trains full-batch GD with Hessian tracking and writes
`summary.json` with, per lr: the first step at which λ1·lr/2 ≥ --eos_threshold,
the entry step proper and the edge-of-stability state of `lossland.eos` (the
first upward crossing, which skips the catapult of a run that starts above
2/lr; holding while the trailing median stays in --eos_band), the median
stability ratio and median χ_1 over the last half of training and after
entry, and the final loss; plus the sharpness overlay plot (Cohen et al.
2021, Fig. 1).

By default each run gets steps = --lr_steps_product / lr, so every run covers
the same gradient-flow time η·t (sharpening proceeds at a rate set by η·t).

    python -m experiments.eos --workdir=runs/eos
    python -m experiments.eos --workdir=runs/eos --lrs=0.01,0.02 --lr_steps_product=200
"""

import math
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags, logging

from lossland import cli, config as config_lib, data as data_lib, eos, plots, records, runner

cli.define_run_flags(workdir="runs/eos", track_every=20, checkpoint_every=1000)
flags.DEFINE_list("lrs", ["0.02", "0.05", "0.1"], "Learning rates to sweep.")
flags.DEFINE_float("lr_steps_product", 150.0, "Steps per run = this / lr (0 = use --steps).",
                   lower_bound=0)
FLAGS = flags.FLAGS


def summarize_run(rows: list[dict], lr: float, rule: eos.EosRule) -> dict:
    """The per-lr summary, from the records alone; entry and holding are `lossland.eos`'s."""
    tracked = [r for r in rows if "stability_ratio" in r and "status" not in r]
    final = rows[-1] if rows else {}
    last_step = final.get("step", 0)
    state = eos.run_summary(rows, rule, hold_steps=0)
    entered = state["eos_entry_step"]
    late = [r for r in tracked if r["step"] >= last_step / 2]
    after = [r for r in tracked if entered is not None and r["step"] >= entered]
    median = lambda rows_, key: float(np.median([r[key] for r in rows_])) if rows_ else None
    lo, hi = rule.band
    return {
        "lr": lr,
        "two_over_lr": 2.0 / lr,
        "steps": last_step,
        "status": final.get("status"),
        "initial_stability_ratio": tracked[0]["stability_ratio"] if tracked else None,
        "first_step_ratio_ge_threshold": next((r["step"] for r in tracked
                                               if r["stability_ratio"] >= rule.threshold), None),
        "entry_step": entered,
        "eos_state": state["eos_state"],
        "eos_label": state["eos_label"],
        "held_steps": state["held_steps"],
        "median_stability_ratio_last_half": median(late, "stability_ratio"),
        "median_chi_1_last_half": median(late, "chi_1"),
        "median_stability_ratio_after_entry": median(after, "stability_ratio"),
        "median_chi_1_after_entry": median(after, "chi_1"),
        "median_lambda1_last_half": (float(np.median([r["eigenvalues"][0] for r in late]))
                                     if late else None),
        "final_loss": final.get("loss"),
        "mean_matvecs_per_track": (float(np.mean([r["num_matvecs"] for r in tracked]))
                                   if tracked else None),
        "track_time_total_s": float(sum(r.get("track_time", 0.0) for r in tracked)),
        "wall_time_s": final.get("wall_time"),
        "at_edge_of_stability": (None if not late else bool(
            lo <= median(late, "stability_ratio") <= hi)),
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        lrs = [float(v) for v in FLAGS.lrs]
    except ValueError:
        print(f"error: --lrs={','.join(FLAGS.lrs)} must be a comma-separated list of numbers",
              file=sys.stderr)
        return 2
    if not lrs or min(lrs) <= 0:
        print(f"error: --lrs={','.join(FLAGS.lrs)}: every learning rate must be > 0",
              file=sys.stderr)
        return 2
    root = Path(FLAGS.workdir)
    if root.exists() and not root.is_dir():
        print(f"error: --workdir={str(root)!r} exists and is not a directory; choose another "
              "path.", file=sys.stderr)
        return 2
    try:
        base = cli.config_from_flags(overwrite=False, resume=False)
        if base.track_every <= 0:
            raise config_lib.ConfigError(
                f"--track_every={base.track_every} is not allowed: the edge-of-stability sweep "
                "measures λ1 at tracked steps, so it must be > 0 (default 20).")
        configs = []
        for lr in lrs:
            steps = (int(math.ceil(FLAGS.lr_steps_product / lr)) if FLAGS.lr_steps_product > 0
                     else base.steps)
            cfg = base.replace(lr=lr, steps=steps, workdir=str(root / f"lr_{lr:g}"),
                               overwrite=FLAGS.overwrite)
            config_lib.validate(cfg)
            configs.append(cfg)
        if root.exists() and any(root.iterdir()) and not FLAGS.overwrite:
            print(f"note: {root} exists; finished runs are kept, partial ones resumed "
                  "(--overwrite to start afresh)", file=sys.stderr)
        summary = {"setting": {k: v for k, v in base.asdict().items()
                               if k not in ("lr", "steps", "workdir", "overwrite", "resume")},
                   "runs": {}}
        for cfg in configs:
            print(f"== lr={cfg.lr:g}: {cfg.steps} steps -> {cfg.workdir}", file=sys.stderr)
            start = time.time()
            result = runner.ensure_run(cfg)
            if cfg.plots:
                plots.plot_run(result.workdir)
            rule = eos.EosRule(cfg.eos_threshold, tuple(cfg.eos_band), cfg.eos_window)
            run_summary = summarize_run(records.read_metrics(cfg.workdir), cfg.lr, rule)
            run_summary["this_invocation_s"] = time.time() - start
            summary["runs"][f"{cfg.lr:g}"] = run_summary
    except (config_lib.ConfigError, data_lib.DataError, records.WorkdirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    records.write_json_atomic(root / "summary.json", summary)
    overlay = plots.plot_sharpness_overlay([c.workdir for c in configs], root / "sharpness.png")
    print(format_table(summary), file=sys.stderr)
    print(f"summary: {root / 'summary.json'}  plot: {overlay}", file=sys.stderr)
    return 0


def format_table(summary: dict) -> str:
    lines = ["lr      2/lr    entry step   median λ1·lr/2  median χ1  final loss  status"]
    for run in summary["runs"].values():
        fmt = lambda v, spec: format(v, spec) if isinstance(v, (int, float)) else "-"
        lines.append(f"{run['lr']:<7g} {run['two_over_lr']:<7.1f} "
                     f"{fmt(run['entry_step'], 'd'):<12} "
                     f"{fmt(run['median_stability_ratio_last_half'], '.3f'):<15} "
                     f"{fmt(run['median_chi_1_last_half'], '.3f'):<10} "
                     f"{fmt(run['final_loss'], '.4g'):<11} {run['status']}")
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main)
