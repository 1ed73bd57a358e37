"""Who may change a run directory, and how (``harpo train``, ``eval``, ``sft``, ``demo``).

Everything here runs before Ray starts, so a refusal costs a second and changes nothing:

* the directory's lock (:mod:`services.run_lock`) is taken first and held for the command;
* a new ``train`` into a directory that holds a run is refused, or with ``--overwrite`` the
  old run is moved aside (``RUN_DIR.old-YYYYmmdd-HHMMSS``), never deleted;
* ``--resume RUN_DIR`` trains RUN_DIR, whatever ``run.output_dir`` its ``config.yaml`` names
  (a copied run directory); overrides given with it are recorded in ``config.yaml`` and in
  ``config-history.jsonl``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from services.run_dir import RunDir
from services.run_lock import LOCK_FILE, RunLock, command_line


class RunDirTaken(ValueError):
    """A new run into a directory that holds one (a ValueError: the CLI says so, exit 2)."""


def resumed_config(config, run_dir: str | Path, overrides: dict):
    """The config of ``--resume RUN_DIR``, for RUN_DIR: returns ``(config, note)``, ``note``
    saying why ``run.output_dir`` changed (None when it did not)."""
    here = Path(run_dir).resolve()
    recorded = Path(config.run.output_dir).resolve()
    if recorded == here:
        return config, None
    if "run.output_dir" in overrides:
        raise ValueError(f"--resume {run_dir} trains {run_dir}; run.output_dir cannot be set "
                         "with it (copy the run directory to train a copy)")
    config = config.model_copy(update={"run": config.run.model_copy(update={"output_dir": here})})
    note = (f"{run_dir}/config.yaml names run.output_dir {recorded} (a copied run directory); "
            f"using {here}")
    return config, note


def claim_for_training(config, *, resume: bool, overwrite: bool,
                       move_unfinished: bool = False) -> RunLock:
    """Lock ``run.output_dir`` and make sure a new run may start there; returns the held lock.

    Nothing in the directory changes here: an earlier run that ``--overwrite`` (or, with
    ``move_unfinished``, a job attempt that died before its first checkpoint) is to replace is
    moved aside by :func:`move_earlier_run` once the new run's inputs are checked."""
    root = Path(config.run.output_dir)
    lock = RunLock(root, command_line()).acquire()
    try:
        if resume and overwrite:
            raise ValueError("--overwrite starts a new run; it cannot be given with --resume")
        found = [] if resume else RunDir(root).run_files()
        if found and not (overwrite or move_unfinished):
            raise RunDirTaken(
                f"{root} already holds a run ({', '.join(found)}); nothing in it was "
                f"changed. Continue it with `harpo train --resume {root}`, train into "
                f"another directory with `--set run.output_dir=DIR`, or move the old run "
                f"aside with `--overwrite`")
    except BaseException:
        lock.release()
        raise
    return lock


def move_earlier_run(config, *, resume: bool) -> None:
    """A new run into a directory that holds one (allowed by :func:`claim_for_training`):
    the earlier run moves to ``RUN_DIR.old-…``, never deleted."""
    run = RunDir(config.run.output_dir)
    if resume or not run.run_files():
        return
    aside = run.move_aside(keep=(LOCK_FILE,))
    print(f"moved the earlier run in {run.root} to {aside}", flush=True)


def record_config(trainer, *, resume: bool, overrides: dict, note: str | None) -> None:
    """Keep ``config.yaml`` the configuration the run trains with; log the change."""
    run, text = trainer.run_dir, trainer.config.to_yaml()
    if not resume:
        run.record_config(text, command_line(), overrides, note="new run")
        return
    if run.config_path.is_file() and run.config_path.read_text() == text:
        return
    run.record_config(text, command_line(), overrides, note=note)
    what = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "run.output_dir"
    print(f"recorded the changed configuration ({what}) in {run.config_path}; "
          f"history in {run.history_path}", flush=True)


def lock_for_reading(run_dir: str | Path | None) -> RunLock | None:
    """``harpo eval``: the run directory it reads, locked if it exists (never created)."""
    if run_dir is None or not Path(run_dir).is_dir():
        return None
    return RunLock(run_dir, command_line()).acquire()


def warn(note: str | None, stream=None) -> None:
    if note:
        print(f"note: {note}", file=stream or sys.stdout, flush=True)


def claim_and_check(config, *, resume: bool, overwrite: bool, job: bool, note: str | None
                    ) -> tuple[bool, RunLock]:
    """``harpo train``'s way in: whether the run resumes, and the run directory's lock (held
    until the command ends).

    In order, each before anything in the directory changes: the output directory can hold a
    run at all; no other harpo process has it; a new run does not land on an earlier one; every
    input of the run checks out (services/preflight.py). Only then does ``--overwrite`` (or a
    job's retry, ``job``) move the earlier run aside."""
    from services.cli_run import check_before_start
    from services.preflight import check_output_dir

    resume = resume or (job and _has_checkpoint(config))
    check_output_dir(config.run.output_dir)
    lock = claim_for_training(config, resume=resume, overwrite=overwrite, move_unfinished=job)
    try:
        check_before_start(config, resume=resume)  # before Ray starts and anything is written
        move_earlier_run(config, resume=resume)
    except BaseException:
        lock.release()
        raise
    warn(note)
    return resume, lock


def _has_checkpoint(config) -> bool:
    """A job attempt resumes when the run directory, or ``run.checkpoint_uri`` (the run
    directory's volume lost), holds a checkpoint."""
    if RunDir(config.run.output_dir).latest_valid_checkpoint() is not None:
        return True
    if config.run.checkpoint_uri:
        from services.checkpoint_store import CheckpointStore

        return CheckpointStore(config.run.checkpoint_uri).latest_complete() is not None
    return False
