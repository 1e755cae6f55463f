"""Dataset-size sweep analysis (claims C1, C2): run records → per-run rows → summary.

Owns what a sweep concludes from its run directories: the grid point a run
stands for, the quantities fitted against N, one row per run
(`run_row`, from its metrics.jsonl alone) and the per-group summary with
the N-fits (`summarize`). It runs nothing and writes nothing:
`experiments/sweep_n.py` orchestrates the runs and writes the files, and
`lossland.verdicts` turns a summary into sentences.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from lossland import eos, records, verdicts
from lossland.fits import finite_or_nan, fit_scaling, nanmax, nanmean, nanmedian

# Quantities fitted against N: key -> (label, scale). "log": log–log fit, y ∝ N^a.
# "linear": exponents (which may be ≤ 0), fitted against log10 N.
QUANTITIES = {
    "grad_norm": ("‖∇L‖ at the iterate", "log"),
    "probe_grad_excess": ("max ‖∇L‖ along all probes / (‖∇L‖ + λ1·s_max)", "log"),
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
    """One run of a sweep. Runs of one group differ only in N and the seed."""
    dataset: str
    loss: str
    activation: str
    n: int
    seed: int
    model: str = "mlp"
    arm: str = ""   # the arm's name when it is not its model's (e.g. "mlp_lr0.2")

    @property
    def arm_name(self) -> str:
        return self.arm or self.model

    @property
    def name(self) -> str:
        return (f"{self.dataset}_{self.arm_name}_{self.loss}_{self.activation}_n{self.n}"
                f"_s{self.seed}")

    @property
    def group(self) -> str:
        return f"{self.dataset}/{self.arm_name}/{self.loss}/{self.activation}"


def _model_of(arm: dict) -> str:
    return arm.get("model", GridPoint.model)   # the MLP unless an arm names another


def arm_name(arm: dict) -> str:
    """An arm's name: its "arm" key, else its model (one arm per model needs no name)."""
    return arm.get("arm") or _model_of(arm)


def dataset_arms(settings: dict, dataset: str) -> list[dict]:
    """The settings of every arm of one dataset: the sweep's, with that dataset's
    overrides on top (`per_dataset[dataset]`: one dict, or a list of dicts, e.g. an MLP
    and a CNN on Fashion-MNIST, each with its η, hold and cap). Two arms of one model
    (another η, another loss) are told apart by an "arm" name."""
    overrides = settings.get("per_dataset", {}).get(dataset, {})
    arms = [{**{k: v for k, v in settings.items() if k != "arm"}, **arm} for arm in
            (overrides if isinstance(overrides, list) else [overrides])]
    names = [arm_name(arm) for arm in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"{dataset}: two arms named alike ({names}); give arms of the same "
                         f"model distinct \"arm\" names")
    return arms


def arm_settings(settings: dict, dataset: str, arm: str | None = None) -> dict:
    """The settings of the arm of `dataset` named `arm` (its "arm" key, else its model;
    default: the first arm)."""
    arms = dataset_arms(settings, dataset)
    matching = [a for a in arms if arm is None or arm_name(a) == arm]
    if not matching:
        raise ValueError(f"{dataset} has no arm named {arm!r} (arms: "
                         f"{[arm_name(a) for a in arms]})")
    return matching[0]


def eos_rule(settings: dict) -> eos.EosRule:
    """The sweep's edge-of-stability rule (`lossland.eos`) from its settings."""
    return eos.EosRule(threshold=settings["eos_threshold"],
                       band=tuple(settings.get("eos_band", eos.DEFAULT_BAND)),
                       window=settings.get("eos_window", eos.DEFAULT_WINDOW))


def late_window(rows: list[dict], rule: eos.EosRule) -> tuple[int | None, list[dict]]:
    """(entry step, probed rows of the late window); see `verdicts.c2_verdict`.

    The window is every probed row from the run's entry into the edge of
    stability (`lossland.eos`) on, final iterate included; for a run that never
    entered, the last quarter of its probed rows.
    """
    probed = [r for r in rows if "valley_distance" in r]
    entry = eos.replay(rows, rule).entry_step
    if entry is not None:
        return entry, [r for r in probed if r["step"] >= entry]
    return None, probed[-max(1, math.ceil(len(probed) / 4)):] if probed else []


