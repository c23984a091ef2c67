"""Training under torchrun with DistributedDataParallel: 2 processes on the CPU (gloo), on 127.0.0.1 only."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from charlm.model.checkpoint import load_checkpoint
from tests.conftest import TINY_OPTIONS, snapshot, wait_for

# Dropout off and a tight gradient clip: N processes and one then do the same arithmetic, bar rounding.
EXACT = [*TINY_OPTIONS, "--model.layers", 2, "--model.dropout", 0, "--model.output-dropout", 0,
         "--train.grad-clip", 0.5, "--train.precision", "fp32", "--quiet"]
TIMEOUT = 120
LAUNCHED: list[subprocess.Popen] = []  # every torchrun launcher a test started, for no_job_outlives_its_test


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(*args, launcher: list | None = None, **popen_options) -> subprocess.Popen:
    """`torchrun ... -m charlm ARGS` on one machine (standalone rendezvous on 127.0.0.1 unless ``launcher`` says)."""
    launcher = launcher or ["--standalone", "--nproc-per-node", "2"]
    command = [sys.executable, "-m", "torch.distributed.run", *map(str, launcher), "-m", "charlm", *map(str, args)]
    LAUNCHED.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True, **popen_options))
    return LAUNCHED[-1]


@pytest.fixture(autouse=True)
def no_job_outlives_its_test():
    """Whatever a test ended with (a failed assert, a timeout), the jobs it launched are stopped."""
    yield
    while LAUNCHED:
        stop_all(LAUNCHED.pop())


def finished(process: subprocess.Popen) -> tuple[int, str]:
    """Wait for a launcher (killing it and its workers if it outlives the bound): (exit code, stderr)."""
    try:
        _, err = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        stop_all(process)
        _, err = process.communicate()
        pytest.fail(f"torchrun did not finish in {TIMEOUT}s: {err[-4000:]}")
    return process.returncode, err


def workers(launcher: subprocess.Popen) -> dict[int, int]:
    """The worker processes torchrun (the process ``launcher``) started: {rank: pid}."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            parent = next(line for line in (proc / "status").read_text().splitlines() if line.startswith("PPid:"))
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, StopIteration):
            continue
        rank = next((entry[5:] for entry in environ if entry.startswith(b"RANK=")), None)
        if parent.split()[1] == str(launcher.pid) and rank is not None:
            found[int(rank)] = int(proc.name)
    return found


def stop_all(launcher: subprocess.Popen) -> None:
    """SIGKILL every worker the launcher started, and the launcher, unless it has ended (and been reaped:
    its pid may be another process's by now)."""
    if launcher.poll() is None:
        for pid in workers(launcher).values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        launcher.kill()
    launcher.wait()


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "last.pt")["model"]


def charlm_lines(err: str) -> list[str]:
    """charlm's own error lines among torchrun's output."""
    return [line for line in err.splitlines() if line.startswith("charlm: error:")]


