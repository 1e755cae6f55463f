"""Fault harness: SIGKILL a tracked driver run (and a sweep) at seeded moments, resume, compare.

    python -m benchmarks.faults --out F.json            # 6 kills of the driver, 1 of the sweep
    python -m benchmarks.faults --kills=8 --seed=3 --no-sweep --out F.json
    python -m benchmarks.faults --stream --no-sweep     # the stream tracker at every step

The driver run is MNIST-1D n=300, MLP 2×64, GD, 300 steps, --track_every=10,
--checkpoint_every=50. Every launch uses the same command line, with
--resume (resume-or-start): the first launch starts the run, each relaunch
after a kill continues it. The kills, seeded, come
  * at start-up: within the first seconds, before the launch wrote a row
    (during compilation; the first launch is always killed so);
  * during a checkpoint write: the harness polls checkpoints/ for orbax's
    temporary `*.orbax-checkpoint-tmp*` directory and kills as soon as it appears;
  * during training: after a seeded number of new rows, plus a seeded delay
    (most of the time is spent in tracked steps).
A kill -9 rarely lands inside the few microseconds of a row write, so every
second kill also leaves a torn last line the way a kill mid-write would: a
cut prefix of the row the run was about to write (taken from the
uninterrupted reference run). Resume must repair it and say so.

At the end the records are compared with an uninterrupted run, timing keys
aside: equal rows, the same steps, no duplicated step, no torn line, final
status `finished`. The sweep part runs `experiments.sweep_n --preset=smoke`
once uninterrupted and once killed in the middle and rerun with the same
command, and compares the two summary.json files.

Prints and writes (--out) one JSON report: kills, resumes, rows_compared,
rows_differing (0 when nothing is lost), torn_lines_repaired, ...
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# = lossland.loop.TIMING_KEYS (no JAX import here; tests/test_faults.py checks they agree)
TIMING_KEYS = ("wall_time", "track_time", "tracker_time", "hvp_equivalents")
TMP_DIR_MARK = ".orbax-checkpoint-tmp"      # = lossland.checkpoints.TMP_DIR_MARK
DRIVER_FLAGS = ("--dataset=mnist1d", "--n_train=300", "--width=64", "--steps=300",
                "--track_every=10", "--checkpoint_every=50", "--noplots")
# The stream tracker (--tracker=stream) at every step: its block and shift are part of the
# checkpoint, so a killed run must resume to the same every-step rows (issue 24).
STREAM_FLAGS = ("--dataset=mnist1d", "--n_train=300", "--width=64", "--steps=300",
                "--tracker=stream", "--track_every=1", "--track_k=3",
                "--stream_check_every=100", "--checkpoint_every=50", "--noplots")
SWEEP_FLAGS = ("--preset=smoke", "--activations=relu", "--progress=false")
KILL_KINDS = ("startup", "checkpoint", "training")
POLL_S = 0.002
LAUNCH_TIMEOUT_S = 600


def launch(module: str, args, log_path: Path, env) -> subprocess.Popen:
    """`python -m module args` from the repo root, stdout and stderr into log_path."""
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def wait_until(predicate, process: subprocess.Popen, timeout_s: float) -> bool:
    """Polls until predicate() holds (True) or the process ends first (False)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return process.poll() is None
        if process.poll() is not None:
            return False
        time.sleep(POLL_S)
    raise TimeoutError(f"neither the condition nor the end of {process.args} within {timeout_s}s")


