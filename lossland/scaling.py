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

from lossland import records
from lossland.fits import finite_or_nan, fit_scaling, nanmax, nanmean, nanmedian

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


def late_window(rows: list[dict], threshold: float) -> tuple[int | None, list[dict]]:
    """(EoS onset step, probed rows of the late window); see `verdicts.c2_verdict`.

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
        "max_steps": settings["max_steps"], "setup": setup_text(settings),
        "quantities": {k: {"label": label, "scale": scale}
                       for k, (label, scale) in QUANTITIES.items()},
        "groups": groups})


def setup_text(s: dict) -> str:
    return (f"Setup: {', '.join(s['dataset'])}; MLP {s['depth']}×{s['width']}; full-batch GD, "
            f"η = {s['lr']}; losses {', '.join(s['losses'])}; activations "
            f"{', '.join(s['activations'])}; N ∈ {s['n_values']}; seeds {s['seeds']}; stop when "
            f"λ1·η/2 ≥ {s['eos_threshold']} has held {s['hold_steps']} steps, or at "
            f"{s['max_steps']} steps; probes of {s['probe_points']} points on ±{s['probe_s_max']} "
            f"along v1, the gradient, the last step and {s['num_random_directions']} random "
            f"direction(s); {s['num_bootstrap']} bootstrap resamples.")


