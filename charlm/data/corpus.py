"""Corpora: encode the text of a source (a file, a directory, a glob, a named dataset) to ids,
cache them and split them.

Encoding streams the files in chunks with numpy (no per-character Python loop, nothing that
grows with the corpus but the vocabulary's table) and writes the ids to a ``.npy`` file under
the cache directory, keyed by the content's sha256 and the unit. Training maps that file
read-only, so a corpus of gigabytes costs the pages a run touches, and every rank of a
distributed job maps the same file (the first to arrive encodes it; the others wait on a lock).
The file is written to a temporary name and renamed: nobody sees a half-written cache.
"""

from __future__ import annotations

import codecs
import dataclasses
import fcntl
import json
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
import torch

from ..config import DataConfig
from ..errors import CharlmError
from ..files import atomic_write
from .datasets import progress
from .sources import SEPARATOR, Source, find_source
from .vocab import MAX_CODE_POINT, Vocab, code_points, make_vocab, unknown_characters, units_of

CHUNK_BYTES = 1 << 22
CACHE_VERSION = 3  # 3: keyed by the content's sha256 and the unit; multi-file corpora
CHECKSUMS = "checksums.json"  # the sha256 of files by path, size, mtime and inode: unchanged files are not hashed again


def no_progress(_: int) -> None:
    """The progress callback when nobody is listening."""


def open_corpus(config: DataConfig, vocab: Vocab | None = None) -> "Corpus":
    """The corpus a config names (see ``sources.find_source``), encoded in ``config.unit``.

    With ``vocab`` (a model's, when fine-tuning or resuming) the ids are that vocabulary's;
    characters outside it are an error, or left out when ``config.skip_unknown`` says so.
    """
    corpus = encoded(find_source(config), config.dir, config.unit, config.encoding_errors)
    return corpus if vocab is None else corpus.in_vocab(vocab, config.skip_unknown)


def iter_text_chunks(path: Path, errors: str, advance: Callable[[int], object] = no_progress):
    """Decode a UTF-8 file chunk by chunk, with one-line errors for bad input (``advance`` hears
    how many bytes each chunk was)."""
    if not path.exists():
        raise CharlmError(f"text file {path} not found; check the path")  # --data's own names are checked before (sources)
    if path.is_dir():
        raise CharlmError(f"{path} is a directory; give a text file")
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    offset = 0
    with path.open("rb") as fh:
        while True:
            block = fh.read(CHUNK_BYTES)
            advance(len(block))
            if offset == 0 and b"\x00" in block[:8192]:
                raise CharlmError(f"{path} looks like a binary file (it has NUL bytes); charlm trains on UTF-8 text")
            pending = len(decoder.getstate()[0])  # the previous block's unfinished character, decoded with this one
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                raise CharlmError(
                    f"{path} is not valid UTF-8 (byte 0x{err.object[err.start]:02x} at offset {offset - pending + err.start}); "
                    "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8), leave it out with --data.exclude, "
                    "or pass --data.encoding-errors replace"
                ) from None
            if text:
                yield text
            if not block:
                return
            offset += len(block)


def id_dtype(vocab_size: int):
    """The narrowest type that holds every id (int16, not uint16, which PyTorch supports only in part)."""
    return np.uint8 if vocab_size <= 256 else np.int16 if vocab_size <= 32767 else np.int32


