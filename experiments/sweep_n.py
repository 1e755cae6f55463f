"""Dataset-size sweep (claims C1, C2): train on nested subsets N1 < N2 < … and fit against N.

For every grid point (dataset × loss × activation × N × seed) one run trains
full-batch GD until λ1·η/2 ≥ --eos_threshold has held for --hold_steps steps
(or --max_steps), probing along v1, the gradient, the last displacement and
random directions at the end (and every --probe_every steps). The sweep then
fits each recorded quantity against N on log–log axes, with a bootstrap
interval over seeds, and writes

    <workdir>/runs/<name>/     one run directory per grid point (metrics.jsonl, ...)
    <workdir>/sweep.jsonl      one row per grid run: stop_reason and the final quantities
    <workdir>/summary.json     per group and quantity: values per N and seed, fits, CIs
    <workdir>/plots/*.png      each quantity against N, one line per activation
    <workdir>/verdict.md       claims C1 and C2, generated from summary.json

Rerunning skips finished grid points, resumes interrupted ones from their last
checkpoint, and rewrites the summary; --overwrite starts every point afresh.

    python -m experiments.sweep_n --preset=smoke --workdir=/tmp/sweep_smoke
    python -m experiments.sweep_n --preset=quick --workdir=runs/sweep_quick   # ≤ 20 min, 2 CPUs
    python -m experiments.sweep_n --preset=full --workdir=runs/sweep_full     # accelerator
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from absl import app, flags, logging

from lossland import config as config_lib
from lossland import data as data_lib
from lossland import losses, models, records, verdicts
from lossland.fits import finite_or_nan, fit_scaling, nanmax, nanmean, nanmedian

PRESETS = {
    # For tests: tiny and fast (< ~1 min on 2 CPU cores).
    "smoke": dict(dataset=["mnist1d"], n_values=[64, 128, 256], seeds=[0, 1], width=16, depth=1,
                  lr=0.5, max_steps=60, hold_steps=10, track_every=5, probe_every=20, track_k=1,
                  lanczos_iters=8, probe_points=9, num_random_directions=1, probe_s_max=0.05,
                  num_bootstrap=500),
    # ≤ 20 min on 2 CPU cores: MNIST-1D, MLP 2×256, GD η = 0.05, MSE (MISSION defaults).
    # Measured on a shared 2-core CPU: λ1 reaches 0.9·2/η at N = 1000 after ~1700 (tanh) to
    # ~2050 (relu) steps, never at N = 250 (λ1 plateaus near 29), and grows by ~0.5 per 150
    # steps at N = 8000 (λ1 ≈ 13 at step 900), where a step costs ~8× that at N = 1000. So the
    # 1000-step cap binds for most N: these runs are compared at equal steps, and the verdict
    # counts how many held the edge of stability. The full preset lifts the cap.
    "quick": dict(dataset=["mnist1d"], n_values=[250, 500, 1000, 2000, 4000, 8000], seeds=[0, 1],
                  width=256, depth=2, lr=0.05, max_steps=1000, hold_steps=200, track_every=50,
                  probe_every=500, track_k=1, lanczos_iters=12, probe_points=21,
                  num_random_directions=1, probe_s_max=0.05, num_bootstrap=2000),
    # Accelerators: N up to what each dataset allows (capped at its size), Fashion-MNIST too.
    "full": dict(dataset=["mnist1d", "fashion_mnist"],
                 n_values=[500, 1000, 2000, 4000, 8000, 16000, 32000, 60000],
                 seeds=[0, 1, 2, 3, 4], width=256, depth=2, lr=0.05, max_steps=20000,
                 hold_steps=1000, track_every=20, probe_every=500, track_k=5, lanczos_iters=40,
                 probe_points=41, num_random_directions=2, probe_s_max=0.05, num_bootstrap=5000),
}

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The sweep's flags; defined only when run as a program, so that importing this
    module (tests, notebooks) defines no global flags that could clash with others."""
    flags.DEFINE_string("workdir", "runs/sweep_n", "Sweep directory (runs/, sweep.jsonl, "
                        "summary.json, plots/, verdict.md).")
    flags.DEFINE_enum("preset", "quick", list(PRESETS), "Defaults for every unset flag below: "
                      "smoke (tests), quick (≤ 20 min on 2 CPU cores), full (accelerators).")
    flags.DEFINE_bool("overwrite", False, "Start every grid point afresh (else finished points are "
                      "skipped and interrupted ones resumed).")
    flags.DEFINE_list("dataset", None, "Data source(s); each is its own sweep. Default: preset.")
    flags.DEFINE_string("data_dir", None, "Folder with dataset files (see experiments.train).")
    flags.DEFINE_list("n_values", None, "Training-set sizes N (nested subsets). Values above a "
                      "dataset's size are capped at it. Default: preset.")
    flags.DEFINE_list("seeds", None, "Seeds (data order and init). Default: preset.")
    flags.DEFINE_list("activations", ["relu", "tanh"],
                      "Activations (a kinked and a smooth control).")
    flags.DEFINE_list("losses", ["mse"], "Losses (mse, cross_entropy).")
    flags.DEFINE_float("lr", None, "GD step η. Default: preset (0.05).")
    flags.DEFINE_integer("max_steps", None, "Step cap per run. Default: preset.")
    flags.DEFINE_integer("hold_steps", None, "Stop once λ1·η/2 ≥ --eos_threshold has held this "
                         "many steps. Default: preset.")
    flags.DEFINE_float("eos_threshold", 0.9, "Stability-ratio threshold of the stop rule.")
    flags.DEFINE_integer("width", None, "MLP width. Default: preset.")
    flags.DEFINE_integer("depth", None, "MLP hidden layers. Default: preset.")
    flags.DEFINE_integer("track_every", None, "Lanczos every this many steps. Default: preset.")
    flags.DEFINE_integer("track_k", None, "Top eigenpairs tracked. Default: preset.")
    flags.DEFINE_integer("lanczos_iters", None, "Lanczos iterations. Default: preset.")
    flags.DEFINE_integer("probe_every", None, "Probe every this many steps (a multiple of "
                         "--track_every); probes also run at the end. Default: preset.")
    flags.DEFINE_float("probe_s_max", None, "Probe half-range s_max. Default: preset.")
    flags.DEFINE_integer("probe_points", None, "Points per probe line. Default: preset.")
    flags.DEFINE_integer("num_random_directions", None,
                         "Random control directions. Default: preset.")
    flags.DEFINE_integer("num_bootstrap", None,
                         "Bootstrap resamples for the N-fits. Default: preset.")
    flags.DEFINE_float("confidence", 0.95, "Confidence level of the intervals.")
    flags.DEFINE_bool("progress", True, "Per-run progress lines on stderr.")


