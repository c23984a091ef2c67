"""What ``data.path`` names, as the list of files a corpus is read from.

A text file; a directory (every text file below it, at any depth); a glob (``src/**/*.py``);
a named dataset (``enwik8``, ``text8``); or nothing (Tiny Shakespeare). The files of a directory
or glob are read in sorted order of their relative paths and joined with ``SEPARATOR``, so
the model sees where one file ends and the next begins. In a directory, hidden entries (a
name starting with '.') and files with a NUL byte in their first 8 KiB (binaries such as .pyc)
are left out; every other file must be UTF-8, or the corpus is refused naming it.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DataConfig
from ..errors import CharlmError
from .datasets import DATASETS, Dataset, dataset_file, default_corpus, sha256_of, unknown_dataset

SEPARATOR = "\x1c"  # ASCII FILE SEPARATOR, between the files of a multi-file corpus
GLOB_CHARACTERS = "*?["
SNIFF_BYTES = 8192


@dataclass
class SourceFile:
    path: Path
    name: str  # relative to the directory or glob it was found in: what the run records
    size: int
    sha256: str = ""


@dataclass
class Source:
    """The files of a corpus, in reading order, and what it was called."""

    label: str
    files: list[SourceFile]
    dataset: Dataset | None = None
    left_out: list[str] = field(default_factory=list)  # binary files of a directory or glob

    @property
    def multi_file(self) -> bool:
        return self.dataset is None and (len(self.files) > 1 or self.label != str(self.files[0].path))

    def checksum(self, known: dict[str, str] | None = None) -> str:
        """The sha256 of the content: the file's own for one file; for several, of their names and sha256s.

        ``known`` maps ``stat_key``s to sha256s: a file whose path, size, mtime and inode are there is
        not read again (a gigabyte costs about a second to hash); the files read are added to it."""
        known = {} if known is None else known
        for file in self.files:
            key = stat_key(file.path)
            file.sha256 = file.sha256 or known.get(key) or sha256_of(file.path)
            known[key] = file.sha256
        if not self.multi_file:
            return self.files[0].sha256
        manifest = "".join(f"{file.name}\0{file.sha256}\n" for file in self.files)
        return hashlib.sha256(f"{SEPARATOR!r}\n{manifest}".encode("utf-8")).hexdigest()

    def manifest(self) -> list[dict]:
        """The file list a run records (for a multi-file corpus): name, size and sha256 of each."""
        return [{"name": f.name, "bytes": f.size, "sha256": f.sha256} for f in self.files] if self.multi_file else []


def stat_key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"


def exclusions(config: DataConfig) -> list[str]:
    return [pattern.strip() for pattern in config.exclude.split(",") if pattern.strip()]


def excluded(name: str, patterns: list[str]) -> bool:
    """Whether the relative path ``name``, or a directory above it, matches one of ``patterns``."""
    parts = name.split("/")
    return any(fnmatch.fnmatchcase("/".join(parts[:depth]), pattern)
               for depth in range(1, len(parts) + 1) for pattern in patterns)


def is_binary(path: Path) -> bool:
    with path.open("rb") as fh:
        return b"\x00" in fh.read(SNIFF_BYTES)


def gathered(label: str, found: list[tuple[Path, str]], patterns: list[str]) -> Source:
    """The text files among ``found`` (path, relative name), sorted by name, or a one-line refusal."""
    files, left_out = [], []
    for path, name in sorted(found, key=lambda pair: pair[1]):
        if excluded(name, patterns) or not path.is_file():
            continue
        (left_out if is_binary(path) else files).append(SourceFile(path, name, path.stat().st_size))
    if not files:
        raise CharlmError(f"{label} has no text files{f' ({len(left_out)} binary files left out)' if left_out else ''}; "
                          "point --data at a folder of UTF-8 text files")
    return Source(label, files, left_out=[file.name for file in left_out])


def directory_source(root: Path, patterns: list[str]) -> Source:
    found = [(path, path.relative_to(root).as_posix()) for path in root.rglob("*")
             if not any(part.startswith(".") for part in path.relative_to(root).parts)]
    return gathered(str(root), found, patterns)


def glob_source(pattern: str, patterns: list[str]) -> Source:
    prefix = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
    root = Path(prefix[:prefix.rfind("/") + 1] or ".")  # the folder above the first wildcard
    found = [(Path(path), Path(path).relative_to(root).as_posix()) for path in glob.glob(pattern, recursive=True)]
    return gathered(pattern, found, patterns)


def single_file(path: Path) -> Source:
    return Source(str(path), [SourceFile(path, path.name, path.stat().st_size)])


def find_source(config: DataConfig) -> Source:
    """The files ``config.path`` names, refused in one line where there are none to read."""
    name = config.path
    if not name:
        return single_file(default_corpus(config.dir))
    path = Path(name)
    if name in DATASETS and not path.exists():
        dataset = DATASETS[name]
        return Source(name, single_file(dataset_file(dataset, config.dir)).files, dataset=dataset)
    if path.is_dir():
        return directory_source(path, exclusions(config))
    if path.is_file():  # before the glob test: a file may have '[' or '*' in its name
        return single_file(path)
    if any(char in name for char in GLOB_CHARACTERS):
        return glob_source(name, exclusions(config))
    if "/" not in name and "." not in name:
        raise unknown_dataset(name)
    raise CharlmError(f"corpus file {path} not found; check the path or pass --data FILE")
