"""Corpora: download, decode, encode to code-point ids, cache and split.

Encoding is
done in chunks with numpy (no per-character Python loop), written straight into
a memory-mapped ``.npy`` cache so a second run, or a corpus of hundreds of MB,
starts at once and never needs the whole text in memory.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import CharlmError
from ..files import atomic_write
from .vocab import MAX_CODE_POINT, Vocab, code_points, unknown_characters

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_FILE = "tinyshakespeare.txt"
CHUNK_BYTES = 1 << 22
CACHE_VERSION = 2  # 2: the metadata holds the file's sha256


# ----------------------------------------------------------------------------- download

def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, sha256: str, timeout: float = 30.0) -> Path:
    """Fetch ``url`` into ``dest`` atomically, refusing content whose sha256 differs."""
    dest.parent.mkdir(parents=True, exist_ok=True)

    def fetch(out) -> None:
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                for block in iter(lambda: response.read(1 << 16), b""):
                    out.write(block)
                    digest.update(block)
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise CharlmError(f"could not download {url} ({reason}); put the file at {dest} or pass --data FILE") from None
        if digest.hexdigest() != sha256:
            raise CharlmError(
                f"downloaded {url} but its sha256 is {digest.hexdigest()}, expected {sha256}; nothing was saved, "
                f"put a good copy at {dest} or pass --data FILE"
            )

    try:
        return atomic_write(dest, fetch)
    except OSError as err:
        raise CharlmError(f"could not save {dest} ({err.strerror or err}); free some space or pass --data FILE") from None


def default_corpus(data_dir: str | Path) -> Path:
    """Tiny Shakespeare in the cache directory, downloaded and verified on first use.

    ``CHARLM_SHAKESPEARE_URL`` points the download at a mirror; the checksum still applies.
    """
    dest = Path(data_dir) / SHAKESPEARE_FILE
    if dest.is_file():
        if sha256_of(dest) != SHAKESPEARE_SHA256:
            raise CharlmError(f"{dest} does not match the Tiny Shakespeare checksum; delete it to download again")
        return dest
    return download(os.environ.get("CHARLM_SHAKESPEARE_URL", SHAKESPEARE_URL), dest, SHAKESPEARE_SHA256)


def open_corpus(config: DataConfig, vocab: Vocab | None = None) -> "Corpus":
    """The corpus a config names (its own file, or Tiny Shakespeare when none is given), encoded.

    With ``vocab`` (a model's, when fine-tuning or resuming) the ids are that vocabulary's;
    characters outside it are an error, or left out when ``config.skip_unknown`` says so.
    """
    path = Path(config.path) if config.path else default_corpus(config.dir)
    corpus = load_corpus(path, config.dir, config.encoding_errors)
    return corpus if vocab is None else corpus.in_vocab(vocab, config.skip_unknown)


def iter_text_chunks(path: Path, errors: str):
    """Decode a UTF-8 file chunk by chunk, with one-line errors for bad input."""
    if not path.exists():
        raise CharlmError(f"corpus file {path} not found; check the path or pass --data FILE")
    if path.is_dir():
        raise CharlmError(f"{path} is a directory; --data needs a text file")
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    offset = 0
    with path.open("rb") as fh:
        while True:
            block = fh.read(CHUNK_BYTES)
            if offset == 0 and b"\x00" in block[:8192]:
                raise CharlmError(f"{path} looks like a binary file (it has NUL bytes); charlm trains on UTF-8 text")
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                raise CharlmError(
                    f"{path} is not valid UTF-8 (byte 0x{err.object[err.start]:02x} at offset {offset + err.start}); "
                    "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) or pass --data.encoding-errors replace"
                ) from None
            if text:
                yield text
            if not block:
                return
            offset += len(block)


def id_dtype(vocab_size: int):
    return np.uint8 if vocab_size <= 256 else np.int16 if vocab_size <= 32767 else np.int32


def encode_file(path: Path, out: Path, errors: str = "strict") -> Vocab:
    """Two chunked passes: find the code points, then write their ids into ``out`` (.npy)."""
    seen = np.zeros(MAX_CODE_POINT, dtype=bool)
    length = 0
    for text in iter_text_chunks(path, errors):
        points = code_points(text)
        seen[points] = True
        length += len(points)
    if length == 0:
        raise CharlmError(f"{path} is empty; charlm needs some text to learn from")
    vocab = Vocab("".join(map(chr, np.flatnonzero(seen))))
    ids = np.lib.format.open_memmap(out, mode="w+", dtype=id_dtype(len(vocab)), shape=(length,))
    start = 0
    for text in iter_text_chunks(path, errors):
        chunk = vocab.ids_of(code_points(text))
        ids[start:start + len(chunk)] = chunk
        start += len(chunk)
    ids.flush()
    del ids
    return vocab


@dataclass
class Corpus:
    """A text file's ids (memory-mapped) in a vocabulary, and the file's checksum.

    ``skipped`` counts the characters left out because ``vocab`` lacks them (see ``in_vocab``).
    """

    path: Path
    ids: np.ndarray
    vocab: Vocab
    sha256: str
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def split(self, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous train/validation split: the last ``val_fraction`` is held out."""
        n_val = int(len(self.ids) * val_fraction)
        with warnings.catch_warnings():  # read-only memory map: nothing ever writes to it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            data = torch.from_numpy(self.ids)
        return data[: len(data) - n_val], data[len(data) - n_val:]

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
        return Corpus(self.path, ids[known].astype(id_dtype(len(vocab))), vocab, self.sha256, int(len(ids) - known.sum()))


def load_corpus(path: str | Path, cache_dir: str | Path, errors: str = "strict") -> Corpus:
    """Encode ``path`` once and reuse the cached ids while the file is unchanged."""
    path = Path(path)
    if not path.exists() or path.is_dir():
        next(iter_text_chunks(path, errors), None)  # raises the right one-line error
    stat = path.stat()
    key = hashlib.sha1(f"{CACHE_VERSION}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{errors}".encode()).hexdigest()[:16]
    cache = Path(cache_dir) / "encoded"
    ids_file, vocab_file = cache / f"{path.stem}-{key}.npy", cache / f"{path.stem}-{key}.json"
    if not (ids_file.is_file() and vocab_file.is_file()):
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CharlmError(f"cannot create the cache directory {cache} ({err.strerror}); pass --data-dir DIR") from None
        tmp = ids_file.with_suffix(f".{os.getpid()}.tmp.npy")
        try:
            vocab = encode_file(path, tmp, errors)
            os.replace(tmp, ids_file)
            meta = json.dumps({"source": str(path), "sha256": sha256_of(path), "chars": vocab.chars}).encode("utf-8")
            atomic_write(vocab_file, lambda fh: fh.write(meta))
        except OSError as err:
            raise CharlmError(f"cannot write the encoded corpus to {cache} ({err.strerror or err}); "
                              "free some space or pass --data-dir DIR") from None
        finally:
            tmp.unlink(missing_ok=True)
    meta = json.loads(vocab_file.read_text(encoding="utf-8"))
    return Corpus(path=path, ids=np.load(ids_file, mmap_mode="r"), vocab=Vocab(meta["chars"]), sha256=meta["sha256"])
