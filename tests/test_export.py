"""charlm export --format safetensors: a Hugging Face-style folder that charlm reads back exactly."""

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY, one_line_error, snapshot

safetensors = pytest.importorskip("safetensors.torch", reason="the safetensors extra is not installed")


@pytest.fixture
def run(cli, ascii_corpus, tmp_path) -> Path:
    code, _, err = cli("train", "--data", ascii_corpus, *TINY, "--max-steps", 20, "--out", tmp_path / "run")
    assert code == 0, err
    return tmp_path / "run"


def test_an_fp32_folder_samples_and_evaluates_exactly_as_its_checkpoint(cli, run, tmp_path):
    folder = tmp_path / "export"
    code, out, err = cli("export", run, "--format", "safetensors", "--dtype", "fp32", "--out", folder)
    assert code == 0, err
    assert sorted(path.name for path in folder.iterdir()) == ["README.md", "config.json", "generation_config.json",
                                                             "model.safetensors", "vocab.json"]
    weights = safetensors.load_file(folder / "model.safetensors")
    assert "head.weight" not in weights and "embedding.weight" in weights  # a tied read-out is stored once
    vocab = json.loads((folder / "vocab.json").read_text())
    assert vocab["0"] == "\n" and len(vocab) == json.loads((folder / "config.json").read_text())["vocab_size"]
    assert "validation loss" in (folder / "README.md").read_text()
    for args in (["--length", 100, "--seed", 5], ["--length", 60, "--seed", 1, "--top-k", 3, "--num-samples", 2]):
        assert cli("sample", folder, *args)[1] == cli("sample", run, *args)[1]
    assert json.loads(cli("eval", folder, "--json")[1])["loss"] == json.loads(cli("eval", run, "--json")[1])["loss"]
    code, out, _ = cli("info", folder, "--json")
    assert code == 0 and json.loads(out)["step"] == 20


def test_fp16_folders_are_smaller_and_still_sample(cli, run, tmp_path):
    for dtype in ("fp16", "fp32"):
        assert cli("export", run, "--format", "safetensors", "--dtype", dtype, "--out", tmp_path / dtype)[0] == 0
    small, large = ((tmp_path / d / "model.safetensors").stat().st_size for d in ("fp16", "fp32"))
    assert small < 0.6 * large
    code, out, err = cli("sample", tmp_path / "fp16", "--length", 50, "--seed", 2)
    assert code == 0 and len(out) > 50, err


def test_a_damaged_folder_or_bad_options_are_one_line(cli, run, tmp_path, monkeypatch):
    folder = tmp_path / "export"
    assert cli("export", run, "--format", "safetensors", "--out", folder)[0] == 0
    before = snapshot(run)
    config = json.loads((folder / "config.json").read_text())
    config["model"]["hidden_size"] = 64
    (folder / "config.json").write_text(json.dumps(config))  # the recorded sums cover the other files
    one_line_error(*cli("sample", folder)[::2], "does not match its own config")
    (folder / "vocab.json").write_text("{}")
    one_line_error(*cli("sample", folder)[::2], "vocab.json was changed after export")
    (folder / "vocab.json").unlink()
    one_line_error(*cli("eval", folder)[::2], "vocab.json is missing")
    one_line_error(*cli("export", run, "--format", "safetensors", "--dtype", "int4", "--out", tmp_path / "x")[::2], "--dtype")
    one_line_error(*cli("export", run, "--format", "onnx2", "--out", tmp_path / "x")[::2], "--format")
    (tmp_path / "afile").write_text("")
    one_line_error(*cli("export", run, "--format", "safetensors", "--out", tmp_path / "afile")[::2], "is a file")
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as where the extra is not installed
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    one_line_error(*cli("export", run, "--format", "safetensors", "--out", tmp_path / "y")[::2], "pip install 'charlm[safetensors]'")
    assert snapshot(run) == before


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_the_onnx_one_step_model_runs_in_onnxruntime_as_in_pytorch(cli, ascii_corpus, tmp_path, cell):
    ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    import numpy as np
    import torch

    import charlm
    code, _, err = cli("train", "--data", ascii_corpus, *TINY, "--max-steps", 20, "--model.cell", cell,
                       "--model.layers", 2, "--out", tmp_path / "run")
    assert code == 0, err
    code, _, err = cli("export", tmp_path / "run", "--format", "onnx", "--out", tmp_path / "model.onnx")
    assert code == 0, err
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    model, vocab, _, _ = charlm.load_model(tmp_path / "run")
    assert json.loads(session.get_modelmeta().custom_metadata_map["vocab"]) == vocab.chars
    for batch in (1, 3):  # the batch is a dynamic axis
        state = [np.zeros((2, batch, 32), np.float32) for _ in session.get_inputs()[1:]]
        hidden, ours, theirs, worst = None, np.full(batch, 0), np.full(batch, 0), 0.0
        with torch.no_grad():
            for _ in range(200):  # greedy from the same start: the same characters, logits within 1e-4
                logits, *state = session.run(None, {"ids": theirs.astype(np.int64), **dict(zip(("h", "c"), state))})
                reference, hidden = model(torch.from_numpy(ours)[:, None], hidden)
                worst = max(worst, float(np.abs(logits - reference[:, -1].numpy()).max()))
                ours, theirs = reference[:, -1].argmax(-1).numpy(), logits.argmax(-1)
                assert np.array_equal(ours, theirs)
        assert worst < 1e-4


def test_onnx_export_bad_input_is_one_line(cli, run, tmp_path, monkeypatch):
    one_line_error(*cli("export", run, "--format", "onnx", "--out", tmp_path)[::2], "is a folder")
    monkeypatch.setitem(sys.modules, "onnx", None)
    one_line_error(*cli("export", run, "--format", "onnx", "--out", tmp_path / "m.onnx")[::2], "pip install 'charlm[onnx]'")