def _median_of(rows: list[dict], key: str, transform=abs) -> float:
    values = [finite_or_nan(r.get(key)) for r in rows]
    values = [transform(v) for v in values if math.isfinite(v)]
    return float(np.median(values)) if values else float("nan")


def run_row(point: GridPoint, run_dir: Path, settings: dict) -> dict:
    """One sweep.jsonl row: the grid point, how it stopped, whether it was at the edge of
    stability (`lossland.eos.run_summary`), and the final quantities."""
    rows = records.read_metrics(run_dir)
    final = rows[-1] if rows and "status" in rows[-1] else {}
    row = {"name": point.name, "group": point.group, **dataclasses.asdict(point),
           "status": final.get("status", "incomplete"), "stop_reason": final.get("stop_reason"),
           "final_step": final.get("step")}
    rule = eos_rule(settings)
    arm = arm_settings(settings, point.dataset, point.arm_name)
    hold_steps = arm["hold_steps"]
    row["lr"], row["role"] = arm["lr"], arm.get("role", "n_sweep")
    row.update(eos.run_summary(rows, rule, hold_steps))
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
    row["probe_grad_excess"] = gradient_excess(row["probe_max_grad_norm"], row["grad_norm"],
                                               lambda1, s_max)
    for d in ("v1", "grad", "disp"):
        for kind in ("slope", "curvature"):
            row[f"probe_{d}_{kind}_exponent"] = nanmean(
                final.get(f"probe_{d}_{kind}_exponent_{side}") for side in ("left", "right"))
    _, window = late_window(rows, rule)
    row["valley_distance_late"] = _median_of(window, "valley_distance")
    # C2's controls: the same distance along a random unit direction (probe "rand0") and
    # along the top eigenvector at the run's first tracked step (probe "v1init"); and the
    # alignment cos²(∇L, u) along each, against χ_1 = cos²(∇L, v1).
    row["valley_distance_late_random"] = _median_of(window, "probe_rand0_s_star")
    row["valley_distance_late_v1init"] = _median_of(window, "probe_v1init_s_star")
    row["alignment_late_random"] = _median_of(window, "probe_rand0_grad_alignment")
    row["alignment_late_v1init"] = _median_of(window, "probe_v1init_grad_alignment")
    row["valley_late_edge_fraction"] = (float(np.mean([bool(r.get("valley_at_edge"))
                                                       for r in window])) if window else None)
    row["valley_late_count"] = sum(math.isfinite(finite_or_nan(r.get("valley_distance")))
                                   for r in window)
    row.update(c2_run_quantities(window))
    tracked_late = [r for r in rows if "status" not in r and "chi_1" in r
                    and row["eos_entry_step"] is not None and r["step"] >= row["eos_entry_step"]]
    row["chi_1_late"] = _median_of(tracked_late, "chi_1")
    first = next((r for r in rows if "valley_distance" in r and r.get("step") == 0), {})
    row["valley_distance_init"] = first.get("valley_distance")
    row["valley_init_at_edge"] = first.get("valley_at_edge")
    return records.to_jsonable(row)


def gradient_excess(max_grad_norm, grad_norm, lambda1, s_max) -> float:
    """The largest probed ‖∇L‖ over the most a quadratic of the iterate's sharpness allows.

    For L quadratic with Hessian H of spectral radius λ1, ∇L(θ + s·u) = ∇L(θ) + s·H·u, so
    ‖∇L(θ + s·u)‖ ≤ ‖∇L(θ)‖ + λ1·|s| along every unit direction u: over probes of
    half-range s_max the ratio is ≤ 1, whatever s_max is. Third-order terms push it above 1;
    a point within the range where the gradient is unbounded (C1) makes it unbounded. (At
    the edge of stability λ1 ≈ 2/η is the spectral radius; a λ_min with |λ_min| > λ1 could
    reach 1 + |λ_min|/λ1 without any singularity.) NaN when a number is missing.
    """
    peak, g, lam, s = (finite_or_nan(x) for x in (max_grad_norm, grad_norm, lambda1, s_max))
    bound = g + lam * s
    return peak / bound if bound > 0 else float("nan")


