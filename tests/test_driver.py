"""End-to-end tests of experiments/train.py: records, bad input, divergence, resume, signals."""

import json
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from conftest import REPO, run_module
from lossland import records, runner

FAST = ["--n_train=64", "--width=16", "--depth=1", "--log_every=1"]
ROW_KEYS = {"step", "loss", "accuracy", "grad_norm", "param_norm", "update_norm", "lr", "wall_time"}
TRACK_KEYS = {"eigenvalues", "residuals", "stability_ratio", "chi_1", "chi_k", "grad_norm_top",
              "grad_norm_bulk", "num_matvecs", "track_time", "tracker_time", "hvp_equivalents"}


def _finite(value):
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return isinstance(value, (int, float)) and np.isfinite(value)


def test_driver_end_to_end(tmp_path):
    workdir = tmp_path / "run"
    result = run_module("experiments.train", *FAST, "--steps=6", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr
    config = json.loads((workdir / "config.json").read_text())
    assert config["flags"]["n_train"] == 64 and "jax" in config["versions"]
    assert config["devices"] and config["start_time"]
    rows = records.read_metrics(workdir)
    metric_rows = [r for r in rows if "status" not in r]
    assert [r["step"] for r in metric_rows] == list(range(6))
    for row in metric_rows:
        assert ROW_KEYS <= set(row), set(row) ^ ROW_KEYS
        assert all(_finite(row[k]) for k in ROW_KEYS)
    assert rows[-1]["status"] == "finished" and rows[-1]["step"] == 6
    assert (workdir / "plots" / "loss_grad.png").stat().st_size > 1000
    assert "steps/s" in result.stderr


def test_tracked_rows_have_every_key(tmp_path):
    workdir = tmp_path / "run"
    result = run_module("experiments.train", *FAST, "--steps=4", "--track_every=2",
                        "--track_k=3", "--lanczos_iters=20", "--track_gn",
                        f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr
    rows = records.read_metrics(workdir)
    tracked = [r for r in rows if "eigenvalues" in r]
    assert [r["step"] for r in tracked] == [0, 2, 4]
    for row in tracked:
        assert TRACK_KEYS | {"gn_eigenvalues", "residual_eigenvalues"} <= set(row)
        assert all(_finite(row[k]) for k in TRACK_KEYS)
        assert len(row["eigenvalues"]) == 3
        assert row["eigenvalues"] == sorted(row["eigenvalues"], reverse=True)
        assert 0 <= row["chi_1"] <= row["chi_k"] <= 1 + 1e-6
    assert (workdir / "plots" / "sharpness.png").exists()


@pytest.mark.slow   # the block tracker is retired (BUILD_NOTES); its kernel stays in test_block
def test_block_tracker_every_step_agrees_with_lanczos(tmp_path):
    """--tracker=block at --track_every=1: the same eigenvalues as Lanczos, and its cost."""
    common = [*FAST, "--steps=5", "--track_every=1", "--track_k=3", "--lanczos_iters=120",
              "--lanczos_tol=1e-4"]
    runs = {}
    for tracker in ("lanczos", "block"):
        workdir = tmp_path / tracker
        result = run_module("experiments.train", *common, f"--tracker={tracker}",
                            f"--workdir={workdir}")
        assert result.returncode == 0, result.stderr
        runs[tracker] = [r for r in records.read_metrics(workdir) if "eigenvalues" in r]
    assert [r["step"] for r in runs["block"]] == list(range(6))
    for lanczos_row, block_row in zip(runs["lanczos"], runs["block"]):
        np.testing.assert_allclose(block_row["eigenvalues"], lanczos_row["eigenvalues"],
                                   rtol=1e-3)
        assert block_row["num_matvecs"] == 5 * block_row["num_block_products"]  # b = k + 2
        assert block_row["hvp_equivalents"] > 0 and block_row["tracker_time"] > 0
    # Warm starts: after the first step, no more block products than the cold first one.
    assert max(r["num_block_products"] for r in runs["block"][1:]) <= \
        runs["block"][0]["num_block_products"]


BAD_FLAGS = [
    ("--dataset=imagenet", "dataset"),
    ("--model=transformer", "model"),
    ("--activation=swish", "activation"),
    ("--optimizer=lbfgs", "optimizer"),
    ("--loss=hinge", "loss"),
    ("--n_train=0", "n_train"),
    ("--n_train=-5", "n_train"),
    ("--lr=0", "lr"),
    ("--lr=-0.1", "lr"),
    ("--steps=-1", "steps"),
    ("--chunk_size=0", "chunk_size"),
    ("--dtype=float16", "dtype"),
    ("--matmul_precision=tf32", "matmul_precision"),
    ("--tracker=power", "tracker"),
    ("--track_block_size=2", "track_block_size"),
]


# These two start a fresh interpreter per case (about 3 s of CPU each): `make test-slow`
# runs them. tests/test_bad_input.py refuses the same kinds of input through its fork
# server in `make test`, and checks more (no compilation, the folder unchanged).
@pytest.mark.slow
@pytest.mark.parametrize("flag,name", BAD_FLAGS)
def test_bad_flag_fails_before_writing(tmp_path, flag, name):
    workdir = tmp_path / "run"
    result = run_module("experiments.train", flag, f"--workdir={workdir}", timeout=120)
    assert result.returncode != 0
    assert f"--{name}" in result.stderr, result.stderr
    assert not workdir.exists()


@pytest.mark.slow
def test_impossible_sizes_and_missing_data_fail_before_writing(tmp_path):
    workdir = tmp_path / "run"
    for args, expected in ((["--dataset=fashion_mnist", "--n_train=70000"], "60000"),
                           (["--dataset=mnist", f"--data_dir={tmp_path}/none"], "mnist"),
                           (["--optimizer=sgd", "--n_train=10", "--batch_size=20"], "batch_size")):
        result = run_module("experiments.train", *args, f"--workdir={workdir}", timeout=120)
        assert result.returncode != 0 and expected in result.stderr, result.stderr
        assert not workdir.exists()


def test_existing_workdir_is_refused_without_overwrite(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "keep.txt").write_text("precious")
    result = run_module("experiments.train", *FAST, "--steps=2", f"--workdir={workdir}")
    assert result.returncode != 0
    assert "--overwrite" in result.stderr and "--resume" in result.stderr
    assert sorted(p.name for p in workdir.iterdir()) == ["keep.txt"]


def _strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in runner.TIMING_KEYS} for r in rows]


