"""Checkpoints in object storage (``run.checkpoint_uri``): a copy that outlives the run
directory's volume.

::

    URI/
      config.yaml              the run's resolved configuration (what --resume needs)
      step-000010/             a checkpoint, file for file as in RUN_DIR/checkpoints/
        ...
        MANIFEST.json          uploaded last: a checkpoint without it is incomplete

Every checkpoint is uploaded once it is complete and verified locally (its manifest written).
After the upload the store's manifest is read back and compared with the local one, and
every file it names must be there with the local file's size; only then is the upload
counted done and older checkpoints beyond ``run.keep_checkpoints`` deleted from the store. A
resume that finds no valid checkpoint in the run directory downloads the newest complete one
and verifies every file's sha256 against its manifest before it is used (a bad one is
skipped with a message, like a bad local one).

The store never interprets a checkpoint beyond its manifest: whatever files a learner
strategy writes (sharded or not) travel as they are.

Uploads are bounded (:class:`Uploader`): a failed or timed-out upload is logged and counted,
the run goes on, and the next checkpoint is uploaded in full.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from services.run_dir import MANIFEST, RunDir

log = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"


class CheckpointStore:
    """The checkpoints under one pyarrow.fs URI."""

    def __init__(self, uri: str):
        import pyarrow.fs as pafs

        self.uri = uri
        self.fs, self.root = pafs.FileSystem.from_uri(uri)
        self._local = pafs.LocalFileSystem()

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    # ------------------------------------------------------------------ reading

    def checkpoints(self) -> list[str]:
        """Names of the checkpoint directories in the store (``step-*``), oldest first."""
        import pyarrow.fs as pafs

        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        except FileNotFoundError:
            return []
        return sorted(i.base_name for i in infos
                      if i.type == pafs.FileType.Directory and i.base_name.startswith("step-"))

    def _read(self, path: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        except (FileNotFoundError, OSError):
            return None

    def manifest(self, name: str) -> dict | None:
        data = self._read(self._path(name, MANIFEST))
        try:
            return None if data is None else json.loads(data)
        except ValueError:
            return None

    def latest_complete(self) -> str | None:
        """The newest checkpoint whose manifest is in the store (its files are checked when it
        is downloaded)."""
        for name in reversed(self.checkpoints()):
            if self.manifest(name) is not None:
                return name
        return None

    def config_text(self) -> str | None:
        data = self._read(self._path(CONFIG_NAME))
        return None if data is None else data.decode()

    # ------------------------------------------------------------------ writing

    def _put(self, source: Path, dest: str) -> None:
        with open(source, "rb") as src, self.fs.open_output_stream(dest) as out:
            shutil.copyfileobj(src, out, 1 << 22)

    def upload(self, checkpoint: Path, keep: int, config_path: Path | None = None) -> str:
        """Copy ``checkpoint`` (a complete local checkpoint) into the store, manifest last,
        check it there, then prune to the newest ``keep``; returns its URI."""
        manifest_bytes = (checkpoint / MANIFEST).read_bytes()
        files = json.loads(manifest_bytes)["files"]
        dest = self._path(checkpoint.name)
        self.fs.delete_dir_contents(dest, missing_dir_ok=True)  # a step trained again
        self.fs.create_dir(dest)
        for rel in sorted(files):
            parent = os.path.dirname(rel)
            if parent:
                self.fs.create_dir(self._path(checkpoint.name, parent))
            self._put(checkpoint / rel, self._path(checkpoint.name, rel))
        self._put(checkpoint / MANIFEST, self._path(checkpoint.name, MANIFEST))
        problem = self._check_upload(checkpoint, manifest_bytes, files)
        if problem is not None:
            raise OSError(f"{self.uri}/{checkpoint.name} does not match the checkpoint after "
                          f"upload: {problem}")
        if config_path is not None and config_path.is_file():
            self._put(config_path, self._path(CONFIG_NAME))
        self.prune(keep)
        return f"{self.uri}/{checkpoint.name}"

    def _check_upload(self, checkpoint: Path, manifest_bytes: bytes, files: dict) -> str | None:
        if self._read(self._path(checkpoint.name, MANIFEST)) != manifest_bytes:
            return "its MANIFEST.json differs"
        infos = self.fs.get_file_info([self._path(checkpoint.name, rel) for rel in files])
        for rel, info in zip(files, infos):
            size = (checkpoint / rel).stat().st_size
            if info.size != size:
                return f"{rel} has {info.size} bytes in the store, {size} here"
        return None

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` checkpoints from the store (run.keep_checkpoints)."""
        removed = self.checkpoints()[:-keep]
        for name in removed:
            self.fs.delete_dir(self._path(name))
        return removed

    # ------------------------------------------------------------------ resume

    def download_latest(self, run_dir: RunDir) -> Path | None:
        """Download the newest checkpoint that verifies into ``run_dir``'s checkpoints; None if
        the store holds none."""
        run_dir.create()
        for name in reversed(self.checkpoints()):
            manifest = self.manifest(name)
            if manifest is None:
                log.warning("skipping %s/%s: no MANIFEST.json (incomplete upload)", self.uri, name)
                continue
            tmp = run_dir.checkpoints / f".tmp-{name}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            for rel in [*manifest["files"], MANIFEST]:
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with self.fs.open_input_stream(self._path(name, rel)) as src, \
                            open(target, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 22)
                except (FileNotFoundError, OSError) as exc:
                    log.warning("skipping %s/%s: %s", self.uri, name, exc)
                    break
            problem = run_dir.verify(tmp)
            if problem is not None:
                log.warning("skipping %s/%s: %s", self.uri, name, problem)
                shutil.rmtree(tmp, ignore_errors=True)
                continue
            final = run_dir.checkpoints / name
            os.replace(tmp, final)
            log.warning("downloaded checkpoint %s/%s into %s", self.uri, name, final)
            return final
        return None