# A group's C1 verdict from the reading of its primary quantity (`verdicts.describe_trend`).
# C1's rule, version 2, fixed on 2026-12-07 before the confirmatory decade runs (seeds 3–5).
# Version 1 fitted max ‖∇L‖ along the probes itself. With probe ranges tied to the run
# (s_max = 16 GD step lengths η‖∇L‖) that number is about λ1·s_max: λ1 ≈ 2/η is pinned by
# the edge of stability, so it tracked the probe range, i.e. ‖∇L‖ at the iterate (decade
# run, seeds 0–2: N^−0.81 against s_max ∝ N^−0.65 for MNIST-1D ReLU), and its per-N scatter
# was the scatter of ‖∇L‖ (95% half-widths 0.18–0.77). Version 2 fits `gradient_excess`,
# which a smooth quadratic holds ≤ 1 for any s_max and a singular point inside the range
# drives without bound; C1 predicts it grows with N. The reading rules are unchanged.
C1_PRIMARY = "probe_grad_excess"
C1_RULE = {"version": 2, "primary": C1_PRIMARY}
C1_VERDICT_OF_READING = {"growing": "for", "falling": "against", "flat": "against",
                         "saturating": "against", "unresolved": "inconclusive",
                         "undetermined": "inconclusive"}
MIN_SIZES_AT_EOS = 3   # fewer N values at the edge of stability: "inconclusive", never for/against
# C2's rule, version 2 (`c2_checks`), fixed on 2026-12-06 before the decade sweep ran.
# Version 1 asked for "close to the floor along v1" and "∇L aligned with v1 beyond the
# controls" at once, over the same late steps. Those exclude each other: along v1 the floor
# sits at s* = −(∇L·v1)/λ1 in a quadratic valley, so |s*| → 0 forces χ_1 = cos²(∇L, v1) → 0
# (MNIST-1D tanh in the quick sweep: |s*| = 6e−08, χ_1 ≈ 1e−11), and a run on the floor could
# never be "for". Version 2:
#   * measures the distance in the run's own unit, the GD step length ℓ = η‖∇L(θ)‖, not in a
#     fixed probe range: "close" is a late |s*| ≤ C2_CLOSE_STEPS·ℓ. At the edge of stability
#     (ηλ1 ≈ 2) a quadratic valley puts the floor |s*| ≤ ℓ/(ηλ1) ≈ ℓ/2 away, inside the next
#     step; a floor farther than one step means the iterate is not crossing it.
#   * judges the alignment only where it can hold: over the oscillating phase, the late
#     probed steps whose last displacement d moved mostly along v1 (cos²(d, v1) ≥
#     C2_OSCILLATION_ALIGNMENT), which is where a period-2 oscillation across the floor lives.
#     A run with no oscillating late step (at rest on the floor) has no alignment to judge:
#     the check is "n/a" and the verdict rests on the two distance checks.
#   * "against" needs both distance checks to fail; alignment can only support "for".
C2_CONTROL_FRACTION = 0.5      # v1 beats a control: |s*| ≤ this × the control's, χ_1·this ≥ its
C2_CLOSE_STEPS = 1.0           # close: late |s*| along v1 ≤ this many GD step lengths
C2_OSCILLATION_ALIGNMENT = 0.5  # a late probed step oscillates when cos²(d, v1) ≥ this
NOT_APPLICABLE = "n/a"


def c2_run_quantities(window: list[dict]) -> dict:
    """One run's C2 quantities over its late probed rows (`late_window`): the floor's
    distance in GD step lengths, the oscillating rows (cos²(d, v1) ≥
    C2_OSCILLATION_ALIGNMENT) and, over those only, χ_1 and the controls' alignments."""
    with_disp = [r for r in window if r.get("disp_v1_alignment") is not None]
    oscillating = [r for r in with_disp
                   if finite_or_nan(r["disp_v1_alignment"]) >= C2_OSCILLATION_ALIGNMENT]
    return {
        "valley_distance_steps_late": _median_of(window, "valley_distance_steps"),
        "probe_s_max_steps_late": _median_of(window, "probe_s_max_steps"),
        "probe_s_max_theta_late": _median_of(window, "probe_s_max_theta"),
        "disp_v1_alignment_late": _median_of(with_disp, "disp_v1_alignment"),
        "oscillating_fraction_late": (len(oscillating) / len(with_disp) if with_disp
                                      else float("nan")),
        "oscillating_count_late": len(oscillating),
        "chi_1_oscillating": _median_of(oscillating, "probe_v1_grad_alignment"),
        "alignment_oscillating_random": _median_of(oscillating, "probe_rand0_grad_alignment"),
        "alignment_oscillating_v1init": _median_of(oscillating, "probe_v1init_grad_alignment"),
    }


