"""Figures drawn from the records alone (metrics.jsonl, density.jsonl, config.json).

Nothing here touches a model: any run directory, old or new, can be replotted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import matplotlib.ticker  # noqa: E402

from lossland import records, verdicts  # noqa: E402



def _lr(workdir: Path) -> float | None:
    try:
        return float(records.read_config_flags(workdir)["lr"])
    except (records.WorkdirError, KeyError, ValueError):
        return None


def _eigen_rows(rows):
    rows = [r for r in rows if isinstance(r.get("eigenvalues"), list) and r["eigenvalues"]]
    steps = np.asarray([r["step"] for r in rows])
    return steps, rows


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_loss_and_grad(rows, path: Path, title: str = "") -> Path:
    """Loss and ‖∇L‖ against step, log y."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((axes[0], "loss", "training loss"), (axes[1], "grad_norm", "‖∇L‖")):
        steps, values = records.scalar_rows(rows, key)
        positive = values > 0
        ax.plot(steps[positive], values[positive], lw=1.2)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if "grad_norm_top" in {k for r in rows for k in r}:
        for key, style in (("grad_norm_top", "--"), ("grad_norm_bulk", ":")):
            steps, values = records.scalar_rows(rows, key)
            axes[1].plot(steps, np.maximum(values, 1e-30), style, lw=1.2,
                         label={"grad_norm_top": "top-k part", "grad_norm_bulk": "bulk part"}[key])
        axes[1].legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def plot_sharpness(runs: Sequence[tuple[str, list, float | None]], path: Path,
                   title: str = "sharpness") -> Path:
    """λ1 against step for several runs, each with its 2/lr line (Cohen et al. 2021, Fig. 1)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (label, rows, lr) in enumerate(runs):
        color = colors[index % len(colors)]
        steps, eig_rows = _eigen_rows(rows)
        if len(eig_rows):
            lambda1 = [r["eigenvalues"][0] for r in eig_rows]
            ax.plot(steps, lambda1, color=color, lw=1.4 if len(steps) < 500 else 0.6,
                    label=f"λ1, {label}")
            if index == 0:
                secant = np.asarray([r.get("step_curvature", np.nan) for r in eig_rows], float)
                _zoom_every_step(ax, np.asarray(steps), np.asarray(lambda1), lr, color, secant)
        if lr:
            ax.axhline(2.0 / lr, color=color, ls="--", lw=1, alpha=0.8, label=f"2/η = {2 / lr:.3g}")
    ax.set_xlabel("step")
    ax.set_ylabel("top Hessian eigenvalue λ1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


def _zoom_every_step(ax, steps, lambda1, lr, color, secant=None, last: int = 40) -> None:
    """An inset of λ1 over the last `last` steps when it was tracked at every step
    (--tracker=stream --track_every=1): the period-2 oscillation about 2/η at the edge of
    stability is a blur at the scale of the whole run. The stream's free step curvature
    (curvature along θ_{t−1} → θ_t) is drawn at the steps' midpoints t − ½."""
    if len(steps) < 5 * last or not np.all(np.diff(steps[-last:]) == 1):
        return
    inset = ax.inset_axes([0.52, 0.08, 0.45, 0.38])
    inset.plot(steps[-last:], lambda1[-last:], color=color, lw=0.8, marker=".", ms=3)
    if secant is not None and np.isfinite(secant[-last:]).any():
        inset.plot(steps[-last:] - 0.5, secant[-last:], "x", color="0.4", ms=3,
                   label="curvature along the step")
        inset.legend(fontsize=5, loc="lower left")
    if lr:
        inset.axhline(2.0 / lr, color=color, ls="--", lw=0.8)
    inset.set_title(f"every step, last {last}", fontsize=7)
    inset.tick_params(labelsize=6)


