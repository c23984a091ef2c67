"""What a run shows people and scripts: samples as it learns, JSON lines, quiet, no bar off a terminal."""

import json

from tests.conftest import TINY_OPTIONS, one_line_error


def test_every_evaluation_writes_a_comparable_sample(cli, ascii_corpus, tmp_path):
    code, _, err = cli("train", "--data", ascii_corpus, *TINY_OPTIONS, "--max-steps", 30, "--out", tmp_path / "run")
    assert code == 0, err
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [10, 20, 30] and all(len(s["text"]) == 200 for s in samples)
    assert "step 20: sample: " in err  # the first line of each shows as it comes
    assert "\r" not in err  # stderr is not a terminal here: no progress bar, no control characters
    code, _, err = cli("train", "--resume", tmp_path / "run", "--max-steps", 40)
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30, 40]


def test_json_lines_for_scripts_and_quiet_for_people(cli, ascii_corpus, tmp_path):
    code, out, err = cli("train", "--data", ascii_corpus, *TINY_OPTIONS, "--max-steps", 20, "--out", tmp_path / "json",
                         "--log-format", "json")
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "final" and events[-1]["step"] == 20
    assert {"progress", "evaluation", "sample"} <= {event["event"] for event in events}
    code, out, err = cli("train", "--data", ascii_corpus, *TINY_OPTIONS, "--max-steps", 20, "--out", tmp_path / "quiet", "--quiet")
    assert code == 0 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("final validation loss"), err
    one_line_error(*cli("train", "--data", ascii_corpus, "--log-format", "xml")[::2], "--log-format")


def test_prime_file_and_shell_completion(cli, ascii_corpus, tmp_path):
    code, _, err = cli("train", "--data", ascii_corpus, *TINY_OPTIONS, "--max-steps", 10, "--out", tmp_path / "run")
    assert code == 0, err
    prime = tmp_path / "prime.txt"
    prime.write_text("The quick\n")
    assert cli("sample", tmp_path / "run", "--prime-file", prime, "--length", 30, "--seed", 1)[1] == \
        cli("sample", tmp_path / "run", "--prime", "The quick\n", "--length", 30, "--seed", 1)[1]
    one_line_error(*cli("sample", tmp_path / "run", "--prime-file", tmp_path / "none.txt")[::2], "cannot read")
    one_line_error(*cli("sample", tmp_path / "run", "--prime", "a", "--prime-file", prime)[::2], "not both")
    assert "--install-completion" in cli("--help")[1]


def test_tensorboard_logs_the_same_scalars_and_samples(cli, ascii_corpus, tmp_path, monkeypatch):
    from charlm.training import metrics
    code, _, err = cli("train", "--data", ascii_corpus, *TINY_OPTIONS, "--max-steps", 20, "--out", tmp_path / "run",
                       "--train.tensorboard")
    assert code == 0, err
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    board = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    assert {"loss", "val_loss", "lr", "chars_per_sec", "final_val_loss"} <= set(board.Tags()["scalars"])
    assert [event.step for event in board.Scalars("val_loss")] == [10, 20]
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None)  # as without the extra
    one_line_error(*cli("train", "--data", ascii_corpus, *TINY_OPTIONS, "--out", tmp_path / "other", "--train.tensorboard")[::2],
                   "pip install 'charlm[tensorboard]'")
    assert not (tmp_path / "other").exists()
