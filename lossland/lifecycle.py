"""The life of a run directory: statuses, resume, config changes, signals.

Owns: the run statuses and their exit codes, what a workdir's records say
about the run in it (`run_status`), which flags may change on resume
(`config_changes`, `check_resume`), repairing what a crash left
(`repair_after_crash`: unfinished checkpoints, torn last lines), restoring the
state to resume from, or step 0 where no checkpoint was committed
(`resume_state`),
what `ensure_run` does with a workdir (`plan_ensure_run`), and turning
SIGINT/SIGTERM into a flag the loop checks.

Must not: build models or data, or run training steps; the loop (loop.py)
and the build (experiment.py) do that.
"""

from __future__ import annotations

import json

import dataclasses
import signal
import sys
from pathlib import Path
from typing import Optional

from lossland import checkpoints, config as config_lib, distributed, records

STATUS_FINISHED, STATUS_DIVERGED, STATUS_INTERRUPTED = "finished", "diverged", "interrupted"
EXIT_CODES = {STATUS_FINISHED: 0, STATUS_DIVERGED: 3, STATUS_INTERRUPTED: 130}

# Flags that may differ when a run is resumed: they change neither the
# trajectory nor its records.
RESUMABLE_CHANGES = frozenset({"resume", "overwrite", "steps", "workdir", "checkpoint_every",
                               "plots"})


@dataclasses.dataclass
class RunResult:
    status: str
    step: int
    workdir: Path
    last_row: dict
    message: str = ""
    action: str = "ran"   # what ensure_run did: ran, resumed, skipped (finished|diverged)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]


class SignalFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks, so state is saved first."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not in the main thread: signals stay as they are
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def run_status(workdir: str | Path) -> Optional[str]:
    """The final status of the run in `workdir`, or None if it never ended (or never began)."""
    path = Path(workdir) / records.METRICS_FILE
    if not path.exists():
        return None
    rows = records.read_metrics(path)
    return rows[-1].get("status") if rows else None


def config_changes(workdir: Path, cfg: config_lib.RunConfig) -> dict:
    """{flag: (saved, now)} for the flags that differ from the run saved in workdir."""
    saved = records.read_config_flags(workdir)
    # Compared as config.json holds them (a tuple flag reads back as a list).
    now = json.loads(json.dumps(records.to_jsonable(cfg.asdict())))
    return {k: (saved.get(k), v) for k, v in now.items()
            if k not in RESUMABLE_CHANGES and saved.get(k, v) != v}


def describe_changes(changes: dict) -> str:
    return ", ".join(f"--{k} was {a!r}, now {b!r}" for k, (a, b) in changes.items())


def plan_ensure_run(cfg: config_lib.RunConfig) -> tuple[Optional[RunResult],
                                                         Optional[config_lib.RunConfig]]:
    """What ensure_run does with cfg's workdir: (skipped result, None) or (None, cfg to run).

    Finished and diverged runs are kept (skipped), except that a run that
    finished at a smaller --steps is extended; interrupted or crashed ones
    resume from their checkpoint. A workdir holding a run with other settings
    is refused unless cfg.overwrite.
    """
    workdir = Path(cfg.workdir)
    status = None if cfg.overwrite else run_status(workdir)
    if not cfg.overwrite and (workdir / records.CONFIG_FILE).exists():
        changes = config_changes(workdir, cfg)
        if changes:
            raise config_lib.ConfigError(
                f"{workdir} holds a run with other settings ({describe_changes(changes)}). "
                "Pass --overwrite to redo it, or use another --workdir.")
    if status in (STATUS_FINISHED, STATUS_DIVERGED):
        last = records.read_metrics(workdir)[-1]
        extend = (status == STATUS_FINISHED and last.get("stop_reason") == "max_steps"
                  and last["step"] < cfg.steps)
        if not extend:  # a longer --steps resumes from the final checkpoint instead
            return RunResult(status=status, step=last["step"], workdir=workdir,
                             last_row=last, message=f"already {status}; skipped",
                             action=f"skipped ({status})"), None
        status = STATUS_INTERRUPTED
    has_checkpoint = bool(checkpoints.committed_steps(workdir))
    resume = not cfg.overwrite and has_checkpoint and status in (None, STATUS_INTERRUPTED)
    overwrite = cfg.overwrite or (workdir.exists() and not resume)
    return None, cfg.replace(resume=resume, overwrite=overwrite)


