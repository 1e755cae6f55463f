"""benchmarks/memory.py and benchmarks/scaling.py at small n: they run and report sane numbers.

The memory target itself (peak(60000) − peak(5000) within 10% of the extra
dataset bytes) is checked by running the full benchmark; at small n the
allocator's noise is larger than the dataset, so nothing is asserted here
about the ratio.
"""

import json
import math

import pytest

from conftest import requires_fashion_mnist, run_module

# Both benchmarks read the real Fashion-MNIST files and take 30-60 s each on 2 cores:
# `make test-slow` runs them (issue 22).
pytestmark = pytest.mark.slow

RESULT_KEYS = {"n", "kernel", "chunk_size", "num_chunks", "padded_n", "host_dataset_bytes",
               "device_dataset_bytes", "baseline_rss_bytes", "placement_peak_bytes",
               "kernel_peak_bytes", "raw_peak_rss_bytes", "raw_ru_maxrss_bytes",
               "kernel_seconds_incl_compile", "backend", "finite"}
CHECK_KEYS = {"kernel", "n_small", "n_large", "extra_dataset_bytes", "extra_kernel_peak_bytes",
              "ratio", "within_10_percent"}


@requires_fashion_mnist
def test_memory_benchmark_reports_positive_finite_peaks(tmp_path):
    output = tmp_path / "memory.json"
    result = run_module("benchmarks.memory", "--n=250,500", "--width=32", "--chunk_size=128",
                        f"--output={output}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report == json.loads(output.read_text())
    assert report["benchmark"] == "memory" and report["dataset"] == "fashion_mnist"
    rows = report["results"]
    assert sorted((r["n"], r["kernel"]) for r in rows) == [
        (250, "grad"), (250, "hvp"), (500, "grad"), (500, "hvp")]
    for row in rows:
        assert RESULT_KEYS <= set(row), RESULT_KEYS - set(row)
        assert row["finite"] is True and row["backend"] == "cpu"
        for key in ("host_dataset_bytes", "device_dataset_bytes", "baseline_rss_bytes",
                    "placement_peak_bytes", "kernel_peak_bytes", "raw_peak_rss_bytes",
                    "raw_ru_maxrss_bytes", "kernel_seconds_incl_compile"):
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), key
            # A tiny dataset can land in pages the process already holds.
            assert row[key] >= 0 if key == "placement_peak_bytes" else row[key] > 0, (key, row[key])
        assert row["padded_n"] == row["num_chunks"] * min(128, row["n"]) >= row["n"]
        assert row["device_dataset_bytes"] == row["padded_n"] * (784 * 4 + 4 + 4)
    assert {c["kernel"] for c in report["checks"]} == {"grad", "hvp"}
    for check in report["checks"]:
        assert CHECK_KEYS <= set(check)
        assert (check["n_small"], check["n_large"]) == (250, 500)
        assert check["extra_dataset_bytes"] > 0 and math.isfinite(check["ratio"])
        assert isinstance(check["within_10_percent"], bool)
        # XLA's buffer assignment: the kernel's scratch does not grow with n.
        assert check["extra_compiled_temp_bytes"] <= 0.1 * check["extra_dataset_bytes"], check


@requires_fashion_mnist
def test_scaling_benchmark_agrees_across_devices_and_precisions(tmp_path):
    """benchmarks/scaling.py on 1 and 3 fake CPU devices (n=512 is padded on 3).

    Also its TF32 comparison: on the CPU, float32 products are float32 at any
    precision setting, so the "default precision" results equal the others.
    """
    output = tmp_path / "scaling.json"
    result = run_module("benchmarks.scaling", "--platform=cpu", "--quick", "--devices=1,3",
                        "--models=mlp", "--track_steps=0", "--compare_default_precision",
                        f"--output={output}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["results_match"] is True, report["max_relative_error"]
    assert set(report["max_relative_error"]) == {
        f"mlp/{name}" for name in ("loss", "grad", "hvp", "gnvp", "eigenvalues")}
    for count in ("1", "3"):
        entry = report["runs"][count]["workloads"]["mlp"]
        assert entry["lanczos_matvecs"] == 12 and len(entry["top_eigenvalues"]) == 3
        assert all(entry[k] > 0 for k in ("grad_s", "hvp_s", "gnvp_s", "lanczos_s"))
        errors = entry["default_precision"]["relative_error"]
        assert set(errors) == {"loss", "grad", "hvp", "gnvp"}
        assert max(errors.values()) <= 1e-6, errors
