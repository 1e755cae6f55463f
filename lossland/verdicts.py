"""Verdict text generated from numbers: scaling fits and claims C1, C2.

Nothing here is hand-tuned to a result. Each sentence is a function of fitted
numbers and of the fixed rules stated in this module and in the text it
writes. The generic helpers (`interval_sign`, `describe_slope`,
`describe_trend`, `markdown_table`) serve any experiment that fits a quantity
against a control variable; `c1_verdict`, `c2_verdict` and `sweep_verdict`
read the summary written by `experiments/sweep_n.py`.

A fit dict, as used throughout, holds:
  slope, ci_low, ci_high            the fitted slope and its confidence interval
  tail_slope, tail_ci_low, tail_ci_high, tail_n_min
                                    the same over the largest N only (may be NaN)
  scale                             "log" (log–log fit: y ∝ N^slope) or
                                    "linear" (y against log10 N: change per decade)
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

POSITIVE, NEGATIVE, INCLUDES_ZERO, UNDETERMINED = (
    "positive", "negative", "includes_zero", "undetermined")

# C2: "close to the valley floor" means a late-training |s*| within this
# fraction of the probe half-range s_max. A definition, fixed before any run.


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _number(x) -> float:
    """None (how the records store NaN) and non-numbers → NaN."""
    return float(x) if _finite(x) else float("nan")


def interval_sign(low, high) -> str:
    """Where an interval lies relative to 0: positive, negative, includes_zero or undetermined."""
    if not (_finite(low) and _finite(high)):
        return UNDETERMINED
    if low > 0:
        return POSITIVE
    if high < 0:
        return NEGATIVE
    return INCLUDES_ZERO


def fmt(x, digits: int = 2) -> str:
    """A number for prose: fixed digits, a true minus sign, 'n/a' for None/NaN."""
    if not _finite(x):
        return "n/a"
    if x != 0 and abs(x) >= 1e4:
        text = f"{x:.{digits}e}"
    elif x != 0 and abs(x) < 10 ** -digits:
        text = f"{x:.{digits}g}"      # small: significant digits, not 0.00
    else:
        text = f"{x:.{digits}f}"
    return text.replace("-", "−")


def fmt_interval(low, high, digits: int = 2) -> str:
    return f"[{fmt(low, digits)}, {fmt(high, digits)}]"


def describe_slope(slope, low, high, *, variable: str = "N", scale: str = "log",
                   confidence: float = 0.95) -> str:
    """One clause: 'grows as N^0.41 [0.30, 0.52]; the 95% interval excludes 0'.

    scale="log": the quantity ∝ variable^slope; scale="linear": the quantity
    changes by `slope` per decade of the variable.
    """
    sign = interval_sign(low, high)
    pct = f"{100 * confidence:.0f}%"
    if scale == "log":
        form = f"{variable}^{fmt(slope)} {fmt_interval(low, high)}"
    else:
        form = f"{'+' if _finite(slope) and slope >= 0 else ''}{fmt(slope)} per decade of " \
               f"{variable} {fmt_interval(low, high)}"
    if sign == UNDETERMINED:
        if not _finite(slope):
            return "cannot be fitted (too few finite values)"
        return f"scales as {form}; no interval (too few seeds or points), so no trend is resolved" \
            if scale == "log" else f"changes by {form}; no interval, so no trend is resolved"
    verb = {POSITIVE: "grows", NEGATIVE: "falls", INCLUDES_ZERO: "shows no resolved trend"}[sign]
    if scale == "log":
        head = f"{verb} as {form}" if sign != INCLUDES_ZERO else f"{verb}: {form}"
    else:
        head = f"{verb}: {form}"
    tail = "excludes 0" if sign in (POSITIVE, NEGATIVE) else "includes 0"
    return f"{head}; the {pct} interval {tail}"


def describe_trend(fit: dict, *, variable: str = "N", confidence: float = 0.95) -> tuple[str, str]:
    """(reading, sentence) of a fit over the whole range and over its largest-N tail.

    Readings, by fixed rule on the interval signs (full range, tail):
      growing      full > 0 and tail > 0 (or no tail fit)
      unresolved   full > 0, tail interval includes 0: growth or saturation at large N
      saturating   full > 0, tail < 0: rises, then falls
      flat         full interval includes 0
      falling      full < 0
      undetermined no interval
    """
    scale = fit.get("scale", "log")
    full = interval_sign(fit.get("ci_low"), fit.get("ci_high"))
    tail = interval_sign(fit.get("tail_ci_low"), fit.get("tail_ci_high"))
    sentence = describe_slope(fit.get("slope"), fit.get("ci_low"), fit.get("ci_high"),
                              variable=variable, scale=scale, confidence=confidence)
    if tail != UNDETERMINED:
        sentence += (f"; over the largest {variable} ({variable} ≥ {fit.get('tail_n_min')}) it " +
                     describe_slope(fit.get("tail_slope"), fit.get("tail_ci_low"),
                                    fit.get("tail_ci_high"), variable=variable, scale=scale,
                                    confidence=confidence))
    if full == POSITIVE:
        reading = {POSITIVE: "growing", UNDETERMINED: "growing", INCLUDES_ZERO: "unresolved",
                   NEGATIVE: "saturating"}[tail]
    else:
        reading = {NEGATIVE: "falling", INCLUDES_ZERO: "flat", UNDETERMINED: "undetermined"}[full]
    return reading, sentence


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    cell = lambda c: str(c).replace("|", "\\|")    # a literal | would split the cell
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Claims C1 and C2 from a dataset-size sweep summary
# ----------------------------------------------------------------------------

C1_QUANTITIES = ("probe_grad_excess", "probe_max_grad_norm", "probe_max_curvature",
                 "grad_norm")
C1_PRIMARY_BEFORE_RULE_2 = "probe_max_grad_norm"   # summaries without a "c1_rule" key
C1_READING_TEXT = {
    "growing": "grows with N over the whole range and is still growing at the largest N: "
               "consistent with C1",
    "unresolved": "grows with N overall, but at the largest N the interval includes 0: the data "
                  "cannot tell continued growth from saturation",
    "saturating": "rises and then falls with N: saturation, not the unbounded growth C1 predicts",
    "flat": "shows no growth with N (interval includes 0): not what C1 predicts",
    "falling": "falls with N: against C1",
    "undetermined": "cannot be judged (no interval: too few seeds or sizes)",
}


def _group_title(group: dict) -> str:
    named = {**group, "model": group.get("arm") or group.get("model")}
    return " / ".join(str(named.get(k)) for k in ("dataset", "model", "loss", "activation")
                      if k in group)


def _groups(summary: dict) -> list[dict]:
    """The summary's groups (a list; older summaries kept them in a dict keyed by name)."""
    groups = summary.get("groups", [])
    return list(groups.values()) if isinstance(groups, dict) else list(groups)


