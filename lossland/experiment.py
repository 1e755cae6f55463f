"""The experiment build: from a validated RunConfig to data, model, objective and step.

Owns: the process-wide numerics set-up (float64, matmul precision), the data
load and its placement over the mesh, the model, the objective, the optimizer
(with its optional Dom/Bulk projection) and the jitted train step, and the
placement of a training state over the mesh.

Must not: touch the workdir (no file is read or written here beyond the
dataset), decide about resuming, or run any training step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lossland import config as config_lib
from lossland import data as data_lib
from lossland import losses, models, objective as objective_lib, sharding
from lossland import train as train_lib


@dataclasses.dataclass
class Experiment:
    """Everything a run needs, built from a RunConfig (no files touched)."""
    cfg: config_lib.RunConfig
    x: np.ndarray
    y: np.ndarray
    model: models.Model
    objective: objective_lib.Objective
    optimizer: Any
    train_step: Any   # train.make_train_step's; it carries model_state when model.has_state
    dtype: Any
    mesh: Any
    test_data: Any = None   # ChunkedData of the first --n_test test examples, or None


def set_matmul_precision(name: str) -> None:
    """Full float32 products ("highest") or the backend's fast mode ("default")."""
    jax.config.update("jax_default_matmul_precision", None if name == "default" else name)


def check_dtype_backend(dtype_name: str, backend: str) -> None:
    """Refuses a dtype the backend cannot compute in (float64 on TPU)."""
    if dtype_name == "float64" and backend == "tpu":
        raise config_lib.ConfigError("--dtype='float64' is not allowed on TPU backends: choose "
                                     "--dtype=float32 there, or run on CPU or GPU.")


def enable_dtype(dtype_name: str):
    """Switches JAX to 64-bit when asked; fails clearly where the backend cannot."""
    check_dtype_backend(dtype_name, jax.default_backend())
    if dtype_name == "float64":
        jax.config.update("jax_enable_x64", True)
        return jnp.float64
    return jnp.float32


def validate_model_bounds(cfg: config_lib.RunConfig) -> data_lib.DatasetInfo:
    """`config.validate_for_model` (k <= P) from shapes alone: no data, no compilation.

    Returns the dataset's info (input shape, classes).
    """
    info = data_lib.dataset_info(cfg.dataset, cfg.input_dim, cfg.num_classes)
    available = info.size["train"]
    if available is not None and cfg.n_train > available:
        raise config_lib.ConfigError(f"--n_train={cfg.n_train} is not allowed: --dataset="
                                     f"{cfg.dataset} holds {available} training examples. "
                                     f"Use --n_train<={available}.")
    try:
        num_params, has_state = models.describe(
            cfg.model, info.input_shape, info.num_classes, width=cfg.width, depth=cfg.depth,
            activation=cfg.activation, model_kwargs=cfg.model_kwargs, norm=cfg.norm,
            patch_size=cfg.patch_size)
    except models.ModelError as e:
        raise config_lib.ConfigError(str(e)) from None
    config_lib.validate_for_model(cfg, num_params)
    if has_state:
        check_whole_chunks(cfg)
    if cfg.track_layers:   # the layers, from shapes alone (traced, nothing compiled)
        config_lib.validate_layers(cfg, abstract_params(cfg, info))
    return info


def abstract_params(cfg: config_lib.RunConfig, info: data_lib.DatasetInfo):
    """The model's params as shapes (jax.ShapeDtypeStruct leaves), a plug-in's included."""
    if models.is_plugin(cfg.model):
        from lossland.models import plugin
        return plugin.abstract_params(cfg.model, cfg.model_kwargs, info.input_shape,
                                      info.num_classes)
    return jax.eval_shape(lambda: models.build_model(
        cfg.model, info.input_shape, info.num_classes, width=cfg.width, depth=cfg.depth,
        activation=cfg.activation, key=jax.random.key(0), norm=cfg.norm,
        patch_size=cfg.patch_size).params)


def check_whole_chunks(cfg: config_lib.RunConfig) -> None:
    """A model with batch statistics (BatchNorm) needs chunks without padding rows.

    Its training-mode loss normalizes each chunk with that chunk's statistics
    (ghost batches); a padding row would enter them. So n must fill whole chunks,
    and an SGD minibatch (one chunk, padded to a multiple of the device count)
    must need no padding.
    """
    devices = sharding.mesh_size(sharding.make_mesh(cfg.num_devices))
    problem = padding_problem(cfg, devices)
    if problem:
        raise config_lib.ConfigError(problem)


