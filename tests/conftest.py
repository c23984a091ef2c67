import os
import shutil
from pathlib import Path

import pytest
import torch

from charlm.cli import main

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE_MIRROR = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

torch.set_num_threads(min(2, torch.get_num_threads()))

# A tiny, fast model for every test that trains through the CLI.
TINY = ["--model.layers", "1", "--model.hidden-size", "32", "--model.embedding-size", "16",
        "--train.batch-size", "4", "--train.seq-len", "16", "--train.warmup-steps", "2",
        "--train.eval-interval", "10", "--train.eval-batches", "2", "--train.checkpoint-interval", "10",
        "--train.log-interval", "5", "--quiet"]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every test runs in its own directory, with its own cache and no way to the network."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CHARLM_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CHARLM_SHAKESPEARE_URL", "http://127.0.0.1:9/tinyshakespeare.txt")
    yield tmp_path


@pytest.fixture
def cli(capsys):
    """Run the charlm CLI in-process: returns (exit code, stdout, stderr)."""
    def run(*args: str):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def lorem(repeats: int = 60) -> str:
    return ("The quick brown fox jumps over the lazy dog. " * 3 + "Pack my box with five dozen liquor jugs!\n") * repeats


@pytest.fixture
def ascii_corpus(tmp_path) -> Path:
    path = tmp_path / "ascii.txt"
    path.write_text(lorem(), encoding="utf-8")
    return path


@pytest.fixture
def unicode_corpus(tmp_path) -> Path:
    path = tmp_path / "unicode.txt"
    path.write_text(("床前明月光，疑是地上霜。举头望明月，低头思故乡。🌙✨ naïve café 😀\n") * 150, encoding="utf-8")
    return path


@pytest.fixture
def shakespeare(tmp_path) -> Path:
    if not SHAKESPEARE_MIRROR.is_file():
        pytest.skip("the Tiny Shakespeare mirror is not beside the repository")
    cache = Path(os.environ["CHARLM_DATA_DIR"])
    cache.mkdir(parents=True, exist_ok=True)
    shutil.copy(SHAKESPEARE_MIRROR, cache / "tinyshakespeare.txt")
    return cache / "tinyshakespeare.txt"
