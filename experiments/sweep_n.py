"""Dataset-size sweep (claims C1, C2): train on nested subsets N1 < N2 < … and fit against N.

For every grid point (dataset × model × loss × activation × N × seed) one run
trains full-batch GD until it has held the edge of stability for --hold_steps
steps (`lossland.eos`: entry at the first upward crossing of --eos_threshold,
then the trailing median of λ1·η/2 inside --eos_band), or --max_steps, probing
along v1, the gradient, the last displacement, v1 at the first tracked step and
random directions at the end (and every --probe_every steps). The analysis
(`lossland.scaling`) fits each recorded quantity against N on log–log axes, with
a bootstrap interval over seeds, using only the runs that held the edge of
stability; a group with fewer than 3 sizes N there is "inconclusive". It writes

    <workdir>/runs/<name>/     one run directory per grid point (metrics.jsonl, ...)
    <workdir>/sweep.jsonl      one row per grid run: stop_reason, EoS state, final quantities
    <workdir>/summary.json     a list of groups: runs_total, runs_at_eos, verdicts, fits, CIs
    <workdir>/plots/*.png      each quantity against N, one line per activation
    <workdir>/verdict.md       claims C1 and C2, generated from summary.json

Rerunning skips finished grid points, resumes interrupted ones from their last
checkpoint, and rewrites the summary; --overwrite starts every point afresh.

    python -m experiments.sweep_n --preset=smoke --workdir=/tmp/sweep_smoke
    python -m experiments.sweep_n --preset=quick --workdir=runs/sweep_quick   # 2 CPUs
    python -m experiments.sweep_n --preset=full --workdir=runs/sweep_full     # accelerator
"""

from __future__ import annotations

import itertools
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from absl import app, flags, logging

