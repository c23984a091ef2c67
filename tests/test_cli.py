"""The three commands as a user runs them, and every kind of bad input they must refuse in one line."""

import json
import os
import pickle
import shutil
import threading
from pathlib import Path

import pytest
import torch

from charlm import files as files_module
from charlm import device as device_module
from tests.conftest import TINY, charlm_process, one_line_error, snapshot


@pytest.fixture
def trained(cli, ascii_corpus, tmp_path) -> Path:
    code, _, err = cli("train", "--data", ascii_corpus, *TINY, "--max-steps", 20, "--out", tmp_path / "run")
    assert code == 0, err
    return tmp_path / "run"


def test_help_explains_every_option(cli):
    for command in ([], ["train"], ["sample"], ["eval"]):
        code, out, _ = cli(*command, "--help")
        assert code == 0
        assert "Usage" in out
    _, out, _ = cli("train", "--help")
    for option in ("--model.cell", "--data", "--max-time", "--train.max-time", "--resume", "--train.random-seq-len", "--model.weight-drop"):
        assert option in out
    assert "default" in out


def test_train_sample_eval_on_ascii(cli, trained, capsys):
    for name in ("last.pt", "best.pt", "config.toml", "metrics.jsonl"):
        assert (trained / name).is_file()
    code, out, _ = cli("sample", trained, "--length", 100, "--seed", 3, "--prime", "The ")
    assert code == 0 and out.startswith("The ") and len(out.rstrip("\n")) >= 100
    code2, out2, _ = cli("sample", trained, "--length", 100, "--seed", 3, "--prime", "The ")
    assert out2 == out
    code, out, _ = cli("eval", trained, "--json")
    report = json.loads(out)
    assert code == 0 and report["chars"] > 0 and report["bits_per_char"] == pytest.approx(report["loss"] / 0.6931471805599453)
    code, out, _ = cli("eval", trained)
    assert code == 0 and "bits/char" in out and "perplexity" in out


def test_unicode_corpus_trains_and_samples(cli, unicode_corpus, tmp_path):
    code, _, err = cli("train", "--data", unicode_corpus, *TINY, "--max-steps", 30, "--out", tmp_path / "u",
                       "--model.cell", "gru")
    assert code == 0, err
    code, out, _ = cli("sample", tmp_path / "u", "--prime", "床前", "--length", 200, "--seed", 1, "--num-samples", 2)
    assert code == 0
    generated = out.replace("--- sample 1 ---", "").replace("--- sample 2 ---", "")
    assert set(generated) - {"\n"} <= set(unicode_corpus.read_text(encoding="utf-8"))
    assert any(ord(c) > 0x4E00 for c in generated)
    code, out, _ = cli("eval", tmp_path / "u", "--data", unicode_corpus, "--json")
    assert code == 0 and json.loads(out)["chars"] > 1000


def test_every_cell_and_tied_weights(cli, ascii_corpus, tmp_path):
    for cell in ("rnn", "lstm", "gru"):
        code, _, err = cli("train", "--data", ascii_corpus, *TINY, "--train.max-steps", 5, "--out", tmp_path / cell,
                           "--model.cell", cell, "--model.tie-weights", "--model.dropout", "0.2")
        assert code == 0, err
        assert "max_steps = 5\n" in (tmp_path / cell / "config.toml").read_text()  # the long form of --max-steps


def test_resume_through_the_cli(cli, trained):
    code, _, err = cli("train", "--resume", trained, "--max-steps", 30, "--quiet")
    assert code == 0, err
    assert torch.load(trained / "last.pt", weights_only=True)["step"] == 30


def test_eval_unknown_characters(cli, trained, tmp_path):
    text = tmp_path / "other.txt"
    text.write_text("The quick brown fox ✓ ünder € the lazy dog " * 5, encoding="utf-8")
    one_line_error(*cli("eval", trained, "--data", text)[::2], "'✓', 'ü', '€'", "--skip-unknown")
    code, out, _ = cli("eval", trained, "--data", text, "--skip-unknown", "--json")
    assert code == 0 and json.loads(out)["skipped_chars"] == 15