RUNS_DIR, SWEEP_FILE = "runs", "sweep.jsonl"
SUMMARY_FILE, VERDICT_FILE = "summary.json", "verdict.md"

# Quantities fitted against N: key -> (label, scale). "log": log–log fit, y ∝ N^a.
# "linear": exponents (which may be ≤ 0), fitted against log10 N.
QUANTITIES = {
    "grad_norm": ("‖∇L‖ at the iterate", "log"),
    "probe_max_grad_norm": ("max ‖∇L‖ along all probes", "log"),
    "probe_max_curvature": ("max curvature uᵀHu along all probes", "log"),
    "probe_v1_max_grad_norm": ("max ‖∇L‖ along v1", "log"),
    "probe_grad_max_grad_norm": ("max ‖∇L‖ along the gradient", "log"),
    "probe_disp_max_grad_norm": ("max ‖∇L‖ along the last step", "log"),
    "probe_rand_max_grad_norm": ("max ‖∇L‖ along random directions", "log"),
    "probe_v1_max_curvature": ("max curvature along v1", "log"),
    "probe_grad_max_curvature": ("max curvature along the gradient", "log"),
    "probe_disp_max_curvature": ("max curvature along the last step", "log"),
    "probe_rand_max_curvature": ("max curvature along random directions", "log"),
    "probe_v1_slope_exponent": ("|slope| exponent at s* along v1", "linear"),
    "probe_v1_curvature_exponent": ("|curvature| exponent at s* along v1", "linear"),
    "probe_grad_slope_exponent": ("|slope| exponent at s* along the gradient", "linear"),
    "valley_distance": ("|s*| along v1, final iterate", "log"),
    "valley_distance_late": ("|s*| along v1, late-training median", "log"),
    "lambda1": ("λ1 at the final iterate", "log"),
}


