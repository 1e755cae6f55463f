"""The dataset-size sweep: scaling fits, verdicts that follow the numbers, and the smoke preset."""

import json
import re

import numpy as np
import pytest

from conftest import requires_fashion_mnist, run_module
from experiments import sweep_n
from lossland import eos, fits, records, scaling, verdicts

SETTINGS = dict(num_bootstrap=1000, confidence=0.95, lr=0.05, probe_s_max=0.05,
                eos_threshold=0.9, hold_steps=100, max_steps=1000, dataset=["mnist1d"],
                model="mlp", depth=2, width=256, losses=["mse"], activations=["relu", "tanh"],
                n_values=[250, 500, 1000, 2000, 4000, 8000], seeds=[0, 1, 2],
                probe_points=21, num_random_directions=1)
RELU, TANH = "mnist1d/mlp/mse/relu", "mnist1d/mlp/mse/tanh"


def _group(summary, name):
    return next(g for g in summary["groups"] if g["group"] == name)


def test_fit_scaling_recovers_exponent_and_interval():
    rng = np.random.default_rng(0)
    n = np.array([250, 500, 1000, 2000, 4000, 8000])
    growing = 3.0 * n[:, None] ** 0.4 * np.exp(0.05 * rng.normal(size=(6, 3)))
    fit = fits.fit_scaling(n, growing, num_bootstrap=2000)
    assert fit["slope"] == pytest.approx(0.4, abs=0.03)
    assert 0 < fit["ci_low"] < 0.4 < fit["ci_high"]
    assert fit["tail_n_min"] == 1000 and fit["tail_ci_low"] > 0
    flat = 2.0 * np.exp(0.05 * rng.normal(size=(6, 3)))
    fit = fits.fit_scaling(n, flat, num_bootstrap=2000)
    assert fit["ci_low"] < 0 < fit["ci_high"]
    # Exponents (may be ≤ 0) are fitted on a linear axis against log10 N.
    exps = -0.1 * np.log10(n)[:, None] + 1.0 + 0.01 * rng.normal(size=(6, 3))
    fit = fits.fit_scaling(n, exps, scale="linear", num_bootstrap=2000)
    assert fit["slope"] == pytest.approx(-0.1, abs=0.02) and fit["ci_high"] < 0
    # One seed: a slope but no interval; one size: nothing.
    one_seed = fits.fit_scaling(n, growing[:, :1])
    assert np.isfinite(one_seed["slope"]) and np.isnan(one_seed["ci_low"])
    assert np.isnan(fits.fit_scaling(n[:1], growing[:1])["slope"])


def _synthetic_rows(rng):
    """Sweep rows where the max gradient grows as N^0.5 for relu and is flat for tanh."""
    rows = []
    for activation, power in (("relu", 0.5), ("tanh", 0.0)):
        for n in SETTINGS["n_values"]:
            for seed in SETTINGS["seeds"]:
                noise = np.exp(0.05 * rng.normal())
                point = scaling.GridPoint("mnist1d", "mse", activation, n, seed)
                rows.append({"name": point.name, "group": point.group, "dataset": "mnist1d",
                             "model": "mlp", "loss": "mse", "activation": activation, "n": n,
                             "seed": seed, "status": "finished", "stop_reason": "eos_hold",
                             "at_eos": True, "eos_label": "at_eos",
                             "probe_grad_excess": 1.1 * n ** power * noise,
                             "probe_max_grad_norm": 2.0 * n ** power * noise,
                             "probe_v1_slope_exponent": 1.0, "probe_v1_curvature_exponent": 0.0,
                             "probe_v1_quadratic_ratio": 1.0,
                             "probe_max_curvature": 40.0 * noise, "grad_norm": 0.5 * noise,
                             "valley_distance_late": 0.002 * noise,
                             "valley_distance_late_random": 0.04 * noise,
                             "valley_distance_late_v1init": 0.03 * noise,
                             "chi_1_late": 0.9, "alignment_late_random": 1e-4 * noise,
                             "alignment_late_v1init": 0.05 * noise,
                             "valley_distance_init": 0.05, "valley_init_at_edge": True,
                             "valley_late_edge_fraction": 0.0,
                             "valley_distance_steps_late": 0.5 * noise,
                             "oscillating_count_late": 4, "oscillating_fraction_late": 1.0,
                             "chi_1_oscillating": 0.9,
                             "alignment_oscillating_random": 1e-4 * noise,
                             "alignment_oscillating_v1init": 0.05 * noise})
    return rows