# ------------------------------------------------------------------ bad input, one line each

def test_bad_corpus_files(cli, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 10)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("déjà vu ".encode("latin-1") * 500)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    one_line_error(*cli("train", "--data", tmp_path / "missing.txt", *TINY)[::2], "not found")
    one_line_error(*cli("train", "--data", tmp_path, *TINY)[::2], "latin.txt is not valid UTF-8")  # a folder's files are read
    one_line_error(*cli("train", "--data", empty, *TINY)[::2], "is empty")
    one_line_error(*cli("train", "--data", binary, *TINY)[::2], "binary")
    one_line_error(*cli("train", "--data", latin, *TINY)[::2], "not valid UTF-8", "--data.encoding-errors replace")
    one_line_error(*cli("train", "--data", short, *TINY)[::2], "fewer than batch_size x (seq_len + 1)")
    code, _, err = cli("train", "--data", latin, *TINY, "--max-steps", 2, "--data.encoding-errors", "replace", "--out", tmp_path / "r")
    assert code == 0, err


def test_validation_split_too_small(cli, ascii_corpus):
    one_line_error(*cli("train", "--data", ascii_corpus, *TINY, "--data.val-fraction", "0.0001")[::2], "validation split")


def test_bad_sampling_options(cli, trained):
    one_line_error(*cli("sample", trained, "--prime", "xyz€")[::2], "'€'")
    one_line_error(*cli("sample", trained, "--temperature", "-1")[::2], "temperature")
    one_line_error(*cli("sample", trained, "--temperature", "nan")[::2], "temperature", "finite number")
    one_line_error(*cli("sample", trained, "--top-k", "0")[::2], "top-k")
    one_line_error(*cli("sample", trained, "--top-p", "0")[::2], "top-p")
    one_line_error(*cli("sample", trained, "--top-p", "1.5")[::2], "top-p")
    one_line_error(*cli("sample", trained, "--length", "-3")[::2], "length")


def test_sampling_more_than_memory_holds_is_refused_up_front(cli, trained):
    before = snapshot(trained)
    code, out, err = cli("sample", trained, "--num-samples", 100_000_000, "--length", 100)
    one_line_error(code, err, "100,000,000 samples of 100 characters need about", "at most", "(--num-samples)")
    assert out == ""  # not even the prime
    one_line_error(*cli("sample", trained, "--num-samples", 2, "--length", 10**15)[::2], "(--length)")
    assert snapshot(trained) == before


def test_one_endless_sample_streams_until_the_reader_stops(trained):
    """`charlm sample --length 1000000000000 | head` prints at once and keeps going in constant memory."""
    process = charlm_process("sample", trained, "--length", 10**12, "--seed", 1, text=False)
    watchdog = threading.Timer(120, process.kill)  # a hung sampler fails the test instead of blocking it
    watchdog.start()
    try:
        head = process.stdout.read(20_000)
        assert len(head) == 20_000 and process.poll() is None  # still going: nothing was reserved for the whole length
    finally:
        process.stdout.close()
        code = process.wait(timeout=60)
        watchdog.cancel()
    assert code in (0, 1) and b"Traceback" not in process.stderr.read()  # a closed pipe ends it quietly


def test_bad_config_input(cli, ascii_corpus, tmp_path):
    one_line_error(*cli("train", "--data", ascii_corpus, "--model.hiden-size", "3")[::2], "--model.hidden-size")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nlayerz = 2\n")
    one_line_error(*cli("train", "-c", bad)[::2], "'model.layers'")
    typed = tmp_path / "typed.toml"
    typed.write_text('[train]\nbatch_size = "many"\n')
    one_line_error(*cli("train", "-c", typed)[::2], "train.batch_size", "int")
    one_line_error(*cli("train", "--model.layers", "two")[::2], "--model.layers", "integer")
    one_line_error(*cli("train", "--data", ascii_corpus, "--train.lr", "nan")[::2], "train.lr", "finite number")
    endless = tmp_path / "endless.toml"
    endless.write_text("[model]\nforget_bias = inf\n")
    one_line_error(*cli("train", "-c", endless)[::2], "model.forget_bias", "finite number")
    one_line_error(*cli("train", "--data", ascii_corpus, "--train.beta2", "1")[::2], "train.beta2", "[0, 1)")
    one_line_error(*cli("train", "-c", tmp_path / "nope.toml")[::2], "not found")
    one_line_error(*cli("train", "--data", ascii_corpus, "--train.average-last", "1.5")[::2], "train.average_last", "between 0 and 1")
    one_line_error(*cli("train", "--data", ascii_corpus, "--max-time", "", "--train.average-last", "0.5")[::2],
                   "--train.average-last needs a run of known length")


