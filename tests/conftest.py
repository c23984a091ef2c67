import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from charlm.cli import main
from charlm.config import Config, load_config

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE_MIRROR = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

torch.set_num_threads(min(2, torch.get_num_threads()))

# The tiny, fast model of every test that trains: as config keys for the library, as options for the CLI.
TINY_KEYS = {"model.layers": 1, "model.hidden_size": 32, "model.embedding_size": 16, "train.batch_size": 4,
             "train.seq_len": 16, "train.warmup_steps": 2, "train.eval_interval": 10, "train.eval_batches": 2,
             "train.checkpoint_interval": 10, "train.log_interval": 5}
TINY_OPTIONS = [arg for key, value in TINY_KEYS.items() for arg in ("--" + key.replace("_", "-"), str(value))]
TINY = [*TINY_OPTIONS, "--quiet"]


@pytest.fixture
def tiny_config(tmp_path, ascii_corpus):
    """tiny_config(out, **keys): the tiny model on the ASCII corpus (or ``data.path``), into ``out``."""
    def make(out: str | Path = "run", **keys) -> Config:
        return load_config(None, {**TINY_KEYS, "data.path": str(ascii_corpus), "train.out": str(tmp_path / out), **keys})
    return make


def one_line_error(code, err, *fragments):
    """What every refused input must give: a non-zero exit and one 'charlm: error:' line naming ``fragments``."""
    assert code not in (0, None)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("charlm: error:"), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` by relative path, with its bytes: to show nothing was changed."""
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()}


def charlm_process(*args, **popen_options) -> subprocess.Popen:
    """`python -m charlm ARGS` in a process of its own, unbuffered, its output piped as text unless told otherwise."""
    options = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen_options}
    return subprocess.Popen([sys.executable, "-m", "charlm", *map(str, args)],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, **options)


def wait_for(predicate, timeout: float = 60.0) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every test runs in its own directory, with its own cache and no way to the network."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CHARLM_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CHARLM_SHAKESPEARE_URL", "http://127.0.0.1:9/tinyshakespeare.txt")
    for name in ("ENWIK8", "TEXT8"):
        monkeypatch.setenv(f"CHARLM_{name}_URL", f"http://127.0.0.1:9/{name.lower()}.zip")
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