def padding_problem(cfg: config_lib.RunConfig, devices: int) -> str | None:
    """Why cfg's chunks or minibatches would hold padding rows on `devices` devices (a
    BatchNorm model then normalizes with them; see `check_whole_chunks`), or None."""
    chunk, num_chunks = sharding.chunk_layout(cfg.n_train, cfg.chunk_size, devices)
    if chunk * num_chunks != cfg.n_train:
        return (f"--chunk_size={cfg.chunk_size} is not allowed with --n_train={cfg.n_train} "
                f"and --model={cfg.model}: the model normalizes with batch statistics, "
                f"computed per chunk of {chunk} examples, so the last chunk would hold padding "
                "rows. Choose --chunk_size dividing --n_train (and a multiple of the device "
                "count).")
    if cfg.optimizer not in train_lib.FULL_BATCH_OPTIMIZERS and cfg.batch_size % devices:
        return (f"--batch_size={cfg.batch_size} is not allowed with --optimizer="
                f"{cfg.optimizer}, --model={cfg.model} and {devices} devices: the model "
                "normalizes with batch statistics, and each minibatch is padded to a multiple "
                "of the device count, so padding rows would enter them. Choose a --batch_size "
                f"that is a multiple of {devices} (or fewer --num_devices).")
    return None


def build_experiment(cfg: config_lib.RunConfig) -> Experiment:
    """Loads data and builds model, objective, optimizer and the jitted step.

    Raises ConfigError / DataError before any file is written, and before any
    compilation for everything checkable from the config and shapes.
    """
    config_lib.validate(cfg)
    dtype = enable_dtype(cfg.dtype)
    set_matmul_precision(cfg.matmul_precision)
    info = validate_model_bounds(cfg)
    mesh = sharding.make_mesh(cfg.num_devices)
    x, y = data_lib.load(cfg.dataset, cfg.n_train, seed=cfg.seed, data_dir=cfg.data_dir,
                         input_dim=cfg.input_dim, num_classes=cfg.num_classes)
    init_key = jax.random.fold_in(jax.random.key(cfg.seed), 0)
    model = models.build_model(cfg.model, info.input_shape, info.num_classes, width=cfg.width,
                               depth=cfg.depth, activation=cfg.activation, key=init_key,
                               dtype=dtype, model_kwargs=cfg.model_kwargs, norm=cfg.norm,
                               patch_size=cfg.patch_size)
    model = dataclasses.replace(model, params=sharding.replicate(model.params, mesh))
    # Built shard by shard from the unpadded host arrays: no padded host copy
    # stays resident, so memory grows with the data, not twice the data.
    full_data = sharding.shard_chunked(x, y, cfg.chunk_size, mesh, dtype=dtype)
    objective = objective_lib.Objective(model.apply, losses.per_example_loss(cfg.loss), full_data)
    optimizer = train_lib.make_optimizer(cfg.optimizer, cfg.lr, momentum=cfg.momentum,
                                         extra=_make_projection(cfg))
    # A BatchNorm model's step also returns its running statistics (model.update_state).
    train_step = train_lib.make_train_step(objective, optimizer, update_state=model.update_state)
    return Experiment(cfg=cfg, x=x, y=y, model=model, objective=objective, optimizer=optimizer,
                      train_step=train_step, dtype=dtype, mesh=mesh,
                      test_data=_test_data(cfg, dtype))


def _test_data(cfg: config_lib.RunConfig, dtype):
    """The first --n_test test examples, in chunks of --chunk_size on one device (None when
    --n_test=0). Evaluation is a side measurement: it need not be sharded."""
    if not cfg.n_test:
        return None
    x, y = data_lib.load(cfg.dataset, cfg.n_test, seed=cfg.seed, data_dir=cfg.data_dir,
                         split="test", input_dim=cfg.input_dim, num_classes=cfg.num_classes)
    return objective_lib.chunk_data(x, y, cfg.chunk_size, dtype=dtype)


def make_evaluator(exp: Experiment):
    """Jitted `(params, model_state) -> (test loss, test accuracy)` in eval mode (BatchNorm
    normalizes with its running statistics, `Model.evaluate`), or None without test data."""
    if exp.test_data is None:
        return None
    per_example = losses.per_example_loss(exp.cfg.loss)

    def evaluate(params, model_state, data):
        eval_apply = lambda p, x: exp.model.evaluate(p, model_state, x)
        return objective_lib.loss_and_accuracy(eval_apply, per_example, params, data)

    jitted = jax.jit(evaluate)
    return lambda params, model_state: jitted(params, model_state, exp.test_data)


def _make_projection(cfg: config_lib.RunConfig):
    """The Dom/Bulk projection transformation for cfg.projection, or None."""
    if cfg.projection == "none":
        return None
    from lossland import projections  # imported only when projecting
    return projections.make_projection(cfg.projection, k=cfg.projection_k,
                                       refresh_every=cfg.refresh_every,
                                       switch_step=cfg.switch_step,
                                       num_iters=cfg.lanczos_iters, seed=cfg.seed,
                                       tol=cfg.lanczos_tol or None)


def place_state(state, mesh):
    """The state's arrays replicated over the mesh (or committed to the one device).

    Fresh optimizer counters, the zero warm-start vectors and restored
    checkpoints start as host or uncommitted arrays. In a multi-process run
    every input of a jitted step must be a global array over the mesh; in any
    run, inputs placed like the step's own outputs keep it to one compilation.
    """
    return state.replace(**{name: sharding.replicate(getattr(state, name), mesh)
                            for name in ("params", "opt_state", "eigvecs", "displacement",
                                         "init_v1", "stream", "model_state")})