def check_resume(workdir: Path, cfg: config_lib.RunConfig) -> None:
    """Refuses --resume where the saved run's flags differ in one that changes the trajectory.

    Reads only; run before the experiment is built. A workdir without a
    config.json passed records.check_workdir as a partial start: nothing to compare.
    """
    if not (workdir / records.CONFIG_FILE).exists():
        return
    check_sources_unchanged(workdir, cfg)
    changes = config_changes(workdir, cfg)
    if changes:
        raise config_lib.ConfigError(
            f"--resume: flags differ from the run in {workdir}: {describe_changes(changes)}. "
            "Resume with the original flags (only --steps, --checkpoint_every and --plots "
            "may change), or pass --overwrite instead of --resume to start afresh.")


def sources(exp) -> dict:
    """config.json's record of where plug-ins came from: {"model_source", "dataset_source"}."""
    from lossland import data as data_lib
    found = {"model_source": exp.model.source,
             "dataset_source": data_lib.source(exp.cfg.dataset, exp.cfg.num_classes)}
    return {key: value for key, value in found.items() if value}


def check_sources_unchanged(workdir: Path, cfg: config_lib.RunConfig) -> None:
    """Refuses --resume when the file of the saved run's plug-in model or data changed (sha256)."""
    from lossland import data as data_lib, models
    saved = json.loads((workdir / records.CONFIG_FILE).read_text())
    current = {"model": lambda: models.load_factory(cfg.model)[1],
               "dataset": lambda: data_lib.source(cfg.dataset, cfg.num_classes)}
    for flag, source_now in current.items():
        before, spec = saved.get(f"{flag}_source"), getattr(cfg, flag)
        if not before or before.get("spec") != spec:
            continue  # no plug-in then, or another one now (config_changes names it)
        try:
            now = source_now()
        except (models.ModelError, data_lib.DataError) as e:
            raise config_lib.ConfigError(f"--resume: {e}") from None
        if now["sha256"] != before.get("sha256"):
            raise config_lib.ConfigError(
                f"--resume: the {flag} --{flag}={spec} changed since the run in {workdir} "
                f"started: {now['file']} had sha256 {str(before.get('sha256'))[:12]}…, now "
                f"{str(now['sha256'])[:12]}…. Restore that file, or pass --overwrite instead "
                "of --resume to start afresh.")


def resume_state(workdir: Path, cfg: config_lib.RunConfig, template):
    """The state to continue from, after repairing what a crash left; drops rows to recompute.

    Resume-or-start: with no committed checkpoint (a kill before the first one
    was finalized), the run restarts from `template`, the step-0 state, with
    the saved config, and every row is recomputed.
    """
    check_resume(workdir, cfg)
    if distributed.is_main_process():
        repair_after_crash(workdir)
    distributed.barrier("lossland:crash-repaired")
    state = checkpoints.CheckpointManager(workdir).restore_latest(template)
    step = 0 if state is None else int(state.step)
    if distributed.is_main_process():  # the others wait at the workdir-ready barrier
        for name in (records.METRICS_FILE, records.DENSITY_FILE):
            if (workdir / name).exists():
                records.truncate_rows_before(workdir / name, step)
        if state is None:
            print(f"--resume: no committed checkpoint in {workdir / records.CHECKPOINT_DIR}; "
                  f"starting {workdir} from step 0 with its saved config", file=sys.stderr)
        else:
            print(f"resuming {workdir} from step {step}", file=sys.stderr)
    return template if state is None else state


def repair_after_crash(workdir: Path) -> dict:
    """Removes unfinished checkpoints and cuts torn last lines, saying so on stderr.

    Returns {"checkpoints_removed": [names], "torn_lines_repaired": count}.
    """
    removed = checkpoints.remove_uncommitted(workdir)
    for name in removed:
        print(f"--resume: removed {workdir / records.CHECKPOINT_DIR / name}: a checkpoint "
              f"without orbax's commit marker ({checkpoints.COMMIT_MARKER}), left by a crash "
              "mid-save", file=sys.stderr)
    torn = 0
    for name in (records.METRICS_FILE, records.DENSITY_FILE):
        if (workdir / name).exists():
            cut = records.repair_torn_last_line(workdir / name)
            if cut:
                torn += 1
                print(f"--resume: repaired {workdir / name}: cut a torn last line ({cut} "
                      "bytes) left by a crash mid-write; its row is recomputed",
                      file=sys.stderr)
    return {"checkpoints_removed": removed, "torn_lines_repaired": torn}
