"""lossland.eos: the edge-of-stability rule on synthetic stability-ratio sequences."""

import math

import pytest

from lossland import eos

RULE = eos.EosRule(threshold=0.9, band=(0.9, 1.1), window=5)


def _run(ratios, every=10, rule=RULE):
    steps = [every * i for i in range(len(ratios))]
    states = eos.classify(steps, ratios, rule)
    rows = [{"step": s, "stability_ratio": r} for s, r in zip(steps, ratios)]
    return states, eos.replay(rows, rule), rows


def test_rising_from_below_then_holding():
    ratios = [0.3, 0.5, 0.7, 0.85, 0.92, 0.97, 1.02, 0.95, 1.0, 0.98, 1.01, 0.99]
    states, monitor, rows = _run(ratios)
    assert states[:4] == ["below"] * 4
    assert monitor.entry_step == 40            # first upward crossing of 0.9
    assert states[4:8] == ["entered"] * 4      # the window fills: 5 ratios since entry
    assert states[8:] == ["holding"] * 4
    assert monitor.held_since == 80 and eos.held_steps(monitor) == 30
    summary = eos.run_summary(rows, RULE, hold_steps=30)
    assert summary["at_eos"] and summary["eos_label"] == "at_eos"
    assert summary["eos_entry_step"] == 40 and summary["held_steps"] == 30
    assert not eos.run_summary(rows, RULE, hold_steps=31)["at_eos"]


def test_starting_above_enters_only_after_falling_below():
    # A catapult: λ1·η/2 = 3.5 at initialization, then falls, then sharpens back.
    ratios = [3.5, 1.8, 1.3, 0.95, 0.6, 0.4, 0.7, 0.93, 1.0, 1.0, 0.97, 1.02, 1.0]
    states, monitor, _ = _run(ratios)
    assert states[:3] == ["above"] * 3
    assert states[3] == "below"                 # in the band, but not entered: never fell below
    assert monitor.entry_step == 70             # 0.93 after the fall to 0.4
    assert states[7:11] == ["entered"] * 4 and states[11:] == ["holding"] * 2


def test_sitting_above_the_band_is_above_and_never_holds():
    ratios = [0.5] + [1.5] * 30
    states, monitor, rows = _run(ratios)
    assert monitor.entry_step == 10             # it crossed from below...
    assert set(states[1:]) == {"above"}         # ...but the median sits above the band
    assert monitor.held_since is None
    summary = eos.run_summary(rows, RULE, hold_steps=10)
    assert summary["eos_label"] == "above_eos" and not summary["at_eos"]
    # Starting above and staying there: never armed, never entered, still above.
    states, monitor, rows = _run([1.5] * 20)
    assert monitor.entry_step is None and set(states) == {"above"}
    assert eos.run_summary(rows, RULE, hold_steps=10)["eos_label"] == "above_eos"


def test_oscillation_across_the_lower_edge_follows_the_window_majority():
    # Period-2 alternation 1.0 / 0.8 after entry, W = 5: once the window is full its
    # median is the value holding 3 of the 5 places, so the state flips every step.
    ratios = [0.5, 0.95, 1.0, 0.8, 1.0, 0.8, 1.0, 0.8, 1.0, 0.8]
    states, monitor, _ = _run(ratios)
    assert monitor.entry_step == 10
    # Medians of the growing window since entry: .95, .975, .95, .975 (entered), then
    # .95 (full: holding), 1.0, .8, 1.0, .8.
    assert states[1:5] == ["entered"] * 4
    assert states[5:] == ["holding", "holding", "below", "holding", "below"]
    # Each flip ends the holding stretch.
    assert monitor.state == "below" and monitor.held_since is None


def test_oscillation_across_the_upper_edge():
    ratios = [0.5, 0.95] + [1.15, 1.0] * 4 + [1.15]
    states, _, _ = _run(ratios)
    assert states[1:5] == ["entered"] * 4
    assert states[5:] == ["holding", "above", "holding", "above", "holding", "above"]


def test_nan_counts_as_above_and_resets_holding():
    ratios = [0.5, 0.95, 1.0, 1.0, 1.0, 1.0, 1.0, math.nan, math.nan, math.nan]
    states, monitor, _ = _run(ratios)
    assert states[5:7] == ["holding", "holding"]
    assert states[-1] == "above" and monitor.held_since is None


def test_replay_counts_the_final_tracked_status_row_and_equals_incremental_updates():
    ratios = [0.2, 0.6, 0.91, 0.99, 1.0, 1.01, 1.0, 0.98]
    _, monitor, rows = _run(ratios)
    with_status = rows + [{"step": 80, "status": "finished", "stability_ratio": 5.0}]
    assert eos.replay(with_status, RULE) == eos.update(monitor, 80, 5.0, RULE)
    # A run stopped by its hold stops at the tracked step the hold was met; its status row
    # repeats that step's measurement, which counts once.
    repeat = rows + [{**rows[-1], "status": "finished", "stop_reason": "eos_hold"}]
    assert eos.replay(repeat, RULE) == monitor
    # A status row without tracking (e.g. diverged) changes nothing.
    assert eos.replay(rows + [{"step": 80, "status": "diverged"}], RULE) == monitor
    incremental = eos.EosMonitor()
    for row in rows:
        incremental = eos.update(incremental, row["step"], row["stability_ratio"], RULE)
    assert incremental == monitor


def test_bad_rules_are_refused():
    for kwargs in ({"band": (1.1, 0.9)}, {"band": (0.0, 1.0)}, {"threshold": 0.0},
                   {"window": 0}):
        with pytest.raises(ValueError):
            eos.EosRule(**kwargs)
