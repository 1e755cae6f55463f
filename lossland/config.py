"""RunConfig: every setting of one training run, with start-up validation.

The absl driver (`experiments/train.py`) builds a RunConfig from its flags;
sweeps (`experiments/eos.py`, ...) build them in code. `validate` raises a
ConfigError naming the flag, the value, what is allowed and how to fix it,
before any compute and before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from lossland import data as data_lib
from lossland import losses, models
from lossland import train as train_lib

DTYPES = ("float32", "float64")
# "highest": float32 matrix products in full float32 everywhere. "default": the
# backend's fast mode, TF32 on NVIDIA Ampere and later GPUs (a 10-bit mantissa:
# HVPs and GN products off by 3e-4 to 5e-4 relative, measured on an H100) and
# bfloat16 passes on TPU. The CPU computes float32 products in float32 either way.
MATMUL_PRECISIONS = ("highest", "default")
PROJECTIONS = ("none", "dom", "bulk")
TRACKERS = ("lanczos", "block", "stream")


class ConfigError(ValueError):
    """A bad setting; the message names the flag and how to fix it."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    # data
    dataset: str = "mnist1d"
    data_dir: Optional[str] = None
    n_train: int = 1000
    n_test: int = 0              # test examples evaluated in eval mode (0 = none)
    eval_every: int = 0          # test evaluation every this many steps (0 = at the end only)
    input_dim: int = 20          # synthetic datasets only
    num_classes: int = 10        # synthetic datasets only
    # model
    model: str = "mlp"           # a registry name, or a plug-in: pkg.module:fn, file.py:fn
    model_kwargs: str = ""       # plug-ins only: a JSON object of the factory's arguments
    width: int = 256
    depth: int = 2
    activation: str = "relu"
    norm: str = "none"           # resnet only: none | batch | layer
    patch_size: int = 4          # vit only: divides the input's length (or height and width)
    # objective and optimizer
    loss: str = "mse"
    optimizer: str = "gd"
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 128
    steps: int = 2000
    seed: int = 0
    chunk_size: int = 4096
    dtype: str = "float32"
    matmul_precision: str = "highest"
    num_devices: int = 0         # 0 = every device JAX sees
    # records
    workdir: str = "runs/default"
    log_every: int = 10
    overwrite: bool = False
    resume: bool = False
    checkpoint_every: int = 500
    plots: bool = True
    # curvature tracking
    track_every: int = 0         # 0 = off
    track_k: int = 10
    lanczos_iters: int = 60
    lanczos_tol: float = 1e-3
    track_gn: bool = False
    tracker: str = "lanczos"     # lanczos: one HVP per iteration; block: block products (issue 13)
    track_block_size: int = 0    # block/stream tracker's b (0 = default_block_size); >= track_k
    stream_refresh: int = 0      # stream: rows imaged per step (0 = streaming.default_refresh)
    stream_check_every: int = 100  # stream: a converged Lanczos audit every this many steps (0 = off)
    density_every: int = 0       # 0 = off
    track_layers: bool = False   # per-layer Hessian blocks' top eigenvalues (issue 23)
    track_layers_k: int = 1
    track_min: bool = False      # λ_min and its residual
    trace_every: int = 0         # Hutch++ tr(H) every this many steps (0 = off)
    # the edge of stability (lossland.eos): entry, band, trailing window, early stop
    eos_hold_steps: int = 0      # stop once the run has held the edge this many steps (0 = off)
    eos_threshold: float = 0.9   # entry: the first upward crossing of λ1·lr/2 = this
    eos_band: tuple = (0.9, 1.1)  # holding: the trailing median of λ1·lr/2 inside [lo, hi]
    eos_window: int = 5          # tracked steps in that median
    # singularity probes (claims C1, C2)
    probe_every: int = 0         # 0 = off; a multiple of track_every
    probe_from_eos: bool = False  # probe at step 0, then only from the EoS entry on
    probe_s_max: float = 0.05
    # Half-range tied to the iterate: max(steps·η‖∇L‖, theta·‖θ‖); 0 and 0 = probe_s_max.
    probe_s_max_steps: float = 0.0
    probe_s_max_theta: float = 0.0
    probe_points: int = 41
    num_random_directions: int = 2
    # subspace-projected training (claim C4)
    projection: str = "none"     # none | dom | bulk
    projection_k: int = 10
    refresh_every: int = 10
    switch_step: int = 0

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def asdict(self) -> dict:
        return dataclasses.asdict(self)