def sigkill(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def checkpoint_being_written(workdir: Path) -> bool:
    directory = workdir / "checkpoints"
    try:
        return any(TMP_DIR_MARK in entry.name for entry in os.scandir(directory))
    except FileNotFoundError:
        return False


def read_rows(path: Path) -> list[dict]:
    """Every line of a .jsonl file as JSON; raises on a torn or unparsable line."""
    raw = path.read_text()
    if raw and not raw.endswith("\n"):
        raise ValueError(f"{path} ends in a torn line: {raw[-60:]!r}")
    return [json.loads(line) for line in raw.splitlines()]


def strip_timing(value):
    if isinstance(value, dict):
        return {k: strip_timing(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [strip_timing(v) for v in value]
    return value


def compare_records(reference: list[dict], rows: list[dict]) -> dict:
    """Row-by-row equality (timing keys aside) and the step bookkeeping of `rows`."""
    reference, rows = strip_timing(reference), strip_timing(rows)
    steps = [r["step"] for r in rows if "status" not in r]
    compared = max(len(reference), len(rows))
    differing = sum(1 for a, b in zip(reference, rows) if a != b) + abs(len(reference) - len(rows))
    return {"rows_compared": compared, "rows_differing": differing,
            "same_steps": steps == [r["step"] for r in reference if "status" not in r],
            "duplicated_steps": len(steps) - len(set(steps)),
            "status_rows": sum(1 for r in rows if "status" in r),
            "final_status": rows[-1].get("status") if rows else None}


def tear_last_line(metrics: Path, reference: list[dict], rng) -> bool:
    """Appends a cut prefix of the row the run would write next, as a kill mid-write leaves.

    The next row is the reference row after the last complete one; a file that
    already ends torn (or holds no row yet) is left alone. Returns whether it tore.
    """
    if not metrics.exists() or not metrics.read_bytes().endswith(b"\n"):
        return False
    rows = read_rows(metrics)
    if not rows or "status" in rows[-1]:
        return False
    index = next((i for i, r in enumerate(reference) if r["step"] == rows[-1]["step"]), None)
    if index is None or index + 1 >= len(reference):
        return False
    line = json.dumps(reference[index + 1], allow_nan=False)
    with open(metrics, "a") as f:
        f.write(line[:int(rng.integers(1, len(line)))])
    return True


def kill_plan(kills: int, rng) -> list[str]:
    """The kinds of the kills in order: start-up first, then a seeded mix of all three."""
    rest = [KILL_KINDS[i % len(KILL_KINDS)] for i in range(1, kills)]
    return ["startup"] + [str(kind) for kind in rng.permutation(rest)] if kills else []


def kill_once(kind: str, process, workdir: Path, rng) -> str | None:
    """Waits for the moment of a `kind` kill and kills; returns the phase hit, or None if it ended."""
    metrics = workdir / "metrics.jsonl"
    rows_at_launch = complete_lines(metrics)
    if kind == "startup":
        delay = time.time() + float(rng.uniform(0.2, 2.5))
        alive = wait_until(lambda: time.time() >= delay or complete_lines(metrics) > rows_at_launch,
                           process, LAUNCH_TIMEOUT_S)
    elif kind == "checkpoint":
        alive = wait_until(lambda: checkpoint_being_written(workdir), process, LAUNCH_TIMEOUT_S)
    else:
        target = rows_at_launch + int(rng.integers(1, 8))
        alive = wait_until(lambda: complete_lines(metrics) >= target, process, LAUNCH_TIMEOUT_S)
        if alive:
            time.sleep(float(rng.uniform(0.0, 0.5)))
    if not alive or process.poll() is not None:
        return None
    sigkill(process)
    if checkpoint_being_written(workdir):
        return "checkpoint_write"
    return "startup" if complete_lines(metrics) == rows_at_launch else "training"


def driver_faults(root: Path, kills: int, seed: int, env, flags=DRIVER_FLAGS) -> dict:
    """Kills the tracked driver run `kills` times, resumes each time, compares with a straight
    run. `flags`: the run's command line (DRIVER_FLAGS, or STREAM_FLAGS for the stream)."""
    rng = np.random.default_rng(seed)
    reference_dir, workdir = root / "reference", root / "killed"
    straight = subprocess.run([sys.executable, "-m", "experiments.train", *flags,
                               f"--workdir={reference_dir}"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    if straight.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed:\n{straight.stderr[-3000:]}")
    reference = read_rows(reference_dir / "metrics.jsonl")
    command = (*flags, "--resume", f"--workdir={workdir}")
    phases, launches, torn_injected, logs = [], 0, 0, []
    plan = kill_plan(kills, rng)
    while True:
        log = root / f"launch{launches}.log"
        process = launch("experiments.train", command, log, env)
        launches += 1
        phase = kill_once(plan[len(phases)], process, workdir, rng) if len(phases) < len(plan) \
            else None
        if phase is None:
            process.wait(timeout=LAUNCH_TIMEOUT_S)
            logs.append(log.read_text())
            if len(phases) >= len(plan) or process.returncode != 0:
                break
            continue   # it finished before the kill: the remaining kills cannot happen
        phases.append(phase)
        logs.append(log.read_text())
        if len(phases) % 2 == 0 and tear_last_line(workdir / "metrics.jsonl", reference, rng):
            torn_injected += 1
    stderr = "\n".join(logs)
    report = {"kills": len(phases), "kill_phases": phases, "kills_planned": plan,
              "resumes": launches - 1, "final_returncode": process.returncode,
              "torn_lines_injected": torn_injected,
              "torn_lines_repaired": stderr.count("cut a torn last line"),
              "checkpoints_removed": stderr.count("without orbax's commit marker"),
              "restarts_from_step_0": stderr.count("starting " + str(workdir) + " from step 0")}
    report.update(compare_records(reference, read_rows(workdir / "metrics.jsonl")))
    return report


def sweep_fault(root: Path, seed: int, env, extra_flags=()) -> dict:
    """Kills a smoke sweep once in the middle; the rerun must end with the same summary.json.

    extra_flags go to every sweep_n launch (e.g. ("--dataset=mnist1d",): the tests run the
    MNIST-1D arm only, 6 grid points, since the kill and rerun do not depend on the data).
    """
    rng = np.random.default_rng(seed + 1)
    reference_dir, workdir = root / "sweep_reference", root / "sweep_killed"
    flags_all = (*SWEEP_FLAGS, *extra_flags)
    straight = subprocess.run([sys.executable, "-m", "experiments.sweep_n", *flags_all,
                               f"--workdir={reference_dir}"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    if straight.returncode != 0:
        raise RuntimeError(f"the uninterrupted sweep failed:\n{straight.stderr[-3000:]}")
    points = sorted(p.name for p in (reference_dir / "runs").iterdir())
    command = (*flags_all, f"--workdir={workdir}")
    process = launch("experiments.sweep_n", command, root / "sweep_launch0.log", env)
    middle = len(points) // 2 + 1   # kill once the middle point has begun
    runs = workdir / "runs"
    alive = wait_until(lambda: runs.exists() and len(list(runs.iterdir())) >= middle, process,
                       LAUNCH_TIMEOUT_S)
    if alive:
        time.sleep(float(rng.uniform(0.0, 2.0)))
        alive = process.poll() is None
    if alive:
        sigkill(process)
    rerun = subprocess.run([sys.executable, "-m", "experiments.sweep_n", *command], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    same = (rerun.returncode == 0 and
            strip_timing(json.loads((reference_dir / "summary.json").read_text())) ==
            strip_timing(json.loads((workdir / "summary.json").read_text())))
    return {"sweep_kills": int(alive), "sweep_rerun_returncode": rerun.returncode,
            "sweep_summary_equal": bool(same), "sweep_points": len(points),
            "sweep_rerun_resumed": rerun.stderr.count(": resumed"),
            "sweep_rerun_skipped": rerun.stderr.count(": skipped (finished)")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="Write the JSON report here too.")
    parser.add_argument("--kills", type=int, default=6, help="SIGKILLs of the driver run (>= 5).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the kill moments.")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false",
                        help="Skip the sweep kill.")
    parser.add_argument("--stream", action="store_true", help="Kill the stream-tracked run "
                        "(--tracker=stream at every step, STREAM_FLAGS) instead of the "
                        "Lanczos-tracked one.")
    parser.add_argument("--workdir", type=Path, help="Keep the runs here (default: a temp dir).")
    parser.add_argument("--platform", default="cpu", help="JAX_PLATFORMS of the runs; resumed "
                        "records are promised bitwise-equal on CPU.")
    args = parser.parse_args(argv)
    if args.kills < 1:
        parser.error(f"--kills={args.kills} is not allowed: at least 1 kill (the issue asks 5+).")
    env = dict(os.environ, JAX_PLATFORMS=args.platform)
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="lossland_faults_") as scratch:
        root = args.workdir or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        flags = STREAM_FLAGS if args.stream else DRIVER_FLAGS
        report = {"seed": args.seed, "driver_flags": list(flags)}
        report.update(driver_faults(root, args.kills, args.seed, env, flags))
        if args.sweep:
            report.update(sweep_fault(root, args.seed, env))
    report["total_s"] = round(time.time() - start, 1)
    report["ok"] = bool(report["rows_differing"] == 0 and report["same_steps"]
                        and report["duplicated_steps"] == 0 and report["status_rows"] == 1
                        and report["final_status"] == "finished"
                        and report["torn_lines_repaired"] >= report["torn_lines_injected"]
                        and report.get("sweep_summary_equal", True))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