def eos_count(group: dict) -> str:
    """"runs_at_eos/runs_total at the edge of stability", for verdict lines."""
    return (f"{group.get('runs_at_eos', 0)}/{group.get('runs_total', 0)} runs at the edge of "
            f"stability, {group.get('sizes_at_eos', 0)} sizes N")


def _stop_note(group: dict) -> str:
    runs, at_eos = group.get("runs_total", 0), group.get("runs_at_eos", 0)
    note = (f"{at_eos} of {runs} runs held the edge of stability; only they are fitted "
            f"({group.get('sizes_at_eos', 0)} sizes N)")
    if at_eos < runs:
        note += f"; the others: {group.get('eos_labels')}, stop reasons {group.get('stop_reasons')}"
    return note


C1_RULE_TEXT = {
    "probe_grad_excess": "The verdict is decided on the gradient excess (C1 rule version 2): "
    "the largest ‖∇L‖ along the probes over ‖∇L(θ)‖ + λ1·s_max, the most a quadratic of the "
    "iterate's sharpness λ1 allows over the probe half-range s_max. A smooth landscape keeps "
    "it near or below 1 whatever the range; a point within the range where the gradient is "
    "unbounded drives it without bound. Version 1 decided on the largest ‖∇L‖ itself, which "
    "with probe ranges tied to the GD step length tracks that range (≈ λ1·s_max); it is still "
    "fitted below.",
    "probe_max_grad_norm": "The verdict is decided on the largest ‖∇L‖ along the probes "
    "(C1 rule version 1).",
}