from experiments.sweep_presets import PRESETS, SWEEP_DEFAULTS
from lossland import config as config_lib
from lossland import data as data_lib
from lossland import eos, losses, models, records, scaling, verdicts
from lossland.scaling import GridPoint, run_row, summarize

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The sweep's flags; defined only when run as a program, so that importing this
    module (tests, notebooks) defines no global flags that could clash with others."""
    flags.DEFINE_string("workdir", "runs/sweep_n", "Sweep directory (runs/, sweep.jsonl, "
                        "summary.json, plots/, verdict.md).")
    flags.DEFINE_enum("preset", "quick", list(PRESETS), "Defaults for every unset flag below: "
                      "smoke (tests, 2–3 min), quick (MNIST-1D MLP and Fashion-MNIST CNN, "
                      "43 min on 2 CPU cores), full (accelerators); their settings and the "
                      "measurements behind them: experiments/sweep_presets.py.")
    flags.DEFINE_bool("overwrite", False, "Start every grid point afresh (else finished points are "
                      "skipped and interrupted ones resumed).")
    flags.DEFINE_list("dataset", None, "Data source(s); each is its own sweep. Default: preset.")
    flags.DEFINE_string("data_dir", None, "Folder with dataset files (see experiments.train).")
    flags.DEFINE_list("n_values", None, "Training-set sizes N (nested subsets), each at most "
                      "the dataset's size. Default: preset.")
    flags.DEFINE_list("seeds", None, "Seeds (data order and init). Default: preset.")
    flags.DEFINE_list("activations", None, "Activations (a kinked and a smooth control). "
                      "Default: preset (relu,tanh; relu on Fashion-MNIST). Arms that pin "
                      "their own (the decade preset's teacher arms, its η scan) are "
                      "selected: an arm that shares none of these is left out.")
    flags.DEFINE_list("losses", None, "Losses (mse, cross_entropy). Default: mse.")
    flags.DEFINE_float("lr", None, "GD step η. Default: preset (0.05).")
    flags.DEFINE_integer("max_steps", None, "Step cap per run. Default: preset.")
    flags.DEFINE_integer("hold_steps", None, "Stop once the run has held the edge of stability "
                         "(lossland.eos) this many steps; probes run then. Default: preset.")
    flags.DEFINE_float("eos_threshold", eos.DEFAULT_THRESHOLD, "Entry level of λ1·η/2: a run "
                       "enters the edge of stability at its first upward crossing (lossland.eos).")
    flags.DEFINE_list("eos_band", [str(v) for v in eos.DEFAULT_BAND], "lo,hi: a run holds the "
                      "edge of stability while the trailing median of λ1·η/2 stays in [lo, hi].")
    flags.DEFINE_integer("eos_window", eos.DEFAULT_WINDOW, "Tracked steps in that trailing median.")
    flags.DEFINE_string("model", None, "Model of every arm (mlp, cnn). Default: preset (the MLP; "
                        "the CNN on Fashion-MNIST).")
    flags.DEFINE_integer("chunk_size", None, "Examples per chunk of the full-batch reducer. "
                         "Default: preset.")
    flags.DEFINE_integer("width", None, "MLP width. Default: preset.")
    flags.DEFINE_integer("depth", None, "MLP hidden layers. Default: preset.")
    flags.DEFINE_integer("track_every", None, "Lanczos every this many steps. Default: preset.")
    flags.DEFINE_integer("track_k", None, "Top eigenpairs tracked. Default: preset.")
    flags.DEFINE_integer("lanczos_iters", None, "Lanczos iterations. Default: preset.")
    flags.DEFINE_integer("probe_every", None, "Probe every this many steps (a multiple of "
                         "--track_every); probes also run at the end. Default: preset.")
    flags.DEFINE_float("probe_s_max", None, "Probe half-range s_max. Default: preset.")
    flags.DEFINE_float("probe_s_max_steps", None, "Tie the probe half-range to each probed "
                       "iterate: at least this many GD step lengths η‖∇L‖ (0 = off; see "
                       "experiments.train). Default: preset.")
    flags.DEFINE_float("probe_s_max_theta", None, "... and at least this fraction of ‖θ‖ (0 = "
                       "off). Default: preset.")
    flags.DEFINE_bool("probe_from_eos", None, "Periodic probes only from the run's entry "
                      "into the edge of stability on (see experiments.train). Default: preset.")
    flags.DEFINE_integer("probe_points", None, "Points per probe line. Default: preset.")
    flags.DEFINE_integer("num_random_directions", None,
                         "Random control directions. Default: preset.")
    flags.DEFINE_integer("num_bootstrap", None,
                         "Bootstrap resamples for the N-fits. Default: preset.")
    flags.DEFINE_float("confidence", 0.95, "Confidence level of the intervals.")
    flags.DEFINE_bool("progress", True, "Per-run progress lines on stderr.")
    flags.DEFINE_bool("dry_run", False, "Validate the settings, list every arm's grid and its "
                      "estimated cost (from the preset's measured run times), then exit: "
                      "nothing is run or written.")


RUNS_DIR, SWEEP_FILE = "runs", "sweep.jsonl"
SUMMARY_FILE, VERDICT_FILE = "summary.json", "verdict.md"

# ----------------------------------------------------------------------------
# Settings and the grid
# ----------------------------------------------------------------------------

class SweepError(ValueError):
    """A bad sweep flag; the message names it."""


OVERRIDABLE = ("dataset", "model", "n_values", "seeds", "activations", "losses", "lr",
               "max_steps", "hold_steps", "width", "depth", "track_every", "track_k",
               "lanczos_iters", "probe_every", "probe_s_max", "probe_s_max_steps",
               "probe_s_max_theta", "probe_from_eos", "probe_points",
               "num_random_directions", "num_bootstrap", "chunk_size")


def settings_from_flags() -> dict:
    """The preset, with every flag the user set overriding it (in every dataset's arm too);
    validated."""
    s = {**SWEEP_DEFAULTS, **PRESETS[FLAGS.preset]}
    user_set = [key for key in OVERRIDABLE if FLAGS[key].value is not None]
    for key in user_set:
        s[key] = FLAGS[key].value
    s["per_dataset"] = {d: _without_keys(arms, user_set, s["model"], s["activations"])
                        for d, arms in s.get("per_dataset", {}).items()}
    try:
        band = [float(v) for v in FLAGS.eos_band]
    except ValueError:
        raise SweepError(f"--eos_band={','.join(FLAGS.eos_band)!r} is not allowed: give two "
                         "numbers 0 < lo <= hi, e.g. 0.9,1.1.") from None
    s.update(eos_threshold=FLAGS.eos_threshold, eos_band=band,
             eos_window=FLAGS.eos_window, data_dir=FLAGS.data_dir, confidence=FLAGS.confidence)
    return validate_settings(s)


def _without_keys(arms, keys, model, activations=()):
    """A dataset's arm overrides without the flags the user set. With --model set, one
    arm only (the others would train the same model): the one for that model, if any.

    --activations selects among arms that pin their own (the decade preset's teacher
    arms: ReLU at η = 0.3, tanh at η = 0.5): each keeps the activations it shares with
    the flag, and an arm that shares none is dropped, so `--activations=relu` runs the
    ReLU arm only, not the tanh arm's η with ReLU. Only when no arm of the dataset
    shares one does the flag replace every arm's (the arms' η were not set for it).
    """
    if isinstance(arms, dict):
        return _without_keys([arms], keys, model, activations)[0]
    if "model" in keys:
        arms = [arm for arm in arms if arm.get("model") == model][:1] or arms[:1]
    if "activations" in keys:
        shared = [arm for arm in arms
                  if "activations" not in arm or set(arm["activations"]) & set(activations)]
        if shared:
            keys = [key for key in keys if key != "activations"]
            arms = [arm if "activations" not in arm else
                    {**arm, "activations": [a for a in arm["activations"] if a in activations]}
                    for arm in shared]
    return [{k: v for k, v in arm.items() if k not in keys} for arm in arms]


def dataset_arms(settings: dict, dataset: str) -> list[dict]:
    """The settings of each arm of one dataset: the sweep's, with that dataset's overrides
    (`per_dataset`, e.g. an MLP and a CNN on Fashion-MNIST) on top."""
    return scaling.dataset_arms({**SWEEP_DEFAULTS, **settings}, dataset)


def validate_settings(s: dict) -> dict:
    """Checks a settings dict (preset + flags); raises SweepError naming the flag."""
    s = {**SWEEP_DEFAULTS, **s}
    for key in ("n_values", "seeds"):
        try:
            s[key] = [int(v) for v in s[key]]
        except ValueError:
            raise SweepError(f"--{key}={','.join(map(str, s[key]))}: expected integers.")
    _check(all(n > 0 for n in s["n_values"]) and s["n_values"], "n_values", s["n_values"],
           "sizes must be positive integers")
    _check(len(set(s["seeds"])) == len(s["seeds"]) and s["seeds"], "seeds", s["seeds"],
           "give distinct seeds")
    _check(all(v >= 0 for v in s["seeds"]), "seeds", s["seeds"], "seeds are integers >= 0")
    for key, allowed in (("dataset", data_lib.DATASETS), ("activations", models.ACTIVATIONS),
                         ("losses", losses.PER_EXAMPLE_LOSSES)):
        bad = [v for v in s[key] if v not in allowed]
        _check(not bad and s[key], key, ",".join(s[key]), f"choose from {sorted(allowed)}")
    unknown = [d for d in s.get("per_dataset", {}) if d not in data_lib.DATASETS]
    _check(not unknown, "preset", ",".join(unknown), "the preset gives arms for a dataset "
           f"that does not exist; choose from {sorted(data_lib.DATASETS)}")
    for arm in (arm for dataset in s["dataset"] for arm in dataset_arms(s, dataset)):
        _check(arm["model"] in models.MODELS, "model", arm["model"],
               f"choose from {sorted(models.MODELS)}")
        for key, allowed in (("activations", models.ACTIVATIONS),
                             ("losses", losses.PER_EXAMPLE_LOSSES)):
            bad = [v for v in arm[key] if v not in allowed]
            _check(not bad and arm[key], key, ",".join(arm[key]), f"choose from {sorted(allowed)}")
    band = s.get("eos_band", list(eos.DEFAULT_BAND))
    _check(len(band) == 2 and 0 < band[0] <= band[1], "eos_band", ",".join(map(str, band)),
           "give two numbers 0 < lo <= hi, e.g. 0.9,1.1")
    _check(s.get("eos_window", 1) >= 1, "eos_window", s.get("eos_window"), "must be >= 1")
    _check(s["hold_steps"] > 0, "hold_steps", s["hold_steps"],
           "every sweep run must hold the edge of stability for > 0 steps before it is probed")
    _check(s["max_steps"] > 0, "max_steps", s["max_steps"], "the step cap of every run must "
           "be > 0")
    _check(s["track_every"] > 0, "track_every", s["track_every"], "the sweep needs the "
           "tracked sharpness to tell the edge of stability, so it must be > 0")
    _check(0 < s["confidence"] < 1, "confidence", s["confidence"], "must lie in (0, 1)")
    _check(s["num_bootstrap"] >= 100, "num_bootstrap", s["num_bootstrap"], "must be >= 100")
    return s


def _check(ok, flag, value, allowed):
    if not ok:
        raise SweepError(f"--{flag}={value!r} is not allowed: {allowed}.")


def grid(settings: dict) -> list[GridPoint]:
    """Every grid point; an N larger than its dataset can give is refused (SweepError)."""
    points = []
    for dataset in settings["dataset"]:
        available = data_lib.DATASETS[dataset].size["train"]
        for arm in dataset_arms(settings, dataset):
            too_large = [int(n) for n in arm["n_values"] if available and int(n) > available]
            _check(not too_large, "n_values", ",".join(map(str, arm["n_values"])),
                   f"{dataset} has {available} training examples, so N ≤ {available} (arm "
                   f"{scaling.arm_name(arm)!r} asks for {too_large}); lower --n_values")
            sizes = sorted({int(n) for n in arm["n_values"]})
            for loss, activation, n, seed in itertools.product(
                    arm["losses"], arm["activations"], sizes, settings["seeds"]):
                name = scaling.arm_name(arm)
                points.append(GridPoint(dataset, loss, activation, n, seed, model=arm["model"],
                                        arm="" if name == arm["model"] else name))
    return points


def run_config(point: GridPoint, settings: dict, workdir: Path) -> config_lib.RunConfig:
    """The RunConfig of one grid point: its dataset's arm of the settings, validated."""
    settings = scaling.arm_settings({**SWEEP_DEFAULTS, **settings}, point.dataset,
                                    point.arm_name)
    if settings.get("norm") == "batch" and point.n % min(settings["chunk_size"], point.n):
        raise SweepError(f"--chunk_size={settings['chunk_size']} is not allowed for the "
                         f"{point.dataset} arm {point.arm_name} (norm=batch) at N = {point.n}: "
                         "its ghost batches are part of the loss, so the chunk must divide "
                         "every N.")
    cfg = config_lib.RunConfig(
        dataset=point.dataset, data_dir=settings["data_dir"], n_train=point.n,
        model=settings["model"],
        width=settings["width"], depth=settings["depth"], activation=point.activation,
        norm=settings.get("norm", "none"), patch_size=settings.get("patch_size", 4),
        loss=point.loss, optimizer="gd", lr=settings["lr"], steps=settings["max_steps"],
        seed=point.seed, workdir=str(workdir / RUNS_DIR / point.name), plots=False,
        track_every=settings["track_every"], track_k=settings["track_k"],
        lanczos_iters=settings["lanczos_iters"], eos_hold_steps=settings["hold_steps"],
        eos_threshold=settings["eos_threshold"], eos_band=tuple(settings["eos_band"]),
        eos_window=settings["eos_window"], chunk_size=settings["chunk_size"],
        probe_every=settings["probe_every"],
        probe_s_max=settings["probe_s_max"], probe_points=settings["probe_points"],
        probe_s_max_steps=settings["probe_s_max_steps"],
        probe_from_eos=settings["probe_from_eos"],
        probe_s_max_theta=settings["probe_s_max_theta"],
        num_random_directions=settings["num_random_directions"])
    config_lib.validate(cfg)
    return cfg


