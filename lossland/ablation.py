"""Subspace-ablation analysis (claim C4): variant records → summary → criteria → verdict.

Owns the Dom/Bulk variants' names, the four C4 criteria and their fixed
thresholds, the per-variant summary computed from a run's metrics.jsonl
rows alone, and the generated verdict text. It trains nothing and writes no
file: `experiments/subspace.py` runs the warm-up and the variants, and
writes what this module returns.
"""

from __future__ import annotations

import math

import numpy as np

from lossland.runner import STATUS_DIVERGED, STATUS_FINISHED

# name -> (optimizer, projection, baseline it is compared with)
VARIANTS = {
    "gd": ("gd", "none", "gd"),
    "dom": ("gd", "dom", "gd"),
    "bulk": ("gd", "bulk", "gd"),
    "sgd": ("sgd", "none", "sgd"),
    "dom_sgd": ("sgd", "dom", "sgd"),
    "bulk_sgd": ("sgd", "bulk", "sgd"),
}

# C4 criteria, fixed before any run (not tuned to the outcome).
CHI_MOST = 0.5          # "most of the gradient": mean χ_k along the baseline > this
TOP_SHARE_LITTLE = 0.2  # "little of the learning": Σ ΔL_top / Σ ΔL_bulk along the baseline < this
DOM_STALLS = 0.2        # Dom stalls: its loss decrease < this × the baseline's
BULK_AS_WELL = 0.8      # Bulk trains as well: its loss decrease ≥ this × the baseline's


def fmt(value, spec=".4g") -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) \
        else format(value, spec)


def summarize_variant(rows: list[dict], name: str) -> dict:
    """Per-variant numbers from its metrics.jsonl rows alone."""
    final = rows[-1] if rows else {}
    steps_rows = [r for r in rows if "status" not in r]
    start_loss = next((r["loss"] for r in steps_rows if r.get("step") == 0 and "loss" in r), None)
    final_loss = final.get("loss") if final.get("status") == STATUS_FINISHED else None
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
            elif entry["status"] == STATUS_DIVERGED:
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
          f"mean χ_k = {fmt(base and base['mean_chi_k'], '.3f')} over "
          f"{base and base['num_tracked_steps']} tracked steps")
    check("top_drives_little", f"Σ ΔL_top / Σ ΔL_bulk along {baseline} < {TOP_SHARE_LITTLE} "
          "(the top part lowers the loss by less than a fifth of what the bulk part does; "
          "negative: it raises the loss)",
          base and base["top_vs_bulk"], TOP_SHARE_LITTLE, less,
          f"Σ ΔL_full = {fmt(base and base['sum_delta_loss_full'])}, Σ ΔL_top = "
          f"{fmt(base and base['sum_delta_loss_top'])}, Σ ΔL_bulk = "
          f"{fmt(base and base['sum_delta_loss_bulk'])}")
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
    if entry["status"] != STATUS_FINISHED:
        return f"{entry['status']} at step {entry['steps']}"
    return (f"loss {fmt(entry['start_loss'])} → {fmt(entry['final_loss'])} "
            f"(decrease {fmt(entry['loss_decrease'])})")


def overall_verdict(checks: list[dict]) -> str:
    results = [c["holds"] for c in checks]
    if all(r is True for r in results):
        return "reproduced"
    if any(r is None for r in results) and not any(r is False for r in results):
        return "undetermined"
    if not any(results[1:]):  # none of the three learning checks holds
        return "not reproduced"
    return "partly reproduced"


def verdict_markdown(summary: dict, experiment: dict, groups: list[dict]) -> str:
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
            lines.append(f"- {c['statement']}: **{mark}** (value {fmt(c['value'], '.3f')}; "
                         f"{c['detail']}).")
        lines.append("")
        base = summary.get(group["baseline"])
        if base and base["tracked_mean_delta_full_x_steps"] is not None and base["loss_decrease"]:
            estimate, actual = base["tracked_mean_delta_full_x_steps"], -base["loss_decrease"]
            representative = estimate * actual > 0 and 0.5 <= estimate / actual <= 2.0
            lines += [f"Sampling check ({group['baseline']}): the mean tracked ΔL_full × steps is "
                      f"{fmt(estimate)}, the actual loss change over the run {fmt(actual)}; "
                      + ("the tracked steps are a fair sample of the run." if representative else
                         "the tracked steps are NOT a fair sample of the run (the loss "
                         "oscillates step to step), so the attribution sums are noisy; read "
                         "the second check with care."), ""]
        d, b = summary.get(group["dom"]), summary.get(group["bulk"])
        dom_ratio = d and d["decrease_vs_baseline"]
        if dom_ratio is not None and dom_ratio >= BULK_AS_WELL:
            lines += [f"{group['dom']} trained as well as {group['baseline']} here "
                      f"(decrease ratio {fmt(dom_ratio, '.3f')}): the top subspace was not "
                      "idle in this setting.", ""]
        bulk_ratio = b and b["decrease_vs_baseline"]
        if bulk_ratio is not None and bulk_ratio > 1:
            lines += [f"{group['bulk']} lowered the loss more than {group['baseline']} "
                      f"({fmt(bulk_ratio, '.3f')} × its decrease).", ""]
        if bulk_ratio is not None and bulk_ratio < DOM_STALLS:
            lines += [f"{group['bulk']} barely trained (decrease ratio "
                      f"{fmt(bulk_ratio, '.3f')}).", ""]
    lines += ["## Numbers", "", "| variant | status | start loss | final loss | decrease | "
              "vs baseline | mean χ_k | Σ ΔL_full | Σ ΔL_top | Σ ΔL_bulk | share top | "
              "share bulk |", "|" + "---|" * 12]
    for name, e in summary.items():
        lines.append(f"| {name} | {e['status']} | {fmt(e['start_loss'])} | "
                     f"{fmt(e['final_loss'])} | {fmt(e['loss_decrease'])} | "
                     f"{fmt(e['decrease_vs_baseline'], '.3f')} | {fmt(e['mean_chi_k'], '.3f')} | "
                     f"{fmt(e['sum_delta_loss_full'])} | {fmt(e['sum_delta_loss_top'])} | "
                     f"{fmt(e['sum_delta_loss_bulk'])} | "
                     f"{fmt(e['share_top'], '.3f')} | {fmt(e['share_bulk'], '.3f')} |")
    lines += ["", "Σ are over the tracked steps of each variant's own trajectory, with "
              "ΔL_full = L(θ − ηg) − L(θ), ΔL_top = L(θ − ηPg) − L(θ) and ΔL_bulk = "
              "L(θ − η(I − P)g) − L(θ), P from the tracked top-k eigenvectors (one-step "
              "changes, not the loss change of the projected runs). Shares are Σ ΔL_part / "
              "(Σ ΔL_top + Σ ΔL_bulk), shown only when that sum is a decrease; a negative "
              "share means that part raised the loss.", "",
              "Generated by `experiments/subspace.py` (`lossland.ablation`) from summary.json; not edited by hand.", ""]
    return "\n".join(lines)
