"""Training as a whole: it learns, stops where the budget says, survives bad steps, kills and signals."""

import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch

import charlm
from charlm.config import TrainConfig
from charlm.errors import CharlmError
from charlm.model.charrnn import CharRNN
from charlm.model.checkpoint import export_for_inference, load_checkpoint, load_model
from charlm.runinfo import checkpoint_info
from charlm.training.budget import Position, StopBudget
from charlm.training.loop import learning_rate
from tests.conftest import TINY_OPTIONS, charlm_process, wait_for


def test_overfits_a_repetitive_text(tmp_path, tiny_config):
    corpus = tmp_path / "abc.txt"
    corpus.write_text("hello world, hello charlm! " * 400)
    config = tiny_config(**{
        "data.path": str(corpus), "model.hidden_size": 64, "train.batch_size": 8, "train.seq_len": 32, "train.lr": 0.01,
        "train.max_steps": 300, "train.eval_interval": 100, "train.checkpoint_interval": 100})
    result = charlm.train(config)
    assert result.final.loss < 0.05
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["final_val_loss"] == pytest.approx(result.final.loss)
    assert (tmp_path / "run" / "config.toml").is_file()


def test_resume_continues_from_the_saved_step(tmp_path, tiny_config):
    first = charlm.train(tiny_config(**{"train.max_steps": 20}))
    assert first.step == 20
    resumed = charlm.resume(tmp_path / "run", {"train.max_steps": 35})
    assert resumed.step == 35
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 35
    steps = [json.loads(line).get("step") for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # nothing after step 20 from the first run was kept twice


def test_a_run_directory_is_never_overwritten(tmp_path, tiny_config):
    charlm.train(tiny_config(**{"train.max_steps": 5}))
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with pytest.raises(CharlmError, match="already holds a run.*--resume"):
        charlm.train(tiny_config(**{"train.max_steps": 5}))
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


def test_stops_by_time_and_by_epochs(tiny_config):
    timed = charlm.train(tiny_config("timed", **{"train.max_time": "2s"}))
    assert timed.stopped_by == "max_time" and timed.elapsed >= 2.0
    epochs = charlm.train(tiny_config("epochs", **{"train.max_epochs": 1.0}))
    assert epochs.stopped_by == "max_epochs" and 1.0 <= epochs.epochs < 1.1


def test_budget_stops_at_the_tightest_limit_and_counts_evaluations_in_the_time_left():
    budget = StopBudget(TrainConfig(max_steps=1000, max_epochs=2.0, max_time="100s", eval_interval=100, eval_batches=10),
                        final_eval_windows=40)
    assert budget.stop_reason(Position(step=500, epochs=1.0, elapsed=50.0)) is None
    assert budget.stop_reason(Position(step=500, epochs=2.0, elapsed=50.0)) == "max_epochs"
    assert budget.stop_reason(Position(step=500, epochs=1.0, elapsed=100.0)) == "max_time"
    halfway = Position(step=500, epochs=0.5, elapsed=50.0)
    assert budget.progress(halfway) == 0.5 and budget.total_steps(halfway) == 1000
    assert budget.seconds_left(halfway) == pytest.approx(50.0)  # no evaluation timed yet
    budget.evaluated(2.0)
    # 50 s of training, 5 periodic evaluations of 2 s, and the final one reads 4x their windows
    assert budget.seconds_left(halfway) == pytest.approx(50.0 + 5 * 2.0 + 4 * 2.0)


def test_learning_rate_warms_up_then_decays_to_the_floor_by_either_schedule():
    for schedule in ("cosine", "linear"):
        train = TrainConfig(lr=4e-3, min_lr=1e-4, warmup_steps=10, schedule=schedule)
        assert learning_rate(train, 0, 0.0) == pytest.approx(4e-4)
        assert learning_rate(train, 10, 0.0) == pytest.approx(4e-3)
        assert learning_rate(train, 500, 0.5) == pytest.approx(2.05e-3)  # both pass the midpoint halfway
        assert learning_rate(train, 1000, 1.0) == pytest.approx(1e-4)
    # the cosine keeps more of the peak early on and less late: at a quarter and three quarters
    cosine, linear = TrainConfig(schedule="cosine"), TrainConfig(schedule="linear")
    assert learning_rate(cosine, 250, 0.25) > learning_rate(linear, 250, 0.25)
    assert learning_rate(cosine, 750, 0.75) < learning_rate(linear, 750, 0.75)


def test_non_finite_losses_are_skipped_then_stop_training(tmp_path, tiny_config, monkeypatch):
    config = tiny_config(**{"train.max_steps": 40, "train.max_bad_steps": 3})
    real_forward, calls = CharRNN.forward, {"training": 0}

    def poisoned(model, ids, hidden=None):
        logits, hidden = real_forward(model, ids, hidden)
        if model.training:
            calls["training"] += 1
            if calls["training"] in (3, 4) or calls["training"] >= 25:
                logits = logits * float("nan")
        return logits, hidden

    monkeypatch.setattr(CharRNN, "forward", poisoned)
    with pytest.raises(CharlmError, match="3 consecutive steps had a non-finite loss"):
        charlm.train(config)
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert all(torch.isfinite(t).all() for t in best["model"].values())
    assert math.isfinite(best["best_val_loss"])
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 20  # the two early bad steps were skipped, training went on


def checkpoint_step(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["step"])
    except Exception:
        return -1


def test_killed_run_resumes_bit_identically(tmp_path, ascii_corpus):
    """SIGKILL mid-run, resume, and end with exactly the weights of an uninterrupted run."""
    common = ["train", "--data", ascii_corpus, *TINY_OPTIONS, "--max-steps", 400, "--quiet", "--model.layers", 2,
              "--model.dropout", 0.1, "--train.random-seq-len", "--model.weight-drop", 0.2]
    reference = charlm_process(*common, "--out", tmp_path / "reference")
    assert reference.wait(timeout=240) == 0, reference.stderr.read()

    victim = charlm_process(*common, "--out", tmp_path / "victim")
    last = tmp_path / "victim" / "last.pt"
    assert wait_for(lambda: checkpoint_step(last) >= 100), "the run never reached step 100"
    victim.kill()
    victim.wait()
    killed_at = checkpoint_step(last)
    assert 100 <= killed_at < 400, "the run finished before it could be killed"

    resumed = charlm_process("train", "--resume", tmp_path / "victim", "--quiet")
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
        process = charlm_process("train", "--data", ascii_corpus, *TINY_OPTIONS, "--max-steps", 100000, "--quiet",
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
    process = charlm_process("train", "--data", ascii_corpus, *TINY_OPTIONS, "--max-steps", 100000,
                              "--train.checkpoint-interval", 100000, "--out", run)
    assert wait_for(lambda: (run / "metrics.jsonl").is_file())
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert "Traceback" not in err
    assert f"charlm train --resume {run}" in err
    assert load_checkpoint(run / "last.pt")["step"] > 0


class InterruptAt(charlm.training.loop.Reporter):
    """Sends this process SIGINT when training reports step ``step``, as Ctrl-C would."""

    def __init__(self, step: int):
        self.step = step

    def progress(self, step, total, metrics, seconds_left):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_weight_averaging_saves_the_average_and_resumes_bit_identically(tmp_path, tiny_config):
    """--train.average-last: the last half's steps averaged, the average evaluated and saved, and an
    interrupted run resumed to the very average and raw weights of an uninterrupted one."""
    keys = {"train.max_steps": 20, "train.average_last": 0.5, "train.checkpoint_interval": 100}  # precision auto, as charlm.evaluate
    reference = charlm.train(tiny_config("reference", **keys))
    saved = load_checkpoint(tmp_path / "reference" / "last.pt")
    assert saved["averaged_steps"] == 11  # steps 10 to 20
    assert any(not torch.equal(saved["model"][k], saved["training_model"][k]) for k in saved["model"])
    loaded = load_model(tmp_path / "reference" / "last.pt")
    averaged = charlm.evaluate(loaded).result.loss
    loaded.model.load_state_dict(saved["training_model"])
    raw = charlm.evaluate(loaded).result.loss
    assert abs(averaged - reference.final.loss) < 1e-4 < abs(raw - reference.final.loss)  # the run reported the average's loss
    slim = load_checkpoint(export_for_inference(tmp_path / "reference" / "last.pt", tmp_path / "slim.pt"))
    assert "training_model" not in slim and checkpoint_info(tmp_path / "slim.pt", slim)["averaged_steps"] == 11

    with pytest.raises(charlm.training.loop.TrainingInterrupted):
        charlm.train(tiny_config("victim", **keys), reporter=InterruptAt(15))
    assert load_checkpoint(tmp_path / "victim" / "last.pt")["averaged_steps"] == 6
    charlm.resume(tmp_path / "victim")
    resumed = load_checkpoint(tmp_path / "victim" / "last.pt")
    assert resumed["averaged_steps"] == 11
    for part in ("model", "training_model"):
        for key, tensor in saved[part].items():
            assert torch.equal(tensor, resumed[part][key]), (part, key)
