"""The Python API does what the CLI does, any number of times, in any order, in one process."""

import importlib
import pkgutil

import pytest

import charlm
from charlm.errors import CharlmError
from tests.conftest import TINY_KEYS


def test_public_names_survive_importing_every_submodule():
    for module in pkgutil.walk_packages(charlm.__path__, "charlm."):
        if module.name not in ("charlm.__main__", "charlm.configs"):
            importlib.import_module(module.name)
    for name in charlm.__all__:
        assert not isinstance(getattr(charlm, name), type(charlm)), f"charlm.{name} is a module"


def test_every_function_twice_in_one_process(tmp_path, ascii_corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = {**TINY_KEYS, "data.path": str(ascii_corpus), "train.max_steps": 10}
    for attempt in range(2):
        config = charlm.load_config("tiny", {**overrides, "train.out": f"run{attempt}"})
        assert config.model.hidden_size == 32 and config.train.out == f"run{attempt}"
        trained = charlm.train(config)
        assert trained.step == 10
        resumed = charlm.resume(trained.run_dir, {"train.max_steps": 15})
        assert resumed.step == 15 and resumed.final.loss > 0
        report = charlm.evaluate(trained.run_dir)
        assert report.result.chars > 0 and report.step in (10, 15)
        model, vocab, loaded_config, checkpoint = charlm.load_model(trained.run_dir)
        assert loaded_config == charlm.load_config(base=checkpoint["config"])
        text = charlm.generate(model, vocab, "The ", charlm.SampleSettings(length=30, seed=attempt))[0]
        assert len(text) == 30 and set(text) <= set(vocab.chars)
    with pytest.raises(CharlmError, match="already holds a run"):
        charlm.train(charlm.load_config("tiny", {**overrides, "train.out": "run0"}))


def test_load_config_reads_the_data_directory_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CHARLM_DATA_DIR", str(tmp_path / "corpora"))
    assert charlm.load_config().data.dir == str(tmp_path / "corpora")
    assert charlm.load_config("quick").data.dir == str(tmp_path / "corpora")
    assert charlm.load_config(None, {"data.dir": "mine"}).data.dir == "mine"  # an explicit value wins
    monkeypatch.delenv("CHARLM_DATA_DIR")
    assert charlm.load_config().data.dir == "data"