@dataclasses.dataclass(frozen=True)
class GridPoint:
    dataset: str
    loss: str
    activation: str
    n: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.dataset}_{self.loss}_{self.activation}_n{self.n}_s{self.seed}"

    @property
    def group(self) -> str:
        return f"{self.dataset}/{self.loss}/{self.activation}"


# ----------------------------------------------------------------------------
# Settings and the grid
# ----------------------------------------------------------------------------

class SweepError(ValueError):
    """A bad sweep flag; the message names it."""


def settings_from_flags() -> dict:
    """The preset, with every flag the user set overriding it; validated."""
    s = dict(PRESETS[FLAGS.preset])
    for key in ("dataset", "n_values", "seeds", "lr", "max_steps", "hold_steps", "width", "depth",
                "track_every", "track_k", "lanczos_iters", "probe_every", "probe_s_max",
                "probe_points", "num_random_directions", "num_bootstrap"):
        if FLAGS[key].value is not None:
            s[key] = FLAGS[key].value
    s.update(activations=FLAGS.activations, losses=FLAGS.losses, eos_threshold=FLAGS.eos_threshold,
             data_dir=FLAGS.data_dir, confidence=FLAGS.confidence)
    return validate_settings(s)


def validate_settings(s: dict) -> dict:
    """Checks a settings dict (preset + flags); raises SweepError naming the flag."""
    s = dict(s)
    for key in ("n_values", "seeds"):
        try:
            s[key] = [int(v) for v in s[key]]
        except ValueError:
            raise SweepError(f"--{key}={','.join(map(str, s[key]))}: expected integers.")
    _check(all(n > 0 for n in s["n_values"]) and s["n_values"], "n_values", s["n_values"],
           "sizes must be positive integers")
    _check(len(set(s["seeds"])) == len(s["seeds"]) and s["seeds"], "seeds", s["seeds"],
           "give distinct seeds")
    for key, allowed in (("dataset", data_lib.DATASETS), ("activations", models.ACTIVATIONS),
                         ("losses", losses.PER_EXAMPLE_LOSSES)):
        bad = [v for v in s[key] if v not in allowed]
        _check(not bad and s[key], key, ",".join(s[key]), f"choose from {sorted(allowed)}")
    _check(0 < s["confidence"] < 1, "confidence", s["confidence"], "must lie in (0, 1)")
    _check(s["num_bootstrap"] >= 100, "num_bootstrap", s["num_bootstrap"], "must be >= 100")
    return s


def _check(ok, flag, value, allowed):
    if not ok:
        raise SweepError(f"--{flag}={value!r} is not allowed: {allowed}.")


def grid(settings: dict) -> list[GridPoint]:
    """Every grid point; N above a dataset's size is capped at that size (deduplicated)."""
    points = []
    for dataset in settings["dataset"]:
        available = data_lib.DATASETS[dataset].size["train"]
        sizes = sorted({min(n, available) if available else n for n in settings["n_values"]})
        for loss, activation, n, seed in itertools.product(
                settings["losses"], settings["activations"], sizes, settings["seeds"]):
            points.append(GridPoint(dataset, loss, activation, n, seed))
    return points


