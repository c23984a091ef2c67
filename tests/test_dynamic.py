"""Dynamic evaluation: scores before it learns, never changes the checkpoint, steers sampling."""

import json
from pathlib import Path

import pytest
import torch

from charlm.config import ModelConfig
from charlm.data.vocab import Vocab
from charlm.dynamic import DynamicEvaluator, DynamicSettings, dynamic_loss
from charlm.model.charrnn import CharRNN
from tests.conftest import TINY, lorem, one_line_error, snapshot

VOCAB = Vocab("".join(sorted(set(lorem(1)))))


@pytest.fixture
def model() -> CharRNN:
    torch.manual_seed(0)
    return CharRNN(len(VOCAB), ModelConfig(layers=2, hidden_size=32, embedding_size=16, dropout=0.2)).eval()


def test_no_score_depends_on_a_later_character(model):
    """Scores of a prefix do not change when text is appended (segments end mid-way on purpose)."""
    text = torch.from_numpy(VOCAB.encode(lorem(3)))
    settings = DynamicSettings(lr=1e-2, segment=7)
    prefix = DynamicEvaluator(model, settings).score(text[:200])
    whole = DynamicEvaluator(model, settings).score(text)
    frozen = DynamicEvaluator(model, DynamicSettings(lr=1e-9, segment=7)).score(text)
    # Equal up to rounding: oneDNN and MKL pick kernels by shape, so on an AVX2 CPU the prefix's last,
    # 3-character segment rounds one ulp unlike the same characters in a 7-character one. Learning from
    # a later character would move a score by far more: adapting moves these by tenths of a nat.
    assert len(prefix) == 199
    torch.testing.assert_close(whole[:199], prefix, rtol=0, atol=1e-5)
    assert (whole[199:250] - frozen[199:250]).abs().max() > 0.1


def test_it_learns_the_text_and_leaves_the_model_alone(model):
    text = torch.from_numpy(VOCAB.encode(lorem(6)))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    static, _ = dynamic_loss(model, text, DynamicSettings(lr=1e-12, decay=0.0))
    dynamic, adapted = dynamic_loss(model, text, DynamicSettings(lr=3e-3))
    assert dynamic.loss < static.loss - 0.1 and dynamic.chars == static.chars == len(text) - 1
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert not torch.equal(adapted.head.bias, model.head.bias)


@pytest.fixture
def run(cli, ascii_corpus, tmp_path) -> Path:
    code, _, err = cli("train", "--data", ascii_corpus, *TINY, "--max-steps", 20, "--out", tmp_path / "run")
    assert code == 0, err
    return tmp_path / "run"


def test_eval_dynamic_through_the_cli(cli, run):
    before = snapshot(run)
    code, out, err = cli("eval", run, "--json")
    assert code == 0, err
    code, dyn_out, err = cli("eval", run, "--json", "--dynamic", "--dynamic-lr", "3e-3")
    assert code == 0, err
    static, dynamic = json.loads(out), json.loads(dyn_out)
    assert dynamic["loss"] < static["loss"] and dynamic["dynamic"]["lr"] == 3e-3 and static["dynamic"] is None
    assert snapshot(run) == before  # the checkpoint on disk is never modified
    one_line_error(*cli("eval", run, "--dynamic", "--dynamic-lr", "-1")[::2], "--dynamic-lr")
    one_line_error(*cli("eval", run, "--dynamic", "--dynamic-decay", "inf")[::2], "--dynamic-decay")  # refused before any work


def test_sample_adapt_steers_the_text_and_repeats_for_a_seed(cli, run, tmp_path):
    style = tmp_path / "style.txt"
    style.write_text("Pack my box with five dozen liquor jugs! " * 40)
    plain = cli("sample", run, "--length", 120, "--seed", 2)[1]
    code, adapted, err = cli("sample", run, "--length", 120, "--seed", 2, "--adapt", style)
    assert code == 0 and adapted != plain, err
    assert cli("sample", run, "--length", 120, "--seed", 2, "--adapt", style)[1] == adapted
    style.write_text("Zebras quiz 42 jumbled vexing wolves " * 10)
    one_line_error(*cli("sample", run, "--adapt", style)[::2], "'Z'", "never saw", "remove them from the file")
    code, _, err = cli("sample", run, "--adapt", tmp_path)
    one_line_error(code, err, "is a directory", "give a text file")
    assert "--data" not in err  # the option given was --adapt