def plot_spectrum(rows, lr: float | None, path: Path) -> Path:
    """All k tracked eigenvalues against step."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    steps, eig_rows = _eigen_rows(rows)
    eigs = np.asarray([r["eigenvalues"] for r in eig_rows])
    for j in range(eigs.shape[1]):
        ax.plot(steps, eigs[:, j], lw=1.6 if j == 0 else 0.8, alpha=1 if j == 0 else 0.6,
                label="λ1" if j == 0 else (f"λ2..λ{eigs.shape[1]}" if j == 1 else None))
    if lr:
        ax.axhline(2.0 / lr, color="k", ls="--", lw=1, label="2/η")
    for key, style, name in (("gn_eigenvalues", "-.", "Gauss–Newton λ1"),
                             ("residual_eigenvalues", ":", "residual λ1")):
        rows_k = [r for r in eig_rows if key in r]
        if rows_k:
            ax.plot([r["step"] for r in rows_k], [r[key][0] for r in rows_k], style, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("Hessian eigenvalues")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_chi(rows, path: Path) -> Path:
    """χ_1 and χ_k against step."""
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for key, label in (("chi_1", "χ_1"), ("chi_k", "χ_k")):
        steps, values = records.scalar_rows(rows, key)
        ax.plot(steps, values, lw=1.2, label=label)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of ‖g‖² in top subspace")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_layer_sharpness(rows, lr: float | None, path: Path) -> Path:
    """Each layer's λ1(H_ℓℓ) against step (--track_layers), with the full λ1, λ_min and 2/η."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    layer_rows = [r for r in rows if isinstance(r.get("layer_eigenvalues"), dict)]
    steps = [r["step"] for r in layer_rows]
    names = sorted({name for r in layer_rows for name in r["layer_eigenvalues"]})
    for name in names:
        ax.plot(steps, [r["layer_eigenvalues"].get(name, [np.nan])[0] for r in layer_rows],
                lw=1.2, label=f"λ1 of {name}")
    eig_steps, eig_rows = _eigen_rows(rows)
    if eig_rows:
        ax.plot(eig_steps, [r["eigenvalues"][0] for r in eig_rows], "k-", lw=1.6, alpha=0.5,
                label="λ1 (full Hessian)")
    steps_min, values_min = records.scalar_rows(rows, "min_eigenvalue")
    if len(steps_min):
        ax.plot(steps_min, values_min, "k:", lw=1.2, label="λ_min (full Hessian)")
    if lr:
        ax.axhline(2.0 / lr, color="k", ls="--", lw=1, label="2/η")
    ax.set_xlabel("step")
    ax.set_ylabel("top eigenvalue of each layer's Hessian block")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def read_density(workdir: Path) -> list[dict]:
    path = Path(workdir) / records.DENSITY_FILE
    return records.read_metrics(path) if path.exists() else []


