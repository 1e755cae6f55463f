"""One command reproduces the study: every experiment's preset, then REPORT.md.

    python -m experiments.reproduce --preset=quick            # 54 min on 2 CPU cores
    python -m experiments.reproduce --preset=smoke --workdir=/tmp/repro
    make reproduce

Experiments (each is its own absl program, run as a subprocess into
WORKDIR/<name>/, so each keeps its own flags and records):

    eos       edge-of-stability learning-rate sweep                  (claim C3)
    gn        Gauss–Newton against residual top eigenvalues          (claim C3 control)
    sweep_n   dataset-size sweep, relu/tanh × MSE                    (claims C1, C2)
    sweep_ce  the same sweep with cross-entropy (the loss control)   (claims C1, C2)
    subspace  GD, Dom-GD and Bulk-GD from the edge of stability      (claim C4)

A finished experiment leaves WORKDIR/<name>/COMPLETE.json; a rerun skips it,
and re-invokes an unfinished one, which resumes its partial runs. --overwrite
starts everything afresh. REPORT.md is rebuilt from the records every time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

from lossland import records

_SMOKE_RUN = ["--n_train=64", "--width=16", "--depth=1", "--checkpoint_every=0"]

# name -> module and arguments, per preset. Arguments are fixed here, not tuned to outcomes.
PRESETS = {
    "smoke": {
        "eos": ("experiments.eos", [*_SMOKE_RUN, "--lrs=0.2,0.4", "--lr_steps_product=6",
                                    "--track_every=5", "--track_k=2", "--lanczos_iters=12",
                                    "--log_every=5"]),
        "gn": ("experiments.train", [*_SMOKE_RUN, "--lr=0.2", "--steps=20", "--track_every=5",
                                     "--track_k=2", "--lanczos_iters=12", "--track_gn",
                                     "--log_every=5"]),
        # MNIST-1D only: the smoke sweep's Fashion-MNIST arm runs end to end in
        # tests/test_sweep_n.py; here it would add 6 runs and a need for the data files.
        "sweep_n": ("experiments.sweep_n", ["--preset=smoke", "--losses=mse",
                                            "--dataset=mnist1d"]),
        "sweep_ce": ("experiments.sweep_n", ["--preset=smoke", "--losses=cross_entropy",
                                             "--dataset=mnist1d", "--n_values=64,256"]),
        "subspace": ("experiments.subspace", ["--preset=smoke"]),
    },
    "quick": {
        "eos": ("experiments.eos", ["--lrs=0.02,0.05,0.1", "--lr_steps_product=150"]),
        "gn": ("experiments.train", ["--steps=2000", "--track_every=50", "--track_gn",
                                     "--checkpoint_every=1000"]),
        "sweep_n": ("experiments.sweep_n", ["--preset=quick", "--losses=mse"]),
        "sweep_ce": ("experiments.sweep_n", ["--preset=quick", "--losses=cross_entropy",
                                             "--dataset=mnist1d", "--lr=0.1",
                                             "--n_values=500,1000,2000",
                                             "--activations=relu"]),
        "subspace": ("experiments.subspace", ["--preset=quick"]),
    },
    # Issue 25: two decades of N on 2 CPU cores (experiments/sweep_presets.py, "decade").
    "decade": {
        "eos": ("experiments.eos", ["--lrs=0.02,0.05,0.1", "--lr_steps_product=150"]),
        "gn": ("experiments.train", ["--steps=2000", "--track_every=50", "--track_gn",
                                     "--checkpoint_every=1000"]),
        "sweep_n": ("experiments.sweep_n", ["--preset=decade", "--losses=mse"]),
        "sweep_ce": ("experiments.sweep_n", ["--preset=decade_ce"]),
        "subspace": ("experiments.subspace", ["--preset=decade", "--seeds=0,1,2"]),
    },
    "full": {
        "eos": ("experiments.eos", ["--lrs=0.01,0.02,0.05,0.1", "--lr_steps_product=300"]),
        "gn": ("experiments.train", ["--steps=4000", "--track_every=20", "--track_gn"]),
        "sweep_n": ("experiments.sweep_n", ["--preset=full", "--losses=mse"]),
        "sweep_ce": ("experiments.sweep_n", ["--preset=full", "--losses=cross_entropy",
                                             "--lr=0.1"]),
        "subspace": ("experiments.subspace", ["--preset=quick",
                                              "--variants=gd,dom,bulk,sgd,dom_sgd,bulk_sgd"]),
    },
}
EXPERIMENTS = list(PRESETS["quick"])
COMPLETE = "COMPLETE.json"

flags.DEFINE_string("workdir", "runs/reproduce", "Folder for every experiment and REPORT.md.")
flags.DEFINE_enum("preset", "quick", list(PRESETS), "smoke (tests, ~minutes), quick (54 min "
                  "on 2 CPU cores, 2026-12-06), decade (two decades of N, ~1 h on 2 CPU "
                  "cores), full (accelerators).")
flags.DEFINE_boolean("overwrite", False, "Start every experiment afresh.")
flags.DEFINE_list("only", [], f"Run only these experiments (of {EXPERIMENTS}); the report "
                  "still covers every experiment with records.")
FLAGS = flags.FLAGS


def run_experiment(name: str, module: str, args: list[str], root: Path, overwrite: bool) -> dict:
    """Runs one experiment unless complete; returns its COMPLETE record."""
    out = root / name
    marker = out / COMPLETE
    if marker.exists() and not overwrite:
        print(f"== {name}: complete, skipped ({marker})", file=sys.stderr)
        return json.loads(marker.read_text())
    if marker.exists():
        marker.unlink()
    command = [sys.executable, "-m", module, *args, f"--workdir={out}"]
    if overwrite:
        command.append("--overwrite")
    elif module == "experiments.train" and (out / records.METRICS_FILE).exists():
        command.append("--resume")
    print(f"== {name}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    start = time.time()
    result = subprocess.run(command)
    elapsed = time.time() - start
    if result.returncode != 0:
        raise RuntimeError(f"experiment {name} failed with exit code {result.returncode}; "
                           f"its records are in {out}. Rerun to resume it.")
    record = {"name": name, "command": command[1:], "wall_time_s": elapsed,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    records.write_json_atomic(marker, record)
    return record


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    unknown = [n for n in FLAGS.only if n not in EXPERIMENTS]
    if unknown:
        print(f"error: --only={','.join(FLAGS.only)}: unknown experiment(s) {unknown}; "
              f"choose from {EXPERIMENTS}", file=sys.stderr)
        return 2
    root = Path(FLAGS.workdir)
    if root.exists() and not root.is_dir():
        print(f"error: --workdir={str(root)!r} exists and is not a directory; choose another "
              "path.", file=sys.stderr)
        return 2
    root.mkdir(parents=True, exist_ok=True)
    chosen = FLAGS.only or EXPERIMENTS
    total_start = time.time()
    for name in chosen:
        module, args = PRESETS[FLAGS.preset][name]
        try:
            run_experiment(name, module, args, root, FLAGS.overwrite)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    from experiments import report  # noqa: PLC0415 (keeps --help fast)
    path = report.write_report(root, FLAGS.preset, EXPERIMENTS, time.time() - total_start)
    print(f"report: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    app.run(main)