def test_verdict_follows_the_numbers():
    summary = scaling.summarize(_synthetic_rows(np.random.default_rng(1)), SETTINGS)
    relu = _group(summary, RELU)["quantities"]["probe_max_grad_norm"]
    tanh = _group(summary, TANH)["quantities"]["probe_max_grad_norm"]
    assert relu["ci_low"] > 0 and tanh["ci_low"] < 0 < tanh["ci_high"]
    text = verdicts.c1_verdict(summary)
    relu_part, tanh_part = text.split("**mnist1d / mlp / mse / tanh**")
    assert re.search(r"grows as N\^0\.(49|50|51) ", relu_part)
    assert "interval excludes 0" in relu_part
    assert verdicts.C1_READING_TEXT["growing"] in relu_part
    first_tanh_line = tanh_part.splitlines()[1]
    assert "no resolved trend" in first_tanh_line and "interval includes 0" in first_tanh_line
    assert verdicts.C1_READING_TEXT["flat"] in first_tanh_line
    assert "nearest to a smooth valley" in relu_part and "sharpness alone predicts" in relu_part
    c2 = verdicts.c2_verdict(summary)
    assert "C2 verdict **for**" in c2 and re.search(r"= 0\.5\d* GD step lengths", c2)
    assert "shrank" in c2
    assert "'close': True" in c2 and "rule version 2" in c2
    # Swap the roles: the verdict must swap with them.
    swapped = [dict(r, activation={"relu": "tanh", "tanh": "relu"}[r["activation"]],
                    group="mnist1d/mlp/mse/" + {"relu": "tanh", "tanh": "relu"}[r["activation"]])
               for r in _synthetic_rows(np.random.default_rng(1))]
    text = verdicts.c1_verdict(scaling.summarize(swapped, SETTINGS))
    tanh_part = text.split("**mnist1d / mlp / mse / tanh**")[1]
    assert re.search(r"grows as N\^0\.(49|50|51) ", tanh_part.splitlines()[1])


def test_verdict_helpers_state_the_interval_plainly():
    assert verdicts.interval_sign(0.1, 0.3) == "positive"
    assert verdicts.interval_sign(-0.3, -0.1) == "negative"
    assert verdicts.interval_sign(-0.1, 0.3) == "includes_zero"
    assert verdicts.interval_sign(float("nan"), 0.3) == "undetermined"
    text = verdicts.describe_slope(0.41, 0.30, 0.52)
    assert text == "grows as N^0.41 [0.30, 0.52]; the 95% interval excludes 0"
    assert "includes 0" in verdicts.describe_slope(0.02, -0.05, 0.09)
    assert "−0.05" in verdicts.describe_slope(0.02, -0.05, 0.09)
    assert "per decade" in verdicts.describe_slope(-0.2, -0.3, -0.1, scale="linear")
    assert [verdicts.exponent_reading(e) for e in (0.98, 0.02, -0.5, float("nan"))] == [
        "a smooth valley", "a kink", "a diverging gradient", "undetermined"]
    reading, _ = verdicts.describe_trend({"slope": 0.3, "ci_low": 0.2, "ci_high": 0.4,
                                          "tail_slope": 0.0, "tail_ci_low": -0.1,
                                          "tail_ci_high": 0.1, "tail_n_min": 2000})
    assert reading == "unresolved"


