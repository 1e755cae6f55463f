"""Orbax checkpoints of the full training state.

A checkpoint at step s holds θ_s, the optimizer state, the warm-start
eigenvectors of the last tracked step before s, the stream tracker's block
(pending for step s), the model's running statistics after s steps (BatchNorm),
and the elapsed wall time;
everything `runner` needs to continue as if it had never stopped.

Commit marker (orbax 0.12, the default atomic-rename mode): a save writes
into `<step>.orbax-checkpoint-tmp[-<timestamp>]`, puts `commit_success.txt`
in it, then renames it to `<step>`. A kill -9 mid-save leaves the temporary
directory; a kill while orbax deletes an old checkpoint can leave `<step>`
without its marker. Neither is a checkpoint: `committed_steps` ignores them
and `remove_uncommitted` deletes them (resume does, with a message).

Must not: decide when to save or whether to resume (loop.py, lifecycle.py).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.flatten_util import ravel_pytree

from lossland import curvature, records


@flax.struct.dataclass
class TrainState:
    step: Any            # int scalar: the step whose params these are
    params: Any
    opt_state: Any
    eigvecs: Any         # (k, P) eigenvectors of the last tracked step (warm start;
                         # a (1, P) placeholder when tracking is off: orbax refuses empty arrays)
    has_eigvecs: Any     # bool scalar: False until the first tracked step
    last_lambda1: Any    # float scalar: λ1 of the last tracked step (for messages)
    wall_time: Any       # float scalar: seconds spent before this checkpoint
    displacement: Any    # (P,) θ_t − θ_{t−1}, the last step (a probe direction)
    init_v1: Any         # (P,) v1 at the run's first tracked step (a C2 control direction;
                         # zeros before it)
    cum_delta_top: Any   # float scalar: Σ ΔL_top over the tracked steps so far
    cum_delta_bulk: Any  # float scalar: Σ ΔL_bulk over the tracked steps so far
    stream: Any          # curvature.StreamState of --tracker=stream, pending for `step`
                         # (phase −1 until started; (1, P) placeholder blocks for other
                         # trackers; older checkpoints stacked the phases: `unstack_stream`)
    model_state: Any     # the model's non-param variables after `step` steps (BatchNorm's
                         # running statistics, `train.make_train_step`); {} for other models.
                         # Last, so a stateless run's leaves are those of older checkpoints.


def initial_state(params, opt_state, track_k: int, stream_block: int = 1,
                  model_state=None) -> TrainState:
    """The state at step 0; `stream_block` rows for the stream tracker's block; the model's
    initial non-param variables (`Model.state`, {} when it has none)."""
    flat = ravel_pytree(params)[0]
    from lossland import streaming
    stream = streaming.placeholder_state(stream_block, flat.shape[0], flat.dtype)
    return TrainState(step=0, params=params, opt_state=opt_state,
                      eigvecs=jnp.zeros((track_k, flat.shape[0]), flat.dtype),
                      has_eigvecs=False, last_lambda1=0.0, wall_time=0.0,
                      displacement=jnp.zeros_like(flat), init_v1=jnp.zeros_like(flat),
                      cum_delta_top=0.0, cum_delta_bulk=0.0, stream=stream,
                      model_state={} if model_state is None else model_state)


TMP_DIR_MARK = ".orbax-checkpoint-tmp"   # orbax's atomicity_types.TMP_DIR_SUFFIX
COMMIT_MARKER = "commit_success.txt"     # orbax's atomicity_types.COMMIT_SUCCESS_FILE


def _is_committed(path: Path) -> bool:
    return path.is_dir() and path.name.isdigit() and (path / COMMIT_MARKER).exists()


def committed_steps(workdir: Path) -> list[int]:
    """The steps of the finalized checkpoints in workdir/checkpoints, ascending."""
    return committed_steps_in(Path(workdir) / records.CHECKPOINT_DIR)


def committed_steps_in(directory: Path) -> list[int]:
    """The steps of the finalized checkpoints in a checkpoints folder itself, ascending."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if _is_committed(p))


def is_committed_checkpoint(path: Path) -> bool:
    """True for one finalized checkpoint's folder (`checkpoints/<step>` with its marker)."""
    return _is_committed(Path(path))


def read_params(directory: Path, step: int) -> dict:
    """{leaf path: NumPy array} of the params in the checkpoint of `step` in `directory`
    (a checkpoints folder), whatever the rest of the state (optimizer, tracker) holds.

    Reads only the params subtree (orbax partial restore), at their saved dtype.
    """
    with _pytree_manager(directory) as manager:
        abstract = {"params": params_metadata(manager, step)}
        restored = manager.restore(step, args=ocp.args.PyTreeRestore(
            item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True))
    return restored["params"]


def params_shapes(directory: Path, step: int):
    """The params of the checkpoint of `step` as jax.ShapeDtypeStruct leaves (metadata only)."""
    with _pytree_manager(directory) as manager:
        return params_metadata(manager, step)


@contextlib.contextmanager
def _pytree_manager(directory: Path):
    """A read-only orbax manager over a checkpoints folder, closed on exit."""
    manager = ocp.CheckpointManager(Path(directory).resolve(),
                                    item_handlers=ocp.PyTreeCheckpointHandler())
    try:
        yield manager
    finally:
        manager.close()


