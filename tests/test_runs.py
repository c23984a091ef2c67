"""Runs as a user meets them: resume with overrides, fine-tuning, one writer per run, old checkpoints."""

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from charlm.model.checkpoint import load_checkpoint
from tests.conftest import TINY, TINY_OPTIONS, charlm_process, one_line_error, snapshot, wait_for


@pytest.fixture
def run(cli, ascii_corpus, tmp_path) -> Path:
    """A finished 20-step run of the tiny model."""
    code, _, err = cli("train", "--data", ascii_corpus, *TINY, "--max-steps", 20, "--out", tmp_path / "run")
    assert code == 0, err
    return tmp_path / "run"


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ resume

@pytest.mark.parametrize("option, value, fragment", [
    ("--model.hidden-size", "128", "--model.hidden-size when resuming"),
    ("--model.cell", "gru", "(saved 'lstm', asked 'gru'): it would change the model"),
    ("--train.batch-size", "16", "(saved 4, asked 16): it would change the stream layout"),
    ("--train.seq-len", "32", "--train.seq-len"),
    ("--train.lr", "0.1", "the run's training recipe"),
    ("--seed", "7", "--train.seed"),
    ("--out", "elsewhere", "its own directory"),
])
def test_resume_refuses_what_would_change_the_run(cli, run, option, value, fragment):
    (run / ".lock").unlink()  # as a run of charlm 0.1 left it: a refusal must not add one either
    before = snapshot(run)
    one_line_error(*cli("train", "--resume", run, option, value)[::2], fragment, "--out DIR")
    assert snapshot(run) == before