def c1_verdict(summary: dict, quantities: Sequence[str] = C1_QUANTITIES) -> str:
    """Markdown for claim C1: does the gradient (and curvature) near θ* grow with N? The
    summary's primary quantity (`c1_primary`) is listed first and contrasted across groups."""
    conf, primary = summary.get("confidence", 0.95), c1_primary(summary)
    quantities = [primary] + [q for q in quantities if q != primary]
    labels = {k: v.get("label", k) for k, v in summary.get("quantities", {}).items()}
    lines = ["## C1 Formation: does the largest gradient grow with the training-set size N?", "",
             "C1 predicts growth without bound: a positive log–log slope against N whose "
             f"{100 * conf:.0f}% interval excludes 0, still positive at the largest N. A smooth "
             "landscape predicts saturation. Each interval is the hull of a bootstrap interval "
             "over seeds (seeds resampled within each N) and the OLS t-interval of the per-N "
             "means, so that neither seed noise nor scatter about the power law is ignored; the "
             "tail fit repeats the fit over the largest N values. "
             + C1_RULE_TEXT.get(primary, f"The verdict is decided on {primary}."),
             ""]
    for group in _groups(summary):
        lines.append(f"**{_group_title(group)}**: C1 verdict **{group.get('verdict', 'n/a')}** "
                     f"({_stop_note(group)}).")
        if group.get("verdict") == "inconclusive" and group.get("sizes_at_eos", 0) < \
                summary.get("min_sizes_at_eos", 3):
            lines.append(f"- Inconclusive by rule: fewer than {summary.get('min_sizes_at_eos', 3)} "
                         "sizes N have a run at the edge of stability, so no fit can decide.")
        for quantity in quantities:
            fit = group.get("quantities", {}).get(quantity)
            if not fit:
                continue
            reading, sentence = describe_trend(fit, confidence=conf)
            lines.append(f"- {labels.get(quantity, quantity)} {sentence}. "
                         f"Reading: {C1_READING_TEXT[reading]}.")
        shape = group.get("shape")
        if shape:
            lines.append("- " + describe_local_shape(shape))
        lines.append("")
    lines.append(_c1_contrast(summary, quantities[0], labels))
    return "\n".join(lines).rstrip() + "\n"


def exponent_reading(exponent) -> str:
    """The nearest reference behaviour of a |slope| exponent at s* (MISSION.md, fixed cuts):
    > 0.5 smooth (reference 1), −0.25…0.5 kink (reference 0), < −0.25 diverging gradient."""
    if not _finite(exponent):
        return "undetermined"
    if exponent > 0.5:
        return "a smooth valley"
    if exponent >= -0.25:
        return "a kink"
    return "a diverging gradient"


def describe_local_shape(shape: dict) -> str:
    """One sentence on the local shape along v1 at the final iterates (medians over runs)."""
    slope_exp = shape.get("probe_v1_slope_exponent")
    curv_exp = shape.get("probe_v1_curvature_exponent")
    ratio = shape.get("probe_v1_quadratic_ratio")
    text = (f"Local shape along v1 (medians over runs): |slope| ∝ |s − s*|^{fmt(slope_exp)}, "
            f"nearest to {exponent_reading(slope_exp)} (1 smooth, 0 kink, < 0 diverging; cuts at "
            f"0.5 and −0.25); curvature ∝ |s − s*|^{fmt(curv_exp)}; max ‖∇L‖ along v1 is "
            f"{fmt(ratio)}× λ1·(s_max + |s*|), the value a quadratic valley of curvature λ1 gives")
    if _finite(ratio):
        text += (", so the largest probed gradient is " +
                 ("what the sharpness alone predicts" if 0.8 <= ratio <= 1.25 else
                  "not explained by the sharpness alone (outside 0.8–1.25×)"))
    return text + "."