def estimated_seconds(arm: dict, n: int) -> float | None:
    """One run's wall time at size n, from the arm's `measured_seconds` ({N: seconds per
    run}, measured on the machine the preset names): log–log interpolation between the
    measured sizes, the end segments' slope outside them; None when unmeasured."""
    measured = sorted((int(k), float(v)) for k, v in arm.get("measured_seconds", {}).items())
    if not measured:
        return None
    if len(measured) == 1:
        return measured[0][1] * n / measured[0][0]   # one point: cost ∝ N
    logs = np.log([m[0] for m in measured]), np.log([m[1] for m in measured])
    i = int(np.clip(np.searchsorted(logs[0], np.log(n)) - 1, 0, len(measured) - 2))
    slope = (logs[1][i + 1] - logs[1][i]) / (logs[0][i + 1] - logs[0][i])
    return float(np.exp(logs[1][i] + slope * (np.log(n) - logs[0][i])))


def describe_grid(settings: dict, points: list[GridPoint]) -> str:
    """The --dry_run listing: each arm's settings, runs and estimated minutes, and totals."""
    lines, total, unmeasured = [], 0.0, 0
    for dataset in settings["dataset"]:
        for arm in dataset_arms(settings, dataset):
            name = scaling.arm_name(arm)
            runs = [p for p in points if p.dataset == dataset and p.arm_name == name]
            costs = [estimated_seconds(arm, p.n) for p in runs]
            known = sum(c for c in costs if c is not None)
            missing = sum(c is None for c in costs)
            unmeasured += missing
            total += known
            norm = f" norm={arm['norm']}" if arm.get("norm", "none") != "none" else ""
            lines.append(
                f"{dataset}/{name}: {arm['model']} {arm['depth']}×{arm['width']}{norm}, "
                f"chunk {arm['chunk_size']}, η = {arm['lr']}, losses {','.join(arm['losses'])}, "
                f"activations {','.join(arm['activations'])}, N = {sorted({p.n for p in runs})}, "
                f"seeds {settings['seeds']}, hold {arm['hold_steps']}, cap {arm['max_steps']}, "
                f"probe ±{scaling.probe_range_text(arm)}: {len(runs)} runs, "
                f"~{known / 60:.0f} min" + (f" ({missing} runs unmeasured)" if missing else ""))
    lines.append(f"total: {len(points)} runs, ~{total / 60:.0f} min estimated"
                 + (f" plus {unmeasured} unmeasured runs" if unmeasured else "")
                 + (f" ({settings['cost_note']})" if settings.get("cost_note") else ""))
    return "\n".join(lines)


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
# The driver
# ----------------------------------------------------------------------------

