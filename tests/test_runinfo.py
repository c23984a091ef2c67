"""charlm info and charlm runs: what a checkpoint is and what runs a folder holds, without building a model."""

import hashlib
import json

import pytest

import charlm
from charlm.model.charrnn import CharRNN
from charlm.training.rundir import RunDirectory
from tests.conftest import TINY, one_line_error


@pytest.fixture
def runs(cli, ascii_corpus, tmp_path):
    """Two finished runs of different length under runs/, and a folder with only a config."""
    for name, steps in (("short", 5), ("long", 40)):
        code, _, err = cli("train", "--data", ascii_corpus, *TINY, "--max-steps", steps, "--out", tmp_path / "runs" / name)
        assert code == 0, err
    (tmp_path / "runs" / "empty").mkdir()
    (tmp_path / "runs" / "empty" / "config.toml").write_text((tmp_path / "runs" / "long" / "config.toml").read_text())
    return tmp_path / "runs"


def test_info_tells_what_a_checkpoint_is_without_building_the_model(cli, runs, ascii_corpus, monkeypatch):
    model = charlm.load_model(runs / "long").model
    monkeypatch.setattr(CharRNN, "__init__", lambda *args, **kwargs: pytest.fail("info built a model"))
    code, out, err = cli("info", runs / "long", "--json")
    assert code == 0, err
    facts = json.loads(out)
    assert facts["parameters"] == model.num_parameters() and facts["cell"] == "lstm" and facts["tied"] is True
    assert facts["step"] == 40 and facts["epochs"] > 0 and facts["best_val_loss"] > 0
    assert facts["corpus_sha256"] == hashlib.sha256(ascii_corpus.read_bytes()).hexdigest()
    assert facts["device"] == "cpu" and facts["precision"] in ("fp32", "bf16") and facts["format_version"] == 2
    assert facts["charlm_version"] == charlm.__version__ and facts["torch_version"]
    code, out, err = cli("info", runs / "long")
    assert code == 0 and "1x32 LSTM" in out and "\\n␠" in out, err


def test_info_of_the_bundled_model_counts_tied_weights_once(cli):
    code, out, _ = cli("info", "pretrained", "--json")
    assert code == 0 and json.loads(out)["parameters"] == charlm.load_model("pretrained").model.num_parameters()


def test_runs_lists_every_run_best_first_with_its_status(cli, runs):
    code, out, err = cli("runs", runs, "--json")
    assert code == 0, err
    listed = json.loads(out)
    assert [entry["run"].split("/")[-1] for entry in listed] == ["long", "short", "empty"]
    assert [entry["status"] for entry in listed] == ["finished", "finished", "no last.pt"]
    assert listed[0]["steps"] == 40 and listed[0]["model"] == "1x32 LSTM"
    run = RunDirectory(runs / "short")
    run.lock()  # as a process training in it holds it
    try:
        assert {e["run"].split("/")[-1]: e["status"] for e in json.loads(cli("runs", runs, "--json")[1])}["short"] == "training"
    finally:
        run.unlock()
    code, out, _ = cli("runs", runs)
    assert code == 0 and "long" in out and "finished" in out


def test_bad_input_is_one_line(cli, tmp_path):
    one_line_error(*cli("runs", tmp_path / "nowhere")[::2], "is not a directory")
    one_line_error(*cli("info", tmp_path / "missing.pt")[::2], "not found")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    code, _, err = cli("info", tmp_path / "junk.pt")
    one_line_error(code, err, "junk.pt", "corrupted or not a checkpoint")
    assert "could run code" not in err  # plain text is no pickle, so nothing in it was refused as code
