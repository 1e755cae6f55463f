"""REPORT.md from the records of `experiments.reproduce`, and the C3 verdict.

Every number and verdict line in the report is read from, or computed from,
the records the experiments wrote (summary.json, metrics.jsonl, verdict.md,
COMPLETE.json). Nothing is typed in by hand, and the C3 rules are fixed here
before any run:
  * a run is "at the edge of stability" when the median of λ1·η/2 over the
    last half of training lies in [0.9, 1.1];
  * the gradient is "concentrated in the top eigenvector" when the median χ_1
    over that half is ≥ 0.8;
  * the Gauss–Newton part "carries the sharpness" when the median of
    λ1(G)/λ1(H) over the last half is ≥ 0.9.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from lossland import eos, records, verdicts

EOS_BAND = eos.DEFAULT_BAND   # the one definition: lossland.eos
CHI1_CONCENTRATED = 0.8
GN_CARRIES = 0.9

REPORT_FILE = "REPORT.md"


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _figure(path: Path, root: Path, caption: str) -> str:
    if not path.exists():
        return f"*(figure missing: {path.name})*"
    return f"![{caption}]({os.path.relpath(path, root)})"


def _demote(markdown: str) -> str:
    """Drops a verdict file's title and pushes its headings one level down."""
    lines = markdown.strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join("#" + line if line.startswith("#") else line for line in lines).strip()


# ----------------------------------------------------------------------------
# C3: edge of stability, χ_1, Gauss–Newton
# ----------------------------------------------------------------------------

def gn_summary(rows: list[dict]) -> dict | None:
    """Medians over the last half of a --track_gn run: λ1 of H, of G, of H − G."""
    tracked = [r for r in rows if "gn_eigenvalues" in r and "status" not in r]
    if not tracked:
        return None
    last = max(r["step"] for r in tracked)
    late = [r for r in tracked if r["step"] >= last / 2]
    med = lambda f: float(np.median([f(r) for r in late]))
    return {
        "steps_tracked": len(tracked),
        "lr": late[-1].get("lr"),
        "median_lambda1_H": med(lambda r: r["eigenvalues"][0]),
        "median_lambda1_G": med(lambda r: r["gn_eigenvalues"][0]),
        "median_lambda1_residual": med(lambda r: r["residual_eigenvalues"][0]),
        "median_gn_share": med(lambda r: r["gn_eigenvalues"][0] / r["eigenvalues"][0]),
        "median_stability_ratio": med(lambda r: r["stability_ratio"]),
    }


def c3_judgement(run: dict) -> tuple:
    """(median λ1·η/2, median χ_1, at the edge, concentrated) over one EoS run's last half,
    by the rules of the module docstring; the ratio is None without tracked rows."""
    ratio, chi1 = run.get("median_stability_ratio_last_half"), run.get("median_chi_1_last_half")
    at_edge = ratio is not None and EOS_BAND[0] <= ratio <= EOS_BAND[1]
    concentrated = chi1 is not None and chi1 >= CHI1_CONCENTRATED
    return ratio, chi1, at_edge, concentrated


def c3_verdict_lines(eos_summary: dict | None, gn: dict | None) -> list[str]:
    """One verdict line per lr, and one for the Gauss–Newton split, from the numbers."""
    lines = []
    for run in (eos_summary or {}).get("runs", {}).values():
        ratio, chi1, at_edge, concentrated = c3_judgement(run)
        if ratio is None:
            lines.append(f"C3 η={run['lr']:g}: no tracked rows; nothing to judge.")
            continue
        entered = run.get("entry_step")
        after_ratio, after_chi1 = (run.get("median_stability_ratio_after_entry"),
                                   run.get("median_chi_1_after_entry"))
        lines.append(
            f"C3 η={run['lr']:g}: median λ1·η/2 over the last half = {verdicts.fmt(ratio, 3)} "
            f"({'inside' if at_edge else 'outside'} [{EOS_BAND[0]}, {EOS_BAND[1]}]: "
            f"{'at' if at_edge else 'not at'} the edge of stability); median χ_1 = "
            f"{verdicts.fmt(chi1, 3)} ({'≥' if concentrated else '<'} {CHI1_CONCENTRATED}: "
            f"gradient {'concentrated' if concentrated else 'not concentrated'} in v1); "
            + (f"entered the edge of stability (lossland.eos: first upward crossing of the "
               f"threshold) at step {entered}; after entry, median λ1·η/2 = "
               f"{verdicts.fmt(after_ratio, 3)} and median χ_1 = {verdicts.fmt(after_chi1, 3)}; "
               f"final state {run.get('eos_state', 'n/a')}, held {run.get('held_steps', 'n/a')} "
               "steps." if entered is not None else
               "never entered the edge of stability (no upward crossing of the threshold after "
               f"being below it; final state {run.get('eos_state', 'n/a')})."))
    if gn:
        carries = gn["median_gn_share"] >= GN_CARRIES
        lines.append(
            f"C3 Gauss–Newton split (η={gn['lr']}): over the last half, median λ1(H) = "
            f"{verdicts.fmt(gn['median_lambda1_H'], 3)}, λ1(G) = "
            f"{verdicts.fmt(gn['median_lambda1_G'], 3)}, λ1(H − G) = "
            f"{verdicts.fmt(gn['median_lambda1_residual'], 3)}; λ1(G)/λ1(H) = "
            f"{verdicts.fmt(gn['median_gn_share'], 3)}, so the Gauss–Newton part "
            f"{'carries' if carries else 'does not carry'} the sharpness "
            f"(rule: ratio ≥ {GN_CARRIES}).")
    return lines