def write_sweep_rows(points, settings, workdir: Path) -> list[dict]:
    """sweep.jsonl from the run directories (rewritten whole, atomically)."""
    rows = [run_row(p, workdir / RUNS_DIR / p.name, settings) for p in points
            if (workdir / RUNS_DIR / p.name / records.METRICS_FILE).exists()]
    tmp = workdir / (SWEEP_FILE + ".tmp")
    tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))
    tmp.replace(workdir / SWEEP_FILE)
    return rows


def write_outputs(points, settings, workdir: Path) -> dict:
    """sweep.jsonl, summary.json, plots and verdict.md from the run directories."""
    from lossland import plots  # imported here: flag parsing and errors stay fast

    rows = write_sweep_rows(points, settings, workdir)
    summary = summarize(rows, settings)
    records.write_json_atomic(workdir / SUMMARY_FILE, summary)
    plots_dir = workdir / records.PLOTS_DIR
    with warnings.catch_warnings():   # degenerate axes (one N, one value) only warn
        warnings.simplefilter("ignore", RuntimeWarning)
        plots.plot_scaling_summary(summary, plots_dir)
        plots.plot_valley_distance(points, lambda p: workdir / RUNS_DIR / p.name, plots_dir)
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
        if workdir.exists() and not workdir.is_dir():
            raise SweepError(f"--workdir={str(workdir)!r} exists and is not a directory; "
                             "choose another path.")
        for dataset in settings["dataset"]:   # files checked before the workdir is made
            data_lib.check_files(dataset, settings["data_dir"])
    except (SweepError, config_lib.ConfigError, data_lib.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if FLAGS.dry_run:
        print(describe_grid(settings, points))
        return 0
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