def _require(condition: bool, flag: str, value, allowed: str, fix: str = "") -> None:
    if not condition:
        message = f"--{flag}={value!r} is not allowed: {allowed}."
        raise ConfigError(message + (f" {fix}" if fix else ""))


def validate(cfg: RunConfig) -> None:
    """Checks every setting; raises ConfigError on the first bad one."""
    _require(cfg.dataset in data_lib.DATASETS or data_lib.plugin.is_plugin(cfg.dataset),
             "dataset", cfg.dataset, f"choose one of {sorted(data_lib.DATASETS)}, or a plug-in "
             "path/to/file.npz or package.module:callable")
    _require(cfg.model in models.MODELS or models.is_plugin(cfg.model), "model", cfg.model,
             f"choose one of {sorted(models.MODELS)}, or a plug-in package.module:callable or "
             "path/to/file.py:callable")
    _require(not cfg.model_kwargs or models.is_plugin(cfg.model), "model_kwargs",
             cfg.model_kwargs, f"the built-in --model={cfg.model} takes --width, --depth and "
             "--activation; --model_kwargs is for plug-in models", "Drop --model_kwargs.")
    _require(cfg.activation in models.ACTIVATIONS, "activation", cfg.activation,
             f"choose one of {sorted(models.ACTIVATIONS)}")
    _require(cfg.norm in models.NORMS, "norm", cfg.norm, f"choose one of {list(models.NORMS)}")
    _require(cfg.patch_size >= 1, "patch_size", cfg.patch_size, "must be >= 1")
    _require(cfg.loss in losses.PER_EXAMPLE_LOSSES, "loss", cfg.loss,
             f"choose one of {sorted(losses.PER_EXAMPLE_LOSSES)}")
    _require(cfg.optimizer in train_lib.OPTIMIZERS, "optimizer", cfg.optimizer,
             f"choose one of {list(train_lib.OPTIMIZERS)}")
    _require(cfg.dtype in DTYPES, "dtype", cfg.dtype, f"choose one of {list(DTYPES)}")
    _require(cfg.matmul_precision in MATMUL_PRECISIONS, "matmul_precision",
             cfg.matmul_precision, f"choose one of {list(MATMUL_PRECISIONS)}")
    _require(cfg.n_train > 0, "n_train", cfg.n_train, "the number of examples must be > 0")
    info = data_lib.DATASETS.get(cfg.dataset)   # a plug-in's size is checked once it is read
    available = info.size["train"] if info else None
    _require(available is None or cfg.n_train <= available, "n_train", cfg.n_train,
             f"{cfg.dataset} has {available} training examples", f"Use --n_train<={available}.")
    _require(cfg.n_test >= 0, "n_test", cfg.n_test, "must be >= 0 (0 = no test evaluation)")
    available_test = info.size["test"] if info else None
    _require(available_test is None or cfg.n_test <= available_test, "n_test", cfg.n_test,
             f"{cfg.dataset} has {available_test} test examples",
             f"Use --n_test<={available_test}.")
    _require(cfg.eval_every >= 0, "eval_every", cfg.eval_every, "must be >= 0 (0 = at the end)")
    _require(not cfg.eval_every or cfg.n_test, "eval_every", cfg.eval_every,
             "it evaluates the --n_test test examples, and --n_test=0", "Set --n_test > 0.")
    _require(cfg.input_dim > 0, "input_dim", cfg.input_dim, "must be > 0")
    _require(cfg.num_classes >= 2, "num_classes", cfg.num_classes, "must be >= 2")
    _require(cfg.width > 0, "width", cfg.width, "must be > 0")
    _require(cfg.depth >= 1, "depth", cfg.depth, "must be >= 1")
    _require(cfg.lr > 0, "lr", cfg.lr, "the learning rate must be > 0")
    _require(0 <= cfg.momentum < 1, "momentum", cfg.momentum, "must lie in [0, 1)")
    _require(cfg.batch_size > 0, "batch_size", cfg.batch_size, "must be > 0")
    if cfg.optimizer not in train_lib.FULL_BATCH_OPTIMIZERS:
        _require(cfg.batch_size <= cfg.n_train, "batch_size", cfg.batch_size,
                 f"a minibatch cannot exceed --n_train={cfg.n_train}")
    _require(cfg.steps >= 0, "steps", cfg.steps, "the number of steps must be >= 0")
    _require(cfg.seed >= 0, "seed", cfg.seed, "seeds are integers >= 0")
    if cfg.dataset == "mnist1d":
        _require(cfg.seed <= data_lib.MNIST1D_MAX_SEED, "seed", cfg.seed,
                 f"the mnist1d generator takes seeds 0..{data_lib.MNIST1D_MAX_SEED}")
    _require(cfg.chunk_size > 0, "chunk_size", cfg.chunk_size, "must be > 0")
    _require(cfg.num_devices >= 0, "num_devices", cfg.num_devices, "must be >= 0 (0 = all)")
    _require(cfg.log_every > 0, "log_every", cfg.log_every, "must be > 0")
    _require(cfg.checkpoint_every >= 0, "checkpoint_every", cfg.checkpoint_every,
             "must be >= 0 (0 = only at exit)")
    _require(cfg.track_every >= 0, "track_every", cfg.track_every, "must be >= 0 (0 = off)")
    _require(cfg.track_k >= 1, "track_k", cfg.track_k, "must be >= 1")
    _require(cfg.lanczos_iters >= cfg.track_k, "lanczos_iters", cfg.lanczos_iters,
             f"must be >= --track_k={cfg.track_k}")
    _require(cfg.tracker in TRACKERS, "tracker", cfg.tracker, f"choose one of {list(TRACKERS)}")
    _require(cfg.track_block_size == 0 or cfg.track_block_size >= cfg.track_k, "track_block_size",
             cfg.track_block_size, f"a block holds the k={cfg.track_k} tracked vectors, so it "
             "must be >= --track_k (or 0 = track_k + 2)", "Raise --track_block_size.")
    _validate_stream(cfg)
    _require(cfg.lanczos_tol >= 0, "lanczos_tol", cfg.lanczos_tol, "must be >= 0 (0 = no early stop)")
    _require(cfg.density_every >= 0, "density_every", cfg.density_every, "must be >= 0 (0 = off)")
    if cfg.density_every:
        _require(cfg.track_every > 0 and cfg.density_every % cfg.track_every == 0,
                 "density_every", cfg.density_every, "snapshots use the tracked λ1 for their "
                 f"grid, so --density_every must be a multiple of --track_every="
                 f"{cfg.track_every} (> 0)")
    _validate_toolkit(cfg)
    _require(cfg.eos_hold_steps >= 0, "eos_hold_steps", cfg.eos_hold_steps, "must be >= 0 (0 = off)")
    if cfg.eos_hold_steps:
        _require(cfg.track_every > 0, "eos_hold_steps", cfg.eos_hold_steps,
                 "stopping at the edge of stability needs the sharpness", "Set --track_every > 0.")
    _require(0 < cfg.eos_threshold, "eos_threshold", cfg.eos_threshold, "must be > 0")
    band = tuple(cfg.eos_band)
    _require(len(band) == 2 and all(isinstance(v, (int, float)) for v in band)
             and 0 < band[0] <= band[1], "eos_band", ",".join(map(str, band)),
             "give two numbers lo,hi with 0 < lo <= hi", "For example --eos_band=0.9,1.1.")
    _require(cfg.eos_window >= 1, "eos_window", cfg.eos_window, "must be >= 1 (tracked steps)")
    _require(cfg.probe_every >= 0, "probe_every", cfg.probe_every, "must be >= 0 (0 = off)")
    if cfg.probe_every:
        _require(cfg.track_every > 0 and cfg.probe_every % cfg.track_every == 0, "probe_every",
                 cfg.probe_every, f"probes use the tracked top eigenvector, so --probe_every must "
                 f"be a multiple of --track_every={cfg.track_every} (> 0)")
    _require(not cfg.probe_from_eos or cfg.probe_every, "probe_from_eos", cfg.probe_from_eos,
             "it limits the --probe_every probes, which are off", "Set --probe_every > 0.")
    _require(cfg.probe_s_max > 0, "probe_s_max", cfg.probe_s_max, "must be > 0")
    for name in ("probe_s_max_steps", "probe_s_max_theta"):
        value = getattr(cfg, name)
        _require(math.isfinite(value) and value >= 0, name, value, "must be >= 0 (0 = off; "
                 "both 0 = the fixed --probe_s_max)")
    _require(cfg.probe_points >= 5, "probe_points", cfg.probe_points, "must be >= 5")
    _require(cfg.num_random_directions >= 0, "num_random_directions", cfg.num_random_directions,
             "must be >= 0")
    _require(cfg.projection in PROJECTIONS, "projection", cfg.projection,
             f"choose one of {list(PROJECTIONS)}")
    _require(cfg.projection_k >= 0, "projection_k", cfg.projection_k, "must be >= 0")
    if cfg.projection != "none":
        _require(cfg.projection_k >= 1, "projection_k", cfg.projection_k,
                 f"--projection={cfg.projection} projects on the top-k subspace, so k must be "
                 ">= 1", "Set --projection_k, or --projection=none.")
        _require(cfg.projection_k <= cfg.lanczos_iters, "projection_k", cfg.projection_k,
                 f"Lanczos finds at most --lanczos_iters={cfg.lanczos_iters} eigenvectors",
                 "Raise --lanczos_iters or lower --projection_k.")
    _require(cfg.refresh_every >= 1, "refresh_every", cfg.refresh_every, "must be >= 1")
    _require(cfg.switch_step >= 0, "switch_step", cfg.switch_step, "must be >= 0")
    _require(not (cfg.overwrite and cfg.resume), "resume", cfg.resume,
             "--resume and --overwrite are exclusive", "Pick one.")