def _eos_table(eos_summary: dict) -> str:
    rows = []
    for run in eos_summary.get("runs", {}).values():
        entry = run.get("entry_step")
        rows.append([f"{run['lr']:g}", verdicts.fmt(run["two_over_lr"], 1), run["steps"],
                     verdicts.fmt(run.get("initial_stability_ratio"), 2),
                     entry if entry is not None else "never",
                     verdicts.fmt(run.get("median_lambda1_last_half"), 2),
                     verdicts.fmt(run.get("median_stability_ratio_last_half"), 3),
                     verdicts.fmt(run.get("median_chi_1_last_half"), 3),
                     verdicts.fmt(run.get("median_stability_ratio_after_entry"), 3),
                     verdicts.fmt(run.get("median_chi_1_after_entry"), 3),
                     verdicts.fmt(run.get("final_loss"), 4),
                     verdicts.fmt(run.get("mean_matvecs_per_track"), 1)])
    return verdicts.markdown_table(
        ["η", "2/η", "steps", "λ1·η/2 at init", "entry step", "median λ1 (last half)",
         "median λ1·η/2 (last half)", "median χ_1 (last half)", "median λ1·η/2 (after entry)",
         "median χ_1 (after entry)", "final loss", "matvecs/track"], rows)


# ----------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------

def _environment_section(root: Path) -> list[str]:
    env = records.environment()
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    return ["## Environment", "", f"- versions: {versions}",
            f"- backend: {env['backend']}; devices: {', '.join(env['devices'])}",
            f"- CPU cores: {os.cpu_count()}; git commit: {env['git_commit']}", ""]


def _timing_section(root: Path, names: list[str], total_s: float | None) -> list[str]:
    rows, minutes = [], []
    for name in names:
        marker = _read_json(root / name / "COMPLETE.json")
        if marker:
            minutes.append(marker["wall_time_s"] / 60)
        rows.append([name, verdicts.fmt(marker["wall_time_s"] / 60, 1) if marker else "not run",
                     "`" + " ".join(marker["command"]) + "`" if marker else ""])
    lines = ["## Wall time", "", verdicts.markdown_table(["experiment", "minutes", "command"], rows)]
    if minutes:
        # Each experiment's own run, however many invocations it took to get there.
        lines += ["", f"The {len(minutes)} experiments run took {sum(minutes):.1f} minutes in all "
                      f"(the sum of the table)."]
    if total_s is not None:
        lines += ["", f"This invocation of `experiments.reproduce` took "
                      f"{total_s / 60:.1f} minutes (experiments skipped as complete cost nothing)."]
    return lines + [""]


def _sweep_section(root: Path) -> list[str]:
    lines = ["## C1 Formation and C2 Attraction (dataset-size sweeps)", ""]
    for name, title in (("sweep_n", "MSE, every arm of the preset"),
                        ("sweep_ce", "cross-entropy control")):
        folder = root / name
        verdict = folder / "verdict.md"
        lines += [f"### Sweep: {title}", ""]
        if not verdict.exists():
            lines += ["*(not run)*", ""]
            continue
        lines += [_demote(verdict.read_text()), ""]   # it opens with the sweep's setup
        plots_dir = folder / "plots"
        for png in sorted(plots_dir.glob("*.png")) if plots_dir.exists() else []:
            lines.append(_figure(png, root, png.stem))
        lines.append("")
    return lines


def _eos_section(root: Path) -> list[str]:
    eos = _read_json(root / "eos" / "summary.json")
    gn_dir = root / "gn"
    gn = gn_summary(records.read_metrics(gn_dir)) if (gn_dir / records.METRICS_FILE).exists() \
        else None
    lines = ["## C3 Explanation: edge of stability, χ_1 and the Gauss–Newton split", ""]
    if eos:
        setting = eos.get("setting", {})
        lines += [f"Setting: {setting.get('dataset')} n={setting.get('n_train')}, "
                  f"{setting.get('model')} {setting.get('depth')}×{setting.get('width')} "
                  f"{setting.get('activation')}, {setting.get('loss')}, full-batch GD; "
                  f"top-{setting.get('track_k')} Lanczos every {setting.get('track_every')} "
                  "steps, warm-started.", "", _eos_table(eos), "",
                  _figure(root / "eos" / "sharpness.png", root, "sharpness against step"), ""]
    else:
        lines += ["*(edge-of-stability sweep not run)*", ""]
    if gn:
        lines += [_figure(gn_dir / "plots" / "spectrum.png", root,
                          "top Hessian, Gauss–Newton and residual eigenvalues"), ""]
    lines += ["### Verdict", ""] + [f"- {line}" for line in c3_verdict_lines(eos, gn)] + [""]
    return lines


