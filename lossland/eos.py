"""The edge-of-stability criterion: the one definition every part of lossland uses.

Owns what "at the edge of stability" means for a run, from its tracked
stability ratios r_t = λ1(θ_t)·η/2 alone (MISSION.md, "Stability ratio"). The
driver's early stop (`--eos_hold_steps`), the dataset-size sweep, the subspace
experiment's warm-up, the learning-rate sweep and the report all call it. It
computes no eigenvalue and reads no file.

The rule (`EosRule`: threshold, band [lo, hi], window W):

* **Entry.** The run enters at the first tracked step t with r_t ≥ threshold
  after some earlier tracked step had r < threshold. A run that starts at or
  above the threshold (a catapult: λ1 > 2/η at initialization) enters only
  after it has first fallen below it. The entry step never changes afterwards.
* **The trailing median.** After entry, m_t is the median of the last W
  tracked ratios taken at steps ≥ the entry step (fewer while fewer exist).
* **States** of a tracked step, one of `EOS_STATES`:
    - before entry: `above` if r_t > hi, else `below`;
    - after entry: `above` if m_t > hi, `below` if m_t < lo, else `holding`
      once the window is full (W ratios since entry) and `entered` before.
  A median, not each ratio, decides after entry, because at the edge of
  stability GD oscillates with period 2 and single ratios straddle the band.
  The pinned consequence (tests/test_eos.py): a ratio alternating between
  0.85 and 1.05 with an odd W flips between `below` and `holding` with the
  majority of the window.
* **Holding** is counted in steps: `held_steps` at step t is t − the first
  step of the current unbroken run of `holding` states (0 when not holding).
  The driver stops once `held_steps ≥ --eos_hold_steps`.
* A run is **at the edge of stability** (`at_eos`) when it held for the
  required number of steps. One that is not, and whose last state is
  `above`, is labelled `above_eos` (unstable or catapulting), never "at the
  edge of stability".

`EosMonitor` is immutable and updated by the pure `update`; `replay`
rebuilds it from records, which is how a resumed run recovers it exactly:
the records of steps before a checkpoint are complete, and they hold every
tracked ratio.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, NamedTuple, Optional, Sequence

EOS_STATES = ("below", "entered", "holding", "above")
DEFAULT_THRESHOLD = 0.9
DEFAULT_BAND = (0.9, 1.1)
DEFAULT_WINDOW = 5

LABEL_AT_EOS, LABEL_ABOVE = "at_eos", "above_eos"


@dataclasses.dataclass(frozen=True)
class EosRule:
    """threshold: entry level of r; band: [lo, hi] the trailing median must stay in;
    window: how many tracked ratios the median takes (odd values avoid ties)."""
    threshold: float = DEFAULT_THRESHOLD
    band: tuple[float, float] = DEFAULT_BAND
    window: int = DEFAULT_WINDOW

    def __post_init__(self):
        lo, hi = self.band
        if not (0 < lo <= hi):
            raise ValueError(f"band={self.band}: need 0 < lo <= hi.")
        if not 0 < self.threshold:
            raise ValueError(f"threshold={self.threshold}: must be > 0.")
        if self.window < 1:
            raise ValueError(f"window={self.window}: must be >= 1.")


class EosMonitor(NamedTuple):
    """Where a run stands after the tracked steps seen so far.

    armed: a ratio below the threshold has been seen (entry needs it).
    entry_step: the step of entry, or None.
    held_since: the first step of the current unbroken `holding` stretch, or None.
    recent: the last ≤ W ratios at steps ≥ entry_step (empty before entry).
    state: the state of the last tracked step (`below` before any).
    step: the last tracked step, or None.
    """
    armed: bool = False
    entry_step: Optional[int] = None
    held_since: Optional[int] = None
    recent: tuple = ()
    state: str = "below"
    step: Optional[int] = None


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def update(monitor: EosMonitor, step: int, ratio: float, rule: EosRule) -> EosMonitor:
    """The monitor after the tracked step `step` with stability ratio `ratio`.

    A non-finite ratio (the run is diverging) counts as above the band.
    """
    lo, hi = rule.band
    ratio = float(ratio) if math.isfinite(ratio) else math.inf
    entry_step = monitor.entry_step
    if entry_step is None and monitor.armed and ratio >= rule.threshold:
        entry_step = step
    armed = monitor.armed or ratio < rule.threshold
    if entry_step is None:
        state, recent = ("above" if ratio > hi else "below"), ()
    else:
        recent = (monitor.recent + (ratio,))[-rule.window:]
        median = _median(recent)
        if median > hi:
            state = "above"
        elif median < lo:
            state = "below"
        else:
            state = "holding" if len(recent) == rule.window else "entered"
    held_since = None
    if state == "holding":
        held_since = monitor.held_since if monitor.state == "holding" else step
    return EosMonitor(armed=armed, entry_step=entry_step, held_since=held_since, recent=recent,
                      state=state, step=step)


def held_steps(monitor: EosMonitor, step: Optional[int] = None) -> int:
    """Steps the current holding stretch has lasted at `step` (default: the last tracked)."""
    if monitor.held_since is None:
        return 0
    return (monitor.step if step is None else step) - monitor.held_since


def replay(rows: Iterable[dict], rule: EosRule) -> EosMonitor:
    """The monitor after every tracked row (a row with `stability_ratio`) of `rows`, in order.

    The status row of a finished run is tracked too. At the step cap it measures the
    final params and counts like any other tracked row; a run stopped by its hold
    stops at the tracked step the hold was met, and its status row repeats that
    step's measurement, which counts once.
    """
    monitor = EosMonitor()
    for row in rows:
        if not isinstance(row.get("stability_ratio"), (int, float)):
            continue
        if monitor.step is not None and int(row["step"]) == monitor.step:
            continue
        monitor = update(monitor, int(row["step"]), row["stability_ratio"], rule)
    return monitor


def classify(steps: Sequence[int], ratios: Sequence[float], rule: EosRule) -> list[str]:
    """The state of each tracked step of a ratio sequence (for tests, plots and reports)."""
    monitor, states = EosMonitor(), []
    for step, ratio in zip(steps, ratios):
        monitor = update(monitor, int(step), ratio, rule)
        states.append(monitor.state)
    return states


def run_label(monitor: EosMonitor, hold_steps: int) -> str:
    """`at_eos` when the run held ≥ hold_steps (hold_steps > 0), `above_eos` when it ends
    above the band, else its last state (`below`, `entered` or `holding`)."""
    if hold_steps > 0 and held_steps(monitor) >= hold_steps:
        return LABEL_AT_EOS
    if monitor.state == "above":
        return LABEL_ABOVE
    return monitor.state


def run_summary(rows: Sequence[dict], rule: EosRule, hold_steps: int) -> dict:
    """What a run's records say about the edge of stability, for summaries and reports.

    Keys: eos_entry_step (or None), held_steps, eos_state (of the last tracked
    step), eos_label (`run_label`), reached_eos (entered at all), at_eos (held
    ≥ hold_steps), and the medians of λ1·η/2 over the tracked steps after entry
    and over the final holding stretch (None where empty).
    """
    monitor = replay(rows, rule)
    tracked = [(int(r["step"]), r["stability_ratio"]) for r in rows
               if isinstance(r.get("stability_ratio"), (int, float))]
    after = [ratio for step, ratio in tracked
             if monitor.entry_step is not None and step >= monitor.entry_step]
    holding = [ratio for step, ratio in tracked
               if monitor.held_since is not None and step >= monitor.held_since]
    label = run_label(monitor, hold_steps)
    return {
        "eos_entry_step": monitor.entry_step,
        "held_steps": held_steps(monitor),
        "eos_state": monitor.state,
        "eos_label": label,
        "reached_eos": monitor.entry_step is not None,
        "at_eos": label == LABEL_AT_EOS,
        "median_ratio_after_entry": _median(after) if after else None,
        "median_ratio_holding": _median(holding) if holding else None,
    }
