"""lossland.ablation: the C4 summary, criteria and verdict, from synthetic variant records."""

import math

import pytest

from lossland import ablation


def _rows(start_loss, final_loss, tracked, status="finished", steps=20):
    """A variant's metrics.jsonl rows: step 0, a few tracked rows, and the status row."""
    rows = [{"step": 0, "loss": start_loss}]
    for i, (chi_k, d_full, d_top, d_bulk) in enumerate(tracked):
        rows.append({"step": 5 * i, "loss": start_loss, "chi_k": chi_k, "chi_1": chi_k / 2,
                     "stability_ratio": 0.95, "delta_loss_full": d_full,
                     "delta_loss_top": d_top, "delta_loss_bulk": d_bulk})
    rows.append({"step": steps, "status": status, "loss": final_loss, "accuracy": 0.5,
                 "wall_time": 1.0})
    return rows


def _summary(variants):
    summary = {name: ablation.summarize_variant(rows, name) for name, rows in variants.items()}
    ablation.add_baseline_ratios(summary)
    return summary


def test_summary_sums_shares_and_baseline_ratios():
    tracked = [(0.9, -0.010, 0.002, -0.012), (0.95, -0.006, 0.001, -0.007)]
    summary = _summary({"gd": _rows(1.0, 0.5, tracked), "dom": _rows(1.0, 0.95, tracked),
                        "bulk": _rows(1.0, 0.4, tracked)})
    gd = summary["gd"]
    assert gd["num_tracked_steps"] == 2 and gd["mean_chi_k"] == pytest.approx(0.925)
    assert gd["sum_delta_loss_top"] == pytest.approx(0.003)
    assert gd["sum_delta_loss_bulk"] == pytest.approx(-0.019)
    # Shares of the parts' joint decrease (−0.016): the top part raised the loss.
    assert gd["share_top"] == pytest.approx(0.003 / -0.016)
    assert gd["share_top"] + gd["share_bulk"] == pytest.approx(1.0)
    assert gd["top_vs_bulk"] == pytest.approx(0.003 / -0.019)
    assert gd["loss_decrease"] == pytest.approx(0.5)
    assert summary["dom"]["decrease_vs_baseline"] == pytest.approx(0.1)
    assert summary["bulk"]["decrease_vs_baseline"] == pytest.approx(1.2)


def test_criteria_reproduced_and_not_reproduced():
    idle = [(0.99, -0.01, 0.0005, -0.0105)] * 3
    summary = _summary({"gd": _rows(1.0, 0.5, idle), "dom": _rows(1.0, 0.97, idle),
                        "bulk": _rows(1.0, 0.45, idle)})
    checks = ablation.c4_criteria(summary, "gd", "dom", "bulk")
    assert [c["holds"] for c in checks] == [True, True, True, True]
    assert ablation.overall_verdict(checks) == "reproduced"

    # The top part does the learning: Dom-GD trains as well as GD, Bulk-GD barely.
    busy = [(0.99, -0.01, -0.009, -0.001)] * 3
    summary = _summary({"gd": _rows(1.0, 0.5, busy), "dom": _rows(1.0, 0.52, busy),
                        "bulk": _rows(1.0, 0.98, busy)})
    checks = ablation.c4_criteria(summary, "gd", "dom", "bulk")
    assert [c["holds"] for c in checks] == [True, False, False, False]
    assert ablation.overall_verdict(checks) == "not reproduced"
    text = ablation.verdict_markdown(summary, {"setting": "s", "start_description": "d",
                                               "steps": 20, "k": 2, "refresh_every": 5,
                                               "track_every": 5},
                                     [{"baseline": "gd", "dom": "dom", "bulk": "bulk",
                                       "checks": checks, "verdict": "not reproduced"}])
    assert "**not reproduced**" in text and "the top subspace was not idle" in text


def test_diverged_variant_counts_as_no_decrease_and_missing_is_undetermined():
    tracked = [(0.9, -0.01, 0.0, -0.01)]
    summary = _summary({"gd": _rows(1.0, 0.5, tracked),
                        "dom": _rows(1.0, math.nan, tracked, status="diverged")})
    assert summary["dom"]["decrease_vs_baseline"] == float("-inf")
    checks = ablation.c4_criteria(summary, "gd", "dom", "bulk")
    assert checks[2]["holds"] is True and checks[3]["holds"] is None
    assert ablation.overall_verdict(checks) in ("undetermined", "partly reproduced")