def run_config(point: GridPoint, settings: dict, workdir: Path) -> config_lib.RunConfig:
    cfg = config_lib.RunConfig(
        dataset=point.dataset, data_dir=settings["data_dir"], n_train=point.n, model="mlp",
        width=settings["width"], depth=settings["depth"], activation=point.activation,
        loss=point.loss, optimizer="gd", lr=settings["lr"], steps=settings["max_steps"],
        seed=point.seed, workdir=str(workdir / RUNS_DIR / point.name), plots=False,
        track_every=settings["track_every"], track_k=settings["track_k"],
        lanczos_iters=settings["lanczos_iters"], eos_hold_steps=settings["hold_steps"],
        eos_threshold=settings["eos_threshold"], probe_every=settings["probe_every"],
        probe_s_max=settings["probe_s_max"], probe_points=settings["probe_points"],
        num_random_directions=settings["num_random_directions"])
    config_lib.validate(cfg)
    return cfg


# ----------------------------------------------------------------------------
# Running (skip finished, resume partial)
# ----------------------------------------------------------------------------

def run_state(run_dir: Path) -> tuple[str, dict]:
    """('absent' | 'finished' | 'diverged' | 'partial', last status row or {})."""
    metrics = run_dir / records.METRICS_FILE
    if not metrics.exists():
        return "absent", {}
    rows = records.read_metrics(metrics)
    final = rows[-1] if rows and "status" in rows[-1] else {}
    if final.get("status") in ("finished", "diverged"):
        return final["status"], final
    return "partial", final


def run_point(point: GridPoint, cfg, *, overwrite: bool, progress: bool) -> tuple[str, str]:
    """Runs, resumes or skips one grid point; returns (what was done, the run's status).

    `runner.ensure_run` decides: finished and diverged points are skipped (a
    point that hit a smaller --max_steps is extended), partial ones resume, and
    a point run with other settings is refused unless --overwrite.
    """
    from lossland import runner  # imported here: flag parsing and errors stay fast

    result = runner.ensure_run(cfg.replace(overwrite=overwrite), progress=progress)
    return result.action, result.status


# ----------------------------------------------------------------------------
# Records → per-run rows → summary
# ----------------------------------------------------------------------------

def late_window(rows: list[dict], threshold: float) -> tuple[int | None, list[dict]]:
    """(EoS onset step, probed rows of the late window); see verdicts.c2_verdict.

    The window is the final uninterrupted stretch of tracked steps with
    stability ratio ≥ threshold, through the end of the run; for a run that
    never ends in such a stretch, the last quarter of its probed rows.
    """
    tracked = [r for r in rows if isinstance(r.get("stability_ratio"), (int, float))]
    probed = [r for r in rows if "valley_distance" in r]
    onset = None
    for row in reversed(tracked):
        if row["stability_ratio"] >= threshold:
            onset = row["step"]
        else:
            break
    if onset is not None:
        return onset, [r for r in probed if r["step"] >= onset]
    return None, probed[-max(1, math.ceil(len(probed) / 4)):] if probed else []