def plot_density(snapshots: list[dict], path: Path) -> Path:
    """SLQ spectral-density snapshots (log density), one curve per step."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    cmap = plt.get_cmap("viridis")
    for index, snap in enumerate(snapshots):
        color = cmap(index / max(len(snapshots) - 1, 1))
        density = np.maximum(np.asarray(snap["density"], float), 1e-12)
        ax.semilogy(snap["grid"], density, color=color, lw=1, label=f"step {snap['step']}")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("spectral density")
    ax.set_ylim(bottom=1e-8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_run(workdir: str | Path) -> list[Path]:
    """Every figure that the records of one run support; returns the paths written."""
    workdir = Path(workdir)
    rows = records.read_metrics(workdir)
    out = workdir / records.PLOTS_DIR
    lr = _lr(workdir)
    written = [plot_loss_and_grad(rows, out / "loss_grad.png", title=str(workdir.name))]
    if _eigen_rows(rows)[1]:
        written.append(plot_sharpness([(workdir.name, rows, lr)], out / "sharpness.png"))
        written.append(plot_spectrum(rows, lr, out / "spectrum.png"))
        written.append(plot_chi(rows, out / "chi.png"))
    if any(isinstance(r.get("layer_eigenvalues"), dict) for r in rows):
        written.append(plot_layer_sharpness(rows, lr, out / "layer_sharpness.png"))
    snapshots = read_density(workdir)
    if snapshots:
        written.append(plot_density(snapshots, out / "density.png"))
    return written


def plot_sharpness_overlay(workdirs: Sequence[str | Path], path: str | Path,
                           labels: Sequence[str] | None = None) -> Path:
    """Sharpness of several runs on one axis, each with its 2/η line."""
    runs = []
    for index, workdir in enumerate(workdirs):
        workdir = Path(workdir)
        lr = _lr(workdir)
        label = labels[index] if labels else f"η={lr:g}" if lr else workdir.name
        runs.append((label, records.read_metrics(workdir), lr))
    return plot_sharpness(runs, Path(path), title="sharpness against step")


def plot_variant_overlay(runs: dict[str, list[dict]], path: Path, title: str) -> Path:
    """Loss against step for every variant (log y), and χ_k where tracked."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, rows in runs.items():
        steps, loss = records.scalar_rows(rows, "loss")
        keep = loss > 0
        axes[0].plot(steps[keep], loss[keep], lw=1.2, label=name)
        steps, chi = records.scalar_rows([r for r in rows if "status" not in r], "chi_k")
        if steps.size:
            axes[1].plot(steps, chi, lw=1.0, label=name)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("full-batch training loss")
    axes[1].set_ylabel("χ_k = ‖V_kᵀg‖²/‖g‖²")
    axes[1].set_ylim(-0.02, 1.02)
    for ax in axes:
        ax.set_xlabel("step after the shared start")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_seed_loss_curves(runs_by_seed: dict[int, dict[str, list[dict]]], path: Path,
                          title: str) -> Path:
    """Loss against step (log y) on one panel: a color per variant, a line style per seed."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    styles = ["-", "--", ":", "-."]
    names = list(dict.fromkeys(name for runs in runs_by_seed.values() for name in runs))
    for index, (seed, runs) in enumerate(runs_by_seed.items()):
        for name, rows in runs.items():
            steps, loss = records.scalar_rows(rows, "loss")
            keep = loss > 0
            ax.plot(steps[keep], loss[keep], lw=1.1, color=f"C{names.index(name)}",
                    ls=styles[index % len(styles)], label=f"{name}, seed {seed}")
    ax.set_yscale("log")
    ax.set_xlabel("step after the seed's shared start")
    ax.set_ylabel("full-batch training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=len(runs_by_seed))
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


# ----------------------------------------------------------------------------
# Dataset-size sweeps (summary.json of experiments/sweep_n.py)
# ----------------------------------------------------------------------------

def plot_scaling_summary(summary: dict, out_dir: Path) -> list[Path]:
    """One PNG per quantity: value against N (log–log), a line per activation, a panel per
    dataset/model/loss; per-seed values as dots, the per-N center as a line. Only runs at the
    edge of stability are fitted (see `lossland.scaling.summarize_group`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # Arms that run one N (role "eta_scan") have no N-fit to draw.
    groups = [g for g in summary["groups"] if g.get("role", "n_sweep") == "n_sweep"]
    panel_of = lambda g: (g["dataset"], g.get("model", "mlp"), g["loss"])
    panels = sorted({panel_of(g) for g in groups})
    written = []
    for key, meta in summary["quantities"].items():
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
        drew = False
        for ax, panel in zip(axes[0], panels):
            for index, group in enumerate(g for g in groups if panel_of(g) == panel):
                fit = group["quantities"].get(key)
                if not fit:
                    continue
                color = f"C{index}"
                for values in fit["values"].values():
                    ax.plot(fit["all_n"], values, "o", color=color, alpha=0.35, ms=4)
                arm = group.get("arm") or group.get("model", "mlp")
                name = (group["activation"] if arm == group.get("model", "mlp")
                        else f"{arm}, {group['activation']}")
                label = (f"{name}: slope {verdicts.fmt(fit['slope'])} "
                         f"{verdicts.fmt_interval(fit['ci_low'], fit['ci_high'])}")
                ax.plot(fit["n"], fit["center"], "-", color=color, lw=1.6, label=label)
                drew = True
            if key == "probe_grad_excess" and drew:
                # A quadratic of the iterate's sharpness keeps the ratio ≤ 1 at any range.
                ax.axhline(1.0, ls=":", color="k", lw=1, label="quadratic bound")
            ax.set_xscale("log")
            if meta["scale"] == "log":
                ax.set_yscale("log")
            sizes = sorted({n for g in groups
                            for n in g["quantities"].get(key, {}).get("all_n", [])})
            ax.set_xticks(sizes, [str(n) for n in sizes], fontsize=7)
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("training-set size N")
            ax.set_ylabel(meta["label"])
            ax.set_title(" / ".join(panel), fontsize=9)
            ax.grid(alpha=0.3, which="both")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        if drew:
            fig.tight_layout()
            path = out_dir / f"{key}.png"
            fig.savefig(path, dpi=110)
            written.append(path)
        plt.close(fig)
    return written


def plot_valley_distance(points, run_dir_of, out_dir: Path) -> Path | None:
    """|s*(t)| along v1 over training, one panel per group, colored by N (claim C2).

    `points` are `scaling.GridPoint`s; `run_dir_of(point)` is the run directory of each.
    """
    groups = list(dict.fromkeys(p.group for p in points))
    sizes = sorted({p.n for p in points})
    cmap = plt.get_cmap("viridis")
    # A grid of at most 3 panels a row: a sweep with many arms stays readable.
    cols = min(len(groups), 3)
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    drew = False
    for ax, group in zip(axes.flat, groups):
        for p in (p for p in points if p.group == group):
            path = run_dir_of(p) / records.METRICS_FILE
            if not path.exists():
                continue
            steps, values = records.scalar_rows(records.read_metrics(path), "valley_distance")
            if len(steps):
                color = cmap(sizes.index(p.n) / max(len(sizes) - 1, 1))
                ax.plot(steps, values, "-o", color=color, ms=3, lw=1, alpha=0.8,
                        label=f"N={p.n}" if p.seed == points[0].seed else None)
                drew = True
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("|s*| along v1")
        ax.set_title(group, fontsize=9)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    path = None
    if drew:
        fig.tight_layout()
        path = out_dir / "valley_distance_vs_step.png"
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