def _validate_toolkit(cfg: RunConfig) -> None:
    """--track_layers, --track_layers_k, --track_min, --trace_every (lossland.tracking_extras)."""
    _require(cfg.track_layers_k >= 1, "track_layers_k", cfg.track_layers_k, "must be >= 1")
    if cfg.track_layers:
        _require(cfg.track_layers_k <= cfg.lanczos_iters, "track_layers_k", cfg.track_layers_k,
                 f"Lanczos finds at most --lanczos_iters={cfg.lanczos_iters} eigenvalues",
                 "Raise --lanczos_iters or lower --track_layers_k.")
    for flag in ("track_layers", "track_min"):
        if getattr(cfg, flag):
            _require(cfg.track_every > 0, flag, True, "it is measured at tracked steps",
                     "Set --track_every > 0.")
    _require(cfg.trace_every >= 0, "trace_every", cfg.trace_every, "must be >= 0 (0 = off)")
    if cfg.trace_every:
        _require(cfg.track_every > 0 and cfg.trace_every % cfg.track_every == 0, "trace_every",
                 cfg.trace_every, "the trace is written into tracked rows, so --trace_every "
                 f"must be a multiple of --track_every={cfg.track_every} (> 0)")


def validate_layers(cfg: RunConfig, params) -> None:
    """--track_layers needs layers (top-level modules) of at least --track_layers_k parameters.

    `params` may be shapes only (`jax.eval_shape`), so this runs before any compute.
    """
    if not (cfg.track_layers and cfg.track_every):
        return
    from lossland import curvature
    try:
        subsets = curvature.layer_subsets(params)
    except curvature.NoLayerStructure as e:
        raise ConfigError(f"--track_layers=True is not allowed for --model={cfg.model}: {e}. "
                          "Per-layer blocks group the params by their top-level module names; "
                          "drop --track_layers, or give the model named submodules.") from None
    smallest = min(subsets.items(), key=lambda item: item[1].size)
    _require(cfg.track_layers_k <= smallest[1].size, "track_layers_k", cfg.track_layers_k,
             f"layer {smallest[0]} has {smallest[1].size} parameters, so at most that many "
             "eigenvalues exist", f"Use --track_layers_k<={smallest[1].size}.")