def run_row(point: GridPoint, run_dir: Path, threshold: float) -> dict:
    """One sweep.jsonl row: the grid point, how it stopped, and the final quantities."""
    rows = records.read_metrics(run_dir)
    final = rows[-1] if rows and "status" in rows[-1] else {}
    row = {"name": point.name, "group": point.group, **dataclasses.asdict(point),
           "status": final.get("status", "incomplete"), "stop_reason": final.get("stop_reason"),
           "final_step": final.get("step")}
    # "loss" names the loss function of the grid point; its final value is train_loss.
    row["train_loss"], row["train_accuracy"] = final.get("loss"), final.get("accuracy")
    for key in ("grad_norm", "stability_ratio", "chi_1", "valley_distance", "valley_at_edge",
                "probe_s_max", "wall_time"):
        row[key] = final.get(key)
    eigenvalues = final.get("eigenvalues") or [None]
    row["lambda1"] = eigenvalues[0]
    # A quadratic valley of curvature λ1 along v1 gives max ‖∇L‖ ≈ λ1·(s_max + |s*|) on the
    # probe (the slope at the far end dominates): the ratio tells a smooth valley from a spike.
    lambda1, s_max, valley = (finite_or_nan(row[key]) for key in
                              ("lambda1", "probe_s_max", "valley_distance"))
    reference = lambda1 * (s_max + valley)
    row["probe_v1_quadratic_ratio"] = (finite_or_nan(final.get("probe_v1_max_grad_norm"))
                                       / reference if reference > 0 else float("nan"))
    probe_keys = {k: v for k, v in final.items() if k.startswith("probe_")}
    row.update(probe_keys)
    suffix = "_max_grad_norm"
    directions = sorted(k[len("probe_"):-len(suffix)] for k in probe_keys if k.endswith(suffix))
    randoms = [d for d in directions if d.startswith("rand")]
    for quantity in ("max_grad_norm", "max_curvature"):
        row[f"probe_{quantity}"] = nanmax(final.get(f"probe_{d}_{quantity}")
                                          for d in directions)
        row[f"probe_rand_{quantity}"] = nanmax(final.get(f"probe_{d}_{quantity}")
                                               for d in randoms)
    for d in ("v1", "grad", "disp"):
        for kind in ("slope", "curvature"):
            row[f"probe_{d}_{kind}_exponent"] = nanmean(
                final.get(f"probe_{d}_{kind}_exponent_{side}") for side in ("left", "right"))
    onset, window = late_window(rows, threshold)
    distances = [finite_or_nan(r.get("valley_distance")) for r in window]
    distances = [d for d in distances if math.isfinite(d)]
    row["eos_onset_step"] = onset
    row["valley_distance_late"] = float(np.median(distances)) if distances else float("nan")
    row["valley_late_edge_fraction"] = (float(np.mean([bool(r.get("valley_at_edge"))
                                                       for r in window])) if window else None)
    row["valley_late_count"] = len(distances)
    first = next((r for r in rows if "valley_distance" in r and r.get("step") == 0), {})
    row["valley_distance_init"] = first.get("valley_distance")
    row["valley_init_at_edge"] = first.get("valley_at_edge")
    return records.to_jsonable(row)


def summarize(rows: list[dict], settings: dict) -> dict:
    """summary.json from sweep rows: per group and quantity, values and fits against N."""
    finished = [r for r in rows if r.get("status") == "finished"]
    groups = {}
    for group in dict.fromkeys(r["group"] for r in rows):
        members = [r for r in rows if r["group"] == group]
        done = [r for r in finished if r["group"] == group]
        sizes = sorted({r["n"] for r in done})
        seeds = sorted({r["seed"] for r in done})
        stop = {}
        for r in members:
            reason = r.get("stop_reason") or r.get("status")
            stop[reason] = stop.get(reason, 0) + 1
        entry = {**{k: members[0][k] for k in ("dataset", "loss", "activation")},
                 "num_runs": len(members), "num_eos": stop.get("eos_hold", 0),
                 "stop_reasons": stop, "quantities": {}}
        for key, (_, scale) in QUANTITIES.items():
            table = np.full((len(sizes), len(seeds)), np.nan)
            for r in done:
                table[sizes.index(r["n"]), seeds.index(r["seed"])] = finite_or_nan(r.get(key))
            if not np.isfinite(table).any():
                continue
            fit = fit_scaling(sizes, table, scale=scale, num_bootstrap=settings["num_bootstrap"],
                              confidence=settings["confidence"])
            fit["values"] = {str(seed): table[:, j].tolist() for j, seed in enumerate(seeds)}
            fit["all_n"] = sizes
            entry["quantities"][key] = fit
        late = [finite_or_nan(r.get("valley_distance_late")) for r in done]
        init = [finite_or_nan(r.get("valley_distance_init")) for r in done]
        entry["c2"] = {
            "late_median": nanmedian(late), "init_median": nanmedian(init),
            "late_edge_fraction": nanmean(r.get("valley_late_edge_fraction") for r in done),
            "init_edge_fraction": nanmean(
                float(bool(r.get("valley_init_at_edge"))) for r in done
                if r.get("valley_init_at_edge") is not None),
        }
        entry["shape"] = {key: nanmedian([finite_or_nan(r.get(key)) for r in done]) for key in
                          ("probe_v1_slope_exponent", "probe_v1_curvature_exponent",
                           "probe_v1_quadratic_ratio")}
        groups[group] = entry
    return records.to_jsonable({
        "confidence": settings["confidence"], "num_bootstrap": settings["num_bootstrap"],
        "lr": settings["lr"], "probe_s_max": settings["probe_s_max"],
        "eos_threshold": settings["eos_threshold"], "hold_steps": settings["hold_steps"],
        "max_steps": settings["max_steps"], "setup": _setup_text(settings),
        "quantities": {k: {"label": label, "scale": scale}
                       for k, (label, scale) in QUANTITIES.items()},
        "groups": groups})


