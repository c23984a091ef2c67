"""A run directory and its one writer.

A process that trains in a run directory holds an exclusive ``flock`` on the directory itself
for as long as it trains. Taking it writes nothing, so a refused command leaves the directory
byte for byte as it was; the operating system drops it when the process ends, however it ends,
so a killed run never leaves a stale lock. Once its checks pass, the writer signs its process
id into ``.lock``, and a second ``train`` or ``resume`` is refused in one line naming it.
Readers (``sample``, ``eval``) take no lock: every checkpoint is replaced atomically, so they
read the last complete one.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..config import Config, to_toml
from ..errors import CharlmError

LAST, BEST, CONFIG, LOCK = "last.pt", "best.pt", "config.toml", ".lock"


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock_fd: int | None = None

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def best(self) -> Path:
        return self.path / BEST

    def holds_run(self) -> bool:
        return self.last.exists() or self.best.exists()

    def refuse_existing_run(self) -> None:
        """A new run never overwrites another: one line pointing at resume instead."""
        if self.holds_run():
            raise CharlmError(f"{self.path} already holds a run; continue it with charlm train --resume {self.path} "
                              "(charlm.resume in Python) or choose another --out")

    def require_last(self) -> Path:
        if not self.last.is_file():
            raise CharlmError(f"cannot resume: {self.path} holds no {LAST}; start a new run with --out {self.path}")
        return self.last

    def create(self) -> None:
        """Make the directory, or say in one line why it cannot be written."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise CharlmError(f"cannot write to the run directory {self.path} ({err.strerror or err}); choose another --out") from None

    def lock(self) -> None:
        """Become the directory's one writer, or fail naming the process that is."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CharlmError(f"{self.path} is in use: {self.holder()} is training in it; wait for it to finish or "
                              "stop it (Ctrl-C saves last.pt), then resume") from None
        self.lock_fd = fd

    def in_use(self) -> bool:
        """Whether a process holds the lock (trains here) at this moment; takes nothing."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def holder(self) -> str:
        """Who holds the lock, as its signature says."""
        try:
            signed = (self.path / LOCK).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            signed = ""
        return f"process {signed}" if signed.isdigit() else "another process"

    def sign_lock(self) -> None:
        """Write this process's id into ``.lock``, once every check has passed (a refused
        command leaves the directory as it found it)."""
        assert self.lock_fd is not None, "sign_lock needs the lock"
        (self.path / LOCK).write_text(f"{os.getpid()}\n", encoding="utf-8")

    def unlock(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # closing the descriptor releases the flock
            self.lock_fd = None

    def write_config(self, config: Config) -> None:
        (self.path / CONFIG).write_text(to_toml(config), encoding="utf-8")
