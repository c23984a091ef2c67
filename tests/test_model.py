import pytest
import torch

from charlm.config import ModelConfig
from charlm.model.charrnn import CharRNN, sequence_loss
from charlm.model.inference import Stepper, inference_weights


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("tie_weights", [False, True])  # tied with hidden 24 != 16: a projection is folded in
@pytest.mark.parametrize("library", ["torch", "numpy"])
def test_stepper_matches_the_full_layer_from_a_carried_state(cell, tie_weights, library):
    """Both steppers, on the one weights bundle, give the full nn.RNN/LSTM/GRU's logits character by character."""
    torch.manual_seed(0)
    config = ModelConfig(cell=cell, layers=2, hidden_size=24, embedding_size=16, tie_weights=tie_weights)
    model = CharRNN(20, config).eval()
    ids = torch.randint(0, 20, (3, 12))
    full, _ = model(ids)
    _, hidden = model(ids[:, :4])
    weights = inference_weights(model)
    step = Stepper(weights.to_numpy() if library == "numpy" else weights, hidden)
    for t in range(4, 12):
        logits = step(ids[:, t].numpy() if library == "numpy" else ids[:, t])
        torch.testing.assert_close(torch.as_tensor(logits), full[:, t], rtol=1e-4, atol=1e-5)


def test_the_weights_bundle_is_a_copy():
    """Sampling reads the weights as they were when it began: later training does not reach them."""
    torch.manual_seed(0)
    model = CharRNN(20, ModelConfig(layers=1, hidden_size=8, embedding_size=8)).eval()
    weights = inference_weights(model)
    before = weights.input_table.clone(), weights.layers[0].hidden_t.clone(), weights.head_t.clone()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    for kept, now in zip(before, (weights.input_table, weights.layers[0].hidden_t, weights.head_t)):
        assert torch.equal(kept, now)


def test_tied_weights_share_the_embedding():
    model = CharRNN(30, ModelConfig(hidden_size=32, embedding_size=16, tie_weights=True))
    assert model.head.weight is model.embedding.weight
    assert model.projection is not None
    logits, _ = model(torch.randint(0, 30, (2, 5)))
    assert logits.shape == (2, 5, 30)


def test_forget_bias_opens_only_the_forget_gates():
    size = 16
    torch.manual_seed(0)
    plain = CharRNN(10, ModelConfig(layers=2, hidden_size=size, embedding_size=size, forget_bias=0.0))
    torch.manual_seed(0)
    opened = CharRNN(10, ModelConfig(layers=2, hidden_size=size, embedding_size=size, forget_bias=1.0))
    forget = slice(size, 2 * size)
    for layer in range(2):
        total = getattr(opened.rnn, f"bias_ih_l{layer}") + getattr(opened.rnn, f"bias_hh_l{layer}")
        assert torch.equal(total[forget], torch.ones(size))
        for name in (f"bias_ih_l{layer}", f"bias_hh_l{layer}"):
            kept, changed = getattr(plain.rnn, name), getattr(opened.rnn, name)
            assert torch.equal(torch.cat([kept[:size], kept[2 * size:]]), torch.cat([changed[:size], changed[2 * size:]]))


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