def _setup_text(s: dict) -> str:
    return (f"Setup: {', '.join(s['dataset'])}; MLP {s['depth']}×{s['width']}; full-batch GD, "
            f"η = {s['lr']}; losses {', '.join(s['losses'])}; activations "
            f"{', '.join(s['activations'])}; N ∈ {s['n_values']}; seeds {s['seeds']}; stop when "
            f"λ1·η/2 ≥ {s['eos_threshold']} has held {s['hold_steps']} steps, or at "
            f"{s['max_steps']} steps; probes of {s['probe_points']} points on ±{s['probe_s_max']} "
            f"along v1, the gradient, the last step and {s['num_random_directions']} random "
            f"direction(s); {s['num_bootstrap']} bootstrap resamples.")


# ----------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------

def plot_summary(summary: dict, out_dir: Path) -> list[Path]:
    """One PNG per quantity: value against N (log–log), a line per activation, a panel per
    dataset/loss; per-seed values as dots, the per-N center as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (NullFormatter)

    out_dir.mkdir(parents=True, exist_ok=True)
    panels = sorted({(g["dataset"], g["loss"]) for g in summary["groups"].values()})
    written = []
    for key, meta in summary["quantities"].items():
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
        drew = False
        for ax, (dataset, loss) in zip(axes[0], panels):
            for index, group in enumerate(g for g in summary["groups"].values()
                                          if (g["dataset"], g["loss"]) == (dataset, loss)):
                fit = group["quantities"].get(key)
                if not fit:
                    continue
                color = f"C{index}"
                for values in fit["values"].values():
                    ax.plot(fit["all_n"], values, "o", color=color, alpha=0.35, ms=4)
                label = (f"{group['activation']}: slope {verdicts.fmt(fit['slope'])} "
                         f"{verdicts.fmt_interval(fit['ci_low'], fit['ci_high'])}")
                ax.plot(fit["n"], fit["center"], "-", color=color, lw=1.6, label=label)
                drew = True
            ax.set_xscale("log")
            if meta["scale"] == "log":
                ax.set_yscale("log")
            sizes = sorted({n for g in summary["groups"].values()
                            for n in g["quantities"].get(key, {}).get("all_n", [])})
            ax.set_xticks(sizes, [str(n) for n in sizes], fontsize=7)
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("training-set size N")
            ax.set_ylabel(meta["label"])
            ax.set_title(f"{dataset} / {loss}", fontsize=9)
            ax.grid(alpha=0.3, which="both")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        if drew:
            fig.tight_layout()
            path = out_dir / f"{key}.png"
            fig.savefig(path, dpi=110)
            written.append(path)
        plt.close(fig)
    return written


def plot_valley_distance(points: list[GridPoint], workdir: Path, out_dir: Path) -> Path | None:
    """|s*(t)| along v1 over training, one panel per group, colored by N (claim C2)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(p.group for p in points))
    sizes = sorted({p.n for p in points})
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False)
    drew = False
    for ax, group in zip(axes[0], groups):
        for p in (p for p in points if p.group == group):
            path = workdir / RUNS_DIR / p.name / records.METRICS_FILE
            if not path.exists():
                continue
            steps, values = records.scalar_rows(records.read_metrics(path), "valley_distance")
            if len(steps):
                color = cmap(sizes.index(p.n) / max(len(sizes) - 1, 1))
                ax.plot(steps, values, "-o", color=color, ms=3, lw=1, alpha=0.8,
                        label=f"N={p.n}" if p.seed == points[0].seed else None)
                drew = True
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("|s*| along v1")
        ax.set_title(group, fontsize=9)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    path = None
    if drew:
        fig.tight_layout()
        path = out_dir / "valley_distance_vs_step.png"
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------