def test_resume_equals_uninterrupted_run(tmp_path):
    common = [*FAST, "--track_every=3", "--track_k=2", "--lanczos_iters=12",
              "--checkpoint_every=10"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_module("experiments.train", *common, "--steps=20",
                      f"--workdir={straight}").returncode == 0
    assert run_module("experiments.train", *common, "--steps=10",
                      f"--workdir={split}").returncode == 0
    resumed = run_module("experiments.train", *common, "--steps=20", "--resume",
                         f"--workdir={split}")
    assert resumed.returncode == 0, resumed.stderr
    assert _strip_timing(records.read_metrics(straight)) == \
        _strip_timing(records.read_metrics(split))


@pytest.mark.slow   # test_bad_input's resume-*-changed cases refuse the same in make test
def test_resume_with_changed_flags_is_refused(tmp_path):
    workdir = tmp_path / "run"
    assert run_module("experiments.train", *FAST, "--steps=2",
                      f"--workdir={workdir}").returncode == 0
    result = run_module("experiments.train", *FAST, "--steps=4", "--lr=0.1", "--resume",
                        f"--workdir={workdir}")
    assert result.returncode != 0 and "--lr" in result.stderr


def test_divergence_stops_with_status_and_message(tmp_path):
    workdir = tmp_path / "run"
    result = run_module("experiments.train", *FAST, "--steps=200", "--lr=1e4",
                        "--track_every=1", "--track_k=1", "--lanczos_iters=10",
                        "--checkpoint_every=1", f"--workdir={workdir}")
    assert result.returncode == runner.EXIT_CODES["diverged"]
    assert "diverged at step" in result.stderr and "2/λ1" in result.stderr
    rows = records.read_metrics(workdir)
    assert rows[-1]["status"] == "diverged"
    assert rows[-1]["step"] < 200
    checkpoints = [p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert checkpoints and max(map(int, checkpoints)) <= rows[-1]["step"]


def test_sigterm_leaves_resumable_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "experiments.train", *FAST, "--steps=1000000",
         "--checkpoint_every=0", f"--workdir={workdir}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or metrics.stat().st_size < 2000):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == runner.EXIT_CODES["interrupted"], stderr
    rows = records.read_metrics(workdir)
    assert rows[-1]["status"] == "interrupted"
    stop = rows[-1]["step"]
    assert (workdir / "checkpoints" / str(stop)).exists()
    resumed = run_module("experiments.train", *FAST, f"--steps={stop + 3}", "--resume",
                         f"--workdir={workdir}")
    assert resumed.returncode == 0, resumed.stderr
    steps = [r["step"] for r in records.read_metrics(workdir) if "status" not in r]
    assert steps == list(range(stop + 3))  # nothing duplicated, nothing missing


def test_reader_skips_partial_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = records.read_metrics(path)
    assert [r["step"] for r in rows] == [0, 1]
    assert any("partial last line" in str(w.message) for w in caught)
    path.write_text('{"step": 0}\n{"ste\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        records.read_metrics(path)
