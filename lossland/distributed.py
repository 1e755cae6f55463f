"""Multi-process (multi-host) start-up: `jax.distributed.initialize`, when asked for.

One process per host (GPU cluster) or per TPU VM worker (pod slice). Every
process runs the *same* command; each loads the full dataset (files, or
generated from the seed, so identical everywhere) and `lossland.sharding`
places only its own devices' shards. The mesh spans every device of every
process, params are replicated, and XLA's collectives do the cross-host sums.

`maybe_initialize()` must run before anything touches a JAX backend (before
`jax.devices()`, any array, any jit). It initializes when

  * LOSSLAND_DISTRIBUTED=1 (or "auto"): `jax.distributed.initialize`, with
    coordinator/process count/process id from JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID when set, otherwise auto-detected
    (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes);
  * or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID are all
    set (explicit launch, e.g. one `ssh` per host), unless LOSSLAND_DISTRIBUTED=0.

Otherwise it does nothing and the run is single-process (one or more local
devices). Launch lines: BUILD_NOTES.md, "Data parallelism: devices, hosts, memory".
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import jax
import numpy as np

ENV_SWITCH = "LOSSLAND_DISTRIBUTED"
_TRUE = ("1", "true", "yes", "auto", "on")
_FALSE = ("0", "false", "no", "off")

_initialized = False


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name}={value!r} must be an integer.") from None


def wanted(environ=None) -> bool:
    """Whether the environment asks for a multi-process run."""
    environ = os.environ if environ is None else environ
    switch = environ.get(ENV_SWITCH, "").strip().lower()
    if switch in _FALSE:
        return False
    if switch in _TRUE:
        return True
    if switch:
        raise ValueError(f"${ENV_SWITCH}={environ[ENV_SWITCH]!r}: use 1/auto (initialize) "
                         "or 0 (single process).")
    return all(environ.get(k) for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                                        "JAX_PROCESS_ID"))


def maybe_initialize(*, coordinator_address: Optional[str] = None,
                     num_processes: Optional[int] = None, process_id: Optional[int] = None,
                     local_device_ids: Optional[Sequence[int]] = None,
                     force: bool = False) -> bool:
    """Calls `jax.distributed.initialize` when the environment (or `force`) asks for it.

    Explicit arguments win over JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID; whatever is still unset is auto-detected by JAX. Returns
    True when this process is part of a multi-process run. Idempotent.
    """
    global _initialized
    if _initialized:
        return True
    if not (force or wanted()):
        return False
    from jax._src import xla_bridge  # no public "is the backend up?" query
    if xla_bridge.backends_are_initialized():
        raise RuntimeError("lossland.distributed.maybe_initialize() must run before any JAX "
                           "computation (call it first thing in main()).")
    kwargs = dict(
        coordinator_address=coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
        or None,
        num_processes=num_processes if num_processes is not None
        else _env_int("JAX_NUM_PROCESSES"),
        process_id=process_id if process_id is not None else _env_int("JAX_PROCESS_ID"),
    )
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})
    _initialized = True
    return True


def is_main_process() -> bool:
    """True on the process that writes records (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op in a single process).

    Used around the steps only process 0 performs (creating the workdir,
    writing config.json, truncating records on resume), so no process reads
    a half-prepared workdir or races ahead of the files it needs.
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on at least one of them.

    Control flow that depends on process-local events (a SIGTERM that reached
    one host first) must be agreed on, or the processes would stop issuing the
    same collectives and hang.
    """
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
    return bool(np.any(flags))


def describe() -> dict:
    """Process and device layout, for logs and config.json."""
    return {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "local_devices": [str(d) for d in jax.local_devices()],
            "global_device_count": jax.device_count(), "backend": jax.default_backend()}
