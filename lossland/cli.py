"""absl flags for a RunConfig, shared by every experiment driver.

Each flag mirrors a RunConfig field. Names are validated by DEFINE_enum and
numbers by validators, so a bad value fails at parse time, before any compute
and before anything is written, with absl's message
`flag --NAME=VALUE: <what is allowed>`.
"""

from __future__ import annotations

from absl import flags

from lossland import config as config_lib
from lossland import data as data_lib
from lossland import losses, models
from lossland import train as train_lib

_DEFAULTS = config_lib.RunConfig()


def define_run_flags(**default_overrides) -> None:
    """Defines every RunConfig flag (defaults may be overridden per driver)."""
    d = _DEFAULTS.replace(**default_overrides)
    # Data
    flags.DEFINE_string("dataset", d.dataset, f"Dataset: {', '.join(sorted(data_lib.DATASETS))}"
                        ", or your own: path/to/file.npz (x, y[, x_test, y_test, num_classes]) "
                        "or package.module:callable returning those arrays.")
    flags.DEFINE_string("data_dir", d.data_dir, "Folder with the dataset files (fashion_mnist: "
                        f"defaults to {data_lib.DEFAULT_FASHION_MNIST_DIR}; mnist, cifar10: "
                        "required).")
    flags.DEFINE_integer("n_train", d.n_train, "Training examples: the first n of the seed's "
                         "fixed order, so larger n contains smaller n.", lower_bound=1)
    flags.DEFINE_integer("n_test", d.n_test, "Test examples (the first n of the test split) "
                         "evaluated in eval mode, BatchNorm with its running statistics, into "
                         "test_loss and test_accuracy: in the final row, and every "
                         "--eval_every steps (0 = no test evaluation).", lower_bound=0)
    flags.DEFINE_integer("eval_every", d.eval_every, "Test evaluation every this many steps, "
                         "on logged rows (0 = in the final row only).", lower_bound=0)
    flags.DEFINE_integer("input_dim", d.input_dim, "Input dimension (synthetic datasets only).",
                         lower_bound=1)
    flags.DEFINE_integer("num_classes", d.num_classes, "Classes (synthetic datasets only).",
                         lower_bound=2)
    # Model
    flags.DEFINE_string("model", d.model, f"Model: a family ({', '.join(sorted(models.MODELS))})"
                        ", or your own Flax linen/NNX Module from package.module:callable or "
                        "path/to/file.py:callable, called as f(input_shape=..., num_classes="
                        "..., **model_kwargs) (README: Your own model and data).")
    flags.DEFINE_string("model_kwargs", d.model_kwargs, "Plug-in models only: a JSON object of "
                        """the callable's arguments, e.g. '{"width": 64}'.""")
    flags.DEFINE_integer("width", d.width, "Hidden units (mlp), channels (cnn; "
                         "resnet's first stage) or embedding width (vit, a multiple of 4).",
                         lower_bound=1)
    flags.DEFINE_integer("depth", d.depth, "Hidden layers (mlp), conv blocks "
                         "(cnn), 6n + 2 layers (resnet) or Transformer blocks (vit).",
                         lower_bound=1)
    flags.DEFINE_enum("activation", d.activation, sorted(models.ACTIVATIONS), "Activation.")
    flags.DEFINE_enum("norm", d.norm, list(models.NORMS), "resnet only: normalization after "
                      "each convolution (batch: BatchNorm in training mode, statistics per "
                      "chunk; layer: LayerNorm over channels).")
    flags.DEFINE_integer("patch_size", d.patch_size, "vit only: patch length (MNIST-1D) or "
                         "side (images); must divide the input.", lower_bound=1)
    # Objective and optimizer
    flags.DEFINE_enum("loss", d.loss, sorted(losses.PER_EXAMPLE_LOSSES),
                      "Loss (mean over examples): mse = ½‖z − onehot(y)‖², cross_entropy.")
    flags.DEFINE_enum("optimizer", d.optimizer, list(train_lib.OPTIMIZERS),
                      "gd = full-batch gradient descent; sgd, momentum (heavy ball), adam use "
                      "minibatches of --batch_size.")
    flags.DEFINE_float("lr", d.lr, "Learning rate η (> 0). GD is stable while λ1 < 2/η.")
    flags.DEFINE_float("momentum", d.momentum, "Heavy-ball coefficient for --optimizer=momentum.")
    flags.DEFINE_integer("batch_size", d.batch_size, "Minibatch size (not used by gd).",
                         lower_bound=1)
    flags.DEFINE_integer("steps", d.steps, "Optimizer steps (>= 0).", lower_bound=0)
    flags.DEFINE_integer("seed", d.seed, "Seed for data order, init and probes (>= 0).",
                         lower_bound=0)
    flags.DEFINE_integer("chunk_size", d.chunk_size, "Examples per chunk of the full-batch "
                         "reducer; peak memory grows with it, not with n.", lower_bound=1)
    flags.DEFINE_enum("dtype", d.dtype, list(config_lib.DTYPES), "Floating-point precision.")
    flags.DEFINE_enum("matmul_precision", d.matmul_precision, list(config_lib.MATMUL_PRECISIONS),
                      "Matrix products in float32: highest = full float32 (what the kernels "
                      "are tested at); default = the backend's fast mode (TF32 on NVIDIA "
                      "Ampere+ GPUs: HVPs off by 3e-4 to 5e-4 relative on an H100; no "
                      "change on CPU).")
    flags.DEFINE_integer("num_devices", d.num_devices, "Devices to shard the data over "
                         "(0 = every device JAX sees).", lower_bound=0)
    # Records
    flags.DEFINE_string("workdir", d.workdir, "Run directory for config.json, metrics.jsonl, "
                        "checkpoints/ and plots/.")
    flags.DEFINE_integer("log_every", d.log_every, "Write a metrics row every this many steps.",
                         lower_bound=1)
    flags.DEFINE_boolean("overwrite", d.overwrite, "Replace the records of an existing workdir.")
    flags.DEFINE_boolean("resume", d.resume, "Continue the run in --workdir from its last "
                         "checkpoint (only --steps may change).")
    flags.DEFINE_integer("checkpoint_every", d.checkpoint_every, "Orbax checkpoint every this "
                         "many steps (0 = only at exit and on SIGINT/SIGTERM).", lower_bound=0)
    flags.DEFINE_boolean("plots", d.plots, "Draw plots into workdir/plots at the end.")
    # Curvature tracking
    flags.DEFINE_integer("track_every", d.track_every, "Track the top Hessian eigenvalues, χ_k "
                         "and the gradient split every this many steps (0 = off).", lower_bound=0)
    flags.DEFINE_integer("track_k", d.track_k, "Number of top eigenpairs to track.", lower_bound=1)
    flags.DEFINE_integer("lanczos_iters", d.lanczos_iters, "Lanczos iteration cap per tracked "
                         "step.", lower_bound=1)
    flags.DEFINE_float("lanczos_tol", d.lanczos_tol, "Stop Lanczos once every top-k Ritz "
                       "residual ≤ tol·|λ| (0 = run all --lanczos_iters).")
    flags.DEFINE_enum("tracker", d.tracker, list(config_lib.TRACKERS), "Top-k solver per tracked "
                      "step: lanczos (one HVP per iteration, warm-started), block (warm-started "
                      "block Davidson on block HVPs of --track_block_size vectors; retired, see "
                      "BUILD_NOTES) or stream (H·V fused into every GD step, the top-k subspace "
                      "followed by one subspace-iteration step a step; README 'Which tracker').")
    flags.DEFINE_integer("track_block_size", d.track_block_size, "Vectors in the block of "
                         "--tracker=block or stream (0 = track_k + 2 for block; for stream 1 "
                         "at --track_k=1, else track_k + max(2, ceil(0.4 track_k)), 14 at "
                         "k = 10; must be >= --track_k).", lower_bound=0)
    flags.DEFINE_integer("stream_refresh", d.stream_refresh, "--tracker=stream: block rows "
                         "multiplied by H at each step (0 = all of a block of <= 2, else "
                         "ceil(0.4 b), 6 at k = 10). Each costs about one tangent pass; "
                         "--stream_refresh=4 at k = 10 is faster and less accurate (README, "
                         "'Which tracker').")
    flags.DEFINE_integer("stream_check_every", d.stream_check_every, "--tracker=stream: a "
                         "converged, cold Lanczos at the same θ every this many steps; the row "
                         "gets check_eigenvalues and stream_check_rel_err (0 = off).")
    flags.DEFINE_boolean("track_gn", d.track_gn, "Also track the top eigenvalues of the "
                         "Gauss–Newton part G = JᵀH_outJ and of the residual H − G.")
    flags.DEFINE_integer("density_every", d.density_every, "Stochastic-Lanczos spectral density "
                         "snapshot every this many steps (0 = off).", lower_bound=0)
    flags.DEFINE_boolean("track_layers", d.track_layers, "At tracked steps, also the top "
                         "--track_layers_k eigenvalues of each layer's diagonal Hessian block "
                         "(layer = top-level module, e.g. Dense_0): row key layer_eigenvalues.")
    flags.DEFINE_integer("track_layers_k", d.track_layers_k, "Eigenvalues per layer for "
                         "--track_layers.", lower_bound=1)
    flags.DEFINE_boolean("track_min", d.track_min, "At tracked steps, also the smallest "
                         "Hessian eigenvalue and its residual (min_eigenvalue).")
    flags.DEFINE_integer("trace_every", d.trace_every, "Hutch++ estimate of tr(H) and its "
                         "standard error every this many steps (0 = off); a multiple of "
                         "--track_every.", lower_bound=0)
    # Edge-of-stability stop, probes and projections
    flags.DEFINE_integer("eos_hold_steps", d.eos_hold_steps, "Stop once the run has held the "
                         "edge of stability (see --eos_band) for this many steps (0 = run all "
                         "--steps).", lower_bound=0)
    flags.DEFINE_float("eos_threshold", d.eos_threshold, "The run enters the edge of stability "
                       "at the first tracked step where λ1·lr/2 crosses this from below (a run "
                       "starting above it enters only after falling below).")
    flags.DEFINE_list("eos_band", [str(v) for v in d.eos_band], "lo,hi: after entry the run "
                      "holds the edge of stability while the median of λ1·lr/2 over the last "
                      "--eos_window tracked steps stays in [lo, hi]; above hi it is 'above' "
                      "(unstable or catapulting).")
    flags.DEFINE_integer("eos_window", d.eos_window, "Tracked steps in the trailing median of "
                         "--eos_band.", lower_bound=1)
    flags.DEFINE_integer("probe_every", d.probe_every, "Line probes (v1, gradient, last step, "
                         "random) every this many steps and at the end (0 = off); a multiple of "
                         "--track_every.", lower_bound=0)
    flags.DEFINE_boolean("probe_from_eos", d.probe_from_eos, "Probe at step 0, then every "
                         "--probe_every steps only once the run has entered the edge of "
                         "stability (lossland.eos), and at the end: the late probes C2 reads, "
                         "without paying for probes on the way there.")
    flags.DEFINE_float("probe_s_max", d.probe_s_max, "Probe the line θ + s·u for |s| ≤ this "
                       "(unless --probe_s_max_steps or --probe_s_max_theta is set).")
    flags.DEFINE_float("probe_s_max_steps", d.probe_s_max_steps, "Tie the probe half-range to "
                       "the iterate: at least this many GD step lengths η‖∇L(θ)‖ (0 = off). "
                       "With --probe_s_max_theta the larger of the two.")
    flags.DEFINE_float("probe_s_max_theta", d.probe_s_max_theta, "Tie the probe half-range to "
                       "the iterate: at least this fraction of ‖θ‖ (0 = off).")
    flags.DEFINE_integer("probe_points", d.probe_points, "Grid points per probe line.",
                         lower_bound=5)
    flags.DEFINE_integer("num_random_directions", d.num_random_directions, "Random unit "
                         "directions probed as controls.", lower_bound=0)
    flags.DEFINE_enum("projection", d.projection, list(config_lib.PROJECTIONS), "Train on the "
                      "dominant top-k Hessian subspace only (dom), without it (bulk), or plain.")
    flags.DEFINE_integer("projection_k", d.projection_k, "k of the projected subspace.",
                         lower_bound=0)
    flags.DEFINE_integer("refresh_every", d.refresh_every, "Recompute the projected subspace "
                         "every this many steps.", lower_bound=1)
    flags.DEFINE_integer("switch_step", d.switch_step, "Project only from this step on.",
                         lower_bound=0)
    _register_validators()


def _register_validators() -> None:
    flags.register_validator("lr", lambda v: v > 0,
                             message="the learning rate must be > 0, e.g. --lr=0.05")
    flags.register_validator("momentum", lambda v: 0 <= v < 1, message="must lie in [0, 1)")
    flags.register_validator("lanczos_tol", lambda v: v >= 0,
                             message="must be >= 0 (0 = no early stop)")


def config_from_flags(**overrides) -> config_lib.RunConfig:
    """A RunConfig from the parsed flags; raises ConfigError on cross-flag problems."""
    values = {f: flags.FLAGS[f].value for f in config_lib.RunConfig.__dataclass_fields__
              if f in flags.FLAGS}
    if "eos_band" in values:
        values["eos_band"] = _float_pair("eos_band", values["eos_band"])
    cfg = config_lib.RunConfig(**{**values, **overrides})
    config_lib.validate(cfg)
    return cfg


def _float_pair(flag: str, items) -> tuple:
    """--flag=lo,hi as a tuple of floats; a ConfigError naming the flag otherwise."""
    try:
        return tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise config_lib.ConfigError(f"--{flag}={','.join(map(str, items))} is not allowed: "
                                     f"give two numbers lo,hi, e.g. --{flag}=0.9,1.1.") from None
