from pathlib import Path

import pytest

from charlm.config import Config, load_config, parse_duration, to_toml
from charlm.errors import CharlmError

REPO = Path(__file__).resolve().parent.parent


def test_bundled_configs_load():
    for path in sorted((REPO / "configs").glob("*.toml")):
        load_config(path)


def test_overrides_beat_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\ncell = "gru"\nlayers = 3\n')
    config = load_config(path, {"model.layers": "1", "train.lr": "0.01", "model.tie_weights": "true"})
    assert (config.model.cell, config.model.layers, config.train.lr, config.model.tie_weights) == ("gru", 1, 0.01, True)


def test_unknown_key_names_the_closest(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[model]\nhiden_size = 10\n")
    with pytest.raises(CharlmError, match="did you mean 'model.hidden_size'"):
        load_config(path)
    with pytest.raises(CharlmError, match="did you mean 'train.batch_size'"):
        load_config(None, {"train.batchsize": 3})


def test_wrong_type_and_bad_choice_are_clear():
    with pytest.raises(CharlmError, match="'model.layers'.*must be int.*'two'"):
        load_config(None, {"model.layers": "two"})
    with pytest.raises(CharlmError, match="rnn\\|lstm\\|gru"):
        load_config(None, {"model.cell": "transformer"})
    with pytest.raises(CharlmError, match="cosine\\|linear"):
        load_config(None, {"train.schedule": "step"})
    with pytest.raises(CharlmError, match="at least 1"):
        load_config(None, {"train.batch_size": 0})


def test_saved_config_reads_back_identically(tmp_path):
    config = load_config(None, {"model.cell": "gru", "train.max_time": "90s", "data.path": 'a "quoted" path'})
    path = tmp_path / "saved.toml"
    path.write_text(to_toml(config))
    assert load_config(path) == config


def test_durations():
    assert parse_duration("90s") == 90 and parse_duration("15m") == 900 and parse_duration("1h") == 3600
    assert parse_duration("") is None
    with pytest.raises(CharlmError, match="15m"):
        parse_duration("soon")


def test_default_config_file_is_the_builtin_default(monkeypatch):
    """`charlm train` without -c uses the built-in defaults, which the README calls configs/shakespeare.toml."""
    monkeypatch.delenv("CHARLM_DATA_DIR")
    assert load_config("shakespeare") == load_config(REPO / "configs" / "shakespeare.toml") == Config()
