"""One harpo process at a time in a directory: ``DIR/.harpo.lock``.

``harpo train``, ``eval``, ``sft`` (its ``--out``) and ``demo`` (its ``--workdir``) hold the
lock for their whole run. The lock is an ``fcntl.flock`` on the file, so the kernel drops it
when the process dies however it dies; the file records who holds it (host, pid, start time,
command) so that a refusal can name the holder. The holder removes the file on exit.

A file whose lock is free was left by a process that did not get to remove it (killed). If it
names a process of this host that is gone, it is taken over with a message. If it names
another host, that process may still run there on a file system whose locks this host does
not see: refused, naming it, until someone who knows removes the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

LOCK_FILE = ".harpo.lock"


class RunLocked(ValueError):
    """Another harpo process holds the directory (a ValueError: the CLI reports it, exit 2)."""


def command_line() -> str:
    argv = list(sys.argv)
    if argv and (argv[0].endswith("services/cli.py") or argv[0] == "-m"
                 or Path(argv[0]).name in ("harpo", "cli.py")):
        argv[0] = "harpo"
    return " ".join(argv)


def describe(holder: dict) -> str:
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since "
            f"{holder.get('since', '?')}, command `{holder.get('command', '?')}`")


def _read(path: Path) -> dict | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return {} if text.strip() else None
    return holder if isinstance(holder, dict) else {}


class RunLock:
    """The lock on ``directory`` (created if missing); :meth:`release` or use as a context."""

    def __init__(self, directory: str | Path, command: str | None = None):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.command = command or command_line()
        self._fd: int | None = None
        self.took_over: dict | None = None  # the record of a dead holder this lock replaced
        self._created = False  # the directory was made for the lock: removed again if empty

    def acquire(self) -> RunLock:
        self._created = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = _read(self.path) or {}
                raise RunLocked(
                    f"{self.directory} is in use by another harpo process ({describe(holder)}); "
                    f"wait for it to finish or stop it (lock: {self.path})") from None
            # The holder before us may have removed the file between our open and our lock:
            # then we hold a lock on a file nobody else can see; open the path again.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            break
        try:
            self._check_leftover(fd)
        except BaseException:
            os.close(fd)
            self._remove_if_created()
            raise
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
                  "command": self.command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def _check_leftover(self, fd: int) -> None:
        """The lock is ours; a record in the file is a holder that died without cleaning up."""
        size = os.fstat(fd).st_size
        if not size:
            return
        holder = _read(self.path) or {}
        host = holder.get("host")
        if host not in (None, socket.gethostname()):
            raise RunLocked(
                f"{self.directory} has a lock left by {describe(holder)}, on another host: "
                f"if that process is gone, remove {self.path} and try again")
        # Same host, lock free: its process is gone (or its pid was reused by another
        # process, which does not hold the lock either).
        self.took_over = holder
        print(f"harpo: taking over the lock on {self.directory} left by a process that is gone "
              f"({describe(holder)})", file=sys.stderr, flush=True)

    def release(self) -> None:
        if self._fd is None:
            return
        # removed while still held: whoever opens the path next gets a new file
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        os.close(self._fd)
        self._fd = None
        self._remove_if_created()

    def _remove_if_created(self) -> None:
        """A command that made the directory for its lock and then wrote nothing there (it
        was refused, or failed before starting) leaves no directory behind."""
        if self._created:
            with contextlib.suppress(OSError):  # not empty: it holds what the command made
                self.directory.rmdir()

    def __enter__(self) -> RunLock:
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def hold(*directories: str | Path, command: str | None = None) -> Iterator[list[RunLock]]:
    """Hold the lock of every directory (in order) for the ``with`` block."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(RunLock(d, command)) for d in directories]