def write_sweep_rows(points, settings, workdir: Path) -> list[dict]:
    """sweep.jsonl from the run directories (rewritten whole, atomically)."""
    rows = [run_row(p, workdir / RUNS_DIR / p.name, settings["eos_threshold"]) for p in points
            if (workdir / RUNS_DIR / p.name / records.METRICS_FILE).exists()]
    tmp = workdir / (SWEEP_FILE + ".tmp")
    tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))
    tmp.replace(workdir / SWEEP_FILE)
    return rows


def write_outputs(points, settings, workdir: Path) -> dict:
    """sweep.jsonl, summary.json, plots and verdict.md from the run directories."""
    rows = write_sweep_rows(points, settings, workdir)
    summary = summarize(rows, settings)
    records.write_json_atomic(workdir / SUMMARY_FILE, summary)
    plots_dir = workdir / records.PLOTS_DIR
    with warnings.catch_warnings():   # degenerate axes (one N, one value) only warn
        warnings.simplefilter("ignore", RuntimeWarning)
        plot_summary(summary, plots_dir)
        plot_valley_distance(points, workdir, plots_dir)
    (workdir / VERDICT_FILE).write_text(verdicts.sweep_verdict(summary))
    return summary


def _enable_compilation_cache(workdir: Path) -> None:
    """Seeds of one (dataset, loss, activation, N) compile identical programs: cache them.

    JAX's persistent cache keys on the compiled program, so every run after the
    first of a size reuses the train step, tracker and prober (the tracker's
    Lanczos dominates the compile time of a small run). A cache the user set
    (JAX_COMPILATION_CACHE_DIR) is left alone.
    """
    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(workdir / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    workdir = Path(FLAGS.workdir)
    try:
        settings = settings_from_flags()
        points = grid(settings)
        configs = [run_config(p, settings, workdir) for p in points]
    except (SweepError, config_lib.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir.mkdir(parents=True, exist_ok=True)
    _enable_compilation_cache(workdir)
    start = time.time()
    for index, (point, cfg) in enumerate(zip(points, configs), 1):
        t0 = time.time()
        try:
            what, status = run_point(point, cfg, overwrite=FLAGS.overwrite,
                                     progress=FLAGS.progress)
        except (SweepError, config_lib.ConfigError, data_lib.DataError,
                records.WorkdirError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        final = run_state(Path(cfg.workdir))[1]
        print(f"[{index}/{len(points)}] {point.name}: {what}; {status}, "
              f"stop {final.get('stop_reason')} at step {final.get('step')} "
              f"({time.time() - t0:.0f} s, total {time.time() - start:.0f} s)",
              file=sys.stderr, flush=True)
        if status == "interrupted":   # the user stopped it: stop the sweep, keep what is done
            write_outputs(points[:index], settings, workdir)
            print("sweep interrupted; rerun the same command to resume.", file=sys.stderr)
            return 130
        write_sweep_rows(points[:index], settings, workdir)
    write_outputs(points, settings, workdir)
    print(f"sweep done in {time.time() - start:.0f} s: {workdir / VERDICT_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