def test_late_window_starts_at_entry_into_the_edge_of_stability():
    rule = eos.EosRule(threshold=0.9, band=(0.9, 1.1), window=1)
    rows = [{"step": 0, "stability_ratio": 0.5, "valley_distance": 0.05},
            {"step": 10, "stability_ratio": 0.95, "valley_distance": 0.02},
            {"step": 20, "stability_ratio": 0.8, "valley_distance": 0.03},
            {"step": 30, "stability_ratio": 0.92, "valley_distance": 0.004},
            {"step": 40, "stability_ratio": 0.97, "valley_distance": 0.002},
            {"step": 40, "status": "finished", "stability_ratio": 0.97, "valley_distance": 0.003}]
    entry, window = scaling.late_window(rows, rule)
    assert entry == 10 and [r["valley_distance"] for r in window] == [0.02, 0.03, 0.004, 0.002,
                                                                       0.003]
    # Never below the threshold first (a catapult start): never entered, last quarter.
    entry, window = scaling.late_window([dict(r, stability_ratio=1.5) for r in rows], rule)
    assert entry is None and [r["valley_distance"] for r in window] == [0.002, 0.003]


def test_fits_use_only_runs_at_the_edge_of_stability_and_few_sizes_are_inconclusive():
    rows = _synthetic_rows(np.random.default_rng(2))
    full = scaling.summarize(rows, SETTINGS)
    relu = _group(full, RELU)
    assert relu["runs_total"] == relu["runs_at_eos"] == 18 and relu["sizes_at_eos"] == 6
    assert relu["verdict"] == "for"                     # N^0.5 growth: consistent with C1
    assert _group(full, TANH)["verdict"] == "against"   # flat
    # 0.5 step lengths ≤ 1, 0.002 ≤ 0.5 × 0.04 and 0.03 (controls), 0.5 × 0.9 ≥ 1e-4 and 0.05.
    assert relu["c2_verdict"] == "for" and all(relu["c2"]["checks"].values())
    # A control direction as near to the floor as v1: attraction does not beat it.
    near = [dict(r, valley_distance_late_v1init=0.002) for r in rows]
    checks = _group(scaling.summarize(near, SETTINGS), RELU)["c2"]["checks"]
    assert checks == {"close": True, "nearer_than_controls": False,
                      "aligned_while_oscillating": True}
    assert _group(scaling.summarize(near, SETTINGS), RELU)["c2_verdict"] == "inconclusive"
    # Only the two smallest N held the edge of stability: they are the only ones fitted, and
    # two sizes cannot decide.
    few = [dict(r, at_eos=r["n"] <= 500, eos_label="at_eos" if r["n"] <= 500 else "above_eos")
           for r in rows]
    summary = scaling.summarize(few, SETTINGS)
    relu = _group(summary, RELU)
    assert relu["runs_total"] == 18 and relu["runs_at_eos"] == 6 and relu["sizes_at_eos"] == 2
    assert relu["runs_above_eos"] == 12
    assert relu["quantities"]["probe_max_grad_norm"]["all_n"] == [250, 500]
    assert relu["verdict"] == "inconclusive" and relu["c2_verdict"] == "inconclusive"
    text = verdicts.c1_verdict(summary)
    assert "C1 verdict **inconclusive**" in text and "6 of 18 runs held" in text
    assert "fewer than 3 sizes N" in text
    assert "6/18 runs at the edge of stability" in verdicts.c2_verdict(summary)


# One activation keeps the test short; each dataset's arm still has 3 sizes × 2 seeds.
SMOKE = ["--preset=smoke", "--activations=relu", "--progress=false"]
FASHION_RELU = "fashion_mnist/mlp/mse/relu"


