"""Run directories and records: config.json, metrics.jsonl, checkpoints.

Invariants:
  * metrics.jsonl is append-only, one JSON object per line, flushed and
    fsynced per row, so a crash loses at most the row being written;
  * a reader skips a partial (unterminated or unparsable) last line, with a
    warning, and never fails on it; resume repairs it (`repair_torn_last_line`),
    with a message, before anything is appended;
  * on resume, rows after the checkpoint step are dropped (rewritten through a
    temporary file and an atomic rename) and recomputed.

Must not: build models, run steps or decide whether a run resumes
(lifecycle.py does); `check_workdir` only reads.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
DENSITY_FILE = "density.jsonl"   # SLQ spectral-density snapshots, one row per snapshot
CHECKPOINT_DIR = "checkpoints"
PLOTS_DIR = "plots"
# What a run killed before its config.json was renamed into place can leave:
# the half-written config (write_json_atomic's temporary) and nothing else.
START_LEFTOVERS = frozenset({CONFIG_FILE + ".tmp"})


class WorkdirError(ValueError):
    """The workdir cannot be used as asked; the message says how to fix it."""


def check_workdir(workdir: str | Path, *, overwrite: bool, resume: bool = False) -> Path:
    """Validates the workdir before any compute. Writes nothing.

    A workdir that exists and is not empty is refused unless --overwrite
    (start afresh) or --resume. --resume continues from the last checkpoint, or
    starts at step 0 where the run never got that far (resume-or-start); it is
    refused on a non-empty workdir that holds no config.json, since that is not
    (the start of) a lossland run.
    """
    path = Path(workdir)
    if overwrite and resume:
        raise WorkdirError("--overwrite and --resume are exclusive: --overwrite deletes the "
                           f"records in {path}, --resume continues them. Pick one.")
    if path.exists() and not path.is_dir():
        raise WorkdirError(f"--workdir={path} exists and is not a directory; choose another path.")
    contents = sorted(p.name for p in path.iterdir()) if path.exists() else []
    if resume and contents and not (path / CONFIG_FILE).exists() \
            and not set(contents) <= START_LEFTOVERS:
        raise WorkdirError(f"--resume: --workdir={path} holds {contents[:5]} but no "
                           f"{CONFIG_FILE}, so it holds no lossland run to resume (nor the "
                           "start of one). Choose another --workdir, or pass --overwrite "
                           "instead of --resume to replace its contents.")
    if contents and not (overwrite or resume):
        raise WorkdirError(f"--workdir={path} exists and is not empty. Pass --overwrite to "
                           "replace its records, --resume to continue the run from its last "
                           "checkpoint, or choose a new --workdir.")
    return path


def is_partial_start(path: Path) -> bool:
    """True when `path` is missing or holds only what a run killed before config.json leaves."""
    return not (path / CONFIG_FILE).exists() and (
        not path.exists() or {p.name for p in path.iterdir()} <= START_LEFTOVERS)


def prepare_workdir(path: Path, *, overwrite: bool) -> None:
    """Creates the workdir; with overwrite, removes the old records first."""
    import shutil

    if overwrite and path.exists():
        for child in path.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    path.mkdir(parents=True, exist_ok=True)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    """Versions and devices, for config.json and reports."""
    import flax
    import jax
    import jaxlib
    import optax

    return {
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                     "optax": optax.__version__, "numpy": np.__version__},
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "process_count": jax.process_count(),
        "git_commit": git_commit(),
        "host": platform.node(),
    }


def write_config(path: Path, flags: dict, extra: dict | None = None) -> None:
    config = {"flags": flags, "start_time": datetime.datetime.now().isoformat(timespec="seconds"),
              **environment(), **(extra or {})}
    write_json_atomic(path / CONFIG_FILE, config)


def read_config_flags(workdir: Path) -> dict:
    path = Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise WorkdirError(f"{path} is missing; the workdir holds no run to resume.")
    return json.loads(path.read_text())["flags"]


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w") as f:
        json.dump(to_jsonable(obj), f, indent=2, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def to_jsonable(value: Any) -> Any:
    """numpy/jax scalars and arrays → plain Python; NaN/inf → None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return to_jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.bool_,)):
        return bool(value)
    return value


class MetricsWriter:
    """Appends rows to a .jsonl file; each row is flushed and fsynced.

    The file is opened on the first write, so a writer that never writes
    leaves no empty file behind. A disabled writer (every process but the
    first of a multi-process run) writes nothing.
    """

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self._file = None

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self._file = open(self.path, "a")
        self._file.write(json.dumps(to_jsonable(row), allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(path: str | Path) -> list[dict]:
    """Reads metrics.jsonl (a file or a workdir), skipping a partial last line with a warning."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    lines = [line for line in path.read_text().split("\n") if line.strip()]
    rows = []
    for index, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if index == len(lines) - 1:
                warnings.warn(f"{path}: skipping a partial last line ({len(line)} chars); "
                              "the run was interrupted mid-write.")
                continue
            raise ValueError(f"{path}: line {index + 1} is not valid JSON: {line[:80]!r}")
    return rows


def truncate_rows_before(path: Path, step: int) -> list[dict]:
    """Keeps only the rows with step < `step` and no final status; returns them.

    Used by resume from a checkpoint at `step`: rows from that step on are
    recomputed. Atomic (write to a temporary file, then rename).
    """
    kept = [r for r in read_metrics(path) if r.get("step", -1) < step and "status" not in r]
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w") as f:
        for row in kept:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return kept


def repair_torn_last_line(path: Path) -> int:
    """Cuts a half-written last line (a crash mid-write) off a .jsonl file; returns its length.

    A torn line is whatever follows the last newline (rows are written whole,
    newline last), or a final line that does not parse. Its row is never kept:
    the row belongs to a step at or after the checkpoint resume starts from,
    so it is recomputed. Returns 0 when the file is whole.
    """
    raw = path.read_bytes()
    keep = raw.rfind(b"\n") + 1   # everything up to and with the last newline
    if keep == len(raw):            # ends in a newline: is the last line JSON?
        previous = raw.rfind(b"\n", 0, max(len(raw) - 1, 0)) + 1
        last = raw[previous:].strip()
        try:
            if last:
                json.loads(last)
            return 0
        except (json.JSONDecodeError, UnicodeDecodeError):
            keep = previous
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return len(raw) - keep


def scalar_rows(rows: Iterable[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows that hold a finite `key`."""
    pairs = [(r["step"], r[key]) for r in rows
             if "step" in r and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    if not pairs:
        return np.zeros(0, int), np.zeros(0)
    steps, values = zip(*pairs)
    return np.asarray(steps), np.asarray(values, float)