def params_metadata(manager, step: int):
    """The params subtree of a checkpoint's orbax metadata, as jax.ShapeDtypeStruct leaves."""
    tree = manager.item_metadata(step)["params"]
    return jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
                                  dict(tree))


def uncommitted_entries(workdir: Path) -> list[Path]:
    """Checkpoint directories a crash left unfinished (see the module docstring)."""
    directory = Path(workdir) / records.CHECKPOINT_DIR
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir()
                  if TMP_DIR_MARK in p.name or (p.name.isdigit() and not _is_committed(p)))


def remove_uncommitted(workdir: Path) -> list[str]:
    """Deletes the unfinished checkpoint directories; returns their names."""
    import shutil

    removed = []
    for path in uncommitted_entries(workdir):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        removed.append(path.name)
    return removed


def _to_saveable(state: TrainState):
    """Orbax wants arrays, not Python scalars."""
    return jax.tree_util.tree_map(np.asarray, state)


def unstack_stream(saved: dict) -> curvature.StreamState:
    """A stream state saved with its q phases stacked ((q, b, P) arrays, indexed by
    `phase`) in the present layout: per-phase tuples, the block imaged next first.
    `previous` was (q, b, P) and meaningful for b = 1 only; it is (1, P) now."""
    basis, images = np.asarray(saved["basis"]), np.asarray(saved["images"])
    q, b, P = basis.shape
    order = [(int(saved["phase"]) + i) % q for i in range(q)]     # phase −1: any order
    previous = (np.asarray(saved["previous"]) if b == 1
                else np.zeros((q, 1, P), basis.dtype))
    return curvature.StreamState(
        basis=tuple(basis[i] for i in order), images=tuple(images[i] for i in order),
        shift=saved["shift"], cursor=tuple(np.int32(saved["cursor"][i]) for i in order),
        phase=saved["phase"], previous=tuple(previous[i] for i in order))


class CheckpointMismatch(records.WorkdirError):
    """A checkpoint this version cannot resume from; the message says why and what to do."""


class CheckpointManager:
    """Keeps the two newest checkpoints under workdir/checkpoints."""

    def __init__(self, workdir: Path, max_to_keep: int = 2):
        self.directory = (Path(workdir) / records.CHECKPOINT_DIR).resolve()
        # The handler named up front (what StandardSave picks anyway), so that a fresh
        # manager can read a saved checkpoint's tree metadata (`restore`).
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                                 create=True),
            item_handlers=ocp.StandardCheckpointHandler())

    def save(self, state: TrainState) -> None:
        step = int(state.step)
        if self._manager.latest_step() == step:
            return
        self._manager.save(step, args=ocp.args.StandardSave(_to_saveable(state)))

    def latest_step(self):
        self._manager.wait_until_finished()
        return self._manager.latest_step()

    def restore_latest(self, template: TrainState) -> TrainState | None:
        return self.restore(template, self.latest_step())

    def restore(self, template: TrainState, step: int | None) -> TrainState | None:
        """The committed checkpoint of `step` (None: nothing to restore) in template's types."""
        if step is None:
            return None
        saveable = _to_saveable(template)
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, saveable)
        saved = self._manager.item_metadata(step)     # the saved tree's shapes, read once
        if "model_state" not in saved:
            # Saved before TrainState had model_state. A stateless model's checkpoint holds
            # the same leaves, in the same order, without the empty field; a BatchNorm
            # model's lacks its running statistics and cannot resume.
            if jax.tree_util.tree_leaves(template.model_state):
                raise CheckpointMismatch(
                    f"{self.directory}: the checkpoint of step {step} was saved before "
                    "lossland kept a model's running statistics (BatchNorm) in its "
                    "checkpoints, so this run cannot resume from it. Start it afresh with "
                    "--overwrite (or in a new --workdir).")
            abstract = {name: getattr(abstract, name) for name in abstract.__dataclass_fields__
                        if name != "model_state"}
        saved_stream = saved["stream"]
        stacked = not isinstance(saved_stream["basis"], (list, tuple, dict))
        if stacked:      # saved before the stream's phases were kept apart
            old = {name: jax.ShapeDtypeStruct(saved_stream[name].shape, saved_stream[name].dtype)
                   for name in curvature.StreamState._fields}
            abstract = (abstract.replace(stream=old) if not isinstance(abstract, dict)
                        else {**abstract, "stream": old})
        restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        if isinstance(restored, dict):   # back in field order (a dict flattens sorted)
            restored = TrainState(**restored, model_state={})
        if stacked:
            restored = restored.replace(stream=unstack_stream(restored.stream))
        # Rebuild the exact pytree types of the template (optax NamedTuples, ...).
        leaves = jax.tree_util.tree_leaves(restored)
        treedef = jax.tree_util.tree_structure(template)
        # Scalars stay NumPy: jnp.asarray would round float64 bookkeeping (e.g. the
        # cumulative attribution sums) to float32 and break bitwise resume.
        state = jax.tree_util.tree_unflatten(
            treedef, [np.asarray(leaf) if np.ndim(leaf) == 0 else jnp.asarray(leaf)
                      for leaf in leaves])
        return state.replace(step=int(state.step), has_eigvecs=bool(state.has_eigvecs),
                             last_lambda1=float(state.last_lambda1),
                             wall_time=float(state.wall_time),
                             cum_delta_top=float(state.cum_delta_top),
                             cum_delta_bulk=float(state.cum_delta_bulk))

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