def _validate_stream(cfg: RunConfig) -> None:
    """The stream tracker's settings (issue 24): its step is the fused full-batch GD step."""
    _require(cfg.stream_check_every >= 0, "stream_check_every", cfg.stream_check_every,
             "must be >= 0 (0 = no audit)")
    _require(cfg.stream_refresh >= 0, "stream_refresh", cfg.stream_refresh,
             "must be >= 0 (0 = the default for the block size)")
    if cfg.tracker != "stream" or not cfg.track_every:
        return
    _require(cfg.optimizer in train_lib.FULL_BATCH_OPTIMIZERS, "optimizer", cfg.optimizer,
             "--tracker=stream fuses H·V into the full-batch gradient step, so it needs one of "
             f"{list(train_lib.FULL_BATCH_OPTIMIZERS)}", "Use --tracker=lanczos with this optimizer.")
    _require(cfg.projection == "none", "projection", cfg.projection,
             "--tracker=stream does not run projected steps", "Use --tracker=lanczos.")
    _require(not cfg.track_gn, "track_gn", cfg.track_gn, "--tracker=stream tracks H only",
             "Use --tracker=lanczos for the Gauss–Newton split.")
    _require(cfg.stream_refresh <= block_size(cfg), "stream_refresh", cfg.stream_refresh,
             f"at most the block's {block_size(cfg)} rows can be imaged per step",
             "Lower --stream_refresh or raise --track_block_size.")
    if cfg.stream_check_every:
        _require(cfg.stream_check_every % cfg.track_every == 0, "stream_check_every",
                 cfg.stream_check_every, "the audit goes into a tracked row, so it must be a "
                 f"multiple of --track_every={cfg.track_every}")


