import pytest
import torch

from charlm.config import ModelConfig
from charlm.data.vocab import Vocab
from charlm.errors import CharlmError
from charlm.model.charrnn import CharRNN
from charlm.sampling import SampleSettings, filter_probs, generate, stream

VOCAB = Vocab("\nabcdefgh 明🌙")


@pytest.fixture
def model():
    torch.manual_seed(0)
    # PyTorch's random forget gates: with open ones this untrained model's greedy path is one character.
    return CharRNN(len(VOCAB), ModelConfig(layers=2, hidden_size=32, embedding_size=8, forget_bias=0.0)).eval()


def test_same_seed_same_text(model):
    settings = SampleSettings(length=80, seed=7)
    first = generate(model, VOCAB, "ab", settings)
    assert first == generate(model, VOCAB, "ab", settings)
    assert first != generate(model, VOCAB, "ab", SampleSettings(length=80, seed=8))
    assert len(first[0]) == 80 and set(first[0]) <= set(VOCAB.chars)


def test_streamed_text_is_the_returned_text(model):
    pieces = []
    texts = generate(model, VOCAB, "明", SampleSettings(length=50, seed=1), on_text=lambda i, t: pieces.append(t))
    assert "".join(pieces) == texts[0]


def test_batch_rows_are_independent_and_reproducible(model):
    settings = SampleSettings(length=60, seed=3, num_samples=4)
    texts = generate(model, VOCAB, "", settings)
    assert len(texts) == 4 and len(set(texts)) > 1
    assert texts == generate(model, VOCAB, "", settings)


def test_step_path_and_full_layer_path_give_the_same_text(model):
    """Sampling through nn.LSTM one character at a time picks the same characters."""
    settings = SampleSettings(length=40, seed=11)
    fast = generate(model, VOCAB, "ab", settings)[0]
    from charlm.sampling import choose
    uniforms = torch.rand(40, 1, generator=torch.Generator().manual_seed(11))
    ids = torch.tensor([VOCAB.encode("ab").tolist()])
    _, hidden = model(ids[:, :1])
    token, out = ids[:, 1], []
    for i in range(40):
        logits, hidden = model(token[:, None], hidden)
        token = choose(logits[:, -1], uniforms[i], settings)
        out.append(int(token))
    assert VOCAB.decode(out) == fast


def test_greedy_and_top_k_one_agree(model):
    greedy = generate(model, VOCAB, "a", SampleSettings(length=30, temperature=0, seed=1))
    top1 = generate(model, VOCAB, "a", SampleSettings(length=30, top_k=1, seed=2))
    assert greedy == top1


def test_filters():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert torch.equal(filter_probs(probs, 2, None) > 0, torch.tensor([[True, True, False, False]]))
    assert torch.equal(filter_probs(probs, None, 0.7) > 0, torch.tensor([[True, True, False, False]]))
    assert torch.equal(filter_probs(probs, None, 0.5) > 0, torch.tensor([[True, False, False, False]]))
    assert torch.equal(filter_probs(probs, None, 1.0), probs)


@pytest.mark.parametrize("settings, message", [
    (SampleSettings(temperature=-1), "temperature"), (SampleSettings(top_k=0), "top-k"),
    (SampleSettings(top_p=0), "top-p"), (SampleSettings(top_p=1.5), "top-p"), (SampleSettings(length=-5), "length"),
])
def test_bad_settings(model, settings, message):
    with pytest.raises(CharlmError, match=message):
        generate(model, VOCAB, "a", settings)


def test_unknown_prime_characters_are_named(model):
    with pytest.raises(CharlmError, match="'z', 'Q'"):
        generate(model, VOCAB, "abzQ", SampleSettings(length=5))


@pytest.mark.parametrize("settings", [SampleSettings(temperature=0.8), SampleSettings(temperature=0),
                                      SampleSettings(top_k=4), SampleSettings(top_p=0.7, temperature=1.3)],
                         ids=["temperature", "greedy", "top-k", "top-p"])
def test_numpy_and_torch_samplers_pick_the_same_characters(model, settings):
    """One stream on the CPU goes through numpy; the PyTorch path must choose exactly as it does."""
    from charlm.model.inference import inference_weights
    from charlm.sampling import NumpySampler, TorchSampler
    ids = torch.tensor([VOCAB.encode("ab明").tolist()])
    _, hidden = model(ids[:, :-1])
    uniforms = torch.rand(200, 1, generator=torch.Generator().manual_seed(5))
    weights = inference_weights(model)
    numpy_ids = NumpySampler(weights, hidden, ids[:, -1], settings).run(uniforms)
    torch_ids = TorchSampler(weights, hidden, ids[:, -1], settings).run(uniforms)
    assert numpy_ids == torch_ids and len(set(numpy_ids[0])) > (1 if settings.temperature == 0 else 3)


def test_a_length_beyond_memory_streams_the_same_text(model):
    """No length is too long to stream: the first pieces are the text a short run of the same seed makes."""
    pieces = stream(model, VOCAB, "ab", SampleSettings(length=10**12, seed=9))
    streamed = "".join(next(pieces)[0] for _ in range(50))
    assert streamed == generate(model, VOCAB, "ab", SampleSettings(length=len(streamed), seed=9))[0]
    assert len(streamed) == 50 * 16


def test_texts_that_cannot_fit_in_memory_are_refused_up_front(model):
    with pytest.raises(CharlmError, match=r"at most [\d,]+ samples of 100 characters fit \(--num-samples\)"):
        stream(model, VOCAB, "a", SampleSettings(length=100, num_samples=10**9))
    with pytest.raises(CharlmError, match=r"at most [\d,]+ characters a sample fit for 1 sample \(--length\)"):
        generate(model, VOCAB, "a", SampleSettings(length=10**15))