def latest_checkpoint(run_dir: RunDir, uri: str | None) -> Path | None:
    """The run directory's latest valid checkpoint or, when it has none and ``uri`` is set,
    the store's newest valid one, downloaded into it."""
    checkpoint = run_dir.latest_valid_checkpoint()
    if checkpoint is None and uri:
        checkpoint = CheckpointStore(uri).download_latest(run_dir)
    return checkpoint


class Uploader:
    """Uploads one checkpoint at a time, each bounded by ``timeout_s``.

    The driver waits for the upload (so a checkpoint the run reports is in the store) but no
    longer than ``timeout_s``; an error or a time-out is logged, reported through
    ``on_result("failed" | "timeout")`` and the run goes on. An upload still running when the
    next checkpoint comes is left to finish and that checkpoint is not uploaded; the one after
    it is."""

    def __init__(self, store: CheckpointStore, timeout_s: float,
                 on_result: Callable[[str], None] | None = None):
        self.store, self.timeout_s = store, timeout_s
        self._on_result = on_result or (lambda result: None)
        self._thread: threading.Thread | None = None

    def upload(self, checkpoint: Path, keep: int, config_path: Path | None) -> bool:
        if self._thread is not None and self._thread.is_alive():
            log.error("checkpoint upload to %s still running after %g s "
                      "(run.checkpoint_upload_timeout_s); %s not uploaded, the next one will be",
                      self.store.uri, self.timeout_s, checkpoint.name)
            self._on_result("skipped")
            return False
        outcome: dict = {}

        def work():
            try:
                outcome["uri"] = self.store.upload(checkpoint, keep, config_path)
            except BaseException as exc:  # noqa: BLE001 - reported below
                outcome["error"] = exc

        t0 = time.monotonic()
        self._thread = threading.Thread(target=work, name="harpo-checkpoint-upload",
                                        daemon=True)
        self._thread.start()
        self._thread.join(self.timeout_s)
        if self._thread.is_alive():
            log.error("checkpoint upload of %s to %s did not finish in %g s "
                      "(run.checkpoint_upload_timeout_s); training goes on, the next checkpoint "
                      "is uploaded", checkpoint.name, self.store.uri, self.timeout_s)
            self._on_result("timeout")
            return False
        if "error" in outcome:
            log.error("checkpoint upload of %s to %s failed: %s; training goes on, the next "
                      "checkpoint is uploaded", checkpoint.name, self.store.uri,
                      outcome["error"])
            self._on_result("failed")
            return False
        log.info("uploaded %s in %.1f s", outcome["uri"], time.monotonic() - t0)
        self._on_result("ok")
        return True
