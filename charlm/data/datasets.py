"""Corpora charlm downloads itself: Tiny Shakespeare, and the benchmark corpora enwik8 and text8.

Every download is checked against a checksum from a public record before it is kept, and is
written atomically: a failed or tampered download leaves nothing behind. ``CHARLM_<NAME>_URL``
(e.g. ``CHARLM_ENWIK8_URL``) points a download at a mirror; the checksum still applies.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from ..errors import CharlmError
from ..files import atomic_write

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_FILE = "tinyshakespeare.txt"
BLOCK = 1 << 20


@dataclass(frozen=True)
class Dataset:
    """A benchmark corpus: one file inside a zip, with its standard train/validation/test split
    (the first ``train`` units, the next ``valid``, the rest is the test split)."""

    name: str
    url: str
    sha256: str  # of the zip, from the public record cited beside it
    member: str
    train: int
    valid: int

    @property
    def url_variable(self) -> str:
        return f"CHARLM_{self.name.upper()}_URL"


DATASETS = {
    # The Hutter Prize file (the first 10^8 bytes of an English Wikipedia dump of 2006), from Matt
    # Mahoney's site as the papers use it. sha256 as recorded in Hugging Face's enwik8 loader
    # (huggingface/datasets, datasets/enwik8/dataset_infos.json: 36,445,475 bytes).
    "enwik8": Dataset("enwik8", "http://mattmahoney.net/dc/enwik8.zip",
                      "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc", "enwik8", 90_000_000, 5_000_000),
    # enwik8 cleaned to lower-case letters and spaces, same site: the 31,344,016-byte zip of
    # TensorFlow's word2vec tutorial. sha256 as recorded by public dataset loaders on GitHub that
    # also record the extracted file's (6e890197...51dca7, which several other projects check too);
    # GluonNLP's loader (dmlc/gluon-nlp) checks this zip by SHA-1 instead (6c70299b...7a2e).
    "text8": Dataset("text8", "http://mattmahoney.net/dc/text8.zip",
                     "a6640522afe85d1963ad56c05b0ede0a0c000dddc9671758a6cc09b7a38e5232", "text8", 90_000_000, 5_000_000),
}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def progress(total: int | None, description: str) -> tqdm:
    """A byte progress bar on stderr, shown only on a terminal."""
    return tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024, disable=None, leave=False)


def download(url: str, dest: Path, sha256: str, timeout: float = 30.0) -> Path:
    """Fetch ``url`` into ``dest`` atomically, refusing content whose sha256 is not ``sha256``."""
    dest.parent.mkdir(parents=True, exist_ok=True)

    def fetch(out: BinaryIO) -> None:
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                size = response.headers.get("Content-Length")
                with progress(int(size) if size else None, f"downloading {dest.name}") as bar:
                    for block in iter(lambda: response.read(1 << 16), b""):
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
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
    """Tiny Shakespeare in the cache directory, downloaded and verified on first use
    (``CHARLM_SHAKESPEARE_URL`` names a mirror)."""
    dest = Path(data_dir) / SHAKESPEARE_FILE
    if dest.is_file():
        if sha256_of(dest) != SHAKESPEARE_SHA256:
            raise CharlmError(f"{dest} does not match the Tiny Shakespeare checksum; delete it to download again")
        return dest
    return download(os.environ.get("CHARLM_SHAKESPEARE_URL", SHAKESPEARE_URL), dest, SHAKESPEARE_SHA256)


def extract(archive: Path, member: str, dest: Path) -> Path:
    """Unpack ``member`` of a zip into ``dest`` atomically, with a progress bar (zip checks its CRC)."""
    try:
        with zipfile.ZipFile(archive) as zf:
            info = zf.getinfo(member)

            def unpack(out: BinaryIO) -> None:
                with zf.open(info) as source, progress(info.file_size, f"extracting {member}") as bar:
                    for block in iter(lambda: source.read(BLOCK), b""):
                        out.write(block)
                        bar.update(len(block))

            return atomic_write(dest, unpack)
    except (zipfile.BadZipFile, KeyError) as err:
        raise CharlmError(f"{archive} is not the expected zip ({err}); delete it to download again") from None
    except OSError as err:
        raise CharlmError(f"could not extract {member} to {dest} ({err.strerror or err}); free some space") from None


def dataset_file(dataset: Dataset, data_dir: str | Path) -> Path:
    """The dataset's text file in ``data_dir``: downloaded, verified and extracted on first use."""
    data_dir = Path(data_dir)
    dest = data_dir / dataset.member
    if dest.is_file():
        return dest
    archive = data_dir / f"{dataset.name}.zip"
    if not archive.is_file() or sha256_of(archive) != dataset.sha256:
        url = os.environ.get(dataset.url_variable, dataset.url)
        download(url, archive, dataset.sha256)
    return extract(archive, dataset.member, dest)


def unknown_dataset(name: str) -> CharlmError:
    return CharlmError(f"no file, directory or dataset named '{name}'; the known datasets are "
                       f"{', '.join(sorted(DATASETS))} (or give a text file, a directory or a glob)")