def _c1_contrast(summary: dict, quantity: str, labels: dict) -> str:
    """One sentence comparing the groups on the primary quantity (e.g. relu vs tanh)."""
    parts = []
    for group in _groups(summary):
        fit = group.get("quantities", {}).get(quantity)
        if fit:
            interval = fmt_interval(fit.get("ci_low"), fit.get("ci_high"))
            form = f"N^{fmt(fit.get('slope'))} {interval}"
            sign = interval_sign(fit.get("ci_low"), fit.get("ci_high"))
            excl = {POSITIVE: "excludes 0", NEGATIVE: "excludes 0", INCLUDES_ZERO: "includes 0",
                    UNDETERMINED: "no interval"}[sign]
            parts.append(f"{form} for {_group_title(group)} ({excl})")
    if not parts:
        return ""
    return f"In short, {labels.get(quantity, quantity)} scales as " + "; ".join(parts) + "."


def c2_verdict(summary: dict) -> str:
    """Markdown for claim C2: does GD bring θ close to the valley floor along v1, and stay?"""
    conf = summary.get("confidence", 0.95)
    rule = summary.get("c2_rule") or {}
    control = summary.get("c2_control_fraction", 0.5)
    lines = [
        "## C2 Attraction: how far is the iterate from the valley floor along v1?", "",
        "Definition (from the records): along the top Hessian eigenvector v1 at a probed step, "
        "s* is the minimizer of L(θ + s v1) on the probe range (grid minimum refined by "
        "bisection on the slope), and the valley distance is |s*|, also in GD step lengths "
        "ℓ = η‖∇L(θ)‖ at that step. Its late level is the median over the probed steps from "
        "the run's entry into the edge of stability on (lossland.eos), final iterate "
        "included. Only runs that held the edge of stability count. A late probed step "
        "*oscillates* when its last GD displacement d moved mostly along v1: cos²(d, v1) ≥ "
        f"{fmt(rule.get('oscillation_alignment', 0.5), 2)}. Three checks, fixed before the "
        f"runs (rule version {rule.get('version', 1)}, lossland.scaling.c2_checks): the "
        f"iterate is *close* when the late |s*| ≤ {fmt(rule.get('close_steps', 1.0), 2)} "
        "step length(s) (at the edge of stability a quadratic valley puts the floor about "
        f"half a step away); it is *nearer than the controls* when the late |s*| ≤ {control:g}× "
        "the same late distance along each control direction (a random unit direction, and "
        "v1 at the run's first tracked step); and, over the oscillating steps only, the "
        f"gradient is *aligned* when {control:g}× χ_1 = cos²(∇L, v1) ≥ cos²(∇L, u) for each "
        "control u (\"n/a\" when no run oscillates: on the floor at rest χ_1 → 0 by "
        "construction, so alignment cannot be asked of it). C2 holds (\"for\") when both "
        "distance checks hold and the alignment holds or is n/a; it fails (\"against\") "
        "when both distance checks fail; it is \"inconclusive\" otherwise, or with fewer "
        f"than {summary.get('min_sizes_at_eos', 3)} sizes N at the edge of stability.",
        ""]
    for group in _groups(summary):
        c2 = group.get("c2", {})
        late, init = _number(c2.get("late_median")), _number(c2.get("init_median"))
        steps = _number(c2.get("late_steps_median"))
        late_edge = 100 * _number(c2.get("late_edge_fraction"))
        init_edge = 100 * _number(c2.get("init_edge_fraction"))
        text = (f"**{_group_title(group)}**: C2 verdict **{group.get('c2_verdict', 'n/a')}** "
                f"({eos_count(group)}). Late |s*| median over those runs {fmt(late, 3)} = "
                f"{fmt(steps, 3)} GD step lengths (probe half-range "
                f"{fmt(_number(c2.get('probe_s_max_steps_median')), 3)} step lengths = "
                f"{fmt(_number(c2.get('probe_s_max_theta_median')), 3)}·‖θ‖); floor beyond "
                f"the probe range in {fmt(late_edge, 0)}% of late probes. At step 0 the "
                f"median was {fmt(init, 3)} ({fmt(init_edge, 0)}% at the edge). Controls, "
                f"late medians: |s*| {fmt(_number(c2.get('late_random_median')), 3)} along a "
                f"random direction and {fmt(_number(c2.get('late_v1init_median')), 3)} along "
                f"v1 at the first tracked step. Oscillating: "
                f"{c2.get('runs_oscillating', 'n/a')} of {group.get('runs_at_eos')} runs, a "
                f"median {fmt(100 * _number(c2.get('oscillating_fraction_median')), 0)}% of "
                f"late probed steps (cos²(d, v1) median "
                f"{fmt(_number(c2.get('disp_v1_alignment_median')), 3)}); over those steps χ_1 "
                f"{fmt(_number(c2.get('chi_1_oscillating_median')), 3)} against alignments "
                f"{fmt(_number(c2.get('alignment_oscillating_random_median')), 3)} (random) "
                f"and {fmt(_number(c2.get('alignment_oscillating_v1init_median')), 3)} (v1 at "
                f"the first tracked step); late χ_1 over all steps "
                f"{fmt(_number(c2.get('chi_1_late_median')), 3)}; checks {c2.get('checks')}")
        if _finite(late) and _finite(init) and init > 0 and late > 0:
            change = (f"shrank by a factor {fmt(init / late, 1)}" if late < init
                      else f"grew by a factor {fmt(late / init, 1)}")
            text += f", so the distance {change} during training"
        fit = group.get("quantities", {}).get("valley_distance_late")
        if fit:
            reading, sentence = describe_trend(fit, confidence=conf)
            text += f". Against N, the late |s*| {sentence}"
        lines.append(text + ".")
        lines.append("")
    lines.extend(_eta_scaling_lines(summary))
    return "\n".join(lines).rstrip() + "\n"


