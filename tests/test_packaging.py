"""What a user of the installed package gets: the bundled configs by name, from any directory, from a wheel."""

import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

import charlm
from charlm.config import bundled_configs, load_config
from tests.conftest import REPO, one_line_error

REPO_CONFIGS = sorted(path.stem for path in (REPO / "configs").glob("*.toml"))


def test_every_bundled_config_resolves_by_name_outside_the_repository(tmp_path, cli, ascii_corpus):
    assert not (Path.cwd() / "configs").exists()
    assert sorted(bundled_configs()) == REPO_CONFIGS
    for name in REPO_CONFIGS:
        assert load_config(name) == load_config(f"{name}.toml") == load_config(REPO / "configs" / f"{name}.toml")
    code, _, err = cli("train", "-c", "tiny", "--data", ascii_corpus, "--max-steps", 2, "--out", tmp_path / "run", "--quiet")
    assert code == 0, err
    one_line_error(*cli("train", "-c", "huge")[::2], "config file huge not found", ", ".join(REPO_CONFIGS))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the repository's files (those git does not ignore), as `pip wheel .` builds it."""
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    source = tmp_path_factory.mktemp("source")
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", dist, source], check=True, capture_output=True)
    return next(dist.glob("charlm-*.whl"))


def test_the_wheel_holds_the_configs_every_module_and_the_bundled_model(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for config in REPO_CONFIGS:
        assert zipfile.ZipFile(wheel).read(f"charlm/configs/{config}.toml") == (REPO / "configs" / f"{config}.toml").read_bytes()
    modules = {str(path.relative_to(REPO)) for path in (REPO / "charlm").rglob("*.py")}
    assert modules <= names, modules - names
    assert "charlm/pretrained/shakespeare.pt" in names
    assert "charlm/serve/page/index.html" in names  # charlm serve's playground page
    assert wheel.name.startswith(f"charlm-{charlm.__version__}-")


def test_train_with_a_bundled_config_after_installing_the_wheel(wheel, tmp_path, ascii_corpus):
    """A fresh environment (PyTorch and the other dependencies come from this one) with only the wheel."""
    env = tmp_path / "env"
    venv.create(env, system_site_packages=True, with_pip=False)
    python = env / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([python, "-c", "import charlm; print(charlm.__file__)"], cwd=elsewhere, capture_output=True,
                           text=True, check=True).stdout
    assert where.startswith(str(env)), where  # the installed wheel, not this checkout
    done = subprocess.run([env / "bin" / "charlm", "train", "-c", "tiny", "--data", ascii_corpus, "--max-steps", "3", "--quiet"],
                          cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    saved = (elsewhere / "runs" / "tiny" / "config.toml").read_text()  # configs/tiny.toml's run directory and model
    assert "hidden_size = 64\n" in saved and "embedding_size = 32\n" in saved