def validate_for_model(cfg: RunConfig, num_params: int) -> None:
    """Checks the settings bounded by the parameter count P (known once the model is built).

    A Krylov space of a P×P Hessian has at most P dimensions, so at most P
    eigenpairs can be tracked or projected on.
    """
    if cfg.track_every:
        _require(cfg.track_k <= num_params, "track_k", cfg.track_k,
                 f"the model has {num_params} parameters, so at most {num_params} eigenpairs "
                 "exist", f"Use --track_k<={num_params}.")
        if cfg.tracker in ("block", "stream"):
            _require(block_size(cfg) <= num_params, "track_block_size", block_size(cfg),
                     f"the model has {num_params} parameters", "Lower --track_block_size.")
    if cfg.projection != "none":
        _require(cfg.projection_k <= num_params, "projection_k", cfg.projection_k,
                 f"the model has {num_params} parameters", f"Use --projection_k<={num_params}.")


def block_size(cfg: RunConfig) -> int:
    """The block or stream tracker's b: --track_block_size, or its default when 0.

    The default is track_k + 2 guard rows. The stream tracker's is one vector at k = 1
    (shifted momentum power iteration) and k + max(2, ⌈0.4 k⌉) otherwise (14 at k = 10:
    more guards speed up the k-th value, whose rate is |λ_{b+1} + τ|/(λ_k + τ);
    BUILD_NOTES.md gives the measurements).
    """
    if cfg.track_block_size:
        return cfg.track_block_size
    if cfg.tracker == "stream":
        k = cfg.track_k
        return 1 if k == 1 else k + max(2, -(-2 * k // 5))
    return cfg.track_k + 2


def stream_refresh(cfg: RunConfig) -> int:
    """Rows of the stream block imaged per step: --stream_refresh, or the default when 0."""
    from lossland import streaming  # the default lives with the tracker
    return cfg.stream_refresh or streaming.default_refresh(cfg.track_k, block_size(cfg))
