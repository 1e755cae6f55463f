"""The multi-seed layout of `experiments/subspace.py --seeds`: seed folders, resume, outputs.

WORKDIR/seed_<s>/ holds one complete single-seed subspace experiment each (its
experiment.json, written last, marks it finished); WORKDIR/c4_summary.json,
verdict.md and loss_seeds.png judge C4 across them (`lossland.ablation.c4_summary`).
Nothing here reads flags: `experiments/subspace.py` passes what it parsed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lossland import ablation, plots, records
from lossland.config import ConfigError

SEED_DIR = re.compile(r"seed_\d+")
OUTPUTS = ("c4_summary.json", "verdict.md", "loss_seeds.png")


def parse_seeds(values: list[str], seed_given: int | None) -> list[int]:
    """--seeds as distinct integers (their range is each run's --seed check)."""
    try:
        seeds = [int(v) for v in values]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds={','.join(values)}: give distinct integers, e.g. "
                          "--seeds=0,1,2")
    if seed_given is not None:
        raise ConfigError(f"--seed={seed_given} and --seeds={','.join(values)} are exclusive: "
                          "--seeds sets each run's seed. Drop --seed.")
    return seeds


def finished_seeds(root: Path, identities: dict[int, dict]) -> set[int]:
    """The seeds whose experiment is complete in root/seed_<s>/. Refuses (WorkdirError) a
    root that holds anything else, or a finished seed whose experiment.json differs from
    its `identities[seed]` (the settings it must have been run with; "start" is the kind)."""
    if root.exists() and not root.is_dir():
        raise records.WorkdirError(f"--workdir={root} exists and is not a directory; choose "
                                   "another path.")
    foreign = [p.name for p in (root.iterdir() if root.is_dir() else [])
               if not (p.is_dir() and SEED_DIR.fullmatch(p.name)) and p.name not in OUTPUTS]
    if foreign:
        raise records.WorkdirError(f"--seeds: --workdir={root} holds {sorted(foreign)[:5]}, "
                                   "not a multi-seed subspace experiment. Pass --overwrite to "
                                   "replace its records, or choose a new --workdir.")
    finished = set()
    for seed, identity in identities.items():
        path = root / f"seed_{seed}" / "experiment.json"
        if path.exists():
            old = json.loads(path.read_text())
            old["start"] = old["start"]["kind"]
            changed = {key: (old.get(key), value) for key, value in identity.items()
                       if old.get(key) != value}
            if changed:
                raise records.WorkdirError(
                    f"{path.parent} is finished with other settings ("
                    + "; ".join(f"{key}: {a} there, {b} now" for key, (a, b) in changed.items())
                    + "). Rerun with its settings, pass --overwrite, or choose a new --workdir.")
            finished.add(seed)
    return finished


def read_finished(folder: Path) -> tuple[dict, dict[str, list[dict]]]:
    """A finished seed's experiment.json and its variants' metrics rows."""
    experiment = json.loads((folder / "experiment.json").read_text())
    return experiment, {name: records.read_metrics(folder / "variants" / name)
                        for name in experiment["variants"]}


def write_outputs(root: Path, seeds: list[int], experiments: list[dict],
                  runs_by_seed: dict[int, dict[str, list[dict]]], title: str) -> dict:
    """c4_summary.json, verdict.md and loss_seeds.png in root; returns the summary."""
    summary = ablation.c4_summary(seeds, experiments)
    records.write_json_atomic(root / "c4_summary.json", summary)
    plots.plot_seed_loss_curves(runs_by_seed, root / "loss_seeds.png",
                                f"{summary['setting']}; {title}")
    (root / "verdict.md").write_text(ablation.seeds_verdict_markdown(summary, "loss_seeds.png"))
    return summary