def c1_group_verdict(entry: dict, confidence: float) -> str:
    """"for", "against" or "inconclusive" (C1), from the runs at the edge of stability only."""
    if entry["sizes_at_eos"] < MIN_SIZES_AT_EOS:
        return "inconclusive"
    fit = entry["quantities"].get(C1_PRIMARY)
    if not fit:
        return "inconclusive"
    reading, _ = verdicts.describe_trend(fit, confidence=confidence)
    return C1_VERDICT_OF_READING[reading]


def c2_checks(c2: dict) -> dict:
    """The three C2 checks of a group (rule version 2, see C2_CLOSE_STEPS): True, False,
    None when a number is missing, or NOT_APPLICABLE.

    close: the late |s*| along v1 is ≤ C2_CLOSE_STEPS GD step lengths (median over runs
      of each run's late median);
    nearer_than_controls: the late |s*| along v1 is ≤ C2_CONTROL_FRACTION × the late |s*|
      along each control direction (random, and v1 at the first tracked step);
    aligned_while_oscillating: over the oscillating late steps only, C2_CONTROL_FRACTION ×
      χ_1 ≥ cos²(∇L, u) for each control u; NOT_APPLICABLE when no run oscillates.
    """
    late, late_steps = c2["late_median"], c2["late_steps_median"]
    controls = [c2["late_random_median"], c2["late_v1init_median"]]
    alignments = [c2["alignment_oscillating_random_median"],
                  c2["alignment_oscillating_v1init_median"]]
    known = lambda *xs: all(math.isfinite(x) for x in xs)
    if not c2["runs_oscillating"]:
        aligned = NOT_APPLICABLE
    elif known(c2["chi_1_oscillating_median"], *alignments):
        aligned = all(C2_CONTROL_FRACTION * c2["chi_1_oscillating_median"] >= a
                      for a in alignments)
    else:
        aligned = None
    return {
        "close": (late_steps <= C2_CLOSE_STEPS) if known(late_steps) else None,
        "nearer_than_controls": (all(late <= C2_CONTROL_FRACTION * c for c in controls)
                                 if known(late, *controls) else None),
        "aligned_while_oscillating": aligned,
    }


def c2_group_verdict(entry: dict) -> str:
    """"for" when both distance checks of `c2_checks` hold and the alignment holds or is
    NOT_APPLICABLE; "against" when both distance checks fail; "inconclusive" otherwise,
    when a number is missing, or with fewer than MIN_SIZES_AT_EOS sizes at the edge of
    stability."""
    checks = entry["c2"]["checks"]
    distance = [checks["close"], checks["nearer_than_controls"]]
    aligned = checks["aligned_while_oscillating"]
    if entry["sizes_at_eos"] < MIN_SIZES_AT_EOS or None in distance or aligned is None:
        return "inconclusive"
    if all(distance) and aligned in (True, NOT_APPLICABLE):
        return "for"
    if not any(distance):
        return "against"
    return "inconclusive"


def _finite_range(values) -> list:
    """[min, max] of the finite values, [None, None] when there are none."""
    finite = [v for v in map(finite_or_nan, values) if math.isfinite(v)]
    return [min(finite), max(finite)] if finite else [None, None]