def file_bytes(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        yield from iter(lambda: fh.read(CHUNK_BYTES), b"")


def unit_chunks(source: Source, unit: str, errors: str, advance: Callable[[int], object] = no_progress) -> Iterator[np.ndarray]:
    """The source's units (code points or bytes) chunk by chunk, ``SEPARATOR`` between its files
    (``advance`` hears how many bytes of the files each chunk came from)."""
    separator = units_of(SEPARATOR, unit)
    for index, file in enumerate(source.files):
        if index:
            yield separator
        if unit == "byte":  # bytes are modelled as they are: nothing to decode
            for block in file_bytes(file.path):
                advance(len(block))
                yield np.frombuffer(block, dtype=np.uint8)
        else:
            yield from (code_points(text) for text in iter_text_chunks(file.path, errors, advance))


def scan(source: Source, unit: str, errors: str, advance: Callable[[int], object] = no_progress) -> tuple[Vocab, int]:
    """The first pass: the vocabulary (the units that occur) and the length in units."""
    seen = np.zeros(256 if unit == "byte" else MAX_CODE_POINT, dtype=bool)
    length = 0
    for chunk in unit_chunks(source, unit, errors, advance):
        seen[chunk] = True
        length += len(chunk)
    if length == 0:
        raise CharlmError(f"{source.label} is empty; charlm needs some text to learn from")
    return make_vocab("".join(map(chr, np.flatnonzero(seen))), unit), length


def write_ids(out: BinaryIO, source: Source, vocab: Vocab, length: int, errors: str,
              advance: Callable[[int], object] = no_progress) -> None:
    """The second pass: the ids as a ``.npy`` file, written as a stream (not through a memory map,
    whose dirty pages would count in the resident memory)."""
    dtype = np.dtype(id_dtype(len(vocab)))
    np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(dtype),
                                               "fortran_order": False, "shape": (length,)})
    written = 0
    for chunk in unit_chunks(source, vocab.unit, errors, advance):
        out.write(vocab.ids_of(chunk).astype(dtype).tobytes())
        written += len(chunk)
    if written != length:
        raise CharlmError(f"{source.label} changed while it was encoded; run again")


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory``: the ranks of a job encode a corpus once, one at a time."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass
class Corpus:
    """A corpus's ids (memory-mapped) in a vocabulary, and the content's checksum.

    ``skipped`` counts the characters left out because ``vocab`` lacks them (see ``in_vocab``);
    ``files`` lists the files of a multi-file corpus; ``splits`` are a named dataset's standard
    (train, validation) lengths, the rest being its test split.
    """

    path: Path
    ids: np.ndarray
    vocab: Vocab
    sha256: str
    skipped: int = 0
    files: list[dict] = field(default_factory=list)
    splits: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def tensor(self) -> torch.Tensor:
        with warnings.catch_warnings():  # read-only memory map: nothing ever writes to it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(self.ids)

    def split(self, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous train/validation split: a named dataset's standard one, else the last
        ``val_fraction`` is held out."""
        data = self.tensor()
        if self.splits is not None:
            train, valid = self.splits
            return data[:train], data[train:train + valid]
        n_val = int(len(data) * val_fraction)
        return data[: len(data) - n_val], data[len(data) - n_val:]

    def part(self, name: str, val_fraction: float) -> torch.Tensor:
        """The 'train', 'valid' or 'test' split (only named datasets have a test split)."""
        if name == "test":
            if self.splits is None:
                raise CharlmError(f"{self.path} has no test split (only the named datasets enwik8 and text8 have one); "
                                  "use --split valid or pass --data FILE")
            return self.tensor()[sum(self.splits):]
        if name not in ("train", "valid"):
            raise CharlmError(f"--split must be train, valid or test, got {name!r}")
        return self.split(val_fraction)[0 if name == "train" else 1]

    def in_vocab(self, vocab: Vocab, skip_unknown: bool) -> "Corpus":
        """The same text as ids of ``vocab``: a model's vocabulary, which may hold more characters.

        Characters ``vocab`` lacks are a one-line error naming them, or, with ``skip_unknown``,
        left out and counted in ``skipped``.
        """
        if vocab.chars == self.vocab.chars:
            return self
        to_model = vocab.ids_of(code_points(self.vocab.chars))  # this corpus's id -> the model's id, -1 unknown
        missing = [char for char, index in zip(self.vocab.chars, to_model) if index < 0]
        ids = to_model[self.ids]
        if missing and not skip_unknown:
            raise unknown_characters(str(self.path), missing, "pass --data.skip-unknown to leave them out")
        known = ids >= 0
        return dataclasses.replace(self, ids=ids[known].astype(id_dtype(len(vocab))), vocab=vocab,
                                   skipped=int(len(ids) - known.sum()))


def read_checksums(path: Path) -> dict[str, str]:
    """The files' checksums an earlier run wrote (``Source.checksum``'s memo), or none when unreadable."""
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def remember_checksums(path: Path, known: dict[str, str]) -> None:
    """Save the memo where the cache is writable; a read-only cache (shared, encoded beforehand) still serves."""
    try:
        atomic_write(path, lambda out: out.write(json.dumps(known).encode("utf-8")))
    except OSError:
        pass


def cache_name(source: Source, checksum: str, unit: str, errors: str) -> str:
    base = re.sub(r"[^\w.-]+", "_", Path(source.label).name) or "corpus"
    return f"{base}-{checksum[:16]}-{unit}{'' if errors == 'strict' else '-' + errors}-v{CACHE_VERSION}"


def write_cache(source: Source, ids_file: Path, meta_file: Path, unit: str, errors: str) -> None:
    """Encode in two passes over the files (a progress bar on a terminal counts both)."""
    with progress(2 * sum(file.size for file in source.files), f"encoding {Path(source.label).name}") as bar:
        vocab, length = scan(source, unit, errors, bar.update)
        atomic_write(ids_file, lambda out: write_ids(out, source, vocab, length, errors, bar.update))
    meta = {"version": CACHE_VERSION, "source": source.label, "unit": unit, "chars": vocab.chars,
            "length": length, "files": source.manifest()}
    atomic_write(meta_file, lambda out: out.write(json.dumps(meta, ensure_ascii=False).encode("utf-8")))


def encoded(source: Source, cache_dir: str | Path, unit: str = "char", errors: str = "strict") -> Corpus:
    """The source's ids in ``unit``: encoded once into the cache, then mapped from it while its content is unchanged."""
    cache = Path(cache_dir) / "encoded"
    known = read_checksums(cache / CHECKSUMS)
    before = dict(known)
    checksum = source.checksum(known)
    name = cache_name(source, checksum, unit, errors)
    ids_file, meta_file = cache / f"{name}.npy", cache / f"{name}.json"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with locked(cache):
            if not (ids_file.is_file() and meta_file.is_file()):
                write_cache(source, ids_file, meta_file, unit, errors)
            if known != before:
                remember_checksums(cache / CHECKSUMS, known)
    except OSError as err:
        raise CharlmError(f"cannot write the encoded corpus to {cache} ({err.strerror or err}); "
                          "free some space or pass --data-dir DIR") from None
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    corpus = Corpus(path=Path(source.label), ids=np.load(ids_file, mmap_mode="r"), vocab=make_vocab(meta["chars"], unit),
                    sha256=checksum, files=meta["files"])
    return with_standard_split(corpus, source)


def with_standard_split(corpus: Corpus, source: Source) -> Corpus:
    """A named dataset's corpus with its standard split, refused where the file is too short for it."""
    if source.dataset is None:
        return corpus
    train, valid = source.dataset.train, source.dataset.valid
    if len(corpus) <= train + valid:
        raise CharlmError(f"{source.files[0].path} has {len(corpus):,} units, too few for {source.label}'s standard "
                          f"split ({train:,} train, {valid:,} validation, the rest test); delete it to download again")
    return dataclasses.replace(corpus, splits=(train, valid))


def load_corpus(path: str | Path, cache_dir: str | Path, errors: str = "strict", unit: str = "char") -> Corpus:
    """Encode ``path`` (a file, directory or glob) once and reuse the cached ids while its content is unchanged."""
    return open_corpus(DataConfig(path=str(path), dir=str(cache_dir), encoding_errors=errors, unit=unit))