def _eta_scaling_lines(summary: dict) -> list[str]:
    """How the late |s*| scales with η, from `summary["eta_scaling"]` when the sweep ran
    several η on one setting."""
    scans = summary.get("eta_scaling") or []
    if not scans:
        # Each arm's own η (an arm may override the sweep's top-level one).
        lrs = sorted({g["lr"] for g in summary.get("groups", []) if g.get("lr") is not None})
        lrs = lrs or [summary.get("lr")]
        return [f"Scaling with η: this sweep ran a single η per setting "
                f"({', '.join(fmt(lr, 3) for lr in lrs)}); how "
                "the late level scales with η needs runs at several η and is not measured "
                "here."]
    lines = []
    for scan in scans:
        fit = scan.get("fit") or {}
        lines.append(
            f"Scaling with η, **{scan['setting']}** (N = {scan.get('n')}, η ∈ "
            f"{scan.get('lrs')}, {scan.get('runs')} runs at the edge of stability): the late "
            f"|s*| along v1 goes as η^{fmt(fit.get('slope'), 2)} {_eta_interval(fit)}; medians "
            f"{[fmt(v, 3) for v in scan.get('late_medians', [])]}; in step lengths "
            f"{[fmt(v, 3) for v in scan.get('late_steps_medians', [])]}.")
        lines.append("")
    return lines


def quantity_table(summary: dict, *, digits: int = 2) -> str:
    """Every fitted quantity of every group: slope, interval, tail slope."""
    labels = summary.get("quantities", {})
    rows = []
    for group in _groups(summary):
        for key, fit in group.get("quantities", {}).items():
            unit = "N^a" if fit.get("scale", "log") == "log" else "per decade"
            rows.append([_group_title(group), labels.get(key, {}).get("label", key), unit,
                         fmt(fit.get("slope"), digits),
                         fmt_interval(fit.get("ci_low"), fit.get("ci_high"), digits),
                         fmt(fit.get("tail_slope"), digits),
                         fmt_interval(fit.get("tail_ci_low"), fit.get("tail_ci_high"), digits),
                         interval_sign(fit.get("ci_low"), fit.get("ci_high"))])
    return markdown_table(["group", "quantity", "fit", "slope", "CI", "tail slope", "tail CI",
                           "interval vs 0"], rows)


def sweep_verdict(summary: dict, *, title: Optional[str] = None) -> str:
    """The whole verdict.md of a dataset-size sweep."""
    header = title or "# Dataset-size sweep: verdict"
    setup = summary.get("setup", "")
    parts = [header, "", "Generated from summary.json by lossland.verdicts; no sentence is "
             "hand-written for a particular result.", ""]
    if setup:
        parts += [setup, ""]
    parts += [c1_verdict(summary), c2_verdict(summary), "## All fitted quantities", "",
              quantity_table(summary), ""]
    return "\n".join(parts)


# ----------------------------------------------------------------------------
# Verdicts at a glance (REPORT.md opens with them)
# ----------------------------------------------------------------------------

