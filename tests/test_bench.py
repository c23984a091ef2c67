import json

from charlm.bench import forward_flops_per_char
from charlm.config import ModelConfig, bench_config


def test_flop_count_from_the_shape():
    # LSTM 2x512, embedding 128, 65 characters: 2*4*512*(128+512) + 2*4*512*1024 + 2*512*65
    assert forward_flops_per_char(bench_config().model, 65) == 2_621_440 + 4_194_304 + 66_560
    assert forward_flops_per_char(ModelConfig(cell="gru", layers=1, hidden_size=10, embedding_size=10, tie_weights=True), 7) == 2 * 3 * 10 * 20 + 2 * 10 * 7


def test_fast_bench_runs_end_to_end(cli):
    code, out, err = cli("bench", "--fast", "--json", "--layers", "1", "--hidden-size", "64", "--embedding-size", "16",
                         "--batch-size", "8", "--seq-len", "16", "--device", "cpu", "--profile")
    assert code == 0, err
    results = json.loads(out)
    assert results["train"]["chars_per_s"] > 0 and 0 < results["train"]["fraction_of_peak"]
    assert results["eval"]["chars_per_s"] > 0
    assert results["sample"]["one_stream_chars_per_s"] > 0 and results["sample"]["batch_256_chars_per_s"] > 0
    assert results["encode"]["chars"] > 1_000_000 and results["encode"]["cached_load_seconds"] >= 0
    assert results["matmul_gflops"]["fp32"] > 0
    # the profile names where a training step's time goes, the recurrent kernels among it
    profile = results["train_profile"]
    assert 0 < sum(row["share"] for row in profile) <= 1.0001
    assert any("rnn" in row["op"] or "lstm" in row["op"] for row in profile)


def test_encode_only_measures_a_real_corpus(cli, tmp_path):
    (tmp_path / "src").mkdir()
    for name in ("a.py", "b.py"):
        (tmp_path / "src" / name).write_text("print('hello')\n" * 100, encoding="utf-8")
    code, out, err = cli("bench", "--encode-only", "--json", "--path", tmp_path / "src", "--unit", "byte")
    assert code == 0, err
    encode = json.loads(out)["encode"]
    assert encode["chars"] == 2 * 1500 + 1  # two files' bytes and the separator between them
    assert encode["corpus_mb"] == 3000 / 1e6 and encode["peak_memory_mb"] > 0
    assert "train" not in json.loads(out)
