"""A run directory and its one writer.

A process that trains in a run directory holds an exclusive ``flock`` on its ``.lock`` file for
as long as it trains. The operating system drops the lock when the process ends, however it
ends, so a killed run never leaves a stale lock. A second ``train`` or ``resume`` is refused in
one line naming the process that holds it; readers (``sample``, ``eval``) take no lock: every
checkpoint is replaced atomically, so they read the last complete one.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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

    @contextmanager
    def writer(self) -> Iterator[None]:
        """Hold the directory's lock for the block: one writer at a time (see ``lock``)."""
        self.lock()
        try:
            yield
        finally:
            self.unlock()

    def lock(self) -> None:
        """Become the directory's one writer, or fail naming the process that is."""
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip()
            os.close(fd)
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise CharlmError(f"{self.path} is in use: {who} is training in it; wait for it to finish or stop it "
                              "(Ctrl-C saves last.pt), then resume") from None
        self.lock_fd = fd

    def sign_lock(self) -> None:
        """Write this process's id into the held lock, once every check has passed (a refused
        command leaves the directory as it found it)."""
        assert self.lock_fd is not None, "sign_lock needs the lock"
        os.ftruncate(self.lock_fd, 0)
        os.pwrite(self.lock_fd, f"{os.getpid()}\n".encode(), 0)

    def unlock(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # closing the descriptor releases the flock
            self.lock_fd = None

    def write_config(self, config: Config) -> None:
        (self.path / CONFIG).write_text(to_toml(config), encoding="utf-8")
