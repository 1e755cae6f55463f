"""Crash faults: kill -9 at any moment, then --resume finishes with the records of a straight run.

Fast here: a kill during compilation (before the first row) of a run started
with --resume (resume-or-start), the repair of a torn last line and of
checkpoints without orbax's commit marker, and resume with no checkpoint yet.
Slow: the seeded SIGKILL harness of benchmarks/faults.py on the tracked
MNIST-1D run, and the sweep killed in the middle.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from benchmarks import faults
from conftest import REPO, run_module
from lossland import checkpoints, config as config_lib, lifecycle, records, runner

FAST = ["--n_train=64", "--width=16", "--depth=1", "--log_every=1", "--noplots",
        "--track_every=3", "--track_k=2", "--lanczos_iters=12", "--checkpoint_every=5"]


def _rows(workdir):
    return faults.strip_timing(faults.read_rows(workdir / records.METRICS_FILE))


def _cfg(workdir, **changes):
    settings = dict(n_train=64, width=16, depth=1, log_every=1, plots=False, track_every=3,
                    track_k=2, lanczos_iters=12, checkpoint_every=5, steps=12,
                    workdir=str(workdir))
    return config_lib.RunConfig(**{**settings, **changes})


@pytest.mark.slow   # a real compile (no cache) and two more runs: about 25 s (issue 22)
def test_kill_during_compilation_then_same_command_finishes(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_module("experiments.train", *FAST, "--steps=12",
                      f"--workdir={straight}").returncode == 0
    command = [*FAST, "--steps=12", "--resume", f"--workdir={killed}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # This run must really compile, so that the kill lands before its first row: the
    # test run's shared compilation cache (conftest.py) would make that a race.
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    process = subprocess.Popen([sys.executable, "-m", "experiments.train", *command], cwd=REPO,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # config.json is written after the build; the first row only after the step compiled.
    alive = faults.wait_until(lambda: (killed / records.CONFIG_FILE).exists(), process, 300)
    assert alive, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / records.METRICS_FILE).exists(), "killed too late: a row was written"
    rerun = run_module("experiments.train", *command)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "from step 0" in rerun.stderr
    assert _rows(killed) == _rows(straight)


def test_torn_line_and_uncommitted_checkpoints_are_repaired_on_resume(tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert runner.run(_cfg(straight), progress=False).status == "finished"
    assert runner.run(_cfg(split, steps=10), progress=False).status == "finished"
    ckpt = split / records.CHECKPOINT_DIR
    assert checkpoints.committed_steps(split) == [5, 10]
    # What kill -9 leaves: orbax's temporary directory of a save in flight, a step
    # directory that lost its commit marker, and half of the row being written.
    shutil.copytree(ckpt / "10", ckpt / "15.orbax-checkpoint-tmp-1733300000")
    shutil.copytree(ckpt / "10", ckpt / "12")
    (ckpt / "12" / checkpoints.COMMIT_MARKER).unlink()
    metrics = split / records.METRICS_FILE
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines[:-1]) + '{"step": 10, "loss": 0.7')   # status row torn
    capsys.readouterr()
    assert runner.run(_cfg(split, resume=True), progress=False).status == "finished"
    err = capsys.readouterr().err
    assert err.count("without orbax's commit marker") == 2 and "cut a torn last line" in err
    assert sorted(p.name for p in ckpt.iterdir()) == ["10", "12"]   # 12: the new final save
    assert checkpoints.committed_steps(split) == [10, 12]
    assert _rows(split) == _rows(straight)


def test_repair_torn_last_line_cuts_only_what_is_torn(tmp_path):
    path = tmp_path / "m.jsonl"
    whole = '{"step": 0}\n{"step": 1}\n'
    for tail, cut in (("", 0), ('{"st', 4), ('{"step": 2}', 11), ('{"ste\n', 6)):
        path.write_text(whole + tail)
        assert records.repair_torn_last_line(path) == cut
        assert path.read_text() == whole
    path.write_text("")
    assert records.repair_torn_last_line(path) == 0 and path.read_text() == ""
    path.write_text('{"st')
    assert records.repair_torn_last_line(path) == 4 and path.read_text() == ""


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_at_step_0(tmp_path, capsys):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    runner.run(_cfg(straight), progress=False)
    # config.json, an empty checkpoints/ and the rows before the first checkpoint.
    killed.mkdir()
    shutil.copy(straight / records.CONFIG_FILE, killed / records.CONFIG_FILE)
    (killed / records.CHECKPOINT_DIR).mkdir()
    lines = (straight / records.METRICS_FILE).read_text().splitlines(keepends=True)
    (killed / records.METRICS_FILE).write_text("".join(lines[:4]))
    capsys.readouterr()
    assert runner.run(_cfg(killed, resume=True), progress=False).status == "finished"
    assert "starting" in capsys.readouterr().err
    assert _rows(killed) == _rows(straight)
    config = json.loads((killed / records.CONFIG_FILE).read_text())
    assert config == json.loads((straight / records.CONFIG_FILE).read_text())


def test_resume_or_start_still_refuses_a_changed_trajectory_flag(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    records.write_config(workdir, _cfg(workdir).asdict())
    before = (workdir / records.CONFIG_FILE).read_bytes()
    with pytest.raises(config_lib.ConfigError, match="--lr was 0.05, now 0.1"):
        runner.run(_cfg(workdir, resume=True, lr=0.1), progress=False)
    assert sorted(p.name for p in workdir.iterdir()) == [records.CONFIG_FILE]
    assert (workdir / records.CONFIG_FILE).read_bytes() == before
    # ensure_run (the sweeps) takes the same view of a run killed before its first checkpoint.
    skipped, cfg = lifecycle.plan_ensure_run(_cfg(workdir))
    assert skipped is None and not cfg.resume and cfg.overwrite


def test_timing_keys_agree_with_the_loop():
    # The harness compares rows without timing keys; a key the loop adds must be known here.
    assert set(faults.TIMING_KEYS) == set(runner.TIMING_KEYS)


def test_kill_plan_and_record_comparison():
    rng = np.random.default_rng(0)
    plan = faults.kill_plan(6, rng)
    assert plan[0] == "startup" and len(plan) == 6 and set(plan) == set(faults.KILL_KINDS)
    reference = [{"step": 0, "loss": 1.0, "wall_time": 1.0}, {"step": 1, "status": "finished"}]
    same = faults.compare_records(reference, [{"step": 0, "loss": 1.0, "wall_time": 9.0},
                                              {"step": 1, "status": "finished"}])
    assert same["rows_differing"] == 0 and same["same_steps"] and same["status_rows"] == 1
    changed = faults.compare_records(reference, [{"step": 0, "loss": 1.0 + 1e-16 + 1e-15},
                                                 {"step": 0, "loss": 1.0},
                                                 {"step": 1, "status": "finished"}])
    assert changed["rows_differing"] == 3 and changed["duplicated_steps"] == 1


@pytest.mark.slow
def test_fault_harness_kills_the_tracked_run_and_loses_no_row(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    report = faults.driver_faults(tmp_path, kills=5, seed=0, env=env)
    assert report["kills"] >= 5, report
    assert report["resumes"] >= 5 and report["final_returncode"] == 0, report
    assert report["rows_differing"] == 0 and report["same_steps"], report
    assert report["duplicated_steps"] == 0 and report["status_rows"] == 1, report
    assert report["final_status"] == "finished"
    assert report["torn_lines_repaired"] >= report["torn_lines_injected"] >= 1, report


@pytest.mark.slow
def test_fault_harness_kills_the_stream_run_and_loses_no_row(tmp_path):
    """--tracker=stream at every step (issue 24): killed at start-up, in training and in
    a checkpoint write, each relaunch resumes the block and shift from the checkpoint, and
    every row equals the uninterrupted run's (eigenvalues, residuals and step curvature
    included)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    report = faults.driver_faults(tmp_path, kills=3, seed=1, env=env, flags=faults.STREAM_FLAGS)
    assert report["kills"] >= 3 and report["final_returncode"] == 0, report
    assert report["rows_differing"] == 0 and report["same_steps"], report
    assert report["duplicated_steps"] == 0 and report["status_rows"] == 1, report
    assert report["rows_compared"] >= 300, report        # a row at every step


@pytest.mark.slow
def test_sweep_killed_in_the_middle_reruns_to_the_same_summary(tmp_path):
    """The smoke sweep's MNIST-1D arm (6 points), killed once the 4th has begun. Its
    Fashion-MNIST arm adds nothing to what is checked here (skip or resume per point, the
    same summary), only minutes; test_sweep_n runs both arms end to end."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    started = time.time()
    report = faults.sweep_fault(tmp_path, seed=0, env=env, extra_flags=("--dataset=mnist1d",))
    assert report["sweep_kills"] == 1, (report, time.time() - started)
    assert report["sweep_points"] == 6, report
    assert report["sweep_rerun_returncode"] == 0 and report["sweep_summary_equal"], report
    assert report["sweep_rerun_skipped"] >= 1, report