def _fits(runs: list[dict], settings: dict) -> dict:
    """Each quantity against N over `runs` (one value per N and seed)."""
    sizes = sorted({r["n"] for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    fits = {}
    for key, (_, scale) in QUANTITIES.items():
        table = np.full((len(sizes), len(seeds)), np.nan)
        for r in runs:
            table[sizes.index(r["n"]), seeds.index(r["seed"])] = finite_or_nan(r.get(key))
        if not np.isfinite(table).any():
            continue
        fit = fit_scaling(sizes, table, scale=scale, num_bootstrap=settings["num_bootstrap"],
                          confidence=settings["confidence"])
        fit["values"] = {str(seed): table[:, j].tolist() for j, seed in enumerate(seeds)}
        fit["all_n"] = sizes
        fits[key] = fit
    return fits


def summarize_group(members: list[dict], settings: dict) -> dict:
    """One group's summary entry. Fits and C1/C2 verdicts use the runs at the edge of
    stability only (`at_eos`); every other run is counted, never fitted."""
    settings = arm_settings(settings, members[0]["dataset"],
                            members[0].get("arm") or members[0]["model"])
    at_eos = [r for r in members if r.get("status") == "finished" and r.get("at_eos")]
    stop, labels = {}, {}
    for r in members:
        reason = r.get("stop_reason") or r.get("status")
        stop[reason] = stop.get(reason, 0) + 1
        labels[r.get("eos_label")] = labels.get(r.get("eos_label"), 0) + 1
    entry = {"group": members[0]["group"],
             **{k: members[0][k] for k in ("dataset", "model", "loss", "activation")},
             "arm": members[0].get("arm") or members[0]["model"], "lr": settings["lr"],
             "role": settings.get("role", "n_sweep"),
             "runs_total": len(members), "runs_at_eos": len(at_eos),
             "sizes_at_eos": len({r["n"] for r in at_eos}),
             "runs_above_eos": labels.get(eos.LABEL_ABOVE, 0),
             "stop_reasons": stop, "eos_labels": labels,
             "quantities": _fits(at_eos, settings)}
    entry["c2"] = {
        "late_median": nanmedian([finite_or_nan(r.get("valley_distance_late")) for r in at_eos]),
        **{f"{name}_median": nanmedian([finite_or_nan(r.get(key)) for r in at_eos])
           for name, key in (("late_random", "valley_distance_late_random"),
                             ("late_v1init", "valley_distance_late_v1init"),
                             ("alignment_random", "alignment_late_random"),
                             ("alignment_v1init", "alignment_late_v1init"))},
        **{f"{name}_median": nanmedian([finite_or_nan(r.get(key)) for r in at_eos])
           for name, key in (("late_steps", "valley_distance_steps_late"),
                             ("probe_s_max_steps", "probe_s_max_steps_late"),
                             ("probe_s_max_theta", "probe_s_max_theta_late"),
                             ("disp_v1_alignment", "disp_v1_alignment_late"),
                             ("oscillating_fraction", "oscillating_fraction_late"),
                             ("chi_1_oscillating", "chi_1_oscillating"),
                             ("alignment_oscillating_random", "alignment_oscillating_random"),
                             ("alignment_oscillating_v1init", "alignment_oscillating_v1init"))},
        "runs_oscillating": sum(bool(r.get("oscillating_count_late")) for r in at_eos),
        "late_steps_range": _finite_range(r.get("valley_distance_steps_late") for r in at_eos),
        "init_median": nanmedian([finite_or_nan(r.get("valley_distance_init")) for r in at_eos]),
        "chi_1_late_median": nanmedian([finite_or_nan(r.get("chi_1_late")) for r in at_eos]),
        "late_edge_fraction": nanmean(r.get("valley_late_edge_fraction") for r in at_eos),
        "init_edge_fraction": nanmean(
            float(bool(r.get("valley_init_at_edge"))) for r in at_eos
            if r.get("valley_init_at_edge") is not None),
    }
    entry["shape"] = {key: nanmedian([finite_or_nan(r.get(key)) for r in at_eos]) for key in
                      ("probe_v1_slope_exponent", "probe_v1_curvature_exponent",
                       "probe_v1_quadratic_ratio")}
    entry["c2"]["checks"] = c2_checks(entry["c2"])
    entry["verdict"] = c1_group_verdict(entry, settings["confidence"])
    entry["c2_verdict"] = c2_group_verdict(entry)
    return entry


def eta_scaling(rows: list[dict], settings: dict) -> list[dict]:
    """How the late |s*| along v1 scales with η (MISSION.md, C2): for each setting
    (dataset, model, loss, activation) run at ≥ 3 η, at the largest N every η ran, a
    log–log fit of each run's late |s*| against η (bootstrap over seeds), from the runs at
    the edge of stability only."""
    at_eos = [r for r in rows if r.get("status") == "finished" and r.get("at_eos")
              and r.get("lr") is not None]
    scans = []
    key = lambda r: (r["dataset"], r["model"], r["loss"], r["activation"])
    for setting in dict.fromkeys(key(r) for r in at_eos):
        runs = [r for r in at_eos if key(r) == setting]
        lrs = sorted({r["lr"] for r in runs})
        common = set.intersection(*({r["n"] for r in runs if r["lr"] == lr} for lr in lrs))
        if len(lrs) < 3 or not common:
            continue
        n = max(common)
        runs = [r for r in runs if r["n"] == n]
        seeds = sorted({r["seed"] for r in runs})
        table = np.full((len(lrs), len(seeds)), np.nan)
        steps = np.full_like(table, np.nan)
        for r in runs:
            i, j = lrs.index(r["lr"]), seeds.index(r["seed"])
            table[i, j] = finite_or_nan(r.get("valley_distance_late"))
            steps[i, j] = finite_or_nan(r.get("valley_distance_steps_late"))
        fit = fit_scaling(lrs, table, scale="log", num_bootstrap=settings["num_bootstrap"],
                          confidence=settings["confidence"])
        scans.append({"setting": " / ".join(setting), "n": n, "lrs": lrs,
                      "late_medians": [nanmedian(row) for row in table],
                      "late_steps_medians": [nanmedian(row) for row in steps],
                      "runs": len(runs), "fit": fit})
    return scans


def summarize(rows: list[dict], settings: dict) -> dict:
    """summary.json from sweep rows: a list of groups, each with its counts of runs at the
    edge of stability, its fits against N and its C1 and C2 verdicts."""
    groups = [summarize_group([r for r in rows if r["group"] == group], settings)
              for group in dict.fromkeys(r["group"] for r in rows)]
    rule = eos_rule(settings)
    return records.to_jsonable({
        "confidence": settings["confidence"], "num_bootstrap": settings["num_bootstrap"],
        "lr": settings["lr"], "probe_s_max": settings["probe_s_max"],
        "eos_threshold": rule.threshold, "eos_band": list(rule.band), "eos_window": rule.window,
        "hold_steps": settings["hold_steps"], "max_steps": settings["max_steps"],
        "min_sizes_at_eos": MIN_SIZES_AT_EOS, "c2_control_fraction": C2_CONTROL_FRACTION,
        "c1_rule": C1_RULE,
        "c2_rule": {"version": 2, "close_steps": C2_CLOSE_STEPS,
                    "oscillation_alignment": C2_OSCILLATION_ALIGNMENT,
                    "control_fraction": C2_CONTROL_FRACTION},
        "setup": setup_text(settings),
        "quantities": {k: {"label": label, "scale": scale}
                       for k, (label, scale) in QUANTITIES.items()},
        "groups": groups, "eta_scaling": eta_scaling(rows, settings)})


def _arm_text(arm: dict, dataset: str) -> str:
    name = arm_name(arm)
    label = f"{dataset}/{name}" if name != _model_of(arm) else dataset
    return (f"{label}: {arm['model'].upper()} {arm['depth']}×{arm['width']}, η = {arm['lr']}, "
            f"losses {', '.join(arm['losses'])}, activations {', '.join(arm['activations'])}, "
            f"N ∈ {arm['n_values']}, hold {arm['hold_steps']} steps, cap {arm['max_steps']} "
            f"steps")


def probe_range_text(s: dict) -> str:
    """The probe half-range of settings `s`, in words (fixed, or tied to the run)."""
    steps, theta = s.get("probe_s_max_steps") or 0, s.get("probe_s_max_theta") or 0
    if not steps and not theta:
        return f"{s['probe_s_max']}"
    return (f"max({steps:g} GD step lengths η‖∇L‖, {theta:g}·‖θ‖) at each probed iterate"
            + (" (periodic probes only from the entry into the edge of stability on)"
               if s.get("probe_from_eos") else ""))


def setup_text(s: dict) -> str:
    rule = eos_rule(s)
    arms = "; ".join(_arm_text(arm, d) for d in s["dataset"] for arm in dataset_arms(s, d))
    return (f"Setup: {arms}; full-batch GD; seeds {s['seeds']}. Each run stops once it has held "
            f"the edge of stability for its arm's hold (entered at the first upward "
            f"crossing of λ1·η/2 = {rule.threshold}, then the median of λ1·η/2 over "
            f"{rule.window} tracked steps inside [{rule.band[0]}, {rule.band[1]}]), or at its "
            f"cap; probes of {s['probe_points']} points on ±{probe_range_text(s)} "
            f"along v1, the gradient, the last step and {s['num_random_directions']} random "
            f"direction(s); {s['num_bootstrap']} bootstrap resamples.")


