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


# --- across seeds ---------------------------------------------------------------------------

def _seed_experiment(seed, chi, top_vs_bulk, dom_ratio, bulk_ratio):
    """One seed's experiment.json, its checks from c4_criteria on a synthetic summary."""
    summary = {"gd": {"mean_chi_k": chi, "num_tracked_steps": 3, "top_vs_bulk": top_vs_bulk,
                      "sum_delta_loss_full": -0.01, "sum_delta_loss_top": -0.001,
                      "sum_delta_loss_bulk": -0.01, "status": "finished", "steps": 20,
                      "start_loss": 1.0, "final_loss": 0.5, "loss_decrease": 0.5},
               "dom": {"decrease_vs_baseline": dom_ratio, "status": "finished", "steps": 20,
                       "start_loss": 1.0, "final_loss": 0.9, "loss_decrease": 0.1},
               "bulk": {"decrease_vs_baseline": bulk_ratio, "status": "finished", "steps": 20,
                        "start_loss": 1.0, "final_loss": 0.4, "loss_decrease": 0.6}}
    checks = ablation.c4_criteria(summary, "gd", "dom", "bulk")
    return {"preset": "smoke", "setting": "s", "steps": 20, "k": 3, "refresh_every": 5,
            "track_every": 5, "warmup_max_steps": 40, "eos_hold_steps": 10, "seed": seed,
            "variants": ["gd", "dom", "bulk"], "start": {"kind": "eos", "step": 40 + seed},
            "start_description": f"warm-up of seed {seed}", "timings": {"total_s": 1.0},
            "criteria": [{"baseline": "gd", "dom": "dom", "bulk": "bulk", "checks": checks,
                          "verdict": ablation.overall_verdict(checks)}]}


def test_margins_are_signed_toward_passing():
    assert ablation.signed_margin(0.7, 0.5, ">") == pytest.approx(0.2)     # passes
    assert ablation.signed_margin(0.207, 0.2, "<") == pytest.approx(-0.007)  # fails
    assert ablation.signed_margin(0.1, 0.2, "<") == pytest.approx(0.1)
    assert ablation.signed_margin(0.75, 0.8, ">=") == pytest.approx(-0.05)
    # A decided check whose value JSON lost (an infinite ratio), and an undecided one.
    assert ablation.signed_margin(None, 0.2, "<", holds=True) == math.inf
    assert ablation.signed_margin(None, 0.8, ">=", holds=False) == -math.inf
    assert ablation.signed_margin(None, 0.8, ">=") is None


def test_criteria_across_seeds_hold_fail_and_split():
    experiments = [_seed_experiment(0, 0.99, 0.10, 0.05, 1.20),
                   _seed_experiment(1, 0.97, 0.207, 0.10, 0.90),
                   _seed_experiment(2, 0.40, 0.15, 0.232, 0.85)]
    summary = ablation.c4_summary([0, 1, 2], experiments)
    (group,) = summary["groups"]
    by_name = {c["name"]: c for c in group["criteria"]}
    chi, top, dom, bulk = (by_name[n] for n in ("top_is_most_of_gradient", "top_drives_little",
                                                "dom_stalls", "bulk_trains_as_well"))
    assert chi["passes"] == [True, True, False] and chi["outcome"] == "split"
    assert chi["margins"] == pytest.approx([0.49, 0.47, -0.10])
    assert chi["smallest_margin"] == pytest.approx(-0.10)
    assert (chi["median"], chi["min"], chi["max"]) == pytest.approx((0.97, 0.40, 0.99))
    assert top["direction"] == "<" and top["margins"] == pytest.approx([0.10, -0.007, 0.05])
    assert top["outcome"] == "split" and top["num_passing"] == 2
    assert dom["margins"] == pytest.approx([0.15, 0.10, -0.032]) and dom["outcome"] == "split"
    assert bulk["outcome"] == "holds" and bulk["smallest_margin"] == pytest.approx(0.05)
    assert bulk["largest_margin"] == pytest.approx(0.40)
    assert group["seed_verdicts"] == ["reproduced", "partly reproduced", "partly reproduced"]
    assert group["verdict"] == "partly reproduced" == summary["verdicts"]["gd"]
    assert summary["seeds"] == [0, 1, 2] and summary["starts"][2]["step"] == 42
    assert summary["rule"] == ablation.SEEDS_RULE and summary["k"] == 3
    text = ablation.seeds_verdict_markdown(summary, "loss_seeds.png")
    assert "**partly reproduced**" in text and "| seed 0 | seed 1 | seed 2 |" in text
    assert "0.207 ✗" in text and "**split**" in text and "**holds**" in text
    assert "-0.100" in text and "+0.050" in text and ablation.SEEDS_RULE in text

    # All four hold in every seed: reproduced; all three learning criteria fail: not.
    good = [_seed_experiment(s, 0.99, 0.1, 0.05, 1.0) for s in range(3)]
    assert ablation.c4_summary([0, 1, 2], good)["verdicts"]["gd"] == "reproduced"
    bad = [_seed_experiment(s, 0.99, 0.9, 0.95, 0.1 + s / 10) for s in range(3)]
    bad_group = ablation.c4_summary([0, 1, 2], bad)["groups"][0]
    assert [c["outcome"] for c in bad_group["criteria"]] == ["holds", "fails", "fails", "fails"]
    assert bad_group["verdict"] == "not reproduced"
    assert all(m < 0 for c in bad_group["criteria"][1:] for m in c["margins"])


def test_across_seeds_undetermined_and_diverged_dom():
    # Seed 1 lacks its bulk run: that criterion is undetermined across seeds.
    experiments = [_seed_experiment(0, 0.99, 0.1, 0.05, 1.0),
                   _seed_experiment(1, 0.99, 0.1, 0.05, None)]
    group = ablation.c4_summary([0, 1], experiments)["groups"][0]
    assert group["criteria"][3]["outcome"] == "undetermined"
    assert group["criteria"][3]["margins"] == pytest.approx([0.2, None])
    assert group["verdict"] == "undetermined"
    # A diverged Dom (ratio −inf, stored as null in experiment.json) stalls: +inf margin.
    experiments = [_seed_experiment(0, 0.99, 0.1, float("-inf"), 1.0),
                   _seed_experiment(1, 0.99, 0.1, 0.05, 1.0)]
    experiments[0]["criteria"][0]["checks"][2]["value"] = None   # as JSON stores it
    dom = ablation.c4_summary([0, 1], experiments)["groups"][0]["criteria"][2]
    assert dom["passes"] == [True, True] and dom["outcome"] == "holds"
    assert dom["margins"][0] == math.inf and dom["smallest_margin"] == pytest.approx(0.15)
    assert dom["median"] == pytest.approx(0.05)   # over the finite values
