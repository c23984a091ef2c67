import pytest
import torch

from charlm.config import ModelConfig
from charlm.model.charrnn import CharRNN, per_layer, sequence_loss
from charlm.model.inference import NumpyStepper


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("embedding_size", [8, 32])  # wider than the vocabulary: folded into the first layer
def test_single_step_path_matches_the_full_layer(cell, embedding_size):
    torch.manual_seed(0)
    model = CharRNN(20, ModelConfig(cell=cell, layers=2, hidden_size=24, embedding_size=embedding_size)).eval()
    weights = model.step_weights()
    assert weights.one_hot_input == (embedding_size > 20)
    ids = torch.randint(0, 20, (3, 12))
    full, _ = model(ids)
    state = per_layer(model.init_hidden(3))
    for t in range(12):
        logits, state = model.step(ids[:, t], state, weights)
        torch.testing.assert_close(logits, full[:, t], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("tie_weights", [False, True])  # tied with hidden 24 != 16: a projection is folded in
def test_numpy_step_matches_the_full_layer_from_a_carried_state(cell, tie_weights):
    torch.manual_seed(0)
    config = ModelConfig(cell=cell, layers=2, hidden_size=24, embedding_size=16, tie_weights=tie_weights)
    model = CharRNN(20, config).eval()
    ids = torch.randint(0, 20, (3, 12))
    full, _ = model(ids)
    _, hidden = model(ids[:, :4])
    step = NumpyStepper(model, hidden)
    for t in range(4, 12):
        torch.testing.assert_close(torch.from_numpy(step(ids[:, t].numpy())), full[:, t], rtol=1e-4, atol=1e-5)


def test_tied_weights_share_the_embedding():
    model = CharRNN(30, ModelConfig(hidden_size=32, embedding_size=16, tie_weights=True))
    assert model.head.weight is model.embedding.weight
    assert model.projection is not None
    logits, _ = model(torch.randint(0, 30, (2, 5)))
    assert logits.shape == (2, 5, 30)


def test_weight_drop_masks_then_restores_and_masks_the_gradient():
    torch.manual_seed(0)
    model = CharRNN(10, ModelConfig(layers=1, hidden_size=16, embedding_size=8, weight_drop=0.5)).train()
    raw = model.rnn.weight_hh_l0.detach().clone()
    ids = torch.randint(0, 10, (2, 6))
    with model.weight_drop():
        dropped = model.rnn.weight_hh_l0.detach().clone()
        logits, _ = model(ids)
        sequence_loss(logits, ids).backward()
    assert torch.equal(model.rnn.weight_hh_l0, raw)
    zeroed = dropped == 0
    assert 0.3 < zeroed.float().mean() < 0.7
    assert torch.all(model.rnn.weight_hh_l0.grad[zeroed] == 0)
    assert model.rnn.weight_hh_l0.grad[~zeroed].abs().sum() > 0
    assert model.rnn.weight_hh_l0.data_ptr() == model.rnn._flat_weights[1].data_ptr()  # the same storage


def test_weight_drop_is_off_in_eval_mode():
    model = CharRNN(10, ModelConfig(layers=1, hidden_size=16, embedding_size=8, weight_drop=0.5)).eval()
    before = model.rnn.weight_hh_l0.detach().clone()
    with model.weight_drop():
        assert torch.equal(model.rnn.weight_hh_l0, before)
