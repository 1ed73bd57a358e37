"""A run's directory: resolved config, per-step metrics and checkpoints.

::

    RUN_DIR/
      config.yaml                    the resolved configuration
      config-history.jsonl           when the configuration was set or changed: time, command,
                                     the overrides (``harpo train --resume RUN_DIR --set ...``)
      metrics.jsonl                  one JSON object per training step
      eval.jsonl                     one JSON object per evaluation during training
                                     (run.eval_every), keyed by completed steps
      checkpoints/
        step-000010/                 state after 10 completed steps
          model/                     HF format (safetensors) + tokenizer, and the
                                     optimizer state (optimizer.safetensors, optimizer.json)
          estimator.json, sampler.json, trainer.json
          MANIFEST.json              sha256 of every file, written last
      .harpo.lock                    while a harpo process uses the directory (services.run_lock)

A checkpoint is written into a temporary directory (``checkpoints/.tmp-step-N-PID``) and renamed
into place, so a crash leaves either the old set or the new one, never half a checkpoint; the
temporary directory a killed writer leaves is removed when the run resumes. Loading verifies
the manifest and skips (with a message) a checkpoint that does not match it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
ESTIMATOR_STATE = "estimator.json"  # the advantage estimator's state (HARPO's modulator)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config_path = self.root / "config.yaml"
        self.metrics_path = self.root / "metrics.jsonl"
        self.eval_path = self.root / "eval.jsonl"
        self.checkpoints = self.root / "checkpoints"
        self.history_path = self.root / "config-history.jsonl"

    def create(self) -> None:
        self.checkpoints.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ ownership

    def run_files(self) -> list[str]:
        """What makes the directory hold a run: its config, metrics or checkpoints (empty
        list: nothing a new run would overwrite)."""
        found = [p.name for p in (self.config_path, self.metrics_path, self.eval_path)
                 if p.exists()]
        if self.list_checkpoints():
            found.append("checkpoints/")
        return found

    def move_aside(self, keep: tuple[str, ...] = ()) -> Path:
        """Move everything in the directory (but ``keep``) into a new sibling
        ``NAME.old-YYYYmmdd-HHMMSS``; returns it. Nothing is deleted."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.root.with_name(f"{self.root.name}.old-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = self.root.with_name(f"{self.root.name}.old-{stamp}-{n}")
        aside.mkdir()
        for entry in sorted(self.root.iterdir()):
            if entry.name not in keep:
                os.replace(entry, aside / entry.name)
        return aside

    def record_config(self, config_yaml: str, command: str, overrides: dict,
                      note: str | None = None) -> None:
        """Write ``config.yaml`` and append what set it to ``config-history.jsonl``."""
        row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command,
               "overrides": overrides}
        if note:
            row["note"] = note
        tmp = self.config_path.with_suffix(".yaml.tmp")
        tmp.write_text(config_yaml)
        os.replace(tmp, self.config_path)
        self._append(self.history_path, row)

    # ------------------------------------------------------------------ metrics

    @staticmethod
    def _append(path: Path, row: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")

    @staticmethod
    def _read(path: Path) -> list[dict]:
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    @staticmethod
    def _rewrite(path: Path, rows: list[dict]) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        os.replace(tmp, path)

    def append_metrics(self, row: dict) -> None:
        self._append(self.metrics_path, row)

    def read_metrics(self) -> list[dict]:
        return self._read(self.metrics_path)

    def append_eval(self, row: dict) -> None:
        self._append(self.eval_path, row)

    def read_evals(self) -> list[dict]:
        return self._read(self.eval_path)

    def clear_metrics(self) -> None:
        """A fresh run: no metric or evaluation rows from an earlier one."""
        for path in (self.metrics_path, self.eval_path):
            path.unlink(missing_ok=True)

    def truncate_metrics(self, first_step: int) -> None:
        """Drop rows of steps >= first_step (they are about to be trained again) and the
        evaluations made after more than first_step steps (they will be made again)."""
        self._rewrite(self.metrics_path, [r for r in self.read_metrics() if r["step"] < first_step])
        self._rewrite(self.eval_path, [r for r in self.read_evals() if r["step"] <= first_step])

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_path(self, completed_steps: int) -> Path:
        return self.checkpoints / f"step-{completed_steps:06d}"

    def save_checkpoint(self, completed_steps: int, write: Callable[[Path], None],
                        keep: int) -> Path:
        """Call ``write(tmp_dir)`` to fill a checkpoint, seal it with a manifest, rename it in."""
        final = self.checkpoint_path(completed_steps)
        tmp = self.checkpoints / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            write(tmp)
        except BaseException:  # e.g. a learner died while saving: no half checkpoint stays
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): _sha256(p) for p in files}
        write_json(tmp / MANIFEST, {"completed_steps": completed_steps, "files": manifest})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        self._prune(keep)
        return final

    def remove_leftovers(self) -> list[Path]:
        """Remove the ``checkpoints/.tmp-step-*`` directories a killed writer left (never
        renamed into place, so never a checkpoint); returns them. Nothing else in the run
        directory is touched."""
        if not self.checkpoints.is_dir():
            return []
        removed = sorted(p for p in self.checkpoints.glob(".tmp-step-*") if p.is_dir())
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
            log.warning("removed %s: a checkpoint whose writing was cut short", path)
        return removed

    def _prune(self, keep: int) -> None:
        for old in self.list_checkpoints()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def list_checkpoints(self) -> list[Path]:
        if not self.checkpoints.exists():
            return []
        return sorted(p for p in self.checkpoints.glob("step-*") if p.is_dir())

    def verify(self, path: Path) -> str | None:
        """None if the checkpoint matches its manifest, else what is wrong."""
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            return "no MANIFEST.json (incomplete write)"
        try:
            manifest = json.loads(manifest_path.read_text())["files"]
        except (ValueError, KeyError) as exc:
            return f"unreadable MANIFEST.json ({exc})"
        for name, digest in manifest.items():
            file = path / name
            if not file.is_file():
                return f"missing file {name}"
            if _sha256(file) != digest:
                return f"file {name} does not match its checksum"
        return None

    def latest_valid_checkpoint(self) -> Path | None:
        for path in reversed(self.list_checkpoints()):
            problem = self.verify(path)
            if problem is None:
                return path
            log.warning("skipping checkpoint %s: %s", path, problem)
        return None


def read_estimator_state(checkpoint: Path) -> dict:
    """The estimator's state in a checkpoint (``modulator.json``, or the ``estimator`` entry
    of ``trainer.json``, in checkpoints written before every estimator's state had one file)."""
    for name in (ESTIMATOR_STATE, "modulator.json"):
        if (checkpoint / name).is_file():
            return json.loads((checkpoint / name).read_text())
    return json.loads((checkpoint / "trainer.json").read_text()).get("estimator") or {}