def test_unwritable_output_and_bad_resume(cli, ascii_corpus, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("I am a file")
    one_line_error(*cli("train", "--data", ascii_corpus, *TINY, "--out", blocker / "run")[::2], "cannot write to the run directory")
    (tmp_path / "emptyrun").mkdir()
    one_line_error(*cli("train", "--resume", tmp_path / "emptyrun")[::2], "no last.pt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_unavailable_device(cli, ascii_corpus, trained):
    one_line_error(*cli("train", "--data", ascii_corpus, *TINY, "--device", "cuda")[::2], "not available", "--device cpu")
    one_line_error(*cli("sample", trained, "--device", "cuda")[::2], "not available")


def test_bf16_refused_on_a_cpu_without_it_and_fp16_off_cuda(cli, ascii_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: False)  # as on an AVX2-only CPU
    code, _, err = cli("train", "--data", ascii_corpus, *TINY, "--train.precision", "bf16", "--out", tmp_path / "bf16")
    one_line_error(code, err, "native bf16", "fp32 or auto")
    code, _, err = cli("train", "--data", ascii_corpus, *TINY, "--train.precision", "fp16", "--device", "cpu", "--out", tmp_path / "bf16")
    one_line_error(code, err, "fp16 is for CUDA GPUs", "auto or fp32")
    assert not (tmp_path / "bf16").exists()


@pytest.mark.parametrize("bf16_seconds, expected", [(0.5, "bf16"), (0.9, "fp32"), (2.0, "fp32")])
def test_auto_takes_bf16_only_where_it_measures_clearly_faster(monkeypatch, bf16_seconds, expected):
    """A CPU with bf16 instructions can still run them slower than fp32 (an Intel VM without AMX did)."""
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(device_module, "fastest", lambda calls: [bf16_seconds, 1.0])
    device_module.cpu_bf16_pays.cache_clear()
    try:
        assert device_module.resolve_precision("auto", torch.device("cpu")) == expected
        assert device_module.resolve_precision("bf16", torch.device("cpu")) == "bf16"  # asked for: allowed
    finally:
        device_module.cpu_bf16_pays.cache_clear()


def test_disk_full_during_save_keeps_the_earlier_checkpoint(cli, trained, monkeypatch):
    before = (trained / "last.pt").read_bytes()

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files_module.os, "fsync", full_disk)
    code, _, err = cli("train", "--resume", trained, "--max-steps", 40, "--quiet")
    last_line = err.strip().splitlines()[-1]  # after the run summary, which was printed before the save
    one_line_error(code, last_line, "No space left on device", "previous checkpoint is unchanged", "last.pt")
    assert (trained / "last.pt").read_bytes() == before
    assert not [p for p in trained.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------ checkpoint safety

class Payload:
    """Pickles into a call of os.system: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_in_a_checkpoint_never_runs(cli, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "charlm-checkpoint", "version": 1, "model": Payload(marker)}, evil)
    for command in ("sample", "eval"):
        one_line_error(*cli(command, evil)[::2], "refused", str(evil))
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(Payload(marker)))
    one_line_error(*cli("sample", raw)[::2], str(raw))
    assert not marker.exists()


def test_truncated_corrupt_and_foreign_files(cli, trained, tmp_path):
    data = (trained / "best.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(2000))
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(3)}}, foreign)
    future = tmp_path / "future.pt"
    torch.save({"format": "charlm-checkpoint", "version": 99, "charlm_version": "9.1.0"}, future)
    one_line_error(*cli("sample", truncated)[::2], str(truncated))
    one_line_error(*cli("eval", garbage)[::2], str(garbage))
    one_line_error(*cli("sample", foreign)[::2], "not a charlm checkpoint")
    one_line_error(*cli("sample", future)[::2], "written by charlm 9.1.0 in checkpoint format 99", "upgrade charlm")
    one_line_error(*cli("sample", tmp_path / "missing.pt")[::2], "not found")


def test_export_makes_a_small_checkpoint_that_samples_the_same(cli, trained, tmp_path):
    code, out, err = cli("export", trained, "--out", tmp_path / "small.pt")
    assert code == 0, err
    assert (tmp_path / "small.pt").stat().st_size < (trained / "best.pt").stat().st_size / 2
    exported = torch.load(tmp_path / "small.pt", weights_only=True)
    assert "optimizer" not in exported and exported["model"]["head.weight"].dtype == torch.float16
    _, full_eval, _ = cli("eval", trained, "--json")
    _, small_eval, _ = cli("eval", tmp_path / "small.pt", "--json", "--data-dir", os.environ["CHARLM_DATA_DIR"])
    assert json.loads(small_eval)["loss"] == pytest.approx(json.loads(full_eval)["loss"], abs=2e-3)


def test_an_export_leaves_the_trainers_own_paths_behind(cli, shakespeare, tmp_path):
    local_copy = tmp_path / "mine" / "shakespeare-copy.txt"
    local_copy.parent.mkdir()
    shutil.copy(shakespeare, local_copy)
    code, _, err = cli("train", "--data", local_copy, "--data-dir", tmp_path / "my-cache", *TINY, "--max-steps", 2, "--out", tmp_path / "run")
    assert code == 0, err
    assert cli("export", tmp_path / "run", "--out", tmp_path / "small.pt")[0] == 0
    exported = torch.load(tmp_path / "small.pt", weights_only=True)
    assert (exported["config"]["data"]["path"], exported["corpus"]["path"], exported["config"]["data"]["dir"]) == ("", "", "data")
    assert exported["config"]["train"]["out"] == "runs/run"
    shutil.rmtree(local_copy.parent)  # another machine: Tiny Shakespeare only in the reader's own cache
    code, out, err = cli("eval", tmp_path / "small.pt", "--json")
    assert code == 0, err
    assert str(shakespeare) in json.loads(out)["data"]


def test_an_export_keeps_the_path_of_a_corpus_of_ones_own(cli, trained, ascii_corpus, tmp_path):
    assert cli("export", trained, "--out", tmp_path / "small.pt")[0] == 0
    exported = torch.load(tmp_path / "small.pt", weights_only=True)
    assert exported["config"]["data"]["path"] == str(ascii_corpus)


# ------------------------------------------------------------------ plots

def test_plot_draws_loss_curves_of_runs(cli, trained, tmp_path):
    pytest.importorskip("matplotlib")
    from charlm.plot import read_metrics

    curves = read_metrics(trained)
    assert curves.val and curves.train and curves.final_val_loss is not None
    (trained / "metrics.jsonl").open("a").write('{"step": 21, "loss": 1.')  # a line cut short by a crash
    assert len(read_metrics(trained).train) == len(curves.train)

    out = tmp_path / "plots" / "loss.png"
    code, printed, err = cli("plot", trained, trained / "metrics.jsonl", "--out", out, "--x", "step")
    assert code == 0, err
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and out.stat().st_size > 10_000
    assert str(out) in printed


def test_plot_bad_input(cli, trained, tmp_path, monkeypatch):
    one_line_error(*cli("plot", tmp_path / "nowhere")[::2], "no metrics.jsonl")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    one_line_error(*cli("plot", empty)[::2], "no loss records")
    one_line_error(*cli("plot", trained, "--x", "chars")[::2], "--x must be one of")
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # as if the extra were not installed
    one_line_error(*cli("plot", trained)[::2], "pip install 'charlm[plot]'")
