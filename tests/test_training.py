import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from charlm.model.checkpoint import load_checkpoint
from charlm.config import load_config
from charlm.errors import CharlmError
from charlm.training.loop import Trainer, train

TINY_KEYS = {"model.layers": 1, "model.hidden_size": 32, "model.embedding_size": 16, "train.batch_size": 4,
             "train.seq_len": 16, "train.warmup_steps": 2, "train.eval_interval": 10, "train.eval_batches": 2,
             "train.checkpoint_interval": 10, "train.log_interval": 5}


def tiny_config(corpus: Path, out: Path, **extra):
    return load_config(None, {**TINY_KEYS, "data.path": str(corpus), "data.dir": str(out.parent / "cache"),
                              "train.out": str(out), **extra})


def test_overfits_a_repetitive_text(tmp_path):
    corpus = tmp_path / "abc.txt"
    corpus.write_text("hello world, hello charlm! " * 400)
    config = tiny_config(corpus, tmp_path / "run", **{
        "model.hidden_size": 64, "train.batch_size": 8, "train.seq_len": 32, "train.lr": 0.01,
        "train.max_steps": 300, "train.eval_interval": 100, "train.checkpoint_interval": 100})
    result = train(config)
    assert result.final.loss < 0.05
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["final_val_loss"] == pytest.approx(result.final.loss)
    assert (tmp_path / "run" / "config.toml").is_file()


def test_resume_continues_from_the_saved_step(tmp_path, ascii_corpus):
    first = train(tiny_config(ascii_corpus, tmp_path / "run", **{"train.max_steps": 20}))
    assert first.step == 20
    resumed = train(tiny_config(ascii_corpus, tmp_path / "run", **{"train.max_steps": 35}), resume=True)
    assert resumed.step == 35
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 35
    steps = [json.loads(line).get("step") for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # nothing after step 20 from the first run was kept twice


def test_a_run_directory_is_never_overwritten(tmp_path, ascii_corpus):
    train(tiny_config(ascii_corpus, tmp_path / "run", **{"train.max_steps": 5}))
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with pytest.raises(CharlmError, match="already holds a run.*--resume"):
        train(tiny_config(ascii_corpus, tmp_path / "run", **{"train.max_steps": 5}))
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


def test_stops_by_time_and_by_epochs(tmp_path, ascii_corpus):
    timed = train(tiny_config(ascii_corpus, tmp_path / "timed", **{"train.max_time": "2s"}))
    assert timed.stopped_by == "max_time" and 2.0 <= timed.elapsed < 4.0
    epochs = train(tiny_config(ascii_corpus, tmp_path / "epochs", **{"train.max_epochs": 1.0}))
    assert epochs.stopped_by == "max_epochs" and 1.0 <= epochs.epochs < 1.1


def test_non_finite_losses_are_skipped_then_stop_training(tmp_path, ascii_corpus, monkeypatch):
    config = tiny_config(ascii_corpus, tmp_path / "run", **{"train.max_steps": 40, "train.max_bad_steps": 3})
    trainer = Trainer(config)
    real_forward = trainer.model.forward
    calls = {"n": 0}

    def poisoned(ids, hidden=None):
        calls["n"] += 1
        logits, hidden = real_forward(ids, hidden)
        if trainer.model.training and calls["n"] in (3, 4) or calls["n"] >= 25:
            logits = logits * float("nan")
        return logits, hidden

    monkeypatch.setattr(trainer.model, "forward", poisoned)
    with pytest.raises(CharlmError, match="3 consecutive steps had a non-finite loss"):
        trainer.run()
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert all(torch.isfinite(t).all() for t in best["model"].values())
    assert math.isfinite(best["best_val_loss"])
    assert trainer.step >= 20  # the two early bad steps were skipped, training went on


def run_cli_process(*args, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "charlm", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kwargs)


TINY_ARGS = [arg for key, value in TINY_KEYS.items() for arg in ("--" + key.replace("_", "-"), str(value))]


def wait_for(predicate, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def checkpoint_step(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["step"])
    except Exception:
        return -1


def test_killed_run_resumes_bit_identically(tmp_path, ascii_corpus):
    """SIGKILL mid-run, resume, and end with exactly the weights of an uninterrupted run."""
    common = ["train", "--data", ascii_corpus, *TINY_ARGS, "--max-steps", 400, "--quiet", "--model.layers", 2,
              "--model.dropout", 0.1, "--train.random-seq-len", "--model.weight-drop", 0.2]
    reference = run_cli_process(*common, "--out", tmp_path / "reference")
    assert reference.wait(timeout=240) == 0, reference.stderr.read()

    victim = run_cli_process(*common, "--out", tmp_path / "victim")
    last = tmp_path / "victim" / "last.pt"
    assert wait_for(lambda: checkpoint_step(last) >= 100), "the run never reached step 100"
    victim.kill()
    victim.wait()
    killed_at = checkpoint_step(last)
    assert 100 <= killed_at < 400, "the run finished before it could be killed"

    resumed = run_cli_process("train", "--resume", tmp_path / "victim", "--quiet")
    assert resumed.wait(timeout=240) == 0, resumed.stderr.read()
    ref, res = (load_checkpoint(tmp_path / name / "last.pt") for name in ("reference", "victim"))
    assert ref["step"] == res["step"] == 400
    for key, tensor in ref["model"].items():
        assert torch.equal(tensor, res["model"][key]), key
    assert torch.equal(ref["rng"]["torch"], res["rng"]["torch"])


def test_kill_at_any_moment_leaves_loadable_checkpoints(tmp_path, ascii_corpus):
    """Checkpoint every step and SIGKILL at arbitrary moments: what is on disk always loads."""
    for attempt, delay in enumerate((0.0, 0.037, 0.071)):
        run = tmp_path / f"run{attempt}"
        process = run_cli_process("train", "--data", ascii_corpus, *TINY_ARGS, "--max-steps", 100000, "--quiet",
                                  "--train.checkpoint-interval", 1, "--train.eval-interval", 3, "--out", run)
        assert wait_for(lambda: checkpoint_step(run / "best.pt") >= 3)
        time.sleep(delay)
        process.kill()
        process.wait()
        for name in ("last.pt", "best.pt"):
            assert load_checkpoint(run / name)["step"] >= 3


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_save_and_explain_how_to_resume(tmp_path, ascii_corpus, sig, code):
    run = tmp_path / "run"
    process = run_cli_process("train", "--data", ascii_corpus, *TINY_ARGS, "--max-steps", 100000,
                              "--train.checkpoint-interval", 100000, "--out", run)
    assert wait_for(lambda: (run / "metrics.jsonl").is_file())
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert "Traceback" not in err
    assert f"charlm train --resume {run}" in err
    assert load_checkpoint(run / "last.pt")["step"] > 0