def test_resume_refuses_another_corpus(cli, run, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("The lazy dog jumps over the quick brown fox. " * 80)
    before = snapshot(run)
    one_line_error(*cli("train", "--resume", run, "--data", other)[::2], "--data.path when resuming", "it would change the corpus")
    # the same path with other content is caught by the recorded checksum
    corpus = Path(load_checkpoint(run / "last.pt")["corpus"]["path"])
    original = corpus.read_text()
    corpus.write_text(original.replace("fox", "cat"))
    one_line_error(*cli("train", "--resume", run, "--max-steps", 30)[::2], "is not the corpus", "--init-from")
    assert snapshot(run) == before
    corpus.write_text(original)


def test_resume_rejects_mixing_with_a_config_or_init_from(cli, run):
    before = snapshot(run)
    one_line_error(*cli("train", "--resume", run, "-c", "quick")[::2], "takes no --config")
    one_line_error(*cli("train", "--resume", run, "--init-from", run)[::2], "--init-from")
    assert snapshot(run) == before


def test_resume_applies_what_may_change_and_notes_it(cli, run):
    code, _, err = cli("train", "--resume", run, "--max-steps", 30, "--train.eval-interval", 5)
    assert code == 0, err
    assert "changed on resume" in err and "train.max_steps 20 -> 30" in err
    saved = (run / "config.toml").read_text()
    assert "max_steps = 30\n" in saved and "eval_interval = 5\n" in saved
    resumed = [r for r in metrics(run) if "resumed" in r]
    assert resumed == [{"step": 20, "elapsed": resumed[0]["elapsed"],
                        "resumed": {"train.max_steps": {"saved": 20, "now": 30}, "train.eval_interval": {"saved": 10, "now": 5}}}]
    assert load_checkpoint(run / "last.pt")["step"] == 30
    assert [r["step"] for r in metrics(run) if "val_loss" in r][-2:] == [25, 30]  # the new interval took effect


# ------------------------------------------------------------------ fine-tuning

def test_fine_tuning_starts_from_the_weights_with_a_fresh_optimizer(cli, run, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("The lazy dog jumps over the quick brown fox. " * 80)  # characters the run's vocabulary has
    code, _, err = cli("train", "--init-from", run, "--data", other, "--out", tmp_path / "tuned", *TINY_OPTIONS,
                       "--max-steps", 2, "--train.lr", "1e-9", "--train.min-lr", "0")
    assert code == 0, err
    assert "initialised from" in err
    source, tuned = load_checkpoint(run / "best.pt"), load_checkpoint(tmp_path / "tuned" / "last.pt")
    assert tuned["vocab"] == source["vocab"] and tuned["step"] == 2 and tuned["init_from"] == str(run / "best.pt")
    for name, weights in source["model"].items():  # a learning rate of 1e-9 leaves the source's weights in place
        torch.testing.assert_close(tuned["model"][name], weights, atol=1e-6, rtol=0)
    adam_steps = {float(state["step"]) for state in tuned["optimizer"]["state"].values()}
    assert adam_steps == {2.0}  # a fresh optimizer: two updates, not 22
    code, out, _ = cli("sample", tmp_path / "tuned", "--length", 50, "--seed", 1)
    assert code == 0 and len(out) > 50


def test_fine_tuning_names_characters_outside_the_vocabulary(cli, run, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("The lazy dog jumps over the quick brown fox 3 € cheaper. " * 80)
    one_line_error(*cli("train", "--init-from", run, "--data", other, "--out", tmp_path / "tuned", *TINY)[::2],
                   "'3', '€'", "--data.skip-unknown")
    assert not (tmp_path / "tuned").exists()
    code, _, err = cli("train", "--init-from", run, "--data", other, "--out", tmp_path / "tuned", *TINY_OPTIONS,
                       "--max-steps", 2, "--data.skip-unknown")
    assert code == 0, err
    assert "unknown characters skipped" in err and "160" in err  # '3' and '€', 80 times each
    assert load_checkpoint(tmp_path / "tuned" / "last.pt")["corpus"]["skipped"] == 160


def test_fine_tuning_refuses_model_changes(cli, run, tmp_path):
    one_line_error(*cli("train", "--init-from", run, "--out", tmp_path / "tuned", *TINY, "--model.hidden-size", 64)[::2],
                   "--model.hidden-size when fine-tuning", "(saved 32, asked 64)")
    assert not (tmp_path / "tuned").exists()


# ------------------------------------------------------------------ one writer per run

def start_training(corpus: Path, run: Path) -> subprocess.Popen:
    """`charlm train` of the tiny model in its own process, with no end in sight."""
    return charlm_process("train", "--data", corpus, *TINY, "--max-steps", 100000, "--out", run,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_one_writer_per_run_and_readers_keep_working(cli, ascii_corpus, tmp_path):
    run = tmp_path / "busy"
    trainer = start_training(ascii_corpus, run)
    try:
        assert wait_for(lambda: (run / "best.pt").is_file() and (run / "last.pt").is_file())
        one_line_error(*cli("train", "--resume", run)[::2], f"process {trainer.pid} is training in it")
        one_line_error(*cli("train", "--data", ascii_corpus, *TINY, "--out", run)[::2], "already holds a run")
        code, out, err = cli("sample", run, "--length", 40, "--seed", 1)  # readers take no lock
        assert code == 0 and len(out) > 40, err
        code, _, err = cli("eval", run, "--json")
        assert code == 0, err
    finally:
        trainer.kill()
        trainer.wait()
    step = load_checkpoint(run / "last.pt")["step"]
    code, _, err = cli("train", "--resume", run, "--max-steps", step + 3)  # a killed run leaves no stale lock
    assert code == 0, err


# ------------------------------------------------------------------ checkpoint formats

def as_format_1(path: Path) -> None:
    """Rewrite a checkpoint the way charlm 0.1 wrote it (format 1)."""
    payload = torch.load(path, weights_only=True)
    for key in ("charlm_version", "corpus", "init_from"):
        payload.pop(key)
    payload["schedule"] = {"step": payload["step"], "elapsed": payload.pop("elapsed"), "warmup_steps": 2}
    payload["config"]["data"].pop("skip_unknown")
    torch.save({**payload, "version": 1}, path)


def test_format_1_checkpoints_still_sample_evaluate_and_resume(cli, run):
    code, before, _ = cli("sample", run, "--length", 60, "--seed", 4)
    as_format_1(run / "best.pt")
    as_format_1(run / "last.pt")
    code, after, err = cli("sample", run, "--length", 60, "--seed", 4)
    assert code == 0 and after == before, err
    code, _, err = cli("eval", run, "--json")
    assert code == 0, err
    code, _, err = cli("train", "--resume", run, "--max-steps", 25)
    assert code == 0, err
    resumed = load_checkpoint(run / "last.pt")
    assert resumed["step"] == 25 and resumed["charlm_version"] != "0.1.0" and resumed["corpus"]["sha256"]


def test_every_checkpoint_records_its_format_and_charlm_version(run):
    import charlm
    payload = torch.load(run / "last.pt", weights_only=True)
    assert payload["version"] == 2 and payload["charlm_version"] == charlm.__version__


# ------------------------------------------------------------------ interruptions keep the lock honest

def test_sigterm_releases_the_run_for_a_resume(cli, ascii_corpus, tmp_path):
    run = tmp_path / "run"
    process = start_training(ascii_corpus, run)
    try:
        assert wait_for(lambda: (run / "last.pt").is_file())
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 143
    finally:
        process.kill()
        process.wait()
    step = load_checkpoint(run / "last.pt")["step"]
    code, _, err = cli("train", "--resume", run, "--max-steps", step + 2)
    assert code == 0, err