@pytest.mark.slow   # 12 runs on two datasets, about 100 s on 2 cores (issue 22)
@requires_fashion_mnist
def test_smoke_sweep_end_to_end_and_rerun(tmp_path):
    workdir = tmp_path / "sweep"
    result = run_module("experiments.sweep_n", *SMOKE, f"--workdir={workdir}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = records.read_metrics(workdir / "sweep.jsonl")
    points = sweep_n.grid({**sweep_n.PRESETS["smoke"], "activations": ["relu"],
                           "losses": ["mse"]})
    assert [r["name"] for r in rows] == [p.name for p in points]
    # The smoke preset covers two datasets (issue 14), each with its own arm.
    assert {r["dataset"] for r in rows} == {"mnist1d", "fashion_mnist"}
    hold_steps = sweep_n.PRESETS["smoke"]["hold_steps"]
    for row in rows:
        # Every smoke run enters the edge of stability and holds it for hold_steps.
        assert row["status"] == "finished" and row["stop_reason"] == "eos_hold", row
        assert row["at_eos"] and row["eos_entry_step"] is not None, row
        assert row["held_steps"] >= hold_steps, row
        for key in ("grad_norm", "valley_distance", "probe_max_grad_norm", "probe_max_curvature",
                    "probe_v1_slope_exponent", "lambda1", "probe_grad_excess"):
            assert isinstance(row[key], float) and np.isfinite(row[key]), (key, row[key])
        # C1 rule version 2's quantity, from the run's own final numbers.
        assert row["probe_grad_excess"] == pytest.approx(
            row["probe_max_grad_norm"] / (row["grad_norm"] + row["lambda1"] * row["probe_s_max"]))
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["c1_rule"] == {"version": 2, "primary": "probe_grad_excess"}
    assert sorted(g["group"] for g in summary["groups"]) == sorted([RELU, FASHION_RELU])
    for group in summary["groups"]:
        # Every smoke run reaches and holds the edge of stability.
        assert group["runs_total"] == group["runs_at_eos"] == 6, group
        assert group["sizes_at_eos"] == 3 and group["verdict"] in ("for", "against", "inconclusive")
    for name, sizes in ((RELU, [64, 96, 128]), (FASHION_RELU, [256, 512, 1024])):
        fit = _group(summary, name)["quantities"]["probe_max_grad_norm"]
        assert fit["n"] == sizes and np.isfinite(fit["slope"]) and np.isfinite(fit["ci_low"])
    for key in ("grad_norm", "probe_max_grad_norm", "probe_max_curvature", "valley_distance",
                "probe_grad_excess"):
        assert (workdir / "plots" / f"{key}.png").stat().st_size > 5000
    assert (workdir / "plots" / "valley_distance_vs_step.png").exists()
    verdict = (workdir / "verdict.md").read_text()
    assert "## C1" in verdict and "## C2" in verdict and "interval" in verdict
    assert verdict == verdicts.sweep_verdict(summary)

    # A run that lost its final status row (interrupted) is resumed; the rest are skipped.
    metrics = workdir / "runs" / points[0].name / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines[:-1]))
    again = run_module("experiments.sweep_n", *SMOKE, f"--workdir={workdir}", timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count(": skipped (finished)") == len(points) - 1
    assert f"{points[0].name}: resumed" in again.stderr
    assert records.read_metrics(workdir / "sweep.jsonl")[0]["status"] == "finished"


def _held_run(run_dir, hold_from=20, last=200, every=20):
    """metrics.jsonl of a run below 0.9 at step 0, at λ1·η/2 = 1.0 from hold_from on."""
    rows = [{"step": step, "stability_ratio": 0.5 if step < hold_from else 1.0}
            for step in range(0, last, every)]
    rows.append({"step": last, "status": "finished", "stop_reason": "eos_hold",
                 "stability_ratio": 1.0})
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def test_each_arm_has_its_own_model_settings_and_hold(tmp_path):
    settings = sweep_n.validate_settings({**sweep_n.PRESETS["full"], "eos_threshold": 0.9,
                                          "confidence": 0.95, "eos_band": [0.9, 1.1],
                                          "eos_window": 5, "data_dir": None})
    groups = {p.group for p in sweep_n.grid(settings)}
    assert {"fashion_mnist/mlp/mse/relu", "fashion_mnist/cnn/mse/relu"} <= groups
    cnn = next(p for p in sweep_n.grid(settings) if p.model == "cnn")
    mlp = next(p for p in sweep_n.grid(settings) if p.dataset == "fashion_mnist"
               and p.model == "mlp")
    configs = [sweep_n.run_config(p, settings, tmp_path) for p in (cnn, mlp)]
    assert [(c.model, c.lr, c.depth) for c in configs] == [("cnn", 0.03, 2), ("mlp", 0.11, 4)]
    vit = sweep_n.run_config(next(p for p in sweep_n.grid(settings) if p.model == "vit"),
                             settings, tmp_path)   # an arm's family settings reach its runs
    assert (vit.dataset, vit.lr, vit.width, vit.patch_size) == ("mnist1d", 0.06, 32, 4)
    # The quick preset holds its Fashion-MNIST arm 100 steps and MNIST-1D 200: the same
    # records (entered at step 20, holding from step 100, stopped at 200) are at the edge
    # of stability for the first and not for the second.
    quick = {**sweep_n.PRESETS["quick"], "eos_threshold": 0.9}
    run_dir = _held_run(tmp_path / "run")
    fashion = next(p for p in sweep_n.grid(quick) if p.dataset == "fashion_mnist")
    mnist1d = next(p for p in sweep_n.grid(quick) if p.dataset == "mnist1d")
    as_fashion, as_mnist1d = (scaling.run_row(p, run_dir, quick) for p in (fashion, mnist1d))
    assert as_fashion["held_steps"] == as_mnist1d["held_steps"] == 100
    assert as_fashion["at_eos"] and not as_mnist1d["at_eos"]
    # --model=cnn keeps the CNN's arm (its width, depth and η), not the first one.
    full_fashion = sweep_n.PRESETS["full"]["per_dataset"]["fashion_mnist"]
    assert sweep_n._without_keys(full_fashion, ["model"], "cnn") == [
        {"width": 32, "depth": 2, "lr": 0.03, "activations": ["relu"]}]
    # Two arms of one dataset must train different models.
    with pytest.raises(ValueError, match="same model"):
        scaling.dataset_arms({**settings, "per_dataset": {"mnist1d": [{}, {}]}}, "mnist1d")


def test_activations_flag_selects_the_arms_that_pin_one():
    """--activations=relu on the decade preset runs the teacher's ReLU arm (η = 0.3) and
    leaves out its tanh arm (η = 0.5), rather than running ReLU at the tanh arm's η; an
    activation no arm pins replaces every arm's."""
    teacher = sweep_n.PRESETS["decade"]["per_dataset"]["teacher"]
    kept = sweep_n._without_keys(teacher, ["activations"], "mlp", ["relu"])
    assert [(arm["arm"], arm["lr"], arm["activations"]) for arm in kept] == [
        ("mlp_relu", 0.3, ["relu"])]
    kept = sweep_n._without_keys(teacher, ["activations"], "mlp", ["relu", "gelu"])
    assert [arm["activations"] for arm in kept] == [["relu"]]
    replaced = sweep_n._without_keys(teacher, ["activations"], "mlp", ["gelu"])
    assert len(replaced) == 2 and not any("activations" in arm for arm in replaced)
    # MNIST-1D: the main arm pins none (it takes the flag); the η-scan arms pin ReLU.
    mnist1d = sweep_n.PRESETS["decade"]["per_dataset"]["mnist1d"]
    assert [arm["arm"] for arm in sweep_n._without_keys(mnist1d, ["activations"], "mlp",
                                                        ["tanh"])] == ["mlp"]


def test_full_preset_has_resnet_arms_with_and_without_batchnorm(tmp_path):
    """Two arms of one model (`arm` names): --dry_run lists both, with their own settings."""
    settings = sweep_n.validate_settings({**sweep_n.PRESETS["full"], "eos_threshold": 0.9,
                                          "confidence": 0.95, "eos_band": [0.9, 1.1],
                                          "eos_window": 5, "data_dir": None})
    points = sweep_n.grid(settings)
    configs = [sweep_n.run_config(p, settings, tmp_path) for p in points]
    resnet = [(p, c) for p, c in zip(points, configs) if c.model == "resnet"]
    assert {(p.arm_name, c.norm, c.lr, c.chunk_size) for p, c in resnet} == {
        ("resnet", "none", 0.15, 4096), ("resnet_bn", "batch", 0.14, 500)}
    assert all(c.n_train % c.chunk_size == 0 for p, c in resnet if c.norm == "batch")
    assert len({c.workdir for c in configs}) == len(configs)   # every run its own directory
    # --dry_run, as a user runs it: one line per arm, nothing written.
    workdir = tmp_path / "sweep"
    listed = run_module("experiments.sweep_n", "--preset=full", "--dry_run",
                        f"--workdir={workdir}", timeout=120)
    assert listed.returncode == 0, listed.stderr[-2000:]
    lines = listed.stdout.splitlines()
    assert any(line.startswith("mnist1d/resnet: resnet 8×8, chunk 4096, η = 0.15")
               for line in lines), lines
    assert any(line.startswith("mnist1d/resnet_bn: resnet 8×8 norm=batch, chunk 500, η = 0.14")
               for line in lines), lines
    assert listed.stdout.strip() == sweep_n.describe_grid(settings, points)
    assert not workdir.exists()
    # A BatchNorm arm whose chunk does not divide an N is refused, naming the flag.
    bn = next(p for p, c in resnet if c.norm == "batch")
    odd = {**settings, "per_dataset": {"mnist1d": [{"arm": "resnet_bn", "model": "resnet",
                                                    "norm": "batch", "chunk_size": 300}]}}
    with pytest.raises(sweep_n.SweepError, match="--chunk_size=300"):
        sweep_n.run_config(bn, odd, tmp_path)


def test_bad_settings_are_refused_naming_the_flag():
    base = {**sweep_n.PRESETS["smoke"], "activations": ["relu"], "losses": ["mse"],
            "eos_threshold": 0.9, "data_dir": None, "confidence": 0.95}
    for change, name in (({"activations": ["swish"]}, "activations"),
                         ({"n_values": ["0", "10"]}, "n_values"),
                         ({"seeds": ["a"]}, "seeds"), ({"losses": ["hinge"]}, "losses"),
                         ({"dataset": ["imagenet"]}, "dataset"),
                         ({"confidence": 1.5}, "confidence")):
        with pytest.raises(sweep_n.SweepError, match=f"--{name}="):
            sweep_n.validate_settings({**base, **change})
    assert sweep_n.validate_settings(base)["n_values"] == [64, 96, 128]


def test_bad_flag_fails_before_writing(tmp_path):
    workdir = tmp_path / "sweep"
    result = run_module("experiments.sweep_n", "--preset=smoke", "--activations=swish",
                        f"--workdir={workdir}", timeout=120)
    assert result.returncode == 2 and "--activations" in result.stderr, result.stderr
    assert not workdir.exists()


# C2 rule version 2 on synthetic run records: three runs' metrics.jsonl per case, read back
# through run_row (late window, step-length units, oscillating steps) and summarize.
C2_CASES = {
    # A period-2 oscillation across the floor: |s*| half a step, the last step along v1.
    "oscillating": dict(valley_distance=0.01, valley_distance_steps=0.5, disp_v1_alignment=0.95,
                        probe_v1_grad_alignment=0.95),
    # At rest on the floor (version 1's contradiction): |s*| ≈ 0, so χ_1 ≈ 0 too.
    "at_rest": dict(valley_distance=1e-8, valley_distance_steps=1e-6, disp_v1_alignment=1e-10,
                    probe_v1_grad_alignment=1e-11),
    # Far from the floor: 8 step lengths away, farther than along the controls.
    "far": dict(valley_distance=0.4, valley_distance_steps=8.0, disp_v1_alignment=0.9,
                probe_v1_grad_alignment=0.9),
}
CONTROLS = dict(probe_rand0_s_star=0.2, probe_v1init_s_star=-0.1,
                probe_rand0_grad_alignment=1e-5, probe_v1init_grad_alignment=0.02)


def _c2_run_records(case: dict) -> list[dict]:
    """A run below the edge of stability until step 100, then holding it, probed every 50."""
    rows = []
    for step in range(0, 401, 10):
        row = {"step": step, "loss": 0.1, "stability_ratio": 0.5 if step < 100 else 0.97,
               "eigenvalues": [38.8], "chi_1": case["probe_v1_grad_alignment"]}
        if step % 50 == 0:
            row.update(case, **CONTROLS, valley_at_edge=False)
            if step == 0:
                row["disp_v1_alignment"] = None
        rows.append(row)
    rows.append({**rows[-1], "status": "finished", "stop_reason": "eos_hold"})
    return rows


@pytest.mark.parametrize("name,verdict,checks", [
    ("oscillating", "for", {"close": True, "nearer_than_controls": True,
                            "aligned_while_oscillating": True}),
    ("at_rest", "for", {"close": True, "nearer_than_controls": True,
                        "aligned_while_oscillating": scaling.NOT_APPLICABLE}),
    ("far", "against", {"close": False, "nearer_than_controls": False,
                        "aligned_while_oscillating": True}),
])
def test_c2_rule_on_synthetic_records(tmp_path, name, verdict, checks):
    settings = {**SETTINGS, "activations": ["relu"], "n_values": [500, 1000, 2000],
                "seeds": [0], "eos_band": [0.9, 1.1], "eos_window": 3}
    rows = []
    for n in settings["n_values"]:
        point = scaling.GridPoint("mnist1d", "mse", "relu", n, 0)
        run_dir = tmp_path / point.name
        run_dir.mkdir()
        (run_dir / records.METRICS_FILE).write_text(
            "".join(json.dumps(r) + "\n" for r in _c2_run_records(C2_CASES[name])))
        rows.append(scaling.run_row(point, run_dir, settings))
    assert all(r["at_eos"] for r in rows)
    group = _group(scaling.summarize(rows, settings), RELU)
    assert group["c2"]["checks"] == checks
    assert group["c2_verdict"] == verdict
    expected_fraction = 1.0 if C2_CASES[name]["disp_v1_alignment"] >= 0.5 else 0.0
    assert group["c2"]["oscillating_fraction_median"] == expected_fraction
    assert group["c2"]["late_steps_median"] == pytest.approx(
        C2_CASES[name]["valley_distance_steps"])


def test_eta_scaling_of_the_late_valley_distance():
    """Three η on one setting: the late |s*| ∝ η is fitted with exponent ≈ 1; two η, none."""
    rng = np.random.default_rng(3)
    rows = []
    for lr in (0.05, 0.1, 0.2):
        for seed in (0, 1, 2):
            rows.append({"dataset": "mnist1d", "model": "mlp", "loss": "mse",
                         "activation": "relu", "n": 1024, "seed": seed, "lr": lr,
                         "status": "finished", "at_eos": True,
                         "valley_distance_late": 0.3 * lr * np.exp(0.02 * rng.normal()),
                         "valley_distance_steps_late": 0.5})
    scans = scaling.eta_scaling(rows, SETTINGS)
    assert len(scans) == 1 and scans[0]["lrs"] == [0.05, 0.1, 0.2] and scans[0]["n"] == 1024
    assert scans[0]["fit"]["slope"] == pytest.approx(1.0, abs=0.05)
    assert scans[0]["fit"]["ci_low"] > 0
    assert scaling.eta_scaling([r for r in rows if r["lr"] != 0.2], SETTINGS) == []
    summary = {"lr": 0.1, "eta_scaling": scans, "groups": []}
    assert re.search(r"goes as η\^(0\.99|1\.0)", verdicts.c2_verdict(summary))


@pytest.mark.parametrize("arm,expect", [
    ({"model": "transformer"}, "--model='transformer'"),
    ({"activations": ["swish"]}, "--activations='swish'"),
    ({"losses": ["hinge"]}, "--losses='hinge'"),
])
def test_a_preset_arm_naming_what_does_not_exist_is_refused(arm, expect):
    settings = {**sweep_n.PRESETS["smoke"], "dataset": ["mnist1d"], "confidence": 0.95,
                "per_dataset": {"mnist1d": [{}, {"arm": "bad", **arm}]}}
    with pytest.raises(sweep_n.SweepError, match=re.escape(expect)):
        sweep_n.validate_settings(settings)
    with pytest.raises(sweep_n.SweepError, match="imagenet"):
        sweep_n.validate_settings({**settings, "per_dataset": {"imagenet": {}}})


def test_dry_run_lists_every_arm_and_its_estimated_cost():
    settings = sweep_n.validate_settings({**sweep_n.PRESETS["decade"], "confidence": 0.95})
    points = sweep_n.grid(settings)
    text = sweep_n.describe_grid(settings, points)
    arms = [(d, scaling.arm_name(a)) for d in settings["dataset"]
            for a in sweep_n.dataset_arms(settings, d)]
    assert all(f"{d}/{name}:" in text for d, name in arms)
    assert f"total: {len(points)} runs" in text and "min estimated" in text
    # Interpolation of the measured cost: exact at a measured size, monotone between.
    arm = {"measured_seconds": {256: 10.0, 4096: 160.0}}
    assert sweep_n.estimated_seconds(arm, 256) == pytest.approx(10.0)
    assert sweep_n.estimated_seconds(arm, 1024) == pytest.approx(40.0)
    assert sweep_n.estimated_seconds({}, 1024) is None


def test_c1_verdict_is_decided_on_the_rules_primary_quantity():
    """C1 rule version 2 decides on the gradient excess; a summary written before it (no
    "c1_rule") is still read on max ‖∇L‖ along the probes, as it was decided."""
    rows = _synthetic_rows(np.random.default_rng(1))
    for r in rows:   # excess flat in N, max ‖∇L‖ growing (relu): the verdict follows the excess
        r["probe_grad_excess"] = 1.1 * np.exp(0.01 * np.sin(r["n"] + r["seed"]))
    summary = scaling.summarize(rows, SETTINGS)
    assert summary["c1_rule"]["primary"] == "probe_grad_excess"
    relu = _group(summary, RELU)
    assert relu["quantities"]["probe_max_grad_norm"]["ci_low"] > 0 and relu["verdict"] == "against"
    row = next(r for r in verdicts.glance_rows(summary) if r[0] == "C1" and "relu" in r[1])
    assert row[2] == "against" and row[3].startswith("max ‖∇L‖ along probes / (‖∇L‖ + λ1·s_max)")
    text = verdicts.c1_verdict(summary)
    assert "C1 rule version 2" in text
    first = text.split("**mnist1d / mlp / mse / relu**")[1].splitlines()[1]
    assert first.startswith("- max ‖∇L‖ along all probes / (‖∇L‖ + λ1·s_max)")
    old = {k: v for k, v in summary.items() if k != "c1_rule"}
    row = next(r for r in verdicts.glance_rows(old) if r[0] == "C1" and "relu" in r[1])
    assert row[3].startswith("max ‖∇L‖ along probes ∝ N^0.")


def test_single_eta_sentence_names_each_arms_eta():
    """The teacher arms run at η = 0.3 and 0.5 while the preset's top-level η is 0.2: the
    report names the arms' η."""
    from lossland import verdicts
    line, = verdicts._eta_scaling_lines({"lr": 0.2, "groups": [{"lr": 0.5}, {"lr": 0.3}]})
    assert "(0.300, 0.500)" in line and "0.200" not in line