def test_two_processes_end_with_the_weights_of_one(cli, ascii_corpus, tmp_path):
    code, err = finished(torchrun("train", "--data", ascii_corpus, *EXACT, "--max-steps", 30, "--out", tmp_path / "two"))
    assert code == 0, err
    code, _, err = cli("train", "--data", ascii_corpus, *EXACT, "--max-steps", 30, "--out", tmp_path / "one")
    assert code == 0, err
    two, one = load_checkpoint(tmp_path / "two" / "last.pt"), load_checkpoint(tmp_path / "one" / "last.pt")
    assert two["job"]["world_size"] == 2 and two["job"]["backend"] == "gloo" and two["step"] == one["step"] == 30
    for name, tensor in one["model"].items():
        torch.testing.assert_close(two["model"][name], tensor, atol=1e-5, rtol=0)
    for mine, theirs in zip(two["hidden"], one["hidden"]):  # every stream's state, gathered from both ranks
        assert mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
    records = [line for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == len(set(records)) == len((tmp_path / "one" / "metrics.jsonl").read_text().splitlines())


def test_the_ranks_of_a_job_encode_a_folder_once_and_map_the_same_file(tmp_path):
    """Both ranks start on an empty cache: one encodes while the other waits on the lock, then both map it."""
    (tmp_path / "texts" / "b").mkdir(parents=True)
    (tmp_path / "texts" / "a.txt").write_text("first file of the folder\n" * 120, encoding="utf-8")
    (tmp_path / "texts" / "b" / "c.txt").write_text("second, naïve café\n" * 120, encoding="utf-8")
    code, err = finished(torchrun("train", "--data", tmp_path / "texts", "--data.unit", "byte", *EXACT,
                                  "--max-steps", 6, "--out", tmp_path / "run"))
    assert code == 0, err
    assert len(list((tmp_path / "cache" / "encoded").glob("*.npy"))) == 1
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    assert checkpoint["job"]["world_size"] == 2 and [f["name"] for f in checkpoint["corpus"]["files"]] == ["a.txt", "b/c.txt"]


def test_sigterm_to_the_launcher_saves_and_the_resume_is_exact(ascii_corpus, tmp_path):
    common = ["--data", ascii_corpus, *EXACT, "--max-steps", 60, "--train.random-seq-len", "--train.checkpoint-interval", 5]
    reference = torchrun("train", *common, "--out", tmp_path / "reference")
    interrupted = torchrun("train", *common, "--out", tmp_path / "run")
    try:
        assert wait_for(lambda: (tmp_path / "run" / "last.pt").is_file(), TIMEOUT)
        interrupted.send_signal(signal.SIGTERM)
        code, err = finished(interrupted)
    finally:
        stop_all(interrupted)
    stopped = load_checkpoint(tmp_path / "run" / "last.pt")  # a complete, loadable checkpoint of the whole job
    assert 5 <= stopped["step"] < 60, err
    code, err = finished(torchrun("train", "--resume", tmp_path / "run"))
    assert code == 0, err
    assert finished(reference)[0] == 0
    for name, tensor in weights(tmp_path / "reference").items():
        assert torch.equal(weights(tmp_path / "run")[name], tensor), name


def test_one_process_resumes_a_two_process_run_on_the_same_streams(cli, ascii_corpus, tmp_path):
    code, err = finished(torchrun("train", "--data", ascii_corpus, *EXACT, "--max-steps", 20, "--out", tmp_path / "run",
                                  "--train.max-time", ""))
    assert code == 0, err
    code, _, err = cli("train", "--data", ascii_corpus, *EXACT, "--max-steps", 20, "--out", tmp_path / "one")
    assert code == 0, err
    for run in ("run", "one"):
        code, _, err = cli("train", "--resume", tmp_path / run, "--max-steps", 35)
        assert code == 0, err
    for name, tensor in weights(tmp_path / "one").items():
        torch.testing.assert_close(weights(tmp_path / "run")[name], tensor, atol=1e-5, rtol=0)
    one_line = cli("train", "--resume", tmp_path / "run", "--train.batch-size", 8)
    assert one_line[0] == 1 and "--train.batch-size when resuming" in one_line[2]


def test_a_killed_worker_is_restarted_and_the_job_ends_as_if_never_interrupted(ascii_corpus, tmp_path):
    common = ["train", "--data", ascii_corpus, *EXACT, "--max-steps", 200, "--train.checkpoint-interval", 5]
    reference = torchrun(*common, "--out", tmp_path / "reference")
    job = torchrun(*common, "--out", tmp_path / "run", launcher=["--standalone", "--nproc-per-node", 2, "--max-restarts", 1])
    try:
        assert wait_for(lambda: (tmp_path / "run" / "last.pt").is_file() and 1 in workers(job), TIMEOUT)
        os.kill(workers(job)[1], signal.SIGKILL)
        code, err = finished(job)
    finally:
        stop_all(job)
    assert code == 0, err
    assert finished(reference)[0] == 0
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 200
    for name, tensor in weights(tmp_path / "reference").items():
        assert torch.equal(weights(tmp_path / "run")[name], tensor), name
    steps = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"val_loss"' in line]
    assert len(steps) == len(set(steps)) == 20  # the restarted attempt dropped what it repeats


def test_two_launchers_meet_on_loopback_and_checkpoint_once(ascii_corpus, tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    launcher = ["--nnodes", 2, "--nproc-per-node", 1, "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "charlm-test"]
    nodes = [torchrun("train", "--data", ascii_corpus, *EXACT, "--max-steps", 20, "--out", tmp_path / "run", launcher=launcher)
             for _ in range(2)]
    for node in nodes:
        code, err = finished(node)
        assert code == 0, err
    saved = load_checkpoint(tmp_path / "run" / "last.pt")
    assert saved["step"] == 20 and saved["job"]["world_size"] == 2
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == [".lock", "best.pt", "config.toml", "last.pt", "metrics.jsonl",
                                                                   "samples.jsonl"]


@pytest.mark.parametrize("lost_hosts_the_store", [False, True], ids=["lost-node", "lost-store-host"])
def test_a_lost_node_ends_the_other_in_one_line_and_leaves_a_checkpoint(ascii_corpus, tmp_path, lost_hosts_the_store):
    """Whichever node is lost, the one hosting the rendezvous store (`is_host`) or not. Losing the host,
    torchrun stops the survivor as it notices the loss too, and prints its own traceback beside our line."""
    endpoint = f"127.0.0.1:{free_port()}"
    launcher = ["--nnodes", 2, "--nproc-per-node", 1, "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "charlm-lost"]
    nodes = [torchrun("train", "--data", ascii_corpus, *EXACT, "--max-steps", 100_000, "--train.checkpoint-interval", 5,
                      "--out", tmp_path / "run", launcher=[*launcher, "--rdzv-conf", f"is_host={int(hosts)}"])
             for hosts in (not lost_hosts_the_store, lost_hosts_the_store)]
    assert wait_for(lambda: (tmp_path / "run" / "last.pt").is_file() and all(workers(node) for node in nodes), TIMEOUT)
    stop_all(nodes[1])
    code, err = finished(nodes[0])
    assert code != 0
    lines = charlm_lines(err)
    assert len(lines) == 1 and "lost contact with the other processes" in lines[0], err
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] >= 5


@pytest.mark.parametrize("options, message", [
    (["--train.batch-size", 5], "train.batch_size 5 does not divide among 2 processes"),
    (["--train.backend", "nccl", "--device", "cpu"], "nccl needs CUDA GPUs"),
])
def test_bad_distributed_input_is_one_line(ascii_corpus, tmp_path, options, message):
    code, err = finished(torchrun("train", "--data", ascii_corpus, *EXACT, "--out", tmp_path / "run", *options))
    assert code != 0
    lines = charlm_lines(err)
    assert len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_restarted_job_never_resumes_a_run_it_did_not_start(cli, ascii_corpus, tmp_path):
    """Refused because --out holds another run, the job is restarted by torchrun: it is refused again."""
    code, _, err = cli("train", "--data", ascii_corpus, *EXACT, "--max-steps", 10, "--out", tmp_path / "run")
    assert code == 0, err
    before = snapshot(tmp_path / "run")
    job = torchrun("train", "--data", ascii_corpus, *EXACT, "--max-steps", 20, "--out", tmp_path / "run",
                   launcher=["--standalone", "--nproc-per-node", 2, "--max-restarts", 1])
    code, err = finished(job)
    assert code != 0 and charlm_lines(err) and all("already holds a run" in line for line in charlm_lines(err)), err
    assert snapshot(tmp_path / "run") == before