def _subspace_section(root: Path) -> list[str]:
    folder = root / "subspace"
    lines = ["## C4 The top subspace is idle (Dom-GD and Bulk-GD)", ""]
    verdict = folder / "verdict.md"
    if not verdict.exists():
        return lines + ["*(not run)*", ""]
    lines += [_demote(verdict.read_text()), ""]
    for png in sorted(folder.glob("*.png")):
        lines.append(_figure(png, root, png.stem))
    return lines + [""]


def c3_glance_rows(eos_summary: dict | None, gn: dict | None) -> list[list]:
    """C3 rows of the verdicts-at-a-glance table: one per η of the EoS sweep, one for the
    Gauss–Newton split; the same rules as `c3_verdict_lines`."""
    rows = []
    for run in (eos_summary or {}).get("runs", {}).values():
        ratio, chi1, at_edge, concentrated = c3_judgement(run)
        if ratio is None:
            continue
        verdict = ("for" if at_edge and concentrated else
                   "against" if not at_edge and not concentrated else "partly")
        rows.append(["C3", f"EoS sweep, η = {run['lr']:g}", verdict,
                     f"median λ1·η/2 = {verdicts.fmt(ratio, 3)} (band {list(EOS_BAND)}), "
                     f"χ_1 = {verdicts.fmt(chi1, 3)} (≥ {CHI1_CONCENTRATED})",
                     "1 / 1" if run.get("entry_step") is not None else "0 / 1"])
    if gn:
        rows.append(["C3 (G)", f"Gauss–Newton split, η = {gn['lr']}",
                     "for" if gn["median_gn_share"] >= GN_CARRIES else "against",
                     f"λ1(G)/λ1(H) = {verdicts.fmt(gn['median_gn_share'], 3)} "
                     f"(≥ {GN_CARRIES})", "n/a"])
    return rows


def c4_glance_rows(folder: Path) -> list[list]:
    """C4 rows: from c4_summary.json (several warm-up seeds: verdict and smallest margin per
    criterion) when present, else from experiment.json (one warm-up)."""
    spread = _read_json(folder / "c4_summary.json")
    if spread:
        rows = []
        for group in spread["groups"]:
            margins = "; ".join(
                f"{c['name']} {c['outcome']} (median {verdicts.fmt(c.get('median'), 3)} "
                f"[{verdicts.fmt(c.get('min'), 3)}, {verdicts.fmt(c.get('max'), 3)}] vs "
                f"{c['direction']} {c['threshold']}, smallest margin "
                f"{verdicts.fmt(c.get('smallest_margin'), 3)})" for c in group["criteria"])
            rows.append(["C4", f"{group['baseline']} vs {group['dom']}/{group['bulk']}, "
                               f"seeds {spread['seeds']}", group["verdict"], margins, "n/a"])
        return rows
    experiment = _read_json(folder / "experiment.json")
    rows = []
    for group in (experiment or {}).get("criteria", []):
        margins = "; ".join(f"{c['name']} = {verdicts.fmt(c['value'], 3)} vs {c['threshold']}"
                            for c in group["checks"])
        rows.append(["C4", f"{group['baseline']} vs Dom/Bulk, one warm-up", group["verdict"],
                     margins, "n/a"])
    return rows


def _glance_section(root: Path) -> list[str]:
    """Verdicts at a glance: one row per claim and group, generated from the summaries."""
    rows = []
    for name, label in (("sweep_n", ""), ("sweep_ce", "cross-entropy control")):
        summary = _read_json(root / name / "summary.json")
        if summary:
            rows += verdicts.glance_rows(summary, label=label)
    gn_dir = root / "gn"
    gn = gn_summary(records.read_metrics(gn_dir)) if (gn_dir / records.METRICS_FILE).exists() \
        else None
    rows += c3_glance_rows(_read_json(root / "eos" / "summary.json"), gn)
    rows += c4_glance_rows(root / "subspace")
    if not rows:
        return []
    return ["## Verdicts at a glance", "",
            "Each verdict follows a rule fixed before the runs; the sections below state the "
            "rules and every number behind them.", "",
            verdicts.markdown_table(verdicts.GLANCE_HEADER, rows), ""]


def write_report(root: Path, preset: str, experiments: list[str],
                 total_s: float | None = None) -> Path:
    """Writes root/REPORT.md from whatever records the experiments left; returns its path."""
    lines = [f"# lossland reproduction report ({preset} preset)", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by `experiments.reproduce` from "
             "the records under this folder. Every number and verdict below is computed from "
             "those records; the rules behind each verdict are stated with it.", ""]
    lines += _glance_section(root)
    lines += _environment_section(root)
    lines += _timing_section(root, experiments, total_s)
    lines += _sweep_section(root)
    lines += _eos_section(root)
    lines += _subspace_section(root)
    path = root / REPORT_FILE
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
