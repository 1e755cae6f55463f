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
# How each criterion's value must compare with its threshold to pass.
DIRECTIONS = {"top_is_most_of_gradient": ">", "top_drives_little": "<", "dom_stalls": "<",
              "bulk_trains_as_well": ">="}
LEARNING_CRITERIA = ("top_drives_little", "dom_stalls", "bulk_trains_as_well")


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


_OPS = {">": lambda v, t: v > t, "<": lambda v, t: v < t, ">=": lambda v, t: v >= t}


def c4_criteria(summary: dict, baseline: str, dom: str, bulk: str) -> list[dict]:
    """The four C4 checks; each holds (True), fails (False) or cannot be decided (None)."""
    base, d, b = summary.get(baseline), summary.get(dom), summary.get(bulk)
    checks = []

    def check(name, statement, value, threshold, detail):
        holds = None if value is None else bool(_OPS[DIRECTIONS[name]](value, threshold))
        checks.append({"name": name, "statement": statement, "value": value,
                       "threshold": threshold, "direction": DIRECTIONS[name], "holds": holds,
                       "detail": detail})

    check("top_is_most_of_gradient", f"mean χ_k along {baseline} > {CHI_MOST}",
          base and base["mean_chi_k"], CHI_MOST,
          f"mean χ_k = {fmt(base and base['mean_chi_k'], '.3f')} over "
          f"{base and base['num_tracked_steps']} tracked steps")
    check("top_drives_little", f"Σ ΔL_top / Σ ΔL_bulk along {baseline} < {TOP_SHARE_LITTLE} "
          "(the top part lowers the loss by less than a fifth of what the bulk part does; "
          "negative: it raises the loss)",
          base and base["top_vs_bulk"], TOP_SHARE_LITTLE,
          f"Σ ΔL_full = {fmt(base and base['sum_delta_loss_full'])}, Σ ΔL_top = "
          f"{fmt(base and base['sum_delta_loss_top'])}, Σ ΔL_bulk = "
          f"{fmt(base and base['sum_delta_loss_bulk'])}")
    check("dom_stalls", f"{dom} loss decrease < {DOM_STALLS} × {baseline}'s",
          d and d["decrease_vs_baseline"], DOM_STALLS,
          f"{dom}: {_describe(d)}; {baseline}: {_describe(base)}")
    check("bulk_trains_as_well", f"{bulk} loss decrease ≥ {BULK_AS_WELL} × {baseline}'s",
          b and b["decrease_vs_baseline"], BULK_AS_WELL,
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


# ----------------------------------------------------------------------------
# Across seeds: each seed its own data, initialization and warm-up point
# ----------------------------------------------------------------------------

SEEDS_RULE = (
    "A criterion holds across seeds when it passes in every seed, fails when it fails in "
    "every seed, is split when it passes in some seeds and fails in others, and is "
    "undetermined when some seed cannot decide it. C4 is reproduced when all four criteria "
    "hold; undetermined when some criterion is undetermined and none fails or is split; not "
    "reproduced when none of the three learning criteria (top drives little, Dom stalls, Bulk "
    "trains as well) holds or is split; partly reproduced otherwise. A margin is the signed "
    "distance of a value from its threshold, positive on the passing side.")


def signed_margin(value, threshold: float, direction: str, holds=None):
    """How far `value` lies on the passing side of `threshold` (negative: the failing side).

    For "value < t" the margin is t − value; for "value > t" and "value ≥ t" it is
    value − t. At a margin of exactly 0, "≥" passes and ">" and "<" fail. A value lost
    to JSON (an infinite decrease ratio, from a diverged run, is stored as null) while the
    check was decided gives ±inf by `holds`; an undecided check gives None.
    """
    if value is None:
        return None if holds is None else (math.inf if holds else -math.inf)
    return value - threshold if direction in (">", ">=") else threshold - value


def criterion_across_seeds(checks: list[dict]) -> dict:
    """One criterion's checks (`c4_criteria` dicts, one per seed, in seed order) → its
    per-seed values and margins, their spread, and its outcome (holds/fails/split/
    undetermined, by SEEDS_RULE)."""
    first = checks[0]
    direction = DIRECTIONS[first["name"]]
    passes = [c["holds"] for c in checks]
    margins = [signed_margin(c["value"], c["threshold"], direction, c["holds"]) for c in checks]
    finite = [c["value"] for c in checks if c["value"] is not None and math.isfinite(c["value"])]
    decided = [m for m in margins if m is not None]
    if any(p is None for p in passes):
        outcome = "undetermined"
    else:
        outcome = "holds" if all(passes) else "fails" if not any(passes) else "split"
    return {"name": first["name"], "statement": first["statement"],
            "threshold": first["threshold"], "direction": direction,
            "values": [c["value"] for c in checks], "passes": passes, "margins": margins,
            "median": float(np.median(finite)) if finite else None,
            "min": min(finite) if finite else None, "max": max(finite) if finite else None,
            "smallest_margin": min(decided) if decided else None,
            "largest_margin": max(decided) if decided else None,
            "num_passing": sum(p is True for p in passes), "outcome": outcome}


def verdict_across_seeds(criteria: list[dict]) -> str:
    """The overall verdict from the criteria's outcomes, by SEEDS_RULE.

    Why this rule: a criterion counts as holding only where it holds from every warm-up
    point, so a value sitting on its threshold shows as "split" rather than passing or
    failing by the luck of one seed; "fails" likewise needs every seed. The three learning
    criteria decide "not reproduced", as in the single-seed `overall_verdict`: χ_k being
    large is the claim's premise, not its content. The margins (`signed_margin`) and the
    spread are reported beside the outcome, so a holding criterion with a small smallest
    margin reads as the near thing it is.
    """
    outcomes = {c["name"]: c["outcome"] for c in criteria}
    if all(o == "holds" for o in outcomes.values()):
        return "reproduced"
    if "undetermined" in outcomes.values() and not {"fails", "split"} & set(outcomes.values()):
        return "undetermined"
    if not any(outcomes.get(name) in ("holds", "split") for name in LEARNING_CRITERIA):
        return "not reproduced"
    return "partly reproduced"


def group_across_seeds(seed_groups: list[dict]) -> dict:
    """One comparison (e.g. gd vs dom vs bulk) across seeds: `seed_groups` holds that group's
    entry of each seed's experiment.json "criteria", in seed order."""
    first = seed_groups[0]
    criteria = [criterion_across_seeds([g["checks"][i] for g in seed_groups])
                for i in range(len(first["checks"]))]
    return {"baseline": first["baseline"], "dom": first["dom"], "bulk": first["bulk"],
            "criteria": criteria, "seed_verdicts": [g["verdict"] for g in seed_groups],
            "verdict": verdict_across_seeds(criteria)}


def c4_summary(seeds: list[int], experiments: list[dict]) -> dict:
    """c4_summary.json: the C4 criteria across seeds, from each seed's experiment.json (in
    `seeds` order). Lists under a criterion ("values", "passes", "margins") follow "seeds"."""
    first = experiments[0]
    group_of = lambda experiment, baseline: next(g for g in experiment["criteria"]
                                                 if g["baseline"] == baseline)
    groups = [group_across_seeds([group_of(e, group["baseline"]) for e in experiments])
              for group in first["criteria"]]
    settings = {key: first[key] for key in ("preset", "setting", "steps", "k", "refresh_every",
                                            "track_every", "warmup_max_steps", "eos_hold_steps",
                                            "variants") if key in first}
    return {"claim": "C4: near θ* the top-subspace part of the gradient is most of the gradient "
                     "but drives little of the learning (Dom-GD stalls, Bulk-GD trains as well "
                     "as GD)",
            "rule": SEEDS_RULE, "seeds": list(seeds), **settings,
            "starts": [{**e["start"], "description": e["start_description"]}
                       for e in experiments],
            "groups": groups,
            "verdicts": {g["baseline"]: g["verdict"] for g in groups},
            "seed_total_s": [e["timings"]["total_s"] for e in experiments]}


def _margin_text(margin) -> str:
    if margin is None:
        return "n/a"
    if math.isinf(margin):
        return "+∞" if margin > 0 else "−∞"
    return format(margin, "+.3f")


def seeds_verdict_markdown(summary: dict, figure: str | None = None) -> str:
    """verdict.md across seeds: one table per comparison, every cell from `summary`."""
    seeds = summary["seeds"]
    symbol = {">": ">", "<": "<", ">=": "≥"}
    lines = ["# C4 verdict across seeds: the top subspace is idle", "",
             f"Claim ({summary['claim']}).", "",
             f"Setting: {summary['setting']}; every variant ran {summary['steps']} steps from "
             f"its seed's warm-up point, k = {summary['k']}, V_k refreshed every "
             f"{summary['refresh_every']} steps. Seeds {', '.join(map(str, seeds))}: each its "
             "own data, initialization and warm-up.", "",
             f"Rule (fixed before running): {summary['rule']}", ""]
    lines += ["| seed | warm-up point |", "|---|---|"]
    lines += [f"| {s} | {start['description']} |" for s, start in zip(seeds, summary["starts"])]
    lines.append("")
    for group in summary["groups"]:
        lines += [f"## {group['baseline']} vs {group['dom']} vs {group['bulk']}: "
                  f"**{group['verdict']}**", "",
                  "| criterion | threshold | " + " | ".join(f"seed {s}" for s in seeds)
                  + " | median [min, max] | smallest margin | across seeds |",
                  "|" + "---|" * (len(seeds) + 5)]
        for c in group["criteria"]:
            cells = [f"{fmt(v, '.3f') if v is not None or p is None else '−∞'} "
                     f"{'✓' if p else '✗' if p is False else '?'}"
                     for v, p in zip(c["values"], c["passes"])]
            lines.append(f"| {c['statement'].split(' (')[0]} | "
                         f"{symbol[c['direction']]} {c['threshold']} | "
                         + " | ".join(cells) + f" | {fmt(c['median'], '.3f')} "
                         f"[{fmt(c['min'], '.3f')}, {fmt(c['max'], '.3f')}] | "
                         f"{_margin_text(c['smallest_margin'])} | **{c['outcome']}** |")
        lines += ["| verdict per seed | | " + " | ".join(group["seed_verdicts"]) + " | | | |", ""]
    lines += ["✓ passes, ✗ fails, ? undetermined in that seed. Values and margins per seed are "
              "in c4_summary.json; each seed's own verdict.md has its details.", ""]
    if figure:
        lines += [f"![loss per seed]({figure})", ""]
    lines += ["Generated by `experiments/subspace.py --seeds` (`lossland.ablation`) from "
              "c4_summary.json; not edited by hand.", ""]
    return "\n".join(lines)