GLANCE_HEADER = ["claim", "group", "verdict", "deciding number", "runs at EoS / total"]


def c1_primary(summary: dict) -> str:
    """The quantity a summary's C1 verdicts were decided on (`scaling.C1_RULE`)."""
    return (summary.get("c1_rule") or {}).get("primary", C1_PRIMARY_BEFORE_RULE_2)


C1_NUMBER_LABEL = {"probe_grad_excess": "max ‖∇L‖ along probes / (‖∇L‖ + λ1·s_max)",
                   "probe_max_grad_norm": "max ‖∇L‖ along probes"}


def _c1_number(group: dict, confidence: float, primary: str) -> str:
    fit = group.get("quantities", {}).get(primary)
    if not fit:
        return "no fit"
    half = (fit["ci_high"] - fit["ci_low"]) / 2 if _finite(fit.get("ci_low")) and \
        _finite(fit.get("ci_high")) else float("nan")
    return (f"{C1_NUMBER_LABEL.get(primary, primary)} ∝ N^{fmt(fit.get('slope'))} "
            f"{fmt_interval(fit.get('ci_low'), fit.get('ci_high'))} ({100 * confidence:.0f}%, "
            f"half-width {fmt(half)}), N = {fit.get('all_n', [None])[0]}–"
            f"{fit.get('all_n', [None])[-1]}")


def _c2_number(group: dict) -> str:
    c2 = group.get("c2", {})
    low, high = (c2.get("late_steps_range") or [None, None])
    controls = [_number(c2.get("late_random_median")), _number(c2.get("late_v1init_median"))]
    nearest = min(controls) if all(_finite(c) for c in controls) else float("nan")
    late = _number(c2.get("late_median"))
    ratio = late / nearest if _finite(late) and _finite(nearest) and nearest > 0 else None
    aligned = (c2.get("checks") or {}).get("aligned_while_oscillating")
    return (f"late |s*| = {fmt(_number(c2.get('late_steps_median')))} step lengths "
            f"[{fmt(low)}, {fmt(high)}] over runs; v1/nearest control {fmt(ratio)}; "
            f"oscillating {c2.get('runs_oscillating', 'n/a')} runs, aligned {aligned}")


def _eta_interval(fit: dict) -> str:
    """The η fit's interval: the seed-bootstrap hull when every η has ≥ 2 seeds, else the
    OLS t-interval of the per-η means alone, labelled as such."""
    if _finite(fit.get("ci_low")):
        return (f"{fmt_interval(fit.get('ci_low'), fit.get('ci_high'))} "
                f"({interval_sign(fit.get('ci_low'), fit.get('ci_high'))})")
    return (f"{fmt_interval(fit.get('ols_ci_low'), fit.get('ols_ci_high'))} (OLS over the "
            "per-η means only: some η has a single run at the edge of stability, so there "
            "is no seed bootstrap)")


def glance_rows(summary: dict, *, label: str = "") -> list[list]:
    """C1 and C2 rows of the verdicts-at-a-glance table from one sweep's summary.json; an
    arm that scans η at one N (role "eta_scan") has its own row, the η-scaling fit."""
    conf, primary = summary.get("confidence", 0.95), c1_primary(summary)
    rows = []
    for group in _groups(summary):
        if group.get("role", "n_sweep") != "n_sweep":
            continue
        title = _group_title(group) + (f" ({label})" if label else "")
        count = f"{group.get('runs_at_eos', 0)} / {group.get('runs_total', 0)}"
        rows.append(["C1", title, group.get("verdict", "n/a"), _c1_number(group, conf, primary),
                     count])
        rows.append(["C2", title, group.get("c2_verdict", "n/a"), _c2_number(group), count])
    for scan in summary.get("eta_scaling") or []:
        fit = scan.get("fit") or {}
        rows.append(["C2 (η)", f"{scan['setting']}, N = {scan['n']}", "measured",
                     f"late |s*| ∝ η^{fmt(fit.get('slope'))} {_eta_interval(fit)}, η ∈ "
                     f"{scan['lrs']}; in step lengths "
                     f"{[fmt(v) for v in scan.get('late_steps_medians', [])]}",
                     f"{scan.get('runs')} at EoS"])
    return rows

